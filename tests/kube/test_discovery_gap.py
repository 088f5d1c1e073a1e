"""A controller restarted while the API server answers the discovery read of the MailRoute group
with 404 (as it does while its CRD handler has not synced), with the real operator against the
emulator: kopf then starts no MailRoute watch, and the controller must publish no table (one
without any route would withdraw every route from every proxy, and overwrite the snapshot)
until the MailRoutes themselves are indexed, which a later CRD event brings about."""

from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest

from controller import handlers, operator
from tests.kube.conftest import (
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
    snapshot_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_, route_names

GROUP_PATH = f"/apis/{handlers.GROUP}/{handlers.VERSION}"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{handlers.CRD_NAME}"
# What the handlers log while the gate stays closed, and the operator when it runs kopf afresh.
UNINDEXED = "not in the operator's index"
RESCAN = "to scan API discovery afresh"


class GapEmulator(Emulator):
    """Answers the next ``missing`` discovery reads of the MailRoute group 404 NotFound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing = 0

    async def _handle(self, request: Any) -> Any:
        if request.url.path.rstrip("/") == GROUP_PATH and self.missing > 0:
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


async def restarted_in_a_gap(
    emulator: GapEmulator, api: Api, runner: ControllerRunner
) -> tuple[Controller, str]:
    """A controller that programmed mail/example, stopped and started again with the discovery
    read of the MailRoute group answered 404 once; and the snapshot it wrote before."""
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
    emulator.missing = 1
    return await runner.start(), stored


def serving_the_route(proxies: list[FakeProxy]) -> bool:
    return all(route_names(proxy.latest) == ["mail/example"] for proxy in proxies)


async def test_a_restart_in_a_discovery_gap_publishes_nothing_until_a_crd_event(
    emulator: GapEmulator, api: Api, controller_runner: ControllerRunner, caplog: pytest.LogCaptureFixture
) -> None:
    controller, stored = await restarted_in_a_gap(emulator, api, controller_runner)
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


async def test_without_a_crd_event_a_fresh_operator_run_scans_again(
    emulator: GapEmulator,
    api: Api,
    controller_runner: ControllerRunner,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At once, not after GATE_RESCAN_SECONDS: the wait is the constant's business, not the test's.
    monkeypatch.setattr(handlers, "GATE_RESCAN_SECONDS", 0.0)
    controller, stored = await restarted_in_a_gap(emulator, api, controller_runner)
    await eventually(lambda: logged(caplog, operator.__name__, RESCAN), "a fresh operator run asked for")
    assert emulator.missing == 0, "kopf's discovery read was not the one answered 404"
    assert snapshot_of(emulator) == stored
    # Proxies that connect now follow the fresh run (the end of a run cuts the streams open then).
    async with fake_proxies(controller) as proxies:
        await eventually(lambda: serving_the_route(proxies), "the route published by the fresh run")
        assert all(len(proxy.tables) == 1 for proxy in proxies), "a table without the route went out"
