#!/usr/bin/env python3
"""blockd against dnsmasq and unbound, side by side on loopback: one command, one table.

    python bench/run.py                          # full run (about 6-8 minutes)
    python bench/run.py --quick                  # smoke test, about a minute (what CI may run)
    python bench/run.py --metrics-off --profile  # also: blockd counting/log on vs off, py-spy profile
    python bench/run.py --rpz                    # instead: RPZ loading (file, AXFR, IXFR) against unbound, Knot primary
    python bench/run.py --dnstap                 # instead: blockd blocked qps with dnstap to fstrm_capture on vs off
    python bench/run.py --limits                 # instead: blockd blocked qps with [limits] on vs off

Every server under test is pinned to CPU 0 (taskset -c 0); dnsperf and the fake upstream run on
CPU 1.  All traffic stays on 127.0.0.1: the servers forward only to a fake upstream (unbound as a
local authoritative server for bench.test.) and never to the resolvers in /etc/resolv.conf.
Every process started here is stopped in a finally block (and gets SIGTERM from the kernel if
this script dies: PR_SET_PDEATHSIG).  See bench/README.md for what each number means.

This file parses the options and runs the benchmark; the work is in its sibling modules, imported
as top-level modules because Python puts this script's directory first on sys.path: procs.py
(processes, tools, /proc), data.py (lists and query files), servers.py (the servers under test and
the fake upstream), load.py (dnsperf), suite.py (what is measured, in what order), report.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from common import BENCH, REPO, BenchError, log
from data import SHIPPED_LISTS
from procs import Procs, ensure_fstrm, ensure_knot, ensure_tools, snapshot_blockd
from report import blockd_cache_state, report, rpz_report, toggles_report
from servers import SERVERS, TOGGLES
from suite import Bench


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds per measured dnsperf run (default 5; --quick 1.5)")
    parser.add_argument("--repeat", type=int, help="measured runs per figure, best reported (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="short runs and a 10,000-name synthetic list (CI)")
    parser.add_argument("--synthetic", type=int, help="synthetic list size (default 1,000,000; --quick 10,000)")
    parser.add_argument("--skip-1m", action="store_true", help="skip the synthetic-list runs")
    parser.add_argument("--metrics-off", action="store_true", help="also compare blockd with metrics + log off")
    parser.add_argument(
        "--dnstap", action="store_true",
        help="run the dnstap comparison instead: blockd blocked qps with [dnstap] streaming to fstrm_capture vs "
        "without, fresh instances alternating, best of --repeat each (with --metrics-off: that one too)",
    )  # fmt: skip
    parser.add_argument(
        "--limits", action="store_true",
        help="run the [limits] comparison instead: blockd blocked qps with the per-client limits on vs off, fresh "
        "instances alternating, best of --repeat each (bench/victim.py measures what the limits are for)",
    )  # fmt: skip
    parser.add_argument(
        "--dnstap-messages", choices=("all", "responses"), default="all",
        help="with --dnstap: the [dnstap] messages of the 'on' instances (default all: CLIENT_QUERY + CLIENT_RESPONSE)",
    )  # fmt: skip
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
    parser.add_argument(
        "--rpz", action="store_true",
        help="run the RPZ comparison instead: blockd vs unbound loading one RPZ zone from its file, by AXFR "
        "from a Knot primary, then an IXFR after NOTIFY (needs knotd/knotc)",
    )  # fmt: skip
    parser.add_argument("--rpz-size", type=int, help="--rpz: triggers in the zone (default 1,000,000; --quick 20,000)")
    parser.add_argument(
        "--rpz-changes", type=int, default=1000, help="--rpz: triggers the IXFR changes, half removed (default 1,000)"
    )
    parser.add_argument(
        "--rpz-timeout", type=float, default=900.0,
        help="--rpz: seconds to wait for a server's first blocked answer, or for an IXFR (default 900)",
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
    if args.rpz_size is None:
        args.rpz_size = 20_000 if args.quick else 1_000_000
    if not 4 <= args.rpz_changes <= args.rpz_size // 2:
        parser.error("--rpz-changes: at least 4, and at most half of --rpz-size")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown or not args.servers:
        parser.error(f"--servers: unknown {', '.join(sorted(unknown)) or '(empty)'}")
    args.servers = [s for s in SERVERS if s in args.servers]
    if args.dnstap and args.rpz:
        parser.error("--dnstap and --rpz each run instead of the qps suite: pick one")
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    args.alone = any(toggle.alone and getattr(args, option) for option, toggle in TOGGLES.items())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.cpu_count() is None or os.cpu_count() < 2:
        print("bench: needs at least 2 CPUs (server on CPU 0, dnsperf on CPU 1)", file=sys.stderr)
        return 2
    tools = ensure_tools(allow_install=not args.no_install)
    if args.rpz:
        tools.update(ensure_knot(allow_install=not args.no_install))
    if args.dnstap:
        tools.update(ensure_fstrm(allow_install=not args.no_install))

    def terminate(signum: int, frame: FrameType | None) -> None:  # SIGTERM/SIGHUP: unwind through the finally
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell that starts this in the background would otherwise leave Ctrl-C/SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="blockd-bench-"))
    tmp.chmod(0o755)
    procs = Procs()
    bench: Bench | None = None
    status = 0
    try:
        snapshot = snapshot_blockd(tmp, SHIPPED_LISTS)
        bench = Bench(args, tools, tmp, procs, snapshot)
        bench.cache_state = blockd_cache_state(snapshot.root)
        if args.rpz:
            log(f"working in {tmp}; RPZ comparison, {args.rpz_size:,} triggers, blockd vs unbound, knot primary")
            bench.run_rpz()
        elif args.alone:
            compared = ", ".join(t.what for option, t in TOGGLES.items() if getattr(args, option))
            log(f"working in {tmp}; blockd on vs off: {compared}; {args.duration:g}s per run")
            bench.run_toggles()
        else:
            log(f"working in {tmp}; servers: {', '.join(args.servers)}; {args.duration:g}s per run")
            bench.run()
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process it started", file=sys.stderr)
        status = 130
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
        if args.keep_tmp or status:
            print(f"bench: generated files and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if status or bench is None:
        return status or 1
    write = rpz_report if args.rpz else toggles_report if args.alone else report
    text = write(bench, tools, started, time.monotonic() - t0)
    prefix = "rpz-" if args.rpz else "dnstap-" if args.dnstap else "limits-" if args.limits else ""
    out = BENCH / "out" / f"{prefix}results-{args.stamp}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
