"""The operator's view of a running worker: GET /metrics parsed by the Prometheus client
library's own parser, its counters against the input and the lake; GET /healthz and
`shardlake health`; and a SIGTERM during a busy run, which must end within the shutdown
budget and lose nothing.

Exercises src/ops.rs, src/metrics.rs and src/pipeline/ (shutdown).
"""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families

from harness import (free_port, get, pipeline_env, run_pipeline, run_until_read_then_sigterm,
                     simulate, wait_until, write_test_pipeline)
from lake import check_readings_exactly_once, check_whole_lake, duck, parquet_files
from streamdata import read_stream


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
