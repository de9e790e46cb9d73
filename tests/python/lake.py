"""The lake checked with readers shardlake did not write: DuckDB over the Parquet files (a
local lake directory, or an S3 lake read through pyarrow's S3FileSystem), the aggregation
parts merged by hand, the aggregates DuckDB computes from the input, and what every lake of
pipelines/well-telemetry.yaml must hold (each valid record once, each invalid one in
dead_letter, the alerts, the windows).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from streamdata import StreamData, stream_data

if TYPE_CHECKING:
    from servers import Moto

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
    if isinstance(lake, (S3LakeView, DeltaLakeView)):
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


class DeltaLakeView:
    """A lake of Delta tables (`format: delta`) read the way Delta readers read it: the
    `deltalake` package (delta-rs's Python binding, not our code) reads each table's log, and
    pyarrow reads exactly the files its latest version lists, partition columns from their
    paths. Before registering a table it checks that delta-rs's own reader returns as many
    rows. `root` is a local lake directory or `s3://bucket/prefix` (with `moto`)."""

    def __init__(self, con, root, moto: Moto | None = None):
        self.con = con
        self.root = str(root).rstrip("/")
        self.options = None
        self.fs = None
        if moto is not None:
            from pyarrow import fs as pafs
            self.options = {"AWS_ENDPOINT_URL": f"http://{moto.host}:{moto.port}",
                            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
            self.fs = pafs.S3FileSystem(endpoint_override=f"{moto.host}:{moto.port}",
                                        scheme="http", access_key="test", secret_key="test",
                                        region="us-east-1")
        self._tables: dict[str, str | None] = {}

    def refresh(self) -> None:
        self._tables.clear()

    def table(self, output: str):
        """The output's DeltaTable, None before its first commit."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        try:
            return DeltaTable(f"{self.root}/{output}", storage_options=self.options)
        except TableNotFoundError:
            return None

    def files(self, output: str) -> list[str]:
        """The data files the table's latest version lists (paths pyarrow can open)."""
        dt = self.table(output)
        if dt is None:
            return []
        uris = dt.file_uris()
        if self.fs is not None:
            return sorted(u.removeprefix("s3://") for u in uris)
        return sorted(u.removeprefix("file://") for u in uris)

    def txns(self, output: str) -> dict[str, list[int]]:
        """Per application id, the `txn` versions of the table's log entries, in log order
        (read from the JSON entries themselves)."""
        import json
        base = self.root.removeprefix("s3://") + f"/{output}/_delta_log"
        if self.fs is None:
            texts = [p.read_text() for p in sorted(Path(base).glob("*.json"))]
        else:
            from pyarrow import fs as pafs
            infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
            texts = []
            for i in sorted((i for i in infos if i.path.endswith(".json")),
                            key=lambda i: i.path):
                with self.fs.open_input_stream(i.path) as f:
                    texts.append(f.read().decode())
        out: dict[str, list[int]] = {}
        for text in texts:
            for line in text.splitlines():
                action = json.loads(line)
                if "txn" in action:
                    out.setdefault(action["txn"]["appId"], []).append(action["txn"]["version"])
        return out

    def check_commits_once(self, outputs) -> None:
        """No shardlake commit is in a table's log twice: each worker's versions only grow."""
        for output in outputs:
            for app, versions in self.txns(output).items():
                if app.startswith("shardlake/compaction"):
                    continue
                assert versions == sorted(set(versions)), f"{output}, {app}: {versions}"

    def check_stats(self, output: str, bounded: tuple[str, ...]) -> int:
        """Every file of the table's latest version has `stats` that hold for its rows, read
        by pyarrow: the row count, the null counts, and a range that holds every value of each
        column in `bounded` (each must have one; timestamps are kept to the millisecond, so
        the range may be wider by less than one). Returns the files checked."""
        import datetime as dt_
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        dt = self.table(output)
        if dt is None:
            return 0
        import pyarrow as pa
        adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
        base = self.root.removeprefix("file://")
        for add in adds:
            path = f"{base}/{output}/{add['path']}".removeprefix("s3://")
            from urllib.parse import unquote
            rows = pq.read_table(unquote(path), filesystem=self.fs)
            assert add["num_records"] == rows.num_rows, (path, add["num_records"])
            for col in rows.column_names:
                nulls = add.get(f"null_count.{col}")
                if nulls is not None:
                    assert nulls == rows[col].null_count, (path, col, nulls)
                lo, hi = add.get(f"min.{col}"), add.get(f"max.{col}")
                if col in bounded:
                    assert (lo is None) == (rows[col].null_count == rows.num_rows), (
                        f"{path}: no range for {col}: {add}")
                if lo is None or hi is None:
                    continue
                mm = pc.min_max(rows[col])
                actual_lo, actual_hi = mm["min"].as_py(), mm["max"].as_py()
                if isinstance(actual_lo, dt_.datetime):
                    slack = dt_.timedelta(milliseconds=1)
                    assert lo <= actual_lo < lo + slack, (path, col, lo, actual_lo)
                    assert hi - slack < actual_hi <= hi, (path, col, hi, actual_hi)
                else:
                    assert lo == actual_lo and hi == actual_hi, (path, col, lo, hi,
                                                                 actual_lo, actual_hi)
        return len(adds)

    def source(self, output: str) -> str | None:
        if output not in self._tables:
            import pyarrow.dataset as pads
            name = None
            files = self.files(output)
            if files:
                base = self.root.removeprefix("s3://") + f"/{output}"
                table = pads.dataset(files, filesystem=self.fs, format="parquet",
                                     partitioning="hive", partition_base_dir=base).to_table()
                by_delta = self.table(output).to_pyarrow_table()
                assert table.num_rows == by_delta.num_rows, (
                    f"{output}: pyarrow read {table.num_rows} rows from the listed files, "
                    f"delta-rs {by_delta.num_rows}")
                assert len(files) == len(set(files)), f"{output}: a file listed twice"
                name = f"delta_{output}"
                self.con.register(name, table)
            self._tables[output] = name
        return self._tables[output]


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
