"""Crashing a run again and again: `crash_runs` SIGKILLs `shardlake run --drain` at random
moments or lets it abort itself at a failpoint of the commit protocol (SHARDLAKE_FAILPOINTS),
checks after every crash that the visible lake has no duplicates, and extends the stream
(`simulator_extension`) when the machine drains it before enough kills.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import DEFAULT_START, check_run, pipeline_env
from lake import DeltaLakeView, S3LakeView, lake_count, lake_source

FAILPOINTS = ["after_stage", "after_prepare", "after_publish_file", "after_publish", "after_commit"]


def no_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Crashes:
    kills: int = 0
    aborts: int = 0
    runs: int = 0
    # Crashes that left part of the stream, not none or all of it, in the lake.
    mid_stream: int = 0
    # Times the stream was drained before enough kills, and extended.
    extensions: int = 0
    events: list[str] = field(default_factory=list)

    def report(self) -> str:
        extended = f", the stream extended {self.extensions}×" if self.extensions else ""
        return (f"{self.kills} SIGKILLs, {self.aborts} failpoint aborts, {self.runs} "
                f"runs{extended}:\n" + "\n".join("  " + e for e in self.events))


def simulator_extension(agent_bin: Path, data_dir: Path, *, shards: int, devices: int,
                        after: int, readings: int, seed: int):
    """For `crash_runs(extend=...)`: each call appends `readings` more readings per well to the
    stream `simulate` made with `after` readings per well (same start, wells and seed),
    continuing each well's `seq`, after a 10-minute gap: longer than the widest window, so no
    new reading falls in a window that the drained run already emitted. Returns how many
    readings it added."""
    gap = 600  # steps of 1 s
    step = after

    def extend() -> int:
        nonlocal step
        step += gap
        proc = check_run([str(agent_bin), "simulate", "--stream", str(data_dir / "stream"),
                          "--shards", str(shards), "--devices", str(devices),
                          "--readings", str(readings), "--from-step", str(step),
                          "--start", DEFAULT_START, "--seed", str(seed), "--spikes", "2",
                          "--malformed", "0"], timeout=120)
        step += readings
        return json.loads(proc.stdout.strip().splitlines()[-1])["readings"]

    return extend


def crash_runs(shardlake_bin: Path, pipeline: Path, data_dir: Path, con, lake, *, valid: int,
               seed: int, staged, min_kills: int = 10, env: dict[str, str] | None = None,
               kill_window: tuple[float, float] = (0.3, 4.0), extend=None,
               max_extensions: int = 20) -> Crashes:
    """Runs `shardlake run --drain` until it was SIGKILLed `min_kills` times: every other run
    is killed at a random moment in `kill_window` seconds (around the first commits), the
    others abort themselves at a random failpoint of the commit protocol. After each crash
    the visible lake must have no duplicates. `staged()` describes what is staged but not
    published (temporary files, multipart uploads) for the report.

    How much of the stream a run gets through before its kill depends on the machine's speed
    and load. A killed run that published more than its share of what is left (the rest over
    the kills still to come) shortens the window for the next kills, down to
    `kill_window[0] + 0.2` s. Failpoint runs always get a commit or two through, so a fast
    machine may still drain the stream before `min_kills`. So with `extend()` (see
    `simulator_extension`), more readings are appended, as a producer would, whenever less is
    left unread than twice the most one run has published, and again if a run drained the
    stream all the same; without it, or after `max_extensions`, a drained stream before
    `min_kills` fails the test."""
    checkpoint = data_dir / "state" / "well-telemetry" / "checkpoint.json"
    cmd = [str(shardlake_bin), "run", str(pipeline), "--drain"]
    rng = random.Random(seed)
    out = Crashes()
    longest = kill_window[1]
    visible = 0
    most = 0  # the most readings one run has published so far
    while out.kills < min_kills:
        before = visible
        # A producer keeps ahead of the consumer: with less left unread than twice what one
        # run has published (or nothing, after a run that drained it), the next run might
        # drain the stream before its kill.
        while (extend is not None and out.extensions < max_extensions
               and valid - visible < max(2 * most, 1)):
            added = extend()
            valid += added
            out.extensions += 1
            out.events.append(f"{valid - added - visible} readings left to read: {added} more "
                              f"appended ({valid} in all)")
        out.runs += 1
        assert out.runs <= 4 * min_kills, (
            f"{out.kills} kills in {out.runs - 1} runs:\n" + "\n".join(out.events))
        failpoint = None
        if out.runs % 2 == 0:
            # The process aborts itself at the n-th pass of the point; the kill is a backstop.
            failpoint = f"{rng.choice(FAILPOINTS)}@{rng.randint(1, 2)}"
            delay = kill_window[1] + rng.uniform(2.0, 6.0)
        else:
            delay = rng.uniform(kill_window[0], longest)
        extra = dict(env or {})
        if failpoint:
            extra["SHARDLAKE_FAILPOINTS"] = failpoint
        log_path = data_dir / f"run-{out.runs:02}.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=pipeline_env(data_dir, extra), cwd=data_dir,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=no_core_dumps)
            try:
                rc = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait()
        alive = time.monotonic() - started
        log_text = log_path.read_text(errors="replace")
        if rc == -signal.SIGKILL:
            out.kills += 1
            how = f"SIGKILL after {alive:.2f}s" + (f" (failpoint {failpoint} not reached)"
                                                  if failpoint else "")
        elif rc == -signal.SIGABRT and failpoint:
            point = failpoint.split("@")[0]
            assert f"failpoint {point} reached" in log_text, log_text[-3000:]
            out.aborts += 1
            how = f"aborted at failpoint {failpoint} after {alive:.2f}s"
        elif rc == 0:
            how = f"finished (exit 0) after {alive:.2f}s" + (
                f" without reaching failpoint {failpoint}" if failpoint else "")
        else:
            pytest.fail(f"run {out.runs} ({failpoint or 'no failpoint'}) exited {rc}:\n"
                        f"{log_text[-4000:]}")

        # After every crash: what is visible has no duplicates.
        if isinstance(lake, (S3LakeView, DeltaLakeView)):
            lake.refresh()
        visible = lake_count(con, lake, "readings")
        src = lake_source(lake, "readings")
        if src:
            dups = con.execute(
                f"SELECT count(*) - count(DISTINCT (device_id, seq)) FROM {src}").fetchall()[0][0]
            assert dups == 0, f"after run {out.runs} ({how}) readings has {dups} duplicates"
        src_1m = lake_source(lake, "well_1m")
        if src_1m:
            dups = con.execute(f"""SELECT count(*) - count(DISTINCT (window_start, device_id))
                                   FROM {src_1m}""").fetchall()[0][0]
            assert dups == 0, f"after run {out.runs} ({how}) well_1m has {dups} duplicate windows"
        if rc != 0 and 0 < visible < valid:
            out.mid_stream += 1
        state = json.loads(checkpoint.read_text()) if checkpoint.exists() else None
        commit = state["committed"]["commit_id"] if state else 0
        pending = bool(state and state.get("pending"))
        out.events.append(
            f"run {out.runs:2}: {how}; checkpoint: commit {commit}"
            f"{', intent pending' if pending else ''}; {staged()} staged; "
            f"{visible} readings visible")
        most = max(most, visible - before)
        if rc == -signal.SIGKILL and not failpoint and out.kills < min_kills:
            share = (valid - before) / (min_kills - out.kills + 1)
            if visible - before > share and longest > kill_window[0] + 0.2:
                longest = max(kill_window[0] + 0.2, longest * 0.6)
                out.events.append(f"that run published more than its share ({share:.0f}): "
                                  f"kills now within {longest:.2f}s")
        if rc == 0 and extend is not None and out.extensions < max_extensions:
            out.events.append(f"the stream drained after {out.kills} kills")
            continue  # extended at the top of the loop
        if rc == 0:
            pytest.fail(
                f"the stream was drained after only {out.kills} kills (need {min_kills}); "
                f"simulate more readings or kill earlier:\n" + "\n".join(out.events))
    return out
