"""The routing-table contract: lookup precedence, canonical JSON, content-hashed versions.

Also what ``from_json`` does with a malformed document: whatever the bytes, the only exception
is a TableError that says what is wrong (hand-picked values, then hypothesis mutations of a
valid table), since anything else would stop the proxy's table source.
"""

import contextlib
import hashlib
import json
from typing import Any

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import table
from proxy.protocols import imap, smtp
from proxy.table import Endpoint, HttpAuth, Route, Upstream

DOVECOT = Upstream(service="mail/dovecot", endpoints=(Endpoint("127.0.0.1", 143),))
POSTFIX = Upstream(service="mail/postfix", endpoints=(Endpoint("127.0.0.1", 25),))


def route(
    name: str, *, users: tuple[str, ...] = (), domains: tuple[str, ...] = (), smtp: bool = False
) -> Route:
    upstreams: tuple[tuple[table.Protocol, Upstream], ...] = (("imap", DOVECOT),)
    if smtp:
        upstreams = (*upstreams, ("smtp", POSTFIX))
    return Route(name=name, generation=1, users=users, domains=domains, upstreams=upstreams)


TABLE = table.make_table(
    [
        route("mail/ceo", users=("CEO@example.com",)),
        route("mail/exact", domains=("example.com",), smtp=True),
        route("mail/wild", domains=("*.example.com",)),
        route("mail/deep", domains=("*.eu.example.com",)),
        route("mail/local", users=("postmaster",)),
        route("mail/any", domains=("*",)),
    ]
)


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ("ceo@example.com", "mail/ceo"),  # exact user beats its domain, case-insensitively
        ("alice@EXAMPLE.com", "mail/exact"),
        ("bob@sales.example.com", "mail/wild"),
        ("bob@x.sales.example.com", "mail/wild"),  # wildcards reach any depth
        ("eve@paris.eu.example.com", "mail/deep"),  # the longest wildcard wins
        ("eve@eu.example.com", "mail/wild"),  # "*.eu.example.com" does not match eu.example.com itself
        ("postmaster", "mail/local"),
        ("carol@other.org", "mail/any"),
        ("nobody", "mail/any"),
    ],
)
def test_lookup_precedence(login: str, expected: str) -> None:
    found = table.lookup(TABLE, "imap", login)
    assert found is not None and found.name == expected


def test_lookup_only_considers_routes_serving_the_protocol() -> None:
    found = table.lookup(TABLE, "smtp", "x@example.com")
    assert found is not None and found.name == "mail/exact"
    assert table.lookup(TABLE, "smtp", "x@other.org") is None
    assert table.lookup(TABLE, "pop3", "x@example.com") is None


def test_exact_user_without_domain_does_not_match_a_full_address() -> None:
    only_user = table.make_table([route("mail/u", users=("alice",))])
    assert table.lookup(only_user, "imap", "alice@example.com") is None


# Users and domains are separate namespaces (the CRD admits a user without a domain, such as
# "example.com"): a user key matches that exact login only, a domain key a login's domain part.
APART = table.make_table(
    [
        route("tenant/login", users=("Example.com",), smtp=True),
        route("mail/domain", domains=("example.org",)),
        route("mail/org-login", users=("example.org",)),
        route("mail/com", domains=("*.com",)),
        route("mail/any", domains=("*",), smtp=True),
    ]
)


@pytest.mark.parametrize(
    ("protocol", "login", "expected"),
    [
        ("imap", "example.com", "tenant/login"),  # the user, folded on both sides
        ("imap", "EXAMPLE.COM", "tenant/login"),
        ("imap", "bob@example.com", "mail/com"),  # not the user "example.com": the wildcard
        ("imap", "Bob@Example.Com", "mail/com"),
        ("smtp", "bob@example.com", "mail/any"),  # "*.com" serves IMAP only: the catch-all
        ("imap", "bob@example.org", "mail/domain"),  # the domain, not the user of that text
        ("imap", "example.org", "mail/org-login"),  # the user, not the domain of that text
        ("smtp", "example.org", "mail/any"),  # no user of that text serves SMTP
        ("imap", "other", "mail/any"),
    ],
)
def test_users_and_domains_do_not_match_each_other(
    protocol: table.Protocol, login: str, expected: str
) -> None:
    found = table.lookup(APART, protocol, login)
    assert found is not None and found.name == expected


def test_a_login_that_spells_a_domain_does_not_match_the_domain() -> None:
    domains_only = table.make_table(
        [route("mail/exact", domains=("example.com",)), route("mail/wild", domains=("*.example.com",))]
    )
    assert table.lookup(domains_only, "imap", "example.com") is None
    assert table.lookup(domains_only, "imap", "eu.example.com") is None
    assert table.lookup(domains_only, "imap", "*.example.com") is None
    found = table.lookup(domains_only, "imap", "bob@eu.example.com")
    assert found is not None and found.name == "mail/wild"


def test_a_hand_made_table_keeps_the_first_claim_of_each_kind() -> None:
    # Sorted by name, mail/a comes first; a user and a domain of one text are two claims.
    both = table.make_table(
        [
            route("mail/c", domains=("example.com",)),
            route("mail/b", users=("example.com",)),
            route("mail/a", users=("example.com",), domains=("example.com",)),
        ]
    )
    for login in ("example.com", "bob@example.com"):
        found = table.lookup(both, "imap", login)
        assert found is not None and found.name == "mail/a"


def test_the_recipient_of_a_bare_postmaster_is_the_user_postmaster() -> None:
    """RCPT TO:<Postmaster> (RFC 5321 section 4.1.1.3) is routed as the bare user "postmaster":
    the route listing that user owns it, not a domain route for the proxy's own name; without
    such a user the catch-all takes it, and with neither it has no route."""
    key = smtp.parse_forward_path("<Postmaster>")
    login = route("mail/login", users=("postmaster",), smtp=True)
    mx = route("mail/mx", domains=("mx.example.com",), smtp=True)
    catch_all = route("mail/any", domains=("*",), smtp=True)
    for routes, owner in (([login, mx, catch_all], "mail/login"), ([mx, catch_all], "mail/any")):
        found = table.lookup(table.make_table(routes), "smtp", key)
        assert found is not None and found.name == owner
    assert table.lookup(table.make_table([mx]), "smtp", key) is None


def serving(
    name: str,
    protocols: tuple[table.Protocol, ...],
    *,
    users: tuple[str, ...] = (),
    domains: tuple[str, ...] = (),
) -> Route:
    upstreams = tuple((protocol, DOVECOT) for protocol in protocols)
    return Route(name=name, generation=1, users=users, domains=domains, upstreams=upstreams)


# mail routes some names for IMAP only; team-x's catch-all serves the other protocols.
TENANTS = table.make_table(
    [
        serving("mail/alpha", ("imap",), domains=("alpha.example", "*.beta.example")),
        serving("mail/cfo", ("imap",), users=("cfo@gamma.example", "postmaster")),
        serving("mail/idn", ("imap",), domains=("xn--bcher-kva.example", "xn--strae-oqa.example")),
        serving("team-x/own", ("imap",), domains=("team-x.example",)),
        serving("team-x/any", ("pop3", "submission", "smtp"), domains=("*",)),
    ]
)


@pytest.mark.parametrize(
    "login",
    [
        "ceo@alpha.example",
        "CEO@Alpha.Example",
        "ceo@sales.beta.example",  # under mail's wildcard
        "cfo@gamma.example",  # mail's user
        "postmaster",
        "ceo@alpha.example.",
        "ceo@b\u00fccher.example",
    ],
)
def test_the_catch_all_never_takes_a_login_another_namespace_claims(login: str) -> None:
    """For any protocol: mail routes these for IMAP only, and team-x's catch-all does not get
    their POP3, submission or inbound mail (the client gets the no-such-route refusal)."""
    for protocol in ("pop3", "submission", "smtp"):
        assert table.lookup(TENANTS, protocol, login) is None
    found = table.lookup(TENANTS, "imap", login)
    assert found is not None and found.name.startswith("mail/")


@pytest.mark.parametrize(
    "login", ["ceo@gamma.example", "anyone@other.org", "bob@team-x.example", "bob@beta.example", "nobody"]
)
def test_the_catch_all_takes_its_own_namespace_and_what_nobody_claims(login: str) -> None:
    found = table.lookup(TENANTS, "smtp", login)
    assert found is not None and found.name == "team-x/any"


def test_the_longest_claim_decides_whose_login_it_is() -> None:
    """Lookup's precedence: the exact domain, else the longest wildcard (a table the compiler
    would not make, where two namespaces' claims nest)."""
    nested = table.make_table(
        [
            serving("mail/all", ("imap",), domains=("*.example",)),
            serving("team-x/sub", ("imap",), domains=("*.sub.example",)),
            serving("team-x/any", ("pop3",), domains=("*",)),
        ]
    )
    found = table.lookup(nested, "pop3", "a@x.sub.example")
    assert found is not None and found.name == "team-x/any"
    assert table.lookup(nested, "pop3", "a@x.example") is None


def test_a_hand_made_table_without_namespaces_keeps_its_catch_all() -> None:
    """Route names without "/" are all of one (empty) namespace: the catch-all takes what the
    other routes do not serve for its protocol, as before namespaces."""
    plain = table.make_table(
        [serving("alpha", ("imap",), domains=("alpha.example",)), serving("any", ("pop3",), domains=("*",))]
    )
    found = table.lookup(plain, "pop3", "ceo@alpha.example")
    assert found is not None and found.name == "any"


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ("ceo@alpha.example.", "mail/alpha"),  # one trailing dot: the same name (RFC 1034)
        ("cfo@gamma.example.", "mail/cfo"),  # also for a user key
        ("ceo@x.beta.example.", "mail/alpha"),
        ("ceo@b\u00fccher.example", "mail/idn"),  # U-labels become A-labels
        ("ceo@B\u00dcCHER.example", "mail/idn"),
        ("ceo@b\u00fccher.example.", "mail/idn"),
        ("ceo@b\u00fccher\uff0eexample", "mail/idn"),  # full-width full stop (UTS #46 maps it)
        ("ceo@b\u00fccher\u3002example", "mail/idn"),  # ideographic full stop
        ("ceo@stra\u00dfe.example", "mail/idn"),  # IDNA2008: sharp s stays, not "strasse"
        ("ceo@alpha.example..", None),  # only one dot is the root's
        ("ceo@.", None),
    ],
)
def test_login_domains_are_compared_as_names(login: str, expected: str | None) -> None:
    found = table.lookup(TENANTS, "imap", login)
    assert (found.name if found else None) == expected


def test_a_domain_no_name_spells_matches_only_an_unclaimed_catch_all() -> None:
    for login in ("ceo@b\u00fc cher.example", "ceo@\udcff.example", "ceo@\u00fc..example"):
        assert table.lookup(TENANTS, "imap", login) is None
        found = table.lookup(TENANTS, "smtp", login)
        assert found is not None and found.name == "team-x/any"


# mail routes IDNs whose UTS #46 mapping is not NFKC of the lower case (A-labels the idna
# package gives); team-x's catch-all would take any login that missed them.
IDN_TENANTS = table.make_table(
    [
        serving(
            "mail/idn",
            ("imap",),
            domains=(
                "xn--f9dt7l.example",  # Cherokee, which UTS #46 folds to its upper case
                "xn--b-ylby.example",  # alpha iota: UTS #46 case-folds U+1FB3's ypogegrammeni
                "xn--bcher-kva.example",
                "xn--11b2ezcw70k.example",  # Devanagari with a ZWJ after its virama (CONTEXTJ)
                "xn--3xa.example",  # final sigma stays itself (non-transitional)
                "alpha.example",
                "1.example",
            ),
        ),
        serving("team-x/any", ("imap", "smtp"), domains=("*",)),
    ]
)


@pytest.mark.parametrize(
    "login",
    [
        "ceo@\u13e3\u13b3\u13a9.example",
        "ceo@\uabb3\uab83\uab79.example",  # the same name in Cherokee small letters
        "ceo@\u1fb3b.example",
        "ceo@b\u00adu\u0308cher.example",  # a soft hyphen (ignored) and a combining diaeresis
        "ceo@b\u00fccher\ufe0f.example",  # a variation selector (ignored)
        "ceo@\u0915\u094d\u200d\u0937.example",
        "ceo@\u03c2.example",
        "ceo@b\u00fccher.example\u3002",  # one trailing ideographic full stop: the root
    ],
)
def test_a_valid_idn_login_reaches_its_own_route(login: str) -> None:
    found = table.lookup(IDN_TENANTS, "imap", login)
    assert found is not None and found.name == "mail/idn"


@pytest.mark.parametrize(
    "login",
    [
        "ceo@alpha\ufe52example",  # SMALL FULL STOP: NFKC's dot, but UTS #46 refuses it
        "ceo@alpha\u2024example",  # ONE DOT LEADER
        "ceo@\u2488example",  # DIGIT ONE FULL STOP
        "ceo@mail_x.b\u00fccher.example",  # no IDNA2008 label has an underscore
    ],
)
def test_a_name_uts46_refuses_matches_no_domain_key(login: str) -> None:
    """Only the catch-all, for a name no route claims, as for any unclaimed login."""
    found = table.lookup(IDN_TENANTS, "imap", login)
    assert found is not None and found.name == "team-x/any"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The domains lookup hands to the idna package, which still converts them."""
    seen: list[str] = []
    convert = idna.encode

    def spy(domain: str, **options: bool) -> bytes:
        seen.append(domain)
        return convert(domain, **options)

    monkeypatch.setattr(idna, "encode", spy)
    return seen


def cjk_login(octets: int) -> str:
    """The longest "ceo@<CJK>.example" in ``octets`` UTF-8 octets: one label of 3-octet characters."""
    fixed = len("ceo@.example")
    return "ceo@" + "\u4e00" * ((octets - fixed) // 3) + ".example"


@pytest.mark.parametrize(
    "login",
    [
        cjk_login(imap.MAX_LITERAL_OCTETS),  # an IMAP LOGIN literal's most: 2,726 characters
        "ceo@" + "\u00fc" * (table.MAX_LABEL_LENGTH + 1) + ".example",  # one label too long
        "ceo@" + ".".join(["\u00fc" * table.MAX_LABEL_LENGTH] * 4) + ".example",  # 263 in all
        "ceo@" + "a." * 200 + "beta.example",  # ASCII, 412: no more under mail's *.beta.example
    ],
)
def test_a_domain_longer_than_a_name_is_never_converted(login: str, conversions: list[str]) -> None:
    """RFC 1035's lengths refuse it first: no Punycode (its cost grows with the square of a
    label's length, half a second in the event loop for the first login), no domain key."""
    assert table.lookup(TENANTS, "imap", login) is None
    found = table.lookup(TENANTS, "smtp", login)
    assert found is not None and found.name == "team-x/any"
    assert conversions == []


@pytest.mark.parametrize(
    ("domain", "converted"),
    [
        ("\u00fc" * table.MAX_LABEL_LENGTH + ".example", True),
        ("\u00fc" * (table.MAX_LABEL_LENGTH + 1) + ".example", False),
        (".".join(["\u00fc" * 62] * 4) + ".x", True),  # 253 characters
        (".".join(["\u00fc" * 62] * 4) + ".x.", True),  # and the root's dot
        (".".join(["\u00fc" * 62] * 4) + ".x\u3002", True),
        (".".join(["\u00fc" * 62] * 4) + ".xy", False),  # 254
        ("b\u00fccher.example", True),
        ("alpha.example", False),  # ASCII: never
    ],
)
def test_lengths_up_to_a_name_s_are_converted(domain: str, converted: bool, conversions: list[str]) -> None:
    table.lookup(TENANTS, "imap", "ceo@" + domain)
    assert conversions == ([domain] if converted else [])


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(login=st.text())
def test_lookup_takes_any_text(login: str) -> None:
    for protocol in table.PROTOCOLS:
        found = table.lookup(TENANTS, protocol, login)
        assert found is None or found in TENANTS.routes


def test_json_round_trip_keeps_version_and_routes() -> None:
    restored = table.from_json(table.to_json(TABLE))
    assert restored == TABLE
    assert restored.version == TABLE.version
    assert restored.version.startswith("sha256:")


def test_version_is_independent_of_route_order() -> None:
    reversed_table = table.make_table(list(reversed(TABLE.routes)))
    assert reversed_table.version == TABLE.version


def test_tampered_table_is_refused() -> None:
    document = json.loads(table.to_json(TABLE))
    document["routes"][0]["domains"] = ["evil.example"]
    with pytest.raises(table.TableError, match="does not match its content"):
        table.from_json(json.dumps(document))


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d.update(apiVersion="v0"), "apiVersion"),
        (lambda d: d["routes"][0].update(balance="random"), "'random' is not one of"),
        (lambda d: d["routes"][0]["upstreams"]["imap"]["endpoints"][0].update(port=70000), "out of range"),
        (lambda d: d["routes"][0]["upstreams"].update(nntp={}), "'nntp' is not one of"),
        (
            lambda d: d["routes"][0]["upstreams"]["imap"]["endpoints"][0].update(host="dovecot.mail"),
            "is not an IP address",
        ),
        (lambda d: d["routes"][0].pop("name"), "missing 'name'"),
        (lambda d: d["routes"][0].update(generation="1"), "wrong type"),
    ],
)
def test_malformed_tables_get_clear_errors(mutation, message: str) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(table.to_json(TABLE))
    mutation(document)
    with pytest.raises(table.TableError, match=message):
        table.from_json(json.dumps(document))


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_table_error(data: bytes) -> None:
    with contextlib.suppress(table.TableError):
        table.from_json(data)


def test_deeply_nested_json_is_a_table_error() -> None:
    with pytest.raises(table.TableError, match="nested too deeply"):
        table.from_json("[" * 100_000 + "]" * 100_000)


def test_endpoint_text_form() -> None:
    assert str(Endpoint("127.0.0.1", 143)) == "127.0.0.1:143"
    assert str(Endpoint("::1", 143)) == "[::1]:143"


# Malformed values. json.dumps cannot write some of them (a 5000-digit integer, a lone
# surrogate), so a placeholder string is replaced by the raw JSON text after serialising.

HEADER_SECRET = "header-secret-that-must-never-be-shown"
VERSION_KEY = "5e" * table.VERSION_KEY_BYTES


def http_route(header_value: str = HEADER_SECRET) -> Route:
    return Route(
        name="mail/auth",
        generation=3,
        users=("ceo@example.com",),
        domains=("example.com",),
        upstreams=(("imap", DOVECOT), ("smtp", POSTFIX)),
        auth="http",
        http_auth=HttpAuth(url="http://127.0.0.1:9000/auth", headers=(("X-Auth-Key", header_value),)),
    )


HTTP_TABLE = table.make_table([http_route()], VERSION_KEY)
PLACEHOLDER = "@raw-json-goes-here@"
ROUTE = ("routes", 0)
ENDPOINT = (*ROUTE, "upstreams", "imap", "endpoints", 0)


def holds(container: Any, key: str | int) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and key in range(len(container))


def container_of(document: Any, path: tuple[str | int, ...]) -> Any:
    """The object or list where the value at ``path`` goes, or None when a change removed it."""
    parent = document
    for key in path[:-1]:
        if not holds(parent, key):
            return None
        parent = parent[key]
    return parent if isinstance(parent, dict) or holds(parent, path[-1]) else None


def with_raw(document: Any, changes: list[tuple[tuple[str | int, ...], str | None]]) -> str:
    """``document`` as JSON text with each change made: the value at a path replaced by the
    JSON text given (or added, in an object), or removed (None; a list slot becomes null).
    Paths that an earlier change took away are skipped."""
    raw: dict[str, str] = {}
    for number, (path, replacement) in enumerate(changes):
        parent = container_of(document, path)
        if parent is None:
            continue
        if replacement is None and isinstance(parent, dict):
            parent.pop(path[-1], None)
            continue
        placeholder = json.dumps(f"{PLACEHOLDER}{number}")
        raw[placeholder] = replacement or "null"
        parent[path[-1]] = json.loads(placeholder)
    text = json.dumps(document)
    for placeholder, replacement in raw.items():
        text = text.replace(placeholder, replacement)
    return text


def http_table_with(path: tuple[str | int, ...], raw: str) -> bytes:
    return with_raw(json.loads(table.to_json(HTTP_TABLE)), [(path, raw)]).encode()


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        ((*ROUTE, "generation"), "1" + "0" * 5000, "not JSON: Exceeds the limit"),  # int max str digits
        ((*ROUTE, "generation"), "-1", "generation out of range"),
        ((*ROUTE, "generation"), str(table.MAX_GENERATION + 1), "generation out of range"),
        ((*ROUTE, "generation"), "true", "'generation' has the wrong type"),
        ((*ROUTE, "generation"), "1.0", "'generation' has the wrong type"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "1" + "0" * 400, "'timeoutSeconds' is too large"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "1e400", "finite number of seconds above zero"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "0", "finite number of seconds above zero"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "-5", "finite number of seconds above zero"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "-0.0", "finite number of seconds above zero"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "true", "'timeoutSeconds' has the wrong type"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "NaN", "not JSON: NaN is not a JSON value"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "Infinity", "not JSON: Infinity is not a JSON value"),
        ((*ROUTE, "httpAuth", "timeoutSeconds"), "-Infinity", "not JSON: -Infinity is not a JSON value"),
        ((*ENDPOINT, "port"), "true", "'port' has the wrong type"),
        ((*ENDPOINT, "port"), "0", "out of range"),
        ((*ENDPOINT, "port"), "9" * 4300, "out of range"),  # parses (4300 digits is the limit)
        ((*ROUTE, "name"), '"\\ud800"', "lone UTF-16 surrogate"),
        ((*ROUTE, "httpAuth", "headers", 0, 1), '"\\udfff"', "lone UTF-16 surrogate"),
        (("unused",), "NaN", "not JSON: NaN"),  # not a JSON document even where nothing reads it
    ],
    ids=[
        "generation-5000-digits",
        "generation-negative",
        "generation-over-int64",
        "generation-bool",
        "generation-float",
        "timeout-beyond-float",
        "timeout-parses-as-inf",
        "timeout-zero",
        "timeout-negative",
        "timeout-negative-zero",
        "timeout-bool",
        "timeout-nan",
        "timeout-infinity",
        "timeout-minus-infinity",
        "port-bool",
        "port-zero",
        "port-4300-digits",
        "name-lone-surrogate",
        "header-lone-surrogate",
        "nan-in-an-unknown-key",
    ],
)
def test_out_of_range_values_are_table_errors(path: tuple[str | int, ...], raw: str, message: str) -> None:
    with pytest.raises(table.TableError, match=message) as caught:
        table.from_json(http_table_with(path, raw))
    assert HEADER_SECRET not in str(caught.value)


def test_the_version_hides_header_values_behind_the_key() -> None:
    """The version is shown where header values are not (status, metrics, routes check): with
    the table's key unknown, no guess at a value can be checked against it."""
    assert table.from_json(table.to_json(HTTP_TABLE)) == HTTP_TABLE  # the key travels with it
    other_key = table.make_table([http_route()], "a7" * table.VERSION_KEY_BYTES)
    assert other_key.version != HTTP_TABLE.version
    rotated = table.make_table([http_route("another-value")], VERSION_KEY)
    assert rotated.version != HTTP_TABLE.version  # a new value is a new version for the proxies
    assert HEADER_SECRET not in repr(HTTP_TABLE) and VERSION_KEY not in repr(HTTP_TABLE)


@pytest.mark.parametrize("key", ["", "5e", "zz" * table.VERSION_KEY_BYTES], ids=["none", "short", "not-hex"])
def test_header_values_need_a_whole_version_key(key: str) -> None:
    with pytest.raises(table.TableError, match="versionKey"):
        table.make_table([http_route()], key)
    document = json.loads(table.to_json(HTTP_TABLE))
    document["versionKey"] = key
    # Without a key the version is checked as the plain SHA-256 (an older release's), and fails.
    with pytest.raises(table.TableError, match="versionKey" if key else "does not match its content"):
        table.from_json(json.dumps(document))


def test_a_table_published_before_version_keys_is_still_read() -> None:
    """An older controller (or its snapshot) during an upgrade: header values, no versionKey,
    the version the plain SHA-256 of the document."""
    document = json.loads(table.to_json(HTTP_TABLE))
    del document["versionKey"], document["version"]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    document["version"] = "sha256:" + hashlib.sha256(canonical).hexdigest()
    older = table.from_json(json.dumps(document))
    assert older.routes == HTTP_TABLE.routes and older.version == document["version"]
    assert older.version_key == ""


def test_a_table_without_header_values_needs_no_key() -> None:
    assert TABLE.version_key == "" and "versionKey" not in json.loads(table.to_json(TABLE))


@pytest.mark.parametrize(
    ("generation", "timeout"), [(0, 0.001), (table.MAX_GENERATION, 1e300)], ids=["lowest", "highest"]
)
def test_the_edges_of_the_ranges_are_accepted(generation: int, timeout: float) -> None:
    route = HTTP_TABLE.routes[0]
    assert route.http_auth is not None
    edge = table.make_table(
        [
            Route(
                name=route.name,
                generation=generation,
                users=route.users,
                domains=route.domains,
                upstreams=route.upstreams,
                auth=route.auth,
                http_auth=HttpAuth(url=route.http_auth.url, timeout_seconds=timeout),
            )
        ]
    )
    assert table.from_json(table.to_json(edge)) == edge


def test_an_integer_timeout_is_read_as_seconds() -> None:
    # 5 and 5.0 are the same canonical content: the version still matches.
    parsed = table.from_json(http_table_with((*ROUTE, "httpAuth", "timeoutSeconds"), "5"))
    assert parsed == HTTP_TABLE
    assert parsed.routes[0].http_auth is not None and parsed.routes[0].http_auth.timeout_seconds == 5.0


# Fuzzing: a valid table with a few values replaced, or keys removed.


def paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every place in a JSON document a value sits at, containers included."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            found += paths(item, (*prefix, number))
    return found


VALID = table.to_json(HTTP_TABLE)
PATHS = paths(json.loads(VALID))
# JSON text json.dumps would refuse to write or that sits at the edge of what the parser takes.
EDGE_TOKENS = [
    "1" + "0" * 5000,
    "-" + "9" * 4301,
    "9" * 4300,
    "1" + "0" * 400,
    "1e400",
    "-1e400",
    "5e-324",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "9223372036854775808",
    '"\\ud800"',
    '"\\u0000"',
    "[" * 50 + "]" * 50,
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
# None removes the key (or, in a list, empties the slot); text is put in as JSON.
REPLACEMENTS = st.none() | st.sampled_from(EDGE_TOKENS) | JSON_VALUES.map(json.dumps)
MUTATIONS = st.lists(st.tuples(st.sampled_from(PATHS), REPLACEMENTS), min_size=1, max_size=3)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(MUTATIONS)
def test_a_mutated_table_is_a_table_or_a_table_error(
    mutations: list[tuple[tuple[str | int, ...], str | None]],
) -> None:
    try:
        parsed = table.from_json(with_raw(json.loads(VALID), mutations).encode())
    except table.TableError as error:
        assert str(error)  # every rejection says why
        assert HEADER_SECRET not in str(error)
    else:  # the mutations changed nothing the version covers
        assert table.from_json(table.to_json(parsed)) == parsed


# ---------------------------------------------------------------------------------------------
# auth_http URLs: the rule the controller and the proxy share


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:9000/auth", table.AuthHttpUrl("http", "127.0.0.1", "127.0.0.1", 9000, "/auth")),
        ("http://auth.mail.svc", table.AuthHttpUrl("http", "auth.mail.svc", "auth.mail.svc", 80, "/")),
        ("HTTPS://auth:00443/a?b", table.AuthHttpUrl("https", "auth", "auth", 443, "/a?b")),
        ("http://[::1]:8080/a/b", table.AuthHttpUrl("http", "::1", "[::1]", 8080, "/a/b")),
        ("http://[::1]", table.AuthHttpUrl("http", "::1", "[::1]", 80, "/")),
    ],
)
def test_auth_http_url_parts(url: str, expected: table.AuthHttpUrl) -> None:
    assert table.auth_http_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("auth:9000/auth", "must start with http:// or https://"),
        ("ftp://auth/", "must start with http:// or https://"),
        ("http://user:pw@auth/", "may not carry user information"),
        ("http://[::1/", "unterminated IPv6 address"),
        ("http://[::1]x/", "more than a port after its IPv6 address"),
        ("http://[fe80::1%eth0]/", "brackets hold no IPv6 address"),
        ("http://[127.0.0.1]/", "brackets hold no IPv6 address"),
        ("http://::1/", "more than one ':'"),
        ("http://a:1:2/", "more than one ':'"),
        ("http://:80/", "no host"),
        ("http://au th/", "host must be a name or an IPv4 address"),
        ("http://aut\u00e9/", "host must be a name or an IPv4 address"),
        ("http://auth:/", "port must be a number from 1 to 65535"),
        ("http://auth:65536/", "port must be a number from 1 to 65535"),
        ("http://auth:+80/", "port must be a number from 1 to 65535"),
        ("http://auth/a b", "path must be printable ASCII without spaces"),
    ],
)
def test_auth_http_url_refusals_say_why(url: str, reason: str) -> None:
    with pytest.raises(table.TableError, match=reason.replace("(", r"\(")):
        table.auth_http_url(url)


@pytest.mark.parametrize(
    ("text", "port"),
    [("1", 1), ("143", 143), ("000143", 143), ("0" * 5000 + "65535", 65535), ("65535", 65535)]
    + [(text, None) for text in ("", "0", "000", "65536", "1" * 5000, "+1", " 1", "1 ", "\u0661", "\u00b2")],
)
def test_port_number_reads_decimal_as_ngx_atoi(text: str, port: int | None) -> None:
    assert table.port_number(text) == port
