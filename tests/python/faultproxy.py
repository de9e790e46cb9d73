"""A small HTTP/1.1 fault-injecting proxy between an AWS SDK and a local server.

No local server throttles, answers 5xx or drops connections, so the tests put this proxy in
front of one (the SDK's endpoint is the proxy's URL) and let it spoil a share of the
requests. Each request, with probability `rate`, gets one of the `kinds`:

- `slowdown`: answered `503 SlowDown` (S3's throttling error) without reaching the server;
- `internal`: answered `500 InternalError` without reaching the server;
- `reset_before`: the connection is reset (RST) before the request reaches the server;
- `reset_after`: the request is forwarded and takes effect, then the connection is reset
  instead of the answer: the client cannot know whether it happened, the hardest case;
- `putrecords_partial`: a Kinesis PutRecords whose request is cut after a random record: the
  records before the cut are forwarded and take effect, the rest are answered as failed
  (`ProvisionedThroughputExceededException`) in a 200 answer, as Kinesis does when part of a
  batch is throttled;
- any other kind registered in `RESPONSES` (status, headers, body), e.g. Kinesis throttling.

A kind listed several times in `kinds` is picked that much more often. Everything else is
forwarded as is (the SDK signs the Host header; servers here do not check
signatures). Counters say what was injected, so a test can show every kind happened.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_SLOWDOWN = (
    503,
    {"Content-Type": "application/xml"},
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>",
)
S3_INTERNAL = (
    500,
    {"Content-Type": "application/xml"},
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>",
)

KINESIS_JSON = {"Content-Type": "application/x-amz-json-1.1"}

# Canned answers by kind; tests may add their own.
RESPONSES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "slowdown": S3_SLOWDOWN,
    "internal": S3_INTERNAL,
    "kinesis_throttled": (400, KINESIS_JSON,
                          b'{"__type":"ProvisionedThroughputExceededException",'
                          b'"message":"Rate exceeded for shard (faultproxy)"}'),
    "kinesis_limit": (400, KINESIS_JSON,
                      b'{"__type":"LimitExceededException",'
                      b'"message":"Rate exceeded for stream (faultproxy)"}'),
    "kinesis_internal": (500, KINESIS_JSON,
                         b'{"__type":"InternalFailure","message":"faultproxy"}'),
    "dynamodb_throttled": (400, {"Content-Type": "application/x-amz-json-1.0"},
                           b'{"__type":"com.amazonaws.dynamodb.v20120810#'
                           b'ProvisionedThroughputExceededException","message":"The level of '
                           b'configured provisioned throughput for the table was exceeded '
                           b'(faultproxy)"}'),
    "dynamodb_internal": (500, {"Content-Type": "application/x-amz-json-1.0"},
                          b'{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError",'
                          b'"message":"Internal server error (faultproxy)"}'),
    "dynamodb_denied": (400, {"Content-Type": "application/x-amz-json-1.0"},
                        b'{"__type":"com.amazon.coral.service#AccessDeniedException",'
                        b'"Message":"User: arn:aws:sts::123456789012:assumed-role/shardlake-task '
                        b'is not authorized to perform: dynamodb:CreateTable (faultproxy)"}'),
}
RESETS = ("reset_before", "reset_after")
PARTIAL = "putrecords_partial"
# A cancelled DynamoDB transaction (nothing written) whose first item was throttled, as real
# DynamoDB answers and moto never does; its CancellationReasons has one entry per item.
TXN_CANCELLED = "dynamodb_txn_cancelled"
# Kinds that only make sense for one operation: other requests never get them, and that
# operation's requests get no other kind.
KIND_TARGETS = {TXN_CANCELLED: "DynamoDB_20120810.TransactWriteItems"}

# Hop-by-hop headers (RFC 9110 section 7.6.1) are the proxy's own, not forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade"}


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, rate: float,
                 kinds: list[str], seed: int = 0, target: str | None = None,
                 target_rates: dict[str, float] | None = None):
        """`target`: spoil only requests with this `X-Amz-Target` header (one operation of a
        JSON-protocol service, e.g. `DynamoDB_20120810.CreateTable`). `target_rates`: another
        rate for the requests of some operations."""
        for k in kinds:
            if k not in RESPONSES and k not in RESETS and k not in (PARTIAL, TXN_CANCELLED):
                raise ValueError(f"unknown fault kind {k!r}")
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate
        self.target_rates = dict(target_rates or {})
        self.kinds = list(kinds)
        self.target = target
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        # Requests seen per X-Amz-Target (JSON-protocol operations).
        self.targets: Counter[str] = Counter()
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (ConnectionError, socket.timeout):
                    self.close_connection = True

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def summary(self) -> str:
        with self._lock:
            return f"{self.forwarded} forwarded, injected {dict(sorted(self.injected.items()))}"

    # ----------------------------------------------------------------------------------------

    def _pick(self, target: str | None = None) -> str | None:
        with self._lock:
            if target:
                self.targets[target] += 1
            rate = self.target_rates.get(target or "", self.rate)
            if (self.target is None or target == self.target) and self._rng.random() < rate:
                # An operation with kinds of its own gets only those.
                kinds = ([k for k in self.kinds if KIND_TARGETS.get(k) == target]
                         or [k for k in self.kinds if k not in KIND_TARGETS])
                if kinds:
                    kind = self._rng.choice(kinds)
                    self.injected[kind] += 1
                    return kind
            self.forwarded += 1
            return None

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailers until the empty line.
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Closes the client connection with an RST (SO_LINGER 0), not a FIN."""
        h.close_connection = True
        try:
            h.wfile.flush()
        except OSError:
            pass
        sock = h.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, headers, body: bytes,
                head: bool = False) -> None:
        h.send_response_only(status)
        length_sent = False
        for k, v in headers:
            if k.lower() in HOP_BY_HOP:
                continue
            if k.lower() == "content-length":
                if not head:
                    continue
                length_sent = True
            h.send_header(k, v)
        if not head or not length_sent:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
        h.wfile.flush()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        kind = self._pick(h.headers.get("X-Amz-Target"))
        if kind == "reset_before":
            self._reset(h)
            return
        cut = None
        if kind == PARTIAL:
            if h.headers.get("X-Amz-Target", "").endswith(".PutRecords"):
                request = json.loads(body)
                records = request["Records"]
                cut = self._rng.randrange(len(records)) if records else 0
                body = json.dumps({**request, "Records": records[:cut]}).encode()
                failed = len(records) - cut
                if cut == 0:
                    # Nothing to forward (Kinesis refuses an empty PutRecords): all failed.
                    answer = {"FailedRecordCount": failed, "Records": [
                        {"ErrorCode": "ProvisionedThroughputExceededException",
                         "ErrorMessage": "Rate exceeded for shard (faultproxy)"}] * failed}
                    self._answer(h, 200, list(KINESIS_JSON.items()),
                                 json.dumps(answer).encode())
                    return
            else:
                kind = None
        if kind == TXN_CANCELLED:
            items = len(json.loads(body).get("TransactItems", [])) or 1
            reasons = [{"Code": "ThrottlingError", "Message": "Throughput exceeds the current "
                        "capacity of your table or index (faultproxy)"}]
            reasons += [{"Code": "None"}] * (items - 1)
            answer = {"__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
                      "Message": "Transaction cancelled, please refer cancellation reasons for "
                                 "specific reasons [" + ", ".join(r["Code"] for r in reasons)
                                 + "]",
                      "CancellationReasons": reasons}
            self._answer(h, 400, [("Content-Type", "application/x-amz-json-1.0")],
                         json.dumps(answer).encode())
            return
        if kind in RESPONSES:
            status, headers, payload = RESPONSES[kind]
            self._answer(h, status, list(headers.items()), payload,
                         head=h.command == "HEAD")
            return
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
        if body or h.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            status, resp_headers = resp.status, resp.getheaders()
        finally:
            conn.close()
        if kind == "reset_after":
            self._reset(h)
            return
        if cut is not None and status == 200:
            answer = json.loads(payload)
            answer["Records"] = answer.get("Records", [])[:cut] + [
                {"ErrorCode": "ProvisionedThroughputExceededException",
                 "ErrorMessage": "Rate exceeded for shard (faultproxy)"}] * failed
            answer["FailedRecordCount"] = answer.get("FailedRecordCount", 0) + failed
            payload = json.dumps(answer).encode()
        self._answer(h, status, resp_headers, payload, head=h.command == "HEAD")
