"""Commands to devices. `shardlake device set` writes a device's desired state as a
retained message on Mosquitto (TLS, client certificates, an ACL that pins each certificate to
its own topics, as the IoT policy does); shardlake-agent applies it (sampling interval, a GPIO
value file, a command output), keeps it across a restart and reports what it applied.
Refused documents (unknown keys, out of range, stale versions) change nothing and are
reported with their reasons; one device cannot command another. End to end, an alert rule's
`action:` commands the device that raised it: agent → Mosquitto → bridge → kinesalite →
pipeline → Mosquitto → agent, and the lake shows the faster readings; a pipeline SIGKILLed
after sending, before committing, does not send the command again.

Exercises src/agent/commands.rs, src/agent/transport/mqtt.rs (the desired-state subscription
and the reported state), src/agent/run.rs (sampling that follows its settings),
src/tools/device.rs, src/notify.rs (alert actions) and src/config/resolve/commands.rs.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from agents import start, stop_agent
from harness import REPO, check_run, free_port, pipeline_env, wait_until
from mosquitto import Mosquitto, Subscriber, _leaf, broker_with_acl, make_pki, start_bridge
from servers import create_stream, put_lines, tenant_device_key

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
    lines = []
    for d in ("pi-1", "pi-2"):
        lines += [f"user {d}", f"topic write sensors/{TENANT}/{d}/telemetry",
                  f"topic read sensors/{TENANT}/{d}/desired",
                  f"topic readwrite sensors/{TENANT}/{d}/reported", ""]
    lines += ["user operator", "topic readwrite sensors/+/+/desired",
              "topic read sensors/+/+/reported", ""]
    lines += ["user subscriber", "topic readwrite sensors/#", ""]
    b = broker_with_acl(tmp_path, pki, free_port(), lines)
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


device_cli = device


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


SURGE_ACTIONS = """
  - name: pressure_surge
    when: field = 'pressure_psi' AND value > 50000
    action:
      set: {sensors.well.interval: 200ms}
      for: 1h
  - name: pressure_surge_valve
    when: field = 'pressure_psi' AND value > 50000
    action: {set: {outputs.valve: 1}, dry_run: true}
"""


def action_pipeline(tmp: Path, broker: Mosquitto, stream: str, max_age: str,
                    actions: str = SURGE_ACTIONS) -> Path:
    pki = broker.pki
    text = (REPO / "pipelines" / "sensor-fleet.yaml").read_text()
    text = text.replace("../schemas/sensor-reading.yaml",
                        str(REPO / "schemas" / "sensor-reading.yaml"))
    text = text.replace("  local:\n    path: ${SHARDLAKE_DATA:-shardlake-data}/stream",
                        f"  kinesis: {{stream: {stream}, split_lines: true, poll_interval: 100ms}}")
    text = text.replace("max_age: 5m", f"max_age: {max_age}")
    text += actions + f"""
commands:
  mqtt:
    host: localhost
    port: {broker.port}
    ca: {pki / 'ca.pem'}
    cert: {pki / 'operator.pem'}
    key: {pki / 'operator.key'}
identity: {{from: partition_key, key: "{{tenant}}/{{device_id}}"}}
"""
    path = tmp / f"actions-{max_age}-{abs(hash(actions)) % 10**6}.yaml"
    path.write_text(text)
    return path


def test_an_alert_commands_its_device_end_to_end_once_across_a_crash(
        shardlake_bin, agent_bin, tmp_path, broker, kinesalite):
    kinesis = kinesalite.client()
    stream = f"cmd-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 1)
    env = pipeline_env(tmp_path / "data", kinesalite.env())
    bridge_log = tmp_path / "bridge.log"
    bridge = start_bridge(shardlake_bin, broker, stream, env, bridge_log)
    sub = Subscriber(broker, f"sensors/{TENANT}/pi-1/reported", tmp_path / "reported.out")
    agent_log = tmp_path / "pi-1.log"
    agent = start(agent_bin, agent_yaml(tmp_path, broker, "pi-1", interval="1s"), agent_log)
    pipe_log = tmp_path / "pipeline.log"
    # Nothing commits for 10 minutes: the command is sent, then the pipeline is killed.
    first = subprocess.Popen([str(shardlake_bin), "run",
                              str(action_pipeline(tmp_path, broker, stream, "10m"))],
                             env=env, stdout=subprocess.DEVNULL, stderr=open(pipe_log, "ab"))
    second = None
    try:
        surge = json.dumps({"device_id": "pi-1", "tenant": TENANT, "seq": 10**9,
                            "ts": datetime.now().astimezone().isoformat(), "sensor": "well",
                            "field": "pressure_psi", "value": 99999.0, "unit": "psi"}).encode()
        injected = time.monotonic()
        put_lines(kinesis, stream, [surge], key=tenant_device_key)
        applied = wait_until("pi-1 reports the alert's command applied", lambda: [
            r for r in reports(sub) if r["status"] == "applied" and r["version"] == 1], timeout=90)
        print(f"\n[actions] surge on the stream → command applied on the device: "
              f"{time.monotonic() - injected:.2f} s")
        assert applied[-1]["applied"] == {"sensors.well.interval": "200ms"}
        log = pipe_log.read_text()
        assert "command sent" in log and "dry run: command not sent" in log
        assert (tmp_path / "pi-1-sysfs/sys/class/gpio/gpio17/value").read_text() == "0", \
            "a dry run sends nothing"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

        # The restart reads the surge again (nothing was committed) and raises the same
        # alert: the command is recognised, not sent as a second version.
        second = subprocess.Popen([str(shardlake_bin), "run",
                                   str(action_pipeline(tmp_path, broker, stream, "2s"))],
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(pipe_log, "ab"))
        wait_until("the restarted pipeline recognises the command",
                   lambda: "command already sent before a restart" in pipe_log.read_text(),
                   timeout=90)
        shown = device(shardlake_bin, broker, "show", "pi-1")
        state = json.loads(shown.stdout)
        assert state["desired"]["version"] == 1, state
        assert state["desired"]["by"].startswith("rule:pressure_surge:pi-1:"), state

        # The lake shows the device's faster readings.
        pipeline = action_pipeline(tmp_path, broker, stream, "2s")

        def fast_in_lake():
            q = check_run([str(shardlake_bin), "query", str(pipeline),
                           "SELECT CAST(ts AS VARCHAR) AS t FROM sensor_readings WHERE "
                           "device_id = 'pi-1' AND sensor = 'well' GROUP BY ts ORDER BY ts"],
                          env=env)
            times = [datetime.fromisoformat(line.strip().strip("|").strip().replace("Z", "+00:00"))
                     for line in q.stdout.splitlines()
                     if line.startswith("| 20")]
            gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
            return sum(1 for g in gaps if g < 0.5) >= 10
        wait_until("faster readings in the lake", fast_in_lake, timeout=120, every=1)
        print(f"[actions] surge on the stream → 10 faster readings queryable in the lake: "
              f"{time.monotonic() - injected:.2f} s (rollover.max_age 2s)")
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        stop_agent(agent, agent_log)
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(timeout=30)
        sub.stop()


def test_console_operators_set_their_own_tenants_devices_only(
        shardlake_bin, agent_bin, tmp_path, broker, moto):
    """The console's device settings: an operator of the device's tenant changes its desired
    state (retained on the broker, read back by another client); a viewer may read it, not
    change it; another tenant's operator does not see the device; a key no device takes is
    refused before anything is published."""
    from console import ConsoleRun
    from oidc import CognitoPool
    pool = CognitoPool.create(moto)
    pool.add_user("olga", "Passw0rd!olga", tenant="acme", groups=["operators"])
    pool.add_user("ann", "Passw0rd!ann", tenant="acme")
    pool.add_user("bob", "Passw0rd!bob", tenant="borealis", groups=["operators"])
    pki = broker.pki
    commands = (f"commands:\n  mqtt: {{host: localhost, port: {broker.port}, "
                f"ca: {pki / 'ca.pem'}, cert: {pki / 'operator.pem'}, key: {pki / 'operator.key'}}}\n")
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path / "console", devices=6, env=moto.env(),
                   extra=pool.console_auth("http://127.0.0.1:1/auth/callback") + commands)
    try:
        olga, ann, bob = (pool.tokens(u, f"Passw0rd!{u}")["AccessToken"]
                          for u in ("olga", "ann", "bob"))
        device = next(d for d, t in sorted(r.tenants().items()) if t == "acme")
        path = f"/api/devices/{device}/desired"

        def fleet_has(token):
            status, _, body = r.api("GET", "/api/fleet", token=token)
            return status == 200 and any(d["device"] == device for d in json.loads(body)["devices"])
        wait_until("the device in acme's fleet", lambda: fleet_has(olga), timeout=60)

        def post(token, body):
            return r.api("POST", path, json.dumps(body).encode(),
                         {"content-type": "application/json"}, token=token)

        status, _, body = post(ann, {"set": {"sensors.well.interval": "2s"}})
        assert status == 403 and "operator role" in json.loads(body)["error"], body
        status, _, body = post(bob, {"set": {"sensors.well.interval": "2s"}})
        assert status == 404, body
        assert r.api("GET", path, token=bob)[0] == 404
        status, _, body = post(olga, {"set": {"firmware.url": "http://x"}})
        assert status == 400 and "`firmware.url` is not a setting" in json.loads(body)["error"]
        status, _, body = post(olga, {"colour": "red"})
        assert status == 400 and "unknown field" in json.loads(body)["error"], body
        status, _, body = post(olga, {})
        assert status == 400 and "nothing to change" in json.loads(body)["error"], body
        assert r.api("GET", path, token=olga)[2] and json.loads(
            r.api("GET", path, token=olga)[2])["desired"] is None, "nothing was published"

        status, _, body = post(olga, {"set": {"sensors.well.interval": "2s", "outputs.valve": 1}})
        assert status == 200, body
        out = json.loads(body)
        assert out["desired"]["version"] == 1 and out["desired"]["by"].startswith("user:")
        assert out["reported"] is None, "no agent runs for it: nothing reported"
        status, _, body = r.api("GET", path, token=ann)
        assert status == 200 and json.loads(body)["desired"]["state"] == {
            "sensors.well.interval": "2s", "outputs.valve": 1}
        # Another client reads the retained document from the broker itself.
        shown = device_cli(shardlake_bin, broker, "show", device)
        assert json.loads(shown.stdout)["desired"]["version"] == 1, shown.stderr
        status, _, body = post(olga, {"unset": ["outputs.valve"]})
        assert status == 200 and json.loads(body)["desired"]["state"] == {
            "sensors.well.interval": "2s"}
    finally:
        r.close()


def test_the_device_page_shows_and_changes_a_devices_settings_in_a_browser(
        shardlake_bin, agent_bin, tmp_path, broker):
    """On the device page (a local console, no sign-in: a local operator), the settings table
    shows the device's desired and applied state; a setting typed in and set is published and
    the device's report appears, without a reload. Values are shown as text."""
    from console import ConsoleRun, chromium_driver, shoot, wait_in_page
    from selenium.webdriver.common.by import By
    pki = broker.pki
    commands = (f"commands:\n  mqtt: {{host: localhost, port: {broker.port}, "
                f"ca: {pki / 'ca.pem'}, cert: {pki / 'operator.pem'}, key: {pki / 'operator.key'}}}\n")
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path / "console", devices=4, extra=commands)
    # The device of the page is an agent on the broker: "pi-1" of tenant acme, its readings
    # appended to the worker's stream so the console lists it.
    agent_log = tmp_path / "pi-1.log"
    agent = start(agent_bin, agent_yaml(tmp_path, broker, "pi-1", interval="1s"), agent_log)
    page = chromium_driver()
    try:
        r.append("pi-1", tenant=TENANT, status="<img src=x onerror=alert(1)>")
        wait_until("pi-1 in the console's fleet", lambda: any(
            d["device"] == "pi-1" for d in json.loads(r.api("GET", "/api/fleet")[2])["devices"]),
            timeout=60)
        page.get(r.base + "/#/device/pi-1")
        wait_in_page(page, "the settings section",
                     "!document.getElementById('settings').hidden && "
                     "document.getElementById('settings-status').textContent.includes('desired')")
        page.find_element(By.ID, "setting-key").send_keys("sensors.well.interval")
        page.find_element(By.ID, "setting-value").send_keys("500ms")
        page.find_element(By.ID, "setting-set").click()
        status = wait_in_page(
            page, "the device's report of version 1",
            "(t => t.includes('the device reports version 1, applied') ? t : null)"
            "(document.getElementById('settings-status').textContent)")
        assert "desired version 1 (user:" in status, status
        cells = page.execute_script(
            "return [...document.querySelectorAll('#settings-body td')].map(c => c.textContent)")
        assert cells == ["sensors.well.interval", "500ms", "500ms"], cells
        shoot(page, tmp_path, "device-settings")
        # A value the device refuses: its reason shows.
        key = page.find_element(By.ID, "setting-key")
        key.clear()
        key.send_keys("outputs.valve")
        value = page.find_element(By.ID, "setting-value")
        value.clear()
        value.send_keys("7")
        page.find_element(By.ID, "setting-set").click()
        status = wait_in_page(
            page, "the refusal",
            "(t => t.includes('refused') ? t : null)"
            "(document.getElementById('settings-status').textContent)")
        assert "outputs.valve: a GPIO output takes 0 or 1" in status, status
        assert page.execute_script("return document.querySelectorAll('img').length") == 0
        shoot(page, tmp_path, "device-settings-refused")
    finally:
        shoot(page, tmp_path, "device-settings-last")  # what the page showed at the end
        page.quit()
        stop_agent(agent, agent_log)
        r.close()


def test_overlapping_commands_restore_what_was_there_before_both_when_the_last_ends(
        shardlake_bin, agent_bin, tmp_path, broker, kinesalite):
    """Two rules command the same device on one surge, for 3 s and for 6 s: when the first
    ends, the second is still in force and nothing is restored; when the second ends, the
    device's desired state goes back to what it was before both (here: nothing, so the
    agent's configured interval), and the agent reports it applied."""
    kinesis = kinesalite.client()
    stream = f"cmd-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 1)
    env = pipeline_env(tmp_path / "data", kinesalite.env())
    desired = Subscriber(broker, f"sensors/{TENANT}/pi-1/desired", tmp_path / "desired.out",
                         client_id="test-sub-desired")
    reported = Subscriber(broker, f"sensors/{TENANT}/pi-1/reported", tmp_path / "reported.out",
                          client_id="test-sub-reported")
    agent_log = tmp_path / "pi-1.log"
    agent = start(agent_bin, agent_yaml(tmp_path, broker, "pi-1", interval="1s"), agent_log)
    actions = """
  - name: surge_short
    when: field = 'pressure_psi' AND value > 50000
    action: {set: {sensors.well.interval: 200ms}, for: 3s}
  - name: surge_long
    when: field = 'pressure_psi' AND value > 50000
    action: {set: {sensors.well.interval: 300ms}, for: 6s}
"""
    pipe_log = tmp_path / "pipeline.log"
    proc = subprocess.Popen([str(shardlake_bin), "run",
                             str(action_pipeline(tmp_path, broker, stream, "2s", actions))],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(pipe_log, "ab"))
    try:
        surge = json.dumps({"device_id": "pi-1", "tenant": TENANT, "seq": 10**9,
                            "ts": datetime.now().astimezone().isoformat(), "sensor": "well",
                            "field": "pressure_psi", "value": 99999.0, "unit": "psi"}).encode()
        put_lines(kinesis, stream, [surge], key=tenant_device_key)
        docs = lambda: [json.loads(line) for line in desired.lines()]  # noqa: E731
        wait_until("both commands and the restore", lambda: len(docs()) >= 3, timeout=60)
        wait_until("the device reports the restored state", lambda: [
            r for r in reports(reported) if r["version"] == 3 and r["status"] == "applied"],
            timeout=30)
        log = pipe_log.read_text()
        assert "another command is still in force" in log, log[-3000:]
        d = docs()
        assert [x["version"] for x in d] == [1, 2, 3], d
        assert {x["by"].split(":")[1] for x in d[:2]} == {"surge_short", "surge_long"}, d
        assert d[2]["by"] == d[1]["by"] + ":expired" and d[2]["state"] == {}, d
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop_agent(agent, agent_log)
        desired.stop()
        reported.stop()
