"""parse(): MailRoute manifests in, a typed MailRoute or a SpecError with the API server's words out;
and the CRD that parse() validates against."""

import copy
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import mailroute
from controller.mailroute import BackendRef, MailRoute, ProtocolSpec, SecretHeader, SpecError
from proxy import table
from proxy.protocols import authhttp

ROOT = Path(__file__).parents[2]
CRD = yaml.safe_load((ROOT / "charts" / "mailgress" / "crds" / "mailroutes.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SPEC_SCHEMA = VERSION["schema"]["openAPIV3Schema"]["properties"]["spec"]
SECRET = "hdr-s3cr3t-Qx7"


def body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailgress.io/v1alpha1",
        "kind": "MailRoute",
        "metadata": {"name": "alpha", "namespace": "mail"},
        "spec": spec
        or {"domains": ["alpha.example"], "imap": {"backend": {"service": "dovecot", "port": 143}}},
    }


def imap_route(**extra: Any) -> dict[str, Any]:
    return body(domains=["alpha.example"], imap={"backend": {"service": "dovecot", "port": 143}}, **extra)


def problem(result: MailRoute | SpecError) -> tuple[str, str]:
    assert isinstance(result, SpecError), result
    return result.field, result.message


# ---------------------------------------------------------------------------------------------
# Good bodies


def test_a_full_body_as_kopf_delivers_it() -> None:
    manifest = {
        "apiVersion": "mailgress.io/v1alpha1",
        "kind": "MailRoute",
        "metadata": {
            "name": "example-com",
            "namespace": "mail",
            "generation": 3,
            "creationTimestamp": "2026-01-05T10:00:00Z",
            "uid": "0b6c9f5e",
            "resourceVersion": "812",
            "annotations": {"kopf.zalando.org/last-handled-configuration": "{}"},
        },
        "spec": {
            "domains": ["example.com", "*.example.com"],
            "users": ["ceo@example.com"],
            "imap": {"backend": {"service": "dovecot", "port": 143}, "tls": "starttls", "clientInfo": "id"},
            "pop3": {"backend": {"service": "dovecot", "port": "pop3"}},
            "submission": {"backend": {"service": "postfix", "port": 587}, "clientInfo": "xclient"},
            "smtp": {"backend": {"service": "postfix", "port": 25}, "tls": "tls", "clientInfo": "proxy-v2"},
            "balance": "round-robin",
            "auth": {
                "mode": "http",
                "http": {
                    "url": "http://auth.mail.svc:9000/auth",
                    "timeout": "1.5s",
                    "headers": {"X-B": "2", "X-A": "1"},
                },
            },
        },
        "status": {"observedGeneration": 2, "conditions": []},
    }
    assert mailroute.parse(manifest) == MailRoute(
        namespace="mail",
        name="example-com",
        generation=3,
        creation_timestamp="2026-01-05T10:00:00Z",
        domains=("example.com", "*.example.com"),
        users=("ceo@example.com",),
        protocols=(
            ("imap", ProtocolSpec(BackendRef("dovecot", 143), tls="starttls", client_info="id")),
            ("pop3", ProtocolSpec(BackendRef("dovecot", "pop3"))),
            ("submission", ProtocolSpec(BackendRef("postfix", 587), client_info="xclient")),
            ("smtp", ProtocolSpec(BackendRef("postfix", 25), tls="tls", client_info="proxy-v2")),
        ),
        balance="round-robin",
        auth="http",
        http_auth=table.HttpAuth(
            url="http://auth.mail.svc:9000/auth", timeout_seconds=1.5, headers=(("X-A", "1"), ("X-B", "2"))
        ),
    )


def test_defaults_are_the_crds() -> None:
    manifest = body(users=["ceo"], smtp={"backend": {"service": "postfix", "port": "smtp"}})
    del manifest["metadata"]["namespace"]
    assert mailroute.parse(manifest) == MailRoute(
        namespace="default",
        name="alpha",
        generation=0,
        creation_timestamp="",
        domains=(),
        users=("ceo",),
        protocols=(("smtp", ProtocolSpec(BackendRef("postfix", "smtp"), tls="none", client_info="none")),),
        balance="user-hash",
        auth="backend",
        http_auth=None,
    )


def test_protocols_come_in_table_order_whatever_the_manifest_order() -> None:
    backend = {"backend": {"service": "mx", "port": 25}}
    result = mailroute.parse(body(domains=["a.example"], smtp=backend, pop3=backend, imap=backend))
    assert isinstance(result, MailRoute)
    assert [protocol for protocol, _ in result.protocols] == ["imap", "pop3", "smtp"]


@pytest.mark.parametrize(("written", "seconds"), [(None, 5.0), ("60s", 60.0), ("250ms", 0.25), ("0.5s", 0.5)])
def test_auth_timeouts(written: str | None, seconds: float) -> None:
    http: dict[str, Any] = {"url": "https://auth.example/"}
    if written is not None:
        http["timeout"] = written
    result = mailroute.parse(imap_route(auth={"mode": "http", "http": http}))
    assert isinstance(result, MailRoute) and result.http_auth is not None
    assert result.http_auth.timeout_seconds == seconds


def test_null_fields_are_pruned_before_defaulting_as_the_api_server_does() -> None:
    """``users:`` with nothing after it is YAML for null: no users, not an error."""
    text = """
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {name: alpha, namespace: mail, creationTimestamp: 2026-01-05T10:00:00Z}
spec:
  domains: [alpha.example]
  users:
  auth:
  imap: {backend: {service: dovecot, port: 143}, tls: null}
"""
    result = mailroute.parse(yaml.safe_load(text))
    assert isinstance(result, MailRoute)
    assert (result.users, result.auth, result.protocols[0][1].tls) == ((), "backend", "none")
    # An unquoted YAML timestamp is read back as the API server writes it.
    assert result.creation_timestamp == "2026-01-05T10:00:00Z"


def test_parse_does_not_change_its_input() -> None:
    manifest = imap_route(auth={"mode": "http", "http": {"url": "http://a.example/"}})
    before = copy.deepcopy(manifest)
    mailroute.parse(manifest)
    assert manifest == before


def test_key() -> None:
    result = mailroute.parse(body())
    assert isinstance(result, MailRoute)
    assert result.key == "mail/alpha"


# ---------------------------------------------------------------------------------------------
# Bad bodies: exact fields and messages


def _envelope(change: dict[str, Any], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = body()
    manifest.update(change)
    if metadata is not None:
        manifest["metadata"] = metadata
    return manifest


@pytest.mark.parametrize(
    ("manifest", "field", "message"),
    [
        (
            _envelope({"apiVersion": "mailgress.io/v1"}),
            "apiVersion",
            'Unsupported value: "mailgress.io/v1": supported values: "mailgress.io/v1alpha1"',
        ),
        (_envelope({"kind": "Route"}), "kind", 'Unsupported value: "Route": supported values: "MailRoute"'),
        (_envelope({"metadata": None}), "metadata", "Required value"),
        (_envelope({}, {"namespace": "mail"}), "metadata.name", "Required value"),
        (
            _envelope({}, {"name": "Alpha_1"}),
            "metadata.name",
            'Invalid value: "Alpha_1": a lowercase RFC 1123 subdomain must consist of lower case '
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ),
        (_envelope({}, {"name": "a" * 254}), "metadata.name", "Too long: may not be longer than 253"),
        (
            _envelope({}, {"name": "alpha", "namespace": "Mail"}),
            "metadata.namespace",
            'Invalid value: "Mail": a lowercase RFC 1123 label must consist of lower case alphanumeric '
            "characters, '-' or '.', and must start and end with an alphanumeric character",
        ),
        (
            _envelope({}, {"name": "alpha", "namespace": 7}),
            "metadata.namespace",
            "Invalid value: 7: must be of type string",
        ),
    ],
    ids=[
        "apiVersion",
        "kind",
        "metadata",
        "name-missing",
        "name-bad",
        "name-long",
        "namespace-bad",
        "namespace-type",
    ],
)
def test_envelope_errors(manifest: dict[str, Any], field: str, message: str) -> None:
    assert problem(mailroute.parse(manifest)) == (field, message)


LONG = "a" * 300
PORT_NAME_RULE = (
    "a port name is at most 15 lower-case letters and digits with single '-' between them, "
    "and has at least one letter"
)
MANY_HEADERS = {f"X-{n}": "v" for n in range(17)}


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"domains": [f"d{n}.example" for n in range(65)]},
            "spec.domains",
            "Too many: 65: must have at most 64 items",
        ),
        (
            {"domains": ["example.com\n"]},  # RE2's $ is the end of the text, not "before a final newline"
            "spec.domains[0]",
            'Invalid value: "example.com\\n": should match '
            "'^(\\*|(\\*\\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*)$'",
        ),
        (
            {"domains": [LONG]},  # the value is cut; the pattern error sorts before "Too long"
            "spec.domains[0]",
            'Invalid value: "' + "a" * 75 + '...": should match '
            "'^(\\*|(\\*\\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*)$'",
        ),
        (
            {"users": ["*@example.com"]},
            "spec.users[0]",
            'Invalid value: "*@example.com": should match '
            "'^[!-)+-?A-~][!-?A-~]{0,63}(@[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
            "(\\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*)?$'",
        ),
        ({"users": ["ceo", "ceo"]}, "spec.users[1]", 'Duplicate value: "ceo"'),
        ({"imap": {"backend": {"service": "dovecot", "port": 143.0}}}, "spec.imap.backend.port",
         "Invalid value: 143.0: must be of type integer or string"),
        ({"imap": {"backend": {"service": "dovecot", "port": 0}}}, "spec.imap.backend.port",
         "Invalid value: 0: port numbers are 1 to 65535"),
        ({"imap": {"backend": {"service": "dovecot", "port": "imap-over-tls-16"}}}, "spec.imap.backend.port",
         'Invalid value: "imap-over-tls-16": ' + PORT_NAME_RULE),
        ({"imap": {"backend": {"service": "dovecot", "port": "a--b"}}}, "spec.imap.backend.port",
         'Invalid value: "a--b": ' + PORT_NAME_RULE),
        ({"imap": {"backend": {"service": "dovecot"}}}, "spec.imap.backend.port", "Required value"),
        ({"imap": "dovecot:143"}, "spec.imap", 'Invalid value: "dovecot:143": must be of type object'),
        ({"25": "mx"}, "spec.25", 'unknown field "spec.25"'),
        ({"auth": {"mode": "http", "http": {"url": "http://user:pw@auth.example/"}}}, "spec.auth.http.url",
         "Invalid value: \"http://user:pw@auth.example/\": should match '^https?://[-a-zA-Z0-9.:\\[\\]]+(/[!-~]*)?$'"),
        ({"auth": {"mode": "http", "http": {"url": "http://a.example/", "timeout": "0ms"}}},
         "spec.auth.http.timeout", 'Invalid value: "0ms": timeout must be more than 0s and at most 60s'),
        ({"auth": {"mode": "http", "http": {"url": "http://a.example/", "timeout": "5m"}}},
         "spec.auth.http.timeout",
         "Invalid value: \"5m\": should match '^[0-9]{1,6}(\\.[0-9]{1,3})?(ms|s)$'"),
        ({"auth": {"mode": "http", "http": {"url": "http://a.example/", "headers": MANY_HEADERS}}},
         "spec.auth.http.headers", "Too many: 17: must have at most 16 items"),
        ({"auth": {"mode": "kerberos"}}, "spec.auth.mode",
         'Unsupported value: "kerberos": supported values: "backend", "http"'),
    ],
    ids=[
        "domains-max-items", "domain-trailing-newline", "domain-long", "user-star", "user-duplicate",
        "port-float", "port-zero", "port-name-long", "port-name-double-dash", "port-missing", "block-type",
        "unknown-key-number", "url-userinfo", "timeout-zero", "timeout-unit", "headers-max", "auth-mode",
    ],
)  # fmt: skip
def test_spec_errors(spec: dict[str, Any], field: str, message: str) -> None:
    full = {"domains": ["alpha.example"], "imap": {"backend": {"service": "dovecot", "port": 143}}}
    full.update(spec)
    assert problem(mailroute.parse(body(**full))) == (field, message)


URL_PROBLEMS = {
    # Review J2: the CRD's pattern takes these, and the proxy refused each at every login.
    "http://auth.mail.svc:99999/auth": "the auth_http URL's port must be a number from 1 to 65535",
    "http://auth.mail.svc:/auth": "the auth_http URL's port must be a number from 1 to 65535",
    "http://[::1/auth": "the auth_http URL has an unterminated IPv6 address",
    "http://a:b:c/auth": "the auth_http URL has more than one ':' (an IPv6 address goes in brackets)",
    "http://::1/auth": "the auth_http URL has more than one ':' (an IPv6 address goes in brackets)",
    "http://[::1]]/auth": "the auth_http URL has more than a port after its IPv6 address",
    "http://[a.b]/auth": "the auth_http URL's brackets hold no IPv6 address",
    "http://auth.mail.svc:0/auth": "the auth_http URL's port must be a number from 1 to 65535",
}


@pytest.mark.parametrize(("url", "reason"), URL_PROBLEMS.items(), ids=list(URL_PROBLEMS))
def test_an_auth_http_url_no_proxy_could_request_is_an_invalid_spec(url: str, reason: str) -> None:
    result = mailroute.parse(imap_route(auth={"mode": "http", "http": {"url": url}}))
    assert problem(result) == ("spec.auth.http.url", f'Invalid value: "{url}": {reason}')


# The CRD's pattern for spec.auth.http.url, for generating URLs the API server takes (RE2's
# "$" ends the text; Python's would also match before a final newline).
URL_PATTERN = re.compile(
    SPEC_SCHEMA["properties"]["auth"]["properties"]["http"]["properties"]["url"]["pattern"].removesuffix("$")
    + r"\Z"
)


@settings(derandomize=True, max_examples=500, database=None, deadline=None)
@given(
    url=st.one_of(
        st.from_regex(URL_PATTERN),
        st.builds(
            "http://{}{}/auth".format,
            st.sampled_from(["auth.mail.svc", "127.0.0.1", "[::1]", "[fe80::1]", "::1", "[::1", ""]),
            st.sampled_from(["", ":", ":0", ":1", ":00143", ":65535", ":65536", ":99999", ":1:2", ":x"]),
        ),
    )
)
def test_the_controller_accepts_an_auth_http_url_exactly_when_the_proxy_can_request_it(url: str) -> None:
    result = mailroute.parse(imap_route(auth={"mode": "http", "http": {"url": url}}))
    try:
        authhttp.service(table.HttpAuth(url))
    except authhttp.AuthConfigError:
        usable = False
    else:
        usable = True
    if usable:
        assert isinstance(result, MailRoute)
    else:
        assert isinstance(result, SpecError)
        assert result.field == "spec.auth.http.url"


def test_the_first_rule_in_schema_order_is_reported() -> None:
    """A service "mail/Dovecot" breaks both service rules; the cross-namespace one comes first."""
    result = mailroute.parse(
        body(domains=["a.example"], imap={"backend": {"service": "mail/Dovecot", "port": 143}})
    )
    assert problem(result) == (
        "spec.imap.backend.service",
        'Invalid value: "mail/Dovecot": a backend Service must be in the MailRoute\'s own namespace: '
        "write its name without a namespace/ prefix",
    )


def test_a_body_that_is_not_an_object() -> None:
    assert problem(mailroute.parse(["not", "a", "mapping"])) == (  # type: ignore[arg-type]
        "",
        'Invalid value: "array": a MailRoute manifest is an object',
    )


def test_self_referencing_yaml_is_an_error_not_a_crash() -> None:
    manifest = yaml.safe_load(
        "&doc {apiVersion: mailgress.io/v1alpha1, kind: MailRoute, metadata: {name: a}, spec: *doc}"
    )
    assert problem(mailroute.parse(manifest)) == ("", 'Invalid value: "object": nested deeper than 32 levels')


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Key": SECRET + "\r\nInjected: 1"},  # pattern error on the value
        {"X-Key": [SECRET]},  # type error on the value
        {"Auth-Pass": SECRET},  # CEL rule on the map
        {"X_Key": SECRET},
    ],
)
def test_header_values_never_appear_in_errors(headers: dict[str, Any]) -> None:
    result = mailroute.parse(
        imap_route(auth={"mode": "http", "http": {"url": "http://a.example/", "headers": headers}})
    )
    assert isinstance(result, SpecError)
    assert SECRET not in repr(result)
    assert result.field.startswith("spec.auth.http.headers")


def http_route(**http: Any) -> dict[str, Any]:
    return imap_route(auth={"mode": "http", "http": {"url": "http://a.example/", **http}})


def key_ref(name: str, secret: str = "auth-key", key: str = "key") -> dict[str, Any]:
    return {"name": name, "secretKeyRef": {"name": secret, "key": key}}


def test_headers_from_are_references_in_the_spec_order() -> None:
    result = mailroute.parse(
        http_route(headers={"X-Tenant": "t"}, headersFrom=[key_ref("X-Z"), key_ref("X-A", "other", "k.2")])
    )
    assert isinstance(result, MailRoute)
    assert result.headers_from == (
        SecretHeader("X-Z", "auth-key", "key"),
        SecretHeader("X-A", "other", "k.2"),
    )
    assert result.http_auth is not None
    assert result.http_auth.headers == (("X-Tenant", "t"),)  # the compiler adds the Secret values


@pytest.mark.parametrize(
    ("http", "field", "message"),
    [
        ({"headersFrom": [key_ref(f"X-{n}") for n in range(17)]}, "spec.auth.http.headersFrom",
         "Too many: 17: must have at most 16 items"),
        ({"headersFrom": [{"name": "X-Key", "secretKeyRef": {"name": "auth-key"}}]},
         "spec.auth.http.headersFrom[0].secretKeyRef.key", "Required value"),
        ({"headersFrom": [{"secretKeyRef": {"name": "auth-key", "key": "key"}}]},
         "spec.auth.http.headersFrom[0].name", "Required value"),
        ({"headersFrom": [key_ref("X-Key", "Auth_Key")]}, "spec.auth.http.headersFrom[0].secretKeyRef.name",
         "Invalid value: \"Auth_Key\": should match "
         "'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
        ({"headersFrom": [key_ref("X-Key", key="a/b")]}, "spec.auth.http.headersFrom[0].secretKeyRef.key",
         "Invalid value: \"a/b\": should match '^[-._a-zA-Z0-9]+$'"),
        ({"headersFrom": [key_ref("Host")]}, "spec.auth.http.headersFrom[0].name",
         "Invalid value: \"Host\": headers may not replace the auth_http request's own headers "
         "(Host, Auth-*, Client-IP, Client-Host, Proxy-Protocol-*)"),
        ({"headersFrom": [key_ref("X-Key"), key_ref("X-KEY", key="other")]}, "spec.auth.http.headersFrom",
         "a header name may appear only once in headersFrom (header names are case-insensitive)"),
        ({"headers": {"x-key": SECRET}, "headersFrom": [key_ref("X-Key")]}, "spec.auth.http.headersFrom",
         "a header name may not be in both headers and headersFrom (header names are case-insensitive)"),
    ],
    ids=[
        "max-items", "key-missing", "name-missing", "secret-name", "key-pattern", "reserved", "twice", "both",
    ],
)  # fmt: skip
def test_headers_from_errors(http: dict[str, Any], field: str, message: str) -> None:
    result = mailroute.parse(http_route(**http))
    assert problem(result) == (field, message)
    assert SECRET not in repr(result)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"", ""),
        (b"k3y-VALUE 9\t~", "k3y-VALUE 9\t~"),
        (b"x" * mailroute.MAX_HEADER_VALUE, "x" * mailroute.MAX_HEADER_VALUE),
        (b"x" * (mailroute.MAX_HEADER_VALUE + 1), None),
        (b"k3y\n", None),  # echo's line break: a header line of its own on the wire
        (b"k3y\r\nInjected: 1", None),
        (b"caf\xc3\xa9", None),
        (b"\xff", None),
        (b"a\x7fb", None),
        (b"a\x00b", None),
    ],
    ids=["empty", "printable", "longest", "too-long", "newline", "crlf", "utf-8", "not-utf-8", "del", "nul"],
)
def test_header_value_is_the_crds_rule_for_header_values(raw: bytes, value: str | None) -> None:
    assert mailroute.header_value(raw) == value


def test_header_value_constants_are_the_crds() -> None:
    http = SPEC_SCHEMA["properties"]["auth"]["properties"]["http"]["properties"]
    values = http["headers"]["additionalProperties"]
    assert values["pattern"] == mailroute.HEADER_VALUE_PATTERN
    assert values["maxLength"] == mailroute.MAX_HEADER_VALUE
    assert http["headersFrom"]["maxItems"] == http["headers"]["maxProperties"]
    label = f'{mailroute.AUTH_HTTP_LABEL}: "{mailroute.AUTH_HTTP_LABEL_VALUE}"'
    assert label in " ".join(http["headersFrom"]["description"].split())
    assert "headersFrom" in http["headers"]["description"]


def test_header_values_never_appear_in_a_routes_repr() -> None:
    result = mailroute.parse(
        imap_route(auth={"mode": "http", "http": {"url": "http://a.example/", "headers": {"X-Key": SECRET}}})
    )
    assert isinstance(result, MailRoute)
    assert SECRET not in repr(result) and SECRET not in str(result)


# A vocabulary of the schema's own field names, so random documents reach deep paths.
NAMES = st.sampled_from(
    ["domains", "users", "imap", "pop3", "submission", "smtp", "backend", "service", "port", "tls",
     "clientInfo", "balance", "auth", "mode", "http", "url", "timeout", "headers", "X-Key", "x",
     "headersFrom", "secretKeyRef", "name", "key"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        ["none", "tls", "id", "xclient", "http", "5s", "pop3", "a.example", "*", "dovecot", "90s"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=5),
    max_leaves=30,
)


@settings(derandomize=True, max_examples=400, database=None, deadline=None)
@given(spec=VALUES, metadata=VALUES)
def test_parse_never_raises(spec: Any, metadata: Any) -> None:
    manifest = {
        "apiVersion": "mailgress.io/v1alpha1",
        "kind": "MailRoute",
        "metadata": metadata,
        "spec": spec,
    }
    assert isinstance(mailroute.parse(manifest), MailRoute | SpecError)


@settings(derandomize=True, max_examples=400, database=None, deadline=None)
@given(path=st.lists(NAMES, min_size=1, max_size=4), value=VALUES)
def test_parse_never_raises_on_a_mutated_good_body(path: list[str], value: Any) -> None:
    manifest = imap_route(
        auth={"mode": "http", "http": {"url": "http://a.example/", "headers": {"X-Key": "v"}}}
    )
    target = manifest["spec"]
    for name in path[:-1]:
        child = target.get(name)
        if not isinstance(child, dict):
            child = target[name] = {}
        target = child
    target[path[-1]] = value
    assert isinstance(mailroute.parse(manifest), MailRoute | SpecError)


# ---------------------------------------------------------------------------------------------
# Every MailRoute we ship or test with is valid


def _example_routes() -> list[tuple[str, dict[str, Any]]]:
    found = []
    cases = ROOT / "tests" / "controller" / "cases"  # deliberately invalid ones; test_compiler checks them
    for top in ("examples", "tests"):
        for path in sorted((ROOT / top).rglob("*.y*ml")):
            if cases in path.parents:
                continue
            try:
                documents = list(yaml.safe_load_all(path.read_text()))
            except yaml.YAMLError:
                continue  # not a manifest file
            for number, document in enumerate(documents):
                if isinstance(document, dict) and document.get("kind") == "MailRoute":
                    found.append((f"{path.relative_to(ROOT)}#{number}", document))
    return found


EXAMPLES = _example_routes()


def test_there_are_examples() -> None:
    assert any(name.startswith("examples/") for name, _ in EXAMPLES)


@pytest.mark.parametrize(("name", "document"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_every_example_mailroute_is_valid(name: str, document: dict[str, Any]) -> None:
    result = mailroute.parse(document)
    assert isinstance(result, MailRoute), f"{name}: {result}"


# ---------------------------------------------------------------------------------------------
# The CRD


def test_crd_identity() -> None:
    spec = CRD["spec"]
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["metadata"]["name"] == "mailroutes.mailgress.io"
    assert (spec["group"], spec["scope"]) == ("mailgress.io", "Namespaced")
    assert spec["names"] == {
        "kind": "MailRoute",
        "listKind": "MailRouteList",
        "plural": "mailroutes",
        "singular": "mailroute",
        "shortNames": ["mr"],
        "categories": ["mailgress"],
    }
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [("v1alpha1", True, True)]
    assert VERSION["subresources"] == {"status": {}}
    columns = [column["name"] for column in VERSION["additionalPrinterColumns"]]
    assert columns == ["Domains", "Protocols", "Accepted", "Programmed", "Age"]


def _nodes(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every schema node that describes a field, a list item or a map value."""
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += _nodes(child, f"{path}.{name}")
    if "items" in schema:
        found += _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _nodes(schema["additionalProperties"], f"{path}{{}}")
    return found


NODES = _nodes(VERSION["schema"]["openAPIV3Schema"], "")


@pytest.mark.parametrize(("path", "node"), NODES, ids=[path or "." for path, _ in NODES])
def test_every_field_is_described_and_structural(path: str, node: dict[str, Any]) -> None:
    assert node.get("description"), path
    assert "type" in node or node.get("x-kubernetes-int-or-string"), path
    if node.get("type") == "array":
        assert "maxItems" in node, path
    if isinstance(node.get("additionalProperties"), dict):
        assert "maxProperties" in node, path


def test_the_crd_enums_are_the_table_contracts() -> None:
    properties = SPEC_SCHEMA["properties"]
    assert [name for name in properties if name in table.PROTOCOLS] == list(table.PROTOCOLS)
    for protocol in table.PROTOCOLS:
        block = properties[protocol]["properties"]
        assert tuple(block["tls"]["enum"]) == get_args(table.BackendTls)
        assert tuple(block["clientInfo"]["enum"]) == get_args(table.ClientInfo)
    assert tuple(properties["balance"]["enum"]) == get_args(table.Balance)
    assert tuple(properties["auth"]["properties"]["mode"]["enum"]) == get_args(table.AuthMode)


def test_a_cel_rule_without_a_python_twin_refuses_to_load() -> None:
    schema = {"type": "object", "x-kubernetes-validations": [{"rule": "self.size() < 3", "message": "m"}]}
    with pytest.raises(RuntimeError, match=r"no Python equivalent of the CEL rule 'self.size\(\) < 3'"):
        mailroute._node(schema)
