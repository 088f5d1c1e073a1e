"""Which namespaces' MailRoutes a release serves: the real kopf operator against the emulator.

The default controller of tests/kube/conftest.py serves NAMESPACE only, in a cluster that also
has the controller's own namespace (watched for the proxy pods, not served) and OTHER_NAMESPACE
(not even watched). A route outside the served namespaces gets no status and stays out of the
table; two releases serving disjoint namespaces each program their own routes and never write the
other's; a controller started with every namespace (--all-namespaces) serves them all. A name a
route serves stays with it: an older route of another namespace edited to claim it is refused,
also when the edit lands while the controller is away.
"""

import copy
import dataclasses

from controller import operator
from proxy import table
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    MAILROUTES,
    NAMESPACE,
    OTHER_NAMESPACE,
    AccessLog,
    Api,
    ControllerRunner,
    FakeProxy,
    chart_snapshot_secret,
    condition,
    create_backend,
    create_crd,
    create_route,
    eventually,
    imap_route,
    proxy_pod,
    route_path,
    service_body,
    slice_body,
    snapshot_of,
    status_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, route_names

# Release B: its own proxies (selected by their own label) and snapshot Secret, in the same
# controller namespace as release A; it serves OTHER_NAMESPACE only.
B_LABELS = {"app.kubernetes.io/instance": "release-b"}
B_PROXY = "proxy-b-0"
B_SNAPSHOT = "release-b-routing-table"


def programmed(emulator: Emulator, name: str, namespace: str) -> bool:
    found = condition(emulator, name, "Programmed", namespace)
    return (found.get("status"), found.get("reason")) == ("True", "Programmed")


def resource_version(emulator: Emulator, name: str, namespace: str) -> str:
    return str(emulator.objects[MAILROUTES, namespace, name].raw["metadata"]["resourceVersion"])


async def test_a_route_outside_the_served_namespaces_gets_no_status_and_no_place_in_the_table(
    emulator: Emulator, api: Api, controller_runner: ControllerRunner
) -> None:
    """The review's hijack: a route of another namespace claims a user of a served domain. The
    controller's own namespace is watched (kopf sees its objects) but not served; OTHER_NAMESPACE
    is not watched at all. Both exist before the start, so the first table already saw them."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    for namespace in (CONTROLLER_NAMESPACE, OTHER_NAMESPACE):
        route = imap_route("hijack", "example.com")
        route["metadata"]["namespace"] = namespace
        route["spec"] = {"users": ["ceo@example.com"], "imap": route["spec"]["imap"]}
        await create_route(api, route)
    await create_route(api, imap_route("example", "example.com"))
    controller = await controller_runner.start()
    async with fake_proxies(controller) as proxies:
        await eventually(lambda: programmed(emulator, "example", NAMESPACE), "Programmed")
        for proxy in proxies:
            assert route_names(proxy.latest) == [f"{NAMESPACE}/example"]
    assert status_of(emulator, "hijack", CONTROLLER_NAMESPACE) == {}
    assert status_of(emulator, "hijack", OTHER_NAMESPACE) == {}


async def test_two_releases_with_disjoint_namespaces_do_not_write_each_others_routes(
    emulator: Emulator,
    api: Api,
    controller_runner: ControllerRunner,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    """The review's two releases, now each with its own namespaces: release B's controller starts
    after A's route is programmed, programs its own route, is made to compile again, and A's
    route was never written meanwhile (before, the two overwrote each other's status for ever)."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    b_pod = proxy_pod(B_PROXY)
    b_pod["metadata"]["labels"] = dict(B_LABELS)
    await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", b_pod)
    b_route = imap_route("example", "example.org")
    b_route["metadata"]["namespace"] = OTHER_NAMESPACE
    await create_route(api, b_route)
    settings_b = dataclasses.replace(
        controller_settings,
        proxy_selector=B_LABELS,
        snapshot_secret=B_SNAPSHOT,
        watch_namespaces=frozenset({OTHER_NAMESPACE}),
    )
    # Release B's chart renders its own (empty) snapshot Secret.
    b_secret = copy.deepcopy(chart_snapshot_secret())
    b_secret["metadata"]["name"] = B_SNAPSHOT
    await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/secrets", b_secret)
    runner_b = ControllerRunner(emulator, settings_b, controller_accesses, chart_secret=False)
    controller_a = await controller_runner.start()
    async with fake_proxies(controller_a) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: programmed(emulator, "example", NAMESPACE), "A's route Programmed")
        before = status_of(emulator, "example", NAMESPACE)
        version_before = resource_version(emulator, "example", NAMESPACE)
        assert status_of(emulator, "example", OTHER_NAMESPACE) == {}, "A wrote B's route"
        controller_b = await runner_b.start()
        try:
            async with FakeProxy(B_PROXY, controller_b.port) as proxy_b:
                await eventually(lambda: programmed(emulator, "example", OTHER_NAMESPACE), "B's route")
                assert route_names(proxy_b.latest) == [f"{OTHER_NAMESPACE}/example"]
                assert condition(emulator, "example", "Programmed", OTHER_NAMESPACE)["message"] == (
                    "1 of 1 proxies"
                )
                # B compiles again (a new generation of its route) and writes that status too.
                path = f"/apis/mailgress.io/v1alpha1/namespaces/{OTHER_NAMESPACE}/mailroutes/example"
                await api.patch(path, {"spec": {"domains": ["example.net"]}})
                await eventually(
                    lambda: (
                        status_of(emulator, "example", OTHER_NAMESPACE).get("observedGeneration") == 2
                        and programmed(emulator, "example", OTHER_NAMESPACE)
                    ),
                    "B's second generation Programmed",
                )
        finally:
            await runner_b.stop()
        for proxy in proxies:
            assert route_names(proxy.latest) == [f"{NAMESPACE}/example"]
    assert resource_version(emulator, "example", NAMESPACE) == version_before
    assert status_of(emulator, "example", NAMESPACE) == before
    assert condition(emulator, "example", "Programmed", NAMESPACE)["message"] == "2 of 2 proxies"


async def mail_and_collector_backends(api: Api) -> None:
    """The CRD, the proxy Pods, mail's dovecot and team-x's own backend, collector."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await api.create(
        f"/api/v1/namespaces/{OTHER_NAMESPACE}/services", service_body("collector", OTHER_NAMESPACE)
    )
    await api.create(
        f"/apis/discovery.k8s.io/v1/namespaces/{OTHER_NAMESPACE}/endpointslices",
        slice_body("collector", ["10.9.9.9"], namespace=OTHER_NAMESPACE),
    )


async def test_a_controller_of_every_namespace_serves_them_all(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    """--all-namespaces: kopf runs cluster-wide and every namespace's routes are served."""
    await create_crd(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    other = imap_route("other", "example.org")
    other["metadata"]["namespace"] = OTHER_NAMESPACE
    await create_route(api, other)
    await create_route(api, imap_route("example", "example.com"))
    every = dataclasses.replace(controller_settings, watch_namespaces=None)
    runner = ControllerRunner(emulator, every, controller_accesses)
    try:
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await eventually(lambda: programmed(emulator, "example", NAMESPACE), "mail's route Programmed")
            await eventually(lambda: programmed(emulator, "other", OTHER_NAMESPACE), "team-x's route")
            for proxy in proxies:
                assert route_names(proxy.latest) == [f"{NAMESPACE}/example", f"{OTHER_NAMESPACE}/other"]
    finally:
        await runner.stop()
    # team-x has no Service dovecot: the route is served, its backend is not found there.
    assert condition(emulator, "other", "ResolvedRefs", OTHER_NAMESPACE)["reason"] == "BackendNotFound"


async def test_a_newer_wildcard_of_another_namespace_does_not_take_a_served_domain(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    """The review's HIGH finding through the real operator: mail's route for alpha.example is
    programmed, then team-x creates *.example. team-x's route is refused naming mail's, and the
    proxies keep sending ceo@alpha.example to mail (before, mail's route flipped to Conflicted
    and team-x's backend got the logins)."""
    await mail_and_collector_backends(api)
    await create_route(api, imap_route("alpha", "alpha.example"))
    both = dataclasses.replace(controller_settings, watch_namespaces=frozenset({NAMESPACE, OTHER_NAMESPACE}))
    runner = ControllerRunner(emulator, both, controller_accesses)
    try:
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await eventually(lambda: programmed(emulator, "alpha", NAMESPACE), "mail's route Programmed")
            grab = imap_route("grab", "*.example", service="collector")
            grab["metadata"]["namespace"] = OTHER_NAMESPACE
            await create_route(api, grab)
            await eventually(
                lambda: (
                    condition(emulator, "grab", "Accepted", OTHER_NAMESPACE).get("reason") == "Conflicted"
                ),
                "team-x's wildcard Conflicted",
            )
            message = condition(emulator, "grab", "Accepted", OTHER_NAMESPACE)["message"]
            assert f'covers the domain "alpha.example", which {NAMESPACE}/alpha routes' in message
            assert programmed(emulator, "alpha", NAMESPACE)
            for proxy in proxies:
                assert route_names(proxy.latest) == [f"{NAMESPACE}/alpha"]
                owner = table.lookup(proxy.latest, "imap", "ceo@alpha.example")
                assert owner is not None and owner.name == f"{NAMESPACE}/alpha"
    finally:
        await runner.stop()


# A name a route serves stays with it (review S3's HIGH finding). mail's route is created first,
# so it is the older one whatever the clock says (equal creationTimestamps, of second precision,
# go by namespace/name, and "mail/" comes first): age alone would give it the name.
GRAB_DOMAINS = ["misc.example", "*.example"]


async def two_tenants(api: Api, controller_settings: operator.Settings) -> operator.Settings:
    """mail's harmless route (misc.example), then team-x's alpha.example with its own backend;
    the settings of a release serving both namespaces."""
    await mail_and_collector_backends(api)
    await create_route(api, imap_route("misc", "misc.example"))
    alpha = imap_route("alpha", "alpha.example", service="collector")
    alpha["metadata"]["namespace"] = OTHER_NAMESPACE
    await create_route(api, alpha)
    return dataclasses.replace(controller_settings, watch_namespaces=frozenset({NAMESPACE, OTHER_NAMESPACE}))


def without_the_first_misc(proxies: list[FakeProxy]) -> bool:
    """Every proxy runs a table made after the edit: mail/misc at generation 2, or not at all."""
    return all(
        proxy.latest is not None
        and not any(
            route.name == f"{NAMESPACE}/misc" and route.generation == 1 for route in proxy.latest.routes
        )
        for proxy in proxies
    )


async def assert_alpha_kept(emulator: Emulator, proxies: list[FakeProxy]) -> None:
    await eventually(lambda: without_the_first_misc(proxies), "the edited route compiled")
    for proxy in proxies:
        assert proxy.latest is not None
        assert route_names(proxy.latest) == [f"{OTHER_NAMESPACE}/alpha"]
        owner = table.lookup(proxy.latest, "imap", "ceo@alpha.example")
        assert owner is not None and owner.name == f"{OTHER_NAMESPACE}/alpha"
    await eventually(
        lambda: condition(emulator, "misc", "Accepted").get("observedGeneration") == 2, "misc's status"
    )
    accepted = condition(emulator, "misc", "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "Conflicted")
    assert accepted["message"] == (
        f'domain "*.example" covers the domain "alpha.example", which {OTHER_NAMESPACE}/alpha routes '
        "(already serving it) in another namespace; this route is not used"
    )
    assert programmed(emulator, "alpha", OTHER_NAMESPACE)


async def both_programmed(emulator: Emulator) -> None:
    await eventually(lambda: programmed(emulator, "alpha", OTHER_NAMESPACE), "team-x's route Programmed")
    await eventually(lambda: programmed(emulator, "misc", NAMESPACE), "mail's route Programmed")


async def test_an_older_route_edited_to_claim_a_served_domain_does_not_take_it(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    """mail's older route, edited to claim *.example as well, is refused; team-x's route keeps
    serving alpha.example (before, it turned Conflicted and mail's backend got its logins)."""
    both = await two_tenants(api, controller_settings)
    runner = ControllerRunner(emulator, both, controller_accesses)
    try:
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await both_programmed(emulator)
            await api.patch(route_path("misc"), {"spec": {"domains": GRAB_DOMAINS}})
            await assert_alpha_kept(emulator, proxies)
    finally:
        await runner.stop()


async def test_a_restarted_controller_keeps_a_served_domain_with_its_route(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    """The edit lands while the controller is away: the new one reads who serves what from the
    snapshot Secret it starts from."""
    both = await two_tenants(api, controller_settings)
    runner = ControllerRunner(emulator, both, controller_accesses)
    try:
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await both_programmed(emulator)
            served = proxies[0].latest.version if proxies[0].latest else ""
            await eventually(
                lambda: table.from_json(snapshot_of(emulator) or "").version == served, "snapshot"
            )
        await runner.stop()
        await api.patch(route_path("misc"), {"spec": {"domains": GRAB_DOMAINS}})
        controller = await runner.start()
        async with fake_proxies(controller) as proxies:
            await assert_alpha_kept(emulator, proxies)
    finally:
        await runner.stop()
