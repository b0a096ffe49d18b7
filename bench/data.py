"""The lists and query files every server gets: the shipped lists as blockd loads them, the synthetic
list, and dnsperf's query files (blocked names, cache hits, cache misses)."""

from __future__ import annotations

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
