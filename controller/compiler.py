"""The compiler: parsed MailRoutes, backend endpoints and Secrets in, one routing table and conditions out.

The reconciler (and ``mailgress routes check``) calls ``compile_table`` with every MailRoute it
knows, parsed or not, the ready endpoints of every backend Service port those routes name, and
the data of the labelled Secrets their auth_http ``headersFrom`` may name, and the claims each
route holds in the table it published last (``holdings``; rule 2b).
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
   namespace/name as Gateway API breaks ties) but after rule 2b, a route whose claims are all
   free is Accepted and takes them; a route with any taken claim is Accepted=False/Conflicted,
   names the owner and is left out entirely. Whole-route exclusion is deliberate: a route is
   one mailbox placement, and serving half of it (its IMAP but not its SMTP, or some domains
   only) would split a user's mail between backends without anyone having asked for it.
2a. Across namespaces the name tree counts. A domain d covers the users @d; a wildcard *.s
   covers every domain ending in .s, every wildcard *.x.s and every user @x.s; a key covers
   itself. An exact d covers neither *.d nor x.d (lookup never goes from x.d to d), and the
   catch-all "*" covers nothing and stays per protocol (everyone's default, nobody's domain). A
   route is also refused when one of its keys covers, or is covered by, a key that an accepted
   route of another namespace holds for any protocol: the owner of alpha.example for IMAP does
   not find its users' passwords or inbound mail collected by another namespace's claim of
   alpha.example for SMTP, of *.example, or of cfo@alpha.example. A squatter who claims a name
   first only blocks its owner, whose route is Conflicted naming the squatter at once, before
   any mail flows (the accepted trade-off; an operator who wants fixed ownership serves
   namespaces per release). Within one namespace names split freely.
2b. Serving comes before age: a later claim never takes logins a route serves. ``held`` says
   what each route holds in the table published last (``holdings``), by namespace/name, so a
   MailRoute deleted and created again keeps what the old object held. Against routes of its
   own namespace a route holds what it held there itself; against other namespaces, every
   claim and key that any route of its namespace held there (the namespace serves the name, as
   rule 2a speaks of namespaces), so a name moved from one route of a namespace to another, or
   a route renamed (deleted and created under a new name), stays the namespace's. A claim
   (rule 2) or key (rule 2a, for any protocol) a route does not hold loses against a
   conflicting one that another route holds, whatever their ages: an older route edited to
   claim *.example, an old invalid route made valid, or a refused route whose rival is created
   again takes nothing from the route serving those logins. Age decides only between claims
   neither route holds (or both, after a table made by other rules), and alone without
   ``held`` (``mailgress routes check``, or a controller that found no snapshot at start).
   Rules 2 to 2b are one greedy pass in age order against the accepted routes and the held
   claims. A refused route holds nothing (not even for its namespace; another route of the
   namespace that claims the name still holds it): if one was refused, its held claims lapse
   and the pass runs again without them (each run drops at least one route's, so the runs
   end). So every refusal names an accepted route, the outcome does not depend on the order of
   the input, and compiling again with the holdings of the table made gives that table again.
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
from collections.abc import Collection, Iterable, Mapping, Sequence
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
Claim = tuple[table.Protocol, str, str]
# "namespace/name" -> the claims that route holds in the table published last (``holdings``).
Holdings = Mapping[str, frozenset[Claim]]
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
_NO_HOLDINGS: Holdings = MappingProxyType({})


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


def _age(route: mailroute.MailRoute) -> tuple[str, str]:
    """Rule 2's order: creationTimestamp, then namespace/name."""
    return (route.creation_timestamp, route.key)


def _why(loser: mailroute.MailRoute, winner: mailroute.MailRoute) -> str:
    # Age is named whenever it gives the same winner: the reason then stays the same once the
    # winner's own table makes it a holder too, and no status is written again for it.
    if _age(winner) > _age(loser):  # only rule 2b lets a newer route win
        return "already serving it"
    if winner.creation_timestamp < loser.creation_timestamp:
        return "created earlier"
    return "equally old and first by namespace/name"


def _conflict_message(loser: mailroute.MailRoute, winner: mailroute.MailRoute, claim: Claim) -> str:
    protocol, kind, key = claim
    return (
        f'{kind} "{key}" is already routed for {protocol} by {winner.key} ({_why(loser, winner)}); '
        "this route is not used"
    )


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a valid route is left out: the route that holds what it claims, and the message."""

    owner: mailroute.MailRoute
    message: str


# A (kind, key) pair of a route, kind "user" or "domain": a claim without its protocol.
_Key = tuple[str, str]


def _keys_of(users: Iterable[str], domains: Iterable[str]) -> list[_Key]:
    return sorted({("user", user) for user in users} | {("domain", domain) for domain in domains})


def _keys(route: mailroute.MailRoute) -> list[_Key]:
    return _keys_of(route.users, route.domains)


def _claims(route: mailroute.MailRoute) -> list[Claim]:
    """(protocol, kind, key) for every key the route claims, in a fixed order.

    Keys are compared as written: the CRD only admits lower-case users and domains, which is
    what the table's case folding turns every login into.
    """
    return [(protocol, kind, key) for protocol, _ in route.protocols for kind, key in _keys(route)]


def holdings(published: Iterable[table.Route]) -> dict[str, frozenset[Claim]]:
    """What each route of a published table holds (rule 2b), by its namespace/name: a claim for
    each protocol it serves and each user and domain it routes."""
    return {
        route.name: frozenset(
            (protocol, kind, key)
            for protocol, _ in route.upstreams
            for kind, key in _keys_of(route.users, route.domains)
        )
        for route in published
    }


@dataclass(frozen=True, slots=True)
class _Holding:
    """What a route claims now and already holds in the published table (rule 2b), by itself
    or by its namespace: claims for rule 2, keys (held for any protocol) for rule 2a."""

    claims: frozenset[Claim] = frozenset()
    keys: frozenset[_Key] = frozenset()


_NOTHING_HELD = _Holding()


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A route with its claims and keys, worked out once per compilation (rules 2 and 2a)."""

    route: mailroute.MailRoute
    claims: list[Claim]
    keys: list[_Key]


def _claimed(route: mailroute.MailRoute) -> _Claimed:
    return _Claimed(route, _claims(route), _keys(route))


def _holding(claimed: _Claimed, published: Collection[Claim]) -> _Holding:
    """The part of ``published`` (held claims, a route's or its namespace's) the route claims now."""
    if not published:
        return _NOTHING_HELD
    published_keys = {claim[1:] for claim in published}
    return _Holding(
        frozenset(claim for claim in claimed.claims if claim in published),
        frozenset(key for key in claimed.keys if key in published_keys),
    )


def _covering(kind: str, key: str) -> list[str]:
    """The domain keys that cover this one (rule 2a), nearest first: for a user u@d the domain d
    and every wildcard above d, for a domain or a wildcard every wildcard above it; nothing for
    the catch-all or a user without a domain."""
    if kind == "user":
        domain = table.domain_of(key)
        return [domain, *table.wildcards_above(domain)] if domain else []
    if key == table.CATCH_ALL:
        return []
    return list(table.wildcards_above(key.removeprefix(table.WILDCARD_PREFIX)))


@dataclass(slots=True)
class _Held:
    """What the accepted routes hold so far, or the published table's holders (rule 2b), for
    the checks of rules 2 and 2a."""

    # Rule 2: each claim's route.
    claims: dict[Claim, mailroute.MailRoute] = dataclasses.field(default_factory=dict)
    # Across namespaces: each key's first route and a claim of it (every holder of a key but the
    # catch-all is of one namespace, since rule 2a refuses the others).
    keys: dict[_Key, tuple[mailroute.MailRoute, Claim]] = dataclasses.field(default_factory=dict)
    # Each domain key's covered keys as (route, kind, key), oldest route first.
    below: dict[str, list[tuple[mailroute.MailRoute, str, str]]] = dataclasses.field(default_factory=dict)

    def take(self, claimed: _Claimed, claims: Iterable[Claim], keys: Iterable[_Key]) -> None:
        """Let a route hold ``claims`` (rule 2) and ``keys`` (rule 2a), some or all of its own."""
        route = claimed.route
        for claim in claims:
            self.claims.setdefault(claim, route)
        first: dict[_Key, Claim] = {}  # a message names the protocol of a key's first claim
        for claim in claimed.claims:
            first.setdefault(claim[1:], claim)
        for kind, key in keys:
            self.keys.setdefault((kind, key), (route, first[kind, key]))
            for above in _covering(kind, key):
                self.below.setdefault(above, []).append((route, kind, key))


def _conflict(
    route: mailroute.MailRoute, claims: Iterable[Claim], keys: Iterable[_Key], held: _Held
) -> _Refusal | None:
    """Why ``claims`` and ``keys`` of ``route`` cannot be had beside what ``held`` holds, or None."""
    for claim in claims:
        winner = held.claims.get(claim)
        if winner is not None:
            return _Refusal(winner, _conflict_message(route, winner, claim))
    for kind, key in keys:
        if key == table.CATCH_ALL:  # everyone's default, nobody's domain: per protocol only
            continue
        same = held.keys.get((kind, key))
        if same is not None and same[0].namespace != route.namespace:
            return _Refusal(same[0], _conflict_message(route, same[0], same[1]))
        for above in _covering(kind, key):
            holder = held.keys.get(("domain", above))
            if holder is not None and holder[0].namespace != route.namespace:
                owner = holder[0]
                message = (
                    f'{kind} "{key}" is within the domain "{above}", which {owner.key} routes '
                    f"({_why(route, owner)}) in another namespace; this route is not used"
                )
                return _Refusal(owner, message)
        if kind == "domain":
            covered = (entry for entry in held.below.get(key, ()) if entry[0].namespace != route.namespace)
            found = next(covered, None)
            if found is not None:
                owner, inner_kind, inner = found
                message = (
                    f'domain "{key}" covers the {inner_kind} "{inner}", which {owner.key} routes '
                    f"({_why(route, owner)}) in another namespace; this route is not used"
                )
                return _Refusal(owner, message)
    return None


@dataclass(frozen=True, slots=True)
class _Standing:
    """What a route holds (rule 2b): by itself, against routes of its namespace, and by its
    namespace, against the others (a superset of its own)."""

    own: _Holding = _NOTHING_HELD
    namespace: _Holding = _NOTHING_HELD


_NO_STANDING = _Standing()


@dataclass(slots=True)
class _Holders:
    """The published table's holders that a pass checks new claims against (rule 2b)."""

    # Each namespace's routes with what they hold by themselves, for rule 2 within it.
    own: dict[str, _Held] = dataclasses.field(default_factory=dict)
    # Every route with what its namespace holds, for rules 2 and 2a across namespaces.
    namespace: _Held = dataclasses.field(default_factory=_Held)

    def take(self, claimed: _Claimed, standing: _Standing) -> None:
        own, namespace = standing.own, standing.namespace
        self.own.setdefault(claimed.route.namespace, _Held()).take(claimed, own.claims, own.keys)
        self.namespace.take(claimed, namespace.claims, namespace.keys)


def _refusal(claimed: _Claimed, accepted: _Held, published: _Holders, standing: _Standing) -> _Refusal | None:
    """Why a route cannot be accepted, or None: a claim or key taken by an older accepted route
    in ``accepted`` (rules 2 and 2a), or, in ``published`` (rule 2b), a claim it does not hold
    itself held by another route of its namespace, or a claim or key its namespace does not
    hold held by a route of another namespace."""
    route, claims, keys = claimed.route, claimed.claims, claimed.keys
    refusal = _conflict(route, claims, keys, accepted)
    if refusal is not None or not published.namespace.keys:  # no holder (a held claim's key is held too)
        return refusal
    own, namespace = standing.own, standing.namespace
    ours = published.own[route.namespace]  # within the namespace only claims conflict (rule 2)
    refusal = _conflict(route, [claim for claim in claims if claim not in own.claims], (), ours)
    if refusal is not None:
        return refusal
    # What the namespace does not hold, no route of it holds: a holder found is another namespace's.
    return _conflict(
        route,
        [claim for claim in claims if claim not in namespace.claims],
        [key for key in keys if key not in namespace.keys],
        published.namespace,
    )


def _settle(routes: Sequence[mailroute.MailRoute], held: Holdings) -> dict[str, _Refusal | None]:
    """Rules 2 to 2b over ``routes`` (oldest first): each route's refusal, None when it is
    accepted. Only accepted routes hold keys in the end: a run that refuses a holder runs again
    with that route's held claims lapsed."""
    every = [_claimed(route) for route in routes]
    by_namespace: dict[str, set[Claim]] = {}
    for key, claims in held.items():
        by_namespace.setdefault(key.partition("/")[0], set()).update(claims)
    standing = {
        claimed.route.key: _Standing(
            _holding(claimed, held.get(claimed.route.key, ())),
            _holding(claimed, by_namespace.get(claimed.route.namespace, ())),
        )
        for claimed in every
    }
    while True:  # each run but the last empties at least one route's standing
        published = _Holders()
        for claimed in every:
            published.take(claimed, standing[claimed.route.key])
        accepted = _Held()
        outcome: dict[str, _Refusal | None] = {}
        for claimed in every:
            refusal = _refusal(claimed, accepted, published, standing[claimed.route.key])
            outcome[claimed.route.key] = refusal
            if refusal is None:
                accepted.take(claimed, claimed.claims, claimed.keys)
        # A route's own holding is part of its namespace's: an empty one means nothing held.
        lapsed = [
            key for key, refusal in outcome.items() if refusal is not None and standing[key].namespace.keys
        ]
        if not lapsed:
            return outcome
        for key in lapsed:
            standing[key] = _NO_STANDING


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
    held: Holdings = _NO_HOLDINGS,
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
        held: what each route holds in the table published last (``holdings`` of it; rule
            2b); left out, age alone decides every conflict.

    Returns:
        The table (routes sorted, version = hash of the content) and, per "namespace/name",
        the Accepted, ResolvedRefs and Programmed conditions and the endpoint counts.

    """
    valid, invalid = _split(routes)
    valid.sort(key=_age)
    outcome = _settle(valid, held)
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
