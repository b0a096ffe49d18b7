"""Per-client limits: one device cannot take more than its share of blockd.

A client is its source address aggregated to a prefix ([limits] ipv4_prefix, ipv6_prefix; /32 and
/56 by default, so one host's IPv6 privacy addresses are one client).  Each client has
- a token bucket for its UDP queries (qps, burst): over it, a query is dropped, or every
  `slip`-th one answered with TC=1 so a real client retries over TCP (BIND's RRL "slip");
  over TCP the same bucket throttles reading from the connection (blockd.server), since a TCP
  client cannot spoof its address and should be slowed, not dropped;
- a cap on its queries waiting for an upstream, under a global cap that no client can fill
  alone;
- a cap on its open TCP connections.
Three kinds of client have their own limits: clients in server.allow, trusted forwarders
(which carry many devices), and addresses outside server.allow (answered REFUSED: a spoofed
victim of reflection, so kept low).

A client whose over-limit UDP queries pass the rate `kernel_block_qps` (over 0.1 s) is flooding: the
`on_flood` callback blocks it below the socket for a while (blockd.kernel_blocks), since past
some rate the reactor cannot even drop its datagrams as fast as they come.

Tables are bounded (`max_clients`): idle clients (full buckets, nothing in flight) are swept
when a table fills; if a sweep frees too little (a flood from many addresses), the table is
emptied, which is counted.  Pure: no I/O; `now` is passed in (monotonic seconds).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

FLOOD_WINDOW = 0.1  # seconds over which kernel_block_qps is measured


class Kind(IntEnum):
    """Which limits a client gets."""

    CLIENT = 0  # in server.allow
    FORWARDER = 1  # server.trusted_forwarders
    OUTSIDE = 2  # outside server.allow (answered REFUSED)


KIND_NAMES = ("client", "forwarder", "outside")


@dataclass(frozen=True, slots=True)
class KindLimits:
    """The limits of one kind of client; 0 means unlimited."""

    qps: float
    burst: float
    upstream_in_flight: int
    tcp_connections: int


@dataclass(frozen=True, slots=True)
class LimitSettings:
    enabled: bool = True
    ipv4_prefix: int = 32
    ipv6_prefix: int = 56
    client: KindLimits = KindLimits(qps=1000, burst=2000, upstream_in_flight=200, tcp_connections=32)
    forwarder: KindLimits = KindLimits(qps=50_000, burst=100_000, upstream_in_flight=2000, tcp_connections=512)
    outside: KindLimits = KindLimits(qps=20, burst=40, upstream_in_flight=0, tcp_connections=4)
    over_limit: str = "slip"  # "slip" or "drop"
    slip: int = 2  # with over_limit = "slip": every slip-th limited UDP query gets TC=1
    kernel_block_qps: int = 10_000  # over-limit UDP queries a second that get a client blocked in the kernel
    kernel_block_seconds: float = 10.0
    upstream_in_flight_total: int = 4096
    max_clients: int = 100_000
    kinds: tuple[KindLimits, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", (self.client, self.forwarder, self.outside))


class Verdict(IntEnum):
    """What to do with one UDP query."""

    ANSWER = 0
    DROP = 1
    SLIP = 2  # answer with TC=1 only


class ClientKeys:
    """Source address -> the client it counts as (its address aggregated to a prefix)."""

    __slots__ = ("_memo", "_v4", "_v6", "max_entries")

    def __init__(self, ipv4_prefix: int, ipv6_prefix: int, max_entries: int):
        self._v4 = ipv4_prefix
        self._v6 = ipv6_prefix
        self.max_entries = max_entries
        self._memo: dict[str, str] = {}

    def key(self, address: str) -> str:
        known = self._memo.get(address)
        if known is not None:
            return known
        key = self._aggregate(address)
        if len(self._memo) >= self.max_entries:
            self._memo.clear()
        self._memo[address] = key
        return key

    def _aggregate(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return address  # not an address (a unix socket?): counted as itself
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        prefix = self._v4 if ip.version == 4 else self._v6
        if prefix == ip.max_prefixlen:
            return str(ip)
        return str(ipaddress.ip_network((ip, prefix), strict=False))


class TokenBuckets:
    """Token buckets per client: `rate` tokens a second, at most `burst` kept."""

    __slots__ = ("_buckets", "burst", "by_address", "max_clients", "overflows", "rate")

    def __init__(self, rate: float, burst: float, max_clients: int):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_clients = max_clients
        # key -> [tokens, when last updated, rate, burst]: the last two so that the hot path reads
        # everything from the one list
        self._buckets: dict[str, list[float]] = {}
        # Source address -> its client's bucket (the same list): the hot path's one lookup, with no
        # prefix arithmetic.  A cache of _buckets, emptied whenever buckets are forgotten.
        self.by_address: dict[str, list[float]] = {}
        self.overflows = 0  # times the table was emptied because a sweep freed too little

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """One token for this client, if it has one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._sweep(now)
            self._buckets[key] = [self.burst - 1.0, now, self.rate, self.burst]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def wait(self, key: str, now: float) -> float:
        """Seconds until this client has a token again (0 when it has one now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        """Forget clients whose bucket has refilled (idle ones); empty the table if that is too few."""
        full = [key for key, b in self._buckets.items() if b[0] + (now - b[1]) * self.rate >= self.burst]
        self.by_address.clear()
        if len(full) < self.max_clients // 10:
            self._buckets.clear()
            self.overflows += 1
            return
        for key in full:
            del self._buckets[key]

    def bucket(self, key: str) -> list[float] | None:
        return self._buckets.get(key)


class Counts:
    """How many of something each client holds now (upstream queries, TCP connections)."""

    __slots__ = ("_held", "total")

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self.total = 0

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def acquire(self, key: str, cap: int) -> bool:
        """One more for this client, unless it holds `cap` already (0: no cap)."""
        held = self._held.get(key, 0)
        if cap and held >= cap:
            return False
        self._held[key] = held + 1
        self.total += 1
        return True

    def release(self, key: str) -> None:
        held = self._held.get(key, 0)
        if held <= 1:
            self._held.pop(key, None)
        else:
            self._held[key] = held - 1
        if held:
            self.total -= 1

    def __len__(self) -> int:
        return len(self._held)


class ClientLimits:
    """Every per-client limit, as the server and resolver ask them (all O(1) per query)."""

    def __init__(self, settings: LimitSettings):
        self.settings = settings
        self.enabled = settings.enabled
        self.keys = ClientKeys(settings.ipv4_prefix, settings.ipv6_prefix, settings.max_clients)
        # None: unlimited (qps 0, or limits off), checked with one comparison per query.
        self._buckets = tuple(
            TokenBuckets(kind.qps, kind.burst, settings.max_clients) if kind.qps and self.enabled else None
            for kind in settings.kinds
        )
        self._by_address = tuple(b.by_address if b is not None else None for b in self._buckets)
        self._slip = settings.slip if settings.over_limit == "slip" else 0
        # key -> [limited queries (every slip-th is TC), limited in the current second, its start]
        self._limited: dict[str, list[float]] = {}
        # Measured over a tenth of a second: a flood fills the socket's queue within that.
        threshold = settings.kernel_block_qps
        self._flood_threshold = max(1, round(threshold * FLOOD_WINDOW)) if threshold else 0
        self.on_flood: Callable[[str], None] | None = None  # a client far over its rate (blockd.kernel_blocks)
        self.upstream = Counts()
        self.tcp = Counts()
        self.upstream_refusal = ""  # why start_upstream last said no

    def check_udp(self, address: str, kind: int, now: float) -> int:
        """Whether this UDP query is answered (Verdict.ANSWER, 0), dropped, or answered with TC=1
        only.  kind is a Kind (a plain int on the hot path: no enum built per query)."""
        by_address = self._by_address[kind]
        if by_address is None:
            return 0
        bucket = by_address.get(address)
        if bucket is not None:  # TokenBuckets.take, inlined: this runs for every UDP query
            tokens = bucket[0] + (now - bucket[1]) * bucket[2]
            if tokens > bucket[3]:
                tokens = bucket[3]
            bucket[1] = now
            if tokens >= 1.0:
                bucket[0] = tokens - 1.0
                return 0
            bucket[0] = tokens
            return self._over_rate(self.keys.key(address), now)
        buckets = self._buckets[kind]
        assert buckets is not None  # by_address is None exactly when buckets is
        key = self.keys.key(address)
        allowed = buckets.take(key, now)
        known = buckets.bucket(key)
        if known is not None:
            if len(buckets.by_address) >= self.settings.max_clients:
                buckets.by_address.clear()
            buckets.by_address[address] = known
        return 0 if allowed else self._over_rate(key, now)

    def _over_rate(self, key: str, now: float) -> int:
        limited = self._limited.get(key)
        if limited is None:
            if len(self._limited) >= self.settings.max_clients:
                self._limited.clear()
            limited = self._limited[key] = [0, 0, now]
        limited[0] += 1
        if now - limited[2] >= FLOOD_WINDOW:
            limited[1], limited[2] = 0, now
        limited[1] += 1
        if limited[1] == self._flood_threshold and self.on_flood is not None:
            self.on_flood(key)
        if self._slip and limited[0] % self._slip == 0:
            return Verdict.SLIP
        return Verdict.DROP

    def tcp_wait(self, address: str, kind: Kind, now: float) -> float:
        """0 to answer this TCP query now, else the seconds to stop reading from its connection."""
        buckets = self._buckets[kind]
        if buckets is None or not self.enabled:
            return 0.0
        key = self.keys.key(address)
        if buckets.take(key, now):
            return 0.0
        return max(buckets.wait(key, now), 0.001)

    def start_upstream(self, address: str, kind: Kind) -> str | None:
        """Take an upstream slot: the client key to release it with, or None with the reason
        in `upstream_refusal` ("upstream_in_flight" or "upstream_total")."""
        key = self.keys.key(address)
        if not self.enabled:
            self.upstream.acquire(key, 0)
            return key
        total = self.settings.upstream_in_flight_total
        if total and self.upstream.total >= total:
            self.upstream_refusal = "upstream_total"
            return None
        if not self.upstream.acquire(key, self.settings.kinds[kind].upstream_in_flight):
            self.upstream_refusal = "upstream_in_flight"
            return None
        return key

    def finish_upstream(self, key: str) -> None:
        self.upstream.release(key)

    def open_tcp(self, address: str, kind: Kind) -> str | None:
        """Take a TCP connection slot: the key to release it with, or None over the cap."""
        key = self.keys.key(address)
        cap = self.settings.kinds[kind].tcp_connections if self.enabled else 0
        return key if self.tcp.acquire(key, cap) else None

    def close_tcp(self, key: str) -> None:
        self.tcp.release(key)

    @property
    def table_overflows(self) -> int:
        return sum(b.overflows for b in self._buckets if b is not None)

    def clients_tracked(self) -> int:
        return sum(len(b) for b in self._buckets if b is not None)

    def upstream_in_flight(self) -> int:
        return self.upstream.total

    def tcp_connections(self) -> int:
        return self.tcp.total


def kind_of(allowed: bool, trusted: bool) -> Kind:
    if not allowed:
        return Kind.OUTSIDE
    return Kind.FORWARDER if trusted else Kind.CLIENT
