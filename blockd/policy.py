"""The policy snapshot: config and lists compiled into one immutable object.

A snapshot answers, on the hot path:
- which group is this client in, and may it query at all (its `classifier`, blockd.classify,
  built from every group's networks including the connected subnets of its interfaces/VLANs);
- is this name blocked for that group: allowlist first, then the built-in escape-hatch lists,
  then the group's lists in order; a list's own action overrides the group's, except that a
  monitor group only ever monitors;
- is this upstream answer blocked for that group: a listed name anywhere in its CNAME/DNAME
  chain (CNAME cloaking), or an address in the group's block_answer_prefixes (unless it lies
  in egress.never);
- should egress learn this answer's addresses: some name of it is blocked for a blocking group.
It is the one owner of the [egress] prefixes (loaded when egress is enabled) and of the
interface subnets, so they reload and change with it.
Building one reads files and may take seconds for large lists, so it is done off the event
loop and swapped in whole (see blockd.reload).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockd.classify import ClientClassifier
from blockd.config import BLOCKING_ACTIONS, Config, GroupConfig, PublishZoneConfig
from blockd.egress import PrefixLoadError, load_prefix_files
from blockd.lists import DomainList, LineError, ListLoadError
from blockd.matcher import EXACT, DomainIndex, Match, SuffixSet
from blockd.prefix_table import IPAddress, IPNetwork, PrefixTable
from blockd.upstream_answer import AnswerInfo

if TYPE_CHECKING:
    from blockd.rpz import PolicyZone, Rule

NO_GROUP = "none"  # the metrics/log label for clients in no group
_VERDICT_MEMO_LIMIT = 65536

# Escape hatches to encrypted DNS, closed by default for blocking groups (each switchable).
# The canary and Private Relay names must get a negative answer: a sinkhole address is a
# positive answer, which Firefox reads as "DoH allowed".  DDR (RFC 9462) discovery gets NODATA
# so clients cannot find and upgrade to an encrypted resolver.
BUILTIN = {
    "firefox-canary": ("block_firefox_canary", "nxdomain", ("use-application-dns.net",)),
    "icloud-private-relay": ("block_private_relay", "nxdomain", ("mask.icloud.com", "mask-h2.icloud.com")),
    "ddr": ("block_ddr", "nodata", ("resolver.arpa",)),
}


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
    answer_prefixes: PrefixTable[AnswerTrigger] | None  # answer address -> what lists it

    @property
    def blocks(self) -> bool:
        return self.action in BLOCKING_ACTIONS

    def __repr__(self) -> str:
        return f"Group({self.name!r}, action={self.action!r})"


@dataclass(frozen=True, slots=True)
class AnswerTrigger:
    """An answer-address prefix: a block_answer_prefixes file, or an RPZ rpz-ip trigger."""

    source: str  # the prefix file's stem, or the RPZ list's name
    rule: Rule | None = None  # an rpz-ip trigger's own rule


# Actions that let the query through: counted and logged, then forwarded.
LETS_THROUGH = frozenset({"monitor", "passthru"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """A listed name (or a blocked answer address) matched for a group."""

    group: Group
    list_name: str
    domain: str  # the entry that matched ("*.name" for an RPZ wildcard), or the answer address
    action: str  # effective action: sinkhole/nxdomain/nodata/refused, an RPZ action, or monitor
    via: str = "question"  # question | cname | address
    rule: Rule | None = None  # for local-data: the records to answer with
    source: str = "list"  # list | rpz: whether list_name is a Response Policy Zone (dnstap's Policy.type)

    @property
    def blocks(self) -> bool:
        """Whether the answer is blockd's own (tcp-only blocks over UDP only: see blocks_on)."""
        return self.action not in LETS_THROUGH

    def blocks_on(self, transport: str) -> bool:
        return self.action not in LETS_THROUGH and not (self.action == "tcp-only" and transport == "tcp")

    @property
    def ede_text(self) -> str:
        reason = "" if self.via == "question" else f" (in the {'CNAME chain' if self.via == 'cname' else 'answer'})"
        return f"blocked by blockd: {self.domain} on list {self.list_name}{reason}"


# The DNSSEC infrastructure types: a blocked name's DS, DNSKEY, NSEC, NSEC3 and NSEC3PARAM are
# forwarded and answered from upstream unchanged, so a validating resolver in front of blockd can
# prove an unsigned zone insecure and accept the sinkhole answer (blockd's own NODATA, with no
# NSEC proof, would make every block SERVFAIL there).  They carry no addresses: nothing of the
# blocked service gets through.
DNSSEC_INFRASTRUCTURE_TYPES = frozenset({43, 47, 48, 50, 51})


class PolicyError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class Policy:
    def __init__(
        self,
        config: Config,
        lists: Mapping[str, DomainList],
        prefix_sets: Mapping[Path, tuple[IPNetwork, ...]] | None = None,
        egress_prefixes: tuple[IPNetwork, ...] = (),
    ):
        self.config = config
        self.egress_prefixes = egress_prefixes  # [egress] prefixes: prohibit routes in blockd's table
        self.lists = dict(lists)
        builtins = [DomainList(name, "<built-in>", frozenset(names)) for name, (_, _, names) in BUILTIN.items()]
        self.index = DomainIndex(builtins + list(self.lists.values()))
        prefix_sets = prefix_sets or {}
        never = PrefixTable((network, True) for network in config.egress.never) if config.egress.never else None
        self.never = never
        self.prefix_sets = prefix_sets
        self.builtin_lists = {lst.name: lst for lst in builtins}
        self.groups: dict[str, Group] = {}
        for group_config in config.groups.values():
            names = [n for n in group_config.lists if n in self.lists]
            list_actions = {}
            if group_config.action in BLOCKING_ACTIONS:
                for builtin, (switch, action, _) in BUILTIN.items():
                    if getattr(group_config, switch):
                        list_actions[builtin] = action
            for name in names:
                list_actions[name] = self._list_action(group_config.action, config.lists[name].action, name)
            answer_prefixes = self._answer_prefixes(group_config.block_answer_prefixes, names, prefix_sets)
            self.groups[group_config.name] = self._group(group_config, list_actions, answer_prefixes)
        self._blocking_groups = tuple(group for group in self.groups.values() if group.blocks and group.mask)
        self.interface_networks: Mapping[str, tuple[IPNetwork, ...]] = {}
        self._verdicts: dict[tuple[str, Match], Verdict] = {}
        self.classifier: ClientClassifier[Group] = ClientClassifier(
            config.server.allow, config.server.trusted_forwarders, self._group_networks()
        )

    def _group(
        self,
        group_config: GroupConfig,
        list_actions: dict[str, str],
        answer_prefixes: PrefixTable[AnswerTrigger] | None,
    ) -> Group:
        return Group(
            name=group_config.name,
            action=group_config.action,
            ttl=group_config.ttl,
            sinkhole_a=group_config.sinkhole_ipv4.packed,
            sinkhole_aaaa=group_config.sinkhole_ipv6.packed,
            mask=self.index.mask_for(list_actions),
            order=tuple(self.index.list_names.index(n) for n in list_actions),
            list_actions=list_actions,
            allow=SuffixSet(set(group_config.allow)),
            answer_prefixes=answer_prefixes,
        )

    def zone_group(self, zone: PublishZoneConfig) -> Group:
        """The policy of a published zone that names lists rather than a group: those lists
        with the zone's action (a list's own action wins, as in a group), for no client."""
        names = [n for n in zone.lists if n in self.lists]
        settings = GroupConfig(name=f"publish:{zone.name}", action=zone.action)
        list_actions = {name: self._list_action(zone.action, self.config.lists[name].action, name) for name in names}
        return self._group(settings, list_actions, self._answer_prefixes((), names, {}))

    def _list_action(self, group_action: str, list_action: str | None, name: str) -> str:
        """What a list does for a group: a monitor group only monitors; else the list's own action
        (for an RPZ list "zone" by default: each trigger's), else the group's."""
        if group_action == "monitor":
            return "monitor"
        if list_action is not None:
            return list_action
        return "zone" if self.lists[name].rpz else group_action

    def _answer_prefixes(
        self, files: Iterable[Path], names: Iterable[str], prefix_sets: Mapping[Path, tuple[IPNetwork, ...]]
    ) -> PrefixTable[AnswerTrigger] | None:
        """The group's answer-address prefixes: its prefix files, then its RPZ lists' rpz-ip triggers."""
        entries = [(network, AnswerTrigger(path.stem)) for path in files for network in prefix_sets[path]]
        for name in names:
            zone = self.lists[name].zone
            if zone is not None:
                entries += [(network, AnswerTrigger(name, rule)) for network, (_, rule) in zone.ip.items()]
        return PrefixTable(entries) if entries else None

    def _group_networks(self) -> list[tuple[IPNetwork, Group]]:
        entries = [(network, self.groups[g.name]) for g in self.config.groups.values() for network in g.networks]
        entries += [
            (network, self.groups[name]) for name, networks in self.interface_networks.items() for network in networks
        ]
        return entries

    def with_interface_networks(self, networks: Mapping[str, tuple[IPNetwork, ...]]) -> Policy:
        """A copy whose groups also hold these networks (learned from interfaces/VLANs)."""
        clone = copy.copy(self)
        clone.interface_networks = {name: tuple(n) for name, n in networks.items() if name in self.groups}
        clone.classifier = self.classifier.with_groups(clone._group_networks())
        return clone

    def with_egress_prefixes(self, prefixes: tuple[IPNetwork, ...]) -> Policy:
        """A copy routing these egress prefixes (egress keeps its prefixes until a restart turns it off)."""
        clone = copy.copy(self)
        clone.egress_prefixes = prefixes
        return clone

    def group_networks(self, name: str) -> tuple[IPNetwork, ...]:
        """Every network of a group: literal ones and those learned from its interfaces."""
        literal = self.config.groups[name].networks if name in self.config.groups else ()
        return tuple(literal) + tuple(self.interface_networks.get(name, ()))

    def blocking_networks(self) -> list[IPNetwork]:
        return [n for name, group in self.groups.items() if group.blocks for n in self.group_networks(name)]

    def check(self, group: Group, key: str) -> Verdict | None:
        """The verdict for a query name in a group, or None when the name is not listed."""
        if not group.mask:
            return None
        match = self.index.lookup(key, group.mask, group.order)
        if match is None or group.allow.contains(key):
            return None
        # Verdicts are immutable: reuse them rather than build one per blocked query.
        memo_key = (group.name, match)
        verdict = self._verdicts.get(memo_key)
        if verdict is None:
            if len(self._verdicts) >= _VERDICT_MEMO_LIMIT:
                self._verdicts.clear()
            verdict = self._verdicts[memo_key] = self._verdict(group, match)
        return verdict

    def decide(self, group: Group, key: str) -> Verdict | None:
        """check() without the memo, for walks over every entry (blockd.publish_zone), which
        would only churn it; safe from a worker thread, since it changes nothing."""
        if not group.mask:
            return None
        match = self.index.lookup(key, group.mask, group.order)
        if match is None or group.allow.contains(key):
            return None
        return self._verdict(group, match)

    def verdict_of(self, group: Group, match: Match) -> Verdict:
        """The verdict a match gives in a group (what check() returns once it has the match)."""
        return self._verdict(group, match)

    def _verdict(self, group: Group, match: Match) -> Verdict:
        action = group.list_actions[match.list_name]
        rule = self._rule_of(match)
        action = effective_action(action, rule, group.action)
        listed = self.lists.get(match.list_name)
        source = "rpz" if listed is not None and listed.rpz else "list"
        rule = rule if action == "local-data" else None
        return Verdict(group, match.list_name, match.trigger, action, rule=rule, source=source)

    def _rule_of(self, match: Match) -> Rule | None:
        listed = self.lists.get(match.list_name)
        zone = listed.zone if listed is not None else None
        if zone is None:
            return None
        return (zone.exact if match.kind == EXACT else zone.below).get(match.domain)

    def check_answer(self, group: Group, info: AnswerInfo) -> Verdict | None:
        """A verdict when an upstream answer leads to a listed name or a blocked address.

        A blocking verdict anywhere in the answer wins over a monitor one (a name on a monitor
        list must not hide a CNAME to a blocked name); a monitor verdict is returned only when
        nothing blocks.
        """
        monitored: Verdict | None = None
        for name in info.names:
            found = self.check(group, name)
            if found is not None:
                verdict = Verdict(group, found.list_name, found.domain, found.action, "cname", source=found.source)
                if verdict.blocks:
                    return verdict
                monitored = monitored or verdict
        prefixes = group.answer_prefixes
        if prefixes is not None:
            for address in _chain(info.addresses, info.hint_addresses):
                trigger = prefixes.lookup(address)
                if trigger is not None and (self.never is None or self.never.lookup(address) is None):
                    list_action = group.list_actions.get(trigger.source, group.action)
                    action = effective_action(list_action, trigger.rule, group.action)
                    rule = trigger.rule if action == "local-data" else None
                    source = "rpz" if trigger.rule is not None else "list"
                    verdict = Verdict(group, trigger.source, str(address), action, "address", rule, source)
                    if verdict.blocks:
                        return verdict
                    monitored = monitored or verdict
        return monitored

    def blocks_for_any_blocking_group(self, names: Iterable[str]) -> bool:
        """Whether some name gets a blocking verdict in some blocking group, whoever asked.

        Egress learns an answer's addresses exactly then: the routes serve every blocking group
        from one table, so one group's allow exception does not keep an address out of it.
        """
        for name in names:
            for group in self._blocking_groups:
                verdict = self.check(group, name)
                if verdict is not None and verdict.blocks:
                    return True
        return False

    def never_routed(self, address: IPAddress) -> bool:
        return self.never is not None and self.never.lookup(address) is not None


def effective_action(list_action: str, rule: Rule | None, group_action: str) -> str:
    """The action of one entry: an RPZ passthru is an exception whatever the list's action; a
    list that keeps its zone's actions ("zone") takes the trigger's; a prefix file's verdict
    is the group's."""
    if rule is not None and rule.action == "passthru":
        return "passthru"
    if list_action == "zone":
        return rule.action if rule is not None else group_action
    return list_action


_DISMANTLE_CHUNK = 20_000


def dismantle(old: Policy, serving: Policy) -> None:
    """Empty a retired snapshot's big containers bit by bit (run in a worker thread).

    Freeing a million-name dict or set is one C call that holds the GIL for a few hundred
    milliseconds; on whichever thread drops the last reference, it would stall the reactor.
    Emptying them from a Python loop lets the reactor run between chunks.  Sets that the
    serving snapshot still shares (lists whose file did not change) are left alone.  Only call
    this once no query can still hold `old` (see Daemon._retire).
    """
    shared = {id(container) for lst in serving.lists.values() for container in _containers_of(lst)}
    containers: list[Any] = [old.index._masks, old.index._exact, old.index._below]
    containers += [c for lst in old.lists.values() for c in _containers_of(lst) if id(c) not in shared]
    for container in containers:
        pop = container.popitem if isinstance(container, dict) else container.pop
        while container:
            for _ in range(min(_DISMANTLE_CHUNK, len(container))):
                pop()


def _containers_of(listed: DomainList) -> list[Any]:
    """The big containers of a list: its entry set and, for RPZ, its zone's trigger dicts.

    DomainList's sets are typed read-only for their readers; the loaders build plain sets and
    dicts, and dismantle() is the one place that empties them, once nothing reads them.
    """
    containers: list[Any] = [listed.domains] if isinstance(listed.domains, set) else []
    if isinstance(listed.exact, set):
        containers.append(listed.exact)
    if listed.zone is not None:
        containers += [listed.zone.exact, listed.zone.below]
    return containers


def _chain(*groups: Iterable[IPAddress]) -> Iterable[IPAddress]:
    for group in groups:
        yield from group


def load_lists(
    config: Config, previous: Policy | None = None, transferred: Mapping[str, PolicyZone] | None = None
) -> tuple[dict[str, DomainList], list[str]]:
    """Load every configured list, returning the good ones and every error (file:line).

    With previous (the serving policy), files that have not changed are not parsed again and
    transferred zones keep their content; transferred: zones the daemon received since.
    """
    from blockd.sources import load_source  # sources imports blockd.rpz, which imports blockd.lists

    lists: dict[str, DomainList] = {}
    errors: list[str] = []
    old_lists = previous.lists if previous is not None else {}
    for list_config in config.lists.values():
        try:
            lists[list_config.name] = load_source(list_config, old_lists.get(list_config.name), transferred)
        except ListLoadError as exc:
            errors.extend(str(e) for e in exc.errors)
    return lists, errors


def load_prefix_sets(config: Config) -> tuple[dict[Path, tuple[IPNetwork, ...]], list[str]]:
    """Every prefix file the groups name (block_answer_prefixes), with every error."""
    sets: dict[Path, tuple[IPNetwork, ...]] = {}
    errors: list[str] = []
    paths = {path for group in config.groups.values() for path in group.block_answer_prefixes}
    for path in sorted(paths):
        try:
            sets[path] = load_prefix_files([path])
        except PrefixLoadError as exc:
            errors.extend(str(e) for e in exc.errors)
    return sets, errors


def load_egress_prefixes(config: Config) -> tuple[tuple[IPNetwork, ...], list[str]]:
    """The [egress] prefix files when egress is enabled (else none), with every error."""
    if not config.egress.enabled:
        return (), []
    try:
        return load_prefix_files(config.egress.prefixes), []
    except PrefixLoadError as exc:
        return (), [str(e) for e in exc.errors]


def shrink_errors(config: Config, lists: Mapping[str, DomainList], previous: Policy) -> list[str]:
    """Refuse a list that came back empty or less than half its serving size (a truncated copy,
    a half-written file) unless the list sets allow_shrink = true."""
    errors = []
    for name, new in lists.items():
        old = previous.lists.get(name)
        if old is None or config.lists[name].allow_shrink or not len(old):
            continue
        if len(new) == 0 or len(new) * 2 < len(old):
            errors.append(
                f"{new.path}: list {name!r} shrank from {len(old)} to {len(new)} entries; "
                f"refusing it (set lists.{name}.allow_shrink = true if this is intended)"
            )
    return errors


def build_policy(
    config: Config, previous: Policy | None = None, transferred: Mapping[str, PolicyZone] | None = None
) -> Policy:
    """Load lists and prefix files and compile the snapshot; PolicyError lists every problem.

    previous: the serving policy when reloading (enables the shrink guard and list reuse; the
    interface networks it learned carry over).  transferred: RPZ zones received by transfer.
    """
    lists, errors = load_lists(config, previous, transferred)
    prefix_sets, prefix_errors = load_prefix_sets(config)
    errors.extend(prefix_errors)
    egress_prefixes, egress_errors = load_egress_prefixes(config)
    errors.extend(egress_errors)
    if previous is not None:
        errors.extend(shrink_errors(config, lists, previous))
    if errors:
        raise PolicyError(errors)
    policy = Policy(config, lists, prefix_sets, egress_prefixes)
    if previous is not None and previous.interface_networks:
        policy = policy.with_interface_networks(previous.interface_networks)
    return policy


__all__ = [
    "NO_GROUP",
    "Group",
    "LineError",
    "Policy",
    "PolicyError",
    "Verdict",
    "build_policy",
    "load_egress_prefixes",
    "load_lists",
]
