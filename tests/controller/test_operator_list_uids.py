"""``KubeApi.list_uids``, the resync's LIST (controller.handlers.Resync): paths of core and other
groups, namespaced or not, the selectors kopf's watches use, paging by continue token, metadata
only, and failures that return nothing (a resync then changes nothing)."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from controller import handlers, operator, reconciler
from tests.controller.test_operator import Scripted, kube_api, scripted_kube_api  # noqa: F401 (fixture)
from tests.kube.conftest import proxy_pod
from tests.kube.emulator import Access, Emulator

ROUTE_KIND = (handlers.GROUP, handlers.VERSION, handlers.PLURAL)


async def create(emulator: Emulator, path: str, body: dict[str, Any]) -> str:
    async with emulator.post(path, json=body) as response:
        assert response.status == 200
        created = await response.json()
        uid: str = created["metadata"]["uid"]
        return uid


async def test_the_selected_objects_of_a_namespace_or_of_all(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
) -> None:
    emulator, api = kube_api
    pods = "/api/v1/namespaces/mailgress-system/pods"
    proxy = await create(emulator, pods, proxy_pod("proxy-a"))
    other = proxy_pod("web")
    other["metadata"]["labels"] = {"app": "web"}
    await create(emulator, pods, other)
    elsewhere = proxy_pod("proxy-x")
    elsewhere["metadata"]["namespace"] = "mail"
    stray = await create(emulator, "/api/v1/namespaces/mail/pods", elsewhere)
    labels, fields = "app.kubernetes.io/component=proxy", "metadata.namespace=mailgress-system"
    assert await api.list_uids(handlers.PODS, "mailgress-system", labels, fields) == {proxy}
    assert await api.list_uids(handlers.PODS, None, labels) == {proxy, stray}
    assert await api.list_uids(handlers.PODS, None, labels, fields) == {proxy}
    assert await api.list_uids(handlers.SLICES, "mail") == frozenset()
    assert set(emulator.accesses("writer-token")) == {
        Access(verb="list", group="discovery.k8s.io", resource="endpointslices"),
        Access(verb="list", resource="pods"),
    }


async def test_a_refused_list_is_a_refusal(kube_api: tuple[Emulator, operator.KubeApi]) -> None:  # noqa: F811
    emulator, api = kube_api
    emulator.forbidden["writer-token"] = {Access(verb="list", resource="services")}
    with pytest.raises(reconciler.ForbiddenError, match="HTTP 403"):
        await api.list_uids(handlers.SERVICES, "mail")


@pytest.fixture
async def paged() -> AsyncIterator[Scripted]:
    async with scripted_kube_api() as scripted:
        yield scripted


def page(uids: list[str], token: str = "") -> dict[str, Any]:
    metadata = {"resourceVersion": "7", **({"continue": token} if token else {})}
    return {
        "kind": "PartialObjectMetadataList",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "items": [{"metadata": {"uid": uid, "name": uid}} for uid in uids],
    }


async def test_pages_are_followed_to_the_last_with_the_same_query(
    paged: tuple[list[tuple[int, Any]], list[web.Request], operator.KubeApi],
) -> None:
    answers, requests, api = paged
    answers.extend([(200, page(["a", "b"], "t1")), (200, page(["c"], "t2")), (200, page([]))])
    found = await api.list_uids(handlers.SECRETS, "mail", "mailgress.io/auth-http=true")
    assert found == {"a", "b", "c"}
    assert [request.path for request in requests] == ["/api/v1/namespaces/mail/secrets"] * 3
    assert [dict(request.query) for request in requests] == [
        {"limit": "500", "labelSelector": "mailgress.io/auth-http=true"},
        {"limit": "500", "labelSelector": "mailgress.io/auth-http=true", "continue": "t1"},
        {"limit": "500", "labelSelector": "mailgress.io/auth-http=true", "continue": "t2"},
    ]
    assert {request.headers["Accept"] for request in requests} == {operator.KubeApi.METADATA_ONLY}


async def test_a_clusterwide_list_of_a_group(
    paged: tuple[list[tuple[int, Any]], list[web.Request], operator.KubeApi],
) -> None:
    answers, requests, api = paged
    answers.append((200, {"metadata": {}, "items": None}))  # what an empty list may look like
    assert await api.list_uids(ROUTE_KIND, None) == frozenset()
    assert requests[0].path == "/apis/mailgress.io/v1alpha1/mailroutes"
    assert dict(requests[0].query) == {"limit": "500"}


@pytest.mark.parametrize(
    ("status", "body", "error", "words"),
    [
        pytest.param(503, {}, reconciler.ClusterUnavailableError, "HTTP 503", id="unavailable"),
        pytest.param(
            410,
            {"code": 410, "message": "The provided continue parameter is too old"},
            reconciler.ClusterError,
            "HTTP 410: The provided continue parameter is too old",
            id="continue-expired",
        ),
        pytest.param(200, "not json", reconciler.ClusterError, "Expecting value", id="not-json"),
        pytest.param(200, {"items": {}}, reconciler.ClusterError, "not a list", id="items-not-a-list"),
        pytest.param(200, [], reconciler.ClusterError, "not a list", id="not-an-object"),
        pytest.param(
            200, {"items": [{"metadata": {"name": "x"}}]}, reconciler.ClusterError, "has no uid", id="no-uid"
        ),
        pytest.param(200, {"items": ["x"]}, reconciler.ClusterError, "has no uid", id="item-not-an-object"),
    ],
)
async def test_a_failure_on_any_page_returns_nothing(
    paged: tuple[list[tuple[int, Any]], list[web.Request], operator.KubeApi],
    status: int,
    body: Any,
    error: type[reconciler.ClusterError],
    words: str,
) -> None:
    """The first page read, the second failing: an error, not the uids read so far (a partial
    list would make every object of the other pages look deleted)."""
    answers, _, api = paged
    answers.extend([(200, page(["a"], "t1")), (status, body)])
    with pytest.raises(error, match=words) as raised:
        await api.list_uids(handlers.SERVICES, "mail")
    assert str(raised.value).startswith("GET /api/v1/namespaces/mail/services: ")
    if error is reconciler.ClusterError:
        assert not isinstance(raised.value, reconciler.ClusterUnavailableError)
