"""The report: the table of figures and ratios, every measured run, the machine, the on/off and profile
sections, and the whole Markdown document that is printed and written to bench/out/."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data import ListSet
from load import FIXED_QPS, PerfResult
from procs import CLIENT_CPU, SERVER_CPU
from servers import FORWARD_A, SERVERS, TOGGLES, Toggle

if TYPE_CHECKING:
    from suite import Bench

# Frames every sample passes through (interpreter start, the reactor loop): left out of the inclusive table.
PLUMBING = ("twisted/", "runpy", "blockd/cli.py", "blockd/__main__.py")
IDLE_LEAVES = ("Condition.wait", "Event.wait")  # py-spy leaf frames of a parked thread (the query-log writer)


# --------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    label: str
    listset: str
    key: str
    unit: str  # qps | us | ms | s | s3 (3 decimals) | MB
    target: str = ""
    check: Callable[[float, float], bool] | None = None  # (blockd, dnsmasq) -> met


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
    if unit == "s3":
        return f"{value:.3f}"
    return f"{value:.1f}"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ratio(subject: object, anchor: object) -> str:
    return f"{subject / anchor:.2f}x" if _finite(subject) and _finite(anchor) and anchor else "-"


def _target(row: Row, subject: object, dnsmasq: object) -> str:
    """The row's target and whether this run met it (targets are blockd's own or relative to dnsmasq)."""
    if row.check is None or not isinstance(subject, (int, float)):
        return row.target
    if "dnsmasq" in row.target and not _finite(dnsmasq):
        return f"{row.target}: n/a"
    d = dnsmasq if isinstance(dnsmasq, (int, float)) else float("nan")
    return f"{row.target}: {'met' if row.check(subject, d) else '**MISSED**'}"


def table(bench: Bench) -> str:
    """One row per figure: each server's value, blockd/anchor ratios, the issue-5 target."""
    results = bench.results
    kinds = list(SERVERS)
    subject, anchors = kinds[0], kinds[1:]

    def get(server: str, row: Row) -> object:
        return results.get(server, {}).get(row.listset, {}).get(row.key)

    header = ["metric", *kinds, *(f"{subject}/{anchor}" for anchor in anchors), "target (issue 5)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(kinds) + len(anchors)) + "---|"]
    for row in rows(bench.args.synthetic):
        if row.listset == "1m" and bench.args.skip_1m:
            continue
        values = {kind: get(kind, row) for kind in kinds}
        cells = [fmt(values[kind], row.unit) for kind in kinds]
        ratios = [_ratio(values[subject], values[anchor]) for anchor in anchors]
        target = _target(row, values[subject], values.get("dnsmasq"))
        lines.append(f"| {row.label} | {' | '.join(cells)} | {' | '.join(ratios)} | {target} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Every measured run


METRIC_UNITS = {
    "blocked": ("blocked qps", "qps"),
    "hit": ("cache-hit qps", "qps"),
    "miss": ("cache-miss qps", "qps"),
    "p99_blocked": ("p99 ms at 5k, blocked", "p99"),
    "p99_hit": ("p99 ms at 5k, cache hit", "p99"),
}


def qps_list(runs: list[PerfResult]) -> str:
    return " / ".join(f"{r.qps:,.0f}" for r in runs)


def ms_list(runs: list[PerfResult]) -> str:
    return " / ".join(f"{r.percentile(0.99) * 1e3:.3f}" for r in runs)


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
            values = qps_list(results) if unit == "qps" else ms_list(results)
            cpu0 = " / ".join(f"{r.others[0]:.0%}" for r in results)
            cpu1 = " / ".join(f"{r.others[1]:.0%}" for r in results)
            share = " / ".join(f"{r.server_share:.0%}" for r in results)
            lines.append(f"| {label} | {name} | {values} | {share} | {cpu0} | {cpu1} |")
    return lines


# --------------------------------------------------------------------------------------------
# Sections of the optional runs


def toggle_section(
    toggle: Toggle,
    listset: ListSet,
    figures: dict[bool, list[PerfResult]],
    facts: dict[bool, list[dict[str, float]]] | None = None,
) -> list[str]:
    """The on-vs-off comparison: best blocked qps and CPU per query of each configuration, the toggle's target,
    and what the "on" instances reported of their runs (dnstap: the frames)."""
    on_qps = max(r.qps for r in figures[True])
    off_qps = max(r.qps for r in figures[False])
    on_cpu = min(r.cpu_us or math.inf for r in figures[True])
    off_cpu = min(r.cpu_us or math.inf for r in figures[False])
    runs = len(figures[True])
    ratio = on_qps / off_qps if off_qps else math.nan
    target = ""
    if toggle.target is not None:
        met = "met" if ratio >= toggle.target else "**MISSED**"
        target = f" | >= {toggle.target:g}x: {met}"
    lines = [
        "",
        f"### {toggle.kind}: {toggle.title} on vs off ({listset.label}, blocked answers)",
        "",
        f"Fresh instances alternating on, off (x{runs}); best of {runs} each "
        f"(on: {qps_list(figures[True])} qps; off: {qps_list(figures[False])} qps).",
        "",
        f"| {toggle.kind} config | blocked qps | CPU µs/query |" + (" target (on / off qps) |" if target else ""),
        "|---|---:|---:|" + ("---|" if target else ""),
        f"| {toggle.on_config} | {on_qps:,.0f} | {on_cpu:.1f} |" + (" |" if target else ""),
        f"| {toggle.off_config} | {off_qps:,.0f} | {off_cpu:.1f} |" + (" |" if target else ""),
        f"| on / off | {ratio:.2f}x | {on_cpu / off_cpu:.2f}x{target} |",
    ]
    on_facts = (facts or {}).get(True, [])
    if any("frames_sent" in f for f in on_facts):
        lines += dnstap_lines(figures[True], on_facts)
    return lines


def dnstap_lines(runs: list[PerfResult], facts: list[dict[str, float]]) -> list[str]:
    """Each "on" instance's dnstap frames: what blockd counted once its queue drained, what it answered (two
    frames per query with `messages = "all"`), and what fstrm_capture wrote once stopped with SIGTERM."""
    sent = sum(f["frames_sent"] for f in facts)
    dropped = sum(f["frames_dropped"] for f in facts)
    lines = [
        "",
        'dnstap frames of each "on" instance (its warm-up, its measured run, its answer check and start-up '
        "probes): blockd's `blockd_dnstap_frames_total` once its queue had drained, the frames of the queries it "
        "answered (`blockd_dns_queries_total` x 2 for CLIENT_QUERY + CLIENT_RESPONSE, x 1 with `messages = "
        '"responses"`), and the data frames in fstrm_capture\'s file once blockd and then fstrm_capture were '
        "stopped (SIGTERM).",
        "",
        "| on run | blocked qps | frames sent | frames dropped | frames of the answered | frames in the file "
        "| file, MB | file complete (ends with STOP) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for index, (run, fact) in enumerate(zip(runs, facts, strict=True), 1):
        lines.append(
            f"| {index} | {run.qps:,.0f} | {fact['frames_sent']:,.0f} | {fact['frames_dropped']:,.0f} "
            f"| {fact['frames_per_query'] * fact['queries']:,.0f} | {fact['capture_frames']:,.0f} "
            f"| {fact['capture_bytes'] / 2**20:.1f} "
            f"| {'yes' if fact['capture_complete'] else '**no**'} (fstrm_capture exit {fact['capture_rc']:g}) |"
        )
    lines.append("")
    if dropped:
        lines.append(
            f'**{dropped:,.0f} frames were dropped** ({sent:,.0f} sent): blockd shed dnstap work, so the "on" '
            "figure is not the cost of streaming every lookup and the ratio is **meaningless**."
        )
    elif any(
        f["capture_frames"] != f["frames_sent"] or f["frames_per_query"] * f["queries"] != f["frames_sent"]
        for f in facts
    ):
        lines.append(
            f"Frames sent {sent:,.0f}, dropped 0, but the counts above disagree (sent vs answered vs the "
            "file): read the ratio with care."
        )
    else:
        lines.append(
            f"Frames sent {sent:,.0f}, dropped 0: every answered query reached fstrm_capture as its "
            f"{'two frames' if facts[0]['frames_per_query'] == 2 else 'CLIENT_RESPONSE'}."
        )
    return lines


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


# --------------------------------------------------------------------------------------------
# What was measured, on what


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


def blockd_cache_state(src: Path) -> str:
    """Whether the blockd code under `src` (the snapshot) has its answer cache wired in."""
    users = []
    source = src / "blockd"
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


# --------------------------------------------------------------------------------------------
# The document


def losses(bench: Bench) -> list[str]:
    """Saturated runs that lost more than 0.1% of their queries."""
    found = []
    for server, sets in bench.results.items():
        for key, values in sets.items():
            for metric in ("blocked_lost", "hit_lost", "miss_lost"):
                value = values.get(metric)
                if isinstance(value, float) and value > 0.001:
                    found.append(f"{server}/{key} {metric.split('_')[0]} {value:.1%}")
    return found


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
    lost = losses(bench)
    if lost:
        body.append("- dnsperf lost queries (timeouts > 2 s or drops) in saturated runs: " + ", ".join(lost))
    if bench.quiet.waits:
        body.append(
            f"- waited {bench.quiet.waited:.0f}s in all ({bench.quiet.waits} times) for other processes to leave the "
            f"CPUs before a measured run (`--quiet-wait {args.quiet_wait:g}`, budget {args.quiet_budget:g}s)"
        )
    body += bench.extra
    body += runs_section(bench)
    return "\n".join(body) + "\n"


def toggles_report(bench: Bench, tools: dict[str, str], started: datetime.datetime, elapsed: float) -> str:
    """The document of a run of the on/off comparisons alone (--dnstap): their sections, every measured run."""
    args = bench.args
    command = shlex.join(["python", "bench/run.py", *args.argv])
    titles = ", ".join(t.title for option, t in TOGGLES.items() if getattr(args, option))
    body = [
        f"## blockd on vs off ({titles}): {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
        "",
        f"- command: `{command}` (took {elapsed / 60:.1f} min)",
        *machine(tools, bench.fingerprint),
        f"- blockd on CPU {SERVER_CPU}, one fresh instance per measured run; dnsperf (`-c {args.clients} -q "
        f"{args.outstanding}`, {args.duration:g}s per run, after a warm-up of "
        f"{min(1.0, args.duration):g}s) and the fake upstream on CPU {CLIENT_CPU}; loopback only"
        + ("; EDNS on (`-e`)" if args.edns else ""),
        '- blockd as deployed: metrics listener on, `[log] queries = "blocked"` to a file, the shipped lists, '
        '`action = "sinkhole"`; the configurations differ only as each table says',
    ]
    if args.dnstap:
        body.append(
            f"- dnstap collector: `fstrm_capture -t protobuf:dnstap.Dnstap -u SOCK -w FILE` "
            f'({first_line(["dpkg-query", "-W", "-f", "fstrm-bin ${Version}", "fstrm-bin"])}), one per "on" '
            f"instance, started before it, on CPU {CLIENT_CPU} (counted as the benchmark's in 'others'), "
            "socket in the temp dir, file on tmpfs (/dev/shm, deleted once counted)"
        )
    body += [
        "",
        "Notes:",
        *(f"- answer check {line}" for line in bench.sanity),
    ]
    if bench.quiet.waits:
        body.append(
            f"- waited {bench.quiet.waited:.0f}s in all ({bench.quiet.waits} times) for other processes to leave the "
            f"CPUs before a measured run (`--quiet-wait {args.quiet_wait:g}`, budget {args.quiet_budget:g}s)"
        )
    body += bench.extra
    body += runs_section(bench)
    return "\n".join(body) + "\n"


# --------------------------------------------------------------------------------------------
# The RPZ comparison (--rpz)


def rpz_rows(changes: int) -> list[Row]:
    """The RPZ table: Row.listset is unused (every figure is of one zone); check(blockd, unbound) -> met."""
    ixfr = f"IXFR of {changes:,} changed triggers"
    return [
        Row("from the file: start until the first blocked answer, s", "", "file_startup", "s", "<= 1.5x unbound",
            lambda b, u: b <= 1.5 * u),
        Row("from the file: RSS after load, MB", "", "file_rss", "MB", "<= 0.5x unbound", lambda b, u: b <= 0.5 * u),
        Row("from the file: peak RSS (VmHWM), MB", "", "file_hwm", "MB"),
        Row("AXFR from knot: start until the first blocked answer, s", "", "axfr_startup", "s", "<= 1.5x unbound",
            lambda b, u: b <= 1.5 * u),
        Row("… of which: start until its first TCP connection to knot, s", "", "axfr_connect", "s"),
        Row("… of which: that connection until the first blocked answer, s", "", "axfr_transfer", "s"),
        Row("AXFR: RSS after load, MB", "", "axfr_rss", "MB", "<= 0.5x unbound", lambda b, u: b <= 0.5 * u),
        Row("AXFR: RSS once idle (blockd has saved its copy), MB", "", "settled_rss", "MB"),
        Row(f"{ixfr}: knot's zone-reload until its NOTIFY, s", "", "ixfr_notify", "s3"),
        Row(f"{ixfr}: NOTIFY until a newly added name is blocked, s", "", "ixfr_after_notify", "s3", "< 1 s",
            lambda b, u: b < 1),
        Row(f"{ixfr}: zone-reload until a newly added name is blocked, s", "", "ixfr_total", "s3",
            "< 1 s (includes knot's reload)", lambda b, u: b < 1),
        Row(f"{ixfr}: RSS after, MB", "", "ixfr_rss", "MB"),
        Row("AXFR + IXFR instance: peak RSS (VmHWM), MB", "", "ixfr_hwm", "MB"),
    ]  # fmt: skip


def _rpz_target(row: Row, subject: object, unbound: object) -> str:
    """The row's target and whether this run met it ("unbound" in the target: relative to unbound)."""
    if row.check is None:
        return row.target
    if isinstance(subject, float) and math.isinf(subject):
        return f"{row.target}: **MISSED** (timeout)"
    relative = "unbound" in row.target
    if not _finite(subject) or (relative and not _finite(unbound)):
        return f"{row.target}: n/a"
    assert isinstance(subject, (int, float))
    met = row.check(subject, unbound if isinstance(unbound, (int, float)) else math.nan)
    return f"{row.target}: {'met' if met else '**MISSED**'}"


def rpz_table(bench: Bench) -> str:
    """One row per figure: blockd, unbound, blockd/unbound, the target and whether it was met."""
    lines = ["| metric | blockd | unbound | blockd/unbound | target |", "|---|---:|---:|---:|---|"]
    for row in rpz_rows(bench.args.rpz_changes):
        subject, anchor = (bench.rpz.get(kind, {}).get(row.key) for kind in ("blockd", "unbound"))
        cells = [fmt(subject, row.unit), fmt(anchor, row.unit), _ratio(subject, anchor)]
        lines.append(f"| {row.label} | {' | '.join(cells)} | {_rpz_target(row, subject, anchor)} |")
    return "\n".join(lines)


def rpz_report(bench: Bench, tools: dict[str, str], started: datetime.datetime, elapsed: float) -> str:
    args = bench.args
    facts = bench.rpz_facts
    command = shlex.join(["python", "bench/run.py", *args.argv])
    triggers, names = facts.get("triggers", 0), facts.get("names", 0)
    body = [
        f"## blockd vs unbound: RPZ loading, {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
        "",
        f"- command: `{command}` (took {elapsed / 60:.1f} min)",
        *machine(tools, bench.fingerprint),
        f"- {first_line([tools['knotd'], '--version'])}",
        f"- zone `{facts.get('origin')}`: {triggers:,} triggers, {names:,} names each as `name CNAME .` and "
        f"`*.name CNAME .` (NXDOMAIN for the name and everything below it), every name under `bench.test.` (the "
        f"fake upstream answers those A {FORWARD_A}, so NXDOMAIN can only come from the policy); "
        f"{facts.get('mb', 0):.0f} MB as a file, deterministic (fixed seed)",
        f"- primary: knot on CPU {CLIENT_CPU}, loopback, `zonefile-load: difference`, `journal-content: changes`, "
        "NOTIFY to the bench's listener and to blockd's and unbound's DNS ports, no TSIG (unbound 1.17 cannot sign "
        f"transfers); it loaded the zone in {facts.get('knot_startup', math.nan):.1f} s, RSS "
        f"{facts.get('knot_rss', math.nan):.0f} MB",
        '- blockd: `[lists.rpz] path = "big.rpz"`, then `zone` + `primaries = ["127.0.0.1:KNOT"]` '
        '(RPZ actions kept, `action = "zone"` by default), `state_dir` empty at start (no stored copy: the '
        'zone comes by AXFR); metrics on, `[log] queries = "blocked"`',
        '- unbound: one thread, `module-config: "respip validator iterator"`, `rpz:` with `zonefile:`, then '
        "`primary: 127.0.0.1@KNOT` + `allow-notify: 127.0.0.1` (no zonefile: kept in memory only, unbound's "
        "fastest form; blockd writes its copy to `state_dir`, after going live, in a thread)",
        f"- each server on CPU {SERVER_CPU}, one at a time, fresh process; 'start' is `Popen` of `taskset … "
        "server`, polled every 10 ms with A of a listed name until NXDOMAIN; RSS is VmRSS right then",
        "- AXFR split at the server's first TCP connection to knot (`/proc/net/tcp`, polled every 5 ms): before it, "
        "start-up and the wait before the first check (blockd draws up to 5 s at random, `START_SPREAD` in "
        "`blockd/refresh.py`, so that many zones do not start at once); after it, the transfer and applying it",
        "- IXFR: the bench rewrites knot's zone file with the change and a serial one higher and runs `knotc -b "
        "zone-reload`; knot computes the difference and NOTIFYs; the bench polls A of a newly added name every "
        "5 ms until NXDOMAIN, then checks every added and removed name (and a subdomain of each)",
        "",
        rpz_table(bench),
        "",
        "Ratios are blockd/unbound: below 1 is better (time, memory).",
        "",
        "Notes:",
        f"- CPU {SERVER_CPU} (the servers') in user mode by processes outside the benchmark during each measurement "
        "(from `Popen` to the first blocked answer; from the zone-reload to the IXFR's first blocked answer): "
        + ", ".join(bench.rpz_others)
        + ". A high share means that figure shared its CPU and is pessimistic.",
        *(f"- {note}" for note in bench.rpz_notes),
        *(f"- answer check {line}" for line in bench.sanity),
    ]
    if bench.quiet.waits:
        body.append(
            f"- waited {bench.quiet.waited:.0f}s in all ({bench.quiet.waits} times) for other processes to leave the "
            f"CPUs before a measurement (`--quiet-wait {args.quiet_wait:g}`, budget {args.quiet_budget:g}s)"
        )
    return "\n".join(body) + "\n"
