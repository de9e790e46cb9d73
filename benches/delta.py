#!/usr/bin/env python3
"""Delta Lake tables (`lake.format: delta`), in one run:

1. **The cost of the Delta commit** per shardlake commit: the same readings through
   pipelines/well-telemetry.yaml with a small rollover (many commits), as hive and as Delta
   tables, on a local disk and on moto's S3 (started here on a free port, pinned to core 1);
   variants in turns, --repeat times, the fastest run counts. Each run's commits are read
   from its checkpoint.
2. **Compaction**: a lake built the way a live pipeline with a short rollover builds it: the
   stream is appended to in --increments steps per hour and each step is read by its own
   `shardlake run --drain` (one commit, so one file per table and hour partition touched),
   which is what `rollover.max_age` of (60 / increments) minutes does live. Then files per
   table-hour, and a one-device query over the whole lake (time, files read and bytes the
   reader read: `rchar` of /proc/self/io around DuckDB over the pyarrow dataset of the log's
   files that the `deltalake` package builds, which skips a file whose `add` stats exclude
   the device; and `shardlake query`'s wall time, whose delta-rs provider skips files the
   same way), before and after `shardlake compact`, after `shardlake compact --zorder
   device_id,ts`, and after `shardlake compact --sort device_id,ts --target-size
   --sort-target` (small enough that an hour is several files, each a range of devices), the
   last two on copies of the uncompacted lake.

    .venv/bin/python benches/delta.py [--devices 100] [--hours 2] [--increments 30]
        [--commit-devices 200] [--commit-readings 1500] [--repeat 2] [--only commit|compaction]
        [--sort-target 256KiB]
        [--shardlake target/release/shardlake] [--agent target/release/shardlake-agent]

Needs pyarrow, duckdb, deltalake, boto3 and moto's server (scripts/test installs them into
.venv). benches/README.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objects import AWS_ENV, start_moto  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
START = "2026-01-05T00:00:00Z"


def pipeline(dest: Path, lake: str, rollover: str) -> Path:
    text = (REPO / "pipelines/well-telemetry.yaml").read_text()
    text, a = re.subn(r"(?m)^schema:.*$", f"schema: {REPO / 'schemas/well-reading.yaml'}", text)
    text, b = re.subn(r"(?m)^rollover:\n(?:[ \t]+\S.*\n)+", f"rollover: {rollover}\n", text)
    text, c = re.subn(r"(?m)^lake:\n(?:[ \t]+\S.*\n)+", f"lake: {lake}\n", text)
    assert (a, b, c) == (1, 1, 1), "pipelines/well-telemetry.yaml changed shape"
    dest.write_text(text)
    return dest


def simulate(agent: Path, data: Path, devices: int, readings: int, from_step: int = 0) -> None:
    subprocess.run([str(agent), "simulate", "--stream", str(data / "stream"), "--shards", "4",
                    "--devices", str(devices), "--readings", str(readings), "--start", START,
                    "--seed", "11", "--spikes", "0", "--malformed", "0",
                    "--from-step", str(from_step)],
                   check=True, stdout=subprocess.DEVNULL)


def drain(shardlake: Path, pipe: Path, data: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(["taskset", "-c", "0", str(shardlake), "run", "--drain", str(pipe)],
                          env=dict(os.environ, SHARDLAKE_DATA=str(data), RUST_LOG="warn", **env),
                          capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{pipe}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return took


def commits(data: Path) -> int:
    state = json.loads((data / "state/well-telemetry/checkpoint.json").read_text())
    return state["committed"]["commit_id"]


# --------------------------------------------------------------------------------------------


def commit_cost(args, tmp: Path, moto_url: str) -> None:
    import boto3
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    src = tmp / "commit-src"
    simulate(args.agent, src, args.commit_devices, args.commit_readings)
    env_s3 = {**AWS_ENV, "AWS_ENDPOINT_URL": moto_url}
    variants = {}
    for where in ("local", "s3"):
        for fmt in ("hive", "delta"):
            lake = ('{local: {path: "${SHARDLAKE_DATA}/lake"}' if where == "local"
                    else "{s3: {bucket: BUCKET, prefix: lake, part_size: 5MiB}") + f", format: {fmt}}}"
            variants[f"{fmt}, {where}"] = (where, lake)
    best: dict[str, tuple[float, int]] = {}
    for turn in range(args.repeat):
        for name, (where, lake) in variants.items():
            data = tmp / f"commit-{name.replace(', ', '-')}"
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(src, data)
            env = {}
            if where == "s3":
                bucket = f"b{turn}-{name.replace(', ', '-')}"
                s3.create_bucket(Bucket=bucket)
                lake = lake.replace("BUCKET", bucket)
                env = env_s3
            pipe = pipeline(data / "p.yaml", lake, "{max_bytes: 64KiB, max_age: 1s}")
            took = drain(args.shardlake, pipe, data, env)
            n = commits(data)
            if name not in best or took < best[name][0]:
                best[name] = (took, n)
    print("\n## The cost of the Delta commit\n")
    print(f"{args.commit_devices * args.commit_readings:,} readings, `rollover: {{max_bytes: 64KiB, max_age: 1s}}`, "
          f"one core (`taskset -c 0`), best of {args.repeat}.\n")
    print("| lake | run (s) | commits | ms per commit more than hive |")
    print("|---|---:|---:|---:|")
    for name, (took, n) in best.items():
        fmt, where = name.split(", ")
        extra = ""
        if fmt == "delta":
            hive = best[f"hive, {where}"][0]
            extra = f"{(took - hive) / max(n, 1) * 1000:.1f}"
        print(f"| {name} | {took:.2f} | {n} | {extra} |")


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def one_device(lake: Path, device: str) -> tuple[float, int, int, int]:
    """DuckDB over the table's pyarrow dataset (the log's files, each with its stats as its
    guarantee), filtered to one device: seconds, bytes read, rows, files not skipped."""
    import duckdb
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    before, t = rchar(), time.perf_counter()
    ds = DeltaTable(str(lake / "readings")).to_pyarrow_dataset()
    con = duckdb.connect()
    rows = con.execute(f"SELECT count(*), avg(pressure_psi) FROM ds WHERE device_id = '{device}'"
                       ).fetchall()[0][0]
    elapsed, nbytes = time.perf_counter() - t, rchar() - before
    files = len(list(ds.get_fragments(filter=pc.field("device_id") == device)))
    return elapsed, nbytes, rows, files


def shardlake_query(args, pipe: Path, data: Path, device: str) -> float:
    t = time.perf_counter()
    subprocess.run([str(args.shardlake), "query", str(pipe),
                    f"SELECT count(*), avg(pressure_psi) FROM readings WHERE device_id = '{device}'"],
                   env=dict(os.environ, SHARDLAKE_DATA=str(data)), check=True,
                   capture_output=True)
    return time.perf_counter() - t


def files_per_hour(lake: Path, table: str) -> str:
    """`<files> in <hour partitions>`, as the table's latest version lists them."""
    from deltalake import DeltaTable
    per: dict[str, int] = {}
    for u in DeltaTable(str(lake / table)).file_uris():
        per[u.rsplit("/", 1)[0]] = per.get(u.rsplit("/", 1)[0], 0) + 1
    return f"{sum(per.values())} in {len(per)}"


def compaction(args, tmp: Path) -> None:
    data = tmp / "compact"
    lake_spec = '{local: {path: "${SHARDLAKE_DATA}/lake"}, format: delta}'
    pipe = pipeline(tmp / "compact.yaml", lake_spec, "{max_bytes: 512MiB, max_age: 1h}")
    step_readings = 3600 // args.increments
    built = time.perf_counter()
    for i in range(args.hours * args.increments):
        simulate(args.agent, data, args.devices, step_readings, from_step=i * step_readings)
        drain(args.shardlake, pipe, data, {})
    built = time.perf_counter() - built
    zdata, sdata = tmp / "zorder", tmp / "sorted"
    shutil.copytree(data, zdata)
    shutil.copytree(data, sdata)
    device = f"well-{args.devices // 3:04d}"
    rows = []

    def measure(label: str, d: Path) -> None:
        lake = d / "lake"
        best = min((one_device(lake, device) for _ in range(3)), key=lambda r: r[0])
        q = min(shardlake_query(args, pipe, d, device) for _ in range(3))
        rows.append((label, files_per_hour(lake, "readings"), files_per_hour(lake, "well_1m"),
                     best[0], best[1], q, best[2], best[3]))

    measure("before", data)
    t = time.perf_counter()
    subprocess.run([str(args.shardlake), "compact", str(pipe)], check=True,
                   env=dict(os.environ, SHARDLAKE_DATA=str(data)), capture_output=True)
    compact_s = time.perf_counter() - t
    measure("after `compact`", data)
    t = time.perf_counter()
    subprocess.run([str(args.shardlake), "compact", str(pipe), "--zorder", "device_id,ts"],
                   check=True, env=dict(os.environ, SHARDLAKE_DATA=str(zdata)),
                   capture_output=True)
    zorder_s = time.perf_counter() - t
    measure("after `compact --zorder device_id,ts`", zdata)
    t = time.perf_counter()
    subprocess.run([str(args.shardlake), "compact", str(pipe), "--sort", "device_id,ts",
                    "--target-size", args.sort_target],
                   check=True, env=dict(os.environ, SHARDLAKE_DATA=str(sdata)),
                   capture_output=True)
    sorted_s = time.perf_counter() - t
    measure(f"after `compact --sort device_id,ts --target-size {args.sort_target}`", sdata)
    assert len({r[6] for r in rows}) == 1 and rows[0][6] > 0, f"the query's answers: {rows}"
    print("\n## Compaction\n")
    print(f"{args.devices} wells, {args.hours} h of 1 s readings "
          f"({args.devices * args.hours * 3600:,}), committed in {args.increments} steps per hour "
          f"(the files a {60 // args.increments}-minute `max_age` leaves; built in {built:.0f} s). "
          f"`compact` took {compact_s:.1f} s, `compact --zorder` {zorder_s:.1f} s, "
          f"`compact --sort` {sorted_s:.1f} s. The query: "
          f"one well's count and mean pressure over the whole lake ({rows[0][6]} rows), best of 3.\n")
    print("| lake | readings: files in hours | well_1m: files in hours | files read | "
          "DuckDB+pyarrow (s) | bytes read | `shardlake query` (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, fr, fa, secs, nbytes, q, _, nfiles in rows:
        print(f"| {label} | {fr} | {fa} | {nfiles} | {secs:.3f} | {nbytes / 1e6:.2f} MB | "
              f"{q:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--hours", type=int, default=2)
    ap.add_argument("--increments", type=int, default=30)
    ap.add_argument("--commit-devices", type=int, default=200)
    ap.add_argument("--commit-readings", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake")
    ap.add_argument("--agent", type=Path, default=REPO / "target/release/shardlake-agent")
    ap.add_argument("--moto", type=Path, default=Path(sys.executable).parent / "moto_server")
    ap.add_argument("--only", choices=["commit", "compaction"])
    ap.add_argument("--sort-target", default="256KiB",
                    help="the target file size of the sorted compaction")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as t:
        tmp = Path(t)
        if args.only != "compaction":
            moto, url = start_moto(args.moto, tmp / "moto.log")
            try:
                commit_cost(args, tmp, url)
            finally:
                moto.terminate()
                moto.wait()
        if args.only != "commit":
            compaction(args, tmp)


if __name__ == "__main__":
    main()
