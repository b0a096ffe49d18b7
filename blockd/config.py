"""The TOML configuration: parsing, validation, and the embedded default.

Every problem is collected (not just the first) and named by its key, e.g.
"blockd.toml: groups.gov.networks[1]: '10.0.0.0/33' is not a valid network".  Relative
paths are relative to the config file's directory; a path holding a NUL byte or a control
character is an error of its key (_Parser.path).  The file itself is read as list files are
(blockd.bounded_read): a regular file of at most 16 MiB.
"""

from __future__ import annotations

import grp
import importlib.resources
import ipaddress
import os
import pwd
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockd.bounded_read import DEFAULT_MAX_BYTES, DEFAULT_MAX_LINE_BYTES, FileRefused, ReadLimits, read_bytes
from blockd.egress import EgressSettings, settings_problems
from blockd.excerpt import excerpt
from blockd.limits import KindLimits, LimitSettings
from blockd.names import InvalidNameError, normalize
from blockd.prefix_table import IPNetwork

ACTIONS = ("sinkhole", "nxdomain", "nodata", "refused", "monitor")
# A list may also keep an RPZ zone's own actions (the default for RPZ lists).
LIST_ACTIONS = (*ACTIONS, "zone")
LIST_FORMATS = ("list", "rpz")
LIST_MATCHES = ("subtree", "exact")
LIST_KEYS = (
    "path", "action", "allow_shrink", "format", "match", "zone", "primaries", "tsig", "max_bytes", "max_line_bytes",
    "invalid_lines", "url", "refresh", "ca_file", "sha256", "proxy",
)  # fmt: skip
# A list from a URL (blockd.url_lists): refreshed every `refresh` seconds by default (plus jitter).
DEFAULT_URL_REFRESH = 86400.0
# A list file's invalid lines: refuse the list (curated lists), or skip them (third-party feeds).
LIST_INVALID_LINES = ("reject", "skip")
BLOCKING_ACTIONS = ("sinkhole", "nxdomain", "nodata", "refused")
QUERY_LOG_MODES = ("none", "blocked", "all")
# Built-in lists (escape hatches to encrypted DNS); config lists may not take these names.
BUILTIN_LISTS = ("firefox-canary", "icloud-private-relay", "ddr")
RESERVED_GROUP_NAMES = ("none",)  # the metrics/log label of clients in no group
CLIENT_IP_MODES = ("full", "truncate", "hash")

DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)

DEFAULT_METRICS_LISTEN = "127.0.0.1:9553"

EMBEDDED_DEFAULT = """\
# blockd's embedded default: DNS on 127.0.0.1:5353, upstreams from /etc/resolv.conf, and the
# shipped TikTok/ByteDance/DoH-bypass lists blocking for every client.
[server]
listen = ["127.0.0.1:5353"]

[metrics]
listen = "127.0.0.1:9553"

[lists.tiktok]
path = "domains/tiktok.txt"

[lists.bytedance]
path = "domains/bytedance.txt"

[lists.doh-bypass]
path = "domains/doh-bypass.txt"
action = "nxdomain"          # a sinkhole address would tell Firefox that DoH is allowed

[groups.everyone]
networks = ["0.0.0.0/0", "::/0"]
lists = ["tiktok", "bytedance", "doh-bypass"]
action = "sinkhole"
"""
EMBEDDED_NAME = "<embedded default>"
# The config file itself: read whole, so bounded; its lines may be long (a list of networks).
CONFIG_LIMITS = ReadLimits(max_bytes=16 * 1024**2, max_line_bytes=16 * 1024**2)


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 5353),)
    allow: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_ALLOW)
    pidfile: Path | None = None
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1000
    trusted_forwarders: tuple[IPNetwork, ...] = ()
    state_dir: Path = Path("/var/lib/blockd")  # last good copies of transferred zones
    nsid: str = ""  # RFC 5001 NSID given to clients that ask ("" -> none)
    version: str = ""  # CH TXT version.bind / version.server ("" -> REFUSED)
    identity: str = ""  # CH TXT hostname.bind / id.server ("" -> REFUSED)
    user: str | None = None  # started as root: the user to become once the listeners are bound
    group: str | None = None  # ...and its group (None: the user's own)


@dataclass(frozen=True)
class UpstreamConfig:
    servers: tuple[Endpoint, ...] = ()
    timeout: float = 2.0  # for a whole client query, every upstream attempt included
    forward_ecs: bool = False
    strategy: str = "ordered"  # ordered | fastest | parallel (blockd.upstream_health)


@dataclass(frozen=True)
class CacheConfig:
    size: int = 100_000
    min_ttl: int = 0
    max_ttl: int = 86400
    max_bytes: int = 256 * 1024 * 1024  # estimated memory of the entries (blockd.cache.entry_cost)
    serve_stale: bool = False  # RFC 8767: off, as in Unbound and BIND (see README: Cache)
    stale_max: int = 86400
    stale_ttl: int = 30


@dataclass(frozen=True)
class MetricsConfig:
    listen: Endpoint | None = None


@dataclass(frozen=True)
class LogConfig:
    queries: str = "blocked"
    path: str = "-"
    client_ip: str = "full"


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: per-client limits (blockd.limits), TCP bounds and the UDP answer size cap."""

    clients: LimitSettings = field(default_factory=LimitSettings)
    max_udp_size: int = 1232  # no UDP answer is larger: what blockd advertises (DNS flag day 2020)
    tcp_message_timeout: float = 5.0
    tcp_pipeline: int = 64
    tcp_write_buffer: int = 262_144


OVER_LIMIT_ACTIONS = ("slip", "drop")
# [limits] keys: the three kinds of client each have qps, burst, upstream_in_flight and tcp_connections,
# spelled bare for clients in server.allow and with a forwarder_ / outside_ prefix for the others.
_KIND_KEYS = ("qps", "burst", "upstream_in_flight", "tcp_connections")
_KIND_PREFIXES = ("", "forwarder_", "outside_")
LIMITS_KEYS = (
    "enabled", "ipv4_prefix", "ipv6_prefix", "over_limit", "slip", "upstream_in_flight_total", "max_clients",
    "max_udp_size", "tcp_message_timeout", "tcp_pipeline", "tcp_write_buffer", "kernel_block_qps",
    "kernel_block_seconds",
    *(prefix + name for prefix in _KIND_PREFIXES for name in _KIND_KEYS),
)  # fmt: skip

DNSTAP_MESSAGES = ("all", "blocked", "responses")
UPSTREAM_STRATEGIES = ("ordered", "fastest", "parallel")  # as blockd.upstream_health.STRATEGIES


@dataclass(frozen=True)
class DnstapConfig:
    """[dnstap]: off unless socket or file is set.  target is "unix:PATH", "tcp:HOST:PORT" or
    "file:PATH" (paths absolute, resolved against the config file's directory)."""

    target: str | None = None
    identity: str = ""  # "" -> the host name
    version: str = ""  # "" -> "blockd <version>"
    messages: str = "all"
    forwarder: bool = False


PUBLISH_KEYS = ("listen", "allow", "tsig", "notify", "zones", "journal_depth")
PUBLISH_ZONE_KEYS = ("group", "lists", "action", "ttl")
# What a published zone may say: RPZ has no REFUSED (a resolver would need a policy of its own).
PUBLISH_ACTIONS = ("sinkhole", "nxdomain", "nodata", "monitor")
# Who may transfer a published zone when [publish] allow is not set: this host only.
DEFAULT_PUBLISH_ALLOW = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class PublishZoneConfig:
    """[publish.zones."NAME."]: one RPZ zone rendered from a group's policy, or from lists."""

    name: str  # key form, e.g. "tiktok.rpz.example"
    group: str | None = None  # the zone says what this group gets
    lists: tuple[str, ...] = ()  # ...or these lists with `action` (when no group is named)
    action: str = "nxdomain"  # for lists: the RPZ action of their entries (a list's own action wins)
    ttl: int | None = None  # the records' TTL; None: the group's ttl, or 300


@dataclass(frozen=True)
class PublishConfig:
    """[publish]: serve policy zones over AXFR/IXFR (blockd.publish); off unless listen is set."""

    listen: Endpoint | None = None
    allow: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_PUBLISH_ALLOW)
    tsig: Path | None = None  # when set, every transfer must be signed with this key
    notify: tuple[Endpoint, ...] = ()
    zones: dict[str, PublishZoneConfig] = field(default_factory=dict)
    journal_depth: int = 20  # versions kept for IXFR (Knot's journal-max-depth default)


@dataclass(frozen=True)
class ListConfig:
    name: str
    path: Path | None  # a file; None for a zone transferred from primaries
    action: str | None = None  # None: the group's; "zone" (RPZ only, its default): each trigger's own
    allow_shrink: bool = False
    format: str | None = None  # list (plain, hosts and adblock lines) | rpz; None: detected when loaded
    match: str = "subtree"  # for "list" files: subtree | exact (a hosts file names single hosts)
    zone: str | None = None  # RPZ by zone transfer: the zone name (key form)
    primaries: tuple[Endpoint, ...] = ()
    tsig: Path | None = None  # a BIND key file
    # Bounds on a list or zone file (blockd.bounded_read): a bigger file or longer line is refused.
    max_bytes: int = DEFAULT_MAX_BYTES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    invalid_lines: str = "reject"  # for "list" files: reject | skip (blockd.lists)
    # A list downloaded from a URL (blockd.url_lists): path is then its last good copy in state_dir.
    url: str | None = None
    refresh: float = DEFAULT_URL_REFRESH  # seconds between downloads (plus up to 10 % jitter)
    ca_file: Path | None = None  # PEM trust roots for https instead of the system store
    sha256: str | None = None  # the download must have this digest (hex, lower case)
    proxy: Endpoint | None = None  # an HTTP proxy, reached with CONNECT (blockd.http_proxy)

    @property
    def is_rpz(self) -> bool | None:
        """Whether the list is an RPZ zone; None until a file of undeclared format is read."""
        if self.zone is not None or self.format == "rpz":
            return True
        return False if self.format == "list" else None


@dataclass(frozen=True)
class GroupConfig:
    name: str
    networks: tuple[IPNetwork, ...] = ()
    lists: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    action: str = "sinkhole"
    ttl: int = 300
    sinkhole_ipv4: ipaddress.IPv4Address = ipaddress.IPv4Address("0.0.0.0")
    sinkhole_ipv6: ipaddress.IPv6Address = ipaddress.IPv6Address("::")
    interfaces: tuple[str, ...] = ()
    vlans: tuple[int, ...] = ()
    block_answer_prefixes: tuple[Path, ...] = ()
    block_firefox_canary: bool = True
    block_private_relay: bool = True
    block_ddr: bool = True


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lists: dict[str, ListConfig] = field(default_factory=dict)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    egress: EgressSettings = field(default_factory=EgressSettings)
    dnstap: DnstapConfig = field(default_factory=DnstapConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


def packaged_data_dir() -> Path | None:
    """blockd/_data of an installed wheel (the shipped domains/ and deploy/, package data in
    pyproject.toml), wherever pip put the package; None when it is no directory on disk (a zip
    import), since lists are files the daemon reopens on every reload."""
    data = importlib.resources.files("blockd") / "_data"
    return data if isinstance(data, Path) else None


def shipped_base_dir() -> Path:
    """The directory holding the shipped domains/ that the embedded default's relative paths name:
    $BLOCKD_DATA_DIR if set, else the installed package data, else the source checkout (where
    domains/ is the source of truth and an editable install finds it).  The variable is used even
    when it names no lists, so the errors name the directory the operator chose."""
    override = os.environ.get("BLOCKD_DATA_DIR")
    if override:
        return Path(override)
    packaged = packaged_data_dir()
    candidates = [packaged] if packaged is not None else []
    candidates.append(Path(__file__).resolve().parent.parent)
    for base in candidates:
        if (base / "domains" / "tiktok.txt").is_file():
            return base
    return candidates[0]


def read_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> list[Endpoint]:
    servers = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            servers.append(Endpoint(str(address), 53))
    return servers


def load_config(path: Path | None, resolv_conf: Path = Path("/etc/resolv.conf")) -> Config:
    """Load a config file, or the embedded default when path is None.  Raises ConfigError."""
    if path is None:
        return parse_config(EMBEDDED_DEFAULT, EMBEDDED_NAME, shipped_base_dir(), resolv_conf)
    try:
        text = read_bytes(path, CONFIG_LIMITS).decode("utf-8")  # never a FIFO: SIGHUP would hang
    except FileRefused as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.message}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read config: {reason}"]) from None
    return parse_config(text, str(path), path.resolve().parent, resolv_conf)


def parse_config(text: str, source: str, base_dir: Path, resolv_conf: Path = Path("/etc/resolv.conf")) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    parser = _Parser(source, base_dir)
    config = parser.parse(data, resolv_conf)
    if parser.errors:
        raise ConfigError(parser.errors)
    return config


_MISSING = object()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class _Parser:
    def __init__(self, source: str, base_dir: Path):
        self.source = source
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.source}: {key}: {message}")

    # -- generic value checks -------------------------------------------------------------

    def table(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The top-level section `key` of data, with unknown keys reported."""
        return self.known_keys(data.get(key, {}), key, allowed)

    def known_keys(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.error(key, f"must be a table, not {_type_name(value)}")
            return {}
        for name in value:
            if name not in allowed:
                self.error(f"{key}.{name}", f"unknown key (known: {', '.join(allowed)})")
        return value

    def string(self, table: dict[str, Any], key: str, name: str, default: Any, choices: tuple[str, ...] = ()) -> Any:
        value = table.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.error(f"{key}.{name}", f"must be a string, not {_type_name(value)}")
            return default
        if choices and value not in choices:
            self.error(f"{key}.{name}", f"{value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def number(
        self, table: dict[str, Any], key: str, name: str, default: Any, low: float, high: float, integer: bool = False
    ) -> Any:
        value = table.get(name, _MISSING)
        if value is _MISSING:
            return default
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.error(f"{key}.{name}", f"must be {'an integer' if integer else 'a number'}, not {_type_name(value)}")
            return default
        if not low <= value <= high:
            self.error(f"{key}.{name}", f"{value} is out of range {low}..{high}")
            return default
        return value

    def boolean(self, table: dict[str, Any], key: str, name: str, default: bool) -> bool:
        value = table.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(f"{key}.{name}", f"must be true or false, not {_type_name(value)}")
            return default
        return value

    def string_list(self, table: dict[str, Any], key: str, name: str) -> list[tuple[str, str]] | None:
        """(key path, value) pairs, or None when absent."""
        value = table.get(name, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            self.error(f"{key}.{name}", f"must be a list of strings, not {_type_name(value)}")
            return []
        items = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{key}.{name}[{index}]", f"must be a string, not {_type_name(item)}")
            else:
                items.append((f"{key}.{name}[{index}]", item))
        return items

    def networks(self, table: dict[str, Any], key: str, name: str) -> tuple[IPNetwork, ...] | None:
        items = self.string_list(table, key, name)
        if items is None:
            return None
        networks = []
        for item_key, text in items:
            try:
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                try:
                    ipaddress.ip_network(text, strict=False)
                    reason = "host bits set; did you mean " + str(ipaddress.ip_network(text, strict=False)) + "?"
                except ValueError:
                    reason = str(exc)
                self.error(item_key, f"{text!r} is not a valid network: {reason}")
        return tuple(networks)

    def endpoint(self, item_key: str, text: str, default_port: int) -> Endpoint | None:
        host, port = text, default_port
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                self.error(item_key, f"{text!r}: missing ']'")
                return None
            host, rest = text[1:close], text[close + 1 :]
            if rest:
                if not rest.startswith(":") or not _is_port_text(rest[1:]):
                    self.error(item_key, f"{text!r}: expected [address]:port")
                    return None
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            if not _is_port_text(port_text):
                self.error(item_key, f"{text!r}: port must be a number")
                return None
            port = int(port_text)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.error(item_key, f"{text!r}: {host!r} is not an IP address")
            return None
        if not 0 < port < 65536:
            self.error(item_key, f"{text!r}: port {port} out of range 1..65535")
            return None
        return Endpoint(str(address), port)

    def path(self, key: str, text: str) -> Path:
        """A path the config names, relative to the config's directory.  Text no file system can
        take (a NUL byte) or that has no place in a file name (control characters, which would
        also forge lines where the path is logged) is an error of its key."""
        problem = _path_problem(text)
        if problem is not None:
            self.error(key, f"{excerpt(text)}: {problem}")
            return self.base_dir  # never used: the config is refused
        candidate = Path(text)
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    # -- sections ---------------------------------------------------------------------------

    def parse(self, data: dict[str, Any], resolv_conf: Path) -> Config:
        known = (
            "server", "upstream", "metrics", "log", "cache", "lists", "groups", "egress", "dnstap", "limits", "publish",
        )  # fmt: skip
        for name in data:
            if name not in known:
                self.error(name, f"unknown section (known: {', '.join(known)})")
        server = self.server(data)
        upstream = self.upstream(data, resolv_conf)
        metrics = self.metrics(data)
        log = self.log(data)
        cache = self.cache(data)
        lists = self.lists(data, server.state_dir)
        groups = self.groups(data, lists)
        egress = self.egress(data)
        dnstap = self.dnstap(data)
        limits = self.limits(data)
        publish = self.publish(data, lists, groups)
        return Config(
            self.source, server, upstream, metrics, log, cache, lists, groups, egress, dnstap, limits, publish
        )

    def publish(
        self, data: dict[str, Any], lists: dict[str, ListConfig], groups: dict[str, GroupConfig]
    ) -> PublishConfig:
        key = "publish"
        table = self.table(data, key, PUBLISH_KEYS)
        if not table:
            return PublishConfig()
        defaults = PublishConfig()
        listen = None
        listen_text = self.string(table, key, "listen", None)
        if listen_text is None:
            self.error(f"{key}.listen", 'missing (the address secondaries transfer from, e.g. "0.0.0.0:5300")')
        else:
            listen = self.endpoint(f"{key}.listen", listen_text, 53)
        allow = self.networks(table, key, "allow")
        tsig = self.string(table, key, "tsig", None)
        notify = tuple(
            e for e in (self.endpoint(k, v, 53) for k, v in self.string_list(table, key, "notify") or []) if e
        )
        zones = self.publish_zones(table.get("zones", _MISSING), lists, groups)
        return PublishConfig(
            listen=listen,
            allow=defaults.allow if allow is None else allow,
            tsig=self.path(f"{key}.tsig", tsig) if tsig else None,
            notify=notify,
            zones=zones,
            journal_depth=self.number(table, key, "journal_depth", defaults.journal_depth, 1, 1000, integer=True),
        )

    def publish_zones(
        self, value: Any, lists: dict[str, ListConfig], groups: dict[str, GroupConfig]
    ) -> dict[str, PublishZoneConfig]:
        key = "publish.zones"
        if value is _MISSING or value == {}:
            self.error(key, 'missing (at least one zone, e.g. [publish.zones."tiktok.rpz.example."])')
            return {}
        if not isinstance(value, dict):
            self.error(key, f"must be a table of zones, not {_type_name(value)}")
            return {}
        zones = {}
        for text, table in value.items():
            zone_key = f'{key}."{text}"'
            table = self.known_keys(table, zone_key, PUBLISH_ZONE_KEYS)
            name = self.zone_name(zone_key, text)
            group = self.string(table, zone_key, "group", None)
            names = tuple(item for _, item in self.string_list(table, zone_key, "lists") or [])
            if (group is None) == (not names):
                self.error(zone_key, "set group (the policy of a group) or lists (these lists), one of them")
            action = self.string(table, zone_key, "action", PublishZoneConfig.action, PUBLISH_ACTIONS)
            if "action" in table and group is not None:
                self.error(f"{zone_key}.action", "only with lists (a group's zone has the group's actions)")
            if group is not None and group not in groups:
                known = ", ".join(groups) or "none"
                self.error(f"{zone_key}.group", f"unknown group {group!r} (defined groups: {known})")
            for index, list_name in enumerate(names):
                if list_name not in lists:
                    self.error(f"{zone_key}.lists[{index}]", f"unknown list {list_name!r}")
            if action != "monitor":  # a monitor zone only says passthru
                self.check_publishable(zone_key, groups.get(group) if group else None, names, lists)
            if name is not None:
                if name in zones:
                    self.error(zone_key, f"zone {name!r} is published twice")
                ttl = self.number(table, zone_key, "ttl", None, 0, 2**31 - 1, integer=True)
                zones[name] = PublishZoneConfig(name, group, names, action, ttl)
        return zones

    def check_publishable(
        self, zone_key: str, group: GroupConfig | None, names: tuple[str, ...], lists: dict[str, ListConfig]
    ) -> None:
        """RPZ has no REFUSED: a zone that would have to say it is refused, naming the culprit."""
        if group is not None:
            if group.action == "refused":
                self.error(f"{zone_key}.group", f"group {group.name!r} answers REFUSED, which RPZ cannot express")
            names = group.lists if group.action != "monitor" else ()
        for list_name in names:
            if list_name in lists and lists[list_name].action == "refused":
                self.error(zone_key, f"list {list_name!r} answers REFUSED, which RPZ cannot express")

    def limits(self, data: dict[str, Any]) -> LimitsConfig:
        key = "limits"
        table = self.table(data, key, LIMITS_KEYS)
        base = LimitSettings()
        kinds = []
        for prefix, default in zip(_KIND_PREFIXES, base.kinds, strict=True):
            kinds.append(
                KindLimits(
                    qps=self.number(table, key, f"{prefix}qps", default.qps, 0, 10_000_000),
                    burst=self.number(table, key, f"{prefix}burst", default.burst, 1, 100_000_000),
                    upstream_in_flight=self.number(
                        table, key, f"{prefix}upstream_in_flight", default.upstream_in_flight, 0, 10**6, integer=True
                    ),
                    tcp_connections=self.number(
                        table, key, f"{prefix}tcp_connections", default.tcp_connections, 0, 1_000_000, integer=True
                    ),
                )
            )
        clients = LimitSettings(
            enabled=self.boolean(table, key, "enabled", base.enabled),
            ipv4_prefix=self.number(table, key, "ipv4_prefix", base.ipv4_prefix, 8, 32, integer=True),
            ipv6_prefix=self.number(table, key, "ipv6_prefix", base.ipv6_prefix, 16, 128, integer=True),
            client=kinds[0],
            forwarder=kinds[1],
            outside=kinds[2],
            over_limit=self.string(table, key, "over_limit", base.over_limit, OVER_LIMIT_ACTIONS),
            slip=self.number(table, key, "slip", base.slip, 1, 100, integer=True),
            upstream_in_flight_total=self.number(
                table, key, "upstream_in_flight_total", base.upstream_in_flight_total, 1, 1_000_000, integer=True
            ),
            max_clients=self.number(table, key, "max_clients", base.max_clients, 100, 10_000_000, integer=True),
            kernel_block_qps=self.number(
                table, key, "kernel_block_qps", base.kernel_block_qps, 0, 100_000_000, integer=True
            ),
            kernel_block_seconds=self.number(table, key, "kernel_block_seconds", base.kernel_block_seconds, 1, 86400),
        )
        defaults = LimitsConfig()
        return LimitsConfig(
            clients=clients,
            max_udp_size=self.number(table, key, "max_udp_size", defaults.max_udp_size, 512, 4096, integer=True),
            tcp_message_timeout=self.number(
                table, key, "tcp_message_timeout", defaults.tcp_message_timeout, 0.1, 3600
            ),
            tcp_pipeline=self.number(table, key, "tcp_pipeline", defaults.tcp_pipeline, 1, 65535, integer=True),
            tcp_write_buffer=self.number(
                table, key, "tcp_write_buffer", defaults.tcp_write_buffer, 65536, 64 * 1024 * 1024, integer=True
            ),
        )

    def server(self, data: dict[str, Any]) -> ServerConfig:
        key = "server"
        names = (
            "listen", "allow", "pidfile", "tcp_idle_timeout", "tcp_max_connections", "trusted_forwarders", "state_dir",
            "nsid", "version", "identity", "user", "group",
        )  # fmt: skip
        table = self.table(data, key, names)
        defaults = ServerConfig()
        listen = defaults.listen
        items = self.string_list(table, key, "listen")
        if items is not None:
            endpoints = [self.endpoint(k, v, 53) for k, v in items]
            listen = tuple(e for e in endpoints if e is not None)
            if not items:
                self.error(f"{key}.listen", "must name at least one address")
        allow = self.networks(table, key, "allow")
        pidfile = self.string(table, key, "pidfile", None)
        return ServerConfig(
            listen=listen,
            allow=defaults.allow if allow is None else allow,
            pidfile=self.path(f"{key}.pidfile", pidfile) if pidfile else None,
            tcp_idle_timeout=self.number(table, key, "tcp_idle_timeout", defaults.tcp_idle_timeout, 0.1, 3600),
            tcp_max_connections=self.number(
                table, key, "tcp_max_connections", defaults.tcp_max_connections, 1, 100000, integer=True
            ),
            trusted_forwarders=self.networks(table, key, "trusted_forwarders") or (),
            state_dir=self.path(f"{key}.state_dir", state_dir)
            if (state_dir := self.string(table, key, "state_dir", None))
            else defaults.state_dir,
            nsid=self.short_text(table, key, "nsid"),
            version=self.short_text(table, key, "version"),
            identity=self.short_text(table, key, "identity"),
            user=self.account(table, key, "user", _user_exists),
            group=self.account(table, key, "group", _group_exists),
        )

    def account(self, table: dict[str, Any], key: str, name: str, exists: Callable[[str], bool]) -> str | None:
        """A user or group name that must exist here (`blockd check` says so before a start fails)."""
        value: str | None = self.string(table, key, name, None)
        if value is None:
            return None
        if not value or "\0" in value or not exists(value):
            kind = "user" if name == "user" else "group"
            self.error(f"{key}.{name}", f"no such {kind} {value!r}")
            return None
        if name == "group" and "user" not in table:
            self.error(f"{key}.group", "is the group of server.user: set user too")
            return None
        return value

    def short_text(self, table: dict[str, Any], key: str, name: str) -> str:
        """A string blockd puts in answers (NSID, CH TXT): printable ASCII, at most 255 bytes."""
        text: str = self.string(table, key, name, "")
        if len(text) > 255 or not all(" " <= c <= "~" for c in text):
            self.error(f"{key}.{name}", "must be printable ASCII of at most 255 characters")
            return ""
        return text

    def upstream(self, data: dict[str, Any], resolv_conf: Path) -> UpstreamConfig:
        key = "upstream"
        table = self.table(data, key, ("servers", "timeout", "forward_ecs", "strategy"))
        items = self.string_list(table, key, "servers")
        if items is None:
            servers = tuple(read_resolv_conf(resolv_conf))
            if not servers:
                self.error(f"{key}.servers", f"not set, and {resolv_conf} names no nameserver")
        else:
            servers = tuple(e for e in (self.endpoint(k, v, 53) for k, v in items) if e is not None)
            if not items:
                self.error(f"{key}.servers", "must name at least one upstream resolver")
        timeout = self.number(table, key, "timeout", UpstreamConfig.timeout, 0.05, 30)
        forward_ecs = self.boolean(table, key, "forward_ecs", UpstreamConfig.forward_ecs)
        strategy = self.string(table, key, "strategy", UpstreamConfig.strategy, UPSTREAM_STRATEGIES)
        return UpstreamConfig(servers=servers, timeout=timeout, forward_ecs=forward_ecs, strategy=strategy)

    def cache(self, data: dict[str, Any]) -> CacheConfig:
        key = "cache"
        names = ("size", "max_bytes", "min_ttl", "max_ttl", "serve_stale", "stale_max", "stale_ttl")
        table = self.table(data, key, names)
        defaults = CacheConfig()
        config = CacheConfig(
            size=self.number(table, key, "size", defaults.size, 0, 10_000_000, integer=True),
            max_bytes=self.number(table, key, "max_bytes", defaults.max_bytes, 1 << 20, 1 << 40, integer=True),
            min_ttl=self.number(table, key, "min_ttl", defaults.min_ttl, 0, 86400, integer=True),
            max_ttl=self.number(table, key, "max_ttl", defaults.max_ttl, 0, 7 * 86400, integer=True),
            serve_stale=self.boolean(table, key, "serve_stale", defaults.serve_stale),
            stale_max=self.number(table, key, "stale_max", defaults.stale_max, 1, 30 * 86400, integer=True),
            stale_ttl=self.number(table, key, "stale_ttl", defaults.stale_ttl, 1, 3600, integer=True),
        )
        if config.min_ttl > config.max_ttl:
            self.error(f"{key}.min_ttl", f"{config.min_ttl} is larger than cache.max_ttl ({config.max_ttl})")
        return config

    def egress(self, data: dict[str, Any]) -> EgressSettings:
        key = "egress"
        names = (
            "enabled", "table", "rule_priority", "route_protocol", "prefixes", "learn", "learn_min_ttl",
            "learn_max", "never", "on_exit", "reconcile_interval",
        )  # fmt: skip
        table = self.table(data, key, names)
        defaults = EgressSettings()
        prefixes = tuple(self.path(item, text) for item, text in self.string_list(table, key, "prefixes") or [])
        settings = EgressSettings(
            enabled=self.boolean(table, key, "enabled", defaults.enabled),
            table=self.number(table, key, "table", defaults.table, 1, 2**32 - 1, integer=True),
            rule_priority=self.number(table, key, "rule_priority", defaults.rule_priority, 1, 32765, integer=True),
            route_protocol=self.number(table, key, "route_protocol", defaults.route_protocol, 1, 255, integer=True),
            prefixes=prefixes,
            learn=self.boolean(table, key, "learn", defaults.learn),
            learn_min_ttl=self.number(table, key, "learn_min_ttl", defaults.learn_min_ttl, 0, 30 * 86400),
            learn_max=self.number(table, key, "learn_max", defaults.learn_max, 0, 10_000_000, integer=True),
            never=self.networks(table, key, "never") or (),
            on_exit=self.string(table, key, "on_exit", defaults.on_exit, ("keep", "remove")),
            reconcile_interval=self.number(table, key, "reconcile_interval", defaults.reconcile_interval, 1, 86400),
        )
        for name, message in settings_problems(settings):
            self.error(f"{key}.{name}", message)
        return settings

    def metrics(self, data: dict[str, Any]) -> MetricsConfig:
        key = "metrics"
        table = self.table(data, key, ("listen",))
        text = self.string(table, key, "listen", DEFAULT_METRICS_LISTEN)
        if not text:
            return MetricsConfig(listen=None)  # "" turns the admin listener (and counting) off
        return MetricsConfig(listen=self.endpoint(f"{key}.listen", text, 9553))

    def log(self, data: dict[str, Any]) -> LogConfig:
        key = "log"
        table = self.table(data, key, ("queries", "path", "client_ip"))
        defaults = LogConfig()
        path = self.string(table, key, "path", defaults.path)
        if path != "-" and path:
            path = str(self.path(f"{key}.path", path))
        return LogConfig(
            queries=self.string(table, key, "queries", defaults.queries, QUERY_LOG_MODES),
            path=path or "-",
            client_ip=self.string(table, key, "client_ip", defaults.client_ip, CLIENT_IP_MODES),
        )

    def dnstap(self, data: dict[str, Any]) -> DnstapConfig:
        key = "dnstap"
        table = self.table(data, key, ("socket", "file", "identity", "version", "messages", "forwarder"))
        socket_text = self.string(table, key, "socket", "")
        file_text = self.string(table, key, "file", "")
        target = None
        if socket_text and file_text:
            self.error(f"{key}.file", "set socket or file, not both")
        elif socket_text:
            target = self.dnstap_socket(f"{key}.socket", socket_text)
        elif file_text:
            target = f"file:{self.path(f'{key}.file', file_text)}"
        return DnstapConfig(
            target=target,
            identity=self.string(table, key, "identity", ""),
            version=self.string(table, key, "version", ""),
            messages=self.string(table, key, "messages", "all", DNSTAP_MESSAGES),
            forwarder=self.boolean(table, key, "forwarder", False),
        )

    def dnstap_socket(self, item_key: str, text: str) -> str | None:
        kind, _, where = text.partition(":")
        if kind == "unix" and where:
            if "\0" in where:
                self.error(item_key, f"{text!r}: NUL in the socket path")
                return None
            return f"unix:{self.path(item_key, where)}"
        if kind == "tcp" and where:
            endpoint = self.endpoint(item_key, where, 6000)
            return f"tcp:{endpoint}" if endpoint is not None else None
        self.error(item_key, f'{text!r}: expected "unix:/path/to.sock" or "tcp:address:port"')
        return None

    def lists(self, data: dict[str, Any], state_dir: Path = Path("/var/lib/blockd")) -> dict[str, ListConfig]:
        lists_table = data.get("lists", {})
        if not isinstance(lists_table, dict):
            self.error("lists", f"must be a table of lists, not {_type_name(lists_table)}")
            return {}
        result = {}
        for name, value in lists_table.items():
            key = f"lists.{name}"
            if not isinstance(value, dict):
                self.error(key, f"must be a table, not {_type_name(value)}")
                continue
            if name in BUILTIN_LISTS:
                self.error(key, f"{name!r} is the name of a built-in list; choose another")
                continue
            if not name.isprintable():  # it is logged, labels metrics and may name a file
                self.error(f"lists.{excerpt(name)}", "a list name must be printable text")
                continue
            table = self.known_keys(value, key, LIST_KEYS)
            list_config = (
                self.url_source(name, key, table, state_dir) if "url" in table else self.list_source(name, key, table)
            )
            if list_config is not None:
                result[name] = list_config
        return result

    def list_source(self, name: str, key: str, table: dict[str, Any]) -> ListConfig | None:
        """One [lists.X] table: a file (any format) or a zone from primaries."""
        if ("path" in table) == ("zone" in table):
            self.error(f"{key}.path", "set exactly one of path (a list file) or zone (an RPZ zone from primaries)")
            return None
        path = self.string(table, key, "path", None)
        zone_name = self.string(table, key, "zone", None)
        if path is None and zone_name is None:
            return None
        zone = self.zone_name(f"{key}.zone", zone_name) if zone_name is not None else None
        if path is None and zone is None:
            return None
        list_format = self.string(table, key, "format", None, LIST_FORMATS)
        config = ListConfig(
            name=name,
            path=self.path(f"{key}.path", path) if path is not None else None,
            action=self.string(table, key, "action", None, LIST_ACTIONS),
            allow_shrink=self.boolean(table, key, "allow_shrink", False),
            format=list_format,
            match=self.string(table, key, "match", "subtree", LIST_MATCHES),
            zone=zone,
            primaries=self.primaries(table, key) if zone_name is not None else (),
            tsig=self.path(f"{key}.tsig", tsig) if (tsig := self.string(table, key, "tsig", None)) else None,
            max_bytes=self.number(table, key, "max_bytes", DEFAULT_MAX_BYTES, 1, 2**40, integer=True),
            max_line_bytes=self.number(table, key, "max_line_bytes", DEFAULT_MAX_LINE_BYTES, 16, 2**24, integer=True),
            invalid_lines=self.string(table, key, "invalid_lines", "reject", LIST_INVALID_LINES),
        )
        self.check_list_keys(key, table, config)
        return config

    def url_source(self, name: str, key: str, table: dict[str, Any], state_dir: Path) -> ListConfig | None:
        """One [lists.X] table with url: downloaded, its last good copy <state_dir>/<name>.list."""
        for other in ("path", "zone", "primaries", "tsig"):
            if other in table:
                self.error(f"{key}.{other}", "not with url (a list is a file, a zone from primaries or a URL)")
        url = self.string(table, key, "url", None)
        if url is None:
            return None
        if not url.startswith(("http://", "https://")) or len(url) > 2048 or not url.isprintable() or " " in url:
            self.error(f"{key}.url", f"{excerpt(url)}: expected an http:// or https:// URL")
            return None
        if "/" in name or name.startswith("."):
            self.error(key, f"{excerpt(name)}: a downloaded list's name names its copy in server.state_dir")
            return None
        sha256 = self.string(table, key, "sha256", None)
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            self.error(f"{key}.sha256", "expected 64 hexadecimal digits (the SHA-256 of the download)")
        ca_file = self.string(table, key, "ca_file", None)
        config = ListConfig(
            name=name,
            path=state_dir / f"{name}.list",
            action=self.string(table, key, "action", None, LIST_ACTIONS),
            allow_shrink=self.boolean(table, key, "allow_shrink", False),
            format=self.string(table, key, "format", None, LIST_FORMATS),
            match=self.string(table, key, "match", "subtree", LIST_MATCHES),
            max_bytes=self.number(table, key, "max_bytes", DEFAULT_MAX_BYTES, 1, 2**40, integer=True),
            max_line_bytes=self.number(table, key, "max_line_bytes", DEFAULT_MAX_LINE_BYTES, 16, 2**24, integer=True),
            invalid_lines=self.string(table, key, "invalid_lines", "reject", LIST_INVALID_LINES),
            url=url,
            refresh=float(self.number(table, key, "refresh", DEFAULT_URL_REFRESH, 1, 365 * 86400)),
            ca_file=self.path(f"{key}.ca_file", ca_file) if ca_file is not None else None,
            sha256=sha256.lower() if sha256 is not None else None,
            proxy=self.proxy(f"{key}.proxy", proxy) if (proxy := self.string(table, key, "proxy", None)) else None,
        )
        if config.ca_file is not None and not url.startswith("https://"):
            self.error(f"{key}.ca_file", "only for an https:// URL")
        self.check_list_keys(key, table, config)
        return config

    def check_list_keys(self, key: str, table: dict[str, Any], config: ListConfig) -> None:
        if config.url is None:
            self.check_not_url_keys(key, table)
        if config.zone is None:
            for name in ("primaries", "tsig"):
                if name in table:
                    self.error(f"{key}.{name}", "only for a list transferred from primaries (set zone)")
        else:
            for name in ("max_bytes", "max_line_bytes"):
                if name in table:
                    self.error(f"{key}.{name}", "only for a list read from a file (set path)")
            if "/" in config.name or config.name.startswith("."):
                self.error(key, f"{excerpt(config.name)}: a transferred list's name names its copy in server.state_dir")
        if config.is_rpz and "match" in table:
            self.error(f"{key}.match", "RPZ triggers say exact (name) or below (*.name) themselves")
        if config.is_rpz and "invalid_lines" in table:
            self.error(f"{key}.invalid_lines", "only for list files: an RPZ zone with an invalid record is refused")
        if config.action == "zone" and config.is_rpz is False:
            self.error(f"{key}.action", "'zone' keeps an RPZ zone's own actions: only for RPZ lists")
        if config.zone is not None and config.format == "list":
            self.error(f"{key}.format", "a transferred zone is RPZ")

    def proxy(self, key: str, text: str) -> Endpoint | None:
        """proxy = "http://host:port": the proxy's address (port 80 when not given)."""
        if not text.startswith("http://") or "@" in text or not text.isprintable():
            self.error(key, f"{excerpt(text)}: expected http://host:port (an HTTP proxy, no credentials)")
            return None
        return self.endpoint(key, text.removeprefix("http://").rstrip("/"), 80)

    def check_not_url_keys(self, key: str, table: dict[str, Any]) -> None:
        for name in ("refresh", "ca_file", "sha256", "proxy"):
            if name in table:
                self.error(f"{key}.{name}", "only for a list downloaded from a URL (set url)")

    def zone_name(self, key: str, text: str) -> str | None:
        if text.strip(".") == "":
            self.error(key, f"{text!r} is not a zone name")
            return None
        try:
            return normalize(text.rstrip("."))
        except InvalidNameError as exc:
            self.error(key, str(exc))
            return None

    def primaries(self, table: dict[str, Any], key: str) -> tuple[Endpoint, ...]:
        items = self.string_list(table, key, "primaries")
        if not items:
            self.error(f"{key}.primaries", "missing (the primary servers to transfer the zone from)")
            return ()
        return tuple(e for e in (self.endpoint(k, v, 53) for k, v in items) if e is not None)

    def groups(self, data: dict[str, Any], lists: dict[str, ListConfig]) -> dict[str, GroupConfig]:
        groups_table = data.get("groups", {})
        if not isinstance(groups_table, dict):
            self.error("groups", f"must be a table of groups, not {_type_name(groups_table)}")
            return {}
        raw_lists = data.get("lists", {}) if isinstance(data.get("lists", {}), dict) else {}
        result = {}
        for name, value in groups_table.items():
            key = f"groups.{name}"
            if not isinstance(value, dict):
                self.error(key, f"must be a table, not {_type_name(value)}")
                continue
            table = self.known_keys(
                value,
                key,
                (
                    "networks", "interfaces", "vlans", "lists", "allow", "action", "ttl", "sinkhole_ipv4",
                    "sinkhole_ipv6", "block_answer_prefixes", "block_firefox_canary", "block_private_relay",
                    "block_ddr",
                ),
            )  # fmt: skip
            if name in RESERVED_GROUP_NAMES:
                self.error(key, f"{name!r} is reserved (it labels clients in no group)")
            networks = self.networks(table, key, "networks") or ()
            interfaces = tuple(text for _, text in self.string_list(table, key, "interfaces") or [])
            vlans = self.vlan_ids(table, key)
            if not any(k in table for k in ("networks", "interfaces", "vlans")):
                self.error(
                    f"{key}.networks", "missing (which clients belong to this group: networks, interfaces or vlans)"
                )
            list_names = []
            for item_key, list_name in self.string_list(table, key, "lists") or []:
                if list_name not in raw_lists:
                    known = ", ".join(raw_lists) or "none defined"
                    self.error(item_key, f"unknown list {list_name!r} (defined lists: {known})")
                elif list_name in lists:
                    list_names.append(list_name)
            allow = []
            for item_key, text in self.string_list(table, key, "allow") or []:
                try:
                    allow.append(normalize(text))
                except InvalidNameError as exc:
                    self.error(item_key, str(exc))
            sinkhole_ipv4 = self.address(table, key, "sinkhole_ipv4", 4) or GroupConfig.sinkhole_ipv4
            sinkhole_ipv6 = self.address(table, key, "sinkhole_ipv6", 6) or GroupConfig.sinkhole_ipv6
            result[name] = GroupConfig(
                name=name,
                networks=networks,
                lists=tuple(list_names),
                allow=tuple(allow),
                action=self.string(table, key, "action", GroupConfig.action, ACTIONS),
                ttl=self.number(table, key, "ttl", GroupConfig.ttl, 0, 2**31 - 1, integer=True),
                sinkhole_ipv4=sinkhole_ipv4,
                sinkhole_ipv6=sinkhole_ipv6,
                interfaces=interfaces,
                vlans=vlans,
                block_answer_prefixes=tuple(
                    self.path(item, text) for item, text in self.string_list(table, key, "block_answer_prefixes") or []
                ),
                block_firefox_canary=self.boolean(table, key, "block_firefox_canary", True),
                block_private_relay=self.boolean(table, key, "block_private_relay", True),
                block_ddr=self.boolean(table, key, "block_ddr", True),
            )
        return result

    def vlan_ids(self, table: dict[str, Any], key: str) -> tuple[int, ...]:
        value = table.get("vlans", [])
        if not isinstance(value, list):
            self.error(f"{key}.vlans", f"must be a list of VLAN ids, not {_type_name(value)}")
            return ()
        ids = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 4094:
                self.error(f"{key}.vlans[{index}]", f"{item!r} is not a VLAN id (1..4094)")
            else:
                ids.append(item)
        return tuple(ids)

    def address(self, table: dict[str, Any], key: str, name: str, version: int) -> Any:
        text = self.string(table, key, name, None)
        if text is None:
            return None
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            self.error(f"{key}.{name}", f"{text!r} is not an IP address")
            return None
        if address.version != version:
            self.error(f"{key}.{name}", f"{text!r} is not an IPv{version} address")
            return None
        return address


def _path_problem(text: str) -> str | None:
    """Why text cannot be a path, or None."""
    if not text:
        return "empty path"
    if "\0" in text:
        return "a path cannot contain a NUL byte"
    control = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        return f"a path cannot contain a control character (U+{ord(control):04X})"
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return f"not representable in the file system's encoding ({sys.getfilesystemencoding()})"
    return None


def _is_port_text(text: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts "²" (int() refuses it) and "٥٣" (read as 53).
    return text.isascii() and text.isdecimal()


def _type_name(value: Any) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)
