"""Tenants and device identity: a record is believed only as far as its channel proves it.

Mosquitto stands in for IoT Core: each device's certificate is its identity
(`use_identity_as_username`), and an ACL pins its topics to `sensors/<its tenant>/<its
thing>/telemetry` as the IoT policy in deploy/ does. `shardlake bridge` keys each message by
`${topic(2)}/${topic(3)}` as the IoT rule does, onto kinesalite; the pipeline's `identity:`
compares every record with its key. A publish on another tenant's or device's topic is refused
by the broker; a payload on the device's own topic that claims another device or tenant goes to
dead-letter as `identity_mismatch`; honest devices' counts are exact.

Exercises src/decode/mod.rs (check_identity), src/config/resolve/identity.rs,
src/source/kinesis/ (keys per record, KPL and split_lines) and src/tools/bridge.rs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from harness import REPO, check_run, free_port, pipeline_env, run_log, wait_until
from lake import duck, lake_source
from mosquitto import Mosquitto, _leaf, make_pki
from servers import create_stream

# thing name -> tenant, as the registry (thing attributes) knows them.
DEVICES = {"acme-1": "acme", "acme-2": "acme", "globex-1": "globex"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    dir = make_pki(tmp_path_factory.mktemp("pki"))
    for thing in DEVICES:
        _leaf(dir, thing, "ca", "extendedKeyUsage=clientAuth")
    return dir


@pytest.fixture
def pinned_broker(tmp_path, pki):
    """Mosquitto whose ACL gives each device certificate its own topic only, and the bridge's
    (subscriber) certificate read access to every device topic."""
    acl = tmp_path / "acl"
    lines = []
    for thing, tenant in DEVICES.items():
        lines += [f"user {thing}", f"topic write sensors/{tenant}/{thing}/telemetry", ""]
    lines += ["user subscriber", "topic read sensors/+/+/telemetry", ""]
    acl.write_text("\n".join(lines))
    (tmp_path / "mosquitto").mkdir()
    b = Mosquitto(tmp_path / "mosquitto", pki, free_port(),
                  extra=[f"acl_file {acl}", "log_type debug"])
    b.start()
    yield b
    b.stop()


def publish(broker: Mosquitto, cert: str, topic: str, payload: str) -> subprocess.CompletedProcess:
    pki = broker.pki
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
         str(pki / "ca.pem"), "--cert", str(pki / f"{cert}.pem"), "--key",
         str(pki / f"{cert}.key"), "-i", f"{cert}-{uuid.uuid4().hex[:6]}", "-q", "1",
         "-t", topic, "-m", payload],
        capture_output=True, text=True, timeout=30)


def reading(device: str, tenant: str, seq: int, **extra) -> str:
    r = {"device_id": device, "tenant": tenant, "seq": seq,
         "ts": f"2026-01-05T10:00:{seq % 60:02}.000Z", "sensor": "s", "field": "temp_c",
         "value": 20.0 + seq, "unit": "C"}
    r.update(extra)
    return json.dumps(r, separators=(",", ":"))


def kinesis_records(kinesis, stream: str) -> list[dict]:
    out = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = kinesis.get_records(ShardIterator=it, Limit=1000)
            out.extend(page["Records"])
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            it = page.get("NextShardIterator")
    return out


def identity_pipeline(tmp_path: Path, stream: str) -> Path:
    text = (REPO / "pipelines" / "sensor-fleet.yaml").read_text()
    text = text.replace("../schemas/sensor-reading.yaml",
                        str(REPO / "schemas" / "sensor-reading.yaml"))
    text = text.replace("  local:\n    path: ${SHARDLAKE_DATA:-shardlake-data}/stream",
                        f"  kinesis: {{stream: {stream}, split_lines: true, poll_interval: 100ms}}")
    assert stream in text
    text += "\nidentity: {from: partition_key, key: \"{tenant}/{device_id}\"}\n"
    path = tmp_path / "identity.yaml"
    path.write_text(text)
    return path


def test_spoofed_topics_are_refused_and_spoofed_payloads_go_to_dead_letter(
        shardlake_bin, tmp_path, pinned_broker, kinesalite):
    broker = pinned_broker
    kinesis = kinesalite.client()
    stream = f"identity-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 2)
    pki = broker.pki
    env = pipeline_env(tmp_path, kinesalite.env())
    bridge_log = tmp_path / "bridge.log"
    bridge = subprocess.Popen(
        [str(shardlake_bin), "bridge", "--stream", stream, "--port", str(broker.port),
         "--ca", str(pki / "ca.pem"), "--cert", str(pki / "subscriber.pem"),
         "--key", str(pki / "subscriber.key"), "--client-id", f"bridge-{stream}"],
        env=env, stdout=subprocess.PIPE, stderr=open(bridge_log, "wb"), text=True)
    try:
        wait_until("the bridge to subscribe",
                   lambda: "bridge subscribed" in bridge_log.read_text(), timeout=30)

        honest: dict[str, int] = {d: 0 for d in DEVICES}
        spoofs: list[str] = []
        refused: list[str] = []

        def own(thing: str) -> str:
            return f"sensors/{DEVICES[thing]}/{thing}/telemetry"

        for seq in range(1, 6):
            for thing, tenant in DEVICES.items():
                assert publish(broker, thing, own(thing), reading(thing, tenant, seq)).returncode == 0
                honest[thing] += 1
        # acme-1 publishes on globex's topic and on acme-2's: the broker takes neither.
        for topic in ("sensors/globex/globex-1/telemetry", "sensors/globex/acme-1/telemetry",
                      "sensors/acme/acme-2/telemetry"):
            payload = reading("globex-1", "globex", 900 + len(refused))
            publish(broker, "acme-1", topic, payload)
            refused.append(payload)
        # On its own topic, payloads that claim another device, another tenant, or both;
        # one line of a two-line message claims another device (split_lines: line by line).
        for payload in (reading("acme-2", "acme", 800), reading("acme-1", "globex", 801),
                        reading("globex-1", "globex", 802)):
            assert publish(broker, "acme-1", own("acme-1"), payload).returncode == 0
            spoofs.append(payload)
        two = [reading("acme-1", "acme", 6), reading("globex-1", "globex", 803)]
        assert publish(broker, "acme-1", own("acme-1"), "\n".join(two)).returncode == 0
        honest["acme-1"] += 1
        spoofs.append(two[1])
        # A reading with no identity of its own takes it from the key.
        bare = json.loads(reading("acme-2", "acme", 6))
        del bare["device_id"], bare["tenant"]
        assert publish(broker, "acme-2", own("acme-2"), json.dumps(bare)).returncode == 0
        honest["acme-2"] += 1
        # The last message: once it is on the stream, everything before it is (or never will be).
        assert publish(broker, "globex-1", own("globex-1"), reading("globex-1", "globex", 6)).returncode == 0
        honest["globex-1"] += 1
        marker = b'"seq":6,'
        wait_until("the last message on the stream",
                   lambda: any(marker in r["Data"] and b"globex-1" in r["Data"]
                               for r in kinesis_records(kinesis, stream)), timeout=60)
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.communicate(timeout=30)

    records = kinesis_records(kinesis, stream)
    on_stream = b"\n".join(r["Data"] for r in records)
    for payload in refused:
        assert payload.encode() not in on_stream, f"the broker let a spoofed topic through: {payload}"
    assert "denied publish" in broker.log.lower(), broker.log[-3000:]
    # The stream carries the proof: every key is tenant/thing of the certificate that sent it.
    assert {r["PartitionKey"] for r in records} == {f"{t}/{d}" for d, t in DEVICES.items()}

    pipeline = identity_pipeline(tmp_path, stream)
    data = tmp_path / "data"
    run = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                    env=pipeline_env(data, kinesalite.env()), timeout=300)

    con = duck()
    lake = data / "lake"
    dead = con.execute(
        f"SELECT error, reason, decode(raw), _shard_id, _sequence_number "
        f"FROM {lake_source(lake, 'dead_letter')} ORDER BY reason").fetchall()
    assert sorted(r[2] for r in dead) == sorted(spoofs), dead
    assert {r[0] for r in dead} == {"identity_mismatch"}
    reasons = " | ".join(r[1] for r in dead)
    assert 'field `device_id` says "acme-2" but the channel proves "acme-1"' in reasons, reasons
    assert 'field `tenant` says "globex" but the channel proves "acme"' in reasons, reasons
    assert all(r[3].startswith("shardId-") and r[4] for r in dead)
    counts = dict(con.execute(
        f"SELECT device_id || '@' || tenant, count(*) FROM {lake_source(lake, 'sensor_readings')} "
        f"GROUP BY 1").fetchall())
    assert counts == {f"{d}@{t}": honest[d] for d, t in DEVICES.items()}, counts
    # The metric counts them too (the run's summary has every counter).
    summary = next(e for e in run_log(run) if e.get("message") == "run finished")
    assert summary["identity_mismatches"] == len(spoofs), summary


def test_identity_config_errors_name_the_field_and_fix(shardlake_bin, tmp_path):
    bad = {
        "identity: {from: payload}": ("identity.from", "partition_key"),
        "identity: {from: partition_key, key: \"{tenant}{device_id}\"}": (
            "identity.key", "separator"),
        "identity: {from: partition_key, key: \"{tenant}/{devise}\"}": (
            "identity.key", "device_id"),
        "identity: {from: partition_key, key: \"{tenant}/{seq}\"}": (
            "identity.key", "string fields"),
    }
    for extra, (field, fix) in bad.items():
        path = identity_pipeline(tmp_path, "s").read_text().replace(
            "\nidentity: {from: partition_key, key: \"{tenant}/{device_id}\"}\n", "\n" + extra + "\n")
        p = tmp_path / "bad.yaml"
        p.write_text(path)
        r = subprocess.run([str(shardlake_bin), "validate", str(p)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0, extra
        assert field in r.stderr and fix in r.stderr and "bad.yaml" in r.stderr, (extra, r.stderr)
    # The local stream keeps no keys: said so, with what to do.
    local = (REPO / "pipelines" / "sensor-fleet.yaml").read_text().replace(
        "../schemas/sensor-reading.yaml", str(REPO / "schemas" / "sensor-reading.yaml"))
    p = tmp_path / "local.yaml"
    p.write_text(local + "\nidentity: {from: partition_key}\n")
    r = subprocess.run([str(shardlake_bin), "validate", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "keeps no partition keys" in r.stderr, r.stderr
