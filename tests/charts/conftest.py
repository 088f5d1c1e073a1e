"""Shared pieces of the chart tests: the value sets, rendering them once, and finding objects.

The value sets are the chart's own ``ci/*-values.yaml`` (chart-testing's convention) plus the
defaults; ``rendered(name)`` renders one through deploy.render (the code ``make render`` uses) and
caches it for the session. The RBAC test needs every request the controller made in the operator
tests (tests/kube), so it runs last: this file moves it behind them, and re-exports their access
log fixture.
"""

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from deploy import render
from tests.kube.conftest import controller_accesses  # noqa: F401 (re-exported fixture)

CI_VALUES = render.CHART / "ci"
SCENARIOS: dict[str, Mapping[str, Any]] = {"default": {}} | {
    path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text())
    for path in sorted(CI_VALUES.glob("*-values.yaml"))
}
RBAC_TEST = Path(__file__).with_name("test_rbac.py")
# Listener names at the edges of Kubernetes' port-name rule (an IANA service name: at most 15
# lower-case letters and digits, single '-' between them, at least one letter), some of which YAML
# reads as a boolean, a null or a number unless the chart quotes them.
EDGE_LISTENER_NAMES = ("a", "imap-a", "a-b-c", "1imap", "submissions1234", "on", "no", "null", "1e5", "0x1a")
EDGE_NAMES_VALUES: Mapping[str, Any] = {
    "proxy": {
        "listeners": [
            {"name": name, "protocol": "imap", "port": 2000 + index, "containerPort": 12000 + index}
            for index, name in enumerate(EDGE_LISTENER_NAMES)
        ]
    }
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the RBAC test after everything else, so the operator tests have recorded first."""
    last = [item for item in items if item.path == RBAC_TEST]
    items[:] = [item for item in items if item.path != RBAC_TEST] + last


@functools.cache
def rendered(scenario: str) -> tuple[render.Document, ...]:
    """The objects the chart renders for one value set (rendered once per session)."""
    return tuple(render.documents(SCENARIOS[scenario]))


@functools.cache
def rendered_edge_names() -> tuple[render.Document, ...]:
    """The objects the chart renders for EDGE_NAMES_VALUES (rendered once per session)."""
    return tuple(render.documents(EDGE_NAMES_VALUES))


def objects(scenario: str, kind: str) -> list[Mapping[str, Any]]:
    return [document.body for document in rendered(scenario) if document.body["kind"] == kind]


def one(scenario: str, kind: str, component: str) -> Mapping[str, Any]:
    """The single object of ``kind`` labelled with ``component`` (proxy, controller)."""
    found = [
        body
        for body in objects(scenario, kind)
        if body["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{scenario}: expected one {component} {kind}, found {len(found)}"
    return found[0]


def container(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: Mapping[str, Any] = containers[0]
    return found


@functools.cache
def values(scenario: str) -> dict[str, Any]:
    """The values a scenario installs with: the chart's defaults merged with its overrides."""
    with helm.Chart.load(render.CHART) as chart:
        return chart.merge_values(dict(SCENARIOS[scenario]))
