"""The routing-table contract: lookup precedence, canonical JSON, content-hashed versions."""

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import table
from proxy.table import Endpoint, Route, Upstream

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
