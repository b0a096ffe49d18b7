"""Egress blocking, the pure part: settings, prefix files, learned addresses, desired state, diff.

blockd owns three things in the kernel and nothing else: one routing table (`table`), a band of
RULE_BAND_SIZE rule priorities starting at `rule_priority`, and a route protocol number
(`route_protocol`) stamped on every route it adds.  For each source network of a group whose
action blocks it wants `ip rule from <network> lookup <table>`; in the table it wants a
`prohibit` route for every static prefix and every learned address.  Nothing here talks to the
kernel or reads a clock: the netlink adapter (blockd.netlink) reports what blockd owns, `diff`
turns desired-vs-actual into a Plan, the adapter applies it.

Config keys ([egress], parsed by blockd.config into EgressSettings):
  enabled             false        off by default; gateways only
  table               1120         the routing table blockd owns (not 0, 253, 254, 255)
  rule_priority       11200        first priority of blockd's band of 100; must end below 32766,
                                   where the kernel's `from all lookup main` rule sits
  route_protocol      120          rtnetlink proto of blockd's routes (not a reserved value)
  prefixes            []           prefix files: one CIDR per line, "#" comments
  learn               true         route the addresses upstreams return for listed names
  learn_min_ttl       3600         seconds a learned route lives at least
  learn_max           10000        cap on learned addresses; the soonest to expire go first
  never               []           networks never routed (shared CDNs): no learned route inside
                                   them, no static prefix inside them, and a `throw` route for
                                   them where they sit inside a static prefix
  on_exit             "keep"       keep (fail closed) or remove blockd's rules/routes at exit
  reconcile_interval  60           seconds between safety-net reconciles

Metrics are recorded by blockd.egress_service; LearnedAddresses keeps the counters that
blockd_egress_learned_total, blockd_egress_never_skipped_total and
blockd_egress_learned_evicted_total read at scrape time.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from blockd.bounded_read import FileRefused, ReadLimits, open_text
from blockd.excerpt import clip, excerpt
from blockd.lists import LineError, ListLoadError
from blockd.prefix_table import IPAddress, IPNetwork, PrefixTable, normalize_network

RULE_BAND_SIZE = 100
MAIN_RULE_PRIORITY = 32766  # the kernel's `from all lookup main`; blockd's band must come first
RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
# include/uapi/linux/rtnetlink.h RTPROT_* and /etc/iproute2/rt_protos: kernel values and routing daemons.
RESERVED_ROUTE_PROTOCOLS = frozenset(
    {0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 42, 99, 186, 187, 188, 189, 192}
)
ON_EXIT_CHOICES = ("keep", "remove")

PROHIBIT = "prohibit"  # forwarded packets get ICMP "administratively prohibited": clients fail fast
THROW = "throw"  # ends the lookup in blockd's table, so the next rule (main) routes the packet

_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)  # subnet_of needs the same version
_Entry = TypeVar("_Entry", bound=Hashable)  # a Rule or a Route


class NetlinkChange(StrEnum):
    """What a netlink notification was about (reported by blockd.netlink.NetlinkWatcher)."""

    ADDRESS = "address"
    LINK = "link"
    RULE = "rule"
    ROUTE = "route"


@dataclass(frozen=True)
class EgressSettings:
    enabled: bool = False
    table: int = 1120
    rule_priority: int = 11200
    route_protocol: int = 120
    prefixes: tuple[Path, ...] = ()
    learn: bool = True
    learn_min_ttl: float = 3600.0
    learn_max: int = 10000
    never: tuple[IPNetwork, ...] = ()
    on_exit: str = "keep"
    reconcile_interval: float = 60.0

    @property
    def rule_band(self) -> range:
        return range(self.rule_priority, self.rule_priority + RULE_BAND_SIZE)

    def rule_priority_for(self, network: IPNetwork) -> int:
        # The kernel matches a rule request's unset selectors as wildcards: adding `from all`
        # next to `from 10.0.0.0/8` at one priority fails with EEXIST, and deleting it could
        # delete the specific rule.  So catch-all rules get a priority of their own.
        return self.rule_priority + 1 if network.prefixlen == 0 else self.rule_priority


def settings_problems(settings: EgressSettings) -> list[tuple[str, str]]:
    """(config key, message) for every value the kernel would reject or that would break the host."""
    problems = []
    if not 0 < settings.table < 2**32 or settings.table in RESERVED_TABLES:
        problems.append(("table", f"{settings.table} is not usable (1..4294967295, not 253/254/255)"))
    last = settings.rule_priority + RULE_BAND_SIZE - 1
    if settings.rule_priority < 1 or last >= MAIN_RULE_PRIORITY:
        problems.append(
            (
                "rule_priority",
                f"band {settings.rule_priority}..{last} must lie within 1..{MAIN_RULE_PRIORITY - 1}, "
                f"before the main table's rule",
            )
        )
    if not 0 < settings.route_protocol < 256 or settings.route_protocol in RESERVED_ROUTE_PROTOCOLS:
        problems.append(("route_protocol", f"{settings.route_protocol} is reserved or out of range 1..255"))
    if settings.learn_min_ttl < 0:
        problems.append(("learn_min_ttl", "must not be negative"))
    if settings.learn_max < 0:
        problems.append(("learn_max", "must not be negative"))
    if settings.on_exit not in ON_EXIT_CHOICES:
        problems.append(("on_exit", f"{settings.on_exit!r} is not one of {', '.join(ON_EXIT_CHOICES)}"))
    if settings.reconcile_interval <= 0:
        problems.append(("reconcile_interval", "must be positive"))
    return problems


# -- prefix files ----------------------------------------------------------------------------


class PrefixLoadError(ListLoadError):
    """Every bad line of one or more prefix files (a ListLoadError, so `blockd check` prints them alike)."""


def parse_prefix_line(text: str) -> IPNetwork | None:
    """The network on one line, or None for comments and blank lines.  Raises ValueError."""
    line = text.split("#", 1)[0].strip()
    if not line:
        return None
    if len(line.split()) > 1:
        raise ValueError(f"expected one CIDR prefix per line, got {excerpt(line)}")
    try:
        network = ipaddress.ip_network(line, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(line, strict=False)
        except ValueError:
            raise ValueError(f"{excerpt(line)} is not a valid prefix: {clip(str(exc))}") from None
        raise ValueError(f"{excerpt(line)} has host bits set; did you mean {loose}?") from None
    if network.prefixlen == 0:
        raise ValueError(f"refusing to block the whole address space ({line})")
    return network


def parse_prefix_lines(lines: Iterable[str], path: str) -> tuple[list[IPNetwork], list[LineError]]:
    """Parse lines, collecting every error instead of stopping at the first."""
    networks: list[IPNetwork] = []
    errors: list[LineError] = []
    for number, text in enumerate(lines, start=1):
        try:
            network = parse_prefix_line(text)
        except ValueError as exc:
            errors.append(LineError(path, number, str(exc)))
            continue
        if network is not None:
            networks.append(network)
    return networks, errors


def load_prefix_files(paths: Iterable[Path]) -> tuple[IPNetwork, ...]:
    """Every prefix of every file, duplicates dropped, in file order.  Raises PrefixLoadError."""
    seen: dict[IPNetwork, None] = {}
    errors: list[LineError] = []
    for path in paths:
        shown = str(path)
        try:
            with open_text(path, ReadLimits(), errors="strict") as handle:  # a regular file, bounded
                networks, file_errors = parse_prefix_lines(handle, shown)
        except UnicodeDecodeError as exc:
            errors.append(LineError(shown, 0, f"not UTF-8 text: {exc.reason}"))
            continue
        except FileRefused as exc:
            message = exc.message if exc.line else f"cannot read prefix file: {exc.message}"
            errors.append(LineError(shown, exc.line, message))
            continue
        except OSError as exc:
            errors.append(LineError(shown, 0, f"cannot read prefix file: {exc.strerror or exc}"))
            continue
        errors.extend(file_errors)
        seen.update(dict.fromkeys(networks))
    if errors:
        raise PrefixLoadError(errors)
    return tuple(seen)


# -- learned addresses -----------------------------------------------------------------------


def _address(value: IPAddress | str) -> IPAddress:
    return value if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address) else ipaddress.ip_address(value)


def _never_routable(address: IPAddress) -> bool:
    # What a sinkholing upstream answers (0.0.0.0, ::) or what never leaves the host/link.
    return address.is_unspecified or address.is_loopback or address.is_link_local or address.is_multicast


@dataclass(frozen=True)
class LearnResult:
    added: int = 0
    refreshed: int = 0
    never_skipped: int = 0
    special_skipped: int = 0
    evicted: int = 0

    @property
    def changed(self) -> bool:
        """Whether the set of learned addresses (so the wanted routes) changed."""
        return bool(self.added or self.evicted)


class LearnedAddresses:
    """Addresses answered for listed names, each with an expiry time; bounded by count.

    Used from one thread (the reactor's).  A lifetime is max(answer TTL, min_ttl) and every new
    answer extends it; when full, the entries that expire soonest are evicted.
    """

    def __init__(self, min_ttl: float, max_entries: int, never: Iterable[IPNetwork] = ()):
        self.min_ttl = min_ttl
        self.max_entries = max_entries
        self._never: PrefixTable[bool] = PrefixTable((network, True) for network in never)
        self._expiry: dict[IPAddress, float] = {}
        # (expiry, address) with stale entries left in place and skipped when popped, so a
        # refresh is O(log n) instead of a search.
        self._heap: list[tuple[float, int, IPAddress]] = []
        self.learned_total = 0
        self.refreshed_total = 0
        self.never_skipped_total = 0
        self.special_skipped_total = 0
        self.evicted_total = 0
        self.expired_total = 0

    @classmethod
    def from_settings(cls, settings: EgressSettings) -> LearnedAddresses:
        return cls(settings.learn_min_ttl, settings.learn_max, settings.never)

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, address: object) -> bool:
        return address in self._expiry

    def addresses(self) -> frozenset[IPAddress]:
        return frozenset(self._expiry)

    def expiry_of(self, address: IPAddress | str) -> float | None:
        return self._expiry.get(_address(address))

    def learn(self, addresses: Iterable[IPAddress | str], ttl: float, now: float) -> LearnResult:
        expiry = now + max(ttl, self.min_ttl)
        added = refreshed = never = special = 0
        for value in addresses:
            address = _address(value)
            if _never_routable(address):
                special += 1
                continue
            if self._never.lookup(address):
                never += 1
                continue
            current = self._expiry.get(address)
            if current is None:
                added += 1
            elif expiry > current:
                refreshed += 1
            else:
                continue
            self._expiry[address] = expiry
            heapq.heappush(self._heap, (expiry, _sort_key(address), address))
        evicted = self._evict_over_cap()
        self._compact()
        self.learned_total += added
        self.refreshed_total += refreshed
        self.never_skipped_total += never
        self.special_skipped_total += special
        return LearnResult(added, refreshed, never, special, evicted)

    def expire(self, now: float) -> bool:
        """Drop every entry whose time has come; whether anything was dropped."""
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            expiry, _key, address = heapq.heappop(self._heap)
            if self._expiry.get(address) == expiry:
                del self._expiry[address]
                dropped += 1
        self.expired_total += dropped
        return dropped > 0

    def next_expiry(self) -> float | None:
        while self._heap:
            expiry, _key, address = self._heap[0]
            if self._expiry.get(address) == expiry:
                return expiry
            heapq.heappop(self._heap)
        return None

    def _evict_over_cap(self) -> int:
        evicted = 0
        while len(self._expiry) > self.max_entries and self._heap:
            expiry, _key, address = heapq.heappop(self._heap)
            if self._expiry.get(address) == expiry:
                del self._expiry[address]
                evicted += 1
        self.evicted_total += evicted
        return evicted

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._expiry) + 64:
            self._heap = [(e, k, a) for e, k, a in self._heap if self._expiry.get(a) == e]
            heapq.heapify(self._heap)


def _sort_key(address: IPAddress) -> int:
    # Breaks expiry ties in the heap without comparing IPv4 with IPv6 addresses.
    return int(address) + (address.version << 128)


# -- desired state ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Rule:
    """`ip rule add from <source> lookup <table> priority <priority>` (version: 4 or 6).

    proto (FRA_PROTOCOL) labels the rule as blockd's in `ip rule` output; ownership is the
    table and the band, so it is not part of a rule's identity.
    """

    version: int
    source: IPNetwork
    table: int
    priority: int
    proto: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.priority}: from {self.source} lookup {self.table}"


@dataclass(frozen=True)
class Route:
    """`ip route add <type> <destination> table <table> proto <proto>` (version: 4 or 6).

    metric is what the kernel reported (IPv6 routes have one, 1024 by default); it is not part
    of a route's identity but lets a delete name exactly one route.
    """

    version: int
    destination: IPNetwork
    table: int
    type: str
    proto: int
    metric: int | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, IPNetwork, int]:
        """What the kernel keys a route on (ignoring metric): one route per key in blockd's table."""
        return (self.version, self.destination, self.table)

    def sort_key(self) -> tuple[int, int, int, str]:
        return (self.version, int(self.destination.network_address), self.destination.prefixlen, self.type)

    def __str__(self) -> str:
        return f"{self.type} {self.destination} table {self.table} proto {self.proto}"


@dataclass(frozen=True)
class DesiredState:
    rules: frozenset[Rule]
    routes: frozenset[Route]
    route_counts: tuple[tuple[str, int], ...] = ()  # (source, count): static, learned, never

    def routes_by_source(self) -> dict[str, int]:
        return dict(self.route_counts)


@dataclass(frozen=True)
class KernelState:
    """What the adapter found that blockd owns; duplicates are kept so the diff can remove them."""

    rules: tuple[Rule, ...] = ()
    routes: tuple[Route, ...] = ()


def _drop_covered(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Networks minus those inside another one (same coverage, fewer rules/routes)."""
    unique = set(networks)
    kept: list[IPNetwork] = []
    kept.extend(_drop_nested([n for n in unique if isinstance(n, ipaddress.IPv4Network)]))
    kept.extend(_drop_nested([n for n in unique if isinstance(n, ipaddress.IPv6Network)]))
    return kept


def _drop_nested(same_version: list[_Net]) -> list[_Net]:
    """Networks of one IP version, in address order, minus those inside another one."""
    ordered = sorted(same_version, key=lambda n: (int(n.network_address), n.prefixlen))
    kept: list[_Net] = []
    last: _Net | None = None
    for network in ordered:
        if last is not None and network.subnet_of(last):
            continue
        kept.append(network)
        last = network
    return kept


def _host_network(address: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(address)


def desired_state(
    settings: EgressSettings,
    blocking_networks: Iterable[IPNetwork],
    static_prefixes: Iterable[IPNetwork],
    learned_addresses: Iterable[IPAddress],
) -> DesiredState:
    """The rules and routes blockd wants, from the networks of blocking groups and the prefixes."""
    rules = frozenset(
        Rule(network.version, network, settings.table, settings.rule_priority_for(network), settings.route_protocol)
        for network in _drop_covered(normalize_network(n) for n in blocking_networks)
    )
    never: PrefixTable[bool] = PrefixTable((network, True) for network in settings.never)
    statics = [p for p in _drop_covered(static_prefixes) if not never.lookup_network(p)]
    static_table: PrefixTable[bool] = PrefixTable((p, True) for p in statics)
    # A never network inside a static prefix is carved out of it: longest match wins in the
    # table, and `throw` sends the lookup on to the next rule.
    throws = [n for n in _drop_covered(settings.never) if static_table.lookup_network(n)]
    learned = [
        _host_network(a)
        for a in learned_addresses
        if not _never_routable(a) and not never.lookup(a) and not static_table.lookup(a)
    ]

    def route(network: IPNetwork, kind: str) -> Route:
        return Route(network.version, network, settings.table, kind, settings.route_protocol)

    routes = (
        {route(p, PROHIBIT) for p in statics}
        | {route(n, THROW) for n in throws}
        | {route(n, PROHIBIT) for n in learned}
    )
    counts = (("static", len(statics)), ("learned", len(set(learned))), ("never", len(throws)))
    return DesiredState(rules, frozenset(routes), counts)


# -- diff ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Operations taking the kernel from actual to desired.

    Apply in this order (blockd.netlink does): deletes of routes whose key an added route
    replaces (IPv6 deletes ignore the route type, so they must go first), route adds (as
    `replace`), rule adds, rule deletes, the remaining route deletes.  New blocks are in place
    before anything is taken away.
    """

    add_rules: tuple[Rule, ...] = ()
    del_rules: tuple[Rule, ...] = ()
    add_routes: tuple[Route, ...] = ()
    del_routes: tuple[Route, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add_rules or self.del_rules or self.add_routes or self.del_routes)

    @property
    def operations(self) -> int:
        return len(self.add_rules) + len(self.del_rules) + len(self.add_routes) + len(self.del_routes)

    def counts(self) -> dict[str, int]:
        return {
            "add_rule": len(self.add_rules),
            "del_rule": len(self.del_rules),
            "add_route": len(self.add_routes),
            "del_route": len(self.del_routes),
        }

    def conflicting_deletes(self) -> tuple[Route, ...]:
        """Route deletes that share a key with a route being added."""
        keys = {r.key for r in self.add_routes}
        return tuple(r for r in self.del_routes if r.key in keys)

    def __str__(self) -> str:
        parts = [f"{n} {op.replace('_', ' ')}" for op, n in self.counts().items() if n]
        return ", ".join(parts) or "no changes"


def _extras(actual: Sequence[_Entry], wanted: frozenset[_Entry]) -> list[_Entry]:
    """Actual entries not wanted, plus every second and later copy of a wanted one."""
    seen: set[_Entry] = set()
    extra: list[_Entry] = []
    for item in actual:
        if item not in wanted or item in seen:
            extra.append(item)
        seen.add(item)
    return extra


def diff(desired: DesiredState, actual: KernelState) -> Plan:
    """Pure: the operations that make actual equal desired (removing stale entries and duplicates)."""
    actual_rules = set(actual.rules)
    actual_routes = set(actual.routes)
    return Plan(
        add_rules=tuple(sorted(desired.rules - actual_rules)),
        del_rules=tuple(sorted(_extras(actual.rules, desired.rules))),
        add_routes=tuple(sorted(desired.routes - actual_routes, key=Route.sort_key)),
        del_routes=tuple(sorted(_extras(actual.routes, desired.routes), key=Route.sort_key)),
    )


def apply_to(state: KernelState, plan: Plan) -> KernelState:
    """The state a kernel would be in after applying plan, in Plan's order (a model for tests)."""
    routes = list(state.routes)
    conflicting = plan.conflicting_deletes()
    for route in conflicting:
        _remove_one(routes, route)
    routes.extend(r for r in plan.add_routes if r not in routes)
    rules = list(state.rules)
    rules.extend(r for r in plan.add_rules if r not in rules)
    for rule in plan.del_rules:
        _remove_one(rules, rule)
    replaced = {r.key for r in plan.add_routes}
    for route in plan.del_routes:
        if route.key not in replaced:
            _remove_one(routes, route)
    return KernelState(tuple(rules), tuple(routes))


def _remove_one(items: list[_Entry], item: _Entry) -> None:
    for index, candidate in enumerate(items):
        if candidate == item:
            del items[index]
            return
