"""Tests for proxy/protocols/sasl.py: redacted credentials, strict base64, PLAIN and LOGIN."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols import sasl
from proxy.protocols.errors import RemoteProtocolError

PASSWORD = "Pa55-unique-W0rd"
DETERMINISTIC = settings(derandomize=True, database=None, deadline=None)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize("mechanism", list(sasl.Mechanism))
def test_credentials_never_show_the_password(mechanism: sasl.Mechanism) -> None:
    credentials = sasl.Credentials("alice", PASSWORD, mechanism, authzid="alice")
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        assert PASSWORD not in text
        assert "alice" in text
        assert "<redacted>" in text


def test_credentials_compare_by_value() -> None:
    assert sasl.Credentials("a", "b") == sasl.Credentials("a", "b", sasl.Mechanism.NATIVE, "")
    assert sasl.Credentials("a", "b") != sasl.Credentials("a", "c")


def test_login_prompts_are_the_base64_of_username_and_password() -> None:
    assert base64.b64decode(sasl.LOGIN_USERNAME_PROMPT) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_PROMPT) == b"Password:"


@pytest.mark.parametrize(
    ("data", "decoded"),
    [(b"", b""), (b"YQ==", b"a"), (b"AGFsaWNlAHNlY3JldA==", b"\x00alice\x00secret")],
)
def test_decode_base64_accepts_canonical_input(data: bytes, decoded: bytes) -> None:
    assert sasl.decode_base64(data) == decoded


@pytest.mark.parametrize("data", [b"YQ", b"Y Q==", b"YQ==\n", b"YQ==YQ==x", b"*", b"=", b"\xff"])
def test_decode_base64_is_strict(data: bytes) -> None:
    with pytest.raises(sasl.SaslError):
        sasl.decode_base64(data)


def test_sasl_errors_are_remote_protocol_errors() -> None:
    assert issubclass(sasl.SaslError, RemoteProtocolError)


def test_parse_plain() -> None:
    credentials = sasl.parse_plain(b64(b"\x00alice@example.com\x00" + PASSWORD.encode()))
    assert credentials == sasl.Credentials("alice@example.com", PASSWORD, sasl.Mechanism.PLAIN, "")


def test_parse_plain_keeps_the_authorization_identity() -> None:
    credentials = sasl.parse_plain(b64(b"admin\x00alice\x00pw"))
    assert (credentials.authzid, credentials.username, credentials.password) == ("admin", "alice", "pw")


def test_parse_plain_allows_an_empty_password_and_utf8() -> None:
    credentials = sasl.parse_plain(b64("\x00jürgen\x00".encode()))
    assert (credentials.username, credentials.password) == ("jürgen", "")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"alice\x00secret", "exactly two NUL separators"),
        (b"\x00alice\x00sec\x00ret", "exactly two NUL separators"),
        (b"", "exactly two NUL separators"),
        (b"\x00\x00secret", "empty authentication identity"),
        (b"\x00\xff\x00secret", "authcid is not UTF-8"),
        (b"\x00alice\x00\xc3", "passwd is not UTF-8"),
        (b"\x00" + b"u" * 256 + b"\x00pw", "authcid longer than 255 octets"),
        (b"\x00alice\x00" + b"p" * 256, "passwd longer than 255 octets"),
        (b"z" * 256 + b"\x00alice\x00pw", "authzid longer than 255 octets"),
    ],
)
def test_parse_plain_refuses_malformed_messages(message: bytes, error: str) -> None:
    with pytest.raises(sasl.SaslError, match=error):
        sasl.parse_plain(b64(message))


def test_parse_plain_accepts_fields_of_exactly_255_octets() -> None:
    credentials = sasl.parse_plain(b64(b"z" * 255 + b"\x00" + b"u" * 255 + b"\x00" + b"p" * 255))
    assert len(credentials.password) == 255


def test_parse_plain_errors_never_show_the_password() -> None:
    with pytest.raises(sasl.SaslError) as raised:
        sasl.parse_plain(b64(b"\x00alice\x00" + PASSWORD.encode() + b"\x00extra"))
    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in repr(raised.value)


def test_parse_login_field() -> None:
    assert sasl.parse_login_field(b64(b"alice"), "user name") == "alice"
    assert sasl.parse_login_field(b"", "password") == ""
    with pytest.raises(sasl.SaslError, match="invalid base64"):
        sasl.parse_login_field(b"not base64", "user name")
    with pytest.raises(sasl.SaslError, match="password is not UTF-8"):
        sasl.parse_login_field(b64(b"\xff"), "password")
    with pytest.raises(sasl.SaslError, match="password longer than 255 octets"):
        sasl.parse_login_field(b64(b"p" * 256), "password")


def test_plain_response_encodes_authzid_user_and_password() -> None:
    credentials = sasl.Credentials("alice", PASSWORD, authzid="admin")
    assert base64.b64decode(sasl.plain_response(credentials)) == b"admin\x00alice\x00" + PASSWORD.encode()


field = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=60)


@DETERMINISTIC
@given(authzid=field, username=field.filter(bool), password=field)
def test_plain_response_round_trips_through_parse_plain(authzid: str, username: str, password: str) -> None:
    credentials = sasl.Credentials(username, password, sasl.Mechanism.PLAIN, authzid)
    assert sasl.parse_plain(sasl.plain_response(credentials)) == credentials
