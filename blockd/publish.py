"""RPZ out: serve blockd's policy as Response Policy Zones to the resolvers a site already has.

Config ([publish], off unless set; every key takes a restart except the zones' content, which
follows each policy swap):
  listen = "0.0.0.0:5300"       TCP for AXFR/IXFR (and SOA); UDP for SOA (and IXFR up-to-date)
  allow = ["10.1.0.0/16"]        secondaries by address (default: this host only)
  tsig = "keys/publish.key"      when set, every transfer must be signed with this key
  notify = ["10.1.1.53", "10.1.2.53:53"]
  journal_depth = 20             changes kept for IXFR
  [publish.zones."tiktok.rpz.example."] group = "government-devices"  (or lists = [...], action)

Each zone is rendered (blockd.publish_zone) from the policy snapshot that answers queries,
whenever a snapshot goes live (a reload, an applied transfer, a downloaded list): in a worker
thread, one rendering at a time, the latest snapshot winning when several arrive meanwhile.  A
changed zone gets a new serial and a journal entry (blockd.publish_journal), its serial is saved
in <state_dir>/publish/<zone>.json, and NOTIFY goes to the targets (blockd.publish_notify).  The
listener answers SERVFAIL for a zone until its first rendering is done.

Transfers are answered by blockd.publish_wire and written as the connection drains (a pull
producer), one answer at a time per connection, so a slow secondary holds one message in memory,
not the zone.  Connections are accepted from `allow` only, capped (MAX_CONNECTIONS, and
MAX_CONNECTIONS_PER_ADDRESS for one address) and aborted after IDLE_TIMEOUT without a whole
message in or out.  At most MAX_TRANSFERS_OUT whole-zone transfers run at once (the rest get
SERVFAIL and retry, as with BIND's transfers-out), each for at most MAX_TRANSFER_TIME.

Metrics (PublishCollector): blockd_publish_serial{zone}, blockd_publish_records{zone},
blockd_publish_unpublishable_entries{zone}, blockd_publish_last_change_timestamp_seconds{zone},
blockd_publish_requests_total{type,result}, blockd_publish_sent_bytes_total{type},
blockd_publish_notify_total{result}.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import dns.tsig
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.application import service
from twisted.internet import defer, interfaces, protocol, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from zope.interface import implementer

from blockd.config import Endpoint, PublishConfig
from blockd.framing import FrameReader, frame
from blockd.policy import Policy
from blockd.prefix_table import parse_address
from blockd.publish_journal import Rendered, SavedState, ZoneVersions
from blockd.publish_notify import NOTIFY_RESULTS, NotifySender
from blockd.publish_wire import REQUEST_TYPES, RESULTS, Access, Answer, ZoneView, access_for, answer
from blockd.publish_zone import render
from blockd.services import StartupError

_log = Logger()

MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_ADDRESS = 8  # so one secondary (or one compromised host in allow) cannot take them all
IDLE_TIMEOUT = 30.0  # seconds without a query or a written message (a reader that stopped reading too)
MAX_QUEUED = 8  # queries waiting behind a transfer on one connection
MAX_TRANSFERS_OUT = 10  # whole-zone transfers at once (BIND's transfers-out); more get SERVFAIL, to retry
MAX_TRANSFER_TIME = 7200.0  # seconds one transfer may take (BIND's max-transfer-time-out: 120 minutes)


class Publisher(service.Service):
    """The published zones, their listener and their NOTIFY sender."""

    def __init__(
        self,
        reactor: Any,
        config: PublishConfig,
        state_dir: Path,
        key: dns.tsig.Key | None,
        current: Callable[[], Policy],
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.reactor = reactor
        self.config = config
        self.current = current  # the serving snapshot, rendered at start
        self.state_dir = state_dir / "publish"
        self.run_in_thread = run_in_thread
        self.wall_clock = wall_clock
        self.access: Access = access_for(config.allow, key)
        self.versions = {name: ZoneVersions(name, config.journal_depth) for name in config.zones}
        self.views = {name: ZoneView(None, versions.changes_since) for name, versions in self.versions.items()}
        self.changed_at: dict[str, float] = {}
        self.requests: dict[tuple[str, str], int] = {(t, r): 0 for t in REQUEST_TYPES for r in RESULTS}
        self.sent_bytes: dict[str, int] = dict.fromkeys(REQUEST_TYPES, 0)
        self.notify_counts: dict[str, int] = dict.fromkeys(NOTIFY_RESULTS, 0)
        self.senders: dict[int, NotifySender] = {}
        self.ports: list[Any] = []
        self.pending: Policy | None = None
        self.busy = False
        self.idle: defer.Deferred[None] | None = None
        self.connections = 0
        self.per_address: dict[str, int] = {}
        self.transfers_out = 0  # whole-zone transfers being written
        self.rendering: Policy | None = None  # the snapshot a worker thread renders from now

    # -- rendering ----------------------------------------------------------------------------

    def policy_changed(self, policy: Policy) -> None:
        """A snapshot went live (reactor thread): render the zones from it."""
        self.pending = policy
        if not self.busy:
            self._next()

    def _next(self) -> None:
        policy, self.pending = self.pending, None
        if policy is None:
            self.busy = False
            if self.idle is not None:
                idle, self.idle = self.idle, None
                idle.callback(None)
            return
        self.busy = True
        self.rendering = policy
        deferred = self.run_in_thread(self._render_all, policy)
        deferred.addCallback(self._install)
        deferred.addErrback(lambda failure: _log.failure("publishing the policy failed", failure))
        deferred.addBoth(self._rendered)

    def _rendered(self, _: object) -> None:
        self.rendering = None
        self._next()

    def holds_policy(self, policy: Policy) -> bool:
        """Whether a rendering uses this snapshot (now or next): the daemon must not dismantle it."""
        return policy is self.rendering or policy is self.pending

    def _render_all(self, policy: Policy) -> list[tuple[str, Rendered | None, SavedState | None]]:
        """Worker thread: every zone rendered and measured against its serving version."""
        results: list[tuple[str, Rendered | None, SavedState | None]] = []
        for name, zone_config in self.config.zones.items():
            versions = self.versions[name]
            saved = self._load_state(name) if versions.zone is None else None
            try:
                content = render(policy, zone_config)
            except KeyError as exc:  # a reload removed the group or list the zone names
                _log.error(
                    "publish zone {zone}: cannot render: no {what}; still serving the last version", zone=name, what=exc
                )
                results.append((name, None, saved))
                continue
            results.append((name, versions.measure(content), saved))
        return results

    def _install(self, results: list[tuple[str, Rendered | None, SavedState | None]]) -> None:
        now = self.wall_clock()
        for name, rendered, saved in results:
            if rendered is None:
                continue
            versions = self.versions[name]
            first = versions.zone is None
            retired = versions.zone
            change = versions.install(rendered, saved, int(now))
            if retired is not None and retired is not versions.zone:
                # Freeing two million-entry dicts takes tens of milliseconds: not on the reactor
                # (a transfer still sending the old version keeps it until it is done).
                self.run_in_thread(_release, retired).addErrback(lambda failure: None)
                del retired
            zone = versions.zone
            assert zone is not None
            self.views[name].zone = zone
            if rendered.content.unpublishable:
                _log.warn(
                    "publish zone {zone}: {count} entries have no RPZ form and are not published (e.g. {sample})",
                    zone=name, count=rendered.content.unpublishable, sample=", ".join(rendered.content.sample),
                )  # fmt: skip
            if first:
                self.changed_at.setdefault(name, now)
                _log.info(
                    "publish zone {zone}: serial {serial}, {records} records", zone=name, serial=zone.soa.serial,
                    records=versions.records,
                )  # fmt: skip
                if saved is None or saved.serial != zone.soa.serial:
                    self._changed(name, zone.soa)
                continue
            if change is not None:
                self.changed_at[name] = now
                _log.info(
                    "publish zone {zone}: serial {old} -> {new}, {removed} records removed, {added} added",
                    zone=name, old=change.old.serial, new=change.new.serial, removed=len(change.removed),
                    added=len(change.added),
                )  # fmt: skip
                self._changed(name, zone.soa)

    def _changed(self, name: str, soa: Any) -> None:
        self._save_state(name)
        for sender in self.senders.values():
            sender.notify(name, soa)

    def _state_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _load_state(self, name: str) -> SavedState | None:
        try:
            return SavedState.from_json(self._state_path(name).read_text())
        except (OSError, UnicodeDecodeError):  # gone or garbled: the serial starts from the clock
            return None

    def _save_state(self, name: str) -> None:
        saved = self.versions[name].saved()
        if saved is None:
            return
        path = self._state_path(name)
        temporary = path.with_name(path.name + ".tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            temporary.write_text(saved.to_json())
            os.replace(temporary, path)
        except OSError as exc:
            _log.warn(
                "publish zone {zone}: cannot save its serial in {path}: {error}", zone=name, path=str(path), error=exc
            )

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires when no rendering is running or pending (tests, shutdown)."""
        if not self.busy:
            return defer.succeed(None)
        if self.idle is None:
            self.idle = defer.Deferred()
        return self.idle

    # -- listening ------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted API)
        """Bind while the process may still be root (a port below 1024)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        if not self.ports:  # started without privilegedStartService (tests)
            self._listen()
        self.policy_changed(self.current())

    def _listen(self) -> None:
        listen = self.config.listen
        assert listen is not None
        factory = PublishStreamFactory(self)
        try:
            self.ports.append(self.reactor.listenTCP(listen.port, factory, backlog=64, interface=listen.host))
            self.ports.append(self.reactor.listenUDP(listen.port, PublishDatagram(self), interface=listen.host))
            self._open_senders(listen, self.config.notify)
        except CannotListenError as exc:  # a port in use, an address not on this host
            raise StartupError(f"publish.listen {listen}: cannot listen: {exc}") from None

    def _open_senders(self, listen: Endpoint, targets: tuple[Endpoint, ...]) -> None:
        for version in (4, 6):
            mine = tuple(t for t in targets if ipaddress.ip_address(t.host).version == version)
            if not mine:
                continue
            bound = ipaddress.ip_address(listen.host)
            interface = listen.host if bound.version == version and not bound.is_unspecified else (
                "0.0.0.0" if version == 4 else "::"
            )
            sender = NotifySender(self.reactor, mine, self.access.key, self.notify_counts)
            self.ports.append(self.reactor.listenUDP(0, sender, interface=interface))
            self.senders[version] = sender

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802 (Twisted API)
        super().stopService()
        for sender in self.senders.values():
            sender.stop()
        stopped = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports = []
        return defer.gatherResults(stopped)

    def admit(self, client: str) -> bool:
        """A new TCP connection from client: within allow and the connection caps."""
        if self.access.allow.lookup(parse_address(client)) is None:
            self.requests[("other", "refused")] += 1
            return False
        if self.connections >= MAX_CONNECTIONS or self.per_address.get(client, 0) >= MAX_CONNECTIONS_PER_ADDRESS:
            _log.info("publish: {client}: too many connections, closed", client=client)
            return False
        self.connections += 1
        self.per_address[client] = self.per_address.get(client, 0) + 1
        return True

    def connection_closed(self, client: str) -> None:
        self.connections -= 1
        left = self.per_address.get(client, 1) - 1
        if left:
            self.per_address[client] = left
        else:
            self.per_address.pop(client, None)

    def respond(self, data: bytes, client: str, udp: bool) -> Answer:
        result = answer(
            data, parse_address(client), udp, self.views, self.access, int(self.wall_clock()),
            clock=lambda: int(self.wall_clock()), full_transfers=self.transfers_out < MAX_TRANSFERS_OUT,
        )  # fmt: skip
        self.requests[(result.request, result.result)] += 1
        if result.result == "busy":
            _log.info(
                "publish: {request} of {zone} from {client}: {max} whole-zone transfers running, SERVFAIL",
                request=result.request.upper(), zone=result.zone, client=client, max=MAX_TRANSFERS_OUT,
            )  # fmt: skip
        if result.result in ("refused", "notauth", "unknown_zone") and result.request != "soa":
            _log.info(
                "publish: {request} of {zone} from {client}: {result}",
                request=result.request.upper(), zone=result.zone or "?", client=client, result=result.result,
            )  # fmt: skip
        return result

    def count_sent(self, request: str, size: int) -> None:
        self.sent_bytes[request] += size


def _release(zone: object) -> None:
    """Runs in a worker thread, which so drops the last reference to a retired zone version."""
    del zone


class PublishDatagram(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: N802 (Twisted API)
        result = self.publisher.respond(data, addr[0], udp=True)
        message = next(result.messages, None)
        if message is not None and self.transport is not None:
            self.publisher.count_sent(result.request, len(message))
            try:
                self.transport.write(message, addr)
            except OSError:
                pass  # the client's problem (an unreachable port): nothing to retry over UDP


@implementer(interfaces.IPullProducer)
class PublishStream(protocol.Protocol):
    """One secondary's TCP connection: queries in, answers written as the socket drains."""

    def __init__(self, publisher: Publisher, peer: str):
        self.publisher = publisher
        self.peer = peer
        self.reader = FrameReader()
        self.queued: deque[bytes] = deque()
        self.current: Iterator[bytes] | None = None
        self.request = "other"
        self.full = False  # the current answer is a whole zone (it holds one of the quota)
        self.started = 0.0
        self.timer: Any = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.timer = self.publisher.reactor.callLater(IDLE_TIMEOUT, self._idle)

    def _touch(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(IDLE_TIMEOUT)

    def _idle(self) -> None:
        self.timer = None
        if self.transport is not None:
            # Not loseConnection: that waits for the buffer to drain, which a stalled reader never does.
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        for message in self.reader.feed(data):  # only whole messages count as activity
            if not message:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._touch()
            self.queued.append(message)
        if len(self.queued) > MAX_QUEUED or self.reader.buffered > 65_537:
            _log.info("publish: {client} queued more than {max} queries: closed", client=self.peer, max=MAX_QUEUED)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.current is None:
            self._start_next()

    def _start_next(self) -> None:
        while self.queued:
            result = self.publisher.respond(self.queued.popleft(), self.peer, udp=False)
            self.current = result.messages
            self.request = result.request
            self.full = result.full
            if self.full:
                self.publisher.transfers_out += 1
            self.started = self.publisher.reactor.seconds()
            self.transport.registerProducer(self, False)  # type: ignore[union-attr]
            return
        self.current = None

    def _done(self) -> None:
        """The current answer is finished or abandoned: its quota slot is free."""
        if self.full:
            self.full = False
            self.publisher.transfers_out -= 1
        self.current = None

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted API)
        if self.current is None:
            return
        if self.publisher.reactor.seconds() - self.started > MAX_TRANSFER_TIME:
            _log.info(
                "publish: {client}: transfer longer than {max:g} s, closed", client=self.peer, max=MAX_TRANSFER_TIME
            )
            self._done()
            self.queued.clear()
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        try:
            message = next(self.current, None)
        except Exception:  # noqa: BLE001 (an encoding bug must not take the listener down: this connection ends)
            _log.failure("publish: answering {client} failed", client=self.peer)
            self.queued.clear()
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self._done()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if message is None:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self._done()
            self._start_next()
            return
        self._touch()
        self.publisher.count_sent(self.request, len(message) + 2)
        self.transport.write(frame(message))  # type: ignore[union-attr]

    def stopProducing(self) -> None:  # noqa: N802 (Twisted API)
        self._done()
        self.queued.clear()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted API)
        self.publisher.connection_closed(self.peer)
        self._done()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class PublishStreamFactory(protocol.Factory):
    noisy = False

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:  # noqa: N802 (Twisted API)
        # None: Twisted closes the connection at once.  Outside allow, nothing is read at all.
        if not self.publisher.admit(addr.host):
            return None
        return PublishStream(self.publisher, addr.host)


class PublishCollector(Collector):
    """The published zones' state, read at scrape time (zone names come from the config)."""

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def collect(self) -> Iterable[Any]:
        publisher = self.publisher
        serial = GaugeMetricFamily("blockd_publish_serial", "SOA serial of a published zone.", labels=["zone"])
        size = GaugeMetricFamily("blockd_publish_records", "Policy records in a published zone.", labels=["zone"])
        skipped = GaugeMetricFamily(
            "blockd_publish_unpublishable_entries",
            "List entries a published zone cannot carry (no RPZ form: wildcards inside a label, too long).",
            labels=["zone"],
        )
        changed = GaugeMetricFamily(
            "blockd_publish_last_change_timestamp_seconds", "When a published zone last changed.", labels=["zone"]
        )
        for name, versions in publisher.versions.items():
            if versions.zone is not None:
                serial.add_metric([name], versions.zone.soa.serial)
                size.add_metric([name], versions.records)
                skipped.add_metric([name], versions.unpublishable)
            if name in publisher.changed_at:
                changed.add_metric([name], publisher.changed_at[name])
        requests = CounterMetricFamily(
            "blockd_publish_requests", "Queries on the publish listener by type and outcome.", labels=["type", "result"]
        )
        for (request, result), count in publisher.requests.items():
            requests.add_metric([request, result], count)
        sent = CounterMetricFamily(
            "blockd_publish_sent_bytes", "Bytes of answers sent by the publish listener.", labels=["type"]
        )
        for request, count in publisher.sent_bytes.items():
            sent.add_metric([request], count)
        notify = CounterMetricFamily("blockd_publish_notify", "NOTIFY messages to secondaries.", labels=["result"])
        for result, count in publisher.notify_counts.items():
            notify.add_metric([result], count)
        yield from (serial, size, skipped, changed, requests, sent, notify)
