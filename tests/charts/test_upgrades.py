"""Upgrades of a running release: what the chart renders when its ``lookup`` finds the release's
objects in the cluster, as ``helm upgrade`` does (an offline render finds nothing).

The cluster is the project's API emulator (tests/kube/emulator.py) on a loopback port, holding the
Deployments an earlier render of the chart made; deploy.render renders against it through a
kubeconfig, in a thread of its own since the emulator serves from this test's event loop.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import helm_python as helm
import pytest

from deploy import render
from tests.kube.conftest import TEST_TOKEN, Api, client_session, kubeconfig_text, serving
from tests.kube.emulator import Emulator

DEPLOYMENTS = f"/apis/apps/v1/namespaces/{render.NAMESPACE}/deployments"


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Api, str]]:
    """The test's API client and a kubeconfig for the chart's ``lookup``, on a fresh emulator."""
    async with serving(Emulator()) as emulator, client_session(emulator) as session:
        yield Api(session), kubeconfig_text(str(emulator.url), TEST_TOKEN)


def deployments(documents: list[render.Document]) -> dict[str, Mapping[str, Any]]:
    """component -> the Deployment of that component."""
    return {
        document.body["metadata"]["labels"]["app.kubernetes.io/component"]: document.body
        for document in documents
        if document.body["kind"] == "Deployment"
    }


async def install(api: Api, values: Mapping[str, Any], *components: str) -> dict[str, Mapping[str, Any]]:
    """Put the Deployments the chart renders with ``values`` in the cluster, as an install would
    (those of ``components`` only, when named)."""
    installed = {
        component: body
        for component, body in deployments(render.documents(values)).items()
        if component in components or not components
    }
    for body in installed.values():
        await api.create(DEPLOYMENTS, dict(body))
    return installed


async def upgrade(kubeconfig: str, values: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The Deployments an upgrade to ``values`` would apply."""
    rendered = await asyncio.to_thread(render.documents, values, kubeconfig=kubeconfig)
    return deployments(rendered)


async def test_enabling_autoscaling_keeps_the_replica_count_during_the_switch(
    cluster: tuple[Api, str],
) -> None:
    """A manifest without spec.replicas would reset a running Deployment to one pod until the
    HorizontalPodAutoscaler acts (the HPA docs' "Migrating Deployments and StatefulSets to
    horizontal autoscaling"): the chart carries the live count over instead."""
    api, kubeconfig = cluster
    await install(api, {"proxy": {"replicas": 6}})
    autoscaled = {"proxy": {"replicas": 6, "autoscaling": {"enabled": True, "minReplicas": 6}}}
    assert (await upgrade(kubeconfig, autoscaled))["proxy"]["spec"]["replicas"] == 6
    # Later upgrades keep whatever count the autoscaler has set since.
    name = (await upgrade(kubeconfig, autoscaled))["proxy"]["metadata"]["name"]
    await api.patch(f"{DEPLOYMENTS}/{name}", {"spec": {"replicas": 9}})
    assert (await upgrade(kubeconfig, autoscaled))["proxy"]["spec"]["replicas"] == 9
    # Without autoscaling the values decide again.
    assert (await upgrade(kubeconfig, {"proxy": {"replicas": 3}}))["proxy"]["spec"]["replicas"] == 3


@pytest.mark.parametrize("component", ["proxy", "controller"])
async def test_changing_name_override_fails_the_upgrade_naming_it(
    cluster: tuple[Api, str], component: str
) -> None:
    """nameOverride is in the Deployments' selectors, which Kubernetes never changes: an upgrade
    that changes it fails at render, saying so, instead of half-applied at the API server."""
    api, kubeconfig = cluster
    [installed] = (await install(api, {}, component)).values()
    unchanged = await upgrade(kubeconfig, {})
    assert unchanged[component]["spec"]["selector"] == installed["spec"]["selector"]
    with pytest.raises(helm.HelmRenderError) as refused:
        await upgrade(kubeconfig, {"nameOverride": "mail"})
    message = str(refused.value)
    assert (
        f"nameOverride is fixed at install: the Deployment {installed['metadata']['name']} selects" in message
    )
    assert '"app.kubernetes.io/name":"mailgress"}, and Kubernetes never changes' in message
    assert '"app.kubernetes.io/name":"mail"}. Keep the nameOverride' in message
