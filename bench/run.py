#!/usr/bin/env python3
"""blockd against dnsmasq and unbound, side by side on loopback: one command, one table.

    python bench/run.py                          # full run (about 6-8 minutes)
    python bench/run.py --quick                  # smoke test, about a minute (what CI may run)
    python bench/run.py --metrics-off --profile  # also: blockd counting/log on vs off, py-spy profile

Every server under test is pinned to CPU 0 (taskset -c 0); dnsperf and the fake upstream run on
CPU 1.  All traffic stays on 127.0.0.1: the servers forward only to a fake upstream (unbound as a
local authoritative server for bench.test.) and never to the resolvers in /etc/resolv.conf.
Every process started here is stopped in a finally block (and gets SIGTERM from the kernel if
this script dies: PR_SET_PDEATHSIG).  See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TEMPLATES = BENCH / "templates"
SHIPPED_LISTS = ("tiktok", "bytedance", "doh-bypass")  # what the embedded default loads
SERVERS = ("blockd", "dnsmasq", "unbound")
SERVER_CPU = "0"
CLIENT_CPU = "1"
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
FORWARD_A = "192.0.2.1"
HIT_NAMES = 100  # cache-hit set: hit0..hit99.bench.test, A and AAAA
FIXED_QPS = 5000
# Frames every sample passes through (interpreter start, the reactor loop): left out of the inclusive table.
PLUMBING = ("twisted/", "runpy", "blockd/cli.py", "blockd/__main__.py")
QUIET = 0.15  # wait_quiet: other processes' share of a CPU that counts as quiet
IDLE_LEAVES = ("Condition.wait", "Event.wait")  # py-spy leaf frames of a parked thread (the query-log writer)
# Names blockd answers NXDOMAIN by design whatever the group's action (the Firefox DoH canary and
# iCloud Private Relay: a sinkhole address would be a positive answer); the anchors would sinkhole
# them, so they stay in the lists but out of the blocked-query files.
NEGATIVE_BY_DESIGN = ("use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com", "mask-api.icloud.com")
CLK_TCK = os.sysconf("SC_CLK_TCK")

SNAPSHOT: Path | None = None  # the copy of blockd/ every blockd process of this run imports (see snapshot_blockd)


class BenchError(Exception):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def which(name: str) -> str | None:
    return shutil.which(name, path=TOOL_PATH)


# --------------------------------------------------------------------------------------------
# Tools


def ensure_tools(allow_install: bool) -> dict[str, str]:
    wanted = {"dnsperf": "dnsperf", "dnsmasq": "dnsmasq", "unbound": "unbound", "taskset": "util-linux"}
    missing = sorted({pkg for exe, pkg in wanted.items() if which(exe) is None})
    if missing and allow_install and os.geteuid() == 0 and which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        command = ["apt-get", "install", "-y", *missing]
        if subprocess.run(command, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(command, env=env)
        # Debian's postinst may start the system services; the benchmark wants nothing on :53.
        for service in ("dnsmasq", "unbound"):
            if service in missing:
                subprocess.run(["systemctl", "stop", service], capture_output=True)
                subprocess.run(["systemctl", "disable", service], capture_output=True)
                subprocess.run(["invoke-rc.d", service, "stop"], capture_output=True)
    paths = {exe: which(exe) for exe in wanted}
    still = sorted({wanted[exe] for exe, path in paths.items() if path is None})
    if still:
        print(
            "bench: missing tools: " + ", ".join(still) + "\n"
            "install them (Debian/Ubuntu) with:\n"
            "  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y dnsperf dnsmasq unbound\n"
            "  sudo systemctl disable --now dnsmasq unbound   # the benchmark starts its own instances\n"
            "then run this again (or run it as root and it installs them itself).",
            file=sys.stderr,
        )
        sys.exit(2)
    return {exe: path for exe, path in paths.items() if path is not None}


def ensure_py_spy(allow_install: bool) -> str | None:
    path = which("py-spy")
    if path is None and allow_install:
        log("installing py-spy with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"])
        path = which("py-spy") or which(str(Path(sys.executable).parent / "py-spy"))
    if path is None:
        print("bench: py-spy not found; install it with `pip install py-spy` (profile skipped)", file=sys.stderr)
    return path


# --------------------------------------------------------------------------------------------
# Processes


def snapshot_blockd(tmp: Path) -> str:
    """Copy blockd/ and the shipped lists once, so every process of the run uses the same code and lists
    even while people edit the working tree; returns a description of that code."""
    global SNAPSHOT
    SNAPSHOT = tmp / "src"
    shutil.copytree(REPO / "blockd", SNAPSHOT / "blockd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (SNAPSHOT / "domains").mkdir()
    for name in SHIPPED_LISTS:
        shutil.copy2(REPO / "domains" / f"{name}.txt", SNAPSHOT / "domains" / f"{name}.txt")
    sys.path.insert(0, str(SNAPSHOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), os.environ.get("PYTHONPATH")]))
    digest = hashlib.sha256()
    for path in sorted((SNAPSHOT / "blockd").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    probe = subprocess.run(
        [sys.executable, "-c", "import blockd; print(blockd.__file__)"], capture_output=True, text=True, cwd=SNAPSHOT
    )
    if not probe.stdout.strip().startswith(str(SNAPSHOT)):
        raise BenchError(f"blockd imports from {probe.stdout.strip() or probe.stderr.strip()}, not the snapshot")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "blockd"], capture_output=True, text=True
    )
    return (
        f"git {git.stdout.strip() or '?'}"
        + (" + uncommitted changes in blockd/" if dirty.stdout.strip() else "")
        + f", copied at the start of the run (sha256 of blockd/*.py {digest.hexdigest()[:12]}); "
        "every blockd process of the run used that copy"
    )


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if this script dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process this script starts; stop_all() ends each one by its pid."""

    def __init__(self) -> None:
        self.running: list[Proc] = []

    def start(self, name: str, command: list[str], log_path: Path, cwd: Path | None = None) -> Proc:
        handle = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops them in order
                preexec_fn=_die_with_parent,
                env={**os.environ, "PATH": TOOL_PATH},
            )
        finally:
            handle.close()
        proc = Proc(name, popen, log_path)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.popen.poll() is None:
            try:
                proc.popen.send_signal(signal.SIGTERM)
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
            except ProcessLookupError:
                pass
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


def free_port() -> int:
    """A loopback port free for both UDP and TCP."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise BenchError("no free loopback port")


def cpu_ticks(pid: int, user_only: bool = False) -> int:
    """utime + stime (or utime alone) of a process, all its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + (0 if user_only else int(fields[12]))


def cpu_user(cpu: int) -> tuple[int, int]:
    """(user + nice, all) clock ticks of one CPU, from /proc/stat."""
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith(f"cpu{cpu} "):
                values = [int(v) for v in line.split()[1:9]]
                return values[0] + values[1], sum(values)
    return 0, 0


def children_user_ticks() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime * CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------
# DNS on the wire (probes and sanity checks; dnslib is a blockd dependency)


def dns_query(port: int, name: str, qtype: str, timeout: float = 1.0):
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


def wait_until_answering(proc: Proc, port: int, name: str, started: float, limit: float) -> float:
    """Seconds from `started` until the server answers a query for `name`."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.01)
        while True:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode} while starting:\n{proc.log_tail()}")
            if time.monotonic() - started > limit:
                raise BenchError(f"{proc.name} did not answer within {limit:g}s:\n{proc.log_tail()}")
            try:
                sock.sendto(query, ("127.0.0.1", port))
                data = sock.recv(4096)
                if data[:2] == query[:2]:
                    return time.monotonic() - started
            except (TimeoutError, ConnectionRefusedError, OSError):
                pass


# --------------------------------------------------------------------------------------------
# dnsperf


@dataclass
class PerfResult:
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    runtime: float = 0.0
    avg_latency: float = 0.0
    rcodes: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, with -v only
    timeouts: int = 0
    cpu_us: float | None = None  # server CPU per completed query during this run
    others: tuple[float, float] = (0.0, 0.0)  # share of CPU 0 / CPU 1 used by processes not in the benchmark
    server_share: float = 0.0  # the server's CPU time / dnsperf's run time

    def percentile(self, fraction: float) -> float:
        """Latency percentile over every query sent; lost queries count as infinitely slow."""
        total = len(self.latencies) + self.timeouts
        if total == 0:
            return float("nan")
        rank = max(1, math.ceil(fraction * total))
        if rank > len(self.latencies):
            return float("inf")
        return sorted(self.latencies)[rank - 1]


def _number(pattern: str, text: str, cast=float):
    match = re.search(pattern, text, re.MULTILINE)
    return cast(match.group(1)) if match else cast(0)


def parse_dnsperf(text: str) -> PerfResult:
    result = PerfResult(
        sent=_number(r"Queries sent:\s+(\d+)", text, int),
        completed=_number(r"Queries completed:\s+(\d+)", text, int),
        lost=_number(r"Queries lost:\s+(\d+)", text, int),
        qps=_number(r"Queries per second:\s+([\d.]+)", text),
        runtime=_number(r"Run time \(s\):\s+([\d.]+)", text),
        avg_latency=_number(r"Average Latency \(s\):\s+([\d.]+)", text),
    )
    match = re.search(r"Response codes:\s+(.*)", text)
    result.rcodes = match.group(1).strip() if match else ""
    for line in text.splitlines():
        if not line.startswith("> "):
            continue
        parts = line.split()
        if parts[1] in ("T", "I"):
            result.timeouts += 1
            continue
        try:
            result.latencies.append(float(parts[-1]))
        except ValueError:
            pass
    return result


# --------------------------------------------------------------------------------------------
# Lists and query files


def shipped_dir() -> Path:
    """The shipped lists' directory: the run's snapshot when there is one."""
    return (SNAPSHOT or REPO) / "domains"


def load_shipped() -> list[str]:
    """The shipped lists exactly as blockd loads them (normalised, comments dropped, deduplicated)."""
    from blockd.lists import load_list

    domains: set[str] = set()
    for name in SHIPPED_LISTS:
        domains |= load_list(name, shipped_dir() / f"{name}.txt").domains
    return sorted(domains)


def synthetic_names(count: int, seed: int = 20261129) -> list[str]:
    """`count` distinct, valid, deterministic names: 80% 'label.tld', 20% 'label.label.tld'."""
    rng = random.Random(seed)
    tlds = ["com", "net", "org", "io", "cn", "info", "xyz", "app", "co", "me", "tv", "biz"]
    alphabet = string.ascii_lowercase + string.digits
    names: set[str] = set()
    while len(names) < count:
        label = rng.choice(string.ascii_lowercase) + "".join(rng.choices(alphabet, k=rng.randint(5, 13)))
        if rng.random() < 0.2:
            label = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) + "." + label
        names.add(f"{label}.{rng.choice(tlds)}")
    return sorted(names)


def write_lines(path: Path, lines) -> Path:
    with open(path, "w") as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")
    return path


def blocked_queries(domains: list[str], count: int, seed: int) -> list[str]:
    """Query lines for listed names: the name itself or a subdomain of it, A and AAAA."""
    rng = random.Random(seed)
    domains = [d for d in domains if not d.endswith(NEGATIVE_BY_DESIGN)]
    picks = domains if len(domains) <= count else rng.sample(domains, count)
    lines = []
    for index, domain in enumerate(picks):
        for qtype in ("A", "AAAA"):
            name = domain if (index + len(qtype)) % 2 else f"www.{domain}"
            lines.append(f"{name} {qtype}")
    rng.shuffle(lines)
    return lines


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class ListSet:
    key: str  # "shipped" | "1m"
    label: str
    files: dict[str, Path]  # blockd list name -> file
    domains: list[str]
    query_file: Path
    probe: str  # a listed name, for start-up probing
    dnsmasq_conf: Path | None = None
    unbound_conf: Path | None = None


@dataclass
class Instance:
    kind: str
    proc: Proc
    port: int
    startup: float
    metrics_port: int | None = None
    log_path: Path | None = None


def template(name: str, **values: object) -> str:
    return string.Template((TEMPLATES / name).read_text()).substitute({k: str(v) for k, v in values.items()})


def profile_tables(raw: Path, title: str, result: PerfResult, copy: Path, args: argparse.Namespace) -> list[str]:
    """Top functions by self and inclusive share of busy samples, from py-spy's collapsed stacks."""
    selfs: dict[str, int] = {}
    totals: dict[str, int] = {}
    side: dict[str, int] = {}
    samples = idle = side_total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count  # a thread parked in a wait that py-spy did not recognise as idle
            continue
        if not any("mainLoop" in f for f in frames):
            side[frames[-1]] = side.get(frames[-1], 0) + count
            side_total += count
        samples += count
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for frame in set(frames):
            totals[frame] = totals.get(frame, 0) + count
    samples = max(1, samples)
    top = args.profile_top
    side_top = ", ".join(f"`{f}` {n * 100 / samples:.1f}%" for f, n in sorted(side.items(), key=lambda x: -x[1])[:3])
    return [
        "",
        f"### blockd profile: py-spy, {title}",
        "",
        f"{samples:,} busy samples at 200 Hz over {args.duration:g}s ({idle:,} samples of threads parked in "
        f"`{'`/`'.join(IDLE_LEAVES)}` left out); dnsperf got {result.qps:,.0f} qps while sampled. "
        f"Threads other than the reactor: {side_total * 100 / samples:.1f}% of busy samples"
        + (f" (top: {side_top})" if side else "")
        + f". Raw collapsed stacks: `bench/out/{copy.name}`.",
        "",
        "| self % | function (file:first line) |",
        "|---:|---|",
        *(f"| {n * 100 / samples:.1f} | `{f}` |" for f, n in sorted(selfs.items(), key=lambda x: -x[1])[:top]),
        "",
        "| inclusive % | function (file:first line; Twisted and start-up frames left out) |",
        "|---:|---|",
        *[
            f"| {n * 100 / samples:.1f} | `{f}` |"
            for f, n in sorted(totals.items(), key=lambda x: -x[1])
            if not any(part in f for part in PLUMBING)
        ][:top],
    ]


def _qps_list(runs: list[PerfResult]) -> str:
    return " / ".join(f"{r.qps:,.0f}" for r in runs)


def _ms_list(runs: list[PerfResult]) -> str:
    return " / ".join(f"{r.percentile(0.99) * 1e3:.3f}" for r in runs)


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path):
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.procs = Procs()
        self.upstream: Proc | None = None
        self.upstream_port = 0
        self.results: dict[str, dict[str, dict[str, object]]] = {}  # server -> listset -> metric -> value
        self.notes: list[str] = []
        self.sanity: list[str] = []
        self.extra: list[str] = []
        self.timeout = 2  # dnsperf -t: seconds before a query counts as lost
        self.cache_miss_files: list[Path] = []
        self.cache_miss_count = 0
        self.runs: dict[str, dict[str, list[PerfResult]]] = {}  # "server/listset" -> metric -> every run
        self.hit_file: Path | None = None
        self.seq = 0
        self.fingerprint = "?"
        self.cache_state = "?"
        self.waited = 0.0  # seconds spent in wait_quiet, bounded by --quiet-budget
        self.quiet_waits = 0

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self) -> dict[str, ListSet]:
        args = self.args
        tmp = self.tmp
        log("loading the shipped lists as blockd does")
        shipped = load_shipped()
        sets = {
            "shipped": ListSet(
                key="shipped",
                label=f"shipped lists ({len(shipped):,} names)",
                files={name: shipped_dir() / f"{name}.txt" for name in SHIPPED_LISTS},
                domains=shipped,
                query_file=write_lines(tmp / "q-blocked-shipped.txt", blocked_queries(shipped, 5000, 1)),
                probe=shipped[0],
            )
        }
        if not args.skip_1m:
            log(f"generating the synthetic {args.synthetic:,}-name list")
            names = synthetic_names(args.synthetic)
            path = write_lines(tmp / "synthetic.txt", names)
            from blockd.lists import load_list

            loaded = load_list("synthetic", path).domains
            if len(loaded) != len(names):
                raise BenchError(f"blockd loads {len(loaded)} of the {len(names)} synthetic names")
            sets["1m"] = ListSet(
                key="1m",
                label=f"synthetic list ({len(names):,} names)",
                files={"synthetic": path},
                domains=names,
                query_file=write_lines(tmp / "q-blocked-1m.txt", blocked_queries(names, 20000, 2)),
                probe=names[-1],
            )
        for listset in sets.values():
            listset.dnsmasq_conf = tmp / f"dnsmasq-lists-{listset.key}.conf"
            with open(listset.dnsmasq_conf, "w") as handle:
                for name in listset.domains:
                    handle.write(f"local=/{name}/\naddress=/{name}/0.0.0.0\naddress=/{name}/::\n")
            listset.unbound_conf = tmp / f"unbound-lists-{listset.key}.conf"
            with open(listset.unbound_conf, "w") as handle:
                for name in listset.domains:
                    if args.unbound_style == "redirect":
                        handle.write(
                            f'local-zone: "{name}." redirect\n'
                            f'local-data: "{name}. 300 IN A 0.0.0.0"\n'
                            f'local-data: "{name}. 300 IN AAAA ::"\n'
                        )
                    else:
                        handle.write(f'local-zone: "{name}." always_null\n')
        self.hit_file = write_lines(
            tmp / "q-cache-hit.txt", [f"hit{i}.bench.test {t}" for i in range(HIT_NAMES) for t in ("A", "AAAA")]
        )
        # Unique names, enough that no server runs out within a run; one file per repeat (and one
        # for the upstream check), so no repeat asks a name an earlier one put in the cache.
        self.cache_miss_count = int(min(4_000_000, max(20_000, 150_000 * args.duration)))
        for run in range(args.repeat + 1):
            self.cache_miss_files.append(
                write_lines(
                    tmp / f"q-cache-miss-{run}.txt",
                    (f"u{i}.r{run}.miss.bench.test A" for i in range(self.cache_miss_count)),
                )
            )
        return sets

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        conf = self.tmp / "upstream-unbound.conf"
        conf.write_text(template("upstream-unbound.conf", port=self.upstream_port, tmp=self.tmp))
        proc = self.procs.start(
            "upstream",
            ["taskset", "-c", CLIENT_CPU, self.tools["unbound"], "-d", "-c", str(conf)],
            self.tmp / "upstream.log",
        )
        self.upstream = proc
        wait_until_answering(proc, self.upstream_port, "probe.bench.test", time.monotonic(), 30)
        reply = dns_query(self.upstream_port, "probe.bench.test", "A")
        if str(reply.short()) != FORWARD_A:
            raise BenchError(f"fake upstream answered {reply.short()!r}, expected {FORWARD_A}")
        log(f"fake upstream (unbound, local-zone bench.test.) on 127.0.0.1:{self.upstream_port}, CPU {CLIENT_CPU}")

    def start_server(self, kind: str, listset: ListSet, metrics: bool = True) -> Instance:
        self.seq += 1
        port = free_port()
        name = f"{kind}-{listset.key}-{self.seq}"
        metrics_port = None
        log_path = None
        if kind == "blockd":
            if metrics:
                metrics_port = free_port()
            log_path = self.tmp / f"{name}-queries.log"
            lists = "".join(f'[lists.{n}]\npath = "{p}"\n' for n, p in listset.files.items())
            conf = self.tmp / f"{name}.toml"
            conf.write_text(
                template(
                    "blockd.toml",
                    port=port,
                    upstream_port=self.upstream_port,
                    metrics_listen=f"127.0.0.1:{metrics_port}" if metrics else "",
                    log_queries="blocked" if metrics else "none",
                    log_path=log_path,
                    lists=lists,
                    list_names=", ".join(f'"{n}"' for n in listset.files),
                )
            )
            check = subprocess.run(
                [sys.executable, "-m", "blockd", "check", "--config", str(conf)],
                capture_output=True,
                text=True,
                cwd=SNAPSHOT,
            )
            if check.returncode != 0:
                raise BenchError(f"blockd check --config {conf} failed:\n{check.stdout}{check.stderr}")
            command = [sys.executable, "-m", "blockd", "run", "--config", str(conf)]
        elif kind == "dnsmasq":
            conf = self.tmp / f"{name}.conf"
            conf.write_text(
                template("dnsmasq.conf", port=port, upstream_port=self.upstream_port, lists_conf=listset.dnsmasq_conf)
            )
            command = [self.tools["dnsmasq"], "-k", "-C", str(conf)]
        else:
            conf = self.tmp / f"{name}.conf"
            conf.write_text(
                template(
                    "unbound.conf",
                    port=port,
                    upstream_port=self.upstream_port,
                    tmp=self.tmp,
                    lists_conf=listset.unbound_conf,
                )
            )
            command = [self.tools["unbound"], "-d", "-c", str(conf)]
        started = time.monotonic()
        proc = self.procs.start(
            name, ["taskset", "-c", SERVER_CPU, *command], self.tmp / f"{name}.log", cwd=SNAPSHOT or REPO
        )
        startup = wait_until_answering(proc, port, listset.probe, started, 300)
        return Instance(kind, proc, port, startup, metrics_port, log_path)

    # -- measurements -------------------------------------------------------------------------

    def dnsperf(
        self,
        instance: Instance,
        query_file: Path,
        duration: float,
        qps: int | None = None,
        verbose: bool = False,
        max_runs: int | None = None,
    ) -> PerfResult:
        command = [
            "taskset", "-c", CLIENT_CPU, self.tools["dnsperf"],
            "-s", "127.0.0.1", "-p", str(instance.port), "-d", str(query_file),
            "-c", str(self.args.clients), "-q", str(self.args.outstanding),
            "-l", f"{duration:g}", "-t", str(self.timeout),
        ]  # fmt: skip
        if qps:
            command += ["-Q", str(qps)]
        if verbose:
            command.append("-v")
        if max_runs:
            command += ["-n", str(max_runs)]
        if self.args.edns:
            command.append("-e")
        # Contention: user CPU time on each CPU not spent by the benchmark's own processes (the
        # kernel's share is left out: loopback packet work lands in softirq/ksoftirqd time).
        pid = instance.proc.pid
        upstream = self.upstream.pid if self.upstream is not None and self.upstream.pid != pid else None

        def sample() -> tuple[int, int, tuple[int, int], tuple[int, int], float, int]:
            return (
                cpu_ticks(pid),
                cpu_ticks(pid, user_only=True),
                cpu_user(0),
                cpu_user(1),
                children_user_ticks(),
                cpu_ticks(upstream, user_only=True) if upstream else 0,
            )

        first = sample()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=duration + self.timeout + 60,
            preexec_fn=_die_with_parent,
        )
        last = sample()
        before, after = first[0], last[0]
        user0, all0 = (a - b for a, b in zip(last[2], first[2], strict=True))
        user1, all1 = (a - b for a, b in zip(last[3], first[3], strict=True))
        ours0 = last[1] - first[1]  # the server under test
        ours1 = last[4] - first[4] + last[5] - first[5]  # dnsperf + the fake upstream
        others = (max(0.0, (user0 - ours0) / all0) if all0 else 0.0, max(0.0, (user1 - ours1) / all1) if all1 else 0.0)
        if done.returncode != 0 or "Queries sent" not in done.stdout:
            raise BenchError(f"dnsperf failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-2000:]}")
        result = parse_dnsperf(done.stdout)
        result.others = others
        # Over dnsperf's own run time: the subprocess window also holds dnsperf's start-up and its
        # wait (-t) for lost queries, when the server is idle.
        result.server_share = (after - before) / CLK_TCK / result.runtime if result.runtime else 0.0
        if result.completed:
            result.cpu_us = (after - before) * 1e6 / CLK_TCK / result.completed
        if instance.proc.popen.poll() is not None:
            raise BenchError(f"{instance.proc.name} died during the run:\n{instance.proc.log_tail()}")
        return result

    def check_answers(self, instance: Instance, listset: ListSet) -> None:
        """The server blocks A, AAAA, subdomains and other types locally, and forwards the rest."""
        blocked = listset.domains[len(listset.domains) // 2]
        checks = [
            (blocked, "A", lambda r: r.header.rcode == 0 and str(r.short()) == "0.0.0.0"),
            (f"deep.sub.{blocked}", "AAAA", lambda r: r.header.rcode == 0 and str(r.short()) == "::"),
            # NOERROR with no answer: answered locally (the fake upstream says NXDOMAIN to everything
            # outside bench.test, so a forwarded MX would come back NXDOMAIN).
            (blocked, "MX", lambda r: r.header.rcode == 0 and not r.rr),
            ("sanity.bench.test", "A", lambda r: r.header.rcode == 0 and str(r.short()) == FORWARD_A),
        ]
        failed = []
        for name, qtype, good in checks:
            try:
                reply = dns_query(instance.port, name, qtype)
            except (TimeoutError, OSError) as exc:
                failed.append(f"{name} {qtype}: no answer ({exc})")
                continue
            if not good(reply):
                rcode = reply.header.rcode
                failed.append(f"{name} {qtype}: rcode {rcode} answer {[str(rr.rdata) for rr in reply.rr]}")
        label = f"{instance.kind} / {listset.key}"
        if failed:
            self.sanity.append(f"{label}: FAILED " + "; ".join(failed))
            log(f"answer check {label}: FAILED {failed}")
            if any(f.split(":")[0].endswith((" A", " AAAA")) and "bench.test" not in f for f in failed):
                raise BenchError(f"{label} does not block as configured: {failed}")
        else:
            self.sanity.append(f"{label}: OK (A 0.0.0.0, subdomain AAAA ::, MX NODATA locally, forward {FORWARD_A})")

    def blockd_counters(self, instance: Instance) -> str:
        parts = []
        if instance.metrics_port:
            try:
                url = f"http://127.0.0.1:{instance.metrics_port}/metrics"
                text = urllib.request.urlopen(url, timeout=5).read().decode()
                for metric in (
                    "blockd_dns_blocked_total",
                    "blockd_cache_requests_total",
                    "blockd_cache_hits_total",
                    "blockd_cache_entries",
                    "blockd_cache_evictions_total",
                ):
                    values = [
                        float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith((metric + "{", metric + " "))
                    ]
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

    def wait_quiet(self, server_pid: int | None) -> None:
        """Before a measured run: wait (bounded) until other processes leave both CPUs mostly idle."""
        budget = min(self.args.quiet_wait, self.args.quiet_budget - self.waited)
        started = time.monotonic()
        while True:
            first = (cpu_user(0), cpu_user(1), cpu_ticks(server_pid, user_only=True) if server_pid else 0)
            time.sleep(0.5)
            last = (cpu_user(0), cpu_user(1), cpu_ticks(server_pid, user_only=True) if server_pid else 0)
            busy = []
            for index in (0, 1):
                user, total = (a - b for a, b in zip(last[index], first[index], strict=True))
                ours = last[2] - first[2] if index == 0 else 0
                busy.append((user - ours) / total if total else 0.0)
            if max(busy) <= QUIET or time.monotonic() - started >= budget:
                break
        waited = time.monotonic() - started - 0.5
        if waited > 0.1:
            self.waited += waited
            self.quiet_waits += 1
            log(
                f"waited {waited:.1f}s for other work to leave the CPUs "
                f"(others now {max(0.0, busy[0]):.0%} / {max(0.0, busy[1]):.0%})"
            )

    def measure(self, label: str, metric: str, runs: int, once, server_pid: int | None = None) -> list[PerfResult]:
        """Run `once(repeat_index)` `runs` times, recording every result under label/metric."""
        results = []
        for index in range(runs):
            if self.args.quiet_wait > 0:
                self.wait_quiet(server_pid)
            results.append(once(index))
        self.runs.setdefault(label, {})[metric] = results
        return results

    def run_server(self, kind: str, listset: ListSet) -> dict[str, object]:
        """Every figure for one server and one list set, from one instance; best of --repeat runs."""
        args = self.args
        label = f"{kind}/{listset.key}"
        res: dict[str, object] = {}
        log(f"{kind}: starting with the {listset.label}")
        instance = self.start_server(kind, listset)
        try:
            pid = instance.proc.pid
            res["startup"] = instance.startup
            res["rss_load"] = rss_mb(pid)
            log(f"{kind}: answering after {instance.startup:.2f}s, RSS {res['rss_load']:.1f} MB")
            self.check_answers(instance, listset)
            # A short warm-up so every server has touched its code paths before it is measured.
            self.dnsperf(instance, listset.query_file, min(1.0, args.duration))
            runs = self.measure(
                label,
                "blocked",
                args.repeat,
                lambda _: self.dnsperf(instance, listset.query_file, args.duration),
                instance.proc.pid,
            )
            blocked = max(runs, key=lambda r: r.qps)
            res["blocked_qps"] = blocked.qps
            res["blocked_cpu_us"] = blocked.cpu_us
            res["blocked_lost"] = blocked.lost / max(1, blocked.sent)
            log(
                f"{kind}: blocked {_qps_list(runs)} qps, {blocked.cpu_us or 0:.1f} us CPU/query, "
                f"lost {blocked.lost}/{blocked.sent}, rcodes {blocked.rcodes}"
            )
            if listset.key == "shipped":
                runs = self.measure(
                    label,
                    "p99_blocked",
                    args.repeat,
                    lambda _: self.dnsperf(instance, listset.query_file, args.duration, qps=FIXED_QPS, verbose=True),
                    instance.proc.pid,
                )
                fixed = min(runs, key=lambda r: r.percentile(0.99))
                res["p99_blocked"] = fixed.percentile(0.99)
                res["p50_blocked"] = fixed.percentile(0.50)
                res["fixed_cpu_us"] = min(r.cpu_us or math.inf for r in runs)
                log(
                    f"{kind}: at {FIXED_QPS} qps blocked p99 {_ms_list(runs)} ms (p50 "
                    f"{res['p50_blocked'] * 1e3:.3f}), {res['fixed_cpu_us']:.1f} us CPU/query"
                )
                # Cache hits: a small set of forwarded names, warmed, then repeated.
                self.dnsperf(instance, self.hit_file, min(2.0, args.duration), max_runs=3)
                runs = self.measure(
                    label,
                    "hit",
                    args.repeat,
                    lambda _: self.dnsperf(instance, self.hit_file, args.duration),
                    instance.proc.pid,
                )
                hit = max(runs, key=lambda r: r.qps)
                res["hit_qps"] = hit.qps
                res["hit_lost"] = hit.lost / max(1, hit.sent)
                log(f"{kind}: cache hit {_qps_list(runs)} qps, lost {hit.lost}/{hit.sent}, rcodes {hit.rcodes}")
                runs = self.measure(
                    label,
                    "p99_hit",
                    args.repeat,
                    lambda _: self.dnsperf(instance, self.hit_file, args.duration, qps=FIXED_QPS, verbose=True),
                    instance.proc.pid,
                )
                res["p99_hit"] = min(r.percentile(0.99) for r in runs)
                log(f"{kind}: at {FIXED_QPS} qps cache-hit p99 {_ms_list(runs)} ms")
                runs = self.measure(
                    label,
                    "miss",
                    args.repeat,
                    lambda i: self.dnsperf(instance, self.cache_miss_files[i], args.duration, max_runs=1),
                    instance.proc.pid,
                )
                miss = max(runs, key=lambda r: r.qps)
                res["miss_qps"] = miss.qps
                res["miss_lost"] = miss.lost / max(1, miss.sent)
                if any(r.sent >= self.cache_miss_count for r in runs):
                    self.notes.append(f"{kind}: a cache-miss run used up every unique name (raise the file size)")
                log(f"{kind}: cache miss {_qps_list(runs)} qps, lost {miss.lost}/{miss.sent}, rcodes {miss.rcodes}")
            res["rss_end"] = rss_mb(pid)
            if kind == "blockd" and listset.key == "shipped":
                self.notes.append(
                    "blockd's metrics and query log were really on: after all its shipped-list runs it reported "
                    + self.blockd_counters(instance)
                )
        finally:
            self.procs.stop(instance.proc)
        return res

    def metrics_off(self, listset: ListSet) -> None:
        """blockd blocked qps with metrics + blocked-query log on, then off, back to back."""
        figures = {}
        for on in (True, False, True, False) if not self.args.quick else (True, False):
            instance = self.start_server("blockd", listset, metrics=on)
            try:
                self.dnsperf(instance, listset.query_file, min(1.0, self.args.duration))
                if self.args.quiet_wait > 0:
                    self.wait_quiet(instance.proc.pid)
                result = self.dnsperf(instance, listset.query_file, self.args.duration)
            finally:
                self.procs.stop(instance.proc)
            figures.setdefault(on, []).append(result)
            log(f"blockd metrics/log {'on' if on else 'off'}: {result.qps:,.0f} qps, {result.cpu_us:.1f} us CPU/query")
        self.runs["blockd-metrics-on/shipped"] = {"blocked": figures[True]}
        self.runs["blockd-metrics-off/shipped"] = {"blocked": figures[False]}
        on_qps = max(r.qps for r in figures[True])
        off_qps = max(r.qps for r in figures[False])
        on_cpu = min(r.cpu_us for r in figures[True])
        off_cpu = min(r.cpu_us for r in figures[False])
        runs = len(figures[True])
        self.extra += [
            "",
            f"### blockd: metrics + blocked-query log on vs off ({listset.label}, blocked answers)",
            "",
            f"Fresh instances alternating on, off (x{runs}); best of {runs} each "
            f"(on: {_qps_list(figures[True])} qps; off: {_qps_list(figures[False])} qps).",
            "",
            "| blockd config | blocked qps | CPU µs/query |",
            "|---|---:|---:|",
            f'| metrics on, `[log] queries = "blocked"` | {on_qps:,.0f} | {on_cpu:.1f} |',
            f'| `[metrics] listen = ""`, `[log] queries = "none"` | {off_qps:,.0f} | {off_cpu:.1f} |',
            f"| on / off | {on_qps / off_qps:.2f}x | {on_cpu / off_cpu:.2f}x |",
        ]

    def profile(self, listset: ListSet, py_spy: str) -> None:
        """py-spy on one blockd instance: a blocked-answer run, then a cache-hit run."""
        instance = self.start_server("blockd", listset)
        try:
            for slug, title, query_file, warm_runs in (
                ("blocked", "blocked-answer run", listset.query_file, None),
                ("hit", "cache-hit run", self.hit_file, 3),
            ):
                self.dnsperf(instance, query_file, min(1.0, self.args.duration), max_runs=warm_runs)
                if self.args.quiet_wait > 0:
                    self.wait_quiet(instance.proc.pid)
                raw = self.tmp / f"profile-{slug}.txt"
                spy = self.procs.start(
                    "py-spy",
                    [py_spy, "record", "--pid", str(instance.proc.pid), "--rate", "200", "--function",
                     "--format", "raw", "--output", str(raw), "--duration", f"{math.ceil(self.args.duration)}"],
                    self.tmp / f"py-spy-{slug}.log",
                )  # fmt: skip
                time.sleep(0.3)
                result = self.dnsperf(instance, query_file, self.args.duration)
                spy.popen.wait(self.args.duration + 60)
                self.procs.stop(spy)
                if not raw.exists():
                    self.extra += ["", f"(py-spy produced no profile of the {title}: {spy.log_tail(5)})"]
                    continue
                copy = BENCH / "out" / f"profile-{slug}-{self.args.stamp}.txt"
                copy.parent.mkdir(exist_ok=True)
                shutil.copyfile(raw, copy)
                self.extra += profile_tables(
                    raw, f"{title} ({listset.label}, metrics + log on)", result, copy, self.args
                )
        finally:
            self.procs.stop(instance.proc)

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        sets = self.prepare()
        self.start_upstream()
        direct = self.dnsperf(
            Instance("upstream", self.upstream, self.upstream_port, 0.0),
            self.cache_miss_files[-1],
            min(2.0, args.duration),
            max_runs=1,
        )
        self.notes.append(
            f"fake upstream alone (unbound, CPU {CLIENT_CPU} shared with dnsperf): {direct.qps:,.0f} qps of unique "
            "names, so it is not what limits the cache-miss figures"
        )
        for kind in args.servers:
            for listset in sets.values():
                self.results.setdefault(kind, {})[listset.key] = self.run_server(kind, listset)
        if args.metrics_off and "blockd" in args.servers:
            self.metrics_off(sets["shipped"])
        if args.profile and "blockd" in args.servers:
            py_spy = ensure_py_spy(allow_install=not args.no_install)
            if py_spy:
                self.profile(sets["shipped"], py_spy)


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    label: str
    listset: str
    key: str
    unit: str  # qps | us | ms | s | MB
    target: str = ""
    check: object = None  # (blockd, dnsmasq) -> bool


def rows(synthetic: int) -> list[Row]:
    big = f"{synthetic:,} names" if synthetic != 1_000_000 else "1M names"
    return [
        Row("blocked answers, qps (shipped lists)", "shipped", "blocked_qps", "qps", ">= 0.8x dnsmasq",
            lambda b, d: b >= 0.8 * d),
        Row("cache-hit answers, qps", "shipped", "hit_qps", "qps", ">= 0.6x dnsmasq", lambda b, d: b >= 0.6 * d),
        Row("cache-miss answers, qps (fake upstream)", "shipped", "miss_qps", "qps"),
        Row("CPU µs/query, blocked, saturated", "shipped", "blocked_cpu_us", "us"),
        Row(f"CPU µs/query, blocked, at {FIXED_QPS:,} qps", "shipped", "fixed_cpu_us", "us"),
        Row(f"p99 latency at {FIXED_QPS:,} qps, blocked, ms", "shipped", "p99_blocked", "ms", "<= 1.2x dnsmasq",
            lambda b, d: b <= 1.2 * d),
        Row(f"p99 latency at {FIXED_QPS:,} qps, cache hit, ms", "shipped", "p99_hit", "ms", "<= 1.2x dnsmasq",
            lambda b, d: b <= 1.2 * d),
        Row("start-up, s (shipped lists)", "shipped", "startup", "s"),
        Row("RSS after load, MB (shipped lists)", "shipped", "rss_load", "MB"),
        Row("RSS after every shipped-list run, MB (cache filled)", "shipped", "rss_end", "MB"),
        Row(f"blocked answers, qps ({big})", "1m", "blocked_qps", "qps", ">= 5x dnsmasq", lambda b, d: b >= 5 * d),
        Row(f"CPU µs/query, blocked ({big})", "1m", "blocked_cpu_us", "us"),
        Row(f"start-up until first answer, s ({big})", "1m", "startup", "s", "<= 2 s", lambda b, d: b <= 2),
        Row(f"RSS after load, MB ({big})", "1m", "rss_load", "MB", "<= 200 MB", lambda b, d: b <= 200),
        Row(f"RSS after the blocked runs, MB ({big})", "1m", "rss_end", "MB"),
    ]  # fmt: skip


def fmt(value: object, unit: str) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "timeout"
    if unit == "qps":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value * 1e3:.3f}"
    if unit == "s":
        return f"{value:.2f}"
    return f"{value:.1f}"


def table(bench: Bench) -> str:
    results = bench.results

    def get(server: str, row: Row) -> object:
        return results.get(server, {}).get(row.listset, {}).get(row.key)

    lines = [
        "| metric | blockd | dnsmasq | unbound | blockd/dnsmasq | blockd/unbound | target (issue 5) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows(bench.args.synthetic):
        if row.listset == "1m" and bench.args.skip_1m:
            continue
        values = [get(s, row) for s in SERVERS]
        cells = [fmt(v, row.unit) for v in values]
        ratios = []
        for anchor in values[1:]:
            b = values[0]
            ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (b, anchor)) and anchor
            ratios.append(f"{b / anchor:.2f}x" if ok else "-")
        target = row.target
        if row.check is not None and isinstance(values[0], (int, float)):
            d = values[1] if isinstance(values[1], (int, float)) else float("nan")
            if "dnsmasq" in target and not (isinstance(d, (int, float)) and math.isfinite(d)):
                verdict = "n/a"
            else:
                verdict = "met" if row.check(values[0], d) else "**MISSED**"
            target = f"{target}: {verdict}"
        lines.append(f"| {row.label} | {' | '.join(cells)} | {' | '.join(ratios)} | {target} |")
    return "\n".join(lines)


METRIC_UNITS = {
    "blocked": ("blocked qps", "qps"),
    "hit": ("cache-hit qps", "qps"),
    "miss": ("cache-miss qps", "qps"),
    "p99_blocked": ("p99 ms at 5k, blocked", "p99"),
    "p99_hit": ("p99 ms at 5k, cache hit", "p99"),
}


def runs_section(bench: Bench) -> list[str]:
    lines = [
        "",
        f"### Every measured run (the table shows the best of {bench.args.repeat})",
        "",
        "'others': user CPU time on CPU 0 (the server's) and CPU 1 (dnsperf's) spent by processes that are not "
        "part of the benchmark during that run (/proc/stat minus the benchmark's processes). A high value means the "
        "run shared its CPU with other work on the machine and the figure is pessimistic. 'server's CPU use': the "
        "server's CPU time divided by dnsperf's run time; a saturated single-threaded server that is the "
        "bottleneck is near 100%.",
        "",
        "| server / list set | figure | runs | server's CPU use | others on CPU 0 | others on CPU 1 |",
        "|---|---|---|---|---|---|",
    ]
    for label, metrics in bench.runs.items():
        for metric, results in metrics.items():
            name, unit = METRIC_UNITS.get(metric, (metric, "qps"))
            if unit == "qps":
                values = _qps_list(results)
            else:
                values = _ms_list(results)
            cpu0 = " / ".join(f"{r.others[0]:.0%}" for r in results)
            cpu1 = " / ".join(f"{r.others[1]:.0%}" for r in results)
            share = " / ".join(f"{r.server_share:.0%}" for r in results)
            lines.append(f"| {label} | {name} | {values} | {share} | {cpu0} | {cpu1} |")
    return lines


def first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    for line in text.splitlines():
        if line.strip() and "Usage" not in line:
            return line.strip()
    return "?"


def machine(tools: dict[str, str], fingerprint: str) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    dnsperf_version = "?"
    done = subprocess.run([tools["dnsperf"], "-h"], capture_output=True, text=True)
    match = re.search(r"Version ([\d.]+)", done.stdout + done.stderr)
    if match:
        dnsperf_version = match.group(1)
    try:
        import blockd

        blockd_version = blockd.__version__
    except Exception:  # noqa: BLE001
        blockd_version = "?"
    return [
        f"- uname -a: `{first_line(['uname', '-a'])}`",
        f"- CPU: {cpu}, {os.cpu_count()} CPUs; memory {mem}",
        f"- blockd {blockd_version}: {fingerprint}; Python {platform.python_version()}",
        f"- {first_line([tools['dnsmasq'], '--version'])}; {first_line([tools['unbound'], '-V'])}; "
        f"dnsperf {dnsperf_version}",
    ]


def blockd_cache_state() -> str:
    users = []
    source = (SNAPSHOT or REPO) / "blockd"
    for path in sorted(source.glob("*.py")):
        if path.name == "cache.py":
            continue
        text = path.read_text(errors="replace")
        if re.search(
            r"^\s*(from blockd\.cache import|from blockd import .*\bcache\b|import blockd\.cache)", text, re.MULTILINE
        ):
            users.append(path.name)
    if users:
        return f"blockd answer cache: PRESENT (blockd/cache.py used by {', '.join(users)})"
    if (source / "cache.py").exists():
        return (
            "blockd answer cache: NOT WIRED IN (blockd/cache.py exists but nothing imports it): "
            "measured BEFORE the cache landed; blockd's cache-hit figure is a forwarded answer"
        )
    return (
        "blockd answer cache: ABSENT: measured BEFORE the cache landed; blockd's cache-hit figure is a forwarded answer"
    )


def report(bench: Bench, tools: dict[str, str], started: datetime.datetime, elapsed: float) -> str:
    args = bench.args
    command = shlex.join(["python", "bench/run.py", *args.argv])
    body = [
        f"## blockd vs dnsmasq vs unbound: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
        "",
        f"- command: `{command}` (took {elapsed / 60:.1f} min)",
        *machine(tools, bench.fingerprint),
        f"- {bench.cache_state}",
        f"- server under test on CPU {SERVER_CPU}, dnsperf (`-c {args.clients} -q {args.outstanding}`, "
        f"{args.duration:g}s per run) and the fake upstream on CPU {CLIENT_CPU}; loopback only"
        + ("; EDNS on (`-e`)" if args.edns else ""),
        f'- blockd: one process, metrics listener on, `[log] queries = "blocked"` to a file; '
        f"dnsmasq `local=` + `address=` 0.0.0.0/::; unbound `local-zone` {args.unbound_style}",
        "- p99: true percentile over every query of a paced dnsperf run (`-Q "
        f"{FIXED_QPS} -v`, one latency line per response; lost queries count as slowest)",
        "",
        table(bench),
        "",
        "Ratios are blockd/anchor: above 1 is better for qps, below 1 is better for CPU, latency, start-up and RSS.",
        "",
        "Notes:",
        *(f"- {note}" for note in bench.notes),
        *(f"- answer check {line}" for line in bench.sanity),
    ]
    losses = []
    for server, sets in bench.results.items():
        for key, values in sets.items():
            for metric in ("blocked_lost", "hit_lost", "miss_lost"):
                value = values.get(metric)
                if isinstance(value, float) and value > 0.001:
                    losses.append(f"{server}/{key} {metric.split('_')[0]} {value:.1%}")
    if losses:
        body.append("- dnsperf lost queries (timeouts > 2 s or drops) in saturated runs: " + ", ".join(losses))
    if bench.quiet_waits:
        body.append(
            f"- waited {bench.waited:.0f}s in all ({bench.quiet_waits} times) for other processes to leave the CPUs "
            f"before a measured run (`--quiet-wait {args.quiet_wait:g}`, budget {args.quiet_budget:g}s)"
        )
    body += bench.extra
    body += runs_section(bench)
    return "\n".join(body) + "\n"


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds per measured dnsperf run (default 5; --quick 1.5)")
    parser.add_argument("--repeat", type=int, help="measured runs per figure, best reported (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="short runs and a 10,000-name synthetic list (CI)")
    parser.add_argument("--synthetic", type=int, help="synthetic list size (default 1,000,000; --quick 10,000)")
    parser.add_argument("--skip-1m", action="store_true", help="skip the synthetic-list runs")
    parser.add_argument("--metrics-off", action="store_true", help="also compare blockd with metrics + log off")
    parser.add_argument(
        "--profile", action="store_true", help="also profile blockd with py-spy (blocked and cache-hit runs)"
    )
    parser.add_argument("--profile-top", type=int, default=15, help="functions listed from the profile")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of " + ",".join(SERVERS))
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each measured run, wait up to this many seconds for other processes to leave the CPUs "
        "(default 10; --quick 0)",
    )
    parser.add_argument("--quiet-budget", type=float, default=90.0, help="total seconds of such waiting (90)")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf -c (default 8)")
    parser.add_argument("--outstanding", type=int, default=200, help="dnsperf -q (default 200)")
    parser.add_argument("--edns", action="store_true", help="dnsperf -e: queries carry EDNS(0)")
    parser.add_argument(
        "--unbound-style", choices=("always_null", "redirect"), default="always_null",
        help="unbound block entries: local-zone always_null (default) or redirect + local-data A/AAAA",
    )  # fmt: skip
    parser.add_argument("--no-install", action="store_true", help="never run apt-get/pip; fail with instructions")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the generated configs, lists and logs")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.duration is None:
        args.duration = 1.5 if args.quick else 5.0
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 10.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.repeat = max(1, args.repeat)
    if args.synthetic is None:
        args.synthetic = 10_000 if args.quick else 1_000_000
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown or not args.servers:
        parser.error(f"--servers: unknown {', '.join(sorted(unknown)) or '(empty)'}")
    args.servers = [s for s in SERVERS if s in args.servers]
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.cpu_count() is None or os.cpu_count() < 2:
        print("bench: needs at least 2 CPUs (server on CPU 0, dnsperf on CPU 1)", file=sys.stderr)
        return 2
    tools = ensure_tools(allow_install=not args.no_install)

    def terminate(signum, frame):  # SIGTERM/SIGHUP: unwind through the finally below
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell that starts this in the background would otherwise leave Ctrl-C/SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="blockd-bench-"))
    tmp.chmod(0o755)
    bench = Bench(args, tools, tmp)
    status = 0
    try:
        bench.fingerprint = snapshot_blockd(tmp)
        bench.cache_state = blockd_cache_state()
        log(f"working in {tmp}; servers: {', '.join(args.servers)}; {args.duration:g}s per run")
        bench.run()
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process it started", file=sys.stderr)
        status = 130
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        status = 1
    finally:
        bench.procs.stop_all()
        if args.keep_tmp or status:
            print(f"bench: generated files and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if status:
        return status
    text = report(bench, tools, started, time.monotonic() - t0)
    out = BENCH / "out" / f"results-{args.stamp}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
