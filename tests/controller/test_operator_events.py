"""KubeApi's Events as client-go's EventRecorder posts them: a repeat within the aggregation window
is counted in the first (PATCH count, lastTimestamp), an expired one is created anew, a chart that
grants no patch still gets its Events (created, the refusal logged once), and each MailRoute's
creates are bounded by a token bucket. Against the emulator, and through the whole controller
with an endpoint that flaps (review J4: an Event object per condition flip)."""

import logging
from pathlib import Path
from typing import Any

import pytest

from controller import operator
from tests.controller.test_operator import kube_api  # noqa: F401 (fixture)
from tests.controller.test_reconciler import entry, route_body
from tests.kube.conftest import (  # noqa: F401 (fixtures)
    NAMESPACE,
    AccessLog,
    Api,
    Controller,
    api,
    condition,
    controller,
    controller_runner,
    controller_settings,
    create_backend,
    create_route,
    emulator,
    eventually,
    imap_route,
)
from tests.kube.emulator import Access, Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_

FORBIDDEN = "patching Events is forbidden"


def events(server: Emulator, name: str, namespace: str = "mail") -> list[dict[str, Any]]:
    """The Event objects about the MailRoute ``name``, oldest first."""
    found = [
        obj.raw
        for (resource, where, _), obj in server.objects.items()
        if resource.plural == "events" and where == namespace and not obj.deleted
        if obj.raw.get("involvedObject", {}).get("name") == name
    ]
    return sorted(found, key=lambda event: int(event["metadata"]["resourceVersion"]))


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
    assert recent.take(KEY) is None
    recent.posted(KEY, "a.1", 1)
    clock.now += operator.EVENT_AGGREGATION_SECONDS
    assert recent.take(KEY) == operator.PostedEvent("a.1", 1, 1000.0)
    assert recent.take(KEY) is None, "taken: a failed post leaves nothing behind"
    recent.posted(KEY, "a.1", 2)
    clock.now += operator.EVENT_AGGREGATION_SECONDS + 1
    assert recent.take(KEY) is None, "too old: created anew"


def test_the_remembered_events_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operator, "MAX_REMEMBERED_EVENTS", 2)
    recent = operator.RecentEvents(Clock())
    keys = [("uid-a", "Normal", "Accepted", str(n)) for n in range(3)]
    for n, key in enumerate(keys):
        recent.posted(key, f"a.{n}", 1)
    assert [recent.take(key) is not None for key in keys] == [False, True, True]


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
    [counted] = events(server, "alpha")
    assert counted["count"] == 3
    assert counted["reason"] == "NoReadyEndpoints"
    assert counted["firstTimestamp"] <= counted["lastTimestamp"]
    assert Access(verb="patch", resource="events") in server.accesses("writer-token")
    await writer.post_event(route, "Warning", "NoReadyEndpoints", "ResolvedRefs=False: another")
    await writer.post_event(entry(route_body("beta", "b.example")), "Warning", "NoReadyEndpoints", "x")
    assert [event["count"] for event in events(server, "alpha")] == [3, 1], "another message"
    assert len(events(server, "beta")) == 1, "another MailRoute"


async def test_an_expired_event_is_created_anew(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
) -> None:
    """The API server deletes Events after their TTL: the PATCH gets 404, and a new one starts."""
    server, writer = kube_api
    route = entry(route_body("alpha", "a.example"))
    await writer.post_event(route, "Normal", "Accepted", "valid")
    [first] = events(server, "alpha")
    async with server.delete(f"/api/v1/namespaces/mail/events/{first['metadata']['name']}") as response:
        assert response.status == 200
    await writer.post_event(route, "Normal", "Accepted", "valid")
    await writer.post_event(route, "Normal", "Accepted", "valid")
    [again] = events(server, "alpha")
    assert again["metadata"]["name"] != first["metadata"]["name"]
    assert again["count"] == 2


async def test_a_forbidden_patch_falls_back_to_creating_logged_once(
    kube_api: tuple[Emulator, operator.KubeApi],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chart that grants create on events and no patch: every Event is still posted, and the
    refusal named once; no PATCH is tried again (here: allowed later, still not used)."""
    server, writer = kube_api
    caplog.set_level(logging.WARNING, logger=operator.__name__)
    server.forbidden["writer-token"] = {Access(verb="patch", resource="events")}
    route = entry(route_body("alpha", "a.example"))
    for _ in range(3):
        await writer.post_event(route, "Normal", "Accepted", "valid")
    server.forbidden.clear()
    await writer.post_event(route, "Normal", "Accepted", "valid")
    assert [event["count"] for event in events(server, "alpha")] == [1, 1, 1, 1]
    assert caplog.text.count(FORBIDDEN) == 1
    assert "grant patch on events" in caplog.text
    assert "was refused" not in caplog.text


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
    assert [event["message"] for event in events(server, "alpha")] == [f"{n} of 5 ready" for n in range(3)]
    dropped = [
        record
        for record in caplog.records
        if "Event NoReadyEndpoints for mail/alpha dropped" in record.getMessage()
    ]
    assert [record.levelno for record in dropped] == [logging.DEBUG] * 2
    await writer.post_event(route, "Warning", "NoReadyEndpoints", "2 of 5 ready")
    assert events(server, "alpha")[-1]["count"] == 2, "a repeat is counted, within the budget or not"


@pytest.fixture
def controller_accesses(tmp_path: Path) -> AccessLog:
    """A record of this module's own: the session's (tests/kube's, which the chart RBAC test reads)
    is written whole from each instance of its fixture, so a second instance, here, would replace
    what tests/kube recorded, or lose this, depending on the order the modules run in."""
    return AccessLog(tmp_path / "controller-accesses.json")


def by_reason(server: Emulator, name: str) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for event in events(server, name, NAMESPACE):
        counts.setdefault(event["reason"], []).append(event["count"])
    return counts


async def test_an_endpoint_that_flaps_makes_no_event_per_flip(
    emulator: Emulator,  # noqa: F811
    api: Api,  # noqa: F811
    controller: Controller,  # noqa: F811
) -> None:
    """Review J4: twenty flaps of the only endpoint made forty Event objects. Now the two
    transitions are one Event each, counted."""
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller):
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "programmed")
        await eventually(lambda: by_reason(emulator, "example").get("ResolvedRefs") == [1], "first Events")
        path = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/dovecot-abc"
        flaps = 20
        for _ in range(flaps):
            for ready, reason in ((False, "NoReadyEndpoints"), (True, "ResolvedRefs")):
                await api.patch(
                    path, {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": ready}}]}
                )
                await eventually(
                    lambda: condition(emulator, "example", "ResolvedRefs").get("reason") == reason,  # noqa: B023
                    reason,
                )
        await eventually(
            lambda: sum(by_reason(emulator, "example").get("ResolvedRefs", [])) == flaps + 1,
            "every flip posted",
        )
        counts = by_reason(emulator, "example")
        assert counts["ResolvedRefs"] == [flaps + 1]
        assert counts["NoReadyEndpoints"] == [flaps]
