"""The operator's view of a running worker: GET /metrics parsed by the Prometheus client
library's own parser, its counters against the input and the lake; GET /healthz; and a
SIGTERM during a busy run, which must end within the shutdown budget and lose nothing; and
no credential or `${VAR}` value in any log line, at the most verbose log level.
"""

from __future__ import annotations

import json
import subprocess
import uuid

from prometheus_client.parser import text_string_to_metric_families

from harness import (check_run, free_port, get, pipeline_env, run_pipeline,
                     run_until_read_then_sigterm, simulate, wait_until, write_test_pipeline)
from lake import check_readings_exactly_once, check_whole_lake, duck, parquet_files
from servers import AWS_TEST_ENV, Receiver, create_stream, put_lines
from streamdata import interleave, read_stream


def scrape(base: str) -> dict[tuple, float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    status, ctype, text = get(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_healthz_match_the_run(tmp_path, agent_bin, shardlake_bin):
    summary = simulate(agent_bin, tmp_path, shards=2, devices=50, readings=200, seed=13,
                       spikes=2, malformed=7)
    stream = read_stream(tmp_path / "stream")
    total, valid = len(stream.valid) + len(stream.invalid), len(stream.valid)
    assert (valid, len(stream.invalid)) == (summary["readings"], summary["malformed"])
    pipeline = write_test_pipeline(tmp_path / "ops.yaml", max_bytes="1MiB", max_age="1s")
    base = f"http://127.0.0.1:{free_port()}"
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--listen", base[7:]],
                            env=pipeline_env(tmp_path), stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until("/healthz to say ready", lambda: get(f"{base}/healthz")[0] == 200, timeout=60)
        assert get(f"{base}/nothing-here")[0] == 404
        # The container health check (no curl in the image) asks the same question.
        health = [str(shardlake_bin), "health", "--listen", base[7:]]
        assert subprocess.run(health, timeout=30).returncode == 0

        def rows(m: dict, output: str) -> float:
            return m.get(("shardlake_output_rows_total", (("output", output),)), 0)

        def settled():
            m = scrape(base)
            done = (m[("shardlake_records_read_total", ())] == total
                    and rows(m, "readings") == valid
                    and rows(m, "dead_letter") == len(stream.invalid))
            return m if done else None
        m = wait_until("every record read and committed", settled, timeout=120, every=0.5)
        assert m[("shardlake_dead_letters_total", ())] == len(stream.invalid)
        assert m[("shardlake_ready", ())] == 1
        files = len(parquet_files(tmp_path / "lake", "readings"))
        assert m[("shardlake_output_files_total", (("output", "readings"),))] == files
        commits = m[("shardlake_commits_total", ())]
        assert commits >= 1
        assert m[("shardlake_commit_duration_seconds_count", ())] == commits
        assert m[("shardlake_commit_duration_seconds_bucket", (("le", "+Inf"),))] == commits
        assert m[("shardlake_commit_duration_seconds_sum", ())] > 0
    finally:
        proc.terminate()
        rc = proc.wait(timeout=60)
        log.close()
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert subprocess.run(health, timeout=30).returncode == 1, "healthy with no worker running"
    con = duck()
    con.register("src", stream.table())
    check_readings_exactly_once(con, tmp_path / "lake", valid)


def test_sigterm_during_a_busy_run_ends_within_the_budget(tmp_path, agent_bin, shardlake_bin,
                                                          capsys):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=200, readings=1000, seed=19,
                       spikes=6, malformed=10)
    stream = read_stream(tmp_path / "stream")
    assert len(stream.valid) == summary["readings"]
    pipeline = write_test_pipeline(tmp_path / "busy.yaml", max_bytes="64MiB", max_age="60s")
    # Big files and a long age: SIGTERM finds a whole minute of uncommitted work to flush.
    budget = 10
    took = run_until_read_then_sigterm(shardlake_bin, pipeline, pipeline_env(tmp_path),
                                       len(stream.valid) // 2, at_least=True,
                                       args=("--shutdown-budget", str(budget)))
    assert took < budget, f"the run took {took:.1f}s to stop; the budget is {budget}s"
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    con = duck()
    con.register("src", stream.table())
    check_whole_lake(con, tmp_path / "lake", stream)
    with capsys.disabled():
        print(f"\n[SIGTERM] a busy run stopped in {took:.2f}s (budget {budget}s), committing "
              "what it had read; the restart found nothing lost or duplicated")


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
