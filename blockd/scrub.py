"""Scrubbing forwarded answers: a client gets only what the question's bailiwick chain vouches for.

An upstream answer is trusted for the question asked and nothing else, as Unbound's scrubber
trusts it (iterator/iter_scrub.c: scrub_normalize, mark_additional_rrset).  Kept, by section:

  answer      the chain from the question name: at each name its CNAME (the first, should an
              RRset hold more), or a DNAME owned by an ancestor of the name together with the
              CNAME synthesized from it when the upstream sent one (blockd adds none); at the
              chain's end the records of the question type (for ANY, every type at every name on
              the chain);
  authority   for NXDOMAIN and NODATA, one SOA owned by the chain's end or an ancestor of it;
              one NS RRset owned by the chain's end or an ancestor; NSEC and NSEC3 inside the zone
              of that SOA or of a kept answer signature's signer (denial and wildcard proofs);
  additional  A and AAAA of names that kept NS, MX and SRV records point to; the OPT record;

and in every section the RRSIGs covering a kept RRset (same owner, type covered), so clients that
set DO still validate.  Everything else is removed: records of another class, owners off the
chain, any other type, and A/AAAA records of the wrong length (as Unbound's sanitizer does).
Unlike Unbound, blockd keeps an ancestor's NS in negative answers too (the zone's own servers:
nothing a stub acts on, and what a forwarder behind blockd may expect), and applies the rules
whatever the rcode (Unbound leaves all but NOERROR, NXDOMAIN and YXDOMAIN alone).

Cost: one walk over the bytes, with each name read once (a pointer to a name already read is a
dict lookup).  An answer with nothing to remove comes back as the same bytes object; only when
records go is the message rebuilt, names decompressed and compressed again, since a pointer into
a removed record would otherwise dangle.  A message that cannot be read raises MalformedAnswer,
as blockd.upstream_answer.analyze does; so does one without exactly one question (Unbound refuses
those too; blockd.upstream never passes one on), and one with a name that scrub reads (a CNAME,
DNAME, NS, MX or SRV target, an RRSIG signer, any name of a record being rewritten) running past
its record.

Metrics: the caller counts Scrubbed.removed (blockd_scrubbed_records_total{section}).
Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from blockd.upstream_answer import MalformedAnswer, read_name
from blockd.wire import (
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_CNAME,
    TYPE_DNAME,
    TYPE_MX,
    TYPE_NS,
    TYPE_OPT,
    TYPE_SOA,
    TYPE_SRV,
)

TYPE_RRSIG = 46
TYPE_NSEC = 47
TYPE_NSEC3 = 50
ANSWER, AUTHORITY, ADDITIONAL = 0, 1, 2  # indices of Scrubbed.removed
NOTHING_REMOVED = (0, 0, 0)
# Links followed at most (Unbound stops at 11 and chases the rest itself; a forwarder cannot):
# an upstream's DNAMEs could otherwise rewrite a name back and forth for a long time.
MAX_CHAIN = 32

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_RRSIG_FIXED = 18  # type covered .. key tag, before the signer's name
_ADDRESS_LENGTH = {TYPE_A: 4, TYPE_AAAA: 16}
# Where the name that glue is for sits in the rdata (Unbound get_additional_name).
_GLUE_NAME_OFFSET = {TYPE_NS: 0, TYPE_MX: 2, TYPE_SRV: 6}

# Rdata layouts with names in them (RFC 3597 section 4: a receiver decompresses all of these):
# an int is that many bytes copied, _NAME a domain name, _STRING a character-string; whatever
# follows the layout is copied as it is.
_NAME = "name"
_STRING = "string"
_LAYOUTS: dict[int, tuple[int | str, ...]] = {
    **dict.fromkeys((2, 3, 4, 5, 7, 8, 9, 12, 39), (_NAME,)),  # NS MD MF CNAME MB MG MR PTR DNAME
    6: (_NAME, _NAME, 20),  # SOA
    14: (_NAME, _NAME),  # MINFO
    17: (_NAME, _NAME),  # RP
    **dict.fromkeys((15, 18, 21, 36), (2, _NAME)),  # MX AFSDB RT KX
    26: (2, _NAME, _NAME),  # PX
    33: (6, _NAME),  # SRV
    35: (4, _STRING, _STRING, _STRING, _NAME),  # NAPTR
    **dict.fromkeys((24, 46), (_RRSIG_FIXED, _NAME)),  # SIG RRSIG
    **dict.fromkeys((30, 47), (_NAME,)),  # NXT NSEC
}
# Only RFC 1035's own types may carry compressed names on the way out (RFC 3597 section 4).
_COMPRESSIBLE = frozenset((2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15))

Name = tuple[bytes, ...]  # lowercase labels, the root's empty label left out


class Scrubbed(NamedTuple):
    answer: bytes  # the input object itself when nothing was removed
    removed: tuple[int, int, int]  # records removed from the answer, authority, additional sections


class _Record:
    __slots__ = ("section", "owner", "rtype", "rclass", "start", "fixed", "rdata", "end", "kept")

    def __init__(self, section: int, owner: Name, rtype: int, rclass: int, start: int, fixed: int, end: int):
        self.section = section
        self.owner = owner
        self.rtype = rtype
        self.rclass = rclass
        self.start = start  # the owner name
        self.fixed = fixed  # type, class, TTL, rdlength
        self.rdata = fixed + 10
        self.end = end
        self.kept = False


def _within(name: Name, zone: Name) -> bool:
    """name is zone or below it."""
    cut = len(name) - len(zone)
    return cut >= 0 and name[cut:] == zone


def _wire_length(name: Name) -> int:
    return sum(len(label) for label in name) + len(name) + 1


class _Message:
    """The parsed skeleton of an answer: the question and every record's place, names lowercased."""

    def __init__(self, data: bytes):
        self.data = data
        self.memo: dict[int, tuple[Name, int]] = {}
        size = len(data)
        if size < 12:
            raise MalformedAnswer("shorter than a header")
        _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if qdcount != 1:
            raise MalformedAnswer("not exactly one question")
        self.rcode = flags & 0x0F
        self.qname, pos = self.name(12)
        if pos + 4 > size:
            raise MalformedAnswer("question truncated")
        self.qtype, self.qclass = struct.unpack_from("!HH", data, pos)
        self.question_end = pos + 4
        self.records: list[_Record] = []
        self.sections: tuple[list[_Record], list[_Record], list[_Record]] = ([], [], [])
        self.signed = [False, False, False]  # a section holds RRSIGs
        pos = self.question_end
        for section, count in ((ANSWER, ancount), (AUTHORITY, nscount), (ADDITIONAL, arcount)):
            records = self.sections[section]
            for _ in range(count):
                owner, fixed = self.name(pos)
                if fixed + 10 > size:
                    raise MalformedAnswer("record header truncated")
                rtype, rclass, _ttl, rdlength = _RR.unpack_from(data, fixed)
                end = fixed + 10 + rdlength
                if end > size:
                    raise MalformedAnswer("rdata truncated")
                record = _Record(section, owner, rtype, rclass, pos, fixed, end)
                if rtype == TYPE_CNAME or rtype == TYPE_DNAME:
                    self.name(fixed + 10)  # read now: the names after it point here
                elif rtype == TYPE_RRSIG:
                    self.signed[section] = True
                self.records.append(record)
                records.append(record)
                pos = end

    def name(self, pos: int) -> tuple[Name, int]:
        """The lowercase name at pos and the offset after it.  Each name is read once: reading it
        again, or a pointer to where one was read, is a lookup."""
        memo = self.memo
        known = memo.get(pos)
        if known is not None:
            return known
        data = self.data
        if pos + 1 < len(data) and data[pos] >= 0xC0:
            target = ((data[pos] & 0x3F) << 8) | data[pos + 1]
            pointed = memo.get(target)
            if pointed is not None and target < pos:  # read_name refuses forward pointers: so do we
                return pointed[0], pos + 2
        labels, after = read_name(data, pos)
        read = memo[pos] = (tuple(map(bytes.lower, labels)), after)  # ASCII case only (RFC 4343)
        return read

    def rdata_name(self, record: _Record, offset: int = 0) -> Name:
        """A name in a record's rdata, which must end inside it."""
        name, after = self.name(record.rdata + offset)
        if after > record.end:
            raise MalformedAnswer("name runs past its record")
        return name


class _Verdicts:
    """Which records stay: the rules of the module docstring, section by section."""

    def __init__(self, message: _Message):
        self.message = message
        self.chain, self.links = self._follow_chain()

    def _follow_chain(self) -> tuple[list[Name], list[_Record]]:
        """The names from the question along CNAMEs and DNAMEs, and the records that link them."""
        m = self.message
        cnames: dict[Name, _Record] = {}
        dnames: list[_Record] = []
        for record in m.sections[ANSWER]:
            if record.rclass == m.qclass and record.rtype == TYPE_CNAME:
                cnames.setdefault(record.owner, record)
            elif record.rclass == m.qclass and record.rtype == TYPE_DNAME:
                dnames.append(record)
        name = m.qname
        chain, links, seen = [name], [], {name}
        while (cnames or dnames) and len(chain) <= MAX_CHAIN:
            dname = _applying_dname(name, dnames)
            if dname is not None:
                step = self._through_dname(name, dname, cnames)
            elif name in cnames:
                step = (m.rdata_name(cnames[name]), [cnames[name]])
            else:
                break
            if step is None:
                break
            name, step_links = step
            links.extend(step_links)
            if name in seen:  # a loop: its records are kept, the walk ends
                break
            seen.add(name)
            chain.append(name)
        return chain, links

    def _through_dname(
        self, name: Name, dname: _Record, cnames: dict[Name, _Record]
    ) -> tuple[Name, list[_Record]] | None:
        """Where a DNAME takes name, with the DNAME and the upstream's CNAME synthesized from it."""
        synthesized = name[: len(name) - len(dname.owner)] + self.message.rdata_name(dname)
        if _wire_length(synthesized) > 255:
            return None  # YXDOMAIN (RFC 6672 2.2): the chain ends here
        cname = cnames.get(name)
        if cname is not None and self.message.rdata_name(cname) == synthesized:
            return synthesized, [dname, cname]
        return synthesized, [dname]

    def answer(self) -> bool:
        """Keep the chain and the data at its end; True when there is data there (not NODATA)."""
        m, end = self.message, self.chain[-1]
        for link in self.links:
            link.kept = True
        on_chain = set(self.chain) if m.qtype == TYPE_ANY else {end}
        answered = False
        for record in m.sections[ANSWER]:
            rtype = record.rtype
            if record.rclass != m.qclass or record.owner not in on_chain:
                continue
            if rtype == TYPE_RRSIG and m.qtype != TYPE_RRSIG:
                continue  # judged with the RRset it covers
            if m.qtype == TYPE_ANY:
                if rtype in (TYPE_CNAME, TYPE_DNAME) and not record.kept:
                    continue  # a redirection that is not the chain's
            elif rtype != m.qtype:
                continue
            if _address_length_ok(record):
                record.kept = True
                answered = answered or record.owner == end
        self.signatures(ANSWER)
        return answered

    def authority(self, answered: bool) -> None:
        m, end = self.message, self.chain[-1]
        negative = m.rcode == RCODE_NXDOMAIN or not answered
        soa: Name | None = None
        ns: Name | None = None
        proofs: list[_Record] = []
        for record in m.sections[AUTHORITY]:
            rtype, owner = record.rtype, record.owner
            if record.rclass != m.qclass:
                continue
            if rtype == TYPE_SOA and negative and soa is None and _within(end, owner):
                soa = owner
                record.kept = True
            elif rtype == TYPE_NS and ns in (None, owner) and _within(end, owner):
                ns = owner
                record.kept = True
            elif rtype in (TYPE_NSEC, TYPE_NSEC3):
                proofs.append(record)
        if proofs:
            zones = self._signers(ANSWER)
            if soa is not None:
                zones.add(soa)
            for record in proofs:
                if any(_within(record.owner, zone) for zone in zones):
                    record.kept = True
        self.signatures(AUTHORITY)

    def additional(self) -> None:
        m = self.message
        glue: set[Name] | None = None  # read only when there are addresses to judge
        for record in m.sections[ADDITIONAL]:
            if record.rtype == TYPE_OPT:
                record.kept = True
            elif record.rtype in _ADDRESS_LENGTH and record.rclass == m.qclass and _address_length_ok(record):
                if glue is None:
                    glue = self._glue_names()
                if record.owner in glue:
                    record.kept = True
        self.signatures(ADDITIONAL)

    def signatures(self, section: int) -> None:
        """Keep the RRSIGs of a section that cover an RRset kept in it."""
        if not self.message.signed[section]:
            return
        records = self.message.sections[section]
        covered = {(r.owner, r.rtype) for r in records if r.rtype != TYPE_RRSIG and r.kept}
        data = self.message.data
        for record in records:
            if record.rtype == TYPE_RRSIG and record.end - record.rdata >= _RRSIG_FIXED:
                type_covered = (data[record.rdata] << 8) | data[record.rdata + 1]
                if (record.owner, type_covered) in covered:
                    record.kept = True

    def _signers(self, section: int) -> set[Name]:
        """The zones that signed kept RRSIGs of a section (a signer must be an ancestor of its owner)."""
        zones = set()
        for record in self.message.sections[section]:
            if record.rtype == TYPE_RRSIG and record.kept:
                signer = self.message.rdata_name(record, _RRSIG_FIXED)
                if _within(record.owner, signer):
                    zones.add(signer)
        return zones

    def _glue_names(self) -> set[Name]:
        """The names kept NS, MX and SRV records point to (Unbound mark_additional_rrset)."""
        names = set()
        m = self.message
        for record in (*m.sections[ANSWER], *m.sections[AUTHORITY]):
            offset = _GLUE_NAME_OFFSET.get(record.rtype)
            if offset is not None and record.rdata + offset < record.end and record.kept:
                names.add(m.rdata_name(record, offset))
        return names


def _applying_dname(name: Name, dnames: list[_Record]) -> _Record | None:
    """The first DNAME owned by a proper ancestor of name (RFC 6672: it redirects the name)."""
    for dname in dnames:
        if len(dname.owner) < len(name) and _within(name, dname.owner):
            return dname
    return None


def _address_length_ok(record: _Record) -> bool:
    length = _ADDRESS_LENGTH.get(record.rtype)
    return length is None or record.end - record.rdata == length


def scrub(answer: bytes) -> Scrubbed:
    """The upstream answer with every record outside the question's bailiwick chain removed.

    Raises MalformedAnswer when it cannot be read."""
    data = bytes(answer)
    message = _Message(data)
    verdicts = _Verdicts(message)
    verdicts.authority(verdicts.answer())
    verdicts.additional()
    removed = [0, 0, 0]
    for record in message.records:
        if not record.kept:
            removed[record.section] += 1
    if removed == [0, 0, 0]:
        return Scrubbed(data, NOTHING_REMOVED)
    return Scrubbed(_rebuild(message), (removed[0], removed[1], removed[2]))


# -- rebuilding a message without the removed records ---------------------------------------------


def _rebuild(message: _Message) -> bytes:
    """The message with only its kept records: header, question and kept records in their order."""
    data = message.data
    counts = [sum(1 for r in records if r.kept) for records in message.sections]
    out = bytearray(data[:4])
    out += struct.pack("!HHHH", 1, *counts)
    table: dict[tuple[bytes, ...], int] = {}
    labels, after = read_name(data, 12)
    _put_name(out, labels, table, compress=True)
    out += data[after : after + 4]
    for record in message.records:
        if not record.kept:
            continue
        labels, _after = read_name(data, record.start)
        _put_name(out, labels, table, compress=True)
        out += data[record.fixed : record.fixed + 8]  # type, class, TTL as they were
        length_at = len(out)
        out += b"\0\0"
        _put_rdata(out, data, record, table)
        rdlength = len(out) - length_at - 2
        if rdlength > 0xFFFF:
            raise MalformedAnswer("record too long once its names are decompressed")
        struct.pack_into("!H", out, length_at, rdlength)
    if len(out) > 0xFFFF:
        raise MalformedAnswer("message too long once its names are decompressed")
    return bytes(out)


def _put_name(out: bytearray, labels: list[bytes], table: dict[tuple[bytes, ...], int], compress: bool) -> None:
    """Write a name, as a pointer to an earlier spelling of the same suffix when compress.

    Suffixes are matched with their case, so every name keeps the spelling it came with."""
    for index, label in enumerate(labels):
        if compress:
            suffix = tuple(labels[index:])
            offset = table.get(suffix)
            if offset is not None:
                out += struct.pack("!H", 0xC000 | offset)
                return
            if len(out) < 0x4000:
                table[suffix] = len(out)
        out.append(len(label))
        out += label
    out.append(0)


def _put_rdata(out: bytearray, data: bytes, record: _Record, table: dict[tuple[bytes, ...], int]) -> None:
    """A record's rdata with its names written out again (they may point into removed records)."""
    at, end = record.rdata, record.end
    layout = _LAYOUTS.get(record.rtype, ())
    compress = record.rtype in _COMPRESSIBLE
    for step in layout:
        if step == _NAME:
            labels, at = read_name(data, at)
            _put_name(out, labels, table, compress)
        elif step == _STRING:
            if at >= end:
                raise MalformedAnswer("character-string past its record")
            length = data[at]
            out += data[at : at + 1 + length]
            at += 1 + length
        else:
            assert isinstance(step, int)
            out += data[at : at + step]
            at += step
        if at > end:
            raise MalformedAnswer("rdata shorter than its type needs")
    out += data[at:end]
