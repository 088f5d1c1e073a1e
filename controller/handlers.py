"""kopf glue, and the only module that imports kopf besides the process entry (controller.operator).

controller.operator calls ``register`` on a fresh kopf registry. The handlers stay thin (style
anchors 6.2): five indexes keep small views of MailRoutes (``mailroute.parse``), Services and
EndpointSlices (controller.endpoints), proxy Pods (Ready or not) and the Secrets auth_http
``headersFrom`` may read (``secret_values``); an ``on.event`` handler per kind only wakes the
reconciler, which reads the indexes afresh. Handlers that touch the
reconciler are ``async def``, so kopf runs them on its loop (the reconciler's asyncio events are
not thread-safe); the index handlers stay synchronous, in kopf's executor threads, so parsing
never blocks the loop. kopf runs resource handlers only once every index holds its initial
listing, so the first such call opens the reconciler's sync gate; a handler on the MailRoute CRD
itself guarantees one call even with no object at all.
Never writes to the API here (the reconciler does, through controller.operator.KubeApi), never
raises on a user's object: a broken MailRoute is a SpecError in the index, not a handler error.

A release serves the MailRoutes of some namespaces only (``Wiring.served``; controller.operator
says why and how they are chosen): kopf may watch more (the controller's own namespace, for the
proxy pods), and a ``when`` filter on the handlers of MailRoutes, Services, EndpointSlices and
Secrets drops every object of a namespace not served before it reaches an index, so such a route
is not compiled and gets no status from this release (as an Ingress of another class), and two
releases serving disjoint namespaces never write the same object.

No handler changes objects, so kopf adds no finalizer and no annotation to MailRoutes: deleting
one never waits for the controller. Proxy pods are watched with a server-side label selector and
field selector (the controller's namespace only). Secrets are watched in every watched namespace
(as the MailRoutes naming them) with the server-side label selector mailgress.io/auth-http=true (kopf's
``settings.watching.label_selectors``; a handler's ``labels=`` filter alone would be applied
client-side, after every Secret of those namespaces had been listed and watched), plus that same
filter on the handlers as a second guard; so no other Secret reaches the controller, and of a
labelled one only the header values are kept, never logged. A MailRoute is parsed once per (uid,
generation) (``ParseCache``): our own status writes come back as watch events with the spec
unchanged, and must not cost a jsonschema validation each.
"""

import asyncio
import base64
import binascii
import collections
import copy
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from controller import compiler, endpoints, mailroute, reconciler
from controller.metrics import ControllerMetrics

log = logging.getLogger(__name__)

GROUP, VERSION = mailroute.API_VERSION.split("/")
PLURAL = "mailroutes"
CRD_NAME = f"{PLURAL}.{GROUP}"
SLICES = ("discovery.k8s.io", "v1", "endpointslices")
SERVICES = ("v1", "services")
PODS = ("v1", "pods")
SECRETS = ("v1", "secrets")
SECRET_LABELS = {mailroute.AUTH_HTTP_LABEL: mailroute.AUTH_HTTP_LABEL_VALUE}
CRDS = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
# Index ids: kopf passes each index to every handler as a keyword argument of this name.
ROUTES_INDEX = "mailroute_index"
SERVICES_INDEX = "service_index"
SLICES_INDEX = "endpointslice_index"
PROXIES_INDEX = "proxy_index"
SECRETS_INDEX = "secret_index"
# Parsed MailRoutes kept for their next watch event: twice the 10,000 routes docs/convergence.md
# sizes the compiler for. Past it the route seen longest ago is parsed again on its next event,
# which costs time, never correctness.
MAX_PARSED_ROUTES = 20_000


@dataclass(frozen=True, slots=True)
class Wiring:
    """What the handlers are connected to (built by controller.operator.run)."""

    namespace: str  # the controller's namespace: proxy pods live here
    served: frozenset[str] | None  # namespaces whose MailRoutes this release serves; None: all
    proxy_labels: Mapping[str, str]
    login: Callable[[], kopf.ConnectionInfo]
    publisher: reconciler.Publisher
    cluster: reconciler.Cluster
    holdoff: float = reconciler.HOLDOFF_SECONDS
    metrics: ControllerMetrics | None = None  # compile timings, on the publisher's registry


class ParseCache:
    """``mailroute.parse`` by (uid, generation), for the MailRoute index.

    Sound because a parse reads only the spec, the generation (which the API server bumps on
    every spec change) and metadata fixed for the life of a uid (namespace, name,
    creationTimestamp). One entry per uid (a new generation replaces the old), the least
    recently seen dropped past ``limit``, and ``forget`` on delete. A body without a uid or a
    generation is parsed every time.
    """

    def __init__(self, limit: int = MAX_PARSED_ROUTES) -> None:
        self._limit = limit
        # The index handler parses in kopf's executor threads (one object's events at a time,
        # but different objects' at once); forget runs on kopf's loop.
        self._lock = threading.Lock()
        self._parsed: collections.OrderedDict[str, tuple[int, mailroute.MailRoute | mailroute.SpecError]] = (
            collections.OrderedDict()
        )

    def parse(self, body: Mapping[str, Any]) -> mailroute.MailRoute | mailroute.SpecError:
        """What ``mailroute.parse(body)`` returns, from the cache when this generation was seen."""
        metadata = body.get("metadata")
        uid = metadata.get("uid") if isinstance(metadata, Mapping) else None
        generation = metadata.get("generation") if isinstance(metadata, Mapping) else None
        if not isinstance(uid, str) or not uid or not isinstance(generation, int):
            return mailroute.parse(body)
        with self._lock:
            seen = self._parsed.get(uid)
            if seen is not None and seen[0] == generation:
                self._parsed.move_to_end(uid)
                return seen[1]
        parsed = mailroute.parse(body)  # outside the lock: this is the slow part
        with self._lock:
            self._parsed[uid] = (generation, parsed)
            self._parsed.move_to_end(uid)
            while len(self._parsed) > self._limit:
                self._parsed.popitem(last=False)
        return parsed

    def forget(self, uid: str) -> None:
        """The object is gone: drop its entry."""
        with self._lock:
            self._parsed.pop(uid, None)


def route_entry(body: Mapping[str, Any], parsed: ParseCache) -> reconciler.RouteEntry:
    """The MailRoute index's value for one object: parsed (cached), plus what writing its status
    needs (its status copied: kopf reuses the body)."""
    metadata = body.get("metadata", {})
    return reconciler.RouteEntry(
        route=parsed.parse(body),
        uid=str(metadata.get("uid", "")),
        resource_version=str(metadata.get("resourceVersion", "")),
        status=copy.deepcopy(dict(body.get("status") or {})),
    )


def _pod_ready(body: Mapping[str, Any]) -> bool:
    """A pod counts while its Ready condition is True and it is not being deleted."""
    if body.get("metadata", {}).get("deletionTimestamp"):
        return False
    found = body.get("status", {}).get("conditions") or []
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in found if isinstance(c, Mapping)
    )


def secret_values(body: Mapping[str, Any]) -> compiler.SecretValues:
    """The Secret index's value for one labelled Secret: each data key's value as a header value
    (``mailroute.header_value``), None where it is none (or not base64, which the API server
    never sends). Every key is kept, as a route may name it later, but a value only in the
    bounded form a header takes: a certificate or key stored beside it is reduced to None."""
    data = body.get("data")
    values: dict[str, str | None] = {}
    for key, encoded in (data if isinstance(data, Mapping) else {}).items():
        try:
            # RFC 4648 section 4, as the API carries every Secret value.
            raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
        except binascii.Error:
            raw = None
        values[str(key)] = None if raw is None else mailroute.header_value(raw)
    return values


def inputs(indices: Mapping[str, Mapping[Any, Iterable[Any]]]) -> reconciler.Inputs:
    """The reconciler's view of the five kopf indexes at this moment.

    kopf's ``Index`` maps each key to a ``Store`` of the values every object returned for it;
    the keys are the tuples and names the index functions below return.
    """
    services: dict[tuple[str, str], endpoints.Service] = {}
    for key, store in indices[SERVICES_INDEX].items():
        services[key] = next(iter(store))  # a Service's (namespace, name) is unique
    return reconciler.Inputs(
        routes=[entry for store in indices[ROUTES_INDEX].values() for entry in store],
        services=services,
        slices={key: list(store) for key, store in indices[SLICES_INDEX].items()},
        proxies={str(key): any(store) for key, store in indices[PROXIES_INDEX].items()},
        # A Secret's (namespace, name) is unique.
        secrets={key: next(iter(store)) for key, store in indices[SECRETS_INDEX].items()},
    )


def register(registry: kopf.OperatorRegistry, wiring: Wiring) -> None:
    """Define every handler of the operator on ``registry``."""
    state: dict[str, Any] = {}

    # kopf's ``when`` filter of the handlers of namespaced kinds a route may use.
    def served(namespace: str | None, **_: Any) -> bool:
        return wiring.served is None or namespace in wiring.served

    parsed = ParseCache()
    ignored_addresses = endpoints.IgnoredAddresses()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return wiring.login()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        labels = ",".join(f"{key}={value}" for key, value in sorted(wiring.proxy_labels.items()))
        settings.watching.label_selectors[PODS] = labels
        settings.watching.field_selectors[PODS] = f"metadata.namespace={wiring.namespace}"
        settings.watching.label_selectors[SECRETS] = ",".join(f"{k}={v}" for k, v in SECRET_LABELS.items())
        # Only our own handlers' problems are worth an Event; kopf's progress chatter is not.
        settings.posting.level = logging.WARNING
        names = (ROUTES_INDEX, SERVICES_INDEX, SLICES_INDEX, PROXIES_INDEX, SECRETS_INDEX)
        indices = {name: kwargs[name] for name in names}
        worker = reconciler.Reconciler(
            read=lambda: inputs(indices),
            publisher=wiring.publisher,
            cluster=wiring.cluster,
            holdoff=wiring.holdoff,
            metrics=wiring.metrics,
        )
        state["reconciler"] = worker
        state["task"] = asyncio.create_task(worker.run(), name="mailgress reconciler")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        task = state.pop("task", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @kopf.on.probe(id="table", registry=registry)
    def table_probe(**_: Any) -> str:
        worker = state.get("reconciler")
        current = None if worker is None else worker.table
        return "none yet" if current is None else current.version

    @kopf.index(GROUP, VERSION, PLURAL, id=ROUTES_INDEX, when=served, registry=registry)
    def mailroute_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): route_entry(body, parsed)}

    @kopf.index(*SERVICES, id=SERVICES_INDEX, when=served, registry=registry)
    def service_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        view = endpoints.service_view(body)
        return {} if view is None else {(view.namespace, view.name): view}

    @kopf.index(*SLICES, id=SLICES_INDEX, when=served, registry=registry)
    def endpointslice_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        view = endpoints.slice_view(body)
        if view is None:
            return {}
        # An address no proxy could dial is left out of the table (it would be refused whole);
        # the Service's owner learns why here, once per address, not on every slice event.
        for message in ignored_addresses.report(view):
            log.warning("%s", message)
        return {(view.namespace, view.service): view}

    @kopf.index(
        *PODS, id=PROXIES_INDEX, labels=dict(wiring.proxy_labels), field="metadata.namespace",
        value=wiring.namespace, registry=registry,
    )  # fmt: skip
    def proxy_index(body: kopf.Body, name: str, **_: Any) -> dict[Any, Any]:
        return {name: _pod_ready(body)}

    @kopf.index(*SECRETS, id=SECRETS_INDEX, labels=dict(SECRET_LABELS), when=served, registry=registry)
    def secret_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): secret_values(body)}

    # async: kopf runs a synchronous handler in its executor's threads, and the reconciler's
    # asyncio.Event may be set only from the loop it waits on (kopf's, where these run).
    async def wake(**_: Any) -> None:
        worker: reconciler.Reconciler = state["reconciler"]
        worker.mark_synced()
        worker.touch()

    @kopf.on.event(GROUP, VERSION, PLURAL, id="mailroute_changed", when=served, registry=registry)
    async def mailroute_changed(type: str | None, uid: str | None, **_: Any) -> None:
        # kopf drops a deleted object from the index without calling the index handler.
        if type == "DELETED" and uid:
            parsed.forget(uid)
        await wake()

    kopf.on.event(*SERVICES, id="service_changed", when=served, registry=registry)(wake)
    kopf.on.event(*SLICES, id="endpointslice_changed", when=served, registry=registry)(wake)
    kopf.on.event(
        *PODS, id="proxy_changed", labels=dict(wiring.proxy_labels), field="metadata.namespace",
        value=wiring.namespace, registry=registry,
    )(wake)  # fmt: skip
    # A new, changed or rotated value becomes a new table version; a Secret that loses the label
    # leaves the watch as a deletion (the API server's selector), which wakes it too.
    kopf.on.event(*SECRETS, id="secret_changed", labels=dict(SECRET_LABELS), when=served, registry=registry)(
        wake
    )
    kopf.on.event(*CRDS, id="crd_changed", field="metadata.name", value=CRD_NAME, registry=registry)(wake)
