"""The lake's files as Athena and the other readers see them: Parquet types (UTC microsecond
timestamps, no INT96, ZSTD), hive partition directories that match each row's hour, the DDL
of `shardlake athena-ddl` (parsed with sqlglot; its views, run in DuckDB, merge the parts as
lake.py does by hand), and `shardlake query` reading the lake and pruning partitions.

Exercises src/sink/writer.rs, src/sink/partition.rs, src/sink/local.rs and src/tools/query.rs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp

from harness import PIPELINE, check_run, pipeline_env, run_pipeline, simulate
from lake import (OUTPUT_TIME_COLUMN, WELL_1M_VALUES, WELL_5M_HOP_VALUES, compare_aggregates, duck,
                  keyed, lake_merged, lake_source, parquet_files)
from streamdata import read_stream

UTC_US = pa.timestamp("us", tz="UTC")
PARTITION_DIR = re.compile(r"^year=(\d{4})/month=(\d{2})/day=(\d{2})/hour=(\d{2})$")


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
    ddl = check_run([str(shardlake_bin), "athena-ddl", str(PIPELINE), "--location", location,
                     "--first-year", "2026"], env=pipeline_env(tmp_path)).stdout
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
        for unit, lo, hi in (("month", 1, 12), ("day", 1, 31), ("hour", 0, 23)):
            assert tbl.get(f"projection.{unit}.type") == "integer", (unit, tbl)
            assert tbl.get(f"projection.{unit}.range") == f"{lo},{hi}", (unit, tbl)
            assert tbl.get(f"projection.{unit}.digits") == "2", (unit, tbl)
        # Years from the first one to NOW, one a year: a query without a time filter
        # enumerates only the years so far, not the 81 of a fixed 2020-2100 range.
        assert (tbl.get("projection.year.type"), tbl.get("projection.year.format"),
                tbl.get("projection.year.range"), tbl.get("projection.year.interval"),
                tbl.get("projection.year.interval.unit")) == (
                    "date", "yyyy", "2026,NOW", "1", "YEARS"), tbl
        for f in files[output]:
            year = int(re.search(r"/year=(\d{4})/", f).group(1))
            assert 2026 <= year <= dt.datetime.now(dt.timezone.utc).year, (
                f"{f}: year outside the projection's range")
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
