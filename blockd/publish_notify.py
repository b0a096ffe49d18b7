"""NOTIFY (RFC 1996) to the secondaries of published zones: [publish] notify.

After each change of a published zone every target gets a NOTIFY over UDP carrying the new SOA
(signed with [publish] tsig when set), resent until the target answers: at 0, 1, 3, 7 and 15 s,
given up (counted as a timeout) at 31 s; RFC 1996 3.6 leaves the schedule to the primary, and
a secondary that missed every one still catches up at the SOA's refresh (300 s).  A newer change
replaces a notification still being retried for the same zone and target.  A target that
answers with an error is not retried: it heard us.  The socket is bound to the publish
listener's address when it is a specific one, since secondaries accept NOTIFY from their
primary's address only.  Counted as blockd_publish_notify_total{result}.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.tsig
from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from blockd.config import Endpoint
from blockd.names import key_to_wire
from blockd.rpz import Soa

_log = Logger()

RETRY_SCHEDULE = (1.0, 2.0, 4.0, 8.0, 16.0)
NOTIFY_RESULTS = ("sent", "acknowledged", "error_rcode", "timeout", "send_error")


def notify_message(zone: str, soa: Soa, query_id: int, key: dns.tsig.Key | None) -> bytes:
    """A NOTIFY for zone with its SOA in the answer section (RFC 1996 3.7)."""
    name = dns.name.from_wire(key_to_wire(zone), 0)[0] if zone else dns.name.root
    message = dns.message.make_query(name, dns.rdatatype.SOA)
    message.id = query_id
    message.flags = dns.flags.AA  # and no RD; the opcode lives in the same field, so it comes second
    message.set_opcode(dns.opcode.NOTIFY)
    rrset = message.find_rrset(message.answer, name, dns.rdataclass.IN, dns.rdatatype.SOA, create=True)
    mname = dns.name.from_wire(key_to_wire(soa.mname), 0)[0]
    rname = dns.name.from_wire(key_to_wire(soa.rname), 0)[0]
    rdata = dns.rdtypes.ANY.SOA.SOA(
        dns.rdataclass.IN, dns.rdatatype.SOA, mname, rname, soa.serial, soa.refresh, soa.retry, soa.expire,
        soa.minimum,
    )  # fmt: skip
    rrset.add(rdata, soa.ttl)
    if key is not None:
        message.use_tsig(key)
    wire: bytes = message.to_wire()
    return wire


@dataclass
class _Pending:
    zone: str
    message: bytes
    query_id: int
    attempt: int
    timer: IDelayedCall | None = None


class NotifySender(protocol.DatagramProtocol):
    """Sends and retries NOTIFY for one address family; counts[result] for the metrics."""

    noisy = False

    def __init__(
        self,
        clock: Any,
        targets: tuple[Endpoint, ...],
        key: dns.tsig.Key | None,
        counts: dict[str, int],
        schedule: tuple[float, ...] = RETRY_SCHEDULE,
        new_id: Callable[[], int] = lambda: secrets.randbits(16),
    ):
        self.clock = clock
        self.targets = targets
        self.key = key
        self.counts = counts
        self.schedule = schedule
        self.new_id = new_id
        self.pending: dict[tuple[str, tuple[str, int]], _Pending] = {}

    def notify(self, zone: str, soa: Soa) -> None:
        for target in self.targets:
            address = (target.host, target.port)
            old = self.pending.pop((zone, address), None)
            if old is not None and old.timer is not None and old.timer.active():
                old.timer.cancel()
            query_id = self.new_id()
            pending = _Pending(zone, notify_message(zone, soa, query_id, self.key), query_id, 0)
            self.pending[(zone, address)] = pending
            self._send(pending, address)

    def _send(self, pending: _Pending, address: tuple[str, int]) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(pending.message, address)
            self.counts["sent"] += 1
        except OSError as exc:
            self.counts["send_error"] += 1
            _log.warn("NOTIFY for {zone} to {target}: {error}", zone=pending.zone, target=_text(address), error=exc)
        pending.timer = self.clock.callLater(self.schedule[pending.attempt], self._retry, pending, address)

    def _retry(self, pending: _Pending, address: tuple[str, int]) -> None:
        if self.pending.get((pending.zone, address)) is not pending:
            return
        pending.attempt += 1
        if pending.attempt == len(self.schedule):
            self.counts["timeout"] += 1
            del self.pending[(pending.zone, address)]
            _log.warn(
                "NOTIFY for {zone} to {target}: no answer after {tries} tries",
                zone=pending.zone, target=_text(address), tries=pending.attempt,
            )  # fmt: skip
            return
        self._send(pending, address)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: N802 (Twisted API)
        if len(data) < 12:
            return
        query_id, flags = struct.unpack_from("!HH", data)
        address = (addr[0], addr[1])
        match = next(
            (key for key, p in self.pending.items() if key[1] == address and p.query_id == query_id), None
        )
        if match is None or not flags & 0x8000 or (flags >> 11) & 0xF != dns.opcode.NOTIFY:
            return  # not an answer to a NOTIFY we have outstanding: ignored
        pending = self.pending.pop(match)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        rcode = flags & 0xF
        if rcode == dns.rcode.NOERROR:
            self.counts["acknowledged"] += 1
            return
        self.counts["error_rcode"] += 1
        _log.warn(
            "NOTIFY for {zone} to {target} answered {rcode}: check the secondary's allow-notify",
            zone=pending.zone, target=_text(address), rcode=dns.rcode.to_text(rcode),
        )  # fmt: skip

    def stop(self) -> None:
        for pending in self.pending.values():
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
        self.pending.clear()


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

