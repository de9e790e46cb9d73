"""`lake: {format: delta}`: every output is a Delta Lake table, read by readers we did not
write: the `deltalake` package (delta-rs's Python binding) reads each table's log, pyarrow
reads exactly the files its latest version lists, DuckDB compares them with the input.

- SIGKILLs and failpoint aborts at random moments (crash.py): after each, what the logs
  list has no duplicates; after a final run every output is right.
- The same on moto's S3, where log entries are written with conditional PutObjects.
- A late publish of an intent that another run already completed (a worker that lost its
  lease and still tries): recognised by the table's application transaction, never a double.
- `shardlake query` reads the tables through delta-rs's DataFusion provider; `athena-ddl`
  prints Delta DDL.

Exercises src/sink/delta.rs and its step in src/checkpoint/commit.rs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

from crash import crash_runs, no_core_dumps, simulator_extension
from harness import PIPELINE, pipeline_env, run_pipeline, simulate, write_test_pipeline
from lake import DeltaLakeView, check_whole_lake, duck, lake_count, parquet_files
from streamdata import read_stream

OUTPUTS = ["readings", "dead_letter", "alerts", "well_1m", "well_5m_hop"]


def test_delta_tables_exactly_once_across_crashes(tmp_path, agent_bin, shardlake_bin, capsys):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=200, readings=500, seed=28,
                       spikes=8, malformed=20)
    stream = read_stream(tmp_path / "stream")
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="1MiB", max_age="1s",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    con = duck()
    view = DeltaLakeView(con, lake)
    more = simulator_extension(agent_bin, tmp_path, shards=4, devices=200, after=500,
                               readings=500, seed=28)
    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, view,
                         valid=len(stream.valid), seed=20261207, min_kills=6,
                         staged=lambda: f"{len(list(lake.rglob('*.inprogress')))} files",
                         extend=more)
    stream = read_stream(tmp_path / "stream")
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    with capsys.disabled():
        print(f"\n[crash test, delta lake] {crashes.report()}")
    assert crashes.mid_stream >= 1, "no crash left the tables part-way through the stream"

    view.refresh()
    con.register("src", stream.table())
    check_whole_lake(con, view, stream)
    view.check_commits_once(OUTPUTS)
    check_file_stats(view)
    assert lake_count(con, view, "dead_letter") == summary["malformed"]
    # Every published file is in its table's log: nothing was published and then left out.
    for output in OUTPUTS:
        on_disk = {f for f in parquet_files(lake, output)}
        assert set(view.files(output)) == on_disk, output
    # Each commit's entry names the pipeline's worker and its commit number.
    entries = sorted((lake / "readings" / "_delta_log").glob("*.json"))
    txns = []
    for e in entries:
        for line in e.read_text().splitlines():
            action = json.loads(line)
            if "txn" in action:
                txns.append((action["txn"]["appId"], action["txn"]["version"]))
    assert txns, "no log entry carries an application transaction"
    assert all(app.startswith("shardlake/well-telemetry/") for app, _ in txns), txns
    versions = [v for _, v in txns]
    assert len(versions) == len(set(versions)), f"a commit number appended twice: {versions}"


def check_file_stats(view) -> None:
    """Every add action's stats hold for its file (its writer's footer, or for an intent
    recovered after a crash the published file's footer), with a time and device range that
    lets a reader skip files."""
    assert view.check_stats("readings", ("ts", "device_id", "pressure_psi")) > 0
    assert view.check_stats("well_1m", ("window_start", "device_id")) > 0
    view.check_stats("alerts", ())


def aborted_at(shardlake_bin, pipeline, data_dir, point: str, worker: str) -> None:
    """`shardlake run --drain` as `worker` that aborts itself at the first pass of `point`."""
    proc = subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain",
                           "--worker-id", worker],
                          env=pipeline_env(data_dir, {"SHARDLAKE_FAILPOINTS": f"{point}@1"}),
                          capture_output=True, text=True, timeout=300, preexec_fn=no_core_dumps)
    assert f"failpoint {point} reached" in proc.stdout + proc.stderr, (
        f"exit {proc.returncode}, failpoint {point} not reached:\n{proc.stderr[-3000:]}")


def test_late_publish_of_a_completed_intent_is_recognised(tmp_path, agent_bin, shardlake_bin):
    """A worker prepares an intent and stops before its Delta commit (the failpoint after
    its first file is published); another run completes it. Then the first worker's view
    comes back (its state directory as it was, intent pending) and publishes the same intent
    late: the table's txn says it is done, so no row appears twice."""
    simulate(agent_bin, tmp_path, shards=2, devices=50, readings=400, seed=7, spikes=2,
             malformed=0)
    stream = read_stream(tmp_path / "stream")
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64MiB", max_age="1h",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    aborted_at(shardlake_bin, pipeline, tmp_path, "after_publish_file", "w0")
    state = tmp_path / "state"
    checkpoint = state / "well-telemetry" / "checkpoint.json"
    assert json.loads(checkpoint.read_text()).get("pending"), "no intent was left pending"
    stale = tmp_path / "state-before-recovery"
    shutil.copytree(state, stale)

    # Another worker recovers w0's intent (under w0's app id) and reads the rest as w1.
    subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain", "--worker-id", "w1"],
                   env=pipeline_env(tmp_path), check=True, capture_output=True, timeout=300)
    con = duck()
    view = DeltaLakeView(con, lake)
    rows = lake_count(con, view, "readings")
    assert rows == len(stream.valid)
    versions = {o: view.table(o).version() for o in OUTPUTS if view.table(o) is not None}

    # The late worker: its state as it was, the intent still pending. It publishes the intent
    # again, Delta step included, and is stopped before it could commit its checkpoints (a
    # lost lease fences that write; the rest of its state is stale, so it must not go on).
    shutil.rmtree(state)
    shutil.copytree(stale, state)
    aborted_at(shardlake_bin, pipeline, tmp_path, "after_publish", "w0")
    view.refresh()
    src = view.source("readings")
    dups = con.execute(
        f"SELECT count(*) - count(DISTINCT (device_id, seq)) FROM {src}").fetchall()[0][0]
    assert dups == 0, f"the late publish appended {dups} readings again"
    assert lake_count(con, view, "readings") == len(stream.valid)
    # Nothing was appended at all: the tables' txn said the intent was done. (A log entry
    # adding the same paths again would not double rows, since a Delta snapshot keeps one
    # add per path; it would still be a commit that should not exist.)
    after = {o: view.table(o).version() for o in versions}
    assert after == versions, f"the late publish wrote log entries: {versions} -> {after}"


def test_checkpoints_older_than_the_table_are_refused(tmp_path, agent_bin, shardlake_bin):
    """Local checkpoints deleted while the lake is kept: the worker's commit numbers start
    again below what its app id has in the tables. Skipping those commits as done would drop
    their rows; the run stops with what happened and the fix instead."""
    simulate(agent_bin, tmp_path, shards=2, devices=20, readings=100, seed=4, spikes=0,
             malformed=0)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64KiB", max_age="1s",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    simulator_extension(agent_bin, tmp_path, shards=2, devices=20, after=100, readings=100,
                        seed=4)()
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    shutil.rmtree(tmp_path / "state")
    proc = subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                          env=pipeline_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, "a run on reset checkpoints went on"
    assert "were the checkpoints reset" in proc.stderr and "--worker-id" in proc.stderr, (
        proc.stderr[-3000:])


def test_query_and_athena_ddl_read_the_log(tmp_path, agent_bin, shardlake_bin):
    """`shardlake query` reads what the log lists and nothing else in the directories; an
    aggregation's merged view works over its Delta parts; `athena-ddl` prints Delta tables."""
    from test_parquet_files_athena_ddl_and_query import parse_pretty_table
    simulate(agent_bin, tmp_path, shards=2, devices=30, readings=600, seed=9, spikes=2,
             malformed=3, start="2026-01-05T10:55:00Z")
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64MiB", max_age="1h",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    env = pipeline_env(tmp_path)

    def count(sql: str, *args: str) -> int:
        proc = subprocess.run([str(shardlake_bin), "query", str(pipeline), sql, *args],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{sql}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        header, rows = parse_pretty_table(proc.stdout)
        assert header == ["n"] and len(rows) == 1, proc.stdout
        return int(rows[0][0])

    # Before the first commit the tables read as empty, not as an error.
    assert count("SELECT count(*) AS n FROM readings") == 0
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    expected = dict(con.execute("SELECT hour(ts)::int, count(*) FROM src GROUP BY ALL").fetchall())
    assert set(expected) == {10, 11}, expected
    assert count("SELECT count(*) AS n FROM readings") == len(stream.valid)
    assert count("SELECT count(*) AS n FROM readings WHERE hour = '10'") == expected[10]
    minutes = con.execute("SELECT count(DISTINCT (date_trunc('minute', ts), device_id)) "
                          "FROM src").fetchall()[0][0]
    assert count("SELECT count(*) AS n FROM well_1m") == minutes

    # Time travel: version 0 of each table is its creation, before any row.
    from deltalake import DeltaTable
    assert DeltaTable(str(lake / "readings")).version() >= 1
    assert count("SELECT count(*) AS n FROM readings", "--as-of", "0") == 0
    latest = DeltaTable(str(lake / "readings")).version()
    assert count("SELECT count(*) AS n FROM readings", "--as-of", str(latest)) == len(stream.valid)
    past = subprocess.run([str(shardlake_bin), "query", str(pipeline), "SELECT 1",
                           "--as-of", str(latest + 1000)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert past.returncode != 0 and "is past its last" in past.stderr, past.stderr
    assert "--as-of TIME" in past.stderr, past.stderr
    hive = subprocess.run([str(shardlake_bin), "query", str(PIPELINE), "SELECT 1", "--as-of", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert hive.returncode != 0 and "--as-of reads Delta tables" in hive.stderr, hive.stderr

    # A Parquet file put into a partition directory by hand is in no log entry: a Delta
    # reader does not see it (a hive reader would).
    some = sorted((lake / "readings").rglob("part-*.parquet"))[0]
    stray = some.with_name("part-zz-stray.parquet")
    shutil.copy(some, stray)
    assert count("SELECT count(*) AS n FROM readings") == len(stream.valid)

    ddl = subprocess.run([str(shardlake_bin), "athena-ddl", str(pipeline), "--location",
                          "s3://bucket/lake"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert ddl.returncode == 0, ddl.stderr
    delta_tables = [s for s in ddl.stdout.split(";\n") if "'table_type'='DELTA'" in s]
    assert len(delta_tables) == len(OUTPUTS) + 1, ddl.stdout  # with `late`
    assert "PARTITIONED BY" not in ddl.stdout and "projection" not in ddl.stdout
    assert "CREATE OR REPLACE VIEW" in ddl.stdout, "the merged views are missing"


def test_delta_tables_on_s3_across_crashes(tmp_path, moto, agent_bin, shardlake_bin, capsys):
    """On moto's S3: log entries are conditional PutObjects; SIGKILLs and failpoint aborts
    leave no duplicate, and every output is right at the end, read by delta-rs and pyarrow
    from S3."""
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="lake")
    simulate(agent_bin, tmp_path, shards=4, devices=100, readings=300, seed=31, spikes=6,
             malformed=10)
    stream = read_stream(tmp_path / "stream")
    pipeline = write_test_pipeline(
        tmp_path / "delta-s3.yaml", max_bytes="1MiB", max_age="1s",
        lake="{s3: {bucket: lake, prefix: tables/wells, part_size: 5MiB}, format: delta}")
    con = duck()
    view = DeltaLakeView(con, "s3://lake/tables/wells", moto=moto)
    env = moto.env()
    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, view,
                         valid=len(stream.valid), seed=28, min_kills=4, env=env,
                         staged=lambda: "uploads",
                         extend=simulator_extension(agent_bin, tmp_path, shards=4,
                                                    devices=100, after=300, readings=300,
                                                    seed=31))
    stream = read_stream(tmp_path / "stream")
    subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                   env=pipeline_env(tmp_path, env), check=True, timeout=300,
                   capture_output=True)
    with capsys.disabled():
        print(f"\n[crash test, delta lake on S3] {crashes.report()}")
    view.refresh()
    con.register("src", stream.table())
    check_whole_lake(con, view, stream)
    view.check_commits_once(OUTPUTS)
    check_file_stats(view)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake")
            for o in page.get("Contents", [])]
    assert any(k.startswith("tables/wells/readings/_delta_log/") for k in keys), keys[:20]


def test_compaction_is_atomic_for_readers_and_safe_beside_a_worker(tmp_path, agent_bin,
                                                                    shardlake_bin, capsys):
    """Many small files per hour (a commit a second), compacted by `shardlake compact` while
    a reader polls the table's row count and pressure sum through delta-rs: every answer is
    the truth. Then a worker appends more while another compaction runs: nothing is lost or
    doubled. Vacuum refuses a retention under 7 days."""
    from deltalake import DeltaTable
    # 30 minutes of readings, in hours that ended long before now.
    simulate(agent_bin, tmp_path, shards=4, devices=100, readings=1800, seed=5, spikes=4,
             malformed=5)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64KiB", max_age="1s",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    truth = con.execute("SELECT count(*), sum(pressure_psi) FROM src").fetchall()[0]

    def files_per_hour(output: str) -> dict[str, int]:
        per = {}
        for f in DeltaTable(str(lake / output)).file_uris():
            hour = f.rsplit("/", 1)[0]
            per[hour] = per.get(hour, 0) + 1
        return per

    before = files_per_hour("readings")
    assert before and min(before.values()) >= 2, before

    # Hours that ended less than --older-than ago are open: nothing is compacted.
    none = check_compact(shardlake_bin, pipeline, tmp_path, "--older-than", "100000h")
    assert "readings: 0 partitions compacted" in none and files_per_hour("readings") == before

    out = ""

    def compact():
        nonlocal out
        out = check_compact(shardlake_bin, pipeline, tmp_path)
    answers = answers_during(lambda: DeltaTable(str(lake / "readings")), compact)
    after = files_per_hour("readings")
    with capsys.disabled():
        print(f"\n[compaction] readings files per hour {before} -> {after}; {out.strip()}; "
              f"{len(answers)} reader polls over versions "
              f"{sorted({v for v, _, _ in answers})}")
    assert set(after) == set(before) and set(after.values()) == {1}, (before, after)
    check_answers(answers, truth)
    view = DeltaLakeView(con, lake)
    check_whole_lake(con, view, stream)
    # The compacted files mix with the sink's in one pyarrow dataset, filters included: the
    # same Arrow types (no string_view), and stats that hold.
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    for output in ("readings", "well_1m"):
        schemas = {str(pq.read_schema(f).remove_metadata()) for f in view.files(output)}
        assert len(schemas) == 1, f"{output}: the files' schemas differ: {schemas}"
    ds = DeltaTable(str(lake / "readings")).to_pyarrow_dataset()
    one = ds.to_table(filter=pads.field("device_id") == "well-0007").num_rows
    assert one == con.execute("SELECT count(*) FROM src WHERE device_id = 'well-0007'"
                              ).fetchall()[0][0] > 0
    view.check_stats("readings", ("ts", "device_id"))

    # A worker appends (a later stretch of the stream) while a compaction runs.
    extend = simulator_extension(agent_bin, tmp_path, shards=4, devices=100, after=1800,
                                 readings=600, seed=5)
    extend()
    worker = subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--drain"],
                              env=pipeline_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    check_compact(shardlake_bin, pipeline, tmp_path, "--older-than", "0s")
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
    check_compact(shardlake_bin, pipeline, tmp_path)
    stream = read_stream(tmp_path / "stream")
    view.refresh()
    con.register("src", stream.table())
    check_whole_lake(con, view, stream)

    refused = subprocess.run([str(shardlake_bin), "vacuum", str(pipeline), "--retain", "1h"],
                             env=pipeline_env(tmp_path), capture_output=True, text=True)
    assert refused.returncode != 0 and "shorter than 7 days" in refused.stderr, refused.stderr
    dry = subprocess.run([str(shardlake_bin), "vacuum", str(pipeline), "--dry-run"],
                         env=pipeline_env(tmp_path), capture_output=True, text=True)
    assert dry.returncode == 0 and "readings: would delete 0 files" in dry.stdout, dry


def answers_during(table, action) -> list[tuple[int, int, float]]:
    """A reader on another thread polls the readings table (`table()` opens it as delta-rs
    reads it) while `action()` runs, and until it has answered twice more after it: each
    answer is (version, rows, sum of pressure)."""
    import threading

    import pyarrow.compute as pc
    answers, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            dt = table()
            t = dt.to_pyarrow_table(columns=["pressure_psi"])
            answers.append((dt.version(), t.num_rows, pc.sum(t["pressure_psi"]).as_py()))
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        wait_for(lambda: len(answers) >= 1, "the reader's first answer")
        action()
        polled = len(answers)
        wait_for(lambda: len(answers) > polled + 1, "a reader's answer after the compaction")
    finally:
        stop.set()
        reader.join()
    return answers


def check_answers(answers, truth) -> None:
    """Every answer equals the truth (rows, sum), and the reader saw more than one version."""
    assert len({v for v, _, _ in answers}) >= 2, "the reader never saw the table change"
    for version, rows, total in answers:
        assert rows == truth[0] and abs(total - truth[1]) < 1e-6 * abs(truth[1]), (
            f"version {version}: {rows} rows, sum {total}; the truth is {truth}")


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.05)


def check_compact(shardlake_bin, pipeline, data_dir, *args) -> str:
    proc = subprocess.run([str(shardlake_bin), "compact", str(pipeline), *args],
                          env=pipeline_env(data_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_three_workers_append_to_the_same_delta_tables(tmp_path, kinesalite, moto, agent_bin,
                                                       shardlake_bin, capsys):
    """Three workers share a 6-shard kinesalite stream through moto's DynamoDB leases and
    append to the same Delta tables in moto's S3; one is SIGKILLed mid-run. Every output holds
    every record once; in each table's log, every app id's versions only grow, none twice."""
    import threading
    import uuid

    from servers import create_stream, put_lines
    from streamdata import interleave, stream_data
    from test_dynamodb_leases_failover_resharding_and_faults import (
        kill_all, last_sequence, lease_run, lease_table, owners, start_workers, wait_until,
        worker_of)
    kinesis, ddb, s3 = kinesalite.client(), moto.client("dynamodb"), moto.client("s3")
    s3.create_bucket(Bucket="lake")
    name, table = f"wells-{uuid.uuid4().hex[:8]}", f"leases-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 6)
    summary = simulate(agent_bin, tmp_path / "sim", shards=6, devices=300, readings=200,
                       seed=12, spikes=6, malformed=10)
    lines = interleave(tmp_path / "sim" / "stream")
    half = len(lines) // 2
    put = put_lines(kinesis, name, lines[:half])
    pipeline, env = lease_run(tmp_path, "leases.yaml", name, table, kinesalite.url, moto.url,
                              sync_s=5, max_bytes="4MiB", max_age="1s",
                              lake="{s3: {bucket: lake, prefix: wells, part_size: 5MiB}, "
                                   "format: delta}")
    env["AWS_ENDPOINT_URL_S3"] = moto.url
    workers, logs = start_workers(shardlake_bin, pipeline, env, tmp_path, 3)
    try:
        def balanced():
            try:
                leases = lease_table(ddb, table)
            except ddb.exceptions.ResourceNotFoundException:  # not created yet
                return False
            return len(leases) == 6 and sorted(map(len, owners(leases).values())) == [2, 2, 2]
        wait_until("3 workers to hold 2 leases each", balanced, timeout=90, every=0.5)
        rest: list = []
        producer = threading.Thread(target=lambda: rest.extend(put_lines(kinesis, name,
                                                                          lines[half:])))
        producer.start()
        wait_until("commits from every shard",
                   lambda: all(it["checkpoint"].isdigit()
                               for it in lease_table(ddb, table).values()),
                   timeout=120, every=0.5)
        victim = next(o for o in owners(lease_table(ddb, table)) if worker_of(o) == "w0")
        workers[0].kill()
        workers[0].wait()
        wait_until("the survivors to take w0's leases",
                   lambda: victim not in owners(lease_table(ddb, table))
                   and sum(map(len, owners(lease_table(ddb, table)).values())) == 6,
                   timeout=60, every=0.2)
        producer.join(timeout=300)
        put += rest
        last = last_sequence(put)
        wait_until("every shard's checkpoint to reach its last record",
                   lambda: all(it["checkpoint"].isdigit() and int(it["checkpoint"]) == last[k]
                               for k, it in lease_table(ddb, table).items()),
                   timeout=300, every=1)
        for w in workers[1:]:
            w.terminate()
        for w in workers[1:]:
            assert w.wait(timeout=60) == 0
    finally:
        kill_all(workers, logs)
    subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain", "--worker-id", "last"],
                   env=env, check=True, timeout=300, capture_output=True)

    data = stream_data(put)
    assert (len(data.valid), len(data.invalid)) == (summary["readings"], summary["malformed"])
    con = duck()
    con.register("src", data.table())
    view = DeltaLakeView(con, "s3://lake/wells", moto=moto)
    check_whole_lake(con, view, data)

    txns: dict[str, list[int]] = {}
    keys = sorted(o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="lake", Prefix="wells/readings/_delta_log/") for o in page.get("Contents", [])
        if o["Key"].endswith(".json"))
    for key in keys:
        body = s3.get_object(Bucket="lake", Key=key)["Body"].read().decode()
        for line in body.splitlines():
            action = json.loads(line)
            if "txn" in action:
                txns.setdefault(action["txn"]["appId"], []).append(action["txn"]["version"])
    assert len({worker_of(a.rsplit("/", 1)[1]) for a in txns}) >= 3, txns.keys()
    for app, versions in txns.items():
        assert versions == sorted(set(versions)), f"{app}: versions {versions}"
    with capsys.disabled():
        print(f"\n[delta, 3 workers] {len(put)} records; readings log: {len(keys)} entries, "
              + ", ".join(f"{a.rsplit('/', 1)[1]}: {len(v)} commits" for a, v in txns.items()))

    # Each worker stored its part of every per-tenant window: compaction merges the parts of
    # each closed partition into one per window and group, and every merged view (checked
    # against DuckDB over the input) stays right.
    def duplicate_groups(output: str, groups: str) -> int:
        parts = view.table(output).to_pyarrow_table()
        con.register("parts_now", parts)
        return con.execute(f"SELECT count(*) FROM (SELECT {groups} FROM parts_now "
                           "GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
    split = duplicate_groups("well_5m_hop", "window_start, tenant")
    assert split > 0, "no window was stored in parts by several workers"
    proc = subprocess.run([str(shardlake_bin), "compact", str(pipeline)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = re.search(r"well_5m_hop: \d+ partitions compacted, \d+ files into \d+; "
                       r"(\d+) parts merged into (\d+)", proc.stdout)
    assert merged and int(merged[1]) > int(merged[2]), proc.stdout
    assert duplicate_groups("well_5m_hop", "window_start, tenant") == 0
    assert duplicate_groups("well_1m", "window_start, device_id") == 0
    history = view.table("well_5m_hop").history()
    assert history[0]["operation"] == "WRITE", history[0]
    view = DeltaLakeView(con, "s3://lake/wells", moto=moto)
    check_whole_lake(con, view, data)
    view.check_commits_once(OUTPUTS)
    view.check_stats("well_5m_hop", ("window_start", "tenant"))


def test_s3_faults_under_delta_tables_lose_and_duplicate_nothing(tmp_path, moto, agent_bin,
                                                                 shardlake_bin, capsys):
    """Throttling and connection resets (before the request reaches S3, and after S3 did it:
    the answer is lost) on a fifth of all S3 requests, data files and log entries alike. A
    log entry whose answer was lost is retried by the client and refused (it exists): the
    table's txn then says the commit is there, so it is not appended again."""
    from faultproxy import FaultProxy
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="lake")
    simulate(agent_bin, tmp_path, shards=4, devices=300, readings=600, seed=33, spikes=8,
             malformed=12)
    stream = read_stream(tmp_path / "stream")
    pipeline = write_test_pipeline(
        tmp_path / "s3.yaml", max_bytes="64KiB", max_age="1h",
        lake="{s3: {bucket: lake, prefix: wells, part_size: 5MiB}, format: delta}")
    kinds = ["slowdown", "reset_before", "reset_after"]
    with FaultProxy(moto.host, moto.port, rate=0.2, kinds=kinds, seed=8) as proxy:
        proc = subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                              env=pipeline_env(tmp_path, moto.env(proxy.url)),
                              capture_output=True, text=True, timeout=900)
        faults = dict(proxy.injected)
        with capsys.disabled():
            print(f"\n[S3 fault proxy, delta tables] {proxy.summary()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(faults.get(k, 0) > 0 for k in kinds), f"not every fault was injected: {faults}"
    con = duck()
    con.register("src", stream.table())
    view = DeltaLakeView(con, "s3://lake/wells", moto=moto)
    check_whole_lake(con, view, stream)
    view.check_commits_once(OUTPUTS)


def test_the_worker_compacts_on_a_timer(tmp_path, agent_bin, shardlake_bin):
    """`compaction: {every: 1s}`: a running worker compacts its closed hours itself, beside
    its commits; stopped with SIGTERM, its tables hold every record once."""
    import signal
    simulate(agent_bin, tmp_path, shards=4, devices=100, readings=600, seed=6, spikes=2,
             malformed=2)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64KiB", max_age="1s",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}",
                                   extra="compaction: {every: 1s, older_than: 0s}\n")
    log = tmp_path / "worker.log"
    with open(log, "w") as err:
        worker = subprocess.Popen([str(shardlake_bin), "run", str(pipeline)],
                                  env=pipeline_env(tmp_path), stdout=subprocess.DEVNULL,
                                  stderr=err)
    try:
        # Two commits into the same hour (a later stretch of the stream appended once the
        # first is committed), so the hour has two files to compact.
        wait_for(lambda: '"committed"' in log.read_text(), "the first commit", timeout=120)
        simulator_extension(agent_bin, tmp_path, shards=4, devices=100, after=600,
                            readings=300, seed=6)()
        wait_for(lambda: '"compacted"' in log.read_text()
                 and '"output":"readings"' in log.read_text(), "a compaction of readings",
                 timeout=120)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    from deltalake import DeltaTable
    ops = [h["operation"] for h in DeltaTable(str(lake / "readings")).history()]
    assert "OPTIMIZE" in ops, ops
    run_pipeline(shardlake_bin, pipeline, tmp_path)  # emits the windows still open
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    check_whole_lake(con, DeltaLakeView(con, lake), stream)


def test_compaction_on_s3_is_atomic_for_readers(tmp_path, moto, agent_bin, shardlake_bin):
    """The same on moto's S3: two commits into one hour, compacted while a reader polls the
    row count and pressure sum through delta-rs (from S3): every answer is the truth. The lake
    has a KMS key: every object, log entries and compacted files too, is encrypted with it."""
    from deltalake import DeltaTable
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="lake")
    key_id = moto.client("kms").create_key(Description="lake key")["KeyMetadata"]["KeyId"]
    simulate(agent_bin, tmp_path, shards=4, devices=100, readings=600, seed=9, spikes=2,
             malformed=0)
    pipeline = write_test_pipeline(
        tmp_path / "s3.yaml", max_bytes="64MiB", max_age="1h",
        lake=("{s3: {bucket: lake, prefix: wells, part_size: 5MiB, "
              f"kms_key_id: {key_id}}}, format: delta}}"))
    env = pipeline_env(tmp_path, moto.env())

    def drain():
        subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                       check=True, capture_output=True, timeout=300)
    drain()
    simulator_extension(agent_bin, tmp_path, shards=4, devices=100, after=600, readings=300,
                        seed=9)()
    drain()
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    truth = con.execute("SELECT count(*), sum(pressure_psi) FROM src").fetchall()[0]
    view = DeltaLakeView(con, "s3://lake/wells", moto=moto)

    def table():
        return DeltaTable("s3://lake/wells/readings", storage_options=view.options)
    files_before = len(table().file_uris())
    assert files_before >= 2

    def compact():
        proc = subprocess.run([str(shardlake_bin), "compact", str(pipeline), "--output",
                               "readings"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    answers = answers_during(table, compact)
    assert len(table().file_uris()) < files_before
    check_answers(answers, truth)
    check_whole_lake(con, view, stream)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake")
            for o in page.get("Contents", [])]
    assert any("/_delta_log/" in k for k in keys) and any("part-" in k for k in keys), keys
    for k in keys:
        head = s3.head_object(Bucket="lake", Key=k)
        assert head.get("ServerSideEncryption") == "aws:kms", (k, head)
        assert head.get("SSEKMSKeyId", "").endswith(key_id), (k, head)


def test_one_compaction_at_a_time_per_table(tmp_path, agent_bin, shardlake_bin):
    """Compaction removes files with dataChange false, which Delta's conflict checker lets
    through: two compactions of one partition at once would both commit and double its rows.
    A table held by another compaction's claim (a `txn` whose version is its expiry) is left
    alone; once released, it is compacted. Two `shardlake compact` started together: every
    row once."""
    import time as _time

    from deltalake import CommitProperties, DeltaTable, Transaction
    simulate(agent_bin, tmp_path, shards=4, devices=100, readings=300, seed=14, spikes=2,
             malformed=0)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64MiB", max_age="1h",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    extend = simulator_extension(agent_bin, tmp_path, shards=4, devices=100, after=300,
                                 readings=100, seed=14)
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    for _ in range(2):
        extend()
        run_pipeline(shardlake_bin, pipeline, tmp_path)
    readings = DeltaTable(str(lake / "readings"))
    assert len(readings.file_uris()) >= 3

    def hold(until_ms: int) -> None:
        DeltaTable(str(lake / "readings")).alter.set_table_properties(
            {"delta.logRetentionDuration": "interval 30 days"},
            commit_properties=CommitProperties(
                app_transactions=[Transaction("shardlake/compaction", until_ms)]))

    hold(int(_time.time() * 1000) + 3_600_000)  # another compaction's claim, for an hour
    held = check_compact(shardlake_bin, pipeline, tmp_path, "--output", "readings")
    assert "busy" in held and len(DeltaTable(str(lake / "readings")).file_uris()) >= 3, held
    hold(int(_time.time() * 1000))              # released
    procs = [subprocess.Popen([str(shardlake_bin), "compact", str(pipeline)],
                              env=pipeline_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(DeltaTable(str(lake / "readings")).file_uris()) == 1, outs
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    check_whole_lake(con, DeltaLakeView(con, lake), stream)


def test_schema_changes_add_columns_or_are_refused(tmp_path, agent_bin, shardlake_bin):
    """The pipeline's SQL changes between runs over the same Delta tables. A new aggregate
    is added to the table's schema (older rows read it as null, delta-rs and pyarrow agree);
    a changed type stops the run before it commits anything, naming the column and the fix."""
    from deltalake import DeltaTable
    simulate(agent_bin, tmp_path, shards=2, devices=20, readings=120, seed=12, spikes=0,
             malformed=0)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="64MiB", max_age="1h",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    before = DeltaTable(str(lake / "well_1m")).to_pyarrow_table().num_rows
    assert before > 0
    assert "temp_min" not in DeltaTable(str(lake / "well_1m")).schema().to_arrow().names

    text = pipeline.read_text()
    added = text.replace("max(temp_c)         AS temp_max\n",
                         "max(temp_c)         AS temp_max,\n"
                         "               min(temp_c)         AS temp_min\n", 1)
    assert added != text
    pipeline.write_text(added)
    simulator_extension(agent_bin, tmp_path, shards=2, devices=20, after=120, readings=120,
                        seed=12)()
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    dt = DeltaTable(str(lake / "well_1m"))
    assert "temp_min" in dt.schema().to_arrow().names
    import pyarrow as pa
    rows = pa.table(dt.to_pyarrow_table()).to_pylist()
    new = [r for r in rows if r["temp_min"] is not None]
    old = [r for r in rows if r["temp_min"] is None]
    assert len(old) == before and new, (len(old), len(new), before)
    assert all(r["temp_min"] <= r["temp_max"] for r in new)
    con = duck()
    view = DeltaLakeView(con, lake)
    assert view.source("well_1m") is not None  # pyarrow over the listed files agrees

    version = dt.version()
    checkpoint = (tmp_path / "state" / "well-telemetry" / "checkpoint.json").read_text()
    pipeline.write_text(added.replace("count(*)            AS readings",
                                      "CAST(count(*) AS DOUBLE) AS readings", 1))
    simulator_extension(agent_bin, tmp_path, shards=2, devices=20, after=240, readings=60,
                        seed=12)()
    proc = subprocess.run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                          env=pipeline_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, "a run whose SQL changed a column's type went on"
    assert "column `readings` is long in the table and double in the pipeline" in proc.stderr, (
        proc.stderr[-3000:])
    assert "CAST(" in proc.stderr and "new output name" in proc.stderr, proc.stderr[-3000:]
    assert DeltaTable(str(lake / "well_1m")).version() == version
    after = (tmp_path / "state" / "well-telemetry" / "checkpoint.json").read_text()
    assert after == checkpoint, "the refused run moved the checkpoints"


def test_sorted_compaction_lets_one_device_skip_files(tmp_path, agent_bin, shardlake_bin):
    """`compact --sort device_id,ts --target-size S`: each closed hour's rows sorted into files
    of about S, each a range of devices, so a reader (the deltalake package's pyarrow dataset,
    by the files' stats) reads few of them for one device; the rows are the same; a second run
    leaves the sorted partitions alone. `--sort` and `--zorder` together are refused."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    simulate(agent_bin, tmp_path, shards=2, devices=20, readings=3600, seed=21, spikes=2,
             malformed=0)
    lake = tmp_path / "lake"
    pipeline = write_test_pipeline(tmp_path / "delta.yaml", max_bytes="200KiB", max_age="1h",
                                   lake=f"{{local: {{path: {lake}}}, format: delta}}")
    pipeline.write_text(pipeline.read_text().replace(
        "raw: {name: readings, rollover: {max_bytes: 256MiB}}",
        "raw: {name: readings, rollover: {max_bytes: 200KiB}}"))
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    device = "well-0007"
    truth = con.execute(f"SELECT count(*) FROM src WHERE device_id = '{device}'").fetchall()[0][0]
    assert truth > 0

    def fragments() -> tuple[int, int, int]:
        ds = DeltaTable(str(lake / "readings")).to_pyarrow_dataset()
        one = pc.field("device_id") == device
        return (len(list(ds.get_fragments())), len(list(ds.get_fragments(filter=one))),
                ds.to_table(filter=one).num_rows)
    files, read, rows = fragments()
    assert files >= 4 and read == files and rows == truth, (files, read, rows)

    out = check_compact(shardlake_bin, pipeline, tmp_path, "--sort", "device_id,ts",
                        "--target-size", "128KiB")
    assert re.search(r"readings: [1-9]\d* partitions compacted, \d+ files into \d+ "
                     r"\(sorted by device_id, ts\)", out), out
    files, read, rows = fragments()
    assert rows == truth, (rows, truth)
    assert files >= 4 and read * 3 <= files, f"one device reads {read} of {files} files"
    view = DeltaLakeView(con, lake)
    check_whole_lake(con, view, stream)
    view.check_stats("readings", ("ts", "device_id"))
    again = check_compact(shardlake_bin, pipeline, tmp_path, "--sort", "device_id,ts",
                          "--target-size", "128KiB")
    assert "readings: 0 partitions compacted" in again, again

    both = subprocess.run([str(shardlake_bin), "compact", str(pipeline), "--sort", "device_id",
                           "--zorder", "device_id"], env=pipeline_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert both.returncode != 0 and "cannot be used with" in both.stderr, both.stderr
