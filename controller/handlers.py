"""kopf glue, and the only module that imports kopf besides the process entry (controller.operator).

controller.operator calls ``register`` on a fresh kopf registry. The handlers stay thin (style
anchors 6.2): five indexes keep small views of MailRoutes (``mailroute.parse``), Services and
EndpointSlices (controller.endpoints), proxy Pods (Ready or not) and the Secrets auth_http
``headersFrom`` may read (``secret_values``); an ``on.event`` handler per kind only wakes the
reconciler, which reads the indexes afresh. Handlers that touch the
reconciler are ``async def``, so kopf runs them on its loop (the reconciler's asyncio events are
not thread-safe); the index handlers stay synchronous, in kopf's executor threads, so parsing
never blocks the loop. kopf runs resource handlers only once every index holds its initial
listing, so the first such call lets ``RouteGate`` open the reconciler's sync gate once the
MailRoutes, Services, EndpointSlices and labelled Secrets the API lists are all indexed (kopf may
not watch a kind at all: see there); a handler on the MailRoute CRD itself guarantees one call
even with no object at all, and its later events (kopf then scans API discovery again) one more.
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

Watch gaps: when a watch resumes with a resourceVersion the API server no longer has (410 Gone),
kopf lists the kind again and indexes what the listing holds, but never drops the values of
objects the listing lacks: a deletion made during the gap would be served until a restart, and
an object created again under the same name leaves both values in its store. So every index
value carries its object's uid (``Indexed``), ``Sightings`` notes when each uid was first and
last indexed, and ``Resync`` LISTs each indexed kind (uids only, the selectors of kopf's watches)
every ``Wiring.resync`` seconds and soon after a re-list shows; a uid last indexed before such a
LIST started and absent from it is gone, and ``inputs`` leaves its value out from then on.
"""

import asyncio
import base64
import binascii
import collections
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

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
# How often every indexed kind is listed to find deletions a watch gap hid from kopf. A deleted
# backend or route is served at most this long after the watch's return when no listing event
# revealed the gap; each resync is one metadata-only LIST per kind and served namespace that
# holds objects, so once a minute costs the API server little beside kopf's own watches.
RESYNC_SECONDS = 60.0
# A re-list arrives as a burst of listing events (one per object); the resync LISTs once that
# burst has been quiet this long, not once per event.
RELIST_QUIET_SECONDS = 1.0
# While the objects the API lists are not all in kopf's indexes, the sync gate stays closed
# (``RouteGate``) and they are listed again on every event and at the latest after this long:
# the reconciler's retry delay, as a failed write's.
GATE_RETRY_SECONDS = reconciler.RETRY_SECONDS
# Once one object the API lists has been missing from kopf's index this long (one created after
# kopf's listing is indexed within one watch event), the handlers give up (``Wiring.give_up``):
# the controller exits to be restarted, and the fresh process scans API discovery afresh (a CRD
# event would make the running kopf scan the MailRoute group again, but it may never come, and
# nothing makes it scan a built-in group again). Two retries: a needless restart costs kopf's
# listings once, before any table went out; a late one keeps every change from the proxies.
GATE_GIVE_UP_SECONDS = 2 * GATE_RETRY_SECONDS

V = TypeVar("V")


class Lister(Protocol):
    """The one read a resync makes (controller.operator.KubeApi.list_uids)."""

    async def list_uids(
        self, kind: tuple[str, ...], namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> frozenset[str]:
        """The uids of the objects of ``kind`` (kopf's resource tuple) in ``namespace`` (None:
        all) matching both selectors, from one snapshot. Raises reconciler.ClusterError (or its
        ClusterUnavailableError) when the API refuses or fails."""
        ...


class Cluster(reconciler.Cluster, Lister, Protocol):
    """What the handlers need of the API: the reconciler's writes and the resync's LIST."""


@dataclass(frozen=True, slots=True)
class Wiring:
    """What the handlers are connected to (built by controller.operator.run)."""

    namespace: str  # the controller's namespace: proxy pods live here
    served: frozenset[str] | None  # namespaces whose MailRoutes this release serves; None: all
    proxy_labels: Mapping[str, str]
    login: Callable[[], kopf.ConnectionInfo]
    publisher: reconciler.Publisher
    cluster: Cluster
    holdoff: float = reconciler.HOLDOFF_SECONDS
    metrics: ControllerMetrics | None = None  # compile timings, on the publisher's registry
    resync: float = RESYNC_SECONDS  # seconds between the LISTs of every indexed kind
    # Ends kopf's run on an error, saying why (controller.operator exits to be restarted); None:
    # never (``RouteGate``).
    give_up: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True)
class Indexed(Generic[V]):
    """An index value and the uid of the object it came from (kopf's stores keep their keys to
    themselves, and whether a value is stale is a question about its object)."""

    uid: str
    value: V


@dataclass(frozen=True, slots=True)
class _Sighting:
    namespace: str
    first_seen: float  # Sightings' clock: ranks two uids under one name (``live``)
    # Sightings' clock, at the uid's latest index handler call: a LIST that started before it
    # may predate the object's return to the selection (``judge``).
    last_seen: float
    # Its latest index handler call gave values (a slice of no Service or of FQDN addresses
    # gives none, and kopf keeps none of it: found gone, it needs no hiding).
    valued: bool
    announced: bool = False  # an event handler has had an event of it


def _whole_store(_: object) -> str:
    """One name for every value of a store: its key is the object's own (namespace, name)."""
    return ""


class Sightings:
    """Which indexed objects are live, by uid, for ``inputs``.

    Per index, each uid's namespace and when it was first and last seen (``indexed``, from the
    index handlers, with values or none: the sync gate asks whether kopf's watch listed an
    object, whatever it holds), and whether an event handler has announced it (``announce``: a listing event
    of an announced uid is kopf re-listing after a watch gap). ``judge`` applies a LIST: a uid
    last seen before the LIST started and absent from it is gone, and stays gone unless an index
    handler sees it again (a Secret labelled again keeps its uid; its DELETED may have been lost,
    and it may come back while a LIST that started before is in flight, so the last sighting
    counts, not the first). Bounded by kopf's own indexes:
    a uid is forgotten on its DELETED event, and a gone uid leaves the sightings for the gone
    set, which holds only values kopf keeps and will never drop. Thread-safe: index handlers run
    in kopf's executor threads, everything else on its loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, _Sighting]] = collections.defaultdict(dict)
        self._gone: set[str] = set()

    def now(self) -> float:
        """The clock sightings are recorded with (a LIST's start is read from it)."""
        return self._clock()

    def indexed(self, index: str, body: Mapping[str, Any], values: Mapping[Any, V]) -> dict[Any, Indexed[V]]:
        """What an index handler returns: ``values`` (index key to value) tagged with the body's
        uid, whose sighting is recorded now (the first too, if it is new), with values or none.
        A body without a uid (never from the API server) is tagged "" and never judged."""
        found = body.get("metadata")
        metadata: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        uid = metadata.get("uid")
        uid = uid if isinstance(uid, str) else ""
        if uid:
            with self._lock:
                self._gone.discard(uid)  # seen again (a Secret labelled again keeps its uid)
                now = self._clock()
                known = self._seen[index]
                sighting = known.get(uid)
                known[uid] = (
                    _Sighting(str(metadata.get("namespace") or ""), now, now, bool(values))
                    if sighting is None
                    else dataclasses.replace(sighting, last_seen=now, valued=bool(values))
                )
        return {key: Indexed(uid, value) for key, value in values.items()}

    def announce(self, index: str, event_type: str | None, uid: str) -> bool:
        """An event handler's event of ``uid``; True when it is a listing event (type None) of a
        uid announced before, which only a re-list sends. DELETED forgets the uid."""
        with self._lock:
            known = self._seen[index]
            if event_type == "DELETED":
                known.pop(uid, None)
                self._gone.discard(uid)
                return False
            sighting = known.get(uid)
            if sighting is None:
                return False
            if not sighting.announced:
                known[uid] = dataclasses.replace(sighting, announced=True)
                return False
            return event_type is None

    def uids(self, index: str) -> set[str]:
        """The uids of ``index`` indexed and not yet found gone."""
        with self._lock:
            return set(self._seen[index])

    def namespaces(self, index: str) -> set[str]:
        """The namespaces that hold an object of ``index`` not yet found gone."""
        with self._lock:
            return {sighting.namespace for sighting in self._seen[index].values()}

    def judge(self, index: str, namespace: str | None, started: float, listed: Collection[str]) -> int:
        """Apply a LIST of ``index``'s kind in ``namespace`` (None: all) that started at
        ``started`` (``now``) and found ``listed``: every uid last seen before it started and
        not listed is gone. A uid indexed since (first or again) is kept whatever the LIST says:
        it may be newer than the LIST's snapshot. Returns how many uids this made gone that
        kopf keeps values of (a uid without values is only forgotten)."""
        with self._lock:
            known = self._seen[index]
            lost = [
                uid
                for uid, sighting in known.items()
                if sighting.last_seen < started
                and uid not in listed
                and (namespace is None or sighting.namespace == namespace)
            ]
            gone = [uid for uid in lost if known[uid].valued]
            self._gone.update(gone)
            for uid in lost:
                del known[uid]
        return len(gone)

    def live(
        self, index: str, values: Iterable[Indexed[V]], name: Callable[[V], str] = _whole_store
    ) -> list[V]:
        """The live values of one store of ``index``: none whose uid is gone, and of values with
        one ``name`` the one first seen last. Two uids under one name mean the older object was
        deleted (names are unique among live objects) and created again while the watch was
        away; which of them is live needs no LIST."""
        chosen: dict[str, tuple[float, str, V]] = {}
        with self._lock:
            known = self._seen[index]
            for item in values:
                if item.uid in self._gone:
                    continue
                sighting = known.get(item.uid)
                rank = (sighting.first_seen if sighting is not None else float("-inf"), item.uid)
                key = name(item.value)
                if key not in chosen or rank > chosen[key][:2]:
                    chosen[key] = (*rank, item.value)
        return [value for _, _, value in chosen.values()]


@dataclass(frozen=True, slots=True)
class Listing:
    """How a resync LISTs the objects of one index as kopf's watch sees them."""

    index: str
    kind: tuple[str, ...]  # kopf's resource tuple
    clusterwide: bool  # one LIST for every namespace, else one per namespace holding objects
    label_selector: str = ""
    field_selector: str = ""


class Resync:
    """Finds the index values of objects deleted while a watch was away (see the module
    docstring) and wakes the reconciler when it does.

    ``run`` LISTs every kind each ``period`` seconds, and a kind ``relisted`` names once its
    listing events have been quiet for ``quiet`` seconds. A LIST that fails changes nothing; its
    problem is logged once, and its recovery once. A scope (kind and namespace) is listed only
    while it holds objects: with none there is nothing to find gone.
    """

    def __init__(
        self,
        sightings: Sightings,
        lister: Lister,
        listings: Iterable[Listing],
        wake: Callable[[], None],
        *,
        period: float = RESYNC_SECONDS,
        quiet: float = RELIST_QUIET_SECONDS,
    ) -> None:
        self._sightings = sightings
        self._lister = lister
        self._listings = tuple(listings)
        self._wake = wake
        self._period = period
        self._quiet = quiet
        self._due: set[str] = set()
        self._relisted = asyncio.Event()
        self._problems: dict[tuple[str, str | None], str] = {}

    def relisted(self, index: str) -> None:
        """kopf is re-listing ``index``'s kind: LIST it once the burst is over (on kopf's loop)."""
        self._due.add(index)
        self._relisted.set()

    async def run(self) -> None:
        """Resync after each period or quiet re-list, until cancelled."""
        loop = asyncio.get_running_loop()
        every = loop.time() + self._period
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(every):
                    await self._relisted.wait()
                    while self._relisted.is_set():
                        self._relisted.clear()
                        await asyncio.sleep(self._quiet)
            indexes, self._due = self._due, set()
            self._relisted.clear()  # what it announced is in ``indexes``, or in every index now
            if loop.time() >= every:
                every = loop.time() + self._period
                indexes = {listing.index for listing in self._listings}
            await self.resync(indexes)

    async def resync(self, indexes: Collection[str]) -> None:
        """LIST the kinds of ``indexes`` and apply what each LIST found; wake the reconciler
        if anything was found gone."""
        gone = 0
        try:
            for listing in self._listings:
                if listing.index not in indexes:
                    continue
                held = self._sightings.namespaces(listing.index)
                scopes: list[str | None] = [None] if listing.clusterwide and held else [*sorted(held)]
                for namespace in scopes:
                    gone += await self._list(listing, namespace)
        except reconciler.ClusterUnavailableError:
            pass  # every other LIST would fail too (logged by _list); what was found stands
        if gone:
            self._wake()

    async def _list(self, listing: Listing, namespace: str | None) -> int:
        """One LIST applied: how many uids it found gone (0 when it was refused, logged once).

        Raises:
            ClusterUnavailableError: the API is unavailable (logged once).
        """
        scope = _scope(listing.index, namespace)
        started = self._sightings.now()
        try:
            listed = await self._lister.list_uids(
                listing.kind, namespace, listing.label_selector, listing.field_selector
            )
        except reconciler.ClusterError as error:
            problem = str(error)
            if self._problems.get((listing.index, namespace)) != problem:
                self._problems[(listing.index, namespace)] = problem
                log.warning(
                    "resync: listing %s failed, its index values are kept as they are: %s", scope, problem
                )
            if isinstance(error, reconciler.ClusterUnavailableError):
                raise
            return 0
        if self._problems.pop((listing.index, namespace), None) is not None:
            log.info("resync: listing %s works again", scope)
        found = self._sightings.judge(listing.index, namespace, started, listed)
        if found:
            log.info("resync: %d object(s) of %s were deleted while a watch was away: left out", found, scope)
        return found


class RouteGate:
    """Opens the reconciler's sync gate once what routes are made of is in kopf's indexes.

    kopf calls the resource handlers once every index it serves holds its initial listing, but
    it serves only the kinds its one scan of API discovery found at start. When that read of a
    group failed (a 404 while an API server's CRD handler has not synced, or for a built-in
    group while its discovery is unavailable), kopf starts no watch of that kind at all, the
    other indexes fill, and the first handler call would publish a table without any route, or
    with routes without their endpoints, to every proxy and write it to the snapshot Secret. So
    ``run`` waits for the first ``wake`` (kopf's indexes are filled), then LISTs the objects of
    each of ``listings`` in the served namespaces itself (uids only, with the selectors of
    kopf's watch) and opens the gate once every uid listed has been seen by kopf's index handler
    (an empty listing is a listing too). Until then it lists again on each ``wake`` and at the
    latest every ``retry`` seconds, logging why once per problem: a CRD event makes kopf scan
    the MailRoute group again and start its watch, whose listing fills the index and opens the
    gate; and once one listed object has been missing from its index for ``give_up_after``
    seconds, ``give_up`` is called (once): the controller exits to be restarted, which scans
    every group afresh.
    """

    def __init__(
        self,
        sightings: Sightings,
        lister: Lister,
        served: frozenset[str] | None,
        listings: Iterable[Listing],
        open_gate: Callable[[], None],
        *,
        retry: float = GATE_RETRY_SECONDS,
        give_up: Callable[[str], None] | None = None,
        give_up_after: float = GATE_GIVE_UP_SECONDS,
    ) -> None:
        self._sightings = sightings
        self._lister = lister
        self._scopes: list[str | None] = [None] if served is None else [*sorted(served)]
        self._listings = tuple(listings)
        self._open_gate = open_gate
        self._retry = retry
        self._give_up = give_up
        self._give_up_after = give_up_after
        self._woken = asyncio.Event()
        self._problem: str | None = None
        # Each uid listed and missing from its index, and when it was first found so: one
        # object missing for long says kopf does not watch its kind; under churn, each LIST
        # may find another one just created, which kopf indexes a watch event later.
        self._missing_since: dict[str, float] = {}
        self._forbidden: set[tuple[str, str]] = set()  # (index, namespace) refused, logged once

    def wake(self) -> None:
        """A resource handler ran (on kopf's loop): list again now, if the gate is still closed."""
        self._woken.set()

    async def run(self) -> None:
        """Open the gate once every listed object is indexed (see the class docstring), then
        return."""
        await self._woken.wait()
        loop = asyncio.get_running_loop()
        while True:
            self._woken.clear()
            problem, missing = await self._unindexed(loop.time())
            if problem is None:
                if self._problem is not None:
                    log.info("every object the API lists is indexed now: routing tables will be published")
                self._open_gate()
                return
            if problem != self._problem:
                self._problem = problem
                log.warning("no routing table is published yet: %s", problem)
            overdue = any(
                loop.time() - since >= self._give_up_after for since in self._missing_since.values()
            )
            if missing and overdue and self._give_up is not None:
                self._give_up(f"for {self._give_up_after:.0f} s and more: {problem}")
                self._give_up = None  # once: kopf's run ends
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry):
                    await self._woken.wait()

    async def _listed(self, listing: Listing, namespace: str | None) -> frozenset[str]:
        """The uids a LIST of ``listing`` in ``namespace`` finds. A served namespace whose LIST
        is forbidden lists none: deleted after install, it took its Role with it, and kopf,
        refused the same, indexes nothing there either, so waiting for it would hold every
        table back for ever (review T3). A forbidden LIST of every namespace is a failure: it
        says the release's RBAC is broken, and taking it as empty would publish no route."""
        try:
            return await self._lister.list_uids(
                listing.kind, namespace, listing.label_selector, listing.field_selector
            )
        except reconciler.ForbiddenError as error:
            if namespace is None:
                raise
            if (listing.index, namespace) not in self._forbidden:
                self._forbidden.add((listing.index, namespace))
                log.warning("%s: taken as none, as kopf's watch there is refused too", error)
            return frozenset()

    async def _unindexed(self, now: float) -> tuple[str | None, bool]:
        """Why the gate stays closed (None: every object listed is indexed), and whether it is
        that listed objects are missing from their index (else a LIST failed, which leaves the
        notes of since when each listed uid is missing as they are)."""
        missing: dict[str, set[str]] = {}
        try:
            for listing in self._listings:
                listed: set[str] = set()
                for namespace in self._scopes:
                    listed |= await self._listed(listing, namespace)
                missing[listing.kind[-1]] = listed - self._sightings.uids(listing.index)
        except reconciler.ClusterError as error:
            return f"listing {listing.kind[-1]} failed, trying again in {self._retry:.0f} s: {error}", False
        self._missing_since = {
            uid: self._missing_since.get(uid, now) for uids in missing.values() for uid in uids
        }
        counts = ", ".join(f"{plural}: {len(uids)}" for plural, uids in missing.items() if uids)
        if not counts:
            return None, False
        return (
            f"objects the API lists are not in the operator's index ({counts}): its watch has not "
            "listed them (API discovery may have missed their kind at start; a CRD event makes it "
            "look again for MailRoutes, and the controller exits to be restarted, which scans "
            f"afresh, when one is still missing after {self._give_up_after:.0f} s)",
            True,
        )


def _scope(index: str, namespace: str | None) -> str:
    return f"{index} in {namespace}" if namespace is not None else f"{index} in every namespace"


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


def inputs(
    indices: Mapping[str, Mapping[Any, Iterable[Indexed[Any]]]], sightings: Sightings
) -> reconciler.Inputs:
    """The reconciler's view of the five kopf indexes at this moment, live values only.

    kopf's ``Index`` maps each key to a ``Store`` of the values every object returned for it;
    the keys are the tuples and names the index functions below return. ``Sightings.live``
    leaves out values of objects found gone and, where one name holds two objects, the older.
    """

    def live(index: str, name: Callable[[Any], str] = _whole_store) -> dict[Any, list[Any]]:
        found = {key: sightings.live(index, store, name) for key, store in indices[index].items()}
        return {key: values for key, values in found.items() if values}

    def one(index: str) -> dict[Any, Any]:
        # A key of these indexes is the object's own (namespace, name): one live value at most.
        return {key: values[0] for key, values in live(index).items()}

    return reconciler.Inputs(
        routes=[entry for entries in live(ROUTES_INDEX).values() for entry in entries],
        services=one(SERVICES_INDEX),
        slices=live(SLICES_INDEX, lambda piece: str(piece.name)),
        proxies={str(key): ready for key, ready in one(PROXIES_INDEX).items()},
        secrets=one(SECRETS_INDEX),
    )


def _selector(labels: Mapping[str, str]) -> str:
    """An equality-based label selector, as kopf's watch and a resync's LIST both send it."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def register(registry: kopf.OperatorRegistry, wiring: Wiring) -> None:
    """Define every handler of the operator on ``registry``."""
    state: dict[str, Any] = {}

    # kopf's ``when`` filter of the handlers of namespaced kinds a route may use.
    def served(namespace: str | None, **_: Any) -> bool:
        return wiring.served is None or namespace in wiring.served

    parsed = ParseCache()
    ignored_addresses = endpoints.IgnoredAddresses()
    sightings = Sightings()
    pod_labels = _selector(wiring.proxy_labels)
    pod_fields = f"metadata.namespace={wiring.namespace}"
    secret_labels = _selector(SECRET_LABELS)
    # What kopf watches, as it watches it: served namespaces (or all), and the proxy pods only
    # in the controller's own namespace, whatever it serves.
    clusterwide = wiring.served is None
    listings = (
        Listing(ROUTES_INDEX, (GROUP, VERSION, PLURAL), clusterwide),
        Listing(SERVICES_INDEX, SERVICES, clusterwide),
        Listing(SLICES_INDEX, SLICES, clusterwide),
        Listing(PROXIES_INDEX, PODS, False, pod_labels, pod_fields),
        Listing(SECRETS_INDEX, SECRETS, clusterwide, secret_labels),
    )

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return wiring.login()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.watching.label_selectors[PODS] = pod_labels
        settings.watching.field_selectors[PODS] = pod_fields
        settings.watching.label_selectors[SECRETS] = secret_labels
        # Only our own handlers' problems are worth an Event; kopf's progress chatter is not.
        settings.posting.level = logging.WARNING
        names = (ROUTES_INDEX, SERVICES_INDEX, SLICES_INDEX, PROXIES_INDEX, SECRETS_INDEX)
        indices = {name: kwargs[name] for name in names}
        worker = reconciler.Reconciler(
            read=lambda: inputs(indices, sightings),
            publisher=wiring.publisher,
            cluster=wiring.cluster,
            holdoff=wiring.holdoff,
            metrics=wiring.metrics,
        )
        resync = Resync(sightings, wiring.cluster, listings, worker.touch, period=wiring.resync)
        gate = RouteGate(
            sightings,
            wiring.cluster,
            wiring.served,
            # Every kind of the served namespaces a route is made of (the proxy pods only count
            # towards its status).
            [listing for listing in listings if listing.index != PROXIES_INDEX],
            worker.mark_synced,
            retry=GATE_RETRY_SECONDS,
            give_up=wiring.give_up,
            give_up_after=GATE_GIVE_UP_SECONDS,
        )
        state["reconciler"] = worker
        state["resync"] = resync
        state["gate"] = gate
        state["tasks"] = [
            asyncio.create_task(worker.run(), name="mailgress reconciler"),
            asyncio.create_task(resync.run(), name="mailgress resync"),
            asyncio.create_task(gate.run(), name="mailgress sync gate"),
        ]

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        tasks = state.pop("tasks", [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @kopf.on.probe(id="table", registry=registry)
    def table_probe(**_: Any) -> str:
        worker = state.get("reconciler")
        current = None if worker is None else worker.table
        return "none yet" if current is None else current.version

    @kopf.index(GROUP, VERSION, PLURAL, id=ROUTES_INDEX, when=served, registry=registry)
    def mailroute_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        return sightings.indexed(ROUTES_INDEX, body, {(namespace, name): route_entry(body, parsed)})

    @kopf.index(*SERVICES, id=SERVICES_INDEX, when=served, registry=registry)
    def service_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        view = endpoints.service_view(body)
        return sightings.indexed(
            SERVICES_INDEX, body, {} if view is None else {(view.namespace, view.name): view}
        )

    @kopf.index(*SLICES, id=SLICES_INDEX, when=served, registry=registry)
    def endpointslice_index(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        view = endpoints.slice_view(body)
        if view is None:
            # Left out of the table (no Service label, say), yet seen: the sync gate lists every
            # slice and must not wait for this one for ever (review T3).
            return sightings.indexed(SLICES_INDEX, body, {})
        # An address no proxy could dial is left out of the table (it would be refused whole);
        # the Service's owner learns why here, once per address, not on every slice event.
        for message in ignored_addresses.report(view):
            log.warning("%s", message)
        return sightings.indexed(SLICES_INDEX, body, {(view.namespace, view.service): view})

    @kopf.index(
        *PODS, id=PROXIES_INDEX, labels=dict(wiring.proxy_labels), field="metadata.namespace",
        value=wiring.namespace, registry=registry,
    )  # fmt: skip
    def proxy_index(body: kopf.Body, name: str, **_: Any) -> dict[Any, Any]:
        return sightings.indexed(PROXIES_INDEX, body, {name: _pod_ready(body)})

    @kopf.index(*SECRETS, id=SECRETS_INDEX, labels=dict(SECRET_LABELS), when=served, registry=registry)
    def secret_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        return sightings.indexed(SECRETS_INDEX, body, {(namespace, name): secret_values(body)})

    # async: kopf runs a synchronous handler in its executor's threads, and the reconciler's
    # asyncio.Event may be set only from the loop it waits on (kopf's, where these run).
    async def wake(**_: Any) -> None:
        gate: RouteGate = state["gate"]
        gate.wake()
        worker: reconciler.Reconciler = state["reconciler"]
        worker.touch()

    # An object's event: its sighting is announced (a re-list shows here, and DELETED forgets
    # it), then the reconciler wakes.
    async def noticed(index: str, event_type: str | None, uid: str | None) -> None:
        if uid and sightings.announce(index, event_type, uid):
            resync: Resync = state["resync"]
            resync.relisted(index)
        await wake()

    def changed(index: str) -> Callable[..., Awaitable[None]]:
        async def handler(type: str | None, uid: str | None, **_: Any) -> None:
            await noticed(index, type, uid)

        return handler

    @kopf.on.event(GROUP, VERSION, PLURAL, id="mailroute_changed", when=served, registry=registry)
    async def mailroute_changed(type: str | None, uid: str | None, **_: Any) -> None:
        # kopf drops a deleted object from the index without calling the index handler.
        if type == "DELETED" and uid:
            parsed.forget(uid)
        await noticed(ROUTES_INDEX, type, uid)

    kopf.on.event(*SERVICES, id="service_changed", when=served, registry=registry)(changed(SERVICES_INDEX))
    kopf.on.event(*SLICES, id="endpointslice_changed", when=served, registry=registry)(changed(SLICES_INDEX))
    kopf.on.event(
        *PODS, id="proxy_changed", labels=dict(wiring.proxy_labels), field="metadata.namespace",
        value=wiring.namespace, registry=registry,
    )(changed(PROXIES_INDEX))  # fmt: skip
    # A new, changed or rotated value becomes a new table version; a Secret that loses the label
    # leaves the watch as a deletion (the API server's selector), which wakes it too.
    kopf.on.event(*SECRETS, id="secret_changed", labels=dict(SECRET_LABELS), when=served, registry=registry)(
        changed(SECRETS_INDEX)
    )
    kopf.on.event(*CRDS, id="crd_changed", field="metadata.name", value=CRD_NAME, registry=registry)(wake)
