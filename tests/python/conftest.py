"""The pytest fixtures of the Python half of the test suite: the two binaries and the local
servers. Everything else the tests share is in helper modules:

- harness.py: running the binaries (environment, simulate, test pipelines, SIGTERM) and polling;
- streamdata.py: the input, parsed independently of shardlake;
- lake.py: the lake read with DuckDB and pyarrow and checked against the input;
- crash.py: crashing a run again and again (SIGKILL, failpoints);
- servers.py: moto, kinesalite, kinesis-local, putting records on Kinesis, a webhook receiver;
- agents.py: starting and stopping shardlake-agent;
- mosquitto.py, faultproxy.py: the MQTT broker and the fault-injecting HTTP proxy;
- oidc.py: the console's sign-in servers (oidc-provider, Cognito pools on moto) and a
  browserless sign-in.

These tests treat the shardlake binaries as black boxes: they generate a local stream with
`shardlake-agent simulate`, run `shardlake run ... --drain` over it, and check the lake with
independent readers (DuckDB, pyarrow) against expectations computed from the input NDJSON
files, never from shardlake's own output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The helpers' asserts explain their failures as the tests' own do.
pytest.register_assert_rewrite("agents", "crash", "harness", "lake", "oidc", "servers",
                                "streamdata")

from harness import find_binary, free_port  # noqa: E402
from oidc import start_oidc  # noqa: E402
from servers import (Kinesalite, Moto, serve_kinesalite, serve_kinesis_local,  # noqa: E402
                     serve_moto, serve_shifted_kinesalite)


@pytest.fixture(scope="session")
def shardlake_bin() -> Path:
    return find_binary("SHARDLAKE_BIN", "shardlake")


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    return find_binary("SHARDLAKE_AGENT_BIN", "shardlake-agent")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    yield from serve_moto(tmp_path_factory)


@pytest.fixture
def moto(moto_server) -> Moto:
    """moto's server with nothing in it."""
    moto_server.reset()
    return moto_server


@pytest.fixture(scope="session")
def kinesalite(tmp_path_factory):
    yield from serve_kinesalite(tmp_path_factory, Kinesalite("127.0.0.1", free_port()))


@pytest.fixture
def shifted_kinesalite(tmp_path_factory):
    """A kinesalite of its own whose clock the test moves forward (`shift(seconds)`)."""
    yield from serve_shifted_kinesalite(tmp_path_factory)


@pytest.fixture(scope="session")
def kinesis_local(tmp_path_factory):
    """kinesis-local (npm), the Kinesis server that reshards as AWS does (child shards,
    UpdateShardCount)."""
    yield from serve_kinesis_local(tmp_path_factory)


@pytest.fixture
def oidc_provider(tmp_path_factory):
    """Starts oidc-provider (tests/servers/oidc.js) for a test:
    `oidc_provider(redirect_uris, ttl_seconds=..., client_secret=...)`; each one started is
    stopped after the test."""
    started = []

    def start(redirect_uris, **kw):
        server = start_oidc(tmp_path_factory, redirect_uris, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
