"""The benchmark itself: which figures are measured on which server, list set and variant, in what order."""

from __future__ import annotations

import argparse
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from common import BENCH, BenchError, log
from data import ListSet, QueryFiles, RpzZone, list_sets, query_files, rpz_zone
from load import FIXED_QPS, Dnsperf, PerfResult, QuietGate
from primary import Knot, NotifyListener, start_knot
from procs import (
    CLIENT_CPU,
    SERVER_CPU,
    ConnectionWatch,
    Procs,
    Snapshot,
    cpu_ticks,
    cpu_user,
    ensure_py_spy,
    free_port,
    hwm_mb,
    others_on,
    rss_mb,
    settle,
)
from report import ms_list, profile_tables, qps_list, toggle_section
from servers import (
    FORWARD_A,
    RCODE_NXDOMAIN,
    TOGGLES,
    BlockdRpz,
    Context,
    Instance,
    Server,
    StartTimeout,
    Toggle,
    UnboundRpz,
    ask,
    build_servers,
    dnstap_toggle,
    scrape,
    start_upstream,
    stop,
)

Figures = dict[str, object]  # metric -> value, for one server and one list set


def _on_off(on: bool) -> str:
    return "on" if on else "off"


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path, procs: Procs, snapshot: Snapshot):
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.procs = procs
        self.fingerprint = snapshot.fingerprint
        self.cache_state = "?"
        self.ctx = Context(tmp, tools, procs, snapshot.root)
        self.servers = build_servers(args)
        self.perf = Dnsperf.from_args(args, tools)
        self.quiet = QuietGate(args.quiet_wait, args.quiet_budget)
        self.upstream: Instance | None = None
        self.queries: QueryFiles | None = None
        self.results: dict[str, dict[str, Figures]] = {}  # server -> listset -> metric -> value
        self.runs: dict[str, dict[str, list[PerfResult]]] = {}  # "server/listset" -> metric -> every run
        self.notes: list[str] = []
        self.sanity: list[str] = []
        self.extra: list[str] = []  # report sections of the optional runs
        self.rpz: dict[str, Figures] = {}  # --rpz: server -> metric -> value
        self.rpz_notes: list[str] = []
        self.rpz_facts: dict[str, object] = {}  # --rpz: the zone and the primary, for the report
        self.rpz_others: list[str] = []  # --rpz: "blockd, file: 3%": others' share of the server CPU meanwhile

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self) -> dict[str, ListSet]:
        """The list sets, each selected server's block-list config for each, and the query files."""
        args = self.args
        sets = list_sets(self.tmp, self.ctx.src, None if args.skip_1m else args.synthetic)
        for listset in sets.values():
            for kind in args.servers:
                self.servers[kind].write_lists(listset, self.ctx)
        self.queries = query_files(self.tmp, args.repeat, args.duration)
        return sets

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
        helpers = ([self.upstream.proc] if self.upstream is not None else []) + instance.helpers
        return self.perf.run(instance.proc, instance.port, query_file, duration, qps, verbose, max_runs, tuple(helpers))

    def paced(self, instance: Instance, query_file: Path) -> PerfResult:
        return self.dnsperf(instance, query_file, self.args.duration, qps=FIXED_QPS, verbose=True)

    def measure(
        self, label: str, metric: str, instance: Instance, once: Callable[[int], PerfResult]
    ) -> list[PerfResult]:
        """Run `once(repeat_index)` --repeat times, recording every result under label/metric."""
        results = []
        for index in range(self.args.repeat):
            self.quiet.wait(instance.proc.pid)
            results.append(once(index))
        self.runs.setdefault(label, {})[metric] = results
        return results

    def blocked(self, label: str, instance: Instance, listset: ListSet) -> Figures:
        """Saturated blocked answers: qps and CPU per query."""
        kind = instance.kind
        runs = self.measure(
            label, "blocked", instance, lambda _: self.dnsperf(instance, listset.query_file, self.args.duration)
        )
        best = max(runs, key=lambda r: r.qps)
        log(
            f"{kind}: blocked {qps_list(runs)} qps, {best.cpu_us or 0:.1f} us CPU/query, "
            f"lost {best.lost}/{best.sent}, rcodes {best.rcodes}"
        )
        return {"blocked_qps": best.qps, "blocked_cpu_us": best.cpu_us, "blocked_lost": best.lost / max(1, best.sent)}

    def paced_blocked(self, label: str, instance: Instance, listset: ListSet) -> Figures:
        """Blocked answers at FIXED_QPS: p99, p50 and CPU per query."""
        runs = self.measure(label, "p99_blocked", instance, lambda _: self.paced(instance, listset.query_file))
        fixed = min(runs, key=lambda r: r.percentile(0.99))
        res: Figures = {
            "p99_blocked": fixed.percentile(0.99),
            "p50_blocked": fixed.percentile(0.50),
            "fixed_cpu_us": min(r.cpu_us or math.inf for r in runs),
        }
        log(
            f"{instance.kind}: at {FIXED_QPS} qps blocked p99 {ms_list(runs)} ms (p50 "
            f"{res['p50_blocked'] * 1e3:.3f}), {res['fixed_cpu_us']:.1f} us CPU/query"
        )
        return res

    def hits(self, label: str, instance: Instance, hit_file: Path) -> Figures:
        """Cache hits: a small set of forwarded names, warmed, then repeated; saturated, then paced."""
        kind = instance.kind
        self.dnsperf(instance, hit_file, min(2.0, self.args.duration), max_runs=3)
        runs = self.measure(label, "hit", instance, lambda _: self.dnsperf(instance, hit_file, self.args.duration))
        hit = max(runs, key=lambda r: r.qps)
        log(f"{kind}: cache hit {qps_list(runs)} qps, lost {hit.lost}/{hit.sent}, rcodes {hit.rcodes}")
        paced = self.measure(label, "p99_hit", instance, lambda _: self.paced(instance, hit_file))
        log(f"{kind}: at {FIXED_QPS} qps cache-hit p99 {ms_list(paced)} ms")
        return {
            "hit_qps": hit.qps,
            "hit_lost": hit.lost / max(1, hit.sent),
            "p99_hit": min(r.percentile(0.99) for r in paced),
        }

    def misses(self, label: str, instance: Instance, queries: QueryFiles) -> Figures:
        """Cache misses: names never asked before, answered by the fake upstream; one file per repeat."""
        kind = instance.kind
        runs = self.measure(
            label,
            "miss",
            instance,
            lambda i: self.dnsperf(instance, queries.misses[i], self.args.duration, max_runs=1),
        )
        miss = max(runs, key=lambda r: r.qps)
        if any(r.sent >= queries.miss_count for r in runs):
            self.notes.append(f"{kind}: a cache-miss run used up every unique name (raise the file size)")
        log(f"{kind}: cache miss {qps_list(runs)} qps, lost {miss.lost}/{miss.sent}, rcodes {miss.rcodes}")
        return {"miss_qps": miss.qps, "miss_lost": miss.lost / max(1, miss.sent)}

    def run_server(self, kind: str, listset: ListSet) -> Figures:
        """Every figure for one server and one list set, from one instance; best of --repeat runs."""
        assert self.queries is not None
        server = self.servers[kind]
        label = f"{kind}/{listset.key}"
        res: Figures = {}
        log(f"{kind}: starting with the {listset.label}")
        instance = server.start(listset, self.ctx)
        try:
            pid = instance.proc.pid
            res["startup"] = instance.startup
            res["rss_load"] = rss_mb(pid)
            log(f"{kind}: answering after {instance.startup:.2f}s, RSS {res['rss_load']:.1f} MB")
            self.sanity.append(server.check_answers(instance, listset))
            # A short warm-up so every server has touched its code paths before it is measured.
            self.dnsperf(instance, listset.query_file, min(1.0, self.args.duration))
            res.update(self.blocked(label, instance, listset))
            if listset.key == "shipped":
                res.update(self.paced_blocked(label, instance, listset))
                res.update(self.hits(label, instance, self.queries.hit))
                res.update(self.misses(label, instance, self.queries))
            res["rss_end"] = rss_mb(pid)
            self.notes += server.notes_after_runs(instance, listset)
        finally:
            self.procs.stop(instance.proc)
        return res

    def compare(self, toggle: Toggle, listset: ListSet) -> None:
        """Blocked qps of the toggle's on and off configurations, fresh instances alternating on, off."""
        args = self.args
        pairs = args.repeat if toggle.pairs is None else 1 if args.quick else toggle.pairs
        figures: dict[bool, list[PerfResult]] = {True: [], False: []}
        facts: dict[bool, list[dict[str, float]]] = {True: [], False: []}  # what each instance reported
        for on in (True, False) * pairs:
            server = toggle.on if on else toggle.off
            instance = server.start(listset, self.ctx)
            try:
                if len(figures[on]) == 0:
                    self.sanity.append(f"{server.check_answers(instance, listset)} ({toggle.what} {_on_off(on)})")
                self.dnsperf(instance, listset.query_file, min(1.0, args.duration))
                self.quiet.wait(instance.proc.pid)
                result = self.dnsperf(instance, listset.query_file, args.duration)
                facts[on].append(server.finish(instance, self.ctx))
            finally:
                stop(instance, self.procs)
            figures[on].append(result)
            log(
                f"{toggle.kind} {toggle.what} {_on_off(on)}: {result.qps:,.0f} qps, "
                f"{result.cpu_us:.1f} us CPU/query" + "".join(f", {k} {v:,.0f}" for k, v in facts[on][-1].items())
            )
        self.runs[f"{toggle.kind}-{toggle.slug}-on/{listset.key}"] = {"blocked": figures[True]}
        self.runs[f"{toggle.kind}-{toggle.slug}-off/{listset.key}"] = {"blocked": figures[False]}
        self.extra += toggle_section(toggle, listset, figures, facts)

    def profile(self, listset: ListSet, py_spy: str) -> None:
        """py-spy on one blockd instance: a blocked-answer run, then a cache-hit run."""
        assert self.queries is not None
        instance = self.servers["blockd"].start(listset, self.ctx)
        try:
            for slug, title, query_file, warm_runs in (
                ("blocked", "blocked-answer run", listset.query_file, None),
                ("hit", "cache-hit run", self.queries.hit, 3),
            ):
                self.dnsperf(instance, query_file, min(1.0, self.args.duration), max_runs=warm_runs)
                self.quiet.wait(instance.proc.pid)
                self.extra += self.profile_run(instance, listset, slug, title, query_file, py_spy)
        finally:
            self.procs.stop(instance.proc)

    def profile_run(
        self, instance: Instance, listset: ListSet, slug: str, title: str, query_file: Path, py_spy: str
    ) -> list[str]:
        """One dnsperf run under `py-spy record`; the profile's report section."""
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
            return ["", f"(py-spy produced no profile of the {title}: {spy.log_tail(5)})"]
        copy = BENCH / "out" / f"profile-{slug}-{self.args.stamp}.txt"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(raw, copy)
        return profile_tables(raw, f"{title} ({listset.label}, metrics + log on)", result, copy, self.args)

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        sets = self.prepare()
        assert self.queries is not None
        self.upstream = start_upstream(self.ctx)
        direct = self.dnsperf(self.upstream, self.queries.misses[-1], min(2.0, args.duration), max_runs=1)
        self.notes.append(
            f"fake upstream alone (unbound, CPU {CLIENT_CPU} shared with dnsperf): {direct.qps:,.0f} qps of unique "
            "names, so it is not what limits the cache-miss figures"
        )
        for kind in args.servers:
            for listset in sets.values():
                self.results.setdefault(kind, {})[listset.key] = self.run_server(kind, listset)
        for option, toggle in TOGGLES.items():
            if getattr(args, option) and toggle.kind in args.servers:
                self.compare(toggle, sets["shipped"])
        if args.profile and "blockd" in args.servers:
            py_spy = ensure_py_spy(allow_install=not args.no_install)
            if py_spy:
                self.profile(sets["shipped"], py_spy)

    def run_toggles(self) -> None:
        """Only the on/off comparisons asked for, on the shipped lists: what an option of a Toggle that runs
        `alone` (--dnstap) does instead of the qps suite; --metrics-off given with it runs in the same run."""
        sets = list_sets(self.tmp, self.ctx.src, None)
        self.upstream = start_upstream(self.ctx)
        toggles = dict(TOGGLES, dnstap=dnstap_toggle(self.args.dnstap_messages))
        for option, toggle in toggles.items():
            if getattr(self.args, option):
                self.compare(toggle, sets["shipped"])

    # -- the RPZ comparison (--rpz) ---------------------------------------------------------------

    def run_rpz(self) -> None:
        """blockd and unbound given one generated RPZ zone: loaded from its file; then by AXFR from a real Knot
        primary, followed by a change of --rpz-changes triggers that reaches them by NOTIFY + IXFR."""
        args = self.args
        zone = rpz_zone(self.tmp, args.rpz_size, spares=2 * (args.rpz_changes // 4))  # one change per server
        self.rpz_facts.update(
            triggers=zone.triggers, names=len(zone.names), origin=zone.origin, mb=zone.path.stat().st_size / 2**20
        )
        self.upstream = start_upstream(self.ctx)
        limit = args.rpz_timeout
        file_set = zone.listset("rpz-file", f"RPZ zone file ({zone.triggers:,} triggers)")
        for server in (
            BlockdRpz(start_limit=limit),
            UnboundRpz(origin=zone.origin, zonefile=zone.path, start_limit=limit),
        ):
            instance = self.rpz_start(server, file_set, "file")
            if instance is not None:
                self.procs.stop(instance.proc)
        listener = NotifyListener()
        ports = {"blockd": free_port(), "unbound": free_port()}  # Knot's NOTIFY targets: fixed before it starts
        try:
            knot = start_knot(self.ctx, zone, {"bench": listener.port, **ports}, limit)
            self.rpz_facts.update(knot_startup=knot.startup, knot_rss=knot.rss_load)
            try:
                for server in (
                    BlockdRpz(primary=knot.port, origin=zone.origin, start_limit=limit),
                    UnboundRpz(primary=knot.port, origin=zone.origin, start_limit=limit),
                ):
                    axfr_set = zone.listset("rpz-axfr", f"RPZ zone by AXFR ({zone.triggers:,} triggers)")
                    instance = self.rpz_start(server, axfr_set, "axfr", ports[server.kind], knot)
                    if instance is None:
                        continue
                    try:
                        self.rpz_ixfr(instance, knot, zone, listener)
                    finally:
                        self.procs.stop(instance.proc)
                self.rpz_facts["knot_rss_end"] = rss_mb(knot.proc.pid)
            finally:
                self.procs.stop(knot.proc)
        finally:
            listener.close()

    def rpz_start(
        self, server: Server, listset: ListSet, how: str, port: int | None = None, knot: Knot | None = None
    ) -> Instance | None:
        """A fresh instance until its first blocked answer (NXDOMAIN for the probe); RSS then; the answer check.
        `how`: "file" or "axfr" (the figures' prefix).  None when unbound timed out (measured and noted)."""
        kind = server.kind
        res = self.rpz.setdefault(kind, {})
        self.quiet.wait(None)
        log(f"{kind}: starting with the {listset.label}")
        watch = ConnectionWatch(knot.port) if knot is not None else None
        offset = knot.log_offset() if knot is not None else 0
        try:
            instance = server.start(listset, self.ctx, port)
        except StartTimeout as exc:
            if watch is not None:
                watch.stop()
            pid = exc.proc.pid
            res[f"{how}_startup"] = math.inf
            res[f"{how}_rss"] = rss_mb(pid)
            res[f"{how}_hwm"] = hwm_mb(pid)
            self.rpz_notes.append(
                f"{kind} ({how}): no NXDOMAIN for the probe within {exc.limit:g} s (`--rpz-timeout`); RSS then "
                f"{res[f'{how}_rss']:.0f} MB; its log ends: `{' / '.join(exc.proc.log_tail(3).splitlines())}`"
            )
            log(f"{kind}: no blocked answer within {exc.limit:g}s, RSS {res[f'{how}_rss']:.0f} MB")
            self.procs.stop(exc.proc)
            if kind == "blockd":
                raise
            return None
        connected = watch.stop() if watch is not None else None
        pid = instance.proc.pid
        others = others_on(int(SERVER_CPU), instance.cpu_at_start, cpu_ticks(pid, user_only=True))
        self.rpz_others.append(f"{kind} {how} {others:.0%}")
        res[f"{how}_startup"] = instance.startup
        res[f"{how}_rss"] = rss_mb(pid)
        res[f"{how}_hwm"] = hwm_mb(pid)
        if connected is not None:
            res["axfr_connect"] = connected - instance.started
            res["axfr_transfer"] = instance.startup - res["axfr_connect"]
        log(f"{kind}: first blocked answer after {instance.startup:.2f}s, RSS {res[f'{how}_rss']:.1f} MB")
        self.sanity.append(server.check_answers(instance, listset))
        if knot is not None:
            self.rpz_notes.append(f"{kind}: knot served it " + "; ".join(knot.transfers_since(offset) or ["(no log)"]))
        return instance

    def rpz_ixfr(self, instance: Instance, knot: Knot, zone: RpzZone, listener: NotifyListener) -> None:
        """Change --rpz-changes triggers at Knot (half removed, half added), `knotc zone-reload`, and time until
        the instance answers a newly added name NXDOMAIN; then check every changed name."""
        kind, pid, port = instance.kind, instance.proc.pid, instance.port
        res = self.rpz[kind]
        settle(pid)  # blockd saves its copy of the zone after going live; unbound is idle at once
        res["settled_rss"] = rss_mb(pid)
        removed, added = zone.change(self.args.rpz_changes)
        zone.write(knot.zone_file)
        offset = knot.log_offset()
        self.quiet.wait(pid)
        log(f"{kind}: IXFR of {2 * (len(removed) + len(added)):,} changed triggers, serial {zone.serial}")
        cpu_first, ticks_first = cpu_user(int(SERVER_CPU)), cpu_ticks(pid, user_only=True)
        started = time.monotonic()
        reload = knot.reload()
        reloaded: float | None = None
        old = servfail = silent = 0
        live = math.inf
        while time.monotonic() - started < self.args.rpz_timeout:
            if reloaded is None and reload.poll() is not None:
                reloaded = time.monotonic()
            if instance.proc.popen.poll() is not None:
                raise BenchError(f"{instance.proc.name} died during the IXFR:\n{instance.proc.log_tail()}")
            answer = ask(port, added[0], "A", 0.05)
            if answer is None:
                silent += 1
            elif answer[0] == RCODE_NXDOMAIN and not answer[1]:
                live = time.monotonic()
                break
            elif answer == (0, [FORWARD_A]):
                old += 1
            elif answer[0] == 2:
                servfail += 1
            else:
                raise BenchError(f"{kind}: {added[0]} A answered {answer} during the IXFR (NXDOMAIN or {FORWARD_A})")
            time.sleep(0.005)
        others = others_on(int(SERVER_CPU), cpu_first, cpu_ticks(pid, user_only=True) - ticks_first)
        self.rpz_others.append(f"{kind} IXFR {others:.0%}")
        output = reload.communicate(timeout=self.args.rpz_timeout)[0]
        if reload.returncode != 0:
            raise BenchError(f"knotc -b zone-reload failed ({reload.returncode}): {output.strip()}\n{knot.log_tail()}")
        reloaded = reloaded or time.monotonic()
        notified = listener.arrival(zone.serial, started, limit=5.0)
        res["ixfr_reload"] = reloaded - started
        res["ixfr_notify"] = (notified - started) if notified is not None else math.nan
        res["ixfr_after_notify"] = (live - notified) if notified is not None else math.nan
        res["ixfr_total"] = live - started
        res["ixfr_rss"] = rss_mb(pid)
        res["ixfr_hwm"] = hwm_mb(pid)
        if math.isinf(live):
            note = f"{kind}: {added[0]} was not blocked {self.args.rpz_timeout:g} s after the zone-reload"
            if kind == "blockd":
                raise BenchError(f"{note}:\n{instance.proc.log_tail()}")
            self.rpz_notes.append(note)
            return
        log(
            f"{kind}: new name blocked {res['ixfr_total']:.3f}s after zone-reload "
            f"({res['ixfr_after_notify']:.3f}s after knot's NOTIFY; knot reloaded in {res['ixfr_reload']:.2f}s)"
        )
        if not old:
            self.rpz_notes.append(f"{kind}: the IXFR was live before the first probe ({added[0]} never seen unblocked)")
        if servfail or silent:
            self.rpz_notes.append(
                f"{kind}: while the IXFR was applied, {servfail} probes got SERVFAIL and {silent} no answer in 50 ms"
            )
        self.rpz_check_change(kind, port, removed, added)
        time.sleep(0.5)  # knot logs the end of the transfer
        self.rpz_notes.append(f"{kind}: knot served the change " + "; ".join(knot.transfers_since(offset) or ["?"]))
        if kind == "blockd" and instance.metrics_port:
            counted = []
            for line in scrape(instance):
                if line.startswith("blockd_zone_transfers_total{"):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    counted.append(f"{labels.get('type')} {labels.get('result')} {float(line.split()[-1]):g}")
            self.rpz_notes.append("blockd counted (blockd_zone_transfers_total) " + (", ".join(counted) or "nothing"))

    def rpz_check_change(self, kind: str, port: int, removed: list[str], added: list[str]) -> None:
        """Every added name and a subdomain of it NXDOMAIN; every removed one forwarded again."""
        wrong = []
        for names, want in ((added, (RCODE_NXDOMAIN, [])), (removed, (0, [FORWARD_A]))):
            for name in names:
                for qname in (name, f"www.{name}"):
                    answer = ask(port, qname, "A", 2.0)
                    if answer != want:
                        wrong.append(f"{qname}: {answer} (want {want})")
        if wrong:
            raise BenchError(f"{kind} after the IXFR: {len(wrong)} wrong answers, e.g. {wrong[:5]}")
        self.sanity.append(
            f"{kind} / rpz-ixfr: OK ({len(added)} added names and their subdomains NXDOMAIN, {len(removed)} removed "
            f"ones and their subdomains forward {FORWARD_A})"
        )
