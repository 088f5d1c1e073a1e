"""The real kopf operator (controller.operator.run) against the emulator, with proxies acking on
the real push channel: MailRoute status, the published table, the snapshot Secret (what happens
when the API refuses it or it is missing, a restart from it, and the ConfigMap an earlier release
left), Events."""

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller import metrics, operator, publisher, reconciler
from proxy import table
from tests.kube.conftest import (
    CONFIGMAPS,
    CONTROLLER_NAMESPACE,
    CONTROLLER_TOKEN,
    MAILROUTES,
    NAMESPACE,
    POLL_SECONDS,
    SNAPSHOT_NAME,
    WAIT_SECONDS,
    AccessLog,
    Api,
    Controller,
    ControllerRunner,
    FakeProxy,
    condition,
    create_backend,
    create_crd,
    create_route,
    create_snapshot_secret,
    eventually,
    imap_route,
    mailroute_body,
    proxy_pod,
    route_events,
    route_path,
    snapshot_of,
    status_of,
)
from tests.kube.emulator import Access, Emulator

PROXIES = ("proxy-a", "proxy-b")


async def create_proxy_pods(api: Api, names: tuple[str, ...] = PROXIES) -> None:
    for name in names:
        await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", proxy_pod(name))


@contextlib.asynccontextmanager
async def fake_proxies(
    controller: Controller, *, rejecting: tuple[str, ...] = ()
) -> AsyncIterator[list[FakeProxy]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(FakeProxy(name, controller.port, reject=name in rejecting))
            for name in PROXIES
        ]


@contextlib.asynccontextmanager
async def resyncing_proxies(
    emulator: Emulator, api: Api, settings: operator.Settings, accesses: AccessLog, *, resync: float
) -> AsyncIterator[list[FakeProxy]]:
    """The controller with the MailRoute CRD, LISTing every ``resync`` seconds (handlers' resync),
    the proxy pods, the dovecot backend at 10.0.0.1, and the fake proxies it pushes to."""
    await create_crd(api)
    runner = ControllerRunner(emulator, settings, accesses, resync=resync)
    try:
        controller = await runner.start()
        await create_proxy_pods(api)
        await create_backend(api, "dovecot", ["10.0.0.1"])
        async with fake_proxies(controller) as proxies:
            yield proxies
    finally:
        await runner.stop()


def is_(emulator: Emulator, name: str, kind: str, status: str, reason: str) -> bool:
    found = condition(emulator, name, kind)
    return (found.get("status"), found.get("reason")) == (status, reason)


def event_reasons(emulator: Emulator, name: str) -> list[str]:
    return sorted(event["reason"] for event in route_events(emulator, name))


def event_counts(emulator: Emulator, name: str) -> dict[str, list[int]]:
    """The counts of the Events about MailRoute ``name``, oldest first, by reason."""
    counts: dict[str, list[int]] = {}
    for event in route_events(emulator, name):
        counts.setdefault(event["reason"], []).append(event["count"])
    return counts


def route_names(current: table.RoutingTable | None) -> list[str]:
    return [] if current is None else [route.name for route in current.routes]


async def test_route_becomes_accepted_resolved_and_programmed(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1", "10.0.0.2"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        assert condition(emulator, "example", "Programmed")["message"] == "2 of 2 proxies"
        assert is_(emulator, "example", "Accepted", "True", "Accepted")
        assert is_(emulator, "example", "ResolvedRefs", "True", "ResolvedRefs")
        status = status_of(emulator, "example")
        assert status["observedGeneration"] == 1
        # No changing handler: kopf put no finalizer (deleting never waits for the controller)
        # and no annotation on the object.
        metadata = emulator.objects[MAILROUTES, NAMESPACE, "example"].raw["metadata"]
        assert "finalizers" not in metadata
        assert "annotations" not in metadata
        assert all(item["observedGeneration"] == 1 for item in status["conditions"])
        assert status["protocols"] == "imap"
        assert status["endpoints"] == {"imap": 2}
        for proxy in proxies:
            assert proxy.latest is not None
            assert route_names(proxy.latest) == ["mail/example"]
            assert status["proxies"] == {"programmed": 2, "total": 2, "version": proxy.latest.version}
            (upstream,) = [u for _, u in proxy.latest.routes[0].upstreams]
            assert [str(e) for e in upstream.endpoints] == ["10.0.0.1:10143", "10.0.0.2:10143"]
        await eventually(lambda: len(event_reasons(emulator, "example")) == 3, "three Events")
        assert event_reasons(emulator, "example") == ["Accepted", "Programmed", "ResolvedRefs"]


async def test_another_route_writes_nothing_on_a_programmed_one(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    """status.proxies names the route's own first table, not the latest: a second route,
    published and acked everywhere, leaves the first route's object as it was. The latest
    version is in the snapshot Secret."""
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        stored = emulator.objects[MAILROUTES, NAMESPACE, "example"].raw
        resource_version, status = stored["metadata"]["resourceVersion"], copy.deepcopy(stored["status"])
        first = status["proxies"]["version"]
        assert status["proxies"] == {"programmed": 2, "total": 2, "version": first}

        await create_route(api, imap_route("other", "example.org"))
        await eventually(
            lambda: all(route_names(proxy.latest) == ["mail/example", "mail/other"] for proxy in proxies),
            "both routes on every proxy",
        )
        latest = proxies[0].latest
        assert latest is not None and latest.version != first
        expected = {"programmed": 2, "total": 2, "version": latest.version}
        await eventually(lambda: status_of(emulator, "other").get("proxies") == expected, "other on both")
        stored = emulator.objects[MAILROUTES, NAMESPACE, "example"].raw
        assert (stored["metadata"]["resourceVersion"], stored["status"]) == (resource_version, status)
        assert table.from_json(snapshot_of(emulator) or "").version == latest.version


async def test_nothing_is_published_before_the_initial_listing(
    emulator: Emulator, api: Api, controller_runner: ControllerRunner
) -> None:
    """Routes that exist when the controller starts are all in the very first table."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    names = ["first", "second", "third"]
    for index, name in enumerate(names):
        await create_route(api, imap_route(name, f"d{index}.example"))
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(lambda: all(proxy.tables for proxy in proxies), "a first table")
        for proxy in proxies:
            assert route_names(proxy.tables[0]) == [f"mail/{name}" for name in sorted(names)]
        await eventually(
            lambda: all(is_(emulator, name, "Programmed", "True", "Programmed") for name in names),
            "all Programmed",
        )


async def test_conflicting_route_names_the_winner(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("alpha", "example.com"))
        await eventually(
            lambda: is_(emulator, "alpha", "Programmed", "True", "Programmed"), "alpha Programmed"
        )
        await create_route(api, imap_route("beta", "example.com"))
        await eventually(lambda: is_(emulator, "beta", "Accepted", "False", "Conflicted"), "beta Conflicted")
        assert "mail/alpha" in condition(emulator, "beta", "Accepted")["message"]
        assert is_(emulator, "beta", "Programmed", "False", "Invalid")
        assert is_(emulator, "alpha", "Accepted", "True", "Accepted")
        assert all(route_names(proxy.latest) == ["mail/alpha"] for proxy in proxies)
        await eventually(lambda: "Conflicted" in event_reasons(emulator, "beta"), "a Conflicted Event")


async def test_invalid_route_is_not_accepted(emulator: Emulator, api: Api, controller: Controller) -> None:
    """The emulator enforces no schema, so the controller's own validation has to catch it."""
    await create_route(api, mailroute_body("broken", {"domains": ["example.com"]}))
    await eventually(lambda: is_(emulator, "broken", "Accepted", "False", "Invalid"), "Invalid")
    assert (
        "at least one of imap, pop3, submission or smtp"
        in condition(emulator, "broken", "Accepted")["message"]
    )
    assert "protocols" not in status_of(emulator, "broken")


async def test_service_without_ready_endpoints(emulator: Emulator, api: Api, controller: Controller) -> None:
    await create_backend(api, "dovecot", ["10.0.0.1"], ready=False)
    await create_route(api, imap_route("example", "example.com"))
    await eventually(
        lambda: is_(emulator, "example", "ResolvedRefs", "False", "NoReadyEndpoints"), "NoReadyEndpoints"
    )
    assert status_of(emulator, "example")["endpoints"] == {"imap": 0}
    await create_route(api, imap_route("elsewhere", "example.org", service="missing"))
    await eventually(
        lambda: is_(emulator, "elsewhere", "ResolvedRefs", "False", "BackendNotFound"), "BackendNotFound"
    )


async def test_spec_change_and_deletion_reach_the_proxies_and_the_snapshot(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await create_backend(api, "dovecot2", ["10.0.0.2"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("keep", "example.org"))
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")

        await api.patch(route_path("example"), {"spec": {"imap": {"backend": {"service": "dovecot2"}}}})
        await eventually(
            lambda: (
                condition(emulator, "example", "Programmed").get("observedGeneration") == 2
                and is_(emulator, "example", "Programmed", "True", "Programmed")
            ),
            "generation 2 Programmed",
        )
        for proxy in proxies:
            assert proxy.latest is not None
            route = table.lookup(proxy.latest, "imap", "user@example.com")
            assert route is not None
            assert (route.generation, route.upstream("imap").service) == (2, "mail/dovecot2")  # type: ignore[union-attr]
        snapshot = snapshot_of(emulator)
        assert snapshot is not None
        assert table.from_json(snapshot) == proxies[0].latest

        await api.delete(route_path("example"))
        await eventually(
            lambda: all(route_names(p.latest) == ["mail/keep"] for p in proxies), "route withdrawn"
        )
        await eventually(
            lambda: table.from_json(snapshot_of(emulator) or "") == proxies[0].latest, "snapshot"
        )


async def snapshot_api_errors(controller: Controller) -> float:
    """mailgress_controller_snapshot_failures_total{reason="api_error"} as /metrics serves it."""
    url = f"http://127.0.0.1:{controller.port}{publisher.METRICS_PATH}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mailgress_controller_snapshot_failures_total" and sample.labels == {
                "reason": metrics.SNAPSHOT_API_ERROR
            }:
                return sample.value
    raise AssertionError("the controller serves no snapshot failure counter")


async def test_a_refused_snapshot_stops_no_status_and_is_written_once_allowed(
    emulator: Emulator,
    api: Api,
    controller_runner: ControllerRunner,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller may not write its snapshot Secret (RBAC missing: 403): the proxies get
    the table and the route is Programmed all the same; the refusals are counted on /metrics and
    logged once; once allowed, a retry writes the snapshot."""
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0.2)  # read by the operator's thread too
    caplog.set_level(logging.ERROR, logger=reconciler.__name__)
    emulator.forbidden[CONTROLLER_TOKEN] = {
        Access(verb="create", resource="secrets"),
        Access(verb="patch", resource="secrets"),
    }
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        assert snapshot_of(emulator) is None
        assert await snapshot_api_errors(controller) >= 1
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
            if await snapshot_api_errors(controller) >= 3:
                break
            await asyncio.sleep(POLL_SECONDS)
        else:
            raise AssertionError("the snapshot write was not tried again")
        assert caplog.text.count("cannot write the routing table snapshot Secret") == 1
        assert "HTTP 403" in caplog.text

        emulator.forbidden.clear()
        await eventually(lambda: snapshot_of(emulator), "the snapshot written")
        assert table.from_json(snapshot_of(emulator) or "") == proxies[0].latest


async def test_a_missing_snapshot_secret_it_may_not_create_is_named_once_and_used_once_there(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No snapshot Secret (deleted, or an install without the chart) and the controller may not
    create Secrets, as under the chart's Role: routing and status go on, the log says once which
    Secret to create, and once it exists, as the chart renders it, a retry fills it."""
    monkeypatch.setattr(reconciler, "RETRY_SECONDS", 0.2)  # read by the operator's thread too
    caplog.set_level(logging.ERROR, logger=reconciler.__name__)
    emulator.forbidden[CONTROLLER_TOKEN] = {Access(verb="create", resource="secrets")}
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    runner = ControllerRunner(emulator, controller_settings, controller_accesses, chart_secret=False)
    try:
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await create_route(api, imap_route("example", "example.com"))
            await eventually(
                lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed"
            )
            for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
                if await snapshot_api_errors(controller) >= 3:
                    break
                await asyncio.sleep(POLL_SECONDS)
            else:
                raise AssertionError("the snapshot write was not tried again")
            assert snapshot_of(emulator) is None
            assert caplog.text.count("cannot write the routing table snapshot Secret") == 1
            assert caplog.text.count(f"create the Secret {SNAPSHOT_NAME} or grant create") == 1

            await create_snapshot_secret(api)
            await eventually(lambda: snapshot_of(emulator), "the snapshot written")
            assert table.from_json(snapshot_of(emulator) or "") == proxies[0].latest
    finally:
        await runner.stop()
    assert Access(verb="create", resource="secrets") in emulator.accesses(CONTROLLER_TOKEN)


async def test_rejected_table_keeps_programmed_pending_and_others_conditions(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller, rejecting=("proxy-b",)):
        await create_route(api, imap_route("example", "example.com"))
        await eventually(
            lambda: "rejected" in condition(emulator, "example", "Programmed").get("message", ""), "rejection"
        )
        programmed = condition(emulator, "example", "Programmed")
        assert (programmed["status"], programmed["reason"]) == ("Unknown", "Pending")
        assert programmed["message"].startswith("1 of 2 proxies; proxy-b rejected table sha256:")

        # Someone else's condition, written the way any client writes status.
        foreign = {
            "type": "example.com/Audited",
            "status": "True",
            "reason": "Reviewed",
            "message": "by the mail team",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        conditions = [*status_of(emulator, "example")["conditions"], foreign]
        await api.patch(route_path("example") + "/status", {"status": {"conditions": conditions}})
        # proxy-b stops being ready: every ready proxy now runs the route.
        await api.patch(
            f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods/proxy-b/status",
            {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        )
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        assert condition(emulator, "example", "Programmed")["message"] == "1 of 1 proxies"
        assert condition(emulator, "example", "example.com/Audited") == foreign


async def test_an_endpoint_that_flaps_makes_no_event_per_flip(
    emulator: Emulator,
    api: Api,
    controller: Controller,
) -> None:
    """Review J4: twenty flaps of the only endpoint made forty Event objects. Now the two
    transitions are one Event each, counted (and the controller patches Events: the chart's RBAC
    test reads that from this run)."""
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller):
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "programmed")
        await eventually(lambda: event_counts(emulator, "example").get("ResolvedRefs") == [1], "first Events")
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
            lambda: sum(event_counts(emulator, "example").get("ResolvedRefs", [])) == flaps + 1,
            "every flip posted",
        )
        counts = event_counts(emulator, "example")
        assert counts["ResolvedRefs"] == [flaps + 1]
        assert counts["NoReadyEndpoints"] == [flaps]


async def test_controller_accesses_are_recorded(
    emulator: Emulator, api: Api, controller_runner: ControllerRunner, controller_accesses: AccessLog
) -> None:
    """The session's access log names what the controller needs RBAC for."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    controller = await controller_runner.start()
    async with fake_proxies(controller):
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        await eventually(lambda: len(event_reasons(emulator, "example")) == 3, "three Events")
    await controller_runner.stop()
    recorded = controller_accesses.load()
    for needed in (
        {"verb": "watch", "group": "mailgress.io", "resource": "mailroutes"},
        {"verb": "patch", "group": "mailgress.io", "resource": "mailroutes", "subresource": "status"},
        {"verb": "list", "resource": "pods"},
        {"verb": "watch", "group": "discovery.k8s.io", "resource": "endpointslices"},
        {"verb": "watch", "resource": "services"},
        {"verb": "create", "resource": "events"},
        {"verb": "get", "resource": "secrets"},
        {"verb": "patch", "resource": "secrets"},
        {"verb": "watch", "group": "apiextensions.k8s.io", "resource": "customresourcedefinitions"},
    ):
        assert needed in recorded, f"{needed} not recorded"
    # The chart renders the snapshot Secret: the controller never needs to create one.
    assert {"verb": "create", "resource": "secrets"} not in recorded
    assert not any(entry.get("verb") in ("update", "delete", "deletecollection") for entry in recorded)


async def test_a_restarted_operator_writes_no_status_for_unchanged_routes(
    emulator: Emulator, api: Api, controller_runner: ControllerRunner
) -> None:
    """A rollout: the operator stops and a new one starts from the snapshot Secret. The route
    that did not change keeps its object untouched (its status still names the first table, not
    the one the new operator publishes); the route changed meanwhile is written, and Programmed
    as soon as the proxies, reconnected, run it."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("kept", "example.com"))
        await eventually(lambda: is_(emulator, "kept", "Programmed", "True", "Programmed"), "kept Programmed")
        await create_route(api, imap_route("moved", "example.org"))
        await eventually(
            lambda: all(route_names(proxy.latest) == ["mail/kept", "mail/moved"] for proxy in proxies),
            "both routes on every proxy",
        )
        second = proxies[0].latest.version if proxies[0].latest else ""
        await eventually(
            lambda: status_of(emulator, "moved").get("proxies", {}).get("programmed") == 2, "moved on both"
        )
        await eventually(lambda: table.from_json(snapshot_of(emulator) or "").version == second, "snapshot")
    await controller_runner.stop()

    await api.patch(route_path("moved"), {"spec": {"domains": ["example.net"]}})
    stored = emulator.objects[MAILROUTES, NAMESPACE, "kept"].raw
    resource_version, status = stored["metadata"]["resourceVersion"], copy.deepcopy(stored["status"])
    assert status["proxies"]["version"] != second

    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(
            lambda: (
                condition(emulator, "moved", "Programmed").get("observedGeneration") == 2
                and is_(emulator, "moved", "Programmed", "True", "Programmed")
            ),
            "moved Programmed again",
        )
        third = proxies[0].latest.version if proxies[0].latest else ""
        assert third not in ("", second)
        assert status_of(emulator, "moved")["proxies"] == {"programmed": 2, "total": 2, "version": third}
        stored = emulator.objects[MAILROUTES, NAMESPACE, "kept"].raw
        assert (stored["metadata"]["resourceVersion"], stored["status"]) == (resource_version, status)


async def test_the_configmap_snapshot_of_an_earlier_release_is_left_alone(
    emulator: Emulator,
    api: Api,
    controller_runner: ControllerRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upgrade: the ConfigMap an earlier release kept the snapshot in is neither read nor
    touched (the controller asks for no ConfigMap at all); the first start restores nothing, and
    the snapshot goes to the Secret of the same name."""
    caplog.set_level(logging.INFO, logger=reconciler.__name__)
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await api.create(
        f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/configmaps",
        {"metadata": {"name": SNAPSHOT_NAME}, "data": {reconciler.SNAPSHOT_KEY: "{}"}},
    )
    old = copy.deepcopy(emulator.objects[CONFIGMAPS, CONTROLLER_NAMESPACE, SNAPSHOT_NAME].raw)
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        await eventually(lambda: snapshot_of(emulator), "the snapshot Secret written")
        assert table.from_json(snapshot_of(emulator) or "") == proxies[0].latest
    await controller_runner.stop()
    assert "no routing table snapshot yet (no Secret, or an empty one): starting without one" in caplog.text
    assert emulator.objects[CONFIGMAPS, CONTROLLER_NAMESPACE, SNAPSHOT_NAME].raw == old
    assert not [access for access in emulator.accesses(CONTROLLER_TOKEN) if access.resource == "configmaps"]
