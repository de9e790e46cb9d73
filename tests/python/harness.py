"""Running the shardlake binaries as black boxes: finding them, their environment, running a
command and failing the test with its output, simulating a stream, writing a test pipeline,
stopping a run with SIGTERM once it has read so much, its JSON log, and polling.

The binaries come from SHARDLAKE_BIN / SHARDLAKE_AGENT_BIN (scripts/test sets them), or
target/debug/ by default.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "well-telemetry.yaml"
SCHEMA = REPO / "schemas" / "well-reading.yaml"
DEFAULT_START = "2026-01-05T10:00:00Z"


def find_binary(env_var: str, name: str) -> Path:
    value = os.environ.get(env_var)
    if value:
        path = Path(value)
        if not path.is_absolute():
            # scripts/test passes paths relative to the repository root.
            path = (Path.cwd() / path) if (Path.cwd() / path).exists() else (REPO / path)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        if not target.is_absolute():
            target = REPO / target
        path = target / "debug" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{name} binary not found at {path}; run `cargo build --bins` or set {env_var}")
    return path.resolve()


# --------------------------------------------------------------------------------------------
# Running the binaries


def pipeline_env(data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SHARDLAKE_FAILPOINTS", None)
    env["SHARDLAKE_DATA"] = str(data_dir)
    env["SHARDLAKE_LOG_FORMAT"] = "json"
    env.setdefault("RUST_BACKTRACE", "1")
    if extra:
        env.update(extra)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def check_run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs a command; fails the test with its output when it does not exit 0."""
    proc = subprocess.run(cmd, env=env, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"command failed with exit status {proc.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )
    return proc


def simulate(agent_bin: Path, data_dir: Path, *, shards: int, devices: int, readings: int,
             seed: int, spikes: int, malformed: int, start: str = DEFAULT_START,
             jitter_ms: int | None = None) -> dict:
    """Simulates wells into DATA/stream; returns the simulator's JSON summary."""
    cmd = [str(agent_bin), "simulate", "--stream", str(data_dir / "stream"),
           "--shards", str(shards), "--devices", str(devices), "--readings", str(readings),
           "--start", start, "--seed", str(seed), "--spikes", str(spikes),
           "--malformed", str(malformed)]
    if jitter_ms is not None:
        cmd += ["--jitter-ms", str(jitter_ms)]
    proc = check_run(cmd, timeout=120)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"readings", "spikes", "malformed"}, summary
    return summary


def run_pipeline(shardlake_bin: Path, pipeline: Path, data_dir: Path, *,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return check_run([str(shardlake_bin), "run", str(pipeline), "--drain"],
                     env=pipeline_env(data_dir), timeout=timeout)


def write_test_pipeline(dest: Path, *, max_bytes: str, max_age: str, lake: str | None = None,
                        source: str | None = None, checkpoints: str | None = None,
                        extra: str = "") -> Path:
    """The shipped pipeline with an absolute schema path and another rollover; `lake`,
    `source` and `checkpoints` (flow YAML, e.g. `{s3: {bucket: b}}`) replace its own, `extra`
    is appended (top-level keys)."""
    text = PIPELINE.read_text()
    text, n_schema = re.subn(r"(?m)^schema:.*$", f"schema: {SCHEMA}", text)
    text, n_roll = re.subn(r"(?m)^rollover:\n(?:[ \t]+\S.*\n)+",
                           f"rollover: {{max_bytes: {max_bytes}, max_age: {max_age}}}\n", text)
    n_lake = 1
    if lake is not None:
        text, n_lake = re.subn(r"(?m)^lake:\n(?:[ \t]+\S.*\n)+", f"lake: {lake}\n", text)
    n_source = 1
    if source is not None:
        text, n_source = re.subn(r"(?m)^source:\n(?:[ \t]+\S.*\n)+", f"source: {source}\n",
                                 text)
    n_checkpoints = 1
    if checkpoints is not None:
        text, n_checkpoints = re.subn(r"(?m)^checkpoints:\n(?:[ \t]+\S.*\n)+",
                                      f"checkpoints: {checkpoints}\n", text)
    assert (n_schema, n_roll, n_lake, n_source, n_checkpoints) == (1, 1, 1, 1, 1), (
        "pipelines/well-telemetry.yaml changed shape")
    dest.write_text(text + extra)
    return dest


def kinesis_pipeline(tmp_path, stream: str, **kw):
    return write_test_pipeline(tmp_path / "kinesis.yaml", source=f"{{kinesis: {{stream: {stream}}}}}",
                               **kw)


def run_until_read_then_sigterm(shardlake_bin: Path, pipeline: Path, env: dict[str, str],
                                records: int, timeout: float = 120,
                                at_least: bool = False, args: tuple[str, ...] = ()) -> float:
    """Runs `shardlake run --progress` until it has read `records` records (its progress
    line, every second, says how many; `at_least`: or more, when reads come in bigger steps
    than the stream's tail), then stops it with SIGTERM: it must commit what it read and
    exit 0. Returns the seconds from SIGTERM to its exit."""
    proc = subprocess.Popen([str(shardlake_bin), "run", str(pipeline), "--progress", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        read = 0
        for line in proc.stderr:
            m = re.match(r"records (\d+)", line)
            if m:
                read = int(m.group(1))
                if read >= records:
                    break
            assert time.monotonic() < deadline, f"only {read} of {records} records read"
        assert read == records or (at_least and read > records), (
            f"the run read {read} records, not {records}")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        proc.stderr.read()
        assert proc.wait(timeout=60) == 0, "the run did not shut down cleanly on SIGTERM"
        return time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def run_log(proc) -> list[dict]:
    """The JSON log lines of a finished run, each with its fields at the top level."""
    out = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            out.append({**entry, **entry.get("fields", {})})
    return out


# --------------------------------------------------------------------------------------------
# Polling, ports and plain HTTP


def get(url: str) -> tuple[int, str, str]:
    """GET: (status, Content-Type, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()
    except OSError:
        return 0, "", ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, timeout: float = 60.0, every: float = 0.1):
    """Polls `check()` until it returns a true value (returned), or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
