"""A controller restarted while the API server answers the discovery read of a group it watches
with 404 (as it does for the MailRoute group while its CRD handler has not synced), with the
real operator against the emulator: kopf then starts no watch of that kind, and the controller
must publish no table (one without any route, or with routes without their endpoints, would
withdraw them from every proxy, and overwrite the snapshot) until the objects themselves are
indexed. For MailRoutes a later CRD event brings that about; without one, or for a built-in
group (review T2 #3: EndpointSlices), the controller exits to be restarted, and the restart,
which scans API discovery afresh, serves the route with its endpoints."""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest

from controller import handlers, operator, publisher
from proxy import table
from proxy.server import connections
from tests.kube.conftest import (
    PUSH_TOKEN,
    WAIT_SECONDS,
    Api,
    Controller,
    ControllerRunner,
    FakeProxy,
    create_backend,
    create_crd,
    create_route,
    eventually,
    imap_route,
    serving,
    slice_body,
    snapshot_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_, route_names

ROUTES_GROUP_PATH = f"/apis/{handlers.GROUP}/{handlers.VERSION}"
SLICES_GROUP_PATH = "/apis/discovery.k8s.io/v1"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{handlers.CRD_NAME}"
# What the handlers log while the gate stays closed.
UNINDEXED = "not in the operator's index"


class GapEmulator(Emulator):
    """Answers the next ``missing`` discovery reads of the group at ``gap`` 404 NotFound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gap = ROUTES_GROUP_PATH
        self.missing = 0

    async def _handle(self, request: Any) -> Any:
        if request.url.path.rstrip("/") == self.gap and self.missing > 0:
            self.missing -= 1
            raise kmock.KubernetesError(
                status=404, reason="NotFound", message="the server could not find the requested resource"
            )
        return await super()._handle(request)


@pytest.fixture
async def emulator() -> AsyncIterator[GapEmulator]:
    async with serving(GapEmulator()) as emu:
        yield emu


def logged(caplog: pytest.LogCaptureFixture, module: str, words: str) -> bool:
    return any(record.name == module and words in record.getMessage() for record in caplog.records)


async def programmed_and_stopped(emulator: GapEmulator, api: Api, runner: ControllerRunner) -> str:
    """The snapshot a controller wrote once it programmed mail/example, then stopped."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await create_route(api, imap_route("example", "example.com"))
    controller = await runner.start()
    async with fake_proxies(controller):
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "programmed")
    stored = snapshot_of(emulator)
    assert stored is not None and "mail/example" in stored
    await runner.stop()
    return stored


class RecordingPublisher(publisher.Publisher):
    """The push channel, keeping every table it was given to publish."""

    def __init__(self) -> None:
        super().__init__(token=PUSH_TOKEN, guards=connections.Guard)
        self.published: list[table.RoutingTable] = []

    def publish(self, new: table.RoutingTable) -> None:
        self.published.append(new)
        super().publish(new)


async def until_it_exits(settings: operator.Settings) -> tuple[BaseException | None, RecordingPublisher]:
    """controller.operator.run in a thread of its own until it ends by itself (at most
    WAIT_SECONDS, then it is stopped and the test fails): what it raised, and its channel."""
    channel = RecordingPublisher()
    ended: list[BaseException | None] = []
    stopping: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def operate() -> None:
        stop = asyncio.Event()
        stopping.append((asyncio.get_running_loop(), stop))
        await operator.run(settings, channel=channel, stop_flag=stop, holdoff=0.01)

    def main() -> None:
        try:
            asyncio.run(operate())
        except BaseException as error:  # reported to the test, not lost in the thread
            ended.append(error)
        else:
            ended.append(None)

    thread = threading.Thread(target=main, name="controller", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, WAIT_SECONDS)
    if thread.is_alive():
        for loop, stop in stopping:
            loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, WAIT_SECONDS)
        raise AssertionError("the controller did not exit by itself")
    return ended[0], channel


def serving_the_route(proxies: list[FakeProxy]) -> bool:
    return all(route_names(proxy.latest) == ["mail/example"] for proxy in proxies)


def endpoints_of(current: table.RoutingTable | None) -> list[str]:
    if current is None:
        return []
    return [
        f"{e.host}:{e.port}" for route in current.routes for _, up in route.upstreams for e in up.endpoints
    ]


async def test_a_restart_in_a_discovery_gap_publishes_nothing_until_a_crd_event(
    emulator: GapEmulator, api: Api, controller_runner: ControllerRunner, caplog: pytest.LogCaptureFixture
) -> None:
    stored = await programmed_and_stopped(emulator, api, controller_runner)
    emulator.missing = 1
    controller: Controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(
            lambda: logged(caplog, handlers.__name__, UNINDEXED) or any(proxy.tables for proxy in proxies),
            "the sync gate kept closed (and why), or a table published",
        )
        assert emulator.missing == 0, "kopf's discovery read was not the one answered 404"
        assert [[route_names(table) for table in proxy.tables] for proxy in proxies] == [[], []]
        assert snapshot_of(emulator) == stored
        # Any change of the CRD makes kopf scan its group again: the watch starts, and its
        # listing opens the gate.
        await api.patch(CRD_PATH, {"metadata": {"labels": {"example.com/touched": "yes"}}})
        await eventually(lambda: serving_the_route(proxies), "the route published after the CRD event")
        assert all(len(proxy.tables) == 1 for proxy in proxies), "a table without the route went out"


@pytest.mark.parametrize(
    ("gap", "kind"),
    [(ROUTES_GROUP_PATH, "mailroutes"), (SLICES_GROUP_PATH, "endpointslices")],
    ids=["mailroutes", "endpointslices"],
)
async def test_objects_still_missing_exit_the_controller_and_the_restart_serves_them(
    emulator: GapEmulator,
    api: Api,
    controller_runner: ControllerRunner,
    controller_settings: operator.Settings,
    monkeypatch: pytest.MonkeyPatch,
    gap: str,
    kind: str,
) -> None:
    stored = await programmed_and_stopped(emulator, api, controller_runner)
    # At once, not after GATE_GIVE_UP_SECONDS: the wait is the constant's business, not the test's.
    monkeypatch.setattr(handlers, "GATE_GIVE_UP_SECONDS", 0.0)
    emulator.gap, emulator.missing = gap, 1
    error, channel = await until_it_exits(controller_settings)
    assert isinstance(error, operator.OperatorError), f"the controller ended with {error!r}"
    reason = "the handlers gave up: for 0 s and more: objects the API lists are not in the operator's index"
    assert f"{reason} ({kind}: 1)" in str(error)
    assert emulator.missing == 0, "kopf's discovery read was not the one answered 404"
    assert channel.published == [], "a table went out before the exit"
    assert snapshot_of(emulator) == stored
    # Kubernetes restarts the controller, which scans API discovery afresh.
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(lambda: serving_the_route(proxies), "the route published after the restart")
        assert all(len(proxy.tables) == 1 for proxy in proxies), "a table without the route went out"
        assert endpoints_of(proxies[0].latest) == ["10.0.0.1:10143"]


async def test_an_endpointslice_of_no_service_does_not_hold_the_gate(
    emulator: GapEmulator, api: Api, controller_runner: ControllerRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review T3: a slice without the kubernetes.io/service-name label (a hand-made one) is left
    out of the index, and its uid was never recorded as seen: the gate, which lists every slice,
    waited for it, published nothing and the controller exited, at every restart."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await create_route(api, imap_route("example", "example.com"))
    unlabelled = slice_body("manual", ["10.0.0.9"])
    del unlabelled["metadata"]["labels"]
    namespace = unlabelled["metadata"]["namespace"]
    await api.create(f"{SLICES_GROUP_PATH}/namespaces/{namespace}/endpointslices", unlabelled)
    monkeypatch.setattr(handlers, "GATE_GIVE_UP_SECONDS", 0.0)  # give up at the first look
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(lambda: serving_the_route(proxies), "the route published")
        assert endpoints_of(proxies[0].latest) == ["10.0.0.1:10143"]
