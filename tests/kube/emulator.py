"""The project's Kubernetes API emulator: kmock 0.8's KubernetesEmulator with what kopf, the
controller's own writes and kubectl 1.20 need of a real API server.

The fixtures in tests/kube/conftest.py serve one ``Emulator`` per test on a loopback port; the
operator under test (in its own thread) and kubectl talk to it over HTTP. The additions, each a
gap measured in the kubernetes-testing reference:

1. Server-set metadata: one resourceVersion counter for every write; on create also namespace
   (from the URL), uid, creationTimestamp, generation 1 and a name from generateName; a spec
   change bumps generation. The status subresource: writes to /status keep only status, writes
   to the object ignore status (as the API server, for resources that declare the subresource).
2. Optimistic concurrency: a merge patch that carries metadata.resourceVersion is refused with
   409 Conflict when the object has moved on; a JSON patch whose "test" fails gets 422.
3. LIST: the counter as the list's resourceVersion, kind and apiVersion, labelSelector
   (k=v, k==v, k!=v, k, !k) and fieldSelector (metadata.name, metadata.namespace).
4. WATCH: subscribed before the snapshot (no lost events), replay only after the given
   resourceVersion, events already in the snapshot dropped, both selectors, timeoutSeconds,
   and kubernetes_asyncio's ``watch=True``.
5. CustomResourceDefinitions become discovery (served versions, scope, names, status
   subresource) and get Established/NamesAccepted; deleting one removes it.
6. Compatibility: ``GET /version/``; 404/409 reasons NotFound/AlreadyExists/Conflict as kubectl
   expects; server-side apply of a missing object creates it; /api/v1/namespaces paths parse.
7. Every request is recorded per bearer token as the RBAC (verb, group, resource, subresource) it
   needs, so a test can list what the controller asked for; an access a test put in
   ``forbidden`` for that token is refused with 403 Forbidden before anything is stored, as the
   API server refuses what no RBAC rule grants.

Still missing (tests do not rely on them): BOOKMARK, 410 Gone, tombstones for watchers that were
away, PUT, strategic merge, OpenAPI, protobuf, schema validation, admission and RBAC rules
themselves (everything not forbidden is allowed).
"""

import asyncio
import copy
import datetime
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, k8s, parsing, references, rendering

CRDS = references.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
APPLY_PATCH = "application/apply-patch+yaml"
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
# Field selectors the API server supports for every resource (others are per kind).
FIELD_SELECTORS = ("metadata.name", "metadata.namespace")


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's parser, plus the cluster-scoped Namespace paths it splits wrongly (a namespace
    named "NAME" with no plural, or a ValueError for the collection)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, parts[4] if len(parts) > 4 else None)
    return _kmock_parse_path(path)


_kmock_parse_path = getattr(parsing.parse_path, "__wrapped__", parsing.parse_path)
_parse_path.__wrapped__ = _kmock_parse_path  # type: ignore[attr-defined]
# rendering.Request._parse looks the function up on the module at every request.
parsing.parse_path = _parse_path


@dataclass(frozen=True, order=True)
class Access:
    """One RBAC rule's worth of a request: a verb on a resource, or on a non-resource URL."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    non_resource_url: str = ""

    def as_json(self) -> dict[str, str]:
        return {key: value for key, value in vars(self).items() if value}


def _verb(request: rendering.Request) -> str:
    method = request.method.value.upper()
    if request.action == enums.action.WATCH:
        return "watch"
    if method == "GET":
        return "get" if request.name else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _labels_match(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in term:
            key, value = (side.strip() for side in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (side.strip() for side in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _fields_match(selector: str, body: Mapping[str, Any]) -> bool:
    metadata = body.get("metadata", {})
    for term in filter(None, (part.strip() for part in selector.split(","))):
        negate = "!=" in term
        key, value = (side.strip() for side in term.replace("!=", "=").replace("==", "=").split("=", 1))
        actual = metadata.get(key.removeprefix("metadata."), "")
        if (actual == value) == negate:
            return False
    return True


def _retag(request: rendering.Request, action: enums.action) -> None:
    # kmock matches its reactions against the very request object it parsed (a copy made with
    # attrs.evolve matches none), so a misread action is corrected on that object.
    object.__setattr__(request, "action", action)


def _bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=400, reason="BadRequest", message=message)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """A stateful API server in memory, close enough for kopf, our writer and kubectl."""

    _counter: "itertools.count[int]" = attrs.field(factory=lambda: itertools.count(1), init=False)
    _resource_version: int = attrs.field(default=0, init=False)
    _mutations: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _accesses: dict[str, set[Access]] = attrs.field(factory=dict, init=False)
    # token -> accesses refused with 403 (tests add and remove them while the emulator runs)
    forbidden: dict[str, set[Access]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /version/"] << self._serve_server_version

    # -----------------------------------------------------------------------------------------
    # Bookkeeping

    def accesses(self, token: str) -> list[Access]:
        """What requests with ``Authorization: Bearer <token>`` asked for, sorted, once each."""
        return sorted(self._accesses.get(token, ()))

    def _record(self, request: rendering.Request) -> None:
        """Note the access ``request`` needs; refuse it if it is forbidden for its token."""
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip()
        if request.resource is None:
            access = Access(verb=_verb(request), non_resource_url=request.url.path)
        elif request.resource.plural is None:
            # Discovery of a group or version (/api/v1, /apis/g/v): non-resource URLs too.
            access = Access(verb="get", non_resource_url=request.url.path)
        else:
            access = Access(
                verb=_verb(request),
                group=request.resource.group or "",
                resource=request.resource.plural,
                subresource=request.subresource or "",
            )
        self._accesses.setdefault(token, set()).add(access)
        if access in self.forbidden.get(token, ()):
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f"{access.resource or access.non_resource_url} is forbidden: cannot {access.verb}",
            )

    def _next_version(self) -> str:
        self._resource_version = next(self._counter)
        return str(self._resource_version)

    def _stored(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if request.name is None or key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _info(self, resource: references.resource) -> kmock.ResourceInfo | None:
        return self.resources.get(resource)

    def _has_status(self, resource: references.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    # -----------------------------------------------------------------------------------------
    # Requests

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._record(request)
        if request.action == enums.action.LIST and request.params.get("watch", "").lower() in ("true", "1"):
            _retag(request, enums.action.WATCH)
        if request.resource is None or request.action not in (
            enums.action.CREATE,
            enums.action.UPDATE,
            enums.action.DELETE,
        ):
            return await super()._handle(request)
        # Writes one at a time, so resourceVersions are stored in the order they are handed out
        # and a watch snapshot sees exactly the writes numbered up to the counter.
        async with self._mutations:
            self._prepare_write(request)
            response = await super()._handle(request)
            if request.resource == CRDS:
                self._sync_discovery(request)
            return response

    def _prepare_write(self, request: rendering.Request) -> None:
        """Complete the body of a write in place (kmock stores what the request carries)."""
        stored = self._stored(request)
        if (
            request.action == enums.action.UPDATE
            and stored is None
            and APPLY_PATCH in request.headers.get("Content-Type", "")
        ):
            # Server-side apply of a missing object creates it.
            if not isinstance(request.data, dict):
                raise _bad_request("the body of an apply must be an object")
            request.data.setdefault("metadata", {}).setdefault("name", request.name)
            _retag(request, enums.action.CREATE)
        if request.action == enums.action.CREATE:
            self._prepare_create(request)
        elif request.action == enums.action.UPDATE and stored is not None:
            self._prepare_update(request, stored)
        elif request.action == enums.action.DELETE and stored is not None:
            key = (request.resource, request.namespace, request.name)
            self.objects[key]["metadata"] = {**stored["metadata"], "resourceVersion": self._next_version()}

    def _prepare_create(self, request: rendering.Request) -> None:
        body = request.data
        if not isinstance(body, dict):
            raise _bad_request("the body of a create must be a JSON object")
        metadata = body.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)
        if not metadata.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name: Required value")
        if request.namespace:
            metadata["namespace"] = request.namespace
        metadata.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            generation=1,
            resourceVersion=self._next_version(),
        )
        if request.resource == CRDS:
            names = body.get("spec", {}).get("names", {})
            body["status"] = {
                "acceptedNames": names,
                "storedVersions": [
                    v["name"] for v in body.get("spec", {}).get("versions", []) if v.get("storage")
                ],
                "conditions": [
                    {
                        "type": kind,
                        "status": "True",
                        "reason": reason,
                        "message": "",
                        "lastTransitionTime": "",
                    }
                    for kind, reason in (
                        ("NamesAccepted", "NoConflicts"),
                        ("Established", "InitialNamesAccepted"),
                    )
                ],
            }

    def _prepare_update(self, request: rendering.Request, stored: dict[str, Any]) -> None:
        patch = request.data
        version = self._next_version()
        if isinstance(patch, list):
            try:
                after = jsonpatch.apply_patch(copy.deepcopy(stored), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(error)) from error
            patch.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if after.get("spec") != stored.get("spec"):
                generation = stored["metadata"].get("generation", 0) + 1
                patch.append({"op": "add", "path": "/metadata/generation", "value": generation})
            return
        if not isinstance(patch, dict):
            raise _bad_request("the body of a patch must be a JSON object or a JSON patch list")
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected is not None and str(expected) != stored["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message="the object has been modified; please apply your changes to the latest version",
            )
        if self._has_status(request.resource):  # type: ignore[arg-type]
            ignored = [key for key in patch if key not in ("status", "metadata")]
            for key in ignored if request.subresource == "status" else ["status"]:
                patch.pop(key, None)
        metadata = patch.get("metadata") or {}
        patch["metadata"] = metadata
        metadata["resourceVersion"] = version
        if "spec" in patch:
            merged = kmock.Object(copy.deepcopy(stored))
            merged.patch({"spec": patch["spec"]})
            if merged.raw.get("spec") != stored.get("spec"):
                metadata["generation"] = stored["metadata"].get("generation", 0) + 1

    def _sync_discovery(self, request: rendering.Request) -> None:
        """Register (or drop) the resources a CRD serves once the write is done."""
        name = request.name or (request.data or {}).get("metadata", {}).get("name")
        key = (CRDS, None, name)
        if key not in self.objects or self.objects[key].deleted:
            crd = self.objects[key].last.raw if key in self.objects else {}
            for version in crd.get("spec", {}).get("versions", []):
                resource = references.resource(
                    crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]
                )
                if resource in self.resources:
                    del self.resources[resource]
            return
        spec = self.objects[key].raw["spec"]
        names = spec["names"]
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            self.resources[references.resource(spec["group"], version["name"], names["plural"])] = (
                kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular", names["kind"].lower()),
                    namespaced=spec.get("scope") == "Namespaced",
                    verbs=ALL_VERBS,
                    shortnames=names.get("shortNames", []),
                    categories=names.get("categories", []),
                    subresources=["status"] if "status" in version.get("subresources", {}) else [],
                )
            )

    # -----------------------------------------------------------------------------------------
    # Reads

    def _matching(self, request: rendering.Request) -> list[dict[str, Any]]:
        labels = request.params.get("labelSelector", "")
        fields = request.params.get("fieldSelector", "")
        for term in filter(None, fields.replace("!=", "=").replace("==", "=").split(",")):
            if term.split("=", 1)[0].strip() not in FIELD_SELECTORS:
                raise _bad_request(f'field label not supported: "{term}"')
        found = []
        for (resource, namespace, _), obj in self.objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            body = obj.raw
            if _labels_match(labels, body.get("metadata", {}).get("labels") or {}) and _fields_match(
                fields, body
            ):
                found.append(body)
        return found

    def _list_identity(self, resource: references.resource) -> dict[str, str]:
        info = self._info(resource)
        kind = info.kind if info is not None and info.kind else (resource.plural or "").capitalize()
        api_version = f"{resource.group}/{resource.version}" if resource.group else str(resource.version)
        return {"apiVersion": api_version, "kind": f"{kind}List"}

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        if not any(known == request.resource for known in self._get_resources()):
            raise kmock.KubernetesResourceNotFoundError()
        async with self._mutations:
            items = self._matching(request)
            version = str(self._resource_version)
        return {
            **self._list_identity(request.resource),
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        assert request.resource is not None
        yield b""  # send the headers: the stream is open even if nothing happens
        since_text = request.params.get("resourceVersion", "")
        since = int(since_text) if since_text.isdigit() else 0
        timeout_text = request.params.get("timeoutSeconds", "")
        timeout = float(timeout_text) if timeout_text.isdigit() else None
        bus = self._buses[request.resource]
        mark = await bus.mark()  # before the snapshot: nothing written after it can be missed
        try:
            async with self._mutations:
                snapshot = self._matching(request)
                covered = max(self._resource_version, since)
            replay = "MODIFIED" if since else "ADDED"
            for body in sorted(snapshot, key=lambda item: int(item["metadata"]["resourceVersion"])):
                if int(body["metadata"]["resourceVersion"]) > since:
                    yield {"type": replay, "object": body}
            labels = request.params.get("labelSelector", "")
            fields = request.params.get("fieldSelector", "")
            try:
                async with asyncio.timeout(timeout):
                    async for event in bus.stream(since=mark):
                        body = event.get("object", {})
                        metadata = body.get("metadata", {})
                        if int(metadata.get("resourceVersion") or 0) <= covered:
                            continue
                        if request.namespace is not None and metadata.get("namespace") != request.namespace:
                            continue
                        if request.name is not None and metadata.get("name") != request.name:
                            continue
                        if _labels_match(labels, metadata.get("labels") or {}) and _fields_match(
                            fields, body
                        ):
                            yield event
            except TimeoutError:
                return  # the client reconnects with the last resourceVersion it saw
        finally:
            await bus.unmark(mark)

    # -----------------------------------------------------------------------------------------
    # Errors as the API server words them

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, k8s.KubernetesObjectConflictError):
            exc = kmock.KubernetesError(
                status=409, reason="AlreadyExists", message="the object already exists"
            )
        elif isinstance(exc, kmock.KubernetesNotFoundError):
            exc = kmock.KubernetesError(status=404, reason="NotFound", message=exc.message or "not found")
        return await super()._render_error(exc)
