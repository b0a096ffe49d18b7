"""Third-party list shapes (AdGuard service lists, adblock modifiers and exceptions, dnsmasq lines,
wildcards inside a label) and [lists.X] invalid_lines = "skip": unit tests of blockd.lists and
blockd.matcher, then the real daemon with a lenient list and the same list strict."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client import CollectorRegistry

from blockd.config import ConfigError, ListConfig, parse_config
from blockd.lists import (
    EXACT_ENTRY,
    EXCEPTION_ENTRY,
    SUBTREE_ENTRY,
    WILDCARD_ENTRY,
    DomainList,
    ListLoadError,
    parse_entries,
    parse_list,
)
from blockd.matcher import EXACT, SUBTREE, DomainIndex, Match
from blockd.metrics import ListInvalidLinesCollector
from blockd.names import InvalidNameError
from blockd.sources import load_source
from tests.daemon import Daemon, rcode_name

DATA = Path(__file__).parent / "data"
ADGUARD_TIKTOK = DATA / "adguard-tiktok-service.txt"  # 28 rules, two of which blockd refused before


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("|p16-tiktokcdn-com.akamaized.net^", [(EXACT_ENTRY, "p16-tiktokcdn-com.akamaized.net")]),
        ("||p16-tiktok-*.ibyteimg.com^", [(WILDCARD_ENTRY, "p16-tiktok-*.ibyteimg.com")]),
        ("||P16-TikTok-*.IByteImg.com^", [(WILDCARD_ENTRY, "p16-tiktok-*.ibyteimg.com")]),
        ("p16-tiktok-*.ibyteimg.com", [(WILDCARD_ENTRY, "p16-tiktok-*.ibyteimg.com")]),
        ("*.p16-*.ibyteimg.com", [(WILDCARD_ENTRY, "p16-*.ibyteimg.com")]),
        ("||x.example^$important", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^$all", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^$document,important", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^$third-party", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^$3p,popup", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^$IMPORTANT", [(SUBTREE_ENTRY, "x.example")]),
        ("@@||ok.x.example^", [(EXCEPTION_ENTRY, "ok.x.example")]),
        ("@@||ok.x.example^$important", [(EXCEPTION_ENTRY, "ok.x.example")]),
        ("x.example # a note", [(SUBTREE_ENTRY, "x.example")]),
        ("x.example#a note", [(SUBTREE_ENTRY, "x.example")]),
        ("||x.example^#note", [(SUBTREE_ENTRY, "x.example")]),
        ("0.0.0.0 x.example#note", [(SUBTREE_ENTRY, "x.example")]),
        ("local=/x.example/", [(SUBTREE_ENTRY, "x.example")]),
        ("address=/x.example/", [(SUBTREE_ENTRY, "x.example")]),
        ("address=/x.example/0.0.0.0", [(SUBTREE_ENTRY, "x.example")]),
        ("address=/x.example/::", [(SUBTREE_ENTRY, "x.example")]),
        ("address=/.x.example/127.0.0.1", [(SUBTREE_ENTRY, "x.example")]),
        ("address=/a.example/b.example/", [(SUBTREE_ENTRY, "a.example"), (SUBTREE_ENTRY, "b.example")]),
        ("server=/x.example/", [(SUBTREE_ENTRY, "x.example")]),
        ("  local=/X.Example/  ", [(SUBTREE_ENTRY, "x.example")]),
        ("# address=/x.example/", []),
    ],
)
def test_third_party_lines_understood(line: str, expected: list[tuple[str, str]]) -> None:
    assert parse_entries(line) == expected


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("||x.example^$denyallow=a.example", "$denyallow changes the block"),
        ("||x.example^$client=10.0.0.1", "$client changes the block"),
        ("||x.example^$dnstype=AAAA", "$dnstype changes the block"),
        ("||x.example^$dnsrewrite=1.2.3.4", "$dnsrewrite changes the block"),
        ("||x.example^$ctag=child", "$ctag changes the block"),
        ("||x.example^$badfilter", "$badfilter changes the block"),
        ("||x.example^$important,badfilter", "$badfilter changes the block"),
        ("||x.example^$script", "$script is not supported"),
        ("server=/x.example/1.2.3.4", "forwards the name elsewhere, it is not a block"),
        ("server=/x.example/#", "forwards the name elsewhere"),
        ("address=/#/", "'#' (every domain)"),
        ("address=//", "empty domain"),
        ("local=/x.example/1.2.3.4", "local=/name/ takes nothing"),
        ("example.com##.ad-banner", "cosmetic"),
        ("example.com#@#.ad-banner", "cosmetic"),
        ("example.com#$#body { color: red }", "cosmetic"),
        ("a.p16-*.ibyteimg.com", "inside the first label"),
        ("ads*.com", "not directly under a top-level domain"),
        ("*.*.x.example", "inside the first label"),
        ("p16-*!.ibyteimg.com", "invalid character in wildcard label"),
        ("@@||p16-*.ibyteimg.com^", "wildcards are not supported in exception rules"),
        ("@@|x.example^", "only '@@||name^' exception rules"),
        ("|p16-*.ibyteimg.com^", "wildcards are not supported in '|name^' rules"),
        ("|x.example", "must end with '^'"),
    ],
)
def test_third_party_lines_refused_with_the_reason(line: str, fragment: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        parse_entries(line)
    assert fragment in str(info.value)


def test_adguard_tiktok_service_list_loads_strict() -> None:
    """AdGuard's own TikTok service list: every one of its 28 rules understood."""
    parsed = parse_list(ADGUARD_TIKTOK.read_text().splitlines(), "svc")
    assert parsed.errors == [] and parsed.invalid == 0
    assert parsed.exact == {"p16-tiktokcdn-com.akamaized.net"}
    assert parsed.wildcards == {"p16-tiktok-*.ibyteimg.com"}
    assert len(parsed.domains) == 26 and "tiktokv.com" in parsed.domains


def _index(*lists: DomainList) -> Callable[[str], Match | None]:
    index = DomainIndex(list(lists))
    mask = index.mask_for(lst.name for lst in lists)
    order = list(range(len(lists)))
    return lambda name: index.lookup(name, mask, order)


def test_adguard_tiktok_service_list_matches() -> None:
    parsed = parse_list(ADGUARD_TIKTOK.read_text().splitlines(), "svc")
    lookup = _index(DomainList("svc", "svc", parsed.domains, exact=parsed.exact, wildcards=parsed.wildcards))
    assert lookup("p16-tiktokcdn-com.akamaized.net") == Match("svc", "p16-tiktokcdn-com.akamaized.net", EXACT)
    assert lookup("www.p16-tiktokcdn-com.akamaized.net") is None  # |name^: the name only
    assert lookup("akamaized.net") is None
    wildcard = Match("svc", "p16-tiktok-*.ibyteimg.com", SUBTREE)
    for name in ["p16-tiktok-va.ibyteimg.com", "p16-tiktok-.ibyteimg.com", "a.b.p16-tiktok-sg.ibyteimg.com"]:
        assert lookup(name) == wildcard, name
    for name in ["ibyteimg.com", "p16-tiktokva.ibyteimg.com", "x-p16-tiktok-va.ibyteimg.com", "p16-tiktok-va.x.com"]:
        assert lookup(name) is None, name
    assert lookup("www.tiktokv.com") == Match("svc", "tiktokv.com", SUBTREE)


def test_the_most_specific_entry_wins_over_a_wildcard() -> None:
    lookup = _index(DomainList("a", "a", {"p16-tiktok-va.ibyteimg.com"}, wildcards={"p16-*.ibyteimg.com"}))
    assert lookup("x.p16-tiktok-va.ibyteimg.com") == Match("a", "p16-tiktok-va.ibyteimg.com", SUBTREE)
    assert lookup("p16-other.ibyteimg.com") == Match("a", "p16-*.ibyteimg.com", SUBTREE)


def test_a_wildcard_in_two_lists_matches_in_the_group_order() -> None:
    first = DomainList("first", "f", set(), wildcards={"cdn-*.x.example"})
    second = DomainList("second", "s", set(), wildcards={"cdn-*.x.example"})
    index = DomainIndex([first, second])
    assert index.lookup("cdn-1.x.example", index.mask_for(["first", "second"]), [1, 0]).list_name == "second"
    assert index.lookup("cdn-1.x.example", index.mask_for(["first"]), [0]).list_name == "first"


def test_exceptions_beat_the_lists_own_entries_only() -> None:
    parsed = parse_list(["||x.example^", "@@||ok.x.example^", "||p-*.x.example^"], "feed")
    feed = DomainList("feed", "feed", parsed.domains, exceptions=parsed.exceptions, wildcards=parsed.wildcards)
    curated = DomainList("curated", "curated", {"x.example"})
    alone = _index(feed)
    assert alone("x.example") == Match("feed", "x.example", SUBTREE)
    assert alone("www.x.example") == Match("feed", "x.example", SUBTREE)
    assert alone("ok.x.example") is None
    assert alone("a.ok.x.example") is None
    assert alone("notok.x.example") is not None
    assert alone("p-1.x.example") is not None  # a wildcard outside the exception still blocks
    both = _index(feed, curated)
    assert both("ok.x.example") == Match("curated", "x.example", SUBTREE)  # another list still blocks it
    assert both("www.x.example") == Match("feed", "x.example", SUBTREE)


def _feed(tmp_path: Path, text: str, invalid_lines: str = "skip", match: str = "subtree") -> ListConfig:
    path = tmp_path / "feed.txt"
    path.write_text(textwrap.dedent(text))
    return ListConfig(name="feed", path=path, invalid_lines=invalid_lines, match=match)


FEED = """\
! A third-party feed in AdGuard syntax, with lines blockd cannot apply
||tiktok.com^$important
|p16-tiktokcdn-com.akamaized.net^
||p16-tiktok-*.ibyteimg.com^
@@||ok.tiktok.com^
||dnstype.example^$dnstype=AAAA
server=/forwarded.example/10.0.0.53
local=/dnsmasq.example/
example.com##.banner
hosts.example # trailing note
"""


def test_skip_keeps_what_it_understood_and_counts_the_rest(tmp_path: Path) -> None:
    listed = load_source(_feed(tmp_path, FEED))
    assert listed.domains == {"tiktok.com", "dnsmasq.example", "hosts.example"}
    assert listed.exact == {"p16-tiktokcdn-com.akamaized.net"}
    assert listed.wildcards == {"p16-tiktok-*.ibyteimg.com"}
    assert listed.exceptions == {"ok.tiktok.com"}
    assert listed.invalid_lines == 3
    assert [error.line for error in listed.invalid_sample] == [6, 7, 9]
    note = listed.ignored_note()
    path = tmp_path / "feed.txt"
    assert note.startswith("skipped 3 invalid lines (invalid_lines = 'skip'): ")
    assert f"{path}:6: adblock modifier $dnstype changes the block" in note
    assert f"{path}:7: server=/name/ADDRESS forwards" in note
    assert "more" not in note  # all three quoted: no "and N more"


def test_skip_summary_quotes_the_first_five_and_counts_all(tmp_path: Path) -> None:
    text = "ok.example\n" + "".join(f"bad{index}!.example\n" for index in range(150))
    listed = load_source(_feed(tmp_path, text))
    assert listed.domains == {"ok.example"} and listed.invalid_lines == 150
    assert [error.line for error in listed.invalid_sample] == [2, 3, 4, 5, 6]
    assert listed.ignored_note().endswith("; and 145 more")
    assert "bad0!" in listed.ignored_note() and "bad5!" not in listed.ignored_note()


def test_reject_names_every_bad_line(tmp_path: Path) -> None:
    with pytest.raises(ListLoadError) as info:
        load_source(_feed(tmp_path, FEED, invalid_lines="reject"))
    path = tmp_path / "feed.txt"
    assert [str(error).split(": ", 1)[0] for error in info.value.errors] == [f"{path}:{n}" for n in (6, 7, 9)]


def test_a_strict_list_with_every_line_understood_loads(tmp_path: Path) -> None:
    listed = load_source(_feed(tmp_path, ADGUARD_TIKTOK.read_text(), invalid_lines="reject"))
    assert len(listed) == 28 and listed.invalid_lines == 0 and listed.ignored_note() == ""


def test_a_reload_made_strict_refuses_the_unchanged_file(tmp_path: Path) -> None:
    config = _feed(tmp_path, FEED)
    lenient = load_source(config)
    assert load_source(config, previous=lenient) is lenient  # unchanged: not parsed again
    strict = ListConfig(name="feed", path=tmp_path / "feed.txt", invalid_lines="reject")
    with pytest.raises(ListLoadError):
        load_source(strict, previous=lenient)


def test_match_exact_puts_plain_entries_with_the_exact_ones(tmp_path: Path) -> None:
    listed = load_source(_feed(tmp_path, "0.0.0.0 a.example\n|b.example^\n", match="exact"))
    assert listed.domains == set() and listed.exact == {"a.example", "b.example"}


def test_invalid_lines_metric_is_read_at_scrape_time() -> None:
    counts = {"feed": 3, "curated": 0}
    registry = CollectorRegistry()
    registry.register(ListInvalidLinesCollector(lambda: counts))
    assert registry.get_sample_value("blockd_list_invalid_lines", {"list": "feed"}) == 3
    assert registry.get_sample_value("blockd_list_invalid_lines", {"list": "curated"}) == 0
    counts["feed"] = 1
    assert registry.get_sample_value("blockd_list_invalid_lines", {"list": "feed"}) == 1


CONFIG = '[upstream]\nservers = ["127.0.0.1:5353"]\n'


def test_invalid_lines_config_key(tmp_path: Path) -> None:
    config = parse_config(CONFIG + '[lists.feed]\npath = "feed.txt"\ninvalid_lines = "skip"\n', "t.toml", tmp_path)
    assert config.lists["feed"].invalid_lines == "skip"
    config = parse_config(CONFIG + '[lists.feed]\npath = "feed.txt"\n', "t.toml", tmp_path)
    assert config.lists["feed"].invalid_lines == "reject"
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG + '[lists.feed]\npath = "feed.txt"\ninvalid_lines = "ignore"\n', "t.toml", tmp_path)
    assert "t.toml: lists.feed.invalid_lines: 'ignore' is not one of reject, skip" in info.value.errors
    with pytest.raises(ConfigError) as info:
        parse_config(
            CONFIG + '[lists.feed]\npath = "feed.rpz"\nformat = "rpz"\ninvalid_lines = "skip"\n', "t.toml", tmp_path
        )
    assert any("lists.feed.invalid_lines: only for list files" in error for error in info.value.errors)


FEED_GROUP = """
[lists.feed]
path = "{path}"
invalid_lines = "{mode}"

[groups.feeds]
networks = ["127.0.0.6/32"]
lists = ["feed"]
action = "sinkhole"
"""
FEED_CLIENT = "127.0.0.6"


def test_daemon_with_a_lenient_list(make_daemon, upstream, tmp_path: Path) -> None:
    path = tmp_path / "feed.txt"
    path.write_text(ADGUARD_TIKTOK.read_text() + FEED)
    daemon: Daemon = make_daemon(extra=FEED_GROUP.format(path=path, mode="skip"))

    def sinkholed(name: str) -> bool:
        answer = daemon.query(name, source=FEED_CLIENT)
        assert rcode_name(answer) == "NOERROR", name
        return [item.to_text() for rrset in answer.answer for item in rrset] == ["0.0.0.0"]

    for name in [
        "p16-tiktok-va.ibyteimg.com",
        "p16-tiktokcdn-com.akamaized.net",
        "www.tiktok.com",
        "a.dnsmasq.example",
        "hosts.example",
    ]:
        assert sinkholed(name), name
    for name in ["ok.tiktok.com", "api.ok.tiktok.com", "www.p16-tiktokcdn-com.akamaized.net", "dnstype.example"]:
        assert not sinkholed(name), name
    assert "ok.tiktok.com" in upstream.names_asked()

    text = urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert 'blockd_list_invalid_lines{list="feed"} 3.0' in text
    assert 'blockd_list_invalid_lines{list="tiktok"} 0.0' in text
    log = daemon.log()
    assert "list feed: skipped 3 invalid lines (invalid_lines = 'skip'): " in log
    assert f"{path}:37: adblock modifier $dnstype changes the block" in log


def test_daemon_refuses_the_same_list_strict(make_daemon, tmp_path: Path) -> None:
    path = tmp_path / "feed.txt"
    path.write_text(ADGUARD_TIKTOK.read_text() + FEED)
    daemon: Daemon = make_daemon(extra=FEED_GROUP.format(path=path, mode="reject"), start=False)
    with pytest.raises(RuntimeError) as info:
        daemon.start()
    message = str(info.value)
    assert "blockd exited" in message
    for line in (37, 38, 40):
        assert f"{path}:{line}: " in message, line


# Real third-party files (tests/data/README.md: sources, commits and licences): the header and the
# first 200 entries of the Block List Project's TikTok list, in its hosts and dnsmasq editions.
BLP_HOSTS = DATA / "blocklistproject-tiktok.hosts"
BLP_DNSMASQ = DATA / "blocklistproject-tiktok.dnsmasq"


@pytest.mark.parametrize("path", [BLP_HOSTS, BLP_DNSMASQ], ids=["hosts", "dnsmasq"])
def test_real_hosts_and_dnsmasq_lists_load_strict(tmp_path: Path, path: Path) -> None:
    listed = load_source(_feed(tmp_path, path.read_text(), invalid_lines="reject"))
    assert len(listed.domains) == 200 and listed.invalid_lines == 0 and listed.ignored_note() == ""
    assert {"0pbxmo-useast2a.xzcs3zlph.com", "a.pstatp.com", "ads.tiktok.com"} <= set(listed.domains)
    assert "api-swan.amemv.com.download.ks-cdn.com" in listed.domains  # the excerpt's last entry


@pytest.mark.parametrize(
    ("path", "foreign"),
    [
        # What hosts feeds also carry (StevenBlack's header block) and a broken entry.
        (BLP_HOSTS, ["fe80::1%lo0 localhost", "255.255.255.255 broadcasthost", "0.0.0.0 bad_name!.example"]),
        # A dnsmasq file of a site's own forwarding next to the blocks.
        (BLP_DNSMASQ, ["server=/corp.example/10.0.0.1", "address=/x.example/127.0.0.1", "server=/y.example/#"]),
    ],
    ids=["hosts", "dnsmasq"],
)
def test_real_lists_with_foreign_lines_skip_with_counts_and_reject_with_file_line(
    tmp_path: Path, path: Path, foreign: list[str]
) -> None:
    lines = path.read_text().splitlines()
    for offset, line in enumerate(foreign):  # at lines 20, 41 and 62 of the result
        lines.insert(19 + 21 * offset, line)
    text = "\n".join(lines) + "\n"
    skipped = load_source(_feed(tmp_path, text))
    with pytest.raises(ListLoadError) as refused:
        load_source(_feed(tmp_path, text, invalid_lines="reject"))
    bad = [error.line for error in refused.value.errors]
    assert [error.line for error in skipped.invalid_sample] == bad and skipped.invalid_lines == len(bad)
    assert all(str(error).startswith(f"{tmp_path / 'feed.txt'}:{error.line}: ") for error in refused.value.errors)
    understood = 200 + sum(1 for line in foreign if line.startswith("address="))
    assert len(skipped.domains) == understood
    assert bad == ([62] if path == BLP_HOSTS else [20, 62])  # the broken name; the two forwarding lines
