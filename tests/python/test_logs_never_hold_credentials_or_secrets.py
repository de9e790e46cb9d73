"""No credential or `${VAR}` value in any log line, at the most verbose log level: a run that
talks to every server (Kinesis, DynamoDB leases, S3 lake, SNS, a webhook whose URL and header
come from variables) with secrets that occur nowhere else; then a configuration error about
a field holding a secret names the field, not the value.

Exercises src/logs.rs and src/config/ (`${VAR}` substitution and its errors), through the
AWS clients (src/aws.rs) and the notifiers (src/notify.rs); and the console's sign-in
(src/console/auth/): no token, cookie value, authorization code or client secret is logged.

NEEDS THE CONSOLE: `test_the_console_never_logs_a_token_cookie_code_or_client_secret`
drives `shardlake console` (built on main) and fails on the console-auth branch alone.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import uuid

from harness import check_run, free_port, pipeline_env, simulate, write_test_pipeline
from oidc import FLEET, Browser, call, console
from servers import AWS_TEST_ENV, Receiver, create_stream, put_lines
from streamdata import interleave


def test_no_credential_or_secret_variable_is_ever_logged(tmp_path, kinesalite, moto, agent_bin,
                                                        shardlake_bin):
    """Every part that talks to a server (Kinesis, DynamoDB leases, S3 lake, SNS, a webhook
    whose URL and header come from variables) at RUST_LOG=trace, with credentials and secrets
    that occur nowhere else; then a configuration error about a field holding a secret."""
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "sk" + uuid.uuid4().hex + uuid.uuid4().hex[:8],
        "AWS_SESSION_TOKEN": "st" + uuid.uuid4().hex * 3,
        "WEBHOOK_TOKEN": "wt" + uuid.uuid4().hex,
        "HOOK_KEY": "hk" + uuid.uuid4().hex,
    }
    kinesis = kinesalite.client()
    name = f"wells-{uuid.uuid4().hex[:8]}"
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    create_stream(kinesis, name, 2)
    moto.client("s3").create_bucket(Bucket=bucket)
    topic = moto.client("sns").create_topic(Name=f"alerts-{uuid.uuid4().hex[:8]}")["TopicArn"]
    summary = simulate(agent_bin, tmp_path / "sim", shards=2, devices=20, readings=60, seed=23,
                       spikes=4, malformed=3)
    put_lines(kinesis, name, interleave(tmp_path / "sim" / "stream"))

    with Receiver(200) as hook:
        notifiers = f"""
notifiers:
  - name: ops-sns
    sns: {{topic_arn: "{topic}"}}
  - name: ops-hook
    webhook:
      url: "${{HOOK_URL}}"
      headers: {{Authorization: "Bearer ${{WEBHOOK_TOKEN}}"}}
"""
        pipeline = write_test_pipeline(
            tmp_path / "secrets.yaml", max_bytes="1MiB", max_age="1s",
            source=f"{{kinesis: {{stream: {name}}}}}", lake=f"{{s3: {{bucket: {bucket}}}}}",
            checkpoints=f"{{dynamodb: {{table: leases-{name}}}}}", extra=notifiers)
        env = pipeline_env(tmp_path / "data", {
            **AWS_TEST_ENV, **secrets, "AWS_ACCESS_KEY_ID": "AKIA" + uuid.uuid4().hex[:16].upper(),
            "AWS_ENDPOINT_URL": moto.url, "AWS_ENDPOINT_URL_KINESIS": kinesalite.url,
            "HOOK_URL": f"{hook.url}?key={secrets['HOOK_KEY']}", "RUST_LOG": "trace"})
        proc = check_run([str(shardlake_bin), "run", str(pipeline), "--drain", "--progress"],
                         env=env, timeout=300)
        requests = list(hook.requests)

    # The secrets were used: the webhook got its token, and the SDK's request-level trace
    # events were on.
    assert requests and all(h["authorization"] == f"Bearer {secrets['WEBHOOK_TOKEN']}"
                            for h, _ in requests), len(requests)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    targets = {e.get("target", "") for e in events if e.get("level") == "TRACE"}
    assert any(t.startswith("aws_smithy_runtime") for t in targets), sorted(targets)[:20]
    assert any(e.get("message") == "run finished" for e in events)
    assert summary["spikes"] > 0
    leaks = {k: v for k, v in secrets.items()
             if v in proc.stdout or v in proc.stderr}
    assert not leaks, f"{sorted(leaks)} found in the run's output ({len(events)} log events)"

    # A secret pasted into a field that rejects it: the error names the field, not the value.
    bad = tmp_path / "bad.yaml"
    bad.write_text(pipeline.read_text()
                   + "    cooldown: ${WEBHOOK_TOKEN}\n")
    out = subprocess.run([str(shardlake_bin), "validate", str(bad)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out
    assert "notifiers[1].cooldown" in out.stderr and "${WEBHOOK_TOKEN}" in out.stderr, out.stderr
    assert secrets["WEBHOOK_TOKEN"] not in out.stdout + out.stderr, out.stderr


def test_the_console_never_logs_a_token_cookie_code_or_client_secret(
        tmp_path, shardlake_bin, oidc_provider):
    """A sign-in through oidc-provider, Bearer requests (good and refused), logout and a
    failed code exchange, at RUST_LOG=trace: the log holds none of the client secret, the
    authorization codes, the state, the session cookie or any token."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    provider = oidc_provider([f"{base}/auth/callback"],
                             client_secret="cs" + uuid.uuid4().hex + uuid.uuid4().hex)
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s",
                                   extra=provider.console_auth())
    tokens = provider.tokens("erin@tenant-e:operators")
    env = {"OIDC_CLIENT_SECRET": provider.client_secret, "RUST_LOG": "trace"}
    with console(shardlake_bin, pipeline, tmp_path / "data", port, env) as proc:
        browser = Browser()
        page = browser.sign_in(f"{base}/auth/login?next={FLEET}", "erin@tenant-e:operators")
        assert page.status == 200, (page.status, page.body)
        callback = next(u for u in browser.visited if u.startswith(f"{base}/auth/callback"))
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)
        session = next(c.value for c in browser.cookies if c.name == "shardlake_session")
        assert call(f"{base}{FLEET}", token=tokens["access_token"])[0] == 200
        assert call(f"{base}{FLEET}", token=tokens["id_token"])[0] == 401
        # A code the issuer never gave: the exchange fails, and its error is logged.
        failing = Browser()
        start = failing.request(f"{base}/auth/login")
        location = urllib.parse.urlsplit(start.headers["location"])
        state = urllib.parse.parse_qs(location.query)["state"][0]
        bad_code = "bc" + uuid.uuid4().hex
        assert failing.request(f"{base}/auth/callback?code={bad_code}&state={state}").status == 401
        assert browser.request(f"{base}/auth/logout", method="POST", data={},
                               headers={"Origin": base}).status == 303
    log = proc.log
    assert "signed in" in log, log[-2000:]
    secrets = {
        "client secret": provider.client_secret,
        "authorization code": query["code"][0],
        "state": query["state"][0],
        "session cookie": session,
        "access token": tokens["access_token"],
        "ID token": tokens["id_token"],
        "unredeemed code": bad_code,
        "state of the failed sign-in": state,
    }
    leaks = sorted(k for k, v in secrets.items() if v in log)
    assert not leaks, f"{leaks} found in the console's log ({len(log.splitlines())} lines)"
