"""THE CONTRACT between controller and proxy: the routing table, its JSON form and its lookup.

The controller compiles MailRoutes into a ``RoutingTable`` and ships its canonical JSON; every
proxy parses it with ``from_json`` and answers "which route owns this login?" with ``lookup``.
The version is the SHA-256 of the canonical JSON, so republishing equal content is a no-op and
status can cite the exact table a proxy runs. auth_http header values (often a shared secret)
enter it only through an HMAC keyed with the table's ``version_key``, which travels with the
table and nowhere else: the version is shown where the values are not (MailRoute status,
metrics, ``routes check``), and must not let anyone test guesses at a value offline. This
module is the only part of ``proxy`` the controller may import. Pure: no I/O, no clocks, no
logging.

Lookup precedence (design.md): exact user, then exact domain, then the longest wildcard domain
(``*.example.com`` matches any name below example.com, not example.com itself), then the
catch-all ``"*"``. Only routes that serve the asked protocol take part. Users and domains are
separate namespaces: a user key only ever matches that exact login (``"ceo"`` is the login
"ceo", never a domain), a domain key only a login's domain part. Names compare
case-insensitively (RFC 5321 section 2.4 for domains; user names are folded as Dovecot's
default ``auth_username_format = %Lu`` does), a login's domain without one trailing dot and in
A-labels (UTS #46 non-transitional processing, by the idna package, for a domain that is not
ASCII; such a domain that is no name, or any domain longer than a name can be, matches no
domain key). The catch-all is a namespace's default: it never takes a login whose user, or
whose domain as lookup would match it, a route of another namespace claims for any protocol.
"""

import hashlib
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import idna

# Bytes of a table's version key: HMAC-SHA256's own block of strength (RFC 2104 section 3).
VERSION_KEY_BYTES = 32

Protocol = Literal["imap", "pop3", "submission", "smtp"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
BackendTls = Literal["none", "starttls", "tls"]
ClientInfo = Literal["none", "proxy-v2", "xclient", "id"]
Balance = Literal["user-hash", "round-robin", "least-connections"]
AuthMode = Literal["backend", "http"]

TABLE_API_VERSION = "mailgress.io/table/v1"
CATCH_ALL = "*"
WILDCARD_PREFIX = "*."
# RFC 1035 section 2.3.4: a name holds at most 255 octets on the wire, 253 characters written
# out without the root's trailing dot, and a label at most 63 octets. An A-label is longer than
# its U-label (RFC 3492 section 6.3: every character outputs at least one), so a longer domain or
# label is no name, before any conversion (Punycode's cost grows with the square of a label).
MAX_DOMAIN_LENGTH = 253
MAX_LABEL_LENGTH = 63
# UTS #46 section 2.3: the full stop and the three other dots that separate labels.
LABEL_SEPARATORS = re.compile("[.\u3002\uff0e\uff61]")
# Kubernetes ObjectMeta.generation is an int64 that starts at 1; 0 stands for "no API server".
MAX_GENERATION = 2**63 - 1
# RFC 793 section 3.1: ports are 16 bits; 0 is no port to connect to.
MAX_PORT = 65535
# An auth_http URL (nginx's auth_http directive; https:// is a mailgress extension) and the
# ports its schemes imply (RFC 9110 sections 4.2.1 and 4.2.2).
AUTH_HTTP_DEFAULT_PORTS = {"http": 80, "https": 443}
# The host of one, unless an IPv6 address in brackets: RFC 3986 section 3.2.2's reg-name as a
# DNS or Service name spells it (RFC 1123 section 2.1), which an IPv4 address also matches.
_URL_HOST = re.compile("[-A-Za-z0-9.]+")
_DECIMAL = re.compile("[0-9]+")


class TableError(ValueError):
    """A table document that does not follow this contract."""


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One ready address of a backend Service."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one protocol of a route goes, and how the proxy talks to it."""

    service: str  # namespace/name of the backend Service, for logs and status
    endpoints: tuple[Endpoint, ...]
    tls: BackendTls = "none"
    client_info: ClientInfo = "none"


@dataclass(frozen=True, slots=True)
class HttpAuth:
    """nginx auth_http settings of a route (auth mode ``http``)."""

    url: str
    timeout_seconds: float = 5.0
    # Extra request headers often carry a shared secret: never in a repr.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class AuthHttpUrl:
    """The parts of an auth_http URL that a proxy connects to and asks for."""

    scheme: str  # "http", or "https" (a mailgress extension: nginx speaks plain HTTP only)
    host: str  # to connect to: a name, an IPv4 address, or an IPv6 address without brackets
    host_header: str  # the host as written (an IPv6 address in brackets), without the port
    port: int
    uri: str  # path and query; "/" when the URL has none, as nginx asks for


def port_number(text: str) -> int | None:
    """A port written in decimal as nginx's ngx_atoi reads one (ASCII digits, leading zeros
    allowed), or None unless it is 1 to MAX_PORT. The zeros go before the length check, so no
    long run of digits is ever converted."""
    digits = text.lstrip("0")
    if not _DECIMAL.fullmatch(text) or len(digits) > len(str(MAX_PORT)):
        return None
    port = int(digits or "0")
    return port if 0 < port <= MAX_PORT else None


def auth_http_url(url: str) -> AuthHttpUrl:
    """Read an auth_http URL, ``http(s)://host[:port][/path]`` as nginx's auth_http directive
    takes it: the host a name, an IPv4 address or an IPv6 address in brackets. One rule for
    both sides: the controller refuses a MailRoute whose URL this refuses (at parse time, as
    an invalid spec), and the proxy reads the URL with it (proxy.protocols.authhttp).

    Raises:
        TableError: the URL cannot be requested; the message says why and never quotes it.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in AUTH_HTTP_DEFAULT_PORTS:
        raise TableError("the auth_http URL must start with http:// or https://")
    authority, slash, path = rest.partition("/")
    uri = slash + path if slash else "/"
    if "@" in authority:
        raise TableError("the auth_http URL may not carry user information")
    port_text: str | None
    if authority.startswith("["):  # RFC 3986 section 3.2.2: an IPv6 literal in brackets
        host, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise TableError("the auth_http URL has an unterminated IPv6 address")
        if after and not after.startswith(":"):
            raise TableError("the auth_http URL has more than a port after its IPv6 address")
        if not _ipv6_address(host):
            raise TableError("the auth_http URL's brackets hold no IPv6 address")
        host_header, port_text = f"[{host}]", after[1:] if after else None
    else:
        host, colon, after = authority.partition(":")
        if ":" in after:
            raise TableError("the auth_http URL has more than one ':' (an IPv6 address goes in brackets)")
        if not host:
            raise TableError("the auth_http URL has no host")
        if not _URL_HOST.fullmatch(host):
            raise TableError("the auth_http URL's host must be a name or an IPv4 address")
        host_header, port_text = host, after if colon else None
    port = AUTH_HTTP_DEFAULT_PORTS[scheme] if port_text is None else port_number(port_text)
    if port is None:
        raise TableError(f"the auth_http URL's port must be a number from 1 to {MAX_PORT}")
    if not uri.isascii() or not uri.isprintable() or " " in uri:
        raise TableError("the auth_http URL path must be printable ASCII without spaces")
    return AuthHttpUrl(scheme=scheme, host=host, host_header=host_header, port=port, uri=uri)


def _ipv6_address(text: str) -> bool:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return address.scope_id is None  # a zone (fe80::1%eth0) names an interface of one machine


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled MailRoute: what it matches and where each protocol goes."""

    name: str  # namespace/name of the MailRoute
    generation: int
    users: tuple[str, ...]
    domains: tuple[str, ...]
    upstreams: tuple[tuple[Protocol, Upstream], ...]  # sorted by protocol, at most one each
    balance: Balance = "user-hash"
    auth: AuthMode = "backend"
    http_auth: HttpAuth | None = None

    def upstream(self, protocol: Protocol) -> Upstream | None:
        for candidate, upstream in self.upstreams:
            if candidate == protocol:
                return upstream
        return None


@dataclass(frozen=True, slots=True)
class _Keys:
    """One protocol's match keys, folded, each to its route. Two maps, not one: a user
    "example.com" (the CRD admits logins without a domain) must not capture every login at the
    domain example.com, and a domain key must not match a login that happens to spell it."""

    users: dict[str, Route] = field(default_factory=dict)
    domains: dict[str, Route] = field(default_factory=dict)  # "name", "*.suffix" and "*"


@dataclass(frozen=True, slots=True)
class _Index:
    """The lookup's dictionaries: per protocol the keys of the routes that serve it, and for
    the catch-all's exception the namespaces that claim each user and domain key for any
    protocol (a route's namespace is its name up to "/", "" for a name without one)."""

    protocols: dict[Protocol, _Keys] = field(default_factory=dict)
    user_namespaces: dict[str, frozenset[str]] = field(default_factory=dict)
    domain_namespaces: dict[str, frozenset[str]] = field(default_factory=dict)  # no "*"


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """An immutable, versioned set of routes. Build it with ``make_table`` or ``from_json``."""

    routes: tuple[Route, ...]
    version: str
    # Hex key of the HMAC that hides header values in the version; "" when no route has any.
    version_key: str = field(default="", repr=False)
    _index: _Index = field(default_factory=_Index, compare=False, repr=False)


def _fold(name: str) -> str:
    return name.strip().lower()


def domain_of(address: str) -> str:
    """The domain part of ``user@domain`` (empty when there is none), folded to lower case."""
    _, at, domain = address.rpartition("@")
    return _fold(domain) if at else ""


def wildcards_above(domain: str) -> Iterator[str]:
    """The wildcard keys that match ``domain``, longest first: "*.b.c" and "*.c" for "a.b.c"."""
    labels = domain.split(".")
    for start in range(1, len(labels)):
        yield WILDCARD_PREFIX + ".".join(labels[start:])


def _namespace(route_name: str) -> str:
    namespace, slash, _ = route_name.partition("/")
    return namespace if slash else ""


def _a_labels(domain: str) -> str:
    """A non-ASCII domain as A-labels (RFC 5890 section 2.3.2.1), mapped and checked by UTS #46
    non-transitional processing (IDNA2008: ß and ς stay themselves; Cherokee and Greek
    ypogegrammeni fold as UTS #46 folds them; soft hyphens and variation selectors are ignored),
    without one trailing dot. "" when it is no name: a label or the whole longer than a name's
    (refused before the conversion, whose cost grows with the square of a label's length), or
    text UTS #46 refuses (U+2024 ONE DOT LEADER is not a dot). Lengths count the characters
    as given: a label that fits only once UTS #46 drops its ignored characters is refused."""
    name = domain[:-1] if LABEL_SEPARATORS.fullmatch(domain[-1]) else domain
    if len(name) > MAX_DOMAIN_LENGTH or any(
        len(label) > MAX_LABEL_LENGTH for label in LABEL_SEPARATORS.split(name)
    ):
        return ""
    try:
        return idna.encode(domain, uts46=True).decode("ascii").removesuffix(".")
    except UnicodeError:  # idna.IDNAError, and any codec error on text no name spells
        return ""


def _login_keys(login: str) -> tuple[str, str]:
    """The login as the table's user keys spell it and its domain part ("" when none, or when
    it is no name): folded, a non-ASCII domain in A-labels, one trailing dot dropped (the root,
    RFC 1034 section 3.1: "alpha.example." is alpha.example). A domain longer than
    MAX_DOMAIN_LENGTH is no name (it also bounds lookup's wildcard probes, one per label). An
    ASCII login costs a fold, a split and a length check; only a non-ASCII domain is converted."""
    folded = _fold(login)
    local, at, domain = folded.rpartition("@")
    if not at:
        return folded, ""
    if domain.isascii():
        domain = domain.removesuffix(".")
        if len(domain) > MAX_DOMAIN_LENGTH:
            return folded, ""
    else:
        domain = _a_labels(domain)
        if not domain:
            return folded, ""
    return f"{local}@{domain}", domain


def _build_index(routes: tuple[Route, ...]) -> _Index:
    index = _Index({protocol: _Keys() for protocol in PROTOCOLS})
    user_namespaces: dict[str, set[str]] = {}
    domain_namespaces: dict[str, set[str]] = {}
    for route in routes:
        users = [_fold(user) for user in route.users]
        domains = [_fold(domain) for domain in route.domains]
        for protocol, _ in route.upstreams:
            keys = index.protocols[protocol]
            # The compiler resolves conflicts; a hand-made table keeps the first claim.
            for user in users:
                keys.users.setdefault(user, route)
            for domain in domains:
                keys.domains.setdefault(domain, route)
        namespace = _namespace(route.name)
        for user in users:
            user_namespaces.setdefault(user, set()).add(namespace)
        for domain in domains:
            if domain != CATCH_ALL:
                domain_namespaces.setdefault(domain, set()).add(namespace)
    index.user_namespaces.update((key, frozenset(found)) for key, found in user_namespaces.items())
    index.domain_namespaces.update((key, frozenset(found)) for key, found in domain_namespaces.items())
    return index


def _claimed_elsewhere(index: _Index, login: str, domain: str, namespace: str) -> bool:
    """Whether a route of another namespace than ``namespace`` claims the login's user, or the
    domain key lookup would pick for it (the exact domain, else its longest wildcard), for any
    protocol."""
    claims = [index.user_namespaces.get(login, frozenset())]
    if domain:
        nearest = (key for key in (domain, *wildcards_above(domain)) if key in index.domain_namespaces)
        claims.append(index.domain_namespaces.get(next(nearest, ""), frozenset()))
    return any(found - {namespace} for found in claims)


def lookup(table: RoutingTable, protocol: Protocol, login: str) -> Route | None:
    """The route that owns ``login`` (a user name or, for inbound SMTP, a recipient address).

    Dictionary probes only (the user, the domain, one wildcard per label above it, the
    catch-all), stopping at the first hit: this runs on every login and inbound recipient.
    The login's domain is compared without one trailing dot and, when not ASCII, in A-labels;
    a non-ASCII domain that is no name, or any domain longer than one, matches no domain key.

    Returns:
        The exact user's route; else, for a login with a domain part, the route of that domain
        or of its longest wildcard; else the catch-all's, unless a route of another namespace
        than the catch-all's claims the login's user or domain for any protocol (the catch-all
        is a namespace's default, never a way into another's logins). None when no route
        serves this login for this protocol.
    """
    keys = table._index.protocols.get(protocol)
    if keys is None:
        return None
    login, domain = _login_keys(login)
    route = keys.users.get(login)
    if route is not None:
        return route
    if domain:
        route = keys.domains.get(domain)
        if route is not None:
            return route
        for wildcard in wildcards_above(domain):
            route = keys.domains.get(wildcard)
            if route is not None:
                return route
    route = keys.domains.get(CATCH_ALL)
    if route is None or _claimed_elsewhere(table._index, login, domain, _namespace(route.name)):
        return None
    return route


# ---------------------------------------------------------------------------------------------
# Canonical JSON


def _route_document(route: Route, header_value: Callable[[str], str] = str) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": route.name,
        "generation": route.generation,
        "users": list(route.users),
        "domains": list(route.domains),
        "balance": route.balance,
        "auth": route.auth,
        "upstreams": {
            protocol: {
                "service": upstream.service,
                "endpoints": [{"host": e.host, "port": e.port} for e in upstream.endpoints],
                "tls": upstream.tls,
                "clientInfo": upstream.client_info,
            }
            for protocol, upstream in route.upstreams
        },
    }
    if route.http_auth is not None:
        document["httpAuth"] = {
            "url": route.http_auth.url,
            "timeoutSeconds": route.http_auth.timeout_seconds,
            "headers": [[name, header_value(value)] for name, value in route.http_auth.headers],
        }
    return document


def _canonical(routes: tuple[Route, ...], header_value: Callable[[str], str] = str) -> bytes:
    body = {"apiVersion": TABLE_API_VERSION, "routes": [_route_document(r, header_value) for r in routes]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def has_header_values(routes: tuple[Route, ...] | list[Route]) -> bool:
    """Whether any route carries auth_http request headers (whose values need a version key)."""
    return any(route.http_auth is not None and route.http_auth.headers for route in routes)


def make_table(routes: tuple[Route, ...] | list[Route], version_key: str = "") -> RoutingTable:
    """Build a table: routes sorted by name, version = sha256 of the canonical JSON, in which each
    header value is replaced by its HMAC-SHA256 under ``version_key`` (hex; the caller's random
    key, kept from table to table so that equal content keeps its version).

    Raises:
        TableError: routes carry header values but ``version_key`` is not 64 hex digits.
    """
    ordered = _ordered(routes)
    if not has_header_values(ordered):
        return _plain_table(ordered)
    key = _version_key_bytes(version_key)

    def hidden(value: str) -> str:
        return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()

    version = "sha256:" + hashlib.sha256(_canonical(ordered, hidden)).hexdigest()
    return RoutingTable(ordered, version, version_key, _build_index(ordered))


def _ordered(routes: tuple[Route, ...] | list[Route]) -> tuple[Route, ...]:
    return tuple(sorted(routes, key=lambda route: route.name))


def _plain_table(ordered: tuple[Route, ...]) -> RoutingTable:
    """Versioned by the plain SHA-256: tables without header values, and (read only) tables
    published before the version key existed."""
    version = "sha256:" + hashlib.sha256(_canonical(ordered)).hexdigest()
    return RoutingTable(routes=ordered, version=version, _index=_build_index(ordered))


def _version_key_bytes(version_key: str) -> bytes:
    try:
        key = bytes.fromhex(version_key)
    except ValueError:
        key = b""
    if len(key) != VERSION_KEY_BYTES:
        raise TableError(
            f"table: a versionKey of {VERSION_KEY_BYTES} bytes (hex) is needed with header values"
        )
    return key


EMPTY_TABLE = make_table(())


def to_json(table: RoutingTable) -> bytes:
    """The canonical JSON document, with the version (and its key), as the controller publishes it."""
    body = json.loads(_canonical(table.routes))
    body["version"] = table.version
    if table.version_key:
        body["versionKey"] = table.version_key
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _expect(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in document:
        raise TableError(f"{where}: missing {key!r}")
    value = document[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false parse as bool, a subclass of int: never a number here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TableError(f"{where}: {key!r} has the wrong type")
    return value


def _positive_seconds(document: Mapping[str, Any], key: str, where: str) -> float:
    """A duration that timers accept: a finite number above zero (uvloop fails on NaN)."""
    value = _expect(document, key, (int, float), where)
    try:
        seconds = float(value)
    except OverflowError as error:  # an integer beyond the largest float
        raise TableError(f"{where}: {key!r} is too large") from error
    if not (math.isfinite(seconds) and seconds > 0):  # also NaN and the 1e400 that parses as inf
        raise TableError(f"{where}: {key!r} must be a finite number of seconds above zero")
    return seconds


def _reject_constant(name: str) -> Any:
    # RFC 8259 section 6: NaN and Infinity are not JSON numbers; Python's parser takes them.
    raise ValueError(f"{name} is not a JSON value (RFC 8259 section 6)")


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    if value not in allowed:
        raise TableError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _parse_upstream(document: Any, where: str) -> Upstream:
    if not isinstance(document, dict):
        raise TableError(f"{where}: not an object")
    endpoints = []
    for number, item in enumerate(_expect(document, "endpoints", list, where)):
        spot = f"{where}.endpoints[{number}]"
        if not isinstance(item, dict):
            raise TableError(f"{spot}: not an object")
        port = _expect(item, "port", int, spot)
        if not 0 < port <= MAX_PORT:
            raise TableError(f"{spot}: port {port} out of range")
        host = _expect(item, "host", str, spot)
        try:
            # Endpoints are addresses (EndpointSlices carry IPs): the proxy never resolves names.
            ipaddress.ip_address(host)
        except ValueError as error:
            raise TableError(f"{spot}: host {host!r} is not an IP address") from error
        endpoints.append(Endpoint(host=host, port=port))
    return Upstream(
        service=_expect(document, "service", str, where),
        endpoints=tuple(endpoints),
        tls=_choice(_expect(document, "tls", str, where), get_args(BackendTls), where),
        client_info=_choice(_expect(document, "clientInfo", str, where), get_args(ClientInfo), where),
    )


def _parse_route(document: Any, where: str) -> Route:
    if not isinstance(document, dict):
        raise TableError(f"{where}: not an object")
    upstreams = _expect(document, "upstreams", dict, where)
    for protocol in upstreams:
        _choice(protocol, PROTOCOLS, f"{where}.upstreams")
    http_auth = None
    if "httpAuth" in document:
        spot = f"{where}.httpAuth"
        raw = _expect(document, "httpAuth", dict, where)
        headers = _expect(raw, "headers", list, spot)
        pairs_ok = all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
            for pair in headers
        )
        if not pairs_ok:
            raise TableError(f"{spot}: headers must be [name, value] pairs")
        http_auth = HttpAuth(
            url=_expect(raw, "url", str, spot),
            timeout_seconds=_positive_seconds(raw, "timeoutSeconds", spot),
            headers=tuple((name, value) for name, value in headers),
        )
    names = (_expect(document, "users", list, where), _expect(document, "domains", list, where))
    if not all(isinstance(name, str) for group in names for name in group):
        raise TableError(f"{where}: users and domains must be strings")
    generation = _expect(document, "generation", int, where)
    if not 0 <= generation <= MAX_GENERATION:
        raise TableError(f"{where}: generation out of range (0 to {MAX_GENERATION})")
    return Route(
        name=_expect(document, "name", str, where),
        generation=generation,
        users=tuple(names[0]),
        domains=tuple(names[1]),
        upstreams=tuple(
            (protocol, _parse_upstream(upstreams[protocol], f"{where}.upstreams.{protocol}"))
            for protocol in PROTOCOLS
            if protocol in upstreams
        ),
        balance=_choice(_expect(document, "balance", str, where), get_args(Balance), where),
        auth=_choice(_expect(document, "auth", str, where), get_args(AuthMode), where),
        http_auth=http_auth,
    )


def from_json(data: bytes | str) -> RoutingTable:
    """Parse and check a published table; the version must match the content.

    Raises:
        TableError: the document is not JSON, not a table of this API version, holds a value
            of the wrong type or out of range, or was altered. Never any other exception.
    """
    try:
        document = json.loads(data, parse_constant=_reject_constant)
    except ValueError as error:
        # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, and an integer longer than Python
        # converts (sys.get_int_max_str_digits, 4300 digits by default): all ValueErrors.
        raise TableError(f"not JSON: {error}") from error
    except RecursionError as error:  # nesting deeper than any table has
        raise TableError("not a table: nested too deeply") from error
    if not isinstance(document, dict):
        raise TableError("table: not an object")
    if document.get("apiVersion") != TABLE_API_VERSION:
        raise TableError(f"table: apiVersion must be {TABLE_API_VERSION!r}")
    routes = [
        _parse_route(item, f"routes[{number}]")
        for number, item in enumerate(_expect(document, "routes", list, "table"))
    ]
    key = document.get("versionKey", "")
    if not isinstance(key, str):
        raise TableError("table: 'versionKey' has the wrong type")
    try:
        if not key and has_header_values(routes):
            # Published before tables had a versionKey (an older controller, or its snapshot,
            # during an upgrade): its version is the plain SHA-256, checked as such.
            table = _plain_table(_ordered(routes))
        else:
            table = make_table(routes, key)
    except UnicodeEncodeError as error:
        # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 document can hold. The
        # error names no value: the string may be a header that carries a secret.
        raise TableError("table: a string holds a lone UTF-16 surrogate (RFC 8259 section 8.2)") from error
    claimed = _expect(document, "version", str, "table")
    if claimed != table.version:
        raise TableError(f"table: version {claimed} does not match its content ({table.version})")
    return table
