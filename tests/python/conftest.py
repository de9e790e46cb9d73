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
import re
import subprocess
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


def write_test_pipeline(dest: Path, *, max_bytes: str, max_age: str) -> Path:
    """The shipped pipeline with an absolute schema path and another rollover."""
    text = PIPELINE.read_text()
    text, n_schema = re.subn(r"(?m)^schema:.*$", f"schema: {SCHEMA}", text)
    text, n_roll = re.subn(r"(?m)^rollover:\n(?:[ \t]+\S.*\n)+",
                           f"rollover: {{max_bytes: {max_bytes}, max_age: {max_age}}}\n", text)
    assert (n_schema, n_roll) == (1, 1), "pipelines/well-telemetry.yaml changed shape"
    dest.write_text(text)
    return dest


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


def read_stream(stream_dir: Path) -> StreamData:
    """Reads every `shardId-*.ndjson` file line by line. A line's sequence number is the byte
    offset just past its newline (the local stream's definition)."""
    out = StreamData()
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
            rec = parse_record(line)
            if rec is None:
                out.invalid.append((shard, str(offset)))
            else:
                rec["shard"] = shard
                rec["seqno"] = str(offset)
                out.valid.append(rec)
    return out


# --------------------------------------------------------------------------------------------
# Reading the lake with DuckDB


def duck() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def parquet_files(lake: Path, output: str) -> list[str]:
    return sorted(glob.glob(str(lake / output / "**" / "*.parquet"), recursive=True))


def lake_source(lake: Path, output: str) -> str | None:
    """A DuckDB table expression for an output, None when it has no files (DuckDB errors on
    an empty glob)."""
    if not parquet_files(lake, output):
        return None
    pattern = str(lake / output / "**" / "*.parquet").replace("'", "''")
    return f"read_parquet('{pattern}', hive_partitioning=true)"


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
    src = lake_source(lake, "well_1m")
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
    src = lake_source(lake, "well_5m_hop")
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
