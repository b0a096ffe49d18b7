"""RPZ out, the pure parts and the NOTIFY sender: blockd.publish_zone (render, difference),
blockd.publish_journal (serials, journal, saved state), blockd.publish_wire (SOA/AXFR/IXFR
answers, TSIG), blockd.publish_notify (NOTIFY with retries, on task.Clock and a fake transport)
and the [publish] section of blockd.config.

No sockets and no subprocesses: policies are built from TOML text and list files in tmp_path (as
tests/test_policy.py does), queries are dnspython messages turned into bytes, answers are parsed
back with dnspython.  Every published rule is checked against what blockd itself decides for the
same name (policy.check), which is the promise of the published zone.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import pytest
from twisted.internet import task

from blockd.config import Config, ConfigError, Endpoint, PublishZoneConfig, parse_config
from blockd.policy import Group, Policy, Verdict, build_policy
from blockd.publish_journal import SavedState, ZoneVersions, next_serial, zone_digest
from blockd.publish_notify import NOTIFY_RESULTS, RETRY_SCHEDULE, NotifySender, notify_message
from blockd.publish_wire import MESSAGE_BUDGET, Answer, ZoneView, access_for, answer, wire_serial_newer
from blockd.publish_zone import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    ZoneContent,
    difference,
    records,
    render,
    soa_for,
)
from blockd.rpz import (
    DROP_RULE,
    LOCAL_DATA,
    NODATA_RULE,
    NXDOMAIN_RULE,
    PASSTHRU_RULE,
    TCP_ONLY_RULE,
    IPNetwork,
    LocalRecord,
    PolicyZone,
    Rule,
    rule_wire,
)

UPSTREAM = '[upstream]\nservers = ["127.0.0.1:5399"]\n'
ZONE = "gov.rpz.example"
ORIGIN = dns.name.from_text(ZONE + ".")
PUBLISH = f'[publish]\nlisten = "127.0.0.1:5300"\n[publish.zones."{ZONE}."]\n'
LOCALHOST = ipaddress.ip_address("127.0.0.1")
NOW = 1_800_000_000
KEY = dns.tsig.Key("publish-key.", b"secret-secret-secret-secret-32by", dns.tsig.HMAC_SHA256)
OTHER_KEY = dns.tsig.Key("other-key.", b"other-other-other-other-other-32", dns.tsig.HMAC_SHA256)
WRONG_SECRET = dns.tsig.Key("publish-key.", b"wrong-wrong-wrong-wrong-wrong-32", dns.tsig.HMAC_SHA256)
A_ZERO = b"\0" * 4
AAAA_ZERO = b"\0" * 16

RPZ_LIST = """\
$ORIGIN rpz.feed.example.
$TTL 300
@               SOA  ns.feed.example. hostmaster.feed.example. 2026120101 3600 600 86400 60
                NS   ns.feed.example.
drop.example    CNAME rpz-drop.
*.drop.example  CNAME rpz-drop.
tcp.example     CNAME rpz-tcp-only.
garden.example  CNAME walled.feed.example.
local.example   A    10.9.9.9
local.example   A    10.9.9.10
ok.drop.example CNAME rpz-passthru.
32.66.113.0.203.rpz-ip  CNAME .
24.0.100.51.198.rpz-ip  A 10.8.8.8
"""


# --- helpers -----------------------------------------------------------------------------------


def make_policy(directory: Path, text: str, files: dict[str, str] | None = None) -> Policy:
    """The policy of `text`; every file "NAME.txt" not configured otherwise is list NAME."""
    for name, content in (files or {}).items():
        (directory / name).write_text(content)
        stem, _, suffix = name.partition(".")
        if suffix == "txt" and f"[lists.{stem}]" not in text:
            text = f'[lists.{stem}]\npath = "{name}"\n' + text
    return build_policy(parse_config(UPSTREAM + text, "publish.toml", directory))


def group_config(lists: str, extra: str = "", zone: str = 'group = "gov"\n') -> str:
    """A group "gov" over `lists` and one published zone (by default: the group's)."""
    return f'[groups.gov]\nnetworks = ["10.120.0.0/16"]\nlists = {lists}\n{extra}\n{PUBLISH}{zone}'


def rendered(policy: Policy, name: str = ZONE) -> ZoneContent:
    return render(policy, policy.config.publish.zones[name])


def sinkhole(ttl: int = 300, a: bytes = A_ZERO, aaaa: bytes = AAAA_ZERO) -> Rule:
    return Rule(LOCAL_DATA, (LocalRecord(TYPE_A, ttl, a), LocalRecord(TYPE_AAAA, ttl, aaaa)))


def both(zone: PolicyZone, key: str) -> tuple[Rule | None, Rule | None]:
    """The rules published at `key` and at `*.key`."""
    return zone.exact.get(key), zone.below.get(key)


SINGLETONS = {
    "nxdomain": NXDOMAIN_RULE,
    "nodata": NODATA_RULE,
    "passthru": PASSTHRU_RULE,
    "monitor": PASSTHRU_RULE,
    "drop": DROP_RULE,
    "tcp-only": TCP_ONLY_RULE,
}


def expected_rule(group: Group, verdict: Verdict | None) -> Rule:
    """The RPZ form of one of blockd's verdicts, written out independently of publish_zone."""
    if verdict is None:
        return PASSTHRU_RULE
    if verdict.action == "sinkhole":
        return sinkhole(group.ttl, group.sinkhole_a, group.sinkhole_aaaa)
    if verdict.action == LOCAL_DATA:
        assert verdict.rule is not None
        return verdict.rule
    return SINGLETONS[verdict.action]


def assert_agrees_with_policy(policy: Policy, group: Group, zone: PolicyZone) -> int:
    """Every owner of the zone says what blockd says: for `k` the verdict on k, for `*.k` the
    verdict on a name below k that no entry names.  Returns how many owners were checked."""
    checked = 0
    for key, rule in zone.exact.items():
        assert rule == expected_rule(group, policy.check(group, key)), key
        checked += 1
    for key, rule in zone.below.items():
        probe = f"zz9.{key}"
        assert rule == expected_rule(group, policy.check(group, probe)), f"*.{key}"
        checked += 1
    return checked


# --- render ------------------------------------------------------------------------------------


def test_sinkhole_group_publishes_name_and_wildcard_with_its_addresses(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, group_config('["tiktok"]'), {"tiktok.txt": "tiktok.com\n"})
    zone = rendered(policy).zone
    assert both(zone, "tiktok.com") == (sinkhole(), sinkhole())
    records_at = sorted(r for r in records(zone) if r[0] in ("tiktok.com", "*.tiktok.com"))
    assert records_at == [
        ("*.tiktok.com", TYPE_A, 300, A_ZERO),
        ("*.tiktok.com", TYPE_AAAA, 300, AAAA_ZERO),
        ("tiktok.com", TYPE_A, 300, A_ZERO),
        ("tiktok.com", TYPE_AAAA, 300, AAAA_ZERO),
    ]


def test_sinkhole_uses_the_groups_addresses_and_ttl(tmp_path: Path) -> None:
    extra = 'ttl = 60\nsinkhole_ipv4 = "192.0.2.7"\nsinkhole_ipv6 = "2001:db8::7"'
    policy = make_policy(tmp_path, group_config('["tiktok"]', extra), {"tiktok.txt": "tiktok.com\n"})
    content = rendered(policy)
    rule = sinkhole(60, ipaddress.ip_address("192.0.2.7").packed, ipaddress.ip_address("2001:db8::7").packed)
    assert both(content.zone, "tiktok.com") == (rule, rule)
    assert content.zone.soa.ttl == 60


def test_zone_ttl_overrides_the_groups(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path, group_config('["tiktok"]', "", 'group = "gov"\nttl = 42\n'), {"tiktok.txt": "tiktok.com\n"}
    )
    zone = rendered(policy).zone
    assert zone.soa.ttl == 42
    assert both(zone, "tiktok.com") == (sinkhole(42), sinkhole(42))
    assert {r[2] for r in records(zone)} == {42}


def test_nxdomain_list_gives_cname_root(tmp_path: Path) -> None:
    text = '[lists.doh]\npath = "doh.txt"\naction = "nxdomain"\n' + group_config('["doh"]')
    zone = rendered(make_policy(tmp_path, text, {"doh.txt": "dns.google\n"})).zone
    assert both(zone, "dns.google") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert ("dns.google", TYPE_CNAME, 300, b"\0") in set(records(zone))
    assert ("*.dns.google", TYPE_CNAME, 300, rule_wire("nxdomain")) in set(records(zone))


def test_exact_list_gives_only_the_exact_owner(tmp_path: Path) -> None:
    text = '[lists.hosts]\npath = "hosts.txt"\nmatch = "exact"\n' + group_config('["hosts"]')
    zone = rendered(make_policy(tmp_path, text, {"hosts.txt": "0.0.0.0 single.example\n"})).zone
    assert both(zone, "single.example") == (sinkhole(), None)


def test_allow_entries_are_passthru_at_name_and_below(tmp_path: Path) -> None:
    text = group_config('["tiktok"]', 'allow = ["support.tiktok.com"]')
    zone = rendered(make_policy(tmp_path, text, {"tiktok.txt": "tiktok.com\n"})).zone
    assert both(zone, "support.tiktok.com") == (PASSTHRU_RULE, PASSTHRU_RULE)
    assert both(zone, "tiktok.com") == (sinkhole(), sinkhole())


def test_adblock_exception_is_passthru(tmp_path: Path) -> None:
    # "@@||name^" is a line of the default "list" format, valid with invalid_lines = "reject".
    files = {"tiktok.txt": "||tiktok.com^\n@@||api.tiktok.com^\n"}
    zone = rendered(make_policy(tmp_path, group_config('["tiktok"]'), files)).zone
    assert both(zone, "api.tiktok.com") == (PASSTHRU_RULE, PASSTHRU_RULE)


def test_exception_of_one_list_does_not_hide_another_lists_entry(tmp_path: Path) -> None:
    files = {"a.txt": "tiktok.com\n@@||api.tiktok.com^\n", "b.txt": "api.tiktok.com\n"}
    text = '[lists.a]\npath = "a.txt"\n[lists.b]\npath = "b.txt"\naction = "nodata"\n' + group_config('["a", "b"]')
    policy = make_policy(tmp_path, text, files)
    zone = rendered(policy).zone
    assert both(zone, "api.tiktok.com") == (NODATA_RULE, NODATA_RULE)
    assert policy.check(policy.groups["gov"], "api.tiktok.com") is not None


def test_wildcard_inside_a_label_is_unpublishable(tmp_path: Path) -> None:
    files = {"tiktok.txt": "tiktok.com\np16-tiktok-*.ibyteimg.com\n"}
    content = rendered(make_policy(tmp_path, group_config('["tiktok"]'), files))
    assert content.unpublishable == 1
    assert content.sample == ("p16-tiktok-*.ibyteimg.com",)
    owners = {r[0] for r in records(content.zone)}
    assert not any("ibyteimg" in owner for owner in owners)


def test_names_rpz_cannot_hold_are_unpublishable(tmp_path: Path) -> None:
    # A name whose last label is an RPZ trigger label, and one too long to sit under the origin.
    long_name = ".".join(["a" * 63] * 3 + ["b" * 40]) + ".example"  # 241 characters: no room under the origin
    files = {"odd.txt": f"evil.rpz-ip\n{long_name}\nfine.example\n"}
    content = rendered(make_policy(tmp_path, group_config('["odd"]'), files))
    assert content.unpublishable == 2
    assert set(content.sample) == {"evil.rpz-ip", long_name}
    assert "evil.rpz-ip" not in content.zone.exact and long_name not in content.zone.exact
    assert "fine.example" in content.zone.exact


def test_first_list_wins_as_blockd_decides(tmp_path: Path) -> None:
    files = {"a.txt": "x.example\n", "b.txt": "a.x.example\n"}
    text = (
        '[lists.a]\npath = "a.txt"\naction = "nxdomain"\n[lists.b]\npath = "b.txt"\naction = "nodata"\n'
        + group_config('["a", "b"]')
    )
    policy = make_policy(tmp_path, text, files)
    zone = rendered(policy).zone
    group = policy.groups["gov"]
    verdict = policy.check(group, "a.x.example")
    assert verdict is not None and verdict.list_name == "a" and verdict.action == "nxdomain"
    assert both(zone, "a.x.example") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert both(zone, "x.example") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert_agrees_with_policy(policy, group, zone)


def test_rpz_list_is_republished_with_its_own_actions(tmp_path: Path) -> None:
    text = '[lists.feed]\npath = "feed.rpz"\nformat = "rpz"\n' + group_config('["feed"]')
    policy = make_policy(tmp_path, text, {"feed.rpz": RPZ_LIST})
    zone = rendered(policy).zone
    assert both(zone, "drop.example") == (DROP_RULE, DROP_RULE)
    assert both(zone, "tcp.example") == (TCP_ONLY_RULE, None)
    assert both(zone, "ok.drop.example") == (PASSTHRU_RULE, None)
    garden = zone.exact["garden.example"]
    assert garden.action == LOCAL_DATA
    assert [(r.rtype, r.rdata) for r in garden.records] == [(TYPE_CNAME, b"\x06walled\x04feed\x07example\x00")]
    local = zone.exact["local.example"]
    assert sorted((r.rtype, r.rdata) for r in local.records) == [
        (TYPE_A, bytes([10, 9, 9, 9])),
        (TYPE_A, bytes([10, 9, 9, 10])),
    ]
    assert "local.example" not in zone.below
    ip = {str(network): value for network, value in zone.ip.items()}
    assert ip["203.0.113.66/32"] == ("32.66.113.0.203.rpz-ip", NXDOMAIN_RULE)
    owner, rule = ip["198.51.100.0/24"]
    assert owner == "24.0.100.51.198.rpz-ip"
    assert rule.action == LOCAL_DATA and [r.rdata for r in rule.records] == [bytes([10, 8, 8, 8])]
    assert_agrees_with_policy(policy, policy.groups["gov"], zone)


def test_rpz_list_with_a_list_action_takes_it_but_keeps_passthru(tmp_path: Path) -> None:
    text = '[lists.feed]\npath = "feed.rpz"\nformat = "rpz"\naction = "nxdomain"\n' + group_config('["feed"]')
    policy = make_policy(tmp_path, text, {"feed.rpz": RPZ_LIST})
    zone = rendered(policy).zone
    assert both(zone, "drop.example") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert zone.exact["ok.drop.example"] == PASSTHRU_RULE
    assert_agrees_with_policy(policy, policy.groups["gov"], zone)


def test_block_answer_prefixes_and_egress_never(tmp_path: Path) -> None:
    # egress.never is read whether or not egress is enabled: the policy owns it either way.
    files = {"tiktok.txt": "tiktok.com\n", "bytedance.prefixes": "203.0.113.0/24\n2001:db8:100::/48\n"}
    text = '[egress]\nnever = ["203.0.113.64/26", "192.0.2.0/24"]\n' + group_config(
        '["tiktok"]', 'block_answer_prefixes = ["bytedance.prefixes"]\naction = "nxdomain"'
    )
    policy = make_policy(tmp_path, text, files)
    assert not policy.config.egress.enabled
    ip = {str(network): value for network, value in rendered(policy).zone.ip.items()}
    assert ip == {
        "203.0.113.0/24": ("24.0.113.0.203.rpz-ip", NXDOMAIN_RULE),
        "2001:db8:100::/48": ("48.zz.100.db8.2001.rpz-ip", NXDOMAIN_RULE),
        "203.0.113.64/26": ("26.64.113.0.203.rpz-ip", PASSTHRU_RULE),  # inside a trigger: carved out
    }  # 192.0.2.0/24 is inside no trigger: not published
    group = policy.groups["gov"]
    prefixes = group.answer_prefixes
    assert prefixes is not None and policy.never is not None
    # What blockd does with answer addresses: blocked in the /24, never inside the /26.
    assert prefixes.lookup(ipaddress.ip_address("203.0.113.5")) is not None
    assert policy.never_routed(ipaddress.ip_address("203.0.113.70"))


def test_trigger_inside_never_is_not_published(tmp_path: Path) -> None:
    files = {"tiktok.txt": "tiktok.com\n", "p.prefixes": "203.0.113.128/25\n198.51.100.0/24\n"}
    text = '[egress]\nnever = ["203.0.113.0/24"]\n' + group_config(
        '["tiktok"]', 'block_answer_prefixes = ["p.prefixes"]'
    )
    ip = rendered(make_policy(tmp_path, text, files)).zone.ip
    assert [str(n) for n in ip] == ["198.51.100.0/24"]


def test_ipv4_mapped_prefix_is_published_as_the_ipv4_network_blockd_blocks(tmp_path: Path) -> None:
    files = {"tiktok.txt": "tiktok.com\n", "m.prefixes": "::ffff:198.51.100.0/120\n"}
    text = group_config('["tiktok"]', 'block_answer_prefixes = ["m.prefixes"]')
    policy = make_policy(tmp_path, text, files)
    prefixes = policy.groups["gov"].answer_prefixes
    assert prefixes is not None and prefixes.lookup(ipaddress.ip_address("198.51.100.5")) is not None
    assert [str(n) for n in rendered(policy).zone.ip] == ["198.51.100.0/24"]


IP_ONLY_RPZ = """\
$ORIGIN rpz.feed.example.
$TTL 300
@               SOA  ns.feed.example. hostmaster.feed.example. 1 3600 600 86400 60
                NS   ns.feed.example.
24.0.113.0.203.rpz-ip  CNAME .
"""


def test_an_empty_list_renders(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, group_config('["empty"]'), {"empty.txt": "# nothing listed yet\n"})
    assert "use-application-dns.net" in rendered(policy).zone.exact


def test_an_rpz_list_of_ip_triggers_only_renders(tmp_path: Path) -> None:
    text = '[lists.feed]\npath = "feed.rpz"\nformat = "rpz"\n' + group_config('["feed"]')
    policy = make_policy(tmp_path, text, {"feed.rpz": IP_ONLY_RPZ})
    assert [str(n) for n in rendered(policy).zone.ip] == ["203.0.113.0/24"]


def test_builtin_lists_are_in_a_blocking_groups_zone(tmp_path: Path) -> None:
    zone = rendered(make_policy(tmp_path, group_config('["tiktok"]'), {"tiktok.txt": "tiktok.com\n"})).zone
    assert both(zone, "use-application-dns.net") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert both(zone, "mask.icloud.com") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert both(zone, "resolver.arpa") == (NODATA_RULE, NODATA_RULE)


def test_builtin_switched_off_is_not_published(tmp_path: Path) -> None:
    text = group_config('["tiktok"]', "block_ddr = false")
    zone = rendered(make_policy(tmp_path, text, {"tiktok.txt": "tiktok.com\n"})).zone
    assert "resolver.arpa" not in zone.exact and "resolver.arpa" not in zone.below


def test_monitor_group_publishes_passthru(tmp_path: Path) -> None:
    files = {"tiktok.txt": "tiktok.com\n", "doh.txt": "dns.google\n", "p.prefixes": "203.0.113.0/24\n"}
    text = '[lists.tiktok]\npath = "tiktok.txt"\n[lists.doh]\npath = "doh.txt"\naction = "nxdomain"\n' + group_config(
        '["tiktok", "doh"]', 'action = "monitor"\nblock_answer_prefixes = ["p.prefixes"]'
    )
    policy = make_policy(tmp_path, text, files)
    zone = rendered(policy).zone
    assert both(zone, "tiktok.com") == (PASSTHRU_RULE, PASSTHRU_RULE)
    assert both(zone, "dns.google") == (PASSTHRU_RULE, PASSTHRU_RULE)
    assert "use-application-dns.net" not in zone.exact  # escape hatches are closed only by blocking groups
    assert {rule for _, rule in zone.ip.values()} == {PASSTHRU_RULE}
    assert_agrees_with_policy(policy, policy.groups["gov"], zone)


def test_zone_of_lists_with_nodata_and_a_lists_own_action(tmp_path: Path) -> None:
    files = {"tiktok.txt": "tiktok.com\n", "doh.txt": "dns.google\n"}
    text = (
        '[lists.tiktok]\npath = "tiktok.txt"\n[lists.doh]\npath = "doh.txt"\naction = "nxdomain"\n'
        + PUBLISH
        + 'lists = ["tiktok", "doh"]\naction = "nodata"\n'
    )
    policy = make_policy(tmp_path, text, files)
    content = rendered(policy)
    zone = content.zone
    assert both(zone, "tiktok.com") == (NODATA_RULE, NODATA_RULE)
    assert both(zone, "dns.google") == (NXDOMAIN_RULE, NXDOMAIN_RULE)
    assert zone.soa.ttl == 300  # a zone of lists without ttl
    assert "use-application-dns.net" not in zone.exact  # no group: no built-in lists
    assert set(zone.exact) == {"tiktok.com", "dns.google"}
    group = policy.zone_group(policy.config.publish.zones[ZONE])
    assert_agrees_with_policy(policy, group, zone)


def test_zone_of_lists_with_sinkhole_uses_the_default_addresses(tmp_path: Path) -> None:
    text = '[lists.tiktok]\npath = "tiktok.txt"\n' + PUBLISH + 'lists = ["tiktok"]\naction = "sinkhole"\nttl = 90\n'
    zone = rendered(make_policy(tmp_path, text, {"tiktok.txt": "tiktok.com\n"})).zone
    assert both(zone, "tiktok.com") == (sinkhole(90), sinkhole(90))


def test_soa_is_the_zones_own(tmp_path: Path) -> None:
    zone = rendered(make_policy(tmp_path, group_config('["tiktok"]'), {"tiktok.txt": "tiktok.com\n"})).zone
    assert zone.origin == ZONE
    assert zone.soa == soa_for(ZONE, 300, 0)


# --- property: every owner agrees with the policy ----------------------------------------------

LABELS = ("a", "b", "c")


def _universe() -> list[str]:
    names = []
    for base in ("bd.example", "test.bd.example"):
        names.append(base)
        for first in LABELS:
            names.append(f"{first}.{base}")
            for second in LABELS:
                names.append(f"{second}.{first}.{base}")
    return names


@pytest.mark.parametrize("seed", range(12))
def test_every_owner_agrees_with_the_policy(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    universe = _universe()

    def pick(count: int) -> list[str]:
        return rng.sample(universe, count)

    lines = {
        "one.txt": [f"||{n}^" for n in pick(5)] + [f"@@||{n}^" for n in pick(2)],
        "two.txt": pick(5) + [f"@@||{n}^" for n in pick(2)],
        "three.txt": [f"0.0.0.0 {n}" for n in pick(5)],
    }
    files = {name: "\n".join(entries) + "\n" for name, entries in lines.items()}
    actions = ["sinkhole", "nxdomain", "nodata"]
    rng.shuffle(actions)
    order = ["one", "two", "three"]
    rng.shuffle(order)
    text = (
        f'[lists.one]\npath = "one.txt"\naction = "{actions[0]}"\n'
        f'[lists.two]\npath = "two.txt"\naction = "{actions[1]}"\n'
        f'[lists.three]\npath = "three.txt"\nmatch = "exact"\naction = "{actions[2]}"\n'
        + group_config(str(order).replace("'", '"'), f"allow = {str(pick(2)).replace(chr(39), chr(34))}")
    )
    policy = make_policy(tmp_path, text, files)
    group = policy.groups["gov"]
    content = rendered(policy)
    assert content.unpublishable == 0
    checked = assert_agrees_with_policy(policy, group, content.zone)
    assert checked >= 10
    # Every listed name of every list is an owner of the zone.
    for listed in policy.lists.values():
        for key in (*listed.domains, *listed.exact, *listed.exceptions):
            assert key in content.zone.exact


# --- difference --------------------------------------------------------------------------------


def _tiktok_zone(directory: Path, entries: str, action: str = "nxdomain", ttl: str = "") -> PolicyZone:
    text = f'[lists.tiktok]\npath = "tiktok.txt"\naction = "{action}"\n' + PUBLISH + f'lists = ["tiktok"]\n{ttl}'
    return rendered(make_policy(directory, text, {"tiktok.txt": entries})).zone


def test_difference_of_added_and_removed_entries(tmp_path: Path) -> None:
    old = _tiktok_zone(tmp_path, "tiktok.com\nbytedance.com\n")
    new = _tiktok_zone(tmp_path, "tiktok.com\ncapcut.com\n")
    removed, added = difference(old, new)
    root = rule_wire("nxdomain")
    assert sorted(removed) == [("*.bytedance.com", TYPE_CNAME, 300, root), ("bytedance.com", TYPE_CNAME, 300, root)]
    assert sorted(added) == [("*.capcut.com", TYPE_CNAME, 300, root), ("capcut.com", TYPE_CNAME, 300, root)]


def test_difference_of_a_rule_change(tmp_path: Path) -> None:
    old = _tiktok_zone(tmp_path, "tiktok.com\n", "nxdomain")
    new = _tiktok_zone(tmp_path, "tiktok.com\n", "sinkhole")
    removed, added = difference(old, new)
    assert sorted(removed) == [("*.tiktok.com", TYPE_CNAME, 300, b"\0"), ("tiktok.com", TYPE_CNAME, 300, b"\0")]
    assert sorted(added) == [
        ("*.tiktok.com", TYPE_A, 300, A_ZERO),
        ("*.tiktok.com", TYPE_AAAA, 300, AAAA_ZERO),
        ("tiktok.com", TYPE_A, 300, A_ZERO),
        ("tiktok.com", TYPE_AAAA, 300, AAAA_ZERO),
    ]


def test_difference_of_a_ttl_change(tmp_path: Path) -> None:
    old = _tiktok_zone(tmp_path, "tiktok.com\n")
    new = _tiktok_zone(tmp_path, "tiktok.com\n", ttl="ttl = 60\n")
    removed, added = difference(old, new)
    assert sorted(removed) == [("*.tiktok.com", TYPE_CNAME, 300, b"\0"), ("tiktok.com", TYPE_CNAME, 300, b"\0")]
    assert sorted(added) == [("*.tiktok.com", TYPE_CNAME, 60, b"\0"), ("tiktok.com", TYPE_CNAME, 60, b"\0")]


def test_difference_unchanged_is_empty(tmp_path: Path) -> None:
    old = _tiktok_zone(tmp_path, "tiktok.com\nbytedance.com\n", "sinkhole")
    new = _tiktok_zone(tmp_path, "bytedance.com\ntiktok.com\n", "sinkhole")  # rebuilt: equal, not identical
    assert difference(old, new) == ([], [])
    assert difference(old, old) == ([], [])


def _ip_zone(ip: dict[str, Rule]) -> PolicyZone:
    networks: dict[IPNetwork, tuple[str, Rule]] = {}
    for text, rule in ip.items():
        network = ipaddress.ip_network(text)
        networks[network] = (f"{network.prefixlen}.x.rpz-ip", rule)
    return PolicyZone(ZONE, soa_for(ZONE, 300, 0), {}, {}, networks)


def test_difference_of_ip_triggers() -> None:
    old = _ip_zone({"192.0.2.0/24": NXDOMAIN_RULE, "198.51.100.0/24": NXDOMAIN_RULE})
    new = _ip_zone({"192.0.2.0/24": NODATA_RULE, "203.0.113.0/24": NXDOMAIN_RULE})
    removed, added = difference(old, new)
    assert sorted(removed) == [("24.x.rpz-ip", TYPE_CNAME, 300, b"\0")] * 2
    assert sorted(added) == sorted(
        [("24.x.rpz-ip", TYPE_CNAME, 300, rule_wire("nodata")), ("24.x.rpz-ip", TYPE_CNAME, 300, b"\0")]
    )
    assert difference(new, new) == ([], [])


# --- ZoneVersions ------------------------------------------------------------------------------


FILLER = [f"filler{i}.example" for i in range(20)]  # keeps small changes within the journal's size bound


def content_of(names: Iterable[str], rule: Rule = NXDOMAIN_RULE, ttl: int = 300, filler: bool = False) -> ZoneContent:
    rules = dict.fromkeys(FILLER if filler else [], NXDOMAIN_RULE) | dict.fromkeys(names, rule)
    return ZoneContent(PolicyZone(ZONE, soa_for(ZONE, ttl, 0), dict(rules), dict(rules)))


def installed(versions: ZoneVersions, content: ZoneContent, now: int, saved: SavedState | None = None) -> Any:
    return versions.install(versions.measure(content), saved, now)


def test_first_install_without_saved_state_takes_now() -> None:
    versions = ZoneVersions(ZONE, 20)
    assert installed(versions, content_of(["a.example"]), NOW) is None
    assert versions.zone is not None and versions.zone.soa.serial == NOW
    assert versions.records == 2  # a CNAME at the name and one at *.name
    assert list(versions.journal) == []


def test_saved_state_with_the_same_digest_keeps_the_serial() -> None:
    first = ZoneVersions(ZONE, 20)
    installed(first, content_of(["a.example", "b.example"]), NOW)
    saved = first.saved()
    assert saved is not None and SavedState.from_json(saved.to_json()) == saved
    again = ZoneVersions(ZONE, 20)
    installed(again, content_of(["b.example", "a.example"]), NOW + 3600, saved)
    assert again.zone is not None and again.zone.soa.serial == NOW


def test_saved_state_with_another_digest_moves_past_it() -> None:
    saved = SavedState(NOW, 12345)
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(["a.example"]), NOW + 60, saved)
    assert versions.zone is not None and versions.zone.soa.serial == NOW + 60
    # A saved serial ahead of the clock (a clock set back) is still passed.
    ahead = ZoneVersions(ZONE, 20)
    installed(ahead, content_of(["a.example"]), NOW - 60, saved)
    assert ahead.zone is not None and ahead.zone.soa.serial == NOW + 1


def test_update_without_change_keeps_the_serial() -> None:
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(["a.example"]), NOW)
    assert installed(versions, content_of(["a.example"]), NOW + 100) is None
    assert versions.zone is not None and versions.zone.soa.serial == NOW
    assert list(versions.journal) == []


def test_update_with_a_change_journals_it() -> None:
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(["a.example"], filler=True), NOW)
    change = installed(versions, content_of(["a.example", "b.example"], filler=True), NOW + 100)
    assert change is not None
    assert (change.old.serial, change.new.serial) == (NOW, NOW + 100)
    assert change.removed == [] and sorted(change.added) == [
        ("*.b.example", TYPE_CNAME, 300, b"\0"),
        ("b.example", TYPE_CNAME, 300, b"\0"),
    ]
    assert versions.records == 2 * 22
    # Two changes within one second: the serial still moves.
    second = installed(versions, content_of(["b.example"], filler=True), NOW + 100)
    assert second is not None and second.new.serial == NOW + 101
    assert versions.changes_since(NOW) == [change, second]
    assert versions.changes_since(NOW + 100) == [second]
    assert versions.changes_since(NOW + 101) is None  # the current serial: nothing to send
    assert versions.changes_since(12345) is None


def test_incremental_digest_is_the_digest_of_the_whole_zone() -> None:
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(["a.example", "b.example"]), NOW)
    for at, names in enumerate((["b.example", "c.example"], ["c.example"], ["d.example", "c.example"])):
        content = content_of(names, NODATA_RULE if at % 2 else NXDOMAIN_RULE)
        installed(versions, content, NOW + at + 1)
        assert versions.zone is not None
        assert (versions.digest, versions.records) == zone_digest(versions.zone)
        assert versions.records == sum(1 for _ in records(versions.zone))


@pytest.mark.parametrize(
    ("old", "now", "expected"),
    [
        (2**32 - 1, 5, 5),  # wrapped: 5 is after 4294967295 in RFC 1982 arithmetic
        (2**32 - 1, 2**32 - 1, 0),  # same second: old + 1 wraps to 0
        (NOW, NOW + 1, NOW + 1),
        (NOW, NOW, NOW + 1),
        (NOW, NOW - 100, NOW + 1),  # clock behind: old + 1
        (5, 2**32 + 10, 10),  # now is taken modulo 2**32
    ],
)
def test_next_serial(old: int, now: int, expected: int) -> None:
    assert next_serial(old, now) == expected
    assert wire_serial_newer(expected, old)


def test_journal_depth_is_bounded() -> None:
    versions = ZoneVersions(ZONE, 3)
    names = [f"n{i}.example" for i in range(50)]
    installed(versions, content_of(names), NOW)
    serials = [NOW]
    for step in range(1, 6):
        installed(versions, content_of([*names, f"extra{step}.example"]), NOW + step)
        serials.append(NOW + step)
    assert len(versions.journal) == 3
    assert versions.changes_since(serials[1]) is None  # trimmed
    assert versions.changes_since(serials[2]) is not None
    assert [c.old.serial for c in versions.journal] == serials[2:5]


def test_journal_larger_than_the_zone_is_trimmed() -> None:
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(["a.example", "b.example"]), NOW)
    # Replacing every name: 4 removed + 4 added records, more than the zone's 4.
    change = installed(versions, content_of(["c.example", "d.example"]), NOW + 1)
    assert change is not None and change.size == 8
    assert list(versions.journal) == []
    assert versions.changes_since(NOW) is None
    # A small change fits again.
    installed(versions, content_of(["c.example", "d.example", "e.example"]), NOW + 2)
    assert versions.changes_since(NOW + 1) is not None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "{}",
        "null",
        '"serial"',
        "42",
        '{"serial": 1}',
        '{"digest": 1}',
        '{"serial": "1", "digest": 2}',
        '{"serial": 1, "digest": "2"}',
        '{"serial": -1, "digest": 2}',
        '{"serial": 4294967296, "digest": 2}',
        '{"serial": 1.5, "digest": 2}',
        '{"serial": 1, "digest": 2',
        "\x00\xff",
    ],
)
def test_saved_state_from_garbage_is_none(text: str) -> None:
    assert SavedState.from_json(text) is None



def test_saved_state_from_deeply_nested_garbage_is_none() -> None:
    assert SavedState.from_json("[" * 100_000) is None


def test_saved_state_round_trip() -> None:
    state = SavedState(2**32 - 1, 2**64 - 1)
    assert SavedState.from_json(state.to_json()) == state


# --- publish_wire.answer -----------------------------------------------------------------------


def zone_versions(names: Iterable[str], rule: Rule = NXDOMAIN_RULE, filler: bool = False) -> ZoneVersions:
    versions = ZoneVersions(ZONE, 20)
    installed(versions, content_of(names, rule, filler=filler), NOW)
    return versions


def view_of(versions: ZoneVersions) -> dict[str, ZoneView]:
    return {ZONE: ZoneView(versions.zone, versions.changes_since)}


def query(
    qtype: str = "SOA",
    name: str = ZONE + ".",
    key: dns.tsig.Key | None = None,
    serial: int | None = None,
) -> dns.message.Message:
    message = dns.message.make_query(name, qtype)
    if serial is not None:
        soa = dns.rrset.from_text(name, 0, "IN", "SOA", f"localhost. hostmaster.invalid. {serial} 300 60 604800 300")
        message.authority.append(soa)
    if key is not None:
        message.use_tsig(key)
    return message


def ask(
    message: dns.message.Message | bytes,
    zones: dict[str, ZoneView],
    key: dns.tsig.Key | None = None,
    udp: bool = False,
    client: str = "127.0.0.1",
    allow: Iterable[str] = ("127.0.0.0/8",),
) -> tuple[Answer, list[bytes]]:
    data = message if isinstance(message, bytes) else message.to_wire()
    access = access_for([ipaddress.ip_network(n) for n in allow], key)
    result = answer(data, ipaddress.ip_address(client), udp, zones, access, int(time.time()))
    return result, list(result.messages)


def parsed(messages: list[bytes]) -> list[dns.message.Message]:
    return [dns.message.from_wire(m, keyring=False, one_rr_per_rrset=True) for m in messages]


def answer_records(messages: list[bytes]) -> list[tuple[str, str, str]]:
    """(owner relative to the origin, type, rdata text) of every answer record, in order."""
    out = []
    for message in parsed(messages):
        for rrset in message.answer:
            assert rrset.name.is_subdomain(ORIGIN), rrset.name
            for rdata in rrset:
                out.append(
                    (rrset.name.relativize(ORIGIN).to_text(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text())
                )
    return out


def test_client_not_allowed_is_refused() -> None:
    result, messages = ask(query(), view_of(zone_versions(["a.example"])), client="10.9.9.9")
    assert result.result == "refused"
    (message,) = parsed(messages)
    assert message.rcode() == dns.rcode.REFUSED and message.flags & dns.flags.QR


def test_garbage_is_formerr() -> None:
    zones = view_of(zone_versions(["a.example"]))
    result, messages = ask(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07bad", zones)
    assert result.result == "formerr"
    (message,) = messages
    assert struct.unpack("!H", message[:2])[0] == 0x1234 and message[3] & 0xF == dns.rcode.FORMERR
    short, messages = ask(b"\x00\x01", zones)
    assert short.result == "formerr" and messages == []


def test_a_response_gets_no_answer() -> None:
    message = query()
    message.flags |= dns.flags.QR
    _, messages = ask(message, view_of(zone_versions(["a.example"])))
    assert messages == []


def test_unknown_zone_is_refused() -> None:
    result, messages = ask(query(name="other.example."), view_of(zone_versions(["a.example"])))
    assert result.result == "unknown_zone"
    assert parsed(messages)[0].rcode() == dns.rcode.REFUSED


def test_other_types_in_the_zone_are_refused() -> None:
    result, messages = ask(query("A", "a.example." + ZONE + "."), view_of(zone_versions(["a.example"])))
    assert parsed(messages)[0].rcode() == dns.rcode.REFUSED
    result, messages = ask(query("A"), view_of(zone_versions(["a.example"])))
    assert result.request == "other" and parsed(messages)[0].rcode() == dns.rcode.REFUSED


def test_soa_query() -> None:
    versions = zone_versions(["a.example"])
    sent = query()
    result, messages = ask(sent, view_of(versions), udp=True)
    assert (result.request, result.result, result.zone) == ("soa", "ok", ZONE)
    (message,) = parsed(messages)
    assert message.id == sent.id and message.rcode() == dns.rcode.NOERROR
    assert message.flags & dns.flags.AA and message.flags & dns.flags.QR
    assert message.flags & dns.flags.RD  # copied from the query
    (soa,) = message.answer
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == ORIGIN and soa[0].serial == NOW
    (ns,) = message.authority
    assert ns.rdtype == dns.rdatatype.NS and ns.name == ORIGIN


def test_soa_query_with_the_client_spelling_of_the_name() -> None:
    result, messages = ask(query(name="GOV.Rpz.Example."), view_of(zone_versions(["a.example"])))
    (message,) = parsed(messages)
    assert result.result == "ok" and message.question[0].name.to_text() == "GOV.Rpz.Example."
    assert message.answer[0].name == ORIGIN  # case-insensitively


def test_zone_not_rendered_yet_is_servfail() -> None:
    zones = {ZONE: ZoneView(None, lambda serial: None)}
    result, messages = ask(query("AXFR"), zones)
    assert result.result == "not_loaded" and parsed(messages)[0].rcode() == dns.rcode.SERVFAIL


def test_axfr_over_udp_is_formerr() -> None:
    result, messages = ask(query("AXFR"), view_of(zone_versions(["a.example"])), udp=True)
    assert result.result == "formerr" and parsed(messages)[0].rcode() == dns.rcode.FORMERR


def test_axfr_is_the_whole_zone_between_two_soas() -> None:
    versions = zone_versions(["a.example", "b.a.example"], sinkhole())
    result, messages = ask(query("AXFR"), view_of(versions))
    assert result.result == "ok"
    rows = answer_records(messages)
    assert rows[0][1] == "SOA" and rows[-1][1] == "SOA" and rows[0] == rows[-1]
    assert f" {NOW} " in rows[0][2]
    assert ("@", "NS", "localhost.") in rows
    body = sorted(rows[1:-1])
    assert body == sorted(
        [("@", "NS", "localhost.")]
        + [(owner, t, v) for owner in ("a.example", "*.a.example", "b.a.example", "*.b.a.example")
           for t, v in (("A", "0.0.0.0"), ("AAAA", "::"))]
    )  # fmt: skip


def test_big_axfr_spans_several_bounded_messages(tmp_path: Path) -> None:
    names = [f"host{i}.bytedance{i % 7}.example" for i in range(3000)]
    text = '[lists.big]\npath = "big.txt"\n' + PUBLISH + 'lists = ["big"]\naction = "sinkhole"\n'
    policy = make_policy(tmp_path, text, {"big.txt": "\n".join(names) + "\n"})
    versions = ZoneVersions(ZONE, 20)
    installed(versions, rendered(policy), NOW)
    for key in (None, KEY):
        _, messages = ask(query("AXFR", key=key), view_of(versions), key=key)
        assert len(messages) > 5
        tsig_room = 0 if key is None else 200
        assert all(len(m) <= MESSAGE_BUDGET + tsig_room for m in messages)
        rows = answer_records(messages)
        assert len(rows) == 3000 * 4 + 3  # A and AAAA at name and *.name, NS, two SOAs
        assert rows[0][1] == rows[-1][1] == "SOA"
        assert sum(1 for row in rows if row[1] == "SOA") == 2
        owners = {row[0] for row in rows}
        assert f"*.{names[1234]}" in owners and names[2999] in owners


def test_ixfr_up_to_date_is_one_soa() -> None:
    versions = zone_versions(["a.example"])
    for serial in (NOW, NOW + 5):  # the client's serial, or one ahead of ours
        result, messages = ask(query("IXFR", serial=serial), view_of(versions))
        assert result.result == "up_to_date" and result.serial == serial
        assert [row[1] for row in answer_records(messages)] == ["SOA"]


def test_ixfr_over_udp_with_an_older_serial_is_one_soa() -> None:
    versions = zone_versions(["a.example"])
    installed(versions, content_of(["a.example", "b.example"]), NOW + 10)
    result, messages = ask(query("IXFR", serial=NOW), view_of(versions), udp=True)
    assert result.result == "ok"
    rows = answer_records(messages)
    assert len(rows) == 1 and rows[0][1] == "SOA" and f" {NOW + 10} " in rows[0][2]


def test_ixfr_without_a_soa_is_formerr() -> None:
    result, messages = ask(query("IXFR"), view_of(zone_versions(["a.example"])))
    assert result.result == "formerr" and parsed(messages)[0].rcode() == dns.rcode.FORMERR


def _serial_of(row: tuple[str, str, str]) -> int:
    assert row[1] == "SOA"
    return int(row[2].split()[2])


def test_ixfr_from_a_journal_serial_is_the_rfc1995_sequence() -> None:
    versions = zone_versions(["a.example", "b.example"], filler=True)
    installed(versions, content_of(["a.example", "b.example", "c.example"], filler=True), NOW + 10)
    installed(versions, content_of(["b.example", "c.example"], NODATA_RULE, filler=True), NOW + 20)
    result, messages = ask(query("IXFR", serial=NOW), view_of(versions))
    assert result.result == "ok" and result.serial == NOW
    rows = answer_records(messages)
    soas = [at for at, row in enumerate(rows) if row[1] == "SOA"]
    assert [_serial_of(rows[at]) for at in soas] == [NOW + 20, NOW, NOW + 10, NOW + 10, NOW + 20, NOW + 20]
    assert soas[0] == 0 and soas[-1] == len(rows) - 1
    # First change: nothing removed, c.example added.
    assert soas[2] == soas[1] + 1
    assert sorted(rows[soas[2] + 1 : soas[3]]) == [("*.c.example", "CNAME", "."), ("c.example", "CNAME", ".")]
    # Second change: a.example gone; b and c from nxdomain to nodata.
    deleted = sorted(rows[soas[3] + 1 : soas[4]])
    assert deleted == sorted(
        (owner, "CNAME", ".") for n in ("a", "b", "c") for owner in (f"{n}.example", f"*.{n}.example")
    )
    added = sorted(rows[soas[4] + 1 : soas[5]])
    assert added == sorted((owner, "CNAME", "*.") for n in ("b", "c") for owner in (f"{n}.example", f"*.{n}.example"))
    # From the middle of the journal: only the second change.
    _, messages = ask(query("IXFR", serial=NOW + 10), view_of(versions))
    rows = answer_records(messages)
    assert [_serial_of(r) for r in rows if r[1] == "SOA"] == [NOW + 20, NOW + 10, NOW + 20, NOW + 20]


def test_ixfr_from_an_unknown_serial_is_the_whole_zone() -> None:
    versions = zone_versions(["a.example"])
    installed(versions, content_of(["a.example", "b.example"]), NOW + 10)
    result, messages = ask(query("IXFR", serial=NOW - 1000), view_of(versions))
    assert result.result == "ok"
    rows = answer_records(messages)
    assert [row[1] for row in rows].count("SOA") == 2 and rows[0][1] == rows[-1][1] == "SOA"
    assert ("@", "NS", "localhost.") in rows
    assert len(rows) == 2 * 2 + 3  # a CNAME at each name and *.name, NS, two SOAs


def test_ixfr_apply_with_dnspython_gives_the_new_zone() -> None:
    """The IXFR answer, applied to the old AXFR by dnspython's own inbound-xfr code, gives the
    same records as a fresh AXFR."""
    import dns.transaction
    import dns.xfr
    import dns.zone

    versions = zone_versions(["a.example", "b.example"])
    _, axfr = ask(query("AXFR"), view_of(versions))
    target = dns.zone.Zone(ORIGIN)
    with dns.xfr.Inbound(target, dns.rdatatype.AXFR) as inbound:
        for wire in axfr:
            inbound.process_message(dns.message.from_wire(wire, xfr=True, origin=ORIGIN, keyring=False))
    installed(versions, content_of(["b.example", "c.example"], NODATA_RULE), NOW + 10)
    _, ixfr = ask(query("IXFR", serial=NOW), view_of(versions))
    with dns.xfr.Inbound(target, dns.rdatatype.IXFR, NOW) as inbound:
        for wire in ixfr:
            inbound.process_message(
                dns.message.from_wire(wire, xfr=True, origin=ORIGIN, keyring=False, one_rr_per_rrset=True)
            )
    _, fresh = ask(query("AXFR"), view_of(versions))
    expected = dns.zone.Zone(ORIGIN)
    with dns.xfr.Inbound(expected, dns.rdatatype.AXFR) as inbound:
        for wire in fresh:
            inbound.process_message(dns.message.from_wire(wire, xfr=True, origin=ORIGIN, keyring=False))
    assert target == expected
    assert target.get_soa().serial == NOW + 10


def test_with_a_key_unsigned_transfers_are_refused_and_soa_is_answered() -> None:
    zones = view_of(zone_versions(["a.example"]))
    for qtype in ("AXFR", "IXFR"):
        result, messages = ask(query(qtype, serial=NOW - 1 if qtype == "IXFR" else None), zones, key=KEY)
        assert result.result == "refused"
        (message,) = parsed(messages)
        assert message.rcode() == dns.rcode.REFUSED and not message.had_tsig
    result, messages = ask(query("SOA"), zones, key=KEY)
    assert result.result == "ok"
    (message,) = parsed(messages)
    assert message.answer[0][0].serial == NOW and not message.had_tsig


def test_signed_soa_answer_is_signed() -> None:
    sent = query("SOA", key=KEY)
    sent.to_wire()
    _, messages = ask(sent, view_of(zone_versions(["a.example"])), key=KEY)
    (wire,) = messages
    message = dns.message.from_wire(wire, keyring={KEY.name: KEY}, request_mac=sent.mac)
    assert message.had_tsig and message.answer[0][0].serial == NOW


def verify_signed_stream(sent: dns.message.Message, messages: list[bytes]) -> list[dns.message.Message]:
    """Every message's TSIG checked, each MAC chained to the previous one (dnspython's inbound xfr)."""
    tsig_ctx = None
    out = []
    for wire in messages:
        message = dns.message.from_wire(
            wire, keyring={KEY.name: KEY}, request_mac=sent.mac, xfr=True, origin=ORIGIN, tsig_ctx=tsig_ctx, multi=True
        )
        assert message.had_tsig
        tsig_ctx = message.tsig_ctx
        out.append(message)
    return out


def test_signed_axfr_verifies_message_by_message(tmp_path: Path) -> None:
    versions = zone_versions([f"n{i}.bytedance.example" for i in range(800)], sinkhole())
    sent = query("AXFR", key=KEY)
    sent.to_wire()
    result, messages = ask(sent, view_of(versions), key=KEY)
    assert result.result == "ok" and len(messages) > 2
    verified = verify_signed_stream(sent, messages)
    assert verified[0].answer[0].rdtype == dns.rdatatype.SOA
    assert verified[-1].answer[-1].rdtype == dns.rdatatype.SOA
    # Reordered messages do not verify: the chain is real.
    with pytest.raises(dns.tsig.BadSignature):
        verify_signed_stream(sent, [messages[0], messages[2], messages[1]])


def test_signed_ixfr_verifies() -> None:
    versions = zone_versions(["a.example"])
    installed(versions, content_of(["a.example", "b.example"]), NOW + 10)
    sent = query("IXFR", key=KEY, serial=NOW)
    sent.to_wire()
    result, messages = ask(sent, view_of(versions), key=KEY)
    assert result.result == "ok"
    verify_signed_stream(sent, messages)


def _tsig_error(wire: bytes) -> tuple[int, int]:
    message = dns.message.from_wire(wire, keyring=False)
    assert message.tsig is not None
    return message.rcode(), message.tsig[0].error


def test_unknown_key_is_notauth_badkey() -> None:
    sent = query("AXFR", key=OTHER_KEY)
    result, messages = ask(sent, view_of(zone_versions(["a.example"])), key=KEY)
    assert result.result == "notauth" and result.zone == ZONE and result.request == "axfr"
    (wire,) = messages
    assert _tsig_error(wire) == (dns.rcode.NOTAUTH, 17)
    message = dns.message.from_wire(wire, keyring=False)
    assert message.id == sent.id and message.question[0].name == ORIGIN
    assert message.tsig is not None and message.tsig[0].mac == b""  # unsigned (RFC 8945 5.3.2)


def test_bad_mac_is_notauth_badsig() -> None:
    result, messages = ask(query("AXFR", key=WRONG_SECRET), view_of(zone_versions(["a.example"])), key=KEY)
    assert result.result == "notauth"
    assert _tsig_error(messages[0]) == (dns.rcode.NOTAUTH, 16)


def test_signed_query_to_a_server_without_a_key_is_badkey() -> None:
    result, messages = ask(query("SOA", key=KEY), view_of(zone_versions(["a.example"])))
    assert result.result == "notauth" and _tsig_error(messages[0]) == (dns.rcode.NOTAUTH, 17)


def test_signed_refusal_for_an_unknown_zone_is_signed() -> None:
    sent = query("AXFR", name="other.example.", key=KEY)
    sent.to_wire()
    _, messages = ask(sent, view_of(zone_versions(["a.example"])), key=KEY)
    message = dns.message.from_wire(messages[0], keyring={KEY.name: KEY}, request_mac=sent.mac)
    assert message.rcode() == dns.rcode.REFUSED and message.had_tsig


# --- NotifySender ------------------------------------------------------------------------------


class FakeTransport:
    """Records datagrams with the clock's time; optionally fails like a full socket buffer."""

    def __init__(self, clock: task.Clock, fail: bool = False):
        self.clock = clock
        self.fail = fail
        self.written: list[tuple[float, bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.fail:
            raise OSError(105, "No buffer space available")
        self.written.append((self.clock.seconds(), data, addr))


TARGETS = (Endpoint("127.0.0.2", 5301), Endpoint("::1", 53))
SOA_1 = soa_for(ZONE, 300, 1000)
SOA_2 = soa_for(ZONE, 300, 1001)


def sender_for(
    targets: tuple[Endpoint, ...] = TARGETS, key: dns.tsig.Key | None = None, fail: bool = False
) -> tuple[NotifySender, FakeTransport, task.Clock, dict[str, int]]:
    clock = task.Clock()
    counts = dict.fromkeys(NOTIFY_RESULTS, 0)
    ids = iter(range(100, 200))
    sender = NotifySender(clock, targets, key, counts, new_id=lambda: next(ids))
    transport = FakeTransport(clock, fail)
    sender.makeConnection(transport)  # type: ignore[arg-type]
    return sender, transport, clock, counts


def reply(data: bytes, rcode: int = 0, qr: bool = True, opcode: int = dns.opcode.NOTIFY) -> bytes:
    query_id = struct.unpack_from("!H", data)[0]
    flags = (0x8000 if qr else 0) | (opcode << 11) | 0x0400 | rcode
    return struct.pack("!HHHHHH", query_id, flags, 0, 0, 0, 0)


def test_notify_goes_to_every_target_at_once() -> None:
    sender, transport, _, counts = sender_for()
    sender.notify(ZONE, SOA_1)
    assert [(at, addr) for at, _, addr in transport.written] == [(0, ("127.0.0.2", 5301)), (0, ("::1", 53))]
    assert counts["sent"] == 2


def test_notify_retries_on_its_schedule_then_times_out() -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    clock.pump([0.5] * 100)
    times = [at for at, _, _ in transport.written]
    # Sent at once, then again after each wait of the schedule but the last, which waits for the
    # final answer: 1 + 2 + 4 + 8 = 15 s, then 16 s more before giving up.
    assert RETRY_SCHEDULE == (1.0, 2.0, 4.0, 8.0, 16.0)
    assert times == [0, 1, 3, 7, 15]
    assert counts == {"sent": 5, "acknowledged": 0, "error_rcode": 0, "timeout": 1, "send_error": 0}
    assert len({data for _, data, _ in transport.written}) == 1  # the same message, the same id
    assert sender.pending == {} and clock.getDelayedCalls() == []


def test_timeout_is_counted_after_the_last_wait() -> None:
    sender, _, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    clock.advance(1)
    clock.advance(2)
    clock.advance(4)
    clock.advance(8)
    clock.advance(15.9)
    assert counts["timeout"] == 0
    clock.advance(0.1)
    assert counts["timeout"] == 1


def test_answer_stops_retries_and_counts_acknowledged() -> None:
    sender, transport, clock, counts = sender_for()
    sender.notify(ZONE, SOA_1)
    _, data, _ = transport.written[0]
    sender.datagramReceived(reply(data), ("127.0.0.2", 5301))
    assert counts["acknowledged"] == 1
    clock.pump([1.0] * 40)
    assert [addr for _, _, addr in transport.written].count(("127.0.0.2", 5301)) == 1
    assert [addr for _, _, addr in transport.written].count(("::1", 53)) == 5
    assert counts["timeout"] == 1  # the other target never answered


@pytest.mark.parametrize(
    ("case", "address"),
    [
        ("other address", ("127.0.0.3", 5301)),
        ("other port", ("127.0.0.2", 53)),
        ("wrong id", ("127.0.0.2", 5301)),
        ("not a response", ("127.0.0.2", 5301)),
        ("wrong opcode", ("127.0.0.2", 5301)),
        ("short", ("127.0.0.2", 5301)),
    ],
)
def test_answers_that_do_not_match_are_ignored(case: str, address: tuple[str, int]) -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    _, data, _ = transport.written[0]
    message = {
        "wrong id": reply(b"\x00\x01" + data[2:]),
        "not a response": reply(data, qr=False),
        "wrong opcode": reply(data, opcode=dns.opcode.QUERY),
        "short": reply(data)[:11],
    }.get(case, reply(data))
    sender.datagramReceived(message, address)
    assert counts["acknowledged"] == 0 and counts["error_rcode"] == 0
    clock.advance(1)
    assert len(transport.written) == 2  # still retried


def test_error_rcode_stops_and_is_counted() -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    _, data, _ = transport.written[0]
    sender.datagramReceived(reply(data, dns.rcode.REFUSED), ("127.0.0.2", 5301))
    assert counts["error_rcode"] == 1 and counts["acknowledged"] == 0
    clock.pump([1.0] * 40)
    assert len(transport.written) == 1 and counts["timeout"] == 0


def test_answer_from_ipv6_target_with_a_four_tuple_address() -> None:
    sender, transport, _, counts = sender_for(targets=TARGETS[1:])
    sender.notify(ZONE, SOA_1)
    _, data, _ = transport.written[0]
    sender.datagramReceived(reply(data), ("::1", 53, 0, 0))  # type: ignore[arg-type]
    assert counts["acknowledged"] == 1


def test_a_newer_notify_replaces_the_pending_one() -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    clock.advance(0.5)
    sender.notify(ZONE, SOA_2)
    first, second = transport.written[0][1], transport.written[1][1]
    assert dns.message.from_wire(second).answer[0][0].serial == 1001
    clock.advance(0.5)  # the first one's retry is due now: cancelled
    assert len(transport.written) == 2
    clock.advance(0.5)
    assert len(transport.written) == 3 and transport.written[2][1] == second
    sender.datagramReceived(reply(first), ("127.0.0.2", 5301))  # an answer to the old one: too late
    assert counts["acknowledged"] == 0
    sender.datagramReceived(reply(second), ("127.0.0.2", 5301))
    assert counts["acknowledged"] == 1
    clock.pump([1.0] * 40)
    assert counts["timeout"] == 0 and len(transport.written) == 3


def test_zones_are_notified_independently() -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_1)
    sender.notify("other.rpz.example", soa_for("other.rpz.example", 300, 7))
    assert len(sender.pending) == 2
    sender.datagramReceived(reply(transport.written[0][1]), ("127.0.0.2", 5301))
    clock.pump([1.0] * 40)
    assert counts["acknowledged"] == 1 and counts["timeout"] == 1


def test_send_errors_are_counted_and_retried() -> None:
    sender, transport, clock, counts = sender_for(targets=TARGETS[:1], fail=True)
    sender.notify(ZONE, SOA_1)
    assert counts["send_error"] == 1 and counts["sent"] == 0
    transport.fail = False
    clock.advance(1)
    assert counts["sent"] == 1


def test_stop_cancels_every_timer() -> None:
    sender, _, clock, _ = sender_for()
    sender.notify(ZONE, SOA_1)
    assert clock.getDelayedCalls()
    sender.stop()
    assert clock.getDelayedCalls() == [] and sender.pending == {}


def test_no_transport_sends_nothing() -> None:
    clock = task.Clock()
    counts = dict.fromkeys(NOTIFY_RESULTS, 0)
    sender = NotifySender(clock, TARGETS, None, counts)
    sender.notify(ZONE, SOA_1)
    assert counts["sent"] == 0


def test_notify_message_is_a_notify_with_the_soa() -> None:
    sender, transport, _, _ = sender_for(targets=TARGETS[:1])
    sender.notify(ZONE, SOA_2)
    message = dns.message.from_wire(transport.written[0][1])
    assert message.opcode() == dns.opcode.NOTIFY and message.id == 100
    assert message.flags & dns.flags.AA and not message.flags & dns.flags.QR and not message.flags & dns.flags.RD
    assert (message.question[0].name, message.question[0].rdtype) == (ORIGIN, dns.rdatatype.SOA)
    (soa,) = message.answer
    assert soa.name == ORIGIN and soa.ttl == 300
    assert (soa[0].serial, soa[0].mname.to_text(), soa[0].rname.to_text()) == (
        1001,
        "localhost.",
        "hostmaster.invalid.",
    )
    assert not message.had_tsig


def test_notify_message_is_signed_with_the_key() -> None:
    sender, transport, _, _ = sender_for(targets=TARGETS[:1], key=KEY)
    sender.notify(ZONE, SOA_1)
    data = transport.written[0][1]
    message = dns.message.from_wire(data, keyring={KEY.name: KEY})
    assert message.had_tsig and message.keyname == KEY.name and message.answer[0][0].serial == 1000
    with pytest.raises(dns.tsig.BadSignature):
        dns.message.from_wire(data, keyring={WRONG_SECRET.name: WRONG_SECRET})


def test_notify_message_for_the_root_zone() -> None:
    message = dns.message.from_wire(notify_message("", soa_for("", 60, 3), 7, None))
    assert message.question[0].name == dns.name.root and message.answer[0][0].serial == 3


# --- config: [publish] -------------------------------------------------------------------------

CONFIG_LISTS = """
[lists.tiktok]
path = "tiktok.txt"
[lists.refusing]
path = "tiktok.txt"
action = "refused"
[groups.gov]
networks = ["10.120.0.0/16"]
lists = ["tiktok"]
[groups.strict]
networks = ["10.121.0.0/16"]
lists = ["tiktok"]
action = "refused"
[groups.mixed]
networks = ["10.122.0.0/16"]
lists = ["tiktok", "refusing"]
[groups.watch]
networks = ["10.123.0.0/16"]
lists = ["refusing"]
action = "monitor"
"""


def config_of(tmp_path: Path, publish: str) -> Config:
    (tmp_path / "tiktok.txt").write_text("tiktok.com\n")
    return parse_config(UPSTREAM + CONFIG_LISTS + publish, "publish.toml", tmp_path)


def errors_of(tmp_path: Path, publish: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_of(tmp_path, publish)
    return caught.value.errors


def zone_table(body: str, name: str = "tiktok.rpz.example.") -> str:
    return f'[publish]\nlisten = "127.0.0.1:5300"\n[publish.zones."{name}"]\n{body}\n'


def test_publish_defaults(tmp_path: Path) -> None:
    publish = config_of(tmp_path, zone_table('group = "gov"')).publish
    assert publish.listen == Endpoint("127.0.0.1", 5300)
    assert publish.allow == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert publish.journal_depth == 20 and publish.tsig is None and publish.notify == ()
    assert publish.zones == {"tiktok.rpz.example": PublishZoneConfig("tiktok.rpz.example", "gov")}


def test_no_publish_section_is_off(tmp_path: Path) -> None:
    publish = config_of(tmp_path, "").publish
    assert publish.listen is None and publish.zones == {}


def test_publish_every_key(tmp_path: Path) -> None:
    text = (
        '[publish]\nlisten = "[::]:5300"\nallow = ["10.1.0.0/16", "fd00::/8"]\ntsig = "keys/publish.key"\n'
        'notify = ["10.1.1.53", "10.1.2.53:5353", "[fd00::53]:53", "fd00::54"]\njournal_depth = 5\n'
        '[publish.zones."a.rpz.example."]\ngroup = "gov"\nttl = 60\n'
        '[publish.zones."b.rpz.example"]\nlists = ["tiktok"]\naction = "nodata"\n'
    )
    publish = config_of(tmp_path, text).publish
    assert publish.listen == Endpoint("::", 5300)
    assert publish.allow == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert publish.tsig == tmp_path / "keys/publish.key"
    assert publish.notify == (
        Endpoint("10.1.1.53", 53),
        Endpoint("10.1.2.53", 5353),
        Endpoint("fd00::53", 53),
        Endpoint("fd00::54", 53),
    )
    assert publish.journal_depth == 5
    assert publish.zones == {
        "a.rpz.example": PublishZoneConfig("a.rpz.example", "gov", ttl=60),
        "b.rpz.example": PublishZoneConfig("b.rpz.example", None, ("tiktok",), "nodata"),
    }


def one_error(errors: list[str], *fragments: str) -> None:
    assert any(all(f in e for f in fragments) for e in errors), errors


@pytest.mark.parametrize(
    ("publish", "fragments"),
    [
        ('[publish]\n[publish.zones."z."]\ngroup = "gov"\n', ("publish.listen", "missing")),
        ('[publish]\nlisten = "127.0.0.1:5300"\n', ("publish.zones", "missing")),
        ('[publish]\nlisten = "127.0.0.1:5300"\nzones = {}\n', ("publish.zones", "missing")),
        ('[publish]\nlisten = "127.0.0.1:5300"\nzones = 3\n', ("publish.zones", "table of zones")),
        (zone_table('group = "gov"\nlists = ["tiktok"]'), ('publish.zones."tiktok.rpz.example."', "one of them")),
        (zone_table("ttl = 60"), ('publish.zones."tiktok.rpz.example."', "one of them")),
        (zone_table('group = "nobody"'), ('publish.zones."tiktok.rpz.example.".group', "unknown group 'nobody'")),
        (zone_table('lists = ["tiktok", "nope"]'), ('publish.zones."tiktok.rpz.example.".lists[1]', "unknown list")),
        (zone_table('group = "strict"'), ('publish.zones."tiktok.rpz.example."', "RPZ cannot express", "strict")),
        (zone_table('group = "mixed"'), ('publish.zones."tiktok.rpz.example."', "RPZ cannot express", "refusing")),
        (zone_table('lists = ["refusing"]'), ('publish.zones."tiktok.rpz.example."', "RPZ cannot express")),
        (
            zone_table('group = "gov"\naction = "nodata"'),
            ('publish.zones."tiktok.rpz.example.".action', "only with lists"),
        ),
        (zone_table('lists = ["tiktok"]\naction = "refused"'), (".action", "'refused' is not one of")),
        (zone_table('group = "gov"\ncolour = "red"'), (".colour", "unknown key")),
        (zone_table('group = "gov"\nttl = -1'), (".ttl", "out of range")),
        (zone_table('group = "gov"', "."), ("'.' is not a zone name",)),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\nnotify = ["ns1.example"]\n[publish.zones."z."]\ngroup = "gov"\n',
            ("publish.notify[0]", "not an IP address"),
        ),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\nnotify = ["10.1.1.1:99999"]\n[publish.zones."z."]\ngroup = "gov"\n',
            ("publish.notify[0]", "out of range"),
        ),
        ('[publish]\nlisten = "localhost:5300"\n[publish.zones."z."]\ngroup = "gov"\n', ("publish.listen",)),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\nallow = ["10.1.0.1/16"]\n[publish.zones."z."]\ngroup = "gov"\n',
            ("publish.allow[0]", "host bits set"),
        ),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\njournal_depth = 0\n[publish.zones."z."]\ngroup = "gov"\n',
            ("publish.journal_depth", "out of range"),
        ),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\nretries = 3\n[publish.zones."z."]\ngroup = "gov"\n',
            ("publish.retries", "unknown key"),
        ),
        (
            '[publish]\nlisten = "127.0.0.1:5300"\n[publish.zones."z."]\ngroup = "gov"\n'
            '[publish.zones."Z"]\nlists = ["tiktok"]\n',
            ("published twice",),
        ),
    ],
)
def test_publish_config_errors(tmp_path: Path, publish: str, fragments: tuple[str, ...]) -> None:
    one_error(errors_of(tmp_path, publish), *fragments)


def test_a_monitor_group_with_a_refusing_list_is_publishable(tmp_path: Path) -> None:
    publish = config_of(tmp_path, zone_table('group = "watch"')).publish
    assert publish.zones["tiktok.rpz.example"].group == "watch"


def test_a_monitor_zone_of_lists_with_a_refusing_list_is_publishable(tmp_path: Path) -> None:
    publish = config_of(tmp_path, zone_table('lists = ["refusing"]\naction = "monitor"')).publish
    assert publish.zones["tiktok.rpz.example"].action == "monitor"


def test_the_fast_axfr_encoding_is_record_wire_of_every_record() -> None:
    """publish_wire._trigger_records (the AXFR hot path) gives exactly the records record_wire
    gives for publish_zone.records: escaped labels, local data, exact-only and below-only owners."""
    from collections import Counter

    from blockd.publish_wire import _trigger_records, record_wire
    from blockd.publish_zone import records, soa_for
    from blockd.rpz import LOCAL_DATA, NODATA_RULE, NXDOMAIN_RULE, LocalRecord, PolicyZone, Rule

    garden = Rule(LOCAL_DATA, (LocalRecord(1, 60, bytes(4)), LocalRecord(28, 60, bytes(16))))
    exact = {"a.example": NXDOMAIN_RULE, "b.c.example": garden, "top": NODATA_RULE, "we\\032ird.example": garden}
    below = {"a.example": garden, "only-below.example": NXDOMAIN_RULE, "we\\032ird.example": NODATA_RULE}
    zone = PolicyZone("rpz.test", soa_for("rpz.test", 300, 1), exact, below)
    assert Counter(_trigger_records(zone)) == Counter(map(record_wire, records(zone)))


def test_publish_streams_admit_allow_only_cap_per_address_and_abort_when_idle(tmp_path: Path) -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from blockd.config import Endpoint, PublishConfig, PublishZoneConfig
    from blockd.publish import IDLE_TIMEOUT, MAX_CONNECTIONS_PER_ADDRESS, Publisher, PublishStreamFactory

    clock = Clock()
    zone = PublishZoneConfig("rpz.test", group="g")
    config = PublishConfig(listen=Endpoint("127.0.0.1", 5300), zones={zone.name: zone})
    publisher = Publisher(clock, config, tmp_path, None, lambda: None)  # type: ignore[arg-type,return-value]
    factory = PublishStreamFactory(publisher)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4000)) is None  # outside allow
    streams = [factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000 + n)) for n in range(10)]
    assert sum(stream is not None for stream in streams) == MAX_CONNECTIONS_PER_ADDRESS
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 4000)) is not None  # another address still gets in
    stream = streams[0]
    assert stream is not None
    transport = StringTransport()
    stream.makeConnection(transport)
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting  # aborted: a reader that stopped would never let a close drain
    stream.connectionLost(None)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000)) is not None  # its slot is free again


def test_mutated_queries_never_raise_and_any_answer_is_a_response() -> None:
    """The publish listener's only parser, fed 20,000 mutations of real SOA/AXFR/IXFR queries
    (signed and not) and random bytes: every outcome is an Answer; what goes out is a response
    to that ID, never an exception reaching the reactor."""

    key = dns.tsig.Key("k", base64.b64encode(b"k" * 32).decode())
    zones = view_of(zone_versions(["a.example", "b.example"]))
    seeds = [query(t).to_wire() for t in ("SOA", "AXFR")] + [query("IXFR", serial=1).to_wire()]
    seeds += [query("AXFR", key=key).to_wire()]
    rng = random.Random(20261202)
    for round_ in range(20_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            if choice < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif choice < 0.75:
                del data[rng.randrange(len(data) + 1) :]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        if round_ % 10 == 0:
            data = bytearray(rng.randbytes(rng.randint(0, 40)))
        result, messages = ask(bytes(data), zones, key=key if round_ % 2 else None, udp=bool(round_ % 3))
        assert result.request in ("soa", "axfr", "ixfr", "other")
        for message in messages[:3]:
            assert message[:2] == bytes(data[:2]) and message[2] & 0x80, (bytes(data), message)


# --- review fixes: loops, EDNS, per-message TSIG time, the transfer quota, BADTIME --------------


def test_a_response_is_never_answered_even_from_outside_allow_or_badly_signed() -> None:
    zones = view_of(zone_versions(["a.example"]))
    refusal = bytearray(query("SOA").to_wire())
    refusal[2] |= 0x80  # QR: someone's answer (a spoofed one, or another server's REFUSED)
    for client in ("127.0.0.1", "192.0.2.99"):
        result, messages = ask(bytes(refusal), zones, key=KEY, client=client)
        assert messages == [] and result.result == "formerr"
    signed = bytearray(query("AXFR", key=OTHER_KEY).to_wire())
    signed[2] |= 0x80
    assert ask(bytes(signed), zones, key=KEY)[1] == []


def test_edns_queries_get_an_opt_record_and_other_versions_badvers() -> None:
    zones = view_of(zone_versions([f"n{i}.example" for i in range(600)]))
    for qtype in ("SOA", "AXFR"):
        sent = query(qtype)
        sent.use_edns(0, payload=4096)
        _, messages = ask(sent, zones)
        assert all(message.edns == 0 for message in parsed(messages)), qtype
    plain = parsed(ask(query("SOA"), zones)[1])
    assert plain[0].edns == -1  # no OPT for a query without one
    future = query("SOA")
    future.use_edns(1)
    result, messages = ask(future, zones)
    (message,) = parsed(messages)
    assert result.result == "badvers" and message.rcode() == dns.rcode.BADVERS and message.edns == 0


def test_a_signed_transfer_stamps_each_message_when_it_is_made() -> None:
    versions = zone_versions([f"n{i}.example" for i in range(800)])
    sent = query("AXFR", key=KEY)
    sent.to_wire()
    ticks = iter(range(int(time.time()), int(time.time()) + 10_000))
    access = access_for([ipaddress.ip_network("127.0.0.0/8")], KEY)
    now = int(time.time())
    result = answer(sent.to_wire(), ipaddress.ip_address("127.0.0.1"), False, view_of(versions), access, now,
                    clock=lambda: next(ticks))  # fmt: skip
    messages = list(result.messages)
    times = [dns.message.from_wire(m, keyring=False).tsig[0].time_signed for m in messages]  # type: ignore[index]
    assert len(messages) > 2 and times == sorted(times) and len(set(times)) == len(times)
    verify_signed_stream(sent, messages[:1])  # within the fudge: the chain still verifies


def test_whole_zone_transfers_beyond_the_quota_are_servfail_and_incremental_ones_are_not() -> None:
    versions = zone_versions(["a.example"])
    installed(versions, content_of(["a.example", "b.example"]), NOW + 10)
    access = access_for([ipaddress.ip_network("127.0.0.0/8")], None)
    client = ipaddress.ip_address("127.0.0.1")

    def ask_busy(message: dns.message.Message) -> Answer:
        return answer(message.to_wire(), client, False, view_of(versions), access, NOW, full_transfers=False)

    busy = ask_busy(query("AXFR"))
    (message,) = parsed(list(busy.messages))
    assert busy.result == "busy" and message.rcode() == dns.rcode.SERVFAIL
    assert ask_busy(query("IXFR", serial=NOW)).result == "ok"  # from the journal: small, never queued
    assert ask_busy(query("IXFR", serial=12345)).result == "busy"  # beyond it: the whole zone
    assert ask_busy(query("SOA")).result == "ok"
    assert answer(query("AXFR").to_wire(), client, False, view_of(versions), access, NOW).full


def test_a_bad_time_is_notauth_signed_with_the_servers_time() -> None:
    import dns.rdtypes.ANY.TSIG

    from blockd.publish_wire import _with_additional

    # A query signed an hour ago: outside the 300 s fudge, its MAC right.
    wire = dns.message.make_query(ZONE + ".", "AXFR").to_wire()
    then = int(time.time()) - 3600
    template = dns.rdtypes.ANY.TSIG.TSIG(
        dns.rdataclass.ANY, dns.rdatatype.TSIG, KEY.algorithm, then, 300, b"", 1, 0, b""
    )
    tsig, _ = dns.tsig.sign(wire, KEY, template, then, None, None, False)  # type: ignore[no-untyped-call]
    data = _with_additional(wire, KEY.name.to_wire() + struct.pack("!HHI", 250, 255, 0), tsig.to_wire())
    result, messages = ask(data, view_of(zone_versions(["a.example"])), key=KEY)
    assert result.result == "notauth"
    message = dns.message.from_wire(messages[0], keyring=False)
    assert message.rcode() == dns.rcode.NOTAUTH and message.tsig is not None
    answered = message.tsig[0]
    assert answered.error == 18 and answered.mac != b""  # BADTIME, signed (RFC 8945 5.2.3)
    assert abs(int.from_bytes(answered.other, "big") - int(time.time())) < 60  # the server's time


def test_more_than_one_question_is_formerr() -> None:
    data = bytearray(query("SOA").to_wire())
    data[5] = 2  # QDCOUNT 2, with one question present
    result, messages = ask(bytes(data), view_of(zone_versions(["a.example"])))
    assert result.result == "formerr" and dns.message.from_wire(messages[0]).rcode() == dns.rcode.FORMERR


def test_a_rendering_in_progress_holds_its_policy_against_dismantling(tmp_path: Path) -> None:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from blockd.config import Endpoint, PublishConfig, PublishZoneConfig
    from blockd.publish import Publisher

    started: list[defer.Deferred[object]] = []

    def in_thread(function: object, *args: object) -> defer.Deferred[object]:
        started.append(defer.Deferred())
        return started[-1]

    zone = PublishZoneConfig("rpz.test", group="g")
    config = PublishConfig(listen=Endpoint("127.0.0.1", 5300), zones={zone.name: zone})
    publisher = Publisher(Clock(), config, tmp_path, None, lambda: None, run_in_thread=in_thread)  # type: ignore[arg-type,return-value]
    first, second = object(), object()
    publisher.policy_changed(first)  # type: ignore[arg-type]
    publisher.policy_changed(second)  # type: ignore[arg-type]  # waits for the first rendering
    assert publisher.holds_policy(first) and publisher.holds_policy(second)  # type: ignore[arg-type]
    started[0].callback([])
    assert not publisher.holds_policy(first) and publisher.holds_policy(second)  # type: ignore[arg-type]
    started[1].callback([])
    assert not publisher.holds_policy(second)  # type: ignore[arg-type]
