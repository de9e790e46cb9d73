"""Objects as the source: `source: s3` (moto's server) and `source: files` (a local directory)
read every object under the prefix once, in each format the source knows (NDJSON and CSV,
plain, gzip or zstd), each object a shard (`_shard_id` = `<key>@<etag>`, `_sequence_number`
= the byte offset in the decompressed content just after the record's line). Bad lines and
rows, a truncated compressed object, an unknown extension and an object over
`max_object_bytes` go to dead-letter with their own reasons; a second run reads nothing; an
overwritten object (new ETag) is read again, alone; SIGKILLs inside a large gzip object
lose and duplicate nothing.

The input is generated here, from seeded readings of schemas/well-reading.yaml, so the
expected rows, dead letters and aggregates come from what was written, never from
shardlake's output; the lake is read with DuckDB (lake.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import signal
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from crash import no_core_dumps
from harness import REPO, check_run, pipeline_env, wait_until, write_test_pipeline
from lake import (check_readings_exactly_once, check_record_alerts, check_well_1m,
                  check_well_5m_hop, duck, inprogress_files, lake_count, lake_source, no_late)
from streamdata import StreamData, parse_record, rfc3339_to_us

BUCKET = "uploads"
PREFIX = "gateways/"
START_AFTER = f"{PREFIX}00-before.ndjson"
# Stored size above which an object goes to dead-letter whole (every other object is smaller).
MAX_OBJECT_BYTES = 256 * 1024
T0_MS = int(dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.timezone.utc).timestamp() * 1000)
# Every reading of the first tests falls in [10:00:00, 10:01:25): the newest event time minus
# the allowed lateness (30 s) never reaches 10:01, the end of the first window, so no window
# is emitted before the drain, whatever order the objects are read in, and none is late.
STEPS = 85
CORPUS = REPO / "testdata" / "bad-records"
# Corpus cases left out: an empty or blank line inside a file is not specified as a record.
CORPUS_SKIP = {"14-empty.bin", "15-whitespace-only.bin"}
CSV_FIELDS = ["device_id", "tenant", "seq", "ts", "barrels_per_s", "pressure_psi", "temp_c",
              "status"]
TENANTS = ["acme", "borealis", "cobalt"]
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))


# --------------------------------------------------------------------------------------------
# The input: readings, and objects made of them


def readings(rng: random.Random, prefix: str, devices: int, steps: int, *, start_ms: int = T0_MS,
             first_seq: int = 1, spikes: int = 2) -> list[dict]:
    """Readings of `devices` wells, one a second each (with sub-second jitter), in time order
    (step by step, every well each step), a few pressure spikes above 5000 psi."""
    wells = []
    for d in range(devices):
        wells.append({
            "id": f"{prefix}-{d:03}", "tenant": TENANTS[d % len(TENANTS)],
            "tz": IST if d % 7 == 3 else dt.timezone.utc,
            "p": round(1800 + rng.random() * 800, 2), "f": 0.3 + rng.random() * 0.9,
            "t": 60 + rng.random() * 35,
        })
    spike_at = {rng.randrange(devices * steps) for _ in range(spikes)}
    out = []
    for step in range(steps):
        for d, w in enumerate(wells):
            ms = start_ms + step * 1000 + rng.randrange(1000)
            ts = dt.datetime.fromtimestamp(ms / 1000, w["tz"]).isoformat(timespec="milliseconds")
            n = step * devices + d
            pressure = (round(5200 + rng.random() * 800, 2) if n in spike_at
                        else round(w["p"] + rng.uniform(-15, 15), 2))
            out.append({
                "device_id": w["id"], "tenant": w["tenant"], "seq": first_seq + step,
                "ts": ts.replace("+00:00", "Z"),
                "barrels_per_s": round(w["f"] + rng.uniform(-0.02, 0.02), 4),
                "pressure_psi": pressure,
                # Optional fields sometimes null (or, in NDJSON, absent).
                "temp_c": None if n % 23 == 5 else round(w["t"] + rng.uniform(-0.5, 0.5), 2),
                "status": (None if n % 19 == 4 else "maintenance" if n % 31 == 0
                           else "ok, checked" if n % 11 == 0 else "ok"),
            })
    return out


def ndjson_line(r: dict) -> bytes:
    obj = {k: v for k, v in r.items() if not (v is None and k == "status")}
    return json.dumps(obj, separators=(",", ":")).encode()


def csv_row(cells: list) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if c is None else c for c in cells])
    return buf.getvalue().encode()


def expected_row(r: dict, shard: str, seqno: int) -> dict:
    """A reading as the raw table must hold it (streamdata's shape, for StreamData.table)."""
    rec = parse_record(json.dumps(r).encode())
    assert rec is not None, r
    assert rec["ts_us"] == rfc3339_to_us(r["ts"])
    return {**rec, "shard": shard, "seqno": str(seqno)}


@dataclass
class Obj:
    key: str  # relative to the prefix (S3) or to the directory (files)
    body: bytes = b""
    # Good records and the offset just after each one's line, in the decompressed content.
    records: list[tuple[dict, int]] = field(default_factory=list)
    # Line-level dead letters: (offset after the line, raw bytes, kind, text the reason holds).
    bad: list[tuple[int, bytes, str, str]] = field(default_factory=list)
    # The kind of the one dead letter that stands for the whole object (or its damage).
    whole: str | None = None
    # A truncated object: between `kept[0]` and `kept[1]` of its first records are kept.
    kept: tuple[int, int] | None = None
    # The object must not be read at all (before start_after, or outside the prefix).
    ignored: bool = False


class Lines:
    """The decompressed content of an object, line by line, with each line's end offset."""

    def __init__(self):
        self.data = bytearray()

    def add(self, line: bytes) -> int:
        self.data += line if line.endswith(b"\n") else line + b"\n"
        return len(self.data)


def ndjson_object(key: str, rs: list[dict]) -> Obj:
    out, content = Obj(key), Lines()
    for r in rs:
        out.records.append((r, content.add(ndjson_line(r))))
    out.body = bytes(content.data)
    return out


def csv_object(key: str, rs: list[dict], columns: list[str] = CSV_FIELDS) -> Obj:
    out, content = Obj(key), Lines()
    content.add(csv_row(columns))
    for r in rs:
        out.records.append((r, content.add(csv_row([r[c] for c in columns]))))
    out.body = bytes(content.data)
    return out


def gzip_bytes(segments: list[bytes]) -> tuple[bytes, list[int]]:
    """One gzip member; a full flush after every segment but the last (the compressed
    offsets of those flush points are returned: everything before one decodes alone)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    out, points = bytearray(), []
    for seg in segments[:-1]:
        out += c.compress(seg) + c.flush(zlib.Z_FULL_FLUSH)
        points.append(len(out))
    out += c.compress(segments[-1]) + c.flush()
    assert zlib.decompress(bytes(out), 31) == b"".join(segments)
    return bytes(out), points


def zstd_bytes(segments: list[bytes]) -> tuple[bytes, list[int]]:
    """One zstd frame (pyarrow's codec); the stream flushed after every segment but the last."""
    buf = pa.BufferOutputStream()
    s = pa.CompressedOutputStream(buf, "zstd")
    points = []
    for seg in segments[:-1]:
        s.write(seg)
        s.flush()
        points.append(buf.tell())
    s.write(segments[-1])
    s.close()
    data = buf.getvalue().to_pybytes()
    assert pa.CompressedInputStream(pa.BufferReader(data), "zstd").read() == b"".join(segments)
    return data, points


def compressed(obj: Obj, codec: str) -> Obj:
    obj.body = (gzip_bytes if codec == "gzip" else zstd_bytes)([obj.body])[0]
    return obj


def truncated(obj: Obj, codec: str) -> Obj:
    """The object compressed with flush points after 40% and 60% of its records, cut half way
    between them: every record before the first point is readable, none after the second."""
    n = len(obj.records)
    a, b = (2 * n) // 5, (3 * n) // 5
    ends = [0] + [end for _, end in obj.records]
    content = obj.body
    segments = [content[:ends[a]], content[ends[a]:ends[b]], content[ends[b]:]]
    data, (pa_, pb) = (gzip_bytes if codec == "gzip" else zstd_bytes)(segments)
    cut = (pa_ + pb) // 2
    assert pa_ < cut < pb and pb - pa_ > 200, (pa_, pb)
    obj.body = data[:cut]
    obj.kept = (a, b)
    obj.whole = "corrupt_object"
    # The fixture itself, read by another decoder: the first segment decodes, not the whole.
    if codec == "gzip":
        got = zlib.decompressobj(31).decompress(obj.body)
    else:
        got, r = b"", pa.CompressedInputStream(pa.BufferReader(obj.body), "zstd")
        try:
            while chunk := r.read(1):
                got += chunk
        except OSError:
            pass
    assert content[:ends[a]] == got[:ends[a]] and len(got) < len(content), (len(got), ends[a])
    return obj


def corpus_lines() -> list[tuple[bytes, str, str]]:
    """The bad-record corpus (testdata/bad-records): each case's bytes, kind and reason text."""
    out = []
    for row in (CORPUS / "expected.tsv").read_text().splitlines():
        if not row or row.startswith("#"):
            continue
        name, kind, text = row.split("\t")
        if name in CORPUS_SKIP:
            continue
        raw = (CORPUS / name).read_bytes()
        assert b"\n" not in raw and b"\r" not in raw, name
        out.append((raw, kind, text))
    assert len(out) >= 30, len(out)
    return out


def mixed_ndjson(key: str, rs: list[dict]) -> Obj:
    """Good lines with the corpus's bad ones spread among them."""
    bad = corpus_lines()
    out, content = Obj(key), Lines()
    every = max(1, len(rs) // (len(bad) + 1))
    for i, r in enumerate(rs):
        out.records.append((r, content.add(ndjson_line(r))))
        if i % every == every - 1 and bad:
            raw, kind, text = bad.pop(0)
            out.bad.append((content.add(raw), raw, kind, text))
    assert not bad
    out.body = bytes(content.data)
    return out


def mixed_csv(key: str, rs: list[dict]) -> Obj:
    """Good rows, and rows with too few cells, too many, and an empty required cell."""
    out, content = Obj(key), Lines()
    content.add(csv_row(CSV_FIELDS))
    third = len(rs) // 3
    for i, r in enumerate(rs):
        cells = [r[c] for c in CSV_FIELDS]
        out.records.append((r, content.add(csv_row(cells))))
        if i in (third, 2 * third):
            short = csv_row(cells[:-2])
            out.bad.append((content.add(short), short.rstrip(b"\n"), "bad_csv_row", ""))
        if i == third + 1:
            # A quoted cell too (RFC 4180: the comma is the cell's).
            long = csv_row(cells[:-1] + ["ok, checked", "extra"])
            assert b'"ok, checked"' in long
            out.bad.append((content.add(long), long.rstrip(b"\n"), "bad_csv_row", ""))
        if i == 2 * third + 1:
            no_seq = csv_row([(None if c == "seq" else r[c]) for c in CSV_FIELDS])
            out.bad.append((content.add(no_seq), no_seq.rstrip(b"\n"), "missing_field", "`seq`"))
    out.body = bytes(content.data)
    return out


def make_objects(seed: int, *, s3_only: bool) -> list[Obj]:
    """The objects of the first two tests (keys relative to the prefix or directory)."""
    rng = random.Random(seed)
    objs = [
        ndjson_object("site-a/2026-01-05/readings.ndjson", readings(rng, "a", 12, STEPS)),
        compressed(ndjson_object("site-b/2026-01-05/readings.ndjson.gz",
                                 readings(rng, "b", 12, STEPS)), "gzip"),
        csv_object("site-c/2026-01-05/readings.csv", readings(rng, "c", 12, STEPS)),
        # Another column order: the header names the fields.
        compressed(csv_object("site-d/2026-01-05/readings.csv.zst", readings(rng, "d", 12, STEPS),
                              columns=["ts", "seq", "device_id", "status", "temp_c", "tenant",
                                       "pressure_psi", "barrels_per_s"]), "zstd"),
        compressed(ndjson_object("site-e/readings.jsonl.zst", readings(rng, "e", 6, STEPS)),
                   "zstd"),
        mixed_ndjson("site-f/mixed.ndjson", readings(rng, "fj", 6, STEPS)),
        mixed_csv("site-f/mixed.csv", readings(rng, "fc", 6, STEPS)),
        truncated(ndjson_object("site-g/truncated.ndjson.gz", readings(rng, "gj", 10, STEPS)),
                  "gzip"),
        truncated(csv_object("site-g/truncated.csv.zst", readings(rng, "gc", 10, STEPS)),
                  "zstd"),
        Obj("site-h/firmware.bin", body=rng.randbytes(3000), whole="unknown_format"),
        Obj("site-h/empty.ndjson", body=b""),
    ]
    if s3_only:
        huge = ndjson_object("site-h/huge.ndjson", readings(rng, "huge", 30, STEPS))
        huge.records, huge.whole = [], "object_too_large"
        before = ndjson_object("00-before.ndjson", readings(rng, "skip", 3, 10))
        before.records, before.ignored = [], True
        objs += [huge, before]
    for o in objs:
        if o.whole == "object_too_large":
            assert len(o.body) > MAX_OBJECT_BYTES, len(o.body)
        else:
            assert len(o.body) < MAX_OBJECT_BYTES, (o.key, len(o.body))
    return objs


# --------------------------------------------------------------------------------------------
# Checking the lake against the objects


def shard_counts(con, lake, output: str = "readings") -> dict[str, int]:
    src = lake_source(lake, output)
    if src is None:
        return {}
    return dict(con.execute(f"SELECT _shard_id, count(*) FROM {src} GROUP BY 1").fetchall())


def check_objects(con, lake, objs: list[Obj], shard_of: dict[str, str],
                  extra_valid: list[dict] = ()) -> StreamData:
    """Every good record of every object exactly once (every field, shard and offset), the
    truncated objects' first records, every dead letter with its kind, and the aggregates and
    alerts DuckDB computes from the same readings. `shard_of`: object key -> its shard id.
    Returns the expected readings, and the dead letters whose bytes are not the line's or
    row's (for `assert_raw_as_read`)."""
    counts = shard_counts(con, lake)
    data = StreamData(valid=list(extra_valid))
    for o in objs:
        shard = shard_of[o.key]
        if o.ignored or o.whole in ("unknown_format", "object_too_large"):
            assert counts.get(shard, 0) == 0, f"{o.key}: {counts.get(shard)} rows read from it"
            continue
        keep = len(o.records)
        if o.kept is not None:
            keep = counts.get(shard, 0)
            assert o.kept[0] <= keep <= o.kept[1], (
                f"{o.key} (truncated): {keep} records kept; the {o.kept[0]} before the first "
                f"flush point decode, and none after the {o.kept[1]}th")
        data.valid += [expected_row(r, shard, end) for r, end in o.records[:keep]]
    con.execute("DROP VIEW IF EXISTS src")
    con.register("src", data.table())
    check_readings_exactly_once(con, lake, len(data.valid))
    no_late(con, lake)
    check_record_alerts(con, lake)
    check_well_1m(con, lake)
    check_well_5m_hop(con, lake)

    # Dead letters: each bad line or row at its offset, with its kind, reason and bytes; one
    # for each unreadable object or damaged end.
    src = lake_source(lake, "dead_letter")
    dead = [] if src is None else con.execute(
        f"SELECT _shard_id, _sequence_number, error, reason, raw FROM {src}").fetchall()
    expected_lines = {(shard_of[o.key], str(end)): (raw, kind, text)
                      for o in objs for end, raw, kind, text in o.bad}
    whole = {shard_of[o.key]: o.whole for o in objs if o.whole}
    lines = [d for d in dead if d[0] not in whole]
    per_object = {}
    for d in dead:
        if d[0] in whole:
            per_object.setdefault(d[0], []).append(d)
    got = {(d[0], d[1]) for d in lines}
    assert len(got) == len(lines), "a dead letter is there twice"
    assert got == set(expected_lines), (
        f"dead letters: missing {sorted(set(expected_lines) - got)[:5]}, "
        f"unexpected {[(d[0], d[1], d[3]) for d in lines if (d[0], d[1]) not in expected_lines][:5]}")
    wrong, raw_differs = [], []
    for shard, seqno, error, reason, raw in lines:
        want_raw, kind, text = expected_lines[(shard, seqno)]
        if not (error == kind and reason.startswith(kind) and text in reason):
            wrong.append((shard, seqno, error, reason, kind, text))
        if bytes(raw).rstrip(b"\r\n") != want_raw:
            raw_differs.append((shard, seqno, error, want_raw[:80], bytes(raw)[:80]))
    assert not wrong, f"{len(wrong)} dead letters with another kind or reason: {wrong[:5]}"
    for shard, kind in whole.items():
        rows = per_object.get(shard, [])
        assert len(rows) == 1 and rows[0][2] == kind and rows[0][3].startswith(kind), (
            f"{shard}: expected one `{kind}` dead letter, got {[(r[2], r[3]) for r in rows]}")
    return data, raw_differs


def assert_raw_as_read(raw_differs: list) -> None:
    """A bad line's or row's dead letter holds its bytes as they were in the object (checked
    last, so that the rest of a test runs first)."""
    assert not raw_differs, (
        f"{len(raw_differs)} dead letters hold other bytes than the line or row they stand "
        f"for (shard, offset, kind, the object's bytes, the dead letter's): {raw_differs[:5]}")


def lake_totals(con, lake) -> dict[str, int]:
    return {o: lake_count(con, lake, o) for o in ("readings", "dead_letter", "well_1m",
                                                  "well_5m_hop", "alerts", "late")}


def put(s3, key: str, body: bytes) -> str:
    """Uploads an object; returns its ETag without the quotes."""
    return s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')


def objects_pipeline(tmp_path: Path, source: str, name: str = "objects.yaml", **rollover) -> Path:
    return write_test_pipeline(tmp_path / name, max_bytes=rollover.get("max_bytes", "128MiB"),
                               max_age=rollover.get("max_age", "5m"), source=source,
                               extra="limits: {max_record_bytes: 4KiB}\n")


def run_drain(shardlake_bin: Path, pipeline: Path, data_dir: Path, extra: dict | None = None,
              timeout: float = 300) -> float:
    started = time.monotonic()
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=pipeline_env(data_dir, extra), timeout=timeout)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# The tests


def test_objects_in_every_format_land_once_with_dead_letters(tmp_path, moto, shardlake_bin,
                                                            capsys):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    objs = make_objects(20260105, s3_only=True)
    shard_of = {}
    for o in objs:
        shard_of[o.key] = f"{PREFIX}{o.key}@{put(s3, PREFIX + o.key, o.body)}"
    # Outside the prefix: never read.
    outside = ndjson_object("x", readings(random.Random(1), "skip-out", 3, 10))
    put(s3, "elsewhere/readings.ndjson", outside.body)

    source = (f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}, region: us-east-1, "
              f"start_after: {START_AFTER}, concurrency: 3, poll_interval: 1s, "
              f"max_object_bytes: {MAX_OBJECT_BYTES // 1024}KiB}}}}")
    pipeline = objects_pipeline(tmp_path, source)
    env = moto.env()
    took = [run_drain(shardlake_bin, pipeline, tmp_path, env)]
    lake = tmp_path / "lake"
    con = duck()
    expected, raw_differs = check_objects(con, lake, objs, shard_of)
    assert inprogress_files(lake) == []
    first = lake_totals(con, lake)
    first_shards = shard_counts(con, lake)
    assert first["readings"] == len(expected.valid) and first["well_1m"] > 0

    # Again: every object is committed, nothing is read twice.
    took.append(run_drain(shardlake_bin, pipeline, tmp_path, env))
    assert lake_totals(con, lake) == first, "a second run over the same objects wrote more"

    # One object overwritten with other readings (later ones: new windows): a new ETag, so a
    # new shard; read alone, the others stay as they were.
    a = objs[0]
    new = ndjson_object(a.key, readings(random.Random(7), "a", 12, 60,
                                        start_ms=T0_MS + 3600_000, first_seq=STEPS + 1))
    new_etag = put(s3, PREFIX + a.key, new.body)
    new_shard = f"{PREFIX}{a.key}@{new_etag}"
    assert new_shard != shard_of[a.key]
    took.append(run_drain(shardlake_bin, pipeline, tmp_path, env))
    after = shard_counts(con, lake)
    assert after == {**first_shards, new_shard: len(new.records)}, (
        f"after the overwrite, rows per shard changed beyond the new version's "
        f"{len(new.records)} rows: before {first_shards}, after {after}")
    assert lake_count(con, lake, "dead_letter") == first["dead_letter"]
    check_objects(con, lake, objs, shard_of,
                  extra_valid=[expected_row(r, new_shard, end) for r, end in new.records])
    with capsys.disabled():
        kept = {o.key: after.get(shard_of[o.key]) for o in objs if o.kept}
        print(f"\n[s3 source] {len(objs)} objects, {first['readings']} readings, "
              f"{first['dead_letter']} dead letters, {first['well_1m']} 1-minute windows; "
              f"truncated objects kept {kept}; runs took "
              f"{', '.join(f'{t:.1f}s' for t in took)}")
    assert_raw_as_read(raw_differs)


def test_local_files_source_reads_the_same(tmp_path, shardlake_bin):
    objs = make_objects(20260105, s3_only=False)
    root = tmp_path / "uploads"
    for o in objs:
        path = root / o.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(o.body)
    pipeline = objects_pipeline(
        tmp_path, f"{{files: {{path: {json.dumps(str(root))}, concurrency: 2, "
                  f"poll_interval: 1s, max_object_bytes: {MAX_OBJECT_BYTES // 1024}KiB}}}}")
    run_drain(shardlake_bin, pipeline, tmp_path)
    lake = tmp_path / "lake"
    con = duck()

    # A file's shard id is not specified beyond being one per file: learn it from the rows
    # (every device is in one file only), then check everything as for S3.
    src = lake_source(lake, "readings")
    assert src is not None, "no readings"
    device_file = {r["device_id"]: o.key for o in objs for r, _ in o.records}
    shard_files: dict[str, set[str]] = {}
    for shard, device in con.execute(f"SELECT DISTINCT _shard_id, device_id FROM {src}").fetchall():
        assert device in device_file, f"device {device} is in no input file"
        shard_files.setdefault(shard, set()).add(device_file[device])
    assert all(len(files) == 1 for files in shard_files.values()), (
        f"a shard id holds records of several files: {shard_files}")
    shard_of = {next(iter(files)): shard for shard, files in shard_files.items()}
    assert len(shard_of) == len(shard_files), f"a file is read as several shards: {shard_files}"
    readable = [o for o in objs if o.records]
    assert set(shard_of) == {o.key for o in readable}, (
        f"files with records in the lake: {sorted(shard_of)}; expected "
        f"{sorted(o.key for o in readable)}")
    # The whole-object dead letters (no rows to learn their shard from) by their kind.
    dl = lake_source(lake, "dead_letter")
    assert dl is not None, "no dead letters"
    others = con.execute(f"""SELECT _shard_id, error FROM {dl}
        WHERE _shard_id NOT IN (SELECT DISTINCT _shard_id FROM {src})""").fetchall()
    unreadable = [o for o in objs if not o.records and o.whole]
    assert sorted(e for _, e in others) == sorted(o.whole for o in unreadable), others
    for o in unreadable:
        shard_of[o.key] = next(s for s, e in others if e == o.whole)
    shard_of.update({o.key: f"<no shard: {o.key}>" for o in objs if o.key not in shard_of})

    _, raw_differs = check_objects(con, lake, objs, shard_of)
    # The same rows as the S3 test's objects hold (the same generator and seed), offsets too.
    s3_objs = make_objects(20260105, s3_only=True)
    want = {(r["device_id"], r["seq"], r["pressure_psi"], str(end)) for o in s3_objs
            if not (o.ignored or o.kept or o.whole) for r, end in o.records}
    cut = [shard_of[o.key] for o in objs if o.kept]
    got = set(con.execute(f"""SELECT device_id, seq, pressure_psi, _sequence_number FROM {src}
                              WHERE _shard_id NOT IN ({', '.join('?' * len(cut))})""",
                          cut).fetchall())
    assert got == want, (f"the files' rows differ from the S3 objects' readings: missing "
                         f"{sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}")

    totals = lake_totals(con, lake)
    run_drain(shardlake_bin, pipeline, tmp_path)
    assert lake_totals(con, lake) == totals, "a second run over the same files wrote more"
    assert_raw_as_read(raw_differs)


def big_object(key: str, prefix: str, devices: int, steps: int, start_ms: int,
               seed: int) -> Obj:
    """A large gzip NDJSON object (level 1: quicker to make, a few MB all the same)."""
    rs = readings(random.Random(seed), prefix, devices, steps, start_ms=start_ms, spikes=5)
    obj = ndjson_object(key, rs)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    obj.body = c.compress(obj.body) + c.flush()
    return obj


def test_sigkill_in_a_large_object_resumes_exactly_once(tmp_path, moto, shardlake_bin, capsys):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    # 300,000 readings over 10:00–10:05 in one gzip object; small ones (plain, CSV in gzip,
    # JSON lines) in its last minute, so none of them can be late whichever is read first.
    big = big_object("site-big/export.ndjson.gz", "big", 1000, 300, T0_MS, seed=11)
    # And a large plain NDJSON object over the same minutes: resumed by a ranged GET.
    plain = ndjson_object("site-big/plain.ndjson",
                          readings(random.Random(13), "plain", 500, 300, start_ms=T0_MS))
    rng = random.Random(12)
    last_minute = T0_MS + 240_000
    objs = [
        big,
        plain,
        ndjson_object("site-s1/readings.ndjson", readings(rng, "s1", 50, 60, start_ms=last_minute)),
        compressed(csv_object("site-s2/readings.csv.gz",
                              readings(rng, "s2", 50, 60, start_ms=last_minute)), "gzip"),
        ndjson_object("site-s3/readings.jsonl", readings(rng, "s3", 50, 60, start_ms=last_minute)),
    ]
    shard_of = {o.key: f"{PREFIX}{o.key}@{put(s3, PREFIX + o.key, o.body)}" for o in objs}
    source = f"{{s3: {{bucket: {BUCKET}, prefix: {PREFIX}, concurrency: 4, poll_interval: 1s}}}}"
    # Commits every second, so each run gets a commit or two through before its kill.
    pipeline = objects_pipeline(tmp_path, source, max_bytes="1MiB", max_age="1s")
    checkpoint = tmp_path / "state" / "well-telemetry" / "checkpoint.json"
    lake = tmp_path / "lake"
    con = duck()
    total = sum(len(o.records) for o in objs)

    def commit_id():
        try:
            return json.loads(checkpoint.read_text())["committed"]["commit_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # Kill -9 at random moments: two runs in three right after a commit of their own (plus up
    # to 0.4 s), so each makes progress (one of them once more of the gzip object is
    # committed, so that each such run resumes further inside it); every third at a random
    # moment of its first 1.5 s (often while it skips to where the last run stopped). Should
    # a run drain it all before enough kills, another large object is uploaded (later readings:
    # its windows come after every window already emitted).
    rnd = random.Random(20261203)
    kills, runs, inside, extensions, events = 0, 0, 0, 0, []
    inside_of: dict[str, int] = {}
    big_shards = {shard_of[o.key]: len(o.records) for o in (big, plain)}
    cmd = [str(shardlake_bin), "run", str(pipeline), "--drain"]
    while kills < 6:
        runs += 1
        assert runs <= 30, "\n".join(events)
        before = commit_id()
        log_path = tmp_path / f"run-{runs:02}.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=pipeline_env(tmp_path, moto.env()), cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=no_core_dumps)
            try:
                if runs % 3 == 0:
                    delay = rnd.uniform(0.1, 1.5)
                elif runs % 3 == 1:
                    wait_until(f"run {runs} to commit",
                               lambda: proc.poll() is not None or commit_id() != before,
                               timeout=120, every=0.02)
                    delay = rnd.uniform(0.0, 0.4)
                else:
                    # Until more of the gzip object is committed: the next run resumes
                    # further inside it than the last.
                    gz = shard_of[big.key]
                    had = shard_counts(con, lake).get(gz, 0)
                    wait_until(f"run {runs} to commit more of {big.key} than {had} records",
                               lambda: proc.poll() is not None
                               or shard_counts(con, lake).get(gz, 0) > had,
                               timeout=120, every=0.2)
                    delay = rnd.uniform(0.0, 0.4)
                rc = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        alive = time.monotonic() - started
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"run {runs} exited {rc}:\n"
                                 f"{log_path.read_text(errors='replace')[-4000:]}")
        counts = shard_counts(con, lake)
        visible = sum(counts.values())
        src = lake_source(lake, "readings")
        if src:
            dups = con.execute(f"SELECT count(*) - count(DISTINCT (device_id, seq)) "
                               f"FROM {src}").fetchall()[0][0]
            assert dups == 0, f"after run {runs} readings has {dups} duplicates"
        src_1m = lake_source(lake, "well_1m")
        if src_1m:
            dups = con.execute(f"SELECT count(*) - count(DISTINCT (window_start, device_id)) "
                               f"FROM {src_1m}").fetchall()[0][0]
            assert dups == 0, f"after run {runs} well_1m has {dups} duplicate windows"
        partial = {s: counts.get(s, 0) for s, n in big_shards.items() if 0 < counts.get(s, 0) < n}
        if rc == -signal.SIGKILL:
            kills += 1
            inside += bool(partial)
            for shard in partial:
                inside_of[shard] = inside_of.get(shard, 0) + 1
        events.append(f"run {runs:2}: {'SIGKILL' if rc else 'finished'} after {alive:.2f}s, "
                      f"commit {commit_id()}; {visible} of {total} readings visible; "
                      f"large objects part-read: {partial}")
        if rc == 0:
            assert visible == total, "\n".join(events)
            if kills < 6:
                extensions += 1
                assert extensions <= 3, "\n".join(events)
                more = big_object(f"site-big/export-{extensions}.ndjson.gz", f"big{extensions}",
                                  500, 200, T0_MS + extensions * 1200_000, seed=20 + extensions)
                shard_of[more.key] = f"{PREFIX}{more.key}@{put(s3, PREFIX + more.key, more.body)}"
                objs.append(more)
                big_shards[shard_of[more.key]] = len(more.records)
                total += len(more.records)
                events.append(f"drained: {len(more.records)} more readings in {more.key}")

    final = run_drain(shardlake_bin, pipeline, tmp_path, moto.env())
    with capsys.disabled():
        print(f"\n[s3 source crashes] {kills} SIGKILLs in {runs} runs, {inside} inside a "
              f"part-read large object; final run {final:.1f}s:\n  " + "\n  ".join(events))
    assert inside_of.get(shard_of[big.key], 0) >= 3 and inside_of.get(shard_of[plain.key]), (
        f"kills that left each large object part-read: {inside_of}: resuming inside a gzip "
        "object (3 at least) or a plain one was hardly exercised\n" + "\n".join(events))
    assert inprogress_files(lake) == [], inprogress_files(lake)
    check_objects(con, lake, objs, shard_of)
    assert lake_count(con, lake, "dead_letter") == 0
