"""The netlink adapter: the only module of blockd that imports pyroute2.

It reads and changes exactly what blockd owns (see blockd.egress): rules in blockd's table
and priority band, routes in blockd's table carrying blockd's route protocol.  It never
flushes, and never reads anything else as its own.  It also reads interface addresses (for
groups defined by interface name or VLAN id) and watches rtnetlink notifications.

Threading: a NetlinkAdapter is not thread-safe.  The daemon runs every netlink call in one
worker thread, off the reactor (blockd.egress_service.ThreadRunner); the adapter opens its
sockets lazily in the first thread that uses it and refuses calls from any other thread.
NetlinkWatcher runs its own thread and socket and only reports what changed.

Needs pyroute2 >= 0.9.1 (IPRoute(netns=...)); a namespace is opened with flags=0, so a
missing namespace is an error instead of being created.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from twisted.logger import Logger

from blockd.egress import EgressSettings, KernelState, NetlinkChange, Plan, Route, Rule
from blockd.prefix_table import IPNetwork

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12  # Linux 4.20+: dump requests may carry filters the kernel applies
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP_INTR = 0x10
RT_TABLE_COMPAT = 252  # rtm_table when the real table id (> 255) is in RTA_TABLE
RTA_TABLE = 15
FRA_TABLE = 15
FR_ACT_TO_TBL = 1
CAP_NET_ADMIN = 12
_log = Logger()
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")  # also the layout of struct fib_rule_hdr
_RTATTR = struct.Struct("=HH")

_ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw"}
_ROUTE_TYPE_IDS = {name: number for number, name in _ROUTE_TYPES.items()}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# Rule selectors blockd never sets: a rule with any of them is not one of blockd's.
_FOREIGN_RULE_ATTRS = (
    "FRA_DST",
    "FRA_IIFNAME",
    "FRA_OIFNAME",
    "FRA_FWMARK",
    "FRA_FWMASK",
    "FRA_UID_RANGE",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
    "FRA_IP_PROTO",
    "FRA_L3MDEV",
    "FRA_TUN_ID",
    "FRA_GOTO",
)
_NO_SUPPRESS = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN as the kernel reports "not set"
_DUMP_ATTEMPTS = 5
_DUMP_TIMEOUT = 10.0  # seconds; a dump that stalls fails the reconcile instead of the worker


class CapabilityError(Exception):
    pass


class ApplyError(Exception):
    """Some operations of a plan failed; the others were applied."""

    def __init__(self, failures: list[str], applied: int):
        super().__init__(f"{len(failures)} netlink operation(s) failed: " + "; ".join(failures[:5]))
        self.failures = failures
        self.applied = applied


# -- link messages ---------------------------------------------------------------------------


def _attr(message: Any, name: str) -> Any:
    """An attribute of a pyroute2 message, nested attribute, or dict shaped like one."""
    if message is None:
        return None
    get_attr = getattr(message, "get_attr", None)
    if callable(get_attr):
        return get_attr(name)
    if isinstance(message, Mapping):
        for pair in message.get("attrs", ()):
            if pair[0] == name:
                return pair[1]
    return None


def vlan_id_of(link_message: Any) -> int | None:
    """The 802.1Q VLAN id of an RTM_NEWLINK message (an ifinfmsg or a dict), None if not a VLAN."""
    linkinfo = _attr(link_message, "IFLA_LINKINFO")
    if _attr(linkinfo, "IFLA_INFO_KIND") != "vlan":
        return None
    vlan_id = _attr(_attr(linkinfo, "IFLA_INFO_DATA"), "IFLA_VLAN_ID")
    return vlan_id if isinstance(vlan_id, int) and not isinstance(vlan_id, bool) else None


def has_cap_net_admin(status_text: str) -> bool:
    """Whether CapEff in a /proc/<pid>/status text includes CAP_NET_ADMIN."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def check_capability(status_path: Path = Path("/proc/self/status")) -> None:
    """Raise CapabilityError unless this process may change routes and rules."""
    try:
        text = status_path.read_text()
    except OSError as exc:
        raise CapabilityError(f"cannot read {status_path} to check for CAP_NET_ADMIN: {exc.strerror}") from None
    if not has_cap_net_admin(text):
        raise CapabilityError(
            "egress blocking needs CAP_NET_ADMIN to manage routes and rules: run blockd as root, or grant "
            "AmbientCapabilities=CAP_NET_ADMIN in its systemd unit, or set [egress] enabled = false"
        )


def _network(address: str | None, prefixlen: int, version: int) -> IPNetwork:
    if not address:
        address = "0.0.0.0" if version == 4 else "::"
    return ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)


# -- the adapter -----------------------------------------------------------------------------


class NetlinkAdapter:
    """Reads and changes blockd's rules and routes, and reads interface addresses.

    Not thread-safe: use it from one thread only (see the module docstring).
    """

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._ipr: IPRoute | None = None
        self._dump_socket: socket.socket | None = None
        self._strict = False
        self._sequence = 0
        self._thread: int | None = None

    # The capability is the process's, whichever namespace the adapter works in.
    check_capability = staticmethod(check_capability)

    def _check_thread(self) -> None:
        current = threading.get_ident()
        if self._thread is None:
            self._thread = current
        elif self._thread != current:
            raise RuntimeError("NetlinkAdapter is not thread-safe: use it from one thread only")

    def _iproute(self) -> IPRoute:
        self._check_thread()
        if self._ipr is None:
            # groups=0: this socket only asks; notifications go to NetlinkWatcher.
            self._ipr = IPRoute(netns=self.netns, flags=0, groups=0)
        return self._ipr

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        dump_socket, self._dump_socket = self._dump_socket, None
        if ipr is not None:
            ipr.close()
        if dump_socket is not None:
            dump_socket.close()

    # -- blockd's state ------------------------------------------------------------------

    def owned_state(self, settings: EgressSettings) -> KernelState:
        """Rules in blockd's table and band, routes in blockd's table with blockd's proto."""
        self._check_thread()
        rules: list[Rule] = []
        routes: list[Route] = []
        for version, family in _FAMILY.items():
            for message in self._retry_dump(functools.partial(self._rules_of, family)):
                rule = self._owned_rule(message, version, settings)
                if rule is not None:
                    rules.append(rule)
            for message in self._dump_routes(family, settings.table, settings.route_protocol):
                route = self._owned_route(message, version, settings)
                if route is not None:
                    routes.append(route)
        return KernelState(tuple(rules), tuple(routes))

    def _rules_of(self, family: int) -> Iterable[Any]:
        return self._iproute().get_rules(family=family)

    @staticmethod
    def _owned_rule(message: Any, version: int, settings: EgressSettings) -> Rule | None:
        priority = message.get("priority") or 0
        table = message.get("table")
        if table != settings.table or priority not in settings.rule_band:
            return None
        if message["action"] != FR_ACT_TO_TBL or message["dst_len"] or message["tos"] or message["flags"]:
            return None
        if any(_attr(message, name) is not None for name in _FOREIGN_RULE_ATTRS):
            return None
        if _attr(message, "FRA_SUPPRESS_PREFIXLEN") not in (None, _NO_SUPPRESS):
            return None
        source = _network(message.get("src"), message["src_len"], version)
        return Rule(version, source, table, priority, message.get("FRA_PROTOCOL") or 0)

    @staticmethod
    def _owned_route(message: Any, version: int, settings: EgressSettings) -> Route | None:
        table = message.get("table")
        if table != settings.table or message["proto"] != settings.route_protocol:
            return None
        destination = _network(message.get("dst"), message["dst_len"], version)
        route_type = _ROUTE_TYPES.get(message["type"], str(message["type"]))
        return Route(version, destination, table, route_type, message["proto"], message.get("priority"))

    def apply(self, plan: Plan) -> int:
        """Apply plan in its documented order; every operation is tried.  Returns how many succeeded.

        Adding what exists and deleting what is gone count as success (someone else, or an
        earlier interrupted run, got there first).  Raises ApplyError listing the failures.
        """
        ipr = self._iproute()
        failures: list[str] = []
        applied = 0

        def attempt(description: str, call: Callable[[], object], tolerated: Collection[int]) -> None:
            nonlocal applied
            try:
                call()
            except NetlinkError as exc:
                if exc.code not in tolerated:
                    failures.append(f"{description}: {os.strerror(exc.code)}")
                    return
            applied += 1

        def route_call(command: str, route: Route) -> Callable[[], object]:
            return lambda: ipr.route(command, **self._route_spec(route))

        def rule_call(command: str, rule: Rule, adding: bool = True) -> Callable[[], object]:
            return lambda: ipr.rule(command, **self._rule_spec(rule, adding=adding))

        gone = (errno.ENOENT, errno.ESRCH)
        conflicting = plan.conflicting_deletes()
        for route in conflicting:
            attempt(f"del route {route}", route_call("del", route), gone)
        for route in plan.add_routes:
            attempt(f"add route {route}", route_call("replace", route), ())
        for rule in plan.add_rules:
            attempt(f"add rule {rule}", rule_call("add", rule), (errno.EEXIST,))
        for rule in plan.del_rules:
            attempt(f"del rule {rule}", rule_call("del", rule, adding=False), gone)
        replaced = {route.key for route in plan.add_routes}
        for route in (r for r in plan.del_routes if r.key not in replaced):
            attempt(f"del route {route}", route_call("del", route), gone)
        if failures:
            raise ApplyError(failures, applied)
        return applied

    def remove_all(self, settings: EgressSettings) -> int:
        """Delete every rule and route blockd owns (on_exit = "remove"); returns how many."""
        actual = self.owned_state(settings)
        return self.apply(Plan(del_rules=actual.rules, del_routes=actual.routes))

    @staticmethod
    def _rule_spec(rule: Rule, adding: bool = True) -> dict[str, Any]:
        spec: dict[str, Any] = {"family": _FAMILY[rule.version], "priority": rule.priority, "table": rule.table}
        if rule.source.prefixlen:
            spec["src"] = str(rule.source.network_address)
            spec["src_len"] = rule.source.prefixlen
        if adding and rule.proto:
            spec["protocol"] = rule.proto  # shows as "proto 120" in `ip rule`: whose rule it is
        return spec

    @staticmethod
    def _route_spec(route: Route) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "family": _FAMILY[route.version],
            "dst": str(route.destination.network_address),
            "dst_len": route.destination.prefixlen,
            "table": route.table,
            "proto": route.proto,
            "type": _ROUTE_TYPE_IDS.get(route.type) or int(route.type),  # unknown types are kept as numbers
        }
        if route.metric is not None:
            # IPv6 deletes ignore the type; the metric makes them name exactly one route.
            spec["priority"] = route.metric
        return spec

    # -- interfaces ----------------------------------------------------------------------

    def interface_networks(self, names: Collection[str], vlan_ids: Collection[int]) -> dict[str, tuple[IPNetwork, ...]]:
        """Connected subnets of the named interfaces and of every interface on one of vlan_ids.

        Keyed by interface name; an existing interface without addresses maps to ().  IPv6
        link-local subnets (fe80::/10) are left out: every interface has one.
        """
        ipr = self._iproute()
        wanted = set(names)
        vlans = set(vlan_ids)
        selected: dict[int, str] = {}
        for link in self._retry_dump(ipr.get_links):
            name = link.get("ifname")
            if name in wanted or (vlans and vlan_id_of(link) in vlans):
                selected[link["index"]] = name
        found: dict[str, set[IPNetwork]] = {name: set() for name in selected.values()}
        for message in self._retry_dump(ipr.get_addr):
            name = selected.get(message["index"])
            address = message.get("address")
            if name is None or address is None:
                continue
            network = ipaddress.ip_interface(f"{address}/{message['prefixlen']}").network
            if network.version == 6 and network.network_address.is_link_local:
                continue
            found[name].add(network)
        return {
            name: tuple(sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
            for name, networks in found.items()
        }

    # -- dumps -----------------------------------------------------------------------------

    @staticmethod
    def _retry_dump(dump: Callable[[], Iterable[Any]]) -> tuple[Any, ...]:
        for attempt in range(_DUMP_ATTEMPTS):
            try:
                return tuple(dump())
            except NetlinkDumpInterrupted:
                if attempt == _DUMP_ATTEMPTS - 1:
                    raise
        return ()

    def _dump_routes(self, family: int, table: int, proto: int) -> list[rtmsg]:
        """Routes of one table and proto.

        pyroute2's route dump filters in Python after the kernel sent the whole FIB (a full
        BGP table is a million routes); with NETLINK_GET_STRICT_CHK the kernel filters itself.
        Callers still check table and proto: kernels before 4.20 ignore the filter.
        """
        for _attempt in range(_DUMP_ATTEMPTS):
            try:
                return self._dump_routes_once(family, table, proto)
            except NetlinkDumpInterrupted:
                continue
        raise NetlinkDumpInterrupted()

    def _route_socket(self) -> socket.socket:
        if self._dump_socket is None:
            sock = pyroute2_netns.create_socket(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                self._strict = True
            except OSError:
                self._strict = False
            sock.bind((0, 0))
            sock.settimeout(_DUMP_TIMEOUT)
            self._dump_socket = sock
        return self._dump_socket

    def _dump_routes_once(self, family: int, table: int, proto: int) -> list[rtmsg]:
        self._check_thread()
        sock = self._route_socket()
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        sequence = self._sequence
        request = rtmsg()
        request["header"]["type"] = RTM_GETROUTE
        request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        request["header"]["sequence_number"] = sequence
        request["family"] = family
        if self._strict:
            request["table"] = table if table < 256 else RT_TABLE_COMPAT
            request["proto"] = proto
            request["attrs"] = [("RTA_TABLE", table)]
        request.encode()
        sock.send(request.data)
        routes: list[rtmsg] = []
        interrupted = False
        while True:
            data = sock.recv(1 << 20)
            for kind, flags, body, raw in _messages(data, sequence):
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if kind == NLMSG_DONE or kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                    # ENOENT: the table does not exist yet, which is an empty table.
                    if code and code != errno.ENOENT:
                        raise NetlinkError(code)
                    if interrupted:
                        raise NetlinkDumpInterrupted()
                    return routes
                if kind == RTM_NEWROUTE:
                    message = rtmsg(raw)
                    message.decode()
                    routes.append(message)


def _messages(data: bytes, sequence: int | None = None) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(type, flags, payload, whole message) of each netlink message in a datagram (of one sequence)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        if sequence is None or seq == sequence:
            yield kind, flags, data[offset + _NLMSGHDR.size : offset + length], data[offset : offset + length]
        offset += (length + 3) & ~3


def table_of(body: bytes) -> int | None:
    """The routing table of an rtmsg or fib_rule_hdr payload (RTA_TABLE/FRA_TABLE beats the byte)."""
    if len(body) < _RTMSG.size:
        return None
    table = body[4]
    offset = _RTMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        if kind & 0x3FFF == RTA_TABLE and length >= 8:
            return struct.unpack_from("=I", body, offset + 4)[0]
        offset += (length + 3) & ~3
    return table


# -- notifications ---------------------------------------------------------------------------

WATCH_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)
_KINDS = {
    RTM_NEWLINK: NetlinkChange.LINK,
    RTM_DELLINK: NetlinkChange.LINK,
    RTM_NEWADDR: NetlinkChange.ADDRESS,
    RTM_DELADDR: NetlinkChange.ADDRESS,
    RTM_NEWROUTE: NetlinkChange.ROUTE,
    RTM_DELROUTE: NetlinkChange.ROUTE,
    RTM_NEWRULE: NetlinkChange.RULE,
    RTM_DELRULE: NetlinkChange.RULE,
}


def changes_in(data: bytes, tables: Collection[int] | None = None) -> set[NetlinkChange]:
    """What one datagram of notifications was about; routes and rules only for `tables` if given."""
    changes = set()
    for kind, _flags, body, _raw in _messages(data):
        change = _KINDS.get(kind)
        if change is None:
            continue
        if change in (NetlinkChange.ROUTE, NetlinkChange.RULE) and tables is not None:
            if table_of(body) not in tables:
                continue
        changes.add(change)
    return changes


class NetlinkWatcher:
    """A thread reporting rtnetlink notifications: callback(NetlinkChange) from that thread.

    One callback per kind per datagram read, so a burst is a few calls, not thousands.  When
    the kernel drops notifications (ENOBUFS) every kind is reported: anything may have changed.
    Route and rule changes are reported only for `tables` when given (a gateway's main table
    may churn all day).  stop() wakes the thread through a pipe; there is no polling.
    """

    def __init__(
        self,
        callback: Callable[[NetlinkChange], None],
        netns: str | None = None,
        tables: Collection[int] | None = None,
        groups: int = WATCH_GROUPS,
    ):
        self.callback = callback
        self.netns = netns
        self.tables = frozenset(tables) if tables is not None else None
        self.groups = groups
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._wake_r = self._wake_w = -1

    def start(self) -> None:
        if self._thread is not None:
            return
        sock = pyroute2_netns.create_socket(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, self.groups))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="blockd-netlink-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        os.write(self._wake_w, b"x")
        thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        try:
            while True:
                watched: list[socket.socket | int] = [sock, self._wake_r]
                readable, _, _ = select.select(watched, [], [])
                if self._wake_r in readable:
                    return
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        changes = set(NetlinkChange)
                    elif exc.errno in (errno.EINTR, errno.EAGAIN):
                        continue
                    else:
                        raise
                else:
                    changes = changes_in(data, self.tables)
                for change in sorted(changes):
                    try:
                        self.callback(change)
                    except Exception:  # noqa: BLE001 (one bad callback must not end the watch)
                        _log.failure("netlink watcher: callback failed for {change}", change=str(change))
        except Exception:  # noqa: BLE001 (logged; the periodic re-reads and reconciles remain)
            _log.failure("netlink watcher stopped: changes are now seen only by the periodic re-reads")
        finally:
            self._socket = None
            sock.close()
