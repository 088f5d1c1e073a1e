"""Standalone route source: MailRoute files on disk compiled into the proxy's routing table.

Reads the MailRoute manifests named in the settings (the same YAML users ``kubectl apply``),
compiles them with the controller's pure compiler against the ``services`` stand-in for
EndpointSlices and the ``secrets`` stand-in for the labelled Secrets auth_http ``headersFrom``
reads, and installs the table. The files are re-read every ``POLL_INTERVAL`` seconds
and a changed content is compiled and swapped in; open sessions are untouched. A file set that
cannot be read or parsed keeps the last good table in force. An Invalid MailRoute (one ``kubectl
apply`` would refuse, leaving the stored object as it was) is treated per route, as the API server
treats each object: its version last applied stays, and every other change is applied; one never
applied (at start, or new) is left out. A file holding an Invalid MailRoute is mid-edit: the
routes last applied from it that it no longer defines validly (a typo in the name gives another
key) keep their version too. Last applied versions live in this process only: a restart
with the file still Invalid leaves the route out. A file may hold other kinds beside
the MailRoutes (a Service, as kubectl users keep them), which are skipped, and lists (``kind:
List``, what ``kubectl get -o yaml`` writes), whose items count as documents; a document meant as
a MailRoute with a mistyped kind or apiVersion is no other kind: it becomes an Invalid route, as
``kubectl apply`` would refuse it (``meant_as_mailroute``). Problems with single objects are
logged with the same messages the controller writes into MailRoute status, which never hold an
auth_http header value; ``printable_table`` is the table with those values redacted, for output.
"""

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex
from typing import Any

import yaml

from controller import compiler, conditions, mailroute
from proxy import table
from proxy.server.routes import TableHolder
from proxy.settings import SecretData, yaml_problem
from proxy.table import Endpoint

log = logging.getLogger("mailgress.standalone")

# Edits must take effect within two seconds (issue "Proxy core"); four reads a second of a few
# small files cost nothing measurable.
POLL_INTERVAL = 0.25
# The API group of MailRoutes (mailgress.io), whatever the version.
MAILROUTE_GROUP = mailroute.API_VERSION.partition("/")[0]
# kubectl takes a document whose kind ends so, with an items list (kind List from kubectl get -o
# yaml; MailRouteList from the API), as the objects in the list.
LIST_KIND_SUFFIX = "List"
REDACTED = "<redacted>"
_NO_SECRETS: SecretData = {}


class ManifestError(ValueError):
    """A route file that cannot be read or is not YAML; the message names the file."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One object that did not make it into the table as written, and why.

    ``invalid``: Accepted=False (Invalid), an object ``kubectl apply`` would refuse (a broken
    schema or CEL rule, a mistyped kind, a namespace/name given twice), as opposed to one the
    API server takes and the controller reports (Conflicted, an unresolved backend or Secret).
    """

    route: str
    message: str
    invalid: bool = False


def read_manifests(paths: Sequence[Path]) -> list[tuple[Path, bytes]]:
    contents = []
    for path in paths:
        try:
            contents.append((path, path.read_bytes()))
        except OSError as error:
            raise ManifestError(f"{path}: cannot read: {error.strerror}") from error
    return contents


def meant_as_mailroute(document: Mapping[str, Any]) -> bool:
    """Whether ``document`` is to be parsed as a MailRoute (and so be one, or Invalid): its kind
    is MailRoute in any letter case, or its apiVersion in the mailgress.io group, or it lacks a
    kind or an apiVersion (no object kubectl applies). A kind and apiVersion of something else (a
    Service beside the routes) mean another kind."""
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if not (isinstance(kind, str) and kind and isinstance(api_version, str) and api_version):
        return True
    return kind.lower() == mailroute.KIND.lower() or api_version.partition("/")[0] == MAILROUTE_GROUP


def _objects(path: Path, document: Any) -> list[Mapping[str, Any]]:
    """The objects of one YAML document: itself, or a list's items."""
    if not isinstance(document, dict):
        raise ManifestError(f"{path}: every YAML document must be a mapping")
    kind = document.get("kind")
    if not (isinstance(kind, str) and kind.endswith(LIST_KIND_SUFFIX) and "items" in document):
        return [document]
    items = document["items"]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ManifestError(f"{path}: the items of a {kind} must be a list of mappings")
    return items


def sourced_bodies(contents: Sequence[tuple[Path, bytes]]) -> list[tuple[Path, Mapping[str, Any]]]:
    """Every document of the files meant as a MailRoute (``meant_as_mailroute``), lists'
    items included, with the file it is in; other kinds are skipped."""
    bodies: list[tuple[Path, Mapping[str, Any]]] = []
    for path, content in contents:
        try:
            documents = list(yaml.safe_load_all(content))
        except yaml.YAMLError as error:
            raise ManifestError(f"{path}: not valid YAML: {yaml_problem(error)}") from error
        for document in documents:
            if document is not None:
                bodies += ((path, body) for body in _objects(path, document) if meant_as_mailroute(body))
    return bodies


def mailroute_bodies(contents: Sequence[tuple[Path, bytes]]) -> list[Mapping[str, Any]]:
    """``sourced_bodies`` without the files."""
    return [body for _, body in sourced_bodies(contents)]


def secret_values(secrets: SecretData) -> dict[compiler.SecretRef, compiler.SecretValues]:
    """The settings' secrets as the compiler takes Secrets: each value as a header value, None
    where it is none (as the operator's Secret index gives them)."""
    return {
        reference: {key: mailroute.header_value(value.encode()) for key, value in data.items()}
        for reference, data in secrets.items()
    }


def printable_table(routing: table.RoutingTable) -> dict[str, Any]:
    """The table's JSON document with every auth_http header value redacted (literal headers
    and headersFrom alike: both may carry a shared secret), for ``routes check`` to print;
    without the version key, which with the version would let a guess at a value be checked."""
    document: dict[str, Any] = json.loads(table.to_json(routing))
    document.pop("versionKey", None)
    for route in document["routes"]:
        if "httpAuth" in route:
            route["httpAuth"]["headers"] = [[name, REDACTED] for name, _ in route["httpAuth"]["headers"]]
    return document


def compile_bodies(
    bodies: Sequence[Mapping[str, Any]],
    services: Mapping[tuple[str, str, str], tuple[Endpoint, ...]],
    secrets: SecretData = _NO_SECRETS,
    version_key: str | None = None,
) -> tuple[compiler.Compiled, list[Problem]]:
    """Parse and compile (``compile_routes``)."""
    return compile_routes([mailroute.parse(body) for body in bodies], services, secrets, version_key)


def compile_routes(
    routes: Sequence[mailroute.MailRoute | mailroute.SpecError],
    services: Mapping[tuple[str, str, str], tuple[Endpoint, ...]],
    secrets: SecretData = _NO_SECRETS,
    version_key: str | None = None,
) -> tuple[compiler.Compiled, list[Problem]]:
    """Compile; every object that is not Accepted or not resolved becomes a Problem.

    ``version_key`` hides auth_http header values in the table's version (table.make_table);
    None: a random one of its own (``routes check``: nothing outlives the command).
    """
    compiled = compiler.compile_table(
        routes,
        services,
        secret_values(secrets),
        token_hex(table.VERSION_KEY_BYTES) if version_key is None else version_key,
    )
    problems = [
        Problem(
            route=key,
            message=f"{condition.type}={condition.status} ({condition.reason}): {condition.message}",
            invalid=condition.type == "Accepted" and condition.reason == conditions.Reason.INVALID,
        )
        for key, found in sorted(compiled.conditions.items())
        for condition in found
        if condition.type in ("Accepted", "ResolvedRefs") and condition.status != "True"
    ]
    return compiled, problems


async def watch(
    paths: Sequence[Path],
    services: Mapping[tuple[str, str, str], tuple[Endpoint, ...]],
    holder: TableHolder,
    secrets: SecretData = _NO_SECRETS,
) -> None:
    """Keep ``holder`` in step with the route files until cancelled."""
    version_key = token_hex(table.VERSION_KEY_BYTES)  # one per process: unchanged files, same version
    applied: dict[str, Applied] = {}  # each MailRoute's version last applied, by key
    last: list[tuple[Path, bytes]] | None = None
    last_error = ""
    while True:
        try:
            contents = read_manifests(paths)
            if contents != last:
                last = contents
                bodies = sourced_bodies(contents)
                applied = _apply(bodies, services, holder, secrets, version_key=version_key, applied=applied)
            last_error = ""
        except ManifestError as error:
            if str(error) != last_error:  # once per distinct problem, not every poll
                log.error("%s; keeping the routing table in use", error)
            last_error = str(error)
            last = None
        await asyncio.sleep(POLL_INTERVAL)


@dataclass(frozen=True, slots=True)
class Applied:
    """A MailRoute's version last applied, and the files it was applied from."""

    route: mailroute.MailRoute
    files: tuple[str, ...]


def _apply(
    sourced: Sequence[tuple[Path, Mapping[str, Any]]],
    services: Mapping[tuple[str, str, str], tuple[Endpoint, ...]],
    holder: TableHolder,
    secrets: SecretData,
    *,
    version_key: str,
    applied: Mapping[str, Applied],
) -> dict[str, Applied]:
    """Compile one changed file set and install its table; returns each MailRoute's version now
    applied. An Invalid MailRoute keeps its version in ``applied`` (``kubectl apply`` would refuse
    the edit and leave the stored object), so a typo in one field neither drops a route (and
    fails its users' logins) nor holds back the other changes; without one it is left out. A
    file holding an Invalid document is mid-edit: the routes last applied from it that it no
    longer defines validly keep their version too (a typo in the name, or in ``metadata``, gives
    the document another key; ``kubectl apply`` without ``--prune`` deletes nothing either).

    Called once per change of the files, so each problem is logged once per change.
    """
    parsed = [(path, mailroute.parse(body)) for path, body in sourced]
    files: dict[str, dict[str, None]] = {}  # the files defining each namespace/name, in order
    for path, route in parsed:
        files.setdefault(route.key, {})[str(path)] = None
    routes = [route for _, route in parsed]
    compiled, problems = compile_routes(routes, services, secrets, version_key)
    invalid = {problem.route: problem.message for problem in problems if problem.invalid}
    mid_edit = {file for key in invalid for file in files[key]}
    kept = {key: applied[key] for key in invalid if key in applied}
    # Last applied from a file mid-edit, and no longer in the files (an Invalid one is kept above).
    orphaned = {
        key: last
        for key, last in applied.items()
        if key not in files and any(file in mid_edit for file in last.files)
    }
    if kept or orphaned:  # compiled again with the versions kept instead of every copy of their keys
        routes = [route for route in routes if route.key not in kept]
        routes += [last.route for last in (*kept.values(), *orphaned.values())]
        compiled, problems = compile_routes(routes, services, secrets, version_key)
    for key, message in invalid.items():
        consequence = (
            "its last applied version stays in use; the other changes are applied"
            if key in kept
            else "left out of the routing table"
        )
        log.error("%s: MailRoute %s: %s; %s", ", ".join(files[key]), key, message, consequence)
    for file in sorted(mid_edit):
        if names := sorted(key for key, last in orphaned.items() if file in last.files):
            log.error(
                "%s: holds an Invalid MailRoute; MailRoute %s, applied from it and no longer in it, "
                "stays in use as last applied until the file is valid",
                file,
                ", ".join(names),
            )
    for problem in problems:
        # A route left out as Invalid has its one ERROR above (not also "ResolvedRefs Pending").
        if problem.route not in invalid or problem.route in kept:
            log.warning("MailRoute %s: %s", problem.route, problem.message)
    holder.swap(compiled.table)
    now = {
        route.key: Applied(route, tuple(files[route.key]))
        for _, route in parsed
        if isinstance(route, mailroute.MailRoute) and route.key not in invalid
    }
    return {**now, **kept, **orphaned}
