"""Running shardlake-agent in the tests: starting `shardlake-agent run` with a configuration
(its log appended to a file), stopping it with SIGTERM and reading its summary, and the batch
size the tests' configurations use (duplicates after a SIGKILL are bounded by it).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from harness import pipeline_env

BATCH = 50


def start(agent_bin: Path, config: Path, log: Path) -> subprocess.Popen:
    env = pipeline_env(config.parent, {"RUST_LOG": "info"})
    return subprocess.Popen([str(agent_bin), "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)


def stop_agent(proc: subprocess.Popen, log: Path) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return json.loads(out.strip().splitlines()[-1])
