"""Every Prometheus metric blockd exports, defined against one injected registry.

Names follow Prometheus practice: `blockd_` prefix, `_total` counters, base units (seconds).
Label values come only from config (group, list, upstream) or closed sets (transport,
action, rcode, result, qtype folded to QTYPE_LABELS + "other"); never a client address or a
query name.  Series for every configured group and list are created at start so dashboards
see zeros.  Sizes (list entries) are read at scrape time by a collector.

  blockd_dns_queries_total{group,transport}          every query answered
  blockd_dns_query_types_total{qtype}                 queries by (folded) type
  blockd_dns_blocked_total{group,list,action}         every blocked or monitored lookup
  blockd_dns_responses_total{rcode}                   answers sent, by rcode
  blockd_dns_dropped_total{reason}                    packets not answered (malformed, overload)
  blockd_upstream_requests_total{upstream,result}     upstream attempts by outcome
  blockd_upstream_request_duration_seconds{upstream}  successful attempt latency
  blockd_upstream_up{upstream}, blockd_upstream_sockets  (UpstreamHealthCollector, at scrape time)
  blockd_list_domains{list}                           entries loaded per list
  blockd_list_invalid_lines{list}                     lines a lenient list skipped (at scrape time)
  blockd_reloads_total{result}                        success / failure
  blockd_last_reload_success_timestamp_seconds
  blockd_reload_duration_seconds
  blockd_query_log_lines_total, blockd_query_log_dropped_total, blockd_query_log_errors_total
  blockd_cache_requests_total, blockd_cache_hits_total, blockd_cache_evictions_total, blockd_cache_entries,
  blockd_cache_stale_answers_total, blockd_cache_bytes
  blockd_limited_total{reason}                       per-client limits applied (LIMITED_REASONS)
  blockd_query_errors_total                           internal errors answered SERVFAIL/FORMERR
  blockd_limit_clients, blockd_limit_table_overflows_total, blockd_upstream_queries_in_flight,
  blockd_tcp_connections, blockd_repeat_memo_clears_total, blockd_repeat_memo_bytes
                                                      (LimitCollector, at scrape time)
  blockd_build_info{version}
  blockd_group_interface_networks{group}              subnets read from a group's interfaces/VLANs
  blockd_scrubbed_records_total{section}              upstream records removed by blockd.scrub (ScrubMetrics)

With [dnstap] on (DnstapMetrics):
  blockd_dnstap_frames_total{result}                  sent / dropped (queue full, collector gone, write error)
  blockd_dnstap_collector_up                          1 while a collector (or the file) takes the stream

With [egress] enabled (EgressMetrics, fed one ReconcileReport per reconcile, and
EgressCollector, read at scrape time):
  blockd_egress_reconciles_total{result}              success / failure
  blockd_egress_last_reconcile_success_timestamp_seconds
  blockd_egress_reconcile_duration_seconds
  blockd_egress_changes_total{operation}              add_rule, del_rule, add_route, del_route
  blockd_egress_routes{source}                        static, learned, never (throw routes)
  blockd_egress_rules
  blockd_egress_learned_addresses, blockd_egress_learned_total, blockd_egress_learned_expired_total,
  blockd_egress_learned_evicted_total, blockd_egress_never_skipped_total,
  blockd_egress_unroutable_skipped_total
  blockd_egress_followup_lookups_total{result}        started, deduplicated, rate_limited, failed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blockd import __version__

# The *_created series double the scrape size and no dashboard reads them.
disable_created_metrics()

TRANSPORTS = ("udp", "tcp")
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}
QTYPE_LABELS = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
}
ACTIONS = ("sinkhole", "nxdomain", "nodata", "refused", "monitor", "passthru", "drop", "tcp-only", "local-data")
# refused: ICMP port unreachable; servfail / refused_rcode: the upstream answered SERVFAIL / REFUSED.
UPSTREAM_RESULTS = ("success", "timeout", "refused", "error", "truncated", "mismatch", "servfail", "refused_rcode")
DROP_REASONS = ("short", "response", "overload", "send_error", "policy")
RECONCILE_RESULTS = ("success", "failure")
EGRESS_OPERATIONS = ("add_rule", "del_rule", "add_route", "del_route")
EGRESS_ROUTE_SOURCES = ("static", "learned", "never")
FOLLOW_UP_RESULTS = ("started", "deduplicated", "rate_limited", "failed")
# Why blockd_limited_total counted a query or connection (blockd.limits, blockd.server).
LIMITED_REASONS = (
    "rate_drop",  # over its UDP rate: dropped
    "rate_slip",  # over its UDP rate: answered with TC=1 only
    "upstream_in_flight",  # its cap on queries waiting for an upstream: SERVFAIL
    "upstream_total",  # the global cap on queries waiting for an upstream: SERVFAIL
    "tcp_connections",  # its cap on TCP connections: connection closed
    "tcp_full",  # tcp_max_connections reached with no idle connection to close
    "tcp_evicted",  # an idle connection closed to admit a new one
    "tcp_throttled",  # over its rate over TCP: reading paused
    "tcp_message_timeout",  # a message not completed within tcp_message_timeout
    "tcp_empty_frame",  # a zero-length frame: connection closed
    "tcp_write_buffer",  # a client not reading its answers: connection closed
    "kernel_block",  # a client flooding far over its rate: its UDP dropped in the kernel for a while
    "kernel_block_full",  # as many clients blocked in the kernel as the filter holds
)
DNS_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # The four per-query counters are plain dicts exported at scrape time (QueryCounters):
        # a prometheus_client Counter takes a lock per increment, which cost the blocked-answer
        # path ~30%.  Only the reactor thread writes them.
        self.queries: dict[tuple[str, str], int] = {}
        self.query_types: dict[str, int] = dict.fromkeys([*QTYPE_LABELS.values(), "other"], 0)
        self.blocked: dict[tuple[str, str, str], int] = {}
        self.responses: dict[str, int] = dict.fromkeys(set(RCODE_NAMES.values()), 0)
        self.repeat_cells: dict[tuple[str, str, str, str, str, str], list[int]] = {}
        # Per-client limits (blockd.limits): a plain dict, as for the per-query counters, since a
        # flood is counted one limited query at a time.
        self.limited: dict[str, int] = dict.fromkeys(LIMITED_REASONS, 0)
        r.register(QueryCounters(self))
        self.dropped = Counter("blockd_dns_dropped", "Packets given no answer.", ["reason"], registry=r)
        self.upstream_requests = Counter(
            "blockd_upstream_requests", "Upstream query attempts by outcome.", ["upstream", "result"], registry=r
        )
        self.upstream_duration = Histogram(
            "blockd_upstream_request_duration_seconds",
            "Time to a valid upstream answer.",
            ["upstream"],
            buckets=DNS_LATENCY_BUCKETS,
            registry=r,
        )
        self.reloads = Counter("blockd_reloads", "Policy reloads by result.", ["result"], registry=r)
        self.last_reload_success = Gauge(
            "blockd_last_reload_success_timestamp_seconds", "When the serving policy was last loaded.", registry=r
        )
        self.reload_duration = Histogram(
            "blockd_reload_duration_seconds",
            "Time to build and validate a policy.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.query_log_lines = Counter("blockd_query_log_lines", "Query-log lines written.", registry=r)
        self.query_log_dropped = Counter(
            "blockd_query_log_dropped", "Query-log lines lost (queue full or write error).", registry=r
        )
        self.query_log_errors = Counter("blockd_query_log_errors", "Query-log write errors.", registry=r)
        self.interface_networks = Gauge(
            "blockd_group_interface_networks",
            "Subnets a group has from its interfaces and VLANs.",
            ["group"],
            registry=r,
        )
        self.build_info = Gauge("blockd_build_info", "blockd version.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        self.query_errors = Counter(
            "blockd_query_errors", "Queries answered SERVFAIL or FORMERR after an internal error.", registry=r
        )
        self.scrubbed = ScrubMetrics(r)  # answer scrubbing: see its block at the end of this file

    def declare(self, groups: Iterable[tuple[str, Iterable[tuple[str, str]]]], upstreams: Iterable[str]) -> None:
        """Create zero series for every configured group, (list, action) and upstream."""
        for group, list_actions in groups:
            for transport in TRANSPORTS:
                self.queries.setdefault((group, transport), 0)
            for list_name, action in list_actions:
                self.blocked.setdefault((group, list_name, action), 0)
        for upstream in upstreams:
            for result in UPSTREAM_RESULTS:
                self.upstream_requests.labels(upstream, result)
            self.upstream_duration.labels(upstream)

    # Hot path: a dict lookup and an add each.
    def count_query(self, group: str, transport: str, qtype: int) -> None:
        key = (group, transport)
        queries = self.queries
        queries[key] = queries.get(key, 0) + 1
        self.query_types[QTYPE_LABELS.get(qtype, "other")] += 1

    def count_blocked(self, group: str, list_name: str, action: str) -> None:
        key = (group, list_name, action)
        blocked = self.blocked
        blocked[key] = blocked.get(key, 0) + 1

    def repeat_cell(self, group: str, transport: str, qtype: int, list_name: str, action: str, rcode: int) -> list[int]:
        """A one-slot counter for a remembered blocked answer: the hottest path counts with
        cell[0] += 1, and the collector adds the cells to the query, type, blocked and response
        series at scrape time.  One cell per label combination (a small, bounded set)."""
        labels = (group, transport, QTYPE_LABELS.get(qtype, "other"), list_name, action, RCODE_NAMES.get(rcode, ""))
        cell = self.repeat_cells.get(labels)
        if cell is None:
            cell = self.repeat_cells[labels] = [0]
        return cell

    def count_response(self, rcode: int) -> None:
        name = RCODE_NAMES.get(rcode)
        if name is not None:
            self.responses[name] += 1

    def count_drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def count_limited(self, reason: str) -> None:
        self.limited[reason] += 1


class NullMetrics(Metrics):
    """Counts nothing on the query path: [metrics] listen = "" (also the benchmark's 'metrics off')."""

    def count_query(self, group: str, transport: str, qtype: int) -> None:
        return None

    def count_blocked(self, group: str, list_name: str, action: str) -> None:
        return None

    def count_response(self, rcode: int) -> None:
        return None

    def repeat_cell(self, group: str, transport: str, qtype: int, list_name: str, action: str, rcode: int) -> list[int]:
        return [0]  # counted nowhere


class QueryCounters(Collector):
    """Exports the per-query counters that Metrics keeps in plain dicts."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self) -> Iterable[CounterMetricFamily]:
        m = self._metrics
        # dict(...) copies in one C call under the GIL: safe against the reactor adding keys.
        queries, query_types, blocked, responses = (
            dict(m.queries),
            dict(m.query_types),
            dict(m.blocked),
            dict(m.responses),
        )
        limited = dict(m.limited)
        for (group, transport, qtype, list_name, action, rcode), cell in list(m.repeat_cells.items()):
            count = cell[0]
            queries[group, transport] = queries.get((group, transport), 0) + count
            query_types[qtype] = query_types.get(qtype, 0) + count
            blocked[group, list_name, action] = blocked.get((group, list_name, action), 0) + count
            if rcode:
                responses[rcode] = responses.get(rcode, 0) + count
        for name, doc, labels, values in (
            ("blockd_dns_queries", "DNS queries answered.", ["group", "transport"], queries),
            ("blockd_dns_query_types", "DNS queries by query type.", ["qtype"], query_types),
            (
                "blockd_dns_blocked",
                "Lookups of listed names (blocked, or monitored).",
                ["group", "list", "action"],
                blocked,
            ),
            ("blockd_dns_responses", "DNS answers sent, by response code.", ["rcode"], responses),
            ("blockd_limited", "Queries and TCP connections held to a per-client limit.", ["reason"], limited),
        ):
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(key if isinstance(key, tuple) else (key,), value)
            yield family


class LimitState(Protocol):
    """What LimitCollector reads from the per-client limits (blockd.limits.ClientLimits)."""

    @property
    def table_overflows(self) -> int: ...
    def clients_tracked(self) -> int: ...
    def upstream_in_flight(self) -> int: ...
    def tcp_connections(self) -> int: ...


class MemoState(Protocol):
    """What LimitCollector reads from the repeated-query memo (blockd.repeats.RepeatMemo)."""

    @property
    def clears(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class LimitCollector(Collector):
    """Sizes of the per-client limit tables and of the repeated-query memo, read at scrape time."""

    def __init__(self, limits: LimitState, memo: MemoState):
        self._limits = limits
        self._memo = memo

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        limits = self._limits
        yield GaugeMetricFamily(
            "blockd_limit_clients", "Clients with a rate-limit bucket.", value=limits.clients_tracked()
        )
        yield CounterMetricFamily(
            "blockd_limit_table_overflows",
            "Times the rate-limit table was emptied because too many clients were active.",
            value=limits.table_overflows,
        )
        yield GaugeMetricFamily(
            "blockd_upstream_queries_in_flight",
            "Client queries waiting for an upstream.",
            value=limits.upstream_in_flight(),
        )
        yield GaugeMetricFamily(
            "blockd_tcp_connections", "Open DNS-over-TCP connections.", value=limits.tcp_connections()
        )
        yield CounterMetricFamily(
            "blockd_repeat_memo_clears",
            "Times the repeated-query memo was emptied on reaching its bound.",
            value=self._memo.clears,
        )
        yield GaugeMetricFamily(
            "blockd_repeat_memo_bytes", "Bytes held by the repeated-query memo.", value=self._memo.bytes
        )


class CacheCounters(Protocol):
    """What CacheCollector reads from the answer cache (blockd.cache.AnswerCache)."""

    @property
    def requests(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def stale_answers(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    def __len__(self) -> int: ...


class CacheCollector(Collector):
    """The answer cache's counters and size, read at scrape time (the cache itself stays pure)."""

    def __init__(self, cache: CacheCounters):
        self._cache = cache

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        cache = self._cache
        yield CounterMetricFamily("blockd_cache_requests", "Answer-cache lookups.", value=cache.requests)
        yield CounterMetricFamily(
            "blockd_cache_hits", "Answer-cache lookups that found a live entry.", value=cache.hits
        )
        yield CounterMetricFamily(
            "blockd_cache_evictions", "Entries evicted to stay within cache.size.", value=cache.evictions
        )
        yield GaugeMetricFamily("blockd_cache_entries", "Entries in the answer cache.", value=len(cache))
        yield GaugeMetricFamily(
            "blockd_cache_bytes", "Estimated memory held by the answer cache's entries.", value=cache.bytes
        )
        yield CounterMetricFamily(
            "blockd_cache_stale_answers",
            "Expired answers served because no upstream answered (serve-stale).",
            value=cache.stale_answers,
        )


class ListSizeCollector(Collector):
    """blockd_list_domains, read from the serving policy at scrape time."""

    def __init__(self, sizes: Callable[[], dict[str, int]]):
        self._sizes = sizes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("blockd_list_domains", "Domains loaded per list.", labels=["list"])
        for name, size in sorted(self._sizes().items()):
            family.add_metric([name], size)
        yield family


# --- Lenient lists (invalid_lines = "skip"): what each list skipped, read like blockd_list_domains.
class ListInvalidLinesCollector(Collector):
    """blockd_list_invalid_lines, read from the serving policy at scrape time (0: nothing skipped)."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "blockd_list_invalid_lines", "Lines skipped by a list with invalid_lines = 'skip'.", labels=["list"]
        )
        for name, count in sorted(self._counts().items()):
            family.add_metric([name], count)
        yield family


DNSTAP_RESULTS = ("sent", "dropped")


class DnstapMetrics:
    """The dnstap sink's frames and collector state (blockd.dnstap; called from its writer thread)."""

    def __init__(self, registry: CollectorRegistry):
        self.frames_total = Counter(
            "blockd_dnstap_frames", "dnstap frames by result (dropped: queue full or collector gone).", ["result"],
            registry=registry,
        )  # fmt: skip
        self.collector_up = Gauge(
            "blockd_dnstap_collector_up", "1 while the dnstap collector (or file) takes the stream.", registry=registry
        )
        for result in DNSTAP_RESULTS:
            self.frames_total.labels(result)

    def frames(self, result: str, count: int) -> None:
        self.frames_total.labels(result).inc(count)

    def connected(self, up: bool) -> None:
        self.collector_up.set(1 if up else 0)


class EgressMetrics:
    """Reconcile outcomes of blockd.egress_service.EgressService (record is its report callback)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.reconciles = Counter(
            "blockd_egress_reconciles", "Egress reconciles (kernel state checked and fixed) by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "blockd_egress_last_reconcile_success_timestamp_seconds",
            "When blockd's rules and routes were last confirmed equal to the desired state.",
            registry=r,
        )
        self.duration = Histogram(
            "blockd_egress_reconcile_duration_seconds",
            "Time to dump, diff and apply blockd's rules and routes.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.changes = Counter(
            "blockd_egress_changes", "Rule and route operations applied (repairs included).", ["operation"], registry=r
        )
        self.routes = Gauge(
            "blockd_egress_routes", "Routes blockd wants in its table, by source.", ["source"], registry=r
        )
        self.rules = Gauge("blockd_egress_rules", "Rules blockd wants (one per blocking network).", registry=r)
        for result in RECONCILE_RESULTS:
            self.reconciles.labels(result)
        for operation in EGRESS_OPERATIONS:
            self.changes.labels(operation)
        for source in EGRESS_ROUTE_SOURCES:
            self.routes.labels(source)

    def record(self, report: Any) -> None:
        """One blockd.egress_service.ReconcileReport (reactor thread)."""
        self.reconciles.labels(report.result).inc()
        self.duration.observe(report.duration)
        if report.result != "success":
            return
        self.last_success.set(report.timestamp)
        for operation, count in report.changes.items():
            if operation in EGRESS_OPERATIONS and count:
                self.changes.labels(operation).inc(count)
        for source in EGRESS_ROUTE_SOURCES:
            self.routes.labels(source).set(report.route_counts.get(source, 0))
        self.rules.set(report.rules)


class EgressCollector(Collector):
    """Learned-address and follow-up-lookup counters, read at scrape time.

    learned is a blockd.egress.LearnedAddresses; follow_up a FollowUpLookups or None (learn off).
    """

    def __init__(self, learned: Any, follow_up: Any = None):
        self._learned = learned
        self._follow_up = follow_up

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        learned = self._learned
        yield GaugeMetricFamily("blockd_egress_learned_addresses", "Learned addresses routed now.", value=len(learned))
        counters = (
            ("blockd_egress_learned", "Addresses learned from answers for listed names.", learned.learned_total),
            ("blockd_egress_learned_expired", "Learned addresses whose lifetime ended.", learned.expired_total),
            ("blockd_egress_learned_evicted", "Learned addresses evicted to stay within learn_max.",
             learned.evicted_total),
            ("blockd_egress_never_skipped", "Answer addresses not routed because they lie in egress.never.",
             learned.never_skipped_total),
            ("blockd_egress_unroutable_skipped",
             "Answer addresses never routed (0.0.0.0, ::, loopback, link-local, multicast).",
             learned.special_skipped_total),
        )  # fmt: skip
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        family = CounterMetricFamily(
            "blockd_egress_followup_lookups",
            "Background lookups of sinkholed names, by outcome.",
            labels=["result"],
        )
        follow_up = self._follow_up
        for result in FOLLOW_UP_RESULTS:
            family.add_metric([result], getattr(follow_up, f"{result}_total", 0) if follow_up is not None else 0)
        yield family


# -- Answer scrubbing (blockd.scrub) ----------------------------------------------------------------

SCRUB_SECTIONS = ("answer", "authority", "additional")  # the order of blockd.scrub.Scrubbed.removed


class ScrubMetrics:
    """blockd_scrubbed_records_total{section}: records removed from upstream answers as outside the
    question's bailiwick chain.  Counted once per upstream answer (a cache miss), not per client."""

    def __init__(self, registry: CollectorRegistry):
        self.records = Counter(
            "blockd_scrubbed_records",
            "Upstream answer records removed as outside the question's bailiwick chain.",
            ["section"],
            registry=registry,
        )
        self._sections = tuple(self.records.labels(section) for section in SCRUB_SECTIONS)

    def count(self, removed: tuple[int, int, int]) -> None:
        """One answer's Scrubbed.removed: (answer, authority, additional)."""
        for series, count in zip(self._sections, removed, strict=True):
            if count:
                series.inc(count)


# -- Upstream health (blockd.upstream, blockd.upstream_health) -----------------------------------


class UpstreamHealthCollector(Collector):
    """blockd_upstream_up{upstream} (1 up, 0 down and being probed) and blockd_upstream_sockets
    (UDP sockets open to the upstreams), read at scrape time from a blockd.upstream.Upstreams."""

    def __init__(self, upstreams: Any):
        self._upstreams = upstreams

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "blockd_upstream_up", "1 while the upstream answers, 0 while it is skipped and probed.", labels=["upstream"]
        )
        for name, is_up in self._upstreams.up().items():
            up.add_metric([name], 1 if is_up else 0)
        yield up
        yield GaugeMetricFamily(
            "blockd_upstream_sockets", "UDP sockets open to the upstreams.", value=self._upstreams.open_sockets()
        )


# -- Lists from URLs (blockd.url_lists) ------------------------------------------------------------


class UrlSourceCollector(Collector):
    """Each downloaded list's status, read at scrape time from blockd.url_lists.SourceStats (the
    list name is the only label; failure reasons are blockd.url_source.REASONS)."""

    def __init__(self, stats: Callable[[], Iterable[Any]], reasons: Iterable[str]):
        self._stats = stats
        self._reasons = tuple(reasons)

    def collect(self) -> Iterable[Any]:
        last = GaugeMetricFamily(
            "blockd_list_source_last_success_timestamp_seconds",
            "When a list's URL last gave a good copy or confirmed it (304); at start, the copy's age.",
            labels=["list"],
        )
        failures = CounterMetricFamily(
            "blockd_list_source_failures", "Failed downloads of a list's URL by reason.", labels=["list", "reason"]
        )
        size = GaugeMetricFamily("blockd_list_source_bytes", "Size of a list's last good download.", labels=["list"])
        refresh = GaugeMetricFamily(
            "blockd_list_source_refresh_seconds", "How often a list's URL is downloaded.", labels=["list"]
        )
        for stats in self._stats():
            if stats.last_success is not None:
                last.add_metric([stats.name], stats.last_success)
            for reason in self._reasons:  # every reason from the start: dashboards see zeros
                failures.add_metric([stats.name, reason], stats.failures.get(reason, 0))
            if stats.bytes is not None:
                size.add_metric([stats.name], stats.bytes)
            refresh.add_metric([stats.name], stats.refresh)
        yield from (last, failures, size, refresh)
