"""Issue: close the bypasses.  Each way a government device could still reach TikTok through a
resolver that only matches the question name, proven closed against the real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, A

from tests.daemon import GOV, OTHER, REPO, rcode_name

FORWARDER = "127.0.0.8"


def addresses(message: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in message.answer for item in rrset if rrset.rdtype in (1, 28)]


def ede_text(message: dns.message.Message) -> str:
    return " ".join(opt.text or "" for opt in message.options if opt.otype == dns.edns.EDE)


def chain(upstream, name: str, *targets: str, address: str = "192.0.2.77") -> None:
    """name CNAME targets[0] CNAME targets[1] ... A address."""
    records = []
    owner = name
    for target in targets:
        records.append(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=300))
        owner = target
    records.append(RR(owner, QTYPE.A, rdata=A(address), ttl=300))
    upstream.records[name] = records


@pytest.fixture
def prefix_file(tmp_path):
    path = tmp_path / "test-prefixes.txt"
    path.write_text("# test prefixes (documentation range)\n198.51.100.0/24\n2001:db8:bad::/48\n")
    return path


@pytest.fixture
def gov_daemon(make_daemon, prefix_file, test_lists):
    (test_lists / "tiktok.txt").write_text((REPO / "domains" / "tiktok.txt").read_text() + "bücher.example\n")
    daemon = make_daemon(server_extra=f'trusted_forwarders = ["{FORWARDER}/32"]', start=False)
    text = daemon.config_path.read_text()
    text = text.replace(
        'networks = ["127.0.0.2/32"]\nlists = ["tiktok", "extra"]',
        'networks = ["127.0.0.2/32", "10.120.0.0/16"]\nlists = ["tiktok", "extra"]\n'
        f'block_answer_prefixes = ["{prefix_file}"]',
    )
    text += '\n[egress]\nnever = ["198.51.100.128/25"]\n'
    daemon.config_path.write_text(text)
    return daemon.start()


# -- CNAME cloaking -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3])
def test_cname_cloaking_blocked_at_any_depth(gov_daemon, upstream, tmp_path, depth) -> None:
    hops = [f"hop{i}.cdn.example" for i in range(depth - 1)] + ["v16m.tiktokcdn.com"]
    chain(upstream, "innocent.example", *hops)
    answer = gov_daemon.query("innocent.example", "A", source=GOV, use_edns=0)
    assert addresses(answer) == ["0.0.0.0"]
    assert "tiktokcdn.com" in ede_text(answer) and "list tiktok" in ede_text(answer)
    assert answer.question[0].name.to_text() == "innocent.example."
    # The other client gets the upstream's chain untouched.
    other = gov_daemon.query("innocent.example", "A", source=OTHER)
    assert addresses(other) == ["192.0.2.77"] and len(other.answer) == depth + 1
    # And the query log names the list and the listed name that matched.
    record = wait_for_log(tmp_path, "innocent.example")
    assert record["list"] == "tiktok" and record["domain"] == "tiktokcdn.com" and record["action"] == "sinkhole"


def test_dname_blocked(gov_daemon, upstream) -> None:
    upstream.records["www.alias.example"] = [
        RR("alias.example", QTYPE.DNAME, rdata=CNAME("tiktok.com"), ttl=300),
        RR("www.alias.example", QTYPE.CNAME, rdata=CNAME("www.tiktok.com"), ttl=300),
        RR("www.tiktok.com", QTYPE.A, rdata=A("192.0.2.78"), ttl=300),
    ]
    answer = gov_daemon.query("www.alias.example", "A", source=GOV, use_edns=0)
    assert addresses(answer) == ["0.0.0.0"] and "tiktok.com" in ede_text(answer)
    assert addresses(gov_daemon.query("www.alias.example", "A", source=OTHER)) == ["192.0.2.78"]


def test_cloaking_blocked_for_every_qtype(gov_daemon, upstream) -> None:
    upstream.records["cloak-aaaa.example"] = [
        RR("cloak-aaaa.example", QTYPE.CNAME, rdata=CNAME("x.tiktokv.com"), ttl=300),
        RR("x.tiktokv.com", QTYPE.AAAA, rdata=AAAA("2001:db8::99"), ttl=300),
    ]
    answer = gov_daemon.query("cloak-aaaa.example", "AAAA", source=GOV)
    assert addresses(answer) == ["::"]


# -- answer addresses ---------------------------------------------------------------------------


def test_answer_address_in_blocked_prefix(gov_daemon, upstream) -> None:
    upstream.records["ip-listed.example"] = [RR("ip-listed.example", QTYPE.A, rdata=A("198.51.100.10"), ttl=300)]
    upstream.records["ip-never.example"] = [RR("ip-never.example", QTYPE.A, rdata=A("198.51.100.200"), ttl=300)]
    upstream.records["ip6-listed.example"] = [
        RR("ip6-listed.example", QTYPE.AAAA, rdata=AAAA("2001:db8:bad::1"), ttl=300)
    ]
    blocked = gov_daemon.query("ip-listed.example", "A", source=GOV, use_edns=0)
    assert addresses(blocked) == ["0.0.0.0"] and "198.51.100.10" in ede_text(blocked)
    assert "test-prefixes" in ede_text(blocked)
    assert addresses(gov_daemon.query("ip6-listed.example", "AAAA", source=GOV)) == ["::"]
    assert addresses(gov_daemon.query("ip-never.example", "A", source=GOV)) == ["198.51.100.200"]  # never: shared CDN
    assert addresses(gov_daemon.query("ip-listed.example", "A", source=OTHER)) == ["198.51.100.10"]


def test_https_hints_into_blocked_prefix_block_the_answer(gov_daemon, upstream) -> None:
    upstream.records["hints.example"] = RR.fromZone(
        "hints.example. 300 IN HTTPS 1 . alpn=h2 ipv4hint=198.51.100.7 ipv6hint=2001:db8::7"
    )
    upstream.records["clean-hints.example"] = RR.fromZone(
        "clean-hints.example. 300 IN HTTPS 1 . alpn=h2 ipv4hint=192.0.2.7"
    )
    blocked = gov_daemon.query("hints.example", "HTTPS", source=GOV)
    assert rcode_name(blocked) == "NOERROR" and not blocked.answer and blocked.authority  # NODATA + SOA
    clean = gov_daemon.query("clean-hints.example", "HTTPS", source=GOV)
    assert clean.answer and clean.answer[0].rdtype == dns.rdatatype.HTTPS
    other = gov_daemon.query("hints.example", "HTTPS", source=OTHER)
    assert other.answer and other.answer[0].rdtype == dns.rdatatype.HTTPS


# -- encrypted-DNS escape hatches ---------------------------------------------------------------


def test_escape_hatches_closed_by_default(gov_daemon, upstream) -> None:
    # Built in, even though the government group's lists here do not include doh-bypass.
    for name in ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"]:
        answer = gov_daemon.query(name, "A", source=GOV)
        assert rcode_name(answer) == "NXDOMAIN" and not answer.answer, name  # never a sinkhole address
    ddr = gov_daemon.query("_dns.resolver.arpa", "SVCB", source=GOV)
    assert rcode_name(ddr) == "NOERROR" and not ddr.answer and ddr.authority
    asked = upstream.names_asked()
    assert not [n for n in asked if "application-dns" in n or "icloud" in n or "resolver.arpa" in n]
    # Other clients are untouched.
    assert addresses(gov_daemon.query("use-application-dns.net", "A", source=OTHER)) == ["192.0.2.1"]


def test_escape_hatches_individually_switchable(make_daemon) -> None:
    daemon = make_daemon(
        extra="""
        [groups.relaxed]
        networks = ["127.0.0.9/32"]
        lists = ["tiktok"]
        block_firefox_canary = false
        block_ddr = false
        """
    )
    assert addresses(daemon.query("use-application-dns.net", "A", source="127.0.0.9")) == ["192.0.2.1"]
    assert rcode_name(daemon.query("mask.icloud.com", "A", source="127.0.0.9")) == "NXDOMAIN"
    assert rcode_name(daemon.query("_dns.resolver.arpa", "SVCB", source="127.0.0.9")) == "NOERROR"


def test_doh_bypass_list_nxdomain_by_default_config(tmp_path) -> None:
    """The embedded default and the example config answer DoH endpoints with NXDOMAIN."""
    from blockd.config import load_config
    from blockd.policy import build_policy

    example = tmp_path / "blockd.toml"  # installed as the example says: lists in domains/ beside it
    example.write_text((REPO / "deploy" / "blockd.example.toml").read_text())
    (tmp_path / "domains").symlink_to(REPO / "domains")
    for path in (None, example):
        policy = build_policy(load_config(path))
        for group in policy.groups.values():
            if "doh-bypass" in group.list_actions and group.blocks:
                verdict = policy.check(group, "dns.google")
                assert verdict is not None and verdict.action == "nxdomain", path


# -- every qtype answered locally ---------------------------------------------------------------


def test_every_qtype_of_a_blocked_name_answered_locally(gov_daemon, upstream) -> None:
    for rdtype in ["A", "AAAA", "HTTPS", "SVCB", "ANY", "CNAME", "TXT", "MX", "NS", "SOA", "SRV", "PTR", "CAA"]:
        answer = gov_daemon.query("api.tiktokv.com", rdtype, source=GOV)
        assert rcode_name(answer) == "NOERROR", rdtype
        for rrset in answer.answer:
            assert rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA), rdtype
            assert rrset[0].to_text() in ("0.0.0.0", "::")
    assert "api.tiktokv.com" not in upstream.names_asked()


# -- name tricks --------------------------------------------------------------------------------


def test_name_tricks_match_like_the_lowercase_name(gov_daemon, upstream) -> None:
    deep = ".".join(["a"] * 120) + ".tiktok.com"
    longest = ".".join(["b" * 61] * 3 + ["c" * 56]) + ".tiktok.com"  # 253 characters
    assert len(longest) == 253
    for name in [
        "WwW.TiKtOk.CoM",  # 0x20 mixed case
        "www.tiktok.com.",  # trailing dot
        "\\119ww.tiktok.com",  # an escaped ordinary character is the same wire name
        "XN--BCHER-KVA.example",  # uppercase IDN A-label of a listed bücher.example
        deep,
        longest,
    ]:
        answer = gov_daemon.query(name, "A", source=GOV)
        assert addresses(answer) == ["0.0.0.0"], name
    # A dot *inside* a label is a different name, not a subdomain of tiktok.com.
    inside = dns.name.Name([b"www.tiktok", b"com", b""])
    message = dns.message.make_query(inside, "A")
    answer = dns.query.udp(message, "127.0.0.1", port=gov_daemon.port, source=GOV, timeout=3)
    assert addresses(answer) == ["192.0.2.1"]


# -- clients behind a forwarder (EDNS Client Subnet) --------------------------------------------


def ecs_query(name: str, subnet: str, prefix: int) -> dns.message.Message:
    return dns.message.make_query(name, "A", use_edns=0, options=[dns.edns.ECSOption(subnet, prefix)])


def test_ecs_from_trusted_forwarder_classifies(gov_daemon, upstream) -> None:
    ask = lambda q, source: dns.query.udp(q, "127.0.0.1", port=gov_daemon.port, source=source, timeout=3)  # noqa: E731
    # The forwarder itself is in no group; its client's subnet is.
    assert addresses(ask(ecs_query("www.tiktok.com", "127.0.0.2", 32), FORWARDER)) == ["0.0.0.0"]
    assert addresses(ask(ecs_query("www.tiktok.com", "10.120.5.0", 24), FORWARDER)) == ["0.0.0.0"]
    assert addresses(ask(ecs_query("www.tiktok.com", "10.0.0.0", 8), FORWARDER)) == ["192.0.2.1"]  # wider: no
    assert addresses(ask(dns.message.make_query("www.tiktok.com", "A"), FORWARDER)) == ["192.0.2.1"]
    # ECS from anyone else is ignored: a government device cannot claim another subnet.
    assert addresses(ask(ecs_query("www.tiktok.com", "127.0.0.3", 32), GOV)) == ["0.0.0.0"]
    assert addresses(ask(ecs_query("www.tiktok.com", "127.0.0.2", 32), OTHER)) == ["192.0.2.1"]
    # ECS is not sent upstream (nor the client's cookie).
    upstream.clear()
    ask(ecs_query("ecs-check.example", "127.0.0.2", 32), FORWARDER)
    sent = dns.message.from_wire(upstream.raw_queries[-1])
    assert sent.edns == 0 and not [o for o in sent.options if o.otype == dns.edns.ECS]


def test_ecs_forwarded_when_configured(make_daemon, upstream) -> None:
    daemon = make_daemon(extra="")
    text = daemon.config_path.read_text().replace("timeout = 1.0", "timeout = 1.0\nforward_ecs = true")
    daemon.config_path.write_text(text)
    daemon.stop()
    daemon.start()
    answer = dns.query.udp(
        ecs_query("ecs-fwd.example", "192.0.2.0", 24), "127.0.0.1", port=daemon.port, source=OTHER, timeout=3
    )
    assert addresses(answer) == ["192.0.2.1"]
    sent = dns.message.from_wire(upstream.raw_queries[-1])
    assert [o for o in sent.options if o.otype == dns.edns.ECS]


# -- reloads, the cache and groups --------------------------------------------------------------


def test_newly_listed_name_blocked_on_next_query_even_if_cached(gov_daemon, upstream, test_lists) -> None:
    assert addresses(gov_daemon.query("newly.example", "A", source=GOV)) == ["192.0.2.1"]  # now cached
    assert addresses(gov_daemon.query("newly.example", "A", source=GOV)) == ["192.0.2.1"]
    with open(test_lists / "extra.txt", "a") as handle:
        handle.write("newly.example\n")
    gov_daemon.signal()
    deadline = time.monotonic() + 10
    while "reload succeeded" not in gov_daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert addresses(gov_daemon.query("newly.example", "A", source=GOV)) == ["0.0.0.0"]
    assert addresses(gov_daemon.query("newly.example", "A", source=OTHER)) == ["192.0.2.1"]


def test_one_groups_answer_never_served_to_another(gov_daemon, upstream) -> None:
    chain(upstream, "shared.example", "edge.tiktokcdn-eu.com")
    assert addresses(gov_daemon.query("shared.example", source=GOV)) == ["0.0.0.0"]
    assert addresses(gov_daemon.query("shared.example", source=OTHER)) == ["192.0.2.77"]
    assert addresses(gov_daemon.query("shared.example", source=GOV)) == ["0.0.0.0"]  # served from cache: still
    assert addresses(gov_daemon.query("shared.example", source="127.0.0.4")) == ["192.0.2.77"]  # monitor
    assert upstream.names_asked().count("shared.example") == 1


# -- must not block -----------------------------------------------------------------------------


def test_look_alikes_are_forwarded_untouched(gov_daemon, upstream) -> None:
    for name in [
        "nottiktok.com",
        "tiktok.com.example.net",
        "tiktok.com.evil.example",
        "www.tiktok.co",
        "mytiktokv.com",
        "akamaized.net",
        "other-site.akamaized.net",
        "edgekey.net",
        "www.example.edgekey.net",
        "fastly.net",
        "global.fastly.net",
        "icloud.com",
        "www.icloud.com",
        "arpa",
    ]:
        answer = gov_daemon.query(name, "A", source=GOV)
        assert addresses(answer) == ["192.0.2.1"], name
        assert name.lower() in upstream.names_asked(), name


def wait_for_log(tmp_path, qname: str) -> dict:
    path = tmp_path / "queries.jsonl"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["qname"] == qname:
                    return record
        time.sleep(0.05)
    raise AssertionError(f"no log line for {qname}")


def test_check_reports_bad_prefix_file(tmp_path, test_lists) -> None:
    bad = tmp_path / "bad-prefixes.txt"
    bad.write_text("198.51.100.0/24\n300.1.2.0/24\n2001:db8::/129\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[upstream]\nservers = ["127.0.0.1:9"]\n[lists.t]\npath = "{test_lists / "tiktok.txt"}"\n'
        f'[groups.g]\nnetworks = ["10.0.0.0/8"]\nlists = ["t"]\nblock_answer_prefixes = ["{bad}"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "blockd", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 1
    assert f"{bad}:2:" in result.stderr and f"{bad}:3:" in result.stderr
