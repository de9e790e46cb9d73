#!/usr/bin/env python3
"""The console under load (issue 23): a release worker over a local stream with its live state
on (`shardlake run --listen`), a release `shardlake console --worker` following it, records
appended to the stream at a paced rate, and clients of the page's event stream (`/api/events`).

    python3 benches/console.py freshness [--devices 10000] [--rate 100000] [--seconds 90]
    python3 benches/console.py clients   [--devices 10000] [--changed 100] [--clients 100,500,1000,2000]
    python3 benches/console.py page      [--devices 10000] [--rate 10000] [--seconds 30]

`freshness`: every record carries its append wall-clock in `barrels_per_s`; one event-stream
client takes, for each record of every tenth device, the time from its append to the first
event that shows that device at that reading or a newer one (p50/p99/max). Then the console's
peak RSS (VmHWM) and the fleet snapshot (`GET /api/fleet`): its size and time.

`clients`: the stream gets `--changed` readings (as many devices) in one burst per second, so
each client gets about one update a second; N clients are opened in steps and the console's
CPU time (/proc/PID/stat utime + stime) is read over `--interval` seconds at each step.

`page`: the fleet page in headless Chromium (Debian's `chromium` and `chromium-driver`, through
Selenium from the test venv): the time from opening the page to every device counted on it, the
time one render of the fleet table takes (as shown, sorted by a field, filtered), then, while
`--rate` records/s are appended, how long each live render takes and what share of the page's
main thread rendering takes, and the page's JavaScript heap.

All start with `--history` minutes of readings per device already in the stream (one a
minute), so the snapshot carries each device's full sparkline history. Stdlib only.
Figures and what bounds them: benches/README.md ("The console").
"""

from __future__ import annotations

import argparse
import bisect
import gc
import http.client
import json
import multiprocessing as mp
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDS = 4
TENANTS = ["acme", "borealis", "cascade"]
MARK_EVERY = 10  # the devices whose readings are timed: every tenth
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


class Lines:
    """Per device: the constant parts of its NDJSON line."""

    def __init__(self, devices: int):
        self.devices = devices
        self.prefix = [f'{{"device_id":"well-{d:05d}","tenant":"{TENANTS[d % 3]}","seq":'
                       for d in range(devices)]
        self.suffix = [f'"pressure_psi":{1500 + d % 1000}.5,"temp_c":70.25,"status":"ok"}}\n'
                       for d in range(devices)]

    def chunks(self, i0: int, n: int, seq0: int, t: float, stamp: float) -> list[bytes]:
        """Records i0..i0+n (record i is device i % devices, seq seq0 + i // devices), event
        time t, `barrels_per_s` = stamp, one bytes object per shard (device % SHARDS)."""
        mid = f',"ts":"{rfc3339(t)}","barrels_per_s":{stamp!r},'
        per = [[] for _ in range(SHARDS)]
        D, pre, suf = self.devices, self.prefix, self.suffix
        for i in range(i0, i0 + n):
            d = i % D
            per[d % SHARDS].append(pre[d] + str(seq0 + i // D) + mid + suf[d])
        return ["".join(p).encode() for p in per]


def create_stream(stream: Path, lines: Lines, history: int) -> int:
    """The stream with `history` minutes of one reading per device and minute; returns the
    next seq."""
    stream.mkdir(parents=True)
    (stream / "stream.json").write_text(json.dumps({"shards": SHARDS}))
    files = [open(stream / f"shardId-{s:012d}.ndjson", "ab") for s in range(SHARDS)]
    now = time.time()
    for m in range(history):
        t = now - (history - m) * 60
        for s, b in enumerate(lines.chunks(m * lines.devices, lines.devices, 1, t, 0.0)):
            files[s].write(b)
    for f in files:
        f.close()
    return 1 + history


def writer(stream: str, devices: int, rate: float, batch_s: float, seconds: float, seq0: int,
           conn) -> None:
    """Appends `rate` records/s in batches every `batch_s` until `seconds` have passed; sends
    back (append time, first record, count, time the writes returned) of each batch."""
    lines = Lines(devices)
    fds = [os.open(f"{stream}/shardId-{s:012d}.ndjson", os.O_WRONLY | os.O_APPEND)
           for s in range(SHARDS)]
    n = max(1, round(rate * batch_s))
    log, i, k = [], 0, 0
    t0 = time.time() + 0.05
    while True:
        due = t0 + k * batch_s
        if due - t0 >= seconds:
            break
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        # Built first, then stamped: the stamp is taken just before the bytes are written.
        a = time.time()
        for fd, b in zip(fds, lines.chunks(i, n, seq0, a, a)):
            if b:
                os.write(fd, b)
        log.append((a, i, n, time.time()))
        i += n
        k += 1
    conn.send(log)
    conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 60) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def wait_until(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (v := check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)
    return v


def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status figure in MiB (VmHWM:, VmRSS:)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Setup:
    """A worker and a console over a fresh local stream and lake."""

    def __init__(self, args, tmp: Path):
        self.tmp, self.args = tmp, args
        self.lines = Lines(args.devices)
        t = time.monotonic()
        self.seq0 = create_stream(tmp / "stream", self.lines, args.history)
        print(f"stream: {args.devices} devices, {args.history} minutes of history "
              f"({args.devices * args.history} records) in {time.monotonic() - t:.1f}s", flush=True)
        text = (REPO / "pipelines" / "well-telemetry.yaml").read_text()
        text, n = re.subn(r"(?m)^schema:.*$", f"schema: {REPO / 'schemas' / 'well-reading.yaml'}", text)
        assert n == 1
        self.pipeline = tmp / "console.yaml"
        self.pipeline.write_text(text)
        env = dict(os.environ, SHARDLAKE_DATA=str(tmp), SHARDLAKE_LOG_FORMAT="json", RUST_LOG="warn")
        self.ops = f"127.0.0.1:{free_port()}"
        self.listen = f"127.0.0.1:{free_port()}"
        self.base = f"http://{self.listen}"
        # The worker says when one step held its engine's task for 200 ms or more.
        self.worker = subprocess.Popen(
            [args.shardlake, "run", str(self.pipeline), "--listen", self.ops],
            env=dict(env, RUST_LOG="warn,shardlake::pipeline::session=debug"), stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "w"))
        wait_until("the worker", lambda: get(f"http://{self.ops}/healthz", 2)[0] == 200)
        self.console = subprocess.Popen(
            [args.shardlake, "console", str(self.pipeline), "--listen", self.listen,
             "--worker", f"http://{self.ops}"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "console.log", "w"))
        wait_until("the console", lambda: get(f"{self.base}/api/me", 2)[0] == 200)
        t = time.monotonic()
        wait_until("every device on the console", lambda: self.snapshot()["devices"] == args.devices)
        print(f"console shows {args.devices} devices {time.monotonic() - t:.1f}s after it answered",
              flush=True)

    def snapshot(self) -> dict:
        t = time.perf_counter()
        status, body = get(f"{self.base}/api/fleet")
        took = time.perf_counter() - t
        if status != 200:
            return {"devices": 0}
        j = json.loads(body)
        return {"devices": len(j["devices"]), "bytes": len(body), "seconds": took,
                "cursor": j["cursor"]}

    def start_writer(self, rate: float, batch_s: float, seconds: float):
        recv, send = mp.Pipe(duplex=False)
        p = mp.Process(target=writer, args=(str(self.tmp / "stream"), self.args.devices, rate,
                                            batch_s, seconds, self.seq0, send))
        p.start()
        return p, recv

    def close(self):
        for p in (self.console, self.worker):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.console, self.worker):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


class GcPauses:
    """The bench's own garbage collections while it reads (a long one would look like a
    stall of the service)."""

    def __init__(self):
        self.longest, self.total, self._t = 0.0, 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        else:
            took = time.perf_counter() - self._t
            self.total += took
            self.longest = max(self.longest, took)


def read_events(listen: str, since: str, until: float, seen: dict, stats: dict):
    """Reads /api/events until `until` (monotonic); for each marked device in a `changes`
    event, appends (stamp, arrival wall-clock) to seen[device]."""
    conn = http.client.HTTPConnection(listen, timeout=30)
    conn.request("GET", f"/api/events?since={since}", headers={"accept": "text/event-stream"})
    r = conn.getresponse()
    assert r.status == 200, r.status
    name = None
    while time.monotonic() < until:
        line = r.fp.readline()
        if not line:
            break
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:") and name == "changes":
            t = time.time()
            if stats.get("last") and t - stats["last"] > stats.get("gap", (0, 0))[0]:
                stats["gap"] = (t - stats["last"], t)
            stats["last"] = t
            data = json.loads(line[5:])
            stats["events"] += 1
            stats["bytes"] += len(line)
            stats["rows"] += len(data["devices"])
            for d in data["devices"]:
                dev = int(d["device"][5:])
                if dev % MARK_EVERY == 0:
                    seen.setdefault(dev, ([], []))
                    s = d["values"].get("barrels_per_s")
                    if s:
                        seen[dev][0].append(s)
                        seen[dev][1].append(t)
        elif line.startswith(b"data:") and name == "reset":
            stats["resets"] += 1
    conn.close()


def read_worker(ops: str, until: float, conn) -> None:
    """Asks the worker's `GET /live` as the console does (the next ask 100 ms after the
    previous one, or when the worker has something new), until `until` (monotonic); for each
    marked device records (stamp, arrival wall-clock) and sends them back at the end. Beside
    the page's readings, this tells the worker's hop from the console's. It runs in a process
    of its own so that it does not hold the page reader's interpreter lock."""
    http_conn = http.client.HTTPConnection(ops, timeout=30)
    seen: dict = {}
    since = 0
    while time.monotonic() < until:
        asked = time.monotonic()
        http_conn.request("GET", f"/live?since={since}&wait_ms=1000")
        r = http_conn.getresponse()
        body = r.read()
        t = time.time()
        c = json.loads(body)
        if since:
            for d in c["devices"]:
                dev = int(d["device"][5:])
                if dev % MARK_EVERY == 0:
                    s = d["values"].get("barrels_per_s")
                    if s:
                        seen.setdefault(dev, ([], []))
                        seen[dev][0].append(s)
                        seen[dev][1].append(t)
        since = c["version"]
        time.sleep(max(0.0, asked + 0.1 - time.monotonic()))
    http_conn.close()
    conn.send(seen)
    conn.close()


def latencies(log, seen: dict, args) -> tuple[list[float], list[tuple[float, float]], int, int]:
    """For each marked record appended after the warm-up: the time from its append to the
    first reading of its device at it or a newer one in `seen`."""
    a_first = log[0][0]
    lat, missed, appended = [], 0, 0
    worst_at: list[tuple[float, float]] = []
    for a, i0, n, _ in log:
        if a - a_first < args.warmup or a - a_first > args.seconds - 2:
            continue
        appended += n
        D = args.devices
        for i in range(i0, i0 + n):
            dev = i % D
            if dev % MARK_EVERY:
                continue
            stamps, times = seen.get(dev, ([], []))
            k = bisect.bisect_left(stamps, a)
            if k == len(stamps):
                missed += 1
            else:
                lat.append(times[k] - a)
                worst_at.append((times[k] - a, a))
    return lat, worst_at, missed, appended


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def freshness(args):
    with tempfile.TemporaryDirectory(prefix="console-bench-") as d:
        s = Setup(args, Path(d))
        try:
            start = s.snapshot()
            print(f"snapshot before the run: {start['bytes'] / 1e6:.1f} MB in {start['seconds']:.3f}s",
                  flush=True)
            w, logs = s.start_writer(args.rate, 0.01, args.seconds)
            seen, stats = {}, {"events": 0, "bytes": 0, "rows": 0, "resets": 0}
            c0 = {p.pid: cpu_seconds(p.pid) for p in (s.worker, s.console)}
            t0 = time.monotonic()
            probe, worker_seen = None, {}
            if args.probe_worker:
                probe_recv, probe_send = mp.Pipe(duplex=False)
                probe = mp.Process(target=read_worker,
                                   args=(s.ops, t0 + args.seconds + 3, probe_send))
                probe.start()
            # The reader makes no reference cycles: without collections (they took a third
            # of a core, parsing 15 MB/s of JSON), the bench leaves the machine's two cores
            # to the service. The pauses are still counted, should a collection run.
            pauses = GcPauses()
            gc.callbacks.append(pauses)
            gc.freeze()
            gc.disable()
            read_events(s.listen, start["cursor"], t0 + args.seconds + 3, seen, stats)
            gc.enable()
            gc.unfreeze()
            gc.callbacks.remove(pauses)
            el = time.monotonic() - t0
            if probe:
                worker_seen = probe_recv.recv()
                probe.join()
            cpu = {p.pid: (cpu_seconds(p.pid) - c0[p.pid]) / el for p in (s.worker, s.console)}
            log = logs.recv()
            w.join()
            hwm_run = proc_status(s.console.pid, "VmHWM:")
            snaps = [s.snapshot() for _ in range(5)]
            hwm = proc_status(s.console.pid, "VmHWM:")
            rss = proc_status(s.console.pid, "VmRSS:")
            whwm = proc_status(s.worker.pid, "VmHWM:")
        finally:
            s.close()
        busy = []
        for line in (Path(d) / "worker.log").read_text().splitlines():
            if "engine's task was busy" in line:
                j = json.loads(line)
                f = j.get("fields", j)
                busy.append(f"{f.get('step')} {f.get('ms')} ms at :{j.get('timestamp', '')[17:19]}")
    # Each marked record: the first event showing its device at its reading or a newer one.
    lat, worst_at, missed, appended = latencies(log, seen, args)
    span = log[-1][0] - log[0][0]
    total = sum(n for _, _, n, _ in log)
    print(f"appended {total} records in {span:.1f}s ({total / span:.0f}/s); timed "
          f"{len(lat)} readings of {args.devices // MARK_EVERY} devices appended after the "
          f"first {args.warmup:.0f}s ({appended} records), {missed} not seen")
    print(f"events: {stats['events']} ({stats['events'] / el:.2f}/s), {stats['rows'] / max(1, stats['events']):.0f} "
          f"devices and {stats['bytes'] / max(1, stats['events']) / 1e6:.2f} MB each, {stats['resets']} resets")
    gap, at = stats.get("gap", (0, 0))
    print(f"longest gap between two events: {gap:.3f} s, ending at :{int(at) % 60:02d}")
    print(f"event -> page p50 / p99 / max: {pct(lat, 0.5):.3f} / {pct(lat, 0.99):.3f} / {max(lat):.3f} s")
    print(f"the worker's engine task busy for 200 ms or more: {len(busy)} times"
          + (f" ({', '.join(busy[:8])})" if busy else ""))
    print(f"the bench's garbage collections while reading: longest {pauses.longest:.3f} s, "
          f"{pauses.total:.2f} s in all")
    writes = sorted(((b - a, a) for a, _, _, b in log), reverse=True)
    print(f"longest append (the bench's own writes): {writes[0][0]:.3f} s at :{int(writes[0][1]) % 60:02d}; "
          f"{sum(1 for w, _ in writes if w > 0.1)} over 0.1 s")
    if args.probe_worker:
        wl, wworst, wmissed, _ = latencies(log, worker_seen, args)
        (wmax, wat) = max(wworst)
        print(f"event -> worker's /live p50 / p99 / max: {pct(wl, 0.5):.3f} / {pct(wl, 0.99):.3f} / "
              f"{wmax:.3f} s (max appended at :{int(wat) % 60:02d}), {wmissed} not seen")
        (pmax, pat) = max(worst_at)
        print(f"page's max appended at :{int(pat) % 60:02d}")
    # Where the slowest readings fall: the second of the minute they were appended in (their
    # event time), to tell a stall at each window's close (:30, with 30 s allowed lateness)
    # from noise.
    slow: dict[int, int] = {}
    for _, a in sorted(worst_at, reverse=True)[:max(1, len(worst_at) // 100)]:
        slow[int(a) % 60] = slow.get(int(a) % 60, 0) + 1
    print("slowest 1% by second of the minute appended: "
          + ", ".join(f":{sec:02d} x{n}" for sec, n in sorted(slow.items(), key=lambda x: -x[1])[:6]))
    print(f"CPU during the run: worker {cpu[s.worker.pid]:.2f} cores, console {cpu[s.console.pid]:.2f} cores")
    print(f"console peak RSS (VmHWM): {hwm_run:.0f} MiB during the run, {hwm:.0f} MiB after 5 "
          f"snapshots (RSS now {rss:.0f} MiB); worker peak RSS {whwm:.0f} MiB")
    print(f"snapshot GET /api/fleet ({snaps[0]['devices']} devices): {statistics.median(x['bytes'] for x in snaps) / 1e6:.1f} MB, "
          f"median {statistics.median(x['seconds'] for x in snaps):.3f}s "
          f"(min {min(x['seconds'] for x in snaps):.3f}, max {max(x['seconds'] for x in snaps):.3f})")


class Clients:
    """Many event-stream clients on one selector thread: each counts its `changes` events."""

    def __init__(self, listen: str):
        self.host, port = listen.split(":")
        self.port = int(port)
        self.sel = selectors.DefaultSelector()
        self.pending: list[socket.socket] = []
        self.lock = threading.Lock()
        self.events = 0
        self.bytes = 0
        self.closed = 0
        self.n = 0
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def open(self, count: int, since: str):
        req = (f"GET /api/events?since={since} HTTP/1.1\r\nHost: {self.host}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
        for _ in range(count):
            sock = socket.create_connection((self.host, self.port))
            sock.sendall(req)
            sock.setblocking(False)
            with self.lock:
                self.pending.append(sock)
            self.n += 1

    def loop(self):
        tail = {}
        marker = b"event: changes"
        while not self.stop:
            with self.lock:
                new, self.pending = self.pending, []
            for sock in new:
                self.sel.register(sock, selectors.EVENT_READ)
                tail[sock] = b""
            for key, _ in self.sel.select(timeout=0.05):
                sock = key.fileobj
                try:
                    b = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not b:
                    self.sel.unregister(sock)
                    sock.close()
                    self.closed += 1
                    continue
                self.bytes += len(b)
                buf = tail[sock] + b
                self.events += buf.count(marker)
                tail[sock] = buf[-(len(marker) - 1):]


def clients(args):
    steps = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="console-bench-") as d:
        s = Setup(args, Path(d))
        try:
            w, logs = s.start_writer(args.changed, 1.0, 10_000)
            time.sleep(3)
            cl = Clients(s.listen)
            rows = []
            for n in [0] + steps:
                cl.open(n - cl.n, s.snapshot()["cursor"])
                time.sleep(args.settle)
                c0, e0, b0, t0 = cpu_seconds(s.console.pid), cl.events, cl.bytes, time.monotonic()
                time.sleep(args.interval)
                el = time.monotonic() - t0
                cpu = (cpu_seconds(s.console.pid) - c0) / el
                ev = (cl.events - e0) / el
                by = (cl.bytes - b0) / el
                rows.append((n, cpu, ev, by))
                per = f"{ev / n:.2f} updates/s per client, {by / max(ev, 1) / 1e3:.1f} kB each" if n else ""
                print(f"{n:>5} clients: console {cpu:.3f} cores; {per}; closed {cl.closed}; "
                      f"RSS {proc_status(s.console.pid, 'VmRSS:'):.0f} MiB", flush=True)
            cl.stop = True
            w.terminate()
        finally:
            s.close()
    base = rows[0][1]
    print("clients | console CPU (cores) | clients per core (N / CPU) | per client, above 0 clients")
    for n, cpu, ev, by in rows[1:]:
        print(f"{n} | {cpu:.3f} | {n / cpu:.0f} | {(cpu - base) / n * 1e3:.3f} ms CPU per second")


def page(args):
    """The fleet page in a browser with `--devices` devices (see the module doc)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--window-size=1400,1000",
              "--disable-dev-shm-usage", "--enable-precise-memory-info"):
        opts.add_argument(a)
    n = args.devices
    with tempfile.TemporaryDirectory(prefix="console-bench-") as d:
        s = Setup(args, Path(d))
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            t = time.perf_counter()
            driver.get(s.base + "/#/fleet")
            wait_until("every device on the page", lambda: driver.execute_script(
                "return document.getElementById('fleet-count').textContent") == f"{n} of {n} devices")
            opened = time.perf_counter() - t
            timing = driver.execute_script("""
                const time = (f) => { const out = []; for (let i = 0; i < 15; i++) {
                  const t = performance.now(); f(); out.push(performance.now() - t); }
                  out.sort((a, b) => a - b); return out[7]; };
                const shown = time(() => renderFleet());
                state.sort = { col: "pressure_psi", dir: -1 };
                const sorted = time(() => renderFleet());
                document.getElementById("filter-device").value = "well-00";
                const filtered = time(() => renderFleet());
                document.getElementById("filter-device").value = "";
                state.sort = { col: "device", dir: 1 };
                renderFleet();
                return [shown, sorted, filtered];""")
            # Live: every render the page makes, timed.
            driver.execute_script("""
                window.__renders = [];
                const inner = window.render;
                window.render = function () { const t = performance.now(); inner();
                  window.__renders.push(performance.now() - t); };""")
            w, logs = s.start_writer(args.rate, 0.01, args.seconds)
            t0 = time.monotonic()
            w.join()
            el = time.monotonic() - t0
            logs.recv()
            renders = driver.execute_script("return window.__renders")
            heap = driver.execute_script("return performance.memory.usedJSHeapSize") / 2**20
            rows = driver.execute_script("return document.querySelectorAll('#fleet-body tr').length")
        finally:
            driver.quit()
            s.close()
    print(f"page opened with {n} devices counted: {opened:.2f} s (snapshot, parse, first render)")
    print(f"one render of the fleet table ({rows} rows shown of {n}; median of 15): "
          f"{timing[0]:.1f} ms as shown, {timing[1]:.1f} ms sorted by pressure, "
          f"{timing[2]:.1f} ms filtered by device id")
    if renders:
        print(f"live at {args.rate:.0f} records/s for {el:.0f} s: {len(renders)} renders "
              f"({len(renders) / el:.1f}/s), p50 {pct(renders, 0.5):.1f} ms, p99 {pct(renders, 0.99):.1f} ms, "
              f"rendering {sum(renders) / 1000 / el * 100:.1f}% of the main thread")
    print(f"JavaScript heap: {heap:.0f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["freshness", "clients", "page"])
    ap.add_argument("--shardlake", default=str(REPO / "target/release/shardlake"))
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--history", type=int, default=30, help="minutes of readings already in the stream")
    ap.add_argument("--rate", type=float, default=100_000, help="freshness: records/s")
    ap.add_argument("--seconds", type=float, default=90, help="freshness: seconds of appends")
    ap.add_argument("--probe-worker", action="store_true",
                    help="freshness: also read the worker's /live, to tell its hop from the console's "
                         "(its own process, but on 2 cores it slows the page's reader too)")
    ap.add_argument("--warmup", type=float, default=15, help="freshness: seconds not timed")
    ap.add_argument("--changed", type=int, default=100, help="clients: readings per 1 s burst")
    ap.add_argument("--clients", default="100,500,1000,2000")
    ap.add_argument("--settle", type=float, default=5)
    ap.add_argument("--interval", type=float, default=20)
    args = ap.parse_args()
    {"freshness": freshness, "clients": clients, "page": page}[args.mode](args)


if __name__ == "__main__":
    main()
