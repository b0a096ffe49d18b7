"""Zone transfers from primaries over TCP, and the service that keeps one secondary zone current.

  ZoneTransfer   one AXFR or IXFR from one primary: the query, framing (blockd.framing), each
                 message read, TSIG-checked and assembled as it arrives (blockd.xfr), a
                 deadline for the whole transfer, an idle timeout, a cap on its bytes.
  SecondaryZone  one configured zone ([lists.NAME] zone, primaries, tsig): checks on the SOA
                 schedule (blockd.refresh) and on NOTIFY from a primary, primaries in order
                 with failover, IXFR when a serial is known.

Decisions:
- IXFR straight away, no SOA query first: an up-to-date zone costs one small exchange either
  way (the primary answers our serial with its SOA), and one fewer moving part than Knot's
  SOA-then-transfer.  Each check is one TCP connection per primary tried.
- IXFR falls back to AXFR from the same primary on any transfer-level failure (Refused, a
  broken difference sequence, a stream that stops short), as Knot does; not on TSIG failures
  (an AXFR is signed with the same key) nor on a connection that cannot be made or times out
  (the next primary is tried).  An IXFR answered with the full zone is used as it is.
- The daemon applies results: on_result(result, primary) is called for every outcome,
  UpToDate included (its time is when the copy was last confirmed current, the age blockd
  restores at start-up), and may return a Deferred; when it raises or fails the result is not
  taken (serial unchanged) and the next primary is tried.  on_failure(reason, primary) is called
  for each failed primary.
- Messages are parsed on the reactor as they arrive, one 64 KiB message at a time (a few
  milliseconds each), so a big transfer never blocks answering for long.
- Log lines name the zone, the primary and the reason; a failure is one line, never a traceback.

Counters for blockd.metrics, as attributes: transfers[(type, result)] with type "ixfr"/"axfr"
and result one of RESULTS; last_success (reactor time), serial, expired, last_failure.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
from collections.abc import Callable, Generator, Sequence
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IConnector, IDelayedCall, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd.config import Endpoint
from blockd.framing import FrameReader, frame
from blockd.refresh import RefreshSchedule, TimerLimits, Timers
from blockd.tsig_key import TsigKey
from blockd.upstream import TCPClientReactor
from blockd.xfr import (
    FullZone,
    Incremental,
    Refused,
    TransferAssembler,
    TsigError,
    TsigVerifier,
    UpToDate,
    XfrError,
    XfrResult,
    read_message,
    serial_newer,
    soa_timers,
    transfer_query,
)

RESULTS = (
    "full",
    "incremental",
    "uptodate",
    "refused",
    "tsig",
    "malformed",
    "timeout",
    "unreachable",
    "too_big",
    "rejected",
)
DEFAULT_DEADLINE = 900.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_log = Logger()


# What a transfer uses of the reactor: a TCP connection and timers (as the upstream client's TCP).
TransferReactor = TCPClientReactor


class TransferError(Exception):
    """The transfer's connection failed: no connection, a timeout, too many bytes."""

    def __init__(self, reason: str, result: str):
        super().__init__(reason)
        self.reason = reason
        self.result = result  # one of RESULTS


class _XfrProtocol(protocol.Protocol):
    def __init__(self, transfer: ZoneTransfer):
        self.transfer = transfer

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.transfer._connected(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.transfer._data(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802 (Twisted API)
        self.transfer._lost()


class _XfrFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, transfer: ZoneTransfer):
        self.transfer = transfer

    def buildProtocol(self, addr: object) -> _XfrProtocol:  # noqa: N802 (Twisted API)
        return _XfrProtocol(self.transfer)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.transfer._fail(TransferError(f"cannot connect: {reason.getErrorMessage()}", "unreachable"))


class ZoneTransfer:
    """One AXFR (serial None) or IXFR of zone from primary; start() gives a Deferred of the result.

    Fails with XfrError (and its Refused, TsigError) or TransferError.
    """

    def __init__(
        self,
        reactor: TransferReactor,
        zone: str,
        primary: Endpoint,
        serial: int | None,
        key: TsigKey | None,
        *,
        deadline: float = DEFAULT_DEADLINE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        query_id: int | None = None,
    ):
        self.reactor = reactor
        self.zone = zone
        self.primary = primary
        self.serial = serial
        self.key = key
        self.deadline = deadline
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_bytes = max_bytes
        self.query_id = secrets.randbits(16) if query_id is None else query_id
        self.bytes = 0
        self.messages = 0
        self.deferred: defer.Deferred[XfrResult] = defer.Deferred(lambda _d: self._cancel())
        self._frames = FrameReader()
        self._assembler: TransferAssembler | None = None
        self._query = b""
        self._protocol: _XfrProtocol | None = None
        self._connector: IConnector | None = None
        self._timers: list[IDelayedCall] = []
        self._idle: IDelayedCall | None = None
        self._done = False

    def start(self) -> defer.Deferred[XfrResult]:
        wire, mac = transfer_query(self.zone, self.serial, self.key, self.query_id)
        verifier = TsigVerifier(self.key, mac) if self.key is not None and mac is not None else None
        self._assembler = TransferAssembler(self.zone, self.serial, self.query_id, verifier)
        self._query = wire
        factory = _XfrFactory(self)
        self._connector = self.reactor.connectTCP(
            self.primary.host, self.primary.port, factory, timeout=self.connect_timeout
        )
        self._timers.append(self.reactor.callLater(self.deadline, self._expire, f"not done in {self.deadline:g} s"))
        return self.deferred

    def _connected(self, proto: _XfrProtocol) -> None:
        self._protocol = proto
        if self._done:
            self._close(abort=True)
            return
        assert proto.transport is not None  # makeConnection sets it first
        proto.transport.write(frame(self._query))
        self._idle = self.reactor.callLater(self.idle_timeout, self._expire, f"idle for {self.idle_timeout:g} s")
        self._timers.append(self._idle)

    def _data(self, data: bytes) -> None:
        if self._done:
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._fail(TransferError(f"transfer larger than {self.max_bytes} bytes", "too_big"))
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        assert self._assembler is not None
        try:
            for wire in self._frames.feed(data):
                self.messages += 1
                result = self._assembler.feed(read_message(wire), self.reactor.seconds())
                if result is not None:
                    self._finish(result)
                    return
        except XfrError as exc:
            self._fail(exc)

    def _lost(self) -> None:
        if not self._done:
            self._fail(XfrError("connection closed before the transfer was complete"))

    def _expire(self, reason: str) -> None:
        self._fail(TransferError(f"timeout: {reason}", "timeout"))

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._stop_timers()
            self._close(abort=True)

    def _finish(self, result: XfrResult) -> None:
        self._done = True
        self._stop_timers()
        self._close(abort=False)
        self.deferred.callback(result)

    def _fail(self, error: Exception) -> None:
        if self._done:
            return
        self._done = True
        self._stop_timers()
        self._close(abort=True)
        self.deferred.errback(Failure(error))

    def _stop_timers(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _close(self, abort: bool) -> None:
        transport = self._protocol.transport if self._protocol is not None else None
        if transport is None:
            if self._connector is not None and getattr(self._connector, "state", None) == "connecting":
                self._connector.stopConnecting()
            return
        if abort:
            abort_connection = getattr(transport, "abortConnection", None)
            if abort_connection is not None:
                cast(ITCPTransport, transport).abortConnection()
                return
        transport.loseConnection()


def result_name(result: XfrResult) -> str:
    if isinstance(result, FullZone):
        return "full"
    if isinstance(result, Incremental):
        return "incremental"
    return "uptodate"


def failure_name(error: BaseException) -> str:
    """The counter result of a failed transfer."""
    if isinstance(error, TransferError):
        return error.result
    if isinstance(error, Refused):
        return "refused"
    if isinstance(error, TsigError):
        return "tsig"
    return "malformed"


def _same_host(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()
    if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
        first = first.ipv4_mapped
    if isinstance(second, ipaddress.IPv6Address) and second.ipv4_mapped is not None:
        second = second.ipv4_mapped
    return first == second


StartTransfer = Callable[[Endpoint, "int | None"], "defer.Deferred[XfrResult]"]


class SecondaryZone(service.Service):
    """Keeps one zone current from its primaries: on the SOA schedule and on NOTIFY."""

    def __init__(
        self,
        reactor: TransferReactor,
        zone: str,
        primaries: Sequence[Endpoint],
        key: TsigKey | None,
        on_result: Callable[[XfrResult, Endpoint], object],
        on_failure: Callable[[str, Endpoint], object] = lambda reason, primary: None,
        *,
        serial: int | None = None,
        copy_age: float | None = None,
        copy_timers: Timers | None = None,
        limits: TimerLimits | None = None,
        jitter: Callable[[], float] = random.random,
        start_transfer: StartTransfer | None = None,
        transfer_options: dict[str, Any] | None = None,
    ):
        if not primaries:
            raise ValueError(f"zone {zone}: no primaries")
        self.reactor = reactor
        self.zone = zone.rstrip(".").lower()
        self.primaries = list(primaries)
        self.key = key
        self.on_result = on_result
        self.on_failure = on_failure
        self.serial = serial
        self.copy_age = copy_age
        self.copy_timers = copy_timers
        self.schedule = RefreshSchedule(limits or TimerLimits())
        self.jitter = jitter
        self.transfer_options = transfer_options or {}
        self.start_transfer: StartTransfer = start_transfer or self._zone_transfer
        self.transfers: dict[tuple[str, str], int] = {}
        self.last_success: float | None = None
        self.last_failure: str | None = None
        self.last_primary: Endpoint | None = None
        self._timer: IDelayedCall | None = None
        self._check: defer.Deferred[bool] | None = None
        self._in_flight: defer.Deferred[XfrResult] | None = None
        self._preferred: Endpoint | None = None
        self._reported_expired = False

    # --- service ---

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self.schedule.start(self.reactor.seconds(), self.copy_age, self.copy_timers, self.jitter())
        self._arm()

    def stopService(self) -> None:  # noqa: N802 (Twisted API)
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            self._in_flight.cancel()

    # --- state for metrics ---

    @property
    def expired(self) -> bool:
        return self.schedule.expired(self.reactor.seconds())

    def notify(self, source_host: str) -> bool:
        """A NOTIFY for this zone from source_host: True if that is one of our primaries."""
        primary = next((p for p in self.primaries if _same_host(p.host, source_host)), None)
        if primary is None:
            _log.info("zone {zone}: NOTIFY from {source}, not a primary: ignored", zone=self.zone, source=source_host)
            return False
        self._preferred = primary
        if self.schedule.on_notify(self.reactor.seconds()) and self.running:
            self._arm()
        return True

    # --- the check ---

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.schedule.in_progress or not self.running:
            return
        now = self.reactor.seconds()
        self._timer = self.reactor.callLater(self.schedule.next_check(now) - now, self._run)

    def _run(self) -> None:
        self._timer = None
        self.schedule.begin(self.reactor.seconds())
        check = self._check_primaries()
        self._check = check
        check.addCallback(self._checked)
        check.addErrback(self._crashed)

    def _ordered_primaries(self) -> list[Endpoint]:
        preferred, self._preferred = self._preferred, None
        if preferred is None:
            return list(self.primaries)
        return [preferred] + [p for p in self.primaries if p != preferred]

    @defer.inlineCallbacks
    def _check_primaries(self) -> Generator[defer.Deferred[Any], Any, bool]:
        for primary in self._ordered_primaries():
            if not self.running:
                return False
            done = yield self._from_primary(primary)
            if done:
                return True
        return False

    @defer.inlineCallbacks
    def _from_primary(self, primary: Endpoint) -> Generator[defer.Deferred[Any], Any, bool]:
        """One primary: IXFR (falling back to AXFR) or AXFR; True when the zone is current."""
        serial = self.serial
        kind = "axfr" if serial is None else "ixfr"
        try:
            result = yield self._transfer(primary, serial)
        except defer.CancelledError:
            return False  # stopService
        except (TsigError, TransferError) as exc:
            self._failed(primary, kind, exc)
            return False
        except XfrError as exc:
            if serial is None:
                self._failed(primary, kind, exc)
                return False
            self._count("ixfr", failure_name(exc))
            _log.info(
                "zone {zone} from {primary}: IXFR failed ({reason}), trying AXFR",
                zone=self.zone,
                primary=str(primary),
                reason=exc.reason,
            )
            kind = "axfr"
            try:
                result = yield self._transfer(primary, None)
            except defer.CancelledError:
                return False
            except (XfrError, TransferError) as error:
                self._failed(primary, kind, error)
                return False
        taken = yield self._take(result, primary, kind)
        return bool(taken)

    def _transfer(self, primary: Endpoint, serial: int | None) -> defer.Deferred[XfrResult]:
        deferred = self.start_transfer(primary, serial)
        self._in_flight = deferred

        def done(outcome: object) -> object:
            self._in_flight = None
            return outcome

        return deferred.addBoth(done)

    def _zone_transfer(self, primary: Endpoint, serial: int | None) -> defer.Deferred[XfrResult]:
        transfer = ZoneTransfer(self.reactor, self.zone, primary, serial, self.key, **self.transfer_options)
        return transfer.start()

    @defer.inlineCallbacks
    def _take(self, result: XfrResult, primary: Endpoint, kind: str) -> Generator[defer.Deferred[Any], Any, bool]:
        """Hand a result to the daemon; True when it took it."""
        try:
            yield defer.maybeDeferred(self.on_result, result, primary)
        except Exception as exc:  # noqa: BLE001 - the daemon's refusal is a failure of this primary, logged
            self._failed(primary, kind, exc, counted="rejected", what="not applied")
            return False
        self._count(kind, result_name(result))
        self._succeeded(result, primary, kind)
        return True

    def _succeeded(self, result: XfrResult, primary: Endpoint, kind: str) -> None:
        now = self.reactor.seconds()
        previous = self.serial
        soa = result.soa
        if isinstance(result, FullZone):
            self.serial = result.serial
        elif isinstance(result, Incremental):
            self.serial = result.new_serial
        elif previous is not None and serial_newer(previous, result.serial):
            _log.warn(
                "zone {zone} from {primary}: primary has serial {theirs}, older than ours ({ours})",
                zone=self.zone,
                primary=str(primary),
                theirs=result.serial,
                ours=previous,
            )
        self.last_success = now
        self.last_primary = primary
        self._reported_expired = False
        if soa is not None:
            refresh, retry, expire = soa_timers(soa)
        else:
            timers = self.schedule.timers or Timers.from_soa(0, 0, 0, self.schedule.limits)
            refresh, retry, expire = int(timers.refresh), int(timers.retry), int(timers.expire)
        self.schedule.on_success(refresh, retry, expire, now, self.jitter())
        if not isinstance(result, UpToDate):
            _log.info(
                "zone {zone} from {primary}: {kind}, {what} at serial {serial} (was {previous})",
                zone=self.zone,
                primary=str(primary),
                kind=kind.upper(),
                what="the full zone" if isinstance(result, FullZone) else "differences",
                serial=self.serial,
                previous="none" if previous is None else previous,
            )

    def _failed(
        self, primary: Endpoint, kind: str, error: BaseException, counted: str | None = None, what: str = "failed"
    ) -> None:
        reason = getattr(error, "reason", None) or str(error) or type(error).__name__
        self._count(kind, counted or failure_name(error))
        self.last_failure = reason
        _log.warn(
            "zone {zone} from {primary}: {kind} {what}: {reason}",
            zone=self.zone,
            primary=str(primary),
            kind=kind.upper(),
            what=what,
            reason=reason,
        )
        try:
            self.on_failure(reason, primary)
        except Exception as exc:  # noqa: BLE001 - a broken callback must not stop the schedule
            _log.error("zone {zone}: on_failure raised {error!r}", zone=self.zone, error=exc)

    def _checked(self, current: bool) -> None:
        self._check = None
        if not self.running:
            return
        now = self.reactor.seconds()
        if not current:
            self.schedule.on_failure(now, self.jitter())
            self._report_expiry(now)
        self._arm()

    def _crashed(self, failure: Failure) -> None:
        # Only a bug in this module gets here; keep the schedule going and say what broke.
        _log.error("zone {zone}: check failed: {error!r}", zone=self.zone, error=failure.value)
        self._checked(False)

    def _report_expiry(self, now: float) -> None:
        if self.schedule.expired(now) and not self._reported_expired:
            self._reported_expired = True
            age = now - (self.schedule.last_success or now)
            _log.error(
                "zone {zone}: expired, no primary confirmed serial {serial} for {age:.0f} s; still serving it",
                zone=self.zone,
                serial=self.serial,
                age=age,
            )
        next_check = self.schedule.next_check(now) - now
        _log.info("zone {zone}: no primary answered; next try in {wait:.0f} s", zone=self.zone, wait=next_check)

    def _count(self, kind: str, result: str) -> None:
        key = (kind, result)
        self.transfers[key] = self.transfers.get(key, 0) + 1
