"""The Grafana dashboard (charts/mailgress/dashboards/mailgress.json) asks only for metrics the
proxy and the controller export, covers what the issue asks of it, and ships in the ConfigMap
Grafana's sidecar reads.
"""

import json
import re
from typing import Any

from prometheus_client import CollectorRegistry

from controller import metrics as controller_metrics
from deploy import render
from proxy import metrics as proxy_metrics
from tests.charts.conftest import objects

DASHBOARD = render.CHART / "dashboards" / "mailgress.json"
METRIC = re.compile(rf"\b(?:{proxy_metrics.PREFIX}|{controller_metrics.PREFIX})_[a-z_]+\b")
# Sample name suffixes per metric type, as Prometheus stores them.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    """Every series name the proxy's and the controller's metrics produce."""
    registry = CollectorRegistry()
    proxy_metrics.create(registry)
    controller_metrics.create(registry)
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    found += [
        variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable
    ]
    return found


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expression in expressions(dashboard) for name in METRIC.findall(expression)}
    missing = sorted(used - exported())
    assert not missing, f"not exported by proxy/metrics.py or controller/metrics.py: {missing}"
    # Sessions, logins by outcome, bytes, backend latency, table version per pod and at the
    # controller, push lag, proxies connected, drained sessions.
    for needed in (
        "mailgress_proxy_sessions_active",
        "mailgress_proxy_logins_total",
        "mailgress_proxy_relay_bytes_total",
        "mailgress_proxy_backend_connect_seconds_bucket",
        "mailgress_proxy_routing_table_info",
        "mailgress_controller_table_info",
        "mailgress_controller_push_lag_seconds_bucket",
        "mailgress_controller_proxies_connected",
        "mailgress_proxy_drained_sessions_total",
    ):
        assert needed in used, f"no panel shows {needed}"


def test_dashboard_panels_are_titled_described_and_unique() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert all(panel["title"] and panel["description"] for panel in panels)
    assert dashboard["uid"] == "mailgress-proxy"


def test_dashboard_ships_in_a_sidecar_configmap() -> None:
    [configmap] = [
        body for body in objects("default", "ConfigMap") if body["metadata"]["name"] == "mailgress-dashboard"
    ]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["mailgress.json"]) == json.loads(DASHBOARD.read_text())
    assert [body["metadata"]["name"] for body in objects("minimal", "ConfigMap")] == ["mailgress-proxy"]


def test_push_lag_panel_shows_the_median_and_the_99th_percentile() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [panel for panel in dashboard["panels"] if panel["title"] == "Push lag"]
    expressions = [target["expr"] for target in panel["targets"]]
    assert [expression.split(",")[0] for expression in expressions] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.99",
    ]
    assert all("mailgress_controller_push_lag_seconds_bucket" in expression for expression in expressions)
