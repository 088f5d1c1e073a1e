"""The level-based reconciler: debounce, sync gate, compile, publish, status, snapshot.

controller.handlers starts one ``Reconciler`` per operator and calls ``touch`` whenever a
MailRoute, Service, EndpointSlice, proxy Pod or labelled Secret changes, and ``mark_synced`` once kopf has
filled every index (kopf holds resource handlers until then) and ``handlers.RouteGate`` found every
MailRoute a LIST of its own returns in it (review S3: a kind kopf missed at start is no empty
table). The publisher calls ``acks_changed`` when a proxy connects, acks or leaves. Each pass
reads everything afresh through ``read`` (never an event's diff: Contour's level-based build),
so a lost or repeated event costs nothing but a pass.

One pass: compile every MailRoute with the resolved endpoints and Secrets (controller.compiler, pure),
and with what each route holds in the table published last, so that a route keeps the names it serves;
publish the table if its version is new and write it to the snapshot Secret (the one place
the latest version is published, with the controller's table metric; a Secret, not a ConfigMap,
because route tables carry auth_http request headers, and the aggregated ``view`` role reads
every ConfigMap in the namespace but no Secret). The snapshot only serves a proxy that starts
while the controller is away, so a failed write never fails the pass: publishing and statuses go
on, the failure is counted and logged once per distinct problem, and the write is tried again
(after an API failure, such as missing RBAC, on a pass RETRY_SECONDS later; for a table too
large, with the next table). The table JSON is stored plainly when it fits the API server's
1 MiB Secret limit, else gzip-compressed under a second key (table JSON shrinks 25- to 40-fold):
plain stays readable with kubectl (base64-decoded), and compression costs CPU only where it
makes the difference between a snapshot and none. Beside the table the snapshot keeps each
route's ``since`` version (below), in the table's form (SINCE_KEY or SINCE_GZIP_KEY) and counted
in the same size check; a table that fits only without it is stored without it (what a booting
proxy needs comes first).

Restart: ``run`` first reads the snapshot back (``restore``) and starts from it as from a
publication of its own: a route whose compiled form equals the stored table's keeps its stored
``since`` version, so a restarted controller (a rollout, a crash, a new leader) writes no status
for a route that did not change, and proxies that ack the stored table count as running it. The
first status sweep then waits until every ready proxy has told this controller what it runs (a
proxy acks the current table on connecting), at most PROXY_GRACE_SECONDS, so Programmed does
not drop to Pending meanwhile. A missing, unreadable, corrupt or older snapshot (no since map)
is logged and the controller starts afresh: every route's version moves to its first table.

Then a status sweep computes each MailRoute's status (Accepted and ResolvedRefs from the
compiler, Programmed from which ready proxy pods run a table that holds this route's spec as it
now is, whatever its endpoints, status.proxies from which run this route exactly as it now is)
and patches the ones that differ, merging our conditions into the object's list
(controller.conditions.merge: others' conditions stay) with the object's resourceVersion as a
precondition, and posts an Event per condition that turned True or False (one an unavailable
API kept back is posted by the retried sweep, though the status is written). A write the API
server refuses (an admission policy, a status beyond the CRD's limits) holds up no other route:
it is logged once per route and problem and tried again later, less often while the refusal
lasts; an unavailable API (network trouble, 401, 429, 5xx) ends the sweep, and one pass
RETRY_SECONDS later sweeps again, twice as long after each further failure in a row (up to
MAX_RETRY_SECONDS). Until that retry, passes woken by watch events still compile and publish
(proxies need no API server), but write no status: a 429 asks for fewer requests, and the retry
tries them all. Both
counts compare content, through the publications that held the route (``_Since``), never its name and
generation alone: a MailRoute deleted and created again starts at generation 1 again, and
proxies still running the old object's table must not count as running the new one. So the two
never contradict each other: status.proxies.programmed is at most Programmed's count, and
smaller only while new endpoints of an unchanged spec are on their way.
A status names only the route's own programming, never the latest table, so a table that does
not change a route writes nothing for it. In ``run`` sweeps go on beside the passes: a burst
of route changes is still many writes, which must not hold up the next table; a sweep
overtaken by a newer table stops, and the next goes on from there.
Never imports kopf: the Kubernetes API is behind ``Cluster``; never publishes before the sync
gate opened (a half-listed cluster would withdraw routes from every proxy).
"""

import asyncio
import base64
import binascii
import dataclasses
import datetime
import gzip
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller import compiler, conditions, endpoints, mailroute
from controller.metrics import SNAPSHOT_API_ERROR, SNAPSHOT_TOO_LARGE, ControllerMetrics
from proxy import table

log = logging.getLogger(__name__)

# Contour's event handler waits 100 ms after an event for more to come, and never longer than
# 500 ms in all: a burst (kubectl apply -f of many routes) becomes one compilation.
HOLDOFF_SECONDS = 0.1
MAX_HOLDOFF_SECONDS = 0.5
# A failed API write is retried on a later pass; this one comes at the latest after that long.
RETRY_SECONDS = 5.0
# An unavailable API (or a pass that fails) is tried again RETRY_SECONDS later, then after twice
# as long at each failure in a row up to this, until a sweep goes through: an outage (429s from
# API Priority and Fairness, a control plane upgrade) must not cost a sweep every RETRY_SECONDS,
# and statuses catch up at most this long after it ends (tables reach the proxies meanwhile).
MAX_RETRY_SECONDS = 60.0
# A route's status write the API server refused (an admission policy, a status beyond the CRD's
# limits, a missing RBAC rule) is tried again RETRY_SECONDS later, then after twice as long at
# each refusal up to this, or as soon as the object changes: a refusal that lasts (every route's,
# without the RBAC rule) must not cost a write per route every RETRY_SECONDS.
MAX_REFUSED_RETRY_SECONDS = 300.0
# Published table versions remembered to tell what an acked version holds. A proxy that acks
# a version older than this many others counts as not running any current route.
MAX_REMEMBERED_TABLES = 64
# The Secret keys proxies read the snapshot from (both mounted as files, side by side): the
# canonical table JSON, or its gzip form (RFC 1952); never both at once. Both are in the Secret's
# data, base64 as the API carries every Secret value (RFC 4648 section 4); the kubelet writes the
# files decoded. proxy/server/subscriber.py finds the second by SNAPSHOT_GZIP_SUFFIX, tests check
# they agree.
SNAPSHOT_KEY = "table.json"
SNAPSHOT_GZIP_KEY = SNAPSHOT_KEY + ".gz"
# The snapshot's since map, for the controller alone (the chart mounts only the table keys into
# proxy pods): plain beside a plain table, gzip beside a compressed one.
SINCE_KEY = "since.json"
SINCE_GZIP_KEY = SINCE_KEY + ".gz"
# What a restore decompresses at most: the proxies' bound for one table (proxy/server/subscriber.py
# MAX_TABLE_BYTES), so a corrupt or hostile Secret cannot make the controller inflate gigabytes.
MAX_RESTORED_BYTES = 64 * 1024 * 1024
# A table version as proxy.table.make_table forms it; a stored since map names nothing else.
TABLE_VERSION = re.compile(r"sha256:[0-9a-f]{64}")
# After a restore, the first status sweep waits this long at most for every ready proxy to ack
# to this controller: three times the longest reconnect backoff of a proxy (Backoff.cap, 5 s, in
# proxy/server/subscriber.py), whose first line on a new stream is the current table.
PROXY_GRACE_SECONDS = 15.0
# The API server refuses a Secret whose data values add up to more than 1 MiB (Kubernetes' object
# data limit: pkg/apis/core/validation ValidateSecret, core.MaxSecretSize). It counts the decoded
# bytes: base64's growth by 4/3 is only on the wire, in a JSON body of about 1.34 MiB at most, under
# the API server's 3 MiB request limit, and etcd stores the raw bytes (protobuf). So the size
# check compares the bytes as they are, not their base64 form.
MAX_SECRET_BYTES = 1024 * 1024
# zlib's default level. Level 9 saves at most 1.5 % more on table JSON for 1.5 to 2.5 times the
# CPU (measured: bench/convergence.py's 10,000 routes, 2.5 MB -> 62 kB; more varied ones, 5.2 MB
# -> 201 kB).
SNAPSHOT_GZIP_LEVEL = 6
# events.k8s.io/v1 caps an Event's note at 1 kB; the core/v1 message is shown in the same place.
MAX_EVENT_MESSAGE = 1024


_Parsed = mailroute.MailRoute | mailroute.SpecError
_Endpoints = tuple[table.Endpoint, ...]
_Table = table.RoutingTable  # inside Reconciler, ``table`` is its property


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A MailRoute as last seen: parsed, plus what writing its status needs."""

    route: _Parsed
    uid: str
    resource_version: str
    status: Mapping[str, Any]  # the object's .status as seen (others' conditions included)


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything one pass reads: the operator's indexes at one moment."""

    routes: Sequence[RouteEntry]
    services: Mapping[tuple[str, str], endpoints.Service]
    slices: Mapping[tuple[str, str], Sequence[endpoints.Slice]]
    proxies: Mapping[str, bool]  # proxy pod name -> Ready
    # (namespace, name) -> the data of each Secret labelled for auth_http headersFrom
    secrets: Mapping[compiler.SecretRef, compiler.SecretValues] = field(default_factory=dict)


class Ack(Protocol):
    """What a proxy reported for a table version (controller.publisher.Ack)."""

    @property
    def version(self) -> str: ...
    @property
    def accepted(self) -> bool: ...
    @property
    def error(self) -> str: ...


class Publisher(Protocol):
    """The push channel's controller end (controller.publisher.Publisher)."""

    def publish(self, new: table.RoutingTable) -> None: ...
    def acks(self) -> Mapping[str, Ack]: ...
    def on_change(self, callback: Callable[[], None]) -> None: ...


class ClusterError(Exception):
    """A Kubernetes API call failed: the API server refused this request (403, 422, ...; a later
    retry may not be refused), or it is unavailable (the subclass below)."""


class ForbiddenError(ClusterError):
    """HTTP 403: no RBAC rule grants the request, or an admission check refused it."""


class ClusterUnavailableError(ClusterError):
    """The API server cannot be reached or answers no request of ours now (network trouble, a
    timeout, 401, 429, 5xx): every other call would fail too, so a status sweep stops here."""


class SnapshotTooLargeError(Exception):
    """A table that does not fit a Secret even compressed; the message is safe to log."""


class SnapshotUnreadableError(Exception):
    """A stored snapshot that cannot seed a restart; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A table as the snapshot Secret stores it: under exactly one of the two keys, with its
    since map (``encode_since``) in the same form, when it fits."""

    version: str  # the table's
    compressed: bool  # gzip under SNAPSHOT_GZIP_KEY, else JSON under SNAPSHOT_KEY
    content: bytes  # what the proxies' mounted file holds
    since: bytes | None = None  # under SINCE_GZIP_KEY or SINCE_KEY (as ``compressed``); None: absent

    def fields(self) -> dict[str, dict[str, str]]:
        """The Secret fields that hold it, as JSON carries them (data values in base64)."""
        if self.compressed:
            keys = {SNAPSHOT_GZIP_KEY: self.content, SINCE_GZIP_KEY: self.since}
        else:
            keys = {SNAPSHOT_KEY: self.content, SINCE_KEY: self.since}
        return {
            "data": {
                key: base64.b64encode(value).decode("ascii")
                for key, value in keys.items()
                if value is not None
            }
        }

    def merge_patch(self) -> dict[str, dict[str, str | None]]:
        """``fields`` plus the removal of every other key (null deletes a key in a merge patch): a
        proxy must never find an older table beside this one, nor a restart an older since map."""
        data: dict[str, str | None] = dict.fromkeys(
            (SNAPSHOT_KEY, SINCE_KEY, SNAPSHOT_GZIP_KEY, SINCE_GZIP_KEY)
        )
        data.update(self.fields()["data"])
        return {"data": data}


def encode_since(new: table.RoutingTable, since: Mapping[str, str]) -> bytes:
    """The since map of ``new`` (route name -> version) as the snapshot stores it: the table's
    version, and the route names grouped by version (most routes share a few versions, so a
    version is written once, not once per route)."""
    grouped: dict[str, list[str]] = {}
    for name, version in since.items():
        grouped.setdefault(version, []).append(name)
    body = {"table": new.version, "since": {version: sorted(names) for version, names in grouped.items()}}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _gzip(document: bytes) -> bytes:
    # mtime 0: the same document always compresses to the same bytes.
    return gzip.compress(document, compresslevel=SNAPSHOT_GZIP_LEVEL, mtime=0)


def encode_snapshot(new: table.RoutingTable, since: Mapping[str, str]) -> Snapshot:
    """``new`` and its since map as the snapshot Secret stores them: JSON if both fit, else
    gzip; the table alone (compressed) if only it fits.

    Raises:
        SnapshotTooLargeError: even the table's gzip form exceeds MAX_SECRET_BYTES.
    """
    document, since_document = table.to_json(new), encode_since(new, since)
    if len(document) + len(since_document) <= MAX_SECRET_BYTES:
        return Snapshot(new.version, compressed=False, content=document, since=since_document)
    compressed, since_compressed = _gzip(document), _gzip(since_document)
    if len(compressed) + len(since_compressed) <= MAX_SECRET_BYTES:
        return Snapshot(new.version, compressed=True, content=compressed, since=since_compressed)
    if len(compressed) <= MAX_SECRET_BYTES:
        return Snapshot(new.version, compressed=True, content=compressed)
    raise SnapshotTooLargeError(
        f"routing table {new.version} takes {len(document)} bytes, {len(compressed)} compressed: "
        f"more than the {MAX_SECRET_BYTES} bytes a Secret holds"
    )


@dataclass(frozen=True, slots=True)
class Restored:
    """What a snapshot Secret gives a restarted controller."""

    table: table.RoutingTable
    since: Mapping[str, str]  # every route of ``table`` -> the first version that held it so


def _gunzip(data: bytes, where: str) -> bytes:
    """``data`` decompressed (one gzip member, RFC 1952), at most MAX_RESTORED_BYTES."""
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # | 16: a gzip header and trailer
    try:
        document = inflater.decompress(data, MAX_RESTORED_BYTES)
    except zlib.error as error:
        raise SnapshotUnreadableError(f"{where} is not valid gzip: {error}") from error
    if inflater.unconsumed_tail:
        raise SnapshotUnreadableError(f"{where} decompresses to more than {MAX_RESTORED_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise SnapshotUnreadableError(f"{where} is not one complete gzip member")
    return document


def _stored_value(stored: Mapping[str, Any], key: str, compressed: bool) -> bytes | None:
    """The bytes under ``key`` in data (base64), decompressed for ``compressed`` (gzip)."""
    values = stored.get("data")
    value = values.get(key) if isinstance(values, Mapping) else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise SnapshotUnreadableError(f"{key} is not a string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except binascii.Error as error:
        raise SnapshotUnreadableError(f"{key} is not base64: {error}") from error
    return _gunzip(decoded, key) if compressed else decoded


def _parse_since(document: bytes, stored: table.RoutingTable) -> dict[str, str]:
    """The since map ``encode_since`` wrote for ``stored`` (route name -> version)."""
    try:
        body = json.loads(document)
    except (ValueError, RecursionError) as error:  # ValueError: JSON or UTF-8
        raise SnapshotUnreadableError(f"the since map is not JSON: {error}") from error
    grouped = body.get("since") if isinstance(body, dict) else None
    if not isinstance(grouped, dict):
        raise SnapshotUnreadableError("the since map holds no versions")
    if body.get("table") != stored.version:
        # A release without since maps patched the table and left this one behind.
        raise SnapshotUnreadableError(f"the since map belongs to another table than {stored.version}")
    since: dict[str, str] = {}
    for version, names in grouped.items():
        if not TABLE_VERSION.fullmatch(version) or not isinstance(names, list):
            raise SnapshotUnreadableError("the since map holds something else than versions and names")
        for name in names:
            if not isinstance(name, str) or name in since:
                raise SnapshotUnreadableError("the since map names a route twice or not as a string")
            since[name] = version
    if since.keys() != {route.name for route in stored.routes}:
        raise SnapshotUnreadableError("the since map does not name exactly the table's routes")
    return since


def decode_snapshot(stored: Mapping[str, Any]) -> Restored:
    """The table and since map of the snapshot Secret ``stored`` (as the API returns it).

    The plain table first, as the proxies read it (proxy/server/subscriber.py ``read_snapshot``).

    Raises:
        SnapshotUnreadableError: no table, a corrupt one, or no since map that matches it.
    """
    for compressed, table_key, since_key in (
        (False, SNAPSHOT_KEY, SINCE_KEY),
        (True, SNAPSHOT_GZIP_KEY, SINCE_GZIP_KEY),
    ):
        document = _stored_value(stored, table_key, compressed)
        if document is None:
            continue
        try:
            last = table.from_json(document)
        except table.TableError as error:
            raise SnapshotUnreadableError(f"{table_key} is not a valid table: {error}") from error
        since_document = _stored_value(stored, since_key, compressed)
        if since_document is None:
            raise SnapshotUnreadableError(f"no {since_key} beside {table_key} (an earlier release wrote it)")
        return Restored(last, _parse_since(since_document, last))
    raise SnapshotUnreadableError(f"it holds neither {SNAPSHOT_KEY} nor {SNAPSHOT_GZIP_KEY}")


class Cluster(Protocol):
    """The Kubernetes API writes a pass makes."""

    async def patch_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> bool:
        """Merge-patch a MailRoute's status if it still has ``resource_version``.

        Returns False when the object changed meanwhile (409) or is gone (404); its next watch
        event brings a new pass. Raises ClusterUnavailableError when the API is unavailable (the
        sweep stops), ClusterError when it refused this write (only this route waits).
        """
        ...

    async def load_snapshot(self) -> Mapping[str, Any] | None:
        """The snapshot Secret as the API returns it (data in base64), None if there is none.
        Raises ClusterError when the API refuses or fails."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` in the snapshot Secret (create, or patch: its keys set, the other
        form's keys removed). Raises ClusterError when the API refuses or fails."""
        ...

    async def post_event(self, entry: RouteEntry, kind: str, reason: str, message: str) -> None:
        """Post a core/v1 Event (``kind`` Normal or Warning) about the MailRoute. An Event is a
        courtesy: a refusal (e.g. its namespace is terminating) is logged, never raised; raises
        ClusterUnavailableError when the API is unavailable."""
        ...


def utc_now() -> str:
    """RFC 3339 in UTC at second precision, as metav1.Time serialises."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class _Since:
    """Since when the published tables hold a route as the latest one does: exactly (what
    status.proxies counts), and with its spec (what Programmed counts: every field but the
    endpoints, which follow the backends' EndpointSlices, not the MailRoute)."""

    route: table.Route  # as the latest table holds it
    publication: int  # the first publication (0, 1, ... in publish order) that held it so
    version: str  # that publication's table version
    spec_publication: int  # the first publication since which every one held its spec so


def _spec(route: table.Route) -> table.Route:
    """``route`` without its backends' endpoints: what its MailRoute alone decides."""
    upstreams = tuple(
        (protocol, dataclasses.replace(upstream, endpoints=())) for protocol, upstream in route.upstreams
    )
    return dataclasses.replace(route, upstreams=upstreams)


@dataclass(slots=True)
class _Published:
    """The tables published so far, and since when each route of the latest is in them as it is.

    Versions are content hashes, so one can come back (a route deleted again): a proxy that
    acks it runs that content, and counts as running its latest publication.
    """

    publications: int = 0
    # version -> its latest publication; oldest first, the latest last (a republished version
    # moves to the end).
    tables: dict[str, int] = field(default_factory=dict)
    since: dict[str, _Since] = field(default_factory=dict)  # the latest table's routes
    # What each route holds in the latest table: the compiler's ``held`` (its rule 2b), so that
    # a route serving a name keeps it, also across a restart from the snapshot.
    held: compiler.Holdings = field(default_factory=dict)

    @property
    def latest(self) -> str | None:
        return next(reversed(self.tables), None)

    def add(self, new: table.RoutingTable) -> None:
        """Remember ``new`` as the latest publication. A route keeps its ``since`` while every
        table from then on holds it unchanged (generation, users, domains, endpoints, ...), and
        its ``spec_publication`` while they differ at most in its endpoints. A route that left a
        table starts afresh when it comes back (it may be another object of the same name)."""
        since: dict[str, _Since] = {}
        for route in new.routes:
            kept = self.since.get(route.name)
            if kept is None or (kept.route != route and _spec(kept.route) != _spec(route)):
                kept = _Since(route, self.publications, new.version, self.publications)
            elif kept.route != route:
                kept = _Since(route, self.publications, new.version, kept.spec_publication)
            since[route.name] = kept
        self.since = since
        self.held = compiler.holdings(new.routes)
        self.tables.pop(new.version, None)
        self.tables[new.version] = self.publications
        while len(self.tables) > MAX_REMEMBERED_TABLES:
            del self.tables[next(iter(self.tables))]
        self.publications += 1

    def restore(self, last: table.RoutingTable, since: Mapping[str, str]) -> None:
        """Start from ``last``, a previous controller's latest table, as publication 0, each
        route with the version it had there (``since``: every route's). The tables before it are
        not known, so a proxy counts for a route only once it acks ``last`` or a later table."""
        self.add(last)
        self.since = {
            name: dataclasses.replace(kept, version=since[name]) for name, kept in self.since.items()
        }

    def since_versions(self) -> dict[str, str]:
        """Route name -> the version its status names, for the latest table (the snapshot's)."""
        return {name: kept.version for name, kept in self.since.items()}

    def publication(self, version: str | None) -> int | None:
        """The latest publication of table ``version`` (None: not known)."""
        return self.tables.get(version or "")


@dataclass(frozen=True, slots=True)
class _Refusal:
    """The API server's last refusal of a route's status write (since its last that worked)."""

    resource_version: str  # of the object the refused write was for: a newer one is tried at once
    problem: str  # what was logged: the same problem again is logged at debug level only
    delay: float  # seconds from this refusal to the next try
    retry_at: float  # the event loop's time of the next try


def _backoff(last: float | None, cap: float) -> float:
    """The wait before the next try: RETRY_SECONDS after a first failure (``last`` None), else
    twice ``last``, at most ``cap``."""
    return RETRY_SECONDS if last is None else min(last * 2, cap)


@dataclass(frozen=True, slots=True)
class _SnapshotFailure:
    """The last snapshot write that failed (since the last that worked)."""

    version: str  # the table that was not written
    problem: str  # what was logged: the same problem again is only counted
    too_large: bool  # the same table never fits: only a new one is tried


class Reconciler:
    """Turns the indexes into one published table and every MailRoute's status."""

    def __init__(
        self,
        *,
        read: Callable[[], Inputs],
        publisher: Publisher,
        cluster: Cluster,
        holdoff: float = HOLDOFF_SECONDS,
        max_holdoff: float = MAX_HOLDOFF_SECONDS,
        now: Callable[[], str] = utc_now,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        """``metrics``: where compile times and snapshot failures go (the publisher's, which
        serves them); None records none."""
        self._read = read
        self._metrics = metrics
        self._publisher = publisher
        self._cluster = cluster
        self._holdoff = holdoff
        self._max_holdoff = max_holdoff
        self._now = now
        self._wake = asyncio.Event()
        self._sweep_due = asyncio.Event()
        self._sweep_input: tuple[Inputs, compiler.Compiled] | None = None  # the last pass's
        self._resume_at: str | None = None  # the route an overtaken sweep stopped at
        self._synced = False
        # What the last compilation was made of: equal input is not compiled again (status
        # writes come back as watch events, and must not cost a compilation each).
        self._compiled_from: (
            tuple[
                list[_Parsed],
                dict[compiler.ServiceKey, _Endpoints],
                Mapping[compiler.SecretRef, compiler.SecretValues],
                compiler.Holdings,
            ]
            | None
        ) = None
        self._compiled: compiler.Compiled | None = None
        # Hides auth_http header values in table versions (table.make_table): random, and then
        # the restored snapshot's, so a restart keeps every version of unchanged content.
        self._version_key = secrets.token_hex(table.VERSION_KEY_BYTES)
        self._published = _Published()
        self._pushed: str | None = None  # version last given to the publisher
        self._snapshot: str | None = None  # version last written to the Secret
        # Restored from a snapshot, and no ready proxy's ack heard for PROXY_GRACE_SECONDS yet
        # (``_await_proxies``): the first sweep waits for them.
        self._restored = False
        self._awaiting_proxies = False
        self._since_dropped = False  # the last snapshot written went without its since map
        self._snapshot_failure: _SnapshotFailure | None = None
        self._snapshot_paused = False  # a failed API write's RETRY_SECONDS are not over yet
        self._applied: dict[str, str] = {}  # proxy -> last version it accepted
        # Connected proxy -> its rejection of a version it did not apply (``acks_changed``).
        self._rejected: dict[str, Ack] = {}
        # key -> (resourceVersion we patched against, status we wrote): until the watch brings
        # our own write back, the index still shows the old status.
        self._written: dict[str, tuple[str, dict[str, Any]]] = {}
        # key -> each condition's (status, reason) as the Events posted so far tell it, while a
        # status written has transitions whose Events are not all posted (an unavailable API
        # ended the sweep): the retried sweep posts them, though the status is written.
        self._unposted: dict[str, dict[Any, tuple[Any, Any]]] = {}
        self._refused: dict[str, _Refusal] = {}  # key -> the last refusal of its status write
        self._refused_timer: asyncio.TimerHandle | None = None  # wakes a pass for the next retry
        # The one pending retry of a failed pass or sweep (``_retry_later``): while it is, no
        # sweep runs. Since the last sweep that went through: the wait before the last retry
        # (the next failure's doubles it) and the last problem logged (None: no failure).
        self._retry_timer: asyncio.TimerHandle | None = None
        self._retry_delay: float | None = None
        self._retry_problem: str | None = None
        self.passes = 0  # completed passes, for tests and the probe
        publisher.on_change(self.acks_changed)

    @property
    def table(self) -> table.RoutingTable | None:
        """The table of the last pass (None before the first)."""
        return None if self._compiled is None else self._compiled.table

    def touch(self) -> None:
        """An input may have changed: run a pass (after the holdoff)."""
        self._wake.set()

    def mark_synced(self) -> None:
        """Every index holds its initial listing: passes may run from now on."""
        if not self._synced:
            self._synced = True
            log.info("initial listing complete: routing tables will be published")
            self._wake.set()

    def acks_changed(self) -> None:
        """The publisher saw a proxy connect, ack or leave: recompute Programmed.

        A rejection is kept only while its proxy's stream is open: a StatefulSet successor of
        the same name (the pod name is all the publisher and the proxy index know it by) may be
        ready before any pass sees the name absent, and must not be reported with its
        predecessor's error; a proxy that reconnects acks the current table again, so its
        rejection, if it still holds, is back at once. The version a proxy applied is kept when
        its stream leaves: a proxy that reconnects (a network blip, a controller restart) keeps
        running it, and dropping it would turn Programmed to Pending on every route meanwhile;
        a successor runs the snapshot's table (the latest one written), until its ack says."""
        acks = self._publisher.acks()
        self._rejected = {proxy: ack for proxy, ack in acks.items() if not ack.accepted}
        for proxy, ack in acks.items():
            if ack.accepted:
                self._applied[proxy] = ack.version
        self._wake.set()

    async def restore(self) -> None:
        """Start from the snapshot Secret a previous controller wrote, if there is a usable
        one (see the module docstring); call before the first pass. Never raises for the API or
        the snapshot's content: without it, only status writes are lost, once."""
        try:
            stored = await self._cluster.load_snapshot()
            if stored is None:
                log.info("no routing table snapshot yet (no Secret, or an empty one): starting without one")
                return
            restored = decode_snapshot(stored)
        except (ClusterError, SnapshotUnreadableError) as error:
            log.warning(
                "cannot restart from the routing table snapshot Secret (%s): every MailRoute's "
                "status.proxies.version moves to the first table this controller publishes",
                error,
            )
            return
        self._published.restore(restored.table, restored.since)
        self._version_key = restored.table.version_key or self._version_key
        self._snapshot = restored.table.version  # it already holds this table and since map
        self._restored = self._awaiting_proxies = True
        log.info(
            "restarting from the routing table snapshot %s: its %d routes keep their "
            "status.proxies.version unless they changed meanwhile",
            restored.table.version,
            len(restored.table.routes),
        )

    async def run(self) -> None:
        """Restore, then pass after pass, each after a quiet holdoff, with status sweeps beside
        them, until cancelled."""
        await self.restore()
        sweeper = asyncio.create_task(self._sweep_loop(), name="mailgress status sweep")
        try:
            while True:
                await self._wake.wait()
                if not self._synced:
                    self._wake.clear()
                    continue
                await self._settle()
                try:
                    self._sweep_input = await self._publish_pass()
                except Exception as error:
                    self._retry_later(error)
                else:
                    self._sweep_due.set()
        finally:
            if self._retry_timer is not None:
                self._retry_timer.cancel()
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)

    async def _sweep_loop(self) -> None:
        """Write the statuses of the latest pass, again after each pass (level-based)."""
        while True:
            await self._sweep_due.wait()
            self._sweep_due.clear()
            assert self._sweep_input is not None  # set before the first _sweep_due
            inputs, compiled = self._sweep_input
            if self._retry_timer is not None:
                continue  # the API failed: statuses wait for the retry's pass, which sweeps
            if self._waiting_for_proxies(inputs):
                continue  # their acks wake a pass, which makes the sweep due again
            try:
                finished = await self._write_statuses(inputs, compiled, yield_to_newer=True)
            except Exception as error:
                self._retry_later(error)
            else:
                if finished and self._retry_problem is not None:
                    log.info("status writes go through again (the last failure: %s)", self._retry_problem)
                    self._retry_delay = self._retry_problem = None

    def _waiting_for_proxies(self, inputs: Inputs) -> bool:
        """After a restore, until a ready proxy that has not acked to this controller yet does
        (or PROXY_GRACE_SECONDS pass): it may run the restored table, and would count as running
        nothing, turning Programmed to Pending on every route for the time it takes to reconnect."""
        if self._awaiting_proxies and all(
            proxy in self._applied or proxy in self._rejected
            for proxy, ready in inputs.proxies.items()
            if ready
        ):
            self._awaiting_proxies = False
        return self._awaiting_proxies

    def _end_proxy_grace(self) -> None:
        """PROXY_GRACE_SECONDS after the first table: sweep without the proxies still silent."""
        if self._awaiting_proxies:
            log.info("not every ready proxy acked within %.0f s of the first table", PROXY_GRACE_SECONDS)
            self._awaiting_proxies = False
            self._sweep_due.set()

    def _retry_later(self, error: Exception) -> None:
        """A sweep the API failed (unavailable), or a bug in a pass: have one pass, and its sweep,
        run later (``_backoff`` up to MAX_RETRY_SECONDS after the last failure), but never end
        reconciling for good. One retry at most is pending: a failure meanwhile (a pass woken by
        a watch event) adds none. Logged unless it is the last failure's problem again."""
        if self._retry_timer is None:
            self._retry_delay = _backoff(self._retry_delay, MAX_RETRY_SECONDS)
            self._retry_timer = asyncio.get_running_loop().call_later(self._retry_delay, self._retry_due)
        problem = str(error) if isinstance(error, ClusterError) else repr(error)
        repeated, self._retry_problem = problem == self._retry_problem, problem
        if isinstance(error, ClusterError):
            log.log(
                logging.DEBUG if repeated else logging.WARNING,
                "Kubernetes API write failed, retrying in %.0f s: %s",
                self._retry_delay,
                error,
            )
        else:
            log.log(
                logging.DEBUG if repeated else logging.ERROR,
                "reconcile pass failed, retrying in %.0f s",
                self._retry_delay,
                exc_info=error,
            )

    def _retry_due(self) -> None:
        """The timer of ``_retry_later``: a pass, then its sweep."""
        self._retry_timer = None
        self._wake.set()

    async def _settle(self) -> None:
        """Wait until no change came for ``holdoff`` seconds, or ``max_holdoff`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_holdoff
        while True:
            self._wake.clear()
            wait = min(self._holdoff, deadline - loop.time())
            if wait <= 0:
                return
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                return

    async def reconcile(self) -> None:
        """One pass and its status sweep: compile if an input changed, publish, snapshot, write
        statuses."""
        inputs, compiled = await self._publish_pass()
        await self._write_statuses(inputs, compiled)

    async def _publish_pass(self) -> tuple[Inputs, compiler.Compiled]:
        """Compile if an input changed, publish a new version, snapshot it; what was used."""
        inputs = self._read()
        routes: list[_Parsed] = [entry.route for entry in inputs.routes]
        resolved = endpoints.resolve(compiler.service_keys(routes), inputs.services, inputs.slices)
        # Who holds what in the table published last (the restored snapshot's before the first).
        held = self._published.held
        if self._compiled is None or self._compiled_from != (routes, resolved, inputs.secrets, held):
            started = time.perf_counter()
            self._compiled = compiler.compile_table(routes, resolved, inputs.secrets, self._version_key, held)
            if self._metrics is not None:
                self._metrics.compile_seconds.observe(time.perf_counter() - started)
            self._compiled_from = (routes, resolved, inputs.secrets, held)
        compiled = self._compiled
        if compiled.table.version != self._pushed:
            if self._pushed is None and self._restored:  # proxies can connect from now on
                asyncio.get_running_loop().call_later(PROXY_GRACE_SECONDS, self._end_proxy_grace)
            self._publisher.publish(compiled.table)
            self._pushed = compiled.table.version
            self._published.add(compiled.table)
            # Compiling the same input with what this table holds gives it again (the compiler's
            # rule 2b), so the next pass compiles only when an input changes.
            self._compiled_from = (routes, resolved, inputs.secrets, self._published.held)
        for proxy in self._applied.keys() - inputs.proxies.keys():
            # The pod is gone: its name is not kept through rollouts (rejections leave with the
            # proxy's stream, ``acks_changed``).
            del self._applied[proxy]
        if self._snapshot != compiled.table.version:
            await self._save_snapshot(compiled.table)
        self.passes += 1
        return inputs, compiled

    async def _save_snapshot(self, new: _Table) -> None:
        """Write ``new`` to the snapshot Secret, unless the last failure says to wait.

        Never raises for the API or the table's size: proxies get every table over the push
        channel meanwhile, and statuses must not wait for a file that only a proxy booting while
        the controller is away reads.
        """
        failure = self._snapshot_failure
        if self._snapshot_paused or (failure and failure.too_large and failure.version == new.version):
            return
        try:
            snapshot = encode_snapshot(new, self._published.since_versions())
            await self._cluster.save_snapshot(snapshot)
        except SnapshotTooLargeError as error:
            self._snapshot_failed(new.version, error)
        except ClusterError as error:
            self._snapshot_paused = True
            asyncio.get_running_loop().call_later(RETRY_SECONDS, self._resume_snapshot)
            self._snapshot_failed(new.version, error)
        else:
            if failure is not None:
                log.info("routing table snapshot written again (%s)", new.version)
            self._snapshot = new.version
            self._snapshot_failure = None
            if (snapshot.since is None) != self._since_dropped:
                self._since_dropped = snapshot.since is None
                if self._since_dropped:
                    log.warning(
                        "the routing table snapshot %s holds no since map (the Secret holds only "
                        "the table): after a restart every MailRoute's status is written once",
                        new.version,
                    )

    def _resume_snapshot(self) -> None:
        """RETRY_SECONDS after a failed API write: the next pass writes the snapshot again."""
        self._snapshot_paused = False
        self._wake.set()

    def _snapshot_failed(self, version: str, error: SnapshotTooLargeError | ClusterError) -> None:
        """Count a failed snapshot write; log it unless the last failure was the same problem
        (a long outage or a table that stays too large must not flood the log)."""
        too_large = isinstance(error, SnapshotTooLargeError)
        if self._metrics is not None:
            reason = SNAPSHOT_TOO_LARGE if too_large else SNAPSHOT_API_ERROR
            self._metrics.snapshot_failures.labels(reason=reason).inc()
        # Too large is one problem whatever the sizes; an API failure is one per message.
        problem = "too large" if too_large else str(error)
        if self._snapshot_failure is None or self._snapshot_failure.problem != problem:
            log.error(
                "cannot write the routing table snapshot Secret, trying again %s (proxies still "
                "get every table over the push channel; one that starts while the controller is "
                "away serves an older snapshot or none): %s",
                "with the next table" if too_large else f"in {RETRY_SECONDS:.0f} s",
                error,
            )
        self._snapshot_failure = _SnapshotFailure(version, problem, too_large)

    def _running(self, publication: int, ready: Sequence[str]) -> int:
        """How many ``ready`` proxies run publication ``publication`` or a later one."""
        running = 0
        for proxy in ready:
            applied = self._published.publication(self._applied.get(proxy))
            if applied is not None and applied >= publication:
                running += 1
        return running

    def _programmed(self, since: _Since, generation: int, ready: Sequence[str]) -> conditions.Condition:
        """Programmed for a route in the table: which ready proxies run a table that holds its
        spec as it is now (any endpoints)."""
        running = self._running(since.spec_publication, ready)
        message = f"{running} of {len(ready)} proxies"
        if ready and running == len(ready):
            return conditions.Condition(
                "Programmed", "True", conditions.Reason.PROGRAMMED, message, generation
            )
        if not ready:
            message += ": no proxy pod is ready"
        latest = self._published.latest
        for proxy in ready:
            rejection = self._rejected.get(proxy)
            if rejection is not None and rejection.version == latest:
                message += f"; {proxy} rejected table {latest}: {rejection.error}"
        return conditions.Condition("Programmed", "Unknown", conditions.Reason.PENDING, message, generation)

    def _proxies(self, since: _Since, ready: Sequence[str]) -> dict[str, Any]:
        """status.proxies of a route in the table: the first table version that held it as it
        is now, and how many ready proxies run that version or a later one (each of which
        holds it unchanged)."""
        return {
            "programmed": self._running(since.publication, ready),
            "total": len(ready),
            "version": since.version,
        }

    def _desired(
        self, entry: RouteEntry, compiled: compiler.Compiled, ready: Sequence[str], current: Mapping[str, Any]
    ) -> dict[str, Any]:
        route = entry.route
        ours = list(compiled.conditions[route.key])
        since = self._published.since.get(route.key)
        if since is not None:  # in the table: Programmed and proxies come from the acks
            ours = [c for c in ours if c.type != "Programmed"]
            ours.append(self._programmed(since, route.generation, ready))
        existing = current.get("conditions")
        counts = compiled.endpoint_counts.get(route.key, ())
        # None deletes the field (merge patch): a route left out of the table (invalid, or
        # Conflicted: compiler rule 2) serves nothing and runs on no proxy, so it lists no
        # protocol or endpoint (kubectl's PROTOCOLS column) and no proxies.
        return {
            "observedGeneration": route.generation,
            "conditions": conditions.merge(existing if isinstance(existing, list) else [], ours, self._now()),
            "protocols": ",".join(p for p, _ in route.protocols)
            if since is not None and isinstance(route, mailroute.MailRoute)
            else None,
            "endpoints": (dict(counts) or None) if since is not None else None,
            "proxies": None if since is None else self._proxies(since, ready),
        }

    async def _write_statuses(
        self, inputs: Inputs, compiled: compiler.Compiled, *, yield_to_newer: bool = False
    ) -> bool:
        """Patch every status that differs from the desired one; with ``yield_to_newer``, stop
        as soon as a newer table than ``compiled``'s has been published. Whether it went through
        every route (False: overtaken).

        A sweep starts where the last overtaken one stopped: under a steady stream of new
        tables (endpoints that keep changing) every route still has its turn. A write the API
        server refuses holds up no other route (``_status_refused``); an unavailable API ends
        the sweep (ClusterUnavailableError), which the caller runs again later.
        """
        now = asyncio.get_running_loop().time()
        ready = sorted(proxy for proxy, is_ready in inputs.proxies.items() if is_ready)
        keys = [entry.route.key for entry in inputs.routes]
        start = keys.index(self._resume_at) if self._resume_at in keys else 0
        seen: set[str] = set()
        waiting: list[float] = []  # when the refused writes this sweep left are due again
        for entry in [*inputs.routes[start:], *inputs.routes[:start]]:
            key = entry.route.key
            if yield_to_newer and self._published.latest != compiled.table.version:
                self._resume_at = key  # the sweep of the newer table goes on from here
                return False
            seen.add(key)
            refusal = self._refused.get(key)
            if refusal and refusal.resource_version == entry.resource_version and now < refusal.retry_at:
                waiting.append(refusal.retry_at)
                continue
            written = self._written.get(key)
            current = written[1] if written and written[0] == entry.resource_version else entry.status
            desired = self._desired(entry, compiled, ready, current)
            if all(current.get(name) == value for name, value in desired.items()):
                if key in self._unposted:
                    await self._post_transitions(entry, desired["conditions"])
                continue
            namespace, name = entry.route.namespace, entry.route.name
            patch = _merge_patch(current, desired)
            try:
                if not await self._cluster.patch_status(namespace, name, entry.resource_version, patch):
                    continue  # changed or gone meanwhile: its watch event brings another pass
            except ClusterUnavailableError:
                raise
            except ClusterError as error:
                waiting.append(self._status_refused(entry, error))
                continue
            if self._refused.pop(key, None) is not None:
                log.info("the status of MailRoute %s is written again", key)
            self._written[key] = (entry.resource_version, desired)
            self._unposted.setdefault(key, _states(current.get("conditions")))
            await self._post_transitions(entry, desired["conditions"])
        self._resume_at = None
        for key in set(self._written) - seen:
            del self._written[key]
        for key in set(self._refused) - seen:
            del self._refused[key]  # the route is gone
        for key in set(self._unposted) - seen:
            del self._unposted[key]
        if waiting:
            self._wake_at(min(waiting))
        return True

    def _status_refused(self, entry: RouteEntry, error: ClusterError) -> float:
        """Note that the API server refused ``entry``'s status write: log it unless it is the
        route's last problem again; when to try again (the event loop's time; sooner if the
        object changes: ``MAX_REFUSED_RETRY_SECONDS``)."""
        key = entry.route.key
        last = self._refused.get(key)
        delay = _backoff(None if last is None else last.delay, MAX_REFUSED_RETRY_SECONDS)
        problem = str(error)
        log.log(
            logging.DEBUG if last is not None and last.problem == problem else logging.WARNING,
            "the Kubernetes API refused the status of MailRoute %s (the other routes' go on), "
            "trying again in %.0f s or when it changes: %s",
            key,
            delay,
            problem,
        )
        retry_at = asyncio.get_running_loop().time() + delay
        self._refused[key] = _Refusal(entry.resource_version, problem, delay, retry_at)
        return retry_at

    def _wake_at(self, due: float) -> None:
        """Have a pass, and its sweep, run at ``due`` (the event loop's time), when the first
        refused status write is due again. Only those a sweep left waiting count: one tried
        again and answered 404 or 409 waits for its watch event, not a timer."""
        timer = self._refused_timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._refused_timer = asyncio.get_running_loop().call_at(due, self._refused_due)

    def _refused_due(self) -> None:
        """The timer of ``_wake_at``: a pass, then a sweep that tries the refused writes due."""
        self._refused_timer = None
        self._wake.set()

    async def _post_transitions(self, entry: RouteEntry, after: list[Any]) -> None:
        """An Event for each of our conditions that became True or False (or changed reason)
        since the Events ``_unposted`` records. Each posted moves that record on, so an
        unavailable API (raised) leaves only the Events not posted for the retried sweep."""
        key = entry.route.key
        previous = self._unposted[key]
        for item in after:
            kind, status, reason = item["type"], item["status"], item["reason"]
            if kind not in conditions.CONDITION_TYPES or status == "Unknown":
                continue
            if previous.get(kind) != (status, reason):
                message = f"{kind}={status}: {item['message']}"[:MAX_EVENT_MESSAGE]
                await self._cluster.post_event(
                    entry, "Normal" if status == "True" else "Warning", reason, message
                )
                previous[kind] = (status, reason)
        del self._unposted[key]


def _merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch (RFC 7386) that makes the fields of ``current`` that ``desired`` names
    equal to it: the API server merges a map into the map it stores, so every key ``desired``
    no longer has (a protocol removed from status.endpoints) is sent as null, which deletes it;
    else it would stay for good, and the status differ from the desired one at every pass.
    Lists and other values replace what is stored; None deletes the field."""
    patch: dict[str, Any] = {}
    for name, value in desired.items():
        stored = current.get(name)
        if isinstance(value, Mapping) and isinstance(stored, Mapping):
            patch[name] = {**dict.fromkeys(stored.keys() - value.keys()), **_merge_patch(stored, value)}
        else:
            patch[name] = value
    return patch


def _states(found: Any) -> dict[Any, tuple[Any, Any]]:
    """Each condition's (status, reason) in a status's conditions list (any shape: it is the
    object's as the API server keeps it)."""
    return {
        item.get("type"): (item.get("status"), item.get("reason"))
        for item in (found if isinstance(found, list) else [])
        if isinstance(item, Mapping)
    }
