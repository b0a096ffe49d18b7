"""Classify the client: may it query, which group is it in, is it a trusted forwarder.

A client belongs to the group whose network matches its address most specifically (literal
networks and the connected subnets of the group's interfaces/VLANs alike).  A trusted
forwarder (server.trusted_forwarders) may speak for its own client with EDNS Client Subnet
(RFC 7871): the ECS prefix then picks the group, when a group network contains all of it.  ECS
from anyone else is ignored, so a device cannot escape its group by claiming another subnet.
Config: server.allow, server.trusted_forwarders, groups.*.networks (interfaces/vlans through
Policy.with_interface_networks).  Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

from blockd import wire
from blockd.prefix_table import IPNetwork, PrefixTable, parse_address

G = TypeVar("G")

_MEMO_LIMIT = 65536  # distinct client addresses remembered; cleared whole when full


class Client(NamedTuple, Generic[G]):
    allowed: bool  # server.allow: others get REFUSED
    group: G | None  # None: in no group (forwarded untouched)
    trusted: bool  # a trusted forwarder: its ECS prefix may pick the group


class ClientClassifier(Generic[G]):
    def __init__(
        self, allowed: Iterable[IPNetwork], trusted: Iterable[IPNetwork], groups: Iterable[tuple[IPNetwork, G]]
    ):
        self._allowed: PrefixTable[bool] = PrefixTable((network, True) for network in allowed)
        self._trusted: PrefixTable[bool] = PrefixTable((network, True) for network in trusted)
        self._groups: PrefixTable[G] = PrefixTable(groups)
        self._memo: dict[str, Client[G]] = {}

    def with_groups(self, groups: Iterable[tuple[IPNetwork, G]]) -> ClientClassifier[G]:
        """The same allow and trust tables with other group networks (interface subnets changed)."""
        clone: ClientClassifier[G] = ClientClassifier((), (), groups)
        clone._allowed, clone._trusted = self._allowed, self._trusted
        return clone

    def classify(self, ip: str) -> Client[G]:
        """The client at this source address (remembered: the same few addresses ask again)."""
        known = self._memo.get(ip)
        if known is not None:
            return known
        address = parse_address(ip)
        client = Client(
            self._allowed.lookup(address) is not None,
            self._groups.lookup(address),
            self._trusted.lookup(address) is not None,
        )
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[ip] = client
        return client

    def group_for_network(self, network: IPNetwork) -> G | None:
        """The group of an ECS prefix: the most specific group network containing all of it."""
        return self._groups.lookup_network(network)

    def group_of(self, client: Client[G], query: wire.Query) -> G | None:
        """The group a query is answered for: the client's, or a trusted forwarder's ECS prefix's."""
        if client.trusted and query.options:
            option = wire.ecs_option(query)
            subnet = wire.parse_ecs(option) if option is not None else None
            if subnet is not None:
                return self.group_for_network(subnet)
        return client.group
