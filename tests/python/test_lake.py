"""The lake, checked from outside: the shardlake binaries run over simulated streams, and every
expectation is computed from the input NDJSON files with independent tools (a Python validity
filter, DuckDB, pyarrow, sqlglot).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp

from crash import crash_runs, simulator_extension
from harness import (PIPELINE, check_run, pipeline_env, run_pipeline, run_until_read_then_sigterm,
                     simulate, write_test_pipeline)
from lake import (OUTPUT_TIME_COLUMN, WELL_1M_VALUES, WELL_5M_HOP_VALUES, check_dead_letter,
                  check_readings_exactly_once, check_record_alerts, check_well_1m,
                  check_well_5m_hop, check_whole_lake, compare_aggregates, duck, inprogress_files,
                  keyed, lake_count, lake_merged, lake_source, no_late, parquet_files)
from streamdata import read_stream

UTC_US = pa.timestamp("us", tz="UTC")
PARTITION_DIR = re.compile(r"^year=(\d{4})/month=(\d{2})/day=(\d{2})/hour=(\d{2})$")
def test_aggregates_match_duckdb(tmp_path, agent_bin, shardlake_bin):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=120, readings=300, seed=11,
                       spikes=6, malformed=9)
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)
    stream = read_stream(tmp_path / "stream")
    # The independent filter and the simulator agree on what is malformed.
    assert len(stream.valid) == summary["readings"], (len(stream.valid), summary)
    assert len(stream.invalid) == summary["malformed"], (len(stream.invalid), summary)

    lake = tmp_path / "lake"
    con = duck()
    con.register("src", stream.table())

    check_readings_exactly_once(con, lake, len(stream.valid))
    no_late(con, lake)
    check_dead_letter(con, lake, stream.invalid)
    spikes = check_record_alerts(con, lake)
    assert spikes > 0, "the input has no pressure spike: the alert check would be vacuous"

    windows_1m = check_well_1m(con, lake)
    windows_5m = check_well_5m_hop(con, lake)
    # Every device reports every second for 5 minutes: about 6 minutes' windows each.
    assert windows_1m >= 120 * 5 and windows_5m >= 3 * 5, (windows_1m, windows_5m)


def small_lake_with_every_output(tmp_path: Path, agent_bin: Path, shardlake_bin: Path):
    """A run whose lake has files in every output: one shard (so it is read in several
    chunks), 90 s of event-time jitter (beyond the 30 s allowed lateness, so some readings
    are late), spikes, malformed records, and readings on both sides of 11:00 UTC."""
    simulate(agent_bin, tmp_path, shards=1, devices=20, readings=1200, seed=5, spikes=4,
             malformed=6, start="2026-01-05T10:50:00Z", jitter_ms=90_000)
    before = dt.datetime.now(dt.timezone.utc)
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)
    after = dt.datetime.now(dt.timezone.utc)
    lake = tmp_path / "lake"
    files = {o: parquet_files(lake, o) for o in OUTPUT_TIME_COLUMN}
    empty = [o for o, f in files.items() if not f]
    assert not empty, f"the run wrote no file for {empty}: the input was meant to produce all"
    return lake, files, (before, after)


def test_parquet_types_for_athena(tmp_path, agent_bin, shardlake_bin):
    lake, files, (before, after) = small_lake_with_every_output(tmp_path, agent_bin,
                                                                shardlake_bin)
    outputs = sorted(p.name for p in lake.iterdir() if p.is_dir())
    assert outputs == sorted(OUTPUT_TIME_COLUMN), outputs
    hours_seen = {o: set() for o in OUTPUT_TIME_COLUMN}
    for output, paths in files.items():
        for f in paths:
            rel = Path(f).relative_to(lake / output)
            where = f"{output}/{rel}"
            m = PARTITION_DIR.match("/".join(rel.parts[:-1]))
            assert m, f"{where}: not in a year=YYYY/month=MM/day=DD/hour=HH directory"
            part = tuple(int(x) for x in m.groups())

            pf = pq.ParquetFile(f)
            # Arrow's view of the schema (what pyarrow, DuckDB and DataFusion see).
            for fld in pf.schema_arrow:
                if pa.types.is_timestamp(fld.type) or pa.types.is_date(fld.type) \
                        or pa.types.is_time(fld.type):
                    assert fld.type == UTC_US, f"{where}: column {fld.name} is {fld.type}"
            # Parquet's own logical types (what Athena reads; the Arrow schema above can come
            # from the ARROW:schema metadata instead).
            for i in range(len(pf.schema)):
                col = pf.schema.column(i)
                assert col.physical_type != "INT96", f"{where}: {col.name} is INT96"
                if col.logical_type.type == "TIMESTAMP":
                    lt = json.loads(col.logical_type.to_json())
                    assert (lt["isAdjustedToUTC"], lt["timeUnit"]) == (True, "microseconds"), (
                        f"{where}: column {col.name} has logical type {lt}")
            md = pf.metadata
            assert md.num_row_groups >= 1 and md.num_rows > 0, f"{where}: empty file"
            for rg in range(md.num_row_groups):
                for c in range(md.num_columns):
                    chunk = md.row_group(rg).column(c)
                    assert chunk.compression == "ZSTD", (
                        f"{where}: row group {rg} column {chunk.path_in_schema} is "
                        f"{chunk.compression}")

            time_col = OUTPUT_TIME_COLUMN[output]
            assert pf.schema_arrow.field(time_col).type == UTC_US, (where, time_col)
            values = pf.read(columns=[time_col]).column(0).to_pylist()
            assert None not in values, f"{where}: null {time_col}"
            hours = {(v.year, v.month, v.day, v.hour) for v in
                     (x.astimezone(dt.timezone.utc) for x in values)}
            assert hours == {part}, (
                f"{where}: {time_col} values fall in hours {sorted(hours)}, "
                f"not only in the partition's {part}")
            hours_seen[output] |= hours
            if output == "dead_letter":
                lo = before.replace(minute=0, second=0, microsecond=0)
                assert all(before - dt.timedelta(seconds=1) <= v <= after for v in values), (
                    f"{where}: arrival_time outside the run ({before} .. {after})")
                assert part >= (lo.year, lo.month, lo.day, lo.hour)
    # The input spans 10:50-11:10 UTC, so event-time outputs are split over two hours.
    for output in ("readings", "well_1m", "well_5m_hop"):
        assert {h[3] for h in hours_seen[output]} == {10, 11}, (output, hours_seen[output])


ARROW_TO_ATHENA = [
    (lambda t: t == UTC_US, "timestamp"),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    (pa.types.is_int64, "bigint"),
    (pa.types.is_int32, "int"),
    (pa.types.is_float64, "double"),
    (pa.types.is_float32, "float"),
    (pa.types.is_boolean, "boolean"),
    (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    (lambda t: pa.types.is_list(t) or pa.types.is_large_list(t),
     lambda t: f"array<{athena_type(t.value_type)}>"),
]


def athena_type(t: pa.DataType) -> str:
    for pred, name in ARROW_TO_ATHENA:
        if pred(t):
            return name(t) if callable(name) else name
    pytest.fail(f"no Athena type known for Arrow type {t}")


def test_athena_ddl_matches_parquet(tmp_path, agent_bin, shardlake_bin):
    lake, files, _ = small_lake_with_every_output(tmp_path, agent_bin, shardlake_bin)
    location = "s3://bucket/lake"
    ddl = check_run([str(shardlake_bin), "athena-ddl", str(PIPELINE), "--location", location],
                    env=pipeline_env(tmp_path)).stdout
    # The athena dialect parses Hive DDL with TBLPROPERTIES (sqlglot 30); "hive" is the fallback
    # for tables. Views are Trino SQL, which the athena dialect must parse as is.
    statements = []
    for text in (t.strip() for t in ddl.split(";\n")):
        if not text:
            continue
        if text.startswith("CREATE OR REPLACE VIEW"):
            statements.append(sqlglot.parse_one(text, read="athena"))
            continue
        try:
            statements.append(sqlglot.parse_one(text, read="athena"))
        except sqlglot.errors.ParseError:
            statements.append(sqlglot.parse_one(text, read="hive"))
    assert all(isinstance(s, exp.Create) for s in statements), ddl
    creates = [s for s in statements if s.kind == "TABLE"]
    views = {s.this.name: s for s in statements if s.kind == "VIEW"}

    # An aggregation's files are its parts (`<table>_parts`); its view merges them.
    aggregations = {"well_1m", "well_5m_hop"}
    table_of = {o: f"well_telemetry_{o}" + ("_parts" if o in aggregations else "")
                for o in OUTPUT_TIME_COLUMN}
    tables = {}
    for create in creates:
        table = create.this.this
        assert table.db == "shardlake", table.sql()
        props = create.args["properties"].expressions
        assert any(isinstance(p, exp.ExternalProperty) for p in props), "not EXTERNAL"
        tables[table.name] = (create, props)
    assert sorted(tables) == sorted(table_of.values()), sorted(tables)
    assert sorted(views) == sorted(f"well_telemetry_{o}" for o in aggregations), sorted(views)

    # Each view, translated by sqlglot from Athena's SQL to DuckDB's and run over the parts
    # files, gives the rows of the merge written by hand in lake.py (itself checked against
    # the input by the other tests).
    con = duck()
    con.execute("CREATE SCHEMA shardlake")
    for output in aggregations:
        con.execute(f"CREATE VIEW shardlake.{table_of[output]} AS "
                    f"SELECT * FROM {lake_source(lake, output)}")
    for output, keys, values in (("well_1m", "tenant, device_id", WELL_1M_VALUES),
                                 ("well_5m_hop", "tenant", WELL_5M_HOP_VALUES)):
        view = views[f"well_telemetry_{output}"]
        assert view.this.db == "shardlake", view.sql()
        select = view.expression.sql(dialect="duckdb")
        nkeys = 1 + len(keys.split(","))
        cols = ", ".join(values)
        from_view = keyed(con, f"SELECT epoch_us(window_start), {keys}, {cols} FROM ({select})",
                          nkeys)
        by_hand = keyed(con, f"""SELECT epoch_us(window_start), {keys}, {cols}
                                 FROM {lake_merged(lake, output)}""", nkeys)
        assert from_view, f"{output}: the view returned no rows"
        compare_aggregates(f"{output} (Athena view in DuckDB)", by_hand, from_view, values)

    for output in OUTPUT_TIME_COLUMN:
        create, props = tables[table_of[output]]
        columns = [(c.name, c.args["kind"].sql(dialect="hive").lower())
                   for c in create.this.expressions]
        for f in files[output]:
            schema = pq.read_schema(f)
            expected = [(fld.name, athena_type(fld.type)) for fld in schema]
            assert columns == expected, f"{output}: DDL columns {columns}, Parquet {expected}"

        partitioned = [p for p in props if isinstance(p, exp.PartitionedByProperty)]
        assert len(partitioned) == 1, create.sql()
        part_cols = [(c.name, c.args["kind"].sql(dialect="hive").lower())
                     for c in partitioned[0].this.expressions]
        assert part_cols == [(c, "string") for c in ("year", "month", "day", "hour")], part_cols
        assert not {c for c, _ in part_cols} & {c for c, _ in columns}, (
            f"{output}: a partition column is also a data column")
        fmt = [p for p in props if isinstance(p, exp.FileFormatProperty)]
        assert [p.this.name.upper() for p in fmt] == ["PARQUET"], create.sql()
        loc = [p.this.name for p in props if isinstance(p, exp.LocationProperty)]
        assert loc == [f"{location}/{output}/"], loc

        tbl = {p.this.name: p.args["value"].name for p in props if type(p) is exp.Property}
        assert tbl.get("projection.enabled") == "true", tbl
        for unit, lo, hi in (("year", None, None), ("month", 1, 12), ("day", 1, 31),
                             ("hour", 0, 23)):
            assert tbl.get(f"projection.{unit}.type") == "integer", (unit, tbl)
            rng = tbl.get(f"projection.{unit}.range", "")
            assert re.fullmatch(r"\d+,\d+", rng), (unit, rng)
            if lo is not None:
                assert rng == f"{lo},{hi}", (unit, rng)
                assert tbl.get(f"projection.{unit}.digits") == "2", (unit, tbl)
        year_lo, year_hi = map(int, tbl["projection.year.range"].split(","))
        for f in files[output]:
            year = int(re.search(r"/year=(\d{4})/", f).group(1))
            assert year_lo <= year <= year_hi, f"{f}: year outside the projection's range"
        assert tbl.get("storage.location.template") == (
            f"{location}/{output}/year=${{year}}/month=${{month}}/day=${{day}}/hour=${{hour}}/"
        ), tbl.get("storage.location.template")
        assert tbl.get("parquet.compression") == "ZSTD", tbl


def parse_pretty_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Arrow's pretty-printed table: header row, then data rows."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    assert rows, f"no table in the output:\n{text}"
    return rows[0], rows[1:]


def test_query_cli_prunes_and_reads(tmp_path, agent_bin, shardlake_bin):
    # 10 minutes of readings from 10:55 UTC: both hour partitions 10 and 11 hold data.
    simulate(agent_bin, tmp_path, shards=2, devices=30, readings=600, seed=9, spikes=2,
             malformed=3, start="2026-01-05T10:55:00Z")
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    expected = dict(con.execute(
        "SELECT hour(ts)::int, count(*) FROM src GROUP BY ALL").fetchall())
    assert set(expected) == {10, 11}, expected

    env = pipeline_env(tmp_path)

    def query(sql: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(shardlake_bin), "query", str(PIPELINE), sql], env=env,
                              capture_output=True, text=True, timeout=120)

    def count(sql: str) -> int:
        proc = query(sql)
        assert proc.returncode == 0, f"{sql}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        header, rows = parse_pretty_table(proc.stdout)
        assert header == ["n"] and len(rows) == 1, proc.stdout
        return int(rows[0][0])

    q10 = "SELECT count(*) AS n FROM readings WHERE hour = '10'"
    assert count(q10) == expected[10]
    assert count("SELECT count(*) AS n FROM readings WHERE hour = '11'") == expected[11]
    assert count("SELECT count(*) AS n FROM readings") == len(stream.valid)

    # Pruning: a file that is not Parquet in hour=11 breaks a query that reads hour 11, and
    # not one restricted to hour 10, which must not open it.
    bad = tmp_path / "lake/readings/year=2026/month=01/day=05/hour=11/part-zz-not-parquet.parquet"
    assert bad.parent.is_dir()
    bad.write_bytes(b"this is not a parquet file\n" * 100)
    broken = query("SELECT count(*) AS n FROM readings WHERE hour = '11'")
    assert broken.returncode != 0, "a query over hour 11 read past a corrupt file"
    assert count(q10) == expected[10], "the hour=10 query opened files of hour 11"


def test_sigkill_crash_exactly_once(tmp_path, agent_bin, shardlake_bin, capsys):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=200, readings=1000, seed=23,
                       spikes=8, malformed=20)
    assert summary["readings"] >= 200_000
    stream = read_stream(tmp_path / "stream")
    assert (len(stream.valid), len(stream.invalid)) == (summary["readings"],
                                                        summary["malformed"])
    # Commits every second or 1 MiB, so crashes land between and inside many commits; kills
    # land before, during and after a run's first commit (crash_runs narrows its window, and
    # extends the stream, when this machine gets through it faster than the kills).
    pipeline = write_test_pipeline(tmp_path / "test.yaml", max_bytes="1MiB", max_age="1s")
    lake = tmp_path / "lake"
    con = duck()
    more = simulator_extension(agent_bin, tmp_path, shards=4, devices=200, after=1000,
                               readings=1000, seed=23)
    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, lake, valid=len(stream.valid),
                         seed=20260105, staged=lambda: f"{len(inprogress_files(lake))} files",
                         extend=more)
    stream = read_stream(tmp_path / "stream")

    started = time.monotonic()
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    with capsys.disabled():
        print(f"\n[crash test, local lake] {crashes.report()}\n"
              f"  final run: finished in {time.monotonic() - started:.1f}s")
    assert crashes.mid_stream >= 1, "no crash left the lake part-way through the stream"

    assert inprogress_files(lake) == [], inprogress_files(lake)
    con.register("src", stream.table())
    check_whole_lake(con, lake, stream)
    assert lake_count(con, lake, "dead_letter") == summary["malformed"]


def _reading(device: str, tenant: str, seq: int, t: dt.datetime) -> str:
    return json.dumps({
        "device_id": device, "tenant": tenant, "seq": seq,
        "ts": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
        "barrels_per_s": round(0.5 + (seq % 5) * 0.01, 4),
        "pressure_psi": round(2000.0 + (seq % 7) * 1.5, 2),
        "temp_c": round(70.0 + (seq % 3) * 0.25, 2), "status": "ok",
    }, separators=(",", ":")) + "\n"


def test_graceful_restart_keeps_open_windows(tmp_path, shardlake_bin):
    """A restart in the middle of a stream (SIGTERM: the run commits what it read, then a
    second run continues) must give the same windows as one uninterrupted run.

    The stream is written directly in the local-stream format (stream.json and one NDJSON
    file per shard) so the shards are deliberately uneven: shard 1 holds 50 wells for
    10 minutes (several read chunks), shard 0 one well that is first behind (it holds the
    watermark back, so shard 1's windows are still open at the restart) and then catches up.
    """
    stream = tmp_path / "stream"
    stream.mkdir()
    (stream / "stream.json").write_text('{"shards":2}')
    t0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.timezone.utc)
    sec = dt.timedelta(seconds=1)
    shard0, shard1 = stream / "shardId-000000000000.ndjson", stream / "shardId-000000000001.ndjson"
    with open(shard1, "w") as f:
        for s in range(600):
            for d in range(50):
                f.write(_reading(f"well-b{d:02}", ["acme", "borealis"][d % 2], s + 1,
                                 t0 + s * sec + dt.timedelta(milliseconds=7 * d)))
    first = 121  # shard 0: 10:00:00-10:02:00 before the restart, up to 10:20:00 after it
    with open(shard0, "w") as f:
        for s in range(first):
            f.write(_reading("well-a", "cascade", s + 1, t0 + s * sec))
    total_before = 600 * 50 + first

    run_until_read_then_sigterm(shardlake_bin, PIPELINE, pipeline_env(tmp_path), total_before,
                                timeout=90)

    with open(shard0, "a") as f:
        for s in range(first, 1201):
            f.write(_reading("well-a", "cascade", s + 1, t0 + s * sec))
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)

    data = read_stream(stream)
    assert not data.invalid and len(data.valid) == total_before + 1201 - first
    lake = tmp_path / "lake"
    con = duck()
    con.register("src", data.table())
    check_readings_exactly_once(con, lake, len(data.valid))
    no_late(con, lake)
    check_well_1m(con, lake)
    check_well_5m_hop(con, lake)
