"""The policy zones blockd publishes ([publish.zones]), rendered from a policy snapshot.

Pure: no sockets, no clock.  A zone says, in RPZ, what blockd itself answers for one group (or
for a set of lists): every trigger's rule is the verdict of blockd.policy's own decide() for that
name, so the published zone and blockd's answers cannot disagree on any name the zone lists.

Triggers (owners relative to the zone's origin):
  name, *.name      for every subtree entry of the group's lists (the built-in escape-hatch lists
                    included); "name" only for exact entries, "*.name" only for RPZ "*.name"
  name, *.name      for every allow entry of the group and every "@@||name^" exception: their
                    verdict is "not blocked", published as rpz-passthru so a wider trigger above
                    them does not catch them on the resolver
  <prefix>.rpz-ip   for block_answer_prefixes and the rpz-ip triggers of RPZ lists; a network of
                    egress.never inside one is published as passthru (blockd never blocks it)
Each gets the RPZ form of blockd's verdict: nxdomain "CNAME .", nodata "CNAME *.", passthru and
monitor "CNAME rpz-passthru." (RPZ's match-and-log), drop "CNAME rpz-drop.", tcp-only
"CNAME rpz-tcp-only.", sinkhole the group's sinkhole A and AAAA as local data, local-data the
RPZ list's own records.  "*.name" is decided as blockd decides a name strictly below `name` that
no entry names (the probe label PROBE cannot occur in a list), so first-list-wins and exact
entries come out right even where RPZ's most-specific-trigger-wins order differs.

Not expressible, counted in ZoneContent.unpublishable (and logged): wildcards inside a label
("p16-*.ibyteimg.com": RPZ has none), names too long to sit under the origin, and names whose
last label is one of RPZ's own trigger labels (a resolver would read them as IP or NS triggers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from blockd.config import PublishZoneConfig
from blockd.lists import DomainList
from blockd.matcher import BELOW, EXACT, SUBTREE, Match
from blockd.policy import AnswerTrigger, Group, Policy, Verdict, effective_action
from blockd.prefix_table import normalize_network
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
    Soa,
    ip_trigger_owner,
    rule_wire,
)

PROBE = "\x00"  # names are keys (blockd.names): a raw NUL is always escaped there, so no entry has it
DEFAULT_TTL = 300  # a zone of lists, without ttl
TYPE_A = 1
TYPE_AAAA = 28
TYPE_CNAME = 5
_SINGLETONS = {
    "nxdomain": NXDOMAIN_RULE,
    "nodata": NODATA_RULE,
    "passthru": PASSTHRU_RULE,
    "monitor": PASSTHRU_RULE,
    "drop": DROP_RULE,
    "tcp-only": TCP_ONLY_RULE,
}
_TRIGGER_LABELS = ("rpz-ip", "rpz-nsip", "rpz-client-ip", "rpz-nsdname")
_TRIGGER_ENDINGS = tuple(f".{label}" for label in _TRIGGER_LABELS) + _TRIGGER_LABELS
_MAX_NAME_TEXT = 253  # presentation length of the longest name (255 octets on the wire)

# (owner relative to the origin, type, TTL, RDATA): one record of a published zone.
Record = tuple[str, int, int, bytes]


@dataclass(frozen=True)
class ZoneContent:
    """One rendering of a published zone (the SOA's serial is the journal's business)."""

    zone: PolicyZone
    unpublishable: int = 0  # entries RPZ cannot say (see the module docstring)
    sample: tuple[str, ...] = ()  # the first few of them, for the log


def soa_for(origin: str, ttl: int, serial: int) -> Soa:
    """The zone's SOA: NOTIFY carries changes; refresh and retry catch a lost NOTIFY within
    minutes; expire is long, so a secondary keeps enforcing the ban through a week of outage."""
    return Soa(ttl, "localhost", "hostmaster.invalid", serial, 300, 60, 604800, ttl)


def render(policy: Policy, config: PublishZoneConfig) -> ZoneContent:
    """The zone `config` names, from this snapshot (runs in a worker thread for big lists)."""
    if config.group is not None:
        group = policy.groups[config.group]
        ttl = config.ttl if config.ttl is not None else group.ttl
    else:
        group = policy.zone_group(config)
        ttl = config.ttl if config.ttl is not None else DEFAULT_TTL
    # Not `lists.get(name) or ...`: an empty list (or one of rpz-ip triggers only) is falsy.
    lists = [policy.lists[n] if n in policy.lists else policy.builtin_lists[n] for n in group.list_actions]
    builder = _Builder(policy, group, config.name, ttl)
    builder.shortcut = _Shortcut(policy, group, lists, builder.rule)
    for listed in lists:
        builder.subtrees(listed.domains)
        builder.exact_names(listed.exact)
        builder.below_names(listed.below)
        builder.subtrees(listed.exceptions)
        builder.not_expressible(listed.wildcards)
    builder.subtrees(group.allow.keys)
    builder.addresses(_answer_triggers(policy, config, group), policy.config.egress.never)
    zone = PolicyZone(config.name, soa_for(config.name, ttl, 0), builder.exact, builder.below, builder.ip)
    return ZoneContent(zone, builder.unpublishable, tuple(builder.sample))


class _Shortcut:
    """Policy.decide() for the common entry in a few dict probes (a million-name list renders in
    seconds, not the 17 s decide() takes).

    An entry is simple when nothing above it can change its verdict: no ancestor is an entry of
    the group's lists, an allow entry, an exception or a wildcard suffix, and the name itself is
    neither allowed nor excepted.  Its verdict then comes from the lists holding the name itself,
    the first in the group's order, as DomainIndex.lookup orders them (exact before subtree for
    the name; below-only before subtree for the names under it); for a list without RPZ rules
    that verdict is the same for every entry, so it is built once.  Anything else returns None
    and takes decide() itself.
    """

    def __init__(
        self, policy: Policy, group: Group, lists: list[DomainList], to_rule: Callable[[Verdict | None], Rule]
    ):
        self.to_rule = to_rule
        self.policy = policy
        self.group = group
        self.masks_at = policy.index.masks_at
        self.names = policy.index.list_names
        self.wild = policy.index.wildcard_suffixes
        self.excepted = set(group.allow.keys)
        for listed in lists:
            self.excepted.update(listed.exceptions)
        self.interesting = set(self.excepted) | self.wild
        for listed in lists:
            self.interesting.update(listed.domains, listed.exact, listed.below)
        self.mask = group.mask
        self.order = group.order
        self.per_entry = 0  # lists whose rules differ per entry (RPZ): no memo
        for index in group.order:
            source = policy.lists.get(self.names[index])
            if source is not None and source.zone is not None:
                self.per_entry |= 1 << index
        self.clean: dict[str, bool] = {}
        self.rules: dict[tuple[int, str], Rule] = {}

    def clean_above(self, key: str) -> bool:
        dot = key.find(".")
        if dot < 0:
            return True
        parent = key[dot + 1 :]
        known = self.clean.get(parent)
        if known is None:
            known = self.clean[parent] = parent not in self.interesting and self.clean_above(parent)
        return known

    def exact(self, key: str) -> Rule | None:
        """The rule for the name key; None: not simple (ask decide())."""
        if key in self.excepted or not self.clean_above(key):
            return None
        subtree, exact, _ = self.masks_at(key)
        exact &= self.mask
        either = (subtree & self.mask) | exact
        for index in self.order:
            if either >> index & 1:
                return self._rule(index, key, EXACT if exact >> index & 1 else SUBTREE)
        return None  # listed nowhere in the group (cannot happen for an entry of its lists): decide()

    def below(self, key: str) -> Rule | None:
        """The rule for the names strictly below key; None: not simple (ask decide())."""
        if key in self.excepted or key in self.wild or not self.clean_above(key):
            return None
        subtree, _, below = self.masks_at(key)
        below &= self.mask
        either = (subtree & self.mask) | below
        for index in self.order:
            if either >> index & 1:
                return self._rule(index, key, BELOW if below >> index & 1 else SUBTREE)
        return None

    def _rule(self, index: int, key: str, kind: str) -> Rule:
        if self.per_entry >> index & 1:
            return self.to_rule(self.policy.verdict_of(self.group, Match(self.names[index], key, kind)))
        rule = self.rules.get((index, kind))
        if rule is None:
            verdict = self.policy.verdict_of(self.group, Match(self.names[index], key, kind))
            rule = self.rules[(index, kind)] = self.to_rule(verdict)
        return rule


class _Builder:
    def __init__(self, policy: Policy, group: Group, origin: str, ttl: int):
        self.policy = policy
        self.group = group
        self.shortcut: _Shortcut
        self.room = _MAX_NAME_TEXT - len(origin) - 1  # for the owner's text before ".origin"
        self.exact: dict[str, Rule] = {}
        self.below: dict[str, Rule] = {}
        self.ip: dict[IPNetwork, tuple[str, Rule]] = {}
        self.unpublishable = 0
        self.sample: list[str] = []
        self.sinkhole = Rule(
            LOCAL_DATA, (LocalRecord(TYPE_A, ttl, group.sinkhole_a), LocalRecord(TYPE_AAAA, ttl, group.sinkhole_aaaa))
        )

    def subtrees(self, keys: Iterable[str]) -> None:
        exact, below, room, shortcut = self.exact, self.below, self.room - 2, self.shortcut
        for key in keys:  # the hot loop of a big list: _exact and _below inlined
            if (len(key) > room or key.endswith(_TRIGGER_ENDINGS)) and not self._fits(key, 2):
                continue
            if key not in exact:
                exact[key] = shortcut.exact(key) or self._decided(key)
            if key not in below:
                below[key] = shortcut.below(key) or self._decided(f"{PROBE}.{key}")

    def exact_names(self, keys: Iterable[str]) -> None:
        for key in keys:
            if self._fits(key, 0):
                self._exact(key)

    def below_names(self, keys: Iterable[str]) -> None:
        for key in keys:
            if self._fits(key, 2):
                self._below(key)

    def not_expressible(self, entries: Iterable[str]) -> None:
        for entry in entries:
            self._skip(entry)

    def _fits(self, key: str, extra: int) -> bool:
        if len(key) + extra > self.room or key.rpartition(".")[2] in _TRIGGER_LABELS:
            self._skip(key)
            return False
        return True

    def _skip(self, entry: str) -> None:
        self.unpublishable += 1
        if len(self.sample) < 5:
            self.sample.append(entry)

    def _exact(self, key: str) -> None:
        if key not in self.exact:
            self.exact[key] = self.shortcut.exact(key) or self._decided(key)

    def _below(self, key: str) -> None:
        if key not in self.below:
            self.below[key] = self.shortcut.below(key) or self._decided(f"{PROBE}.{key}")

    def _decided(self, name: str) -> Rule:
        return self.rule(self.policy.decide(self.group, name))

    def rule(self, verdict: Verdict | None) -> Rule:
        if verdict is None:
            return PASSTHRU_RULE  # an allow entry or exception: on the resolver, it must beat wider triggers
        return self._action_rule(verdict.action, verdict.rule)

    def _action_rule(self, action: str, rule: Rule | None) -> Rule:
        if action == "sinkhole":
            return self.sinkhole
        if action == LOCAL_DATA and rule is not None:
            return rule
        return _SINGLETONS.get(action, NXDOMAIN_RULE)  # "refused" is refused by the config check

    def addresses(self, triggers: list[tuple[IPNetwork, AnswerTrigger]], never: Iterable[IPNetwork]) -> None:
        never = tuple(never)
        for network, trigger in triggers:
            if network in self.ip or any(network.subnet_of(n) for n in never if n.version == network.version):  # type: ignore[arg-type]
                continue  # blockd never blocks an address in egress.never
            list_action = self.group.list_actions.get(trigger.source, self.group.action)
            action = effective_action(list_action, trigger.rule, self.group.action)
            self.ip[network] = (ip_trigger_owner(network), self._action_rule(action, trigger.rule))
        for network in never:
            inside = any(
                network.version == n.version and network != n and network.subnet_of(n)  # type: ignore[arg-type]
                for n in list(self.ip)
            )
            if inside and network not in self.ip:
                self.ip[network] = (ip_trigger_owner(network), PASSTHRU_RULE)


def _answer_triggers(
    policy: Policy, config: PublishZoneConfig, group: Group
) -> list[tuple[IPNetwork, AnswerTrigger]]:
    """The group's answer-address triggers in blockd's order: prefix files, then RPZ rpz-ip."""
    triggers: list[tuple[IPNetwork, AnswerTrigger]] = []
    if config.group is not None:
        for path in policy.config.groups[config.group].block_answer_prefixes:
            triggers += [(_normal(n), AnswerTrigger(path.stem)) for n in policy.prefix_sets.get(path, ())]
    for name in group.list_actions:
        listed = policy.lists.get(name)
        if listed is not None and listed.zone is not None:
            triggers += [(n, AnswerTrigger(name, rule)) for n, (_, rule) in listed.zone.ip.items()]
    return triggers


def _normal(network: IPNetwork) -> IPNetwork:
    # As the policy's PrefixTable reads it: an IPv4-mapped prefix is the IPv4 network it blocks.
    return normalize_network(ipaddress.ip_network(network, strict=False))


# --- records and differences -------------------------------------------------------------------


def rule_records(owner: str, rule: Rule, ttl: int) -> Iterator[Record]:
    if rule.action == LOCAL_DATA:
        for record in rule.records:
            yield owner, record.rtype, record.ttl, record.rdata
    else:
        yield owner, TYPE_CNAME, ttl, rule_wire(rule.action)


def records(zone: PolicyZone) -> Iterator[Record]:
    """Every policy record of the zone (not its SOA or NS), owners relative to the origin."""
    ttl = zone.soa.ttl
    for key, rule in zone.exact.items():
        yield from rule_records(key, rule, ttl)
    for key, rule in zone.below.items():
        yield from rule_records(f"*.{key}", rule, ttl)
    for owner, rule in zone.ip.values():
        yield from rule_records(owner, rule, ttl)


def difference(old: PolicyZone, new: PolicyZone) -> tuple[list[Record], list[Record]]:
    """(records removed, records added) from old to new (an IXFR's two halves)."""
    removed: list[Record] = []
    added: list[Record] = []
    old_ttl, new_ttl = old.soa.ttl, new.soa.ttl
    for prefix, before, after in (("", old.exact, new.exact), ("*.", old.below, new.below)):
        for key, rule in after.items():
            was = before.get(key)
            if was is rule and old_ttl == new_ttl:
                continue
            if was is None:
                added.extend(rule_records(prefix + key, rule, new_ttl))
            elif was != rule or old_ttl != new_ttl:
                removed.extend(rule_records(prefix + key, was, old_ttl))
                added.extend(rule_records(prefix + key, rule, new_ttl))
        for key in before.keys() - after.keys():
            removed.extend(rule_records(prefix + key, before[key], old_ttl))
    for network, (owner, rule) in new.ip.items():
        was_entry = old.ip.get(network)
        if was_entry is None:
            added.extend(rule_records(owner, rule, new_ttl))
        elif was_entry[1] != rule or old_ttl != new_ttl:
            removed.extend(rule_records(owner, was_entry[1], old_ttl))
            added.extend(rule_records(owner, rule, new_ttl))
    for network in old.ip.keys() - new.ip.keys():
        owner, rule = old.ip[network]
        removed.extend(rule_records(owner, rule, old_ttl))
    return removed, added
