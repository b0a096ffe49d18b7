"""Forwarding to upstream resolvers over UDP, with TCP when the answer is truncated.

Hygiene as in twisted.names.client and every serious forwarder: each query goes out with a
fresh random ID from a fresh socket (the kernel picks a random source port) connected to the
upstream, so only that address can answer; an answer counts only if its ID, QR bit and
question match.  Upstreams are tried in order, one timeout per attempt; when every one has
failed the caller answers SERVFAIL.
"""

from __future__ import annotations

import errno
import secrets
import socket
import struct
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol, cast

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IConnector, IDelayedCall, IReadDescriptor, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from blockd.config import Endpoint
from blockd.framing import FrameReader, frame
from blockd.wire import FLAG_QR, FLAG_TC

MAX_UDP_ANSWER = 65535

_log = Logger()


class TCPClientReactor(Protocol):
    """What a TCP client of blockd's uses of the reactor: IReactorTCP and IReactorTime, in part."""

    def connectTCP(  # noqa: N802 (Twisted API)
        self,
        host: str,
        port: int,
        factory: protocol.ClientFactory,
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,  # noqa: N803 (Twisted API)
    ) -> IConnector: ...

    def callLater(  # noqa: N802 (Twisted API)
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...

    def seconds(self) -> float: ...


class UpstreamReactor(TCPClientReactor, Protocol):
    """What Upstreams uses of the reactor: IReactorFDSet too, for its UDP sockets."""

    def addReader(self, reader: IReadDescriptor) -> None: ...  # noqa: N802 (Twisted API)

    def removeReader(self, reader: IReadDescriptor) -> None: ...  # noqa: N802 (Twisted API)


# (upstream host, port, transport, the query as sent, when (ns), its answer or None)
ForwarderTap = Callable[[str, int, str, bytes, int, "bytes | None"], None]


class UpstreamError(Exception):
    """Every upstream failed for this query."""


class _Failed(Exception):
    def __init__(self, result: str):
        super().__init__(result)
        self.result = result


def answer_matches(answer: bytes, query_id: int, question: bytes) -> bool:
    """An upstream answer belongs to our query: same ID, QR set, one question equal to ours.

    The name is compared case-insensitively (DNS names are), type and class exactly.
    """
    if len(answer) < 12 + len(question):
        return False
    answer_id, flags, qdcount = struct.unpack_from("!HHH", answer)
    if answer_id != query_id or not flags & FLAG_QR or qdcount != 1:
        return False
    end = 12 + len(question)
    # The name ignoring case; type and class exactly (lowercasing them would alias 65 and 97).
    return answer[12 : end - 4].lower() == question[:-4].lower() and answer[end - 4 : end] == question[-4:]


@implementer(IReadDescriptor)
class _UDPAttempt:
    """One query on its own connected UDP socket, read by the reactor.

    A bare socket rather than reactor.listenUDP: a listening port per query would log two
    lines per query and cost more than the query itself.
    """

    def __init__(self, server: Endpoint, query_id: int, question: bytes, on_mismatch: Callable[[], None]):
        self.query_id = query_id
        self.question = question
        self.on_mismatch = on_mismatch
        self.deferred: defer.Deferred[bytes] = defer.Deferred()
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        # Connected: the kernel drops datagrams from any other address and reports ICMP errors.
        self.socket.connect((server.host, server.port))

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted API)
        return "blockd-upstream"

    def doRead(self) -> None:  # noqa: N802 (Twisted API)
        for _ in range(16):
            try:
                data = self.socket.recv(MAX_UDP_ANSWER)
            except BlockingIOError:
                return
            except OSError as exc:
                if not self.deferred.called:
                    refused = exc.errno == errno.ECONNREFUSED
                    self.deferred.errback(_Failed("refused" if refused else "error"))
                return
            if self.deferred.called:
                return
            if not answer_matches(data, self.query_id, self.question):
                self.on_mismatch()  # forged or stale: ignore it and keep waiting
                continue
            self.deferred.callback(data)
            return

    def connectionLost(self, reason: object) -> None:  # noqa: N802 (Twisted API)
        self.socket.close()


class _TCPAttempt(protocol.Protocol):
    def __init__(self, message: bytes, query_id: int, question: bytes, deferred: defer.Deferred[bytes]):
        self.message = message
        self.query_id = query_id
        self.question = question
        self.deferred = deferred
        self.frames = FrameReader()

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None  # makeConnection sets it first
        self.transport.write(frame(self.message))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        for answer in self.frames.feed(data):
            if answer_matches(answer, self.query_id, self.question) and not self.deferred.called:
                self.deferred.callback(answer)
                assert self.transport is not None  # data arrives only on a connection
                self.transport.loseConnection()
                return

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted API)
        if not self.deferred.called:
            self.deferred.errback(_Failed("error"))


class _TCPAttemptFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, attempt: _TCPAttempt):
        self.attempt = attempt

    def buildProtocol(self, addr: object) -> _TCPAttempt:  # noqa: N802 (Twisted API)
        return self.attempt

    def clientConnectionFailed(self, connector: object, reason: object) -> None:  # noqa: N802 (Twisted API)
        if not self.attempt.deferred.called:
            self.attempt.deferred.errback(_Failed("refused"))


class Upstreams:
    """Sends queries to the configured resolvers, in order, until one answers."""

    def __init__(
        self,
        reactor: UpstreamReactor,
        servers: Sequence[Endpoint],
        timeout: float,
        record: Callable[[str, str, float | None], None] = lambda upstream, result, seconds: None,
        max_in_flight: int = 4096,
        tap: ForwarderTap | None = None,
    ):
        self.reactor = reactor
        self.servers = list(servers)
        self.timeout = timeout
        self.record = record
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.tap = tap  # dnstap's FORWARDER_QUERY/RESPONSE: every exchange, with its wire messages

    @defer.inlineCallbacks
    def resolve(self, message: bytes, question: bytes) -> Generator[defer.Deferred[bytes], bytes, bytes]:
        """Forward a query (its ID is replaced); the answer carries the upstream's ID.

        Raises UpstreamError when every upstream failed or blockd is at its in-flight limit.
        """
        if self.in_flight >= self.max_in_flight:
            raise UpstreamError("too many queries in flight")
        self.in_flight += 1
        try:
            for server in self.servers:
                name = str(server)
                started = time.monotonic()
                try:
                    answer = yield self._exchange(self._udp, "udp", server, message, question)
                    if struct.unpack_from("!H", answer, 2)[0] & FLAG_TC:
                        self.record(name, "truncated", None)
                        answer = yield self._exchange(self._tcp, "tcp", server, message, question)
                except _Failed as failed:
                    self.record(name, failed.result, None)
                    continue
                self.record(name, "success", time.monotonic() - started)
                return answer
            raise UpstreamError("no upstream answered")
        finally:
            self.in_flight -= 1

    def _exchange(
        self,
        send: Callable[[Endpoint, bytes, int, bytes], defer.Deferred[bytes]],
        transport: str,
        server: Endpoint,
        message: bytes,
        question: bytes,
    ) -> defer.Deferred[bytes]:
        """One attempt with a fresh random ID, reported to the tap when one is set."""
        query_id = secrets.randbits(16)
        outgoing = struct.pack("!H", query_id) + message[2:]
        tap = self.tap
        if tap is None:
            return send(server, outgoing, query_id, question)
        sent_ns = time.time_ns()

        def report(result: bytes | Failure) -> bytes | Failure:
            answer = result if isinstance(result, bytes) else None
            tap(server.host, server.port, transport, outgoing, sent_ns, answer)
            return result

        return send(server, outgoing, query_id, question).addBoth(report)

    def _udp(self, server: Endpoint, outgoing: bytes, query_id: int, question: bytes) -> defer.Deferred[bytes]:
        try:
            attempt = _UDPAttempt(server, query_id, question, lambda: self.record(str(server), "mismatch", None))
        except OSError as exc:
            _log.warn("upstream {server}: cannot open a socket: {error}", server=str(server), error=exc)
            return defer.fail(_Failed("error"))
        try:
            attempt.socket.send(outgoing)
        except OSError as exc:
            attempt.socket.close()
            refused = exc.errno == errno.ECONNREFUSED
            return defer.fail(_Failed("refused" if refused else "error"))
        self.reactor.addReader(attempt)

        def close() -> None:
            self.reactor.removeReader(attempt)
            attempt.socket.close()

        return self._with_timeout(attempt.deferred, close)

    def _tcp(self, server: Endpoint, outgoing: bytes, query_id: int, question: bytes) -> defer.Deferred[bytes]:
        deferred: defer.Deferred[bytes] = defer.Deferred()
        attempt = _TCPAttempt(outgoing, query_id, question, deferred)
        connector = self.reactor.connectTCP(server.host, server.port, _TCPAttemptFactory(attempt), timeout=self.timeout)

        def close() -> None:
            if attempt.transport is not None:
                # connectTCP's transport is a tcp.Client: an ITCPTransport.
                cast(ITCPTransport, attempt.transport).abortConnection()
            else:
                connector.stopConnecting()

        return self._with_timeout(deferred, close)

    def _with_timeout(self, deferred: defer.Deferred[bytes], cleanup: Callable[[], object]) -> defer.Deferred[bytes]:
        def expire() -> None:
            if not deferred.called:
                deferred.errback(_Failed("timeout"))

        timer = self.reactor.callLater(self.timeout, expire)

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - cleanup of a finished attempt must never mask its result
                pass
            return result

        return deferred.addBoth(done)
