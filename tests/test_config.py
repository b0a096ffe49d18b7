"""blockd.config, table-driven in the style of CoreDNS's plugin/acl/acl_test.go.

One table, CASES: TOML text in, and out either the exact errors (the operator-facing contract,
in the order they are reported) or the parsed value at a dotted path into the Config.  Adding a
case is adding one err(...) or ok(...) entry.  Expected errors are written without the
"blockd.toml: " prefix every one of them carries; RESOLV in an error stands for the case's temp
resolv.conf.  Every case gets its own resolv.conf (by default naming 127.0.0.1), so the real
/etc/resolv.conf is never read.  parse_config only joins relative paths onto base_dir, so BASE
need not exist.

load_config's file handling (unreadable, not UTF-8, the embedded default) is tested below the table.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import blockd.config as config_module
from blockd.config import (
    DEFAULT_ALLOW,
    EMBEDDED_NAME,
    CacheConfig,
    Config,
    ConfigError,
    DnstapConfig,
    Endpoint,
    GroupConfig,
    ListConfig,
    LogConfig,
    MetricsConfig,
    UpstreamConfig,
    load_config,
    parse_config,
    shipped_base_dir,
)
from blockd.egress import EgressSettings

SOURCE = "blockd.toml"
BASE = Path("/srv/blockd")
RESOLV = "<resolv.conf>"
LOCAL_RESOLV = "nameserver 127.0.0.1\n"

SOCKET_FORMS = 'expected "unix:/path/to.sock" or "tcp:address:port"'
SECTIONS = "server, upstream, metrics, log, cache, lists, groups, egress, dnstap, limits, publish"
SERVER_KEYS = (
    "listen, allow, pidfile, tcp_idle_timeout, tcp_max_connections, trusted_forwarders, state_dir, "
    "nsid, version, identity, user, group"
)
CACHE_KEYS = "size, max_bytes, min_ttl, max_ttl, serve_stale, stale_max, stale_ttl"
EGRESS_KEYS = (
    "enabled, table, rule_priority, route_protocol, prefixes, learn, learn_min_ttl, learn_max, never, on_exit, "
    "reconcile_interval"
)
GROUP_KEYS = (
    "networks, interfaces, vlans, lists, allow, action, ttl, sinkhole_ipv4, sinkhole_ipv6, block_answer_prefixes, "
    "block_firefox_canary, block_private_relay, block_ddr"
)
ACTIONS = "sinkhole, nxdomain, nodata, refused, monitor"
NO_CLIENTS = "missing (which clients belong to this group: networks, interfaces or vlans)"
NOT_UTF8_REASON = "'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"

# Something wrong in every section at once: every problem is reported, one line each.
EVERYTHING_WRONG = """\
debug = true
[server]
listen = []
allow = ["10.0.0.1/8"]
[upstream]
servers = ["dns.google"]
[metrics]
listen = "localhost"
[log]
queries = "some"
[cache]
min_ttl = 10
max_ttl = 5
[lists.ddr]
path = "ddr.txt"
[groups.none]
lists = ["tiktok"]
[egress]
table = 255
"""
EVERYTHING_WRONG_ERRORS = (
    f"debug: unknown section (known: {SECTIONS})",
    "server.listen: must name at least one address",
    "server.allow[0]: '10.0.0.1/8' is not a valid network: host bits set; did you mean 10.0.0.0/8?",
    "upstream.servers[0]: 'dns.google': 'dns.google' is not an IP address",
    "metrics.listen: 'localhost': 'localhost' is not an IP address",
    "log.queries: 'some' is not one of none, blocked, all",
    "cache.min_ttl: 10 is larger than cache.max_ttl (5)",
    "lists.ddr: 'ddr' is the name of a built-in list; choose another",
    "groups.none: 'none' is reserved (it labels clients in no group)",
    f"groups.none.networks: {NO_CLIENTS}",
    "groups.none.lists[0]: unknown list 'tiktok' (defined lists: ddr)",
    "egress.table: 255 is not usable (1..4294967295, not 253/254/255)",
)
GROUP_FULL = """\
[lists.t]
path = "t.txt"
[groups.gov]
networks = ["10.0.0.0/8", "2001:db8::/32"]
lists = ["t"]
action = "nxdomain"
ttl = 0
block_ddr = false
"""
MESSY_RESOLV = "# comment\nsearch example\nnameserver\nnameserver dns.example\nnameserver 192.0.2.53\n" + (
    "  nameserver\t2001:db8::53 # trailing\nnameserver fe80::1%eth0\n"
)


class Case(NamedTuple):
    toml: str
    errors: tuple[str, ...]  # empty: the text must parse
    attr: str | None  # dotted path into the Config ("groups.gov.vlans"); None is the whole Config
    want: Any
    resolv: str | None  # the resolv.conf text; None: no such file


def err(name: str, toml: str, *errors: str, resolv: str | None = LOCAL_RESOLV, marks: Any = ()) -> Any:
    return pytest.param(Case(toml, errors, None, None, resolv), id=name, marks=marks)


def ok(name: str, toml: str, attr: str | None, want: Any, resolv: str | None = LOCAL_RESOLV) -> Any:
    return pytest.param(Case(toml, (), attr, want, resolv), id=name)


def ep(host: str, port: int = 53) -> Endpoint:
    return Endpoint(host, port)


net = ipaddress.ip_network
LOCAL_UPSTREAM = UpstreamConfig(servers=(ep("127.0.0.1"),))

CASES = [
    # -- the document and its sections -----------------------------------------------------------
    err("toml-invalid", "[server", "invalid TOML: Expected ']' at the end of a table declaration (at end of document)"),
    err("toml-invalid-position", "[server]\nlisten = [\n", "invalid TOML: Invalid value (at end of document)"),
    err(
        "toml-duplicate-key",
        "[cache]\nsize = 1\nsize = 2\n",
        "invalid TOML: Cannot overwrite a value (at line 3, column 9)",
    ),
    err("section-unknown", "[serve]", f"serve: unknown section (known: {SECTIONS})"),
    err("section-unknown-scalar", "debug = true", f"debug: unknown section (known: {SECTIONS})"),
    err(
        "section-unknown-two",
        "[a]\n[b]",
        f"a: unknown section (known: {SECTIONS})",
        f"b: unknown section (known: {SECTIONS})",
    ),
    err("server-not-a-table", "server = 1", "server: must be a table, not an integer"),
    err("server-array-of-tables", "[[server]]", "server: must be a table, not a list"),
    err("upstream-not-a-table", 'upstream = "1.1.1.1"', "upstream: must be a table, not a string"),
    err("metrics-not-a-table", "metrics = []", "metrics: must be a table, not a list"),
    err("log-not-a-table", "log = true", "log: must be a table, not a boolean"),
    err("cache-not-a-table", "cache = 1.5", "cache: must be a table, not a number"),
    err("egress-not-a-table", "egress = 1979-05-27", "egress: must be a table, not date"),
    ok(
        "empty-file-defaults",
        "",
        None,
        Config(SOURCE, upstream=LOCAL_UPSTREAM, metrics=MetricsConfig(ep("127.0.0.1", 9553))),
    ),
    # -- unknown keys ----------------------------------------------------------------------------
    ok("server-state-dir-relative", 'server.state_dir = "state"', "server.state_dir", BASE / "state"),
    ok("server-state-dir-default", "", "server.state_dir", Path("/var/lib/blockd")),
    ok("server-nsid", 'server.nsid = "resolver-brussels-1"', "server.nsid", "resolver-brussels-1"),
    ok("server-nsid-default-none", "", "server.nsid", ""),
    ok("server-version", 'server.version = "blockd"', "server.version", "blockd"),
    ok("server-identity", 'server.identity = "dns1.gov.example"', "server.identity", "dns1.gov.example"),
    err(
        "server-nsid-too-long",
        f'server.nsid = "{"x" * 256}"',
        "server.nsid: must be printable ASCII of at most 255 characters",
    ),
    err(
        "server-version-not-ascii",
        'server.version = "blöckd"',
        "server.version: must be printable ASCII of at most 255 characters",
    ),
    err("server-identity-not-a-string", "server.identity = 1", "server.identity: must be a string, not an integer"),
    err("server-unknown-key", "server.port = 53", f"server.port: unknown key (known: {SERVER_KEYS})"),
    err(
        "upstream-unknown-key",
        "upstream.server = []",
        "upstream.server: unknown key (known: servers, timeout, forward_ecs, strategy)",
    ),
    err("metrics-unknown-key", "metrics.enabled = false", "metrics.enabled: unknown key (known: listen)"),
    err("log-unknown-key", 'log.file = "q.log"', "log.file: unknown key (known: queries, path, client_ip)"),
    err("cache-unknown-key", "cache.ttl = 60", f"cache.ttl: unknown key (known: {CACHE_KEYS})"),
    err("egress-unknown-key", "egress.enable = true", f"egress.enable: unknown key (known: {EGRESS_KEYS})"),
    # -- value types and ranges ------------------------------------------------------------------
    err("string-wrong-type", "server.pidfile = 1", "server.pidfile: must be a string, not an integer"),
    err("string-datetime", "server.pidfile = 1979-05-27T07:32:00Z", "server.pidfile: must be a string, not datetime"),
    err("string-time", "server.pidfile = 07:32:00", "server.pidfile: must be a string, not time"),
    err("string-not-a-choice", 'log.queries = "blocks"', "log.queries: 'blocks' is not one of none, blocked, all"),
    err("string-choice-case", 'log.client_ip = "Hash"', "log.client_ip: 'Hash' is not one of full, truncate, hash"),
    err("number-string", 'server.tcp_idle_timeout = "10"', "server.tcp_idle_timeout: must be a number, not a string"),
    err("number-boolean", "upstream.timeout = true", "upstream.timeout: must be a number, not a boolean"),
    err("integer-float", "cache.size = 1.5", "cache.size: must be an integer, not a number"),
    err(
        "integer-boolean",
        "server.tcp_max_connections = false",
        "server.tcp_max_connections: must be an integer, not a boolean",
    ),
    err(
        "number-below-range",
        "server.tcp_idle_timeout = 0.05",
        "server.tcp_idle_timeout: 0.05 is out of range 0.1..3600",
    ),
    err("number-above-range", "upstream.timeout = 31", "upstream.timeout: 31 is out of range 0.05..30"),
    err("number-nan", "upstream.timeout = nan", "upstream.timeout: nan is out of range 0.05..30"),
    err("number-inf", "server.tcp_idle_timeout = inf", "server.tcp_idle_timeout: inf is out of range 0.1..3600"),
    err(
        "integer-below-range",
        "server.tcp_max_connections = 0",
        "server.tcp_max_connections: 0 is out of range 1..100000",
    ),
    err("integer-above-range", "cache.size = 10_000_001", "cache.size: 10000001 is out of range 0..10000000"),
    ok("number-integer-for-float", "upstream.timeout = 1", "upstream.timeout", 1),
    ok("number-range-low-inclusive", "server.tcp_idle_timeout = 0.1", "server.tcp_idle_timeout", 0.1),
    ok("integer-range-high-inclusive", "server.tcp_max_connections = 100000", "server.tcp_max_connections", 100000),
    err("boolean-string", 'upstream.forward_ecs = "true"', "upstream.forward_ecs: must be true or false, not a string"),
    err("boolean-integer", "upstream.forward_ecs = 1", "upstream.forward_ecs: must be true or false, not an integer"),
    ok("boolean", "upstream.forward_ecs = true", "upstream.forward_ecs", True),
    ok("upstream-strategy", 'upstream.strategy = "parallel"', "upstream.strategy", "parallel"),
    err(
        "upstream-strategy-unknown",
        'upstream.strategy = "random"',
        "upstream.strategy: 'random' is not one of ordered, fastest, parallel",
    ),
    err(
        "list-not-a-list",
        'server.trusted_forwarders = "10.0.0.0/8"',
        "server.trusted_forwarders: must be a list of strings, not a string",
    ),
    err("list-item-integer", 'server.allow = ["10.0.0.0/8", 10]', "server.allow[1]: must be a string, not an integer"),
    err("list-item-table", "egress.prefixes = [{path = 'p.txt'}]", "egress.prefixes[0]: must be a string, not a table"),
    ok("pidfile-relative", 'server.pidfile = "run/blockd.pid"', "server.pidfile", BASE / "run/blockd.pid"),
    ok("pidfile-absolute", 'server.pidfile = "/run/blockd.pid"', "server.pidfile", Path("/run/blockd.pid")),
    ok("pidfile-empty-is-none", 'server.pidfile = ""', "server.pidfile", None),
    # -- networks --------------------------------------------------------------------------------
    err(
        "network-host-bits",
        'server.allow = ["10.0.0.1/8"]',
        "server.allow[0]: '10.0.0.1/8' is not a valid network: host bits set; did you mean 10.0.0.0/8?",
    ),
    err(
        "network-host-bits-v6",
        'egress.never = ["2001:db8::1/32"]',
        "egress.never[0]: '2001:db8::1/32' is not a valid network: host bits set; did you mean 2001:db8::/32?",
    ),
    err(
        "network-prefix-too-long",
        'server.allow = ["::/129"]',
        "server.allow[0]: '::/129' is not a valid network: '::/129' does not appear to be an IPv4 or IPv6 network",
    ),
    err(
        "network-not-an-address",
        'groups.g = {networks = ["lan"]}',
        "groups.g.networks[0]: 'lan' is not a valid network: 'lan' does not appear to be an IPv4 or IPv6 network",
    ),
    err(
        "network-every-bad-item",
        'server.allow = ["10.0.0.1/8", "192.168.0.0/16", "x"]',
        "server.allow[0]: '10.0.0.1/8' is not a valid network: host bits set; did you mean 10.0.0.0/8?",
        "server.allow[2]: 'x' is not a valid network: 'x' does not appear to be an IPv4 or IPv6 network",
    ),
    ok(
        "network-address-is-a-host-network",
        'server.allow = ["192.0.2.1", "::1"]',
        "server.allow",
        (net("192.0.2.1/32"), net("::1/128")),
    ),
    ok("allow-default", "", "server.allow", tuple(net(n) for n in DEFAULT_ALLOW)),
    ok("allow-empty-list", "server.allow = []", "server.allow", ()),
    ok(
        "trusted-forwarders",
        'server.trusted_forwarders = ["10.1.0.0/16"]',
        "server.trusted_forwarders",
        (net("10.1.0.0/16"),),
    ),
    ok("egress-never", 'egress.never = ["2001:db8::/32"]', "egress.never", (net("2001:db8::/32"),)),
    # -- endpoints -------------------------------------------------------------------------------
    err("endpoint-missing-bracket", 'server.listen = ["[::1"]', "server.listen[0]: '[::1': missing ']'"),
    err(
        "endpoint-missing-bracket-port", 'upstream.servers = ["[::1:53"]', "upstream.servers[0]: '[::1:53': missing ']'"
    ),
    err(
        "endpoint-bracket-no-colon",
        'server.listen = ["[::1]53"]',
        "server.listen[0]: '[::1]53': expected [address]:port",
    ),
    err(
        "endpoint-bracket-empty-port",
        'server.listen = ["[::1]:"]',
        "server.listen[0]: '[::1]:': expected [address]:port",
    ),
    err(
        "endpoint-bracket-port-text",
        'upstream.servers = ["[::1]:dns"]',
        "upstream.servers[0]: '[::1]:dns': expected [address]:port",
    ),
    err(
        "endpoint-bracket-port-negative",
        'server.listen = ["[::1]:-53"]',
        "server.listen[0]: '[::1]:-53': expected [address]:port",
    ),
    err(
        "endpoint-port-text",
        'server.listen = ["127.0.0.1:dns"]',
        "server.listen[0]: '127.0.0.1:dns': port must be a number",
    ),
    err(
        "endpoint-port-empty",
        'upstream.servers = ["127.0.0.1:"]',
        "upstream.servers[0]: '127.0.0.1:': port must be a number",
    ),
    err(
        "endpoint-port-negative",
        'server.listen = ["127.0.0.1:-1"]',
        "server.listen[0]: '127.0.0.1:-1': port must be a number",
    ),
    err(
        "endpoint-port-space",
        'server.listen = ["127.0.0.1: 53"]',
        "server.listen[0]: '127.0.0.1: 53': port must be a number",
    ),
    err(
        "endpoint-port-superscript",
        'server.listen = ["127.0.0.1:²"]',
        "server.listen[0]: '127.0.0.1:²': port must be a number",
    ),
    err(
        "endpoint-port-arabic-indic",
        'server.listen = ["127.0.0.1:٥٣"]',
        "server.listen[0]: '127.0.0.1:٥٣': port must be a number",
    ),
    err(
        "endpoint-bracket-port-superscript",
        'server.listen = ["[::1]:²"]',
        "server.listen[0]: '[::1]:²': expected [address]:port",
    ),
    err(
        "endpoint-port-zero",
        'server.listen = ["127.0.0.1:0"]',
        "server.listen[0]: '127.0.0.1:0': port 0 out of range 1..65535",
    ),
    err(
        "endpoint-port-too-big",
        'upstream.servers = ["127.0.0.1:65536"]',
        "upstream.servers[0]: '127.0.0.1:65536': port 65536 out of range 1..65535",
    ),
    err(
        "endpoint-bracket-port-zero",
        'server.listen = ["[::1]:0"]',
        "server.listen[0]: '[::1]:0': port 0 out of range 1..65535",
    ),
    err(
        "endpoint-bracket-port-too-big",
        'server.listen = ["[::1]:70000"]',
        "server.listen[0]: '[::1]:70000': port 70000 out of range 1..65535",
    ),
    err(
        "endpoint-hostname",
        'upstream.servers = ["dns.google:53"]',
        "upstream.servers[0]: 'dns.google:53': 'dns.google' is not an IP address",
    ),
    err(
        "endpoint-hostname-no-port",
        'upstream.servers = ["localhost"]',
        "upstream.servers[0]: 'localhost': 'localhost' is not an IP address",
    ),
    err(
        "endpoint-bracket-hostname",
        'server.listen = ["[localhost]:53"]',
        "server.listen[0]: '[localhost]:53': 'localhost' is not an IP address",
    ),
    err("endpoint-short-ipv4", 'upstream.servers = ["1.1"]', "upstream.servers[0]: '1.1': '1.1' is not an IP address"),
    err("endpoint-empty-string", 'server.listen = [""]', "server.listen[0]: '': '' is not an IP address"),
    err("endpoint-bad-port-and-host", 'server.listen = ["x:0"]', "server.listen[0]: 'x:0': 'x' is not an IP address"),
    err(
        "endpoint-every-bad-item",
        'server.listen = ["127.0.0.1", "[::1", "::1", "x"]',
        "server.listen[1]: '[::1': missing ']'",
        "server.listen[3]: 'x': 'x' is not an IP address",
    ),
    ok("endpoint-v4-default-port", 'server.listen = ["127.0.0.2"]', "server.listen", (ep("127.0.0.2"),)),
    ok("endpoint-v4-port", 'server.listen = ["0.0.0.0:5353"]', "server.listen", (ep("0.0.0.0", 5353),)),
    ok(
        "endpoint-v4-port-bounds",
        'upstream.servers = ["192.0.2.1:1", "192.0.2.2:65535"]',
        "upstream.servers",
        (ep("192.0.2.1", 1), ep("192.0.2.2", 65535)),
    ),
    ok("endpoint-v6-bracket-default-port", 'server.listen = ["[::1]"]', "server.listen", (ep("::1"),)),
    ok("endpoint-v6-bracket-port", 'server.listen = ["[::1]:5353"]', "server.listen", (ep("::1", 5353),)),
    ok("endpoint-v6-bare", 'upstream.servers = ["2001:db8::53"]', "upstream.servers", (ep("2001:db8::53"),)),
    ok("endpoint-v6-bare-last-group-is-no-port", 'upstream.servers = ["::1:53"]', "upstream.servers", (ep("::1:53"),)),
    ok("endpoint-v6-normalized", 'upstream.servers = ["[2001:DB8:0::1]:53"]', "upstream.servers", (ep("2001:db8::1"),)),
    ok("endpoint-v4-in-brackets", 'server.listen = ["[127.0.0.1]:54"]', "server.listen", (ep("127.0.0.1", 54),)),
    ok("listen-default", "", "server.listen", (ep("127.0.0.1", 5353),)),
    ok(
        "listen-several",
        'server.listen = ["127.0.0.1", "[::1]:5353"]',
        "server.listen",
        (ep("127.0.0.1"), ep("::1", 5353)),
    ),
    # -- listen and servers: empty ---------------------------------------------------------------
    err("listen-empty", "server.listen = []", "server.listen: must name at least one address"),
    err(
        "listen-not-a-list",
        'server.listen = "127.0.0.1"',
        "server.listen: must be a list of strings, not a string",
        "server.listen: must name at least one address",
    ),
    err(
        "listen-only-non-strings",
        "server.listen = [53]",
        "server.listen[0]: must be a string, not an integer",
        "server.listen: must name at least one address",
    ),
    err("servers-empty", "upstream.servers = []", "upstream.servers: must name at least one upstream resolver"),
    err(
        "servers-not-a-list",
        'upstream.servers = "1.1.1.1"',
        "upstream.servers: must be a list of strings, not a string",
        "upstream.servers: must name at least one upstream resolver",
    ),
    # -- servers from resolv.conf ----------------------------------------------------------------
    ok("servers-from-resolv-conf", "", "upstream", LOCAL_UPSTREAM),
    ok(
        "servers-from-resolv-conf-skips-junk",
        "",
        "upstream.servers",
        (ep("192.0.2.53"), ep("2001:db8::53"), ep("fe80::1")),
        resolv=MESSY_RESOLV,
    ),
    ok(
        "servers-set-resolv-conf-unused",
        'upstream.servers = ["192.0.2.1"]',
        "upstream.servers",
        (ep("192.0.2.1"),),
        resolv=None,
    ),
    err(
        "servers-missing-resolv-conf-no-nameserver",
        "",
        f"upstream.servers: not set, and {RESOLV} names no nameserver",
        resolv="search example\nnameserver localhost\n",
    ),
    err(
        "servers-missing-resolv-conf-empty",
        "[upstream]",
        f"upstream.servers: not set, and {RESOLV} names no nameserver",
        resolv="",
    ),
    err(
        "servers-missing-no-resolv-conf",
        "",
        f"upstream.servers: not set, and {RESOLV} names no nameserver",
        resolv=None,
    ),
    # -- cache -----------------------------------------------------------------------------------
    err(
        "cache-min-ttl-above-max-ttl",
        "cache = {min_ttl = 600, max_ttl = 300}",
        "cache.min_ttl: 600 is larger than cache.max_ttl (300)",
    ),
    err(
        "cache-min-ttl-above-max-ttl-zero",
        "cache.min_ttl = 1\ncache.max_ttl = 0",
        "cache.min_ttl: 1 is larger than cache.max_ttl (0)",
    ),
    err("cache-min-ttl-out-of-range", "cache.min_ttl = 86401", "cache.min_ttl: 86401 is out of range 0..86400"),
    err("cache-max-ttl-out-of-range", "cache.max_ttl = 604801", "cache.max_ttl: 604801 is out of range 0..604800"),
    ok("cache-min-ttl-equals-max-ttl", "cache = {min_ttl = 60, max_ttl = 60}", "cache", CacheConfig(100_000, 60, 60)),
    ok("cache-defaults", "", "cache", CacheConfig()),
    # -- egress ----------------------------------------------------------------------------------
    err(
        "egress-table-reserved",
        "egress.table = 254",
        "egress.table: 254 is not usable (1..4294967295, not 253/254/255)",
    ),
    err("egress-table-zero", "egress.table = 0", "egress.table: 0 is out of range 1..4294967295"),
    err("egress-table-too-big", "egress.table = 4294967296", "egress.table: 4294967296 is out of range 1..4294967295"),
    err(
        "egress-rule-band-reaches-main",
        "egress.rule_priority = 32700",
        "egress.rule_priority: band 32700..32799 must lie within 1..32765, before the main table's rule",
    ),
    err(
        "egress-rule-priority-out-of-range",
        "egress.rule_priority = 32766",
        "egress.rule_priority: 32766 is out of range 1..32765",
    ),
    err(
        "egress-route-protocol-reserved",
        "egress.route_protocol = 186",
        "egress.route_protocol: 186 is reserved or out of range 1..255",
    ),
    err(
        "egress-route-protocol-out-of-range",
        "egress.route_protocol = 256",
        "egress.route_protocol: 256 is out of range 1..255",
    ),
    err(
        "egress-several-problems",
        "egress = {table = 253, route_protocol = 2}",
        "egress.table: 253 is not usable (1..4294967295, not 253/254/255)",
        "egress.route_protocol: 2 is reserved or out of range 1..255",
    ),
    err("egress-on-exit", 'egress.on_exit = "flush"', "egress.on_exit: 'flush' is not one of keep, remove"),
    err(
        "egress-learn-min-ttl-negative",
        "egress.learn_min_ttl = -1",
        "egress.learn_min_ttl: -1 is out of range 0..2592000",
    ),
    err("egress-learn-max-negative", "egress.learn_max = -1", "egress.learn_max: -1 is out of range 0..10000000"),
    err(
        "egress-reconcile-interval-zero",
        "egress.reconcile_interval = 0",
        "egress.reconcile_interval: 0 is out of range 1..86400",
    ),
    err("egress-enabled-not-boolean", 'egress.enabled = "yes"', "egress.enabled: must be true or false, not a string"),
    ok("egress-rule-band-ends-before-main", "egress.rule_priority = 32666", "egress.rule_priority", 32666),
    ok(
        "egress-prefixes-relative",
        'egress.prefixes = ["p.txt", "/etc/p.txt"]',
        "egress.prefixes",
        (BASE / "p.txt", Path("/etc/p.txt")),
    ),
    ok("egress-defaults", "", "egress", EgressSettings()),
    ok(
        "egress-on-exit-remove",
        'egress = {enabled = true, on_exit = "remove"}',
        "egress",
        EgressSettings(enabled=True, on_exit="remove"),
    ),
    # -- metrics ---------------------------------------------------------------------------------
    ok("metrics-default", "", "metrics.listen", ep("127.0.0.1", 9553)),
    ok("metrics-empty-is-off", 'metrics.listen = ""', "metrics", MetricsConfig(listen=None)),
    ok("metrics-default-port", 'metrics.listen = "[::1]"', "metrics.listen", ep("::1", 9553)),
    ok("metrics-port", 'metrics.listen = "0.0.0.0:9100"', "metrics.listen", ep("0.0.0.0", 9100)),
    err("metrics-not-a-string", "metrics.listen = 9553", "metrics.listen: must be a string, not an integer"),
    err(
        "metrics-hostname",
        'metrics.listen = "localhost:9553"',
        "metrics.listen: 'localhost:9553': 'localhost' is not an IP address",
    ),
    err(
        "metrics-port-out-of-range",
        'metrics.listen = "127.0.0.1:0"',
        "metrics.listen: '127.0.0.1:0': port 0 out of range 1..65535",
    ),
    err("metrics-missing-bracket", 'metrics.listen = "[::1:9553"', "metrics.listen: '[::1:9553': missing ']'"),
    # -- dnstap ----------------------------------------------------------------------------------
    ok("dnstap-off-by-default", "", "dnstap", DnstapConfig()),
    ok("dnstap-unix-relative", 'dnstap.socket = "unix:run/dt.sock"', "dnstap.target", f"unix:{BASE / 'run/dt.sock'}"),
    ok(
        "dnstap-unix-absolute",
        'dnstap.socket = "unix:/run/blockd/dt.sock"',
        "dnstap.target",
        "unix:/run/blockd/dt.sock",
    ),
    ok("dnstap-tcp", 'dnstap.socket = "tcp:127.0.0.1:6000"', "dnstap.target", "tcp:127.0.0.1:6000"),
    ok("dnstap-tcp-default-port", 'dnstap.socket = "tcp:127.0.0.1"', "dnstap.target", "tcp:127.0.0.1:6000"),
    ok("dnstap-tcp-v6", 'dnstap.socket = "tcp:[::1]:6000"', "dnstap.target", "tcp:[::1]:6000"),
    ok("dnstap-file", 'dnstap.file = "tap/blockd.fstrm"', "dnstap.target", f"file:{BASE / 'tap/blockd.fstrm'}"),
    ok("dnstap-messages", 'dnstap.messages = "blocked"', "dnstap.messages", "blocked"),
    ok("dnstap-forwarder", "dnstap.forwarder = true", "dnstap.forwarder", True),
    ok("dnstap-identity", 'dnstap.identity = "resolver-brussels-1"', "dnstap.identity", "resolver-brussels-1"),
    err(
        "dnstap-socket-kind",
        'dnstap.socket = "udp:127.0.0.1:6000"',
        "dnstap.socket: 'udp:127.0.0.1:6000': " + SOCKET_FORMS,
    ),
    err(
        "dnstap-socket-bare-path",
        'dnstap.socket = "/run/dt.sock"',
        "dnstap.socket: '/run/dt.sock': " + SOCKET_FORMS,
    ),
    err(
        "dnstap-tcp-host-name",
        'dnstap.socket = "tcp:collector:6000"',
        "dnstap.socket: 'collector:6000': 'collector' is not an IP address",
    ),
    err(
        "dnstap-unix-nul",
        'dnstap.socket = "unix:/run/a\\u0000b"',
        "dnstap.socket: 'unix:/run/a\\x00b': NUL in the socket path",
    ),
    err("dnstap-both", 'dnstap.socket = "unix:/a"\ndnstap.file = "/b"', "dnstap.file: set socket or file, not both"),
    err(
        "dnstap-messages-bad",
        'dnstap.messages = "queries"',
        "dnstap.messages: 'queries' is not one of all, blocked, responses",
    ),
    err(
        "dnstap-forwarder-not-bool", 'dnstap.forwarder = "yes"', "dnstap.forwarder: must be true or false, not a string"
    ),
    err(
        "dnstap-unknown-key",
        'dnstap.path = "/a"',
        "dnstap.path: unknown key (known: socket, file, identity, version, messages, forwarder)",
    ),
    # -- log -------------------------------------------------------------------------------------
    ok("log-path-relative-to-config-dir", 'log.path = "log/queries.log"', "log.path", str(BASE / "log/queries.log")),
    ok("log-path-absolute", 'log.path = "/var/log/blockd.log"', "log.path", "/var/log/blockd.log"),
    ok("log-path-stdout", 'log.path = "-"', "log.path", "-"),
    ok("log-path-empty-is-stdout", 'log.path = ""', "log.path", "-"),
    ok("log-defaults", "", "log", LogConfig()),
    ok("log-choices", 'log = {queries = "all", client_ip = "hash"}', "log", LogConfig(queries="all", client_ip="hash")),
    err("log-path-not-a-string", "log.path = false", "log.path: must be a string, not a boolean"),
    # -- lists -----------------------------------------------------------------------------------
    err("lists-not-a-table", "lists = 1", "lists: must be a table of lists, not an integer"),
    err("lists-array-of-tables", '[[lists]]\npath = "a.txt"', "lists: must be a table of lists, not a list"),
    err("list-not-a-table", 'lists.tiktok = "tiktok.txt"', "lists.tiktok: must be a table, not a string"),
    err(
        "list-builtin-ddr",
        'lists.ddr = {path = "ddr.txt"}',
        "lists.ddr: 'ddr' is the name of a built-in list; choose another",
    ),
    err(
        "list-builtin-firefox-canary",
        'lists.firefox-canary = {path = "c.txt"}',
        "lists.firefox-canary: 'firefox-canary' is the name of a built-in list; choose another",
    ),
    err(
        "list-builtin-private-relay",
        "[lists.icloud-private-relay]",
        "lists.icloud-private-relay: 'icloud-private-relay' is the name of a built-in list; choose another",
    ),
    err(
        "list-missing-path",
        "lists.x = {}",
        "lists.x.path: set exactly one of path (a list file) or zone (an RPZ zone from primaries)",
    ),
    err(
        "list-missing-path-with-action",
        'lists.x = {action = "nxdomain"}',
        "lists.x.path: set exactly one of path (a list file) or zone (an RPZ zone from primaries)",
    ),
    err("list-path-not-a-string", "lists.x = {path = ['x.txt']}", "lists.x.path: must be a string, not a list"),
    ok("list-match-exact", 'lists.x = {path = "x.txt", match = "exact"}', "lists.x.match", "exact"),
    ok("list-format-declared", 'lists.x = {path = "x.rpz", format = "rpz"}', "lists.x.format", "rpz"),
    ok("list-format-detected-later", 'lists.x = {path = "x.txt"}', "lists.x.format", None),
    ok(
        "list-zone-name-normalised",
        'lists.x = {zone = "RPZ.Gov.Example.", primaries = ["127.0.0.1"]}',
        "lists.x.zone",
        "rpz.gov.example",
    ),
    err(
        "list-bad-match",
        'lists.x = {path = "x.txt", match = "prefix"}',
        "lists.x.match: 'prefix' is not one of subtree, exact",
    ),
    err(
        "list-bad-format",
        'lists.x = {path = "x.txt", format = "json"}',
        "lists.x.format: 'json' is not one of list, rpz",
    ),
    err(
        "list-path-and-zone",
        'lists.x = {path = "x.txt", zone = "rpz.example", primaries = ["127.0.0.1"]}',
        "lists.x.path: set exactly one of path (a list file) or zone (an RPZ zone from primaries)",
    ),
    err(
        "list-zone-without-primaries",
        'lists.x = {zone = "rpz.example"}',
        "lists.x.primaries: missing (the primary servers to transfer the zone from)",
    ),
    err(
        "list-primaries-without-zone",
        'lists.x = {path = "x.txt", primaries = ["127.0.0.1"], tsig = "k.key"}',
        "lists.x.primaries: only for a list transferred from primaries (set zone)",
        "lists.x.tsig: only for a list transferred from primaries (set zone)",
    ),
    err(
        "list-bad-primary",
        'lists.x = {zone = "rpz.example", primaries = ["primary.example"]}',
        "lists.x.primaries[0]: 'primary.example': 'primary.example' is not an IP address",
    ),
    err(
        "list-match-on-rpz",
        'lists.x = {path = "x.rpz", format = "rpz", match = "exact"}',
        "lists.x.match: RPZ triggers say exact (name) or below (*.name) themselves",
    ),
    err(
        "list-zone-action-on-plain-list",
        'lists.x = {path = "x.txt", format = "list", action = "zone"}',
        "lists.x.action: 'zone' keeps an RPZ zone's own actions: only for RPZ lists",
    ),
    err(
        "list-transferred-zone-is-rpz",
        'lists.x = {zone = "rpz.example", primaries = ["127.0.0.1"], format = "list"}',
        "lists.x.format: a transferred zone is RPZ",
    ),
    err("list-zone-root", 'lists.x = {zone = ".", primaries = ["127.0.0.1"]}', "lists.x.zone: '.' is not a zone name"),
    err(
        "list-bad-action",
        'lists.x = {path = "x.txt", action = "block"}',
        f"lists.x.action: 'block' is not one of {ACTIONS}, zone",
    ),
    err(
        "list-unknown-key",
        'lists.x = {path = "x.txt", uri = "https://x"}',
        "lists.x.uri: unknown key (known: path, action, allow_shrink, format, match, zone, primaries, tsig, "
        "max_bytes, max_line_bytes, invalid_lines, url, refresh, ca_file, sha256, proxy)",
    ),
    err(
        "list-url-and-path",
        'lists.x = {path = "x.txt", url = "https://x.example/l.txt"}',
        "lists.x.path: not with url (a list is a file, a zone from primaries or a URL)",
    ),
    err(
        "list-url-not-http",
        'lists.x = {url = "ftp://x.example/l.txt"}',
        "lists.x.url: 'ftp://x.example/l.txt': expected an http:// or https:// URL",
    ),
    err(
        "list-url-bad-pin-and-ca-for-http",
        'lists.x = {url = "http://x.example/l.txt", sha256 = "abc", ca_file = "ca.pem"}',
        "lists.x.sha256: expected 64 hexadecimal digits (the SHA-256 of the download)",
        "lists.x.ca_file: only for an https:// URL",
    ),
    err(
        "list-url-proxy-not-http",
        'lists.x = {url = "https://x.example/l.txt", proxy = "socks5://10.0.0.8:1080"}',
        "lists.x.proxy: 'socks5://10.0.0.8:1080': expected http://host:port (an HTTP proxy, no credentials)",
    ),
    ok(
        "list-url-proxy",
        'lists.x = {url = "https://x.example/l.txt", proxy = "http://10.0.0.8:3128"}',
        "lists.x.proxy",
        ep("10.0.0.8", 3128),
    ),
    err(
        "list-refresh-without-url",
        'lists.x = {path = "x.txt", refresh = 60}',
        "lists.x.refresh: only for a list downloaded from a URL (set url)",
    ),
    ok(
        "list-url-copy-in-state-dir",
        'server.state_dir = "/var/lib/b"\nlists.x = {url = "https://x.example/l.txt", refresh = 3600}',
        "lists.x",
        ListConfig("x", Path("/var/lib/b/x.list"), url="https://x.example/l.txt", refresh=3600.0),
    ),
    err(
        "list-unknown-key-and-missing-path",
        'lists.x = {file = "x.txt"}',
        "lists.x.file: unknown key (known: path, action, allow_shrink, format, match, zone, primaries, tsig, "
        "max_bytes, max_line_bytes, invalid_lines, url, refresh, ca_file, sha256, proxy)",
        "lists.x.path: set exactly one of path (a list file) or zone (an RPZ zone from primaries)",
    ),
    err(
        "list-allow-shrink-not-boolean",
        'lists.x = {path = "x.txt", allow_shrink = "yes"}',
        "lists.x.allow_shrink: must be true or false, not a string",
    ),
    ok("list-relative-path", 'lists.x = {path = "domains/x.txt"}', "lists.x", ListConfig("x", BASE / "domains/x.txt")),
    ok("list-absolute-path", 'lists.x = {path = "/etc/blockd/x.txt"}', "lists.x.path", Path("/etc/blockd/x.txt")),
    ok(
        "list-action-and-shrink",
        'lists.x = {path = "x.txt", action = "monitor", allow_shrink = true}',
        "lists.x",
        ListConfig("x", BASE / "x.txt", "monitor", True),
    ),
    # -- groups ----------------------------------------------------------------------------------
    err("groups-not-a-table", "groups = 1", "groups: must be a table of groups, not an integer"),
    err("groups-array-of-tables", "[[groups]]\nnetworks = []", "groups: must be a table of groups, not a list"),
    err("group-not-a-table", 'groups.gov = "10.0.0.0/8"', "groups.gov: must be a table, not a string"),
    err(
        "group-reserved-name",
        'groups.none = {networks = ["10.0.0.0/8"]}',
        "groups.none: 'none' is reserved (it labels clients in no group)",
    ),
    err(
        "group-reserved-name-and-no-clients",
        "[groups.none]",
        "groups.none: 'none' is reserved (it labels clients in no group)",
        f"groups.none.networks: {NO_CLIENTS}",
    ),
    err("group-no-clients", "groups.gov = {}", f"groups.gov.networks: {NO_CLIENTS}"),
    err(
        "group-no-clients-with-lists",
        'lists.t = {path = "t.txt"}\ngroups.gov = {lists = ["t"]}',
        f"groups.gov.networks: {NO_CLIENTS}",
    ),
    err(
        "group-unknown-key",
        "groups.gov = {networks = [], ttl = 60, tll = 60}",
        f"groups.gov.tll: unknown key (known: {GROUP_KEYS})",
    ),
    err(
        "group-unknown-key-and-no-clients",
        'groups.gov = {network = ["10.0.0.0/8"]}',
        f"groups.gov.network: unknown key (known: {GROUP_KEYS})",
        f"groups.gov.networks: {NO_CLIENTS}",
    ),
    err(
        "group-networks-not-a-list",
        'groups.gov = {networks = "10.0.0.0/8"}',
        "groups.gov.networks: must be a list of strings, not a string",
    ),
    err(
        "group-unknown-list-none-defined",
        'groups.gov = {networks = [], lists = ["tiktok"]}',
        "groups.gov.lists[0]: unknown list 'tiktok' (defined lists: none defined)",
    ),
    err(
        "group-unknown-list",
        'lists.a = {path = "a"}\nlists.b = {path = "b"}\ngroups.gov = {networks = [], lists = ["a", "c"]}',
        "groups.gov.lists[1]: unknown list 'c' (defined lists: a, b)",
    ),
    err(
        "group-builtin-list-reference",
        'groups.gov = {networks = [], lists = ["ddr"]}',
        "groups.gov.lists[0]: unknown list 'ddr' (defined lists: none defined)",
    ),
    err(
        "group-list-with-errors-reported-once",
        'lists.a = {path = 1}\ngroups.gov = {networks = [], lists = ["a"]}',
        "lists.a.path: must be a string, not an integer",
    ),
    err(
        "group-lists-when-lists-not-a-table",
        'lists = 1\ngroups.gov = {networks = [], lists = ["a"]}',
        "lists: must be a table of lists, not an integer",
        "groups.gov.lists[0]: unknown list 'a' (defined lists: none defined)",
    ),
    err(
        "group-lists-not-a-list",
        'groups.gov = {networks = [], lists = "a"}',
        "groups.gov.lists: must be a list of strings, not a string",
    ),
    err(
        "group-lists-item-not-a-string",
        "groups.gov = {networks = [], lists = [1]}",
        "groups.gov.lists[0]: must be a string, not an integer",
    ),
    err(
        "group-allow-empty-label",
        'groups.gov = {networks = [], allow = ["a..example"]}',
        "groups.gov.allow[0]: empty label in 'a..example'",
    ),
    err(
        "group-allow-ip-address",
        'groups.gov = {networks = [], allow = ["10.0.0.1"]}',
        "groups.gov.allow[0]: '10.0.0.1' looks like an IP address, not a domain name",
    ),
    err(
        "group-allow-empty",
        'groups.gov = {networks = [], allow = ["ok.example", "."]}',
        "groups.gov.allow[1]: empty domain name",
    ),
    err(
        "group-allow-wildcard",
        'groups.gov = {networks = [], allow = ["*.example"]}',
        "groups.gov.allow[0]: invalid character in '*.example'",
    ),
    err(
        "group-allow-not-a-list",
        'groups.gov = {networks = [], allow = "ok.example"}',
        "groups.gov.allow: must be a list of strings, not a string",
    ),
    ok(
        "group-allow-normalized",
        'groups.gov = {networks = [], allow = ["WWW.Example.COM.", "bücher.example"]}',
        "groups.gov.allow",
        ("www.example.com", "xn--bcher-kva.example"),
    ),
    err(
        "group-sinkhole-ipv4-is-v6",
        'groups.gov = {networks = [], sinkhole_ipv4 = "::"}',
        "groups.gov.sinkhole_ipv4: '::' is not an IPv4 address",
    ),
    err(
        "group-sinkhole-ipv6-is-v4",
        'groups.gov = {networks = [], sinkhole_ipv6 = "0.0.0.0"}',
        "groups.gov.sinkhole_ipv6: '0.0.0.0' is not an IPv6 address",
    ),
    err(
        "group-sinkhole-ipv4-not-ip",
        'groups.gov = {networks = [], sinkhole_ipv4 = "sinkhole.example"}',
        "groups.gov.sinkhole_ipv4: 'sinkhole.example' is not an IP address",
    ),
    err(
        "group-sinkhole-ipv6-not-ip",
        'groups.gov = {networks = [], sinkhole_ipv6 = "::g"}',
        "groups.gov.sinkhole_ipv6: '::g' is not an IP address",
    ),
    err(
        "group-sinkhole-not-a-string",
        "groups.gov = {networks = [], sinkhole_ipv4 = 0}",
        "groups.gov.sinkhole_ipv4: must be a string, not an integer",
    ),
    ok(
        "group-sinkhole-ipv4",
        'groups.gov = {networks = [], sinkhole_ipv4 = "192.0.2.1"}',
        "groups.gov.sinkhole_ipv4",
        ipaddress.ip_address("192.0.2.1"),
    ),
    ok(
        "group-sinkhole-ipv6",
        'groups.gov = {networks = [], sinkhole_ipv6 = "2001:db8::1"}',
        "groups.gov.sinkhole_ipv6",
        ipaddress.ip_address("2001:db8::1"),
    ),
    err(
        "group-vlans-not-a-list",
        "groups.gov = {vlans = 10}",
        "groups.gov.vlans: must be a list of VLAN ids, not an integer",
    ),
    err(
        "group-vlans-table",
        "groups.gov = {vlans = {id = 10}}",
        "groups.gov.vlans: must be a list of VLAN ids, not a table",
    ),
    err("group-vlans-zero", "groups.gov = {vlans = [0]}", "groups.gov.vlans[0]: 0 is not a VLAN id (1..4094)"),
    err(
        "group-vlans-too-big",
        "groups.gov = {vlans = [10, 4095]}",
        "groups.gov.vlans[1]: 4095 is not a VLAN id (1..4094)",
    ),
    err("group-vlans-boolean", "groups.gov = {vlans = [true]}", "groups.gov.vlans[0]: True is not a VLAN id (1..4094)"),
    err("group-vlans-string", 'groups.gov = {vlans = ["10"]}', "groups.gov.vlans[0]: '10' is not a VLAN id (1..4094)"),
    err("group-vlans-float", "groups.gov = {vlans = [10.0]}", "groups.gov.vlans[0]: 10.0 is not a VLAN id (1..4094)"),
    err(
        "group-vlans-every-bad-item",
        "groups.gov = {vlans = [-1, 7, 5000]}",
        "groups.gov.vlans[0]: -1 is not a VLAN id (1..4094)",
        "groups.gov.vlans[2]: 5000 is not a VLAN id (1..4094)",
    ),
    ok("group-vlans-only", "groups.gov = {vlans = [1, 4094]}", "groups.gov", GroupConfig("gov", vlans=(1, 4094))),
    ok(
        "group-interfaces-only",
        'groups.gov = {interfaces = ["eth0.10", "wg0"]}',
        "groups.gov",
        GroupConfig("gov", interfaces=("eth0.10", "wg0")),
    ),
    err(
        "group-interfaces-not-strings",
        "groups.gov = {interfaces = [1]}",
        "groups.gov.interfaces[0]: must be a string, not an integer",
    ),
    ok("group-networks-empty-list", "groups.gov = {networks = []}", "groups.gov", GroupConfig("gov")),
    err(
        "group-action",
        'groups.gov = {networks = [], action = "drop"}',
        f"groups.gov.action: 'drop' is not one of {ACTIONS}",
    ),
    err(
        "group-ttl-negative",
        "groups.gov = {networks = [], ttl = -1}",
        "groups.gov.ttl: -1 is out of range 0..2147483647",
    ),
    err(
        "group-ttl-too-big",
        "groups.gov = {networks = [], ttl = 2147483648}",
        "groups.gov.ttl: 2147483648 is out of range 0..2147483647",
    ),
    err(
        "group-ttl-float", "groups.gov = {networks = [], ttl = 1.5}", "groups.gov.ttl: must be an integer, not a number"
    ),
    err(
        "group-block-ddr-not-boolean",
        'groups.gov = {networks = [], block_ddr = "no"}',
        "groups.gov.block_ddr: must be true or false, not a string",
    ),
    err(
        "group-block-canary-not-boolean",
        "groups.gov = {networks = [], block_firefox_canary = 0}",
        "groups.gov.block_firefox_canary: must be true or false, not an integer",
    ),
    err(
        "group-block-relay-not-boolean",
        "groups.gov = {networks = [], block_private_relay = []}",
        "groups.gov.block_private_relay: must be true or false, not a list",
    ),
    err(
        "group-answer-prefixes-not-a-list",
        'groups.gov = {networks = [], block_answer_prefixes = "p.txt"}',
        "groups.gov.block_answer_prefixes: must be a list of strings, not a string",
    ),
    ok(
        "group-answer-prefixes-relative",
        'groups.gov = {networks = [], block_answer_prefixes = ["p.txt", "/etc/p.txt"]}',
        "groups.gov.block_answer_prefixes",
        (BASE / "p.txt", Path("/etc/p.txt")),
    ),
    ok(
        "group-full",
        GROUP_FULL,
        "groups.gov",
        GroupConfig(
            "gov", (net("10.0.0.0/8"), net("2001:db8::/32")), ("t",), action="nxdomain", ttl=0, block_ddr=False
        ),
    ),
    ok(
        "groups-in-file-order",
        "groups.b = {networks = []}\ngroups.a = {networks = []}",
        "groups",
        {"b": GroupConfig("b"), "a": GroupConfig("a")},
    ),
    # -- every error at once ---------------------------------------------------------------------
    err("every-error-reported", EVERYTHING_WRONG, *EVERYTHING_WRONG_ERRORS),
]


def lookup(config: Config, attr: str | None) -> Any:
    value: Any = config
    for part in attr.split(".") if attr else ():
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("case", CASES)
def test_parse_config(case: Case, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    if case.resolv is not None:
        resolv.write_text(case.resolv)
    if not case.errors:
        assert lookup(parse_config(case.toml, SOURCE, BASE, resolv_conf=resolv), case.attr) == case.want
        return
    expected = [f"{SOURCE}: {error.replace(RESOLV, str(resolv))}" for error in case.errors]
    with pytest.raises(ConfigError) as raised:
        parse_config(case.toml, SOURCE, BASE, resolv_conf=resolv)
    assert raised.value.errors == expected
    assert str(raised.value) == "\n".join(expected)  # one line per problem


# -- load_config ---------------------------------------------------------------------------------


def test_embedded_default_loads(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(LOCAL_RESOLV)
    config = load_config(None, resolv_conf=resolv)
    domains = shipped_base_dir() / "domains"
    assert config.source == EMBEDDED_NAME
    assert config.server.listen == (ep("127.0.0.1", 5353),)
    assert config.upstream == LOCAL_UPSTREAM
    assert config.metrics.listen == ep("127.0.0.1", 9553)
    assert config.lists == {
        "tiktok": ListConfig("tiktok", domains / "tiktok.txt"),
        "bytedance": ListConfig("bytedance", domains / "bytedance.txt"),
        "doh-bypass": ListConfig("doh-bypass", domains / "doh-bypass.txt", action="nxdomain"),
    }
    assert all(entry.path.is_file() for entry in config.lists.values())
    assert config.groups == {
        "everyone": GroupConfig("everyone", (net("0.0.0.0/0"), net("::/0")), ("tiktok", "bytedance", "doh-bypass"))
    }


def test_embedded_default_needs_a_nameserver(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\n")
    with pytest.raises(ConfigError) as raised:
        load_config(None, resolv_conf=resolv)
    assert raised.value.errors == [f"{EMBEDDED_NAME}: upstream.servers: not set, and {resolv} names no nameserver"]


def test_file_paths_are_relative_to_the_file_and_errors_name_it(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "blockd.toml"
    path.write_text('[upstream]\nservers = ["127.0.0.1"]\n[lists.x]\npath = "x.txt"\n[log]\npath = "q.log"\n')
    config = load_config(path, resolv_conf=tmp_path / "absent")
    assert config.source == str(path)
    assert config.lists["x"].path == tmp_path.resolve() / "etc" / "x.txt"
    assert config.log.path == str(tmp_path.resolve() / "etc" / "q.log")
    path.write_text("[server]\nlisten = []\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, resolv_conf=tmp_path / "absent")
    assert raised.value.errors == [
        f"{path}: server.listen: must name at least one address",
        f"{path}: upstream.servers: not set, and {tmp_path / 'absent'} names no nameserver",
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(None, "No such file or directory", id="missing"),
        pytest.param("directory", "not a regular file (directory)", id="directory"),
        pytest.param(b"[log]\n#\xff\n", NOT_UTF8_REASON, id="not-utf8"),
        pytest.param(b"\xef\xbb\xbf[log]\n", None, id="utf8-bom-is-invalid-toml"),
    ],
)
def test_unreadable_config(tmp_path: Path, content: bytes | str | None, reason: str | None) -> None:
    path = tmp_path / "blockd.toml"
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_config(path, resolv_conf=tmp_path / "resolv.conf")
    if reason is None:  # read fine, but a BOM is not TOML
        assert raised.value.errors == [f"{path}: invalid TOML: Invalid statement (at line 1, column 1)"]
    else:
        assert raised.value.errors == [f"{path}: cannot read config: {reason}"]


def test_unreadable_config_without_strerror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> bytes:
        raise OSError("stale handle")

    monkeypatch.setattr(config_module, "read_bytes", fail)
    path = tmp_path / "blockd.toml"
    with pytest.raises(ConfigError) as raised:
        load_config(path, resolv_conf=tmp_path / "resolv.conf")
    assert raised.value.errors == [f"{path}: cannot read config: stale handle"]
