"""The kopf glue's pure parts: proxy pod readiness, the reconciler's view of the indexes and the
MailRoute parse cache; and that the handlers waking the reconciler are ones kopf runs on its loop.
(The handlers themselves run under kopf in tests/kube/test_operator.py.)"""

import base64
import inspect
import logging
from typing import Any

import kopf
import pytest

from controller import endpoints, handlers, mailroute, reconciler
from tests.controller.test_endpoints import endpoint, endpoint_slice
from tests.controller.test_reconciler import FakeCluster, FakePublisher


@pytest.mark.parametrize(
    ("pod", "ready"),
    [
        pytest.param({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, True, id="ready"),
        pytest.param(
            {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, False, id="not-ready"
        ),
        pytest.param(
            {"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}, False, id="scheduled"
        ),
        pytest.param({"status": {}}, False, id="no-conditions"),
        pytest.param(
            {
                "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            },
            False,
            id="terminating",
        ),
    ],
)
def test_pod_ready(pod: dict[str, Any], ready: bool) -> None:
    assert handlers._pod_ready(pod) is ready


def test_inputs_flatten_the_index_stores() -> None:
    """kopf's Index maps each key to a store of values (each tagged with its object's uid); the
    reconciler wants plain mappings."""
    route = reconciler.RouteEntry(
        mailroute.parse({"metadata": {"namespace": "mail", "name": "r"}}),
        uid="u",
        resource_version="1",
        status={},
    )
    service = endpoints.Service("mail", "dovecot", ())
    piece = endpoints.Slice("mail", "dovecot", "a", (), ("10.0.0.1",), ())
    other = endpoints.Slice("mail", "dovecot", "b", (), ("10.0.0.2",), ())
    tagged = handlers.Indexed
    view = handlers.inputs(
        {
            handlers.ROUTES_INDEX: {("mail", "r"): [tagged("u", route)]},
            handlers.SERVICES_INDEX: {("mail", "dovecot"): [tagged("s", service)]},
            handlers.SLICES_INDEX: {("mail", "dovecot"): [tagged("a", piece), tagged("b", other)]},
            handlers.PROXIES_INDEX: {"proxy-a": [tagged("pa", True)], "proxy-b": [tagged("pb", False)]},
            handlers.SECRETS_INDEX: {("mail", "auth-key"): [tagged("k", {"key": "v"})]},
        },
        handlers.Sightings(),
    )
    assert view == reconciler.Inputs(
        routes=[route],
        services={("mail", "dovecot"): service},
        slices={("mail", "dovecot"): [piece, other]},
        proxies={"proxy-a": True, "proxy-b": False},
        secrets={("mail", "auth-key"): {"key": "v"}},
    )


SECRET_VALUE = "k3y-VALUE-Zq9"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_secret_values_are_the_header_values_of_every_key() -> None:
    """Decoded from the API's base64; a value that is no header value (a trailing newline, a
    certificate longer than any header) is kept as None, so the route names the key as invalid
    rather than missing, and nothing of it stays in memory."""
    body = {
        "metadata": {"namespace": "mail", "name": "auth-key", "labels": dict(handlers.SECRET_LABELS)},
        "data": {
            "key": b64(SECRET_VALUE.encode()),
            "empty": "",
            "newline": b64(SECRET_VALUE.encode() + b"\n"),
            "tls.crt": b64(b"-----BEGIN CERTIFICATE-----\n" + b"A" * 2000),
            "binary": b64(bytes(range(256))),
            "not-base64": "%%%",
            "not-a-string": 7,
        },
    }
    assert handlers.secret_values(body) == {
        "key": SECRET_VALUE,
        "empty": "",
        "newline": None,
        "tls.crt": None,
        "binary": None,
        "not-base64": None,
        "not-a-string": None,
    }
    assert handlers.secret_values({"metadata": {"name": "no-data"}}) == {}


def test_the_secret_index_holds_labelled_secrets_only() -> None:
    """Selected server-side (kopf's watching settings, set at startup) and filtered again by the
    index and its wake handler: an unlabelled Secret never reaches the index function."""
    registry = kopf.OperatorRegistry()
    registered(registry)
    [index] = [h for h in registry._indexing.get_all_handlers() if h.id == handlers.SECRETS_INDEX]
    [wake] = [h for h in registry._watching.get_all_handlers() if h.id == "secret_changed"]
    assert index.labels == wake.labels == {"mailgress.io/auth-http": "true"}
    body = {"metadata": {"namespace": "mail", "name": "auth-key", "uid": "k"}, "data": {"key": b64(b"v")}}
    assert index.fn(body=body, namespace="mail", name="auth-key") == {
        ("mail", "auth-key"): handlers.Indexed("k", {"key": "v"})
    }


def route_body(uid: str, *, generation: int = 1, service: str = "dovecot") -> dict[str, Any]:
    return {
        "apiVersion": mailroute.API_VERSION,
        "kind": mailroute.KIND,
        "metadata": {
            "namespace": "mail",
            "name": f"route-{uid}",
            "uid": uid,
            "generation": generation,
            "resourceVersion": "1",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"domains": ["example.com"], "imap": {"backend": {"service": service, "port": 143}}},
    }


def test_a_status_write_reuses_the_parse_of_its_generation() -> None:
    """Our own status write comes back with a new resourceVersion and status, the spec as it
    was: the entry is new, the parsed route the very same object (no jsonschema run)."""
    cache = handlers.ParseCache()
    first = handlers.route_entry(route_body("u1"), cache)
    written = route_body("u1")
    written["metadata"]["resourceVersion"] = "2"
    written["status"] = {"observedGeneration": 1}
    again = handlers.route_entry(written, cache)
    assert again.route is first.route
    assert (again.resource_version, again.status) == ("2", {"observedGeneration": 1})


def test_a_new_generation_is_parsed_again() -> None:
    cache = handlers.ParseCache()
    first = cache.parse(route_body("u1"))
    changed = cache.parse(route_body("u1", generation=2, service="dovecot2"))
    assert isinstance(changed, mailroute.MailRoute)
    assert changed.generation == 2
    assert dict(changed.protocols)["imap"].backend.service == "dovecot2"
    assert cache.parse(route_body("u1", generation=2, service="dovecot2")) is changed
    assert cache.parse(route_body("u1")) is not first  # one entry per uid: the newest


def test_invalid_routes_are_cached_as_their_error() -> None:
    cache = handlers.ParseCache()
    broken = route_body("u1")
    del broken["spec"]["imap"]
    error = cache.parse(broken)
    assert isinstance(error, mailroute.SpecError)
    assert cache.parse(broken) is error


def test_forget_and_the_bound_drop_entries() -> None:
    cache = handlers.ParseCache(limit=2)
    kept = {uid: cache.parse(route_body(uid)) for uid in ("u1", "u2")}
    assert cache.parse(route_body("u1")) is kept["u1"]  # u1 is now the most recently seen
    third = cache.parse(route_body("u3"))  # over the limit: u2 goes
    assert cache.parse(route_body("u1")) is kept["u1"]
    assert cache.parse(route_body("u3")) is third
    second = cache.parse(route_body("u2"))  # parsed again; u1, seen longest ago, goes
    assert second is not kept["u2"]
    assert second == kept["u2"]
    cache.forget("u3")
    assert cache.parse(route_body("u2")) is second
    assert cache.parse(route_body("u3")) is not third


def test_a_body_without_uid_or_generation_is_parsed_every_time() -> None:
    cache = handlers.ParseCache()
    for missing in ("uid", "generation"):
        body = route_body("u1")
        del body["metadata"][missing]
        assert cache.parse(body) is not cache.parse(body)
        assert cache.parse(body) == mailroute.parse(body)


def registered(registry: kopf.OperatorRegistry) -> None:
    handlers.register(
        registry,
        handlers.Wiring(
            namespace="mailgress-system",
            served=frozenset({"mail"}),
            proxy_labels={"app.kubernetes.io/name": "mailgress-proxy"},
            login=lambda: kopf.ConnectionInfo(server="http://127.0.0.1"),
            publisher=FakePublisher(),
            cluster=FakeCluster(),
        ),
    )


def test_an_ignored_slice_address_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The EndpointSlice index leaves out an address no proxy could dial and says so once, not on
    each of the slice's events. (``_indexing`` is where ``kopf.index`` puts its handlers.)"""
    registry = kopf.OperatorRegistry()
    registered(registry)
    [index] = [h for h in registry._indexing.get_all_handlers() if h.id == handlers.SLICES_INDEX]
    body = endpoint_slice(
        "dovecot-a",
        "dovecot",
        [{"name": "imap", "port": 10143}],
        [endpoint("010.0.0.7"), endpoint("10.0.0.1")],
    )
    with caplog.at_level(logging.WARNING, logger=handlers.log.name):
        for _ in range(3):  # three events of the same slice
            assert index.fn(body=body)[("mail", "dovecot")].value.ready == ("10.0.0.1",)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'010.0.0.7' ignored" in warnings[0]


def test_the_handlers_that_wake_the_reconciler_run_on_kopfs_loop() -> None:
    """kopf runs a synchronous handler in its executor's threads; every on.event handler sets the
    reconciler's asyncio.Event, which only the loop's own thread may do, so each is async and
    kopf awaits it on its loop. (kopf has no public view of a registry's handlers: ``_watching``
    is where ``kopf.on.event`` puts them.)"""
    registry = kopf.OperatorRegistry()
    registered(registry)
    watching = registry._watching.get_all_handlers()
    assert len(watching) == 6  # MailRoutes, Services, EndpointSlices, proxy Pods, Secrets, the CRD
    assert [handler.id for handler in watching if not inspect.iscoroutinefunction(handler.fn)] == []
