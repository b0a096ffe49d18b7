"""Lists that are RPZ zones transferred from primaries: the daemon's side of blockd.transfer.

Config: [lists.X] zone = "rpz.gov.example.", primaries = ["10.1.1.53", "10.1.2.53:5353"],
tsig = "keys/rpz.key" (BIND key-file syntax), allow_shrink; [server] state_dir.
- At start the last good copy (blockd.zone_store) joins the first policy, so blockd blocks
  while the primaries are unreachable; its serial and age seed the SOA refresh schedule.
- Each transfer (AXFR, or IXFR applied to the serving copy) becomes a list update: the new zone
  and a new snapshot are built in a worker thread, then swapped in (blockd.reload.Reloader,
  queued behind any reload), then the copy is saved.  The shrink guard applies: an AXFR that
  leaves less than half, or an IXFR that deletes more than half, needs allow_shrink.  A refused
  update keeps the serving zone and its serial, so the next refresh tries again.
- NOTIFY from a zone's primaries (TSIG-checked when a key is set) starts a check at once.
Metrics (ZoneCollector): blockd_list_serial{list}, blockd_zone_transfers_total{list,type,result},
blockd_zone_transfer_duration_seconds{list}, blockd_zone_last_transfer_success_timestamp_seconds
{list}, blockd_zone_expired{list} (1 while the zone is past its SOA expire: still served).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from blockd import rpz, zone_store
from blockd.config import Config, ListConfig
from blockd.notify import NotifyAcceptor, SecondaryZoneNotify, primary_addresses
from blockd.policy import Policy, PolicyError, build_policy
from blockd.refresh import TimerLimits, Timers
from blockd.reload import UpdateDone
from blockd.transfer import SecondaryZone
from blockd.tsig_key import KeyFileError, TsigKey, load_key_file, to_dnspython
from blockd.xfr import FullZone, Incremental, Record, UpToDate, XfrResult

_log = Logger()
TYPE_SOA = 6
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class TransferSetupError(Exception):
    """A transferred list cannot start (an unreadable key file): a start-up error."""


@dataclass
class ZoneList:
    """One transferred list: its config, key, transfer service and figures."""

    config: ListConfig
    key: TsigKey | None
    secondary: SecondaryZone | None = None
    # Transfer durations as a cumulative histogram: counts per bucket of DURATION_BUCKETS, +Inf last.
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_counts[index] += 1
        self.duration_counts[-1] += 1
        self.duration_sum += seconds


def apply_result(
    zone: rpz.PolicyZone | None, origin: str, result: FullZone | Incremental, allow_shrink: bool
) -> rpz.PolicyZone:
    """The zone after a transfer (pure; runs in a worker thread).  Raises PolicyError."""
    where = f"zone {origin}"
    if isinstance(result, FullZone):
        new = rpz.new_zone(origin, rpz.Soa(0, "", "", 0, 0, 0, 0, 0))
        _add_all(new, [result.soa], where)
        _consume(new, result.records, where)
        return new
    if zone is None:
        raise PolicyError([f"{where}: an IXFR without a copy to apply it to"])
    new = zone.copy()
    deleted = 0
    for removed, added in result.steps:
        for owner, rtype, _rclass, _ttl, rdata in removed:
            problem = rpz.delete_record(new, owner, rtype, rdata)
            if problem is not None:
                raise PolicyError([f"{where}: IXFR {result.old_serial} -> {result.new_serial}: {problem}"])
        deleted += len(removed)
        _add_all(new, added, where)
    if result.soa is not None:
        _add_all(new, [result.soa], where)
    if not allow_shrink and len(zone) and deleted * 2 > len(zone):
        raise PolicyError(
            [
                f"{where}: IXFR {result.old_serial} -> {result.new_serial} deletes {deleted} of {len(zone)} "
                "triggers; refusing it (set allow_shrink = true if this is intended)"
            ]
        )
    return new


def _consume(zone: rpz.PolicyZone, records: list[Record], where: str) -> None:
    """Add a full zone's records, emptying the list from its end as they go in: the memory of
    the records already added is free for the zone's own entries (a million-record AXFR would
    otherwise hold both at once, and the process would keep that peak as its size)."""
    while records:
        chunk = records[-_CONSUME_CHUNK:]
        del records[-_CONSUME_CHUNK:]
        _add_all(zone, chunk, where)


_CONSUME_CHUNK = 20_000


def _add_all(zone: rpz.PolicyZone, records: Iterable[Record], where: str) -> None:
    problems = []
    for owner, rtype, _rclass, ttl, rdata in records:
        problem = rpz.add_record(zone, owner, rtype, ttl, rdata)
        if problem is not None:
            problems.append(f"{where}: {problem}")
    if problems:
        raise PolicyError(
            problems[:20] + ([f"{where}: ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        )


class SecondaryLists(service.MultiService):
    """Every transferred list: loads the copies, runs the transfers, applies them."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        stored: Mapping[str, zone_store.StoredZone],
        update: Callable[[Callable[[Policy], Policy], UpdateDone], None],
        current_config: Callable[[], Config],
    ):
        super().__init__()
        self.reactor = reactor
        self.state_dir = config.server.state_dir
        self.update = update  # Reloader.update: queued with reloads, swapped in whole
        self.current_config = current_config
        self.zones: dict[str, ZoneList] = {}
        for list_config in config.lists.values():
            if list_config.zone is not None:
                entry = self.zones[list_config.name] = ZoneList(list_config, _key(list_config))
                entry.secondary = self._secondary(entry, stored.get(list_config.name))
                entry.secondary.setServiceParent(self)

    def _secondary(self, entry: ZoneList, copy: zone_store.StoredZone | None) -> SecondaryZone:
        name = entry.config.name
        soa = copy.zone.soa if copy is not None else None
        secondary = SecondaryZone(
            self.reactor,
            entry.config.zone or "",
            entry.config.primaries,
            entry.key,
            on_result=lambda result, primary: self._apply(name, result),
            serial=soa.serial if soa is not None else None,
            copy_age=copy.age if copy is not None else None,
            copy_timers=Timers.from_soa(soa.refresh, soa.retry, soa.expire, TimerLimits()) if soa else None,
        )
        secondary.start_transfer = self._timed(entry, secondary.start_transfer)
        return secondary

    def _timed(self, entry: ZoneList, start: Any) -> Any:
        def start_timed(primary: Any, serial: int | None) -> defer.Deferred[XfrResult]:
            started = time.monotonic()

            def record(result: object) -> object:
                entry.observe(time.monotonic() - started)
                return result

            deferred: defer.Deferred[XfrResult] = start(primary, serial)
            return deferred.addBoth(record)

        return start_timed

    def notify_acceptor(self) -> NotifyAcceptor:
        notifies = {}
        for entry in self.zones.values():
            secondary = entry.secondary
            assert secondary is not None and entry.config.zone is not None
            notifies[entry.config.zone] = SecondaryZoneNotify(
                entry.config.zone,
                primary_addresses([p.host for p in entry.config.primaries]),
                to_dnspython(entry.key) if entry.key is not None else None,
                secondary.notify,
            )
        return NotifyAcceptor(notifies)

    # -- applying a transfer (reactor thread, building in a worker) ------------------------------

    def _apply(self, name: str, result: XfrResult) -> defer.Deferred[None] | None:
        entry = self.zones[name]
        if isinstance(result, UpToDate):
            self._touch(name)
            return None
        applied: defer.Deferred[None] = defer.Deferred()

        def build(previous: Policy) -> Policy:
            old = previous.lists[name].zone if name in previous.lists else None
            new = apply_result(old, entry.config.zone or "", result, entry.config.allow_shrink)
            return build_policy(self.current_config(), previous, transferred={name: new})

        def done(policy: Policy | None, errors: list[str]) -> None:
            if policy is None:
                for line in errors:
                    _log.error("list {name}: transfer refused: {error}", name=name, error=line)
                applied.errback(ValueError("; ".join(errors[:3])))
                return
            zone = policy.lists[name].zone
            _log.info(
                "list {name}: zone {zone} serial {serial} live, {count} triggers{note}",
                name=name,
                zone=entry.config.zone,
                serial=zone.soa.serial if zone else "?",
                count=len(zone) if zone else 0,
                note=f"; {note}" if (note := policy.lists[name].ignored_note()) else "",
            )
            if zone is not None:
                threads.deferToThread(zone_store.save, self.state_dir, name, zone).addErrback(
                    lambda failure: _log.error(
                        "list {name}: cannot save the copy in {dir}: {error}",
                        name=name,
                        dir=str(self.state_dir),
                        error=failure.getErrorMessage(),
                    )
                )
            applied.callback(None)

        self.update(build, done)
        return applied

    def _touch(self, name: str) -> None:
        """The primary confirmed the copy: its age restarts (the state file's mtime)."""
        path = zone_store.copy_path(self.state_dir, name)
        try:
            os.utime(path)
        except OSError:
            pass


def load_stored_copies(config: Config) -> dict[str, zone_store.StoredZone]:
    """The last good copy of every transferred list, for the first policy; problems are logged."""
    copies: dict[str, zone_store.StoredZone] = {}
    for name, list_config in config.lists.items():
        if list_config.zone is None:
            continue
        try:
            stored = zone_store.load(config.server.state_dir, name, list_config.zone)
        except ValueError as exc:
            _log.error(
                "list {name}: the stored copy is unusable ({error}); waiting for a transfer", name=name, error=exc
            )
            continue
        if stored is None:
            _log.warn(
                "list {name}: no stored copy of zone {zone} in {dir}: it blocks nothing until a transfer",
                name=name,
                zone=list_config.zone,
                dir=str(config.server.state_dir),
            )
            continue
        _log.info(
            "list {name}: zone {zone} serial {serial} from the stored copy ({age:.0f} s old), {count} triggers",
            name=name,
            zone=list_config.zone,
            serial=stored.zone.soa.serial,
            age=stored.age,
            count=len(stored.zone),
        )
        copies[name] = stored
    return copies


def _key(list_config: ListConfig) -> TsigKey | None:
    if list_config.tsig is None:
        return None
    try:
        return load_key_file(list_config.tsig)
    except KeyFileError as exc:
        raise TransferSetupError("; ".join(str(e) for e in exc.errors)) from None


class ZoneCollector(Collector):
    """The transferred lists' figures, read at scrape time."""

    def __init__(self, lists: SecondaryLists, current: Callable[[], Policy], notify: NotifyAcceptor):
        self._lists = lists
        self._current = current
        self._notify = notify

    def collect(self) -> Iterable[Any]:
        serial = GaugeMetricFamily("blockd_list_serial", "SOA serial of the zone a list serves.", labels=["list"])
        transfers = CounterMetricFamily(
            "blockd_zone_transfers", "Zone transfers by type and result.", labels=["list", "type", "result"]
        )
        last = GaugeMetricFamily(
            "blockd_zone_last_transfer_success_timestamp_seconds",
            "When a transfer last brought or confirmed the zone.",
            labels=["list"],
        )
        expired = GaugeMetricFamily(
            "blockd_zone_expired",
            "1 while a zone is past its SOA expire (the last copy still serves).",
            labels=["list"],
        )
        duration = HistogramMetricFamily(
            "blockd_zone_transfer_duration_seconds", "Time a transfer took.", labels=["list"]
        )
        policy = self._current()
        for name, entry in sorted(self._lists.zones.items()):
            listed = policy.lists.get(name)
            if listed is not None and listed.zone is not None:
                serial.add_metric([name], listed.zone.soa.serial)
            secondary = entry.secondary
            if secondary is None:
                continue
            for (kind, result), count in sorted(secondary.transfers.items()):
                transfers.add_metric([name, kind, result], count)
            if secondary.last_success is not None:
                last.add_metric([name], secondary.last_success)
            expired.add_metric([name], 1.0 if secondary.running and secondary.expired else 0.0)
            bounds = [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
            duration.add_metric(
                [name], list(zip(bounds, map(float, entry.duration_counts), strict=True)), entry.duration_sum
            )
        notifies = CounterMetricFamily("blockd_notify", "NOTIFY messages by result.", labels=["result"])
        for result, count in self._notify.counts.items():
            notifies.add_metric([result], count)
        yield from (serial, transfers, last, expired, duration, notifies)


__all__ = ["SecondaryLists", "TransferSetupError", "ZoneCollector", "apply_result", "load_stored_copies"]
