"""The lists and query files every server gets: the shipped lists as blockd loads them, the synthetic
list, and dnsperf's query files (blocked names, cache hits, cache misses)."""

from __future__ import annotations

import os
import random
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common import BenchError, log

SHIPPED_LISTS = ("tiktok", "bytedance", "doh-bypass")  # what the embedded default loads
HIT_NAMES = 100  # cache-hit set: hit0..hit99.bench.test, A and AAAA
# Names blockd answers NXDOMAIN by design whatever the group's action (the Firefox DoH canary and
# iCloud Private Relay: a sinkhole address would be a positive answer); the anchors would sinkhole
# them, so they stay in the lists but out of the blocked-query files.
NEGATIVE_BY_DESIGN = ("use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com", "mask-api.icloud.com")


@dataclass
class ListSet:
    key: str  # "shipped" | "1m"
    label: str
    files: dict[str, Path]  # blockd list name -> file
    domains: list[str]
    query_file: Path
    probe: str  # a listed name, for start-up probing
    configs: dict[str, Path] = field(default_factory=dict)  # server kind -> its block-list config (servers.py)


@dataclass
class QueryFiles:
    hit: Path  # the cache-hit set
    misses: list[Path]  # unique names: one file per repeat, and the last for the fake upstream alone
    miss_count: int  # names per cache-miss file


def shipped_dir(src: Path) -> Path:
    """The shipped lists' directory under `src` (the run's snapshot)."""
    return src / "domains"


def load_shipped(src: Path) -> list[str]:
    """The shipped lists exactly as blockd loads them (normalised, comments dropped, deduplicated)."""
    from blockd.lists import load_list

    domains: set[str] = set()
    for name in SHIPPED_LISTS:
        domains |= load_list(name, shipped_dir(src) / f"{name}.txt").domains
    return sorted(domains)


def synthetic_names(count: int, seed: int = 20261129) -> list[str]:
    """`count` distinct, valid, deterministic names: 80% 'label.tld', 20% 'label.label.tld'."""
    rng = random.Random(seed)
    tlds = ["com", "net", "org", "io", "cn", "info", "xyz", "app", "co", "me", "tv", "biz"]
    alphabet = string.ascii_lowercase + string.digits
    names: set[str] = set()
    while len(names) < count:
        label = rng.choice(string.ascii_lowercase) + "".join(rng.choices(alphabet, k=rng.randint(5, 13)))
        if rng.random() < 0.2:
            label = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) + "." + label
        names.add(f"{label}.{rng.choice(tlds)}")
    return sorted(names)


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    with open(path, "w") as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")
    return path


def blocked_queries(domains: list[str], count: int, seed: int) -> list[str]:
    """Query lines for listed names: the name itself or a subdomain of it, A and AAAA."""
    rng = random.Random(seed)
    domains = [d for d in domains if not d.endswith(NEGATIVE_BY_DESIGN)]
    picks = domains if len(domains) <= count else rng.sample(domains, count)
    lines = []
    for index, domain in enumerate(picks):
        for qtype in ("A", "AAAA"):
            name = domain if (index + len(qtype)) % 2 else f"www.{domain}"
            lines.append(f"{name} {qtype}")
    rng.shuffle(lines)
    return lines


def list_sets(tmp: Path, src: Path, synthetic: int | None) -> dict[str, ListSet]:
    """The shipped lists and, unless `synthetic` is None, a synthetic list of that many names."""
    log("loading the shipped lists as blockd does")
    shipped = load_shipped(src)
    sets = {
        "shipped": ListSet(
            key="shipped",
            label=f"shipped lists ({len(shipped):,} names)",
            files={name: shipped_dir(src) / f"{name}.txt" for name in SHIPPED_LISTS},
            domains=shipped,
            query_file=write_lines(tmp / "q-blocked-shipped.txt", blocked_queries(shipped, 5000, 1)),
            probe=shipped[0],
        )
    }
    if synthetic is not None:
        sets["1m"] = synthetic_set(tmp, synthetic)
    return sets


def synthetic_set(tmp: Path, count: int) -> ListSet:
    log(f"generating the synthetic {count:,}-name list")
    names = synthetic_names(count)
    path = write_lines(tmp / "synthetic.txt", names)
    from blockd.lists import load_list

    loaded = load_list("synthetic", path).domains
    if len(loaded) != len(names):
        raise BenchError(f"blockd loads {len(loaded)} of the {len(names)} synthetic names")
    return ListSet(
        key="1m",
        label=f"synthetic list ({len(names):,} names)",
        files={"synthetic": path},
        domains=names,
        query_file=write_lines(tmp / "q-blocked-1m.txt", blocked_queries(names, 20000, 2)),
        probe=names[-1],
    )


def query_files(tmp: Path, repeat: int, duration: float) -> QueryFiles:
    """The cache-hit file and the cache-miss files."""
    hit = write_lines(
        tmp / "q-cache-hit.txt", [f"hit{i}.bench.test {t}" for i in range(HIT_NAMES) for t in ("A", "AAAA")]
    )
    # Unique names, enough that no server runs out within a run; one file per repeat (and one
    # for the upstream check), so no repeat asks a name an earlier one put in the cache.
    count = int(min(4_000_000, max(20_000, 150_000 * duration)))
    misses = [
        write_lines(tmp / f"q-cache-miss-{run}.txt", (f"u{i}.r{run}.miss.bench.test A" for i in range(count)))
        for run in range(repeat + 1)
    ]
    return QueryFiles(hit, misses, count)


# --------------------------------------------------------------------------------------------
# The RPZ comparison (--rpz): one generated zone, loaded from a file and transferred from Knot

RPZ_ORIGIN = "rpz.bench."
RPZ_SUFFIX = "bench.test"  # every trigger lies under it: the fake upstream answers A 192.0.2.1 there


@dataclass
class RpzZone:
    """A zone of `name CNAME .` + `*.name CNAME .` pairs (NXDOMAIN for the name and everything below it).

    Every name lies under bench.test., which the fake upstream answers with A 192.0.2.1: an NXDOMAIN can
    only come from the policy, and a trigger an IXFR removed must come back as 192.0.2.1.
    """

    origin: str
    path: Path  # the zone file (serial 1), what blockd's `path` and unbound's `zonefile:` load
    names: list[str]  # the listed names, in file order; len(names) * 2 triggers
    spares: list[str]  # never listed yet: what the IXFR changes add
    serial: int = 1
    rng: random.Random = field(default_factory=lambda: random.Random(9))

    @property
    def triggers(self) -> int:
        return 2 * len(self.names)

    @property
    def probe(self) -> str:
        """The start-up probe: the last name of the file."""
        return self.names[-1]

    def listset(self, key: str, label: str) -> ListSet:
        """The zone as a list set for Server.start (no dnsperf runs on it: no query file)."""
        return ListSet(key, label, {"rpz": self.path}, list(self.names), Path(os.devnull), self.probe)

    def write(self, path: Path) -> Path:
        """The zone as a master file at its current serial."""
        with open(path, "w") as handle:
            handle.write(f"$ORIGIN {self.origin}\n$TTL 300\n")
            handle.write(f"@ SOA localhost. hostmaster.localhost. {self.serial} 3600 600 864000 60\n@ NS localhost.\n")
            for name in self.names:
                handle.write(f"{name} CNAME .\n*.{name} CNAME .\n")
        return path

    def change(self, triggers: int) -> tuple[list[str], list[str]]:
        """Remove triggers/4 names and add as many spares (triggers/2 removed, triggers/2 added); bump the
        serial.  Returns (removed, added) names."""
        count = max(1, triggers // 4)
        if len(self.spares) < count or len(self.names) < 2 * count:
            raise BenchError(f"the RPZ zone has no {count} names left to change")
        gone = set(self.rng.sample(range(len(self.names) - 1), count))  # never the probe (the last name)
        removed = [self.names[i] for i in sorted(gone)]
        added, self.spares = self.spares[:count], self.spares[count:]
        kept = [name for i, name in enumerate(self.names) if i not in gone]
        self.names = kept[:-1] + added + kept[-1:]
        self.serial += 1
        return removed, added


def rpz_zone(tmp: Path, triggers: int, spares: int, seed: int = 20261201) -> RpzZone:
    """`triggers` triggers over triggers/2 deterministic names (data.synthetic_names, under bench.test.), and
    `spares` more names kept out of the zone for IXFR changes to add."""
    count = max(2, triggers // 2)
    log(f"generating the {2 * count:,}-trigger RPZ zone ({count:,} names, each `name` and `*.name` CNAME .)")
    names = [f"{name}.{RPZ_SUFFIX}" for name in synthetic_names(count + spares, seed)]
    random.Random(seed).shuffle(names)
    zone = RpzZone(RPZ_ORIGIN, tmp / "big.rpz", names[:count], names[count:])
    zone.write(zone.path)
    return zone
