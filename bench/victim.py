#!/usr/bin/env python3
"""A second client's latency while one source floods blockd, with [limits] on (the defaults) and off.

    python bench/victim.py                # about 2 minutes
    python bench/victim.py --seconds 10   # longer floods

For each flood (none; the same blocked name; unique names forwarded to the upstream; unique names
that need dnslib's slow path), a fresh blockd is started with the limits on and one with them off.
A flooder process (bench/flood.py, one source address, no waiting for answers) runs at full speed
while a victim from another address asks a blocked name at 50 qps, and then a forwarded name:
p50, p99 and the share answered are reported in one table.  blockd runs on CPU 0, the flooder
and the victim on CPU 1, the upstream (unbound, authoritative for bench.test. only) on CPU 1.
Everything stays on loopback; every process is stopped when the script ends.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SERVER_CPU, CLIENT_CPU = "0", "1"
FLOODER, VICTIM = "127.0.0.17", "127.0.0.2"
FLOODS = (("none", "no flood"), ("blocked", "blocked names"), ("random", "random names"), ("slowpath", "slow-path"))

UPSTREAM_CONF = """server:
  interface: 127.0.0.1
  port: {port}
  do-ip6: no
  num-threads: 1
  username: ""
  chroot: ""
  directory: "{tmp}"
  pidfile: ""
  use-syslog: no
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "." static
  local-zone: "test." nodefault
  local-zone: "bench.test." redirect
  local-data: "bench.test. 3600 IN A 192.0.2.1"
remote-control:
  control-enable: no
"""

BLOCKD_CONF = """[server]
listen = ["127.0.0.1:{port}"]
[upstream]
servers = ["127.0.0.1:{upstream}"]
timeout = 2.0
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
queries = "blocked"
path = "{tmp}/queries-{port}.log"
[lists.tiktok]
path = "{repo}/domains/tiktok.txt"
[groups.devices]
networks = ["127.0.0.0/8"]
lists = ["tiktok"]
{limits}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def question(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)


def ask(port: int, name: str, source: str, timeout: float) -> float | None:
    """Seconds to an answer, or None when none came within timeout."""
    query_id = int.from_bytes(os.urandom(2), "big")
    packet = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        started = time.monotonic()
        sock.sendto(packet, ("127.0.0.1", port))
        try:
            while True:
                data = sock.recv(4096)
                if data[:2] == packet[:2]:
                    return time.monotonic() - started
        except TimeoutError:
            return None


def victim(port: int, name: str, seconds: float) -> list[float | None]:
    results: list[float | None] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        started = time.monotonic()
        results.append(ask(port, name.format(n=n), VICTIM, 1.0))
        n += 1
        time.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
    return results


def summary(results: list[float | None]) -> str:
    answered = sorted(r for r in results if r is not None)
    if not answered:
        return "— / — / 0%"
    ranks = [math.ceil(q * len(results)) - 1 for q in (0.5, 0.99)]
    cells = [f"{answered[r] * 1000:.1f}" if r < len(answered) else "lost" for r in ranks]
    return f"{cells[0]} / {cells[1]} / {100 * len(answered) / len(results):.1f}%"


def wait_answering(port: int, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ask(port, name, VICTIM, 0.2) is not None:
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing answers {name} on port {port}")


def run(args: argparse.Namespace, tmp: Path, upstream: int) -> list[str]:
    rows = []
    for flood, title in FLOODS:
        cells = []
        for limits in (False, True):
            port, metrics = free_port(), free_port()
            conf = tmp / f"blockd-{flood}-{limits}.toml"
            text = BLOCKD_CONF.format(
                port=port, upstream=upstream, metrics=metrics, tmp=tmp, repo=REPO,
                limits="" if limits else "[limits]\nenabled = false",
            )  # fmt: skip
            conf.write_text(text)
            env = dict(os.environ, PYTHONPATH=str(REPO))
            blockd = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "blockd", "run", "--config", str(conf)],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"blockd-{port}.log", "wb"), env=env,
            )  # fmt: skip
            flooder = None
            try:
                wait_answering(port, "www.tiktok.com")
                if flood != "none":
                    flooder = subprocess.Popen(
                        ["taskset", "-c", CLIENT_CPU, sys.executable, str(BENCH / "flood.py"), str(port), FLOODER,
                         str(args.seconds * 2 + 2), flood, "bench.test"],
                        stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                    time.sleep(1.0)  # the flood at full speed, and blockd's answer to it in place
                blocked = victim(port, "www.tiktok.com", args.seconds)
                forwarded = victim(port, "v{n}-" + str(port) + ".bench.test", args.seconds)
            finally:
                for proc in (flooder, blockd):
                    if proc is not None:
                        proc.terminate()
                        try:
                            proc.wait(10)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
            cells.append((summary(blocked), summary(forwarded)))
            print(f"{title}, limits {'on' if limits else 'off'}: blocked {cells[-1][0]}; forwarded {cells[-1][1]}")
        rows.append(f"| {title} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | {cells[1][1]} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="victim seconds per name and configuration")
    args = parser.parse_args()
    unbound = shutil.which("unbound", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if unbound is None:
        print("victim: needs unbound (apt-get install unbound) as the local upstream", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="blockd-victim-"))
    upstream_port = free_port()
    (tmp / "upstream.conf").write_text(UPSTREAM_CONF.format(port=upstream_port, tmp=tmp))
    upstream = subprocess.Popen(["taskset", "-c", CLIENT_CPU, unbound, "-d", "-c", str(tmp / "upstream.conf")])
    try:
        wait_answering(upstream_port, "probe.bench.test")
        rows = run(args, tmp, upstream_port)
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    head = [
        f"Victim at 50 qps from another address, {args.seconds:g} s per name; one flooder at full speed.",
        "Each cell: p50 / p99 in ms / share of the victim's queries answered within 1 s.",
        "",
        "| flood | blocked name, limits off | blocked name, limits on | forwarded, limits off | forwarded, limits on |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(head + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
