#!/usr/bin/env python3
"""One tenant floods the stream: how late are the other tenants' alerts?

A writer appends live readings (event time = now) of three tenants to a local stream, as
IoT Core's rule would put them on Kinesis: 50 wells each, keyed by device, 4 shards.
`shardlake run` reads it with a record alert (`pressure_psi >= 9000`) sent to a webhook
this script serves; each tenant gets a few spikes a second. The latency of an alert is the
time it reaches the webhook minus its reading's event time.

Two phases in one run, one pipeline process throughout: every tenant at `--rate` readings/s,
then the first tenant (`acme`) at 10× while the others stay as they were. The table compares
the others' latency in the two phases: the issue's bound is that a flood does not delay
another tenant's alerts by more than the normal latency.

    .venv/bin/python benches/tenant_flood.py [--rate 1500] [--seconds 30] \\
        [--shardlake target/release/shardlake]

Tenants share shards (a device's shard is the hash of its key), so a flood beyond what the
pipeline or the stream can take delays everyone on those shards: this measures how much
headroom the engine leaves, not an isolation the stream cannot give.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARDS = 4
TENANTS = ["acme", "borealis", "cygnus"]
WELLS = 50
FLOOD = 10


def shard_for_key(key: str, shards: int) -> int:
    """The local stream's routing (src/localstream.rs): MD5 over equal hash-key ranges."""
    h = int.from_bytes(hashlib.md5(key.encode()).digest(), "big")
    return ((h >> 64) * shards) >> 64


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[float, dict]] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        at = time.time()
        with Receiver.lock:
            Receiver.received.append((at, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def pipeline(tmp: Path, webhook: str) -> Path:
    text = f"""
name: tenant-flood
schema: {REPO / 'schemas/well-reading.yaml'}
source: {{local: {{path: "{tmp / 'stream'}"}}}}
lake: {{local: {{path: "{tmp / 'lake'}"}}}}
checkpoints: {{local: {{path: "{tmp / 'state'}"}}}}
event_time: {{field: ts, allowed_lateness: 30s, idle_shard_timeout: 60s}}
rollover: {{max_bytes: 128MiB, max_age: 10s}}
outputs:
  raw: {{name: readings}}
  aggregations:
    - name: well_1m
      window: {{size: 1m}}
      sql: |
        SELECT window_start, window_end, tenant, device_id, count(*) AS readings,
               max(pressure_psi) AS pressure_max, avg(pressure_psi) AS pressure_avg
        FROM records GROUP BY window_start, window_end, tenant, device_id
alerts:
  - name: pressure_spike
    when: pressure_psi >= 9000
notifiers:
  - name: bench
    webhook: {{url: "{webhook}"}}
    cooldown: 0s
"""
    path = tmp / "tenant-flood.yaml"
    path.write_text(text)
    return path


class Writer(threading.Thread):
    """Appends each tenant's readings at its rate, in 50 ms slices, with `spikes` spike
    readings a second per tenant; `rates` can be changed while it runs."""

    def __init__(self, stream: Path, rates: dict[str, int], spikes: int):
        super().__init__(daemon=True)
        self.stream, self.rates, self.spikes = stream, rates, spikes
        self.stop = threading.Event()
        self.written = 0
        self.seq = 0
        self.files = [open(stream / f"shardId-{i:012d}.ndjson", "ab") for i in range(SHARDS)]

    def line(self, tenant: str, well: int, pressure: float, ts: str) -> tuple[int, bytes]:
        device = f"{tenant}-{well:03d}"
        self.seq += 1
        rec = (f'{{"device_id":"{device}","tenant":"{tenant}","seq":{self.seq},"ts":"{ts}",'
               f'"barrels_per_s":1.2,"pressure_psi":{pressure},"temp_c":71.5,"status":"ok"}}\n')
        return shard_for_key(device, SHARDS), rec.encode()

    def run(self):
        tick = 0.05
        carry = {t: 0.0 for t in TENANTS}
        spike_carry = {t: 0.0 for t in TENANTS}
        next_at = time.monotonic()
        while not self.stop.is_set():
            now = dt.datetime.now(dt.timezone.utc)
            ts = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
            out: list[list[bytes]] = [[] for _ in range(SHARDS)]
            for t in TENANTS:
                carry[t] += self.rates[t] * tick
                spike_carry[t] += self.spikes * tick
                n, carry[t] = int(carry[t]), carry[t] - int(carry[t])
                s, spike_carry[t] = int(spike_carry[t]), spike_carry[t] - int(spike_carry[t])
                for i in range(n):
                    pressure = 9500.0 if i < s else 2000.0 + (self.seq % 97)
                    shard, line = self.line(t, (self.seq + i) % WELLS, pressure, ts)
                    out[shard].append(line)
                self.written += n
            for f, lines in zip(self.files, out):
                if lines:
                    f.write(b"".join(lines))
                    f.flush()
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))


def quantiles(xs: list[float]) -> tuple[float, float, int]:
    if not xs:
        return float("nan"), float("nan"), 0
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))], len(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1500, help="readings/s of each tenant, normally")
    ap.add_argument("--spikes", type=int, default=4, help="spike readings/s of each tenant")
    ap.add_argument("--seconds", type=int, default=30, help="length of each phase")
    ap.add_argument("--shardlake", type=Path, default=REPO / "target/release/shardlake")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shardlake-flood-"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    webhook = f"http://127.0.0.1:{server.server_address[1]}/alert"
    stream = tmp / "stream"
    stream.mkdir()
    (stream / "stream.json").write_text(json.dumps({"shards": SHARDS}))
    for i in range(SHARDS):
        (stream / f"shardId-{i:012d}.ndjson").touch()
    env = dict(os.environ, RUST_LOG="warn", SHARDLAKE_LOG_FORMAT="json")
    proc = subprocess.Popen([str(args.shardlake), "run", str(pipeline(tmp, webhook))], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "pipeline.log", "wb"))
    rates = {t: args.rate for t in TENANTS}
    writer = Writer(stream, rates, args.spikes)
    try:
        print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
              f"{os.getloadavg()[0]:.2f}, {args.shardlake}", flush=True)
        writer.start()
        time.sleep(5)  # warm-up: not measured
        phases = []
        for name, flood in (("every tenant at the normal rate", False),
                            (f"acme at {FLOOD}x", True)):
            rates["acme"] = args.rate * (FLOOD if flood else 1)
            start, w0 = time.time(), writer.written
            time.sleep(args.seconds)  # the phase's length: a measurement window
            phases.append((name, start, time.time(), (writer.written - w0) / args.seconds))
        writer.stop.set()
        # The last readings' alerts: until none came for 2 s (at most 60 s).
        deadline, last = time.monotonic() + 60, -1
        while time.monotonic() < deadline and len(Receiver.received) != last:
            last = len(Receiver.received)
            time.sleep(2)
    finally:
        writer.stop.set()
        proc.terminate()
        proc.wait(timeout=60)
        server.shutdown()
    with Receiver.lock:
        received = list(Receiver.received)
    if proc.returncode not in (0, -15):
        sys.exit(f"shardlake exited {proc.returncode}: {(tmp / 'pipeline.log').read_text()[-2000:]}")
    print(f"\n{len(received)} alerts received; {SHARDS} shards, {WELLS} wells a tenant, "
          f"{args.spikes} spikes/s a tenant\n")
    print("| phase | readings/s written | tenant | alerts | latency p50 | p99 |")
    print("|---|---:|---|---:|---:|---:|")
    summary = {}
    for name, start, end, rate in phases:
        for group, tenants in (("acme", ["acme"]), ("borealis + cygnus", ["borealis", "cygnus"])):
            lat = []
            for at, body in received:
                ev = dt.datetime.fromisoformat(body["event_time"].replace("Z", "+00:00")).timestamp()
                tenant = body["device"].rsplit("-", 1)[0]
                if tenant in tenants and start <= ev < end:
                    lat.append(at - ev)
            p50, p99, n = quantiles(lat)
            summary[(name, group)] = (p50, p99)
            print(f"| {name} | {rate:,.0f} | {group} | {n} | {p50:.3f} s | {p99:.3f} s |")
    (n0, _, _, _), (n1, _, _, _) = phases
    base, flood = summary[(n0, "borealis + cygnus")], summary[(n1, "borealis + cygnus")]
    print(f"\nother tenants under the flood: p50 {flood[0] / base[0]:.2f}x, p99 "
          f"{flood[1] / base[1]:.2f}x their normal latency; p99 grew by {flood[1] - base[1]:+.3f} s "
          f"(normal p99 {base[1]:.3f} s)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
