"""blockd's memory and thread footprint, for the systemd unit's MemoryMax= and TasksMax=.

Starts blockd on loopback with every shipped list and the default cache size (100,000), in
front of the tests' fake upstream, fills the cache with unique names, reloads twice (a reload
holds two policies for a moment), and prints RSS (VmRSS, peak VmHWM) and the thread count at each
step.  --list N adds an N-name list (an operator's own), --answer-records R makes each forwarded
answer a CNAME plus R A records (typical answers are 1-4 records; 8 by default to err on the
large side).

    python3 bench/footprint.py                # shipped lists, full cache (about a minute)
    python3 bench/footprint.py --list 1000000 # plus a 1M-name list
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dnslib import CNAME, QTYPE, RR, A, DNSRecord  # noqa: E402

from tests.daemon import free_port  # noqa: E402
from tests.fakeupstream import FakeUpstream  # noqa: E402

SHIPPED = ["tiktok", "bytedance", "doh-bypass", "lark-feishu", "volcengine-byteplus"]


def config_text(port: int, metrics: int, upstream: str, lists_dir: Path, extra_list: Path | None) -> str:
    names = list(SHIPPED) + (["extra"] if extra_list else [])
    text = f"""
[server]
listen = ["127.0.0.1:{port}"]
[upstream]
servers = ["{upstream}"]
[cache]
size = 100000
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
queries = "none"
[limits]
enabled = false  # one load generator on one address: the cache is what is measured
"""
    for name in SHIPPED:
        text += f'[lists.{name}]\npath = "{lists_dir / (name + ".txt")}"\n'
    if extra_list:
        text += f'[lists.extra]\npath = "{extra_list}"\n'
    quoted = ", ".join(f'"{n}"' for n in names)
    text += f'[groups.everyone]\nnetworks = ["0.0.0.0/0"]\nlists = [{quoted}]\n'
    return text


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def report(step: str, pid: int, metrics: int) -> None:
    fields = status(pid)
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
    match = re.search(r"^blockd_cache_entries (\S+)$", body, re.M)
    entries = int(float(match.group(1))) if match else -1
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    print(
        f"{step:<34} VmRSS {fields['VmRSS'].strip():>11}  VmHWM {fields['VmHWM'].strip():>11}  "
        f"threads {fields['Threads'].strip():>3}  fds {fds:>4}  cache entries {entries}",
        flush=True,
    )


def fill(port: int, count: int, window: int = 256) -> int:
    """Ask count unique names, window in flight at a time; the number answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sent = answered = 0
    in_flight = 0
    while answered < count and sent < count * 2:
        while in_flight < window and sent < count:
            query = DNSRecord.question(f"n{sent}.fill.example", "A")
            query.header.id = sent % 65536
            sock.sendto(query.pack(), ("127.0.0.1", port))
            sent += 1
            in_flight += 1
        try:
            sock.recv(65535)
        except TimeoutError:
            in_flight = 0  # lost: send on
            if sent >= count:
                break
            continue
        answered += 1
        in_flight -= 1
    sock.close()
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--list", type=int, default=0, help="also load a list of N synthetic names")
    parser.add_argument("--answer-records", type=int, default=8)
    parser.add_argument("--names", type=int, default=100_000, help="unique names asked (the cache holds 100,000)")
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument(
        "--reload-wait",
        type=float,
        default=15.0,
        help="seconds after each SIGHUP (the old policy is freed ~9 s after a swap)",
    )
    args = parser.parse_args()

    upstream = FakeUpstream()

    def big_answer(request: DNSRecord, transport: str) -> DNSRecord:
        reply = request.reply()
        target = "edge." + str(request.q.qname)
        reply.add_answer(RR(request.q.qname, QTYPE.CNAME, rdata=CNAME(target), ttl=3600))
        for index in range(args.answer_records):
            reply.add_answer(RR(target, QTYPE.A, rdata=A(f"192.0.2.{index + 1}"), ttl=3600))
        return reply

    upstream.responders["fill.example"] = big_answer
    with tempfile.TemporaryDirectory(prefix="blockd-footprint-") as tmp:
        directory = Path(tmp)
        extra = None
        if args.list:
            extra = directory / "extra.txt"
            with open(extra, "w") as handle:
                handle.writelines(f"name{index}.synthetic.example\n" for index in range(args.list))
        port, metrics = free_port(), free_port()
        config = directory / "blockd.toml"
        config.write_text(config_text(port, metrics, upstream.address, REPO / "domains", extra))
        log = open(directory / "blockd.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "blockd", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit((directory / "blockd.log").read_text()) from None
                    time.sleep(0.1)
            time.sleep(1)
            report("started", process.pid, metrics)
            started = time.monotonic()
            answered = fill(port, args.names)
            print(f"  {answered} of {args.names} answered in {time.monotonic() - started:.1f} s", flush=True)
            report(f"cache filled ({args.answer_records} A + CNAME)", process.pid, metrics)
            for index in range(args.reloads):
                process.send_signal(signal.SIGHUP)
                time.sleep(args.reload_wait)
                report(f"{args.reload_wait:.0f} s after reload {index + 1}", process.pid, metrics)
        finally:
            process.terminate()
            process.wait(10)
            log.close()
            upstream.close()


if __name__ == "__main__":
    main()
