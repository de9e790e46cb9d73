"""Exactly once in a local lake across crashes: `shardlake run --drain` is SIGKILLed, or aborts
itself at a failpoint of the commit protocol, again and again (crash.py); after each crash
the visible lake has no duplicates, and a final run leaves every output right and no staged
file behind.

Exercises src/checkpoint/commit.rs (the commit protocol), src/checkpoint/ (the local store),
src/sink/local.rs and src/failpoint.rs.
"""

from __future__ import annotations

import time

from crash import crash_runs, simulator_extension
from harness import run_pipeline, simulate, write_test_pipeline
from lake import check_whole_lake, duck, inprogress_files, lake_count
from streamdata import read_stream


def test_sigkill_crash_exactly_once(tmp_path, agent_bin, shardlake_bin, capsys):
    summary = simulate(agent_bin, tmp_path, shards=4, devices=200, readings=1000, seed=23,
                       spikes=8, malformed=20)
    assert summary["readings"] >= 200_000
    stream = read_stream(tmp_path / "stream")
    assert (len(stream.valid), len(stream.invalid)) == (summary["readings"],
                                                        summary["malformed"])
    # Commits every second or 1 MiB, so crashes land between and inside many commits; kills
    # land before, during and after a run's first commit (crash_runs narrows its window, and
    # extends the stream, when this machine gets through it faster than the kills).
    pipeline = write_test_pipeline(tmp_path / "test.yaml", max_bytes="1MiB", max_age="1s")
    lake = tmp_path / "lake"
    con = duck()
    more = simulator_extension(agent_bin, tmp_path, shards=4, devices=200, after=1000,
                               readings=1000, seed=23)
    crashes = crash_runs(shardlake_bin, pipeline, tmp_path, con, lake, valid=len(stream.valid),
                         seed=20260105, staged=lambda: f"{len(inprogress_files(lake))} files",
                         extend=more)
    stream = read_stream(tmp_path / "stream")

    started = time.monotonic()
    run_pipeline(shardlake_bin, pipeline, tmp_path)
    with capsys.disabled():
        print(f"\n[crash test, local lake] {crashes.report()}\n"
              f"  final run: finished in {time.monotonic() - started:.1f}s")
    assert crashes.mid_stream >= 1, "no crash left the lake part-way through the stream"

    assert inprogress_files(lake) == [], inprogress_files(lake)
    con.register("src", stream.table())
    check_whole_lake(con, lake, stream)
    assert lake_count(con, lake, "dead_letter") == summary["malformed"]
