"""Alerts delivered where people see them: an SNS topic (moto's server, read back through an
SQS queue subscribed to it) and webhooks (HTTP servers in the test). The expected messages
are computed from the input (and the lake's alerts table for window-level rules) with the
documented cooldown: per notifier, rule and device, an alert is sent when its event time is
at least the cooldown after the last one sent. A webhook that fails is retried, reported and
never stops the run; its token reaches the receiver and nothing else.

Exercises src/notify.rs (with the alerts table written by src/engine/).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from harness import check_run, pipeline_env, write_test_pipeline
from lake import check_record_alerts, duck, lake_source
from servers import Receiver
from streamdata import read_stream, rfc3339_to_us

T0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.timezone.utc)
MINUTES = 17
TOKEN = "s3cr3t-t0ken-9f8e7d"


def reading(device: str, seq: int, t: dt.datetime, pressure: float) -> str:
    return json.dumps({
        "device_id": device, "tenant": "acme", "seq": seq,
        "ts": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
        "barrels_per_s": 0.5, "pressure_psi": pressure, "temp_c": 70.0, "status": "ok",
    }, separators=(",", ":")) + "\n"


def write_stream(stream: Path) -> None:
    """Two shards, a reading a second per well for 17 minutes: a stuck sensor above 5000 psi
    the whole time, a flaky one with a few spikes, and quiet wells."""
    stream.mkdir()
    (stream / "stream.json").write_text('{"shards":2}')
    flaky_spikes = {30, 200, 340, 345, 700, 1001}
    with open(stream / "shardId-000000000000.ndjson", "w") as f:
        for s in range(MINUTES * 60):
            f.write(reading("well-stuck", s + 1, T0 + dt.timedelta(seconds=s), 6100.0))
    with open(stream / "shardId-000000000001.ndjson", "w") as f:
        for s in range(MINUTES * 60):
            t = T0 + dt.timedelta(seconds=s)
            f.write(reading("well-flaky", s + 1, t, 5600.0 if s in flaky_spikes else 2000.0))
            for d in range(3):
                f.write(reading(f"well-quiet-{d}", s + 1, t + dt.timedelta(milliseconds=d),
                                2000.0 + (s % 7)))


def with_cooldown(alerts: list[tuple[str, str, int]], cooldown_us: int) -> set:
    """(rule, device, event time) sent by a notifier with this cooldown."""
    last: dict[tuple[str, str], int] = {}
    sent = set()
    for rule, device, t in sorted(alerts, key=lambda a: a[2]):
        prev = last.get((rule, device))
        if prev is None or t >= prev + cooldown_us:
            last[(rule, device)] = t
            sent.add((rule, device, t))
    return sent


def parse_body(body: bytes | str) -> tuple[str, str, int]:
    msg = json.loads(body)
    assert msg["pipeline"] == "well-telemetry" and msg["kind"] in ("record", "window"), msg
    t = rfc3339_to_us(msg["event_time"])
    assert t is not None and msg["event_time"].endswith("Z"), msg
    assert isinstance(msg["detail"], dict), msg
    return msg["rule"], msg["device"], t


def drain_queue(sqs, url: str) -> list[dict]:
    out = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                  MessageAttributeNames=["All"]).get("Messages", [])
        if not got:
            return out
        out += got
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])


def test_alerts_reach_sns_and_webhooks_once_per_cooldown(tmp_path, moto, shardlake_bin):
    sns, sqs = moto.client("sns"), moto.client("sqs")
    topic = sns.create_topic(Name="well-alerts")["TopicArn"]
    queue = sqs.create_queue(QueueName="ops-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    write_stream(tmp_path / "stream")

    with Receiver(200) as hook, Receiver(503) as broken:
        notifiers = f"""
notifiers:
  - name: ops-sns
    sns: {{topic_arn: "{topic}"}}
    rules: [pressure_spike]
    cooldown: 5m
  - name: ops-hook
    webhook:
      url: {hook.url}
      headers: {{Authorization: "Bearer ${{WEBHOOK_TOKEN}}", X-Team: wells}}
    cooldown: 2m
  - name: broken-hook
    webhook: {{url: {broken.url}}}
    rules: [pressure_spike]
    cooldown: 5m
"""
        pipeline = write_test_pipeline(tmp_path / "alerts.yaml", max_bytes="128MiB",
                                       max_age="5m", extra=notifiers)
        env = pipeline_env(tmp_path, {**moto.env(), "WEBHOOK_TOKEN": TOKEN})
        proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain"], env=env,
                         timeout=300)
        hook_requests, broken_requests = list(hook.requests), list(broken.requests)

    # The alerts table is complete whatever the notifiers did.
    stream = read_stream(tmp_path / "stream")
    con = duck()
    con.register("src", stream.table())
    lake = tmp_path / "lake"
    spikes = check_record_alerts(con, lake)
    assert spikes == MINUTES * 60 + 6, spikes
    record_alerts = [("pressure_spike", r["device_id"], r["ts_us"])
                     for r in stream.valid if r["pressure_psi"] > 5000]
    table = [tuple(r) for r in con.execute(
        f"SELECT rule, key, epoch_us(event_time) FROM {lake_source(lake, 'alerts')}").fetchall()]

    # SNS, through the subscribed queue: one message per device per 5 minutes of spikes.
    expected_sns = with_cooldown(record_alerts, 5 * 60_000_000)
    assert {d for _, d, _ in expected_sns} == {"well-stuck", "well-flaky"}
    messages = drain_queue(sqs, queue)
    got_sns = []
    for m in messages:
        envelope = json.loads(m["Body"])
        rule, device, t = parse_body(envelope["Message"])
        assert envelope["Subject"] == f"shardlake alert: {rule} on {device}", envelope
        attrs = {k: v["Value"] for k, v in envelope["MessageAttributes"].items()}
        assert attrs == {"rule": rule, "device": device}, attrs
        got_sns.append((rule, device, t))
    assert len(got_sns) == len(set(got_sns)), f"an SNS message arrived twice: {got_sns}"
    assert set(got_sns) == expected_sns, (sorted(got_sns), sorted(expected_sns))

    # The webhook takes every rule (window-level ones too), with a 2-minute cooldown.
    expected_hook = with_cooldown(table, 2 * 60_000_000)
    got_hook = []
    for headers, body in hook_requests:
        assert headers.get("authorization") == f"Bearer {TOKEN}", headers
        assert headers.get("x-team") == "wells" and headers.get(
            "content-type") == "application/json", headers
        got_hook.append(parse_body(body))
    assert len(got_hook) == len(set(got_hook)), "a webhook alert arrived twice"
    assert set(got_hook) == expected_hook, (sorted(got_hook), sorted(expected_hook))
    assert len(expected_hook) > len(with_cooldown(record_alerts, 2 * 60_000_000)), (
        "no window-level alert: the unfiltered notifier was not tested on them")

    # The failing webhook: retried (5 attempts for the first alert, then one each while it
    # is down), reported, and the run still finished and committed.
    failing = with_cooldown(record_alerts, 5 * 60_000_000)
    assert len(broken_requests) == 5 + len(failing) - 1, (len(broken_requests), len(failing))
    logs = [json.loads(line) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
            if line.startswith("{")]

    def fields(entry):
        return {**entry, **entry.get("fields", {})}

    failures = [fields(e) for e in logs
                if "notifier failed" in fields(e).get("message", "")
                and fields(e).get("level") == "WARN"]
    assert {e.get("notifier") for e in failures} == {"broken-hook"}, failures
    assert len(failures) == len(failing), (len(failures), len(failing))
    closed = [fields(e) for e in logs if fields(e).get("message") == "notifiers closed"]
    assert len(closed) == 1, closed
    assert closed[0]["failed"] == len(failing), closed
    assert closed[0]["sent"] == len(got_sns) + len(got_hook), closed

    # The token reached the receiver and nothing else: not the logs, not the data directory.
    assert TOKEN not in proc.stdout + proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"the webhook token is in {path}"
