"""Which config keys a reload applies, and which take a restart: one table.

Lists, groups, server.allow, server.trusted_forwarders, egress.prefixes and every other key
that the policy snapshot holds reload with it (blockd.policy); they are not listed here.  The
keys below live in objects built at start.  A `live` key is applied on reload by the daemon's
applier of the same name (the daemon checks at start that it has one for each, and no other);
a restart key is bound to a socket, a file or a service, so a reload that changes it logs that
it needs a restart and keeps the running value.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blockd.config import Config


@dataclass(frozen=True)
class Setting:
    key: str  # as the operator writes it
    read: Callable[[Config], object]
    live: bool  # applied on reload (else: needs a restart)


def _interface_selectors(config: Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    return {g.name: (g.interfaces, g.vlans) for g in config.groups.values() if g.interfaces or g.vlans}


def _transferred_lists(config: Config) -> dict[str, tuple[object, ...]]:
    # A transfer service is built per zone at start (its content reloads: it is in the snapshot).
    return {lst.name: (lst.zone, lst.primaries, lst.tsig) for lst in config.lists.values() if lst.zone is not None}


def _downloaded_lists(config: Config) -> dict[str, tuple[object, ...]]:
    # A download service is built per URL at start (the copy's content reloads; max_bytes,
    # max_line_bytes, allow_shrink and sha256 are read live).
    return {
        lst.name: (lst.url, lst.refresh, lst.ca_file, lst.proxy) for lst in config.lists.values() if lst.url is not None
    }


SETTINGS: tuple[Setting, ...] = (
    Setting("upstream.servers", lambda c: c.upstream.servers, live=True),
    Setting("upstream.timeout", lambda c: c.upstream.timeout, live=True),
    Setting("upstream.forward_ecs", lambda c: c.upstream.forward_ecs, live=True),
    Setting("upstream.strategy", lambda c: c.upstream.strategy, live=True),
    Setting("cache.size", lambda c: c.cache.size, live=True),
    Setting("cache.min_ttl", lambda c: c.cache.min_ttl, live=True),
    Setting("cache.max_ttl", lambda c: c.cache.max_ttl, live=True),
    Setting("cache.max_bytes", lambda c: c.cache.max_bytes, live=True),
    Setting("cache.serve_stale", lambda c: c.cache.serve_stale, live=True),
    Setting("cache.stale_max", lambda c: c.cache.stale_max, live=True),
    Setting("cache.stale_ttl", lambda c: c.cache.stale_ttl, live=True),
    Setting("server.tcp_idle_timeout", lambda c: c.server.tcp_idle_timeout, live=True),
    Setting("server.tcp_max_connections", lambda c: c.server.tcp_max_connections, live=True),
    Setting("server.listen", lambda c: c.server.listen, live=False),
    Setting("server.nsid/version/identity", lambda c: (c.server.nsid, c.server.version, c.server.identity), live=False),
    Setting("server.pidfile", lambda c: c.server.pidfile, live=False),
    Setting("server.user/group", lambda c: (c.server.user, c.server.group), live=False),  # dropped to at start
    Setting("metrics.listen", lambda c: c.metrics.listen, live=False),
    Setting("log.queries", lambda c: c.log.queries, live=False),
    Setting("log.path", lambda c: c.log.path, live=False),
    Setting("log.client_ip", lambda c: c.log.client_ip, live=False),
    Setting("dnstap", lambda c: c.dnstap, live=False),
    Setting("limits", lambda c: c.limits, live=False),
    Setting("publish", lambda c: c.publish, live=False),  # the zones' content follows the policy
    Setting("groups.*.interfaces/vlans", _interface_selectors, live=False),
    Setting("server.state_dir", lambda c: c.server.state_dir, live=False),
    Setting("lists.*.zone/primaries/tsig", _transferred_lists, live=False),
    Setting("lists.*.url/refresh/ca_file/proxy", _downloaded_lists, live=False),
    Setting("egress.enabled", lambda c: c.egress.enabled, live=False),
    Setting("egress.table", lambda c: c.egress.table, live=False),
    Setting("egress.rule_priority", lambda c: c.egress.rule_priority, live=False),
    Setting("egress.route_protocol", lambda c: c.egress.route_protocol, live=False),
    Setting("egress.on_exit", lambda c: c.egress.on_exit, live=False),
    Setting("egress.learn", lambda c: c.egress.learn, live=False),
    Setting("egress.learn_min_ttl", lambda c: c.egress.learn_min_ttl, live=False),
    Setting("egress.learn_max", lambda c: c.egress.learn_max, live=False),
    Setting("egress.never", lambda c: c.egress.never, live=False),
    Setting("egress.reconcile_interval", lambda c: c.egress.reconcile_interval, live=False),
)

LIVE_KEYS = frozenset(s.key for s in SETTINGS if s.live)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between the running and the reloaded config."""
    return [s.key for s in SETTINGS if not s.live and s.read(old) != s.read(new)]


def live_values(config: Config) -> list[tuple[str, object]]:
    """Every live key with its value in config, in table order."""
    return [(s.key, s.read(config)) for s in SETTINGS if s.live]
