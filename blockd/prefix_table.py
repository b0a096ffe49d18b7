"""Longest-prefix match of client addresses to named groups (IPv4 and IPv6).

IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, as a dual-stack socket reports IPv4 clients) are
matched as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress:
    """Parse a client address, unwrapping IPv4-mapped IPv6 and dropping a zone (%eth0)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_network(network: IPNetwork) -> IPNetwork:
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((int(mapped), network.prefixlen - 96))
    return network


class PrefixTable(Generic[T]):
    """Maps networks to values; lookup returns the value of the most specific match."""

    def __init__(self, entries: Iterable[tuple[IPNetwork, T]]):
        # One dict per prefix length, probed from longest to shortest.
        by_version: dict[int, dict[int, dict[int, T]]] = {4: {}, 6: {}}
        for network, value in entries:
            network = normalize_network(network)
            table = by_version[network.version].setdefault(network.prefixlen, {})
            table.setdefault(int(network.network_address), value)
        self._tables: dict[int, list[tuple[int, int, dict[int, T]]]] = {}
        for version, tables in by_version.items():
            bits = 32 if version == 4 else 128
            full = (1 << bits) - 1
            self._tables[version] = [
                (plen, full ^ ((1 << (bits - plen)) - 1), tables[plen]) for plen in sorted(tables, reverse=True)
            ]

    def lookup(self, address: IPAddress) -> T | None:
        value = int(address)
        for _plen, netmask, table in self._tables[address.version]:
            hit = table.get(value & netmask)
            if hit is not None:
                return hit
        return None

    def lookup_network(self, network: IPNetwork) -> T | None:
        """Most specific entry that contains the whole network (for ECS prefixes)."""
        network = normalize_network(network)
        value = int(network.network_address)
        for plen, netmask, table in self._tables[network.version]:
            if plen > network.prefixlen:
                continue
            hit = table.get(value & netmask)
            if hit is not None:
                return hit
        return None
