"""The admin HTTP listener: /metrics (Prometheus text format), /healthz and /explain.

Config: [metrics] listen = "127.0.0.1:9553" (loopback by default; empty turns it off).
/healthz answers 200 once the lists are loaded and the DNS listeners are up, 503 before.
/explain?name=NAME[&client=IP][&qtype=TYPE] answers `blockd explain` from the running policy,
as JSON (blockd.explain): 200, or 400 with {"error": ...} for a bad name, client or type.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.web import http, resource, server

from blockd.config import Endpoint
from blockd.explain import ExplainError, explain, parse_qtype
from blockd.policy import Policy
from blockd.services import StartupError, TCPListenReactor


class HealthResource(resource.Resource):
    isLeaf = True  # noqa: N815 (Twisted API)

    def __init__(self, ready: Callable[[], bool]):
        super().__init__()
        self.ready = ready

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802 (Twisted API)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.ready():
            return b"ok\n"
        request.setResponseCode(503)
        return b"starting\n"


class ExplainResource(resource.Resource):
    isLeaf = True  # noqa: N815 (Twisted API)

    def __init__(self, policy: Callable[[], Policy]):
        super().__init__()
        self.policy = policy

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802 (Twisted API)
        request.setHeader(b"content-type", b"application/json")
        args: dict[bytes, list[bytes]] = request.args or {}

        def arg(key: bytes, default: str) -> str:
            values = args.get(key)
            return values[0].decode("utf-8", "replace") if values else default

        try:
            found = explain(
                self.policy(), arg(b"name", ""), arg(b"client", "127.0.0.1"), parse_qtype(arg(b"qtype", "A"))
            )
        except ExplainError as exc:
            request.setResponseCode(400)
            return json.dumps({"error": str(exc)}).encode() + b"\n"
        return json.dumps(found.as_dict()).encode() + b"\n"


class QuietSite(server.Site):
    """A Site without an access log: scrapes every few seconds would flood it."""

    noisy = False

    def log(self, request: http.Request) -> None:
        return None


class AdminService(service.Service):
    def __init__(
        self,
        reactor: TCPListenReactor,
        endpoint: Endpoint,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        policy: Callable[[], Policy],
    ):
        self.reactor = reactor
        self.endpoint = endpoint
        root = resource.Resource()
        root.putChild(b"metrics", MetricsResource(registry))
        root.putChild(b"healthz", HealthResource(ready))
        root.putChild(b"explain", ExplainResource(policy))
        self.site = QuietSite(root)
        self.port: IListeningPort | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        try:
            self.port = self.reactor.listenTCP(self.endpoint.port, self.site, interface=self.endpoint.host)
        except CannotListenError as exc:
            raise StartupError(f"metrics.listen: cannot listen on {self.endpoint}: {exc.socketError}") from None

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802 (Twisted API)
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
