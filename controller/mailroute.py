"""The typed view of a MailRoute, and ``parse``: a manifest in, a ``MailRoute`` or ``SpecError`` out.

The operator's index and the standalone loader (``mailgress routes check``, ``proxy --config``)
call ``parse`` on every MailRoute body; the compiler consumes what it returns. Validation is the
CRD's: the openAPIV3Schema of charts/mailgress/crds/mailroutes.yaml, loaded once at import,
checked with jsonschema after the API server's own defaulting and null pruning, then each CEL
``x-kubernetes-validations`` rule of the CRD through its Python twin in ``_CEL`` (keyed by the
exact rule text, so an edited rule without an edited twin fails at import). Messages are worded
as the API server words them, so ``kubectl apply`` and standalone mode reject the same things
for the same reasons. One rule goes beyond the CRD: the auth_http URL is read as every proxy
reads it (``table.auth_http_url``, the one rule both sides import), so a URL the CRD's pattern
lets through but no proxy could request (port 99999, an IPv6 address without brackets) makes an
invalid spec here instead of a temporary failure at every login; the API server takes such a
URL, so it shows only as Accepted=False. Pure apart from reading that one file at import:
``parse`` never raises on user input, never logs, and never puts an auth_http header value
into a message.
``header_value`` is the CRD's rule for a header value, applied to a Secret's bytes (the operator's
Secret index and the standalone ``secrets`` stand-in both call it before the compiler sees one).
"""

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import jsonschema
import yaml

from proxy import table

API_VERSION = "mailgress.io/v1alpha1"
KIND = "MailRoute"
# The CRD lives in the Helm chart (its single source of truth). From a source checkout or an
# editable install it sits two levels above this package; a wheel must ship it as package data.
# The chart's CRD is the one source; controller/crds/ links to it so that a wheel carries it as
# package data (setuptools copies the file behind the link).
CRD_PATH = Path(__file__).parent / "crds" / "mailroutes.yaml"
CRD_VERSION = "v1alpha1"
# kubectl's choice when a manifest names no namespace (and no context says otherwise).
DEFAULT_NAMESPACE = "default"

# Object names (Kubernetes API conventions, "Names"): a MailRoute name is an RFC 1123 DNS
# subdomain of at most 253 characters, a namespace an RFC 1123 DNS label of at most 63.
MAX_NAME = 253
MAX_NAMESPACE = 63
_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# The CEL rules' constants. Service names are RFC 1035 labels (Kubernetes Service names).
SERVICE_NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_PORT = 65535  # RFC 793 section 3.1: ports are 16 bits; 0 is not a usable port
# RFC 6335 section 5.1: a service (port) name is 1-15 characters of letters, digits and "-",
# with at least one letter, no "-" at either end and no two "-" in a row.
PORT_NAME_PATTERN = "^([a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$"
MAX_PORT_NAME = 15
# RFC 9110 section 5.1 allows more in a field name; nginx's auth_http reply parser accepts only
# letters, digits and "-", so the request side keeps to the same set.
HEADER_NAME_PATTERN = "^[A-Za-z0-9-]{1,64}$"
# What nginx's auth_http request already carries (nginx-mail reference, "Request headers").
RESERVED_HEADER_PREFIXES = ("auth-", "proxy-protocol-")
RESERVED_HEADERS = ("host", "client-ip", "client-host")
# A header value (the CRD's headers values): RFC 9110 section 5.5 field-vchars as nginx's
# auth_http_header passes them, restricted to printable ASCII, spaces and tabs; at most this long.
HEADER_VALUE_PATTERN = "^[\\t -~]*$"
MAX_HEADER_VALUE = 1024
# headersFrom reads only Secrets carrying this label (the controller's Secret watch selects them
# server-side, so no other Secret's value ever reaches its memory).
AUTH_HTTP_LABEL = "mailgress.io/auth-http"
AUTH_HTTP_LABEL_VALUE = "true"
# nginx's auth_http_timeout defaults to 60s; a longer wait only holds a client's login hostage.
MAX_AUTH_TIMEOUT_SECONDS = 60
# Safety net for hand-written YAML (anchors can even build cycles): MailRoutes nest 6 levels.
MAX_DEPTH = 32
# Values quoted in a message are cut to this many characters (a message is not a dump).
MAX_SHOWN = 80


# ---------------------------------------------------------------------------------------------
# The typed view


@dataclasses.dataclass(frozen=True, slots=True)
class BackendRef:
    """A Service in the route's own namespace, and its port by number or by name."""

    service: str
    port: int | str


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """One protocol block of a MailRoute (imap, pop3, submission or smtp)."""

    backend: BackendRef
    tls: table.BackendTls = "none"
    client_info: table.ClientInfo = "none"


@dataclasses.dataclass(frozen=True, slots=True)
class SecretHeader:
    """One auth_http request header whose value is a key of a Secret in the route's namespace."""

    name: str  # the header name
    secret: str  # the Secret's name
    key: str  # the key in its data


@dataclasses.dataclass(frozen=True, slots=True)
class MailRoute:
    """A valid MailRoute, defaults applied; ``protocols`` in ``table.PROTOCOLS`` order."""

    namespace: str
    name: str
    generation: int  # metadata.generation; 0 when no API server set it (standalone files)
    creation_timestamp: str  # RFC 3339 as the API server writes it; "" when not set
    domains: tuple[str, ...]
    users: tuple[str, ...]
    protocols: tuple[tuple[table.Protocol, ProtocolSpec], ...]
    balance: table.Balance = "user-hash"
    auth: table.AuthMode = "backend"
    # auth_http header values are often shared secrets: keep them out of repr.
    http_auth: table.HttpAuth | None = dataclasses.field(default=None, repr=False)
    # spec.auth.http.headersFrom, in the spec's order: the compiler adds their values to
    # http_auth.headers once it has them (references only, no value: safe in a repr).
    headers_from: tuple[SecretHeader, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True, slots=True)
class SpecError:
    """A MailRoute that breaks a rule: the first broken rule, as a field path and a message."""

    namespace: str
    name: str
    generation: int
    creation_timestamp: str
    field: str  # JSON path as the API server prints it, e.g. "spec.imap.backend.port"
    message: str  # the API server's wording; names the bad value (never a header value)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------------------------
# The CRD schema, loaded once


def _load_schema(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    for version in document["spec"]["versions"]:
        if version["name"] == CRD_VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise RuntimeError(f"{path}: no {CRD_VERSION} version")


SCHEMA = _load_schema(CRD_PATH)


def _python_pattern(pattern: str) -> str:
    """A Kubernetes (RE2) pattern for Python's re: RE2's ``$`` ends the text, Python's also
    matches before a final newline ("example.com\\n"), so a trailing ``$`` becomes ``\\Z``."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(_python_pattern(pattern))


def _matches(pattern: str, text: str) -> bool:
    """CEL's ``matches`` and JSON Schema's ``pattern``: an unanchored RE2 search."""
    return _regex(pattern).search(text) is not None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower_ascii(text: str) -> str:
    """CEL's ``lowerAscii``: only A-Z change (str.lower would also fold non-ASCII letters)."""
    return text.translate(_ASCII_LOWER)


def _seconds(duration: str) -> float:
    """A timeout as the schema's pattern allows it ("5s", "1.5s", "500ms") in seconds."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    return float(duration[:-1])


def _reserved_header(name: str) -> bool:
    lowered = _lower_ascii(name)
    return lowered.startswith(RESERVED_HEADER_PREFIXES) or lowered in RESERVED_HEADERS


def _names_apart(http: Mapping[str, Any]) -> bool:
    """No name, folded as CEL's lowerAscii does, is both under headers and under headersFrom."""
    headers = {_lower_ascii(name) for name in http.get("headers", {})}
    return not any(_lower_ascii(item["name"]) in headers for item in http.get("headersFrom", []))


def header_value(raw: bytes) -> str | None:
    """A Secret's value as an auth_http header value, or None when the CRD would refuse it as one
    (HEADER_VALUE_PATTERN, at most MAX_HEADER_VALUE bytes: a trailing newline, as ``echo`` writes
    it into a file, is refused too, as nginx would send it as a broken request)."""
    if len(raw) > MAX_HEADER_VALUE:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _matches(HEADER_VALUE_PATTERN, text) else None


# The Python twin of every CEL rule in the CRD, keyed by the rule's exact text (built from the
# constants above, so the pattern and the limits exist once here). Each runs only after the
# schema check passed, so the value has the schema's type (and its defaults).
def _not_reserved(variable: str) -> str:
    """The CEL condition that the header name ``variable`` is none of RESERVED_HEADERS*."""
    return (
        " && ".join(f"!{variable}.lowerAscii().startsWith('{prefix}')" for prefix in RESERVED_HEADER_PREFIXES)
        + f" && !({variable}.lowerAscii() in ["
        + ", ".join(f"'{name}'" for name in RESERVED_HEADERS)
        + "])"
    )


_CEL: dict[str, Callable[[Any], bool]] = {
    " || ".join(f"has(self.{protocol})" for protocol in table.PROTOCOLS): (
        lambda spec: any(protocol in spec for protocol in table.PROTOCOLS)
    ),
    "(has(self.domains) && size(self.domains) > 0) || (has(self.users) && size(self.users) > 0)": (
        lambda spec: bool(spec.get("domains")) or bool(spec.get("users"))
    ),
    "self.all(u, u == u.lowerAscii())": lambda users: all(user == _lower_ascii(user) for user in users),
    "!has(self.clientInfo) || self.clientInfo != 'xclient'": lambda block: (
        block.get("clientInfo") != "xclient"
    ),
    "!has(self.clientInfo) || self.clientInfo != 'id'": lambda block: block.get("clientInfo") != "id",
    "!self.contains('/')": lambda service: "/" not in service,
    f"self.matches('{SERVICE_NAME_PATTERN}')": lambda service: _matches(SERVICE_NAME_PATTERN, service),
    f"type(self) == string || (self >= 1 && self <= {MAX_PORT})": (
        lambda port: isinstance(port, str) or 1 <= port <= MAX_PORT
    ),
    f"type(self) == int || (size(self) <= {MAX_PORT_NAME} && self.matches('{PORT_NAME_PATTERN}'))": (
        lambda port: (
            isinstance(port, int) or (len(port) <= MAX_PORT_NAME and _matches(PORT_NAME_PATTERN, port))
        )
    ),
    "!has(self.mode) || self.mode != 'http' || has(self.http)": (
        lambda auth: auth.get("mode") != "http" or "http" in auth
    ),
    "!has(self.http) || (has(self.mode) && self.mode == 'http')": (
        lambda auth: "http" not in auth or auth.get("mode") == "http"
    ),
    f"duration(self) > duration('0s') && duration(self) <= duration('{MAX_AUTH_TIMEOUT_SECONDS}s')": (
        lambda timeout: 0 < _seconds(timeout) <= MAX_AUTH_TIMEOUT_SECONDS
    ),
    f"self.all(name, name.matches('{HEADER_NAME_PATTERN}'))": (
        lambda headers: all(_matches(HEADER_NAME_PATTERN, name) for name in headers)
    ),
    f"self.all(name, {_not_reserved('name')})": lambda headers: not any(map(_reserved_header, headers)),
    # headersFrom: the same name rules on each item's name, no name twice (CEL's exists_one holds
    # for every item exactly when no two folded names are equal), none also under headers.
    f"self.matches('{HEADER_NAME_PATTERN}')": lambda name: _matches(HEADER_NAME_PATTERN, name),
    _not_reserved("self"): lambda name: not _reserved_header(name),
    "self.all(h, self.exists_one(other, other.name.lowerAscii() == h.name.lowerAscii()))": (
        lambda items: len({_lower_ascii(item["name"]) for item in items}) == len(items)
    ),
    (
        "!has(self.headers) || !has(self.headersFrom) || self.headersFrom.all(h, "
        "!self.headers.exists(name, name.lowerAscii() == h.name.lowerAscii()))"
    ): _names_apart,
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    check: Callable[[Any], bool]
    message: str
    field_path: tuple[str, ...]  # the rule's fieldPath (".http" -> ("http",)), relative to it


_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Node:
    """What this module needs of one schema node beyond jsonschema: defaults, rules, paths."""

    properties: Mapping[str, "_Node"]
    items: "_Node | None"
    values: "_Node | None"  # additionalProperties of a map
    default: Any
    rules: tuple[_Rule, ...]
    is_set: bool  # x-kubernetes-list-type: set (items unique)


_LEAF = _Node(properties={}, items=None, values=None, default=_NO_DEFAULT, rules=(), is_set=False)


def _rule(raw: Mapping[str, Any]) -> _Rule:
    expression: str = raw["rule"]
    check = _CEL.get(expression)
    if check is None:
        # A CRD edited without its Python twin: standalone mode would silently accept more than
        # the API server. Refuse to start instead.
        raise RuntimeError(f"{CRD_PATH.name}: no Python equivalent of the CEL rule {expression!r}")
    return _Rule(
        check=check,
        message=raw.get("message", f"failed rule: {expression}"),  # the API server's default
        field_path=tuple(part for part in raw.get("fieldPath", "").split(".") if part),
    )


def _node(schema: Mapping[str, Any]) -> _Node:
    additional = schema.get("additionalProperties")
    return _Node(
        properties={name: _node(sub) for name, sub in schema.get("properties", {}).items()},
        items=_node(schema["items"]) if "items" in schema else None,
        values=_node(additional) if isinstance(additional, Mapping) else None,
        default=schema.get("default", _NO_DEFAULT),
        rules=tuple(_rule(raw) for raw in schema.get("x-kubernetes-validations", ())),
        is_set=schema.get("x-kubernetes-list-type") == "set",
    )


_TREE = _node(SCHEMA)


def _for_python(schema: Any) -> Any:
    """A copy of the schema for jsonschema: objects with ``properties`` refuse unknown fields,
    as ``kubectl apply`` does (server-side strict field validation, the default since 1.27),
    and patterns keep their RE2 meaning under Python's re."""
    if not isinstance(schema, Mapping):
        return schema
    copy = {key: _for_python(value) for key, value in schema.items()}
    if "properties" in copy and "additionalProperties" not in copy:
        copy["additionalProperties"] = False
    if isinstance(copy.get("pattern"), str):
        copy["pattern"] = _python_pattern(copy["pattern"])
    return copy


# OpenAPI v3.0 schemas are JSON Schema draft 4 plus extensions (x-kubernetes-*, ignored here
# and handled by _TREE); draft 4 also agrees with Kubernetes that 143.0 is not an integer.
_VALIDATOR = jsonschema.Draft4Validator(_for_python(SCHEMA))


# ---------------------------------------------------------------------------------------------
# Messages


def _is_secret(path: tuple[str | int, ...]) -> bool:
    """A value under spec.auth.http.headers (often a shared secret)."""
    return len(path) == 5 and path[:4] == ("spec", "auth", "http", "headers")


def _show(value: Any, path: tuple[str | int, ...]) -> str:
    """A value as the API server quotes it in a message: JSON, or "object"/"array"."""
    if _is_secret(path):
        return '"<redacted>"'
    if isinstance(value, Mapping):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 4] + '..."'


def _field(path: tuple[str | int, ...]) -> str:
    """A path as the API server prints it: properties dotted, list indexes and map keys in []."""
    node, text = _TREE, ""
    for part in path:
        if isinstance(part, str) and part in node.properties:
            text += f".{part}" if text else part
            node = node.properties[part]
        elif isinstance(part, int):
            text += f"[{part}]"
            node = node.items or _LEAF
        else:
            text += f"[{part}]"
            node = node.values or _LEAF
    return text


def _schema_problem(error: jsonschema.ValidationError) -> tuple[str, str]:
    """One jsonschema error as (field, message) in the API server's words."""
    path = tuple(error.absolute_path)
    value: Any = error.instance
    schema: Any = error.schema
    limit: Any = error.validator_value
    shown = _show(value, path)
    match error.validator:
        case "required":
            missing = next(name for name in limit if name not in value)
            return _field((*path, missing)), "Required value"
        case "additionalProperties":
            unknown = min(str(name) for name in value if name not in schema["properties"])
            where = f"{_field(path)}.{unknown}"
            return where, f'unknown field "{where}"'
        case "enum":
            supported = ", ".join(json.dumps(choice) for choice in limit)
            return _field(path), f"Unsupported value: {shown}: supported values: {supported}"
        case "type":
            return _field(path), f"Invalid value: {shown}: must be of type {limit}"
        case "anyOf":
            kinds = " or ".join(branch["type"] for branch in limit)
            return _field(path), f"Invalid value: {shown}: must be of type {kinds}"
        case "pattern":
            written = limit[:-2] + "$" if limit.endswith(r"\Z") else limit  # as in the CRD
            return _field(path), f"Invalid value: {shown}: should match '{written}'"
        case "minLength":
            return _field(path), f"Invalid value: {shown}: should be at least {limit} chars long"
        case "maxLength":
            return _field(path), f"Too long: may not be longer than {limit}"
        case "maxItems" | "maxProperties":
            return _field(path), f"Too many: {len(value)}: must have at most {limit} items"
    return _field(path), f"Invalid value: {shown}: fails the {error.validator} check"


def _rule_problems(node: _Node, value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str, str]]:
    """Set uniqueness and CEL rules, depth first, each node's own checks before its children's."""
    if node.is_set:
        seen: set[Any] = set()
        for index, item in enumerate(value):
            if item in seen:
                yield _field((*path, index)), f"Duplicate value: {_show(item, path)}"
            seen.add(item)
    for rule in node.rules:
        if not rule.check(value):
            where = (*path, *rule.field_path)
            target: Any = value
            for part in rule.field_path:
                target = target.get(part) if isinstance(target, Mapping) else None
            scalar = target is not None and not isinstance(target, Mapping | list)
            prefix = f"Invalid value: {_show(target, where)}: " if scalar else ""
            yield _field(where), prefix + rule.message
    if isinstance(value, dict):
        for name, child in node.properties.items():
            if name in value:
                yield from _rule_problems(child, value[name], (*path, name))
        if node.values is not None:
            for key, item in value.items():
                yield from _rule_problems(node.values, item, (*path, key))
    elif isinstance(value, list) and node.items is not None:
        for index, item in enumerate(value):
            yield from _rule_problems(node.items, item, (*path, index))


def _auth_url_problem(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """The auth_http URL read as the proxy reads it (see the module docstring)."""
    url = spec["auth"].get("http", {}).get("url")
    if url is None:
        return None
    try:
        table.auth_http_url(url)
    except table.TableError as error:
        path = ("spec", "auth", "http", "url")
        return _field(path), f"Invalid value: {_show(url, path)}: {error}"
    return None


# ---------------------------------------------------------------------------------------------
# Normalising, defaulting


class _TooDeepError(ValueError):
    """The manifest nests deeper than MAX_DEPTH (or refers to itself through YAML anchors)."""


def _json_key(key: Any) -> str:
    # As kubectl turns YAML into JSON: true -> "true", null -> "null", 25 -> "25".
    if isinstance(key, bool):
        return "true" if key else "false"
    return "null" if key is None else str(key)


def _json(value: Any, depth: int = 0) -> Any:
    """A plain-JSON copy of what YAML produced (timestamps become RFC 3339 strings)."""
    if depth > MAX_DEPTH:
        raise _TooDeepError
    if isinstance(value, Mapping):
        return {_json_key(key): _json(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json(item, depth + 1) for item in value]
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)  # dates, bytes: what a YAML-to-JSON conversion would write


def _default(node: _Node, value: Any) -> None:
    """Apply the schema's defaults in place, top-down, as the API server does; a known field
    set to null is pruned first (so ``users:`` with nothing after it means "no users")."""
    if isinstance(value, dict):
        for name, child in node.properties.items():
            if name in value and value[name] is None:
                del value[name]
            if name not in value and child.default is not _NO_DEFAULT:
                value[name] = json.loads(json.dumps(child.default))
            if name in value:
                _default(child, value[name])
        if node.values is not None:
            for item in value.values():
                _default(node.values, item)
    elif isinstance(value, list) and node.items is not None:
        for item in value:
            _default(node.items, item)


# ---------------------------------------------------------------------------------------------
# parse


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    namespace: str
    name: str
    generation: int
    creation_timestamp: str

    def error(self, field: str, message: str) -> SpecError:
        return SpecError(self.namespace, self.name, self.generation, self.creation_timestamp, field, message)


def _identity(metadata: Any) -> _Identity:
    meta = metadata if isinstance(metadata, Mapping) else {}
    namespace, name = meta.get("namespace"), meta.get("name")
    generation, created = meta.get("generation"), meta.get("creationTimestamp")
    return _Identity(
        namespace=namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE,
        name=name if isinstance(name, str) else "",
        generation=generation if isinstance(generation, int) and not isinstance(generation, bool) else 0,
        creation_timestamp=created if isinstance(created, str) else "",
    )


def _envelope_problem(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """apiVersion, kind and metadata: checked by the API server itself, by us for files."""
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if body.get(key) != expected:
            shown = _show(body.get(key), (key,))
            return key, f'Unsupported value: {shown}: supported values: "{expected}"'
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return "metadata", "Required value"
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if name is None or name == "":
        return "metadata.name", "Required value"
    checks = (
        ("metadata.name", name, "subdomain", _SUBDOMAIN, MAX_NAME),
        ("metadata.namespace", namespace, "label", _LABEL, MAX_NAMESPACE),
    )
    for where, value, kind, pattern, longest in checks:
        if value is None:
            continue  # only the namespace may be left out
        shown = _show(value, (where,))
        if not isinstance(value, str):
            return where, f"Invalid value: {shown}: must be of type string"
        if len(value) > longest:
            return where, f"Too long: may not be longer than {longest}"
        if not _matches(pattern, value):
            return where, (
                f"Invalid value: {shown}: a lowercase RFC 1123 {kind} must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            )
    return None


def _protocol_spec(block: Mapping[str, Any]) -> ProtocolSpec:
    backend = block["backend"]
    return ProtocolSpec(
        backend=BackendRef(service=backend["service"], port=backend["port"]),
        tls=cast(table.BackendTls, block["tls"]),
        client_info=cast(table.ClientInfo, block["clientInfo"]),
    )


def _route(identity: _Identity, spec: Mapping[str, Any]) -> MailRoute:
    auth = spec["auth"]
    http = auth.get("http")
    http_auth = None
    if http is not None:
        http_auth = table.HttpAuth(
            url=http["url"],
            timeout_seconds=_seconds(http["timeout"]),
            headers=tuple(sorted(http.get("headers", {}).items())),
        )
    headers_from = tuple(
        SecretHeader(name=item["name"], secret=item["secretKeyRef"]["name"], key=item["secretKeyRef"]["key"])
        for item in (http or {}).get("headersFrom", ())
    )
    return MailRoute(
        namespace=identity.namespace,
        name=identity.name,
        generation=identity.generation,
        creation_timestamp=identity.creation_timestamp,
        domains=tuple(spec.get("domains", ())),
        users=tuple(spec.get("users", ())),
        protocols=tuple(
            (protocol, _protocol_spec(spec[protocol])) for protocol in table.PROTOCOLS if protocol in spec
        ),
        balance=cast(table.Balance, spec["balance"]),
        auth=cast(table.AuthMode, auth["mode"]),
        http_auth=http_auth,
        headers_from=headers_from,
    )


def parse(body: Mapping[str, Any]) -> MailRoute | SpecError:
    """Validate one MailRoute manifest exactly as the API server would, and type it.

    Args:
        body: the object as kopf delivers it, or one document of a YAML file. Missing
            metadata.namespace means "default"; missing generation and creationTimestamp
            (files) mean 0 and "".

    Returns:
        The ``MailRoute`` with defaults applied, or a ``SpecError`` naming the first broken
        rule: envelope (apiVersion, kind, metadata) first, then the schema (the
        alphabetically first failing field), then the CEL rules in schema order, then the
        auth_http URL as the proxy reads it.
    """
    if not isinstance(body, Mapping):
        return _Identity(DEFAULT_NAMESPACE, "", 0, "").error(
            "", f"Invalid value: {_show(body, ())}: a MailRoute manifest is an object"
        )
    try:
        plain = _json(body)
    except _TooDeepError:
        return _identity(body.get("metadata")).error(
            "", f'Invalid value: "object": nested deeper than {MAX_DEPTH} levels'
        )
    identity = _identity(plain.get("metadata"))
    problem = _envelope_problem(plain)
    if problem is None:
        document = {"spec": plain["spec"]} if "spec" in plain else {}
        _default(_TREE, document)
        errors = [_schema_problem(error) for error in _VALIDATOR.iter_errors(document)]
        problem = min(errors) if errors else next(_rule_problems(_TREE, document, ()), None)
        if problem is None:
            problem = _auth_url_problem(document["spec"])
        if problem is None:
            return _route(identity, document["spec"])
    return identity.error(*problem)
