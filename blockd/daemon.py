"""The composition root: builds every part from the config and wires them to the reactor.

Constructors build; services start.  Everything blockd runs is built here, in one place, and
passed in: the reactor, the monotonic clock the cache ages on, the cache, the repeat memo, the
first policy snapshot (behind the one PolicyHolder that reloads swap), the query log and the
metrics.  The query path:

  DNSService (UDP, TCP) -> Resolver (read, classify, check, cache/in flight, forward, check
  the answer, deliver) -> Upstreams

The netlink side is built only when the config needs it ([egress] enabled, or a group defined
by interfaces/VLANs), and only then is blockd.netlink (pyroute2) imported:
  InterfaceNetworks -> Policy.with_interface_networks swaps the snapshot when subnets change;
  Resolver's AnswerWatcher (EgressLearning) -> EgressService.learn for answers to names a
    blocking group blocks, and FollowUpLookups -> Upstreams (no policy, no cache) -> learn
    for sinkholed questions;
  reload, interface changes, timer and netlink rule/route events -> EgressService reconcile.

Start: the DNS listeners bind (while possibly root), root is dropped to server.user
(blockd.privileges), then every other service starts.  systemd hears READY=1 once the listeners
answer, RELOADING=1/READY=1 around each SIGHUP reload, STOPPING=1, and WATCHDOG=1 from a timer on
the reactor (blockd.sd_notify).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from blockd import __version__, privileges, wire
from blockd.admin import AdminService
from blockd.cache import AnswerCache
from blockd.config import Config, ConfigError, DnstapConfig, load_config
from blockd.dnstap import Counters, DnstapSettings, DnstapSink
from blockd.egress import EgressSettings, LearnedAddresses, NetlinkChange
from blockd.egress_service import EgressService, FollowUpLookups
from blockd.interface_groups import InterfaceMap, InterfaceNetworks, InterfaceSelector, networks_of
from blockd.kernel_blocks import KernelBlocks
from blockd.limits import ClientLimits
from blockd.metrics import (
    CacheCollector,
    DnstapMetrics,
    EgressCollector,
    EgressMetrics,
    LimitCollector,
    ListInvalidLinesCollector,
    ListSizeCollector,
    Metrics,
    NullMetrics,
    UpstreamHealthCollector,
    UrlSourceCollector,
)
from blockd.netlink_services import EgressAdapter, NetlinkServices, Runner, ThreadRunner, Watcher
from blockd.notify import NotifyReceiver, NoZones
from blockd.policy import Group, Policy, PolicyError, Verdict, build_policy
from blockd.policy import dismantle as policy_dismantle
from blockd.prefix_table import IPAddress
from blockd.publish import PublishCollector, Publisher
from blockd.querylog import QueryLog
from blockd.reload import Reloader, build_for_reload, status_path_for
from blockd.repeats import RepeatMemo
from blockd.resolver import AnswerWatcher, Clock, IgnoreAnswers, Resolver
from blockd.scrub import scrub
from blockd.sd_notify import Notifier, watchdog_interval
from blockd.secondary_lists import SecondaryLists, TransferSetupError, ZoneCollector, load_stored_copies
from blockd.server import DNSStreamFactory, StreamSettings
from blockd.services import DNSService, DnstapService, PidFile, QueryLogService, StartupError
from blockd.settings import LIVE_KEYS, live_values, needs_restart
from blockd.tsig_key import KeyFileError, load_key_file, to_dnspython
from blockd.upstream import Upstreams
from blockd.upstream_answer import AnswerInfo, analyze
from blockd.url_lists import UrlLists, UrlSetupError
from blockd.url_source import REASONS as URL_FAILURE_REASONS
from blockd.zone_store import StoredZone

_log = Logger()

__all__ = ["Daemon", "StartupError", "real_netlink", "run"]


class PolicyHolder:
    """The one reference to the serving policy; swapping it is a single assignment."""

    def __init__(self, policy: Policy):
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


class MonotonicClock:
    """The cache's and the limits' clock: a wall-clock step must not stretch or cut TTLs.

    `seconds` is time.monotonic itself, not a method calling it: the query path reads it per query."""

    seconds = staticmethod(time.monotonic)


NetlinkParts = tuple[EgressAdapter, Runner, Callable[[Callable[[NetlinkChange], None]], Watcher] | None]


def real_netlink(reactor: Any, settings: EgressSettings) -> NetlinkParts:
    """The pyroute2 adapter, one worker thread for all its calls, and the notification watcher.

    Raises StartupError when egress is enabled without CAP_NET_ADMIN.
    """
    from blockd import netlink  # the only module importing pyroute2: nothing else needs it

    if settings.enabled:
        try:
            netlink.check_capability()
        except netlink.CapabilityError as exc:
            raise StartupError(f"egress: {exc}") from None
    return (
        netlink.NetlinkAdapter(),
        ThreadRunner(reactor),
        lambda callback: netlink.NetlinkWatcher(callback, tables={settings.table}),
    )


def interface_selectors(config: Config) -> dict[str, InterfaceSelector]:
    """The groups defined (also) by interfaces or VLAN ids, and which."""
    return {
        group.name: InterfaceSelector(tuple(group.interfaces), tuple(group.vlans))
        for group in config.groups.values()
        if group.interfaces or group.vlans
    }


class EgressLearning:
    """The Resolver's AnswerWatcher on an egress gateway with learning on."""

    def __init__(self, policy: PolicyHolder, egress: EgressService, follow_up: FollowUpLookups):
        self.policy = policy
        self.egress = egress
        self.follow_up = follow_up

    def answer_seen(self, info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None:
        """Learn an answer's addresses when a blocking group blocks one of its names, whoever asked."""
        if info.rcode != wire.RCODE_NOERROR:
            return
        addresses = info.addresses + info.hint_addresses
        if addresses and self.policy.current.blocks_for_any_blocking_group(info.names):
            self.egress.learn(addresses, ttl=info.lifetime or 0)

    def question_blocked(self, name: str, verdict: Verdict) -> None:
        # The device got no address from us, but may hold one from elsewhere: find it ourselves.
        self.follow_up.request(name)


class Daemon:
    """Everything blockd runs, built from one config and one initial policy."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        policy: Policy,
        config_path: Path | None = None,
        netlink: Callable[[Any, EgressSettings], NetlinkParts] = real_netlink,
        clock: Clock | None = None,
        stored_zones: Mapping[str, StoredZone] | None = None,
        notifier: Notifier | None = None,
        system: privileges.System | None = None,
    ):
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.policy = PolicyHolder(policy)
        self.ready = False
        self.notifier = notifier if notifier is not None else Notifier.from_environ()  # no-op outside systemd
        self.system = system  # the credentials server.user changes (None: this process's)
        self.watchdog: task.LoopingCall | None = None
        self.metrics: Metrics = Metrics() if config.metrics.listen is not None else NullMetrics()
        self.metrics.registry.register(
            ListSizeCollector(lambda: {name: len(lst) for name, lst in self.policy().lists.items()})
        )
        self.metrics.registry.register(
            ListInvalidLinesCollector(lambda: {name: lst.invalid_lines for name, lst in self.policy().lists.items()})
        )
        self.dnstap = self._build_dnstap(config.dnstap)
        self.upstreams = Upstreams(
            reactor,
            config.upstream.servers,
            config.upstream.timeout,
            record=self._record_upstream,
            tap=self.dnstap.forwarded if self.dnstap is not None and self.dnstap.forwarder else None,
            strategy=config.upstream.strategy,
        )
        self.metrics.registry.register(UpstreamHealthCollector(self.upstreams))
        self.query_log = QueryLog(
            config.log.queries,
            config.log.path,
            config.log.client_ip,
            on_error=self.metrics.query_log_errors.inc,
            on_drop=self.metrics.query_log_dropped.inc,
            on_line=self.metrics.query_log_lines.inc,
            clock_ns=time.time_ns,  # the log says when, on the wall clock
        )
        cache = config.cache
        self.cache = AnswerCache(
            cache.size, cache.min_ttl, cache.max_ttl, cache.serve_stale, cache.stale_max, cache.stale_ttl,
            cache.max_bytes,
        )  # fmt: skip
        self.metrics.registry.register(CacheCollector(self.cache))
        # Egress runs with the settings it started with (blockd.settings: restart keys).
        self.egress_settings = config.egress
        self.netlink: NetlinkServices | None = None
        self.egress: EgressService | None = None
        self.learned: LearnedAddresses | None = None
        self.follow_up: FollowUpLookups | None = None
        self.interfaces: InterfaceNetworks | None = None
        self._build_netlink(netlink)
        self.secondaries = self._build_secondaries(stored_zones or {})
        self.url_lists = self._build_url_lists()
        self.limits = ClientLimits(config.limits.clients)
        self.repeats = RepeatMemo()
        self.metrics.registry.register(LimitCollector(self.limits, self.repeats))
        self.resolver = Resolver(
            self.policy,
            self.upstreams,
            self.metrics,
            self.query_log,
            self.cache,
            self.clock,
            self._answer_watcher(),
            self.repeats,
            self._notify_receiver(),
            forward_ecs=config.upstream.forward_ecs,
            tap=self.dnstap,
            identity=wire.ServerIdentity(config.server.nsid.encode(), config.server.version, config.server.identity),
            limits=self.limits,
            max_udp_size=config.limits.max_udp_size,
        )
        self.stream_factory = DNSStreamFactory(self.resolver, stream_settings(config), self.limits, reactor)
        self._appliers = self._live_appliers()
        self.reloader = Reloader(
            current=self.policy,
            build=lambda previous: build_for_reload(self.config_path, previous),
            apply=self._apply,
            on_result=self._record_reload,
            status_path=status_path_for(config.server.pidfile) if config.server.pidfile else None,
            run_in_thread=threads.deferToThread,
            wall_clock=time.time,
            monotonic=time.monotonic,
        )
        self.reloader.swap = lambda policy: self._go_live(policy, self.config)

        # Start order matters: the pidfile (and reload status) first so `blockd reload` works as
        # soon as the daemon answers; the query log before the listeners so no line is lost;
        # netlink before the listeners, which read only once interface-defined groups are known
        # (and stop before egress, which may remove its routes on exit).
        self.services = service.MultiService()
        if config.server.pidfile is not None:
            PidFile(config.server.pidfile).setServiceParent(self.services)
        QueryLogService(self.query_log).setServiceParent(self.services)
        if self.dnstap is not None:
            DnstapService(self.dnstap, reactor).setServiceParent(self.services)
        if self.netlink is not None:
            self.netlink.setServiceParent(self.services)
        interfaces = self.interfaces
        self.dns = DNSService(
            reactor,
            config.server.listen,
            self.stream_factory,
            self.resolver,
            gate=(lambda: interfaces.ready) if interfaces is not None else None,
        )
        self.dns.setServiceParent(self.services)
        limits = config.limits.clients
        self.kernel_blocks = KernelBlocks(
            reactor, limits.kernel_block_seconds, self.dns.udp_sockets, self.metrics.count_limited
        )
        if limits.enabled and limits.kernel_block_qps:
            self.limits.on_flood = self.kernel_blocks.block
        if self.secondaries is not None:
            self.secondaries.setServiceParent(self.services)  # after the listeners: NOTIFY is answered
        if self.url_lists is not None:
            self.url_lists.setServiceParent(self.services)  # the listeners serve the copies meanwhile
        self.publisher = self._build_publisher()
        if self.publisher is not None:
            self.publisher.setServiceParent(self.services)
        if config.metrics.listen is not None:
            admin = AdminService(reactor, config.metrics.listen, self.metrics.registry, lambda: self.ready, self.policy)
            admin.setServiceParent(self.services)
        self._declare_series(config, policy)
        self.metrics.last_reload_success.set(time.time())

    def _build_dnstap(self, settings: DnstapConfig) -> DnstapSink | None:
        if settings.target is None:
            return None
        identity = settings.identity or socket.gethostname()
        version = settings.version or f"blockd {__version__}"
        counters = DnstapMetrics(self.metrics.registry)
        sink_settings = DnstapSettings(
            settings.target, identity.encode(), version.encode(), settings.messages, settings.forwarder
        )
        return DnstapSink(sink_settings, Counters(counters.frames, counters.connected), clock_ns=time.time_ns)

    def _build_secondaries(self, stored: Mapping[str, StoredZone]) -> SecondaryLists | None:
        """The transferred lists, when the config has any (they start with the DNS listeners)."""
        if not any(lst.zone is not None for lst in self.config.lists.values()):
            return None
        try:
            secondaries = SecondaryLists(
                self.reactor,
                self.config,
                stored,
                update=lambda build, done: self.reloader.update(build, done),
                current_config=lambda: self.config,
            )
        except TransferSetupError as exc:
            raise StartupError(str(exc)) from None
        self.notify_acceptor = secondaries.notify_acceptor()
        self.metrics.registry.register(ZoneCollector(secondaries, self.policy, self.notify_acceptor))
        return secondaries

    def _build_url_lists(self) -> UrlLists | None:
        """The lists downloaded from URLs, when the config has any (they start after the listeners)."""
        if not any(lst.url is not None for lst in self.config.lists.values()):
            return None
        try:
            url_lists = UrlLists(
                self.reactor,
                self.config,
                update=lambda build, done: self.reloader.update(build, done),
                current_config=lambda: self.config,
            )
        except UrlSetupError as exc:
            raise StartupError(str(exc)) from None
        self.metrics.registry.register(UrlSourceCollector(url_lists.stats, URL_FAILURE_REASONS))
        return url_lists

    def _build_publisher(self) -> Publisher | None:
        """RPZ out ([publish]), when configured."""
        settings = self.config.publish
        if settings.listen is None:
            return None
        key = None
        if settings.tsig is not None:
            try:
                key = to_dnspython(load_key_file(settings.tsig))
            except KeyFileError as exc:
                raise StartupError("; ".join(str(e) for e in exc.errors)) from None
        publisher = Publisher(self.reactor, settings, self.config.server.state_dir, key, self.policy)
        self.metrics.registry.register(PublishCollector(publisher))
        return publisher

    def _notify_receiver(self) -> NotifyReceiver:
        return self.notify_acceptor if self.secondaries is not None else NoZones()

    def _answer_watcher(self) -> AnswerWatcher:
        # Learning hooks only when they do something: otherwise the query path calls no-ops.
        if self.egress is not None and self.follow_up is not None:
            return EgressLearning(self.policy, self.egress, self.follow_up)
        return IgnoreAnswers()

    def _build_netlink(self, parts: Callable[[Any, EgressSettings], NetlinkParts]) -> None:
        settings = self.egress_settings
        selectors = interface_selectors(self.config)
        if not settings.enabled and not selectors:
            return
        adapter, runner, watcher_factory = parts(self.reactor, settings)
        self.netlink = NetlinkServices(self.reactor, runner, adapter, watcher_factory)
        if settings.enabled:
            self._build_egress(settings, adapter, runner)
        if selectors:
            for group in selectors:
                self.metrics.interface_networks.labels(group)
            self.interfaces = InterfaceNetworks(self.reactor, adapter, runner, selectors, self._interfaces_changed)
            self.interfaces.setServiceParent(self.netlink)
        parts_built = []
        if self.egress is not None:
            parts_built.append(f"egress (table {settings.table}, learning {'on' if settings.learn else 'off'})")
        if selectors:
            parts_built.append(f"interface-defined groups ({', '.join(sorted(selectors))})")
        _log.info("netlink: {what}", what=" and ".join(parts_built))

    def _build_egress(self, settings: EgressSettings, adapter: EgressAdapter, runner: Runner) -> None:
        """EgressService and its learning; attached to the netlink services by attach_egress()."""
        self.learned = LearnedAddresses.from_settings(settings)
        self.egress = EgressService(
            self.reactor,
            settings,
            adapter,
            blocking_networks=lambda: self.policy.current.blocking_networks(),  # incl. interface subnets
            static_prefixes=lambda: self.policy.current.egress_prefixes,
            learned=self.learned,
            runner=runner,
            record=EgressMetrics(self.metrics.registry).record,
        )
        if settings.learn:
            # Learned routes live at least learn_min_ttl: looking a name up again sooner than
            # half of that could only refresh them.
            self.follow_up = FollowUpLookups(
                self.reactor, self._resolve_for_learning, self.egress.learn, min_interval=settings.learn_min_ttl / 2
            )
        self.metrics.registry.register(EgressCollector(self.learned, self.follow_up))

    # -- live changes (reactor thread) ------------------------------------------------------------

    def _interfaces_changed(self, mapping: InterfaceMap) -> None:
        networks = {group: networks_of(interfaces) for group, interfaces in mapping.items()}
        self.policy.current = self.policy.current.with_interface_networks(networks)
        for group, subnets in networks.items():
            self.metrics.interface_networks.labels(group).set(len(subnets))
        if self.egress is not None:
            self.egress.request_reconcile()  # a blocking group's sources may have changed

    def _resolve_for_learning(self, key: str, qtype: int) -> defer.Deferred[tuple[Iterable[IPAddress | str], float]]:
        """Ask the upstreams directly: no policy (the name is blocked) and no cache (it holds no sinkhole)."""
        message, question = wire.lookup_message(key, qtype, secrets.randbits(16))
        return self.upstreams.resolve(message, question).addCallback(_learnable)

    def _declare_series(self, config: Config, policy: Policy) -> None:
        self.metrics.declare(
            # An RPZ list's "zone" action is its triggers' own: those series appear when used.
            ((g.name, [(n, a) for n, a in g.list_actions.items() if a != "zone"]) for g in policy.groups.values()),
            (str(s) for s in config.upstream.servers),
        )

    def _record_upstream(self, upstream: str, result: str, seconds: float | None) -> None:
        self.metrics.upstream_requests.labels(upstream, result).inc()
        if seconds is not None:
            self.metrics.upstream_duration.labels(upstream).observe(seconds)

    def _record_reload(self, success: bool, duration: float) -> None:
        self.metrics.reloads.labels("success" if success else "failure").inc()
        self.metrics.reload_duration.observe(duration)
        if success:
            self.metrics.last_reload_success.set(time.time())
        if not self.reloader.pending:  # else another SIGHUP's build follows: still reloading
            self.notifier.ready(reload_status(success, self.reloader.state.errors))

    def _live_appliers(self) -> dict[str, Callable[[Any], None]]:
        """How each live key of blockd.settings reaches the object that uses it."""
        appliers: dict[str, Callable[[Any], None]] = {
            "upstream.servers": lambda value: setattr(self.upstreams, "servers", list(value)),
            "upstream.timeout": lambda value: setattr(self.upstreams, "timeout", value),
            "upstream.strategy": lambda value: setattr(self.upstreams, "strategy", value),
            "upstream.forward_ecs": lambda value: setattr(self.resolver, "forward_ecs", value),
            "cache.size": lambda value: setattr(self.cache, "size", value),
            "cache.min_ttl": lambda value: setattr(self.cache, "min_ttl", value),
            "cache.max_ttl": lambda value: setattr(self.cache, "max_ttl", value),
            "cache.max_bytes": lambda value: setattr(self.cache, "max_bytes", value),
            "cache.serve_stale": lambda value: setattr(self.cache, "serve_stale", value),
            "cache.stale_max": lambda value: setattr(self.cache, "stale_max", value),
            "cache.stale_ttl": lambda value: setattr(self.cache, "stale_ttl", value),
            "server.tcp_idle_timeout": lambda value: self._set_stream(idle_timeout=value),
            "server.tcp_max_connections": lambda value: self._set_stream(max_connections=value),
        }
        if set(appliers) != LIVE_KEYS:  # the settings table and this method must agree
            raise RuntimeError(f"live settings without an applier: {sorted(LIVE_KEYS ^ set(appliers))}")
        return appliers

    def _set_stream(self, **changes: Any) -> None:
        self.stream_factory.settings = dataclasses.replace(self.stream_factory.settings, **changes)

    def _apply(self, config: Config, policy: Policy) -> None:
        """A reload: swap in a validated policy (reactor thread) and the settings that change live."""
        for key in needs_restart(self.config, config):
            _log.warn("{key} changed: takes effect only after a restart", key=key)
        if self.egress is not None and not config.egress.enabled:
            # Disabling egress takes a restart: until then it keeps routing the last prefixes.
            policy = policy.with_egress_prefixes(self.policy.current.egress_prefixes)
        self._go_live(policy, config)
        for key, value in live_values(config):
            self._appliers[key](value)
        self.config = config
        _log_ignored_triggers(policy)

    def _go_live(self, policy: Policy, config: Config) -> None:
        """Swap in a validated policy: after a reload, or a list update (an applied transfer)."""
        serving = self.policy.current
        if self.interfaces is not None:
            # The build started from an older snapshot: carry the subnets known now.
            policy = policy.with_interface_networks(serving.interface_networks)
        self.policy.current = policy
        self._retire(serving, config)
        self._declare_series(config, policy)
        if self.egress is not None:
            self.egress.request_reconcile()
        if self.publisher is not None:
            self.publisher.policy_changed(policy)  # the published zones follow the snapshot that answers

    def _retire(self, retired: Policy, config: Config) -> None:
        """Free a replaced snapshot off the reactor thread, once no query can still use it.

        In-flight queries finish on the snapshot they started with; none outlives every upstream
        attempt (UDP then TCP, each with its timeout), so after that grace the snapshot is
        emptied in a worker thread in small steps (policy.dismantle).
        """
        grace = 5.0 + max(  # the old settings still time the queries already in flight
            2 * c.upstream.timeout * max(1, len(c.upstream.servers)) for c in (self.config, config)
        )

        def dismantle() -> None:
            # A query that outlived the grace (upstreams slower than the new timeout says) still
            # holds the snapshot: wait for it rather than empty the snapshot under it.
            # So does a rendering of the published zones (blockd.publish) that started from it.
            if self.resolver.in_flight.holds_policy(retired) or (
                self.publisher is not None and self.publisher.holds_policy(retired)
            ):
                self.reactor.callLater(grace, dismantle)
                return
            threads.deferToThread(policy_dismantle, retired, self.policy.current).addErrback(
                lambda failure: _log.failure("freeing the previous policy failed", failure)
            )

        self.reactor.callLater(grace, dismantle)

    # -- running ----------------------------------------------------------------------------------

    def sighup(self) -> None:
        """SIGHUP: reopen the query log (logrotate) and reload config and lists."""
        self.query_log.reopen()
        if self.dnstap is not None:
            self.dnstap.reopen()
        # Each SIGHUP is answered with its own RELOADING=1 (systemd 253's notify-reload matches
        # it to the signal it sent by MONOTONIC_USEC); READY=1 follows when the last build ends.
        self.notifier.reloading()
        self.reloader.request()

    def start(self) -> None:
        _log_ignored_triggers(self.policy.current)
        # The DNS listeners bind first, while blockd may still be root (port 53); root is then
        # dropped (server.user) before any other service opens a file or starts a thread.
        self.services.privilegedStartService()
        self._drop_privileges()
        self.services.startService()
        self.reloader.announce()  # a status file from an earlier process must not confuse `blockd reload`
        self.attach_egress()
        self.dns.opened.addCallback(self._serving)
        self._start_watchdog()

    def _drop_privileges(self) -> None:
        """Become server.user when started as root; StartupError naming the key otherwise."""
        server = self.config.server
        if server.user is None:
            if os.geteuid() == 0:
                _log.info("running as root: set server.user to drop root once the listeners are bound")
            return
        system = self.system if self.system is not None else privileges.LinuxSystem()
        # What the user must reach, found while root still sees every path.
        roots = privileges.module_roots(sys.modules.values(), sys.path)
        checks = privileges.existing(privileges.needed_access(self.config, self.config_path, roots), Path.exists)
        try:
            account = privileges.resolve(server.user, server.group)
            kept = privileges.kept_capabilities(self.config)
            if not privileges.drop_to(account, kept, system):
                return  # already that user (systemd's User=)
        except privileges.PrivilegeError as exc:
            raise StartupError(str(exc)) from None
        problems = privileges.access_problems(checks, os.access)
        if problems:
            raise StartupError(f"server.user: {account.user} cannot {'; '.join(problems)}")
        _log.info(
            "now running as {user}:{group}{caps}",
            user=account.user,
            group=account.group,
            caps=" with CAP_NET_ADMIN (egress)" if kept else " without capabilities",
        )

    def _start_watchdog(self) -> None:
        """WATCHDOG=1 from the reactor itself: a wedged reactor stops the pings and systemd restarts it."""
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is None or not self.notifier.enabled:
            return
        self.watchdog = task.LoopingCall(self.notifier.watchdog)  # never raises: the loop never stops
        self.watchdog.clock = self.reactor
        self.watchdog.start(interval, now=True)

    def attach_egress(self) -> None:
        """Start EgressService under the (running) netlink services: the one place it is attached.

        With interface-defined groups, only after their first read: its first reconcile must
        know the interface subnets, or it would remove their rules (left by the previous run)
        and unblock those networks for a moment.
        """
        if self.egress is None:
            return
        known = self.interfaces.ready if self.interfaces is not None else defer.succeed(None)
        known.addCallback(self._start_egress)

    def _start_egress(self, result: object) -> object:
        if self.netlink is not None and self.netlink.running and self.egress is not None:
            self.egress.setServiceParent(self.netlink)
        return result

    def _serving(self, _: object) -> None:
        # Everything built at start lives as long as the daemon: keep it out of the collector's
        # full passes, which otherwise scan it all (a 20-30 ms stall of the reactor) soon after
        # the first answers.
        gc.collect()
        gc.freeze()
        self.ready = True
        # From the running reactor: at start the listeners open before reactor.run(), which is
        # what then answers (and handles SIGTERM).
        listen = ", ".join(str(endpoint) for endpoint in self.config.server.listen)
        self.reactor.callLater(0, self.notifier.ready, f"serving on {listen}")

    def stop(self) -> defer.Deferred[object]:
        self.ready = False
        self.notifier.stopping()
        if self.watchdog is not None and self.watchdog.running:
            self.watchdog.stop()
        if not self.services.running:  # start failed before the services started: only listeners are open
            return defer.maybeDeferred(self.dns.stopService)
        return defer.maybeDeferred(self.services.stopService)


def stream_settings(config: Config) -> StreamSettings:
    """The TCP listener's bounds from server.tcp_* and limits.tcp_*."""
    return StreamSettings(
        idle_timeout=config.server.tcp_idle_timeout,
        max_connections=config.server.tcp_max_connections,
        message_timeout=config.limits.tcp_message_timeout,
        max_pending=config.limits.tcp_pipeline,
        write_buffer=config.limits.tcp_write_buffer,
    )


def reload_status(success: bool, errors: list[str]) -> str:
    """STATUS= after a reload: the outcome in one line (the journal has every error)."""
    if success:
        return "serving: reload succeeded"
    if not errors:
        return "serving the previous policy: reload refused"
    count = f" ({len(errors)} errors)" if len(errors) > 1 else ""
    return f"serving the previous policy: reload refused{count}: {errors[0]}"


def _log_ignored_triggers(policy: Policy) -> None:
    """Once per load: the RPZ triggers a forwarder cannot apply (reported, never an error)."""
    for name, listed in policy.lists.items():
        if note := listed.ignored_note():
            _log.info("list {name}: {note}", name=name, note=note)


def _learnable(answer: bytes) -> tuple[tuple[IPAddress, ...], float]:
    info = analyze(scrub(answer).answer)  # only the chain's addresses, as for a client's answer
    if info.rcode != wire.RCODE_NOERROR:
        return (), 0
    return info.addresses + info.hint_addresses, info.lifetime or 0


def run(path: Path | None) -> int:
    """`blockd run`: load the config and the first policy, build the daemon, serve until stopped."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        config = load_config(path)
        stored = load_stored_copies(config)  # transferred lists start from their last good copy
        policy = build_policy(config, transferred={name: copy.zone for name, copy in stored.items()})
    except (ConfigError, PolicyError) as exc:
        return _refuse(exc.errors)
    try:
        daemon = Daemon(reactor, config, policy, config_path=path, stored_zones=stored)
    except StartupError as exc:
        return _refuse([str(exc)])
    try:
        daemon.start()
    except StartupError as exc:
        print(f"blockd: {exc}", file=sys.stderr)
        daemon.stop()
        return 1
    # The handler runs on the main (reactor) thread between bytecodes; callFromThread defers the
    # work to the next loop iteration instead of running it inside whatever was interrupted.
    # twisted.internet.reactor is typed with the common interfaces only; ReactorBase also provides
    # IReactorThreads (where threads exist, which reloads need anyway).
    threaded = cast(IReactorThreads, reactor)
    signal.signal(signal.SIGHUP, lambda signum, frame: threaded.callFromThread(daemon.sighup))
    # Reloads build the new policy in a worker thread that holds the GIL for seconds; with the
    # default 5 ms switch interval each answer waits up to 5 ms twice (after epoll, after
    # sendto).  0.5 ms keeps answers flowing during a reload and costs nothing otherwise.
    sys.setswitchinterval(0.0005)
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stop)
    reactor.run()
    return 0


def _refuse(errors: list[str]) -> int:
    for line in errors:
        print(f"blockd: {line}", file=sys.stderr)
    print("blockd: refusing to start", file=sys.stderr)
    return 1
