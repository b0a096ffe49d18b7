"""The deploy kit: systemd unit, Prometheus scrape config and alert rules, Grafana dashboard.

promtool checks run when promtool is on PATH (Debian's `prometheus` package ships it; CI installs it).
The dashboard and the alert rules are held to the metric names of the user-facing contract (README.md's
Metrics table, blockd/metrics.py), and that list to what blockd really exports, so a renamed metric or a
typo in a panel or an alert fails here rather than as an empty panel or a silent alert on the SOC's screen.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "blockd-dashboard.json"
UNIT = DEPLOY / "blockd.service"

ALLOWED_METRICS = frozenset(
    {
        "blockd_dns_queries_total",
        "blockd_dns_query_types_total",
        "blockd_dns_blocked_total",
        "blockd_dns_responses_total",
        "blockd_dns_dropped_total",
        "blockd_upstream_requests_total",
        "blockd_upstream_up",
        "blockd_limited_total",
        "blockd_upstream_request_duration_seconds_bucket",
        "blockd_upstream_request_duration_seconds_sum",
        "blockd_upstream_request_duration_seconds_count",
        "blockd_list_domains",
        "blockd_reloads_total",
        "blockd_last_reload_success_timestamp_seconds",
        "blockd_reload_duration_seconds_bucket",
        "blockd_reload_duration_seconds_sum",
        "blockd_reload_duration_seconds_count",
        "blockd_build_info",
        "blockd_query_log_lines_total",
        "blockd_query_log_dropped_total",
        "blockd_query_log_errors_total",
        "blockd_cache_requests_total",
        "blockd_cache_hits_total",
        "blockd_cache_evictions_total",
        "blockd_cache_entries",
        "blockd_group_interface_networks",
        # [egress] enabled only.
        "blockd_egress_reconciles_total",
        "blockd_egress_last_reconcile_success_timestamp_seconds",
        "blockd_egress_reconcile_duration_seconds_bucket",
        "blockd_egress_reconcile_duration_seconds_sum",
        "blockd_egress_reconcile_duration_seconds_count",
        "blockd_egress_changes_total",
        "blockd_egress_routes",
        "blockd_egress_rules",
        "blockd_egress_learned_addresses",
        "blockd_egress_learned_total",
        "blockd_egress_learned_expired_total",
        "blockd_egress_learned_evicted_total",
        "blockd_egress_never_skipped_total",
        "blockd_egress_unroutable_skipped_total",
        "blockd_egress_followup_lookups_total",
        # Lists transferred from primaries (RPZ) only.
        "blockd_list_serial",
        "blockd_zone_transfers_total",
        "blockd_zone_last_transfer_success_timestamp_seconds",
        "blockd_zone_expired",
        "blockd_zone_transfer_duration_seconds_bucket",
        "blockd_zone_transfer_duration_seconds_sum",
        "blockd_zone_transfer_duration_seconds_count",
        "blockd_notify_total",
        # Lists downloaded from URLs only.
        "blockd_list_source_last_success_timestamp_seconds",
        "blockd_list_source_failures_total",
        "blockd_list_source_bytes",
        "blockd_list_source_refresh_seconds",
        # [publish] on only.
        "blockd_publish_serial",
        "blockd_publish_records",
        "blockd_publish_unpublishable_entries",
        "blockd_publish_last_change_timestamp_seconds",
        "blockd_publish_requests_total",
        "blockd_publish_sent_bytes_total",
        "blockd_publish_notify_total",
        # [dnstap] on only.
        "blockd_dnstap_frames_total",
        "blockd_dnstap_collector_up",
        "up",  # Prometheus's own, for BlockdDown
    }
)


class _Counts:
    """Stands in for the answer cache and the learned addresses: every counter the collectors read, at 0."""

    requests = hits = evictions = stale_answers = bytes = 0
    learned_total = expired_total = evicted_total = never_skipped_total = special_skipped_total = 0

    def __len__(self) -> int:
        return 0


class _Upstreams:
    """Stands in for blockd.upstream.Upstreams: one upstream, up."""

    def up(self) -> dict[str, bool]:
        return {"192.0.2.53:53": True}

    def open_sockets(self) -> int:
        return 1


def exported_metric_names() -> set[str]:
    """Every sample name blockd's metrics export, egress and interface groups included."""
    from prometheus_client import CollectorRegistry

    from blockd.metrics import (
        CacheCollector,
        DnstapMetrics,
        EgressCollector,
        EgressMetrics,
        ListSizeCollector,
        Metrics,
        UpstreamHealthCollector,
        UrlSourceCollector,
    )
    from blockd.url_lists import SourceStats

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare([("default", [("ads", "sinkhole")])], ["192.0.2.53"])
    metrics.interface_networks.labels("lan")
    registry.register(CacheCollector(_Counts()))
    registry.register(UpstreamHealthCollector(_Upstreams()))
    registry.register(ListSizeCollector(lambda: {"ads": 1}))
    EgressMetrics(registry)
    registry.register(EgressCollector(_Counts()))
    registry.register(_zone_collector())
    source = SourceStats("remote", 86400.0, last_success=1.0, bytes=10, failures={"network": 1})
    registry.register(UrlSourceCollector(lambda: [source], ["network"]))
    DnstapMetrics(registry)
    registry.register(_publish_collector())
    return {sample.name for family in registry.collect() for sample in family.samples}


def _publish_collector() -> object:
    """blockd's PublishCollector over one published zone that has been rendered and changed."""
    from blockd.config import Endpoint, PublishConfig, PublishZoneConfig
    from blockd.publish import PublishCollector, Publisher
    from blockd.publish_zone import soa_for
    from blockd.rpz import PolicyZone

    zone = PublishZoneConfig("rpz.example", group="default")
    config = PublishConfig(listen=Endpoint("127.0.0.1", 5300), zones={zone.name: zone})
    publisher = Publisher(None, config, Path("/nonexistent"), None, lambda: None)  # type: ignore[arg-type,return-value]
    publisher.versions[zone.name].zone = PolicyZone(zone.name, soa_for(zone.name, 300, 1))
    publisher.changed_at[zone.name] = 1.0
    return PublishCollector(publisher)


def _zone_collector() -> object:
    """blockd's ZoneCollector over one transferred list with a little of everything to report."""
    from types import SimpleNamespace

    from blockd.notify import NotifyAcceptor
    from blockd.secondary_lists import ZoneCollector, ZoneList

    secondary = SimpleNamespace(transfers={("ixfr", "incremental"): 1}, last_success=1.0, running=True, expired=False)
    entry = ZoneList(config=None, key=None, secondary=secondary)  # type: ignore[arg-type]
    zone = SimpleNamespace(soa=SimpleNamespace(serial=7))
    policy = SimpleNamespace(lists={"gov-rpz": SimpleNamespace(zone=zone)})
    lists = SimpleNamespace(zones={"gov-rpz": entry})
    return ZoneCollector(lists, lambda: policy, NotifyAcceptor({}))  # type: ignore[arg-type]


def test_allowed_metrics_are_exported() -> None:
    """The list panels and alerts are checked against names blockd really exports (no stale or mistyped name)."""
    stale = ALLOWED_METRICS - {"up"} - exported_metric_names()
    assert not stale, f"ALLOWED_METRICS names blockd does not export: {sorted(stale)}"


# --- promtool --------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (install Debian's `prometheus` package, which ships it)"
)


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"promtool {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


@needs_promtool
def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", str(PROMETHEUS / "blockd-alerts.yml"))


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    promtool("test", "rules", str(PROMETHEUS / "blockd-alerts.test.yml"))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Each alert in the rules file appears in the unit tests both with and without expected alerts."""
    rules = (PROMETHEUS / "blockd-alerts.yml").read_text()
    tests = (PROMETHEUS / "blockd-alerts.test.yml").read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", rules, flags=re.M)
    assert alerts, "no alerts found in blockd-alerts.yml"
    # Each alert_rule_test entry: "alertname: X" followed by either "exp_alerts: []" or a list.
    cases = re.findall(r"alertname: (\w+)\s*\n\s*exp_alerts:(\s*\[\])?", tests)
    for alert in alerts:
        outcomes = {bool(empty) for name, empty in cases if name == alert}
        assert outcomes == {True, False}, f"{alert}: needs a case where it fires and one where it does not"


def alert_exprs() -> dict[str, str]:
    """Each alert's expr, one-line or a block scalar (`expr: |`), read without a YAML parser."""
    exprs: dict[str, str] = {}
    alert = None
    lines = (PROMETHEUS / "blockd-alerts.yml").read_text().splitlines()
    for number, line in enumerate(lines):
        if match := re.match(r"\s*- alert: (\w+)\s*$", line):
            alert = match.group(1)
        elif (match := re.match(r"(\s*)expr:\s*(.*)$", line)) and alert is not None:
            indent, value = match.groups()
            if value.startswith(("|", ">")):
                block = []
                for following in lines[number + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= len(indent):
                        break
                    block.append(following.strip())
                value = " ".join(part for part in block if part)
            exprs[alert] = value
    return exprs


def test_alert_rules_use_only_exported_metrics() -> None:
    """A mistyped metric name would be mirrored in the promtool tests' input series and never fire in production."""
    exprs = alert_exprs()
    assert "BlockdEgressStale" in exprs and "offset 10m" in exprs["BlockdEgressStale"], exprs
    bad = []
    for alert, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{alert}: no metric in {expr!r}"
        bad += [f"{alert}: {name}" for name in sorted(names) if not allowed(name)]
    assert not bad, "alert rules use metrics blockd does not export:\n" + "\n".join(bad)


# --- Grafana dashboard --------------------------------------------------------------------------

# PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "atan2",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (good enough for dashboard expressions)."""
    assert "__name__" not in expr, f"select metrics by name, not via __name__: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, including $__rate_interval
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # any other Grafana variable
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.groups()
        if call is None and word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("sum by (group,list) (rate(blockd_dns_blocked_total[5m]))", {"blockd_dns_blocked_total"}),
        (
            'histogram_quantile(0.95, sum by (le, upstream) (rate(x_bucket{a=~"$b", c="d e"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        (
            "time() - max(blockd_last_reload_success_timestamp_seconds) > 7 * 86400",
            {"blockd_last_reload_success_timestamp_seconds"},
        ),
        ("a / on(instance) group_left(version) b offset 1h unless c == bool 1e3", {"a", "b", "c"}),
        ("sum(rate(foo_total[5m])) without (reason)", {"foo_total"}),
    ],
)
def test_metric_names_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def allowed(name: str) -> bool:
    return name in ALLOWED_METRICS


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # rows, collapsed or not


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_panels_use_only_exported_metrics(dashboard: dict) -> None:
    exprs = []
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        targets = [t for t in panel.get("targets", []) if t.get("expr")]
        assert targets, f"panel {panel['title']!r} has no query"
        exprs += [(panel["title"], t["expr"]) for t in targets]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # Grafana's label_values(selector, label): the second argument is a label, not a metric.
            exprs.append((f"${variable['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query.strip())))
    bad = []
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        bad += [f"{title!r}: {name}" for name in sorted(names) if not allowed(name)]
    assert not bad, "dashboard uses metrics blockd does not export:\n" + "\n".join(bad)


def test_dashboard_covers_the_contract(dashboard: dict) -> None:
    used: set[str] = set()
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            used |= metric_names(target.get("expr", ""))
    for name in [
        "blockd_dns_blocked_total",
        "blockd_dns_queries_total",
        "blockd_dns_responses_total",
        "blockd_upstream_request_duration_seconds_bucket",
        "blockd_upstream_requests_total",
        "blockd_reloads_total",
        "blockd_last_reload_success_timestamp_seconds",
        "blockd_list_domains",
        "blockd_build_info",
        "blockd_cache_hits_total",
        "blockd_cache_requests_total",
        "blockd_cache_entries",
        "blockd_egress_routes",
        "blockd_egress_reconciles_total",
        "blockd_egress_last_reconcile_success_timestamp_seconds",
        "blockd_egress_learned_addresses",
        "blockd_query_log_lines_total",
        "blockd_query_log_dropped_total",
        "blockd_query_log_errors_total",
    ]:
        assert name in used, f"no panel shows {name}"


def test_dashboard_datasource_is_a_template_variable(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard["panels"]):
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


# --- systemd unit -------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Active (uncommented) Key=value lines of the unit, every value per key in order."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_commands() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]  # READY=1 from blockd (blockd.sd_notify)
    assert settings["NotifyAccess"] == ["main"]
    (start,) = settings["ExecStart"]
    assert start.split()[1:] == ["run", "--config", "/etc/blockd/blockd.toml"]
    (pre,) = settings["ExecStartPre"]
    assert pre.split()[1:] == ["check", "--config", "/etc/blockd/blockd.toml"]
    (reload_,) = settings["ExecReload"]
    assert reload_.split()[1:] == ["reload", "--config", "/etc/blockd/blockd.toml"]
    assert {start.split()[0], pre.split()[0], reload_.split()[0]} == {"/usr/local/bin/blockd"}


def test_systemd_unit_hardening() -> None:
    settings = unit_settings()
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "User": "blockd",
        "RuntimeDirectory": "blockd",
        "LogsDirectory": "blockd",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "Restart": "on-failure",
        "WatchdogSec": "30s",
        "MemoryMax": "1G",
        "TasksMax": "64",
        "LimitNOFILE": "65536",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{key}: want {value!r}, have {settings.get(key)}"
    # CAP_NET_ADMIN only for egress: documented in a comment, never granted by default.
    text = UNIT.read_text()
    assert "CAP_NET_ADMIN" not in " ".join(v for values in settings.values() for v in values)
    assert re.search(r"^#.*CapabilityBoundingSet=.*CAP_NET_ADMIN", text, flags=re.M)
    assert "[egress] enabled = true" in text


def test_systemd_unit_limits_are_the_documented_ones() -> None:
    """README's Deployment section gives the measurements behind each limit: it must name the unit's values."""
    readme = (REPO / "README.md").read_text()
    deployment = readme[readme.index("## Deployment") :]
    settings = unit_settings()
    for key in ("WatchdogSec", "MemoryMax", "TasksMax", "LimitNOFILE"):
        (value,) = settings[key]
        assert f"`{key}={value}`" in deployment, f"README's Deployment section does not document {key}={value}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not on PATH")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify insists the binaries exist; blockd may not be installed at /usr/local/bin here.
    unit = tmp_path / "blockd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/blockd", shutil.which("true") or "/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
