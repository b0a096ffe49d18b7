"""dnstap payloads: what blockd saw and answered, as `dnstap.Dnstap` protobuf messages.

The schema is the published dnstap.proto, compiled in the maintained `dnstap-pb` package
(google.protobuf underneath).  Each payload is built from two parts:
- the fields that repeat from one payload to the next (identity, version, message type,
  socket family and protocol, the client's address, the Policy): serialized once by the
  protobuf library and kept (`_Templates`);
- the fields that differ per query (port, times, the two wire messages): appended with a few
  lines of field encoding below.  Protobuf allows a message's fields in any order and in
  separate runs, so template + per-query fields is one valid message.
Why not the library for everything: one CLIENT_RESPONSE through `dnstap_pb2.Message(...)`
and SerializeToString costs 5.5 us on this machine, a blocked answer 6.5 us in all; two
payloads per blocked query would cut blocked throughput to about a third.  The split costs
about 1 us a payload (bench/RESULTS.md, "dnstap").  The tests decode what this writes with the
library and compare it field by field with the library's own encoding.

Pure: no I/O, no clock (times come with each event).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import NamedTuple

from dnstap_pb import dnstap_pb2 as pb

from blockd.fstrm import FRAME_LENGTH
from blockd.names import key_to_wire
from blockd.policy import Verdict
from blockd.repeats import BlockedRepeat

CLIENT_QUERY = pb.Message.CLIENT_QUERY
CLIENT_RESPONSE = pb.Message.CLIENT_RESPONSE
FORWARDER_QUERY = pb.Message.FORWARDER_QUERY
FORWARDER_RESPONSE = pb.Message.FORWARDER_RESPONSE

# blockd's actions as dnstap's Policy.Action; refused has no dnstap action (left unset), and
# monitor resolves unchanged: PASS (the JSON query log says "monitor").
POLICY_ACTIONS = {
    "sinkhole": pb.Policy.LOCAL_DATA,
    "local-data": pb.Policy.LOCAL_DATA,
    "nxdomain": pb.Policy.NXDOMAIN,
    "nodata": pb.Policy.NODATA,
    "drop": pb.Policy.DROP,
    "tcp-only": pb.Policy.TRUNCATE,
    "passthru": pb.Policy.PASS,
    "monitor": pb.Policy.PASS,
}
_PROTOCOLS = {"udp": pb.UDP, "tcp": pb.TCP}
DENIED_RULE = "server.allow"  # the Policy rule of a query refused because of who asked

# Tags of the per-query fields: field number << 3 | wire type (0 varint, 2 bytes, 5 fixed32).
_QUERY_PORT = b"\x30"  # 6
_RESPONSE_PORT = b"\x38"  # 7
_QUERY_TIME_SEC = b"\x40"  # 8
_QUERY_TIME_NSEC = b"\x4d"  # 9
_QUERY_MESSAGE = b"\x52"  # 10
_RESPONSE_TIME_SEC = b"\x60"  # 12
_RESPONSE_TIME_NSEC = b"\x6d"  # 13
_RESPONSE_MESSAGE = b"\x72"  # 14
_DNSTAP_MESSAGE = b"\x72"  # Dnstap.message is field 14 too
_FIXED32 = struct.Struct("<I").pack

try:  # the C loop of repeat_streams, built with the package where a compiler was there (optional)
    from blockd import _dnstap_fast as _fast
except ImportError:  # pragma: no cover - a build without it: the Python loop does the same
    _fast = None  # type: ignore[assignment]
_NS = 1_000_000_000


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Varints(dict[int, bytes]):
    """Ports and message lengths (below 65,536 except for rare pairs of large TCP messages)."""

    def __missing__(self, value: int) -> bytes:
        encoded = varint(value)
        if value < 0x10000:
            self[value] = encoded
        return encoded


class PolicyFacts(NamedTuple):
    """What the dnstap Policy says: a tuple, so payload templates are kept per policy (and its
    hash and equality are C-level: the writer looks one up per event)."""

    type: str  # "blockd", or "rpz" for a list that is a Response Policy Zone
    rule: str  # the list's name
    action: int | None  # dnstap Policy.Action
    match: int  # dnstap Policy.Match
    value: bytes  # the matched entry: a wire-format name, or an address in network order


def policy_facts(verdict: Verdict | None, denied: bool = False, client: str = "") -> PolicyFacts | None:
    """The Policy of an answer: the verdict that changed (or monitored) it, or the refusal."""
    if denied:
        return PolicyFacts("blockd", DENIED_RULE, None, pb.Policy.CLIENT_IP, _address_bytes(client))
    if verdict is None:
        return None
    if verdict.via == "address":
        match, value = pb.Policy.RESPONSE_IP, _address_bytes(verdict.domain)
    else:
        match, value = pb.Policy.QNAME, key_to_wire(verdict.domain)
    kind = "rpz" if verdict.source == "rpz" else "blockd"
    return PolicyFacts(kind, verdict.list_name, POLICY_ACTIONS.get(verdict.action), match, value)


def _address_bytes(text: str) -> bytes:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).packed
    except ValueError:
        return b""


def _family_and_address(host: str) -> tuple[int, bytes]:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return pb.INET, b""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return (pb.INET if address.version == 4 else pb.INET6), address.packed


class _Templates(dict[tuple[object, ...], bytes]):
    """(message type, transport, host, policy, zone) -> the serialized fields that do not vary."""

    def __missing__(self, key: tuple[object, ...]) -> bytes:
        message_type, transport, host, policy, zone = key
        family, address = _family_and_address(str(host))
        message = pb.Message(type=message_type, socket_family=family, socket_protocol=_PROTOCOLS[str(transport)])
        if message_type in (FORWARDER_QUERY, FORWARDER_RESPONSE):
            message.response_address = address  # the upstream answers a query blockd initiated
            message.query_zone = zone
        else:
            message.query_address = address
        if isinstance(policy, PolicyFacts):
            message.policy.type = policy.type
            message.policy.rule = policy.rule.encode()
            if policy.action is not None:
                message.policy.action = policy.action
            message.policy.match = policy.match
            message.policy.value = policy.value
        if len(self) >= _TEMPLATE_LIMIT:
            self.clear()
        encoded: bytes = message.SerializeToString()
        self[key] = encoded
        return encoded


_TEMPLATE_LIMIT = 50_000


_Kept = tuple[BlockedRepeat, bytes, bytes, bytes, bytes, bytes]  # repeat, query head, query size, between,
# response size, response tail: the parts of a repeat's frames between its per-query fields

# Seconds whose varint is 5 bytes (1978 to 3058): the kept parts' lengths assume that size.
_SECOND_LOW, _SECOND_HIGH = 1 << 28, 1 << 35
_TIME_FIELD = 1 + 5 + 1 + 4  # tag, seconds, tag, nanoseconds


class _Ports(dict[int, bytes]):
    """Port -> the query_port field."""

    def __missing__(self, port: int) -> bytes:
        field = self[port] = _QUERY_PORT + varint(port)
        return field


class PayloadEncoder:
    """dnstap payloads for one identity and version (writer thread: not shared between threads)."""

    def __init__(self, identity: bytes, version: bytes):
        envelope = pb.Dnstap(type=pb.Dnstap.MESSAGE)
        if identity:
            envelope.identity = identity
        if version:
            envelope.version = version
        head: bytes = envelope.SerializeToString()
        self._head = head + _DNSTAP_MESSAGE
        self._templates = _Templates()
        self._varints = _Varints()
        self._ports = _Ports()
        self._pairs: dict[tuple[str, str, PolicyFacts | None], tuple[bytes, bytes]] = {}
        # Per mode (with CLIENT_QUERY or not): (repeat, client, transport, port field size) -> parts
        # (a BlockedRepeat hashes by identity, and the key holds it: no stale entry for a new one)
        self._kept: tuple[dict[tuple[object, ...], _Kept], dict[tuple[object, ...], _Kept]] = ({}, {})
        self.fast = True  # use blockd._dnstap_fast when it was built (tests turn it off to compare)
        self._second = -1
        self._query_second = b""  # the query_time_sec field and the nsec tag, for self._second
        self._response_second = b""

    def _times(self, second: int) -> None:
        """Keep the time fields up to the nanoseconds, for a query and a response time in `second`."""
        seconds = varint(second)
        self._second = second
        self._query_second = _QUERY_TIME_SEC + seconds + _QUERY_TIME_NSEC
        self._response_second = _RESPONSE_TIME_SEC + seconds + _RESPONSE_TIME_NSEC

    def client_stream(
        self,
        host: str,
        port: int,
        transport: str,
        query: bytes,
        response: bytes | None,
        received_ns: int,
        answered_ns: int,
        policy: PolicyFacts | None,
        with_query: bool,
    ) -> bytes:
        """The data frames (blockd.fstrm) of CLIENT_QUERY (when with_query, or when there is no
        response) and CLIENT_RESPONSE: the writer's hot path.

        One join of kept and per-query parts, the lengths added up rather than measured, no
        Python code per field.  (Patching the per-query bytes into a kept copy of both frames was
        tried: it measured twice as slow, bytearray slice assignments costing more than a join.)
        """
        pair = self._pairs.get((transport, host, policy))
        if pair is None:
            pair = self._pair(transport, host, policy)
        query_template, response_template = pair
        varints = self._varints
        head = self._head
        port_field = self._ports[port]
        second, nano = divmod(received_ns, _NS)
        if second != self._second:
            self._times(second)
        query_time = self._query_second + _FIXED32(nano)
        common = len(port_field) + len(query_time)
        parts: tuple[bytes, ...] = ()
        if with_query or response is None:
            size = varints[len(query)]
            length = len(query_template) + common + 1 + len(size) + len(query)
            envelope = varints[length]
            parts = (FRAME_LENGTH(len(head) + len(envelope) + length), head, envelope, query_template)
            parts += (port_field, query_time, _QUERY_MESSAGE, size, query)
        if response is not None:
            answer_second, answer_nano = divmod(answered_ns, _NS)
            if answer_second != self._second:
                self._times(answer_second)
            response_time = self._response_second + _FIXED32(answer_nano)
            size = varints[len(response)]
            length = len(response_template) + common + len(response_time) + 1 + len(size) + len(response)
            envelope = varints[length]
            parts += (FRAME_LENGTH(len(head) + len(envelope) + length), head, envelope, response_template)
            parts += (port_field, query_time, response_time)
            parts += (_RESPONSE_MESSAGE, size, response)
        return b"".join(parts)

    def repeat_streams(
        self,
        events: list[tuple[str, int, str, bytes, BlockedRepeat, int]],
        policy_of: Callable[[Verdict], PolicyFacts],
        with_query: bool,
    ) -> bytes:
        """client_stream() for repeated blocked queries (blockd.repeats), each (client, port,
        transport, query ID, repeat, answered at): the blocked path.  The query is the ID and
        repeat.query_tail, the answer the ID and repeat.answer_tail.

        A repeat's query (after its ID) and answer (after the same ID) are the same bytes each
        time, so everything between the per-query fields is kept per (repeat, client): a
        lookup's two frames are one join of twelve parts, in one loop with no call per lookup.
        Measured per lookup, both frames: ~1 us in this loop, against ~2.3 us through
        client_stream() and ~11 us through the protobuf library; about half that in C
        (blockd/_dnstap_fast.c, used when it was built: the loop was 14 % of the reactor's time at
        60,000 blocked qps; `python bench/dnstap_encode.py` measures both).
        (Building the parts column by column with map() and zip(), as the query log does, measured
        no faster: twelve parts are too many passes.)
        """
        kept_for = self._kept[with_query]
        if _fast is not None and self.fast:

            def keep(key: tuple[object, ...], event: tuple[str, int, str, bytes, BlockedRepeat, int]) -> _Kept:
                host, port, transport, _, repeat, _ = event
                return self._keep_repeat(key, repeat, host, port, transport, policy_of(repeat.verdict), with_query)

            frames_or_none = _fast.repeat_frames(
                events, kept_for, self._ports, with_query, self._time_fields, keep, _SECOND_LOW, _SECOND_HIGH
            )
            if frames_or_none is not None:
                return frames_or_none
        return self._repeat_streams(events, kept_for, policy_of, with_query)

    def _time_fields(self, second: int) -> tuple[bytes, bytes]:
        if second != self._second:
            self._times(second)
        return self._query_second, self._response_second

    def _repeat_streams(
        self,
        events: list[tuple[str, int, str, bytes, BlockedRepeat, int]],
        kept_for: dict[tuple[object, ...], _Kept],
        policy_of: Callable[[Verdict], PolicyFacts],
        with_query: bool,
    ) -> bytes:
        """repeat_streams in Python: the specification of blockd/_dnstap_fast.c, and the fallback
        where it is not built (or for a batch with a time its kept parts cannot carry)."""
        ports = self._ports
        fixed32 = _FIXED32
        frames: list[bytes] = []
        append, extend = frames.append, frames.extend
        current = -1  # the second whose time fields are in self._query_second and _response_second
        for event in events:
            host, port, transport, query_id, repeat, at_ns = event
            second, nano = divmod(at_ns, _NS)
            if second != current:
                if not _SECOND_LOW <= second < _SECOND_HIGH:  # kept parts assume a 5-byte seconds field
                    query = query_id + repeat.query_tail
                    answer = query_id + repeat.answer_tail
                    policy = policy_of(repeat.verdict)
                    append(self.client_stream(host, port, transport, query, answer, at_ns, at_ns, policy, with_query))
                    current = -1
                    continue
                if second != self._second:
                    self._times(second)
                current = second
            port_field = ports[port]
            key = (repeat, host, transport, len(port_field))
            kept = kept_for.get(key)
            if kept is None:
                policy = policy_of(repeat.verdict)
                kept = self._keep_repeat(key, repeat, host, port, transport, policy, with_query)
            nanoseconds = fixed32(nano)
            query_time = self._query_second + nanoseconds
            if with_query:  # the query frame up to its per-query fields, its length field, ...
                extend((kept[1], port_field, query_time, kept[2], query_id))
            response_time = self._response_second + nanoseconds
            # the query after its ID (with_query) and the response frame's head, its length field, the
            # response after its ID
            extend((kept[3], port_field, query_time, response_time, kept[4], query_id, kept[5]))
        return b"".join(frames)

    def _keep_repeat(
        self,
        key: tuple[object, ...],
        repeat: BlockedRepeat,
        host: str,
        port: int,
        transport: str,
        policy: PolicyFacts,
        with_query: bool,
    ) -> tuple[BlockedRepeat, bytes, bytes, bytes, bytes, bytes]:
        """The parts of a repeat's frames between the per-query fields (as client_stream lays them out)."""
        query_length = 2 + len(repeat.query_tail)
        query_template, response_template = self._pair(transport, host, policy)
        varints = self._varints
        head = self._head
        fields = len(self._ports[port]) + _TIME_FIELD  # port and query time
        query_size = _QUERY_MESSAGE + varints[query_length]
        length = len(query_template) + fields + len(query_size) + query_length
        envelope = varints[length]
        query_head = FRAME_LENGTH(len(head) + len(envelope) + length) + head + envelope + query_template
        answer_length = 2 + len(repeat.answer_tail)
        response_size = _RESPONSE_MESSAGE + varints[answer_length]
        length = len(response_template) + fields + _TIME_FIELD + len(response_size) + answer_length
        envelope = varints[length]
        response_head = FRAME_LENGTH(len(head) + len(envelope) + length) + head + envelope + response_template
        between = repeat.query_tail + response_head if with_query else response_head
        kept = (repeat, query_head, query_size, between, response_size, repeat.answer_tail)
        kept_for = self._kept[with_query]
        if len(kept_for) >= _TEMPLATE_LIMIT:
            kept_for.clear()
        kept_for[key] = kept
        return kept

    def _pair(self, transport: str, host: str, policy: PolicyFacts | None) -> tuple[bytes, bytes]:
        pair = self._pairs.get((transport, host, policy))
        if pair is not None:
            return pair
        pair = (
            self._templates[(CLIENT_QUERY, transport, host, policy, b"")],
            self._templates[(CLIENT_RESPONSE, transport, host, policy, b"")],
        )
        if len(self._pairs) >= _TEMPLATE_LIMIT:
            self._pairs.clear()
        self._pairs[(transport, host, policy)] = pair
        return pair

    def client_query(
        self, host: str, port: int, transport: str, query: bytes, received_ns: int, policy: PolicyFacts | None
    ) -> bytes:
        """One CLIENT_QUERY payload (without its frame)."""
        return self.client_stream(host, port, transport, query, None, received_ns, 0, policy, True)[4:]

    def client_response(
        self,
        host: str,
        port: int,
        transport: str,
        response: bytes,
        received_ns: int,
        answered_ns: int,
        policy: PolicyFacts | None,
    ) -> bytes:
        """One CLIENT_RESPONSE payload (without its frame)."""
        return self.client_stream(host, port, transport, b"", response, received_ns, answered_ns, policy, False)[4:]

    def forwarder(
        self,
        host: str,
        port: int,
        transport: str,
        query: bytes,
        sent_ns: int,
        response: bytes | None,
        answered_ns: int,
    ) -> list[bytes]:
        """FORWARDER_QUERY (and FORWARDER_RESPONSE when the upstream answered) for one exchange."""
        varints = self._varints
        second, nano = divmod(sent_ns, _NS)
        common = (_RESPONSE_PORT, varints[port], _QUERY_TIME_SEC, varint(second), _QUERY_TIME_NSEC, _FIXED32(nano))
        template = self._templates[(FORWARDER_QUERY, transport, host, None, b"\x00")]
        asked = b"".join((template, *common, _QUERY_MESSAGE, varints[len(query)], query))
        payloads = [b"".join((self._head, varint(len(asked)), asked))]
        if response is not None:
            answer_second, answer_nano = divmod(answered_ns, _NS)
            template = self._templates[(FORWARDER_RESPONSE, transport, host, None, b"\x00")]
            times = (_RESPONSE_TIME_SEC, varint(answer_second), _RESPONSE_TIME_NSEC, _FIXED32(answer_nano))
            answered = b"".join((template, *common, *times, _RESPONSE_MESSAGE, varint(len(response)), response))
            payloads.append(b"".join((self._head, varint(len(answered)), answered)))
        return payloads
