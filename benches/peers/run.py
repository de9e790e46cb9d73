"""One peer engine on the comparison job, run by benches/peers.py in the peers' venv
(benches/peers/install.sh):

    benches/.venv-peers/bin/python benches/peers/run.py ENGINE DATA [--parallelism P] [--out NAME]

ENGINE is flink, pathway, bytewax or polars. It reads DATA/stream/*.ndjson (the layout
`shardlake-agent simulate` writes, as in benches/compare.py) and writes the job's two tables,
well_1m (1-minute tumbling per-device aggregates) and alerts (every reading with
pressure_psi > 5000), partitioned by year/month/day/hour under DATA/NAME (NAME defaults to
ENGINE). The last line printed is JSON: the job's own seconds (after imports) and notes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# The columns every engine writes (as DuckDB's version, run_duckdb in benches/compare.py).
AGG = ["window_start", "tenant", "device_id", "readings", "barrels_per_s_avg", "pressure_min",
       "pressure_max", "pressure_avg", "temp_avg"]
ALERT = ["device_id", "tenant", "seq", "ts", "barrels_per_s", "pressure_psi", "temp_c", "status"]
PARTS = ["year", "month", "day", "hour"]


def inputs(data: Path) -> list[Path]:
    return sorted((data / "stream").glob("*.ndjson"))


# --- Polars (batch) ---------------------------------------------------------------------------

def run_polars(data: Path, out: Path, parallelism: int) -> dict:
    # POLARS_MAX_THREADS is read when polars is imported: run.py's main sets it first.
    import polars as pl

    schema = {"device_id": pl.String, "tenant": pl.String, "seq": pl.Int64, "ts": pl.String,
              "barrels_per_s": pl.Float64, "pressure_psi": pl.Float64, "temp_c": pl.Float64,
              "status": pl.String}
    # scan_ndjson aborts on a truncated line even with ignore_errors=True; the clean input has none.
    r = (pl.scan_ndjson([str(p) for p in inputs(data)], schema=schema)
         # %z takes "+05:30" but not "Z" (chrono's rule), so Z is spelled out first.
         .with_columns(pl.col("ts").str.replace("Z$", "+00:00")
                       .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", time_zone="UTC"))
         .collect())

    def parts(col):
        return [pl.col(col).dt.year().alias("year"), pl.col(col).dt.month().alias("month"),
                pl.col(col).dt.day().alias("day"), pl.col(col).dt.hour().alias("hour")]

    agg = (r.lazy().group_by(pl.col("ts").dt.truncate("1m").alias("window_start"), "tenant", "device_id")
           .agg(pl.len().alias("readings"), pl.col("barrels_per_s").mean().alias("barrels_per_s_avg"),
                pl.col("pressure_psi").min().alias("pressure_min"),
                pl.col("pressure_psi").max().alias("pressure_max"),
                pl.col("pressure_psi").mean().alias("pressure_avg"),
                pl.col("temp_c").mean().alias("temp_avg"))
           .with_columns(parts("window_start")).collect())
    alerts = r.filter(pl.col("pressure_psi") > 5000).with_columns(parts("ts"))
    for name, df in (("well_1m", agg), ("alerts", alerts)):
        df.write_parquet(out / name, compression="zstd", partition_by=PARTS)
    return {"windows": agg.height, "alerts": alerts.height}


# --- Bytewax (event-time tumbling windows, pyarrow Parquet sink) ------------------------------

def bytewax_flow(data: Path, out: Path):
    import datetime as dt

    import bytewax.operators as op
    from bytewax.connectors.files import DirSource
    from bytewax.dataflow import Dataflow
    from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    import pyarrow as pa
    import pyarrow.dataset as ds

    utc = dt.timezone.utc
    align = dt.datetime(2000, 1, 1, tzinfo=utc)
    length = dt.timedelta(minutes=1)

    def parse(line):
        r = json.loads(line)
        r["ts"] = dt.datetime.fromisoformat(r["ts"]).astimezone(utc)
        return r

    class ArrowPartition(StatelessSinkPartition):
        """Buffers rows and writes them as hive-partitioned zstd Parquet every `flush` rows."""

        def __init__(self, dest, cols, worker, flush=200_000):
            self.dest, self.cols, self.worker, self.flush = dest, cols, worker, flush
            self.rows, self.n = [], 0

        def write_batch(self, items):
            self.rows.extend(items)
            if len(self.rows) >= self.flush:
                self._write()

        def _write(self):
            if not self.rows:
                return
            table = pa.Table.from_pylist(self.rows)
            table = table.select(self.cols + PARTS)
            ds.write_dataset(table, self.dest, format="parquet",
                             file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                             partitioning=ds.partitioning(pa.schema([(c, pa.int32()) for c in PARTS]), flavor="hive"),
                             basename_template=f"part-w{self.worker}-{self.n}-{{i}}.parquet",
                             existing_data_behavior="overwrite_or_ignore")
            self.rows, self.n = [], self.n + 1

        def close(self):
            self._write()

    class ArrowSink(DynamicSink):
        def __init__(self, dest, cols):
            self.dest, self.cols = dest, cols

        def build(self, step_id, worker_index, worker_count):
            return ArrowPartition(self.dest, self.cols, worker_index)

    def parts(t):
        return {"year": t.year, "month": t.month, "day": t.day, "hour": t.hour}

    flow = Dataflow("compare")
    # DirSource: one partition per file, the files spread over the workers.
    lines = op.input("in", flow, DirSource(data / "stream", glob_pat="*.ndjson"))
    recs = op.map("parse", lines, parse)
    keyed = op.key_on("key", recs, lambda r: r["tenant"] + "\0" + r["device_id"])
    # One event clock per key (device): its watermark is the latest ts it saw less the wait,
    # advanced by system time. Readings of one device are at most 2 s out of order (the
    # simulator's jitter); 1 minute of wait covers that with room and drops nothing.
    clock = EventClock(lambda r: r["ts"], wait_for_system_duration=dt.timedelta(minutes=1))
    windower = TumblingWindower(length=length, align_to=align)

    def build():
        return [0, 0.0, float("inf"), float("-inf"), 0.0, 0.0]

    def fold(acc, r):
        p = r["pressure_psi"]
        acc[0] += 1
        acc[1] += r["barrels_per_s"]
        acc[2] = min(acc[2], p)
        acc[3] = max(acc[3], p)
        acc[4] += p
        acc[5] += r["temp_c"]
        return acc

    def merge(a, b):
        return [a[0] + b[0], a[1] + b[1], min(a[2], b[2]), max(a[3], b[3]), a[4] + b[4], a[5] + b[5]]

    wo = fold_window("fold", keyed, clock, windower, build, fold, merge)

    def agg_row(kv):
        key, (window_id, a) = kv
        tenant, device = key.split("\0")
        start = align + window_id * length
        return {"window_start": start, "tenant": tenant, "device_id": device, "readings": a[0],
                "barrels_per_s_avg": a[1] / a[0], "pressure_min": a[2], "pressure_max": a[3],
                "pressure_avg": a[4] / a[0], "temp_avg": a[5] / a[0], **parts(start)}

    op.output("well_1m", op.map("agg_row", wo.down, agg_row), ArrowSink(out / "well_1m", AGG))
    # Late readings would be dropped from their window: say so (the check then fails too).
    op.inspect("late", wo.late, lambda step, kv: print("late reading dropped:", kv, file=sys.stderr))
    alerts = op.filter("spike", recs, lambda r: r["pressure_psi"] > 5000)
    op.output("alerts", op.map("alert_row", alerts, lambda r: {**r, **parts(r["ts"])}),
              ArrowSink(out / "alerts", ALERT))
    return flow


def run_bytewax(data: Path, out: Path, parallelism: int) -> dict:
    """Parallelism 1: one worker in this process. Parallelism P > 1: P processes of one worker
    each on local ports (bytewax's workers in one process share the GIL, so threads would not
    add a core)."""
    import subprocess

    if parallelism == 1:
        from bytewax.testing import cluster_main

        cluster_main(bytewax_flow(data, out), [], 0, worker_count_per_proc=1)
        return {"workers": "1 process"}
    import socket

    ports = []
    for _ in range(parallelism):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    addrs = ";".join(f"127.0.0.1:{p}" for p in ports)
    procs = [subprocess.Popen([sys.executable, __file__, "bytewax-worker", str(data), "--out", str(out),
                               "--addresses", addrs, "--process-id", str(i)]) for i in range(parallelism)]
    if any(p.wait() for p in procs):
        raise SystemExit("a bytewax process failed")
    return {"workers": f"{parallelism} processes"}


def run_bytewax_worker(data: Path, out: Path, addresses: str, proc: int) -> None:
    from bytewax.testing import cluster_main

    cluster_main(bytewax_flow(data, out), addresses.split(";"), proc, worker_count_per_proc=1)


# --- Flink SQL (PyFlink, local mini-cluster) --------------------------------------------------

def flink_sql(data: Path, out: Path) -> list[str]:
    # The input's ts is ISO-8601 with a Z or a +HH:MM offset (a tenth of the simulator's readings
    # are +05:30). TO_TIMESTAMP_LTZ(str, fmt) ignores the offset, so the event time is the local
    # part cast to TIMESTAMP(3) less the offset in minutes: a UTC wall-clock time (the session's
    # zone is UTC).
    n = "CHAR_LENGTH(ts)"
    local = f"CASE WHEN ts LIKE '%Z' THEN SUBSTR(ts, 1, {n} - 1) ELSE SUBSTR(ts, 1, {n} - 6) END"
    offset = (f"CASE WHEN ts LIKE '%Z' THEN 0 ELSE "
              f"(CASE WHEN SUBSTR(ts, {n} - 5, 1) = '-' THEN -1 ELSE 1 END) * "
              f"(CAST(SUBSTR(ts, {n} - 4, 2) AS INT) * 60 + CAST(SUBSTR(ts, {n} - 1, 2) AS INT)) END")
    et = f"TIMESTAMPADD(MINUTE, -({offset}), CAST(REPLACE({local}, 'T', ' ') AS TIMESTAMP(3)))"
    parts = "`year` BIGINT, `month` BIGINT, `day` BIGINT, `hour` BIGINT"
    sink = ("'connector' = 'filesystem', 'format' = 'csv', 'path' = 'file://{}'")
    watermark = os.environ.get("PEERS_FLINK_WATERMARK", "'1' DAY")
    return [
        # The filesystem source reads a subtask's files one after another: the second file of a
        # subtask starts again at the first hour, behind the watermark the first one left. The
        # watermark delay must therefore exceed the whole input's span (2 hours here), or most
        # records are dropped as late. 1 day: nothing is late, and the windows are emitted at the
        # end of the input (the final watermark). PEERS_FLINK_WATERMARK (an SQL interval, e.g.
        # '5' SECOND) overrides it, to see the drops.
        f"""CREATE TABLE r (
              device_id STRING, tenant STRING, seq BIGINT, ts STRING, barrels_per_s DOUBLE,
              pressure_psi DOUBLE, temp_c DOUBLE, status STRING,
              et AS {et},
              WATERMARK FOR et AS et - INTERVAL {watermark}
            ) WITH ('connector' = 'filesystem', 'path' = 'file://{data}/stream', 'format' = 'json',
                    'source.path.regex-pattern' = '.*\\.ndjson')""",
        f"""CREATE TABLE well_1m (
              window_start TIMESTAMP(3), tenant STRING, device_id STRING, readings BIGINT,
              barrels_per_s_avg DOUBLE, pressure_min DOUBLE, pressure_max DOUBLE,
              pressure_avg DOUBLE, temp_avg DOUBLE, {parts}
            ) PARTITIONED BY (`year`, `month`, `day`, `hour`) WITH ({sink.format(out / 'well_1m')})""",
        f"""CREATE TABLE alerts (
              device_id STRING, tenant STRING, seq BIGINT, ts TIMESTAMP(3), barrels_per_s DOUBLE,
              pressure_psi DOUBLE, temp_c DOUBLE, status STRING, {parts}
            ) PARTITIONED BY (`year`, `month`, `day`, `hour`) WITH ({sink.format(out / 'alerts')})""",
    ]


FLINK_INSERTS = [
    """INSERT INTO well_1m
       SELECT window_start, tenant, device_id, COUNT(*), AVG(barrels_per_s), MIN(pressure_psi),
              MAX(pressure_psi), AVG(pressure_psi), AVG(temp_c), YEAR(window_start),
              MONTH(window_start), DAYOFMONTH(window_start), HOUR(window_start)
       FROM TABLE(TUMBLE(TABLE r, DESCRIPTOR(et), INTERVAL '1' MINUTE))
       GROUP BY window_start, window_end, tenant, device_id""",
    """INSERT INTO alerts
       SELECT device_id, tenant, seq, CAST(et AS TIMESTAMP(3)), barrels_per_s, pressure_psi, temp_c,
              status, YEAR(et), MONTH(et), DAYOFMONTH(et), HOUR(et)
       FROM r WHERE pressure_psi > 5000""",
]


def run_flink(data: Path, out: Path, parallelism: int) -> dict:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    t = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    conf = t.get_config()
    conf.set("parallelism.default", str(parallelism))
    conf.set("table.local-time-zone", "UTC")
    # The streaming filesystem sink makes its files visible on a checkpoint; the last one is
    # taken when the bounded input ends (so a job ends up to one interval after its input).
    conf.set("execution.checkpointing.interval", "2 s")
    # The default checkpoint storage keeps a snapshot in the JobManager's heap, at most 5 MiB:
    # the open windows of 60,000 readings are more. Each failed checkpoint then failed the job,
    # which restarted from the last good one and wrote some alert rows twice (32 for 20).
    conf.set("execution.checkpointing.storage", "filesystem")
    conf.set("execution.checkpointing.dir", f"file://{out}/_checkpoints")
    # A failure fails the run instead of a silent restart.
    conf.set("restart-strategy.type", "none")
    for ddl in flink_sql(data, out):
        t.execute_sql(ddl)
    started = time.perf_counter()
    stmts = t.create_statement_set()
    for ins in FLINK_INSERTS:
        stmts.add_insert_sql(ins)
    stmts.execute().wait()
    return {"job_s": round(time.perf_counter() - started, 3)}


# --- Pathway ----------------------------------------------------------------------------------

def run_pathway(data: Path, out: Path, parallelism: int) -> dict:
    """Pathway's Parquet and Delta writers need a licence key, and its CSV writer (pw.io.csv.write)
    writes one file per table, unpartitioned. So the rows go through pw.io.python.write to CSV
    files of our own, one per table and hour partition, each row with Pathway's `diff`
    (+1 insert, -1 retraction) as the CSV writer has it."""
    import csv
    import datetime as dt

    os.environ["PATHWAY_THREADS"] = str(parallelism)
    import pathway as pw

    class Reading(pw.Schema):
        device_id: str
        tenant: str
        seq: int
        ts: str
        barrels_per_s: float
        pressure_psi: float
        temp_c: float
        status: str

    # "static": the files as they are now, in one commit; the source would otherwise wait for more.
    r = pw.io.jsonlines.read(str(data / "stream" / "*.ndjson"), schema=Reading, mode="static")
    # strptime's %z takes "+05:30" but not "Z".
    r = r.with_columns(et=pw.this.ts.str.replace("Z", "+00:00").dt.strptime("%Y-%m-%dT%H:%M:%S.%f%z"),
                       key=pw.this.tenant + "|" + pw.this.device_id)
    agg = (r.windowby(pw.this.et, window=pw.temporal.tumbling(duration=dt.timedelta(minutes=1)),
                      instance=pw.this.key,
                      behavior=pw.temporal.exactly_once_behavior(shift=dt.timedelta(days=1)))
           .reduce(window_start=pw.this._pw_window_start, tenant=pw.reducers.any(pw.this.tenant),
                   device_id=pw.reducers.any(pw.this.device_id), readings=pw.reducers.count(),
                   barrels_per_s_avg=pw.reducers.avg(pw.this.barrels_per_s),
                   pressure_min=pw.reducers.min(pw.this.pressure_psi),
                   pressure_max=pw.reducers.max(pw.this.pressure_psi),
                   pressure_avg=pw.reducers.avg(pw.this.pressure_psi),
                   temp_avg=pw.reducers.avg(pw.this.temp_c)))
    alerts = r.filter(pw.this.pressure_psi > 5000).select(
        pw.this.device_id, pw.this.tenant, pw.this.seq, ts=pw.this.et, barrels_per_s=pw.this.barrels_per_s,
        pressure_psi=pw.this.pressure_psi, temp_c=pw.this.temp_c, status=pw.this.status)

    class PartitionedCsv(pw.io.python.ConnectorObserver):
        def __init__(self, dest: Path, cols: list[str], time_col: str):
            self.dest, self.cols, self.time_col = dest, cols, time_col
            self.files: dict = {}

        def on_change(self, key, row, time, is_addition):
            t = row[self.time_col]
            part = (t.year, t.month, t.day, t.hour)
            w = self.files.get(part)
            if w is None:
                d = self.dest.joinpath(*(f"{k}={v}" for k, v in zip(PARTS, part)))
                d.mkdir(parents=True, exist_ok=True)
                fh = open(d / "part-0.csv", "w", newline="")
                w = self.files[part] = (fh, csv.writer(fh))
                w[1].writerow(self.cols + ["time", "diff"])
            w[1].writerow([row[c].isoformat() if c == self.time_col else row[c] for c in self.cols]
                          + [time, 1 if is_addition else -1])

        def on_end(self):
            for fh, _ in self.files.values():
                fh.close()

    pw.io.python.write(agg, PartitionedCsv(out / "well_1m", AGG, "window_start"))
    pw.io.python.write(alerts, PartitionedCsv(out / "alerts", ALERT, "ts"))
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)
    return {"threads": parallelism}


ENGINES = {"polars": run_polars, "bytewax": run_bytewax, "flink": run_flink, "pathway": run_pathway}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=sorted(ENGINES) + ["bytewax-worker"])
    ap.add_argument("data", type=Path)
    ap.add_argument("--parallelism", type=int, default=1)
    ap.add_argument("--out", help="output directory name under DATA (default: the engine's name)")
    ap.add_argument("--addresses")
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args()
    data = args.data.resolve()
    if args.engine == "bytewax-worker":
        run_bytewax_worker(data, Path(args.out), args.addresses, args.process_id)
        return
    out = data / (args.out or args.engine)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ["POLARS_MAX_THREADS"] = str(args.parallelism)
    t = time.perf_counter()
    notes = ENGINES[args.engine](data, out, args.parallelism) or {}
    print(json.dumps({"engine": args.engine, "parallelism": args.parallelism,
                      "seconds": round(time.perf_counter() - t, 3), **notes}))


if __name__ == "__main__":
    main()
