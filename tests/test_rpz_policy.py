"""RPZ lists in the query path: every action and trigger, as a client sees them (in process).

A zone file list and a plain list in one group; the query path runs for real (Resolver, real
policy snapshot) with a stub upstream that answers every forwarded question with 192.0.2.1 (or
with the addresses a test gives, for the rpz-ip triggers).  One row per case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import dns.edns
import dns.flags
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
from blockd.policy import Policy, build_policy
from blockd.repeats import RepeatMemo
from blockd.resolver import IgnoreAnswers, Resolver
from tests.test_resolver import RecordingObserver, upstream_answer

ZONE = """\
$ORIGIN rpz.gov.example.
$TTL 300
@               SOA  ns.gov.example. hostmaster.gov.example. 2026120101 3600 600 86400 60
                NS   ns.gov.example.
tiktok.com      CNAME .
*.tiktok.com    CNAME .
*.tiktokv.com   CNAME .
nodata.example  CNAME *.
ok.tiktok.com   CNAME rpz-passthru.
drop.example    CNAME rpz-drop.
tcp.example     CNAME rpz-tcp-only.
garden.example  CNAME walled.gov.example.
local.example   A    10.9.9.9
local.example   A    10.9.9.10
local.example   TXT  "blocked by policy; see the intranet"
32.66.113.0.203.rpz-ip  CNAME .
24.0.100.51.198.rpz-ip  A 10.8.8.8
24.10.0.0.10.rpz-client-ip CNAME .
evil.example.rpz-nsdname CNAME .
"""

LATER = "passthru-beats.example\nok.tiktok.com\n"

CONFIG = """
[upstream]
servers = ["127.0.0.1:5399"]
[lists.gov-rpz]
path = "gov.rpz"
{rpz_extra}
[lists.later]
path = "later.txt"
[groups.gov]
networks = ["10.120.0.0/16"]
lists = ["gov-rpz", "later"]
action = "{action}"
"""


class Row(NamedTuple):
    id: str
    name: str
    qtype: str
    rcode: str | None  # None: no answer at all (drop)
    answer: list[str] | str  # "forwarded" when it went upstream
    transport: str = "udp"
    action: str = "sinkhole"  # the group's
    rpz_extra: str = ""
    upstream_a: str = "192.0.2.1"


ROWS = [
    Row("exact-trigger", "tiktok.com", "A", "NXDOMAIN", []),
    Row("wildcard-trigger", "www.tiktok.com", "A", "NXDOMAIN", []),
    Row("wildcard-only-below", "tiktokv.com", "A", "NOERROR", "forwarded"),
    Row("wildcard-below", "api.tiktokv.com", "AAAA", "NXDOMAIN", []),
    Row("nodata", "nodata.example", "A", "NOERROR", []),
    Row("exact-does-not-cover-below", "x.nodata.example", "A", "NOERROR", "forwarded"),
    Row("passthru-beats-the-wildcard", "ok.tiktok.com", "A", "NOERROR", "forwarded"),
    Row("drop", "drop.example", "A", None, []),
    Row("tcp-only-over-udp", "tcp.example", "A", "NOERROR", "TC"),
    Row("tcp-only-over-tcp", "tcp.example", "A", "NOERROR", "forwarded", transport="tcp"),
    Row("local-data-a", "local.example", "A", "NOERROR", ["10.9.9.10", "10.9.9.9"]),
    Row("local-data-txt", "local.example", "TXT", "NOERROR", ['"blocked by policy; see the intranet"']),
    Row("local-data-nodata-for-other-types", "local.example", "AAAA", "NOERROR", []),
    Row("walled-garden-cname-then-its-target", "garden.example", "A", "NOERROR", ["192.0.2.1", "walled.gov.example."]),
    Row("walled-garden-cname-question", "garden.example", "CNAME", "NOERROR", ["walled.gov.example."]),
    Row("rpz-ip-nxdomain", "answer.example", "A", "NXDOMAIN", [], upstream_a="203.0.113.66"),
    Row("rpz-ip-local-data", "answer2.example", "A", "NOERROR", ["10.8.8.8"], upstream_a="198.51.100.7"),
    Row("rpz-ip-other-address", "answer3.example", "A", "NOERROR", "forwarded", upstream_a="203.0.113.67"),
    Row("not-listed", "example.org", "A", "NOERROR", "forwarded"),
    Row("group-action-does-not-override-zone", "tiktok.com", "A", "NXDOMAIN", [], action="nodata"),
    Row("list-action-overrides-zone", "www.tiktok.com", "A", "NOERROR", ["0.0.0.0"], rpz_extra='action = "sinkhole"'),
    Row("override-keeps-passthru", "ok.tiktok.com", "A", "NOERROR", "forwarded", rpz_extra='action = "sinkhole"'),
    Row("monitor-group-monitors", "tiktok.com", "A", "NOERROR", "forwarded", action="monitor"),
]


def make_policy(directory: Path, row: Row) -> Policy:
    (directory / "gov.rpz").write_text(ZONE)
    (directory / "later.txt").write_text(LATER)
    text = CONFIG.format(rpz_extra=row.rpz_extra, action=row.action)
    return build_policy(parse_config(text, "rpz.toml", directory))


def ask(policy: Policy, row: Row) -> tuple[bytes | None, bool, RecordingObserver]:
    forwarded: list[bytes] = []

    class StubUpstreams:
        def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]:
            forwarded.append(message)
            return defer.succeed(upstream_answer(message, a=row.upstream_a))

    observer = RecordingObserver()
    resolver = Resolver(
        lambda: policy,
        StubUpstreams(),
        Metrics(CollectorRegistry()),
        observer,
        AnswerCache(100),
        task.Clock(),
        IgnoreAnswers(),
        RepeatMemo(),
        NoZones(),
    )
    query = dns.message.make_query(row.name, row.qtype, use_edns=0)
    result: Any = resolver.handle(query.to_wire(), "10.120.0.5", row.transport)
    if isinstance(result, defer.Deferred):
        result = result.result
    return result, bool(forwarded), observer


def texts(message: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in message.answer for r in rrset)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_rpz_actions(tmp_path: Path, row: Row) -> None:
    answer, forwarded, _ = ask(make_policy(tmp_path, row), row)
    if row.rcode is None:
        assert answer is None and not forwarded
        return
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert dns.rcode.to_text(message.rcode()) == row.rcode
    if row.answer == "forwarded":
        assert forwarded
        return
    if row.answer == "TC":
        assert message.flags & dns.flags.TC and not message.answer and not forwarded
        return
    assert texts(message) == row.answer
    if not row.id.startswith(("rpz-ip", "walled-garden-cname-then")):
        assert not forwarded
    ede = [o.text for o in message.options if isinstance(o, dns.edns.EDEOption)]
    assert len(ede) == 1 and "on list gov-rpz" in (ede[0] or "")


def test_trigger_named_in_the_ede_and_the_log(tmp_path: Path) -> None:
    """EDE and the query log name the list and the trigger as written in the zone."""
    row = Row("wildcard", "www.tiktok.com", "A", "NXDOMAIN", [])
    answer, _, observer = ask(make_policy(tmp_path, row), row)
    assert answer is not None
    message = dns.message.from_wire(answer)
    (text,) = [o.text for o in message.options if isinstance(o, dns.edns.EDEOption)]
    assert text == "blocked by blockd: *.tiktok.com on list gov-rpz"
    assert observer.lines[-1][3] == "nxdomain"


def test_ignored_triggers_are_counted_not_errors(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, ROWS[0])
    zone = policy.lists["gov-rpz"].zone
    assert zone is not None
    assert zone.ignored["rpz-client-ip"] == 1 and zone.ignored["rpz-nsdname"] == 1
    note = policy.lists["gov-rpz"].ignored_note()
    assert note == "ignored (not applicable to a forwarder): rpz-client-ip 1, rpz-nsdname 1"


def test_format_detected_and_declared(tmp_path: Path) -> None:
    (tmp_path / "feed.txt").write_text(ZONE)  # an RPZ zone under a .txt name: detected by its content
    (tmp_path / "later.txt").write_text(LATER)
    text = CONFIG.replace('path = "gov.rpz"', 'path = "feed.txt"').format(rpz_extra="", action="sinkhole")
    policy = build_policy(parse_config(text, "rpz.toml", tmp_path))
    assert policy.lists["gov-rpz"].rpz and len(policy.lists["gov-rpz"]) == 9  # QNAME triggers


def test_hosts_feed_with_match_exact(tmp_path: Path) -> None:
    (tmp_path / "hosts.txt").write_text("# a hosts feed\n0.0.0.0 ads.example.com\n0.0.0.0 t.example.net # tracker\n")
    config = """
[upstream]
servers = ["127.0.0.1:5399"]
[lists.hosts]
path = "hosts.txt"
match = "exact"
[groups.gov]
networks = ["10.120.0.0/16"]
lists = ["hosts"]
"""
    policy = build_policy(parse_config(config, "hosts.toml", tmp_path))
    gov = policy.groups["gov"]
    assert policy.check(gov, "ads.example.com") is not None
    assert policy.check(gov, "x.ads.example.com") is None
    assert policy.check(gov, "example.com") is None


FEEDS = Path(__file__).parent / "data"


def feed_policy(directory: Path, list_table: str) -> Policy:
    config = f"""
[upstream]
servers = ["127.0.0.1:5399"]
[lists.feed]
{list_table}
[groups.gov]
networks = ["10.120.0.0/16"]
lists = ["feed"]
"""
    return build_policy(parse_config(config, "feeds.toml", directory))


def test_a_public_rpz_feed_loads_with_its_own_actions(tmp_path: Path) -> None:
    policy = feed_policy(tmp_path, f'path = "{FEEDS / "tiktok-feed.rpz"}"\naction = "zone"')
    feed, gov = policy.lists["feed"], policy.groups["gov"]
    lines = (FEEDS / "tiktok-feed.rpz").read_text().splitlines()
    names = [line.split()[0] for line in lines if " CNAME " in line and not line.startswith(";")]
    assert len(feed) == len(names)  # every trigger, exact and wildcard
    for name, query in (("tiktok.com", "tiktok.com"), ("*.tiktok.com", "www.tiktok.com")):
        verdict = policy.check(gov, query)
        assert verdict is not None and (verdict.domain, verdict.action) == (name, "nxdomain")


def test_the_same_feed_as_hosts_with_match_exact(tmp_path: Path) -> None:
    policy = feed_policy(tmp_path, f'path = "{FEEDS / "tiktok-feed.hosts"}"\nmatch = "exact"')
    gov = policy.groups["gov"]
    assert policy.check(gov, "tiktok.com") is not None
    assert policy.check(gov, "www.tiktok.com") is None  # a hosts file names single hosts
    assert policy.check(gov, "localhost") is None
