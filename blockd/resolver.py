"""The query path: bytes in, bytes out.

    parse (fast path, dnslib fallback) -> allowed? -> classify client -> policy -> forward

Blocked names are answered here from bytes without touching dnslib; everything else goes to
the upstreams, and the answer is fitted to the client (ID restored, TC when it does not fit
the client's UDP size).  The policy snapshot is read once per query, so a reload swapping it
never changes a query half-way.  Errors map to rcodes here and nowhere else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd import slowpath, wire
from blockd.metrics import Metrics
from blockd.policy import NO_GROUP, Group, Policy, Verdict
from blockd.upstream import UpstreamError, Upstreams
from blockd.wire import Query

_log = Logger()


class QueryObserver(Protocol):
    """Receives one call per answered query (the query log)."""

    def __call__(
        self, client: str, group: Group | None, query: Query, verdict: Verdict | None, rcode: int, denied: bool = False
    ) -> None: ...


def _no_log(
    client: str, group: Group | None, query: Query, verdict: Verdict | None, rcode: int, denied: bool = False
) -> None:
    return None


class Resolver:
    def __init__(
        self,
        policy: Callable[[], Policy],
        upstreams: Upstreams,
        metrics: Metrics,
        query_log: QueryObserver = _no_log,
    ):
        self.policy = policy
        self.upstreams = upstreams
        self.metrics = metrics
        self.query_log = query_log

    def handle(self, data: bytes, client: str, transport: str) -> bytes | defer.Deferred[bytes | None] | None:
        """Answer one query: bytes now, a Deferred for forwarded queries, None to drop."""
        metrics = self.metrics
        record = None
        try:
            query = wire.parse_query(data)
            if query is None:
                query, record = slowpath.parse_query_slow(data)
        except wire.Drop:
            metrics.count_drop("response" if len(data) >= 12 else "short")
            return None
        except wire.HeaderOnlyError as exc:
            metrics.count_query(NO_GROUP, transport, 0)
            metrics.count_response(exc.rcode)
            return wire.header_only_response(exc.query_id, exc.flags, exc.rcode)
        except slowpath.BadVersion as exc:
            metrics.count_query(NO_GROUP, transport, exc.query.qtype)
            metrics.count_response(slowpath.RCODE_BADVERS)
            return slowpath.badvers_response(exc.query)

        policy = self.policy()
        allowed, group = policy.client(client)
        metrics.count_query(group.name if group is not None else NO_GROUP, transport, query.qtype)
        if not allowed:
            metrics.count_response(wire.RCODE_REFUSED)
            self.query_log(client, group, query, None, wire.RCODE_REFUSED, denied=True)
            return wire.error_response(query, wire.RCODE_REFUSED, wire.EDE_PROHIBITED, "client not allowed")

        verdict = policy.check(group, query.key) if group is not None else None
        if verdict is not None:
            metrics.count_blocked(group.name, verdict.list_name, verdict.action)  # type: ignore[union-attr]
            if verdict.blocks:
                answer = self._blocked(query, record, verdict)
                rcode = answer[3] & 0x0F
                metrics.count_response(rcode)
                self.query_log(client, group, query, verdict, rcode)
                return answer

        deferred = self.upstreams.resolve(query.raw, query.question)
        return deferred.addCallbacks(
            self._fit,
            self._servfail,
            callbackArgs=(query, transport, client, group, verdict),
            errbackArgs=(query, client, group, verdict),
        )

    def _blocked(self, query: Query, record: object, verdict: Verdict) -> bytes:
        group = verdict.group
        if record is None:
            return wire.blocked_response(
                query, verdict.action, group.ttl, group.sinkhole_a, group.sinkhole_aaaa, verdict.ede_text
            )
        return slowpath.blocked_response_slow(
            record,  # type: ignore[arg-type]
            query,
            verdict.action,
            group.ttl,
            group.sinkhole_a,
            group.sinkhole_aaaa,
            verdict.ede_text,
        )

    def _fit(
        self, answer: bytes, query: Query, transport: str, client: str, group: Group | None, verdict: Verdict | None
    ) -> bytes:
        """The upstream answer with the client's ID, truncated (TC) if it exceeds the client's UDP size."""
        answer = struct.pack("!H", query.id) + answer[2:]
        if transport == "udp" and len(answer) > query.response_limit:
            flags = struct.unpack_from("!H", answer, 2)[0]
            opt = wire.opt_record(query.dnssec_ok) if query.edns else b""
            answer = (
                struct.pack("!HHHHHH", query.id, flags | wire.FLAG_TC, 1, 0, 0, 1 if opt else 0) + query.question + opt
            )
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.query_log(client, group, query, verdict, rcode)
        return answer

    def _servfail(
        self, failure: Failure, query: Query, client: str, group: Group | None, verdict: Verdict | None
    ) -> bytes:
        if not failure.check(UpstreamError):
            _log.failure("forwarding {name} failed", failure, name=query.key)
        self.metrics.count_response(wire.RCODE_SERVFAIL)
        self.query_log(client, group, query, verdict, wire.RCODE_SERVFAIL)
        return wire.error_response(query, wire.RCODE_SERVFAIL, wire.EDE_NO_REACHABLE_AUTHORITY, "no upstream answered")
