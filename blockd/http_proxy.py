"""Downloads through an HTTP proxy: a CONNECT tunnel (RFC 9110 section 9.3.6) for the agent.

Config: [lists.X] proxy = "http://host:port" (blockd.config; blockd.url_lists builds the agent
with Agent.usingEndpointFactory(TunnelEndpointFactory(...))).  Every download, http:// or
https://, goes through a tunnel: the proxy is asked `CONNECT host:port`, and on a 2xx answer the
connection carries the request as if it were made directly (TLS, for https, is end to end with
the server: the proxy sees neither the list nor the certificate check).  A proxy that refuses
(any other status) or closes fails the download ("network").  No proxy authentication.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

_MAX_ANSWER = 16 * 1024  # of the proxy's CONNECT answer headers


class ProxyRefused(Exception):
    """The proxy did not open the tunnel."""


class _Tunnel(protocol.Protocol):
    """Asks for the tunnel, then hands every byte to the wrapped (TLS or HTTP) protocol."""

    def __init__(self, target: bytes, wrapping: Any, tunnel_ready: defer.Deferred[Any]):
        self.target = target
        self.wrapping = wrapping
        self.tunnel_ready = tunnel_ready
        self.buffer = b""
        self.wrapped: protocol.Protocol | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None
        self.transport.write(b"CONNECT " + self.target + b" HTTP/1.1\r\nHost: " + self.target + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_ANSWER:
                self._refuse("an over-long answer to CONNECT")
            return
        first = self.buffer.split(b"\r\n", 1)[0]
        status = first.split(b" ", 2)
        if len(status) < 2 or not status[1].startswith(b"2") or not status[0].startswith(b"HTTP/"):
            self._refuse(f"the proxy answered CONNECT with {first[:80]!r}")
            return
        rest, self.buffer = self.buffer[end + 4 :], b""
        assert self.transport is not None
        wrapped = self.wrapping.buildProtocol(self.transport.getPeer())
        assert wrapped is not None
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        inner = getattr(wrapped, "wrappedProtocol", wrapped)  # the HTTP protocol inside TLS
        self.tunnel_ready.callback(inner)
        if rest:
            wrapped.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        if not self.tunnel_ready.called:
            self.tunnel_ready.errback(ProxyRefused(why))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802 (Twisted API)
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self.tunnel_ready.called:
            self.tunnel_ready.errback(ProxyRefused(f"the proxy closed the connection ({reason.getErrorMessage()})"))


class _TunnelEndpoint:
    def __init__(self, proxy: HostnameEndpoint, target: bytes, tls: Any | None):
        self.proxy = proxy
        self.target = target
        self.tls = tls  # an IOpenSSLClientConnectionCreator for https, None for http

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        connected: defer.Deferred[Any] = defer.Deferred()
        wrapping: Any = TLSMemoryBIOFactory(self.tls, True, factory) if self.tls is not None else factory
        tunnel_factory = protocol.Factory.forProtocol(lambda: _Tunnel(self.target, wrapping, connected))
        opened = self.proxy.connect(tunnel_factory)
        opened.addErrback(lambda failure: connected.errback(failure) if not connected.called else None)
        return connected


@implementer(IAgentEndpointFactory)
class TunnelEndpointFactory:
    """Endpoints that reach every URI through a CONNECT tunnel of the proxy host:port."""

    def __init__(self, reactor: Any, host: str, port: int, tls_policy: IPolicyForHTTPS, timeout: float):
        self.proxy = HostnameEndpoint(reactor, host, port, timeout=timeout)
        self.tls_policy = tls_policy

    def endpointForURI(self, uri: Any) -> _TunnelEndpoint:  # noqa: N802 (Twisted API)
        target = uri.host + b":" + str(uri.port).encode()
        tls = self.tls_policy.creatorForNetloc(uri.host, uri.port) if uri.scheme == b"https" else None
        return _TunnelEndpoint(self.proxy, target, tls)


__all__ = ["ProxyRefused", "TunnelEndpointFactory"]
