"""The sync gate's own listing of MailRoutes (controller.handlers.RouteGate): it opens only once
kopf's indexes are filled and every MailRoute the API lists is indexed, lists again on events
while it is not, and says why once per problem. The operator runs it against the emulator in
tests/kube/test_discovery_gap.py."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from controller import handlers, reconciler
from tests.controller.test_handlers_resync import ROUTE_KIND, ROUTES, FakeLister, index, wait_for_calls
from tests.kube.conftest import WAIT_SECONDS

# No test waits for a retry timer: each wakes the gate itself.
NO_RETRY_SECONDS = 3600.0


class Gate:
    """A RouteGate running in a task, whether it opened the reconciler's gate, and the fresh
    kopf runs it asked for (at once: ``rescan_after`` 0)."""

    def __init__(
        self, sightings: handlers.Sightings, lister: FakeLister, served: frozenset[str] | None
    ) -> None:
        self.opened = asyncio.Event()
        self.rescans: list[str] = []
        self.gate = handlers.RouteGate(
            sightings,
            lister,
            served,
            self.opened.set,
            retry=NO_RETRY_SECONDS,
            rescan=self.rescans.append,
            rescan_after=0,
        )
        self.lister = lister

    async def listed_again(self) -> None:
        """Wake the gate and wait for its next LISTs (one per scope)."""
        count = len(self.lister.calls)
        self.gate.wake()
        await wait_for_calls(self.lister, count + 1)


@pytest.fixture
def sightings() -> handlers.Sightings:
    return handlers.Sightings()


@contextlib.asynccontextmanager
async def running(gate: Gate) -> AsyncIterator[Gate]:
    task = asyncio.create_task(gate.gate.run())
    try:
        yield gate
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_it_opens_only_once_every_listed_route_is_indexed(
    sightings: handlers.Sightings, caplog: pytest.LogCaptureFixture
) -> None:
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}})
    async with running(Gate(sightings, lister, frozenset({"mail"}))) as gate:
        await asyncio.sleep(0)
        assert lister.calls == [], "kopf's indexes are not filled before the first wake"
        await gate.listed_again()
        await gate.listed_again()
        assert not gate.opened.is_set(), "r1 is listed, and kopf never indexed it"
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert (
            len(warnings) == 1
            and "1 MailRoute(s) the API lists are not in the operator's index" in warnings[0]
        )
        assert len(gate.rescans) == 1, "a fresh kopf run asked for, once"
        assert "1 MailRoute(s) the API lists are not in the operator's index" in gate.rescans[0]
        index(sightings, ROUTES, "r1", "r1")
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    assert lister.calls == [(ROUTE_KIND, "mail", "", "")] * 3


async def test_no_route_listed_is_a_listing_of_its_own(sightings: handlers.Sightings) -> None:
    lister = FakeLister({})
    async with running(Gate(sightings, lister, None)) as gate:
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    assert lister.calls == [(ROUTE_KIND, None, "", "")], "every namespace served: one LIST"


async def test_a_failed_list_keeps_it_closed_until_one_works(
    sightings: handlers.Sightings, caplog: pytest.LogCaptureFixture
) -> None:
    index(sightings, ROUTES, "r1", "r1")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}, (ROUTE_KIND, "team-x"): set()})
    lister.errors[(ROUTE_KIND, "team-x")] = reconciler.ClusterUnavailableError("GET mailroutes: HTTP 503")
    async with running(Gate(sightings, lister, frozenset({"team-x", "mail"}))) as gate:
        await gate.listed_again()
        await gate.listed_again()
        assert not gate.opened.is_set()
        assert gate.rescans == [], "a failed LIST says nothing of kopf's watch"
        del lister.errors[(ROUTE_KIND, "team-x")]
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    problems = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(problems) == 1 and "HTTP 503" in problems[0], "logged once per problem"
    assert [call[1] for call in lister.calls][-2:] == ["mail", "team-x"], "each served namespace"
