"""The emulator subclass keeps the API server's promises the controller and kopf rely on."""

import asyncio
import json
from typing import Any

import aiohttp

from tests.kube.conftest import (
    CONFIGMAPS,
    CONTROLLER_NAMESPACE,
    NAMESPACE,
    NAMESPACES,
    Api,
    create_crd,
    imap_route,
    proxy_pod,
    route_path,
)
from tests.kube.emulator import Access, Emulator

PODS = f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods"
ROUTES = f"/apis/mailgress.io/v1alpha1/namespaces/{NAMESPACE}/mailroutes"


async def test_server_set_metadata_and_generation(api: Api) -> None:
    await create_crd(api)
    created = await api.create(ROUTES, imap_route("r", "example.com"))
    metadata = created["metadata"]
    assert metadata["namespace"] == NAMESPACE
    assert metadata["generation"] == 1
    assert metadata["uid"]
    assert metadata["creationTimestamp"].endswith("Z")
    status_only = await api.patch(
        route_path("r") + "/status", {"status": {"x": 1}, "spec": {"domains": ["no"]}}
    )
    assert status_only["spec"]["domains"] == ["example.com"], "a /status write changes status only"
    assert status_only["metadata"]["generation"] == 1
    assert int(status_only["metadata"]["resourceVersion"]) > int(metadata["resourceVersion"])
    spec = await api.patch(route_path("r"), {"spec": {"domains": ["example.org"]}, "status": {"x": 2}})
    assert spec["metadata"]["generation"] == 2
    assert spec["status"] == {"x": 1}, "a write to the object leaves status alone"


async def test_preconditions(api: Api) -> None:
    await create_crd(api)
    created = await api.create(ROUTES, imap_route("r", "example.com"))
    version = created["metadata"]["resourceVersion"]
    await api.patch(route_path("r"), {"metadata": {"resourceVersion": version, "labels": {"a": "b"}}})
    async with api.session.patch(
        route_path("r"),
        json={"metadata": {"resourceVersion": version}},
        headers={"Content-Type": "application/merge-patch+json"},
    ) as stale:
        assert (stale.status, (await stale.json())["reason"]) == (409, "Conflict")
    async with api.session.patch(
        route_path("r"),
        json=[{"op": "test", "path": "/metadata/resourceVersion", "value": version}],
        headers={"Content-Type": "application/json-patch+json"},
    ) as failed_test:
        assert failed_test.status == 422
    async with api.session.post(ROUTES, json=imap_route("r", "example.com")) as again:
        assert (again.status, (await again.json())["reason"]) == (409, "AlreadyExists")
    async with api.session.get(route_path("missing")) as missing:
        assert (missing.status, (await missing.json())["reason"]) == (404, "NotFound")


async def test_list_selectors_and_kind(api: Api) -> None:
    await api.create(PODS, proxy_pod("proxy-a"))
    other = proxy_pod("other")
    other["metadata"]["labels"] = {"app": "else"}
    await api.create(PODS, other)
    listed = await api.call("GET", "/api/v1/pods?labelSelector=app.kubernetes.io/component%3Dproxy")
    assert listed["kind"] == "PodList"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["proxy-a"]
    negated = await api.call("GET", "/api/v1/pods?labelSelector=!app")
    assert [item["metadata"]["name"] for item in negated["items"]] == ["proxy-a"]
    by_field = await api.call(
        "GET", f"/api/v1/pods?fieldSelector=metadata.name%3Dother,metadata.namespace%3D{CONTROLLER_NAMESPACE}"
    )
    assert [item["metadata"]["name"] for item in by_field["items"]] == ["other"]
    async with api.session.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dx") as unsupported:
        assert unsupported.status == 400


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(10):
        while len(events) < count:
            line = await response.content.readline()
            if line.strip():
                events.append(json.loads(line))
    return events


async def test_watch_from_a_resource_version(api: Api) -> None:
    await api.create(PODS, proxy_pod("before"))
    listed = await api.call("GET", PODS)
    since = listed["metadata"]["resourceVersion"]
    await api.create(PODS, proxy_pod("after"))
    url = f"{PODS}?watch=true&resourceVersion={since}&timeoutSeconds=5"
    async with api.session.get(url) as response:
        (replayed,) = await read_events(response, 1)
        assert (replayed["type"], replayed["object"]["metadata"]["name"]) == ("MODIFIED", "after")
        await api.patch(f"{PODS}/before", {"metadata": {"labels": {"x": "y"}}})
        (live,) = await read_events(response, 1)
        assert (live["type"], live["object"]["metadata"]["name"]) == ("MODIFIED", "before")
        await api.delete(f"{PODS}/after")
        (gone,) = await read_events(response, 1)
        assert (gone["type"], gone["object"]["metadata"]["name"]) == ("DELETED", "after")


async def test_watch_ends_after_its_timeout_and_knows_watch_true(api: Api) -> None:
    await api.create(PODS, proxy_pod("a"))
    async with api.session.get(f"{PODS}?watch=True&timeoutSeconds=1") as response:
        (added,) = await read_events(response, 1)
        assert added["type"] == "ADDED"
        async with asyncio.timeout(10):
            assert await response.content.read() == b""  # the server closed the stream


async def test_crd_discovery_and_version(emulator: Emulator, api: Api) -> None:
    async with api.session.get("/apis/mailgress.io/v1alpha1") as before:
        assert before.status == 404
    await create_crd(api)
    resources = await api.call("GET", "/apis/mailgress.io/v1alpha1")
    names = {item["name"]: item for item in resources["resources"]}
    assert names["mailroutes"]["kind"] == "MailRoute"
    assert names["mailroutes"]["namespaced"] is True
    assert "mailroutes/status" in names
    crd = await api.call(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/mailroutes.mailgress.io"
    )
    assert {c["type"] for c in crd["status"]["conditions"]} == {"Established", "NamesAccepted"}
    assert (await api.call("GET", "/version/"))["major"] == "1"
    namespaces = await api.call("GET", "/api/v1/namespaces")
    assert sorted(item["metadata"]["name"] for item in namespaces["items"]) == sorted(NAMESPACES)


async def test_accesses_are_recorded_per_token(emulator: Emulator, api: Api) -> None:
    headers = {"Authorization": "Bearer other"}
    async with (
        aiohttp.ClientSession(str(emulator.url), headers=headers) as session,
        session.get(f"{PODS}/x") as got,
    ):
        assert got.status == 404
    await api.create(PODS, proxy_pod("a"))
    assert [access.as_json() for access in emulator.accesses("other")] == [
        {"verb": "get", "resource": "pods"}
    ]
    assert {"verb": "create", "resource": "pods"} in [
        access.as_json() for access in emulator.accesses("test-token")
    ]


async def test_a_forbidden_access_is_refused_before_anything_is_stored(emulator: Emulator, api: Api) -> None:
    """What a missing RBAC rule does: 403 Forbidden for that token only, nothing written."""
    configmaps = f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/configmaps"
    body = {"metadata": {"name": "c"}, "data": {"k": "v"}}
    emulator.forbidden["test-token"] = {Access(verb="create", resource="configmaps")}
    async with api.session.post(configmaps, json=body) as refused:
        assert (refused.status, (await refused.json())["reason"]) == (403, "Forbidden")
    assert (CONFIGMAPS, CONTROLLER_NAMESPACE, "c") not in emulator.objects
    assert Access(verb="create", resource="configmaps") in emulator.accesses("test-token")
    await api.create(PODS, proxy_pod("a"))  # other accesses of the token are allowed
    emulator.forbidden.clear()
    created = await api.create(configmaps, body)
    assert created["data"] == {"k": "v"}
