"""The console under test: a worker that serves its live state (`shardlake run --listen`), a
`shardlake console` that follows it, records appended to the local stream while both run, the
server-sent event stream read by hand, and headless Chromium (Debian's) driven by Selenium.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from harness import free_port, get, pipeline_env, simulate, wait_until, write_test_pipeline

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def now_rfc3339(delta_s: float = 0) -> str:
    t = datetime.now(timezone.utc) + timedelta(seconds=delta_s)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ConsoleRun:
    """A worker over a local stream with its live state on, and a console following it."""

    def __init__(self, shardlake_bin: Path, agent_bin: Path, tmp: Path, *, devices: int = 20,
                 console_args: tuple[str, ...] = (), lake: str | None = None,
                 env: dict[str, str] | None = None, extra: str = "",
                 listen: str | None = None):
        self.bin, self.tmp = shardlake_bin, tmp
        # Readings of the last few minutes, so the windows and the page's ages are current.
        start = (datetime.now(timezone.utc) - timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.summary = simulate(agent_bin, tmp, shards=2, devices=devices, readings=120,
                                seed=23, spikes=0, malformed=0, start=start, jitter_ms=0)
        self.devices = devices
        self.pipeline = write_test_pipeline(tmp / "console.yaml", max_bytes="8MiB", max_age="1s",
                                            lake=lake, extra=extra)
        self.env = pipeline_env(tmp, env)
        self.ops = f"127.0.0.1:{free_port()}"
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.base = f"http://{self.listen}"
        self.console_args = console_args
        self.seq = 10_000
        self.worker = subprocess.Popen(
            [str(self.bin), "run", str(self.pipeline), "--listen", self.ops],
            env=self.env, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "w"))
        wait_until("the worker to be ready",
                   lambda: get(f"http://{self.ops}/healthz")[0] == 200, timeout=60)
        self.console = None
        self.start_console()

    def start_console(self):
        self.console = subprocess.Popen(
            [str(self.bin), "console", str(self.pipeline), "--listen", self.listen,
             "--worker", f"http://{self.ops}", *self.console_args],
            env=self.env, stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "console.log", "a"))
        # 200, or 401 with sign-in configured.
        wait_until("the console to answer", lambda: get(f"{self.base}/api/me")[0] in (200, 401),
                   timeout=60)

    def stop_console(self):
        self.console.send_signal(signal.SIGTERM)
        self.console.wait(timeout=30)

    def tenants(self) -> dict[str, str]:
        """Each simulated device's tenant, from the stream."""
        out = {}
        for f in sorted((self.tmp / "stream").glob("shardId-*.ndjson")):
            for line in f.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                out[r["device_id"]] = r["tenant"]
        return out

    def append(self, device: str, *, pressure: float = 2000.0, tenant: str = "acme",
               shard: int = 0, **extra) -> dict:
        """Appends one reading, stamped now, to a shard of the local stream."""
        self.seq += 1
        rec = {"device_id": device, "tenant": tenant, "seq": self.seq, "ts": now_rfc3339(),
               "barrels_per_s": 1.0, "pressure_psi": pressure, "temp_c": 70.0, "status": "ok"}
        rec.update(extra)
        path = self.tmp / "stream" / f"shardId-{shard:012d}.ndjson"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
        finally:
            os.close(fd)
        return rec

    def api(self, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, token: str | None = None) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        if token:
            headers["authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection(self.listen, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def query(self, sql: str, accept: str = "application/json", token: str | None = None,
              **body) -> tuple[int, dict, bytes]:
        return self.api("POST", "/api/query", json.dumps({"sql": sql, **body}).encode(),
                        {"content-type": "application/json", "accept": accept}, token=token)

    def close(self):
        for p in (self.console, self.worker):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.console, self.worker):
            if p:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


class EventStream:
    """`GET /api/events` read line by line, as an EventSource would."""

    def __init__(self, listen: str, last_event_id: str | None = None, since: str = ""):
        self.conn = http.client.HTTPConnection(listen, timeout=10)
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        self.conn.request("GET", f"/api/events?since={since}", headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.status
        assert self.resp.getheader("content-type").startswith("text/event-stream")

    def next_event(self) -> tuple[str, str | None, str]:
        """(event name, id, data) of the next event; comments (keep-alives) are skipped."""
        name, ident, data = "message", None, []
        while True:
            line = self.resp.fp.readline().decode()
            if line == "":
                raise EOFError("the event stream ended")
            line = line.rstrip("\n")
            if line == "":
                if data:
                    return name, ident, "\n".join(data)
                name, ident, data = "message", None, []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "id":
                ident = value
            elif field == "data":
                data.append(value)

    def close(self):
        self.conn.close()


def chromium_driver(downloads: Path | None = None):
    """Headless Chromium from Debian, through Debian's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--window-size=1400,1000",
              "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def shoot(driver, tmp: Path, name: str):
    """A screenshot of the page under the test's temp dir (kept as an artifact)."""
    d = tmp / "screenshots"
    d.mkdir(exist_ok=True)
    driver.save_screenshot(str(d / f"{name}.png"))


def wait_in_page(driver, what: str, script: str, timeout: float = 30.0):
    """Polls a JavaScript expression in the page until it is truthy; returns its value."""
    return wait_until(what, lambda: driver.execute_script(f"return ({script});"),
                      timeout=timeout, every=0.1)


def time_ms() -> float:
    return time.monotonic() * 1000


def browser_sign_in(driver, start_url: str, login: str, console_base: str, timeout: float = 60):
    """Opens `start_url` in Chromium and signs in through oidc-provider's own login and
    consent pages, as a person would: types the login and a password, presses the buttons,
    until the browser is back on the console."""
    from selenium.webdriver.common.by import By
    driver.get(start_url)
    deadline = time.monotonic() + timeout
    while True:
        url = driver.current_url
        if url.startswith(console_base) and "/auth/" not in url:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the sign-in of {login} did not come back to the console: {url}")
        logins = driver.find_elements(By.NAME, "login")
        buttons = driver.find_elements(By.CSS_SELECTOR, "form button[type=submit]")
        if logins:
            logins[0].send_keys(login)
            driver.find_element(By.NAME, "password").send_keys("any-password")
            driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
            wait_until("the login page to go", lambda: driver.current_url != url or not
                       driver.find_elements(By.NAME, "login"), timeout=30)
        elif buttons:
            buttons[0].click()
            wait_until("the consent page to go", lambda: driver.current_url != url, timeout=30)
        else:
            time.sleep(0.1)  # a redirect in flight: look again
