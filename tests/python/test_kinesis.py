"""The Kinesis source against a real local server (kinesalite): records put with boto3, keyed
by device as the IoT rule does, read by `shardlake run`, checked from outside with DuckDB
against the records and the sequence numbers the server assigned.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
import uuid

import pytest

from crash import crash_runs
from faultproxy import FaultProxy
from harness import (check_run, kinesis_pipeline, pipeline_env, run_log,
                     run_until_read_then_sigterm, simulate)
from lake import (check_lake_against_put, check_readings_exactly_once, check_whole_lake, duck,
                  inprogress_files)
from servers import AWS_TEST_ENV, create_stream, put_lines, put_while_resharding
from streamdata import interleave, stream_data


def test_kinesis_source_exactly_once_and_resumes(tmp_path, kinesalite, agent_bin,
                                                 shardlake_bin):
    kinesis = kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 4)
    # The simulator writes a local stream; its lines are put on Kinesis in two halves, with
    # a run over each: the second run resumes after the first one's checkpoints.
    summary = simulate(agent_bin, tmp_path / "sim", shards=4, devices=120, readings=240,
                       seed=17, spikes=6, malformed=12)
    lines = interleave(tmp_path / "sim" / "stream")
    assert len(lines) == summary["readings"] + summary["malformed"]
    half = len(lines) // 2
    put = put_lines(kinesis, name, lines[:half])
    assert len({shard for _, shard, _ in put}) == 4, "the records did not spread over the shards"

    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="2s")
    env = pipeline_env(tmp_path, kinesalite.env())
    # The first run is stopped (SIGTERM) once it has read the first half: its windows stay
    # open, and the second run must rebuild them from the checkpoints.
    run_until_read_then_sigterm(shardlake_bin, pipeline, env, half)
    first = stream_data(put)
    con = duck()
    con.register("src", first.table())
    lake = tmp_path / "lake"
    check_readings_exactly_once(con, lake, len(first.valid))

    put += put_lines(kinesis, name, lines[half:])
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=300)
    check_lake_against_put(put, summary, lake)


def test_kinesis_sigkill_crash_exactly_once(tmp_path, kinesalite, agent_bin, shardlake_bin,
                                            capsys):
    kinesis = kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 4)
    summary = simulate(agent_bin, tmp_path / "sim", shards=4, devices=200, readings=500,
                       seed=43, spikes=8, malformed=16)
    started = time.monotonic()
    put = put_lines(kinesis, name, interleave(tmp_path / "sim" / "stream"))
    put_s = time.monotonic() - started
    data = stream_data(put)
    assert len(data.valid) == summary["readings"]

    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
    lake = tmp_path / "lake"
    con = duck()
    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, lake, valid=len(data.valid),
                         seed=20260107, min_kills=6, env=kinesalite.env(),
                         staged=lambda: f"{len(inprogress_files(lake))} files")
    started = time.monotonic()
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
              env=pipeline_env(tmp_path, kinesalite.env()), timeout=600)
    with capsys.disabled():
        print(f"\n[crash test, kinesalite] {len(put)} records put in {put_s:.1f}s; "
              f"{crashes.report()}\n  final run: finished in {time.monotonic() - started:.1f}s")
    assert crashes.mid_stream >= 1, "no crash left the lake part-way through the stream"
    assert inprogress_files(lake) == []
    con.register("src", data.table())
    check_whole_lake(con, lake, data)


def test_kinesis_throttling_and_5xx_lose_and_duplicate_nothing(tmp_path, kinesalite, agent_bin,
                                                               shardlake_bin, capsys):
    kinesis = kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 4)
    simulate(agent_bin, tmp_path / "sim", shards=4, devices=100, readings=300, seed=47,
             spikes=6, malformed=10)
    data = stream_data(put_lines(kinesis, name, interleave(tmp_path / "sim" / "stream")))
    # Small reads, so that many GetRecords calls go through the proxy.
    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="2s")
    pipeline.write_text(pipeline.read_text().replace(
        "kinesis: {stream: ", "kinesis: {max_records: 100, stream: "))
    # 20% throttled (ProvisionedThroughputExceeded or LimitExceeded), 5% server errors and 5%
    # connections reset (before the request reached kinesalite, or after it answered): each
    # fault comes back once to shardlake, whose own retry counts it (the SDK's retries are off
    # for Kinesis).
    kinds = (["kinesis_throttled"] * 6 + ["kinesis_limit"] * 2 + ["kinesis_internal"] * 2
             + ["reset_before", "reset_after"])
    with FaultProxy(kinesalite.host, kinesalite.port, rate=0.3, kinds=kinds, seed=3) as proxy:
        env = pipeline_env(tmp_path, {**kinesalite.env(), "AWS_ENDPOINT_URL": proxy.url})
        proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                         timeout=600)
        injected = dict(proxy.injected)
        with capsys.disabled():
            print(f"\n[Kinesis fault proxy] {proxy.summary()}")
    assert injected.get("kinesis_throttled", 0) >= 20 and all(
        injected.get(k, 0) >= 3 for k in ("kinesis_limit", "kinesis_internal", "reset_before",
                                          "reset_after")), f"too few faults to mean anything: {injected}"
    finished = [e for e in run_log(proc) if e.get("message") == "run finished"]
    assert len(finished) == 1, finished
    # A call cut short when the run stops (at most one per shard) is not counted.
    for kinds_, counter in ((("kinesis_throttled", "kinesis_limit"), "kinesis_throttled"),
                            (("kinesis_internal", "reset_before", "reset_after"),
                             "kinesis_errors_retried")):
        n = sum(injected.get(k, 0) for k in kinds_)
        assert n - 4 <= finished[0][counter] <= n, (kinds_, injected, finished[0])

    con = duck()
    con.register("src", data.table())
    check_whole_lake(con, tmp_path / "lake", data)


def test_an_expired_iterator_resumes_where_the_shard_stopped(tmp_path, shifted_kinesalite,
                                                             agent_bin, shardlake_bin, capsys):
    """A shard left idle past the 5-minute iterator expiry: kinesalite's clock is moved 310 s
    forward while the run waits for records, so the server itself refuses the iterator the
    run holds (ExpiredIteratorException); the run must take a new one from where the shard
    stopped and read what comes next exactly once."""
    kinesis = shifted_kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=40, readings=120,
                       seed=29, spikes=2, malformed=4)
    lines = interleave(tmp_path / "sim" / "stream")
    half = len(lines) // 2
    put = put_lines(kinesis, name, lines[:half])
    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
    env = pipeline_env(tmp_path, shifted_kinesalite.env())
    proc = subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logs: list[str] = []

    def read_until(records: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        read = 0
        for line in proc.stderr:
            logs.append(line)
            m = re.match(r"records (\d+)", line)
            if m:
                read = int(m.group(1))
                if read >= records:
                    return read
            assert time.monotonic() < deadline, f"only {read} of {records} records read"
        raise AssertionError(f"the run ended after {read} of {records} records:\n"
                             + "".join(logs[-20:]))

    try:
        assert read_until(half, 120) == half
        shifted_kinesalite.shift(310)
        put += put_lines(kinesis, name, lines[half:])
        assert read_until(len(lines), 120) == len(lines), "records read twice"
        proc.send_signal(signal.SIGTERM)
        logs.extend(proc.stderr.read().splitlines(keepends=True))
        assert proc.wait(timeout=60) == 0, "the run did not shut down cleanly on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = [json.loads(line) for line in logs if line.startswith("{")]
    entries = [{**e, **e.get("fields", {})} for e in entries]
    expired = {e.get("shard_id") for e in entries
               if e.get("message", "").startswith("shard iterator expired")}
    finished = [e for e in entries if e.get("message") == "run finished"]
    assert len(finished) == 1 and finished[0]["kinesis_expired_iterators"] >= 2, finished
    assert len(expired) == 2, f"both idle shards' iterators should have expired: {expired}"
    # Progress lines carry the shards' MillisBehindLatest once they are read.
    assert any(re.search(r" · behind \d+ ms$", line.rstrip()) for line in logs), logs[-5:]
    with capsys.disabled():
        print(f"\n[expired iterator] kinesalite's clock moved 310 s; "
              f"{finished[0]['kinesis_expired_iterators']} iterators re-acquired on "
              f"{sorted(expired)}; {len(lines)} records read once each")

    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=300)
    check_lake_against_put(put, summary, tmp_path / "lake")


def test_split_and_merge_while_producing_keep_each_device_in_order(tmp_path, kinesis_local,
                                                                  agent_bin, shardlake_bin,
                                                                  capsys):
    """kinesis-local (it reshards as AWS does): one shard is split and two others merged
    while a producer writes and a run reads. Every record must reach the lake once, and each
    device's records in the order they were put, across the parent and child shards."""
    kinesis = kinesis_local.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 3)
    summary = simulate(agent_bin, tmp_path / "sim", shards=3, devices=60, readings=50,
                       seed=37, spikes=2, malformed=6)
    lines = interleave(tmp_path / "sim" / "stream")
    pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
    env = pipeline_env(tmp_path, kinesis_local.env())
    run = subprocess.Popen([str(shardlake_bin), "run", str(pipeline)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        put, ids = put_while_resharding(kinesis, name, lines)
        run.send_signal(signal.SIGTERM)
        stderr = run.communicate(timeout=60)[1]
        assert run.returncode == 0, f"the run did not stop cleanly:\n{stderr[-3000:]}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    # A second run reads what the first did not reach (the children it had not listed yet).
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=300)
    lake = tmp_path / "lake"
    con = check_lake_against_put(put, summary, lake)

    # Each device's records in the order they reached the lake: by commit (the number in the
    # file name), then by hour partition and row within the file.
    files = str(lake / "readings" / "**" / "*.parquet")
    moved, out_of_order = con.execute(f"""
        WITH r AS (
            SELECT device_id, seq, _shard_id,
                   row_number() OVER (PARTITION BY device_id ORDER BY
                       CAST(regexp_extract(filename, 'part-([0-9]+)-', 1) AS BIGINT),
                       filename, file_row_number) AS arrival
            FROM read_parquet('{files}', filename = true, file_row_number = true))
        SELECT (SELECT count(*) FROM (SELECT device_id FROM r GROUP BY device_id
                                      HAVING count(DISTINCT _shard_id) > 1)),
               (SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY device_id
                                                                 ORDER BY arrival) AS prev
                                      FROM r) WHERE seq <= prev)
    """).fetchall()[0]
    assert moved >= 10, f"only {moved} devices moved to a child shard: the test proves little"
    assert out_of_order == 0, f"{out_of_order} records reached the lake before an earlier one of their device"
    with capsys.disabled():
        print(f"\n[reshard, kinesis-local] {len(put)} records; split {ids[0]}, merged {ids[1]} "
              f"and {ids[2]} while producing; {moved} devices read across parent and child "
              "shards, all in order")


def put_aggregated(kinesis, stream: str, lines: list[bytes], rng: random.Random):
    """Puts the lines as a KPL producer would, with the KPL aggregation format written by
    `aws_kinesis_agg` (awslabs' Python port of the KPL's aggregator): runs of one device's
    lines become one aggregated record (1 to 40 user records; a run of one is put plain),
    and two aggregates are corrupted on the way (a flipped digest byte, a cut-off body).
    Returns `(bytes, shard, sequence number)` per record as the lake must show it: a user
    record of an aggregate is `<sequence number>:<index>`; a corrupt aggregate is one record."""
    from aws_kinesis_agg.aggregator import AggRecord

    entries = []  # (data, partition key, user lines or None when put as is)
    i = 0
    while i < len(lines):
        key = _key(lines[i])
        run = [lines[i]]
        limit = rng.randint(1, 40)
        while len(run) < limit and i + len(run) < len(lines) and _key(lines[i + len(run)]) == key:
            run.append(lines[i + len(run)])
        i += len(run)
        if len(run) == 1:
            entries.append((run[0], key, None))
            continue
        agg = AggRecord()
        for line in run:
            agg.add_user_record(key, line)
        entries.append((agg.get_contents()[2], key, run))
    aggregates = [n for n, e in enumerate(entries) if e[2] is not None]
    flipped, cut = aggregates[len(aggregates) // 3], aggregates[2 * len(aggregates) // 3]
    damaged = []  # the user lines lost in the corrupt aggregates
    for n, damage in ((flipped, lambda d: d[:-1] + bytes([d[-1] ^ 0xFF])),
                      (cut, lambda d: d[:-20])):
        data, key, users = entries[n]
        damaged += users
        entries[n] = (damage(data), key, None)
    put = []
    for j in range(0, len(entries), 200):
        batch = entries[j:j + 200]
        resp = kinesis.put_records(StreamName=stream, Records=[
            {"Data": data, "PartitionKey": key} for data, key, _ in batch])
        assert resp["FailedRecordCount"] == 0, resp
        for (data, _, users), r in zip(batch, resp["Records"]):
            if users is None:
                put.append((data, r["ShardId"], r["SequenceNumber"]))
            else:
                put += [(u, r["ShardId"], f"{r['SequenceNumber']}:{k}") for k, u in enumerate(users)]
    return put, len(aggregates) - 2, damaged


def _key(line: bytes) -> str:
    try:
        key = json.loads(line).get("device_id")
    except (ValueError, AttributeError):
        key = None
    return key if isinstance(key, str) and key else "unparseable"


@pytest.mark.parametrize("store", ["local", "dynamodb"])
def test_kpl_aggregated_records_come_out_one_by_one(tmp_path, kinesalite, agent_bin,
                                                    shardlake_bin, capsys, request, store):
    """Aggregated records (magic, protobuf, MD5) are unpacked into their user records; a run
    stopped part-way resumes inside an aggregate by its sub-sequence number, kept in the local
    checkpoint store or in the lease table (`checkpointSubSequenceNumber` and our state);
    corrupt aggregates go to dead-letter whole."""
    kinesis = kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=30, readings=200,
                       seed=53, spikes=3, malformed=8)
    # Each device's lines in a row, so that runs of one device make big aggregates.
    lines = sorted(interleave(tmp_path / "sim" / "stream"), key=_key)
    put, aggregates, corrupt = put_aggregated(kinesis, name, lines, random.Random(5))
    assert aggregates >= 100
    if store == "local":
        pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
        env = pipeline_env(tmp_path, kinesalite.env())
    else:
        moto = request.getfixturevalue("moto")
        table = f"shardlake-leases-{uuid.uuid4().hex[:8]}"
        pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s",
                                    checkpoints=f"{{dynamodb: {{table: {table}}}}}")
        env = pipeline_env(tmp_path, {**kinesalite.env(), **AWS_TEST_ENV,
                                      "AWS_ENDPOINT_URL_DYNAMODB": moto.url})
    # Stopped after about half: the windowed outputs' checkpoints stop at the first record of
    # their oldest open window, which is mostly inside an aggregate.
    run_until_read_then_sigterm(shardlake_bin, pipeline, env, len(put) // 2, at_least=True)
    if store == "local":
        state = "".join(p.read_text() for p in (tmp_path / "state").rglob("*") if p.is_file())
        sub_sequences = "n/a"
    else:
        items = moto.client("dynamodb").scan(TableName=table, ConsistentRead=True)["Items"]
        state = json.dumps(items)
        # The KCL's own attribute: the records output's position inside an aggregate.
        sub_sequences = sorted(int(i["checkpointSubSequenceNumber"]["N"]) for i in items)
        assert any(sub_sequences), f"no KCL checkpoint inside an aggregate: {items}"
    inside = re.findall(r'\\?"\d+:\d+\\?"', state)
    assert inside, "no checkpoint stopped inside an aggregate: the resume path is not tested"
    proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                     timeout=300)
    unpacked = [e for e in run_log(proc) if e.get("message") == "run finished"][0]["kpl_aggregates"]
    assert unpacked >= 1

    data = stream_data(put)
    lost = stream_data((line, "", "") for line in corrupt)
    assert len(data.valid) == summary["readings"] - len(lost.valid)
    assert len(data.invalid) == summary["malformed"] - len(lost.invalid) + 2
    con = duck()
    con.register("src", data.table())
    lake = tmp_path / "lake"
    check_whole_lake(con, lake, data)
    reasons = con.execute(f"""
        SELECT reason FROM read_parquet('{lake}/dead_letter/**/*.parquet')
        WHERE starts_with(reason, 'corrupt_aggregate')""").fetchall()
    assert len(reasons) == 2, reasons
    with capsys.disabled():
        print(f"\n[KPL] {len(lines)} user records put as {aggregates} aggregates (+2 corrupt) "
              f"and single records; {store} store: checkpoints inside aggregates after the "
              f"first run: {len(inside)} (checkpointSubSequenceNumber: {sub_sequences}); "
              f"reasons: {sorted(r[0][:60] for r in reasons)}")
