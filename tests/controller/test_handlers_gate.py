"""The sync gate's own listings (controller.handlers.RouteGate): it opens only once kopf's
indexes are filled and every MailRoute, EndpointSlice (and other kind it is given) the API lists
has been seen by kopf's index handler, lists again on events while it is not, says why once per
problem, and gives up (the controller exits to be restarted) when listed objects stay missing,
never for a failed LIST. The operator runs it against the emulator in
tests/kube/test_discovery_gap.py."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from controller import handlers, reconciler
from tests.controller.test_handlers_resync import (
    ROUTE_KIND,
    ROUTES,
    SLICES,
    FakeLister,
    body,
    index,
    wait_for_calls,
)
from tests.kube.conftest import WAIT_SECONDS

# No test waits for a retry timer: each wakes the gate itself.
NO_RETRY_SECONDS = 3600.0
SECRET_LABELS = "mailgress.io/auth-http=true"
LISTINGS = (
    handlers.Listing(ROUTES, ROUTE_KIND, clusterwide=False),
    handlers.Listing(SLICES, handlers.SLICES, clusterwide=False),
    handlers.Listing(handlers.SECRETS_INDEX, handlers.SECRETS, False, SECRET_LABELS),
)
# One gate's LISTs of one namespace, in order.
KINDS = [(ROUTE_KIND, ""), (handlers.SLICES, ""), (handlers.SECRETS, SECRET_LABELS)]
MISSING = "objects the API lists are not in the operator's index"


class Gate:
    """A RouteGate running in a task, whether it opened the reconciler's gate, and the reasons
    it gave up for (at once: ``give_up_after`` 0)."""

    def __init__(
        self, sightings: handlers.Sightings, lister: FakeLister, served: frozenset[str] | None
    ) -> None:
        self.opened = asyncio.Event()
        self.reasons: list[str] = []
        self.gate = handlers.RouteGate(
            sightings,
            lister,
            served,
            LISTINGS,
            self.opened.set,
            retry=NO_RETRY_SECONDS,
            give_up=self.reasons.append,
            give_up_after=0,
        )
        self.lister = lister

    async def listed_again(self) -> None:
        """Wake the gate and wait for its next LISTs (one per kind and scope)."""
        count = len(self.lister.calls)
        self.gate.wake()
        await wait_for_calls(self.lister, count + len(LISTINGS))


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


async def looks_twice(gate: Gate, lister: FakeLister, calls: int) -> None:
    """Wake the gate twice, each time waiting for the ``calls`` LISTs one look makes (a failed
    LIST ends a look early)."""
    for _ in range(2):
        count = len(lister.calls)
        gate.gate.wake()
        await wait_for_calls(lister, count + calls)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


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
        [warning] = warnings(caplog)
        assert f"{MISSING} (mailroutes: 1)" in warning
        assert len(gate.reasons) == 1, "given up, once"
        assert f"{MISSING} (mailroutes: 1)" in gate.reasons[0]
        index(sightings, ROUTES, "r1", "r1")
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    assert lister.calls == [(kind, "mail", labels, "") for kind, labels in KINDS] * 3


async def test_a_listed_endpointslice_missing_from_the_index_keeps_it_closed(
    sightings: handlers.Sightings, caplog: pytest.LogCaptureFixture
) -> None:
    """Review T2 #3: kopf's discovery read of discovery.k8s.io got a 404, so it watches no
    EndpointSlice; a table now would hold every route without its endpoints."""
    index(sightings, ROUTES, "r1", "r1")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}, (handlers.SLICES, "mail"): {"s1", "s2"}})
    async with running(Gate(sightings, lister, frozenset({"mail"}))) as gate:
        await gate.listed_again()
        assert not gate.opened.is_set()
        assert f"{MISSING} (endpointslices: 2)" in warnings(caplog)[0]
        assert len(gate.reasons) == 1 and "endpointslices: 2" in gate.reasons[0]
        # A slice of no Service gives no index value: seen by the index handler is enough.
        assert sightings.indexed(SLICES, body("s1"), {}) == {}
        index(sightings, SLICES, "s2", "s2")
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()


async def test_no_object_listed_is_a_listing_of_its_own(sightings: handlers.Sightings) -> None:
    lister = FakeLister({})
    async with running(Gate(sightings, lister, None)) as gate:
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    assert lister.calls == [(kind, None, labels, "") for kind, labels in KINDS], "every namespace: one LIST"
    assert gate.reasons == []


async def test_a_failed_list_keeps_it_closed_until_one_works(
    sightings: handlers.Sightings, caplog: pytest.LogCaptureFixture
) -> None:
    index(sightings, ROUTES, "r1", "r1")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}, (ROUTE_KIND, "team-x"): set()})
    lister.errors[(ROUTE_KIND, "team-x")] = reconciler.ClusterUnavailableError("GET mailroutes: HTTP 503")
    async with running(Gate(sightings, lister, frozenset({"team-x", "mail"}))) as gate:
        await looks_twice(gate, lister, 2)
        assert not gate.opened.is_set()
        assert gate.reasons == [], "a failed LIST says nothing of kopf's watch"
        del lister.errors[(ROUTE_KIND, "team-x")]
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    problems = warnings(caplog)
    assert len(problems) == 1 and "HTTP 503" in problems[0], "logged once per problem"
    assert [call[1] for call in lister.calls][-6:] == ["mail", "team-x"] * 3, "each served namespace"


async def test_a_served_namespace_whose_list_is_forbidden_lists_nothing(
    sightings: handlers.Sightings, caplog: pytest.LogCaptureFixture
) -> None:
    """Review T3: a served namespace deleted after install took its Role with it; every LIST
    there got 403 and the gate stayed shut for ever (kopf, refused the same, indexes nothing
    there). Its listings count as empty, said once per kind; the other namespaces still count."""
    index(sightings, ROUTES, "r1", "r1")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}})
    for kind, _ in KINDS:
        lister.errors[(kind, "gone")] = reconciler.ForbiddenError("GET: HTTP 403: forbidden in gone")
    async with running(Gate(sightings, lister, frozenset({"gone", "mail"}))) as gate:
        gate.gate.wake()
        async with asyncio.timeout(WAIT_SECONDS):
            await gate.opened.wait()
    assert gate.reasons == []
    assert len([problem for problem in warnings(caplog) if "HTTP 403" in problem]) == len(KINDS)


async def test_a_forbidden_list_of_every_namespace_keeps_it_closed(sightings: handlers.Sightings) -> None:
    """Taken as empty, it would publish a table without any route: the release's RBAC is broken."""
    lister = FakeLister({})
    lister.errors[(ROUTE_KIND, None)] = reconciler.ForbiddenError("GET: HTTP 403: forbidden")
    async with running(Gate(sightings, lister, None)) as gate:
        await looks_twice(gate, lister, 1)
        assert not gate.opened.is_set() and gate.reasons == []
