"""Deletions a watch gap hid from kopf, with the real operator against the emulator: the watch
connections lose their events for a while, then break, and their reconnection is answered 410 Gone
(the resourceVersion is too old), after which kopf lists again. kopf indexes what that listing
holds but keeps the values of the objects it lacks; the controller's resync (controller.handlers)
must find those gone within about a second of the re-list, and the proxies and statuses follow.
A deletion lost without a 410 (the watch resumes where it was) shows no re-list: the periodic
resync finds it."""

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller import operator
from proxy import table
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    NAMESPACE,
    AccessLog,
    Api,
    Controller,
    FakeProxy,
    condition,
    create_backend,
    create_route,
    eventually,
    imap_route,
    proxy_pod,
    route_path,
    serving,
    slice_body,
    status_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, resyncing_proxies, route_names
from tests.kube.test_recreated_route import uid_of

# The metav1.Status an API server ends a watch with when the resourceVersion asked for is compacted.
GONE = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "code": 410,
    "reason": "Expired",
    "message": "too old resource version",
}
TARGETS = frozenset({"mailroutes", "endpointslices", "pods"})
# The watches whose re-list the controller must see: its routes and slices, its proxy pods.
RELISTED = frozenset(
    {("mailroutes", NAMESPACE), ("endpointslices", NAMESPACE), ("pods", CONTROLLER_NAMESPACE)}
)


class PartitionEmulator(Emulator):
    """Watches of TARGETS can be blacked out (their events lost, as over a broken connection),
    ended server-side, and, while ``expire`` is set, each (resource, namespace)'s next
    continuation answered 410 Gone once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blackout = False
        self.expire = False
        self.expired: set[tuple[str, str | None]] = set()
        self.watches: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self._close: asyncio.Future[None] | None = None

    def close_streams(self) -> None:
        if self._close is not None and not self._close.done():
            self._close.set_result(None)
        self._close = None

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        plural = request.resource.plural
        if plural not in TARGETS:
            async for item in super()._serve_watch(request):
                yield item
            return
        scope = (plural, request.namespace)
        self.watches[scope] += 1
        if self.expire and request.params.get("resourceVersion") and scope not in self.expired:
            self.expired.add(scope)
            yield b""
            yield {"type": "ERROR", "object": GONE}
            return
        if self._close is None:
            self._close = asyncio.get_running_loop().create_future()
        closer = self._close
        inner = super()._serve_watch(request).__aiter__()
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(inner.__anext__())
                await asyncio.wait({step, closer}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return  # closed server-side (the finally ends the pending step)
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                if self.blackout and isinstance(item, dict):
                    continue  # lost on the broken connection
                yield item
        finally:
            # Also when the client went away: the inner stream may be closed only when idle.
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            await inner.aclose()


@pytest.fixture
async def emulator() -> AsyncIterator[PartitionEmulator]:
    async with serving(PartitionEmulator()) as emu:
        yield emu


def endpoints_of(current: table.RoutingTable | None) -> list[str]:
    if current is None:
        return []
    return sorted(
        f"{route.name} {endpoint.host}"
        for route in current.routes
        for _, upstream in route.upstreams
        for endpoint in upstream.endpoints
    )


def domains_of(current: table.RoutingTable | None, name: str) -> list[str]:
    found = [route for route in (current.routes if current is not None else ()) if route.name == name]
    return [domain for route in found for domain in route.domains]


async def test_deletions_in_a_watch_gap_leave_the_tables_and_statuses_after_the_relist(
    emulator: PartitionEmulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    second = slice_body("dovecot", ["10.0.0.2"])
    second["metadata"]["name"] = "dovecot-second"
    await api.create(f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices", second)
    await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", proxy_pod("proxy-c"))
    third = FakeProxy("proxy-c", controller.port)
    await third.__aenter__()
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("gone", "gone.example"))
        await create_route(api, imap_route("stays", "stays.example"))
        await create_route(api, imap_route("moved", "old.example"))
        everywhere = ["mail/gone", "mail/moved", "mail/stays"]
        await eventually(lambda: all(route_names(p.latest) == everywhere for p in proxies), "three routes")
        await eventually(
            lambda: all("mail/stays 10.0.0.2" in endpoints_of(p.latest) for p in proxies), "both slices"
        )
        await eventually(
            lambda: condition(emulator, "stays", "Programmed").get("message") == "3 of 3 proxies", "3 of 3"
        )
        # Older wins, then the name (creationTimestamp has second precision): gone, not twin.
        await create_route(api, imap_route("twin", "gone.example"))
        await eventually(
            lambda: condition(emulator, "twin", "Accepted").get("reason") == "Conflicted", "twin Conflicted"
        )
        old_moved = uid_of(emulator, "moved")

        # A partition: the watches carry nothing while a route, a slice and a proxy pod are
        # deleted and a route is created again under its name with another domain.
        emulator.blackout = True
        await third.__aexit__(None, None, None)  # proxy-c's process ends with its pod
        await api.delete(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods/proxy-c")
        await api.delete(route_path("gone"))
        await api.delete(f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/dovecot-second")
        await api.delete(route_path("moved"))
        await create_route(api, imap_route("moved", "new.example"))
        assert uid_of(emulator, "moved") != old_moved
        # The connections break; each reconnection finds its resourceVersion compacted.
        emulator.expire = True
        emulator.close_streams()
        emulator.blackout = False
        await eventually(lambda: emulator.expired >= RELISTED, "kopf reconnected and got 410 Gone")
        emulator.expire = False

        after = ["mail/moved", "mail/stays", "mail/twin"]
        await eventually(lambda: all(route_names(p.latest) == after for p in proxies), "gone left, twin in")
        for proxy in proxies:
            assert domains_of(proxy.latest, "mail/twin") == ["gone.example"]
            assert domains_of(proxy.latest, "mail/moved") == ["new.example"]
            assert not any(entry.endswith(" 10.0.0.2") for entry in endpoints_of(proxy.latest))
        await eventually(
            lambda: condition(emulator, "twin", "Accepted").get("status") == "True", "twin Accepted"
        )
        await eventually(
            lambda: condition(emulator, "stays", "Programmed").get("message") == "2 of 2 proxies",
            "proxy-c no longer counted",
        )
        await eventually(
            lambda: status_of(emulator, "stays").get("endpoints") == {"imap": 1}, "one endpoint in status"
        )


async def test_a_deletion_lost_without_a_relist_is_found_by_the_periodic_resync(
    emulator: PartitionEmulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    async with resyncing_proxies(
        emulator, api, controller_settings, controller_accesses, resync=1.0
    ) as proxies:
        await create_route(api, imap_route("gone", "gone.example"))
        await create_route(api, imap_route("stays", "stays.example"))
        both = ["mail/gone", "mail/stays"]
        await eventually(lambda: all(route_names(p.latest) == both for p in proxies), "two routes")
        # The deletion's event is lost and the watches resume where they were: nothing is
        # listed again, so only the periodic LIST can tell.
        emulator.blackout = True
        await api.delete(route_path("gone"))
        scope = ("mailroutes", NAMESPACE)
        watched = emulator.watches[scope]
        emulator.close_streams()
        # Dark until the watch is back: its DELETED event is never delivered late.
        await eventually(lambda: emulator.watches[scope] > watched, "the routes' watch resumed")
        emulator.blackout = False
        await eventually(lambda: all(route_names(p.latest) == ["mail/stays"] for p in proxies), "gone left")
