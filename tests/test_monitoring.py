"""The chart's monitoring files: alert rules and the Grafana dashboard (docs/monitoring.md).

Owns the checks of charts/nbd-csi/rules/ and charts/nbd-csi/dashboards/nbd-csi.json, used here
as plain files, without Helm:
- `promtool check rules` and `promtool test rules` (the unit tests beside the rules), and that
  those unit tests hold a firing and a not-firing case for every alert;
- the dashboard's structure: unique panel ids, a layout without overlaps, every target with an
  expression, every template variable defined and used, every expression valid PromQL (promtool
  2.42 has no query checker, so each one goes through `promtool check rules` as a recording
  rule), and every metric name one that docs/metrics.md documents or the CSI plugin serves;
- against a real Prometheus (Debian's binary) on loopback, scraping a running storage node with
  two volumes in two tenants, NBD I/O from qemu-io and tenant limits set, and loaded with the
  alert rules, also scraping a running CSI controller plugin (`python -m csi --mode
  controller`, a TenantQuota per tenant in the Kubernetes API stand-in) that answered calls,
  one of them with an error: every dashboard query, with its variables set to "All" and to real
  values, returns data, every plugin metric the dashboard uses is one the plugin serves, every
  variable query finds its values, every rule evaluates without error, and the two alerts this
  setup provokes (a tenant near its quota, a node with little provisionable capacity left)
  become pending (marked slow).

Not checked against a running program here: NbdCsiReconnectStorm, on the node plugin's
nbdcsi_node_reconnects_total, which needs the kernel's NBD (the VM test reads that counter from
the plugin; PENDING_METRICS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.v1 import csi_pb2 as csi_pb
from storage_node.v1 import storage_node_pb2 as pb
from tests.csi.plugin import Plugin, start_plugin, storage_args
from tests.support.api import ApiNode, poll, start_api_node
from tests.support.kube_api import KubeApi, tenant_quota
from tests.support.prometheus import Prometheus
from tests.support.servers import REPO, free_port

MiB = 1024 * 1024
CHART = REPO / "charts" / "nbd-csi"
RULES_DIR = CHART / "rules"
RULES = RULES_DIR / "nbd-csi.rules.yaml"
RULE_TESTS = RULES_DIR / "nbd-csi.rules.test.yaml"
DASHBOARD = CHART / "dashboards" / "nbd-csi.json"
METRICS_DOC = REPO / "docs" / "metrics.md"

# The scrape jobs the rules expect (the chart's ServiceMonitors set them; it can rename the
# storage nodes' one).
STORAGE_NODE_JOB = "nbdcsi-storage-node"
CONTROLLER_JOB = "nbdcsi-controller"
# Metrics the rules and dashboard may use besides the storage node's (docs/metrics.md):
# Prometheus's own; the CSI plugin's (csi/metrics.py), which the slow test finds served by a
# running plugin; and the node plugin's reconnect counter, which it does not serve yet.
PROMETHEUS_METRICS = {"up", "ALERTS"}
PLUGIN_METRICS = {
    "nbdcsi_grpc_calls_total",
    "nbdcsi_grpc_call_duration_seconds_bucket",
    "nbdcsi_tenant_quota_used",
    "nbdcsi_tenant_quota_limit",
}
PENDING_METRICS = {"nbdcsi_node_reconnects_total"}
NOT_STORAGE_NODE_METRICS = PROMETHEUS_METRICS | PLUGIN_METRICS | PENDING_METRICS
DASHBOARD_VARIABLES = {"datasource", "node", "instance", "tenant", "volume"}
# Grafana's built-in interval variable, set to what Grafana would pick for a short range.
RATE_INTERVAL = "1m"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs Debian's prometheus"
)


def promtool(*args: str, cwd: Path = RULES_DIR) -> str:
    result = subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


def documented_metrics() -> set[str]:
    """Metric names in docs/metrics.md; a histogram also has its _bucket, _count and _sum."""
    text = METRICS_DOC.read_text()
    names = set(re.findall(r"`(nbdcsi_\w+)`", text))
    for name in re.findall(r"^\|\s*`(nbdcsi_\w+)`\s*\|\s*histogram\s*\|", text, re.MULTILINE):
        names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


# Words that can precede "(" or "{" or stand alone in our expressions and are not metrics.
PROMQL_WORDS = {
    "sum", "count", "min", "max", "avg", "rate", "increase", "histogram_quantile", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "vector",
    "last_over_time",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that name metrics (not functions, labels or keywords)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^]]*\]", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_ranges)
    without_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_labels
    )
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", without_groupings))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhd]?", w)}


# ---- (a) the alert rules --------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", RULES.name)
    assert f"SUCCESS: {len(alert_names())} rules found" in out


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name)


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = re.findall(r"alertname: (\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", RULE_TESTS.read_text())
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    names = set(alert_names())
    assert len(names) == 8
    assert names - firing == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_rules_use_documented_metrics_only() -> None:
    text = re.sub(r"#.*", "", RULES.read_text())  # comments may name anything
    used = set(re.findall(r"\bnbdcsi_\w+", text))
    assert used - NOT_STORAGE_NODE_METRICS <= documented_metrics()
    assert f'job="{STORAGE_NODE_JOB}"' in text  # the text the chart's template replaces


# ---- (b) the dashboard's structure -----------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those inside (collapsed) rows."""
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


@dataclass(frozen=True)
class Target:
    panel: str
    expr: str
    instant: bool


def targets() -> list[Target]:
    return [
        Target(panel["title"], t["expr"], bool(t.get("instant")))
        for panel in all_panels(dashboard())
        for t in panel.get("targets", [])
    ]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def test_dashboard_header() -> None:
    board = dashboard()
    assert board["uid"] == "nbd-csi"
    assert board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    assert board["time"]["from"].startswith("now-")


def test_dashboard_panel_ids_unique_and_layout_without_overlaps() -> None:
    panels = all_panels(dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview", "Tenants", "Volumes", "Storage nodes", "CSI plugin"]


def test_dashboard_every_panel_queries_the_chosen_datasource() -> None:
    for panel in all_panels(dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip(), panel["title"]
            assert t["datasource"] == panel["datasource"]


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def test_dashboard_variables_defined_and_used() -> None:
    defined = variables()
    assert set(defined) == DASHBOARD_VARIABLES
    assert defined["datasource"]["type"] == "datasource"
    assert defined["datasource"]["query"] == "prometheus"
    for name in DASHBOARD_VARIABLES - {"datasource"}:
        var = defined[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], name
        assert var["datasource"]["uid"] == "${datasource}", name
        assert re.fullmatch(r"label_values\(.+, \w+\)", variable_query(var)), name
    texts = [t.expr for t in targets()] + [variable_query(v) for v in defined.values()]
    used = {m for text in texts for m in re.findall(r"\$(\w+)", text)}
    assert used == DASHBOARD_VARIABLES - {"datasource"} | {"__rate_interval"}


def test_dashboard_uses_documented_metrics_only() -> None:
    selectors = [
        re.sub(r"^label_values\((.+), \w+\)$", r"\1", variable_query(v))
        for v in variables().values()
        if v["type"] == "query"
    ]
    used = {name for expr in [t.expr for t in targets()] + selectors for name in metric_names(expr)}
    assert "nbdcsi_volume_request_duration_seconds_bucket" in used  # the parser finds names
    assert used - NOT_STORAGE_NODE_METRICS <= documented_metrics()


def substitute(expr: str, values: dict[str, str]) -> str:
    """Set the template variables as Grafana would (one value, or a regex for several)."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, value in values.items():
        out = out.replace(f"${name}", value)
    assert "$" not in out, out
    return out


ALL = {"node": ".*", "instance": ".*", "tenant": ".*", "volume": ".*"}


@needs_promtool
def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    # A rule file is YAML, and JSON is YAML: each expression becomes a recording rule.
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute(t.expr, ALL)}
        for i, t in enumerate(targets())
    ]
    path = tmp_path / "dashboard.rules.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", path.name, cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


# ---- (c) a real Prometheus ------------------------------------------------------------------


PLANNED = 16 * MiB + 8 * MiB  # the two volumes of the test


@dataclass
class Setup:
    node: ApiNode
    metrics_port: int
    volumes: dict[str, str]  # tenant -> volume id


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A node whose provisionable capacity (filesystem size x overcommit ratio) is PLANNED/0.9,
    so that the two volumes leave 10 % of it: below NbdCsiStorageNodeCapacityLow's 15 %."""
    st = os.statvfs(tmp_path)
    ratio = PLANNED / 0.9 / (st.f_blocks * st.f_frsize)
    port = free_port()
    node = start_api_node(
        tmp_path / "node",
        extra_args=["--metrics-listen", f"127.0.0.1:{port}", "--overcommit-ratio", repr(ratio)],
    )
    try:
        volumes = {}
        for name, tenant, size in (("mon-a", "tenant-a", 16 * MiB), ("mon-b", "tenant-b", 8 * MiB)):
            labels = {
                "csi.storage.k8s.io/pvc/namespace": tenant,
                "csi.storage.k8s.io/pvc/name": f"disk-{name}",
            }
            volume = node.api.CreateVolume(
                pb.CreateVolumeRequest(name=name, tenant=tenant, size_bytes=size, labels=labels)
            )
            volumes[tenant] = volume.id
        # tenant-a far from its limits; tenant-b at 8 of 8.5 MiB: above 90 %.
        for tenant, capacity in (("tenant-a", 1024 * MiB), ("tenant-b", 8 * MiB + MiB // 2)):
            node.api.SetTenantLimits(
                pb.SetTenantLimitsRequest(
                    name=tenant,
                    limits=pb.TenantLimits(capacity_bytes=capacity, volumes=4, snapshots=4),
                )
            )
        yield Setup(node, port, volumes)
    finally:
        node.stop()


@dataclass
class Controller:
    plugin: Plugin
    metrics_port: int


@pytest.fixture
def controller(setup: Setup, tmp_path: Path) -> Iterator[Controller]:
    """The CSI controller plugin on the setup's storage node, serving its metrics, with a
    TenantQuota for each tenant (the same limits the setup gave the node: the controller
    gives every node the whole quota)."""
    port = free_port()
    node = setup.node
    with KubeApi() as kube:
        for tenant, capacity in (("tenant-a", "1Gi"), ("tenant-b", "8704Ki")):
            kube.put(tenant_quota(tenant, capacity=capacity, volumes=4, snapshots=4))
        plugin = start_plugin(
            tmp_path / "plugin",
            "--mode", "controller",
            *storage_args([("storage-test", node.api_port)], node.data_dir / "api-token"),
            "--metrics-listen", f"127.0.0.1:{port}",
            "--kubeconfig", str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        )  # fmt: skip
        try:
            yield Controller(plugin, port)
        finally:
            plugin.stop()


def qemu_io(url: str) -> None:
    result = subprocess.run(
        [
            "qemu-io", "-f", "raw", url,
            "-c", "write -P 0x5a 0 2M",
            "-c", "write -z 4M 64k",
            "-c", "flush",
            "-c", "read -P 0x5a 0 1M",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def label_values(prom: Prometheus, query: str) -> set[str]:
    """Grafana's label_values(SELECTOR, LABEL), asked of Prometheus as a plain query."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    selector, label = match.groups()
    return {r["metric"][label] for r in prom.vector(selector) if label in r["metric"]}


@pytest.mark.slow
@needs_prometheus
def test_prometheus_answers_every_dashboard_query_and_evaluates_every_rule(
    setup: Setup, controller: Controller, tmp_path: Path
) -> None:
    node = setup.node
    prom = Prometheus(
        tmp_path,
        {STORAGE_NODE_JOB: setup.metrics_port, CONTROLLER_JOB: controller.metrics_port},
        rule_files=[RULES],
    )
    try:
        # The plugin answers calls, one with an error (CreateVolume without a name).
        plugin = controller.plugin
        assert plugin.probe()
        plugin.controller.ControllerGetCapabilities(csi_pb.ControllerGetCapabilitiesRequest())
        with pytest.raises(grpc.RpcError) as failed:
            plugin.controller.CreateVolume(csi_pb.CreateVolumeRequest())
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        poll(prom.ready, bool, 60, "prometheus not ready", step=0.2)
        prom.wait('nbdcsi_grpc_calls_total{code="INVALID_ARGUMENT"}', lambda r: len(r) == 1)
        prom.wait("rate(nbdcsi_grpc_calls_total[1m])", lambda r: len(r) >= 4)
        # The controller counts both tenants' usage on the storage node for their quotas.
        prom.wait('nbdcsi_tenant_quota_used{resource="capacity_bytes"}', lambda r: len(r) == 2)
        served = {
            r["metric"]["__name__"]
            for r in prom.vector(f'{{__name__=~"nbdcsi_.+", job="{CONTROLLER_JOB}"}}')
        }
        assert served >= PLUGIN_METRICS

        instance = f"127.0.0.1:{setup.metrics_port}"
        up = prom.wait(f'up{{job="{STORAGE_NODE_JOB}"}}', lambda r: len(r) == 1)
        assert up[0]["metric"]["instance"] == instance
        # I/O once Prometheus has the counters at zero, so that rates see it; then wait for
        # what the queries need: a rate over the writes of both volumes and the limits (the
        # node reads its catalogue every two seconds).
        writes = 'nbdcsi_volume_requests_total{op="write"}'
        prom.wait(writes, lambda r: len(r) == 2)
        for volume_id in setup.volumes.values():
            attachment = node.api.publish(volume_id)
            qemu_io(f"nbd://127.0.0.1:{node.nbd_port}/{attachment.export_name}")
        prom.wait(f"rate({writes}[1m]) > 0", lambda r: len(r) == 2)
        prom.wait("nbdcsi_tenant_capacity_limit_bytes", lambda r: len(r) == 2)

        # Every template variable finds its values.
        values = {
            name: label_values(prom, substitute(variable_query(var), ALL))
            for name, var in variables().items()
            if var["type"] == "query"
        }
        assert values == {
            "node": {"storage-test"},
            "instance": {instance},
            "tenant": {"tenant-a", "tenant-b"},
            "volume": set(setup.volumes.values()),
        }
        real = {
            "node": "storage-test",
            "instance": instance,
            "tenant": "tenant-a",
            "volume": setup.volumes["tenant-a"],
        }

        # Every dashboard query returns data with the variables on "All" and on real values;
        # with real values, only series of the chosen tenant, volume and node.
        for chosen in (ALL, real):
            for target in targets():
                expr = substitute(target.expr, chosen)
                result = prom.vector(expr)
                assert result, (target.panel, target.expr, chosen)
                if chosen is real:
                    for r in result:
                        for label in ("tenant", "volume", "node", "instance"):
                            assert r["metric"].get(label, real[label]) == real[label], (
                                target.panel,
                                r,
                            )

        # Every rule is loaded, has its severity and annotations, has been evaluated without
        # error, and its expression answers a query.
        def evaluated(groups: list[dict[str, Any]]) -> bool:
            rules = [rule for g in groups for rule in g["rules"]]
            return len(rules) == len(alert_names()) and all(
                r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules
            )

        groups = poll(lambda: prom.api("rules")["groups"], evaluated, 45, "rules evaluated")
        rules = [rule for g in groups for rule in g["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(alert_names())
        for rule in rules:
            assert rule["type"] == "alerting", rule
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["name"]
            assert set(rule["annotations"]) == {"summary", "description"}, rule["name"]
            prom.vector(rule["query"])  # status success, or the assert in api() fails

        # This setup provokes two alerts (pending: their `for` is minutes) and no other.
        def active(alerts: list[dict[str, Any]]) -> set[tuple[str, str]]:
            return {(a["labels"]["alertname"], a["labels"].get("tenant", "")) for a in alerts}

        # tenant-b has a TenantQuota, so the cross-node alert speaks for it, not the per-node one.
        expected = {
            ("NbdCsiTenantQuotaNearLimit", "tenant-b"),
            ("NbdCsiStorageNodeCapacityLow", ""),
        }
        alerts = poll(
            lambda: prom.api("alerts")["alerts"],
            lambda a: active(a) == expected,
            45,
            "the two alerts of this setup",
        )
        by_name = {a["labels"]["alertname"]: a for a in alerts}
        assert all(a["state"] == "pending" for a in alerts)
        capacity = by_name["NbdCsiStorageNodeCapacityLow"]
        assert capacity["labels"]["instance"] == instance
        # The summary found the node's name through nbdcsi_node_info.
        assert capacity["annotations"]["summary"].startswith(
            "nbd-csi storage node storage-test can provision only"
        )
        quota = by_name["NbdCsiTenantQuotaNearLimit"]
        assert quota["labels"]["resource"] == "capacity_bytes"
        assert quota["annotations"]["summary"] == (
            "Tenant tenant-b uses 94.12% of its capacity_bytes quota"
        )
    finally:
        prom.stop()
