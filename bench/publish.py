#!/usr/bin/env python3
"""RPZ out: blockd as the primary of a policy zone for Unbound, against Knot serving the same zone.

    python bench/publish.py                  # 1,000,000 names and the shipped lists (about 5 minutes)
    python bench/publish.py --names 20000    # quick

One generated zone of N names (`name CNAME .` + `*.name CNAME .`, 2N records under rpz.bench.) is
served by Knot from a zone file and by blockd from a plain list published as a zone of lists
(action nxdomain), so both primaries send the same records.  The primary (Knot or blockd) and
the fake upstream run on CPU 1, Unbound on CPU 0.  For each primary, a fresh Unbound
(one thread, `rpz:` with `primary:`) transfers the zone: the figure is the time from Unbound's
start to its first NXDOMAIN for a listed name (AXFR), and the bytes sent.  Then --changes names
are changed (half removed, half added: Knot reloads its file, blockd its list on SIGHUP) and the
time until Unbound blocks an added name is measured (NOTIFY + IXFR), with the IXFR's bytes.
blockd's own figures: the time from start to its first rendering, and from SIGHUP to the new
serial, and its RSS.  The shipped lists (domains/, as one group's sinkhole zone) get the same
AXFR and IXFR figures with blockd alone.  Everything stays on loopback; every process is stopped when the script ends.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import BenchError, log  # noqa: E402 (bench modules import as top-level modules)
from data import rpz_zone  # noqa: E402
from primary import start_knot  # noqa: E402
from procs import CLIENT_CPU, SERVER_CPU, Proc, Procs, ensure_knot, ensure_tools, free_port, rss_mb  # noqa: E402
from servers import Context, ask, start_upstream, template  # noqa: E402

RCODE_NXDOMAIN = 3

# Both blockd configs: DNS, metrics (the figures are read there) and no query log.
BLOCKD_HEAD = """\
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "{dir}/state"
[upstream]
servers = ["127.0.0.1:{upstream}"]
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
queries = "none"
"""

BLOCKD_BIG = BLOCKD_HEAD + """\
[lists.big]
path = "{list}"
[publish]
listen = "127.0.0.1:{publish}"
notify = ["127.0.0.1:{notify}"]
[publish.zones."{origin}"]
lists = ["big"]
"""

BLOCKD_SHIPPED = BLOCKD_HEAD + """\
[lists.tiktok]
path = "{domains}/tiktok.txt"
[lists.bytedance]
path = "{domains}/bytedance.txt"
[lists.doh-bypass]
path = "{doh}"
action = "nxdomain"
[groups.government]
networks = ["10.0.0.0/8"]
lists = ["tiktok", "bytedance", "doh-bypass"]
[publish]
listen = "127.0.0.1:{publish}"
notify = ["127.0.0.1:{notify}"]
[publish.zones."{origin}"]
group = "government"
"""


@dataclass
class Figures:
    primary: str
    zone: str
    records: int = 0
    primary_ready: float = 0.0  # s from the primary's start to serving the zone
    primary_rss: float = 0.0  # MB, then
    axfr_seconds: float = 0.0  # Unbound start -> first NXDOMAIN
    axfr_bytes: int = 0
    change_seconds: float = 0.0  # blockd: SIGHUP -> new serial; Knot: zone-reload -> new serial
    ixfr_seconds: float = 0.0  # the change started -> Unbound blocks an added name
    ixfr_bytes: int = 0
    ixfr_records: int = 0
    notes: list[str] = field(default_factory=list)


class Blockd:
    """blockd from this checkout with one of the configs above, its metrics read over HTTP."""

    def __init__(self, ctx: Context, name: str, config: str, values: dict[str, object]):
        self.dir = ctx.tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.metrics, self.publish = free_port(), free_port(), free_port()
        self.config = self.dir / "blockd.toml"
        values = {**values, "dir": self.dir, "port": self.port, "metrics": self.metrics, "publish": self.publish}
        self.config.write_text(config.format(**values))
        self.ctx = ctx
        self.proc: Proc | None = None

    def start(self, limit: float) -> float:
        env_path = f"{REPO}:{os.environ.get('PYTHONPATH', '')}"
        os.environ["PYTHONPATH"] = env_path
        started = time.monotonic()
        self.proc = self.ctx.procs.start(
            "blockd",
            ["taskset", "-c", CLIENT_CPU, sys.executable, "-m", "blockd", "run", "--config", str(self.config)],
            self.dir / "blockd.log",
        )
        while time.monotonic() - started < limit:
            if self.proc.popen.poll() is not None:
                raise BenchError(f"blockd exited:\n{self.proc.log_tail()}")
            if self.metric("blockd_publish_serial") is not None:
                return time.monotonic() - started
            time.sleep(0.05)
        raise BenchError(f"blockd rendered no zone within {limit:g}s:\n{self.proc.log_tail()}")

    def metric(self, name: str, **labels: str) -> float | None:
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(wanted + " ") or (not labels and line.startswith(name + "{")):
                return float(line.split()[-1])
        return None

    def serial(self) -> int:
        return int(self.metric("blockd_publish_serial") or 0)

    def wait_serial_change(self, old: int, started: float, limit: float) -> float:
        """Seconds from `started` until the zone's serial is no longer `old` (reload, render, diff)."""
        while time.monotonic() - started < limit:
            if self.serial() != old:
                return time.monotonic() - started
            time.sleep(0.01)
        raise BenchError(f"blockd's serial stayed {old} for {limit:g}s")


class Unbound:
    """A one-thread Unbound whose `rpz:` zone comes from `primary` (bench/templates/unbound-rpz.conf)."""

    def __init__(self, ctx: Context, name: str, origin: str, primary: int):
        self.ctx = ctx
        self.port = free_port()
        self.conf = ctx.tmp / f"{name}.conf"
        source = f"  primary: 127.0.0.1@{primary}\n  allow-notify: 127.0.0.1"
        self.conf.write_text(
            template("unbound-rpz.conf", port=self.port, upstream_port=ctx.upstream_port, tmp=ctx.tmp,
                     origin=origin, source=source)
        )  # fmt: skip
        self.log = ctx.tmp / f"{name}.log"
        self.proc: Proc | None = None

    def start(self) -> None:
        command = ["taskset", "-c", SERVER_CPU, self.ctx.tools["unbound"], "-d", "-c", str(self.conf)]
        self.proc = self.ctx.procs.start("unbound", command, self.log)

    def wait_blocked(self, name: str, started: float, limit: float) -> float:
        while time.monotonic() - started < limit:
            assert self.proc is not None
            if self.proc.popen.poll() is not None:
                raise BenchError(f"unbound exited:\n{self.proc.log_tail()}")
            answer = ask(self.port, name, "A", timeout=0.5)
            if answer is not None and answer[0] == RCODE_NXDOMAIN:
                return time.monotonic() - started
            time.sleep(0.01)
        tail = self.proc.log_tail() if self.proc else ""
        raise BenchError(f"unbound did not block {name} within {limit:g}s:\n{tail}")


def knot_bytes(log_path: Path, kind: str, offset: int) -> tuple[int, int]:
    """(bytes, records) of Knot's last outgoing `kind` transfer logged after offset."""
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    found = re.findall(rf"{kind}, outgoing.*?finished.*?(\d+) messages, (\d+) bytes", text)
    return (int(found[-1][1]), 0) if found else (0, 0)


def run_knot(ctx: Context, args: argparse.Namespace, zone_names: int) -> Figures:
    zone = rpz_zone(ctx.tmp, 2 * zone_names, spares=args.changes)
    figures = Figures("knot", f"{zone_names:,} names", records=zone.triggers)
    unbound = Unbound(ctx, "unbound-knot", zone.origin, 0)
    knot = start_knot(ctx, zone, {"unbound": unbound.port}, args.timeout)
    figures.primary_ready, figures.primary_rss = knot.startup, knot.rss_load
    unbound.conf.write_text(unbound.conf.read_text().replace("primary: 127.0.0.1@0", f"primary: 127.0.0.1@{knot.port}"))
    offset = knot.log_offset()
    started = time.monotonic()
    unbound.start()
    figures.axfr_seconds = unbound.wait_blocked(f"{zone.probe}", started, args.timeout)
    figures.axfr_bytes, _ = knot_bytes(knot.log_path, "AXFR", offset)
    removed, added = zone.change(2 * args.changes)
    zone.write(knot.zone_file)
    offset = knot.log_offset()
    started = time.monotonic()
    reload = knot.reload()
    figures.change_seconds = knot.wait_for_serial(zone.serial, args.timeout)
    figures.ixfr_seconds = unbound.wait_blocked(added[-1], started, args.timeout)
    reload.wait(60)
    figures.ixfr_bytes, _ = knot_bytes(knot.log_path, "IXFR", offset)
    figures.ixfr_records = 2 * (len(removed) + len(added))
    _check_forwarded(unbound, removed[0], figures)
    ctx.procs.stop(unbound.proc)  # type: ignore[arg-type]
    ctx.procs.stop(knot.proc)
    return figures


def run_blockd_big(ctx: Context, args: argparse.Namespace, zone_names: int) -> Figures:
    zone = rpz_zone(ctx.tmp, 2 * zone_names, spares=args.changes)
    figures = Figures("blockd", f"{zone_names:,} names", records=zone.triggers)
    list_path = ctx.tmp / "big.txt"
    list_path.write_text("".join(f"{name}\n" for name in zone.names))
    unbound = Unbound(ctx, "unbound-blockd", zone.origin, 0)
    blockd = Blockd(ctx, "blockd-big", BLOCKD_BIG, {"upstream": ctx.upstream_port, "list": list_path,
                                                    "notify": unbound.port, "origin": zone.origin})  # fmt: skip
    figures.primary_ready = blockd.start(args.timeout)
    assert blockd.proc is not None
    figures.primary_rss = rss_mb(blockd.proc.pid)
    unbound.conf.write_text(
        unbound.conf.read_text().replace("primary: 127.0.0.1@0", f"primary: 127.0.0.1@{blockd.publish}")
    )
    started = time.monotonic()
    unbound.start()
    figures.axfr_seconds = unbound.wait_blocked(zone.probe, started, args.timeout)
    figures.axfr_bytes = int(blockd.metric("blockd_publish_sent_bytes_total", type="axfr") or 0)
    first = blockd.serial()
    removed, added = zone.change(2 * args.changes)
    list_path.write_text("".join(f"{name}\n" for name in zone.names))
    started = time.monotonic()
    blockd.proc.popen.send_signal(signal.SIGHUP)
    figures.change_seconds = blockd.wait_serial_change(first, started, args.timeout)
    figures.ixfr_seconds = unbound.wait_blocked(added[-1], started, args.timeout)
    figures.ixfr_bytes = int(blockd.metric("blockd_publish_sent_bytes_total", type="ixfr") or 0)
    figures.ixfr_records = 2 * (len(removed) + len(added))
    figures.notes.append(f"blockd RSS after the change: {rss_mb(blockd.proc.pid):.0f} MB")
    _check_forwarded(unbound, removed[0], figures)
    ctx.procs.stop(unbound.proc)  # type: ignore[arg-type]
    ctx.procs.stop(blockd.proc)
    return figures


def _check_forwarded(unbound: Unbound, removed: str, figures: Figures) -> None:
    answer = ask(unbound.port, removed, "A", timeout=3.0)
    if answer is None or answer[0] == RCODE_NXDOMAIN:
        raise BenchError(f"{figures.primary}: a removed name {removed} is still blocked after the IXFR: {answer}")


def run_blockd_shipped(ctx: Context, args: argparse.Namespace) -> Figures:
    domains = REPO / "domains"
    (ctx.tmp / "doh-bypass.txt").write_text((domains / "doh-bypass.txt").read_text())
    origin = "shipped.rpz.bench."
    unbound = Unbound(ctx, "unbound-shipped", origin, 0)
    values = {
        "upstream": ctx.upstream_port, "domains": domains, "doh": ctx.tmp / "doh-bypass.txt", "notify": unbound.port,
        "origin": origin,
    }  # fmt: skip
    blockd = Blockd(ctx, "blockd-shipped", BLOCKD_SHIPPED, values)
    figures = Figures("blockd", "shipped lists")
    figures.primary_ready = blockd.start(args.timeout)
    assert blockd.proc is not None
    figures.primary_rss = rss_mb(blockd.proc.pid)
    figures.records = int(blockd.metric("blockd_publish_records") or 0)
    unbound.conf.write_text(
        unbound.conf.read_text().replace("primary: 127.0.0.1@0", f"primary: 127.0.0.1@{blockd.publish}")
    )
    started = time.monotonic()
    unbound.start()
    # The group's action is sinkhole: Unbound answers 0.0.0.0 (local data), not NXDOMAIN.
    figures.axfr_seconds = _wait_sinkholed(unbound, "www.tiktok.com", started, args.timeout)
    figures.axfr_bytes = int(blockd.metric("blockd_publish_sent_bytes_total", type="axfr") or 0)
    first = blockd.serial()
    added = [f"added{n}.example" for n in range(args.changes)]
    path = ctx.tmp / "doh-bypass.txt"
    path.write_text(path.read_text() + "".join(f"{name}\n" for name in added))
    started = time.monotonic()
    blockd.proc.popen.send_signal(signal.SIGHUP)
    figures.change_seconds = blockd.wait_serial_change(first, started, args.timeout)
    figures.ixfr_seconds = unbound.wait_blocked(added[-1], started, args.timeout)
    figures.ixfr_bytes = int(blockd.metric("blockd_publish_sent_bytes_total", type="ixfr") or 0)
    figures.ixfr_records = 2 * len(added)
    ctx.procs.stop(unbound.proc)  # type: ignore[arg-type]
    ctx.procs.stop(blockd.proc)
    return figures


def _wait_sinkholed(unbound: Unbound, name: str, started: float, limit: float) -> float:
    while time.monotonic() - started < limit:
        answer = ask(unbound.port, name, "A", timeout=0.5)
        if answer is not None and answer[1] == ["0.0.0.0"]:
            return time.monotonic() - started
        time.sleep(0.01)
    raise BenchError(f"unbound did not sinkhole {name} within {limit:g}s")


def report(rows: list[Figures], args: argparse.Namespace) -> str:
    lines = [
        f"## RPZ out: blockd as Unbound's primary, against Knot ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python bench/publish.py --names {args.names} --changes {args.changes}`; Unbound {_version('unbound')},"
        f" Knot {_version('knotd')}; the primary (blockd or Knot) and the upstream on CPU {CLIENT_CPU},"
        f" Unbound on CPU {SERVER_CPU}.",
        "",
        "| primary | zone | records | primary ready | primary RSS | AXFR to Unbound | AXFR bytes |"
        " change -> new serial | change in Unbound (NOTIFY+IXFR) | IXFR records | IXFR bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in rows:
        lines.append(
            f"| {f.primary} | {f.zone} | {f.records:,} | {f.primary_ready:.2f} s | {f.primary_rss:.0f} MB |"
            f" {f.axfr_seconds:.2f} s | {f.axfr_bytes / 2**20:.1f} MiB | {f.change_seconds:.2f} s |"
            f" {f.ixfr_seconds:.2f} s | {f.ixfr_records:,} | {f.ixfr_bytes / 1024:.1f} KiB |"
        )
    by = {(f.primary, f.zone): f for f in rows}
    big = f"{args.names:,} names"
    if ("blockd", big) in by and ("knot", big) in by:
        b, k = by[("blockd", big)], by[("knot", big)]
        lines += [
            "",
            f"Ratios blockd/Knot ({big}): AXFR to Unbound {b.axfr_seconds / k.axfr_seconds:.2f}x, AXFR bytes"
            f" {b.axfr_bytes / max(k.axfr_bytes, 1):.2f}x, change in Unbound {b.ixfr_seconds / k.ixfr_seconds:.2f}x,"
            f" IXFR bytes {b.ixfr_bytes / max(k.ixfr_bytes, 1):.2f}x,"
            f" primary RSS {b.primary_rss / k.primary_rss:.2f}x.",
        ]
    for f in rows:
        lines += [f"- {f.primary}, {f.zone}: {note}" for note in f.notes]
    return "\n".join(lines) + "\n"


def _version(tool: str) -> str:
    import subprocess

    flag = "-V" if tool == "unbound" else "--version"
    try:
        out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    found = re.search(r"(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=1_000_000, help="names in the generated zone (default 1,000,000)")
    parser.add_argument("--changes", type=int, default=1000, help="names changed for the IXFR (default 1,000)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for any one step")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    args = parser.parse_args()
    tools = ensure_tools(allow_install=not args.no_install)
    tools.update(ensure_knot(allow_install=not args.no_install))
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="blockd-publish-") as tmp:
        ctx = Context(Path(tmp), tools, procs, REPO)
        try:
            start_upstream(ctx)
            rows = [run_blockd_shipped(ctx, args)]
            log(f"shipped lists: {rows[-1]}")
            rows.append(run_knot(ctx, args, args.names))
            log(f"knot: {rows[-1]}")
            rows.append(run_blockd_big(ctx, args, args.names))
            log(f"blockd: {rows[-1]}")
        finally:
            procs.stop_all()
    text = report(rows, args)
    print(text)
    out = BENCH / "out"
    out.mkdir(exist_ok=True)
    (out / f"publish-results-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
