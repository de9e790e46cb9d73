"""Mosquitto (Debian's package) as IoT Core's stand-in: a TLS listener that requires a client
certificate from the test CA, as IoT Core's X.509 authentication does. Certificates are made
with the openssl command line for each session; a second CA signs a device certificate the
broker must refuse."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _ca(dir: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=dir)


def _leaf(dir: Path, name: str, ca: str, ext: str) -> None:
    (dir / f"{name}.ext").write_text(ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=dir)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=dir)


def make_pki(dir: Path) -> Path:
    """ca (the broker's and the devices'), server (localhost), device and subscriber client
    certificates from ca, and rogue-device from another CA."""
    dir.mkdir(parents=True, exist_ok=True)
    _ca(dir, "ca")
    _ca(dir, "other-ca")
    _leaf(dir, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
          "extendedKeyUsage=serverAuth")
    for client in ("device", "subscriber"):
        _leaf(dir, client, "ca", "extendedKeyUsage=clientAuth")
    _leaf(dir, "rogue-device", "other-ca", "extendedKeyUsage=clientAuth")
    return dir


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Mosquitto:
    """A broker on 127.0.0.1:`port` that can be stopped and started again (its persistence
    keeps a persistent subscriber's queued messages across the restart)."""

    def __init__(self, dir: Path, pki: Path, port: int, extra: list[str] | None = None):
        self.dir, self.pki, self.port = dir, pki, port
        self.proc: subprocess.Popen | None = None
        conf = [
            f"listener {port} 127.0.0.1",
            f"cafile {pki / 'ca.pem'}",
            f"certfile {pki / 'server.pem'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "persistence true",
            f"persistence_location {dir}/",
            f"log_dest file {dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 0",
            *(extra or []),
        ]
        if os.geteuid() == 0:
            # Started as root it would drop to the mosquitto user, who cannot read the keys.
            conf.append("user root")
        self.conf = dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    @property
    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                pytest.fail(f"mosquitto did not start: {err}\n{self.log[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None


def broker_with_acl(tmp: Path, pki: Path, port: int, acl: list[str]) -> Mosquitto:
    """A started broker whose ACL file holds `acl`'s lines (`user <certificate name>`, then
    its `topic read|write|readwrite <filter>` lines): the stand-in for the IoT policy that
    pins each certificate's topics. Its log keeps each denial (`Denied PUBLISH from ...`)."""
    path = tmp / "acl"
    path.write_text("\n".join(acl) + "\n")
    (tmp / "mosquitto").mkdir()
    b = Mosquitto(tmp / "mosquitto", pki, port, extra=[f"acl_file {path}", "log_type debug"])
    b.start()
    return b


class Subscriber:
    """mosquitto_sub with a persistent session (QoS 1, `-c`), writing every message's
    payload to a file; it reconnects by itself after a broker restart."""

    def __init__(self, broker: Mosquitto, topic: str, out: Path, client_id: str = "test-sub"):
        self.out = out
        pki = broker.pki
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
             "--cafile", str(pki / "ca.pem"), "--cert", str(pki / "subscriber.pem"),
             "--key", str(pki / "subscriber.key"), "-t", topic, "-q", "1", "-c",
             "-i", client_id],
            stdout=open(out, "wb"), stderr=subprocess.STDOUT)
        self._wait_subscribed(broker, topic)

    def _wait_subscribed(self, broker: Mosquitto, topic: str) -> None:
        """Publishes probes on a topic the filter matches until one reaches the output file, so
        a test's first publish cannot come before the subscription exists (nothing would keep
        it for a subscriber that is not there yet)."""
        probe_topic = topic.replace("#", "probe").replace("+", "probe")
        token = f"probe-{uuid.uuid4().hex}".encode()
        deadline = time.monotonic() + 30
        while token not in self.out.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto_sub did not subscribe to {topic}:\n"
                            f"{self.out.read_bytes()[-2000:].decode(errors='replace')}")
            pki = broker.pki
            subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port),
                 "--cafile", str(pki / "ca.pem"), "--cert", str(pki / "subscriber.pem"),
                 "--key", str(pki / "subscriber.key"), "-t", probe_topic, "-q", "1",
                 "-i", f"probe-{uuid.uuid4().hex[:8]}", "-m", token.decode()],
                capture_output=True, timeout=30)
            poll_until = time.monotonic() + 1
            while token not in self.out.read_bytes() and time.monotonic() < poll_until:
                time.sleep(0.05)

    def lines(self) -> list[bytes]:
        data = self.out.read_bytes()
        # The subscriber may be writing a line while it is read: only finished lines count.
        finished = data[: data.rfind(b"\n") + 1]
        return [line for line in finished.splitlines() if line.startswith(b"{")]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_bridge(shardlake_bin: Path, broker: Mosquitto, stream: str, env: dict,
                 log: Path) -> subprocess.Popen:
    """`shardlake bridge` from `broker` (the subscriber certificate) to the Kinesis `stream`,
    once it has subscribed: a message published before its SUBACK would reach nobody."""
    from harness import wait_until
    pki = broker.pki
    bridge = subprocess.Popen(
        [str(shardlake_bin), "bridge", "--stream", stream, "--port", str(broker.port),
         "--ca", str(pki / "ca.pem"), "--cert", str(pki / "subscriber.pem"),
         "--key", str(pki / "subscriber.key"), "--client-id", f"bridge-{stream}"],
        env=env, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
    wait_until("the bridge to subscribe", lambda: "bridge subscribed" in log.read_text(),
               timeout=30)
    return bridge
