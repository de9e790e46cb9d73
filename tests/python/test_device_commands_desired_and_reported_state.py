"""Commands to devices, device side: `shardlake device set` writes a device's desired state as a
retained message on Mosquitto (TLS, client certificates, an ACL that pins each certificate to
its own topics, as the IoT policy does); shardlake-agent applies it (sampling interval, a GPIO
value file, a command output), keeps it across a restart and reports what it applied.
Refused documents (unknown keys, out of range, stale versions) change nothing and are
reported with their reasons; one device cannot command another.

Exercises src/agent/commands.rs, src/agent/transport/mqtt.rs (the desired-state subscription
and the reported state), src/agent/run.rs (sampling that follows its settings) and
src/tools/device.rs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from agents import start, stop_agent
from harness import free_port, wait_until
from mosquitto import Mosquitto, Subscriber, _leaf, make_pki

TENANT = "acme"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    dir = make_pki(tmp_path_factory.mktemp("pki"))
    for name in ("pi-1", "pi-2", "operator"):
        _leaf(dir, name, "ca", "extendedKeyUsage=clientAuth")
    return dir


@pytest.fixture
def broker(tmp_path, pki):
    """Each device may publish its telemetry and reported state and read its desired and
    reported state, nothing else (the IoT policy's shape); the operator writes any device's
    desired state; the test's subscriber reads everything."""
    acl = tmp_path / "acl"
    lines = []
    for d in ("pi-1", "pi-2"):
        lines += [f"user {d}", f"topic write sensors/{TENANT}/{d}/telemetry",
                  f"topic read sensors/{TENANT}/{d}/desired",
                  f"topic readwrite sensors/{TENANT}/{d}/reported", ""]
    lines += ["user operator", "topic readwrite sensors/+/+/desired",
              "topic read sensors/+/+/reported", ""]
    lines += ["user subscriber", "topic readwrite sensors/#", ""]
    acl.write_text("\n".join(lines))
    (tmp_path / "mosquitto").mkdir()
    b = Mosquitto(tmp_path / "mosquitto", pki, free_port(),
                  extra=[f"acl_file {acl}", "log_type debug"])
    b.start()
    yield b
    b.stop()


def agent_yaml(tmp: Path, broker: Mosquitto, device: str, interval: str = "1s") -> Path:
    pki = broker.pki
    sysfs = tmp / f"{device}-sysfs"
    (sysfs / "sys/class/gpio/gpio17").mkdir(parents=True, exist_ok=True)
    value = sysfs / "sys/class/gpio/gpio17/value"
    if not value.exists():
        value.write_text("0")
    pump_log = tmp / f"{device}-pump.log"
    text = f"""
device_id: {device}
tenant: {TENANT}
sysfs_root: {sysfs}
queue: {{path: {tmp / (device + '-queue')}, max_bytes: 16MiB, fsync: 200ms}}
batch: {{max_readings: 50, max_age: 100ms}}
transport:
  mqtt:
    host: localhost
    port: {broker.port}
    ca: {pki / 'ca.pem'}
    cert: {pki / (device + '.pem')}
    key: {pki / (device + '.key')}
    ack_timeout: 5s
sensors:
  - {{name: well, interval: {interval}, well_sim: {{seed: 7, spike_every: 0}}}}
commands:
  state: {tmp / (device + '-applied.json')}
  min_interval: 50ms
  outputs:
    valve: {{gpio: sys/class/gpio/gpio17/value}}
    pump: {{command: {{run: [/bin/sh, -c, 'echo "$0" >> {pump_log}'], values: [on, off]}}}}
"""
    path = tmp / f"{device}.yaml"
    path.write_text(text)
    return path


def device(shardlake_bin: Path, broker: Mosquitto, *args: str, cert: str = "operator"
           ) -> subprocess.CompletedProcess:
    pki = broker.pki
    return subprocess.run(
        [str(shardlake_bin), "device", *args, "--tenant", TENANT, "--host", "localhost",
         "--port", str(broker.port), "--ca", str(pki / "ca.pem"),
         "--cert", str(pki / f"{cert}.pem"), "--key", str(pki / f"{cert}.key"),
         "--client-id", f"cli-{time.monotonic_ns()}"],
        capture_output=True, text=True, timeout=120)


def publish_raw(broker: Mosquitto, cert: str, topic: str, payload: str | None) -> str:
    """Publishes retained (an empty payload clears); returns the client id used."""
    pki = broker.pki
    client_id = f"raw-{cert}-{time.monotonic_ns()}"
    args = ["-n"] if payload is None else ["-m", payload]
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
         str(pki / "ca.pem"), "--cert", str(pki / f"{cert}.pem"), "--key",
         str(pki / f"{cert}.key"), "-t", topic, "-q", "1", "-r", "-i", client_id, *args],
        check=True, capture_output=True, timeout=30)
    return client_id


def readings(sub: Subscriber, device: str) -> list[dict]:
    return [m for m in sub.lines() for m in [json.loads(m)] if m.get("device_id") == device]


def reports(sub: Subscriber) -> list[dict]:
    return [m for m in sub.lines() for m in [json.loads(m)] if "desired_version" in m]


def sample_times(rs: list[dict]) -> list[datetime]:
    """One time per sample: the well simulator's three fields share their timestamp."""
    return sorted({datetime.fromisoformat(r["ts"].replace("Z", "+00:00"))
                   for r in rs if r["sensor"] == "well"})


def median_gap(times: list[datetime]) -> float:
    return statistics.median((b - a).total_seconds() for a, b in zip(times, times[1:]))


def test_a_command_changes_sampling_and_outputs_and_refusals_change_nothing(
        shardlake_bin, agent_bin, tmp_path, broker):
    sub = Subscriber(broker, "sensors/#", tmp_path / "sub.out")
    cfg = agent_yaml(tmp_path, broker, "pi-1", interval="1s")
    log = tmp_path / "pi-1.log"
    agent = start(agent_bin, cfg, log)
    try:
        wait_until("pi-1 sends readings at its configured interval",
                   lambda: len(sample_times(readings(sub, "pi-1"))) >= 4, timeout=60)
        slow = median_gap(sample_times(readings(sub, "pi-1")))
        assert 0.8 <= slow <= 1.5, slow

        asked = time.monotonic()
        out = device(shardlake_bin, broker, "set", "pi-1", "sensors.well.interval=100ms",
                     "outputs.valve=1", "outputs.pump=on", "--wait", "30s")
        assert out.returncode == 0, out.stderr
        outcome = json.loads(out.stdout)
        assert outcome["desired"]["version"] == 1
        assert outcome["reported"]["status"] == "applied", outcome
        assert outcome["reported"]["applied"]["sensors.well.interval"] == "100ms"
        assert "applied by the device" in out.stderr
        sysfs = tmp_path / "pi-1-sysfs"
        assert (sysfs / "sys/class/gpio/gpio17/value").read_text() == "1"
        assert (tmp_path / "pi-1-pump.log").read_text() == "on\n"

        before = len(sample_times(readings(sub, "pi-1")))
        wait_until("pi-1 samples faster", lambda: len(sample_times(readings(sub, "pi-1")))
                   >= before + 20, timeout=60)
        print(f"\n[commands] set → 20 faster samples received: {time.monotonic() - asked:.2f} s")
        fast = median_gap(sample_times(readings(sub, "pi-1"))[before + 2:])
        assert fast <= 0.3, fast

        # Refused whole: an interval below the agent's bound and an unknown key. The valve
        # stays open, sampling stays fast, the version in force stays 1.
        out = device(shardlake_bin, broker, "set", "pi-1", "sensors.well.interval=1ms",
                     "sensors.well.colour=red", "outputs.valve=0", "--wait", "30s")
        assert out.returncode == 1, out.stderr
        r = json.loads(out.stdout)["reported"]
        assert (r["status"], r["version"], r["desired_version"]) == ("refused", 1, 2), r
        assert "outside 50ms to 1h" in r["refused"]["sensors.well.interval"], r
        assert "no setting `colour`" in r["refused"]["sensors.well.colour"], r
        assert "outputs.valve" not in r["refused"], "valid keys are not refused, only held back"
        assert "refused by the device" in out.stderr
        assert (sysfs / "sys/class/gpio/gpio17/value").read_text() == "1"
        assert (tmp_path / "pi-1-pump.log").read_text() == "on\n"

        # The operator takes the bad keys back: version 3 applies (valve closed).
        out = device(shardlake_bin, broker, "set", "pi-1", "outputs.valve=0", "--unset",
                     "sensors.well.colour", "--unset", "sensors.well.interval", "--wait", "30s")
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)["reported"]
        assert (r["status"], r["version"]) == ("applied", 3), r
        assert (sysfs / "sys/class/gpio/gpio17/value").read_text() == "0"

        # A stale version (written by hand, older than the one in force): ignored, reported.
        publish_raw(broker, "operator", f"sensors/{TENANT}/pi-1/desired",
                    json.dumps({"version": 2, "state": {"outputs.valve": 1}}))
        stale = wait_until("the stale report", lambda: [
            r for r in reports(sub) if r["desired_version"] == 2 and r["status"] == "stale"])
        assert stale[-1]["version"] == 3 and "older than version 3" in stale[-1]["refused"]["version"]
        assert (sysfs / "sys/class/gpio/gpio17/value").read_text() == "0"

        # Another device's certificate cannot command pi-1: the broker drops it.
        rogue = publish_raw(broker, "pi-2", f"sensors/{TENANT}/pi-1/desired",
                            json.dumps({"version": 99, "state": {"outputs.valve": 1}}))
        wait_until("the broker's denial in its log",
                   lambda: f"Denied PUBLISH from {rogue}" in broker.log, timeout=30)
        shown = device(shardlake_bin, broker, "show", "pi-1")
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        assert state["desired"]["version"] == 2, "the stale document is still the retained one"
        assert state["reported"]["version"] == 3
        assert (sysfs / "sys/class/gpio/gpio17/value").read_text() == "0"
        assert not any(r["desired_version"] == 99 for r in reports(sub))
    finally:
        summary = stop_agent(agent, log)
        sub.stop()
    assert summary["readings_sent"] > 0


def test_an_offline_agent_applies_the_command_before_it_sends_and_keeps_it_after_a_restart(
        shardlake_bin, agent_bin, tmp_path, broker):
    sub = Subscriber(broker, "sensors/#", tmp_path / "sub.out")
    cfg = agent_yaml(tmp_path, broker, "pi-2", interval="1s")
    log = tmp_path / "pi-2.log"
    agent = start(agent_bin, cfg, log)
    try:
        wait_until("pi-2 sends", lambda: len(readings(sub, "pi-2")) >= 3, timeout=60)
    finally:
        stop_agent(agent, log)
    lines_before = len(sub.lines())

    # Offline: the broker keeps the desired state for it.
    out = device(shardlake_bin, broker, "set", "pi-2", "sensors.well.interval=200ms",
                 "outputs.pump=off")
    assert out.returncode == 0, out.stderr
    assert "applies it when connected" in out.stderr

    agent = start(agent_bin, cfg, log)
    try:
        wait_until("pi-2 sends again", lambda: len(sample_times(
            [json.loads(l) for l in sub.lines()[lines_before:]
             if json.loads(l).get("device_id") == "pi-2"])) >= 10, timeout=60)
        after = [json.loads(l) for l in sub.lines()[lines_before:]]
        first_reading = next(i for i, m in enumerate(after) if m.get("device_id") == "pi-2")
        applied = [i for i, m in enumerate(after)
                   if m.get("desired_version") == 1 and m["status"] == "applied"]
        assert applied and applied[0] < first_reading, \
            "the desired state is applied and reported before the first batch is sent"
        assert (tmp_path / "pi-2-pump.log").read_text() == "off\n"
        new = sample_times([m for m in after if m.get("device_id") == "pi-2"])
        assert median_gap(new[2:]) <= 0.4, median_gap(new[2:])
    finally:
        stop_agent(agent, log)

    # A reboot with the broker's copy gone: the agent's own kept state still holds.
    publish_raw(broker, "operator", f"sensors/{TENANT}/pi-2/desired", None)
    lines_before = len(sub.lines())
    agent = start(agent_bin, cfg, log)
    try:
        wait_until("pi-2 sends after the reboot", lambda: len(sample_times(
            [json.loads(l) for l in sub.lines()[lines_before:]
             if json.loads(l).get("device_id") == "pi-2"])) >= 10, timeout=60)
        new = sample_times([json.loads(l) for l in sub.lines()[lines_before:]
                            if json.loads(l).get("device_id") == "pi-2"])
        assert median_gap(new[1:]) <= 0.4, "the kept interval, not the configured 1s"
        assert "applied state restored" in log.read_text()
    finally:
        stop_agent(agent, log)
        sub.stop()


def test_commands_need_mqtt_and_sane_bounds(agent_bin, tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "device_id: pi-9\ntenant: acme\ntransport: {local: {stream: s}}\n"
        "sensors:\n  - {name: well, interval: 1s, well_sim: {}}\n"
        "commands:\n  min_interval: 1ms\n  desired_topic: sensors/all/desired\n"
        "  outputs:\n    valve: {gpio: sys/class/gpio/gpio17}\n"
        "    pump: {command: {run: [], values: []}}\n")
    proc = subprocess.run([str(agent_bin), "validate", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for want in [
        "agent.yaml:6: commands: commands reach the device over MQTT",
        "agent.yaml:7: commands.min_interval: 1ms is shorter than 10ms",
        "agent.yaml:8: commands.desired_topic: `sensors/all/desired` is not a topic of this one device",
        "commands.outputs.valve.gpio: `sys/class/gpio/gpio17` is not a GPIO value file",
        "commands.outputs.pump.command.run: the command is empty",
        "commands.outputs.pump.command.values: no values are allowed",
    ]:
        assert want in proc.stderr, f"{want!r} not in:\n{proc.stderr}"
