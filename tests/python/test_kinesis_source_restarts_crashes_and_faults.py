"""The Kinesis source against a real local server (kinesalite): records put with boto3, keyed
by device as the IoT rule does, read by `shardlake run`, checked from outside with DuckDB
against the records and the sequence numbers the server assigned. A run stopped with SIGTERM
resumes after its checkpoints; runs SIGKILLed or aborted at failpoints lose and duplicate
nothing; throttling, 5xx and reset connections are retried and counted; an iterator that
expired is taken again where its shard stopped.

Exercises src/source/kinesis/, with src/pipeline/ and src/checkpoint/ for the restarts
and crashes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import uuid

from crash import crash_runs
from faultproxy import FaultProxy
from harness import (check_run, kinesis_pipeline, pipeline_env, run_log,
                     run_until_read_then_sigterm, simulate)
from lake import (check_lake_against_put, check_readings_exactly_once, check_whole_lake, duck,
                  inprogress_files)
from servers import create_stream, put_lines
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
