"""Forwarding to upstream resolvers over UDP, with TCP when the answer is truncated.

Which upstreams a query goes to, and when, is blockd.upstream_health's (per-upstream rtt, rto,
failures, down and probing; the `[upstream] strategy`); this module is its I/O:

  one deadline  a client query gets `[upstream] timeout` in all: when every upstream has failed,
                or the deadline passes, UpstreamError (the client's SERVFAIL) at or before it,
                whatever the number of upstreams
  attempts      each upstream's answer is awaited until the deadline; after the upstream's rto
                (at least 50 ms, less if needed to leave each upstream still to ask its share of
                the time) without one, or at once when it fails (ICMP port unreachable, a socket
                error, a SERVFAIL or REFUSED answer), the next upstream is asked too.
                The first usable answer wins; if all answered SERVFAIL/REFUSED, the last such
                answer is returned.  Attempts still out after the winner keep running to the
                deadline, so their outcome (a late answer, a loss) still reaches the health state
  probes        a down upstream gets `. NS` in the background (rate bounded by upstream_health)
                until it answers again
  sockets       a pool per upstream of at most POOL_SIZE connected UDP sockets (so only that
                address can answer, and ICMP errors reach us), many queries multiplexed on each
                by ID, IDs unique per socket; a socket is retired after SOCKET_QUERIES queries or
                SOCKET_LIFETIME seconds, and closed once its last query has ended, so source
                ports keep changing (each new socket gets a random one from the kernel) while
                file descriptors stay bounded (2 x POOL_SIZE per upstream) whatever the load
  hygiene       a fresh random ID per attempt; an answer counts only if its ID, QR bit and
                question match (answer_matches); anything else is a "mismatch"

Why ICMP port unreachable used to look like a timeout: on a connected UDP socket the kernel
reports it as a pending socket error, which epoll signals as EPOLLERR without EPOLLIN; Twisted's
reactor then does not call doRead but connectionLost.  _PooledSocket.connectionLost reads
SO_ERROR and fails that socket's queries as "refused" at once.

`record(upstream, result, seconds)` sees every attempt's outcome (blockd_upstream_requests_total:
success, timeout, refused, error, truncated, mismatch, servfail, refused_rcode) and `tap` every
exchange (dnstap FORWARDER_QUERY/RESPONSE).  Up/down per upstream: Upstreams.up().
"""

from __future__ import annotations

import errno
import random
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IConnector, IDelayedCall, IReadDescriptor, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from blockd.config import Endpoint
from blockd.framing import FrameReader, frame
from blockd.upstream_health import Plan, UpstreamHealth
from blockd.wire import FLAG_QR, FLAG_TC

MAX_UDP_ANSWER = 65535
POOL_SIZE = 16  # sockets per upstream (measured: see the README's Configuration, upstream)
SOCKET_QUERIES = 1000  # queries sent on a socket before it is retired
SOCKET_LIFETIME = 60.0  # seconds before a socket is retired, however quiet
MAX_PENDING = 1024  # queries out on one socket (of 65,536 IDs: a random free one is found at once)
RCVBUF = 1 << 20  # bytes asked for each socket's receive buffer
READS_PER_WAKEUP = 64  # datagrams read per doRead, so one busy socket cannot hog the reactor
RCODE_SERVFAIL = 2
RCODE_REFUSED = 5
# `. NS`, recursion desired: what CoreDNS's forward probes with; any recursive resolver has it cached.
PROBE_QUERY = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", 2, 1)

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
Record = Callable[[str, str, "float | None"], None]


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


# -- the socket pool -------------------------------------------------------------------------------


@implementer(IReadDescriptor)
class _PooledSocket:
    """One connected UDP socket to one upstream, carrying many queries told apart by ID.

    A bare socket rather than reactor.listenUDP: a listening port logs lines of its own, and
    the pool needs the connected socket's ICMP errors, which listenUDP would swallow.
    """

    def __init__(self, pool: _SocketPool, now: float):
        self.pool = pool
        family = socket.AF_INET6 if ":" in pool.server.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.socket.setblocking(False)
            # Answers to up to MAX_PENDING queries can arrive in one burst; the kernel caps this
            # at net.core.rmem_max (208 KiB by default: ~270 answers, which the pool's size covers).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            # Connected: the kernel drops datagrams from any other address and reports ICMP errors.
            self.socket.connect((pool.server.host, pool.server.port))
        except OSError:
            self.socket.close()
            raise
        self.pending: dict[int, _Attempt] = {}
        self.ended: OrderedDict[int, None] = OrderedDict()  # IDs given up on: their late answers are no forgery
        self.sent = 0
        self.born = now
        self.closed = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted API)
        return "blockd-upstream"

    def due(self, now: float) -> bool:
        return self.sent >= self.pool.socket_queries or now - self.born >= self.pool.socket_lifetime

    def register(self, attempt: _Attempt) -> int:
        for _ in range(32):
            query_id = secrets.randbits(16)
            if query_id not in self.pending:
                self.pending[query_id] = attempt
                self.ended.pop(query_id, None)
                self.sent += 1
                return query_id
        raise _Failed("error")  # not reached with MAX_PENDING of 65,536 IDs taken

    def forget(self, query_id: int) -> None:
        """The attempt with this ID ended without an answer (deadline)."""
        if self.pending.pop(query_id, None) is not None:
            self.ended[query_id] = None
            if len(self.ended) > MAX_PENDING:
                self.ended.popitem(last=False)
        self.pool.drained(self)

    def doRead(self) -> None:  # noqa: N802 (Twisted API)
        for _ in range(READS_PER_WAKEUP):
            if self.closed:
                return
            try:
                data = self.socket.recv(MAX_UDP_ANSWER)
            except BlockingIOError:
                return
            except OSError as exc:
                self.broken(exc.errno or 0)
                return
            query_id = struct.unpack_from("!H", data)[0] if len(data) >= 2 else -1
            attempt = self.pending.get(query_id)
            if attempt is None or not answer_matches(data, query_id, attempt.question):
                if query_id not in self.ended:  # forged, or for another question: keep waiting
                    self.pool.record(self.pool.name, "mismatch", None)
                continue
            del self.pending[query_id]
            try:
                attempt.udp_answer(data)
            except Exception:  # noqa: BLE001 - the reactor would drop this socket, failing its other queries
                _log.failure("handling an answer from {upstream} failed", upstream=self.pool.name)
            self.pool.drained(self)

    def connectionLost(self, reason: object) -> None:  # noqa: N802 (Twisted API)
        # The reactor saw EPOLLERR with nothing to read (it has removed us already): the
        # pending socket error is the ICMP error of one of our queries.
        if self.closed:
            return
        try:
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            code = exc.errno or 0
        self.broken(code)

    def broken(self, code: int) -> None:
        """A socket error: every query on this socket gets it, and the socket is replaced."""
        result = "refused" if code == errno.ECONNREFUSED else "error"
        pending = list(self.pending.values())
        self.pending.clear()
        self.pool.discard(self)
        for attempt in pending:
            attempt.udp_failed(result)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.reactor.removeReader(self)
            self.socket.close()


class _SocketPool:
    """The UDP sockets to one upstream: at most `size` in use, and at most `size` retiring."""

    def __init__(self, owner: Upstreams, server: Endpoint):
        self.owner = owner
        self.reactor = owner.reactor
        self.server = server
        self.name = str(server)
        self.size = owner.pool_size
        self.socket_queries = owner.socket_queries
        self.socket_lifetime = owner.socket_lifetime
        self.active: list[_PooledSocket] = []
        self.retiring: set[_PooledSocket] = set()
        self.closing = False

    def record(self, upstream: str, result: str, seconds: float | None) -> None:
        self.owner.record(upstream, result, seconds)

    def send(self, attempt: _Attempt, message: bytes) -> tuple[_PooledSocket, int, bytes]:
        """Send message (its ID replaced) for attempt; raises _Failed when it cannot go out."""
        sock = self._pick(self.reactor.seconds())
        query_id = sock.register(attempt)
        outgoing = struct.pack("!H", query_id) + message[2:]
        try:
            sock.socket.send(outgoing)
        except BlockingIOError:
            del sock.pending[query_id]
            raise _Failed("error") from None
        except OSError as exc:
            # A pending error from an earlier query's ICMP: it concerns this socket's queries.
            del sock.pending[query_id]
            sock.broken(exc.errno or 0)
            raise _Failed("refused" if exc.errno == errno.ECONNREFUSED else "error") from None
        return sock, query_id, outgoing

    def _pick(self, now: float) -> _PooledSocket:
        if len(self.active) < self.size:
            return self._open(now)
        sock = self.active[random.randrange(len(self.active))]
        if sock.due(now) and len(self.retiring) < self.size:
            self._retire(sock)
            return self._open(now)
        if len(sock.pending) >= MAX_PENDING:
            roomy = [s for s in self.active if len(s.pending) < MAX_PENDING]
            if not roomy:
                raise _Failed("error")
            sock = random.choice(roomy)
        return sock

    def _open(self, now: float) -> _PooledSocket:
        try:
            sock = _PooledSocket(self, now)
        except OSError as exc:
            _log.warn("upstream {upstream}: cannot open a socket: {error}", upstream=self.name, error=exc)
            raise _Failed("error") from None
        self.active.append(sock)
        self.reactor.addReader(sock)
        return sock

    def _retire(self, sock: _PooledSocket) -> None:
        self.active.remove(sock)
        if sock.pending:
            self.retiring.add(sock)  # closed when its last query ends
        else:
            sock.close()

    def drained(self, sock: _PooledSocket) -> None:
        if not sock.pending and (sock in self.retiring or self.closing):
            self.retiring.discard(sock)
            if sock in self.active:
                self.active.remove(sock)
            sock.close()

    def discard(self, sock: _PooledSocket) -> None:
        if sock in self.active:
            self.active.remove(sock)
        self.retiring.discard(sock)
        sock.close()

    def retire_all(self) -> None:
        """The upstream left the config: close each socket once its queries have ended."""
        self.closing = True
        for sock in list(self.active):
            self._retire(sock)

    def sockets(self) -> int:
        return len(self.active) + len(self.retiring)


# -- one attempt: one upstream, UDP then TCP on truncation -----------------------------------------


class _Listener(Protocol):
    """Who started an attempt: a client query, or a probe."""

    deadline: float
    done: bool  # nobody waits for the answer itself any more (its outcome still counts)

    def settled(self, attempt: _Attempt, answer: bytes | None, usable: bool) -> None: ...

    def lost(self, attempt: _Attempt) -> None: ...


class _Attempt:
    """One upstream asked for one query, until it answers, fails, or the deadline passes."""

    def __init__(self, owner: Upstreams, listener: _Listener, server: Endpoint, message: bytes, question: bytes):
        self.owner = owner
        self.listener = listener
        self.server = server
        self.name = str(server)
        self.message = message
        self.question = question
        self.started = 0.0
        self.rto = 0.0
        self.was_lost = False
        self.done = False
        self.soft: IDelayedCall | None = None
        self.udp: tuple[_PooledSocket, int, bytes] | None = None
        self.sent_ns = 0
        self.tcp: _TCPAttempt | None = None
        self.connector: IConnector | None = None

    def start(self, left: int = 0) -> bool:
        """Send it; False when it failed at once (recorded, and counted against the upstream).

        left: the upstreams the query may still ask, this one included (0: none after it, as
        for a probe).  The next is asked after this one's rto, or sooner so that each of them
        gets its share of the time to the deadline.
        """
        owner = self.owner
        self.started = owner.reactor.seconds()
        pool = owner.pool(self.server)
        try:
            self.udp = pool.send(self, self.message)
        except _Failed as failed:
            self._end(failed.result, None, health=failed.result)
            return False
        self.sent_ns = time.time_ns() if owner.tap is not None else 0
        self.rto = owner.health.attempt_timeout(self.name)
        if left > 1:
            self.rto = min(self.rto, (self.listener.deadline - self.started) / left)
        if left > 1 or (left == 1 and self.started + self.rto < self.listener.deadline):
            self.soft = owner.reactor.callLater(self.rto, self._lose)
        return True

    def _lose(self) -> None:
        self.soft = None
        if self.done:
            return
        self.was_lost = True
        self.owner.lost(self.name, self.rto)
        self.listener.lost(self)

    def udp_answer(self, answer: bytes) -> None:
        if self.done or self.udp is None:
            return
        self._tap("udp", self.udp[2], answer)
        flags = struct.unpack_from("!H", answer, 2)[0]
        if flags & FLAG_TC:
            self.owner.answered(self.name, self.owner.reactor.seconds() - self.started)
            if self.listener.done:  # answered by another upstream already: no TCP for nothing
                self._end("truncated", None)
                return
            self.owner.record(self.name, "truncated", None)
            self._cancel_soft()  # the upstream answers: no reason to ask the next one yet
            self._start_tcp()
            return
        self._answer(answer)

    def udp_failed(self, result: str) -> None:
        if self.done or self.udp is None:
            return
        self._tap("udp", self.udp[2], None)
        self._end(result, None, health=result)

    def _answer(self, answer: bytes) -> None:
        rcode = struct.unpack_from("!H", answer, 2)[0] & 0x0F
        if rcode in (RCODE_SERVFAIL, RCODE_REFUSED):
            self._end("servfail" if rcode == RCODE_SERVFAIL else "refused_rcode", answer, health="servfail")
            return
        seconds = max(0.0, self.owner.reactor.seconds() - self.started)
        self.owner.answered(self.name, seconds)
        self._end("success", answer, seconds=seconds)

    def _start_tcp(self) -> None:
        query_id = secrets.randbits(16)
        outgoing = struct.pack("!H", query_id) + self.message[2:]
        self.sent_ns = time.time_ns() if self.owner.tap is not None else 0
        self.tcp = _TCPAttempt(self, outgoing, query_id)
        remaining = max(self.listener.deadline - self.owner.reactor.seconds(), 0.001)
        self.connector = self.owner.reactor.connectTCP(
            self.server.host, self.server.port, _TCPAttemptFactory(self.tcp), timeout=remaining
        )

    def tcp_answer(self, answer: bytes) -> None:
        if self.done or self.tcp is None:
            return
        self._tap("tcp", self.tcp.message, answer)
        self._close_tcp()
        self._answer(answer)

    def tcp_failed(self, result: str) -> None:
        if self.done or self.tcp is None:
            return
        self._tap("tcp", self.tcp.message, None)
        self._close_tcp()
        self._end(result, None)  # UDP works: a TCP failure does not make the upstream unhealthy

    def expire(self) -> None:
        """The deadline passed with no answer."""
        if self.done:
            return
        if self.tcp is not None:
            self._tap("tcp", self.tcp.message, None)
            self._close_tcp()
            self._end("timeout", None)
            return
        if self.udp is not None:
            sock, query_id, outgoing = self.udp
            self._tap("udp", outgoing, None)
            sock.forget(query_id)
        if not self.was_lost:
            self.owner.lost(self.name, self.rto)
        self._end("timeout", None)

    def _end(self, result: str, answer: bytes | None, seconds: float | None = None, health: str = "") -> None:
        self.done = True
        self._cancel_soft()
        self.owner.record(self.name, result, seconds)
        if health:
            self.owner.failed(self.name, health)
        self.listener.settled(self, answer, result == "success")

    def _cancel_soft(self) -> None:
        if self.soft is not None and self.soft.active():
            self.soft.cancel()
        self.soft = None

    def _close_tcp(self) -> None:
        tcp, self.tcp = self.tcp, None
        try:
            if tcp is not None and tcp.transport is not None:
                # connectTCP's transport is a tcp.Client: an ITCPTransport.
                cast(ITCPTransport, tcp.transport).abortConnection()
            elif self.connector is not None:
                self.connector.stopConnecting()
        except Exception:  # noqa: BLE001 - closing a finished attempt must never mask its result
            pass
        self.connector = None

    def _tap(self, transport: str, outgoing: bytes, answer: bytes | None) -> None:
        tap = self.owner.tap
        if tap is not None:
            tap(self.server.host, self.server.port, transport, outgoing, self.sent_ns, answer)


class _TCPAttempt(protocol.Protocol):
    def __init__(self, attempt: _Attempt, message: bytes, query_id: int):
        self.attempt = attempt
        self.message = message
        self.query_id = query_id
        self.frames = FrameReader()
        self.finished = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None  # makeConnection sets it first
        self.transport.write(frame(self.message))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        for answer in self.frames.feed(data):
            if not self.finished and answer_matches(answer, self.query_id, self.attempt.question):
                self.finished = True
                self.attempt.tcp_answer(answer)
                return

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted API)
        if not self.finished:
            self.finished = True
            self.attempt.tcp_failed("error")


class _TCPAttemptFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, attempt: _TCPAttempt):
        self.attempt = attempt

    def buildProtocol(self, addr: object) -> _TCPAttempt:  # noqa: N802 (Twisted API)
        return self.attempt

    def clientConnectionFailed(self, connector: object, reason: object) -> None:  # noqa: N802 (Twisted API)
        if not self.attempt.finished:
            self.attempt.finished = True
            self.attempt.attempt.tcp_failed("refused")


# -- a client query, and a probe -------------------------------------------------------------------


class _Query:
    """One client query: the plan's upstreams, asked one after another (or two at once), one deadline."""

    def __init__(self, owner: Upstreams, message: bytes, question: bytes, plan: Plan, timeout: float):
        self.owner = owner
        self.message = message
        self.question = question
        self.order = plan.order
        self.next = 0
        self.deadline = owner.reactor.seconds() + timeout
        self.out: set[_Attempt] = set()
        self.fallback: bytes | None = None  # the last SERVFAIL/REFUSED answer
        self.deferred: defer.Deferred[bytes] = defer.Deferred()
        self.done = False
        self.timer = owner.reactor.callLater(timeout, self._expire)
        for _ in range(plan.fanout):
            self._ask_next()
        self._check()

    def _ask_next(self) -> None:
        while self.next < len(self.order) and not self.done:
            server = self.owner.server_named(self.order[self.next])
            self.next += 1
            if server is None:  # removed by a reload since the plan was made
                continue
            attempt = _Attempt(self.owner, self, server, self.message, self.question)
            self.out.add(attempt)
            attempt.start(len(self.order) - self.next + 1)  # on failure, settled() asked the next one
            return

    def lost(self, attempt: _Attempt) -> None:
        if not self.done:
            self._ask_next()

    def settled(self, attempt: _Attempt, answer: bytes | None, usable: bool) -> None:
        self.out.discard(attempt)
        if self.done:
            self._stragglers_done()
            return
        if usable and answer is not None:
            self._finish(answer)
            return
        if answer is not None:
            self.fallback = answer
        self._ask_next()
        self._check()

    def _check(self) -> None:
        if not self.done and not self.out and self.next >= len(self.order):
            self._finish(None)

    def _finish(self, answer: bytes | None) -> None:
        self.done = True
        self.owner.in_flight -= 1
        self._stragglers_done()
        answer = answer if answer is not None else self.fallback
        if answer is not None:
            self.deferred.callback(answer)
        else:
            self.deferred.errback(UpstreamError("no upstream answered"))

    def _stragglers_done(self) -> None:
        if not self.out and self.timer.active():
            self.timer.cancel()

    def _expire(self) -> None:
        for attempt in list(self.out):
            attempt.expire()
        if not self.done:
            self._finish(None)


class _Probe:
    """`. NS` to a down upstream, in the background: does it answer again?"""

    def __init__(self, owner: Upstreams, server: Endpoint):
        self.owner = owner
        self.name = str(server)
        self.deadline = owner.reactor.seconds() + owner.timeout
        self.done = True  # only whether it answers matters, not what (a TC answer is enough)
        self.attempt = _Attempt(owner, self, server, PROBE_QUERY, PROBE_QUERY[12:])
        self.timer: IDelayedCall | None = None
        if self.attempt.start():
            self.timer = owner.reactor.callLater(owner.timeout, self.attempt.expire)

    def lost(self, attempt: _Attempt) -> None:
        return None  # no soft timeout for a probe

    def settled(self, attempt: _Attempt, answer: bytes | None, usable: bool) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not usable:
            self.owner.probe_failed(self.name)


# -- the client ------------------------------------------------------------------------------------


class Upstreams:
    """Sends queries to the configured resolvers, by strategy and health, until one answers."""

    def __init__(
        self,
        reactor: UpstreamReactor,
        servers: Sequence[Endpoint],
        timeout: float,
        record: Record = lambda upstream, result, seconds: None,
        max_in_flight: int = 4096,
        tap: ForwarderTap | None = None,
        strategy: str = "ordered",
        pool_size: int = POOL_SIZE,
        socket_queries: int = SOCKET_QUERIES,
        socket_lifetime: float = SOCKET_LIFETIME,
        rng: random.Random | None = None,
    ):
        self.reactor = reactor
        self.record = record
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # client queries not yet answered (attempts outliving them not counted)
        self.tap = tap  # dnstap's FORWARDER_QUERY/RESPONSE: every exchange, with its wire messages
        self.strategy = strategy
        self.pool_size = pool_size
        self.socket_queries = socket_queries
        self.socket_lifetime = socket_lifetime
        self._timeout = timeout
        self._servers: list[Endpoint] = []
        self._by_name: dict[str, Endpoint] = {}
        self._pools: dict[Endpoint, _SocketPool] = {}
        self._draining: list[_SocketPool] = []  # of upstreams removed by a reload
        self.health = UpstreamHealth((), timeout, rng or random.Random())
        self._probe_timer: IDelayedCall | None = None
        self.servers = list(servers)

    # Both are live keys (blockd.settings): the daemon's appliers assign them on reload.
    @property
    def servers(self) -> list[Endpoint]:
        return self._servers

    @servers.setter
    def servers(self, servers: Sequence[Endpoint]) -> None:
        self._servers = list(servers)
        self._by_name = {str(s): s for s in self._servers}
        self.health.configure(self._by_name)
        for server in [s for s in self._pools if s not in self._servers]:
            pool = self._pools.pop(server)
            pool.retire_all()
            self._draining.append(pool)

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float) -> None:
        self._timeout = timeout
        self.health.max_rto = timeout

    def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]:
        """Forward a query (its ID is replaced); the answer carries the upstream's ID.

        Fails with UpstreamError when every upstream failed, the deadline passed, or blockd is
        at its in-flight limit.
        """
        if self.in_flight >= self.max_in_flight:
            return defer.fail(UpstreamError("too many queries in flight"))
        if not self._servers:
            return defer.fail(UpstreamError("no upstream configured"))
        self.in_flight += 1
        return _Query(self, message, question, self.health.plan(self.strategy), self._timeout).deferred

    def up(self) -> dict[str, bool]:
        """Each configured upstream: up (True) or down and being probed (False)."""
        return {name: self.health.is_up(name) for name in self._by_name}

    def open_sockets(self) -> int:
        self._draining = [pool for pool in self._draining if pool.sockets()]
        return sum(pool.sockets() for pool in [*self._pools.values(), *self._draining])

    def close(self) -> None:
        """Stop probing and close every socket (queries still out fail at their deadline)."""
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        for pool in [*self._pools.values(), *self._draining]:
            for sock in [*pool.active, *pool.retiring]:
                sock.close()
            pool.active.clear()
            pool.retiring.clear()

    # -- for attempts, queries and probes ---------------------------------------------------

    def server_named(self, name: str) -> Endpoint | None:
        return self._by_name.get(name)

    def pool(self, server: Endpoint) -> _SocketPool:
        pool = self._pools.get(server)
        if pool is None:
            pool = self._pools[server] = _SocketPool(self, server)
        return pool

    def answered(self, name: str, rtt: float) -> None:
        if self.health.answered(name, rtt, self.reactor.seconds()):
            _log.info("upstream {upstream} answers again", upstream=name)

    def lost(self, name: str, rto: float) -> None:
        if self.health.lost(name, rto, self.reactor.seconds()):
            self._went_down(name, "timeout")

    def failed(self, name: str, kind: str) -> None:
        if self.health.failed(name, kind, self.reactor.seconds()):
            self._went_down(name, kind)

    def probe_failed(self, name: str) -> None:
        self.health.probe_failed(name, self.reactor.seconds())
        self._schedule_probes()

    def _went_down(self, name: str, kind: str) -> None:
        _log.warn("upstream {upstream} is down ({kind}): skipped and probed until it answers", upstream=name, kind=kind)
        self._schedule_probes()

    def _schedule_probes(self) -> None:
        delay = self.health.next_probe(self.reactor.seconds())
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = self.reactor.callLater(delay, self._probe) if delay is not None else None

    def _probe(self) -> None:
        self._probe_timer = None
        try:
            for name in self.health.due_probes(self.reactor.seconds()):
                server = self._by_name.get(name)
                if server is not None:
                    _Probe(self, server)
        except Exception:  # noqa: BLE001 - a probe must never stop the probing
            _log.failure("probing upstreams failed")
        self._schedule_probes()
