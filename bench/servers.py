"""The servers under test and the fake upstream: config templates, start-up, the answer check.

A server is a `Server` subclass registered in SERVERS; a configuration of one server compared with
another (blockd with metrics on and off, with dnstap on and off) is a `Toggle` in TOGGLES. A new
comparison (unbound with an RPZ zone, blockd with limits on/off) is a new subclass, or a new instance
with other options, plus its command-line option in run.py.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import string
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from common import BENCH, BenchError, log
from data import ListSet
from procs import CLIENT_CPU, SERVER_CPU, Proc, Procs, cpu_user, free_port

TEMPLATES = BENCH / "templates"
FORWARD_A = "192.0.2.1"  # what the fake upstream answers for every name under bench.test.


def template(name: str, **values: object) -> str:
    return string.Template((TEMPLATES / name).read_text()).substitute({k: str(v) for k, v in values.items()})


# --------------------------------------------------------------------------------------------
# DNS on the wire (probes and sanity checks; dnslib is a blockd dependency)


def dns_query(port: int, name: str, qtype: str, timeout: float = 1.0) -> Any:
    from dnslib import DNSRecord

    request = DNSRecord.question(name, qtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request.pack(), ("127.0.0.1", port))
        while True:
            data, _ = sock.recvfrom(65535)
            reply = DNSRecord.parse(data)
            if reply.header.id == request.header.id:
                return reply


class StartTimeout(BenchError):
    """A server did not give the answer it was waited for within the limit; `proc` is still running."""

    def __init__(self, message: str, proc: Proc, limit: float):
        super().__init__(message)
        self.proc = proc
        self.limit = limit


PROBE_INTERVAL = 0.01  # seconds between start-up probes that got an answer


def wait_until_answering(
    proc: Proc, port: int, name: str, started: float, limit: float, ready: Callable[[bytes], bool] | None = None
) -> float:
    """Seconds from `started` until the server answers a query for `name` (A), with an answer `ready`
    accepts when it is given (any answer otherwise)."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.01)
        while True:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode} while starting:\n{proc.log_tail()}")
            if time.monotonic() - started > limit:
                message = f"{proc.name} did not answer as wanted within {limit:g}s:\n{proc.log_tail()}"
                raise StartTimeout(message, proc, limit)
            try:
                sock.sendto(query, ("127.0.0.1", port))
                data = sock.recv(4096)
                if data[:2] == query[:2] and (ready is None or ready(data)):
                    return time.monotonic() - started
                # Answered, but not as wanted yet (a server loading a zone while it serves): poll
                # every 10 ms, not as fast as it answers, which would load the server under test.
                time.sleep(PROBE_INTERVAL)
            except (TimeoutError, ConnectionRefusedError, OSError):
                pass


# --------------------------------------------------------------------------------------------
# What every server needs


@dataclass
class Context:
    """What starting a server needs from the run."""

    tmp: Path  # generated configs and logs
    tools: dict[str, str]
    procs: Procs
    src: Path  # the blockd snapshot: blockd runs from here
    upstream_port: int = 0  # set by start_upstream
    seq: int = 0

    def next_name(self, kind: str, key: str) -> str:
        """A name for the next instance's files: kind-listset-N."""
        self.seq += 1
        return f"{kind}-{key}-{self.seq}"


@dataclass
class Capture:
    """fstrm_capture taking one blockd instance's dnstap stream on a unix socket, writing it to a file."""

    proc: Proc
    socket: Path
    path: Path


@dataclass
class Instance:
    kind: str
    proc: Proc
    port: int
    startup: float
    metrics_port: int | None = None
    log_path: Path | None = None
    started: float = 0.0  # time.monotonic() just before Popen
    cpu_at_start: tuple[int, int] = (0, 0)  # cpu_user(SERVER_CPU) just before Popen
    capture: Capture | None = None  # blockd with dnstap on: its collector

    @property
    def helpers(self) -> list[Proc]:
        """Processes that run for this instance only (its dnstap collector), on the client CPU."""
        return [self.capture.proc] if self.capture is not None else []


@dataclass
class Launch:
    """How to start one instance: its command line, and where blockd reports what it counted."""

    command: list[str]
    metrics_port: int | None = None
    log_path: Path | None = None
    capture: Capture | None = None


Check = tuple[str, str, Callable[[Any], bool]]  # name, qtype, good(reply)


class Server:
    """A server under test. Subclasses write its block-list config and its command line."""

    kind: ClassVar[str]
    strict: ClassVar[bool] = False  # True: any failed answer check ends the run (not only a listed A/AAAA)
    checked: ClassVar[str] = f"A 0.0.0.0, subdomain AAAA ::, MX NODATA locally, forward {FORWARD_A}"  # the report
    start_limit: float = 300.0  # seconds start() waits for the answer `ready` accepts

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Server:
        return cls()

    def write_lists(self, listset: ListSet, ctx: Context) -> None:
        """Write this server's block-list config for `listset` into listset.configs[kind] (if it needs one)."""

    def launch(self, name: str, port: int, listset: ListSet, ctx: Context) -> Launch:
        raise NotImplementedError

    def notes_after_runs(self, instance: Instance, listset: ListSet) -> list[str]:
        """Report notes taken from the instance after every run on it (before it stops)."""
        return []

    def ready(self, data: bytes) -> bool:
        """Whether an answer to the start-up probe (A of listset.probe) means "started"; any answer does."""
        return True

    def finish(self, instance: Instance, ctx: Context) -> dict[str, float]:
        """Stop the instance and its helpers; what it reported of its runs, for an on/off comparison's section."""
        stop(instance, ctx.procs)
        return {}

    def start(self, listset: ListSet, ctx: Context, port: int | None = None) -> Instance:
        """A fresh instance on `port` (a free one by default), pinned to the server CPU, answering a listed
        name as ready() wants.  Raises StartTimeout after start_limit seconds."""
        name = ctx.next_name(self.kind, listset.key)
        port = port or free_port()
        launch = self.launch(name, port, listset, ctx)
        cpu_at_start = cpu_user(int(SERVER_CPU))
        started = time.monotonic()
        proc = ctx.procs.start(name, ["taskset", "-c", SERVER_CPU, *launch.command], ctx.tmp / f"{name}.log", ctx.src)
        startup = wait_until_answering(proc, port, listset.probe, started, self.start_limit, self.ready)
        return Instance(
            self.kind, proc, port, startup, launch.metrics_port, launch.log_path, started, cpu_at_start, launch.capture
        )

    def answer_checks(self, listset: ListSet) -> list[Check]:
        """The server blocks A, AAAA, subdomains and other types locally, and forwards the rest."""
        blocked = listset.domains[len(listset.domains) // 2]
        return [
            (blocked, "A", lambda r: r.header.rcode == 0 and str(r.short()) == "0.0.0.0"),
            (f"deep.sub.{blocked}", "AAAA", lambda r: r.header.rcode == 0 and str(r.short()) == "::"),
            # NOERROR with no answer: answered locally (the fake upstream says NXDOMAIN to everything
            # outside bench.test, so a forwarded MX would come back NXDOMAIN).
            (blocked, "MX", lambda r: r.header.rcode == 0 and not r.rr),
            ("sanity.bench.test", "A", lambda r: r.header.rcode == 0 and str(r.short()) == FORWARD_A),
        ]

    def check_answers(self, instance: Instance, listset: ListSet) -> str:
        """The report's answer-check line; raises BenchError when a listed name is not blocked."""
        failed = []
        for name, qtype, good in self.answer_checks(listset):
            try:
                reply = dns_query(instance.port, name, qtype)
            except (TimeoutError, OSError) as exc:
                failed.append(f"{name} {qtype}: no answer ({exc})")
                continue
            if not good(reply):
                rcode = reply.header.rcode
                failed.append(f"{name} {qtype}: rcode {rcode} answer {[str(rr.rdata) for rr in reply.rr]}")
        label = f"{instance.kind} / {listset.key}"
        if not failed:
            return f"{label}: OK ({self.checked})"
        log(f"answer check {label}: FAILED {failed}")
        if self.strict:
            raise BenchError(f"{label} answers wrongly: {failed}")
        if any(f.split(":")[0].endswith((" A", " AAAA")) and "bench.test" not in f for f in failed):
            raise BenchError(f"{label} does not block as configured: {failed}")
        return f"{label}: FAILED " + "; ".join(failed)


def stop(instance: Instance, procs: Procs) -> None:
    """Stop the instance, then its helpers (the collector last, so it gets the server's last frames)."""
    for proc in (instance.proc, *instance.helpers):
        procs.stop(proc)


# --------------------------------------------------------------------------------------------
# The servers


BLOCKD_COUNTERS = (
    "blockd_dns_blocked_total",
    "blockd_cache_requests_total",
    "blockd_cache_hits_total",
    "blockd_cache_entries",
    "blockd_cache_evictions_total",
)


def scrape(instance: Instance) -> list[str]:
    """blockd's /metrics, as lines.  Raises OSError."""
    url = f"http://127.0.0.1:{instance.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode().splitlines()


def series(lines: list[str], metric: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `metric` in a /metrics scrape: its labels and its value."""
    found = []
    for line in lines:
        if line.startswith((metric + "{", metric + " ")):
            head, _, value = line.rpartition(" ")
            found.append((dict(re.findall(r'(\w+)="([^"]*)"', head)), float(value)))
    return found


# --------------------------------------------------------------------------------------------
# dnstap (--dnstap): blockd streams every lookup to fstrm_capture, the Frame Streams collector

DNSTAP_TYPE = "protobuf:dnstap.Dnstap"
FSTRM_STOP = 3  # the Frame Streams control frame a closed stream ends with


def dnstap_toggle(messages: str) -> Toggle:
    """The dnstap on/off comparison, blockd streaming with [dnstap] messages = `messages`."""
    return Toggle(
        slug="dnstap",
        what="dnstap",
        title="dnstap to fstrm_capture",
        on=Blockd(dnstap=True, dnstap_messages=messages),
        off=Blockd(),
        on_config=f'metrics on, `[log] queries = "blocked"`, `[dnstap] socket = "unix:…"` (`messages = "{messages}"`) '
        "to `fstrm_capture`",
        off_config='metrics on, `[log] queries = "blocked"`, no `[dnstap]`',
        pairs=None,
        target=0.8,
        alone=True,
    )


def capture_dir(ctx: Context) -> Path:
    """Where fstrm_capture writes: tmpfs when there is one, so that writing back a few hundred MB of
    capture to this machine's disk does not slow the run (it measures blockd, not the disk)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return ctx.tmp


def start_capture(ctx: Context, name: str) -> Capture:
    """fstrm_capture on a unix socket in the temp dir, writing to a file on tmpfs, pinned to the client CPU."""
    sock = ctx.tmp / f"{name}-dnstap.sock"
    path = capture_dir(ctx) / f"blockd-bench-{os.getpid()}-{name}-dnstap.fstrm"
    command = [ctx.tools["fstrm_capture"], "-t", DNSTAP_TYPE, "-u", str(sock), "-w", str(path)]
    log_path = ctx.tmp / f"{name}-fstrm_capture.log"
    proc = ctx.procs.start(f"{name}-fstrm_capture", ["taskset", "-c", CLIENT_CPU, *command], log_path)
    deadline = time.monotonic() + 10
    while not sock.is_socket():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"fstrm_capture did not open {sock}:\n{proc.log_tail()}")
        time.sleep(0.01)
    return Capture(proc, sock, path)


def capture_frames(path: Path) -> tuple[int, bool]:
    """The data frames in a Frame Streams file, and whether it is complete (ends with STOP, nothing cut off)."""
    data = path.read_bytes()
    frames = pos = 0
    last_control = None
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from("!I", data, pos)
        pos += 4
        if length:
            frames += 1
            pos += length
            last_control = None
        elif pos + 8 <= len(data):  # a control frame: its length, its type, its fields
            length, last_control = struct.unpack_from("!II", data, pos)
            pos += 4 + length
        else:
            break
    return frames, pos == len(data) and last_control == FSTRM_STOP


LIMITS_RAISED = "[limits]\nqps = 10000000\nburst = 10000000\n"
LIMITS_OFF = "[limits]\nenabled = false\n"


@dataclass
class Blockd(Server):
    """One blockd process (templates/blockd.toml); `metrics` False turns the listener, counting and the log off;
    `dnstap` True streams every lookup (`messages = "all"`, the default) to a fstrm_capture started for it."""

    kind: ClassVar[str] = "blockd"
    metrics: bool = True
    dnstap: bool = False
    dnstap_messages: str = "all"  # [dnstap] messages: all (CLIENT_QUERY + CLIENT_RESPONSE) | responses
    limits: bool = True  # [limits] on, with a rate dnsperf's one address does not reach; False: enabled = false
    drain_limit: float = 30.0  # seconds finish() waits for the dnstap queue to drain

    def launch(self, name: str, port: int, listset: ListSet, ctx: Context) -> Launch:
        metrics_port = free_port() if self.metrics else None
        log_path = ctx.tmp / f"{name}-queries.log"
        capture = start_capture(ctx, name) if self.dnstap else None
        lists = self.list_tables(listset)
        conf = ctx.tmp / f"{name}.toml"
        conf.write_text(
            template(
                "blockd.toml",
                port=port,
                state_dir=ctx.tmp / f"{name}-state",
                upstream_port=ctx.upstream_port,
                metrics_listen=f"127.0.0.1:{metrics_port}" if self.metrics else "",
                log_queries="blocked" if self.metrics else "none",
                log_path=log_path,
                dnstap=(
                    f'[dnstap]\nsocket = "unix:{capture.socket}"\nmessages = "{self.dnstap_messages}"\n'
                    if capture is not None
                    else ""
                ),
                limits=LIMITS_RAISED if self.limits else LIMITS_OFF,
                lists=lists,
                list_names=", ".join(f'"{n}"' for n in listset.files),
            )
        )
        check = subprocess.run(
            [sys.executable, "-m", "blockd", "check", "--config", str(conf)],
            capture_output=True,
            text=True,
            cwd=ctx.src,
        )
        if check.returncode != 0:
            raise BenchError(f"blockd check --config {conf} failed:\n{check.stdout}{check.stderr}")
        return Launch([sys.executable, "-m", "blockd", "run", "--config", str(conf)], metrics_port, log_path, capture)

    def list_tables(self, listset: ListSet) -> str:
        """The config's [lists.X] tables: one per file of the list set."""
        return "".join(f'[lists.{n}]\npath = "{p}"\n' for n, p in listset.files.items())

    def notes_after_runs(self, instance: Instance, listset: ListSet) -> list[str]:
        if listset.key != "shipped":
            return []
        return [
            "blockd's metrics and query log were really on: after all its shipped-list runs it reported "
            + self.counters(instance)
        ]

    def counters(self, instance: Instance) -> str:
        """What blockd counted (from /metrics) and logged (query-log lines)."""
        parts = []
        if instance.metrics_port:
            try:
                lines = scrape(instance)
                for metric in BLOCKD_COUNTERS:
                    values = [value for _, value in series(lines, metric)]
                    if values:
                        parts.append(f"{metric} = {sum(values):,.0f}")
            except (OSError, ValueError) as exc:
                parts.append(f"metrics scrape failed: {exc}")
        if instance.log_path is not None:
            time.sleep(0.5)  # the query-log writer flushes every 0.2 s
            try:
                with open(instance.log_path, "rb") as handle:
                    parts.append(f"query log lines = {sum(1 for _ in handle):,}")
            except OSError:
                parts.append("query log: no file")
        return ", ".join(parts)

    def finish(self, instance: Instance, ctx: Context) -> dict[str, float]:
        """With dnstap: the frames blockd counted once its queue has drained, then, once blockd and then
        fstrm_capture are stopped (SIGTERM), what the capture file holds."""
        if instance.capture is None:
            return super().finish(instance, ctx)
        facts = self.dnstap_counts(instance)
        capture = instance.capture
        ctx.procs.stop(instance.proc)  # blockd writes what is queued, STOP, and waits for FINISH
        ctx.procs.stop(capture.proc)
        facts["capture_rc"] = capture.proc.popen.returncode
        facts["capture_bytes"] = capture.path.stat().st_size if capture.path.exists() else 0
        frames, complete = capture_frames(capture.path) if capture.path.exists() else (0, False)
        facts["capture_frames"], facts["capture_complete"] = frames, complete
        facts["frames_per_query"] = 2 if self.dnstap_messages == "all" else 1
        capture.path.unlink(missing_ok=True)  # counted: hundreds of MB on tmpfs are not kept
        return facts

    def dnstap_counts(self, instance: Instance) -> dict[str, float]:
        """blockd_dnstap_frames_total by result and the queries it answered (blockd_dns_queries_total), once
        sent + dropped has not moved for 0.5 s (at most drain_limit s)."""
        deadline = time.monotonic() + self.drain_limit
        last: dict[str, float] = {}
        steady_since = time.monotonic()
        while True:
            lines = scrape(instance)
            counts = {
                f"frames_{labels.get('result')}": value for labels, value in series(lines, "blockd_dnstap_frames_total")
            }
            counts["queries"] = sum(value for _, value in series(lines, "blockd_dns_queries_total"))
            counts.setdefault("frames_sent", 0.0)
            counts.setdefault("frames_dropped", 0.0)
            if counts != last:
                last, steady_since = counts, time.monotonic()
            elif time.monotonic() - steady_since >= 0.5 or time.monotonic() > deadline:
                return counts
            time.sleep(0.1)


@dataclass
class Dnsmasq(Server):
    """dnsmasq (templates/dnsmasq.conf): local= plus address= 0.0.0.0 and :: per listed name."""

    kind: ClassVar[str] = "dnsmasq"

    def write_lists(self, listset: ListSet, ctx: Context) -> None:
        path = listset.configs[self.kind] = ctx.tmp / f"dnsmasq-lists-{listset.key}.conf"
        with open(path, "w") as handle:
            for name in listset.domains:
                handle.write(f"local=/{name}/\naddress=/{name}/0.0.0.0\naddress=/{name}/::\n")

    def launch(self, name: str, port: int, listset: ListSet, ctx: Context) -> Launch:
        conf = ctx.tmp / f"{name}.conf"
        conf.write_text(
            template("dnsmasq.conf", port=port, upstream_port=ctx.upstream_port, lists_conf=listset.configs[self.kind])
        )
        return Launch([ctx.tools["dnsmasq"], "-k", "-C", str(conf)])


@dataclass
class Unbound(Server):
    """unbound (templates/unbound.conf), one thread: local-zone always_null, or redirect + local-data."""

    kind: ClassVar[str] = "unbound"
    style: str = "always_null"  # --unbound-style

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Server:
        return cls(style=args.unbound_style)

    def write_lists(self, listset: ListSet, ctx: Context) -> None:
        path = listset.configs[self.kind] = ctx.tmp / f"unbound-lists-{listset.key}.conf"
        with open(path, "w") as handle:
            for name in listset.domains:
                if self.style == "redirect":
                    handle.write(
                        f'local-zone: "{name}." redirect\n'
                        f'local-data: "{name}. 300 IN A 0.0.0.0"\n'
                        f'local-data: "{name}. 300 IN AAAA ::"\n'
                    )
                else:
                    handle.write(f'local-zone: "{name}." always_null\n')

    def launch(self, name: str, port: int, listset: ListSet, ctx: Context) -> Launch:
        conf = ctx.tmp / f"{name}.conf"
        conf.write_text(
            template(
                "unbound.conf",
                port=port,
                upstream_port=ctx.upstream_port,
                tmp=ctx.tmp,
                lists_conf=listset.configs[self.kind],
            )
        )
        return Launch([ctx.tools["unbound"], "-d", "-c", str(conf)])


# --------------------------------------------------------------------------------------------
# The RPZ comparison (--rpz): blockd and unbound given one RPZ zone, from its file or from a primary

RCODE_NXDOMAIN = 3


def is_nxdomain(data: bytes) -> bool:
    return len(data) >= 4 and data[3] & 0x0F == RCODE_NXDOMAIN


def ask(port: int, name: str, qtype: str = "A", timeout: float = 1.0) -> tuple[int, list[str]] | None:
    """(rcode, answer RDATA as text) of one UDP query, or None when no answer came within `timeout`."""
    try:
        reply = dns_query(port, name, qtype, timeout)
    except (TimeoutError, OSError):
        return None
    return reply.header.rcode, [str(rr.rdata) for rr in reply.rr]


def rpz_checks(listset: ListSet) -> list[Check]:
    """A listed name, its subdomains and its other types are NXDOMAIN; the parent and the rest are forwarded."""
    listed = listset.domains[len(listset.domains) // 2]
    parent = ".".join(listed.split(".")[-3:])  # "<tld>.bench.test": never listed (every name has 2+ labels more)
    forwarded: Callable[[Any], bool] = lambda r: r.header.rcode == 0 and str(r.short()) == FORWARD_A  # noqa: E731
    return [
        (listset.probe, "A", lambda r: r.header.rcode == RCODE_NXDOMAIN and not r.rr),
        (listed, "A", lambda r: r.header.rcode == RCODE_NXDOMAIN and not r.rr),
        (f"deep.sub.{listed}", "AAAA", lambda r: r.header.rcode == RCODE_NXDOMAIN and not r.rr),
        (listed, "MX", lambda r: r.header.rcode == RCODE_NXDOMAIN and not r.rr),
        (parent, "A", forwarded),
        ("sanity.bench.test", "A", forwarded),
    ]


RPZ_CHECKED = f"listed name A/MX and a subdomain's AAAA NXDOMAIN, its parent and sanity.bench.test forward {FORWARD_A}"


@dataclass
class BlockdRpz(Blockd):
    """blockd with one RPZ list, `[lists.rpz]`: `path` = the zone file, or `zone` + `primaries` (the zone by
    AXFR/IXFR from `primary`, the port of a primary on 127.0.0.1, with NOTIFY).  Its own actions
    (`action = "zone"`, the default for RPZ): `CNAME .` answers NXDOMAIN.  Started means: the probe is NXDOMAIN."""

    strict: ClassVar[bool] = True
    checked: ClassVar[str] = RPZ_CHECKED
    primary: int | None = None
    origin: str = ""
    start_limit: float = 900.0

    def list_tables(self, listset: ListSet) -> str:
        if self.primary is None:
            return super().list_tables(listset)
        return f'[lists.rpz]\nzone = "{self.origin}"\nprimaries = ["127.0.0.1:{self.primary}"]\n'

    def ready(self, data: bytes) -> bool:
        return is_nxdomain(data)

    def answer_checks(self, listset: ListSet) -> list[Check]:
        return rpz_checks(listset)

    def notes_after_runs(self, instance: Instance, listset: ListSet) -> list[str]:
        return []


@dataclass
class UnboundRpz(Server):
    """unbound (templates/unbound-rpz.conf), one thread, `module-config: "respip validator iterator"`, one
    `rpz:` clause: `zonefile:`, or `primary:` + `allow-notify:` (no zonefile: the zone is kept in memory only).
    Started means: the probe is NXDOMAIN."""

    kind: ClassVar[str] = "unbound"
    strict: ClassVar[bool] = True
    checked: ClassVar[str] = RPZ_CHECKED
    origin: str = ""
    zonefile: Path | None = None
    primary: int | None = None
    start_limit: float = 900.0

    def launch(self, name: str, port: int, listset: ListSet, ctx: Context) -> Launch:
        if self.primary is not None:
            source = f"  primary: 127.0.0.1@{self.primary}\n  allow-notify: 127.0.0.1"
        else:
            source = f'  zonefile: "{self.zonefile}"'
        conf = ctx.tmp / f"{name}.conf"
        conf.write_text(
            template(
                "unbound-rpz.conf",
                port=port,
                upstream_port=ctx.upstream_port,
                tmp=ctx.tmp,
                origin=self.origin,
                source=source,
            )
        )
        check = subprocess.run([ctx.tools["unbound-checkconf"], str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"unbound-checkconf {conf} failed:\n{check.stdout}{check.stderr}")
        return Launch([ctx.tools["unbound"], "-d", "-c", str(conf)])

    def ready(self, data: bytes) -> bool:
        return is_nxdomain(data)

    def answer_checks(self, listset: ListSet) -> list[Check]:
        return rpz_checks(listset)


# The table's columns, in this order: the first is the subject, the others are its anchors.
SERVERS: dict[str, type[Server]] = {cls.kind: cls for cls in (Blockd, Dnsmasq, Unbound)}


def build_servers(args: argparse.Namespace) -> dict[str, Server]:
    return {kind: cls.from_args(args) for kind, cls in SERVERS.items()}


# --------------------------------------------------------------------------------------------
# Variants compared back to back


@dataclass(frozen=True)
class Toggle:
    """One server in two configurations, compared on fresh instances alternating on, off (blocked answers)."""

    slug: str  # the "Every measured run" labels: <kind>-<slug>-on/<listset>
    what: str  # the progress log: "<kind> <what> on: ..."
    title: str  # the report section: "### <kind>: <title> on vs off (...)"
    on: Server
    off: Server
    on_config: str  # the section's table: how each configuration differs
    off_config: str
    pairs: int | None = 2  # on/off pairs of fresh instances (1 with --quick); None: --repeat pairs
    target: float | None = None  # the goal for on/off blocked qps (at least this)
    alone: bool = False  # the option runs this comparison instead of the qps suite (Bench.run_toggles)

    @property
    def kind(self) -> str:
        return self.on.kind


# args attribute (a store_true option in run.py) -> the comparison it turns on
TOGGLES: dict[str, Toggle] = {
    "metrics_off": Toggle(
        slug="metrics",
        what="metrics/log",
        title="metrics + blocked-query log",
        on=Blockd(metrics=True),
        off=Blockd(metrics=False),
        on_config='metrics on, `[log] queries = "blocked"`',
        off_config='`[metrics] listen = ""`, `[log] queries = "none"`',
    ),
    "dnstap": dnstap_toggle("all"),
    "limits": Toggle(
        slug="limits",
        what="limits",
        title="per-client limits",
        on=Blockd(limits=True),
        off=Blockd(limits=False),
        on_config="metrics on, `[limits]` defaults but `qps`/`burst` 10,000,000 (dnsperf asks from one address; "
        "every query still takes a token, checks slip and flood state: the path of every client's query)",
        off_config="metrics on, `[limits] enabled = false`",
        pairs=None,
        target=0.95,
        alone=True,
    ),
}


# --------------------------------------------------------------------------------------------
# The fake upstream


def start_upstream(ctx: Context) -> Instance:
    """unbound as a local authoritative server for bench.test., on the client CPU; sets ctx.upstream_port."""
    ctx.upstream_port = free_port()
    conf = ctx.tmp / "upstream-unbound.conf"
    conf.write_text(template("upstream-unbound.conf", port=ctx.upstream_port, tmp=ctx.tmp))
    proc = ctx.procs.start(
        "upstream",
        ["taskset", "-c", CLIENT_CPU, ctx.tools["unbound"], "-d", "-c", str(conf)],
        ctx.tmp / "upstream.log",
    )
    startup = wait_until_answering(proc, ctx.upstream_port, "probe.bench.test", time.monotonic(), 30)
    reply = dns_query(ctx.upstream_port, "probe.bench.test", "A")
    if str(reply.short()) != FORWARD_A:
        raise BenchError(f"fake upstream answered {reply.short()!r}, expected {FORWARD_A}")
    log(f"fake upstream (unbound, local-zone bench.test.) on 127.0.0.1:{ctx.upstream_port}, CPU {CLIENT_CPU}")
    return Instance("upstream", proc, ctx.upstream_port, startup)
