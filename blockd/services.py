"""The daemon's own services: DNS listeners, pidfile, query-log writer (Twisted MultiService children).

Constructors build; startService binds and opens; stopService releases.  A start-up problem
(a port in use, an unwritable pidfile) is a StartupError naming the config key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol, ServerFactory
from twisted.logger import Logger

from blockd.config import Endpoint
from blockd.dnstap import ENCODE_INTERVAL, DnstapSink
from blockd.querylog import QueryLog
from blockd.resolver import Resolver
from blockd.server import DNSDatagramProtocol, DNSStreamFactory

_log = Logger()


TCP_BACKLOG = 1024


class StartupError(Exception):
    pass


class TCPListenReactor(Protocol):
    """The reactor as the admin listener uses it: IReactorTCP.listenTCP."""

    def listenTCP(  # noqa: N802 (Twisted API)
        self, port: int, factory: ServerFactory[Any], backlog: int = 50, interface: str = ""
    ) -> IListeningPort: ...


class ListenReactor(TCPListenReactor, Protocol):
    """The reactor as the DNS listeners use it: IReactorTCP.listenTCP and IReactorUDP.listenUDP."""

    def listenUDP(  # noqa: N802 (Twisted API)
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str,
        maxPacketSize: int,  # noqa: N803 (Twisted API)
    ) -> IListeningPort: ...


class ListeningSocket(Protocol):
    """A listening port as the reactor makes it (udp.Port, tcp.Port: FileDescriptors).

    IListeningPort does not declare startReading and stopReading.
    """

    def startReading(self) -> None: ...  # noqa: N802 (Twisted API)

    def stopReading(self) -> None: ...  # noqa: N802 (Twisted API)

    def stopListening(self) -> defer.Deferred[None] | None: ...  # noqa: N802 (Twisted API)


class DNSService(service.Service):
    """UDP and TCP listeners on every configured address.

    gate: returns a Deferred to wait for before reading (the first read of interface-defined
    groups), or None.  The sockets are bound at start either way, so a port in use is still a
    start-up error; queries arriving meanwhile wait in the socket buffers, never answered as
    "no group".  `opened` fires once the listeners read.
    """

    def __init__(
        self,
        reactor: ListenReactor,
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
        self.ports: list[ListeningSocket] = []
        self._udp_sockets: list[socket.socket] = []
        self.opened: defer.Deferred[None] = defer.Deferred()

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted API)
        """Bind while the process may still be root (port 53): blockd.privileges drops root next."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        if not self.ports:  # started without privilegedStartService (tests)
            self._listen()
        waiting = self.gate() if self.gate is not None else None
        if waiting is None or waiting.called:
            self.opened.callback(None)
            return
        for port in self.ports:
            port.stopReading()
        waiting.addCallback(self._open)

    def _listen(self) -> None:
        # Reading starts at once, but the daemon binds before its reactor runs: nothing is read
        # before startService applies the gate.
        for endpoint in self.endpoints:
            try:
                udp = self.reactor.listenUDP(
                    endpoint.port, DNSDatagramProtocol(self.resolver), interface=endpoint.host, maxPacketSize=65535
                )
                self.ports.append(cast(ListeningSocket, udp))
                if isinstance(getattr(udp, "socket", None), socket.socket):
                    self._udp_sockets.append(udp.socket)  # type: ignore[attr-defined]
                # A deep accept queue: a burst of connections (a flood capped per client) must not
                # crowd out another client's SYN, which would then wait a second to be retried.
                tcp = self.reactor.listenTCP(endpoint.port, self.factory, backlog=TCP_BACKLOG, interface=endpoint.host)
                self.ports.append(cast(ListeningSocket, tcp))
            except CannotListenError as exc:
                raise StartupError(f"server.listen: cannot listen on {endpoint}: {exc.socketError}") from None
            _log.info("listening for DNS on {endpoint} (UDP and TCP)", endpoint=str(endpoint))

    def udp_sockets(self) -> list[socket.socket]:
        """The UDP listeners' sockets (blockd.kernel_blocks filters them)."""
        return list(self._udp_sockets) if self.running else []

    def _open(self, result: object) -> object:
        if self.running:
            for port in self.ports:
                port.startReading()
            self.opened.callback(None)
        return result

    def stopService(self) -> defer.Deferred[list[None]]:  # noqa: N802 (Twisted API)
        super().stopService()
        ports, self.ports = self.ports, []
        self._udp_sockets = []
        # maybeDeferred makes a Deferred of None from either result of stopListening (a Deferred of
        # None, or None); its overloads type that as a Deferred of the union.
        stopping = [cast("defer.Deferred[None]", defer.maybeDeferred(p.stopListening)) for p in ports]
        return defer.gatherResults(stopping)


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


class DnstapService(service.Service):
    """The dnstap sink: the reactor encodes every ENCODE_INTERVAL, a thread writes.  Started
    before the listeners, stopped after them (the last lookups encoded, then STOP and FINISH)."""

    def __init__(self, sink: DnstapSink, clock: IReactorTime):
        self.sink = sink
        self.encoding = task.LoopingCall(sink.encode)
        self.encoding.clock = clock

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self.sink.start()
        self.encoding.start(ENCODE_INTERVAL, now=False)

    def stopService(self) -> None:  # noqa: N802 (Twisted API)
        super().stopService()
        if self.encoding.running:
            self.encoding.stop()
        self.sink.encode()
        self.sink.stop()
