"""Watch gaps (controller.handlers' Sightings and Resync): the staleness rule (a uid last seen
before a LIST started and absent from it is gone; one seen since, first or again, is kept), an object
created again under its name while the watch was away, the re-list sign, the bounds, failed
LISTs, and the resync task's two triggers. The operator runs it against the emulator in
tests/kube/test_watch_gap.py."""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from controller import endpoints, handlers, reconciler
from tests.kube.conftest import WAIT_SECONDS

ROUTES, SLICES, PROXIES = handlers.ROUTES_INDEX, handlers.SLICES_INDEX, handlers.PROXIES_INDEX


class Clock:
    """A clock the test moves: every reading is the current ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def body(uid: str, namespace: str = "mail") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": f"object-{uid}", "uid": uid}}


def index(sightings: handlers.Sightings, name: str, uid: str, value: Any, namespace: str = "mail") -> Any:
    """What an index handler stores for an object: its one value, tagged."""
    [tagged] = sightings.indexed(name, body(uid, namespace), {"key": value}).values()
    return tagged


def alive(sightings: handlers.Sightings, name: str, tagged: list[Any]) -> list[Any]:
    """The values of ``tagged`` that are live, each in a store of its own (as objects of
    different names are)."""
    return [value for item in tagged for value in sightings.live(name, [item])]


def test_a_uid_seen_before_the_list_started_and_absent_from_it_is_gone() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    kept, deleted = index(sightings, ROUTES, "u1", "kept"), index(sightings, ROUTES, "u2", "deleted")
    clock.now = 1.0
    started = sightings.now()
    clock.now = 2.0
    assert sightings.judge(ROUTES, "mail", started, {"u1"}) == 1
    assert alive(sightings, ROUTES, [kept, deleted]) == ["kept"]
    # It stays gone: a later LIST that lacks it again finds nothing new, and it is never back.
    assert sightings.judge(ROUTES, "mail", clock(), {"u1"}) == 0
    assert sightings.live(ROUTES, [deleted]) == []


def test_a_uid_first_seen_after_the_list_started_is_kept() -> None:
    """The LIST's snapshot may be older than an object seen while it ran: never dropped by it."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    started = sightings.now()
    clock.now = 1.0
    created = index(sightings, ROUTES, "new", "created during the LIST")
    assert sightings.judge(ROUTES, "mail", started, set()) == 0
    assert sightings.live(ROUTES, [created]) == ["created during the LIST"]
    clock.now = 2.0
    assert sightings.judge(ROUTES, "mail", sightings.now(), set()) == 1, "a LIST started after it"


def test_a_uid_indexed_again_after_the_list_started_is_kept() -> None:
    """Review K2: a labelled Secret keeps its uid when its label goes and comes back; if the
    DELETED of the removal was lost, a LIST whose snapshot fell between the two lacks it. It was
    indexed again after that LIST started, so it may be newer than the snapshot: kept."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "u1", "first value")
    clock.now = 100.0
    started = sightings.now()
    clock.now = 101.0
    again = index(sightings, ROUTES, "u1", "indexed again")
    assert sightings.judge(ROUTES, "mail", started, set()) == 0
    assert sightings.live(ROUTES, [again]) == ["indexed again"]
    clock.now = 102.0
    assert sightings.judge(ROUTES, "mail", sightings.now(), set()) == 1, "a LIST started after it"


def test_of_two_uids_under_one_name_the_first_sighting_ranks_not_the_last() -> None:
    """An older object's value indexed again (a resync of kopf's own) does not make it newer
    than the object created again under its name."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    old = index(sightings, ROUTES, "old", "old object")
    clock.now = 1.0
    new = index(sightings, ROUTES, "new", "new object")
    clock.now = 2.0
    old = index(sightings, ROUTES, "old", "old object")
    assert sightings.live(ROUTES, [old, new]) == ["new object"]


def test_a_seen_time_equal_to_the_lists_start_is_kept() -> None:
    sightings = handlers.Sightings(Clock())
    tied = index(sightings, ROUTES, "u1", "seen as the LIST started")
    assert sightings.judge(ROUTES, "mail", sightings.now(), set()) == 0
    assert sightings.live(ROUTES, [tied]) == ["seen as the LIST started"]


def test_a_list_judges_its_own_index_and_namespace_only() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    here = index(sightings, ROUTES, "here", "here")
    there = index(sightings, ROUTES, "there", "there", namespace="team-x")
    pod = index(sightings, PROXIES, "pod", True, namespace="mailgress-system")
    clock.now = 1.0
    assert sightings.namespaces(ROUTES) == {"mail", "team-x"}
    assert sightings.judge(ROUTES, "mail", clock(), set()) == 1
    assert alive(sightings, ROUTES, [here, there]) == ["there"]
    assert sightings.live(PROXIES, [pod]) == [True]
    assert sightings.judge(ROUTES, None, clock(), set()) == 1, "None: every namespace"
    assert sightings.namespaces(ROUTES) == set()
    assert sightings.namespaces(PROXIES) == {"mailgress-system"}


def test_of_two_objects_under_one_name_the_one_seen_last_is_live() -> None:
    """Deleted and created again while the watch was away: kopf keeps both values under the key.
    Names are unique among live objects, so the newer uid wins before any LIST, and the LIST
    then finds the older gone."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    old = index(sightings, ROUTES, "old", "old object")
    clock.now = 1.0
    new = index(sightings, ROUTES, "new", "new object")
    assert sightings.live(ROUTES, [old, new]) == ["new object"]
    assert sightings.live(ROUTES, [new, old]) == ["new object"], "whatever the store's order"
    clock.now = 2.0
    assert sightings.judge(ROUTES, "mail", clock(), {"new"}) == 1
    assert sightings.live(ROUTES, [old, new]) == ["new object"]


def test_slices_of_one_service_are_told_apart_by_their_own_names() -> None:
    """The slice index's key is the Service: several slices are several live values; a slice
    created again under its name is one."""
    clock = Clock()
    sightings = handlers.Sightings(clock)

    def piece(name: str, address: str) -> endpoints.Slice:
        return endpoints.Slice("mail", "dovecot", name, (), (address,), ())

    first = index(sightings, SLICES, "a", piece("dovecot-a", "10.0.0.1"))
    second = index(sightings, SLICES, "b", piece("dovecot-b", "10.0.0.2"))
    clock.now = 1.0
    again = index(sightings, SLICES, "a2", piece("dovecot-a", "10.0.0.3"))
    view = handlers.inputs(
        {
            handlers.ROUTES_INDEX: {},
            handlers.SERVICES_INDEX: {},
            handlers.SLICES_INDEX: {("mail", "dovecot"): [first, second, again]},
            handlers.PROXIES_INDEX: {},
            handlers.SECRETS_INDEX: {},
        },
        sightings,
    )
    assert [piece.ready for piece in view.slices[("mail", "dovecot")]] == [("10.0.0.3",), ("10.0.0.2",)]


def test_inputs_leave_out_gone_values_and_keys_left_empty() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    proxy_a = index(sightings, PROXIES, "pa", True, namespace="mailgress-system")
    proxy_c = index(sightings, PROXIES, "pc", True, namespace="mailgress-system")
    secret = index(sightings, handlers.SECRETS_INDEX, "k", {"key": "v"})
    indices = {
        handlers.ROUTES_INDEX: {},
        handlers.SERVICES_INDEX: {},
        handlers.SLICES_INDEX: {},
        handlers.PROXIES_INDEX: {"proxy-a": [proxy_a], "proxy-c": [proxy_c]},
        handlers.SECRETS_INDEX: {("mail", "auth-key"): [secret]},
    }
    clock.now = 1.0
    sightings.judge(PROXIES, "mailgress-system", clock(), {"pa"})
    sightings.judge(handlers.SECRETS_INDEX, "mail", clock(), set())
    view = handlers.inputs(indices, sightings)
    assert (view.proxies, view.secrets) == ({"proxy-a": True}, {})


def test_deleted_uids_are_forgotten() -> None:
    """Bounded: DELETED drops a uid's sighting, and a gone uid's mark once kopf reports it."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "u1", "deleted")
    gone = index(sightings, ROUTES, "u2", "gone")
    clock.now = 1.0
    sightings.judge(ROUTES, "mail", clock(), {"u1"})
    assert not sightings.announce(ROUTES, "DELETED", "u1")
    assert not sightings.announce(ROUTES, "DELETED", "u2")
    assert sightings.namespaces(ROUTES) == set()
    assert sightings.live(ROUTES, [gone]) == ["gone"], "its mark dropped (kopf has dropped the value)"


def test_a_gone_uid_indexed_again_is_live_from_then_on() -> None:
    """A Secret that lost its label (absent from the labelled LIST) and got it back keeps its
    uid: seen again, it counts from this sighting."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, handlers.SECRETS_INDEX, "k", {"key": "old"})
    clock.now = 1.0
    sightings.judge(handlers.SECRETS_INDEX, "mail", clock(), set())
    clock.now = 2.0
    back = index(sightings, handlers.SECRETS_INDEX, "k", {"key": "new"})
    assert sightings.live(handlers.SECRETS_INDEX, [back]) == [{"key": "new"}]
    assert sightings.judge(handlers.SECRETS_INDEX, "mail", 1.5, set()) == 0, "seen after that LIST"


def test_a_body_without_uid_is_never_judged() -> None:
    sightings = handlers.Sightings(Clock())
    assert sightings.indexed(ROUTES, {"metadata": {"namespace": "mail"}}, {"key": "v"}) == {
        "key": handlers.Indexed("", "v")
    }
    assert sightings.namespaces(ROUTES) == set()


def test_an_object_without_values_is_seen_and_only_forgotten_when_found_gone() -> None:
    """A slice of no Service (or of FQDN addresses) gives no index value: the sync gate still
    needs to know kopf's watch listed it, and a LIST that lacks it has nothing to hide."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    assert sightings.indexed(SLICES, body("s"), {}) == {}
    assert (sightings.uids(SLICES), sightings.namespaces(SLICES)) == ({"s"}, {"mail"})
    clock.now = 1.0
    assert sightings.judge(SLICES, "mail", clock(), set()) == 0, "nothing of it in kopf's index"
    assert sightings.uids(SLICES) == set()


def test_a_listing_event_of_an_announced_uid_is_the_sign_of_a_relist() -> None:
    """kopf's initial listing and a re-list both send events of type None; only a re-list sends
    one for an object an event handler has already had."""
    sightings = handlers.Sightings(Clock())
    index(sightings, ROUTES, "u1", "v")
    assert not sightings.announce(ROUTES, None, "u1"), "the initial listing"
    assert not sightings.announce(ROUTES, "MODIFIED", "u1")
    assert sightings.announce(ROUTES, None, "u1"), "listed again"
    assert not sightings.announce(ROUTES, None, "unknown"), "nothing indexed of it"
    index(sightings, ROUTES, "u2", "v")
    assert not sightings.announce(ROUTES, "ADDED", "u2")
    assert sightings.announce(ROUTES, None, "u2")


class FakeLister:
    """``list_uids`` from a dict of (kind, namespace) to uids, or the error set for it; every
    call recorded, and ``during`` run while a LIST is in flight."""

    def __init__(self, found: dict[tuple[tuple[str, ...], str | None], set[str]]) -> None:
        self.found = found
        self.errors: dict[tuple[tuple[str, ...], str | None], reconciler.ClusterError] = {}
        self.calls: list[tuple[tuple[str, ...], str | None, str, str]] = []
        self.during: Callable[[], None] = lambda: None
        self.called = asyncio.Event()

    async def list_uids(
        self, kind: tuple[str, ...], namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> frozenset[str]:
        self.calls.append((kind, namespace, label_selector, field_selector))
        self.called.set()
        self.during()
        error = self.errors.get((kind, namespace))
        if error is not None:
            raise error
        return frozenset(self.found.get((kind, namespace), set()))


ROUTE_KIND = (handlers.GROUP, handlers.VERSION, handlers.PLURAL)
LISTINGS = (
    handlers.Listing(ROUTES, ROUTE_KIND, clusterwide=False),
    handlers.Listing(PROXIES, handlers.PODS, False, "app=proxy", "metadata.namespace=mailgress-system"),
)


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def test_a_resync_lists_each_namespace_holding_objects_and_wakes_once_on_a_find() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "r1", "r1")
    index(sightings, ROUTES, "r2", "r2", namespace="team-x")
    index(sightings, PROXIES, "p1", True, namespace="mailgress-system")
    clock.now = 1.0
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}, (ROUTE_KIND, "team-x"): set()})
    lister.found[(handlers.PODS, "mailgress-system")] = {"p1"}
    wakes = Wakes()
    resync = handlers.Resync(sightings, lister, LISTINGS, wakes)
    await resync.resync({ROUTES, PROXIES})
    assert lister.calls == [
        (ROUTE_KIND, "mail", "", ""),
        (ROUTE_KIND, "team-x", "", ""),
        (handlers.PODS, "mailgress-system", "app=proxy", "metadata.namespace=mailgress-system"),
    ]
    assert (wakes.count, sightings.namespaces(ROUTES)) == (1, {"mail"})
    lister.calls.clear()
    await resync.resync({PROXIES})
    assert [call[0] for call in lister.calls] == [handlers.PODS]
    assert wakes.count == 1, "nothing new found: no wake"


async def test_clusterwide_one_list_and_none_for_a_kind_without_objects() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "r1", "r1")
    index(sightings, ROUTES, "r2", "r2", namespace="team-x")
    clock.now = 1.0
    lister = FakeLister({(ROUTE_KIND, None): {"r2"}})
    listings = (
        handlers.Listing(ROUTES, ROUTE_KIND, clusterwide=True),
        handlers.Listing(handlers.SECRETS_INDEX, handlers.SECRETS, True, "mailgress.io/auth-http=true"),
    )
    await handlers.Resync(sightings, lister, listings, Wakes()).resync({ROUTES, handlers.SECRETS_INDEX})
    assert lister.calls == [(ROUTE_KIND, None, "", "")]
    assert sightings.namespaces(ROUTES) == {"team-x"}


async def test_an_object_seen_while_the_list_runs_survives_it() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "old", "old")
    created: list[Any] = []

    def meanwhile() -> None:
        clock.now = 1.0
        created.append(index(sightings, ROUTES, "new", "new"))

    lister = FakeLister({(ROUTE_KIND, "mail"): {"old"}})
    lister.during = meanwhile
    await handlers.Resync(sightings, lister, LISTINGS, Wakes()).resync({ROUTES})
    assert sightings.live(ROUTES, created) == ["new"]
    assert sightings.namespaces(ROUTES) == {"mail"}


async def test_an_object_indexed_again_while_the_list_runs_survives_it() -> None:
    """Review K2's repro: the LIST's snapshot lacks s1 (its label gone, the DELETED lost); the
    label comes back while the LIST is in flight and the index handler runs again."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    index(sightings, ROUTES, "s1", "v1")
    clock.now = 100.0
    again: list[Any] = []

    def meanwhile() -> None:
        clock.now = 101.0
        again.append(index(sightings, ROUTES, "s1", "v2"))

    lister = FakeLister({(ROUTE_KIND, "mail"): set()})
    lister.during = meanwhile
    wakes = Wakes()
    await handlers.Resync(sightings, lister, LISTINGS, wakes).resync({ROUTES})
    assert sightings.live(ROUTES, again) == ["v2"]
    assert wakes.count == 0, "nothing found gone"


async def test_a_failed_list_changes_nothing_and_is_logged_once_per_problem(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unavailable: the round stops (every other LIST would fail too). Refused in one namespace:
    the others are still judged. Each problem is one warning however many rounds it lasts, and
    its end one line."""
    clock = Clock()
    sightings = handlers.Sightings(clock)
    routes = [index(sightings, ROUTES, "r1", "r1"), index(sightings, ROUTES, "r2", "r2", namespace="team-x")]
    pod = index(sightings, PROXIES, "p1", True, namespace="mailgress-system")
    clock.now = 1.0
    lister = FakeLister({})
    lister.errors[(ROUTE_KIND, "mail")] = reconciler.ClusterUnavailableError("GET /apis/...: HTTP 503")
    wakes = Wakes()
    resync = handlers.Resync(sightings, lister, LISTINGS, wakes)
    caplog.set_level(logging.INFO, logger=handlers.log.name)
    for _ in range(3):
        await resync.resync({ROUTES, PROXIES})
    assert len(lister.calls) == 3, "each round stopped at the first LIST"
    assert alive(sightings, ROUTES, routes) == ["r1", "r2"]
    assert sightings.live(PROXIES, [pod]) == [True]
    assert wakes.count == 0

    lister.errors = {(ROUTE_KIND, "mail"): reconciler.ClusterError("GET /apis/...: HTTP 403: forbidden")}
    for _ in range(3):
        await resync.resync({ROUTES, PROXIES})
    assert alive(sightings, ROUTES, routes) == ["r1"], "team-x judged: r2 gone"
    assert sightings.live(PROXIES, [pod]) == []
    lister.errors = {}
    await resync.resync({ROUTES})
    assert alive(sightings, ROUTES, routes) == []
    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if "failed" in message] == [
        "resync: listing mailroute_index in mail failed, its index values are kept as they are: "
        "GET /apis/...: HTTP 503",
        "resync: listing mailroute_index in mail failed, its index values are kept as they are: "
        "GET /apis/...: HTTP 403: forbidden",
    ]
    assert [message for message in messages if "again" in message] == [
        "resync: listing mailroute_index in mail works again"
    ]


async def test_what_a_round_found_before_the_api_went_away_stands_and_wakes() -> None:
    clock = Clock()
    sightings = handlers.Sightings(clock)
    route = index(sightings, ROUTES, "r1", "r1")
    pod = index(sightings, PROXIES, "p1", True, namespace="mailgress-system")
    clock.now = 1.0
    lister = FakeLister({})
    lister.errors[(handlers.PODS, "mailgress-system")] = reconciler.ClusterUnavailableError("HTTP 503")
    wakes = Wakes()
    await handlers.Resync(sightings, lister, LISTINGS, wakes).resync({ROUTES, PROXIES})
    assert (sightings.live(ROUTES, [route]), sightings.live(PROXIES, [pod])) == ([], [True])
    assert wakes.count == 1


async def wait_for_calls(lister: FakeLister, count: int) -> None:
    """Until ``lister`` has had ``count`` calls, at most WAIT_SECONDS."""
    async with asyncio.timeout(WAIT_SECONDS):
        while len(lister.calls) < count:
            lister.called.clear()
            await lister.called.wait()


async def test_run_lists_a_relisted_kind_once_its_burst_is_quiet() -> None:
    sightings = handlers.Sightings()
    index(sightings, ROUTES, "r1", "r1")
    index(sightings, PROXIES, "p1", True, namespace="mailgress-system")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}})
    resync = handlers.Resync(sightings, lister, LISTINGS, Wakes(), period=3600, quiet=0.01)
    task = asyncio.create_task(resync.run())
    try:
        for _ in range(5):  # one re-list's burst of listing events
            resync.relisted(ROUTES)
        await wait_for_calls(lister, 1)
        assert lister.calls == [(ROUTE_KIND, "mail", "", "")], "only the re-listed kind"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_lists_every_kind_each_period() -> None:
    sightings = handlers.Sightings()
    index(sightings, ROUTES, "r1", "r1")
    index(sightings, PROXIES, "p1", True, namespace="mailgress-system")
    lister = FakeLister({(ROUTE_KIND, "mail"): {"r1"}, (handlers.PODS, "mailgress-system"): {"p1"}})
    resync = handlers.Resync(sightings, lister, LISTINGS, Wakes(), period=0.01, quiet=3600)
    task = asyncio.create_task(resync.run())
    try:
        await wait_for_calls(lister, 4)
        assert [call[0] for call in lister.calls[:4]] == [ROUTE_KIND, handlers.PODS] * 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
