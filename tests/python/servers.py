"""The local servers the tests talk to, started as processes of their own: moto's server (S3,
SNS, SQS, KMS, DynamoDB), kinesalite (Kinesis for volume; one with a clock the test moves
forward), kinesis-local (Kinesis that reshards as AWS does); putting records on a stream,
also while it is split and merged; and a webhook receiver. conftest.py makes fixtures of the
`serve_*` generators. Mosquitto is in mosquitto.py, the fault-injecting proxy in
faultproxy.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import REPO, free_port, wait_until

# --------------------------------------------------------------------------------------------
# moto's server: S3, SNS and SQS (one process for the session, reset before each test)

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}



@dataclass
class Moto:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment for shardlake: credentials and the endpoint (moto's, or a proxy's)."""
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": endpoint or self.url}

    def client(self, service: str):
        import boto3
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.status


def _moto_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False



def serve_moto(tmp_path_factory):
    """Starts moto's server, yields it, and stops it afterwards."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail(f"moto_server not found next to {sys.executable}; "
                    "install tests/python/requirements.txt (scripts/test does)")
    server = Moto("127.0.0.1", free_port())
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), "-H", server.host, "-p", str(server.port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _moto_up(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# kinesalite: a Kinesis server for volume (one process for the session; tests use streams of
# their own)

SERVERS = REPO / "tests" / "servers"


@dataclass
class Kinesalite:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("kinesis", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(retries={"max_attempts": 10, "mode": "standard"}))


def _node_server(script: str, tmp_path_factory, args: list[str],
                 preload: list[str] = (), env: dict[str, str] | None = None):
    if not (SERVERS / "node_modules").is_dir():
        pytest.fail(f"{SERVERS}/node_modules is missing; run `npm ci --prefix {SERVERS}` "
                    "(scripts/test does)")
    log_path = tmp_path_factory.mktemp(script.split(".")[0]) / "server.log"
    log = open(log_path, "wb")
    requires = [a for p in preload for a in ("--require", str(SERVERS / p))]
    proc = subprocess.Popen(["node", *requires, str(SERVERS / script), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    return proc, log, log_path


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def serve_until_done(name: str, server, proc, log, log_path: Path):
    """Waits for a server's port, yields `server`, and stops the process afterwards."""
    try:
        deadline = time.monotonic() + 60
        while not _port_open(server.host, server.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # kinesis-local can linger on open SubscribeToShard streams.
            proc.kill()
            proc.wait()
        log.close()


def serve_kinesalite(tmp_path_factory, server: Kinesalite, **kw):
    proc, log, log_path = _node_server("kinesalite.js", tmp_path_factory, [str(server.port)], **kw)
    yield from serve_until_done("kinesalite", server, proc, log, log_path)



@dataclass
class ShiftedKinesalite(Kinesalite):
    """A kinesalite whose clock the test moves forward (`shift(seconds)`)."""
    offset_file: Path = Path()

    def shift(self, seconds: float) -> None:
        ms = int(self.offset_file.read_text() or 0) + int(seconds * 1000)
        tmp = self.offset_file.with_suffix(".tmp")
        tmp.write_text(str(ms))
        tmp.replace(self.offset_file)


def serve_shifted_kinesalite(tmp_path_factory):
    offset = tmp_path_factory.mktemp("timeshift") / "offset_ms"
    offset.write_text("0")
    server = ShiftedKinesalite("127.0.0.1", free_port(), offset)
    yield from serve_kinesalite(tmp_path_factory, server, preload=["timeshift.js"],
                                env={**os.environ, "TIMESHIFT_FILE": str(offset)})


def serve_kinesis_local(tmp_path_factory):
    """kinesis-local (npm), the Kinesis server that reshards as AWS does (child shards,
    UpdateShardCount). It binds 0.0.0.0 hard-coded: a copy of its script binds 127.0.0.1."""
    pkg = SERVERS / "node_modules" / "kinesis-local"
    if not pkg.is_dir():
        pytest.fail(f"{pkg} is missing; run `npm ci --prefix {SERVERS}` (scripts/test does)")
    home = tmp_path_factory.mktemp("kinesis-local")
    script = (pkg / "main.js").read_text()
    assert 'em("0.0.0.0")' in script, "kinesis-local changed: its bind address was not found"
    (home / "main.js").write_text(script.replace('em("0.0.0.0")', 'em("127.0.0.1")'))
    (home / "server.json").write_text((pkg / "server.json").read_text())
    server = Kinesalite("127.0.0.1", free_port())
    ms = "50ms"
    env = {**os.environ, "KINESIS_MOCK_PLAIN_PORT": str(server.port),
           "KINESIS_MOCK_TLS_PORT": str(free_port()), "CREATE_STREAM_DURATION": ms,
           "DELETE_STREAM_DURATION": ms, "SPLIT_SHARD_DURATION": ms,
           "MERGE_SHARDS_DURATION": ms, "UPDATE_SHARD_COUNT_DURATION": ms,
           "REGISTER_STREAM_CONSUMER_DURATION": ms, "LOG_LEVEL": "WARN"}
    log_path = home / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["node", "main.js"], cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    yield from serve_until_done("kinesis-local", server, proc, log, log_path)


# --------------------------------------------------------------------------------------------
# Streams on those servers, and putting records on them keyed as the IoT rule does


def create_stream(kinesis, name: str, shards: int) -> None:
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    wait_until(f"stream {name} to be ACTIVE", lambda: kinesis.describe_stream_summary(
        StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")


def _partition_key(line: bytes) -> str:
    try:
        key = json.loads(line).get("device_id")
    except (ValueError, AttributeError):
        key = None
    return key if isinstance(key, str) and key else "unparseable"


def tenant_device_key(line: bytes) -> str:
    """The IoT rule's key, `${topic(2)}/${topic(3)}`: tenant/device, as the topic of an honest
    device's message says (here read from the record itself)."""
    try:
        r = json.loads(line)
        return f"{r['tenant']}/{r['device_id']}"
    except (ValueError, KeyError, TypeError):
        return "unparseable"


def kinesis_records(kinesis, stream: str) -> list[dict]:
    """Every record of every shard of `stream`, from the start."""
    out = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = kinesis.get_records(ShardIterator=it, Limit=10000)
            out.extend(page["Records"])
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            it = page.get("NextShardIterator")
    return out


def put_lines(kinesis, stream: str, lines: list[bytes], key=None) -> list[tuple[bytes, str, str]]:
    """Puts records keyed by device (as the IoT rule does; `key` makes another key of a
    line), 500 a call, in order; returns each record's (bytes, shard id, sequence number) as
    Kinesis assigned them."""
    key = key or _partition_key
    out = []
    for i in range(0, len(lines), 500):
        batch = lines[i:i + 500]
        resp = kinesis.put_records(StreamName=stream, Records=[
            {"Data": line, "PartitionKey": key(line)} for line in batch])
        # A partial failure would reorder a device's records if retried: none is expected
        # from a local server, so it fails the test instead.
        assert resp["FailedRecordCount"] == 0, resp
        out += [(line, r["ShardId"], r["SequenceNumber"]) for line, r in zip(batch, resp["Records"])]
    return out


def put_while_resharding(kinesis, stream: str, lines: list[bytes]) -> tuple[list, list[str]]:
    """Puts `lines` (100 a call, from a thread) on a 3-shard stream, splitting the first shard
    once a third is put and merging the other two once two thirds are; returns what
    `put_lines` returns for all of them and the ids of the three first shards (closed by
    then). Needs a server that reshards as AWS does (kinesis-local)."""
    put: list = []
    errors: list = []

    def produce():
        try:
            for i in range(0, len(lines), 100):
                put.extend(put_lines(kinesis, stream, lines[i:i + 100]))
        except Exception as e:  # noqa: BLE001 - reported by the caller's thread
            errors.append(e)

    def active():
        return kinesis.describe_stream_summary(
            StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"

    shards = {s["ShardId"]: s for s in kinesis.list_shards(StreamName=stream)["Shards"]}
    ids = sorted(shards)
    assert len(ids) == 3, ids
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until("a third of the records to be put",
                   lambda: len(put) >= len(lines) // 3 or errors, timeout=120)
        lo = int(shards[ids[0]]["HashKeyRange"]["StartingHashKey"])
        hi = int(shards[ids[0]]["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=stream, ShardToSplit=ids[0],
                            NewStartingHashKey=str((lo + hi) // 2))
        wait_until("the split to finish", active, timeout=60)
        wait_until("two thirds of the records to be put",
                   lambda: len(put) >= 2 * len(lines) // 3 or errors, timeout=120)
        kinesis.merge_shards(StreamName=stream, ShardToMerge=ids[1], AdjacentShardToMerge=ids[2])
        wait_until("the merge to finish", active, timeout=60)
    finally:
        producer.join(timeout=300)
    assert not producer.is_alive() and not errors, errors
    after = kinesis.list_shards(StreamName=stream)["Shards"]
    closed = [s["ShardId"] for s in after if "EndingSequenceNumber" in s["SequenceNumberRange"]]
    assert sorted(closed) == ids, f"the split and merge should close the 3 first shards: {after}"
    assert len(after) == 6, after
    return put, ids


# --------------------------------------------------------------------------------------------
# A webhook endpoint in the test process


class Receiver:
    """A webhook endpoint: records every POST, answers `status`."""

    def __init__(self, status: int):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    receiver.requests.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
