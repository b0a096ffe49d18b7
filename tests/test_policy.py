"""The policy as a table, in the style of CoreDNS's plugin/acl/acl_test.go.

One row: config (groups and lists), client address, question -> what the client gets: the rcode,
the answer addresses (or FORWARD when the question went upstream untouched), and the Extended
DNS Error text.  The query path runs for real (blockd.resolver.Resolver with a real policy
snapshot); only the upstream is a stub that answers every forwarded question with 192.0.2.1.
Adding a case is one row.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task

from blockd.cache import AnswerCache
from blockd.config import parse_config
from blockd.metrics import Metrics
from blockd.notify import NoZones
from blockd.policy import build_policy
from blockd.repeats import RepeatMemo
from blockd.resolver import IgnoreAnswers, Resolver
from tests.test_resolver import RecordingObserver, upstream_answer

FORWARD = ["forwarded"]

LISTS = {
    "tiktok.txt": "tiktok.com\n||tiktokv.com^\n0.0.0.0 musical.ly\n*.byteoversea.com\n",
    "bytedance.txt": "bytedance.com\ntiktok.com\n",
    "doh.txt": "dns.google\n",
    "watch.txt": "watched.example\n",
}

BASE = """
[upstream]
servers = ["127.0.0.1:5399"]
[lists.tiktok]
path = "tiktok.txt"
[lists.bytedance]
path = "bytedance.txt"
[lists.doh]
path = "doh.txt"
action = "nxdomain"
[lists.watch]
path = "watch.txt"
"""

GOV = """
[groups.gov]
networks = ["10.120.0.0/16", "fd00:120::/64"]
lists = ["tiktok", "bytedance", "doh"]
"""


def group(extra: str, lists: str = '["tiktok", "bytedance", "doh"]', networks: str = '["10.120.0.0/16"]') -> str:
    return f"[groups.gov]\nnetworks = {networks}\nlists = {lists}\n{extra}\n"


class Case(NamedTuple):
    id: str
    groups: str
    client: str
    name: str
    qtype: str
    rcode: str
    answer: list[str]
    ede: str | None = None  # None: no EDE


BLOCKED_TIKTOK = "blocked by blockd: tiktok.com on list tiktok"

CASES = [
    # Subtree matching: the name and everything below it, nothing beside it.
    Case("listed-name", GOV, "10.120.0.5", "tiktok.com", "A", "NOERROR", ["0.0.0.0"], BLOCKED_TIKTOK),
    Case("subdomain", GOV, "10.120.0.5", "a.b.tiktok.com", "A", "NOERROR", ["0.0.0.0"], BLOCKED_TIKTOK),
    Case("look-alike-prefix", GOV, "10.120.0.5", "nottiktok.com", "A", "NOERROR", FORWARD),
    Case("look-alike-suffix", GOV, "10.120.0.5", "tiktok.com.example.net", "A", "NOERROR", FORWARD),
    Case("parent-of-listed", GOV, "10.120.0.5", "com", "A", "NOERROR", FORWARD),
    Case("mixed-case", GOV, "10.120.0.5", "WwW.TikTok.CoM", "A", "NOERROR", ["0.0.0.0"], BLOCKED_TIKTOK),
    Case(
        "adblock-syntax",
        GOV,
        "10.120.0.5",
        "api.tiktokv.com",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        "blocked by blockd: tiktokv.com on list tiktok",
    ),
    Case(
        "hosts-syntax",
        GOV,
        "10.120.0.5",
        "musical.ly",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        "blocked by blockd: musical.ly on list tiktok",
    ),
    Case(
        "wildcard-syntax-covers-the-name-too",
        GOV,
        "10.120.0.5",
        "byteoversea.com",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        "blocked by blockd: byteoversea.com on list tiktok",
    ),
    # Every type of a blocked name is answered locally.
    Case("aaaa-sinkhole", GOV, "10.120.0.5", "tiktok.com", "AAAA", "NOERROR", ["::"], BLOCKED_TIKTOK),
    Case("https-nodata", GOV, "10.120.0.5", "tiktok.com", "HTTPS", "NOERROR", [], BLOCKED_TIKTOK),
    Case("txt-nodata", GOV, "10.120.0.5", "tiktok.com", "TXT", "NOERROR", [], BLOCKED_TIKTOK),
    # The first list in the group's order names the block.
    Case(
        "first-list-wins",
        group("", lists='["bytedance", "tiktok"]'),
        "10.120.0.5",
        "tiktok.com",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        "blocked by blockd: tiktok.com on list bytedance",
    ),
    # Actions, per group and per list.
    Case(
        "group-nxdomain", group('action = "nxdomain"'), "10.120.0.5", "tiktok.com", "A", "NXDOMAIN", [], BLOCKED_TIKTOK
    ),
    Case("group-nodata", group('action = "nodata"'), "10.120.0.5", "tiktok.com", "A", "NOERROR", [], BLOCKED_TIKTOK),
    Case("group-refused", group('action = "refused"'), "10.120.0.5", "tiktok.com", "A", "REFUSED", [], BLOCKED_TIKTOK),
    Case(
        "list-action-overrides-group",
        GOV,
        "10.120.0.5",
        "dns.google",
        "A",
        "NXDOMAIN",
        [],
        "blocked by blockd: dns.google on list doh",
    ),
    Case("monitor-forwards", group('action = "monitor"'), "10.120.0.5", "tiktok.com", "A", "NOERROR", FORWARD),
    Case(
        "monitor-ignores-list-action", group('action = "monitor"'), "10.120.0.5", "dns.google", "A", "NOERROR", FORWARD
    ),
    Case(
        "custom-sinkhole-v4",
        group('sinkhole_ipv4 = "10.1.1.1"'),
        "10.120.0.5",
        "tiktok.com",
        "A",
        "NOERROR",
        ["10.1.1.1"],
        BLOCKED_TIKTOK,
    ),
    # Exceptions beat the lists, for the name and its subtree only.
    Case("allow-exception", group('allow = ["ok.tiktok.com"]'), "10.120.0.5", "ok.tiktok.com", "A", "NOERROR", FORWARD),
    Case(
        "allow-subtree",
        group('allow = ["ok.tiktok.com"]'),
        "10.120.0.5",
        "cdn.ok.tiktok.com",
        "A",
        "NOERROR",
        FORWARD,
    ),
    Case(
        "allow-is-not-the-parent",
        group('allow = ["ok.tiktok.com"]'),
        "10.120.0.5",
        "tiktok.com",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        BLOCKED_TIKTOK,
    ),
    # Built-in escape hatches: closed for blocking groups, each switchable.
    Case(
        "firefox-canary",
        GOV,
        "10.120.0.5",
        "use-application-dns.net",
        "A",
        "NXDOMAIN",
        [],
        "blocked by blockd: use-application-dns.net on list firefox-canary",
    ),
    Case(
        "firefox-canary-switched-off",
        group("block_firefox_canary = false"),
        "10.120.0.5",
        "use-application-dns.net",
        "A",
        "NOERROR",
        FORWARD,
    ),
    Case(
        "private-relay",
        GOV,
        "10.120.0.5",
        "mask.icloud.com",
        "AAAA",
        "NXDOMAIN",
        [],
        "blocked by blockd: mask.icloud.com on list icloud-private-relay",
    ),
    Case(
        "ddr-nodata",
        GOV,
        "10.120.0.5",
        "_dns.resolver.arpa",
        "SVCB",
        "NOERROR",
        [],
        "blocked by blockd: resolver.arpa on list ddr",
    ),
    Case(
        "no-hatches-for-monitor", group('action = "monitor"'), "10.120.0.5", "mask.icloud.com", "A", "NOERROR", FORWARD
    ),
    # Who is in the group: the most specific network; IPv6, IPv4-mapped; no group forwards.
    Case("no-group", GOV, "192.168.1.5", "tiktok.com", "A", "NOERROR", FORWARD),
    Case("ipv6-client", GOV, "fd00:120::99", "tiktok.com", "A", "NOERROR", ["0.0.0.0"], BLOCKED_TIKTOK),
    Case("ipv4-mapped-client", GOV, "::ffff:10.120.3.4", "tiktok.com", "A", "NOERROR", ["0.0.0.0"], BLOCKED_TIKTOK),
    Case(
        "most-specific-network-wins",
        GOV + '[groups.lab]\nnetworks = ["10.120.9.0/24"]\nlists = ["watch"]\naction = "monitor"\n',
        "10.120.9.1",
        "tiktok.com",
        "A",
        "NOERROR",
        FORWARD,
    ),
    Case(
        "wider-network-still-blocks-outside-the-narrow-one",
        GOV + '[groups.lab]\nnetworks = ["10.120.9.0/24"]\nlists = ["watch"]\naction = "monitor"\n',
        "10.120.8.1",
        "tiktok.com",
        "A",
        "NOERROR",
        ["0.0.0.0"],
        BLOCKED_TIKTOK,
    ),
    # server.allow: everyone else is refused, whatever the name.
    Case(
        "not-allowed",
        '[server]\nallow = ["10.120.0.0/16"]\n' + GOV,
        "192.168.1.5",
        "example.org",
        "A",
        "REFUSED",
        [],
        "client not allowed",
    ),
]


def run_case(directory: Path, case: Case) -> tuple[dns.message.Message, bool]:
    """The answer the client gets, and whether the question went upstream."""
    for name, text in LISTS.items():
        (directory / name).write_text(text)
    policy = build_policy(parse_config(BASE + case.groups, "policy.toml", directory))
    upstream_calls: list[bytes] = []

    class StubUpstreams:
        def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]:
            upstream_calls.append(message)
            return defer.succeed(upstream_answer(message, a="192.0.2.1"))

    resolver = Resolver(
        lambda: policy,
        StubUpstreams(),
        Metrics(CollectorRegistry()),
        RecordingObserver(),
        AnswerCache(100),
        task.Clock(),
        IgnoreAnswers(),
        RepeatMemo(),
        NoZones(),
    )
    query = dns.message.make_query(case.name, case.qtype, use_edns=0)
    result = resolver.handle(query.to_wire(), case.client, "udp")
    if isinstance(result, defer.Deferred):
        result = result.result
    assert isinstance(result, bytes)
    return dns.message.from_wire(result), bool(upstream_calls)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_policy(tmp_path: Path, case: Case) -> None:
    message, forwarded = run_case(tmp_path, case)
    assert dns.rcode.to_text(message.rcode()) == case.rcode
    if case.answer == FORWARD:
        assert forwarded
        answer = [r.to_text() for rrset in message.answer for r in rrset]
        assert answer == ["192.0.2.1"] or case.qtype != "A"
    else:
        assert not forwarded
        types = {"A": dns.rdatatype.A, "AAAA": dns.rdatatype.AAAA}
        wanted = types.get(case.qtype)
        assert [r.to_text() for rrset in message.answer for r in rrset if rrset.rdtype == wanted] == case.answer
    texts = [option.text for option in message.options if isinstance(option, dns.edns.EDEOption)]
    assert texts == ([] if case.ede is None else [case.ede])
