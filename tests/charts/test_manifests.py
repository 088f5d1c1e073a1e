"""Every rendered manifest against the Kubernetes API schemas, in strict mode (unknown fields are
errors), for every Kubernetes version the chart supports: 1.30 (Chart.yaml's kubeVersion floor)
to 1.37 (the newest kubernetes-validate knows). The CRD under crds/ is checked the same way.

kubernetes-validate has no schemas for custom resources: the Prometheus Operator's ServiceMonitor
and PodMonitor are the only such objects the chart renders, and tests/charts/test_chart.py checks
what they select instead.
"""

from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import render
from tests.charts.conftest import SCENARIOS, rendered, rendered_edge_names

OLDEST, NEWEST = "1.30.0", "1.37.0"
VERSIONS = [f"1.{minor}.0" for minor in range(30, 38)]
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}


def test_the_supported_range_is_the_charts_and_the_validators() -> None:
    chart = yaml.safe_load((render.CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={OLDEST}-0"
    assert kubernetes_validate.latest_version() == NEWEST
    assert (VERSIONS[0], VERSIONS[-1]) == (OLDEST, NEWEST)


def _validate(body: Mapping[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(dict(body), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        name = f"{body['kind']} {body['metadata']['name']}"
        pytest.fail(f"{name} is invalid for Kubernetes {version}: {error.message} at {list(error.path)}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_manifests_are_valid_in_strict_mode(scenario: str, version: str) -> None:
    checked = 0
    for document in rendered(scenario):
        if (document.body["apiVersion"], document.body["kind"]) in CUSTOM_KINDS:
            continue
        _validate(document.body, version)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_listener_names_yaml_could_misread_render_valid_manifests(version: str) -> None:
    """Names such as "on", "null" or "0x1a" would reach the API as a boolean, a null or a number."""
    checked = 0
    for document in rendered_edge_names():
        _validate(document.body, version)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("version", VERSIONS)
def test_crd_is_valid_in_strict_mode(version: str) -> None:
    crds = [yaml.safe_load(text) for text in render.crds()]
    assert [crd["metadata"]["name"] for crd in crds] == ["mailroutes.mailgress.io"]
    _validate(crds[0], version)


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_strict_validation_catches_a_misspelt_field(version: str) -> None:
    """The check above would pass anything if strict mode were not strict."""
    deployment = next(d.body for d in rendered("default") if d.body["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(dict(deployment)))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_skipped_kinds_are_the_ones_without_a_schema() -> None:
    """Any other kind without a schema would fail the strict check above instead of being skipped."""
    monitors = [
        d.body for d in rendered("monitoring") if (d.body["apiVersion"], d.body["kind"]) in CUSTOM_KINDS
    ]
    assert {(body["apiVersion"], body["kind"]) for body in monitors} == CUSTOM_KINDS
    for body in monitors:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(dict(body), NEWEST, strict=True)
