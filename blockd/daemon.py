"""The composition root: builds every part from the config and wires them to the reactor.

Constructors build; services start.  The query path is assembled here, in one place:
DNS listeners -> Resolver (parse, classify, policy, forward) -> Upstreams, with the
policy snapshot behind one PolicyHolder that reloads swap.

The netlink side is built only when the config needs it ([egress] enabled, or a group defined
by interfaces/VLANs), and only then is blockd.netlink (pyroute2) imported:
  InterfaceNetworks -> with_interface_networks() swaps the snapshot when subnets change;
  Resolver.on_answer -> EgressService.learn for answers to names a blocking group blocks;
  Resolver.on_blocked_question -> FollowUpLookups -> Upstreams (no policy, no cache) -> learn;
  reload, interface changes, timer and netlink rule/route events -> EgressService reconcile.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from blockd import wire
from blockd.admin import AdminService
from blockd.cache import AnswerCache
from blockd.config import Config, Endpoint
from blockd.egress import EgressSettings, LearnedAddresses, NetlinkChange
from blockd.egress_service import EgressService, FollowUpLookups
from blockd.interface_groups import InterfaceMap, InterfaceNetworks, InterfaceSelector, networks_of
from blockd.metrics import CacheCollector, EgressCollector, EgressMetrics, ListSizeCollector, Metrics, NullMetrics
from blockd.netlink_services import EgressAdapter, NetlinkServices, Runner, ThreadRunner, Watcher
from blockd.policy import Group, Policy, Verdict
from blockd.policy import dismantle as policy_dismantle
from blockd.prefix_table import IPAddress, IPNetwork
from blockd.querylog import QueryLog
from blockd.reload import Reloader, build_for_reload, status_path_for
from blockd.resolver import Resolver
from blockd.server import DNSDatagramProtocol, DNSStreamFactory
from blockd.upstream import Upstreams
from blockd.upstream_answer import AnswerInfo, analyze

_log = Logger()


class PolicyHolder:
    """The one reference to the serving policy; swapping it is a single assignment."""

    def __init__(self, policy: Policy):
        self.current = policy

    def __call__(self) -> Policy:
        return self.current


class StartupError(Exception):
    pass


class DNSService(service.Service):
    """UDP and TCP listeners on every configured address.

    gate: returns a Deferred to wait for before reading (the first read of interface-defined
    groups), or None.  The sockets are bound at start either way, so a port in use is still a
    start-up error; queries arriving meanwhile wait in the socket buffers, never answered as
    "no group".  `opened` fires once the listeners read.
    """

    def __init__(
        self,
        reactor: object,
        endpoints: tuple[Endpoint, ...],
        factory: DNSStreamFactory,
        resolver: Resolver,
        gate: Callable[[], defer.Deferred[None] | None] | None = None,
    ):
        self.reactor = reactor
        self.endpoints = endpoints
        self.factory = factory
        self.resolver = resolver
        self.gate = gate
        self.ports: list[Any] = []
        self.opened: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        for endpoint in self.endpoints:
            try:
                self.ports.append(
                    self.reactor.listenUDP(
                        endpoint.port, DNSDatagramProtocol(self.resolver), interface=endpoint.host, maxPacketSize=65535
                    )
                )
                self.ports.append(self.reactor.listenTCP(endpoint.port, self.factory, interface=endpoint.host))
            except CannotListenError as exc:
                raise StartupError(f"server.listen: cannot listen on {endpoint}: {exc.socketError}") from None
            _log.info("listening for DNS on {endpoint} (UDP and TCP)", endpoint=str(endpoint))
        waiting = self.gate() if self.gate is not None else None
        if waiting is None or waiting.called:
            self.opened.callback(None)
            return
        for port in self.ports:
            port.stopReading()
        waiting.addCallback(self._open)

    def _open(self, result: object) -> object:
        if self.running:
            for port in self.ports:
                port.startReading()
            self.opened.callback(None)
        return result

    def stopService(self) -> defer.Deferred[object]:  # noqa: N802 (Twisted API)
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


class PidFile(service.Service):
    def __init__(self, path: Path):
        self.path = path

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(f"{os.getpid()}\n")
            temporary.replace(self.path)
        except OSError as exc:
            raise StartupError(f"server.pidfile: cannot write {self.path}: {exc.strerror}") from None

    def stopService(self) -> None:  # noqa: N802 (Twisted API)
        super().stopService()
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


class QueryLogService(service.Service):
    def __init__(self, query_log: QueryLog):
        self.query_log = query_log

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self.query_log.start()

    def stopService(self) -> None:  # noqa: N802 (Twisted API)
        super().stopService()
        self.query_log.stop()


# Settings bound to sockets, files or services built at start: a reload logs that they need a
# restart and keeps the running values.  (egress.prefixes reload: they live in the snapshot.)
_RESTART_ONLY_EGRESS = (
    "table", "rule_priority", "route_protocol", "on_exit", "learn", "learn_min_ttl", "learn_max",
    "never", "reconcile_interval",
)  # fmt: skip


def _restart_only(config: Config, egress_running: bool) -> dict[str, object]:
    return {
        "server.listen": config.server.listen,
        "server.pidfile": config.server.pidfile,
        "metrics.listen": config.metrics.listen,
        "log.queries": config.log.queries,
        "log.path": config.log.path,
        "log.client_ip": config.log.client_ip,
        "egress.enabled": config.egress.enabled,
        **({f"egress.{key}": getattr(config.egress, key) for key in _RESTART_ONLY_EGRESS} if egress_running else {}),
        "groups.*.interfaces/vlans": _interface_selectors(config),
    }


def _interface_selectors(config: Config) -> dict[str, InterfaceSelector]:
    """The groups defined (also) by interfaces or VLAN ids, and which."""
    return {
        group.name: InterfaceSelector(tuple(group.interfaces), tuple(group.vlans))
        for group in config.groups.values()
        if group.interfaces or group.vlans
    }


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


class Daemon:
    """Everything blockd runs, built from one config and one initial policy."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        policy: Policy,
        config_path: Path | None = None,
        netlink: Callable[[Any, EgressSettings], NetlinkParts] = real_netlink,
    ):
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.policy = PolicyHolder(policy)
        self.ready = False
        self.metrics: Metrics = Metrics() if config.metrics.listen is not None else NullMetrics()
        # Egress runs with the settings it started with; see _restart_only.
        self.egress_settings = config.egress
        self.egress_prefixes = policy.egress_prefixes
        self.interface_networks: dict[str, tuple[IPNetwork, ...]] = {}
        self.netlink: NetlinkServices | None = None
        self.egress: EgressService | None = None
        self.learned: LearnedAddresses | None = None
        self.follow_up: FollowUpLookups | None = None
        self.interfaces: InterfaceNetworks | None = None
        self.metrics.registry.register(
            ListSizeCollector(lambda: {name: len(lst.domains) for name, lst in self.policy().lists.items()})
        )
        self.upstreams = Upstreams(
            reactor, config.upstream.servers, config.upstream.timeout, record=self._record_upstream
        )
        self.query_log = QueryLog(
            config.log.queries,
            config.log.path,
            config.log.client_ip,
            on_error=self.metrics.query_log_errors.inc,
            on_drop=self.metrics.query_log_dropped.inc,
            on_line=self.metrics.query_log_lines.inc,
        )
        self.cache = AnswerCache(config.cache.size, config.cache.min_ttl, config.cache.max_ttl)
        self.metrics.registry.register(CacheCollector(self.cache))
        self._build_netlink(netlink)
        # Egress hooks only when they do something: the query path stays as short as it was.
        hooks: dict[str, Any] = {}
        if self.egress is not None and self.egress_settings.learn:
            hooks = {"on_answer": self._on_answer, "on_blocked_question": self._on_blocked_question}
        self.resolver = Resolver(
            self.policy,
            self.upstreams,
            self.metrics,
            self.query_log,
            cache=self.cache,
            forward_ecs=config.upstream.forward_ecs,
            **hooks,
        )
        self.stream_factory = DNSStreamFactory(
            self.resolver, config.server.tcp_idle_timeout, config.server.tcp_max_connections, reactor
        )
        self.reloader = Reloader(
            current=self.policy,
            build=lambda previous: build_for_reload(self.config_path, previous),
            apply=self._apply,
            on_result=self._record_reload,
            status_path=status_path_for(config.server.pidfile) if config.server.pidfile else None,
        )

        # Start order matters: the pidfile (and reload status) first so `blockd reload` works as
        # soon as the daemon answers; the query log before the listeners so no line is lost;
        # netlink before the listeners, which read only once interface-defined groups are known
        # (and stop before egress, which may remove its routes on exit).
        self.services = service.MultiService()
        if config.server.pidfile is not None:
            PidFile(config.server.pidfile).setServiceParent(self.services)
        QueryLogService(self.query_log).setServiceParent(self.services)
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
        if config.metrics.listen is not None:
            AdminService(reactor, config.metrics.listen, self.metrics.registry, lambda: self.ready).setServiceParent(
                self.services
            )
        self._declare_series(config, policy)
        self.metrics.last_reload_success.set(time.time())

    def _build_netlink(self, parts: Callable[[Any, EgressSettings], NetlinkParts]) -> None:
        settings = self.egress_settings
        selectors = _interface_selectors(self.config)
        if not settings.enabled and not selectors:
            return
        adapter, runner, watcher_factory = parts(self.reactor, settings)
        self.netlink = NetlinkServices(self.reactor, runner, adapter, watcher_factory)
        if settings.enabled:
            self.learned = LearnedAddresses.from_settings(settings)
            egress_metrics = EgressMetrics(self.metrics.registry)
            self.egress = EgressService(
                self.reactor,
                settings,
                adapter,
                blocking_networks=lambda: self.policy.current.blocking_networks(),  # incl. interface subnets
                static_prefixes=lambda: self.egress_prefixes,
                learned=self.learned,
                runner=runner,
                record=egress_metrics.record,
            )
            if not selectors:
                self.egress.setServiceParent(self.netlink)
            if settings.learn:
                # Learned routes live at least learn_min_ttl: looking a name up again sooner than
                # half of that could only refresh them.
                self.follow_up = FollowUpLookups(
                    self.reactor, self._resolve_for_learning, self.egress.learn, min_interval=settings.learn_min_ttl / 2
                )
            self.metrics.registry.register(EgressCollector(self.learned, self.follow_up))
        if selectors:
            for group in selectors:
                self.metrics.interface_networks.labels(group)
            self.interfaces = InterfaceNetworks(self.reactor, adapter, runner, selectors, self._interfaces_changed)
            self.interfaces.setServiceParent(self.netlink)
            # EgressService joins them once the first read is done: see start().
        parts_built = []
        if self.egress is not None:
            parts_built.append(f"egress (table {settings.table}, learning {'on' if settings.learn else 'off'})")
        if selectors:
            parts_built.append(f"interface-defined groups ({', '.join(sorted(selectors))})")
        _log.info("netlink: {what}", what=" and ".join(parts_built))

    # -- egress and interface groups (reactor thread) ---------------------------------------------

    def _interfaces_changed(self, mapping: InterfaceMap) -> None:
        networks = {group: networks_of(interfaces) for group, interfaces in mapping.items()}
        self.interface_networks = networks
        self.policy.current = self.policy.current.with_interface_networks(networks)
        for group, subnets in networks.items():
            self.metrics.interface_networks.labels(group).set(len(subnets))
        if self.egress is not None:
            self.egress.request_reconcile()  # a blocking group's sources may have changed

    def _on_answer(self, info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None:
        """Every upstream answer: learn its addresses when a blocking group blocks one of its names."""
        if info.rcode != wire.RCODE_NOERROR:
            return
        addresses = info.addresses + info.hint_addresses
        if addresses and self.policy.current.blocks_for_any_blocking_group(info.names):
            self.egress.learn(addresses, ttl=info.lifetime or 0)  # type: ignore[union-attr]

    def _on_blocked_question(self, key: str, verdict: Verdict) -> None:
        # The device got no address from us, but may hold one from elsewhere: find it ourselves.
        self.follow_up.request(key)  # type: ignore[union-attr]

    def _resolve_for_learning(self, key: str, qtype: int) -> defer.Deferred[tuple[Iterable[IPAddress], float]]:
        """Ask the upstreams directly: no policy (the name is blocked) and no cache (it holds no sinkhole)."""
        message, question = wire.lookup_message(key, qtype, secrets.randbits(16))
        return self.upstreams.resolve(message, question).addCallback(_learnable)

    def _declare_series(self, config: Config, policy: Policy) -> None:
        self.metrics.declare(
            ((g.name, g.list_actions.items()) for g in policy.groups.values()),
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

    def _apply(self, config: Config, policy: Policy) -> None:
        """Swap in a validated policy (reactor thread) and the settings that can change live."""
        running = self.egress is not None
        old, new = _restart_only(self.config, running), _restart_only(config, running)
        for key in old:
            if old[key] != new[key]:
                _log.warn("{key} changed: takes effect only after a restart", key=key)
        if self.interfaces is not None:
            # The build started from an older snapshot: carry the subnets known now.
            policy = policy.with_interface_networks(self.interface_networks)
        retired, self.policy.current = self.policy.current, policy
        self._retire(retired, config)
        self.upstreams.servers = list(config.upstream.servers)
        self.upstreams.timeout = config.upstream.timeout
        self.resolver.forward_ecs = config.upstream.forward_ecs
        self.cache.size, self.cache.min_ttl, self.cache.max_ttl = (
            config.cache.size,
            config.cache.min_ttl,
            config.cache.max_ttl,
        )
        self.stream_factory.idle_timeout = config.server.tcp_idle_timeout
        self.stream_factory.max_connections = config.server.tcp_max_connections
        self.config = config
        self._declare_series(config, policy)
        if self.egress is not None:
            if config.egress.enabled:  # disabling egress takes a restart: keep routing the last prefixes
                self.egress_prefixes = policy.egress_prefixes
            self.egress.request_reconcile()

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
            if any(asker.policy is retired for askers in self.resolver.in_flight.values() for asker in askers):
                self.reactor.callLater(grace, dismantle)
                return
            threads.deferToThread(policy_dismantle, retired, self.policy.current).addErrback(
                lambda failure: _log.failure("freeing the previous policy failed", failure)
            )

        self.reactor.callLater(grace, dismantle)

    def sighup(self) -> None:
        """SIGHUP: reopen the query log (logrotate) and reload config and lists."""
        self.query_log.reopen()
        self.reloader.request()

    def start(self) -> None:
        self.services.startService()
        self.reloader.announce()  # a status file from an earlier process must not confuse `blockd reload`
        self.start_egress_when_interfaces_known()
        self.dns.opened.addCallback(self._serving)

    def start_egress_when_interfaces_known(self) -> None:
        """With interface-defined groups, EgressService starts after their first read (netlink running)."""
        if self.egress is not None and self.interfaces is not None:
            # Its first reconcile must know the interface subnets, or it would remove their
            # rules (left by the previous run) and unblock those networks for a moment.
            self.interfaces.ready.addCallback(self._start_egress)

    def _start_egress(self, result: object) -> object:
        if self.netlink is not None and self.netlink.running and self.egress is not None:
            self.egress.setServiceParent(self.netlink)
        return result

    def _serving(self, _: object) -> None:
        self.ready = True

    def stop(self) -> defer.Deferred[object]:
        self.ready = False
        return defer.maybeDeferred(self.services.stopService)


def _learnable(answer: bytes) -> tuple[tuple[IPAddress, ...], float]:
    info = analyze(answer)
    if info.rcode != wire.RCODE_NOERROR:
        return (), 0
    return info.addresses + info.hint_addresses, info.lifetime or 0
