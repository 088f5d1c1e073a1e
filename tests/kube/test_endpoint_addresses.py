"""EndpointSlices the proxies cannot use, through the real operator against the emulator: a
hand-made FQDN or leading-zero slice of one Service leaves every other route programmed on
every proxy, and a dual-stack Service counts each pod once."""

from typing import Any

from proxy import table
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    NAMESPACE,
    Api,
    Controller,
    FakeProxy,
    condition,
    create_backend,
    create_route,
    eventually,
    imap_route,
    proxy_pod,
    service_body,
    slice_body,
    snapshot_of,
    status_of,
)
from tests.kube.emulator import Emulator

PROXIES = ("proxy-a", "proxy-b")
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def condition_is(emulator: Emulator, name: str, kind: str, status: str, reason: str) -> bool:
    found = condition(emulator, name, kind)
    return (found.get("status"), found.get("reason")) == (status, reason)


async def create_service(api: Api, name: str, *slices: dict[str, Any]) -> None:
    await api.create(f"/api/v1/namespaces/{NAMESPACE}/services", service_body(name))
    for body in slices:
        await api.create(SLICES, body)


def typed_slice(
    service: str, name: str, address_type: str, endpoints: list[dict[str, Any]]
) -> dict[str, Any]:
    body = slice_body(service, [])
    body["metadata"]["name"] = name
    body["addressType"] = address_type
    body["endpoints"] = endpoints
    return body


def pod_endpoint(address: str, pod: str) -> dict[str, Any]:
    target = {"kind": "Pod", "namespace": NAMESPACE, "name": pod, "uid": f"uid-{pod}"}
    return {"addresses": [address], "conditions": {"ready": True}, "targetRef": target}


async def test_unusable_slices_leave_every_other_route_programmed(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    for name in PROXIES:
        await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", proxy_pod(name))
    await create_backend(api, "dovecot", ["10.0.0.1"])
    # Selector-less Services with hand-made slices, as the API server stores them.
    fqdn = {"addresses": ["mail.legacy.example"], "conditions": {"ready": True}}
    await create_service(api, "legacy", typed_slice("legacy", "legacy-1", "FQDN", [fqdn]))
    await create_service(api, "oldstyle", slice_body("oldstyle", ["010.0.0.7"]))
    async with (
        FakeProxy(PROXIES[0], controller.port) as first,
        FakeProxy(PROXIES[1], controller.port) as second,
    ):
        await create_route(api, imap_route("example", "example.com"))
        await create_route(api, imap_route("legacy", "legacy.example", service="legacy"))
        await create_route(api, imap_route("oldstyle", "oldstyle.example", service="oldstyle"))
        unusable = ("legacy", "oldstyle")
        await eventually(
            lambda: all(
                condition_is(emulator, name, "ResolvedRefs", "False", "NoReadyEndpoints") for name in unusable
            ),
            "legacy and oldstyle: NoReadyEndpoints",
        )
        assert [status_of(emulator, name)["endpoints"] for name in unusable] == [{"imap": 0}, {"imap": 0}]
        await eventually(
            lambda: condition(emulator, "example", "Programmed").get("message") == "2 of 2 proxies",
            "example programmed on both proxies",
        )
        for proxy in (first, second):
            assert proxy.latest is not None
            hosts = {
                route.name: [
                    str(endpoint) for _, upstream in route.upstreams for endpoint in upstream.endpoints
                ]
                for route in proxy.latest.routes
            }
            assert hosts == {"mail/example": ["10.0.0.1:10143"], "mail/legacy": [], "mail/oldstyle": []}
    # A proxy that starts now reads the snapshot, which holds a table it takes.
    stored = await eventually(lambda: snapshot_of(emulator), "snapshot written")
    assert [route.name for route in table.from_json(stored).routes] == [
        "mail/example",
        "mail/legacy",
        "mail/oldstyle",
    ]


async def test_a_dual_stack_service_counts_each_pod_once(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_service(
        api,
        "dovecot",
        typed_slice(
            "dovecot", "dovecot-v4", "IPv4", [pod_endpoint("10.0.0.1", "a"), pod_endpoint("10.0.0.2", "b")]
        ),
        typed_slice(
            "dovecot", "dovecot-v6", "IPv6", [pod_endpoint("fd00::2", "b"), pod_endpoint("fd00::1", "a")]
        ),
    )
    await create_route(api, imap_route("example", "example.com"))
    await eventually(
        lambda: condition_is(emulator, "example", "ResolvedRefs", "True", "ResolvedRefs"), "ResolvedRefs"
    )
    assert status_of(emulator, "example")["endpoints"] == {"imap": 2}
    stored = await eventually(lambda: snapshot_of(emulator), "snapshot written")
    (route,) = table.from_json(stored).routes
    (upstream,) = [upstream for _, upstream in route.upstreams]
    assert [str(endpoint) for endpoint in upstream.endpoints] == ["10.0.0.1:10143", "10.0.0.2:10143"]
