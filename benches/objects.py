#!/usr/bin/env python3
"""Objects as a source: the comparison job (benches/pipelines/compare.yaml, aggregates only)
reading the same readings as compare.py, written as objects, through `source: files` (a local
directory) and `source: s3` (moto's server), in four encodings, in one run.

The readings are compare.py's (its `simulate`: `shardlake-agent simulate`, seeded), cut into
--objects objects (each of the 4 simulated shards cut in time order into --objects/4 pieces,
keys sorted so that every object read after another starts later in event time), each
encoding one directory and one S3 prefix: NDJSON, NDJSON gzip, NDJSON zstd, CSV gzip. moto's
server is started here on a free port (pinned to core 1), the bucket filled before any timing.
Each variant is `taskset -c 0 shardlake run --drain` (one core), the variants in turns,
--repeat times; the fastest run counts, and the peak RSS (the child's ru_maxrss) shown is the
highest of its runs. Every variant's first run is checked: every reading counted once in the
aggregates, none late, no dead letters.

The memory check: --big-records readings (one shard, so one time-ordered file) as ONE gzip
object, and the same readings as --objects gzip objects, read through `source: files`: the
peak RSS must not grow with the object's size.

    .venv/bin/python benches/objects.py [--records 1000000] [--repeat 3] [--big-records 4000000]
        [--shardlake target/release/shardlake] [--agent target/release/shardlake-agent]

Needs pyarrow (zstd, reading the lake), boto3 and moto's server (scripts/test installs them
into .venv). benches/README.md records the figures and what bounds them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import REPO, simulate  # noqa: E402  (the same readings as compare.py)

BUCKET = "bench"
CSV_FIELDS = ["device_id", "tenant", "seq", "ts", "barrels_per_s", "pressure_psi", "temp_c",
              "status"]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


# --------------------------------------------------------------------------------------------
# The objects


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    import pyarrow as pa

    buf = pa.BufferOutputStream()
    with pa.CompressedOutputStream(buf, "zstd") as s:
        s.write(data)
    return buf.getvalue().to_pybytes()


def csv_bytes(ndjson: bytes) -> bytes:
    """The same readings as CSV: a header, then each record's values as they were written
    (numbers keep their digits: parse_float/parse_int keep the text)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for line in ndjson.splitlines():
        if line.strip():
            r = json.loads(line, parse_float=str, parse_int=str)
            w.writerow(["" if r.get(c) is None else r[c] for c in CSV_FIELDS])
    return out.getvalue().encode()


# name, key suffix, encoder of an object's NDJSON content
ENCODINGS = [
    ("NDJSON", ".ndjson", lambda b: b),
    ("NDJSON gzip", ".ndjson.gz", gzip_bytes),
    ("NDJSON zstd", ".ndjson.zst", zstd_bytes),
    ("CSV gzip", ".csv.gz", lambda b: gzip_bytes(csv_bytes(b))),
]


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def pieces(stream: Path, per_shard: int) -> list[tuple[str, bytes]]:
    """Each shard file of the simulated stream cut into `per_shard` pieces of whole lines, in
    time order: `<piece>-<shard>` so that keys sort by piece, then shard."""
    out = []
    for f in sorted(stream.glob("*.ndjson")):
        lines = f.read_bytes().splitlines(keepends=True)
        step = -(-len(lines) // per_shard)
        for p in range(per_shard):
            out.append((f"{p:02}-{f.stem}", b"".join(lines[p * step:(p + 1) * step])))
    return sorted(out)


def write_objects(where: Path, objs: list[tuple[str, bytes]], suffix: str, encode) -> tuple[int, int]:
    """Writes the objects; returns their total size and the largest one's."""
    where.mkdir(parents=True, exist_ok=True)
    sizes = []
    for name, content in objs:
        body = encode(content)
        (where / (name + suffix)).write_bytes(body)
        sizes.append(len(body))
    return sum(sizes), max(sizes)


# --------------------------------------------------------------------------------------------
# moto's server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(exe: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    if os.cpu_count() and os.cpu_count() > 1:
        cmd = ["taskset", "-c", "1"] + cmd  # off shardlake's core
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"moto_server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def upload(s3, prefix: str, directory: Path) -> None:
    for f in sorted(directory.iterdir()):
        with open(f, "rb") as fh:
            s3.put_object(Bucket=BUCKET, Key=prefix + f.name, Body=fh)


def reference_speeds(s3, files: Path, objs: list[tuple[str, bytes]], repeat: int) -> dict[str, float]:
    """What bounds the figures, measured apart: moto's GET of the plain objects (boto3, one
    object after another), and decompression of the objects by zlib and pyarrow's zstd (other
    implementations than shardlake's zlib-rs and zstd crate, so an order of magnitude only),
    in MB of content per second. The objects' keys and contents."""
    import pyarrow as pa
    import zlib

    content = sum(len(c) for _, c in objs)
    keys = [f"ndjson/{name}.ndjson" for name, _ in objs]

    def best(fn) -> float:
        took = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            took = min(took, time.perf_counter() - t)
        return content / 1e6 / took

    def get_all():
        for key in keys:
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
            while body.read(1 << 20):
                pass

    gz = [f.read_bytes() for f in sorted((files / "ndjson-gzip").iterdir())]
    zs = [f.read_bytes() for f in sorted((files / "ndjson-zstd").iterdir())]
    return {
        "moto GET of the plain NDJSON objects (moto on core 1)": best(get_all),
        "gzip decompression (Python's zlib)": best(lambda: [zlib.decompress(b, 31) for b in gz]),
        "zstd decompression (pyarrow)": best(
            lambda: [pa.CompressedInputStream(pa.BufferReader(b), "zstd").read() for b in zs]),
    }


# --------------------------------------------------------------------------------------------
# Runs


def pipeline(where: Path, name: str, source: str) -> Path:
    """benches/pipelines/compare.yaml with its source replaced (and its schema made absolute)."""
    text = (REPO / "benches/pipelines/compare.yaml").read_text()
    text, n_schema = re.subn(r"(?m)^schema:.*$", f"schema: {REPO / 'schemas/well-reading.yaml'}", text)
    text, n_source = re.subn(r"(?m)^source:.*$", lambda _: f"source: {source}", text)
    assert (n_schema, n_source) == (1, 1), "benches/pipelines/compare.yaml changed shape"
    path = where / f"{name}.yaml"
    path.write_text(text)
    return path


def run(binary: Path, pipe: Path, data: Path, env: dict[str, str]) -> tuple[float, int]:
    """One `taskset -c 0 shardlake run --drain`: seconds and the process's peak RSS in KiB."""
    shutil.rmtree(data / "lake", ignore_errors=True)
    shutil.rmtree(data / "state", ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    # /usr/bin/time forks shardlake from its own small process: a child forked from this
    # Python process would inherit its peak RSS (Linux keeps ru_maxrss across exec).
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(data / "rss"),
           "taskset", "-c", "0", str(binary), "run", "--drain", str(pipe)]
    env = dict(os.environ, SHARDLAKE_DATA=str(data), RUST_LOG="warn", SHARDLAKE_LOG_FORMAT="json",
               **env)
    with open(data / "stderr.log", "wb") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        proc.wait()
        took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                         f"{(data / 'stderr.log').read_text()[-3000:]}")
    return took, int((data / "rss").read_text().split()[-1])


def table_rows(lake: Path, table: str, column: str | None = None) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = [str(f) for f in (lake / table).rglob("*.parquet")] if (lake / table).exists() else []
    if not files:
        return 0
    t = ds.dataset(files, format="parquet").to_table(columns=[column] if column else [])
    return int(pc.sum(t[column]).as_py() or 0) if column else t.num_rows


def check(lake: Path, n: int, what: str) -> None:
    """Every reading counted once by the aggregates; none late, none dead-lettered."""
    got = table_rows(lake, "well_1m", "readings")
    late, dead = table_rows(lake, "late"), table_rows(lake, "dead_letter")
    if (got, late, dead) != (n, 0, 0):
        raise SystemExit(f"{what}: {got} readings in well_1m (of {n}), {late} late, {dead} dead letters; "
                         f"lake: {sorted(p.name for p in lake.iterdir())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=2_000)
    ap.add_argument("--objects", type=int, default=8, help="a multiple of 4 (the simulated shards)")
    ap.add_argument("--big-records", type=int, default=4_000_000,
                    help="readings in the one large gzip object of the memory check (0: none)")
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake")
    ap.add_argument("--agent", type=Path, default=REPO / "target/release/shardlake-agent")
    ap.add_argument("--moto", type=Path, default=Path(sys.executable).parent / "moto_server")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts")
    ap.add_argument("--keep", action="store_true",
                    help="keep the objects and pipelines (the temp directory is printed)")
    args = ap.parse_args()
    assert args.objects % 4 == 0 and args.objects > 0, "--objects: a multiple of 4"
    tmp = Path(tempfile.mkdtemp(prefix="shardlake-objects-"))
    moto = None
    try:
        print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
              f"{os.getloadavg()[0]:.2f}, shardlake {args.shardlake}", flush=True)
        n = simulate(args.agent, tmp / "gen", args.records, args.devices, 0)
        objs = pieces(tmp / "gen" / "stream", args.objects // 4)
        raw = sum(len(c) for _, c in objs)
        stored = {}
        for name, suffix, encode in ENCODINGS:
            stored[name] = write_objects(tmp / "files" / slug(name), objs, suffix, encode)[0]
        moto, url = start_moto(args.moto, tmp / "moto.log")
        s3 = s3_client(url)
        s3.create_bucket(Bucket=BUCKET)
        for name, _, _ in ENCODINGS:
            upload(s3, f"{slug(name)}/", tmp / "files" / slug(name))
        print(f"input: {n} records, {raw / n:.0f} bytes each as NDJSON, {args.objects} objects; "
              + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in stored.items()), flush=True)
        bounds = reference_speeds(s3, tmp / "files", objs, args.repeat)
        del objs

        pipes = tmp / "pipelines"
        pipes.mkdir()
        s3_env = dict(AWS_ENV, AWS_ENDPOINT_URL_S3=url, AWS_ENDPOINT_URL=url)
        # The same readings through compare.py's source (the 4 simulated shards, `source: local`).
        variants = {("local stream", "NDJSON, 4 shards"): (
            pipeline(pipes, "local", f'{{local: {{path: "{tmp / "gen" / "stream"}"}}}}'), {})}
        stored["NDJSON, 4 shards"] = raw
        for name, _, _ in ENCODINGS:
            d = tmp / "files" / slug(name)
            variants[("files", name)] = (pipeline(pipes, f"files-{slug(name)}",
                                                  f'{{files: {{path: "{d}"}}}}'), {})
        for name, _, _ in ENCODINGS:
            variants[("s3", name)] = (pipeline(pipes, f"s3-{slug(name)}",
                                               f"{{s3: {{bucket: {BUCKET}, prefix: {slug(name)}/, "
                                               f"region: us-east-1}}}}"), s3_env)

        big = {}
        if args.big_records:
            m = simulate(args.agent, tmp / "gen-big", args.big_records, args.devices, 0, shards=1)
            [content] = [f.read_bytes() for f in (tmp / "gen-big" / "stream").glob("*.ndjson")]
            one = tmp / "files-big-one"
            many = tmp / "files-big-many"
            big_one, _ = write_objects(one, [("00-all", content)], ".ndjson.gz", gzip_bytes)
            lines = content.splitlines(keepends=True)
            step = -(-len(lines) // args.objects)
            big_many, big_many_largest = write_objects(many, [(f"{p:02}", b"".join(lines[p * step:(p + 1) * step]))
                                            for p in range(args.objects)], ".ndjson.gz", gzip_bytes)
            del content, lines
            print(f"memory check: {m} records, {big_one / 1e6:.1f} MB as one gzip object, "
                  f"{big_many / 1e6:.1f} MB as {args.objects}", flush=True)
            big = {
                "many": (m, big_many, big_many_largest,
                         pipeline(pipes, "files-big-many", f'{{files: {{path: "{many}"}}}}')),
                "one": (m, big_one, big_one, pipeline(pipes, "files-big-one", f'{{files: {{path: "{one}"}}}}')),
            }

        best = {k: float("inf") for k in variants}
        rss = {k: 0 for k in variants}
        big_best = {k: float("inf") for k in big}
        big_rss = {k: 0 for k in big}
        # In turns, so a slow spell of the machine falls on every variant alike.
        for turn in range(args.repeat):
            for key, (pipe, env) in variants.items():
                data = tmp / "run"
                took, peak = run(args.shardlake, pipe, data, env)
                if turn == 0:
                    check(data / "lake", n, " ".join(key))
                best[key] = min(best[key], took)
                rss[key] = max(rss[key], peak)
                print(f"  turn {turn + 1}: {key[0]:12} {key[1]:16} {took:6.2f} s {peak / 1024:6.0f} MiB",
                      flush=True)
            for key, (m, _, _, pipe) in big.items():
                data = tmp / "run"
                took, peak = run(args.shardlake, pipe, data, {})
                if turn == 0:
                    check(data / "lake", m, f"memory check ({key})")
                big_best[key] = min(big_best[key], took)
                big_rss[key] = max(big_rss[key], peak)
                print(f"  turn {turn + 1}: files        big, {key:11} {took:6.2f} s {peak / 1024:6.0f} MiB",
                      flush=True)

        base = best[("files", "NDJSON")]
        print("\nreference speeds (this machine, now; one thread each, fastest of --repeat):")
        for what, mbs in bounds.items():
            print(f"  {what}: {mbs:,.0f} MB/s")
        print(f"\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
              f"{os.getloadavg()[0]:.2f}; fastest of {args.repeat}, peak RSS the highest of them\n")
        print(f"| source | encoding | stored MB | seconds ({n / 1e6:g}M records) | records/s "
              "| stored MB/s | vs files NDJSON | peak RSS |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for (src, name), s in best.items():
            print(f"| {src} | {name} | {stored[name] / 1e6:.1f} | {s:.2f} | {n / s:,.0f} | "
                  f"{stored[name] / 1e6 / s:.1f} | {base / s:.2f}× | {rss[(src, name)] / 1024:.0f} MiB |")
        if big:
            small = rss[("files", "NDJSON gzip")]
            print(f"\n| memory check (files, NDJSON gzip) | records | stored MB | largest object MB "
                  "| seconds | records/s | peak RSS |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            small_largest = max(f.stat().st_size for f in (tmp / "files" / "ndjson-gzip").iterdir())
            print(f"| {args.objects} objects (table above) | {n:,} | {stored['NDJSON gzip'] / 1e6:.1f} | "
                  f"{small_largest / 1e6:.1f} | {best[('files', 'NDJSON gzip')]:.2f} | "
                  f"{n / best[('files', 'NDJSON gzip')]:,.0f} | {small / 1024:.0f} MiB |")
            for key, label in (("many", f"{args.objects} objects"), ("one", "1 object")):
                m, size, largest, _ = big[key]
                print(f"| {label} | {m:,} | {size / 1e6:.1f} | {largest / 1e6:.1f} | {big_best[key]:.2f} | "
                      f"{m / big_best[key]:,.0f} | {big_rss[key] / 1024:.0f} MiB |")
    finally:
        if moto is not None:
            moto.terminate()
            try:
                moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                moto.kill()
                moto.wait()
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
