"""Shared helpers for the Python half of the test suite.

These tests treat the shardlake binaries as black boxes: they generate a local stream with
`shardlake-agent simulate`, run `shardlake run ... --drain` over it, and check the lake with
independent readers (DuckDB, pyarrow) against expectations computed from the input NDJSON
files, never from shardlake's own output.

The binaries come from SHARDLAKE_BIN / SHARDLAKE_AGENT_BIN (scripts/test sets them), or
target/debug/ by default.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "well-telemetry.yaml"
SCHEMA = REPO / "schemas" / "well-reading.yaml"
DEFAULT_START = "2026-01-05T10:00:00Z"

# Every output of pipelines/well-telemetry.yaml and the column whose UTC hour names its
# partition directory.
OUTPUT_TIME_COLUMN = {
    "readings": "ts",
    "dead_letter": "arrival_time",
    "late": "ts",
    "alerts": "event_time",
    "well_1m": "window_start",
    "well_5m_hop": "window_start",
}

MINUTE_US = 60_000_000


def _binary(env_var: str, name: str) -> Path:
    value = os.environ.get(env_var)
    if value:
        path = Path(value)
        if not path.is_absolute():
            # scripts/test passes paths relative to the repository root.
            path = (Path.cwd() / path) if (Path.cwd() / path).exists() else (REPO / path)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        if not target.is_absolute():
            target = REPO / target
        path = target / "debug" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{name} binary not found at {path}; run `cargo build --bins` or set {env_var}")
    return path.resolve()


@pytest.fixture(scope="session")
def shardlake_bin() -> Path:
    return _binary("SHARDLAKE_BIN", "shardlake")


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    return _binary("SHARDLAKE_AGENT_BIN", "shardlake-agent")


# --------------------------------------------------------------------------------------------
# Running the binaries


def pipeline_env(data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SHARDLAKE_FAILPOINTS", None)
    env["SHARDLAKE_DATA"] = str(data_dir)
    env["SHARDLAKE_LOG_FORMAT"] = "json"
    env.setdefault("RUST_BACKTRACE", "1")
    if extra:
        env.update(extra)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def check_run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs a command; fails the test with its output when it does not exit 0."""
    proc = subprocess.run(cmd, env=env, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"command failed with exit status {proc.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )
    return proc


def simulate(agent_bin: Path, data_dir: Path, *, shards: int, devices: int, readings: int,
             seed: int, spikes: int, malformed: int, start: str = DEFAULT_START,
             jitter_ms: int | None = None) -> dict:
    """Simulates wells into DATA/stream; returns the simulator's JSON summary."""
    cmd = [str(agent_bin), "simulate", "--stream", str(data_dir / "stream"),
           "--shards", str(shards), "--devices", str(devices), "--readings", str(readings),
           "--start", start, "--seed", str(seed), "--spikes", str(spikes),
           "--malformed", str(malformed)]
    if jitter_ms is not None:
        cmd += ["--jitter-ms", str(jitter_ms)]
    proc = check_run(cmd, timeout=120)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"readings", "spikes", "malformed"}, summary
    return summary


def run_pipeline(shardlake_bin: Path, pipeline: Path, data_dir: Path, *,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                     env=pipeline_env(data_dir), timeout=timeout)


def write_test_pipeline(dest: Path, *, max_bytes: str, max_age: str, lake: str | None = None,
                        source: str | None = None, checkpoints: str | None = None,
                        extra: str = "") -> Path:
    """The shipped pipeline with an absolute schema path and another rollover; `lake`,
    `source` and `checkpoints` (flow YAML, e.g. `{s3: {bucket: b}}`) replace its own, `extra`
    is appended (top-level keys)."""
    text = PIPELINE.read_text()
    text, n_schema = re.subn(r"(?m)^schema:.*$", f"schema: {SCHEMA}", text)
    text, n_roll = re.subn(r"(?m)^rollover:\n(?:[ \t]+\S.*\n)+",
                           f"rollover: {{max_bytes: {max_bytes}, max_age: {max_age}}}\n", text)
    n_lake = 1
    if lake is not None:
        text, n_lake = re.subn(r"(?m)^lake:\n(?:[ \t]+\S.*\n)+", f"lake: {lake}\n", text)
    n_source = 1
    if source is not None:
        text, n_source = re.subn(r"(?m)^source:\n(?:[ \t]+\S.*\n)+", f"source: {source}\n",
                                 text)
    n_checkpoints = 1
    if checkpoints is not None:
        text, n_checkpoints = re.subn(r"(?m)^checkpoints:\n(?:[ \t]+\S.*\n)+",
                                      f"checkpoints: {checkpoints}\n", text)
    assert (n_schema, n_roll, n_lake, n_source, n_checkpoints) == (1, 1, 1, 1, 1), (
        "pipelines/well-telemetry.yaml changed shape")
    dest.write_text(text + extra)
    return dest


def run_until_read_then_sigterm(shardlake_bin: Path, pipeline: Path, env: dict[str, str],
                                records: int, timeout: float = 120,
                                at_least: bool = False, args: tuple[str, ...] = ()) -> float:
    """Runs `shardlake run --progress` until it has read `records` records (its progress
    line, every second, says how many; `at_least`: or more, when reads come in bigger steps
    than the stream's tail), then stops it with SIGTERM: it must commit what it read and
    exit 0. Returns the seconds from SIGTERM to its exit."""
    proc = subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--progress", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        read = 0
        for line in proc.stderr:
            m = re.match(r"records (\d+)", line)
            if m:
                read = int(m.group(1))
                if read >= records:
                    break
            assert time.monotonic() < deadline, f"only {read} of {records} records read"
        assert read == records or (at_least and read > records), (
            f"the run read {read} records, not {records}")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        proc.stderr.read()
        assert proc.wait(timeout=60) == 0, "the run did not shut down cleanly on SIGTERM"
        return time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# The input, parsed independently of shardlake

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_INT64 = (-(2**63), 2**63 - 1)


def rfc3339_to_us(text: str) -> int | None:
    """Microseconds since the epoch of an RFC 3339 timestamp, None if it is not one."""
    m = _RFC3339.match(text)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    try:
        offset = dt.timedelta(0) if z else (1 if sign == "+" else -1) * dt.timedelta(
            hours=int(oh), minutes=int(om))
        t = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s),
                        tzinfo=dt.timezone(offset))
    except ValueError:
        return None
    us = int(((frac or "") + "000000")[:6])
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    delta = t - epoch
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + us


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_record(line: bytes) -> dict | None:
    """The record if it satisfies schemas/well-reading.yaml, else None."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    device, tenant, seq, ts = (obj.get(k) for k in ("device_id", "tenant", "seq", "ts"))
    if not (isinstance(device, str) and isinstance(tenant, str)):
        return None
    if not (isinstance(seq, int) and not isinstance(seq, bool) and _INT64[0] <= seq <= _INT64[1]):
        return None
    if not isinstance(ts, str):
        return None
    ts_us = rfc3339_to_us(ts)
    if ts_us is None:
        return None
    for k in ("barrels_per_s", "pressure_psi", "temp_c"):
        v = obj.get(k)
        if v is not None and not _is_number(v):
            return None
    status = obj.get("status")
    if status is not None and not isinstance(status, str):
        return None
    return {
        "device_id": device,
        "tenant": tenant,
        "seq": seq,
        "ts_us": ts_us,
        "barrels_per_s": None if obj.get("barrels_per_s") is None else float(obj["barrels_per_s"]),
        "pressure_psi": None if obj.get("pressure_psi") is None else float(obj["pressure_psi"]),
        "temp_c": None if obj.get("temp_c") is None else float(obj["temp_c"]),
        "status": status,
    }


@dataclass
class StreamData:
    """Every whole line of a local stream, split by the independent validity filter."""

    valid: list[dict] = field(default_factory=list)
    # (shard id, sequence number) of each invalid line.
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def table(self) -> pa.Table:
        cols = {k: [r[k] for r in self.valid] for k in (
            "device_id", "tenant", "seq", "barrels_per_s", "pressure_psi", "temp_c", "status",
            "shard", "seqno")}
        ts = pa.array([r["ts_us"] for r in self.valid], pa.int64())
        return pa.table({
            "device_id": pa.array(cols["device_id"], pa.string()),
            "tenant": pa.array(cols["tenant"], pa.string()),
            "seq": pa.array(cols["seq"], pa.int64()),
            # Naive timestamp holding UTC wall time: DuckDB's date_trunc is then plain UTC.
            "ts": ts.cast(pa.timestamp("us")),
            "ts_us": ts,
            "barrels_per_s": pa.array(cols["barrels_per_s"], pa.float64()),
            "pressure_psi": pa.array(cols["pressure_psi"], pa.float64()),
            "temp_c": pa.array(cols["temp_c"], pa.float64()),
            "status": pa.array(cols["status"], pa.string()),
            "shard": pa.array(cols["shard"], pa.string()),
            "seqno": pa.array(cols["seqno"], pa.string()),
        })


def stream_data(records) -> StreamData:
    """`(bytes, shard id, sequence number)` of every record, split by the validity filter."""
    out = StreamData()
    for line, shard, seqno in records:
        rec = parse_record(line)
        if rec is None:
            out.invalid.append((shard, seqno))
        else:
            rec["shard"] = shard
            rec["seqno"] = seqno
            out.valid.append(rec)
    return out


def stream_lines(stream_dir: Path):
    """`(line, shard id, sequence number)` of every whole line of every `shardId-*.ndjson`
    file. A line's sequence number is the byte offset just past its newline (the local
    stream's definition)."""
    files = sorted(stream_dir.glob("shardId-*.ndjson"))
    assert files, f"no shard files in {stream_dir}"
    for path in files:
        shard = path.name[: -len(".ndjson")]
        data = path.read_bytes()
        offset = 0
        while True:
            nl = data.find(b"\n", offset)
            if nl < 0:
                break
            line = data[offset:nl]
            offset = nl + 1
            yield line, shard, str(offset)


def read_stream(stream_dir: Path) -> StreamData:
    return stream_data(stream_lines(stream_dir))


# --------------------------------------------------------------------------------------------
# Reading the lake with DuckDB


def duck() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def parquet_files(lake: Path, output: str) -> list[str]:
    return sorted(glob.glob(str(lake / output / "**" / "*.parquet"), recursive=True))


def lake_source(lake, output: str) -> str | None:
    """A DuckDB table expression for an output, None when it has no files (DuckDB errors on
    an empty glob). `lake` is a local lake directory or an `S3LakeView`."""
    if isinstance(lake, S3LakeView):
        return lake.source(output)
    if not parquet_files(lake, output):
        return None
    pattern = str(lake / output / "**" / "*.parquet").replace("'", "''")
    return f"read_parquet('{pattern}', hive_partitioning=true)"


# The aggregations are stored as parts (one per window, group and worker that read some of
# it: the aggregates' states) and read through a view that merges them. These merges are
# written here by hand for DuckDB, from the meaning of each state, as a reader would.
MERGED = {
    "well_1m": """
        SELECT window_start, window_end, tenant, device_id,
               sum(readings)::BIGINT AS readings,
               sum(barrels_per_s_avg__sum) / sum(barrels_per_s_avg__n) AS barrels_per_s_avg,
               min(pressure_min) AS pressure_min,
               max(pressure_max) AS pressure_max,
               sum(pressure_avg__sum) / sum(pressure_avg__n) AS pressure_avg,
               CASE WHEN sum(pressure_stddev__n) > 1 THEN sqrt(
                   (sum(pressure_stddev__m2) + sum(pressure_stddev__n
                       * (pressure_stddev__mean - g) * (pressure_stddev__mean - g)))
                   / (sum(pressure_stddev__n) - 1)) END AS pressure_stddev,
               sum(temp_avg__sum) / sum(temp_avg__n) AS temp_avg,
               max(temp_max) AS temp_max
        FROM (SELECT *, sum(pressure_stddev__n * pressure_stddev__mean) OVER w
                        / sum(pressure_stddev__n) OVER w AS g
              FROM {src} WINDOW w AS (PARTITION BY window_start, tenant, device_id))
        GROUP BY window_start, window_end, tenant, device_id""",
    "well_5m_hop": """
        SELECT window_start, window_end, tenant,
               sum(readings)::BIGINT AS readings,
               len(list_distinct(flatten(list(devices__set))))::BIGINT AS devices,
               sum(pressure_avg__sum) / sum(pressure_avg__n) AS pressure_avg,
               max(pressure_max) AS pressure_max
        FROM {src} GROUP BY window_start, window_end, tenant""",
}


def lake_merged(lake, output: str) -> str | None:
    """A DuckDB table expression for an aggregation's rows: its parts, merged."""
    src = lake_source(lake, output)
    return None if src is None else f"({MERGED[output].format(src=src)})"


def lake_count(con, lake: Path, output: str, where: str = "") -> int:
    src = lake_source(lake, output)
    if src is None:
        return 0
    return con.execute(f"SELECT count(*) FROM {src} {where}").fetchall()[0][0]


def inprogress_files(lake: Path) -> list[str]:
    return sorted(str(p.relative_to(lake)) for p in lake.rglob("*.inprogress"))


# --------------------------------------------------------------------------------------------
# The independent aggregates, and comparing them with the lake's

WELL_1M_EXPECTED = """
    SELECT epoch_us(date_trunc('minute', ts)) AS window_start_us, tenant, device_id,
           count(*)             AS readings,
           avg(barrels_per_s)   AS barrels_per_s_avg,
           min(pressure_psi)    AS pressure_min,
           max(pressure_psi)    AS pressure_max,
           avg(pressure_psi)    AS pressure_avg,
           stddev_samp(pressure_psi) AS pressure_stddev,
           avg(temp_c)          AS temp_avg,
           max(temp_c)          AS temp_max
    FROM src GROUP BY ALL
"""
WELL_1M_VALUES = ["readings", "barrels_per_s_avg", "pressure_min", "pressure_max",
                  "pressure_avg", "pressure_stddev", "temp_avg", "temp_max"]

# 5-minute windows sliding by 1 minute, aligned to the epoch: a record is in the windows
# starting at its minute and the 4 minutes before it.
WELL_5M_HOP_EXPECTED = """
    SELECT (ts_us // 60000000 - k) * 60000000 AS window_start_us, tenant,
           count(*)                  AS readings,
           count(DISTINCT device_id) AS devices,
           avg(pressure_psi)         AS pressure_avg,
           max(pressure_psi)         AS pressure_max
    FROM src, range(0, 5) AS r(k)
    GROUP BY ALL
"""
WELL_5M_HOP_VALUES = ["readings", "devices", "pressure_avg", "pressure_max"]


def keyed(con, sql: str, nkeys: int) -> dict[tuple, tuple]:
    rows = con.execute(sql).fetchall()
    out = {}
    for r in rows:
        key = tuple(r[:nkeys])
        assert key not in out, f"duplicate key {key}"
        out[key] = tuple(r[nkeys:])
    return out


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def compare_aggregates(name: str, expected: dict, actual: dict, columns: list[str]) -> None:
    """Same keys; every value equal (integers exactly, floats within 1e-9 relative)."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, (
        f"{name}: {len(missing)} windows missing from the lake (first: {missing[:5]}), "
        f"{len(extra)} unexpected (first: {extra[:5]}); expected {len(expected)} windows, "
        f"the lake has {len(actual)}"
    )
    bad = []
    for key, exp in expected.items():
        act = actual[key]
        for col, e, a in zip(columns, exp, act):
            if not _close(e, a):
                bad.append((key, col, e, a))
    assert not bad, (
        f"{name}: {len(bad)} values differ from DuckDB's (key, column, expected, lake), "
        f"first: {bad[:10]}"
    )


def check_well_1m(con, lake: Path) -> int:
    """Compares the lake's well_1m with DuckDB's over table `src`; returns the window count."""
    src = lake_merged(lake, "well_1m")
    assert src is not None, "well_1m has no files"
    expected = keyed(con, WELL_1M_EXPECTED, 3)
    actual = keyed(con, f"""
        SELECT epoch_us(window_start), tenant, device_id, {', '.join(WELL_1M_VALUES)}
        FROM {src}""", 3)
    compare_aggregates("well_1m", expected, actual, WELL_1M_VALUES)
    bad_end = con.execute(f"""SELECT count(*) FROM {src}
        WHERE epoch_us(window_end) - epoch_us(window_start) <> {MINUTE_US}""").fetchall()[0][0]
    assert bad_end == 0, f"{bad_end} well_1m rows whose window_end is not window_start + 1 min"
    return len(expected)


def check_well_5m_hop(con, lake: Path) -> int:
    src = lake_merged(lake, "well_5m_hop")
    assert src is not None, "well_5m_hop has no files"
    expected = keyed(con, WELL_5M_HOP_EXPECTED, 2)
    actual = keyed(con, f"""
        SELECT epoch_us(window_start), tenant, {', '.join(WELL_5M_HOP_VALUES)}
        FROM {src}""", 2)
    compare_aggregates("well_5m_hop", expected, actual, WELL_5M_HOP_VALUES)
    bad_end = con.execute(f"""SELECT count(*) FROM {src}
        WHERE epoch_us(window_end) - epoch_us(window_start) <> {5 * MINUTE_US}""").fetchall()[0][0]
    assert bad_end == 0, f"{bad_end} well_5m_hop rows whose window_end is not window_start + 5 min"
    return len(expected)


# --------------------------------------------------------------------------------------------
# What every lake must hold, checked against the input


def check_readings_exactly_once(con, lake, valid: int) -> None:
    """`readings` holds every valid input record exactly once, every field as sent."""
    src = lake_source(lake, "readings")
    assert src is not None, "readings has no files"
    n, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT (device_id, seq)) FROM {src}").fetchall()[0]
    assert n == valid, f"readings has {n} rows; the input has {valid} valid records"
    assert distinct == n, f"readings has {n - distinct} duplicate (device_id, seq) rows"
    lake_rows = f"""SELECT device_id, tenant, seq, epoch_us(ts), barrels_per_s, pressure_psi,
                           temp_c, status, _shard_id, _sequence_number FROM {src}"""
    input_rows = """SELECT device_id, tenant, seq, ts_us, barrels_per_s, pressure_psi, temp_c,
                           status, shard, seqno FROM src"""
    missing = con.execute(f"{input_rows} EXCEPT ALL {lake_rows} LIMIT 5").fetchall()
    extra = con.execute(f"{lake_rows} EXCEPT ALL {input_rows} LIMIT 5").fetchall()
    assert not missing and not extra, (
        f"readings differ from the input: missing (first 5) {missing}; unexpected {extra}")


def check_dead_letter(con, lake, invalid: list[tuple[str, str]]) -> None:
    """`dead_letter` holds exactly the invalid input lines, once each."""
    src = lake_source(lake, "dead_letter")
    rows = [] if src is None else con.execute(
        f"SELECT _shard_id, _sequence_number FROM {src}").fetchall()
    assert len(rows) == len(invalid), (
        f"dead_letter has {len(rows)} rows; the input has {len(invalid)} invalid records")
    assert len(set(rows)) == len(rows), "dead_letter has a (shard, sequence number) twice"
    assert set(rows) == set(invalid), (
        f"dead_letter names other records than the invalid input lines: "
        f"missing {sorted(set(invalid) - set(rows))[:5]}, unexpected {sorted(set(rows) - set(invalid))[:5]}")


def check_record_alerts(con, lake) -> int:
    """One `pressure_spike` alert per input record above 5000 psi, keyed by its device."""
    expected = con.execute(
        "SELECT device_id, ts_us FROM src WHERE pressure_psi > 5000").fetchall()
    src = lake_source(lake, "alerts")
    actual = [] if src is None else con.execute(f"""
        SELECT key, epoch_us(event_time) FROM {src}
        WHERE rule = 'pressure_spike' AND kind = 'record'""").fetchall()
    assert sorted(actual) == sorted(expected), (
        f"pressure_spike alerts: expected {len(expected)} (one per reading above 5000 psi), "
        f"the lake has {len(actual)}")
    return len(expected)


def no_late(con, lake) -> None:
    n = lake_count(con, lake, "late")
    assert n == 0, f"late has {n} rows; every reading is within the allowed lateness"


def check_whole_lake(con, lake, stream: StreamData) -> None:
    """Every output of pipelines/well-telemetry.yaml against the input (registered as `src`
    in `con` by the caller), for an input without late readings."""
    check_readings_exactly_once(con, lake, len(stream.valid))
    check_dead_letter(con, lake, stream.invalid)
    no_late(con, lake)
    check_record_alerts(con, lake)
    src_alerts = lake_source(lake, "alerts")
    n, distinct = con.execute(f"""SELECT count(*), count(DISTINCT (rule, kind, key, event_time))
                                  FROM {src_alerts}""").fetchall()[0]
    assert n == distinct, f"alerts has {n - distinct} duplicates"
    check_well_1m(con, lake)
    check_well_5m_hop(con, lake)


def run_log(proc) -> list[dict]:
    """The JSON log lines of a finished run, each with its fields at the top level."""
    out = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            out.append({**entry, **entry.get("fields", {})})
    return out


def check_lake_against_put(put, summary: dict, lake):
    """The records put on a stream were the simulator's (valid and malformed counts), and
    the lake holds every output right for them; returns the DuckDB connection (`src` is the
    input)."""
    data = stream_data(put)
    assert (len(data.valid), len(data.invalid)) == (summary["readings"], summary["malformed"])
    con = duck()
    con.register("src", data.table())
    check_whole_lake(con, lake, data)
    return con


# --------------------------------------------------------------------------------------------
# Crashing a run again and again

FAILPOINTS = ["after_stage", "after_prepare", "after_publish_file", "after_publish", "after_commit"]


def _no_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Crashes:
    kills: int = 0
    aborts: int = 0
    runs: int = 0
    # Crashes that left part of the stream, not none or all of it, in the lake.
    mid_stream: int = 0
    # Times the stream was drained before enough kills, and extended.
    extensions: int = 0
    events: list[str] = field(default_factory=list)

    def report(self) -> str:
        extended = f", the stream extended {self.extensions}×" if self.extensions else ""
        return (f"{self.kills} SIGKILLs, {self.aborts} failpoint aborts, {self.runs} "
                f"runs{extended}:\n" + "\n".join("  " + e for e in self.events))


def simulator_extension(agent_bin: Path, data_dir: Path, *, shards: int, devices: int,
                        after: int, readings: int, seed: int):
    """For `crash_runs(extend=...)`: each call appends `readings` more readings per well to the
    stream `simulate` made with `after` readings per well (same start, wells and seed),
    continuing each well's `seq`, after a 10-minute gap: longer than the widest window, so no
    new reading falls in a window that the drained run already emitted. Returns how many
    readings it added."""
    gap = 600  # steps of 1 s
    step = after

    def extend() -> int:
        nonlocal step
        step += gap
        proc = check_run([str(agent_bin), "simulate", "--stream", str(data_dir / "stream"),
                          "--shards", str(shards), "--devices", str(devices),
                          "--readings", str(readings), "--from-step", str(step),
                          "--start", DEFAULT_START, "--seed", str(seed), "--spikes", "2",
                          "--malformed", "0"], timeout=120)
        step += readings
        return json.loads(proc.stdout.strip().splitlines()[-1])["readings"]

    return extend


def crash_runs(shardlake_bin: Path, pipeline: Path, data_dir: Path, con, lake, *, valid: int,
               seed: int, staged, min_kills: int = 10, env: dict[str, str] | None = None,
               kill_window: tuple[float, float] = (0.3, 4.0), extend=None,
               max_extensions: int = 20) -> Crashes:
    """Runs `shardlake run --drain` until it was SIGKILLed `min_kills` times: every other run
    is killed at a random moment in `kill_window` seconds (around the first commits), the
    others abort themselves at a random failpoint of the commit protocol. After each crash
    the visible lake must have no duplicates. `staged()` describes what is staged but not
    published (temporary files, multipart uploads) for the report.

    How much of the stream a run gets through before its kill depends on the machine's speed
    and load. A killed run that published more than its share of what is left (the rest over
    the kills still to come) shortens the window for the next kills, down to
    `kill_window[0] + 0.2` s. Failpoint runs always get a commit or two through, so a fast
    machine may still drain the stream before `min_kills`. So with `extend()` (see
    `simulator_extension`), more readings are appended, as a producer would, whenever less is
    left unread than twice the most one run has published, and again if a run drained the
    stream all the same; without it, or after `max_extensions`, a drained stream before
    `min_kills` fails the test."""
    checkpoint = data_dir / "state" / "well-telemetry" / "checkpoint.json"
    cmd = [str(shardlake_bin), "run", str(pipeline), "--drain"]
    rng = random.Random(seed)
    out = Crashes()
    longest = kill_window[1]
    visible = 0
    most = 0  # the most readings one run has published so far
    while out.kills < min_kills:
        before = visible
        # A producer keeps ahead of the consumer: with less left unread than twice what one
        # run has published (or nothing, after a run that drained it), the next run might
        # drain the stream before its kill.
        while (extend is not None and out.extensions < max_extensions
               and valid - visible < max(2 * most, 1)):
            added = extend()
            valid += added
            out.extensions += 1
            out.events.append(f"{valid - added - visible} readings left to read: {added} more "
                              f"appended ({valid} in all)")
        out.runs += 1
        assert out.runs <= 4 * min_kills, (
            f"{out.kills} kills in {out.runs - 1} runs:\n" + "\n".join(out.events))
        failpoint = None
        if out.runs % 2 == 0:
            # The process aborts itself at the n-th pass of the point; the kill is a backstop.
            failpoint = f"{rng.choice(FAILPOINTS)}@{rng.randint(1, 2)}"
            delay = kill_window[1] + rng.uniform(2.0, 6.0)
        else:
            delay = rng.uniform(kill_window[0], longest)
        extra = dict(env or {})
        if failpoint:
            extra["SHARDLAKE_FAILPOINTS"] = failpoint
        log_path = data_dir / f"run-{out.runs:02}.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=pipeline_env(data_dir, extra), cwd=data_dir,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_no_core_dumps)
            try:
                rc = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait()
        alive = time.monotonic() - started
        log_text = log_path.read_text(errors="replace")
        if rc == -signal.SIGKILL:
            out.kills += 1
            how = f"SIGKILL after {alive:.2f}s" + (f" (failpoint {failpoint} not reached)"
                                                  if failpoint else "")
        elif rc == -signal.SIGABRT and failpoint:
            point = failpoint.split("@")[0]
            assert f"failpoint {point} reached" in log_text, log_text[-3000:]
            out.aborts += 1
            how = f"aborted at failpoint {failpoint} after {alive:.2f}s"
        elif rc == 0:
            how = f"finished (exit 0) after {alive:.2f}s" + (
                f" without reaching failpoint {failpoint}" if failpoint else "")
        else:
            pytest.fail(f"run {out.runs} ({failpoint or 'no failpoint'}) exited {rc}:\n"
                        f"{log_text[-4000:]}")

        # After every crash: what is visible has no duplicates.
        if isinstance(lake, S3LakeView):
            lake.refresh()
        visible = lake_count(con, lake, "readings")
        src = lake_source(lake, "readings")
        if src:
            dups = con.execute(
                f"SELECT count(*) - count(DISTINCT (device_id, seq)) FROM {src}").fetchall()[0][0]
            assert dups == 0, f"after run {out.runs} ({how}) readings has {dups} duplicates"
        src_1m = lake_source(lake, "well_1m")
        if src_1m:
            dups = con.execute(f"""SELECT count(*) - count(DISTINCT (window_start, device_id))
                                   FROM {src_1m}""").fetchall()[0][0]
            assert dups == 0, f"after run {out.runs} ({how}) well_1m has {dups} duplicate windows"
        if rc != 0 and 0 < visible < valid:
            out.mid_stream += 1
        state = json.loads(checkpoint.read_text()) if checkpoint.exists() else None
        commit = state["committed"]["commit_id"] if state else 0
        pending = bool(state and state.get("pending"))
        out.events.append(
            f"run {out.runs:2}: {how}; checkpoint: commit {commit}"
            f"{', intent pending' if pending else ''}; {staged()} staged; "
            f"{visible} readings visible")
        most = max(most, visible - before)
        if rc == -signal.SIGKILL and not failpoint and out.kills < min_kills:
            share = (valid - before) / (min_kills - out.kills + 1)
            if visible - before > share and longest > kill_window[0] + 0.2:
                longest = max(kill_window[0] + 0.2, longest * 0.6)
                out.events.append(f"that run published more than its share ({share:.0f}): "
                                  f"kills now within {longest:.2f}s")
        if rc == 0 and extend is not None and out.extensions < max_extensions:
            out.events.append(f"the stream drained after {out.kills} kills")
            continue  # extended at the top of the loop
        if rc == 0:
            pytest.fail(
                f"the stream was drained after only {out.kills} kills (need {min_kills}); "
                f"simulate more readings or kill earlier:\n" + "\n".join(out.events))
    return out


# --------------------------------------------------------------------------------------------
# moto's server: S3, SNS and SQS (one process for the session, reset before each test)

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def get(url: str) -> tuple[int, str, str]:
    """GET: (status, Content-Type, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()
    except OSError:
        return 0, "", ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, timeout: float = 60.0, every: float = 0.1):
    """Polls `check()` until it returns a true value (returned), or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@dataclass
class Moto:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment for shardlake: credentials and the endpoint (moto's, or a proxy's)."""
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": endpoint or self.url}

    def client(self, service: str):
        import boto3
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.status


def _moto_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail(f"moto_server not found next to {sys.executable}; "
                    "install tests/python/requirements.txt (scripts/test does)")
    server = Moto("127.0.0.1", free_port())
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), "-H", server.host, "-p", str(server.port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _moto_up(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def moto(moto_server) -> Moto:
    """moto's server with nothing in it."""
    moto_server.reset()
    return moto_server


class S3LakeView:
    """An S3 lake read the way Athena's users read it: pyarrow's S3FileSystem (pointed at the
    local server) with hive partitioning; each output becomes a table in `con`."""

    def __init__(self, con, moto: Moto, bucket: str, prefix: str,
                 elsewhere: dict[str, str] | None = None):
        """`elsewhere`: outputs with a sink of their own, as `bucket/prefix`."""
        from pyarrow import fs as pafs
        self.con = con
        self.fs = pafs.S3FileSystem(endpoint_override=f"{moto.host}:{moto.port}", scheme="http",
                                    access_key="test", secret_key="test", region="us-east-1")
        self.root = f"{bucket}/{prefix.strip('/')}".rstrip("/")
        self.elsewhere = {o: r.strip("/") for o, r in (elsewhere or {}).items()}
        self._tables: dict[str, str | None] = {}

    def _dir(self, output: str) -> str:
        return f"{self.elsewhere.get(output, self.root)}/{output}"

    def refresh(self) -> None:
        self._tables.clear()

    def files(self, output: str) -> list[str]:
        from pyarrow import fs as pafs
        infos = self.fs.get_file_info(pafs.FileSelector(self._dir(output), recursive=True,
                                                        allow_not_found=True))
        return sorted(i.path for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def dataset(self, output: str):
        import pyarrow.dataset as pads
        return pads.dataset(self._dir(output), filesystem=self.fs, format="parquet",
                            partitioning="hive")

    def source(self, output: str) -> str | None:
        if output not in self._tables:
            name = None
            if self.files(output):
                name = f"s3_{output}"
                self.con.register(name, self.dataset(output).to_table())
            self._tables[output] = name
        return self._tables[output]


# --------------------------------------------------------------------------------------------
# kinesalite: a Kinesis server for volume (one process for the session; tests use streams of
# their own)

SERVERS = REPO / "tests" / "servers"


@dataclass
class Kinesalite:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("kinesis", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(retries={"max_attempts": 10, "mode": "standard"}))


def _node_server(script: str, tmp_path_factory, args: list[str],
                 preload: list[str] = (), env: dict[str, str] | None = None):
    if not (SERVERS / "node_modules").is_dir():
        pytest.fail(f"{SERVERS}/node_modules is missing; run `npm ci --prefix {SERVERS}` "
                    "(scripts/test does)")
    log_path = tmp_path_factory.mktemp(script.split(".")[0]) / "server.log"
    log = open(log_path, "wb")
    requires = [a for p in preload for a in ("--require", str(SERVERS / p))]
    proc = subprocess.Popen(["node", *requires, str(SERVERS / script), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    return proc, log, log_path


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _serve_until_done(name: str, server, proc, log, log_path: Path):
    """Waits for a server's port, yields `server`, and stops the process afterwards."""
    try:
        deadline = time.monotonic() + 60
        while not _port_open(server.host, server.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _serve_kinesalite(tmp_path_factory, server: Kinesalite, **kw):
    proc, log, log_path = _node_server("kinesalite.js", tmp_path_factory, [str(server.port)], **kw)
    yield from _serve_until_done("kinesalite", server, proc, log, log_path)


@pytest.fixture(scope="session")
def kinesalite(tmp_path_factory):
    yield from _serve_kinesalite(tmp_path_factory, Kinesalite("127.0.0.1", free_port()))


@dataclass
class ShiftedKinesalite(Kinesalite):
    """A kinesalite whose clock the test moves forward (`shift(seconds)`)."""
    offset_file: Path = Path()

    def shift(self, seconds: float) -> None:
        ms = int(self.offset_file.read_text() or 0) + int(seconds * 1000)
        tmp = self.offset_file.with_suffix(".tmp")
        tmp.write_text(str(ms))
        tmp.replace(self.offset_file)


@pytest.fixture
def shifted_kinesalite(tmp_path_factory):
    offset = tmp_path_factory.mktemp("timeshift") / "offset_ms"
    offset.write_text("0")
    server = ShiftedKinesalite("127.0.0.1", free_port(), offset)
    yield from _serve_kinesalite(tmp_path_factory, server, preload=["timeshift.js"],
                                 env={**os.environ, "TIMESHIFT_FILE": str(offset)})


@pytest.fixture(scope="session")
def kinesis_local(tmp_path_factory):
    """kinesis-local (npm), the Kinesis server that reshards as AWS does (child shards,
    UpdateShardCount). It binds 0.0.0.0 hard-coded: a copy of its script binds 127.0.0.1."""
    pkg = SERVERS / "node_modules" / "kinesis-local"
    if not pkg.is_dir():
        pytest.fail(f"{pkg} is missing; run `npm ci --prefix {SERVERS}` (scripts/test does)")
    home = tmp_path_factory.mktemp("kinesis-local")
    script = (pkg / "main.js").read_text()
    assert 'em("0.0.0.0")' in script, "kinesis-local changed: its bind address was not found"
    (home / "main.js").write_text(script.replace('em("0.0.0.0")', 'em("127.0.0.1")'))
    (home / "server.json").write_text((pkg / "server.json").read_text())
    server = Kinesalite("127.0.0.1", free_port())
    ms = "50ms"
    env = {**os.environ, "KINESIS_MOCK_PLAIN_PORT": str(server.port),
           "KINESIS_MOCK_TLS_PORT": str(free_port()), "CREATE_STREAM_DURATION": ms,
           "DELETE_STREAM_DURATION": ms, "SPLIT_SHARD_DURATION": ms,
           "MERGE_SHARDS_DURATION": ms, "UPDATE_SHARD_COUNT_DURATION": ms,
           "REGISTER_STREAM_CONSUMER_DURATION": ms, "LOG_LEVEL": "WARN"}
    log_path = home / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["node", "main.js"], cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    yield from _serve_until_done("kinesis-local", server, proc, log, log_path)


def create_stream(kinesis, name: str, shards: int) -> None:
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    wait_until(f"stream {name} to be ACTIVE", lambda: kinesis.describe_stream_summary(
        StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")


def _partition_key(line: bytes) -> str:
    try:
        key = json.loads(line).get("device_id")
    except (ValueError, AttributeError):
        key = None
    return key if isinstance(key, str) and key else "unparseable"


def put_lines(kinesis, stream: str, lines: list[bytes]) -> list[tuple[bytes, str, str]]:
    """Puts records keyed by device (as the IoT rule does), 500 a call, in order; returns
    each record's (bytes, shard id, sequence number) as Kinesis assigned them."""
    out = []
    for i in range(0, len(lines), 500):
        batch = lines[i:i + 500]
        resp = kinesis.put_records(StreamName=stream, Records=[
            {"Data": line, "PartitionKey": _partition_key(line)} for line in batch])
        # A partial failure would reorder a device's records if retried: none is expected
        # from a local server, so it fails the test instead.
        assert resp["FailedRecordCount"] == 0, resp
        out += [(line, r["ShardId"], r["SequenceNumber"]) for line, r in zip(batch, resp["Records"])]
    return out


def put_while_resharding(kinesis, stream: str, lines: list[bytes]) -> tuple[list, list[str]]:
    """Puts `lines` (100 a call, from a thread) on a 3-shard stream, splitting the first shard
    once a third is put and merging the other two once two thirds are; returns what
    `put_lines` returns for all of them and the ids of the three first shards (closed by
    then). Needs a server that reshards as AWS does (kinesis-local)."""
    put: list = []
    errors: list = []

    def produce():
        try:
            for i in range(0, len(lines), 100):
                put.extend(put_lines(kinesis, stream, lines[i:i + 100]))
        except Exception as e:  # noqa: BLE001 - reported by the caller's thread
            errors.append(e)

    def active():
        return kinesis.describe_stream_summary(
            StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"

    shards = {s["ShardId"]: s for s in kinesis.list_shards(StreamName=stream)["Shards"]}
    ids = sorted(shards)
    assert len(ids) == 3, ids
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until("a third of the records to be put",
                   lambda: len(put) >= len(lines) // 3 or errors, timeout=120)
        lo = int(shards[ids[0]]["HashKeyRange"]["StartingHashKey"])
        hi = int(shards[ids[0]]["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=stream, ShardToSplit=ids[0],
                            NewStartingHashKey=str((lo + hi) // 2))
        wait_until("the split to finish", active, timeout=60)
        wait_until("two thirds of the records to be put",
                   lambda: len(put) >= 2 * len(lines) // 3 or errors, timeout=120)
        kinesis.merge_shards(StreamName=stream, ShardToMerge=ids[1], AdjacentShardToMerge=ids[2])
        wait_until("the merge to finish", active, timeout=60)
    finally:
        producer.join(timeout=300)
    assert not producer.is_alive() and not errors, errors
    after = kinesis.list_shards(StreamName=stream)["Shards"]
    closed = [s["ShardId"] for s in after if "EndingSequenceNumber" in s["SequenceNumberRange"]]
    assert sorted(closed) == ids, f"the split and merge should close the 3 first shards: {after}"
    assert len(after) == 6, after
    return put, ids


def interleave(stream_dir: Path) -> list[bytes]:
    """The lines of a simulated local stream, shard files interleaved (each file's order,
    and so each device's, is kept)."""
    per_file: dict[str, list[bytes]] = {}
    for line, shard, _ in stream_lines(stream_dir):
        per_file.setdefault(shard, []).append(line)
    out: list[bytes] = []
    i = 0
    while True:
        chunks = [q[i:i + 50] for q in per_file.values()]
        if not any(chunks):
            return out
        for c in chunks:
            out += c
        i += 50


class Receiver:
    """A webhook endpoint: records every POST, answers `status`."""

    def __init__(self, status: int):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    receiver.requests.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
