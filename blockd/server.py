"""DNS listeners: UDP datagrams and TCP streams (RFC 7766) feeding the Resolver.

The server writes every answer exactly once.  TCP clients may pipeline several queries on one
connection; answers go back as they complete (RFC 7766 6.2.1.1 allows any order).  An idle
connection is closed after `server.tcp_idle_timeout`, never while one of its queries is
still being answered.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from blockd.framing import FrameReader, frame
from blockd.resolver import Resolver

_log = Logger()
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


class StreamTransport(Protocol):
    """A TCP connection's transport as DNSStreamProtocol uses it: ITCPTransport and IPushProducer
    (tcp.Server; a StringTransport in tests)."""

    @property
    def connected(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...  # noqa: N802 (Twisted API)

    def abortConnection(self) -> None: ...  # noqa: N802 (Twisted API)

    def getPeer(self) -> IPv4Address | IPv6Address: ...  # noqa: N802 (Twisted API)

    def pauseProducing(self) -> None: ...  # noqa: N802 (Twisted API)

    def resumeProducing(self) -> None: ...  # noqa: N802 (Twisted API)


class DNSDatagramProtocol(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, resolver: Resolver):
        self.resolver = resolver

    def startProtocol(self) -> None:  # noqa: N802 (Twisted API)
        transport = self.transport
        assert transport is not None  # makeConnection sets it first
        sock = getattr(transport, "socket", None)
        # Answers go straight to the socket: Port.write re-validates the address on every
        # datagram, which costs more than building a blocked answer.
        self._sendto: Callable[[bytes, tuple[Any, ...]], object] = sock.sendto if sock is not None else transport.write
        # A deep receive queue absorbs bursts instead of dropping them in the kernel.
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        except OSError:
            pass

    def datagramReceived(self, data: bytes, addr: tuple[Any, ...]) -> None:  # noqa: N802 (Twisted API)
        try:
            result = self.resolver.handle(data, addr[0], "udp", addr[1])
        except Exception:  # noqa: BLE001 - one bad packet must never stop the listener
            _log.failure("query from {client} failed", client=addr[0])
            return
        if result is None:
            return
        if isinstance(result, bytes):
            self._send(result, addr)
        else:
            result.addCallback(self._send, addr)
            result.addErrback(lambda failure: _log.failure("answer to {client} failed", failure, client=addr[0]))

    def _send(self, answer: bytes | None, addr: tuple[Any, ...]) -> None:
        if answer is None:
            return
        try:
            self._sendto(answer, addr)
        except BlockingIOError:
            self.resolver.metrics.count_drop("send_error")  # send buffer full: UDP may drop
        except OSError as exc:
            self.resolver.metrics.count_drop("send_error")
            _log.warn("cannot send answer to {client}: {error}", client=addr[0], error=exc)


class DNSStreamProtocol(protocol.Protocol, TimeoutMixin):
    max_pending = 64  # per connection; beyond this we stop reading until answers go out

    def __init__(self, factory: DNSStreamFactory):
        self.factory = factory
        self.frames = FrameReader()
        self.pending = 0
        self.paused = False
        self.client = ""
        self.port = 0

    @property
    def _stream(self) -> StreamTransport:
        """The transport, once connected, as the TCP connection it is (ITransport declares too little)."""
        assert self.transport is not None, "not connected"
        return cast(StreamTransport, self.transport)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # noqa: N802 (Twisted API)
        """TimeoutMixin's timer, on the factory's clock (injectable for tests)."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        peer = self._stream.getPeer()
        self.client, self.port = peer.host, peer.port
        self.factory.connections += 1
        if self.factory.connections > self.factory.max_connections:
            self._stream.abortConnection()
            return
        self.setTimeout(self.factory.idle_timeout)

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted API)
        self.factory.connections -= 1
        self.setTimeout(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.resetTimeout()
        for message in self.frames.feed(data):
            self._answer(message)
        if self.pending >= self.max_pending and not self.paused:
            self.paused = True
            self._stream.pauseProducing()

    def _answer(self, message: bytes) -> None:
        try:
            result = self.factory.resolver.handle(message, self.client, "tcp", self.port)
        except Exception:  # noqa: BLE001 - one bad query must never kill the connection handler
            _log.failure("query from {client} failed", client=self.client)
            return
        if result is None:
            return
        if isinstance(result, bytes):
            self._write(result)
            return
        self.pending += 1
        result.addCallback(self._write)
        result.addErrback(lambda failure: _log.failure("answer to {client} failed", failure, client=self.client))
        result.addBoth(self._done)

    def _done(self, _: object) -> None:
        self.pending -= 1
        if self.paused and self.pending < self.max_pending:
            self.paused = False
            self._stream.resumeProducing()
        self.resetTimeout()

    def _write(self, answer: bytes | None) -> None:
        if answer is not None and self.transport is not None:
            transport = cast(StreamTransport, self.transport)
            if transport.connected:
                transport.write(frame(answer))

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted API)
        if self.pending:
            # A query still being answered keeps the connection open.  TimeoutMixin has already
            # dropped its timer when this runs, so re-arm it (resetTimeout would be a no-op).
            self.setTimeout(self.factory.idle_timeout)
            return
        self._stream.loseConnection()


class DNSStreamFactory(protocol.ServerFactory):
    noisy = False

    def __init__(
        self, resolver: Resolver, idle_timeout: float, max_connections: int, clock: IReactorTime | None = None
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.resolver = resolver
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = 0

    def buildProtocol(self, addr: object) -> DNSStreamProtocol:  # noqa: N802 (Twisted API)
        return DNSStreamProtocol(self)


__all__ = ["DNSDatagramProtocol", "DNSStreamFactory", "DNSStreamProtocol"]
