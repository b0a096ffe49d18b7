"""`blockd explain`: why a name is (or is not) blocked for a client, from the real policy code.

The same steps the query path takes for a question, on a policy snapshot: is the client allowed,
which group it is in, which list and entry match (or which exception lets the name through), the
effective action and the answer blockd would give, and what egress does with the name.  The
command runs it on the config and lists on disk; the admin listener's /explain on the running
policy (which may differ from the files until a reload).  Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

from dnslib import QTYPE

from blockd.config import BLOCKING_ACTIONS
from blockd.names import InvalidNameError, ancestors, normalize
from blockd.policy import DNSSEC_INFRASTRUCTURE_TYPES, LETS_THROUGH, Policy

TYPE_A, TYPE_AAAA = 1, 28


class ExplainError(ValueError):
    """The name, client or type cannot be explained (a usage error, exit 2)."""


@dataclass(frozen=True)
class Explanation:
    name: str  # the lookup key (lowercase, A-labels)
    client: str
    qtype: int
    allowed: bool
    group: str | None
    blocked: bool  # blockd answers it itself (or drops it) instead of forwarding
    action: str | None  # the effective action of the matching entry
    list: str | None
    entry: str | None  # the entry that matched ("tiktok.com", "*.tiktok.com" for an RPZ wildcard)
    exception: str | None  # the group's allow entry that lets the name through
    answer: str  # what the client gets, in words
    egress: str  # what egress does with the name's addresses

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def explain(policy: Policy, name: str, client: str, qtype: int = TYPE_A) -> Explanation:
    """Raises ExplainError for a name or client address that is not one."""
    try:
        key = normalize(name)
    except InvalidNameError as exc:
        raise ExplainError(f"{name!r}: {exc}") from None
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise ExplainError(f"{client!r} is not an IP address") from None
    who = policy.classifier.classify(client)
    asked = (key, client, qtype, who.allowed)
    if not who.allowed:
        answer = "REFUSED (EDE 18 Prohibited): the client is outside [server] allow"
        return Explanation(*asked, None, True, "refused", None, None, None, answer, "none")
    group = who.group
    if group is None:
        return _forwarded(asked, None, None, "the client is in no group")
    if qtype in DNSSEC_INFRASTRUCTURE_TYPES:
        return _forwarded(asked, group.name, None, "DNSSEC infrastructure types are always forwarded")
    match = policy.index.lookup(key, group.mask, group.order) if group.mask else None
    if match is None:
        return _forwarded(asked, group.name, None, "no list of the group has it")
    exception = _allow_entry(policy, group.name, key)
    if exception is not None:
        return _forwarded(asked, group.name, exception, f"the group's allow entry {exception!r} beats the lists")
    verdict = policy.check(group, key)
    assert verdict is not None  # listed and not an exception: what check() decides too
    blocked = verdict.action not in LETS_THROUGH
    answer = _answer(verdict.action, qtype, group.sinkhole_a, group.sinkhole_aaaa, group.ttl)
    egress = _egress(policy, group.action) if blocked else "none"
    return Explanation(
        *asked, group.name, blocked, verdict.action, verdict.list_name, verdict.domain, None, answer, egress
    )


def _forwarded(asked: tuple[str, str, int, bool], group: str | None, exception: str | None, why: str) -> Explanation:
    answer = f"forwarded to the upstreams ({why}); the answer is still checked (CNAME chain, addresses)"
    return Explanation(*asked, group, False, None, None, None, exception, answer, "none")


def _allow_entry(policy: Policy, group_name: str, key: str) -> str | None:
    """The topmost ancestor of key on the group's allow list (allow entries cover their subtree)."""
    group = policy.groups[group_name]
    found = None
    for name in ancestors(key):
        if group.allow.contains(name):
            found = name
        else:
            break
    return found


def _answer(action: str, qtype: int, sinkhole_a: bytes, sinkhole_aaaa: bytes, ttl: int) -> str:
    if action == "sinkhole":
        if qtype == TYPE_A:
            return f"A {ipaddress.IPv4Address(sinkhole_a)} (TTL {ttl}), EDE 15 Blocked naming the list"
        if qtype == TYPE_AAAA:
            return f"AAAA {ipaddress.IPv6Address(sinkhole_aaaa)} (TTL {ttl}), EDE 15 Blocked naming the list"
        return "NODATA with blockd's SOA, EDE 15 Blocked"
    return {
        "nxdomain": "NXDOMAIN with blockd's SOA, EDE 15 Blocked",
        "nodata": "NODATA with blockd's SOA, EDE 15 Blocked",
        "refused": "REFUSED, EDE 15 Blocked",
        "drop": "no answer (RPZ drop)",
        "tcp-only": "over UDP an empty answer with TC set (the client retries over TCP); over TCP forwarded",
        "local-data": "the RPZ rule's local data",
        "monitor": "forwarded as usual, counted and logged as a would-be block (monitor)",
        "passthru": "forwarded: an RPZ passthru rule",
    }.get(action, action)


def _egress(policy: Policy, group_action: str) -> str:
    settings = policy.config.egress
    if not settings.enabled or group_action not in BLOCKING_ACTIONS:
        return "none ([egress] is off)" if not settings.enabled else "none"
    if not settings.learn:
        return f"the group's networks are routed via table {settings.table} (static prefixes only: learn = false)"
    return (
        f"blockd resolves the name itself and routes its addresses to prohibit in table {settings.table} "
        "for the group's networks (learn = true)"
    )


def render(explanation: Explanation) -> str:
    e = explanation
    lines = [f"{e.name} ({_type_text(e.qtype)}) asked by {e.client}:"]
    if not e.allowed:
        lines.append("  client: not allowed ([server] allow)")
    else:
        lines.append(f"  group: {e.group if e.group is not None else '(none)'}")
    if e.list is not None:
        lines.append(f"  matched: entry {e.entry} on list {e.list}, action {e.action}")
    if e.exception is not None:
        lines.append(f"  exception: {e.exception} (the group's allow list)")
    lines.append(f"  answer: {e.answer}")
    lines.append(f"  egress: {e.egress}")
    lines.append(f"  verdict: {'BLOCKED' if e.blocked else 'not blocked'}")
    return "\n".join(lines) + "\n"


def _type_text(qtype: int) -> str:
    text: str = QTYPE[qtype]  # the mnemonic, or TYPEn (RFC 3597)
    return text


def parse_qtype(text: str) -> int:
    """A type from the command line: a mnemonic (AAAA), TYPEn or a number.  Raises ExplainError."""
    word = text.strip().upper()
    if word.isdigit():
        value = int(word)
    elif word.startswith("TYPE") and word[4:].isdigit():
        value = int(word[4:])
    else:
        found = QTYPE.reverse.get(word)
        if not isinstance(found, int):
            raise ExplainError(f"{text!r} is not a DNS type")
        value = found
    if not 0 < value < 65536:
        raise ExplainError(f"{text!r} is not a DNS type")
    return value
