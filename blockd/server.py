"""DNS listeners: UDP datagrams and TCP streams (RFC 7766) feeding the Resolver.

The server writes every answer exactly once.  TCP clients may pipeline several queries on one
connection; answers go back as they complete (RFC 7766 6.2.1.1 allows any order).  An idle
connection is closed after `server.tcp_idle_timeout`, never while one of its queries is
still being answered.  An exception on the query path answers that query SERVFAIL (or FORMERR)
through Resolver.failed, which counts it and logs it without a traceback per packet.
"""

from __future__ import annotations

import socket
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from blockd.framing import FrameReader, frame
from blockd.limits import ClientLimits
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
        except Exception as exc:  # noqa: BLE001 - one bad packet must never stop the listener
            result = self.resolver.failed(data, addr[0], exc)
        if result is None:
            return
        if isinstance(result, bytes):
            self._send(result, addr)
        else:
            result.addErrback(lambda failure: self.resolver.failed(data, addr[0], failure.value))
            result.addCallback(self._send, addr)

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


@dataclass(frozen=True)
class StreamSettings:
    """The TCP listener's bounds (server.tcp_*, limits.tcp_*)."""

    idle_timeout: float = 10.0  # from the last complete message or answer
    max_connections: int = 1000  # all clients; at the cap the oldest idle connection makes room
    message_timeout: float = 5.0  # from a message's first byte to its last
    max_pending: int = 64  # unanswered queries per connection; beyond it reading stops
    write_buffer: int = 262_144  # answer bytes held for a client that does not read, then closed
    batch: int = 64  # messages answered per reactor turn per connection (fairness)


class DNSStreamProtocol(protocol.Protocol):
    """One DNS-over-TCP connection (RFC 7766), bounded so that it cannot be held open or used to
    fill memory: idle timeout from the last complete message (not the last byte), a deadline for
    each message once its first byte arrives, a bound on unanswered pipelined queries, reading
    paused while the client does not read its answers (the transport's write buffer is full),
    and at most `batch` messages per reactor turn so one connection cannot starve the others."""

    def __init__(self, factory: DNSStreamFactory):
        self.factory = factory
        self.frames = FrameReader()
        self.backlog: deque[bytes] = deque()  # complete messages not yet answered
        self.pending = 0  # queries being answered (forwarded)
        self.client = ""
        self.port = 0
        self.limit_key: str | None = None  # the per-client TCP slot held (blockd.limits)
        self.counted = False  # in the factory's connection count
        self.closing = False
        self._reading = True
        self._client_stalled = False  # the transport's write buffer is full: the client does not read
        self._written_while_stalled = 0
        self._idle: IDelayedCall | None = None
        self._message_deadline: IDelayedCall | None = None
        self._wakeup: IDelayedCall | None = None

    @property
    def _stream(self) -> StreamTransport:
        """The transport, once connected, as the TCP connection it is (ITransport declares too little)."""
        assert self.transport is not None, "not connected"
        return cast(StreamTransport, self.transport)

    @property
    def settings(self) -> StreamSettings:
        return self.factory.settings  # replaced whole by a reload of server.tcp_*

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        peer = self._stream.getPeer()
        self.client, self.port = peer.host, peer.port
        if not self.factory.admit(self):
            self.closing = True
            self._stream.abortConnection()
            return
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:  # the transport pauses us when the client stops reading
            register(self, True)
        self._arm_idle()

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted API)
        self.closing = True
        for timer in (self._idle, self._message_deadline, self._wakeup):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._message_deadline = self._wakeup = None
        self.backlog.clear()
        self.factory.release(self)

    def _close(self, reason: str) -> None:
        """End the connection now (a limit was hit), counted by reason."""
        if self.closing:
            return
        self.closing = True
        self.factory.count(reason)
        self.backlog.clear()
        self._stream.abortConnection()

    # -- IPushProducer: the transport's write buffer is full, or drained --------------------------

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted API)
        self._client_stalled = True
        self._update_reading()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted API)
        self._client_stalled = False
        self._written_while_stalled = 0
        self._work()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted API)
        self.closing = True

    # -- reading --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.closing:
            return
        messages = self.frames.feed(data)
        if messages:
            self.backlog.extend(messages)
            self._arm_idle()
        self._watch_message()
        self._work()

    def _watch_message(self) -> None:
        """A deadline for the message being received, from its first byte."""
        partial = self.frames.buffered > 0
        deadline = self._message_deadline
        if partial and deadline is None:
            self._message_deadline = self.factory.clock.callLater(
                self.settings.message_timeout, self._close, "tcp_message_timeout"
            )
        elif not partial and deadline is not None:
            if deadline.active():
                deadline.cancel()
            self._message_deadline = None

    def _work(self) -> None:
        """Answer what is waiting, within the bounds; then read on, or not."""
        if self.closing:
            return
        answered = 0
        while self.backlog and self.pending < self.settings.max_pending and not self._client_stalled:
            if answered >= self.settings.batch:  # the rest on a later turn, after other clients
                self._wake_in(0.0)
                break
            wait = self.factory.throttle(self.client)
            if wait > 0.0:
                self.factory.count("tcp_throttled")
                self._wake_in(wait)
                break
            message = self.backlog.popleft()
            if not message:  # RFC 7766 has no use for it; a flood of them costs CPU for nothing
                self._close("tcp_empty_frame")
                return
            answered += 1
            self._answer(message)
            if self.closing:
                return
        self._update_reading()
        self.factory.activity(self)

    def _wake_in(self, delay: float) -> None:
        if self._wakeup is None or not self._wakeup.active():
            self._wakeup = self.factory.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._wakeup = None
        self._work()

    def _update_reading(self) -> None:
        """Read from the socket only while the answers keep up: nothing waiting, not too many
        unanswered, the client reading its answers, not throttled."""
        want = not self.backlog and self.pending < self.settings.max_pending and not self._client_stalled
        if want == self._reading or self.closing:
            return
        self._reading = want
        if want:
            self._stream.resumeProducing()
        else:
            self._stream.pauseProducing()

    @property
    def idle(self) -> bool:
        """Nothing asked and unanswered, and no message half-received."""
        return not self.pending and not self.backlog and self.frames.buffered == 0

    # -- answering ------------------------------------------------------------------------------

    def _answer(self, message: bytes) -> None:
        resolver = self.factory.resolver
        try:
            result = resolver.handle(message, self.client, "tcp", self.port)
        except Exception as exc:  # noqa: BLE001 - one bad query must never kill the connection handler
            result = resolver.failed(message, self.client, exc)
        if result is None:
            return
        if isinstance(result, bytes):
            self._write(result)
            return
        self.pending += 1
        result.addErrback(lambda failure: resolver.failed(message, self.client, failure.value))
        result.addCallback(self._write)
        result.addBoth(self._done)

    def _done(self, _: object) -> None:
        self.pending -= 1
        if self.closing:
            return
        self._arm_idle()
        self._work()

    def _write(self, answer: bytes | None) -> None:
        if answer is None or self.closing or self.transport is None:
            return
        transport = cast(StreamTransport, self.transport)
        if not transport.connected:
            return
        if self._client_stalled:
            self._written_while_stalled += len(answer) + 2
            if self._written_while_stalled > self.settings.write_buffer:
                self._close("tcp_write_buffer")
                return
        transport.write(frame(answer))

    # -- idle timeout ---------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.settings.idle_timeout)
        else:
            self._idle = self.factory.clock.callLater(self.settings.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.closing:
            return
        if self.pending or self.backlog:
            # A query still being answered keeps the connection open.
            self._arm_idle()
            return
        self.closing = True
        self._stream.loseConnection()


class DNSStreamFactory(protocol.ServerFactory):
    """Builds the TCP connections and holds what they share: the caps on connections, for all
    clients and per client, and the choice of which idle connection makes room for a new one."""

    noisy = False

    def __init__(
        self,
        resolver: Resolver,
        settings: StreamSettings,
        limits: ClientLimits | None = None,
        clock: IReactorTime | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = cast(IReactorTime, clock)
        self.resolver = resolver
        self.settings = settings
        self.limits = limits
        self.connections = 0
        # Connections with nothing unanswered, least recently active first: the first to go
        # when a new client needs the slot (a held-open connection cannot lock others out).
        self._idle: OrderedDict[DNSStreamProtocol, None] = OrderedDict()

    def buildProtocol(self, addr: object) -> DNSStreamProtocol:  # noqa: N802 (Twisted API)
        return DNSStreamProtocol(self)

    def count(self, reason: str) -> None:
        self.resolver.metrics.count_limited(reason)

    def admit(self, connection: DNSStreamProtocol) -> bool:
        """Whether a new connection may stay: within its client's cap, and within the global cap,
        closing the longest-idle connection if that makes room."""
        if self.limits is not None:
            key = self.limits.open_tcp(connection.client, self.resolver.client_kind(connection.client))
            if key is None:
                self.count("tcp_connections")
                return False
            connection.limit_key = key
        if self.connections >= self.settings.max_connections:
            if not self._idle:
                self.count("tcp_full")
                self._give_back(connection)
                return False
            oldest, _ = self._idle.popitem(last=False)
            self.count("tcp_evicted")
            oldest.closing = True
            oldest._stream.abortConnection()
        self.connections += 1
        connection.counted = True
        self._idle[connection] = None
        return True

    def release(self, connection: DNSStreamProtocol) -> None:
        self._idle.pop(connection, None)
        if connection.counted:
            connection.counted = False
            self.connections -= 1
        self._give_back(connection)

    def _give_back(self, connection: DNSStreamProtocol) -> None:
        if connection.limit_key is not None and self.limits is not None:
            self.limits.close_tcp(connection.limit_key)
            connection.limit_key = None

    def activity(self, connection: DNSStreamProtocol) -> None:
        """After a connection did something: idle ones go to the back of the eviction order."""
        if connection.closing:
            return
        if connection.idle:
            self._idle.pop(connection, None)
            self._idle[connection] = None
        else:
            self._idle.pop(connection, None)

    def throttle(self, client: str) -> float:
        """0 to answer a TCP query from this client now, else seconds to wait (its rate limit)."""
        if self.limits is None:
            return 0.0
        # The resolver's clock, as for UDP queries: one bucket, one time base (not the reactor's wall clock).
        now = self.resolver.clock.seconds()
        return self.limits.tcp_wait(client, self.resolver.client_kind(client), now)


__all__ = ["DNSDatagramProtocol", "DNSStreamFactory", "DNSStreamProtocol", "StreamSettings"]
