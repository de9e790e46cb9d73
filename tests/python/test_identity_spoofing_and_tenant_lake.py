"""Tenants and device identity: a record is believed only as far as its channel proves it.

Mosquitto stands in for IoT Core: each device's certificate is its identity
(`use_identity_as_username`), and an ACL pins its topics to `sensors/<its tenant>/<its
thing>/telemetry` as the IoT policy in deploy/ does. `shardlake bridge` keys each message by
`${topic(2)}/${topic(3)}` as the IoT rule does, onto kinesalite; the pipeline's `identity:`
compares every record with its key. A publish on another tenant's or device's topic is refused
by the broker; a payload on the device's own topic that claims another device or tenant goes to
dead-letter as `identity_mismatch`; honest devices' counts are exact.

A lake partitioned by the proven tenant (`outputs.partition_by: [tenant]`) holds every output
right (checked by DuckDB with hive partitioning against the input), keeps `tenant` in its paths
and out of its files, and `WHERE tenant = ...` reads no other tenant's file; `athena-ddl`
declares the tenant projection and a database of views per tenant.

Exercises src/decode/mod.rs (check_identity), src/config/resolve/identity.rs,
src/source/kinesis/ (keys per record, KPL and split_lines), src/tools/bridge.rs,
src/sink/writer.rs and src/sink/partition.rs (tenant partitions), src/tools/query.rs and
src/tools/athena.rs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp

from harness import (REPO, check_run, free_port, kinesis_pipeline, pipeline_env, run_log,
                     simulate, wait_until)
from lake import check_lake_against_put, duck, lake_source, parquet_files
from mosquitto import Mosquitto, _leaf, broker_with_acl, make_pki
from servers import create_stream, kinesis_records, put_lines, tenant_device_key
from streamdata import interleave

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
    lines = []
    for thing, tenant in DEVICES.items():
        lines += [f"user {thing}", f"topic write sensors/{tenant}/{thing}/telemetry", ""]
    lines += ["user subscriber", "topic read sensors/+/+/telemetry", ""]
    b = broker_with_acl(tmp_path, pki, free_port(), lines)
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


def tenant_lake_pipeline(tmp_path: Path, stream: str) -> Path:
    p = kinesis_pipeline(tmp_path, stream, max_bytes="64MiB", max_age="1h",
                         extra="\nidentity: {from: partition_key}\n")
    text = p.read_text()
    text, n = re.subn(r"(?m)^outputs:\n", "outputs:\n  partition_by: [tenant]\n", text)
    assert n == 1
    p.write_text(text)
    return p


def test_a_lake_partitioned_by_tenant_is_right_and_prunes_other_tenants(
        shardlake_bin, agent_bin, tmp_path, kinesalite):
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=30, readings=600, seed=4,
                       spikes=3, malformed=4)
    kinesis = kinesalite.client()
    stream = f"tenants-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, stream, 2)
    put = put_lines(kinesis, stream, interleave(tmp_path / "sim" / "stream"), key=tenant_device_key)
    pipeline = tenant_lake_pipeline(tmp_path, stream)
    env = pipeline_env(tmp_path / "data", kinesalite.env())
    check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env, timeout=300)
    lake = tmp_path / "data" / "lake"

    # Every output, read by DuckDB with hive partitioning (tenant from the path), is right.
    con = check_lake_against_put(put, summary, lake)
    tenants = sorted({r[0] for r in con.execute("SELECT DISTINCT tenant FROM src").fetchall()})
    assert len(tenants) == 3, tenants

    # tenant=<t>/ comes before the hours in the tenant's tables, and not in the files.
    for output in ("readings", "well_1m", "well_5m_hop"):
        files = parquet_files(lake, output)
        assert files, output
        for f in files:
            rel = Path(f).relative_to(lake / output).as_posix()
            assert re.match(r"tenant=[a-z]+/year=\d{4}/month=\d\d/day=\d\d/hour=\d\d/", rel), rel
            assert "tenant" not in pq.read_schema(f).names, f"{f}: tenant is a partition column"
    for output in ("dead_letter", "alerts"):
        for f in parquet_files(lake, output):
            assert "tenant=" not in f, f"{output} is not a tenant's own data: {f}"

    # shardlake query agrees with DuckDB, per tenant, through the merged views too.
    def query(sql: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(shardlake_bin), "query", str(pipeline), sql], env=env,
                              capture_output=True, text=True, timeout=120)

    for t in tenants:
        out = query(f"SELECT count(*) AS n, sum(readings) AS r FROM well_1m WHERE tenant = '{t}'")
        assert out.returncode == 0, out.stderr
        n, r = [c.strip() for c in out.stdout.splitlines()[3].strip("|").split("|")]
        want = con.execute(
            "SELECT count(DISTINCT (device_id, date_trunc('minute', ts))), count(*) FROM src "
            "WHERE tenant = ?", [t]).fetchone()
        assert (int(n), int(r)) == want, (t, out.stdout, want)

    # Pruning: a corrupt file in another tenant's partition is never opened by a query that
    # names one tenant; without the filter, the same query trips on it.
    hour_dir = Path(parquet_files(lake, "readings")[0]).parent.relative_to(lake / "readings" / f"tenant={tenants[0]}")
    planted = lake / "readings" / f"tenant={tenants[1]}" / hour_dir / "part-9999999999-x-0000.parquet"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"not parquet at all")
    ok = query(f"SELECT count(*) FROM readings WHERE tenant = '{tenants[0]}'")
    assert ok.returncode == 0, ok.stderr
    want = con.execute("SELECT count(*) FROM src WHERE tenant = ?", [tenants[0]]).fetchone()[0]
    assert f"| {want}" in ok.stdout, (ok.stdout, want)
    bad = query("SELECT count(*) FROM readings")
    assert bad.returncode != 0, "the planted file must be read when nothing prunes it"
    planted.unlink()

    # Athena: tenant first, injected by default, an enum (and a database of views per tenant)
    # when the tenants are given; the year projection bounded from --first-year to NOW.
    for extra, kind in (([], "injected"), (["--tenants", ",".join(tenants)], "enum")):
        ddl = check_run([str(shardlake_bin), "athena-ddl", str(pipeline), "--location",
                         "s3://b/lake", "--database", "wells", "--first-year", "2025", *extra],
                        env=env).stdout
        statements = []
        for text in (t.strip() for t in ddl.split(";\n")):
            if text:
                try:
                    statements.append(sqlglot.parse_one(text, read="athena"))
                except sqlglot.errors.ParseError:
                    statements.append(sqlglot.parse_one(text, read="hive"))
        creates = {s.this.this.name: s for s in statements
                   if isinstance(s, exp.Create) and s.kind == "TABLE"}
        readings = creates["well_telemetry_readings"]
        props = readings.args["properties"].expressions
        part = next(p for p in props if isinstance(p, exp.PartitionedByProperty))
        assert [c.name for c in part.this.expressions] == ["tenant", "year", "month", "day", "hour"]
        assert "tenant" not in [c.name for c in readings.this.expressions]
        tbl = {p.this.name: p.args["value"].name for p in props if type(p) is exp.Property}
        assert tbl["projection.tenant.type"] == kind, tbl
        assert tbl["projection.year.type"] == "date" and tbl["projection.year.range"] == "2025,NOW"
        assert tbl["storage.location.template"].startswith(
            "s3://b/lake/readings/tenant=${tenant}/year=${year}/"), tbl
        dead = creates["well_telemetry_dead_letter"]
        dead_part = next(p for p in dead.args["properties"].expressions
                         if isinstance(p, exp.PartitionedByProperty))
        assert [c.name for c in dead_part.this.expressions] == ["year", "month", "day", "hour"]
        views = [s for s in statements if isinstance(s, exp.Create) and s.kind == "VIEW"]
        tenant_views = [v for v in views if v.this.db != "wells"]
        if kind == "enum":
            assert tbl["projection.tenant.values"] == ",".join(tenants)
            assert {v.this.db for v in tenant_views} == {f"wells_{t}" for t in tenants}
            for v in tenant_views:
                where = v.expression.args["where"].sql()
                assert where == f"WHERE \"tenant\" = '{v.this.db.removeprefix('wells_')}'", where
        else:
            assert not tenant_views
    bad = subprocess.run([str(shardlake_bin), "athena-ddl", str(pipeline), "--tenants", "a'b"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--tenants" in bad.stderr, bad.stderr


def test_partition_by_tenant_needs_a_proven_tenant(shardlake_bin, tmp_path):
    p = kinesis_pipeline(tmp_path, "s", max_bytes="64MiB", max_age="1h")
    text, n = re.subn(r"(?m)^outputs:\n", "outputs:\n  partition_by: [tenant]\n", p.read_text())
    assert n == 1
    p.write_text(text)
    r = subprocess.run([str(shardlake_bin), "validate", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r.stdout
    assert "outputs.partition_by" in r.stderr and "identity" in r.stderr, r.stderr
