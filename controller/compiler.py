"""The compiler: parsed MailRoutes, backend endpoints and Secrets in, one routing table and conditions out.

The reconciler (and ``mailgress routes check``) calls ``compile_table`` with every MailRoute it
knows, parsed or not, the ready endpoints of every backend Service port those routes name, and
the data of the labelled Secrets their auth_http ``headersFrom`` may name.
Pure and deterministic (Contour's DAG build, in small): the output does not depend on the order
of the input, equal input gives an equal ``table.version``, and a user's mistake becomes a
condition on that user's object, never an exception. No I/O, no clocks, no logging.

Rules, in order:
1. A ``SpecError`` is Accepted=False/Invalid and stays out of the table; so is every copy of
   a namespace/name given more than once (possible only with files).
2. Routes claim (protocol, kind, key) triples, the kind being user or domain and the key as
   written (the table folds case; the CRD already insists on lower case). Users and domains are
   separate namespaces, as in ``table.lookup``: a user "example.com" (a login without a domain)
   and a domain "example.com" never match the same login, so they do not conflict; two routes
   claiming one user, or one domain, for one protocol do. Oldest first (creationTimestamp, then
   namespace/name as Gateway API breaks ties), a route whose claims are all free is Accepted
   and takes them; a route with any taken claim is Accepted=False/Conflicted, names the owner
   and is left out entirely. Whole-route exclusion is deliberate: a route is one mailbox
   placement, and serving half of it (its IMAP but not its SMTP, or some domains only) would
   split a user's mail between backends without anyone having asked for it. Only accepted
   routes claim keys, so a route that loses to an older one does not block a third.
   Across namespaces a user or domain is one key for every protocol: a route of another
   namespace that claims it for any protocol holds it (the older wins, as above), so the owner of
   alpha.example for IMAP does not find its users' mail collected by inbound SMTP elsewhere.
   The catch-all "*" stays per protocol (it is everyone's default, nobody's domain).
2a. A namespace cannot take the logins of a domain another namespace routes (the tenancy rule;
   age does not matter here, so a route created first to lie in wait gains nothing): a claim is
   refused (Conflicted, naming the owner) when the nearest less specific domain claim that
   ``table.lookup`` would otherwise have reached, of any protocol, is another namespace's:
   for a user u@d the domain d, then its longest wildcard; for a domain or a wildcard, its
   longest less specific wildcard; never the catch-all. So team-x cannot claim
   ceo@alpha.example while mail routes alpha.example (or *.alpha.example, or *.example), nor
   dept.alpha.example while mail routes *.alpha.example. A wildcard below another namespace's
   exact domain (team-x's *.alpha.example against mail's alpha.example) is allowed: it takes
   no login that route serves (lookup never goes from x.alpha.example to alpha.example), and a
   subdomain is often another team's on purpose; whoever wants the subdomains claims the
   wildcard too. Refusing a route frees its keys, which can change the owners the rule sees, so
   settling and this check repeat until no accepted route is refused (at most once per route; a
   route once refused stays refused, which keeps the outcome independent of input order).
3. Backends resolve only in the route's own namespace: the ``ServiceKey`` is always the route's
   namespace. A missing key is BackendNotFound, an empty endpoint list NoReadyEndpoints; either
   way the route stays in the table with no endpoints for that protocol, so its users get a
   temporary failure rather than "no such user" (and no catch-all steals them meanwhile).
   headersFrom Secrets resolve the same way, in the route's namespace: a Secret or key that is
   missing (or a Secret without the label mailroute.AUTH_HTTP_LABEL, which the caller
   never sees) is SecretNotFound, a value that is not a header value InvalidSecretValue; the
   route stays in the table with auth mode http and no auth_http settings, which the proxy
   answers with a temporary failure. Messages name the Secret and key, never a value.
4. Programmed is Unknown/Pending for routes in the table (the operator sets it from proxy
   acks) and False/Invalid for the rest.
"""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controller import conditions, mailroute
from proxy import table

ServiceKey = tuple[str, str, str]  # (namespace, Service name, port as the MailRoute wrote it, as str)
# Aliases: inside Compiled the field names "table" and "conditions" shadow the modules.
_Table = table.RoutingTable
_Conditions = tuple[conditions.Condition, ...]
_Counts = tuple[tuple[table.Protocol, int], ...]
# (protocol, "user" or "domain", key): the kind is part of the claim, as lookup keeps the two apart.
_Claim = tuple[table.Protocol, str, str]
SecretRef = tuple[str, str]  # (namespace, Secret name)
# A labelled Secret's data as headersFrom may use it: each key's value as mailroute.header_value
# made it from the Secret's bytes, None where those bytes are no header value.
SecretValues = Mapping[str, str | None]
# ResolvedRefs=False names every problem; its reason is the first kind found in this order.
_PROBLEM_ORDER = (
    conditions.Reason.BACKEND_NOT_FOUND,
    conditions.Reason.SECRET_NOT_FOUND,
    conditions.Reason.INVALID_SECRET_VALUE,
    conditions.Reason.NO_READY_ENDPOINTS,
)
_NO_SECRETS: Mapping[SecretRef, SecretValues] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Compiled:
    """One compilation: the table to publish and what to write into each object's status.

    ``conditions`` and ``endpoint_counts`` are keyed by "namespace/name" and sorted by it;
    ``endpoint_counts`` has every valid route (also conflicted ones), one count per protocol.
    """

    table: _Table
    conditions: Mapping[str, _Conditions]
    endpoint_counts: Mapping[str, _Counts]


def service_key(route: mailroute.MailRoute, spec: mailroute.ProtocolSpec) -> ServiceKey:
    """The Service port a protocol block refers to, always in the route's own namespace."""
    return (route.namespace, spec.backend.service, str(spec.backend.port))


def service_keys(routes: Sequence[mailroute.MailRoute | mailroute.SpecError]) -> list[ServiceKey]:
    """Every Service port these routes refer to, sorted: what the caller must resolve."""
    return sorted(
        {
            service_key(route, spec)
            for route in routes
            if isinstance(route, mailroute.MailRoute)
            for _, spec in route.protocols
        }
    )


def _claims(route: mailroute.MailRoute) -> list[_Claim]:
    """(protocol, kind, key) for every key the route claims, in a fixed order.

    Keys are compared as written: the CRD only admits lower-case users and domains, which is
    what the table's case folding turns every login into.
    """
    keys = sorted({("user", user) for user in route.users} | {("domain", domain) for domain in route.domains})
    return [(protocol, kind, key) for protocol, _ in route.protocols for kind, key in keys]


def _conflict_message(loser: mailroute.MailRoute, winner: mailroute.MailRoute, claim: _Claim) -> str:
    protocol, kind, key = claim
    why = (
        "created earlier"
        if winner.creation_timestamp < loser.creation_timestamp
        else "equally old and first by namespace/name"
    )
    return f'{kind} "{key}" is already routed for {protocol} by {winner.key} ({why}); this route is not used'


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a valid route is left out: the route that holds what it claims, and the message."""

    owner: mailroute.MailRoute
    message: str


# (kind, key) -> the oldest accepted route claiming it and that claim (any protocol).
_KeyOwners = dict[tuple[str, str], tuple[mailroute.MailRoute, _Claim]]


def _taken(
    route: mailroute.MailRoute, owners: Mapping[_Claim, mailroute.MailRoute], by_key: _KeyOwners
) -> _Refusal | None:
    """The first claim of ``route`` an accepted route holds (rule 2), or None."""
    for claim in _claims(route):
        winner = owners.get(claim)
        if winner is not None:
            return _Refusal(winner, _conflict_message(route, winner, claim))
        _, kind, key = claim
        held = by_key.get((kind, key))
        if held is not None and held[0].namespace != route.namespace and key != table.CATCH_ALL:
            return _Refusal(held[0], _conflict_message(route, held[0], held[1]))
    return None


def _settle(
    routes: Sequence[mailroute.MailRoute], refused: Mapping[str, _Refusal]
) -> dict[str, _Refusal | None]:
    """Rule 2 over ``routes`` (oldest first): each route's refusal, None when it is accepted.
    Routes in ``refused`` stay refused and claim nothing."""
    owners: dict[_Claim, mailroute.MailRoute] = {}
    by_key: _KeyOwners = {}
    outcome: dict[str, _Refusal | None] = {}
    for route in routes:
        refusal = refused.get(route.key) or _taken(route, owners, by_key)
        outcome[route.key] = refusal
        if refusal is None:
            for claim in _claims(route):
                owners[claim] = route
                by_key.setdefault(claim[1:], (route, claim))
    return outcome


def _wildcards_above(domain: str) -> list[str]:
    """The wildcards covering ``domain``, longest first (as ``table.lookup`` walks them)."""
    labels = domain.split(".")
    return [table.WILDCARD_PREFIX + ".".join(labels[start:]) for start in range(1, len(labels))]


def _less_specific(kind: str, key: str) -> list[str]:
    """The domain keys ``table.lookup`` would reach for the logins of this claim if it were not
    there, nearest first; never the catch-all."""
    if kind == "user":
        domain = table.domain_of(key)
        return [domain, *_wildcards_above(domain)] if domain else []
    if key == table.CATCH_ALL:
        return []
    return _wildcards_above(key.removeprefix(table.WILDCARD_PREFIX))


def _carved(accepted: Sequence[mailroute.MailRoute]) -> dict[str, _Refusal]:
    """Rule 2a: the accepted routes with a claim inside a domain another namespace routes."""
    holders: dict[str, list[mailroute.MailRoute]] = {}
    for route in accepted:
        for domain in route.domains:
            holders.setdefault(domain, []).append(route)
    found: dict[str, _Refusal] = {}
    for route in accepted:
        keys = sorted({("user", user) for user in route.users} | {("domain", d) for d in route.domains})
        for kind, key in keys:
            nearest = next((domain for domain in _less_specific(kind, key) if domain in holders), None)
            if nearest is None:
                continue
            foreign = [owner for owner in holders[nearest] if owner.namespace != route.namespace]
            if foreign:
                owner = min(foreign, key=lambda other: (other.creation_timestamp, other.key))
                message = (
                    f'{kind} "{key}" is within the domain "{nearest}", which {owner.key} routes: '
                    f"another namespace's; this route is not used"
                )
                found[route.key] = _Refusal(owner, message)
                break
    return found


_Problems = dict[conditions.Reason, list[str]]


def _http_auth(
    route: mailroute.MailRoute, secrets: Mapping[SecretRef, SecretValues], problems: _Problems
) -> table.HttpAuth | None:
    """The route's auth_http settings with its headersFrom values added (headers sorted by
    name), or None when one of them does not resolve (each such problem added to ``problems``)."""
    if route.http_auth is None or not route.headers_from:
        return route.http_auth
    resolved: list[tuple[str, str]] = []
    for header in route.headers_from:
        secret = secrets.get((route.namespace, header.secret))
        where = f"headersFrom {header.name}: Secret {route.namespace}/{header.secret}"
        if secret is None:
            label = f'{mailroute.AUTH_HTTP_LABEL}: "{mailroute.AUTH_HTTP_LABEL_VALUE}"'
            problems[conditions.Reason.SECRET_NOT_FOUND].append(
                f"{where} not found (or not labelled {label})"
            )
        elif header.key not in secret:
            problems[conditions.Reason.SECRET_NOT_FOUND].append(f"{where} has no key {header.key}")
        else:
            value = secret[header.key]
            if value is None:
                problems[conditions.Reason.INVALID_SECRET_VALUE].append(
                    f"{where} key {header.key} is not a header value (printable ASCII, spaces and tabs, "
                    f"at most {mailroute.MAX_HEADER_VALUE} bytes, no line break at the end)"
                )
            else:
                resolved.append((header.name, value))
    if len(resolved) < len(route.headers_from):
        return None
    headers = tuple(sorted(route.http_auth.headers + tuple(resolved)))
    return dataclasses.replace(route.http_auth, headers=headers)


def _resolve(
    route: mailroute.MailRoute,
    endpoints: Mapping[ServiceKey, Sequence[table.Endpoint]],
    secrets: Mapping[SecretRef, SecretValues],
) -> tuple[tuple[tuple[table.Protocol, table.Upstream], ...], table.HttpAuth | None, conditions.Condition]:
    """The route's upstreams (endpoints sorted, duplicates dropped), its auth_http settings with
    the headersFrom values, and its ResolvedRefs."""
    upstreams: list[tuple[table.Protocol, table.Upstream]] = []
    problems: _Problems = {reason: [] for reason in _PROBLEM_ORDER}
    for protocol, spec in route.protocols:
        key = service_key(route, spec)
        found = endpoints.get(key)
        where = f"{protocol}: Service {route.namespace}/{spec.backend.service} port {spec.backend.port}"
        if found is None:
            problems[conditions.Reason.BACKEND_NOT_FOUND].append(f"{where} not found")
        elif not found:
            problems[conditions.Reason.NO_READY_ENDPOINTS].append(f"{where} has no ready endpoints")
        upstream = table.Upstream(
            service=f"{route.namespace}/{spec.backend.service}",
            endpoints=tuple(sorted(set(found or ()))),
            tls=spec.tls,
            client_info=spec.client_info,
        )
        upstreams.append((protocol, upstream))
    http_auth = _http_auth(route, secrets, problems)
    reason = next((reason for reason in _PROBLEM_ORDER if problems[reason]), None)
    if reason is not None:
        message = "; ".join(text for kind in _PROBLEM_ORDER for text in problems[kind])
        status = conditions.Condition("ResolvedRefs", "False", reason, message, route.generation)
    else:
        resolved = "every backend Service port has ready endpoints"
        if route.headers_from:
            resolved += " and every headersFrom Secret key holds a header value"
        status = conditions.Condition(
            "ResolvedRefs", "True", conditions.Reason.RESOLVED_REFS, resolved, route.generation
        )
    return tuple(upstreams), http_auth, status


def _invalid(error: mailroute.SpecError) -> tuple[conditions.Condition, ...]:
    generation = error.generation
    where = f"{error.field}: " if error.field else ""
    return (
        conditions.Condition(
            "Accepted", "False", conditions.Reason.INVALID, where + error.message, generation
        ),
        conditions.Condition(
            "ResolvedRefs",
            "Unknown",
            conditions.Reason.PENDING,
            "not resolved: the spec is invalid",
            generation,
        ),
        conditions.Condition(
            "Programmed",
            "False",
            conditions.Reason.INVALID,
            "not in the routing table: the spec is invalid",
            generation,
        ),
    )


def _split(
    routes: Sequence[mailroute.MailRoute | mailroute.SpecError],
) -> tuple[list[mailroute.MailRoute], list[mailroute.SpecError]]:
    """Valid routes and errors. A namespace/name given more than once (two files defining one
    route in standalone mode; the API server cannot) becomes one error and no copy is used:
    picking one would depend on file order."""
    groups: dict[str, list[mailroute.MailRoute | mailroute.SpecError]] = {}
    for route in routes:
        groups.setdefault(route.key, []).append(route)
    valid: list[mailroute.MailRoute] = []
    invalid: list[mailroute.SpecError] = []
    for group in groups.values():
        first = group[0]
        if len(group) > 1:
            message = (
                f"Duplicate value: {json.dumps(first.name)}: {len(group)} MailRoutes "
                f"in namespace {first.namespace} have this name"
            )
            generation = max(route.generation for route in group)
            created = min(route.creation_timestamp for route in group)
            invalid.append(
                mailroute.SpecError(
                    first.namespace, first.name, generation, created, "metadata.name", message
                )
            )
        elif isinstance(first, mailroute.MailRoute):
            valid.append(first)
        else:
            invalid.append(first)
    return valid, invalid


def compile_table(
    routes: Sequence[mailroute.MailRoute | mailroute.SpecError],
    endpoints: Mapping[ServiceKey, Sequence[table.Endpoint]],
    secrets: Mapping[SecretRef, SecretValues] = _NO_SECRETS,
    version_key: str = "",
) -> Compiled:
    """Compile every MailRoute into one routing table plus per-object conditions.

    Args:
        routes: every known MailRoute, as ``mailroute.parse`` returned it, in any order.
        endpoints: the ready endpoints of each Service port the routes name (see
            ``service_keys``); a key left out means the Service or port does not exist, an
            empty sequence that it has no ready endpoints.
        secrets: the labelled Secrets by (namespace, name), each data key's header value or
            None (see ``SecretValues``); a Secret left out does not exist or is not labelled.
        version_key: the caller's random key hiding auth_http header values in the table's
            version (``table.make_table``); needed once a route has headers, and kept from
            table to table so that equal content keeps its version.

    Returns:
        The table (routes sorted, version = hash of the content) and, per "namespace/name",
        the Accepted, ResolvedRefs and Programmed conditions and the endpoint counts.

    """
    valid, invalid = _split(routes)
    valid.sort(key=lambda route: (route.creation_timestamp, route.key))
    refused: dict[str, _Refusal] = {}
    outcome = _settle(valid, refused)
    # Ends: each round refuses at least one route accepted (so not refused) before.
    while carved := _carved([route for route in valid if outcome[route.key] is None]):
        refused.update(carved)
        outcome = _settle(valid, refused)
    compiled_routes: list[table.Route] = []
    found: dict[str, _Conditions] = {}
    counts: dict[str, _Counts] = {}
    for route in valid:
        generation = route.generation
        upstreams, http_auth, resolved = _resolve(route, endpoints, secrets)
        counts[route.key] = tuple((protocol, len(upstream.endpoints)) for protocol, upstream in upstreams)
        refusal = outcome[route.key]
        if refusal is not None:
            found[route.key] = (
                conditions.Condition(
                    "Accepted", "False", conditions.Reason.CONFLICTED, refusal.message, generation
                ),
                resolved,
                conditions.Condition(
                    "Programmed",
                    "False",
                    conditions.Reason.INVALID,
                    f"not in the routing table: it conflicts with {refusal.owner.key}",
                    generation,
                ),
            )
            continue
        compiled_routes.append(
            table.Route(
                name=route.key,
                generation=generation,
                users=tuple(sorted(route.users)),
                domains=tuple(sorted(route.domains)),
                upstreams=upstreams,
                balance=route.balance,
                auth=route.auth,
                http_auth=http_auth,
            )
        )
        found[route.key] = (
            conditions.Condition(
                "Accepted",
                "True",
                conditions.Reason.ACCEPTED,
                "the route is valid and its claims are free",
                generation,
            ),
            resolved,
            conditions.Condition(
                "Programmed",
                "Unknown",
                conditions.Reason.PENDING,
                "waiting for the proxies to apply the routing table",
                generation,
            ),
        )
    for error in invalid:
        found[error.key] = _invalid(error)
    return Compiled(
        table=table.make_table(compiled_routes, version_key),
        conditions=dict(sorted(found.items())),
        endpoint_counts=dict(sorted(counts.items())),
    )
