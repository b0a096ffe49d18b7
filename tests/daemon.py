"""Run the real blockd as a subprocess on loopback with a test config."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

REPO = Path(__file__).resolve().parent.parent
GOV = "127.0.0.2"  # a source address inside the test government group
OTHER = "127.0.0.3"  # a source address in no group


# Ports handed to tests come from below the kernel's ephemeral range (32768-60999 by default):
# a port taken from bind(("127.0.0.1", 0)) and released could be handed out again at once to the
# next bind(0) (a fake upstream, a client socket), which then answers in blockd's place.
_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, never the same one twice in a test run."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port")


class Daemon:
    """blockd run --config, as a subprocess; with netns, inside that network namespace."""

    def __init__(self, config_path: Path, port: int, metrics_port: int | None = None, netns: str | None = None):
        self.config_path = config_path
        self.port = port
        self.metrics_port = metrics_port
        self.netns = netns
        self.log_path = config_path.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = open(self.log_path, "ab")
        inside = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        self.process = subprocess.Popen(
            [*inside, sys.executable, "-m", "blockd", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"blockd exited with {self.process.returncode}:\n{self.log()}")
            # A query with no question gets FORMERR from blockd: that answer (not any) means serving.
            with self._socket(socket.SOCK_DGRAM) as probe:
                probe.settimeout(0.2)
                try:
                    probe.sendto(b"\x12\x34\x01\x00" + bytes(8), ("127.0.0.1", self.port))
                    reply = probe.recv(512)
                except OSError:
                    time.sleep(0.05)
                    continue
            if reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 1 and self._admin_up():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"blockd did not start:\n{self.log()}")

    def _admin_up(self) -> bool:
        """The metrics listener accepts connections (or there is none)."""
        if self.metrics_port is None:
            return True
        with self._socket(socket.SOCK_STREAM) as conn:
            conn.settimeout(0.5)
            try:
                conn.connect(("127.0.0.1", self.metrics_port))
            except OSError:
                return False
        return True

    def _socket(self, kind: int) -> socket.socket:
        if self.netns is None:
            return socket.socket(socket.AF_INET, kind)
        from tests.netns import netns_socket

        return netns_socket(self.netns, socket.AF_INET, kind)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int = signal.SIGHUP) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process is None:
            return 0
        returncode = stop_process(self.process)
        self._log.close()
        return returncode

    def metric(self, name: str, **labels: str) -> float | None:
        """One series from the metrics listener, with exactly these labels (None when absent)."""
        assert self.metrics_port is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.decode().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return None

    def query(
        self,
        name: str,
        rdtype: str = "A",
        source: str = GOV,
        tcp: bool = False,
        timeout: float = 3.0,
        **make_query_args: object,
    ) -> dns.message.Message:
        message = dns.message.make_query(name, rdtype, **make_query_args)
        if tcp:
            return dns.query.tcp(message, "127.0.0.1", port=self.port, source=source, timeout=timeout)
        return dns.query.udp(
            message, "127.0.0.1", port=self.port, source=source, timeout=timeout, ignore_trailing=False
        )


def wait_until(check: Callable[[], object], seconds: float, what: str, log: Callable[[], str] = lambda: "") -> float:
    """Poll check until it is true: the seconds it took; else fail the test with the log's tail."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"{what}: not within {seconds} s\n{log()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 10 s if it has not exited: its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def rcode_name(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())


def raw_udp(port: int, payload: bytes, source: str = OTHER, timeout: float = 0.5) -> bytes | None:
    """Send bytes as they are (malformed on purpose) to a daemon on 127.0.0.1; its reply or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None
