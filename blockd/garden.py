"""Walled gardens: an RPZ CNAME to a name of the operator's, answered as a resolver would.

`www.tiktok.com CNAME walled.gov.example.` in a policy zone means: answer the CNAME, and resolve
its target for the client as any of its queries would be (policy, cache, upstream), so the
device reaches the operator's page instead of an error.  The client gets one answer: the CNAME,
then the target's records (or its negative answer and rcode), and blockd's EDE.  Pure: no I/O.
"""

from __future__ import annotations

import dns.exception
import dns.message
import dns.rcode

from blockd.names import key_from_wire_labels
from blockd.policy import Verdict
from blockd.upstream_answer import MalformedAnswer, read_name
from blockd.wire import TYPE_CNAME, Query


def follow_target(verdict: Verdict, query: Query) -> str | None:
    """The name to resolve after a local-data CNAME answer, or None (nothing to follow)."""
    if verdict.action != "local-data" or verdict.rule is None or query.qtype == TYPE_CNAME:
        return None
    for record in verdict.rule.records:
        if record.rtype == TYPE_CNAME:
            try:
                labels, _ = read_name(record.rdata, 0)
            except MalformedAnswer:
                return None
            target = key_from_wire_labels(labels)
            return target if target and "*" not in target else None  # a wildcard target is data, not a name
    return None


def splice(local: bytes, target: bytes) -> bytes:
    """The CNAME answer followed by the target's records, with the target's rcode."""
    try:
        ours = dns.message.from_wire(local)
        theirs = dns.message.from_wire(target)
    except dns.exception.DNSException:
        return local
    ours.answer.extend(theirs.answer)
    if not theirs.answer:
        ours.authority = theirs.authority
        ours.set_rcode(theirs.rcode())
    elif theirs.rcode() != dns.rcode.NOERROR:
        ours.set_rcode(theirs.rcode())
    return ours.to_wire()
