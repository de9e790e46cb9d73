#!/usr/bin/env python3
"""The comparison job of benches/compare.py on the peer stream processors of issue 30 (Apache
Flink SQL through PyFlink, Pathway, Bytewax, Polars), DuckDB and optionally shardlake, on the
same input, each engine's output checked against DuckDB's.

    bash benches/peers/install.sh                      # once: benches/.venv-peers
    .venv/bin/python benches/peers.py --records 1000000 --repeat 3 \\
        --agent target/release/shardlake-agent --engines flink,pathway,bytewax,polars,duckdb

The input is compare.py's (`simulate`: 2,000 wells over 2 hours in 4 shards). Every engine runs
at parallelism 1 pinned to core 0 (`taskset -c 0`; DuckDB in this process, as compare.py) and
at parallelism 2 on both cores. The peers run in their own venv (apache-flink pulls in
apache-beam, which pins pyarrow 16.1): this process calls the peer venv's python on
benches/peers/run.py and times the whole process, interpreter start and imports included
("in-job" is the engine's own figure, after the imports). Runs are taken in turns, --repeat
times, and the fastest of each counts. Flink's start-up (a JVM and a local mini-cluster,
~20-30 s) dominates at these sizes, so Flink also runs on a second, larger input
(--flink-large records) and its throughput is given from the difference of the two as well.

The check (each run): the aggregate table's rows (windows), the sum of `readings`, the set of
(window_start, tenant, device_id, readings) against DuckDB's, the sums of the three float
averages and the extreme min/max to a relative 1e-9, rows per hour partition, rows filed in a
partition that is not their own hour, and the alert rows (count, hours, and which readings). An
engine whose output differs is FAILED and its time is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the input and DuckDB's job, shared with compare.py)

REPO = compare.REPO
RUNNER = REPO / "benches/peers/run.py"
PEERS = ("flink", "pathway", "bytewax", "polars")
REL_TOL = 1e-9

# How each engine's tables are read back. Flink's CSV has no header: its columns are given.
FLINK_AGG = ("{window_start: 'TIMESTAMP', tenant: 'VARCHAR', device_id: 'VARCHAR', readings: 'BIGINT', "
             "barrels_per_s_avg: 'DOUBLE', pressure_min: 'DOUBLE', pressure_max: 'DOUBLE', "
             "pressure_avg: 'DOUBLE', temp_avg: 'DOUBLE'}")
FLINK_ALERT = ("{device_id: 'VARCHAR', tenant: 'VARCHAR', seq: 'BIGINT', ts: 'TIMESTAMP', "
               "barrels_per_s: 'DOUBLE', pressure_psi: 'DOUBLE', temp_c: 'DOUBLE', status: 'VARCHAR'}")
PARTS = "CAST(year AS INT) AS year, CAST(month AS INT) AS month, CAST(day AS INT) AS day, CAST(hour AS INT) AS hour"


def tables(engine: str, out: Path) -> tuple[str, str]:
    """SQL for an engine's (aggregates, alerts) with the columns of DuckDB's version; alerts need
    only device_id, seq, ts, pressure_psi and the partition columns."""
    pq = "read_parquet('{}/**/*.parquet', hive_partitioning = true)"
    if engine == "flink":
        csv = "read_csv('{}/*/*/*/*/part-*', hive_partitioning = true, header = false, columns = {})"
        return (f"SELECT * EXCLUDE (year, month, day, hour), {PARTS} FROM {csv.format(out / 'well_1m', FLINK_AGG)}",
                f"SELECT * EXCLUDE (year, month, day, hour), {PARTS} FROM {csv.format(out / 'alerts', FLINK_ALERT)}")
    if engine == "pathway":
        # pw.io.csv.write adds `time` and `diff` (+1 insert, -1 retraction): the net rows count.
        csv = "read_csv('{}/*/*/*/*/*.csv', hive_partitioning = true, header = true)"
        agg = (f"SELECT window_start::TIMESTAMPTZ AS window_start, tenant, device_id, readings, barrels_per_s_avg, "
               f"pressure_min, pressure_max, pressure_avg, temp_avg, {PARTS} "
               f"FROM {csv.format(out / 'well_1m')} WHERE diff = 1")
        alerts = (f"SELECT device_id, seq, ts::TIMESTAMPTZ AS ts, pressure_psi, {PARTS} "
                  f"FROM {csv.format(out / 'alerts')} WHERE diff = 1")
        return agg, alerts
    if engine == "shardlake":
        # Averages are kept as sum and count (a window may be folded from several rows).
        agg = (f"SELECT window_start, tenant, device_id, sum(readings) AS readings, "
               f"sum(barrels_per_s_avg__sum) / sum(barrels_per_s_avg__n) AS barrels_per_s_avg, "
               f"min(pressure_min) AS pressure_min, max(pressure_max) AS pressure_max, "
               f"sum(pressure_avg__sum) / sum(pressure_avg__n) AS pressure_avg, "
               f"sum(temp_avg__sum) / sum(temp_avg__n) AS temp_avg, {PARTS} "
               f"FROM {pq.format(out / 'well_1m')} GROUP BY ALL")
        alerts = f"SELECT NULL AS device_id, NULL AS seq, event_time AS ts, NULL AS pressure_psi, {PARTS} FROM {pq.format(out / 'alerts')}"
        return agg, alerts
    return (f"SELECT * EXCLUDE (year, month, day, hour), {PARTS} FROM {pq.format(out / 'well_1m')}",
            f"SELECT * EXCLUDE (year, month, day, hour), {PARTS} FROM {pq.format(out / 'alerts')}")


def summary(con, agg: str, alerts: str) -> dict:
    s = con.execute(f"""
        SELECT count(*), sum(readings), sum(barrels_per_s_avg), sum(pressure_avg), sum(temp_avg),
               min(pressure_min), max(pressure_max),
               count(*) FILTER (WHERE (year, month, day, hour) IS DISTINCT FROM
                   (year(window_start), month(window_start), day(window_start), hour(window_start)))
        FROM ({agg})""").fetchone()
    a = con.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE (year, month, day, hour) IS DISTINCT FROM
                   (year(ts), month(ts), day(ts), hour(ts)))
        FROM ({alerts})""").fetchone()
    hours = con.execute(f"SELECT year, month, day, hour, count(*), sum(readings) FROM ({agg}) GROUP BY ALL ORDER BY ALL").fetchall()
    alert_hours = con.execute(f"SELECT year, month, day, hour, count(*) FROM ({alerts}) GROUP BY ALL ORDER BY ALL").fetchall()
    return {"windows": s[0], "readings": s[1], "barrels_per_s_avg sum": s[2], "pressure_avg sum": s[3],
            "temp_avg sum": s[4], "pressure_min": s[5], "pressure_max": s[6], "misfiled windows": s[7],
            "alerts": a[0], "misfiled alerts": a[1], "hours": hours, "alert hours": alert_hours}


def check(data: Path, engine: str, name: str) -> tuple[bool, str]:
    """Compares DATA/name (written by `engine`) to DuckDB's reference output in DATA/duck."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        agg, alerts = tables(engine, data / name)
        ref_agg, ref_alerts = tables("duckdb", data / "duck")
        got, ref = summary(con, agg, alerts), summary(con, ref_agg, ref_alerts)
        key = "SELECT epoch_ms(window_start) AS t, tenant, device_id, readings FROM ({})"
        diff_windows = con.execute(f"""SELECT count(*) FROM (
            ({key.format(agg)} EXCEPT ALL {key.format(ref_agg)}) UNION ALL
            ({key.format(ref_agg)} EXCEPT ALL {key.format(agg)}))""").fetchone()[0]
        diff_alerts = 0
        if engine != "shardlake":   # shardlake's alert rows carry the rule's detail, not the reading
            akey = "SELECT device_id, seq, epoch_ms(ts) AS t, pressure_psi FROM ({})"
            diff_alerts = con.execute(f"""SELECT count(*) FROM (
                ({akey.format(alerts)} EXCEPT ALL {akey.format(ref_alerts)}) UNION ALL
                ({akey.format(ref_alerts)} EXCEPT ALL {akey.format(alerts)}))""").fetchone()[0]
    except (duckdb.Error, OSError) as e:
        return False, f"FAILED: output unreadable ({str(e).splitlines()[0][:120]})"
    bad = []
    for k, v in ref.items():
        g = got[k]
        if isinstance(v, float):
            if g is None or not math.isclose(g, v, rel_tol=REL_TOL):
                bad.append(f"{k} {g} != {v}")
        elif k in ("hours", "alert hours"):
            if g != v:
                bad.append(f"{k} differ ({len(g)} vs {len(v)} hours)")
        elif g != v:
            bad.append(f"{k} {g} != {v}")
    if diff_windows:
        bad.append(f"{diff_windows} (window, device, readings) rows differ")
    if diff_alerts:
        bad.append(f"{diff_alerts} alert rows differ")
    if bad:
        return False, "FAILED: " + "; ".join(bad)
    return True, f"ok ({got['windows']:,} windows, {got['readings']:,} readings, {got['alerts']} alerts)"


def run_peer(python: Path, engine: str, data: Path, cores: int) -> tuple[float, dict]:
    cmd = [str(python), str(RUNNER), engine, str(data), "--parallelism", str(cores),
           "--out", f"{engine}-{cores}c"]
    if cores == 1:
        cmd = ["taskset", "-c", "0"] + cmd
    log = data / f"{engine}-{cores}c.log"
    t = time.perf_counter()
    with open(log, "w") as err:    # Pathway logs every batch, Flink warns: kept out of the table
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    seconds = time.perf_counter() - t
    if p.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{engine} exited {p.returncode}: " + " | ".join(tail)[-300:])
    return seconds, json.loads(p.stdout.strip().splitlines()[-1])


def run_duck(data: Path, cores: int) -> tuple[float, dict]:
    def job():
        compare.run_duckdb(data, threads=cores, name=f"duckdb-{cores}c")
    t = time.perf_counter()
    compare.one_core(job) if cores == 1 else job()
    seconds = time.perf_counter() - t
    return seconds, {"seconds": seconds}


def run_shardlake(binary: Path, data: Path, cores: int) -> tuple[float, dict]:
    t = time.perf_counter()
    compare.run_shardlake(binary, data, "0" if cores == 1 else None)
    seconds = time.perf_counter() - t
    out = data / f"shardlake-{cores}c"
    shutil.rmtree(out, ignore_errors=True)
    (data / "lake").rename(out)
    return seconds, {"seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine and core count; the fastest counts")
    ap.add_argument("--agent", type=Path, default=REPO / "target/release/shardlake-agent")
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake",
                    help="for the engine `shardlake`")
    ap.add_argument("--engines", default=",".join(PEERS + ("duckdb",)),
                    help="comma-separated: flink, pathway, bytewax, polars, duckdb, shardlake")
    ap.add_argument("--cores", default="1,2", help="1 (pinned to core 0, parallelism 1) and/or 2")
    ap.add_argument("--flink-large", type=int, default=None,
                    help="records of Flink's second input (default 5 x --records; 0: none)")
    ap.add_argument("--peers-python", type=Path, default=REPO / "benches/.venv-peers/bin/python")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(PEERS + ("duckdb", "shardlake"))
    if unknown:
        ap.error(f"unknown engines: {', '.join(sorted(unknown))}")
    cores = [int(c) for c in args.cores.split(",")]
    large = 5 * args.records if args.flink_large is None else args.flink_large

    root = Path(tempfile.mkdtemp(prefix="shardlake-peers-"))
    inputs = {"small": root / "small"}
    sizes = {"small": compare.simulate(args.agent, inputs["small"], args.records, args.devices, 0)}
    if "flink" in engines and large:
        inputs["large"] = root / "large"
        sizes["large"] = compare.simulate(args.agent, inputs["large"], large, args.devices, 0)
    for size, data in inputs.items():
        compare.run_duckdb(data)    # the reference output (DATA/duck), and a warm page cache
        nbytes = sum(f.stat().st_size for f in (data / "stream").glob("*.ndjson"))
        print(f"input {size}: {sizes[size]:,} records, {nbytes / sizes[size]:.0f} bytes each, "
              f"{args.devices} devices, 2 hours, 4 shards ({data})", flush=True)

    runs = [(e, c, "small") for e in engines for c in cores]
    runs += [("flink", c, "large") for c in cores if "flink" in engines and "large" in inputs]
    best: dict = {}
    verdict: dict = {}
    for _ in range(args.repeat):
        for engine, c, size in runs:
            data = inputs[size]
            try:
                if engine == "duckdb":
                    seconds, info = run_duck(data, c)
                elif engine == "shardlake":
                    seconds, info = run_shardlake(args.shardlake, data, c)
                else:
                    seconds, info = run_peer(args.peers_python, engine, data, c)
                ok, why = check(data, engine, f"{engine}-{c}c")
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                seconds, info, ok, why = float("nan"), {}, False, f"FAILED: {e}"
            k = (engine, c, size)
            print(f"  {engine:9} {c} core(s) {size:5}: {seconds:7.2f} s  {why}", flush=True)
            if verdict.get(k, (True,))[0]:     # a failed run's verdict stays
                verdict[k] = (ok, why)
            if ok and (k not in best or seconds < best[k][0]):
                best[k] = (seconds, info.get("seconds", float("nan")))

    print(f"\n{'engine':10} {'cores':>5} {'records':>10} {'seconds':>8} {'in-job s':>8} {'records/s':>11} "
          f"{'x DuckDB':>9}  check")
    for k in runs:
        engine, c, size = k
        n = sizes[size]
        ok, why = verdict[k]
        duck = best.get(("duckdb", c, "small")) if size == "small" else None
        if ok and k in best:
            s, inner = best[k]
            vs = f"{duck[0] / s:8.2f}x" if duck else "-"
            print(f"{engine:10} {c:>5} {n:>10,} {s:8.2f} {inner:8.2f} {n / s:11,.0f} {vs:>9}  {why}")
        else:
            print(f"{engine:10} {c:>5} {n:>10,} {'-':>8} {'-':>8} {'-':>11} {'-':>9}  {why}")
    if "large" in inputs:
        for c in cores:
            a, b = best.get(("flink", c, "small")), best.get(("flink", c, "large"))
            if a and b and b[0] > a[0]:
                rate = (sizes["large"] - sizes["small"]) / (b[0] - a[0])
                startup = a[0] - sizes["small"] / rate
                print(f"flink, {c} core(s), start-up subtracted: {rate:,.0f} records/s from "
                      f"{sizes['small']:,} and {sizes['large']:,} records ({b[0] - a[0]:.2f} s apart); "
                      f"start-up and fixed costs {startup:.1f} s")
            else:
                print(f"flink, {c} core(s), start-up subtracted: not available (a run failed or the "
                      f"larger input was not slower)")
    if args.keep or not all(ok for ok, _ in verdict.values()):
        print(f"data and each peer run's log (DATA/ENGINE-Nc.log) kept in {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
