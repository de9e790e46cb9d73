"""The Kinesis source against a real local server (kinesalite): records put with boto3, keyed
by device as the IoT rule does, read by `shardlake run`, checked from outside with DuckDB
against the records and the sequence numbers the server assigned.
"""

from __future__ import annotations

import json
import time
import uuid

from conftest import (
    run_until_read_then_sigterm,
    check_readings_exactly_once,
    check_run,
    check_whole_lake,
    crash_runs,
    create_stream,
    duck,
    inprogress_files,
    interleave,
    pipeline_env,
    put_lines,
    simulate,
    stream_data,
    write_test_pipeline,
)
from faultproxy import FaultProxy


def kinesis_pipeline(tmp_path, stream: str, **kw):
    return write_test_pipeline(tmp_path / "kinesis.yaml", source=f"{{kinesis: {{stream: {stream}}}}}",
                               **kw)


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
    data = stream_data(put)
    assert (len(data.valid), len(data.invalid)) == (summary["readings"], summary["malformed"])
    con = duck()
    con.register("src", data.table())
    check_whole_lake(con, lake, data)


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


def run_log(proc) -> list[dict]:
    """The JSON log lines of a finished run, each with its fields at the top level."""
    out = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            out.append({**entry, **entry.get("fields", {})})
    return out


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
    # 20% throttled, 5% server errors: each fault comes back once to shardlake, whose own
    # retry counts it (the SDK's retries are off for Kinesis).
    kinds = ["kinesis_throttled"] * 4 + ["kinesis_internal"]
    with FaultProxy(kinesalite.host, kinesalite.port, rate=0.25, kinds=kinds, seed=3) as proxy:
        env = pipeline_env(tmp_path, {**kinesalite.env(), "AWS_ENDPOINT_URL": proxy.url})
        proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                         timeout=600)
        injected = dict(proxy.injected)
        with capsys.disabled():
            print(f"\n[Kinesis fault proxy] {proxy.summary()}")
    assert injected.get("kinesis_throttled", 0) >= 20 and injected.get("kinesis_internal", 0) >= 3, (
        f"too few faults to mean anything: {injected}")
    finished = [e for e in run_log(proc) if e.get("message") == "run finished"]
    assert len(finished) == 1, finished
    # A call cut short when the run stops (at most one per shard) is not counted.
    for kind, counter in (("kinesis_throttled", "kinesis_throttled"),
                          ("kinesis_internal", "kinesis_errors_retried")):
        assert injected[kind] - 4 <= finished[0][counter] <= injected[kind], (
            kind, injected, finished[0])

    con = duck()
    con.register("src", data.table())
    check_whole_lake(con, tmp_path / "lake", data)
