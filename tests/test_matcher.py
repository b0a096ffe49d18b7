"""blockd.matcher: ancestor matching over many lists (DomainIndex) and allowlists (SuffixSet)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.lists import DomainList
from blockd.matcher import DomainIndex, Match, SuffixSet
from blockd.names import ancestors


def dl(name: str, *domains: str) -> DomainList:
    return DomainList(name=name, path=f"{name}.txt", domains=frozenset(domains))


TIKTOK = dl("tiktok", "tiktok.com", "tiktokv.com", "musical.ly", "byteoversea.com")
BYTEDANCE = dl("bytedance", "bytedance.com", "tiktok.com", "cdn.bytedance.com", "douyin.com")
DOH = dl("doh", "dns.google", "use-application-dns.net", "cloudflare-dns.com")
LISTS = [TIKTOK, BYTEDANCE, DOH]


@pytest.fixture
def index() -> DomainIndex:
    return DomainIndex(LISTS)


def everything(index: DomainIndex) -> tuple[int, list[int]]:
    return index.mask_for(index.list_names), list(range(len(index.list_names)))


@pytest.mark.parametrize(
    "key",
    [
        "tiktok.com",
        "www.tiktok.com",
        "m.tiktok.com",
        "a.b.c.d.e.f.g.h.tiktok.com",
        "-.x.tiktok.com",
        "_tcp.tiktok.com",
        ".".join(["x"] * 100) + ".tiktok.com",
        "musical.ly",
        "api.musical.ly",
    ],
)
def test_listed_name_blocks_itself_and_every_subdomain(index: DomainIndex, key: str) -> None:
    mask, order = everything(index)
    match = index.lookup(key, mask, order)
    assert match is not None
    assert match.domain in {"tiktok.com", "musical.ly"}
    assert match.list_name == "tiktok"


@pytest.mark.parametrize(
    "key",
    [
        "nottiktok.com",
        "www.nottiktok.com",
        "tiktok.com.example.net",
        "www.tiktok.com.example.net",
        "tiktok.co",
        "tiktok.co.uk",
        "tiktok.comm",
        "tiktokcom",
        "com",
        "tiktok",
        "",
        "musical.lyx",
        "example.org",
        "iktok.com",
        "google",
        "dns.google.example",
    ],
)
def test_near_misses_are_not_blocked(index: DomainIndex, key: str) -> None:
    mask, order = everything(index)
    assert index.lookup(key, mask, order) is None


def test_most_specific_listed_ancestor_wins(index: DomainIndex) -> None:
    mask, order = everything(index)
    assert index.lookup("cdn.bytedance.com", mask, order) == Match("bytedance", "cdn.bytedance.com")
    assert index.lookup("x.cdn.bytedance.com", mask, order) == Match("bytedance", "cdn.bytedance.com")
    assert index.lookup("www.bytedance.com", mask, order) == Match("bytedance", "bytedance.com")


def test_first_list_in_the_groups_order_wins_across_lists() -> None:
    """As among RPZ policy zones: list order first, specificity only within a list."""
    parent = dl("parent", "example.com")
    child = dl("child", "ads.example.com")
    index = DomainIndex([parent, child])
    mask = index.mask_for(["parent", "child"])
    assert index.lookup("x.ads.example.com", mask, [1, 0]) == Match("child", "ads.example.com")
    assert index.lookup("x.ads.example.com", mask, [0, 1]) == Match("parent", "example.com")
    for order in ([0, 1], [1, 0]):
        assert index.lookup("www.example.com", mask, order) == Match("parent", "example.com")


def test_exact_and_below_entries() -> None:
    rpz = DomainList("rpz", "rpz.zone", frozenset(), exact=frozenset({"tiktok.com", "a.b.example"}),
                     below=frozenset({"tiktok.com", "example"}))  # fmt: skip
    index = DomainIndex([rpz])
    mask, order = index.mask_for(["rpz"]), [0]
    assert index.lookup("tiktok.com", mask, order) == Match("rpz", "tiktok.com", "exact")
    assert index.lookup("www.tiktok.com", mask, order) == Match("rpz", "tiktok.com", "below")
    assert index.lookup("www.tiktok.com", mask, order).trigger == "*.tiktok.com"  # type: ignore[union-attr]
    # Within a list the most specific entry wins: the exact name beats the wildcard above it.
    assert index.lookup("a.b.example", mask, order) == Match("rpz", "a.b.example", "exact")
    assert index.lookup("x.a.b.example", mask, order) == Match("rpz", "example", "below")
    assert index.lookup("example", mask, order) is None  # "*.example" does not cover example itself
    assert index.lookup("nottiktok.com", mask, order) is None


def test_an_exact_entry_does_not_cover_subdomains() -> None:
    hosts = DomainList("hosts", "hosts.txt", frozenset(), exact=frozenset({"ads.example.com"}))
    plain = dl("plain", "example.org")
    index = DomainIndex([hosts, plain])
    mask = index.mask_for(["hosts", "plain"])
    assert index.lookup("ads.example.com", mask, [0, 1]) == Match("hosts", "ads.example.com", "exact")
    assert index.lookup("x.ads.example.com", mask, [0, 1]) is None
    assert index.lookup("www.example.org", mask, [0, 1]) == Match("plain", "example.org")


def test_mask_selects_only_the_groups_lists(index: DomainIndex) -> None:
    only_doh = index.mask_for(["doh"])
    order = [2]
    assert index.lookup("www.tiktok.com", only_doh, order) is None
    assert index.lookup("dns.google", only_doh, order) == Match("doh", "dns.google")
    only_tiktok = index.mask_for(["tiktok"])
    assert index.lookup("dns.google", only_tiktok, [0]) is None
    assert index.lookup("douyin.com", only_tiktok, [0]) is None
    assert index.lookup("douyin.com", index.mask_for(["bytedance"]), [1]) == Match("bytedance", "douyin.com")
    assert index.lookup("tiktok.com", 0, []) is None


def test_mask_skips_a_more_specific_entry_from_an_unselected_list(index: DomainIndex) -> None:
    # cdn.bytedance.com is only on "bytedance"; with a mask for a list holding just the
    # parent, the walk must continue past the unselected entry to the parent.
    parent = dl("parent", "bytedance.com")
    index = DomainIndex([BYTEDANCE, parent])
    mask = index.mask_for(["parent"])
    assert index.lookup("x.cdn.bytedance.com", mask, [1]) == Match("parent", "bytedance.com")


def test_priority_order_names_the_first_list_of_the_group(index: DomainIndex) -> None:
    # tiktok.com is on both "tiktok" (index 0) and "bytedance" (index 1).
    mask = index.mask_for(["tiktok", "bytedance"])
    assert index.lookup("www.tiktok.com", mask, [0, 1]) == Match("tiktok", "tiktok.com")
    assert index.lookup("www.tiktok.com", mask, [1, 0]) == Match("bytedance", "tiktok.com")
    # A group with just one of the two lists names that one, whatever the index order.
    assert index.lookup("tiktok.com", index.mask_for(["bytedance"]), [1]) == Match("bytedance", "tiktok.com")


def test_mask_for_and_bits(index: DomainIndex) -> None:
    assert index.list_names == ["tiktok", "bytedance", "doh"]
    assert index.mask_for([]) == 0
    assert index.mask_for(["tiktok"]) == 1
    assert index.mask_for(["doh", "tiktok"]) == 0b101
    with pytest.raises(KeyError):
        index.mask_for(["nope"])


def test_len_counts_distinct_names(index: DomainIndex) -> None:
    distinct = TIKTOK.domains | BYTEDANCE.domains | DOH.domains
    assert len(index) == len(distinct)


def test_empty_index() -> None:
    index = DomainIndex([])
    assert len(index) == 0
    assert index.lookup("tiktok.com", 0, []) is None


def test_many_lists_beyond_64_bits() -> None:
    lists = [dl(f"l{i}", f"name{i}.example") for i in range(130)]
    index = DomainIndex(lists)
    mask = index.mask_for([f"l{i}" for i in range(130)])
    order = list(range(130))
    assert index.lookup("www.name129.example", mask, order) == Match("l129", "name129.example")
    assert index.lookup("www.name129.example", index.mask_for(["l128"]), [128]) is None


# --- SuffixSet -------------------------------------------------------------------------------


def test_suffix_set_matches_itself_and_subdomains() -> None:
    allow = SuffixSet({"status.example.gov", "ok.tiktok.com"})
    assert allow.contains("status.example.gov")
    assert allow.contains("a.b.status.example.gov")
    assert allow.contains("ok.tiktok.com")
    assert allow.contains("x.ok.tiktok.com")
    assert not allow.contains("tiktok.com")
    assert not allow.contains("www.tiktok.com")
    assert not allow.contains("notok.tiktok.com")
    assert not allow.contains("example.gov")
    assert not allow.contains("status.example.gov.evil.net")
    assert not allow.contains("xstatus.example.gov")
    assert not allow.contains("")


def test_empty_suffix_set() -> None:
    allow = SuffixSet(frozenset())
    assert not allow.contains("anything.example")
    assert not allow.contains("")


# --- property: lookup agrees with a brute-force ancestor check -------------------------------

LABELS = st.sampled_from(["a", "b", "c", "tiktok", "com", "x-y", "_s", "0"])
NAMES = st.lists(LABELS, min_size=1, max_size=6).map(".".join)


def brute_force(key: str, lists: list[set[str]], selected: list[int]) -> tuple[str, str] | None:
    """The first selected list holding an ancestor, and its most specific such ancestor."""
    labels = key.split(".")
    for index in selected:
        for start in range(len(labels)):
            name = ".".join(labels[start:])
            if name in lists[index]:
                return f"l{index}", name
    return None


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    lists=st.lists(st.sets(NAMES, max_size=8), min_size=1, max_size=4),
    key=NAMES,
    data=st.data(),
)
def test_lookup_iff_an_ancestor_is_listed(lists: list[set[str]], key: str, data: st.DataObject) -> None:
    index = DomainIndex([dl(f"l{i}", *names) for i, names in enumerate(lists)])
    order = data.draw(st.permutations(range(len(lists))))
    selected = order[: data.draw(st.integers(0, len(lists)))]
    mask = index.mask_for([f"l{i}" for i in selected])
    match = index.lookup(key, mask, selected)

    listed = set().union(*(lists[i] for i in selected))
    assert (match is not None) == any(name in listed for name in ancestors(key))
    expected = brute_force(key, lists, selected)
    assert (None if match is None else (match.list_name, match.domain)) == expected

    allow = SuffixSet(listed)
    assert allow.contains(key) == (match is not None)
