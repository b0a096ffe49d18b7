"""The composition root: builds every part from the config and wires them to the reactor.

Constructors build; services start.  DNSService opens the listeners in startService and
closes them in stopService; nothing here is imported by the pure modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from blockd.config import Config, Endpoint
from blockd.metrics import Metrics
from blockd.policy import Policy
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

    def __init__(self, reactor: object, endpoints: tuple[Endpoint, ...], resolver: Resolver, config: Config):
        self.reactor = reactor
        self.endpoints = endpoints
        self.resolver = resolver
        self.config = config
        self.ports: list[object] = []

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        server = self.config.server
        factory = DNSStreamFactory(self.resolver, server.tcp_idle_timeout, server.tcp_max_connections, self.reactor)
        for endpoint in self.endpoints:
            try:
                self.ports.append(
                    self.reactor.listenUDP(
                        endpoint.port, DNSDatagramProtocol(self.resolver), interface=endpoint.host, maxPacketSize=65535
                    )
                )
                self.ports.append(self.reactor.listenTCP(endpoint.port, factory, interface=endpoint.host, backlog=128))
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(f"{os.getpid()}\n")
        temporary.replace(self.path)

    def stopService(self) -> None:  # noqa: N802 (Twisted API)
        super().stopService()
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


class Daemon:
    """Everything blockd runs, built from one config and one initial policy."""

    def __init__(self, reactor: object, config: Config, policy: Policy, metrics: Metrics | None = None):
        self.reactor = reactor
        self.config = config
        self.policy = PolicyHolder(policy)
        self.metrics = metrics or Metrics()
        self.upstreams = Upstreams(
            reactor, config.upstream.servers, config.upstream.timeout, record=self._record_upstream
        )
        self.resolver = Resolver(self.policy, self.upstreams, self.metrics)
        self.services = service.MultiService()
        if config.server.pidfile is not None:
            PidFile(config.server.pidfile).setServiceParent(self.services)
        DNSService(reactor, config.server.listen, self.resolver, config).setServiceParent(self.services)
        self._declare_series(policy)

    def _declare_series(self, policy: Policy) -> None:
        self.metrics.declare(
            ((g.name, g.list_actions.items()) for g in policy.groups.values()),
            (str(s) for s in self.config.upstream.servers),
        )

    def _record_upstream(self, upstream: str, result: str, seconds: float | None) -> None:
        self.metrics.upstream_requests.labels(upstream, result).inc()
        if seconds is not None:
            self.metrics.upstream_duration.labels(upstream).observe(seconds)

    def start(self) -> None:
        self.services.startService()

    def stop(self) -> defer.Deferred[object]:
        return defer.maybeDeferred(self.services.stopService)


__all__ = ["Callable", "DNSService", "Daemon", "PolicyHolder", "StartupError"]
