"""blockd.netlink against the real kernel, only inside network namespaces these tests create.

Every namespace is named blockd-t-<random> and deleted in the fixture's teardown, pass or
fail (tests/netns.py); nothing here reads or changes the host's own links, rules or routes,
and all traffic stays between namespaces joined by veth pairs.  Addresses come from the documentation ranges
and private ranges.  The tests that need a namespace run whenever the process is root and
`ip netns add` works (CI), and skip with the reason otherwise.

The message-parsing tests at the top need neither root nor a namespace.  802.1Q VLAN selection
is tested from hand-built link messages because the kernel of these machines cannot create
VLAN devices (no 8021q module): `ip link add link X name X.120 type vlan id 120` fails there.
"""

from __future__ import annotations

import errno
import ipaddress
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("pyroute2", reason="blockd.netlink needs pyroute2")

from pyroute2.netlink.rtnl import RTM_NEWLINK, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from blockd.egress import (
    EgressSettings,
    KernelState,
    LearnedAddresses,
    NetlinkChange,
    Plan,
    desired_state,
    diff,
)
from blockd.egress_service import EgressService
from blockd.netlink import (
    CapabilityError,
    NetlinkAdapter,
    NetlinkWatcher,
    changes_in,
    check_capability,
    has_cap_net_admin,
    table_of,
    vlan_id_of,
)
from blockd.netlink_services import NetlinkServices, SynchronousRunner
from tests.netns import (
    BLOCKED,
    blockd_rules,
    connect,
    ip,
    ip_batch,
    needs_netns,
    table_routes,
)

net = ipaddress.ip_network
addr = ipaddress.ip_address
SETTINGS = EgressSettings(enabled=True, never=(net("198.51.100.128/25"),))


# -- link messages and notifications, no kernel needed ----------------------------------------


def decoded(message: ifinfmsg) -> ifinfmsg:
    """Encode a hand-built message and decode it the way pyroute2 decodes kernel messages."""
    message["header"]["type"] = RTM_NEWLINK
    message.encode()
    (result,) = MarshalRtnl().parse(bytes(message.data))
    return result


def link_message(name: str, linkinfo: list | None) -> ifinfmsg:
    message = ifinfmsg()
    message["index"] = 7
    message["attrs"] = [("IFLA_IFNAME", name)]
    if linkinfo is not None:
        message["attrs"].append(("IFLA_LINKINFO", {"attrs": linkinfo}))
    return message


VLAN_120 = [("IFLA_INFO_KIND", "vlan"), ("IFLA_INFO_DATA", {"attrs": [("IFLA_VLAN_ID", 120)]})]


def test_vlan_id_of_a_vlan_link_message():
    # What the kernel sends for `ip link add link eth0 name eth0.120 type vlan id 120` (which this
    # kernel cannot create, so the message is built by hand and round-tripped through the codec).
    assert vlan_id_of(decoded(link_message("eth0.120", VLAN_120))) == 120
    assert vlan_id_of(link_message("eth0.120", VLAN_120)) == 120  # not encoded: plain nested dicts


def test_vlan_id_of_dict_shaped_messages():
    assert vlan_id_of({"attrs": [("IFLA_IFNAME", "eth0.7"), ("IFLA_LINKINFO", {"attrs": VLAN_120})]}) == 120
    assert vlan_id_of({"attrs": [("IFLA_IFNAME", "eth0")]}) is None
    assert vlan_id_of({}) is None


@pytest.mark.parametrize(
    "linkinfo",
    [
        None,  # lo, physical NICs: no IFLA_LINKINFO at all
        [("IFLA_INFO_KIND", "veth")],
        [("IFLA_INFO_KIND", "bridge"), ("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_VLAN_FILTERING", 1)]})],
        [("IFLA_INFO_KIND", "vlan")],  # a VLAN without data: no id to report
    ],
)
def test_vlan_id_of_other_links_is_none(linkinfo):
    assert vlan_id_of(decoded(link_message("x0", linkinfo))) is None


def encoded(message: rtmsg | fibmsg, kind: int) -> bytes:
    message["header"]["type"] = kind
    message.encode()
    return bytes(message.data)


def route_message(table: int) -> bytes:
    message = rtmsg()
    message["family"] = socket.AF_INET
    message["dst_len"] = 24
    message["table"] = table if table < 256 else 252
    message["attrs"] = [("RTA_DST", "198.51.100.0"), ("RTA_TABLE", table)]
    return encoded(message, RTM_NEWROUTE)


def rule_message(table: int) -> bytes:
    message = fibmsg()
    message["family"] = socket.AF_INET
    message["table"] = table if table < 256 else 252
    message["action"] = 1
    message["attrs"] = [("FRA_TABLE", table), ("FRA_PRIORITY", 11200)]
    return encoded(message, RTM_NEWRULE)


def test_table_of_route_and_rule_messages():
    assert table_of(route_message(1120)[16:]) == 1120
    assert table_of(route_message(254)[16:]) == 254
    assert table_of(rule_message(1120)[16:]) == 1120
    assert table_of(b"\x02") is None


def test_changes_in_filters_routes_and_rules_by_table():
    main_route, our_route, our_rule = route_message(254), route_message(1120), rule_message(1120)
    link = encoded(link_message("x0", None), RTM_NEWLINK)
    assert changes_in(main_route + link, tables={1120}) == {NetlinkChange.LINK}
    assert changes_in(main_route + our_route + our_rule, tables={1120}) == {NetlinkChange.ROUTE, NetlinkChange.RULE}
    assert changes_in(main_route) == {NetlinkChange.ROUTE}
    assert changes_in(b"") == set()


def test_cap_net_admin_from_proc_status(tmp_path: Path):
    assert has_cap_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_cap_net_admin("CapEff:\t0000000000001000\n")
    assert not has_cap_net_admin("CapEff:\t0000000000000fff\n")
    assert not has_cap_net_admin("Name:\tx\n")
    status = tmp_path / "status"
    status.write_text("CapEff:\t0000000000000000\n")
    with pytest.raises(CapabilityError, match="CAP_NET_ADMIN"):
        check_capability(status)
    with pytest.raises(CapabilityError, match="cannot read"):
        check_capability(tmp_path / "missing")


# -- namespaces ----------------------------------------------------------------------------------


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    """One namespace with a veth pair va/vb, va up with an IPv4 and an IPv6 subnet."""
    name = make_ns()
    ip_batch(
        name,
        "link add va type veth peer name vb\n"
        "link set va up\n"
        "link set vb up\n"
        "addr add 10.9.0.1/24 dev va\n"
        "addr add 2001:db8:9::1/64 dev va nodad\n",
    )
    return name


@pytest.fixture
def adapter(ns: str) -> Iterator[NetlinkAdapter]:
    adapter = NetlinkAdapter(netns=ns)
    yield adapter
    adapter.close()


def desired():
    return desired_state(
        SETTINGS,
        [net("10.120.0.0/24"), net("fd00:120::/64")],
        [net("198.51.100.0/24"), net("2001:db8:51::/48")],
        [addr("203.0.113.7"), addr("2001:db8:203::7")],
    )


EXPECTED_RULES = [
    "11200: from 10.120.0.0/24 lookup 1120 proto 120",
    "11200: from fd00:120::/64 lookup 1120 proto 120",
]
EXPECTED_V4 = [
    "prohibit 198.51.100.0/24 proto 120",
    "throw 198.51.100.128/25 proto 120",
    "prohibit 203.0.113.7 proto 120",
]
EXPECTED_V6 = [
    "prohibit 2001:db8:51::/48 dev lo proto 120 metric 1024 pref medium",
    "prohibit 2001:db8:203::7 dev lo proto 120 metric 1024 pref medium",
]


@needs_netns
@pytest.mark.timeout(60)
def test_apply_creates_exactly_the_plan_and_reads_it_back(ns: str, adapter: NetlinkAdapter):
    state = desired()
    assert adapter.owned_state(SETTINGS) == KernelState()
    plan = diff(state, adapter.owned_state(SETTINGS))
    assert adapter.apply(plan) == plan.operations == 7
    assert blockd_rules(ns) == EXPECTED_RULES
    assert sorted(table_routes(ns)) == sorted(EXPECTED_V4)
    assert sorted(table_routes(ns, "-6")) == sorted(EXPECTED_V6)
    actual = adapter.owned_state(SETTINGS)
    assert set(actual.rules) == state.rules and len(actual.rules) == 2
    assert set(actual.routes) == state.routes and len(actual.routes) == 5
    assert diff(state, actual).empty
    adapter.apply(plan)  # the same plan again: no duplicates, no errors
    assert blockd_rules(ns) == EXPECTED_RULES
    assert sorted(table_routes(ns)) == sorted(EXPECTED_V4)
    assert sorted(table_routes(ns, "-6")) == sorted(EXPECTED_V6)


@needs_netns
@pytest.mark.timeout(60)
def test_catch_all_rule_next_to_specific_ones(ns: str, adapter: NetlinkAdapter):
    state = desired_state(SETTINGS, [net("0.0.0.0/0"), net("fd00:120::/64")], [], [])
    adapter.apply(diff(desired(), KernelState()))
    adapter.apply(diff(state, adapter.owned_state(SETTINGS)))
    assert blockd_rules(ns) == [
        "11201: from all lookup 1120 proto 120",
        "11200: from fd00:120::/64 lookup 1120 proto 120",
    ]
    assert diff(state, adapter.owned_state(SETTINGS)).empty


@needs_netns
@pytest.mark.timeout(60)
def test_foreign_rules_and_routes_are_never_touched_or_reported(ns: str, adapter: NetlinkAdapter):
    foreign_rules = [
        ("from", "10.50.0.0/16", "lookup", "1121", "pref", "11200"),  # blockd's band, other table
        ("from", "10.51.0.0/16", "lookup", "1120", "pref", "20000"),  # blockd's table, outside the band
        ("from", "10.52.0.0/16", "iif", "vb", "lookup", "1120", "pref", "11210"),  # a selector blockd never sets
        ("from", "10.53.0.0/16", "lookup", "main", "pref", "100"),
        ("from", "10.54.0.0/16", "lookup", "1120", "suppress_prefixlength", "0", "pref", "11220"),
    ]
    for spec in foreign_rules:
        ip(ns, "rule", "add", *spec)
    ip(ns, "route", "add", "prohibit", "192.0.2.0/24")  # table main
    ip(ns, "route", "add", "prohibit", "192.0.2.128/25", "table", "1120", "proto", "static")  # other proto
    ip(ns, "route", "add", "prohibit", "203.0.113.0/24", "table", "1121", "proto", "120")  # other table
    rules_before = ip(ns, "rule", "show")
    main_before = ip(ns, "route", "show", "table", "main")

    assert adapter.owned_state(SETTINGS) == KernelState()
    adapter.apply(diff(desired(), adapter.owned_state(SETTINGS)))
    assert diff(desired(), adapter.owned_state(SETTINGS)).empty
    assert "192.0.2.128/25 proto static" in ip(ns, "route", "show", "table", "1120")

    assert adapter.remove_all(SETTINGS) == 7
    assert adapter.owned_state(SETTINGS) == KernelState()
    assert ip(ns, "rule", "show") == rules_before
    assert ip(ns, "route", "show", "table", "main") == main_before
    assert table_routes(ns) == ["prohibit 192.0.2.128/25 proto static"]
    assert table_routes(ns, "-6") == []
    assert "203.0.113.0/24" in ip(ns, "route", "show", "table", "1121")


@needs_netns
@pytest.mark.timeout(60)
def test_stale_entries_and_changed_types_are_repaired(ns: str, adapter: NetlinkAdapter):
    # What an earlier blockd (other config, or someone editing its table) may have left behind.
    ip_batch(
        ns,
        "route add prohibit 192.0.2.0/24 table 1120 proto 120\n"
        "route add blackhole 198.51.100.0/24 table 1120 proto 120\n"
        "route add unreachable 2001:db8:51::/48 table 1120 proto 120\n"
        "route add blackhole 2001:db8:203::7/128 table 1120 proto 120 metric 5\n"
        "rule add from 10.99.0.0/16 lookup 1120 pref 11200 proto 120\n"
        "rule add from 10.120.0.0/24 lookup 1120 pref 11200 proto 120\n",
    )
    # A duplicate: the kernel refuses an identical rule, but one without blockd's proto label is
    # another rule to it.  Which copy survives is the kernel's choice; the label is cosmetic.
    ip(ns, "rule", "add", "from", "10.120.0.0/24", "lookup", "1120", "pref", "11200")
    plan = diff(desired(), adapter.owned_state(SETTINGS))
    assert plan.conflicting_deletes()
    adapter.apply(plan)
    assert [r.replace(" proto 120", "") for r in blockd_rules(ns)] == [
        r.replace(" proto 120", "") for r in EXPECTED_RULES
    ]
    assert sorted(table_routes(ns)) == sorted(EXPECTED_V4)
    assert sorted(table_routes(ns, "-6")) == sorted(EXPECTED_V6)
    assert diff(desired(), adapter.owned_state(SETTINGS)).empty


@needs_netns
@pytest.mark.timeout(60)
def test_deleting_what_is_already_gone_is_not_an_error(ns: str, adapter: NetlinkAdapter):
    state = desired()
    adapter.apply(diff(state, KernelState()))
    everything = adapter.owned_state(SETTINGS)
    removal = Plan(del_rules=everything.rules, del_routes=everything.routes)
    adapter.apply(removal)
    assert adapter.apply(removal) == removal.operations
    assert adapter.owned_state(SETTINGS) == KernelState()


@needs_netns
@pytest.mark.timeout(60)
def test_interface_networks(make_ns: Callable[[], str], ns: str, adapter: NetlinkAdapter):
    ip_batch(ns, "addr add 10.9.1.1/24 dev va\nlink add br0 type bridge\n")
    found = adapter.interface_networks(["va", "br0", "absent0"], [120])
    assert found == {
        "va": (net("10.9.0.0/24"), net("10.9.1.0/24"), net("2001:db8:9::/64")),  # no fe80::/64
        "br0": (),
    }
    assert adapter.interface_networks([], [120]) == {}  # no VLAN devices here
    assert adapter.interface_networks(["vb"], []) == {"vb": ()}  # only a link-local address


@needs_netns
@pytest.mark.timeout(60)
def test_real_link_messages_are_not_vlans(ns: str, adapter: NetlinkAdapter):
    ip(ns, "link", "add", "br0", "type", "bridge")
    links = {m.get("ifname"): m for m in adapter._iproute().get_links()}
    assert set(links) == {"lo", "va", "vb", "br0"}
    assert [vlan_id_of(m) for m in links.values()] == [None] * 4


@needs_netns
@pytest.mark.timeout(60)
def test_missing_namespace_fails_and_is_not_created():
    name = f"blockd-t-absent-{secrets.token_hex(4)}"
    adapter = NetlinkAdapter(netns=name)
    with pytest.raises(FileNotFoundError):
        adapter.owned_state(SETTINGS)
    assert not Path("/run/netns", name).exists()
    adapter.close()


@needs_netns
@pytest.mark.timeout(60)
def test_adapter_refuses_a_second_thread(adapter: NetlinkAdapter):
    adapter.owned_state(SETTINGS)
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(errors, lambda: adapter.owned_state(SETTINGS)))
    worker.start()
    worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


def _catch(errors: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (reported to the test thread)
        errors.append(exc)


class Changes:
    def __init__(self) -> None:
        self.queue: queue.Queue[NetlinkChange] = queue.Queue()

    def __call__(self, change: NetlinkChange) -> None:
        self.queue.put(change)

    def wait_for(self, change: NetlinkChange, timeout: float = 1.0) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self.queue.get(timeout=left) == change:
                    return time.monotonic() - started
            except queue.Empty:
                break
        raise AssertionError(f"no {change} notification within {timeout} s")

    def drain(self, settle: float = 0.3) -> set[NetlinkChange]:
        time.sleep(settle)
        seen = set()
        while not self.queue.empty():
            seen.add(self.queue.get_nowait())
        return seen


@needs_netns
@pytest.mark.timeout(60)
def test_watcher_reports_changes_within_a_second_and_stops_promptly(ns: str):
    changes = Changes()
    watcher = NetlinkWatcher(changes, netns=ns, tables={1120})
    watcher.start()
    try:
        ip(ns, "addr", "add", "10.9.2.1/24", "dev", "va")
        assert changes.wait_for(NetlinkChange.ADDRESS) < 1.0
        changes.drain()
        ip(ns, "route", "add", "prohibit", "192.0.2.0/24")  # main table: not blockd's business
        assert NetlinkChange.ROUTE not in changes.drain()
        ip(ns, "route", "add", "prohibit", "192.0.2.0/24", "table", "1120", "proto", "120")
        changes.wait_for(NetlinkChange.ROUTE)
        ip(ns, "rule", "add", "from", "10.120.0.0/24", "lookup", "1120", "pref", "11200")
        changes.wait_for(NetlinkChange.RULE)
        ip(ns, "link", "set", "vb", "down")
        changes.wait_for(NetlinkChange.LINK)
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 1.0
    assert not any(t.name == "blockd-netlink-watch" for t in threading.enumerate())


class QueueReactor:
    """callFromThread into a queue the test thread drains, like the reactor thread would."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple] = queue.Queue()

    def callFromThread(self, function: Callable[..., object], *args: object) -> None:  # noqa: N802 (Twisted API)
        self.calls.put((function, args))

    def run_pending(self, timeout: float) -> int:
        ran = 0
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                function, args = self.calls.get(timeout=min(left, 0.3))
            except queue.Empty:
                if ran:
                    return ran
                continue
            function(*args)
            ran += 1
        return ran


@needs_netns
@pytest.mark.timeout(60)
def test_service_restores_a_deleted_rule_and_restarts_without_duplicates(ns: str):
    from twisted.internet import task

    def start() -> tuple[NetlinkServices, EgressService, list]:
        adapter = NetlinkAdapter(netns=ns)
        reports: list = []
        clock = task.Clock()
        clock.advance(1_700_000_000)
        egress = EgressService(
            clock,
            SETTINGS,
            adapter,
            lambda: [net("10.120.0.0/24"), net("fd00:120::/64")],
            lambda: [net("198.51.100.0/24"), net("2001:db8:51::/48")],
            LearnedAddresses.from_settings(SETTINGS),
            SynchronousRunner(),
            reports.append,
        )
        parent = NetlinkServices(
            reactor, SynchronousRunner(), adapter, lambda callback: NetlinkWatcher(callback, ns, {SETTINGS.table})
        )
        egress.setServiceParent(parent)
        parent.startService()
        return parent, egress, reports

    reactor = QueueReactor()
    parent, egress, reports = start()
    try:
        assert reports[-1].result == "success"
        egress.learn(["203.0.113.7", "2001:db8:203::7"], ttl=60)
        assert blockd_rules(ns) == EXPECTED_RULES
        assert sorted(table_routes(ns)) == sorted(EXPECTED_V4)
        reactor.run_pending(0.5)  # our own changes come back as notifications: no-op reconciles

        ip(ns, "rule", "del", "from", "10.120.0.0/24", "lookup", "1120", "pref", "11200")
        ip(ns, "route", "del", "prohibit", "198.51.100.0/24", "table", "1120")
        assert reactor.run_pending(2.0) >= 1
        assert blockd_rules(ns) == EXPECTED_RULES
        assert sorted(table_routes(ns)) == sorted(EXPECTED_V4)
    finally:
        parent.stopService()  # on_exit = keep

    assert blockd_rules(ns) == EXPECTED_RULES
    parent, egress, reports = start()  # a restart: learned addresses are gone, the rest is equal
    try:
        assert reports[-1].result == "success"
        assert reports[-1].changes == {"add_rule": 0, "del_rule": 0, "add_route": 0, "del_route": 2}
        assert blockd_rules(ns) == EXPECTED_RULES
        assert sorted(table_routes(ns)) == sorted(EXPECTED_V4[:2])
    finally:
        parent.stopService()


# -- traffic -------------------------------------------------------------------------------------


@needs_netns
@pytest.mark.timeout(120)
def test_prohibit_routes_block_only_the_government_client(topology: dict[str, str]):
    gw, gov, other = topology["gateway"], topology["gov"], topology["other"]
    targets = ("198.51.100.10", "203.0.113.10", "2001:db8:51::10", "2001:db8:203::10")
    for client in (gov, other):
        for target in targets:
            assert connect(client, target)[0] == 0, f"{client} -> {target} before blocking"

    adapter = NetlinkAdapter(netns=gw)
    try:
        state = desired_state(
            EgressSettings(enabled=True),
            [net("10.120.0.0/24"), net("fd00:120::/64")],
            [net("198.51.100.0/24"), net("2001:db8:51::/48")],
            [],
        )
        adapter.apply(diff(state, adapter.owned_state(EgressSettings(enabled=True))))

        for blocked in ("198.51.100.10", "2001:db8:51::10"):
            code, seconds = connect(gov, blocked)
            assert code in BLOCKED, f"gov -> {blocked}: {errno.errorcode.get(code, code)}"
            # prohibit answers with an ICMP error (a blackhole would time out).  Over veth the
            # error for the first IPv6 SYN can arrive while connect() still holds the socket,
            # where TCP keeps it as a soft error: then the retransmit 1 s later ends it.
            assert seconds < 2.5
        for allowed in ("203.0.113.10", "2001:db8:203::10"):
            assert connect(gov, allowed)[0] == 0
        for target in targets:
            assert connect(other, target)[0] == 0, f"other -> {target} must not be blocked"

        adapter.remove_all(EgressSettings(enabled=True))
        assert connect(gov, "198.51.100.10")[0] == 0
    finally:
        adapter.close()


def test_struct_layout_assumptions():
    # table_of reads struct rtmsg / fib_rule_hdr: 8 one-byte fields and a u32 before the attributes.
    assert struct.calcsize("=BBBBBBBBI") == 12
