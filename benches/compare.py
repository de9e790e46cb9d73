#!/usr/bin/env python3
"""shardlake, DuckDB and a plain Python consumer on the same job and input, in one run.

The job: NDJSON well readings -> 1-minute per-device aggregates (count, avg/min/max pressure,
avg flow, avg temperature) + a pressure threshold alert -> zstd Parquet partitioned by hour
(shardlake: benches/pipelines/compare.yaml, which also keeps a dead-letter table). Two more
shardlake runs add the raw table (compare-raw.yaml), the second of them on the same readings
with 1 in 1,000 records malformed, so the raw output and the dead-letter path are timed too.
`--detectors` adds a 1-core run with detectors on every device (compare-detect.yaml).
Each run is taken --repeat times, the engines in turns, and the fastest of each counts.
DuckDB (1 thread) and the Python consumer run pinned to one core, as shardlake's 1-core rows.

    python3 benches/compare.py [--records 1000000] [--repeat 3] [--shardlake target/release/shardlake]

Needs duckdb and pyarrow (scripts/test installs them into .venv). Prints records/s per engine
and the ratios; benches/README.md records the figures and what bounds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def simulate(agent: Path, where: Path, records: int, devices: int, malformed: int,
             shards: int = 4) -> int:
    """The input every engine reads: `records` readings of `devices` wells over 2 hours in
    `shards` local shards under `where/stream` (`shardlake-agent simulate`, seeded: the same
    every run), `malformed` of them malformed. Returns the number of readings written."""
    readings = records // devices
    subprocess.run([str(agent), "simulate", "--stream", str(where / "stream"), "--shards", str(shards),
                    "--devices", str(devices), "--readings", str(readings),
                    "--interval-ms", str(7_200_000 // readings), "--start", "2026-01-05T10:00:00Z",
                    "--malformed", str(malformed), "--spikes", "20"], check=True, stdout=subprocess.DEVNULL)
    return devices * readings


def run_shardlake(binary: Path, data: Path, cores: str | None, pipeline: str = "compare.yaml") -> None:
    shutil.rmtree(data / "lake", ignore_errors=True)
    shutil.rmtree(data / "state", ignore_errors=True)
    cmd = [str(binary), "run", "--drain", str(REPO / "benches/pipelines" / pipeline)]
    if cores:
        cmd = ["taskset", "-c", cores] + cmd
    env = dict(os.environ, SHARDLAKE_DATA=str(data), RUST_LOG="warn", SHARDLAKE_LOG_FORMAT="json")
    subprocess.run(cmd, env=env, check=True)


def one_core(job) -> None:
    """Runs `job` in this process pinned to core 0, as shardlake's one-core rows are."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        job()
    finally:
        os.sched_setaffinity(0, before)


def run_duckdb(data: Path, threads: int = 1, name: str = "duck") -> None:
    import duckdb

    out = data / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"""
        CREATE TEMP TABLE r AS SELECT * FROM read_json('{data}/stream/*.ndjson',
            format = 'newline_delimited', ignore_errors = true,
            columns = {{device_id: 'VARCHAR', tenant: 'VARCHAR', seq: 'BIGINT',
                        ts: 'TIMESTAMPTZ', barrels_per_s: 'DOUBLE', pressure_psi: 'DOUBLE',
                        temp_c: 'DOUBLE', status: 'VARCHAR'}})""")
    parts = "year(window_start) AS year, month(window_start) AS month, day(window_start) AS day, hour(window_start) AS hour"
    con.execute(f"""
        COPY (SELECT *, {parts} FROM (
                SELECT date_trunc('minute', ts) AS window_start, tenant, device_id,
                       count(*) AS readings, avg(barrels_per_s) AS barrels_per_s_avg,
                       min(pressure_psi) AS pressure_min, max(pressure_psi) AS pressure_max,
                       avg(pressure_psi) AS pressure_avg, avg(temp_c) AS temp_avg
                FROM r GROUP BY ALL))
        TO '{out}/well_1m' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (year, month, day, hour))""")
    con.execute(f"""
        COPY (SELECT *, year(ts) AS year, month(ts) AS month, day(ts) AS day, hour(ts) AS hour
              FROM r WHERE pressure_psi > 5000)
        TO '{out}/alerts' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (year, month, day, hour))""")


def run_python(data: Path) -> None:
    import datetime as dt

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    out = data / "py"
    shutil.rmtree(out, ignore_errors=True)
    cols = {k: [] for k in ("device_id", "tenant", "ts", "barrels_per_s", "pressure_psi", "temp_c")}
    for f in sorted((data / "stream").glob("*.ndjson")):
        with open(f, "rb") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                    t = dt.datetime.fromisoformat(r["ts"])
                except (ValueError, KeyError, TypeError):
                    continue
                cols["device_id"].append(r["device_id"])
                cols["tenant"].append(r["tenant"])
                cols["ts"].append(t)
                cols["barrels_per_s"].append(r.get("barrels_per_s"))
                cols["pressure_psi"].append(r.get("pressure_psi"))
                cols["temp_c"].append(r.get("temp_c"))
    table = pa.table(cols)
    table = table.set_column(2, "ts", pc.cast(table["ts"], pa.timestamp("us", tz="UTC")))
    table = table.append_column("window_start", pc.floor_temporal(table["ts"], unit="minute"))
    agg = table.group_by(["window_start", "tenant", "device_id"]).aggregate([
        ("device_id", "count"), ("barrels_per_s", "mean"), ("pressure_psi", "min"),
        ("pressure_psi", "max"), ("pressure_psi", "mean"), ("temp_c", "mean")])

    def with_parts(t, col):
        return (t.append_column("year", pc.year(t[col])).append_column("month", pc.month(t[col]))
                 .append_column("day", pc.day(t[col])).append_column("hour", pc.hour(t[col])))

    fmt = ds.ParquetFileFormat()
    opts = fmt.make_write_options(compression="zstd")
    part = ds.partitioning(pa.schema([(c, pa.int64()) for c in ("year", "month", "day", "hour")]), flavor="hive")
    ds.write_dataset(with_parts(agg, "window_start"), out / "well_1m", format=fmt, file_options=opts, partitioning=part)
    alerts = table.filter(pc.greater(table["pressure_psi"], 5000))
    ds.write_dataset(with_parts(alerts, "ts"), out / "alerts", format=fmt, file_options=opts, partitioning=part)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=2_000)
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake")
    ap.add_argument("--agent", type=Path, default=REPO / "target/release/shardlake-agent")
    ap.add_argument("--repeat", type=int, default=3, help="runs per engine; the fastest counts")
    ap.add_argument("--skip-python", action="store_true", help="the Python consumer takes ~10 s per 1M records")
    ap.add_argument("--detectors", action="store_true",
                    help="one more shardlake run with zscore and stuck on 3 fields and silent "
                         "(compare-detect.yaml), against the 1-core run")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="shardlake-compare-"))
    bad = data / "with-bad-records"
    n = simulate(args.agent, data, args.records, args.devices, 0)
    # The same readings with 1 in 1,000 records malformed (six kinds, each its own reason).
    simulate(args.agent, bad, args.records, args.devices, args.records // 1000)
    size = sum(f.stat().st_size for f in (data / "stream").glob("*.ndjson"))
    print(f"input: {n} records, {size / n:.0f} bytes each, 2 hours, {args.devices} devices, 4 shards")
    sl = args.shardlake
    jobs = {
        "shardlake, 1 core": lambda: run_shardlake(sl, data, "0"),
        "shardlake, 2 cores": lambda: run_shardlake(sl, data, None),
        "shardlake, 1 core, +raw": lambda: run_shardlake(sl, data, "0", "compare-raw.yaml"),
        "shardlake, 2 cores, +raw": lambda: run_shardlake(sl, data, None, "compare-raw.yaml"),
        "shardlake, 1 core, +raw, 0.1% bad": lambda: run_shardlake(sl, bad, "0", "compare-raw.yaml"),
        "DuckDB, 1 thread": lambda: one_core(lambda: run_duckdb(data)),
    }
    if args.detectors:
        jobs["shardlake, 1 core, +detectors"] = lambda: run_shardlake(sl, data, "0",
                                                                      "compare-detect.yaml")
    if not args.skip_python:
        jobs["Python json + pyarrow"] = lambda: one_core(lambda: run_python(data))
    # In turns, so a slow spell of the machine (they come and go within minutes) falls on
    # every engine alike; the fastest of each engine's runs counts.
    results = {name: float("inf") for name in jobs}
    for _ in range(args.repeat):
        for name, job in jobs.items():
            results[name] = min(results[name], timed(job, 1))
    duck = results["DuckDB, 1 thread"]
    py = results.get("Python json + pyarrow")
    print(f"{'engine':36} {'seconds':>8} {'records/s':>12} {'vs DuckDB':>10} {'vs Python':>10}")
    for name, s in results.items():
        vs_py = f"{py / s:9.2f}x" if py else ""
        print(f"{name:36} {s:8.2f} {n / s:12,.0f} {duck / s:9.2f}x {vs_py:>10}")
    if args.detectors:
        base, det = results["shardlake, 1 core"], results["shardlake, 1 core, +detectors"]
        print(f"detectors cost {100 * (det / base - 1):.1f}% of the 1-core time "
              f"({n / base:,.0f} -> {n / det:,.0f} records/s)")
    shutil.rmtree(data)


if __name__ == "__main__":
    main()
