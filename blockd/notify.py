"""NOTIFY (RFC 1996) for zones blockd transfers: accepted from their primaries only.

A primary that changed an RPZ zone sends NOTIFY to its secondaries over UDP or TCP; blockd
answers on its DNS listeners and checks the zone at once (blockd.transfer).  Accepted only when
the zone is one blockd transfers, the source address is one of that zone's primaries, and, when
the zone has a TSIG key, the NOTIFY is signed with it (the answer is signed back).  Anything
else is REFUSED and counted; a NOTIFY to a blockd that transfers no zone is NOTIMP, as before.
Metrics (read by blockd.metrics): blockd_notify_total{result}.  Pure: no sockets, no clock
(dnspython reads the clock to check a TSIG's time, within its fudge).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.tsig

from blockd import wire
from blockd.prefix_table import parse_address

NOTIFY_RESULTS = ("accepted", "unknown_zone", "not_primary", "unsigned", "bad_tsig", "malformed")


class NotifyReceiver(Protocol):
    def receive(self, data: bytes, client: str) -> bytes | None:
        """The answer to a NOTIFY message from client (None: no answer)."""


class NoZones:
    """The receiver when no list is transferred: NOTIFY is not implemented."""

    def receive(self, data: bytes, client: str) -> bytes | None:
        query_id, flags = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
        return wire.header_only_response(query_id, flags, wire.RCODE_NOTIMP)


@dataclass(frozen=True)
class SecondaryZoneNotify:
    """What NOTIFY needs to know about one transferred zone."""

    zone: str  # key form
    primaries: frozenset[str]  # their addresses, as parse_address gives them
    key: dns.tsig.Key | None
    on_notify: Callable[[str], object]  # the primary that sent it: check the zone now


@dataclass
class NotifyAcceptor:
    zones: Mapping[str, SecondaryZoneNotify]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOTIFY_RESULTS, 0))

    def receive(self, data: bytes, client: str) -> bytes | None:
        keyring = {zone.key.name: zone.key for zone in self.zones.values() if zone.key is not None}
        try:
            message = dns.message.from_wire(data, keyring=keyring or None)
        except dns.tsig.PeerError:
            return self._refused(data, "bad_tsig")  # the NOTIFY carries a TSIG error of its own
        except (dns.tsig.BadSignature, dns.tsig.BadTime, dns.message.UnknownTSIGKey, dns.tsig.BadAlgorithm):
            return self._refused(data, "bad_tsig")
        except dns.exception.DNSException:
            return self._refused(data, "malformed", wire.RCODE_FORMERR)
        if message.opcode() != dns.opcode.NOTIFY or len(message.question) != 1:
            return self._refused(data, "malformed", wire.RCODE_FORMERR)
        zone = self.zones.get(message.question[0].name.to_text(omit_final_dot=True).lower())
        if zone is None:
            return self._answer(message, "unknown_zone", dns.rcode.REFUSED)
        if str(parse_address(client)) not in zone.primaries:
            return self._answer(message, "not_primary", dns.rcode.REFUSED)
        if zone.key is not None and (not message.had_tsig or message.keyname != zone.key.name):
            return self._answer(message, "unsigned", dns.rcode.REFUSED)
        zone.on_notify(client)
        return self._answer(message, "accepted", dns.rcode.NOERROR)

    def _answer(self, message: dns.message.Message, result: str, rcode: dns.rcode.Rcode) -> bytes:
        self.counts[result] += 1
        response = dns.message.make_response(message)  # signed with the NOTIFY's key, if it had one
        response.flags |= dns.flags.AA
        response.set_rcode(rcode)
        return response.to_wire()

    def _refused(self, data: bytes, result: str, rcode: int = wire.RCODE_REFUSED) -> bytes:
        self.counts[result] += 1
        query_id, flags = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
        return wire.header_only_response(query_id, flags, rcode)


def primary_addresses(hosts: list[str]) -> frozenset[str]:
    return frozenset(str(parse_address(host)) for host in hosts)
