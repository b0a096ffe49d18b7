"""The composition root: builds every part from the config and wires them to the reactor.

Constructors build; services start.  The query path is assembled here, in one place:
DNS listeners -> Resolver (parse, classify, policy, forward) -> Upstreams, with the
policy snapshot behind one PolicyHolder that reloads swap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from blockd.admin import AdminService
from blockd.cache import AnswerCache
from blockd.config import Config, Endpoint
from blockd.metrics import CacheCollector, ListSizeCollector, Metrics, NullMetrics
from blockd.policy import Policy
from blockd.querylog import QueryLog
from blockd.reload import Reloader, build_for_reload, status_path_for
from blockd.resolver import Resolver
from blockd.server import DNSDatagramProtocol, DNSStreamFactory
from blockd.upstream import Upstreams

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
    """UDP and TCP listeners on every configured address."""

    def __init__(self, reactor: object, endpoints: tuple[Endpoint, ...], factory: DNSStreamFactory, resolver: Resolver):
        self.reactor = reactor
        self.endpoints = endpoints
        self.factory = factory
        self.resolver = resolver
        self.ports: list[object] = []

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


# Settings bound to sockets or files opened at start: a reload logs that they need a restart.
def _restart_only(config: Config) -> dict[str, object]:
    return {
        "server.listen": config.server.listen,
        "server.pidfile": config.server.pidfile,
        "metrics.listen": config.metrics.listen,
        "log.queries": config.log.queries,
        "log.path": config.log.path,
        "log.client_ip": config.log.client_ip,
    }


class Daemon:
    """Everything blockd runs, built from one config and one initial policy."""

    def __init__(self, reactor: object, config: Config, policy: Policy, config_path: Path | None = None):
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.policy = PolicyHolder(policy)
        self.ready = False
        self.metrics: Metrics = Metrics() if config.metrics.listen is not None else NullMetrics()
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
        self.resolver = Resolver(
            self.policy,
            self.upstreams,
            self.metrics,
            self.query_log,
            cache=self.cache,
            clock=reactor,
            forward_ecs=config.upstream.forward_ecs,
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
        # soon as the daemon answers; the query log before the listeners so no line is lost.
        self.services = service.MultiService()
        if config.server.pidfile is not None:
            PidFile(config.server.pidfile).setServiceParent(self.services)
        QueryLogService(self.query_log).setServiceParent(self.services)
        DNSService(reactor, config.server.listen, self.stream_factory, self.resolver).setServiceParent(self.services)
        if config.metrics.listen is not None:
            AdminService(reactor, config.metrics.listen, self.metrics.registry, lambda: self.ready).setServiceParent(
                self.services
            )
        self._declare_series(config, policy)
        self.metrics.last_reload_success.set(time.time())

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
        old, new = _restart_only(self.config), _restart_only(config)
        for key in old:
            if old[key] != new[key]:
                _log.warn("{key} changed: takes effect only after a restart", key=key)
        self.policy.current = policy
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

    def sighup(self) -> None:
        """SIGHUP: reopen the query log (logrotate) and reload config and lists."""
        self.query_log.reopen()
        self.reloader.request()

    def start(self) -> None:
        self.services.startService()
        self.ready = True

    def stop(self) -> defer.Deferred[object]:
        self.ready = False
        return defer.maybeDeferred(self.services.stopService)
