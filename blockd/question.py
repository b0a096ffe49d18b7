"""Read the question: the first step of the query path.

One entry point over the two parsers: the byte-level fast path (blockd.wire) for ordinary
queries, dnslib (blockd.slowpath) for what it declines.  What cannot be read as a query
becomes an Unreadable: the answer given from the header alone (FORMERR, NOTIMP, BADVERS), or
none at all (too short, or a response), with what the metrics need to count it.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockd import slowpath, wire
from blockd.wire import Query


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A packet that is not a readable query, and what blockd does about it."""

    answer: bytes | None  # None: no answer at all
    rcode: int  # of the answer; -1 without one
    qtype: int  # 0 when the question could not be read
    drop_reason: str = ""  # the blockd_dns_dropped_total reason when there is no answer
    key: str | None = None  # the question's name when it could be read (BADVERS)


@dataclass(frozen=True, slots=True)
class NotifyRequest:
    """A NOTIFY (RFC 1996): a primary says a zone changed; blockd.notify answers it."""

    data: bytes


OPCODE_NOTIFY = 4


def read_question(data: bytes) -> Query | Unreadable | NotifyRequest:
    """The client's query, or what to do with a packet that is not one."""
    if len(data) >= 12 and not data[2] & 0x80 and (data[2] >> 3) & 0x0F == OPCODE_NOTIFY:
        return NotifyRequest(data)
    try:
        query = wire.parse_query(data)
        return query if query is not None else slowpath.parse_query_slow(data)
    except wire.Drop:
        return Unreadable(None, -1, 0, "response" if len(data) >= 12 else "short")
    except wire.HeaderOnlyError as exc:
        return Unreadable(wire.header_only_response(exc.query_id, exc.flags, exc.rcode), exc.rcode, 0)
    except slowpath.BadVersion as exc:
        query = exc.query
        return Unreadable(slowpath.badvers_response(query), slowpath.RCODE_BADVERS, query.qtype, key=query.key)
