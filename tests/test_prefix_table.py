"""blockd.prefix_table: longest-prefix match of clients (and ECS prefixes) to groups."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.prefix_table import PrefixTable, normalize_network, parse_address

net = ipaddress.ip_network
addr = ipaddress.ip_address


def table(*entries: tuple[str, str]) -> PrefixTable[str]:
    return PrefixTable((net(n), value) for n, value in entries)


NESTED = table(
    ("0.0.0.0/0", "v4-default"),
    ("10.0.0.0/8", "ten"),
    ("10.1.0.0/16", "ten-one"),
    ("10.1.2.0/24", "ten-one-two"),
    ("10.1.2.3/32", "host"),
    ("192.168.0.0/16", "home"),
    ("::/0", "v6-default"),
    ("fd00::/8", "ula"),
    ("fd00:120::/64", "gov"),
    ("fd00:120::53/128", "v6-host"),
    ("2001:db8::/32", "doc"),
)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("10.1.2.3", "host"),
        ("10.1.2.4", "ten-one-two"),
        ("10.1.3.1", "ten-one"),
        ("10.2.0.1", "ten"),
        ("11.0.0.1", "v4-default"),
        ("192.168.255.255", "home"),
        ("255.255.255.255", "v4-default"),
        ("0.0.0.0", "v4-default"),
        ("fd00:120::53", "v6-host"),
        ("fd00:120::54", "gov"),
        ("fd00:120:0:1::1", "ula"),
        ("fdff::1", "ula"),
        ("2001:db8:ffff::1", "doc"),
        ("2001:db9::1", "v6-default"),
        ("::1", "v6-default"),
    ],
)
def test_longest_prefix_wins(client: str, expected: str) -> None:
    assert NESTED.lookup(parse_address(client)) == expected


def test_no_match_without_default() -> None:
    t = table(("10.0.0.0/8", "ten"), ("fd00::/8", "ula"))
    assert t.lookup(addr("11.0.0.1")) is None
    assert t.lookup(addr("fe80::1")) is None
    assert PrefixTable([]).lookup(addr("10.0.0.1")) is None
    assert PrefixTable([]).lookup(addr("::1")) is None


def test_ipv4_default_does_not_match_ipv6_and_vice_versa() -> None:
    only_v4 = table(("0.0.0.0/0", "v4"))
    only_v6 = table(("::/0", "v6"))
    assert only_v4.lookup(addr("2001:db8::1")) is None
    assert only_v6.lookup(addr("10.0.0.1")) is None
    assert only_v4.lookup(addr("10.0.0.1")) == "v4"
    assert only_v6.lookup(addr("2001:db8::1")) == "v6"


def test_host_routes() -> None:
    t = table(("10.0.0.1/32", "a"), ("10.0.0.2/32", "b"), ("2001:db8::1/128", "c"))
    assert t.lookup(addr("10.0.0.1")) == "a"
    assert t.lookup(addr("10.0.0.2")) == "b"
    assert t.lookup(addr("10.0.0.3")) is None
    assert t.lookup(addr("2001:db8::1")) == "c"
    assert t.lookup(addr("2001:db8::2")) is None


def test_first_entry_wins_for_duplicate_networks() -> None:
    t = table(("10.0.0.0/8", "first"), ("10.0.0.0/8", "second"))
    assert t.lookup(addr("10.9.9.9")) == "first"


def test_falsy_values_are_found() -> None:
    t = PrefixTable([(net("10.0.0.0/8"), False), (net("10.1.0.0/16"), 0)])
    assert t.lookup(addr("10.1.0.1")) == 0
    assert t.lookup(addr("10.2.0.1")) is False


# --- address parsing: IPv4-mapped and zone ids ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("::ffff:a01:203", "10.1.2.3"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%2", "fe80::1"),
        ("fd00:120::1", "fd00:120::1"),
        ("::1", "::1"),
    ],
)
def test_parse_address(text: str, expected: str) -> None:
    parsed = parse_address(text)
    assert parsed == addr(expected)
    assert str(parsed) == expected


def test_zone_id_is_stripped() -> None:
    parsed = parse_address("fe80::1%eth0")
    assert isinstance(parsed, ipaddress.IPv6Address)
    assert parsed.scope_id is None


def test_parse_address_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_address("not-an-address")


def test_ipv4_mapped_client_matches_ipv4_networks() -> None:
    assert NESTED.lookup(parse_address("::ffff:10.1.2.3")) == "host"
    assert NESTED.lookup(parse_address("::ffff:10.9.9.9")) == "ten"
    assert NESTED.lookup(parse_address("::ffff:8.8.8.8")) == "v4-default"
    t = table(("::/0", "v6-default"), ("10.0.0.0/8", "ten"))
    # Matched as IPv4: the IPv6 default does not catch an IPv4 client behind a dual-stack socket.
    assert t.lookup(parse_address("::ffff:11.0.0.1")) is None


def test_link_local_client_with_zone_matches() -> None:
    t = table(("fe80::/10", "link-local"))
    assert t.lookup(parse_address("fe80::1%eth0")) == "link-local"


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.1.2.0/120", "10.1.2.0/24"),
        ("::ffff:10.1.2.3/128", "10.1.2.3/32"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("fd00::/8", "fd00::/8"),
        ("::/0", "::/0"),
        ("::/96", "::/96"),
    ],
)
def test_normalize_network(network: str, expected: str) -> None:
    assert normalize_network(net(network)) == net(expected)


def test_ipv4_mapped_networks_in_config_are_normalised() -> None:
    t = table(("::ffff:10.0.0.0/104", "mapped-ten"), ("::ffff:10.1.2.0/120", "mapped-24"))
    assert t.lookup(parse_address("10.9.9.9")) == "mapped-ten"
    assert t.lookup(parse_address("::ffff:10.9.9.9")) == "mapped-ten"
    assert t.lookup(parse_address("10.1.2.200")) == "mapped-24"
    assert t.lookup(parse_address("11.0.0.1")) is None


# --- ECS prefixes ----------------------------------------------------------------------------


def test_lookup_network_counts_only_containing_entries() -> None:
    t = table(("10.120.0.0/16", "gov"), ("0.0.0.0/0", "default"))
    assert t.lookup_network(net("10.120.7.0/24")) == "gov"
    assert t.lookup_network(net("10.120.0.0/16")) == "gov"
    assert t.lookup_network(net("10.120.7.9/32")) == "gov"
    # A /8 that contains the group's /16 is not inside it.
    assert t.lookup_network(net("10.0.0.0/8")) == "default"
    assert t.lookup_network(net("10.121.0.0/24")) == "default"
    no_default = table(("10.120.0.0/16", "gov"))
    assert no_default.lookup_network(net("10.0.0.0/8")) is None
    assert no_default.lookup_network(net("0.0.0.0/0")) is None


def test_lookup_network_ipv6_and_mapped() -> None:
    t = table(("fd00:120::/48", "gov"), ("10.120.0.0/16", "gov4"))
    assert t.lookup_network(net("fd00:120:0:5::/64")) == "gov"
    assert t.lookup_network(net("fd00::/16")) is None
    assert t.lookup_network(net("::ffff:10.120.3.0/120")) == "gov4"
    assert t.lookup_network(net("::ffff:10.0.0.0/104")) is None


# --- property: PrefixTable agrees with brute force -------------------------------------------


def v4_networks() -> st.SearchStrategy[ipaddress.IPv4Network]:
    # Few distinct top bits so random networks nest and collide often.
    return st.builds(
        lambda top, rest, plen: ipaddress.IPv4Network(((top << 28) | rest, plen), strict=False),
        st.integers(0, 3),
        st.integers(0, (1 << 28) - 1),
        st.integers(0, 32),
    )


def v6_networks() -> st.SearchStrategy[ipaddress.IPv6Network]:
    return st.builds(
        lambda top, rest, plen: ipaddress.IPv6Network(((top << 124) | rest, plen), strict=False),
        st.integers(0, 3),
        st.integers(0, (1 << 124) - 1),
        st.sampled_from([0, 1, 4, 8, 16, 32, 48, 56, 64, 96, 112, 120, 127, 128]),
    )


def v4_addresses() -> st.SearchStrategy[ipaddress.IPv4Address]:
    return st.builds(
        lambda top, rest: ipaddress.IPv4Address((top << 28) | rest), st.integers(0, 3), st.integers(0, (1 << 28) - 1)
    )


def v6_addresses() -> st.SearchStrategy[ipaddress.IPv6Address]:
    return st.builds(
        lambda top, rest: ipaddress.IPv6Address((top << 124) | rest), st.integers(0, 3), st.integers(0, (1 << 124) - 1)
    )


def brute_lookup(entries: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]], address) -> int | None:
    best: tuple[int, int] | None = None  # (prefixlen, -position): longest prefix, then first entry
    result = None
    for position, (network, value) in enumerate(entries):
        if network.version == address.version and address in network:
            rank = (network.prefixlen, -position)
            if best is None or rank > best:
                best, result = rank, value
    return result


def brute_lookup_network(entries, query) -> int | None:
    best: tuple[int, int] | None = None
    result = None
    for position, (network, value) in enumerate(entries):
        if network.version == query.version and query.subnet_of(network):
            rank = (network.prefixlen, -position)
            if best is None or rank > best:
                best, result = rank, value
    return result


NETWORKS = st.one_of(v4_networks(), v6_networks())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    networks=st.lists(NETWORKS, max_size=20),
    addresses=st.lists(st.one_of(v4_addresses(), v6_addresses()), min_size=1, max_size=10),
    probes=st.lists(NETWORKS, min_size=1, max_size=5),
)
def test_prefix_table_matches_brute_force(networks, addresses, probes) -> None:
    entries = [(network, position) for position, network in enumerate(networks)]
    t = PrefixTable(entries)
    normalised = [(normalize_network(network), value) for network, value in entries]
    for address in addresses:
        assert t.lookup(address) == brute_lookup(normalised, address)
    for network, _value in normalised:
        # Every network's own addresses find an entry at least as specific as it.
        for inside in (network.network_address, network.broadcast_address):
            assert t.lookup(inside) == brute_lookup(normalised, inside)
            assert t.lookup(inside) is not None
    for probe in probes:
        probe = normalize_network(probe)
        assert t.lookup_network(probe) == brute_lookup_network(normalised, probe)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(networks=st.lists(v4_networks(), min_size=1, max_size=10), address=v4_addresses())
def test_ipv4_mapped_lookup_matches_ipv4(networks, address) -> None:
    t = PrefixTable([(network, position) for position, network in enumerate(networks)])
    mapped = ipaddress.IPv6Address("::ffff:" + str(address))
    assert t.lookup(parse_address(str(mapped))) == t.lookup(address)
    mapped_entries = [
        (ipaddress.IPv6Network(f"::ffff:{n.network_address}/{n.prefixlen + 96}"), i) for i, n in enumerate(networks)
    ]
    assert PrefixTable(mapped_entries).lookup(address) == t.lookup(address)
