"""The engine's outputs, checked from outside: over a simulated stream, every output of
pipelines/well-telemetry.yaml (readings, dead_letter, late, alerts, well_1m, well_5m_hop) is
what DuckDB computes from the input NDJSON files with an independent validity filter; and a
graceful restart (SIGTERM, then a second run) while windows are open gives the same windows
as one uninterrupted run.

Exercises src/engine/ (mod.rs, merge.rs, sql.rs), src/decode/, src/engine/window.rs and
src/pipeline/ (shutdown, and open windows rebuilt from the checkpoints).
"""

from __future__ import annotations

import datetime as dt
import json

from harness import PIPELINE, pipeline_env, run_pipeline, run_until_read_then_sigterm, simulate
from lake import (check_dead_letter, check_readings_exactly_once, check_record_alerts,
                  check_well_1m, check_well_5m_hop, duck, no_late)
from streamdata import read_stream


def test_aggregates_match_duckdb(tmp_path, agent_bin, shardlake_bin):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=120, readings=300, seed=11,
                       spikes=6, malformed=9)
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)
    stream = read_stream(tmp_path / "stream")
    # The independent filter and the simulator agree on what is malformed.
    assert len(stream.valid) == summary["readings"], (len(stream.valid), summary)
    assert len(stream.invalid) == summary["malformed"], (len(stream.invalid), summary)

    lake = tmp_path / "lake"
    con = duck()
    con.register("src", stream.table())

    check_readings_exactly_once(con, lake, len(stream.valid))
    no_late(con, lake)
    check_dead_letter(con, lake, stream.invalid)
    spikes = check_record_alerts(con, lake)
    assert spikes > 0, "the input has no pressure spike: the alert check would be vacuous"

    windows_1m = check_well_1m(con, lake)
    windows_5m = check_well_5m_hop(con, lake)
    # Every device reports every second for 5 minutes: about 6 minutes' windows each.
    assert windows_1m >= 120 * 5 and windows_5m >= 3 * 5, (windows_1m, windows_5m)


def _reading(device: str, tenant: str, seq: int, t: dt.datetime) -> str:
    return json.dumps({
        "device_id": device, "tenant": tenant, "seq": seq,
        "ts": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
        "barrels_per_s": round(0.5 + (seq % 5) * 0.01, 4),
        "pressure_psi": round(2000.0 + (seq % 7) * 1.5, 2),
        "temp_c": round(70.0 + (seq % 3) * 0.25, 2), "status": "ok",
    }, separators=(",", ":")) + "\n"


def test_graceful_restart_keeps_open_windows(tmp_path, shardlake_bin):
    """A restart in the middle of a stream (SIGTERM: the run commits what it read, then a
    second run continues) must give the same windows as one uninterrupted run.

    The stream is written directly in the local-stream format (stream.json and one NDJSON
    file per shard) so the shards are deliberately uneven: shard 1 holds 50 wells for
    10 minutes (several read chunks), shard 0 one well that is first behind (it holds the
    watermark back, so shard 1's windows are still open at the restart) and then catches up.
    """
    stream = tmp_path / "stream"
    stream.mkdir()
    (stream / "stream.json").write_text('{"shards":2}')
    t0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.timezone.utc)
    sec = dt.timedelta(seconds=1)
    shard0, shard1 = stream / "shardId-000000000000.ndjson", stream / "shardId-000000000001.ndjson"
    with open(shard1, "w") as f:
        for s in range(600):
            for d in range(50):
                f.write(_reading(f"well-b{d:02}", ["acme", "borealis"][d % 2], s + 1,
                                 t0 + s * sec + dt.timedelta(milliseconds=7 * d)))
    first = 121  # shard 0: 10:00:00-10:02:00 before the restart, up to 10:20:00 after it
    with open(shard0, "w") as f:
        for s in range(first):
            f.write(_reading("well-a", "cascade", s + 1, t0 + s * sec))
    total_before = 600 * 50 + first

    run_until_read_then_sigterm(shardlake_bin, PIPELINE, pipeline_env(tmp_path), total_before,
                                timeout=90)

    with open(shard0, "a") as f:
        for s in range(first, 1201):
            f.write(_reading("well-a", "cascade", s + 1, t0 + s * sec))
    run_pipeline(shardlake_bin, PIPELINE, tmp_path)

    data = read_stream(stream)
    assert not data.invalid and len(data.valid) == total_before + 1201 - first
    lake = tmp_path / "lake"
    con = duck()
    con.register("src", data.table())
    check_readings_exactly_once(con, lake, len(data.valid))
    no_late(con, lake)
    check_well_1m(con, lake)
    check_well_5m_hop(con, lake)
