"""The reconciler with a fake publisher and a fake API: the sync gate, debounce, Programmed and
status.proxies from acks, status writes (others' conditions kept, one write per change, none for
a route a new table does not change), Events, the snapshot: plain or compressed as it fits (read
back with the proxy's own reader), and its failures, which hold up neither tables nor statuses."""

import asyncio
import base64
import copy
import dataclasses
import functools
import gzip
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controller import endpoints, mailroute, metrics, reconciler
from proxy import table
from proxy.server import subscriber

NOW = "2026-11-26T12:00:00Z"
# Loop turns a pass needs at most here (no I/O in the fakes): a bounded wait, not a duration.
MAX_TURNS = 200


@dataclass(frozen=True)
class Ack:
    version: str
    accepted: bool = True
    error: str = ""


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[table.RoutingTable] = []
        self.current: dict[str, Ack] = {}
        self.callbacks: list[Callable[[], None]] = []

    def publish(self, new: table.RoutingTable) -> None:
        self.published.append(new)

    def acks(self) -> Mapping[str, Ack]:
        return dict(self.current)

    def on_change(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def ack(self, proxy: str, *, accepted: bool = True, version: str | None = None, error: str = "") -> None:
        self.current[proxy] = Ack(version or self.published[-1].version, accepted, error)
        for callback in self.callbacks:
            callback()


@dataclass
class FakeCluster:
    patches: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    snapshots: list[reconciler.Snapshot] = field(default_factory=list)
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    refuse: bool = False  # answer every status patch as a 409
    failures: int = 0  # raise ClusterUnavailableError on this many next status patches
    # route name -> the API server's refusal of its status patches (raised as ClusterError)
    refused: dict[str, str] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)  # every status patch tried, by key
    snapshot_failures: int = 0  # raise ClusterError on this many next snapshot writes
    snapshot_attempts: int = 0
    # The snapshot Secret's data as the API server keeps it (None: absent).
    secret: dict[str, dict[str, str]] | None = None
    refuse_reads: bool = False  # raise ClusterError on reading the snapshot
    # Event posts tried (0, 1, ...) that raise ClusterUnavailableError instead of posting.
    failing_events: set[int] = field(default_factory=set)
    event_attempts: int = 0

    async def load_snapshot(self) -> Mapping[str, Any] | None:
        if self.refuse_reads:
            raise reconciler.ClusterError("GET secrets/routing-table: HTTP 403")
        return copy.deepcopy(self.secret)

    async def patch_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> bool:
        self.attempts.append(f"{namespace}/{name}")
        if self.failures:
            self.failures -= 1
            raise reconciler.ClusterUnavailableError("HTTP 503")
        if name in self.refused:
            raise reconciler.ClusterError(self.refused[name])
        if self.refuse:
            return False
        self.patches.append((f"{namespace}/{name}", resource_version, dict(status)))
        return True

    async def save_snapshot(self, snapshot: reconciler.Snapshot) -> None:
        self.snapshot_attempts += 1
        if self.snapshot_failures:
            self.snapshot_failures -= 1
            raise reconciler.ClusterError("saving the snapshot Secret routing-table: HTTP 403")
        self.snapshots.append(snapshot)
        stored = self.secret if self.secret is not None else {}
        for name, values in snapshot.merge_patch().items():  # as the API server merges it
            kept = stored.setdefault(name, {})
            for key, value in values.items():
                if value is None:
                    kept.pop(key, None)
                else:
                    kept[key] = value
        self.secret = stored

    async def post_event(self, entry: reconciler.RouteEntry, kind: str, reason: str, message: str) -> None:
        attempt, self.event_attempts = self.event_attempts, self.event_attempts + 1
        if attempt in self.failing_events:
            raise reconciler.ClusterUnavailableError("POST events: HTTP 503")
        self.events.append((entry.route.key, kind, reason, message))

    def last_status(self, key: str) -> dict[str, Any]:
        return [status for name, _, status in self.patches if name == key][-1]


@dataclass
class GatedCluster(FakeCluster):
    """Status patches wait until ``gate`` opens: a sweep as slow as the test wants."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def patch_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> bool:
        await self.gate.wait()
        return await super().patch_status(namespace, name, resource_version, status)


@dataclass
class Timer:
    delay: float
    handle: asyncio.TimerHandle
    callback: Callable[[], object]
    fired: bool = False

    def fire(self) -> None:
        self.fired = True
        self.callback()


class Timers:
    """The running loop's ``call_later``, recorded instead of scheduled: the test fires each timer
    itself, so waits are checked by their length, never by the wall clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers: list[Timer] = []

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: object, context: Any = None
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(self.loop.time() + delay, callback, args, self.loop, context)
        self.timers.append(Timer(delay, handle, functools.partial(callback, *args)))
        return handle

    def pending(self) -> list[Timer]:
        return [timer for timer in self.timers if not timer.fired and not timer.handle.cancelled()]


@pytest.fixture
async def timers(monkeypatch: pytest.MonkeyPatch) -> Timers:
    loop = asyncio.get_running_loop()
    recorded = Timers(loop)
    monkeypatch.setattr(loop, "call_later", recorded.call_later)
    return recorded


def route_body(name: str, domain: str, *, generation: int = 1, port: int = 143) -> dict[str, Any]:
    return {
        "apiVersion": mailroute.API_VERSION,
        "kind": mailroute.KIND,
        "metadata": {
            "namespace": "mail",
            "name": name,
            "generation": generation,
            "creationTimestamp": f"2026-01-01T00:00:0{len(name) % 10}Z",
        },
        "spec": {"domains": [domain], "imap": {"backend": {"service": "dovecot", "port": port}}},
    }


def entry(
    body: dict[str, Any], *, version: str = "1", status: dict[str, Any] | None = None
) -> reconciler.RouteEntry:
    return reconciler.RouteEntry(
        mailroute.parse(body),
        uid="uid-" + body["metadata"]["name"],
        resource_version=version,
        status=status or {},
    )


DOVECOT = endpoints.Service("mail", "dovecot", (endpoints.ServicePort("imap", 143, "TCP"),))


def dovecot_slice(address: str = "10.0.0.1") -> endpoints.Slice:
    return endpoints.Slice("mail", "dovecot", "dovecot-a", (("imap", 10143),), (address,), ())


@dataclass
class World:
    """What the indexes hold; ``read`` is what the reconciler is given."""

    routes: list[reconciler.RouteEntry] = field(default_factory=list)
    proxies: dict[str, bool] = field(
        default_factory=lambda: {"proxy-a": True, "proxy-b": True, "proxy-c": False}
    )
    dovecot: endpoints.Slice = field(default_factory=dovecot_slice)

    def read(self) -> reconciler.Inputs:
        return reconciler.Inputs(
            routes=list(self.routes),
            services={("mail", "dovecot"): DOVECOT},
            slices={("mail", "dovecot"): [self.dovecot]},
            proxies=dict(self.proxies),
        )


@pytest.fixture
def world() -> World:
    return World(routes=[entry(route_body("example", "example.com"))])


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def worker(world: World, publisher: FakePublisher, cluster: FakeCluster) -> reconciler.Reconciler:
    return reconciler.Reconciler(
        read=world.read, publisher=publisher, cluster=cluster, holdoff=0, now=lambda: NOW
    )


async def applied_by_both(worker: reconciler.Reconciler, publisher: FakePublisher) -> None:
    """A pass publishes the table, both ready proxies apply it, and the next pass sees their acks."""
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b")
    await worker.reconcile()


def conditions_of(status: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


async def turns_until(check: Callable[[], bool]) -> None:
    for _ in range(MAX_TURNS):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("not reached")


async def test_nothing_is_published_before_the_sync_gate_opens(
    worker: reconciler.Reconciler, publisher: FakePublisher
) -> None:
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(20):
            worker.touch()
            await asyncio.sleep(0)
        assert publisher.published == []
        assert worker.passes == 0
        worker.mark_synced()
        await turns_until(lambda: worker.passes == 1)
        assert [route.name for route in publisher.published[0].routes] == ["mail/example"]
    finally:
        task.cancel()


async def test_a_burst_of_changes_is_one_pass(
    worker: reconciler.Reconciler, publisher: FakePublisher
) -> None:
    worker.mark_synced()
    for _ in range(50):
        worker.touch()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: worker.passes == 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert worker.passes == 1
        assert len(publisher.published) == 1
    finally:
        task.cancel()


async def test_max_holdoff_caps_the_wait(
    world: World, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """A holdoff of an hour still runs at once when the cap is zero."""
    worker = reconciler.Reconciler(
        read=world.read, publisher=publisher, cluster=cluster, holdoff=3600, max_holdoff=0
    )
    worker.mark_synced()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: worker.passes == 1)
    finally:
        task.cancel()


async def test_api_failure_is_retried(
    worker: reconciler.Reconciler, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0)
    cluster.failures = 1
    worker.mark_synced()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: len(cluster.patches) == 1)
        assert cluster.failures == 0
    finally:
        task.cancel()


async def test_programmed_follows_the_acks_of_ready_proxies(
    worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    first = conditions_of(cluster.last_status("mail/example"))
    assert first["Accepted"] == ("True", "Accepted", "the route is valid and its claims are free")
    assert first["ResolvedRefs"][:2] == ("True", "ResolvedRefs")
    assert first["Programmed"] == ("Unknown", "Pending", "0 of 2 proxies")

    publisher.ack("proxy-a")
    publisher.ack("proxy-c")  # not ready: does not count either way
    await worker.reconcile()
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"] == (
        "Unknown",
        "Pending",
        "1 of 2 proxies",
    )

    publisher.ack("proxy-b")
    await worker.reconcile()
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")
    assert status["proxies"] == {"programmed": 2, "total": 2, "version": publisher.published[-1].version}
    assert status["endpoints"] == {"imap": 1}
    assert status["protocols"] == "imap"
    assert status["observedGeneration"] == 1


async def test_a_later_table_with_the_same_generation_still_counts(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    publisher.ack("proxy-a")
    world.routes.append(entry(route_body("other", "example.org")))
    await worker.reconcile()
    assert len(publisher.published) == 2
    publisher.ack("proxy-b")  # acks the second table; it holds example at generation 1 too
    await worker.reconcile()
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][0] == "True"
    other = conditions_of(cluster.last_status("mail/other"))["Programmed"]
    assert other == ("Unknown", "Pending", "1 of 2 proxies")


async def test_a_new_generation_needs_new_acks(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await applied_by_both(worker, publisher)
    world.routes[0] = entry(route_body("example", "example.com", generation=2, port=110), version="7")
    await worker.reconcile()
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("Unknown", "Pending", "0 of 2 proxies")
    assert conditions_of(status)["ResolvedRefs"][:2] == ("False", "BackendNotFound")
    assert status["observedGeneration"] == 2


async def test_a_rejection_is_reported_and_the_last_good_table_still_counts(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b")
    world.routes.append(entry(route_body("other", "example.org")))
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b", accepted=False, error="no memory")
    await worker.reconcile()
    latest = publisher.published[-1].version
    assert conditions_of(cluster.last_status("mail/other"))["Programmed"] == (
        "Unknown",
        "Pending",
        f"1 of 2 proxies; proxy-b rejected table {latest}: no memory",
    )
    # proxy-b still runs the first table, which holds example as it is now.
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][0] == "True"
    assert cluster.last_status("mail/example")["proxies"]["programmed"] == 2
    assert cluster.last_status("mail/other")["proxies"] == {"programmed": 1, "total": 2, "version": latest}


async def test_a_gone_proxy_takes_its_rejection_with_it(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """A pod that rejected the table and is gone leaves no rejection behind: a new pod of the same
    name (a StatefulSet's) that has not acked yet is not reported with its predecessor's error,
    and a rollout of pods that each rejected the table keeps nothing of them."""
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b", accepted=False, error="no memory")
    await worker.reconcile()
    latest = publisher.published[-1].version
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][2] == (
        f"1 of 2 proxies; proxy-b rejected table {latest}: no memory"
    )
    del world.proxies["proxy-b"], publisher.current["proxy-b"]  # the pod and its stream are gone
    publisher.ack("proxy-a")
    await worker.reconcile()
    world.proxies["proxy-b"] = True  # its successor, ready, not connected yet
    await worker.reconcile()
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][2] == "1 of 2 proxies"


@pytest.mark.parametrize("failing", [{0}, {1}, {0, 1, 2}])
async def test_transition_events_an_outage_kept_back_are_posted_by_the_retried_sweep(
    worker: reconciler.Reconciler, cluster: FakeCluster, failing: set[int]
) -> None:
    """Review K2: the status went through, then an Event's POST met an unavailable API (the sweep
    ends): the retry finds the status written, and still posts the Events not posted, once each."""
    cluster.failing_events = failing
    for _ in range(len(failing)):
        with pytest.raises(reconciler.ClusterUnavailableError):
            await worker.reconcile()
    await worker.reconcile()
    await worker.reconcile()
    assert len(cluster.patches) == 1, "the status was written once"
    assert [(kind, reason) for _, kind, reason, _ in cluster.events] == [
        ("Normal", "Accepted"),
        ("Normal", "ResolvedRefs"),
    ]


async def test_a_successor_ready_before_a_pass_saw_its_name_absent_has_no_rejection(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Review K2: the StatefulSet creates proxy-b again (same name) before any pass runs without
    it; the rejection left with the predecessor's stream, not with its name."""
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b", accepted=False, error="no memory")
    await worker.reconcile()
    del publisher.current["proxy-b"]  # its stream closes; the successor is ready at once
    publisher.ack("proxy-a")
    await worker.reconcile()
    assert world.proxies["proxy-b"], "the successor, ready, not connected yet"
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][2] == "1 of 2 proxies"
    publisher.ack("proxy-b", accepted=False, error="still no memory")  # it connects and rejects
    await worker.reconcile()
    latest = publisher.published[-1].version
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][2] == (
        f"1 of 2 proxies; proxy-b rejected table {latest}: still no memory"
    )


async def test_a_proxy_whose_stream_leaves_still_counts_as_running_what_it_applied(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """It keeps serving that table while it reconnects: Programmed does not flap to Pending."""
    await applied_by_both(worker, publisher)
    written = len(cluster.patches)
    del publisher.current["proxy-b"]
    publisher.ack("proxy-a")
    await worker.reconcile()
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][:2] == ("True", "Programmed")
    assert len(cluster.patches) == written, "nothing to write"


async def test_status_is_written_once_per_change_with_events_on_transitions(
    worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    assert [(kind, reason) for _, kind, reason, _ in cluster.events] == [
        ("Normal", "Accepted"),
        ("Normal", "ResolvedRefs"),
    ]
    # The index still shows the old status (our write has not come back yet): nothing to redo.
    await worker.reconcile()
    assert len(cluster.patches) == 1
    publisher.ack("proxy-a")
    publisher.ack("proxy-b")
    await worker.reconcile()
    assert len(cluster.patches) == 2
    assert cluster.events[-1] == ("mail/example", "Normal", "Programmed", "Programmed=True: 2 of 2 proxies")
    assert len(cluster.events) == 3


async def test_the_object_status_is_the_baseline_once_the_watch_caught_up(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    written = cluster.last_status("mail/example")
    world.routes[0] = entry(route_body("example", "example.com"), version="2", status=written)
    await worker.reconcile()
    assert len(cluster.patches) == 1
    assert len(cluster.events) == 2


async def test_others_conditions_stay(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    foreign = {
        "type": "example.com/Audited",
        "status": "True",
        "reason": "Reviewed",
        "message": "",
        "lastTransitionTime": NOW,
    }
    world.routes[0] = entry(route_body("example", "example.com"), status={"conditions": [foreign]})
    await worker.reconcile()
    written = cluster.last_status("mail/example")["conditions"]
    assert written[0] == foreign
    assert [c["type"] for c in written[1:]] == ["Accepted", "ResolvedRefs", "Programmed"]


async def test_a_refused_write_posts_no_event_and_is_tried_again(
    worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    cluster.refuse = True
    await worker.reconcile()
    assert cluster.events == []
    cluster.refuse = False
    await worker.reconcile()
    assert len(cluster.patches) == 1
    assert len(cluster.events) == 2


async def test_conflict_and_invalid_route(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    world.routes.append(entry(route_body("zz-late", "example.com")))
    broken = route_body("broken", "example.net")
    del broken["spec"]["imap"]
    world.routes.append(entry(broken))
    await worker.reconcile()
    late = conditions_of(cluster.last_status("mail/zz-late"))
    assert late["Accepted"][:2] == ("False", "Conflicted")
    assert "mail/example" in late["Accepted"][2]
    assert late["Programmed"][:2] == ("False", "Invalid")
    assert cluster.last_status("mail/zz-late")["proxies"] is None  # runs on no proxy
    invalid = cluster.last_status("mail/broken")
    assert conditions_of(invalid)["Accepted"][:2] == ("False", "Invalid")
    # Deleted by the merge patch.
    assert (invalid["protocols"], invalid["endpoints"], invalid["proxies"]) == (None, None, None)
    kinds = {(key, kind, reason) for key, kind, reason, _ in cluster.events}
    assert ("mail/zz-late", "Warning", "Conflicted") in kinds
    assert ("mail/broken", "Warning", "Invalid") in kinds


# Status writes the API server refuses, and an API that is unavailable.

REFUSAL = (
    'PATCH .../aaa/status: HTTP 422: MailRoute.mailgress.io "aaa" is invalid: status.conditions: '
    "Too many: 9: must have at most 8 items"
)
REFUSED = "the Kubernetes API refused the status of MailRoute"


def refusals_logged(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and REFUSED in r.getMessage()]


async def test_a_refused_status_write_holds_up_no_other_route(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The first route of the sweep is refused (its status beyond the CRD's maxItems, an
    admission policy): it is logged with the API server's reason and skipped, the others get
    their status. It is not tried again on every pass before RETRY_SECONDS are over, but at
    once when its object changes, or when it comes back after it was gone."""
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    world.routes.insert(0, entry(route_body("aaa", "a.example")))
    cluster.refused["aaa"] = REFUSAL
    await worker.reconcile()
    assert [key for key, _, _ in cluster.patches] == ["mail/example"]
    assert {key for key, _, _, _ in cluster.events} == {"mail/example"}
    [logged] = refusals_logged(caplog)
    assert "mail/aaa" in logged and REFUSAL in logged
    assert f"trying again in {reconciler.RETRY_SECONDS:.0f} s" in logged

    await worker.reconcile()
    assert cluster.attempts == ["mail/aaa", "mail/example"], "not due again yet; example unchanged"
    world.routes[0] = entry(route_body("aaa", "a.example"), version="2")
    await worker.reconcile()
    assert cluster.attempts[2:] == ["mail/aaa"]
    gone = world.routes.pop(0)
    await worker.reconcile()
    world.routes.insert(0, gone)
    await worker.reconcile()
    assert cluster.attempts[3:] == ["mail/aaa"]


async def test_a_lasting_refusal_is_logged_once_per_problem_and_the_status_written_when_it_ends(
    worker: reconciler.Reconciler,
    cluster: FakeCluster,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0)  # due again at every pass
    caplog.set_level(logging.DEBUG, logger=reconciler.__name__)
    cluster.refused["example"] = REFUSAL
    for _ in range(3):
        await worker.reconcile()
    assert cluster.attempts == ["mail/example"] * 3
    assert len(refusals_logged(caplog)) == 1
    assert len(refusals_logged(caplog, logging.DEBUG)) == 2
    cluster.refused["example"] = "PATCH .../example/status: HTTP 403: denied by the policy no-status"
    await worker.reconcile()
    assert len(refusals_logged(caplog)) == 2, "another problem is logged again"
    assert cluster.events == []
    del cluster.refused["example"]
    await worker.reconcile()
    assert [key for key, _, _ in cluster.patches] == ["mail/example"]
    assert len(cluster.events) == 2
    assert caplog.text.count("the status of MailRoute mail/example is written again") == 1


async def test_refused_writes_are_tried_less_often_while_the_refusal_lasts(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Twice the wait at each refusal, up to MAX_REFUSED_RETRY_SECONDS: a missing RBAC rule,
    which refuses every route, costs few writes. (Each pass here changes the object, which
    has it tried at once.)"""
    caplog.set_level(logging.DEBUG, logger=reconciler.__name__)
    cluster.refused["example"] = REFUSAL
    for version in range(9):
        world.routes[0] = entry(route_body("example", "example.com"), version=str(version))
        await worker.reconcile()
    waits = [
        message.split("trying again in ")[1].split(" s ")[0]
        for level in (logging.WARNING, logging.DEBUG)
        for message in refusals_logged(caplog, level)
    ]
    expected = [min(reconciler.RETRY_SECONDS * 2**n, reconciler.MAX_REFUSED_RETRY_SECONDS) for n in range(9)]
    assert waits == [f"{wait:.0f}" for wait in expected]
    assert expected[-1] == reconciler.MAX_REFUSED_RETRY_SECONDS


async def test_a_refused_write_is_tried_again_without_another_change(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No watch event needed: a timer wakes a pass when the refused write is due. Answered 409
    (the object changed), it waits for its watch event instead: no timer, no write."""
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0)
    cluster.refused["example"] = REFUSAL
    worker.mark_synced()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: len(cluster.attempts) >= 2)
        del cluster.refused["example"]
        await turns_until(lambda: len(cluster.patches) == 1)
        cluster.refused["example"] = REFUSAL
        world.routes[0] = entry(route_body("example", "example.com", generation=2), version="2")
        worker.touch()
        await turns_until(lambda: len(cluster.attempts) >= 5)
        cluster.refuse, cluster.refused = True, {}
        await turns_until(lambda: cluster.attempts[-1:] == ["mail/example"] and len(cluster.attempts) >= 6)
        attempts = len(cluster.attempts)
        for _ in range(MAX_TURNS):
            await asyncio.sleep(0)
        assert len(cluster.attempts) == attempts
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unavailable_api_ends_the_sweep(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    """Network trouble, 401, 429, 5xx: no other write would fare better, so the sweep stops there
    (``run`` sweeps again RETRY_SECONDS later, test_api_failure_is_retried) instead of trying,
    and timing out on, every route."""
    world.routes.append(entry(route_body("other", "example.org")))
    cluster.failures = 1
    with pytest.raises(reconciler.ClusterUnavailableError):
        await worker.reconcile()
    assert cluster.attempts == ["mail/example"]
    await worker.reconcile()
    assert [key for key, _, _ in cluster.patches] == ["mail/example", "mail/other"]


API_FAILED = "Kubernetes API write failed"


async def test_an_outage_keeps_one_retry_pending_and_backs_off(
    world: World,
    worker: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    timers: Timers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review J4: every pass woken during an outage (proxies reconnecting, slices changing) started
    one more perpetual RETRY_SECONDS retry, so thirty such events made some 250 status writes in
    ten retry periods. Now one retry is pending at most; passes woken meanwhile publish their
    tables but write no status; each retry that fails again waits twice as long, up to
    MAX_RETRY_SECONDS, logged once; the sweep that goes through ends the outage, and the next
    one starts again at RETRY_SECONDS."""
    caplog.set_level(logging.DEBUG, logger=reconciler.__name__)
    cluster.failures = 1000
    worker.mark_synced()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: len(timers.pending()) == 1)
        assert cluster.attempts == ["mail/example"]
        for n in range(30):
            world.routes.append(entry(route_body(f"r{n}", f"r{n}.example")))
            worker.touch()
            await turns_until(lambda: len(publisher.published) == n + 2)  # noqa: B023
        for _ in range(MAX_TURNS):
            await asyncio.sleep(0)
        assert cluster.attempts == ["mail/example"], "no status write before the retry"
        assert [timer.delay for timer in timers.pending()] == [reconciler.RETRY_SECONDS]

        waits = []
        for retry in range(8):
            [timer] = timers.pending()
            waits.append(timer.delay)
            timer.fire()
            await turns_until(
                lambda: len(cluster.attempts) == retry + 2 and len(timers.pending()) == 1  # noqa: B023
            )
        cap = reconciler.MAX_RETRY_SECONDS
        assert waits == [min(reconciler.RETRY_SECONDS * 2**n, cap) for n in range(8)]
        assert waits[-1] == cap
        failed = [record.levelno for record in caplog.records if API_FAILED in record.getMessage()]
        assert failed == [logging.WARNING] + [logging.DEBUG] * 8, "one problem, logged once"

        cluster.failures = 0
        timers.pending()[0].fire()
        await turns_until(lambda: len(cluster.patches) == len(world.routes))
        assert timers.pending() == []
        assert caplog.text.count("status writes go through again") == 1

        cluster.failures = 1  # another outage waits RETRY_SECONDS first again
        world.routes[0] = entry(route_body("example", "example.com", generation=2), version="2")
        worker.touch()
        await turns_until(lambda: len(timers.pending()) == 1)
        assert timers.pending()[0].delay == reconciler.RETRY_SECONDS
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def since_of(first: table.RoutingTable) -> dict[str, str]:
    """The since map of a first table: every route since that very table."""
    return {route.name: first.version for route in first.routes}


async def test_snapshot_follows_the_published_version(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await worker.reconcile()
    await worker.reconcile()
    first = publisher.published[0]
    assert cluster.snapshots == [
        reconciler.Snapshot(
            first.version, False, table.to_json(first), reconciler.encode_since(first, since_of(first))
        )
    ]
    world.routes.clear()
    await worker.reconcile()
    assert len(publisher.published) == 2
    assert publisher.published[-1].routes == ()
    assert table.from_json(cluster.snapshots[-1].content) == publisher.published[-1]
    assert worker.table == publisher.published[-1]


# The snapshot's failures and its compressed form.

SNAPSHOT_ERROR = "cannot write the routing table snapshot Secret"


def programmed(cluster: FakeCluster) -> bool:
    return conditions_of(cluster.last_status("mail/example"))["Programmed"][0] == "True"


def failures(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("mailgress_controller_snapshot_failures_total", {"reason": reason})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def counted(
    world: World, publisher: FakePublisher, cluster: FakeCluster, registry: CollectorRegistry
) -> reconciler.Reconciler:
    """``worker`` with metrics."""
    return reconciler.Reconciler(
        read=world.read,
        publisher=publisher,
        cluster=cluster,
        holdoff=0,
        now=lambda: NOW,
        metrics=metrics.create(registry),
    )


async def test_a_failing_snapshot_write_holds_up_neither_tables_nor_statuses_and_is_retried(
    world: World,
    counted: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Missing RBAC on the Secret, say: every pass still publishes and writes statuses; the
    snapshot is tried again RETRY_SECONDS after each failure (here at once), logged once."""
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0)
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    cluster.snapshot_failures = 3
    counted.mark_synced()
    task = asyncio.create_task(counted.run())
    try:
        await turns_until(lambda: len(cluster.patches) == 1)
        assert len(publisher.published) == 1
        publisher.ack("proxy-a")
        publisher.ack("proxy-b")
        await turns_until(
            lambda: conditions_of(cluster.last_status("mail/example"))["Programmed"][0] == "True"
        )
        await turns_until(lambda: len(cluster.snapshots) == 1)
    finally:
        task.cancel()
    assert cluster.snapshot_attempts == 4
    assert cluster.snapshots[0].version == publisher.published[0].version
    assert failures(registry, "api_error") == 3
    assert failures(registry, "too_large") == 0
    assert caplog.text.count(SNAPSHOT_ERROR) == 1, "the same problem is logged once"
    assert "HTTP 403" in caplog.text
    assert caplog.text.count("routing table snapshot written again") == 1


async def test_after_a_failed_snapshot_write_passes_wait_retry_seconds_before_the_next(
    world: World, counted: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """No write per pass while the API refuses: until RETRY_SECONDS (5 s, longer than this
    test) are over, passes publish new tables and write statuses without trying again."""
    cluster.snapshot_failures = 100
    await counted.reconcile()
    world.routes.append(entry(route_body("other", "example.org")))
    await counted.reconcile()
    await counted.reconcile()
    assert len(publisher.published) == 2
    assert {key for key, _, _ in cluster.patches} == {"mail/example", "mail/other"}
    assert cluster.snapshot_attempts == 1


async def test_a_table_too_large_even_compressed_is_reported_and_only_a_new_one_tried(
    world: World,
    counted: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A limit of 100 bytes stands in for the 1 MiB that tens of thousands of routes exceed."""
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", 100)
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    await counted.reconcile()
    assert cluster.snapshot_attempts == 0  # nothing the API server would refuse is sent
    assert len(publisher.published) == 1
    assert len(cluster.patches) == 1  # statuses go on
    assert failures(registry, "too_large") == 1
    assert caplog.text.count(SNAPSHOT_ERROR) == 1
    assert "more than the 100 bytes a Secret holds" in caplog.text
    await counted.reconcile()  # the same table: it will not fit any better
    assert failures(registry, "too_large") == 1
    world.routes.append(entry(route_body("other", "example.org")))
    await counted.reconcile()  # a new table is tried; the same problem is not logged again
    assert failures(registry, "too_large") == 2
    assert caplog.text.count(SNAPSHOT_ERROR) == 1
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", 1024 * 1024)
    world.routes.pop()
    await counted.reconcile()
    assert [snapshot.version for snapshot in cluster.snapshots] == [publisher.published[-1].version]
    assert caplog.text.count("routing table snapshot written again") == 1


def many_routes(count: int) -> list[reconciler.RouteEntry]:
    return [entry(route_body(f"route-{index:05d}", f"d{index}.example")) for index in range(count)]


async def test_a_table_over_the_plain_limit_is_stored_compressed_and_the_proxy_reads_it(
    world: World,
    worker: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    tmp_path: Path,
) -> None:
    """Thousands of routes overflow a Secret as JSON (1 MiB, Kubernetes' object data limit); gzip
    under the second key fits, and the proxy's snapshot reader finds it where the chart mounts it
    (the compressed key's file beside the plain key's) and gets the very table published."""
    world.routes = many_routes(4500)
    await worker.reconcile()
    (published,) = publisher.published
    assert len(table.to_json(published)) > reconciler.MAX_SECRET_BYTES
    (snapshot,) = cluster.snapshots
    assert snapshot.compressed
    assert snapshot.since is not None
    assert len(snapshot.content) + len(snapshot.since) <= reconciler.MAX_SECRET_BYTES
    assert snapshot.fields()["data"].keys() == {reconciler.SNAPSHOT_GZIP_KEY, reconciler.SINCE_GZIP_KEY}
    (tmp_path / reconciler.SNAPSHOT_GZIP_KEY).write_bytes(snapshot.content)
    read = subscriber.read_snapshot(tmp_path / reconciler.SNAPSHOT_KEY)
    assert read == (tmp_path / reconciler.SNAPSHOT_GZIP_KEY, published)
    # Back under the limit: plain again (the patch removes the compressed key).
    world.routes = world.routes[:1]
    await worker.reconcile()
    assert not cluster.snapshots[-1].compressed
    latest = publisher.published[-1]
    assert cluster.snapshots[-1].merge_patch() == {
        "data": {
            reconciler.SNAPSHOT_KEY: encoded(table.to_json(latest)),
            # The route was in the first table, unchanged since.
            reconciler.SINCE_KEY: encoded(
                reconciler.encode_since(latest, {"mail/route-00000": published.version})
            ),
            reconciler.SNAPSHOT_GZIP_KEY: None,
            reconciler.SINCE_GZIP_KEY: None,
        }
    }


def made_table(count: int) -> table.RoutingTable:
    """A table of ``count`` routes, made directly: no MailRoute to parse."""
    routes = [
        table.Route(
            name=f"mail/r{index}", generation=1, users=(), domains=(f"d{index}.example",), upstreams=()
        )
        for index in range(count)
    ]
    return table.make_table(routes)


def table_over_the_plain_limit() -> table.RoutingTable:
    """A table whose JSON a Secret cannot hold."""
    made = made_table(12_000)
    assert len(table.to_json(made)) > reconciler.MAX_SECRET_BYTES
    return made


def test_the_same_table_always_compresses_to_the_same_snapshot() -> None:
    """No timestamp in the gzip header: a restarted controller that writes the same table again
    sends the same bytes (the API server then changes nothing, and no kubelet rewrites files)."""
    big = table_over_the_plain_limit()
    first = reconciler.encode_snapshot(big, since_of(big))
    assert first.compressed
    assert reconciler.encode_snapshot(big, since_of(big)) == first


async def test_a_new_table_goes_out_while_statuses_are_still_being_written(
    world: World, publisher: FakePublisher
) -> None:
    """Status sweeps run beside the passes: slow status writes never hold up the next table,
    and a sweep overtaken by a newer table stops; the next goes on where it stopped."""
    world.routes.append(entry(route_body("other", "example.org")))
    cluster = GatedCluster()
    worker = reconciler.Reconciler(
        read=world.read, publisher=publisher, cluster=cluster, holdoff=0, now=lambda: NOW
    )
    worker.mark_synced()
    task = asyncio.create_task(worker.run())
    try:
        await turns_until(lambda: len(publisher.published) == 1)
        # New endpoints change every route (all use dovecot), so each has a new version to write.
        world.dovecot = dovecot_slice("10.0.0.2")
        world.routes.append(entry(route_body("third", "example.net")))
        worker.touch()
        await turns_until(lambda: len(publisher.published) == 2)
        assert cluster.patches == []  # the first sweep still waits on its first write
        cluster.gate.set()
        await turns_until(lambda: len(cluster.patches) == 4)
        first, second = (published.version for published in publisher.published)
        written = [(key, status["proxies"]["version"]) for key, _, status in cluster.patches]
        # The first sweep finishes the write it was in and yields; the next one goes on from
        # there, so "other" is written once and "example" last.
        assert written == [
            ("mail/example", first),
            ("mail/other", second),
            ("mail/third", second),
            ("mail/example", second),
        ]
    finally:
        task.cancel()


async def test_a_table_that_does_not_change_a_route_writes_no_status_for_it(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """status.proxies names the route's own first table, not the latest: adding a route, the
    proxies acking it and deleting it again leave the other route's status as it was."""
    await applied_by_both(worker, publisher)
    first = publisher.published[0].version
    example = cluster.last_status("mail/example")
    assert example["proxies"] == {"programmed": 2, "total": 2, "version": first}
    writes = len(cluster.patches)

    world.routes.append(entry(route_body("other", "example.org")))
    await applied_by_both(worker, publisher)
    second = publisher.published[1].version
    assert second != first
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/other", "mail/other"]
    assert cluster.last_status("mail/other")["proxies"] == {"programmed": 2, "total": 2, "version": second}

    world.routes.pop()
    await worker.reconcile()
    # The same content is the same version again; the proxies that run it count.
    assert publisher.published[-1].version == first
    publisher.ack("proxy-a")
    await worker.reconcile()
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/other", "mail/other"]
    assert cluster.last_status("mail/example") == example


async def test_new_endpoints_move_the_version_and_the_count_while_programmed_holds(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """The route's compiled form changed: status.proxies names the table that carries the new
    endpoints and counts the proxies that run it; the generation did not change, so every proxy
    still runs it and Programmed stays True."""
    await applied_by_both(worker, publisher)
    world.dovecot = dovecot_slice("10.0.0.2")
    await worker.reconcile()
    moved = publisher.published[-1].version
    status = cluster.last_status("mail/example")
    assert status["proxies"] == {"programmed": 0, "total": 2, "version": moved}
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")

    publisher.ack("proxy-a")
    await worker.reconcile()
    assert cluster.last_status("mail/example")["proxies"] == {"programmed": 1, "total": 2, "version": moved}
    publisher.ack("proxy-b")
    await worker.reconcile()
    status = cluster.last_status("mail/example")
    assert status["proxies"] == {"programmed": 2, "total": 2, "version": moved}
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")
    assert [event for event in cluster.events if event[2] == "Programmed"] == [
        ("mail/example", "Normal", "Programmed", "Programmed=True: 2 of 2 proxies")
    ]


async def test_endpoints_that_come_back_count_the_proxies_that_never_left(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Endpoints flap back: the table's content, and so its version, is the first one again. A
    proxy still on it runs the route as it is now; one on the table between does not."""
    await worker.reconcile()
    first = publisher.published[0].version
    publisher.ack("proxy-a")
    world.dovecot = dovecot_slice("10.0.0.2")
    await worker.reconcile()
    publisher.ack("proxy-b")
    world.dovecot = dovecot_slice()
    await worker.reconcile()
    assert [published.version for published in publisher.published][::2] == [first, first]
    assert cluster.last_status("mail/example")["proxies"] == {"programmed": 1, "total": 2, "version": first}


def recreated(body: dict[str, Any]) -> reconciler.RouteEntry:
    """``kubectl delete`` then ``kubectl apply`` under the same name: a new object (new uid,
    empty status) whose generation starts at 1 again."""
    return dataclasses.replace(entry(body, version="99"), uid="uid-recreated")


async def test_a_route_created_again_with_another_spec_counts_no_proxy_running_the_old_one(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Same name, same generation 1, another domain: proxies still on the old object's table do
    not run it, and Programmed says so as status.proxies does, until they ack the new table."""
    await applied_by_both(worker, publisher)
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][0] == "True"
    world.routes[0] = recreated(route_body("example", "new.example"))
    await worker.reconcile()
    old, new = (published.version for published in publisher.published)
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("Unknown", "Pending", "0 of 2 proxies")
    assert status["proxies"] == {"programmed": 0, "total": 2, "version": new}

    publisher.ack("proxy-a")
    await worker.reconcile()
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("Unknown", "Pending", "1 of 2 proxies")
    assert status["proxies"] == {"programmed": 1, "total": 2, "version": new}
    publisher.ack("proxy-b")
    await worker.reconcile()
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")
    assert status["proxies"] == {"programmed": 2, "total": 2, "version": new}
    assert old != new


async def test_a_route_created_again_that_every_proxy_rejects_stays_pending_with_their_errors(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    await applied_by_both(worker, publisher)
    world.routes[0] = recreated(route_body("example", "new.example"))
    await worker.reconcile()
    publisher.ack("proxy-a", accepted=False, error="bad table")
    publisher.ack("proxy-b", accepted=False, error="bad table")
    await worker.reconcile()
    new = publisher.published[-1].version
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == (
        "Unknown",
        "Pending",
        f"0 of 2 proxies; proxy-a rejected table {new}: bad table; proxy-b rejected table {new}: bad table",
    )
    assert status["proxies"] == {"programmed": 0, "total": 2, "version": new}


async def test_a_route_created_again_unchanged_is_programmed_where_the_proxies_run_it(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """The new object compiles to the very route the proxies run (the table holds no uid): the
    same table, and the new object's first status says Programmed."""
    await applied_by_both(worker, publisher)
    world.routes[0] = recreated(route_body("example", "example.com"))
    await worker.reconcile()
    (only,) = publisher.published
    status = cluster.last_status("mail/example")
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")
    assert status["proxies"] == {"programmed": 2, "total": 2, "version": only.version}


# A restart: a new Reconciler on the same cluster, started from the snapshot the first one wrote.

RESTORE_FAILED = "cannot restart from the routing table snapshot Secret"


async def programmed_in_two_tables(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> tuple[str, str]:
    """ "example" in a first table, "other" added in a second, both Programmed everywhere; the
    index then shows the statuses written, as the watch brings them back. The two versions."""
    await worker.reconcile()
    publisher.ack("proxy-a")
    publisher.ack("proxy-b")
    world.routes.append(entry(route_body("other", "example.org")))
    await applied_by_both(worker, publisher)
    first, second = (published.version for published in publisher.published)
    assert cluster.last_status("mail/example")["proxies"] == {"programmed": 2, "total": 2, "version": first}
    assert cluster.last_status("mail/other")["proxies"] == {"programmed": 2, "total": 2, "version": second}
    world.routes = [
        dataclasses.replace(route, status=cluster.last_status(route.route.key)) for route in world.routes
    ]
    return first, second


def restarted(world: World, cluster: FakeCluster) -> tuple[reconciler.Reconciler, FakePublisher]:
    """A new controller process: nothing in memory, the same API server."""
    channel = FakePublisher()
    return reconciler.Reconciler(
        read=world.read, publisher=channel, cluster=cluster, holdoff=0, now=lambda: NOW
    ), channel


async def test_a_restarted_controller_writes_no_status_for_unchanged_routes(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Each route keeps the version it had (not the table the new process publishes first), and
    the proxies acking the stored table run it: not one status write, nor a snapshot write."""
    _, second = await programmed_in_two_tables(world, worker, publisher, cluster)
    writes, snapshots = len(cluster.patches), len(cluster.snapshots)
    again, channel = restarted(world, cluster)
    await again.restore()
    channel.ack("proxy-a", version=second)  # on reconnecting, a proxy acks what it runs
    channel.ack("proxy-b", version=second)
    await again.reconcile()
    assert [published.version for published in channel.published] == [second]  # for the streams
    assert cluster.patches[writes:] == []
    assert len(cluster.snapshots) == snapshots


async def test_header_values_hide_in_a_version_that_a_restart_keeps(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """auth_http header values enter the version through an HMAC under a random key, which the
    snapshot keeps: another controller would give other versions, a restarted one the same."""
    body = route_body("example", "example.com")
    body["spec"]["auth"] = {
        "mode": "http",
        "http": {"url": "http://auth.mail.svc:9000/", "headers": {"X-Auth-Key": "Summer2026!"}},
    }
    world.routes = [entry(body)]
    await worker.reconcile()
    (version,) = (published.version for published in publisher.published)
    assert version != table.make_table(publisher.published[0].routes, "00" * table.VERSION_KEY_BYTES).version
    again, channel = restarted(world, cluster)
    await again.restore()
    await again.reconcile()
    assert [published.version for published in channel.published] == [version]
    stranger, elsewhere = restarted(world, FakeCluster())
    await stranger.restore()
    await stranger.reconcile()
    assert [published.version for published in elsewhere.published] != [version]


async def test_a_route_changed_while_the_controller_was_away_gets_a_new_version(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Its compiled form differs from the stored table's: a write for it alone, and the snapshot
    keeps the other route's version for the restart after this one."""
    first, second = await programmed_in_two_tables(world, worker, publisher, cluster)
    writes = len(cluster.patches)
    example, other = world.routes
    world.routes = [example, entry(route_body("other", "example.net", generation=2), status=other.status)]
    again, channel = restarted(world, cluster)
    await again.restore()
    channel.ack("proxy-a", version=second)
    channel.ack("proxy-b", version=second)
    await again.reconcile()
    (third,) = (published.version for published in channel.published)
    assert third not in (first, second)
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/other"]
    status = cluster.last_status("mail/other")
    assert status["proxies"] == {"programmed": 0, "total": 2, "version": third}
    assert conditions_of(status)["Programmed"] == ("Unknown", "Pending", "0 of 2 proxies")
    assert cluster.secret is not None
    restored = reconciler.decode_snapshot(cluster.secret)
    assert restored.since == {"mail/example": first, "mail/other": third}

    channel.ack("proxy-a")
    channel.ack("proxy-b")
    await again.reconcile()
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/other", "mail/other"]
    assert conditions_of(cluster.last_status("mail/other"))["Programmed"][0] == "True"


async def test_a_route_created_again_while_the_controller_was_away_counts_no_proxy_on_the_stored_table(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """The stored table (publication 0 of the new process) holds the old object at generation 1,
    as the new one is: proxies acking it count for the unchanged route only."""
    first, second = await programmed_in_two_tables(world, worker, publisher, cluster)
    writes = len(cluster.patches)
    example, _ = world.routes
    world.routes = [example, recreated(route_body("other", "example.net"))]
    again, channel = restarted(world, cluster)
    await again.restore()
    channel.ack("proxy-a", version=second)
    channel.ack("proxy-b", version=second)
    await again.reconcile()
    (third,) = (published.version for published in channel.published)
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/other"]
    status = cluster.last_status("mail/other")
    assert conditions_of(status)["Programmed"] == ("Unknown", "Pending", "0 of 2 proxies")
    assert status["proxies"] == {"programmed": 0, "total": 2, "version": third}
    assert third not in (first, second)


async def test_after_a_restore_the_first_sweep_waits_for_every_ready_proxy(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """Until a ready proxy acks to the new process it would count as running nothing: no sweep
    (which would turn every route Pending) before each has; then only the new route is written,
    Programmed at once."""
    await programmed_in_two_tables(world, worker, publisher, cluster)
    writes = len(cluster.patches)
    world.routes.append(entry(route_body("third", "example.net")))
    again, channel = restarted(world, cluster)
    again.mark_synced()
    task = asyncio.create_task(again.run())
    try:
        await turns_until(lambda: again.passes == 1)
        channel.ack("proxy-a")
        await turns_until(lambda: again.passes == 2)
        for _ in range(MAX_TURNS):  # every chance to sweep: no I/O in the fakes
            await asyncio.sleep(0)
        assert cluster.patches[writes:] == []
        channel.ack("proxy-b")
        await turns_until(lambda: len(cluster.patches) > writes)
    finally:
        task.cancel()
    assert [key for key, _, _ in cluster.patches[writes:]] == ["mail/third"]
    status = cluster.last_status("mail/third")
    assert conditions_of(status)["Programmed"] == ("True", "Programmed", "2 of 2 proxies")
    assert status["proxies"] == {"programmed": 2, "total": 2, "version": channel.published[0].version}


async def test_proxies_that_stay_silent_hold_the_first_sweep_only_for_the_grace(
    world: World,
    worker: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await programmed_in_two_tables(world, worker, publisher, cluster)
    writes = len(cluster.patches)
    monkeypatch.setattr(reconciler, "PROXY_GRACE_SECONDS", 0)
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    again, _ = restarted(world, cluster)
    again.mark_synced()
    task = asyncio.create_task(again.run())
    try:
        await turns_until(lambda: len(cluster.patches) == writes + 2)
    finally:
        task.cancel()
    for key in ("mail/example", "mail/other"):
        assert conditions_of(cluster.last_status(key))["Programmed"] == (
            "Unknown",
            "Pending",
            "0 of 2 proxies",
        )
    assert "not every ready proxy acked within 0 s of the first table" in caplog.text


def encoded(value: bytes) -> str:
    """A Secret data value as JSON carries it."""
    return base64.b64encode(value).decode()


def stored_table(stored: dict[str, dict[str, str]]) -> table.RoutingTable:
    return table.from_json(base64.b64decode(stored["data"][reconciler.SNAPSHOT_KEY]))


def drop_since(stored: dict[str, dict[str, str]]) -> None:
    del stored["data"][reconciler.SINCE_KEY]


def corrupt_table(stored: dict[str, dict[str, str]]) -> None:
    stored["data"][reconciler.SNAPSHOT_KEY] = encoded(b'{"apiVersion": ')


def since_of_another_table(stored: dict[str, dict[str, str]]) -> None:
    other = table.make_table(())
    stored["data"][reconciler.SINCE_KEY] = encoded(reconciler.encode_since(other, {}))


def since_without_a_route(stored: dict[str, dict[str, str]]) -> None:
    current = stored_table(stored)
    since = {route.name: current.version for route in current.routes[1:]}
    stored["data"][reconciler.SINCE_KEY] = encoded(reconciler.encode_since(current, since))


def since_not_of_versions(stored: dict[str, dict[str, str]]) -> None:
    current = stored_table(stored)
    body = {"table": current.version, "since": {"v1": ["x"]}}
    stored["data"][reconciler.SINCE_KEY] = encoded(json.dumps(body).encode())


def corrupt_gzip(stored: dict[str, dict[str, str]]) -> None:
    garbage = encoded(b"\x1f\x8b" + b"not deflate")
    stored["data"] = {reconciler.SNAPSHOT_GZIP_KEY: garbage, reconciler.SINCE_GZIP_KEY: garbage}


def not_base64(stored: dict[str, dict[str, str]]) -> None:
    stored["data"] = {reconciler.SNAPSHOT_GZIP_KEY: "%%%"}


def plain_not_base64(stored: dict[str, dict[str, str]]) -> None:
    """The table JSON as a ConfigMap held it: a Secret's value is base64, this is not."""
    stored["data"][reconciler.SNAPSHOT_KEY] = base64.b64decode(
        stored["data"][reconciler.SNAPSHOT_KEY]
    ).decode()


def nothing_stored(stored: dict[str, dict[str, str]]) -> None:
    stored.clear()


@pytest.mark.parametrize(
    ("damage", "logged"),
    [
        (drop_since, "no since.json beside table.json (an earlier release wrote it)"),
        (corrupt_table, "table.json is not a valid table: not JSON"),
        (since_of_another_table, "the since map belongs to another table than sha256:"),
        (since_without_a_route, "the since map does not name exactly the table's routes"),
        (since_not_of_versions, "the since map holds something else than versions and names"),
        (corrupt_gzip, "table.json.gz is not valid gzip"),
        (not_base64, "table.json.gz is not base64"),
        (plain_not_base64, "table.json is not base64"),
        (nothing_stored, "it holds neither table.json nor table.json.gz"),
    ],
)
async def test_an_unusable_snapshot_falls_back_to_a_fresh_start(
    world: World,
    worker: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[dict[str, dict[str, str]]], None],
    logged: str,
) -> None:
    """Logged, and then as before since maps: every route's version moves to the first table of
    the new process (here "example", whose version was the older table's); the snapshot written
    anew with its since map, for the next restart."""
    _, second = await programmed_in_two_tables(world, worker, publisher, cluster)
    assert cluster.secret is not None
    damage(cluster.secret)
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    again, channel = restarted(world, cluster)
    await again.restore()
    assert f"{RESTORE_FAILED} ({logged}" in caplog.text
    channel.ack("proxy-a", version=second)
    channel.ack("proxy-b", version=second)
    await again.reconcile()
    assert cluster.last_status("mail/example")["proxies"] == {"programmed": 2, "total": 2, "version": second}
    assert cluster.secret is not None
    assert reconciler.decode_snapshot(cluster.secret).since == {
        "mail/example": second,
        "mail/other": second,
    }


@pytest.mark.parametrize(
    ("missing", "logged"),
    [(True, "no routing table snapshot yet"), (False, f"{RESTORE_FAILED} (GET secrets")],
)
async def test_no_snapshot_or_a_refused_read_starts_afresh(
    world: World,
    worker: reconciler.Reconciler,
    cluster: FakeCluster,
    caplog: pytest.LogCaptureFixture,
    missing: bool,
    logged: str,
) -> None:
    """The first start ever, or no RBAC to read the Secret: today's start, never a crash."""
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    cluster.refuse_reads = not missing
    await worker.restore()
    assert logged in caplog.text
    await worker.reconcile()
    assert conditions_of(cluster.last_status("mail/example"))["Programmed"][1] == "Pending"
    assert len(cluster.snapshots) == 1


def test_decompression_stops_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret's 1 MiB of gzip can inflate to a gigabyte: a restore stops at its bound, and
    a member cut short is refused."""
    current = made_table(3)
    plain = reconciler.encode_snapshot(current, since_of(current))
    assert plain.since is not None
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(plain.content) + len(plain.since) - 1)
    compressed = reconciler.encode_snapshot(current, since_of(current))
    assert compressed.compressed
    assert compressed.since is not None
    assert reconciler.decode_snapshot(compressed.fields()) == reconciler.Restored(current, since_of(current))
    monkeypatch.setattr(reconciler, "MAX_RESTORED_BYTES", len(plain.content) - 1)
    with pytest.raises(reconciler.SnapshotUnreadableError, match="decompresses to more than"):
        reconciler.decode_snapshot(compressed.fields())
    monkeypatch.setattr(reconciler, "MAX_RESTORED_BYTES", len(plain.content))
    truncated = dict(compressed.fields()["data"])
    truncated[reconciler.SNAPSHOT_GZIP_KEY] = encoded(compressed.content[:-4])
    with pytest.raises(reconciler.SnapshotUnreadableError, match="not one complete gzip member"):
        reconciler.decode_snapshot({"data": truncated})


def test_the_since_map_counts_in_the_size_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both plainly if both fit, else both compressed, else the table alone (what a booting
    proxy needs comes first), else too large."""
    current = made_table(3)
    since = since_of(current)
    document, since_document = table.to_json(current), reconciler.encode_since(current, since)
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(document) + len(since_document))
    assert reconciler.encode_snapshot(current, since) == reconciler.Snapshot(
        current.version, False, document, since_document
    )
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(document) + len(since_document) - 1)
    both = reconciler.encode_snapshot(current, since)
    assert both.compressed
    assert both.since is not None
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(both.content) + len(both.since) - 1)
    alone = reconciler.encode_snapshot(current, since)
    assert (alone.compressed, alone.content, alone.since) == (True, both.content, None)
    assert alone.fields() == {"data": {reconciler.SNAPSHOT_GZIP_KEY: encoded(both.content)}}
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(both.content) - 1)
    with pytest.raises(reconciler.SnapshotTooLargeError):
        reconciler.encode_snapshot(current, since)


async def test_a_snapshot_stored_without_its_since_map_is_reported_and_a_restart_starts_afresh(
    world: World,
    worker: reconciler.Reconciler,
    cluster: FakeCluster,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A limit that holds the tables compressed but not their since maps: stored without them,
    warned about once (not per table), and a restart starts afresh."""
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    larger = World(routes=[*world.routes, entry(route_body("other", "example.org"))])
    probe = FakePublisher()
    await reconciler.Reconciler(read=larger.read, publisher=probe, cluster=FakeCluster()).reconcile()
    document = table.to_json(probe.published[0])
    compressed = gzip.compress(document, compresslevel=reconciler.SNAPSHOT_GZIP_LEVEL, mtime=0)
    monkeypatch.setattr(reconciler, "MAX_SECRET_BYTES", len(compressed))
    await worker.reconcile()
    world.routes.append(entry(route_body("other", "example.org")))
    await worker.reconcile()
    assert [snapshot.since for snapshot in cluster.snapshots] == [None, None]
    assert caplog.text.count("holds no since map") == 1, "logged once, not per table"
    again, _ = restarted(world, cluster)
    await again.restore()
    assert f"{RESTORE_FAILED} (no since.json.gz beside table.json.gz" in caplog.text


# A name a route serves stays with it (the compiler's rule 2b): the reconciler gives the compiler
# what the table it published last holds, also the table restored from the snapshot.


def tenant_route(
    namespace: str, name: str, created: str, domains: list[str], *, generation: int = 1
) -> dict[str, Any]:
    body = route_body(name, domains[0], generation=generation)
    body["metadata"].update(namespace=namespace, creationTimestamp=created)
    body["spec"]["domains"] = domains
    return body


# team-x's harmless route from January, and mail's alpha.example from June.
MISC = tenant_route("team-x", "misc", "2026-01-01T00:00:00Z", ["team-x.example"])
ALPHA = tenant_route("mail", "alpha", "2026-06-01T00:00:00Z", ["alpha.example"])
# team-x's route edited later to claim *.example as well.
GRAB = tenant_route("team-x", "misc", "2026-01-01T00:00:00Z", ["team-x.example", "*.example"], generation=2)
SERVED = (
    'domain "*.example" covers the domain "alpha.example", which mail/alpha routes (already '
    "serving it) in another namespace; this route is not used"
)


def owner_of(published: table.RoutingTable, login: str) -> str | None:
    found = table.lookup(published, "imap", login)
    return None if found is None else found.name


async def test_an_older_route_edited_to_claim_a_served_name_is_refused_not_the_route_serving_it(
    world: World,
    counted: reconciler.Reconciler,
    publisher: FakePublisher,
    cluster: FakeCluster,
    registry: CollectorRegistry,
) -> None:
    world.routes = [entry(MISC), entry(ALPHA)]
    await counted.reconcile()
    assert owner_of(publisher.published[-1], "ceo@alpha.example") == "mail/alpha"
    world.routes[0] = entry(GRAB, version="2")
    await counted.reconcile()
    assert owner_of(publisher.published[-1], "ceo@alpha.example") == "mail/alpha"
    assert conditions_of(cluster.last_status("team-x/misc"))["Accepted"] == ("False", "Conflicted", SERVED)
    assert conditions_of(cluster.last_status("mail/alpha"))["Accepted"][:2] == ("True", "Accepted")
    # Compiling again with what the new table holds would give it again: the passes that follow
    # (status writes coming back as watch events) compile nothing.
    compiled = registry.get_sample_value("mailgress_controller_compile_seconds_count")
    await counted.reconcile()
    assert registry.get_sample_value("mailgress_controller_compile_seconds_count") == compiled == 2


async def test_a_restarted_controller_keeps_a_name_with_the_route_that_served_it(
    world: World, worker: reconciler.Reconciler, publisher: FakePublisher, cluster: FakeCluster
) -> None:
    """team-x's route is edited while the controller is away: the table restored from the
    snapshot says who serves alpha.example. Without a snapshot to read (none, or unusable: the
    previous table is then unknown), age alone decides, and the older route takes it."""
    world.routes = [entry(MISC), entry(ALPHA)]
    await worker.reconcile()
    world.routes[0] = entry(GRAB, version="2")
    again, channel = restarted(world, cluster)
    await again.restore()
    await again.reconcile()
    assert owner_of(channel.published[-1], "ceo@alpha.example") == "mail/alpha"
    assert conditions_of(cluster.last_status("team-x/misc"))["Accepted"] == ("False", "Conflicted", SERVED)

    cluster.secret = None
    fresh, unaware = restarted(world, cluster)
    await fresh.restore()
    await fresh.reconcile()
    assert owner_of(unaware.published[-1], "ceo@alpha.example") == "team-x/misc"
