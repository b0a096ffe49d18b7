"""The load generator: dnsperf runs pinned to the client CPU (saturated, or paced with per-query latencies),
their parsed results, the CPU-contention figures around each run, and the wait for quiet CPUs before one."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import BenchError, log
from procs import CLIENT_CPU, CLK_TCK, Proc, children_user_ticks, cpu_ticks, cpu_user, die_with_parent

FIXED_QPS = 5000  # the paced runs (p99 latency, CPU per query at a fixed rate)
QUIET = 0.15  # QuietGate: other processes' share of a CPU that counts as quiet


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


def _number(pattern: str, text: str, cast: Callable[[str], float] = float) -> float:
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


@dataclass(frozen=True)
class CpuSample:
    """CPU clock ticks around a dnsperf run."""

    server: int  # the server under test, utime + stime
    server_user: int
    cpu0: tuple[int, int]  # (user + nice, all) of CPU 0 and CPU 1
    cpu1: tuple[int, int]
    children_user: float  # dnsperf and every other child this script has waited for
    helpers_user: int  # the fake upstream (when it is not the server under test) and the dnstap collector

    @classmethod
    def take(cls, pid: int, helpers: list[int]) -> CpuSample:
        return cls(
            cpu_ticks(pid),
            cpu_ticks(pid, user_only=True),
            cpu_user(0),
            cpu_user(1),
            children_user_ticks(),
            sum(cpu_ticks(helper, user_only=True) for helper in helpers),
        )


def others_share(first: CpuSample, last: CpuSample) -> tuple[float, float]:
    """User CPU time on each CPU not spent by the benchmark's own processes (the kernel's share is left
    out: loopback packet work lands in softirq/ksoftirqd time)."""
    user0, all0 = (a - b for a, b in zip(last.cpu0, first.cpu0, strict=True))
    user1, all1 = (a - b for a, b in zip(last.cpu1, first.cpu1, strict=True))
    ours0 = last.server_user - first.server_user  # the server under test
    ours1 = last.children_user - first.children_user + last.helpers_user - first.helpers_user  # dnsperf + helpers
    return (max(0.0, (user0 - ours0) / all0) if all0 else 0.0, max(0.0, (user1 - ours1) / all1) if all1 else 0.0)


@dataclass
class Dnsperf:
    """dnsperf on the client CPU against one server: `-c clients -q outstanding -t timeout` (and `-e`)."""

    path: str
    clients: int
    outstanding: int
    edns: bool
    timeout: int = 2  # -t: seconds before a query counts as lost

    @classmethod
    def from_args(cls, args: argparse.Namespace, tools: dict[str, str]) -> Dnsperf:
        return cls(tools["dnsperf"], args.clients, args.outstanding, args.edns)

    def command(
        self, port: int, query_file: Path, duration: float, qps: int | None, verbose: bool, max_runs: int | None
    ) -> list[str]:
        command = [
            "taskset", "-c", CLIENT_CPU, self.path,
            "-s", "127.0.0.1", "-p", str(port), "-d", str(query_file),
            "-c", str(self.clients), "-q", str(self.outstanding),
            "-l", f"{duration:g}", "-t", str(self.timeout),
        ]  # fmt: skip
        if qps:
            command += ["-Q", str(qps)]
        if verbose:
            command.append("-v")
        if max_runs:
            command += ["-n", str(max_runs)]
        if self.edns:
            command.append("-e")
        return command

    def run(
        self,
        server: Proc,
        port: int,
        query_file: Path,
        duration: float,
        qps: int | None = None,
        verbose: bool = False,
        max_runs: int | None = None,
        helpers: tuple[Proc, ...] = (),
    ) -> PerfResult:
        """One dnsperf run against `server` on `port`, with the server's CPU time per answer.  `helpers` run on the
        client CPU for the benchmark (the fake upstream, the dnstap collector): not "others" there."""
        command = self.command(port, query_file, duration, qps, verbose, max_runs)
        pid = server.pid
        helper_pids = [helper.pid for helper in helpers if helper.pid != pid]
        first = CpuSample.take(pid, helper_pids)
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=duration + self.timeout + 60,
            preexec_fn=die_with_parent,
        )
        last = CpuSample.take(pid, helper_pids)
        others = others_share(first, last)
        if done.returncode != 0 or "Queries sent" not in done.stdout:
            raise BenchError(f"dnsperf failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-2000:]}")
        result = parse_dnsperf(done.stdout)
        result.others = others
        ticks = last.server - first.server
        # Over dnsperf's own run time: the subprocess window also holds dnsperf's start-up and its
        # wait (-t) for lost queries, when the server is idle.
        result.server_share = ticks / CLK_TCK / result.runtime if result.runtime else 0.0
        if result.completed:
            result.cpu_us = ticks * 1e6 / CLK_TCK / result.completed
        if server.popen.poll() is not None:
            raise BenchError(f"{server.name} died during the run:\n{server.log_tail()}")
        return result

    def paced(
        self, server: Proc, port: int, query_file: Path, duration: float, helpers: tuple[Proc, ...] = ()
    ) -> PerfResult:
        """A run at FIXED_QPS with one latency line per response (`-Q FIXED_QPS -v`), for true percentiles."""
        return self.run(server, port, query_file, duration, qps=FIXED_QPS, verbose=True, helpers=helpers)


class QuietGate:
    """Before a measured run: wait, up to `limit` seconds and `budget` seconds in all, until other processes
    leave both CPUs mostly idle. A limit of 0 never waits."""

    def __init__(self, limit: float, budget: float) -> None:
        self.limit = limit
        self.budget = budget
        self.waited = 0.0  # seconds spent waiting, bounded by the budget
        self.waits = 0

    def wait(self, server_pid: int | None) -> None:
        if self.limit <= 0:
            return
        budget = min(self.limit, self.budget - self.waited)
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
            self.waits += 1
            log(
                f"waited {waited:.1f}s for other work to leave the CPUs "
                f"(others now {max(0.0, busy[0]):.0%} / {max(0.0, busy[1]):.0%})"
            )
