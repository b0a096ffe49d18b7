"""The policy snapshot: config and lists compiled into one immutable object.

A snapshot answers two questions on the hot path: which group is this client in (longest
prefix over every group's networks), and is this name blocked for that group (allowlist first,
then the group's lists; a list's own action overrides the group's, except that a monitor group
only ever monitors).  Building one reads files and may take seconds for large lists, so it is
done off the event loop and swapped in whole (see blockd.reload).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blockd.classify import PrefixTable, parse_address
from blockd.config import BLOCKING_ACTIONS, Config
from blockd.lists import DomainList, LineError, ListLoadError, load_list
from blockd.matcher import DomainIndex, SuffixSet

NO_GROUP = "none"  # the metrics/log label for clients in no group
_CLIENT_CACHE_LIMIT = 65536


@dataclass(frozen=True, eq=False, repr=False)
class Group:
    name: str
    action: str
    ttl: int
    sinkhole_a: bytes
    sinkhole_aaaa: bytes
    mask: int
    order: tuple[int, ...]
    list_actions: Mapping[str, str]
    allow: SuffixSet

    @property
    def blocks(self) -> bool:
        return self.action in BLOCKING_ACTIONS

    def __repr__(self) -> str:
        return f"Group({self.name!r}, action={self.action!r})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A listed name matched for a group."""

    group: Group
    list_name: str
    domain: str  # the listed name that matched
    action: str  # effective action: a blocking action, or "monitor"

    @property
    def blocks(self) -> bool:
        return self.action != "monitor"

    @property
    def ede_text(self) -> str:
        return f"blocked by blockd: {self.domain} on list {self.list_name}"


class PolicyError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class Policy:
    def __init__(self, config: Config, lists: Mapping[str, DomainList]):
        self.config = config
        self.lists = dict(lists)
        ordered = list(self.lists.values())
        self.index = DomainIndex(ordered)
        self.groups: dict[str, Group] = {}
        for group_config in config.groups.values():
            names = [n for n in group_config.lists if n in self.lists]
            list_actions = {}
            for name in names:
                override = config.lists[name].action
                if group_config.action != "monitor" and override is not None:
                    list_actions[name] = override
                else:
                    list_actions[name] = group_config.action
            self.groups[group_config.name] = Group(
                name=group_config.name,
                action=group_config.action,
                ttl=group_config.ttl,
                sinkhole_a=group_config.sinkhole_ipv4.packed,
                sinkhole_aaaa=group_config.sinkhole_ipv6.packed,
                mask=self.index.mask_for(names),
                order=tuple(self.index.list_names.index(n) for n in names),
                list_actions=list_actions,
                allow=SuffixSet(set(group_config.allow)),
            )
        self._groups_by_network: PrefixTable[Group] = PrefixTable(
            (network, self.groups[g.name]) for g in config.groups.values() for network in g.networks
        )
        self._allowed: PrefixTable[bool] = PrefixTable((network, True) for network in config.server.allow)
        self._clients: dict[str, tuple[bool, Group | None]] = {}

    def client(self, ip: str) -> tuple[bool, Group | None]:
        """(may this client query at all, its group or None).  Cached per address."""
        cached = self._clients.get(ip)
        if cached is not None:
            return cached
        address = parse_address(ip)
        result = (bool(self._allowed.lookup(address)), self._groups_by_network.lookup(address))
        if len(self._clients) >= _CLIENT_CACHE_LIMIT:
            self._clients.clear()
        self._clients[ip] = result
        return result

    def group_for(self, ip: str) -> Group | None:
        return self.client(ip)[1]

    def check(self, group: Group, key: str) -> Verdict | None:
        """The verdict for a query name in a group, or None when the name is not listed."""
        if not group.mask:
            return None
        match = self.index.lookup(key, group.mask, group.order)
        if match is None or group.allow.contains(key):
            return None
        return Verdict(group, match.list_name, match.domain, group.list_actions[match.list_name])


def load_lists(config: Config, previous: Policy | None = None) -> tuple[dict[str, DomainList], list[str]]:
    """Load every configured list, returning the good ones and every error (file:line).

    With previous (the serving policy), files that have not changed are not parsed again.
    """
    lists: dict[str, DomainList] = {}
    errors: list[str] = []
    old_lists = previous.lists if previous is not None else {}
    for list_config in config.lists.values():
        try:
            lists[list_config.name] = load_list(
                list_config.name, list_config.path, previous=old_lists.get(list_config.name)
            )
        except ListLoadError as exc:
            errors.extend(str(e) for e in exc.errors)
    return lists, errors


def shrink_errors(config: Config, lists: Mapping[str, DomainList], previous: Policy) -> list[str]:
    """Refuse a list that came back empty or less than half its serving size (a truncated copy,
    a half-written file) unless the list sets allow_shrink = true."""
    errors = []
    for name, new in lists.items():
        old = previous.lists.get(name)
        if old is None or config.lists[name].allow_shrink or not old.domains:
            continue
        if len(new.domains) == 0 or len(new.domains) * 2 < len(old.domains):
            errors.append(
                f"{new.path}: list {name!r} shrank from {len(old.domains)} to {len(new.domains)} entries; "
                f"refusing it (set lists.{name}.allow_shrink = true if this is intended)"
            )
    return errors


def build_policy(config: Config, previous: Policy | None = None) -> Policy:
    """Load lists and compile the snapshot; PolicyError lists every problem.

    previous: the serving policy when reloading (enables the shrink guard and list reuse).
    """
    lists, errors = load_lists(config, previous)
    if previous is not None:
        errors.extend(shrink_errors(config, lists, previous))
    if errors:
        raise PolicyError(errors)
    return Policy(config, lists)


__all__ = ["NO_GROUP", "Group", "LineError", "Policy", "PolicyError", "Verdict", "build_policy", "load_lists"]
