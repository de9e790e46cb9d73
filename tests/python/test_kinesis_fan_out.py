"""Enhanced fan-out on kinesis-local (it serves SubscribeToShard): the pipeline registers its
stream consumer, subscribes to each shard it holds and renews the subscriptions (every 2 s
here, 5 minutes on AWS) without a gap or a double; a restart and a SIGKILL resume from the
checkpoints; a polling pipeline and a fan-out pipeline read one stream side by side, each
every record once. The split-and-merge test (test_kinesis_source_resharding_keeps_device_order.py)
and the KPL test (test_kinesis_source_kpl_aggregates.py) run with fan-out too.

Exercises src/source/kinesis/fanout.rs (and reader.rs's unpacking, shared with polling).
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

from harness import (check_run, pipeline_env, run_log, run_until_read_then_sigterm, simulate,
                     wait_until, write_test_pipeline)
from lake import check_lake_against_put
from servers import create_stream, put_lines, put_while_resharding
from streamdata import interleave


def fan_out_pipeline(tmp_path, stream: str, consumer: str = "wells", renew: str = "2s",
                     name: str = "fan-out.yaml"):
    return write_test_pipeline(
        tmp_path / name, max_bytes="1MiB", max_age="1s",
        source=f"{{kinesis: {{stream: {stream}, fan_out: {{consumer: {consumer}, "
               f"renew_after: {renew}}}}}}}")


def finished(proc_or_log) -> dict:
    return next(e for e in run_log(proc_or_log) if e.get("message") == "run finished")


def test_fan_out_reads_every_record_once_across_renewals(tmp_path, kinesis_local, agent_bin,
                                                        shardlake_bin):
    kinesis = kinesis_local.client()
    name = f"fan-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=20, readings=60,
                       seed=5, spikes=2, malformed=3)
    lines = interleave(tmp_path / "sim" / "stream")
    pipeline = fan_out_pipeline(tmp_path, name)
    env = pipeline_env(tmp_path, kinesis_local.env())
    run = subprocess.Popen([str(shardlake_bin), "run", str(pipeline)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Put over several renewals: records arrive while subscriptions end and start.
        put = []
        started = time.monotonic()
        step = max(1, len(lines) // 8)
        for i in range(0, len(lines), step):
            put += put_lines(kinesis, name, lines[i:i + step])
            wait_until("a second to pass", lambda: time.monotonic() - started > (i // step + 1),
                       timeout=30)
        wait_until("the run to read every record", lambda: sum(
            1 for _ in (tmp_path / "lake" / "readings").rglob("*.parquet")) > 0, timeout=60)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    first = finished(subprocess.CompletedProcess([], 0, out, err))
    assert first["fanout_subscriptions"] >= 2, first
    assert first["fanout_renewals"] >= 2, f"no renewal happened: {first}"
    # What the first run had not committed, a second reads (from the checkpoints).
    second = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                       timeout=300)
    assert finished(second)["fanout_subscriptions"] >= 1
    check_lake_against_put(put, summary, tmp_path / "lake")
    consumers = kinesis.list_stream_consumers(
        StreamARN=kinesis.describe_stream_summary(StreamName=name)[
            "StreamDescriptionSummary"]["StreamARN"])["Consumers"]
    assert [c["ConsumerName"] for c in consumers] == ["wells"], "registered once, reused"


def test_a_restart_subscribes_after_its_checkpoints_and_a_sigkill_loses_nothing(
        tmp_path, kinesis_local, agent_bin, shardlake_bin):
    """Half the records are read and committed by a run stopped with SIGTERM; the other half
    is put while no pipeline runs; a run SIGKILLed after its first commit and one more run
    subscribe from the checkpoints (AFTER_SEQUENCE_NUMBER): every record reaches the lake
    once, none is skipped."""
    kinesis = kinesis_local.client()
    name = f"restart-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=30, readings=100,
                       seed=8, spikes=2, malformed=4)
    lines = interleave(tmp_path / "sim" / "stream")
    half = len(lines) // 2
    put = put_lines(kinesis, name, lines[:half])
    pipeline = fan_out_pipeline(tmp_path, name, consumer="restart", renew="300ms")
    env = pipeline_env(tmp_path, kinesis_local.env())
    # SIGTERM, not --drain: the open windows stay open for the second half's readings.
    run_until_read_then_sigterm(shardlake_bin, pipeline, env, half)
    put += put_lines(kinesis, name, lines[half:])
    run = subprocess.Popen([str(shardlake_bin), "run", str(pipeline)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        committed = lambda: len(list((tmp_path / "lake" / "readings").rglob("*.parquet")))  # noqa: E731
        before = committed()
        wait_until("a commit of the second run", lambda: committed() > before, timeout=60)
    finally:
        run.kill()
        run.wait()
    drained = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                        env={**env, "RUST_LOG": "info,shardlake::source::kinesis::fanout=debug"},
                        timeout=300)
    (tmp_path / "drain.log").write_text(drained.stderr)
    assert "AfterSequenceNumber" in drained.stderr, "the last run subscribed from checkpoints"
    check_lake_against_put(put, summary, tmp_path / "lake")


def test_a_polling_and_a_fan_out_pipeline_read_one_stream_side_by_side(
        tmp_path, kinesis_local, agent_bin, shardlake_bin):
    """Two pipelines with lakes and checkpoints of their own on one stream, at once: one polls
    GetRecords, one subscribes through its consumer. Each gets every record once; neither is
    throttled by the other."""
    kinesis = kinesis_local.client()
    name = f"side-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=20, readings=80,
                       seed=11, spikes=2, malformed=3)
    put = put_lines(kinesis, name, interleave(tmp_path / "sim" / "stream"))
    polling = write_test_pipeline(
        tmp_path / "polling.yaml", max_bytes="1MiB", max_age="1s",
        source=f"{{kinesis: {{stream: {name}, poll_interval: 200ms}}}}")
    pushed = fan_out_pipeline(tmp_path, name, consumer="side")
    runs = []
    for pipeline, data in ((polling, tmp_path / "a"), (pushed, tmp_path / "b")):
        runs.append(subprocess.Popen(
            [str(shardlake_bin), "run", str(pipeline), "--drain"],
            env=pipeline_env(data, kinesis_local.env()), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outs = [r.communicate(timeout=300) for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, err[-3000:]
    stats = [finished(subprocess.CompletedProcess([], 0, out, err)) for out, err in outs]
    assert stats[0]["fanout_subscriptions"] == 0 and stats[1]["fanout_subscriptions"] >= 2
    for s in stats:
        assert s["kinesis_throttled"] == 0, s
    for data in (tmp_path / "a", tmp_path / "b"):
        check_lake_against_put(put, summary, data / "lake")

