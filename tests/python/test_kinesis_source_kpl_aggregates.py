"""KPL aggregated records on the Kinesis source (kinesalite): aggregates written by
aws_kinesis_agg come out as their user records, a run stopped part-way resumes inside an
aggregate (from the local checkpoint store or the DynamoDB lease table), and corrupt
aggregates go to dead_letter whole. Also with enhanced fan-out (kinesis-local): the same
aggregates pushed by SubscribeToShard, resumed inside one by `AT_SEQUENCE_NUMBER`.

Exercises src/source/kinesis/kpl.rs and src/source/kinesis/ (positions inside an aggregate in
src/checkpoint/ and src/checkpoint/dynamodb/).
"""

from __future__ import annotations

import json
import random
import re
import uuid

import pytest

from harness import (check_run, kinesis_pipeline, pipeline_env, run_log,
                     run_until_read_then_sigterm, simulate, write_test_pipeline)
from lake import check_whole_lake, duck
from servers import AWS_TEST_ENV, create_stream
from streamdata import interleave, stream_data


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


@pytest.mark.parametrize("store", ["local", "dynamodb", "local-fan-out"])
def test_kpl_aggregated_records_come_out_one_by_one(tmp_path, agent_bin, shardlake_bin, capsys,
                                                    request, store):
    """Aggregated records (magic, protobuf, MD5) are unpacked into their user records; a run
    stopped part-way resumes inside an aggregate by its sub-sequence number, kept in the local
    checkpoint store or in the lease table (`checkpointSubSequenceNumber` and our state);
    corrupt aggregates go to dead-letter whole."""
    server = request.getfixturevalue("kinesis_local" if store == "local-fan-out" else "kinesalite")
    kinesis = server.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=30, readings=200,
                       seed=53, spikes=3, malformed=8)
    # Each device's lines in a row, so that runs of one device make big aggregates.
    lines = sorted(interleave(tmp_path / "sim" / "stream"), key=_key)
    put, aggregates, corrupt = put_aggregated(kinesis, name, lines, random.Random(5))
    assert aggregates >= 100
    if store == "local-fan-out":
        pipeline = write_test_pipeline(
            tmp_path / "fan-out.yaml", max_bytes="1MiB", max_age="1s",
            source=f"{{kinesis: {{stream: {name}, fan_out: {{consumer: kpl, renew_after: 2s}}}}}}")
        env = pipeline_env(tmp_path, server.env())
    elif store == "local":
        pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s")
        env = pipeline_env(tmp_path, server.env())
    else:
        moto = request.getfixturevalue("moto")
        table = f"shardlake-leases-{uuid.uuid4().hex[:8]}"
        pipeline = kinesis_pipeline(tmp_path, name, max_bytes="1MiB", max_age="1s",
                                    checkpoints=f"{{dynamodb: {{table: {table}}}}}")
        env = pipeline_env(tmp_path, {**server.env(), **AWS_TEST_ENV,
                                      "AWS_ENDPOINT_URL_DYNAMODB": moto.url})
    # Stopped after about half: the windowed outputs' checkpoints stop at the first record of
    # their oldest open window, which is mostly inside an aggregate.
    run_until_read_then_sigterm(shardlake_bin, pipeline, env, len(put) // 2, at_least=True)
    if store != "dynamodb":
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
