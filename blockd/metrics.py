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
  blockd_list_domains{list}                           entries loaded per list
  blockd_reloads_total{result}                        success / failure
  blockd_last_reload_success_timestamp_seconds
  blockd_reload_duration_seconds
  blockd_query_log_lines_total, blockd_query_log_dropped_total, blockd_query_log_errors_total
  blockd_cache_requests_total, blockd_cache_hits_total, blockd_cache_evictions_total, blockd_cache_entries
  blockd_build_info{version}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
ACTIONS = ("sinkhole", "nxdomain", "nodata", "refused", "monitor")
UPSTREAM_RESULTS = ("success", "timeout", "refused", "error", "truncated", "mismatch")
DROP_REASONS = ("short", "response", "overload", "send_error")
DNS_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queries = Counter("blockd_dns_queries", "DNS queries answered.", ["group", "transport"], registry=r)
        self.query_types = Counter("blockd_dns_query_types", "DNS queries by query type.", ["qtype"], registry=r)
        self.blocked = Counter(
            "blockd_dns_blocked",
            "Lookups of listed names (blocked, or monitored).",
            ["group", "list", "action"],
            registry=r,
        )
        self.responses = Counter("blockd_dns_responses", "DNS answers sent, by response code.", ["rcode"], registry=r)
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
        self.build_info = Gauge("blockd_build_info", "blockd version.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for name in set(RCODE_NAMES.values()):
            self.responses.labels(name)
        for name in [*QTYPE_LABELS.values(), "other"]:
            self.query_types.labels(name)
        self._query_children: dict[tuple[str, str], Callable[[], None]] = {}
        self._blocked_children: dict[tuple[str, str, str], Callable[[], None]] = {}
        self._rcode_children = {code: self.responses.labels(name).inc for code, name in RCODE_NAMES.items()}
        self._qtype_children = {code: self.query_types.labels(name).inc for code, name in QTYPE_LABELS.items()}
        self._qtype_other = self.query_types.labels("other").inc

    def declare(self, groups: Iterable[tuple[str, Iterable[tuple[str, str]]]], upstreams: Iterable[str]) -> None:
        """Create zero series for every configured group, (list, action) and upstream."""
        for group, list_actions in groups:
            for transport in TRANSPORTS:
                self.queries.labels(group, transport)
            for list_name, action in list_actions:
                self.blocked.labels(group, list_name, action)
        for upstream in upstreams:
            for result in UPSTREAM_RESULTS:
                self.upstream_requests.labels(upstream, result)
            self.upstream_duration.labels(upstream)

    # Hot-path helpers: cached label children, so counting is a dict lookup and an add.
    def count_query(self, group: str, transport: str, qtype: int) -> None:
        key = (group, transport)
        inc = self._query_children.get(key)
        if inc is None:
            inc = self._query_children[key] = self.queries.labels(group, transport).inc
        inc()
        self._qtype_children.get(qtype, self._qtype_other)()

    def count_blocked(self, group: str, list_name: str, action: str) -> None:
        key = (group, list_name, action)
        inc = self._blocked_children.get(key)
        if inc is None:
            inc = self._blocked_children[key] = self.blocked.labels(group, list_name, action).inc
        inc()

    def count_response(self, rcode: int) -> None:
        inc = self._rcode_children.get(rcode)
        if inc is not None:
            inc()

    def count_drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()


class NullMetrics(Metrics):
    """Counts nothing on the query path: [metrics] listen = "" (also the benchmark's 'metrics off')."""

    def count_query(self, group: str, transport: str, qtype: int) -> None:
        return None

    def count_blocked(self, group: str, list_name: str, action: str) -> None:
        return None

    def count_response(self, rcode: int) -> None:
        return None


class CacheCollector(Collector):
    """The answer cache's counters and size, read at scrape time (the cache itself stays pure)."""

    def __init__(self, cache: object):
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


class ListSizeCollector(Collector):
    """blockd_list_domains, read from the serving policy at scrape time."""

    def __init__(self, sizes: Callable[[], dict[str, int]]):
        self._sizes = sizes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("blockd_list_domains", "Domains loaded per list.", labels=["list"])
        for name, size in sorted(self._sizes().items()):
            family.add_metric([name], size)
        yield family
