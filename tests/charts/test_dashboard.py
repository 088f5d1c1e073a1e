"""The Grafana dashboard (charts/mailgress/dashboards/mailgress.json) asks only for metrics the
proxy exports, covers what the issue asks of it, and ships in the ConfigMap Grafana's sidecar reads.
"""

import json
import re
from typing import Any

from prometheus_client import CollectorRegistry

from deploy import render
from proxy import metrics
from tests.charts.conftest import objects

DASHBOARD = render.CHART / "dashboards" / "mailgress.json"
METRIC = re.compile(rf"\b{metrics.PREFIX}_[a-z_]+\b")
# Sample name suffixes per metric type, as Prometheus stores them.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    """Every series name the proxy's metrics produce."""
    registry = CollectorRegistry()
    metrics.create(registry)
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
    assert used <= exported(), f"not exported by proxy/metrics.py: {sorted(used - exported())}"
    # Sessions, logins by outcome, bytes, backend latency, table version per pod.
    for needed in (
        "mailgress_proxy_sessions_active",
        "mailgress_proxy_logins_total",
        "mailgress_proxy_relay_bytes_total",
        "mailgress_proxy_backend_connect_seconds_bucket",
        "mailgress_proxy_routing_table_info",
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
