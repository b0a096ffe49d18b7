"""Pure egress logic: prefix files, learned addresses, desired state and diff (no netlink)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.egress import (
    PROHIBIT,
    THROW,
    DesiredState,
    EgressSettings,
    KernelState,
    LearnedAddresses,
    Plan,
    PrefixLoadError,
    Route,
    Rule,
    apply_to,
    desired_state,
    diff,
    load_prefix_files,
    parse_prefix_line,
    settings_problems,
)
from blockd.lists import ListLoadError

REPO = Path(__file__).resolve().parent.parent
net = ipaddress.ip_network
addr = ipaddress.ip_address
SETTINGS = EgressSettings(enabled=True)


def rule(source: str, priority: int = 11200, table: int = 1120) -> Rule:
    network = net(source)
    return Rule(network.version, network, table, priority, 120)


def route(destination: str, kind: str = PROHIBIT, metric: int | None = None) -> Route:
    network = net(destination)
    return Route(network.version, network, 1120, kind, 120, metric)


# -- prefix files --------------------------------------------------------------------------------


def test_shipped_prefix_file_parses_cleanly():
    prefixes = load_prefix_files([REPO / "domains" / "bytedance-prefixes.txt"])
    assert len(prefixes) > 100
    assert {p.version for p in prefixes} == {4, 6}
    assert all(p.prefixlen > 0 for p in prefixes)


def test_prefix_file_comments_blank_lines_and_inline_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n198.51.100.0/24\n  2001:db8::/32   # documentation\n203.0.113.7\n198.51.100.0/24\n")
    assert load_prefix_files([path]) == (net("198.51.100.0/24"), net("2001:db8::/32"), net("203.0.113.7/32"))


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(
        "198.51.100.0/24\n"  # 1 good
        "198.51.100.1/24\n"  # 2 host bits
        "not-a-prefix\n"  # 3
        "# fine\n"  # 4
        "192.0.2.0/24 203.0.113.0/24\n"  # 5 two on a line
        "0.0.0.0/0\n"  # 6 everything
        "2001:db8::/129\n"  # 7
    )
    other = tmp_path / "other.txt"
    other.write_text("10.0.0.0/33\n")
    with pytest.raises(PrefixLoadError) as caught:
        load_prefix_files([bad, other, tmp_path / "missing.txt"])
    errors = caught.value.errors
    assert [(e.path, e.line) for e in errors] == [
        (str(bad), 2),
        (str(bad), 3),
        (str(bad), 5),
        (str(bad), 6),
        (str(bad), 7),
        (str(other), 1),
        (str(tmp_path / "missing.txt"), 0),
    ]
    text = str(caught.value)
    assert f"{bad}:2: '198.51.100.1/24' has host bits set; did you mean 198.51.100.0/24?" in text
    assert f"{bad}:6: refusing to block the whole address space" in text
    assert f"{tmp_path / 'missing.txt'}: cannot read prefix file" in text
    assert isinstance(caught.value, ListLoadError)  # `blockd check` prints it like a list error


def test_prefix_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe198.51.100.0/24\n")
    with pytest.raises(PrefixLoadError, match="not UTF-8"):
        load_prefix_files([path])


def test_parse_prefix_line():
    assert parse_prefix_line("   ") is None
    assert parse_prefix_line("#198.51.100.0/24") is None
    assert parse_prefix_line("2001:db8::/48") == net("2001:db8::/48")


# -- settings ------------------------------------------------------------------------------------


def test_default_settings_are_valid_and_before_main_rule():
    assert settings_problems(EgressSettings()) == []
    assert EgressSettings().rule_band == range(11200, 11300)
    assert max(EgressSettings().rule_band) < 32766


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"table": 254}, "table"),
        ({"table": 0}, "table"),
        ({"rule_priority": 32700}, "rule_priority"),
        ({"rule_priority": 0}, "rule_priority"),
        ({"route_protocol": 186}, "route_protocol"),  # bgp
        ({"route_protocol": 4}, "route_protocol"),  # static
        ({"route_protocol": 256}, "route_protocol"),
        ({"on_exit": "flush"}, "on_exit"),
        ({"reconcile_interval": 0}, "reconcile_interval"),
    ],
)
def test_settings_problems(changes, key):
    problems = settings_problems(EgressSettings(**changes))
    assert [k for k, _ in problems] == [key]


# -- learned addresses ---------------------------------------------------------------------------


def test_lifetime_is_at_least_min_ttl_and_answer_ttl_when_longer():
    learned = LearnedAddresses(min_ttl=3600, max_entries=10)
    assert learned.learn(["198.51.100.1"], ttl=60, now=1000).added == 1
    assert learned.expiry_of("198.51.100.1") == 1000 + 3600
    learned.learn([addr("198.51.100.2")], ttl=7200, now=1000)
    assert learned.expiry_of("198.51.100.2") == 1000 + 7200
    assert learned.learned_total == 2


def test_every_new_answer_extends_and_never_shortens():
    learned = LearnedAddresses(min_ttl=100, max_entries=10)
    learned.learn(["198.51.100.1"], ttl=500, now=0)
    result = learned.learn(["198.51.100.1"], ttl=10, now=50)  # 150 < 500: not shortened
    assert (result.added, result.refreshed, result.changed) == (0, 0, False)
    assert learned.expiry_of("198.51.100.1") == 500
    result = learned.learn(["198.51.100.1"], ttl=10, now=450)  # 550 > 500: extended
    assert (result.refreshed, result.changed) == (1, False)  # same address set: no route change
    assert learned.expiry_of("198.51.100.1") == 550
    assert learned.next_expiry() == 550
    assert not learned.expire(500)  # the old expiry is gone with the refresh
    assert "198.51.100.1" not in learned and addr("198.51.100.1") in learned


def test_addresses_inside_never_are_skipped_and_counted():
    learned = LearnedAddresses(min_ttl=10, max_entries=10, never=[net("203.0.113.0/24"), net("2001:db8:cd::/48")])
    result = learned.learn(["203.0.113.9", "2001:db8:cd::1", "198.51.100.1", "2001:db8:1::1"], ttl=10, now=0)
    assert (result.added, result.never_skipped) == (2, 2)
    assert learned.never_skipped_total == 2
    assert learned.addresses() == {addr("198.51.100.1"), addr("2001:db8:1::1")}


def test_unroutable_answers_are_skipped():
    learned = LearnedAddresses(min_ttl=10, max_entries=10)
    result = learned.learn(["0.0.0.0", "::", "127.0.0.1", "::1", "169.254.1.1", "fe80::1", "224.0.0.1"], 10, 0)
    assert (result.added, result.special_skipped, len(learned)) == (0, 7, 0)


def test_cap_evicts_the_entries_that_expire_soonest():
    learned = LearnedAddresses(min_ttl=0, max_entries=3)
    learned.learn(["198.51.100.1"], ttl=300, now=0)
    learned.learn(["198.51.100.2"], ttl=100, now=0)
    learned.learn(["198.51.100.3"], ttl=200, now=0)
    result = learned.learn(["198.51.100.4", "198.51.100.5"], ttl=400, now=0)
    assert (result.added, result.evicted, result.changed) == (2, 2, True)
    assert learned.addresses() == {addr("198.51.100.1"), addr("198.51.100.4"), addr("198.51.100.5")}
    assert learned.evicted_total == 2
    assert LearnedAddresses(min_ttl=0, max_entries=0).learn(["198.51.100.1"], 10, 0).evicted == 1


def test_expire_drops_dead_entries_and_reports_change():
    learned = LearnedAddresses(min_ttl=0, max_entries=10)
    learned.learn(["198.51.100.1", "2001:db8::1"], ttl=100, now=0)
    learned.learn(["198.51.100.2"], ttl=200, now=0)
    assert learned.next_expiry() == 100
    assert not learned.expire(99.9)
    assert learned.expire(100)
    assert learned.addresses() == {addr("198.51.100.2")}
    assert learned.next_expiry() == 200
    assert learned.expire(1000)
    assert learned.next_expiry() is None
    assert learned.expired_total == 3


def test_heap_stays_bounded_under_refreshes():
    learned = LearnedAddresses(min_ttl=0, max_entries=10)
    for now in range(10000):
        learned.learn(["198.51.100.1"], ttl=100, now=now)
    assert len(learned._heap) < 200
    assert learned.next_expiry() == 9999 + 100


# -- desired state -------------------------------------------------------------------------------


def test_rules_for_blocking_networks_v4_and_v6():
    state = desired_state(
        SETTINGS,
        [net("10.120.0.0/22"), net("10.120.1.0/24"), net("fd00:120::/64"), net("::ffff:10.130.0.0/112")],
        [],
        [],
    )
    assert state.rules == {rule("10.120.0.0/22"), rule("fd00:120::/64"), rule("10.130.0.0/16")}
    assert all(r.priority < 32766 and r.proto == 120 for r in state.rules)
    assert state.routes == frozenset()


def test_catch_all_rule_has_its_own_priority():
    state = desired_state(SETTINGS, [net("0.0.0.0/0"), net("10.0.0.0/8"), net("fd00::/8")], [], [])
    assert state.rules == {rule("0.0.0.0/0", priority=11201), rule("fd00::/8")}
    assert all(r.priority in SETTINGS.rule_band for r in state.rules)


def test_routes_for_static_prefixes_and_learned_addresses():
    state = desired_state(
        SETTINGS,
        [net("10.120.0.0/22")],
        [net("198.51.100.0/24"), net("198.51.100.128/25"), net("2001:db8:51::/48")],
        [addr("203.0.113.7"), addr("2001:db8:203::7"), addr("198.51.100.9")],  # .9 is inside a static prefix
    )
    assert state.routes == {
        route("198.51.100.0/24"),
        route("2001:db8:51::/48"),
        route("203.0.113.7/32"),
        route("2001:db8:203::7/128"),
    }
    assert state.routes_by_source() == {"static": 2, "learned": 2, "never": 0}


def test_never_skips_what_is_inside_and_carves_what_is_outside():
    settings = EgressSettings(never=(net("198.51.100.128/25"), net("203.0.113.0/24"), net("2001:db8:cd::/48")))
    state = desired_state(
        settings,
        [],
        [net("198.51.100.0/24"), net("203.0.113.0/25"), net("2001:db8:cd:1::/64")],
        [addr("203.0.113.200"), addr("2001:db8:cd::5"), addr("192.0.2.1")],
    )
    assert state.routes == {
        route("198.51.100.0/24"),
        route("198.51.100.128/25", THROW),  # inside a static prefix: routed by main after all
        route("192.0.2.1/32"),
    }
    assert state.routes_by_source() == {"static": 1, "learned": 1, "never": 1}


# -- diff ----------------------------------------------------------------------------------------

DESIRED = desired_state(
    SETTINGS,
    [net("10.120.0.0/22"), net("fd00:120::/64")],
    [net("198.51.100.0/24"), net("2001:db8:51::/48")],
    [addr("203.0.113.7")],
)


def test_diff_from_nothing_adds_everything():
    plan = diff(DESIRED, KernelState())
    assert set(plan.add_rules) == DESIRED.rules and set(plan.add_routes) == DESIRED.routes
    assert plan.del_rules == () and plan.del_routes == ()
    assert plan.operations == 5
    assert str(plan) == "2 add rule, 3 add route"


def test_diff_of_equal_states_is_empty_whatever_the_metric():
    actual = KernelState(
        tuple(DESIRED.rules),
        tuple(Route(r.version, r.destination, r.table, r.type, r.proto, 1024) for r in DESIRED.routes),
    )
    assert diff(DESIRED, actual).empty
    assert str(diff(DESIRED, actual)) == "no changes"


def test_diff_removes_stale_entries_and_duplicates():
    stale_rule = rule("10.99.0.0/16")
    stale_route = route("192.0.2.0/24")
    actual = KernelState(
        (*DESIRED.rules, stale_rule, rule("10.120.0.0/22")),
        (*DESIRED.routes, stale_route, route("203.0.113.7/32")),
    )
    plan = diff(DESIRED, actual)
    assert (plan.add_rules, plan.add_routes) == ((), ())
    assert sorted(plan.del_rules) == sorted([stale_rule, rule("10.120.0.0/22")])
    assert sorted(plan.del_routes, key=Route.sort_key) == sorted(
        [stale_route, route("203.0.113.7/32")], key=Route.sort_key
    )
    after = apply_to(actual, plan)
    assert sorted(after.rules) == sorted(DESIRED.rules)
    assert len(after.routes) == len(DESIRED.routes)


def test_a_route_changing_type_is_deleted_before_it_is_replaced():
    actual = KernelState(
        tuple(DESIRED.rules), (route("198.51.100.0/24", "blackhole"), route("2001:db8:51::/48", "unicast", 1024))
    )
    plan = diff(DESIRED, actual)
    assert set(plan.conflicting_deletes()) == set(actual.routes)
    assert route("198.51.100.0/24") in plan.add_routes
    after = apply_to(actual, plan)
    assert set(after.routes) == DESIRED.routes and len(after.routes) == 3


def test_rule_in_another_table_or_priority_is_a_different_rule():
    assert rule("10.120.0.0/22", table=1121) != rule("10.120.0.0/22")
    assert rule("10.120.0.0/22", priority=11201) != rule("10.120.0.0/22")
    assert Rule(4, net("10.120.0.0/22"), 1120, 11200, 0) == rule("10.120.0.0/22")  # proto is a label only


_RULES = [rule(s) for s in ("10.0.0.0/8", "10.120.0.0/22", "fd00:120::/64", "192.0.2.0/24")] + [
    rule("0.0.0.0/0", priority=11201)
]
_ROUTES = [
    route(d, kind)
    for d in ("198.51.100.0/24", "203.0.113.7/32", "2001:db8:51::/48", "2001:db8::1/128")
    for kind in (PROHIBIT, THROW, "blackhole")
]


@settings(max_examples=300, deadline=None)
@given(
    desired_rules=st.frozensets(st.sampled_from(_RULES)),
    desired_routes=st.lists(st.sampled_from(_ROUTES), unique_by=lambda r: r.key),
    actual_rules=st.lists(st.sampled_from(_RULES), max_size=8),
    actual_routes=st.lists(st.sampled_from(_ROUTES), max_size=8, unique_by=lambda r: r.key),
)
def test_applying_the_plan_yields_desired_and_is_then_a_no_op(
    desired_rules, desired_routes, actual_rules, actual_routes
):
    desired = DesiredState(desired_rules, frozenset(desired_routes))
    actual = KernelState(tuple(actual_rules), tuple(actual_routes))
    after = apply_to(actual, diff(desired, actual))
    assert sorted(after.rules) == sorted(desired.rules)
    assert sorted(after.routes, key=Route.sort_key) == sorted(desired.routes, key=Route.sort_key)
    assert diff(desired, after) == Plan()


def test_pure_modules_import_without_pyroute2():
    code = (
        "import sys; sys.modules['pyroute2'] = None\n"
        "import blockd.egress, blockd.egress_service\n"
        "try:\n    import blockd.netlink\nexcept ImportError:\n    print('netlink needs pyroute2')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "netlink needs pyroute2"
