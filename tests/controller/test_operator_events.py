"""KubeApi's Events as client-go's EventRecorder posts them: a repeat within the aggregation window
is counted in the first (PATCH count, lastTimestamp), an expired one is created anew, a chart that
grants no patch still gets its Events (created, the refusal logged once), and each MailRoute's
creates are bounded by a token bucket. Against the emulator; tests/kube/test_operator.py has the
whole controller with an endpoint that flaps (review J4: an Event object per condition flip)."""

import logging
from typing import Any

import pytest

from controller import operator, reconciler
from tests.controller.test_operator import kube_api  # noqa: F401 (fixture)
from tests.controller.test_reconciler import entry, route_body
from tests.kube.conftest import route_events
from tests.kube.emulator import Access, Emulator

FORBIDDEN = "patching Events is forbidden in namespace"


class Clock:
    """RecentEvents' clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = ("uid-a", "Normal", "Accepted", "Accepted=True: valid")


def test_an_event_is_remembered_for_the_aggregation_window() -> None:
    clock = Clock()
    recent = operator.RecentEvents(clock)
    assert recent.recent(KEY) is None
    recent.posted(KEY, "a.1", 1)
    clock.now += operator.EVENT_AGGREGATION_SECONDS
    assert recent.recent(KEY) == operator.PostedEvent("a.1", 1, 1000.0)
    assert recent.recent(KEY) is not None, "still remembered: a PATCH that failed may count in it later"
    recent.forget(KEY)
    assert recent.recent(KEY) is None, "forgotten: its PATCH was refused"
    recent.posted(KEY, "a.1", 2)
    clock.now += operator.EVENT_AGGREGATION_SECONDS + 1
    assert recent.recent(KEY) is None, "too old: created anew"
    clock.now -= operator.EVENT_AGGREGATION_SECONDS + 1
    assert recent.recent(KEY) is None, "and forgotten"


def test_the_remembered_events_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operator, "MAX_REMEMBERED_EVENTS", 2)
    recent = operator.RecentEvents(Clock())
    keys = [("uid-a", "Normal", "Accepted", str(n)) for n in range(3)]
    for n, key in enumerate(keys):
        recent.posted(key, f"a.{n}", 1)
    assert [recent.recent(key) is not None for key in keys] == [False, True, True]
    recent.posted(keys[1], "a.1", 2)  # counted again: now the most recently posted
    recent.posted(keys[0], "a.0", 1)
    assert [recent.recent(key) is not None for key in keys] == [True, True, False]


def test_a_forbidden_patch_is_remembered_per_namespace_for_the_retry_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    recent = operator.RecentEvents(clock)
    assert recent.may_patch("mail")
    assert recent.patch_forbidden("team-x"), "the first refusal there: named"
    assert not recent.may_patch("team-x")
    assert recent.may_patch("mail"), "another namespace patches on"
    clock.now += operator.EVENT_PATCH_RETRY_SECONDS
    assert recent.may_patch("team-x"), "tried again after the period"
    assert not recent.patch_forbidden("team-x"), "refused again: named once only"
    assert not recent.may_patch("team-x")
    monkeypatch.setattr(operator, "MAX_REMEMBERED_EVENTS", 2)
    recent.patch_forbidden("a")
    recent.patch_forbidden("b")  # team-x is the least recent of three: forgotten
    assert recent.may_patch("team-x")
    assert not recent.may_patch("a") and not recent.may_patch("b")


def test_creates_per_route_are_a_token_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    recent = operator.RecentEvents(clock)
    assert all(recent.may_create("uid-a") for _ in range(operator.EVENT_BURST))
    assert not recent.may_create("uid-a")
    assert recent.may_create("uid-b"), "each MailRoute has its own"
    clock.now += operator.EVENT_REFILL_SECONDS
    assert recent.may_create("uid-a")
    assert not recent.may_create("uid-a")
    clock.now += operator.EVENT_REFILL_SECONDS * operator.EVENT_BURST * 10
    assert sum(recent.may_create("uid-a") for _ in range(operator.EVENT_BURST * 2)) == operator.EVENT_BURST
    monkeypatch.setattr(operator, "MAX_REMEMBERED_EVENTS", 2)
    recent.may_create("uid-b")
    recent.may_create("uid-c")  # uid-a is the least recent of three: forgotten, a full bucket again
    assert recent.may_create("uid-a")


async def test_a_repeated_event_is_counted_in_the_first(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
) -> None:
    server, writer = kube_api
    route = entry(route_body("alpha", "a.example"))
    for _ in range(3):
        await writer.post_event(route, "Warning", "NoReadyEndpoints", "ResolvedRefs=False: none ready")
    [counted] = route_events(server, "alpha")
    assert counted["count"] == 3
    assert counted["reason"] == "NoReadyEndpoints"
    assert counted["firstTimestamp"] <= counted["lastTimestamp"]
    assert Access(verb="patch", resource="events") in server.accesses("writer-token")
    await writer.post_event(route, "Warning", "NoReadyEndpoints", "ResolvedRefs=False: another")
    await writer.post_event(entry(route_body("beta", "b.example")), "Warning", "NoReadyEndpoints", "x")
    assert [event["count"] for event in route_events(server, "alpha")] == [3, 1], "another message"
    assert len(route_events(server, "beta")) == 1, "another MailRoute"


async def test_an_expired_event_is_created_anew(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
) -> None:
    """The API server deletes Events after their TTL: the PATCH gets 404, and a new one starts."""
    server, writer = kube_api
    route = entry(route_body("alpha", "a.example"))
    await writer.post_event(route, "Normal", "Accepted", "valid")
    [first] = route_events(server, "alpha")
    async with server.delete(f"/api/v1/namespaces/mail/events/{first['metadata']['name']}") as response:
        assert response.status == 200
    await writer.post_event(route, "Normal", "Accepted", "valid")
    await writer.post_event(route, "Normal", "Accepted", "valid")
    [again] = route_events(server, "alpha")
    assert again["metadata"]["name"] != first["metadata"]["name"]
    assert again["count"] == 2


async def test_a_patch_that_meets_an_outage_counts_in_the_same_event_later(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review K2: the PATCH counting a repeat meets an unavailable API (the sweep ends); once the
    API is back, the repeat is counted in the Event created before, not in a duplicate."""
    server, writer = kube_api
    route = entry(route_body("alpha", "a.example"))
    message = ("Warning", "NoReadyEndpoints", "ResolvedRefs=False: none ready")
    await writer.post_event(route, *message)
    real_call = writer._call
    outage = {"on": True}

    async def flaky(method: str, path: str, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        if outage["on"] and method == "PATCH" and "/events/" in path:
            raise reconciler.ClusterUnavailableError(f"{method} {path}: HTTP 503")
        return await real_call(method, path, *args, **kwargs)

    monkeypatch.setattr(writer, "_call", flaky)
    with pytest.raises(reconciler.ClusterUnavailableError):
        await writer.post_event(route, *message)
    outage["on"] = False
    await writer.post_event(route, *message)
    assert [event["count"] for event in route_events(server, "alpha")] == [2]


async def test_a_forbidden_patch_falls_back_to_creating_logged_once(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chart that grants create on events and no patch: every Event is still posted, and the
    refusal named once; no PATCH is tried again within EVENT_PATCH_RETRY_SECONDS (here: allowed
    later, still not used)."""
    server, writer = kube_api
    caplog.set_level(logging.WARNING, logger=operator.__name__)
    server.forbidden["writer-token"] = {Access(verb="patch", resource="events")}
    route = entry(route_body("alpha", "a.example"))
    for _ in range(3):
        await writer.post_event(route, "Normal", "Accepted", "valid")
    server.forbidden.clear()
    await writer.post_event(route, "Normal", "Accepted", "valid")
    assert [event["count"] for event in route_events(server, "alpha")] == [1, 1, 1, 1]
    assert caplog.text.count(FORBIDDEN) == 1
    assert "grant patch on events" in caplog.text
    assert "was refused" not in caplog.text


async def test_a_patch_forbidden_in_one_namespace_aggregates_on_in_the_others(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review K2: a per-namespace Role (or a webhook) refuses PATCH in team-x only; the MailRoutes
    of namespace mail keep having their repeats counted, and team-x's are created anew until
    PATCH is tried there again, EVENT_PATCH_RETRY_SECONDS later."""
    server, writer = kube_api
    caplog.set_level(logging.WARNING, logger=operator.__name__)
    clock = Clock()
    monkeypatch.setattr(writer, "_events", operator.RecentEvents(clock))
    real_call = writer._call
    denied = {"team-x": True}

    async def policy(method: str, path: str, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        if denied["team-x"] and method == "PATCH" and path.startswith("/api/v1/namespaces/team-x/events/"):
            raise reconciler.ForbiddenError(f"{method} {path}: HTTP 403: denied in team-x")
        return await real_call(method, path, *args, **kwargs)

    monkeypatch.setattr(writer, "_call", policy)
    other = route_body("beta", "b.example")
    other["metadata"]["namespace"] = "team-x"
    beta, alpha = entry(other), entry(route_body("alpha", "a.example"))
    message = ("Warning", "NoReadyEndpoints", "ResolvedRefs=False: none ready")
    for _ in range(3):
        await writer.post_event(beta, *message)
        await writer.post_event(alpha, *message)
    assert [event["count"] for event in route_events(server, "alpha")] == [3]
    assert [event["count"] for event in route_events(server, "beta", "team-x")] == [1, 1, 1]
    assert caplog.text.count(FORBIDDEN) == 1
    assert "forbidden in namespace team-x" in caplog.text
    denied["team-x"] = False  # granted since
    clock.now += operator.EVENT_PATCH_RETRY_SECONDS
    await writer.post_event(beta, *message)
    assert [event["count"] for event in route_events(server, "beta", "team-x")] == [1, 1, 2]


async def test_creates_beyond_a_routes_budget_are_dropped_at_debug_level(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, writer = kube_api
    monkeypatch.setattr(operator, "EVENT_BURST", 3)
    caplog.set_level(logging.DEBUG, logger=operator.__name__)
    route = entry(route_body("alpha", "a.example"))
    for n in range(5):  # messages that keep changing: nothing to count in
        await writer.post_event(route, "Warning", "NoReadyEndpoints", f"{n} of 5 ready")
    posted = [event["message"] for event in route_events(server, "alpha")]
    assert posted == [f"{n} of 5 ready" for n in range(3)]
    dropped = [
        record
        for record in caplog.records
        if "Event NoReadyEndpoints for mail/alpha dropped" in record.getMessage()
    ]
    assert [record.levelno for record in dropped] == [logging.DEBUG] * 2
    await writer.post_event(route, "Warning", "NoReadyEndpoints", "2 of 5 ready")
    assert route_events(server, "alpha")[-1]["count"] == 2, "a repeat is counted, within the budget or not"
