"""shardlake-agent with its local transport, against the fake sysfs in testdata/: every sensor
kind is sampled on its own interval, failing sensors are reported once and never stop the
others, the durable queue survives a SIGKILL (nothing lost, order kept, duplicates only from
the batch in flight), 200 sensors keep their rates in bounded memory, and the readings go
through the pipeline into the lake.

Exercises src/agent/ (sensor.rs, run.rs, queue.rs, config.rs and the local transport), and
pipelines/sensor-fleet.yaml through src/pipeline/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from collections import Counter
from pathlib import Path

from agents import BATCH, start, stop_agent
from harness import REPO, check_run, pipeline_env, wait_until
from lake import duck, lake_count

SYSFS = REPO / "testdata" / "sysfs"

# name -> (kind and options, expected (field, value, unit) or None for a failing sensor)
FIXED = {
    "boiler": ("ds18b20: {device: 28-0316a2793fff}", ("temp_c", 23.125, "degC")),
    "freezer": ("ds18b20: {device: 28-0516b0c4e2ff}", ("temp_c", -10.125, "degC")),
    "noisy-line": ("ds18b20: {device: 28-03172179a1ff}", None),
    "unplugged": ("ds18b20: {device: 28-00000badbeef}", None),
    "room": ("iio: {device: bme280, channel: humidityrelative}",
             ("humidityrelative_pct", 45.123, "%RH")),
    "adc": ("iio: {device: ads1115, channel: voltage0}", ("voltage0_v", 1.65, "V")),
    "fan": ("hwmon: {chip: pwmfan, input: fan1_input}", ("fan1", 3120.0, "rpm")),
    "cpu": ("thermal: {zone: cpu-thermal}", ("temp_c", 48.312, "degC")),
    "gpu": ("thermal: {zone: gpu-thermal}", None),
    "echo": ("command: {run: [echo, 'temp=45.1C'], word: 0}", ("value", 45.1, "")),
}
WELLS = 20


def agent_yaml(tmp: Path, stream: Path) -> Path:
    lines = [
        "device_id: pi-test-01",
        "tenant: acme",
        f"sysfs_root: {SYSFS}",
        f"queue: {{path: {tmp / 'queue'}, max_bytes: 8MiB, fsync: 200ms}}",
        # A long max_age leaves readings queued at most moments, so the SIGKILL finds some.
        f"batch: {{max_readings: {BATCH}, max_age: 300ms}}",
        f"transport: {{local: {{stream: {stream}, shards: 2}}}}",
        "sensors:",
    ]
    for name, (kind, _) in FIXED.items():
        lines.append(f"  - {{name: {name}, interval: 50ms, {kind}}}")
    for i in range(WELLS):
        lines.append(f"  - {{name: well-{i:02}, interval: 20ms, well_sim: {{seed: {i}}}}}")
    path = tmp / "agent.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_readings(stream: Path) -> list[dict]:
    """Every reading, per shard file in order; the device has one partition key, so one
    shard holds all of them in the order they were written."""
    out = []
    for f in sorted(stream.glob("shardId-*.ndjson")):
        out.extend(json.loads(line) for line in f.read_bytes().splitlines() if line)
    return out


def test_agent_samples_every_sensor_and_loses_nothing_across_sigkill(agent_bin, tmp_path):
    stream = tmp_path / "stream"
    config = agent_yaml(tmp_path, stream)
    check_run([str(agent_bin), "validate", "--config", str(config)])
    log = tmp_path / "agent.log"

    first = start(agent_bin, config, log)
    wait_until("3000 readings on the stream", lambda: len(stream_readings(stream)) >= 3000,
               timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = len(stream_readings(stream))
    sent_before = max(r["seq"] for r in stream_readings(stream))
    status = json.loads(check_run([str(agent_bin), "status", "--config", str(config)]).stdout)
    print(f"\n[agent] killed with {status['pending']} readings queued, {killed_at} sent")

    second = start(agent_bin, config, log)
    wait_until("3000 more readings", lambda: len(stream_readings(stream)) >= killed_at + 3000,
               timeout=60)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, log.read_text()[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])

    readings = stream_readings(stream)
    assert {r["device_id"] for r in readings} == {"pi-test-01"}
    # The second run sent everything it queued, and what the first left queued.
    assert summary["pending_bytes"] == 0, summary
    assert summary["readings_sent"] >= summary["readings_queued"], summary
    assert summary["readings_dropped"] == 0, summary

    # Duplicates come only from the batch in flight when the first run was killed.
    counts = Counter(r["seq"] for r in readings)
    dups = sum(c - 1 for c in counts.values())
    print(f"\n[agent] {len(readings)} readings, {dups} re-sent after SIGKILL "
          f"(at most one batch of {BATCH}), {len(counts)} distinct seqs")
    assert dups <= BATCH, dups
    assert all(c <= 2 for c in counts.values())
    # In order: first occurrences strictly increase in stream order.
    seen, order = set(), []
    for r in readings:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            order.append(r["seq"])
    assert order == sorted(order)
    # Nothing lost: 1 up to the last reading the killed run queued, unbroken (what it had
    # queued unsent was sent by the second run), then the second run's own from the seq block
    # the first had reserved (a seq is never handed out twice).
    last_first_run = status["last_seq"] or sent_before
    if status["pending"]:
        assert status["first_seq"] <= sent_before + 1, (status, sent_before)
    assert order[:last_first_run] == list(range(1, last_first_run + 1))
    second_run = order[last_first_run:]
    assert second_run[0] >= status["reserved_seq"], (second_run[0], status)
    assert second_run == list(range(second_run[0], second_run[0] + len(second_run)))

    # Each sensor's values and units; failing sensors produced nothing and were reported once
    # per run, not once per sample.
    by_sensor: dict[str, list[dict]] = {}
    for r in readings:
        by_sensor.setdefault(r["sensor"], []).append(r)
    for name, (_, expected) in FIXED.items():
        if expected is None:
            assert name not in by_sensor, name
            assert summary["sensor_failures"].get(name, 0) > 10, summary
            continue
        got = {(r["field"], round(r["value"], 6), r["unit"]) for r in by_sensor[name]}
        assert got == {(expected[0], round(expected[1], 6), expected[2])}, (name, got)
    for i in range(WELLS):
        fields = Counter(r["field"] for r in by_sensor[f"well-{i:02}"])
        assert set(fields) == {"barrels_per_s", "pressure_psi", "temp_c"}
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    failed = Counter(e.get("sensor") for e in events if "sensor failed" in e.get("message", ""))
    assert failed == Counter({n: 2 for n, (_, e) in FIXED.items() if e is None}), failed
    crc = [e for e in events if e.get("sensor") == "noisy-line" and "CRC" in e.get("error", "")]
    assert crc, "the DS18B20 CRC failure is named in the log"


def test_agent_readings_reach_the_lake_through_the_pipeline(agent_bin, shardlake_bin, tmp_path):
    data = tmp_path / "data"
    config = agent_yaml(tmp_path, data / "stream")
    log = tmp_path / "agent.log"
    proc = start(agent_bin, config, log)
    wait_until("2000 readings", lambda: (data / "stream").exists()
               and len(stream_readings(data / "stream")) >= 2000, timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    sent = json.loads(out.strip().splitlines()[-1])["readings_sent"]
    assert sent == len(stream_readings(data / "stream"))

    pipeline = REPO / "pipelines" / "sensor-fleet.yaml"
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=pipeline_env(data),
              timeout=300)
    con = duck()
    assert lake_count(con, data / "lake", "sensor_readings") == sent
    q = check_run([str(shardlake_bin), "query", str(pipeline),
                   "SELECT sensor, count(*) AS n, min(value) AS lo FROM sensor_readings "
                   "WHERE sensor = 'freezer' GROUP BY sensor"], env=pipeline_env(data))
    assert "freezer" in q.stdout and "-10.125" in q.stdout, q.stdout
    assert os.path.isdir(data / "lake")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_two_hundred_sensors_keep_their_rates_in_bounded_memory(agent_bin, tmp_path):
    """200 simulated sensors at 5 samples/s each on one agent (local transport): every sensor
    keeps its rate, judged by the readings' own timestamps, and the agent's RSS stops growing
    once running (no per-reading buffering beyond the queue on disk)."""
    stream = tmp_path / "stream"
    lines = [
        "device_id: pi-busy",
        "tenant: acme",
        f"queue: {{path: {tmp_path / 'queue'}, max_bytes: 64MiB, fsync: 1s}}",
        "batch: {max_readings: 500, max_age: 200ms}",
        f"transport: {{local: {{stream: {stream}, shards: 1}}}}",
        "sensors:",
    ] + [f"  - {{name: s{i:03}, interval: 200ms, well_sim: {{seed: {i}}}}}" for i in range(200)]
    config = tmp_path / "agent.yaml"
    config.write_text("\n".join(lines) + "\n")
    log = tmp_path / "agent.log"
    proc = start(agent_bin, config, log)
    samples = []
    try:
        # 3 readings per sample: 200 × 5 × 3 = 3000 readings/s; run for ~12 s of readings.
        def enough():
            samples.append(rss_kib(proc.pid))
            return len(stream_readings(stream)) >= 36_000
        wait_until("12 s of readings", enough, timeout=120, every=0.5)
    finally:
        summary = stop_agent(proc, log)
    readings = stream_readings(stream)
    assert summary["readings_dropped"] == 0 and summary["pending_bytes"] == 0, summary
    ts = {}
    for r in readings:
        if r["field"] == "pressure_psi":
            ts.setdefault(r["sensor"], []).append(r["ts"])
    assert len(ts) == 200
    # Per sensor: samples over its own span, at 200 ms.
    rates = []
    for name, stamps in ts.items():
        t = sorted(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
                   for s in stamps)
        span = t[-1] - t[0]
        assert span > 5, (name, span)
        rates.append((len(t) - 1) / span)
    third = samples[len(samples) // 3:]
    print(f"\n[200 sensors] {len(readings)} readings; per-sensor rate min {min(rates):.2f}/s, "
          f"max {max(rates):.2f}/s (configured 5/s); RSS {min(third) // 1024}–"
          f"{max(samples) // 1024} MiB over the run")
    assert min(rates) >= 4.5 and max(rates) <= 5.1, (min(rates), max(rates))
    # Bounded: after the first third, RSS stays within 8 MiB of where it was, and under 64 MiB
    # (the systemd unit's MemoryMax).
    assert max(third) - third[0] <= 8 * 1024, samples
    assert max(samples) < 64 * 1024, samples
