"""shardlake-agent's network transports. MQTT: Mosquitto with client certificates, as IoT Core
authenticates devices: the device certificate delivers and others are refused; a broker
outage and a SIGKILL lose nothing; and the whole path on one machine, agent → Mosquitto →
`shardlake bridge` → kinesalite → pipeline. Kinesis: PutRecords straight from the agent, in
order through partial failures, throttling and reset connections.

Exercises src/agent/transport/mqtt.rs, src/agent/transport/kinesis.rs, src/agent/queue.rs and src/tools/bridge.rs (and
src/source/kinesis/ with split_lines at the end of the path).
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest

from agents import BATCH, start, stop_agent
from faultproxy import FaultProxy
from harness import REPO, check_run, free_port, pipeline_env, wait_until
from lake import duck, lake_count
from mosquitto import Mosquitto, Subscriber, start_bridge, make_pki
from servers import create_stream, kinesis_records


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path, pki):
    (tmp_path / "mosquitto").mkdir()
    b = Mosquitto(tmp_path / "mosquitto", pki, free_port())
    b.start()
    yield b
    b.stop()


def mqtt_yaml(tmp: Path, broker: Mosquitto, device: str, *, cert: str = "device",
              ca: str = "ca", wells: int = 10) -> Path:
    pki = broker.pki
    lines = [
        f"device_id: {device}",
        "tenant: acme",
        f"queue: {{path: {tmp / (device + '-queue')}, max_bytes: 16MiB, fsync: 200ms}}",
        f"batch: {{max_readings: {BATCH}, max_age: 100ms}}",
        "transport:",
        "  mqtt:",
        "    host: localhost",
        f"    port: {broker.port}",
        f"    ca: {pki / (ca + '.pem')}",
        f"    cert: {pki / (cert + '.pem')}",
        f"    key: {pki / (cert + '.key')}",
        "    ack_timeout: 5s",
        "sensors:",
    ]
    for i in range(wells):
        lines.append(f"  - {{name: well-{i:02}, interval: 20ms, well_sim: {{seed: {i}}}}}")
    path = tmp / f"{device}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def readings_of(lines: list[bytes], device: str) -> list[dict]:
    out = []
    for line in lines:
        r = json.loads(line)
        if r["device_id"] == device:
            out.append(r)
    return out


def test_mqtt_the_device_certificate_delivers_and_others_are_refused(agent_bin, tmp_path, broker):
    sub = Subscriber(broker, "sensors/#", tmp_path / "sub.out")
    try:
        good = mqtt_yaml(tmp_path, broker, "pi-good")
        log = tmp_path / "good.log"
        proc = start(agent_bin, good, log)
        wait_until("1000 readings at the subscriber",
                   lambda: len(readings_of(sub.lines(), "pi-good")) >= 1000, timeout=60)
        summary = stop_agent(proc, log)
        assert summary["pending_bytes"] == 0 and summary["readings_sent"] > 0, summary
        wait_until("every reading sent at the subscriber",
                   lambda: len({r["seq"] for r in readings_of(sub.lines(), "pi-good")})
                   >= summary["readings_sent"], timeout=30)
        seqs = {r["seq"] for r in readings_of(sub.lines(), "pi-good")}
        assert seqs == set(range(1, summary["readings_sent"] + 1))

        # A certificate from another CA, and a CA that did not sign the broker's certificate.
        for name, cert, ca, hint in [
            ("pi-rogue", "rogue-device", "ca", "refused the device certificate"),
            ("pi-wrong-ca", "device", "other-ca", "not signed by transport.mqtt.ca"),
        ]:
            cfg = mqtt_yaml(tmp_path, broker, name, cert=cert, ca=ca, wells=2)
            log = tmp_path / f"{name}.log"
            proc = start(agent_bin, cfg, log)
            wait_until(f"{name}: the refusal in the log",
                       lambda: "MQTT connection to localhost" in log.read_text(), timeout=30)
            summary = stop_agent(proc, log)
            assert summary["readings_sent"] == 0, summary
            assert summary["pending_bytes"] > 0, "the readings stay queued"
            failure = next(json.loads(line) for line in log.read_text().splitlines()
                           if "MQTT connection to localhost" in line)
            print(f"\n[mqtt] {name}: {failure['error']}")
            assert hint in failure["error"], failure
            assert not readings_of(sub.lines(), name)
    finally:
        sub.stop()

    # A certificate file that is not there: a configuration error naming the field.
    cfg = mqtt_yaml(tmp_path, broker, "pi-nocert", cert="missing")
    proc = subprocess.run([str(agent_bin), "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "transport.mqtt.cert: cannot read" in proc.stderr, proc.stderr

    # No certificate at all: the agent will not try without one (IoT Core requires it) ...
    cfg = mqtt_yaml(tmp_path, broker, "pi-nocert-field")
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(keepends=True)
                           if not line.strip().startswith("cert:")))
    proc = subprocess.run([str(agent_bin), "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "transport.mqtt: missing field `cert`" in proc.stderr, proc.stderr
    # ... and the broker refuses a client that offers none, so the refusals above are its own.
    pub = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(broker.port), "--cafile",
         str(broker.pki / "ca.pem"), "-t", "sensors/acme/pi-anon/telemetry", "-q", "1",
         "-m", "{}"], capture_output=True, text=True, timeout=30)
    assert pub.returncode != 0, (pub.stdout, pub.stderr)


def test_mqtt_broker_outage_and_sigkill_lose_nothing(agent_bin, tmp_path, broker):
    sub = Subscriber(broker, "sensors/+/+/telemetry", tmp_path / "sub.out")
    device = "pi-outage"
    cfg = mqtt_yaml(tmp_path, broker, device)
    log = tmp_path / "agent.log"
    status = lambda: json.loads(check_run(  # noqa: E731
        [str(agent_bin), "status", "--config", str(cfg)]).stdout)
    got = lambda: readings_of(sub.lines(), device)  # noqa: E731
    try:
        first = start(agent_bin, cfg, log)
        wait_until("1000 readings", lambda: len(got()) >= 1000, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed = status()

        second = start(agent_bin, cfg, log)
        wait_until("1000 more", lambda: len(got()) >= 1000 + (killed["last_seq"] or 0),
                   timeout=60)
        broker.stop()
        wait_until("readings queued during the outage", lambda: status()["pending"] >= 1000,
                   timeout=60)
        broker.start()
        wait_until("the outage's readings delivered", lambda: status()["pending"] < 500,
                   timeout=90)
        summary = stop_agent(second, log)
        assert summary["pending_bytes"] == 0, summary
        assert summary["send_failures"] > 0, "the outage was noticed"
        last = summary["next_seq"] - 1
        wait_until("every reading at the subscriber",
                   lambda: max((r["seq"] for r in got()), default=0) >= last, timeout=60)
    finally:
        sub.stop()

    readings = got()
    counts = Counter(r["seq"] for r in readings)
    dups = sum(c - 1 for c in counts.values())
    allowed = summary["readings_resent"] + BATCH
    print(f"\n[mqtt outage] {len(counts)} readings, {dups} duplicates (QoS 1; allowed "
          f"{summary['readings_resent']} re-sent after failures + {BATCH} in flight at the "
          f"SIGKILL); killed with {killed['pending']} queued")
    assert dups <= allowed, (dups, allowed)
    seen, order = set(), []
    for r in readings:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            order.append(r["seq"])
    assert order == sorted(order), "readings arrived out of order"
    last_first = killed["last_seq"] or max(s for s in order if s < killed["reserved_seq"])
    assert order[:last_first] == list(range(1, last_first + 1)), "the first run lost readings"
    rest = order[last_first:]
    assert rest[0] >= killed["reserved_seq"]
    assert rest == list(range(rest[0], last + 1)), "the second run lost readings"


def test_end_to_end_agent_mosquitto_bridge_kinesalite_pipeline(
        agent_bin, shardlake_bin, tmp_path, broker, kinesalite):
    """The whole path on one machine: two agents publish over TLS to Mosquitto, the bridge
    puts each message on kinesalite keyed as the IoT rule in deploy/ does, and the sensor
    pipeline (split_lines) writes every reading once to the lake."""
    template = (REPO / "deploy" / "shardlake.yaml").read_text()
    assert 'PartitionKey: "${topic(2)}/${topic(3)}"' in template, "the bridge's default key is the rule's"
    kinesis = kinesalite.client()
    stream = f"sensors-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 2)
    env = pipeline_env(tmp_path, kinesalite.env())
    bridge_log = tmp_path / "bridge.log"
    bridge = start_bridge(shardlake_bin, broker, stream, env, bridge_log)

    devices = ["pi-e2e-1", "pi-e2e-2"]
    agents = {d: (start(agent_bin, mqtt_yaml(tmp_path, broker, d, wells=5), tmp_path / f"{d}.log"),
                  tmp_path / f"{d}.log") for d in devices}
    lines = lambda: [line for r in kinesis_records(kinesis, stream)  # noqa: E731
                     for line in r["Data"].splitlines() if line.strip()]
    wait_until("readings of both devices on the stream",
               lambda: all(sum(1 for line in lines() if d.encode() in line) >= 500
                           for d in devices), timeout=60)
    sent = {d: stop_agent(proc, log)["readings_sent"] for d, (proc, log) in agents.items()}
    wait_until("every reading on the stream",
               lambda: len({(json.loads(line)["device_id"], json.loads(line)["seq"])
                            for line in lines()}) >= sum(sent.values()), timeout=60)
    bridge.send_signal(signal.SIGTERM)
    out, _ = bridge.communicate(timeout=30)
    assert bridge.returncode == 0, bridge_log.read_text()[-3000:]
    bridged = json.loads(out.strip().splitlines()[-1])

    records = kinesis_records(kinesis, stream)
    for r in records:
        inside = {(json.loads(line)["tenant"], json.loads(line)["device_id"])
                  for line in r["Data"].splitlines() if line.strip()}
        assert inside == {tuple(r["PartitionKey"].split("/"))}, \
            "keyed by tenant/device, the topic's levels, as the IoT rule does"
    per_record = len(lines()) / len(records)
    print(f"\n[e2e] {sum(sent.values())} readings from {len(devices)} agents in "
          f"{bridged['messages']} MQTT messages ({per_record:.0f} readings each) → "
          f"{len(records)} Kinesis records")

    text = (REPO / "pipelines" / "sensor-fleet.yaml").read_text()
    text = text.replace("../schemas/sensor-reading.yaml",
                        str(REPO / "schemas" / "sensor-reading.yaml"))
    text = text.replace("  local:\n    path: ${SHARDLAKE_DATA:-shardlake-data}/stream",
                        f"  kinesis: {{stream: {stream}, split_lines: true, poll_interval: 100ms}}")
    assert "split_lines" in text
    # Every line checked against the key its message came with: honest devices lose nothing.
    text += "\nidentity: {from: partition_key, key: \"{tenant}/{device_id}\"}\n"
    pipeline = tmp_path / "sensor-fleet-kinesis.yaml"
    pipeline.write_text(text)
    data_env = pipeline_env(tmp_path / "data", kinesalite.env())
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=data_env, timeout=300)
    q = check_run([str(shardlake_bin), "query", str(pipeline),
                   "SELECT device_id, count(DISTINCT seq) AS n, count(*) AS rows "
                   "FROM sensor_readings GROUP BY device_id ORDER BY device_id"], env=data_env)
    for d in devices:
        row = next(line for line in q.stdout.splitlines() if d in line)
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells == [d, str(sent[d]), str(sent[d])], (cells, sent, q.stdout)
    con = duck()
    assert lake_count(con, tmp_path / "data" / "lake", "dead_letter") == 0


def test_kinesis_transport_keeps_order_through_partial_failures(agent_bin, tmp_path, kinesalite):
    """transport: kinesis, through the fault proxy: PutRecords answered with part of the batch
    failed (the rest taking effect), whole-request throttling, and connections reset after the
    request took effect. Every reading arrives, first arrivals in order, and duplicates stay
    within what the agent counted as re-sent."""
    kinesis = kinesalite.client()
    stream = f"direct-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 2)
    device = "pi-direct"
    config = tmp_path / "agent.yaml"
    config.write_text("\n".join([
        f"device_id: {device}",
        "tenant: acme",
        f"queue: {{path: {tmp_path / 'queue'}, max_bytes: 8MiB, fsync: 200ms}}",
        # Small messages: a batch is ~15 PutRecords entries, so partial failures bite.
        "batch: {max_readings: 200, max_bytes: 2KiB, max_age: 100ms}",
        f"transport: {{kinesis: {{stream: {stream}}}}}",
        "sensors:",
    ] + [f"  - {{name: well-{i}, interval: 50ms, well_sim: {{seed: {i}}}}}" for i in range(3)])
        + "\n")
    kinds = ["putrecords_partial"] * 3 + ["kinesis_throttled", "reset_after"]
    with FaultProxy(kinesalite.host, kinesalite.port, rate=0.25, kinds=kinds, seed=5,
                    target="Kinesis_20131202.PutRecords") as proxy:
        log = tmp_path / "agent.log"
        env = pipeline_env(tmp_path, {**kinesalite.env(), "AWS_ENDPOINT_URL": proxy.url,
                                      "RUST_LOG": "info"})
        proc = subprocess.Popen([str(agent_bin), "run", "--config", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)
        lines = lambda: [json.loads(line) for r in kinesis_records(kinesis, stream)  # noqa: E731
                         for line in r["Data"].splitlines() if line.strip()]
        # Polled once a second: reading the whole stream is work for kinesalite too.
        wait_until("1500 readings on the stream", lambda: len(lines()) >= 1500, timeout=90,
                   every=1.0)
        summary = stop_agent(proc, log)
        injected = dict(proxy.injected)
    assert summary["pending_bytes"] == 0, summary
    assert injected.get("putrecords_partial", 0) >= 3 and injected.get("reset_after", 0) >= 1, \
        injected
    records = kinesis_records(kinesis, stream)
    assert {r["PartitionKey"] for r in records} == {device}
    readings = lines()
    counts = Counter(r["seq"] for r in readings)
    dups = sum(c - 1 for c in counts.values())
    seen, order = set(), []
    for r in readings:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            order.append(r["seq"])
    print(f"\n[agent kinesis] {len(order)} readings in {len(records)} records; injected "
          f"{injected}; {dups} duplicates, {summary['readings_resent']} counted as re-sent")
    assert order == list(range(1, summary["next_seq"])), "lost or out of order"
    assert dups <= summary["readings_resent"], (dups, summary)
