"""Tests for proxy/protocols/sasl.py: redacted credentials, strict base64, PLAIN and LOGIN, and
the protocol-neutral exchange (challenges, cancel, initial responses) the front-ends share."""

import base64
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols import imap, pop3, sasl, smtp
from proxy.protocols.errors import RemoteProtocolError
from proxy.protocols.events import Authenticate, Command, DataReceived, FrontendConfig, FrontendMachine, Send

PASSWORD = "Pa55-unique-W0rd"
DETERMINISTIC = settings(derandomize=True, database=None, deadline=None)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize("mechanism", list(sasl.Mechanism))
def test_credentials_never_show_the_password(mechanism: sasl.Mechanism) -> None:
    credentials = sasl.Credentials("alice", PASSWORD.encode(), mechanism, authzid="alice")
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        assert PASSWORD not in text
        assert "alice" in text
        assert "<redacted>" in text


def test_credentials_compare_by_value() -> None:
    assert sasl.Credentials("a", b"b") == sasl.Credentials("a", b"b", sasl.Mechanism.NATIVE, "")
    assert sasl.Credentials("a", b"b") != sasl.Credentials("a", b"c")


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
    assert credentials == sasl.Credentials("alice@example.com", PASSWORD.encode(), sasl.Mechanism.PLAIN, "")


def test_parse_plain_keeps_the_authorization_identity() -> None:
    credentials = sasl.parse_plain(b64(b"admin\x00alice\x00pw"))
    assert (credentials.authzid, credentials.username, credentials.password) == ("admin", "alice", b"pw")


def test_parse_plain_allows_an_empty_password_and_utf8() -> None:
    credentials = sasl.parse_plain(b64("\x00jürgen\x00".encode()))
    assert (credentials.username, credentials.password) == ("jürgen", b"")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"alice\x00secret", "exactly two NUL separators"),
        (b"\x00alice\x00sec\x00ret", "exactly two NUL separators"),
        (b"", "exactly two NUL separators"),
        (b"\x00\x00secret", "empty authentication identity"),
        (b"\x00\xff\x00secret", "authcid is not UTF-8"),
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


def test_parse_login_user_and_password() -> None:
    assert sasl.parse_login_user(b64(b"alice")) == "alice"
    assert sasl.parse_login_password(b"") == b""
    with pytest.raises(sasl.SaslError, match="invalid base64"):
        sasl.parse_login_user(b"not base64")
    with pytest.raises(sasl.SaslError, match="user name is not UTF-8"):
        sasl.parse_login_user(b64(b"\xff"))
    with pytest.raises(sasl.SaslError, match="password longer than 255 octets"):
        sasl.parse_login_password(b64(b"p" * 256))


def test_a_password_is_the_clients_octets_in_login_and_plain() -> None:
    """Latin-1 (not UTF-8) passes as it came, as nginx and Dovecot take it; a name must be UTF-8."""
    latin1 = "s\u00e9same".encode("latin-1")
    assert sasl.parse_login_password(b64(latin1)) == latin1
    assert sasl.parse_plain(b64(b"\x00alice\x00" + latin1)) == sasl.Credentials(
        "alice", latin1, sasl.Mechanism.PLAIN
    )
    exchange = sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice")
    assert exchange.respond(b64(latin1)) == sasl.Credentials("alice", latin1, sasl.Mechanism.LOGIN)
    for response in (b"\x00al\xe9\x00secret", b"\xe9\x00alice\x00secret"):
        with pytest.raises(sasl.SaslError, match="is not UTF-8"):
            sasl.parse_plain(b64(response))


def test_plain_response_encodes_authzid_user_and_password() -> None:
    credentials = sasl.Credentials("alice", PASSWORD.encode(), authzid="admin")
    assert base64.b64decode(sasl.plain_response(credentials)) == b"admin\x00alice\x00" + PASSWORD.encode()


field = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=60)
# A password is any octets but NUL (the separator), UTF-8 or not.
octets = st.binary(max_size=60).map(lambda data: data.replace(b"\x00", b""))


@DETERMINISTIC
@given(authzid=field, username=field.filter(bool), password=octets)
def test_plain_response_round_trips_through_parse_plain(authzid: str, username: str, password: bytes) -> None:
    credentials = sasl.Credentials(username, password, sasl.Mechanism.PLAIN, authzid)
    assert sasl.parse_plain(sasl.plain_response(credentials)) == credentials


# ---------------------------------------------------------------------------------------------
# The exchange


def test_response_limit_fits_the_largest_plain_response() -> None:
    credentials = sasl.Credentials("u" * 255, b"p" * 255, sasl.Mechanism.PLAIN, authzid="z" * 255)
    assert len(sasl.plain_response(credentials)) == sasl.MAX_RESPONSE_LINE == 1024


@pytest.mark.parametrize("name", [b"CRAM-MD5", b"", b"PLAIN ", b"XOAUTH2"])
def test_begin_refuses_mechanisms_we_do_not_offer(name: bytes) -> None:
    assert sasl.begin(name, None) is None
    assert sasl.begin(name, b"AGFsaWNlAHNlY3JldA==") is None


@pytest.mark.parametrize(
    ("name", "challenge"),
    [
        (b"PLAIN", b""),
        (b"plain", b""),
        (b"LOGIN", sasl.LOGIN_USERNAME_PROMPT),
        (b"Login", sasl.LOGIN_USERNAME_PROMPT),
    ],
)
def test_begin_without_initial_response_challenges(name: bytes, challenge: bytes) -> None:
    step = sasl.begin(name, None)
    assert isinstance(step, sasl.SaslExchange)
    assert step.challenge == challenge


def test_plain_with_initial_response_completes_at_once() -> None:
    response = sasl.plain_response(sasl.Credentials("alice", PASSWORD.encode()))
    assert sasl.begin(b"PLAIN", response) == sasl.Credentials(
        "alice", PASSWORD.encode(), sasl.Mechanism.PLAIN
    )


def test_plain_after_its_empty_challenge() -> None:
    exchange = sasl.begin(b"PLAIN", None)
    assert isinstance(exchange, sasl.SaslExchange)
    step = exchange.respond(b64(b"alice\x00alice\x00" + PASSWORD.encode()))
    assert step == sasl.Credentials("alice", PASSWORD.encode(), sasl.Mechanism.PLAIN, authzid="alice")


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "after-challenge"])
def test_plain_refuses_another_authorization_identity(initial: bool) -> None:
    """The one check the three front-ends share: acting as another identity is never replayed."""
    response = b64(b"admin\x00alice\x00" + PASSWORD.encode())
    exchange = sasl.begin(b"PLAIN", None)
    assert isinstance(exchange, sasl.SaslExchange)
    step = sasl.begin(b"PLAIN", response) if initial else exchange.respond(response)
    assert step == sasl.SaslAuthzidRefused()


def test_login_asks_for_the_user_name_then_the_password() -> None:
    exchange = sasl.begin(b"LOGIN", None)
    assert isinstance(exchange, sasl.SaslExchange)
    password_due = exchange.respond(b64(b"alice"))
    assert password_due == sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice")
    assert isinstance(password_due, sasl.SaslExchange)
    assert password_due.challenge == sasl.LOGIN_PASSWORD_PROMPT
    assert password_due.respond(b64(PASSWORD.encode())) == sasl.Credentials(
        "alice", PASSWORD.encode(), sasl.Mechanism.LOGIN
    )


def test_login_takes_the_user_name_as_initial_response() -> None:
    step = sasl.begin(b"LOGIN", b64(b"alice"))
    assert step == sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice")


@pytest.mark.parametrize("name", [b"LOGIN", b"login"])
def test_login_with_the_empty_initial_response_challenges_for_the_user_name(name: bytes) -> None:
    # LOGIN is server-first: "=" means no data yet, not an empty user name (Dovecot agrees).
    step = sasl.begin(name, sasl.EMPTY_INITIAL_RESPONSE)
    assert step == sasl.SaslExchange(sasl.Mechanism.LOGIN)
    assert isinstance(step, sasl.SaslExchange)
    assert step.challenge == sasl.LOGIN_USERNAME_PROMPT


def test_login_refuses_an_empty_user_name() -> None:
    assert sasl.SaslExchange(sasl.Mechanism.LOGIN).respond(b"") == sasl.SaslInvalid("empty user name")


def test_login_allows_an_empty_password() -> None:
    step = sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice").respond(b"")
    assert step == sasl.Credentials("alice", b"", sasl.Mechanism.LOGIN)


@pytest.mark.parametrize(
    "exchange",
    [
        sasl.SaslExchange(sasl.Mechanism.PLAIN),
        sasl.SaslExchange(sasl.Mechanism.LOGIN),
        sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice"),
    ],
    ids=["plain", "login-user-name", "login-password"],
)
def test_star_cancels_at_every_challenge(exchange: sasl.SaslExchange) -> None:
    assert exchange.respond(sasl.CANCEL) == sasl.SaslCancelled()


@pytest.mark.parametrize(
    ("name", "initial", "reason"),
    [
        (b"PLAIN", b"*", "invalid base64"),  # only a response to a challenge can cancel
        (b"PLAIN", b"=", "PLAIN response needs exactly two NUL separators"),
        (b"PLAIN", b"not base64!", "invalid base64"),
        (b"LOGIN", b"//4=", "user name is not UTF-8"),
        (b"LOGIN", b64(b"u" * 256), "user name longer than 255 octets"),
    ],
)
def test_malformed_responses_are_invalid(name: bytes, initial: bytes, reason: str) -> None:
    assert sasl.begin(name, initial) == sasl.SaslInvalid(reason)


def test_invalid_password_responses_never_show_the_password() -> None:
    exchange = sasl.SaslExchange(sasl.Mechanism.LOGIN, "alice")
    for response in (PASSWORD.encode(), b64(PASSWORD.encode() * 20)):
        step = exchange.respond(response)
        assert isinstance(step, sasl.SaslInvalid)
        assert PASSWORD not in repr(step)
    assert PASSWORD not in repr(exchange.respond(b64(PASSWORD.encode())))


# ---------------------------------------------------------------------------------------------
# Control characters


@pytest.mark.parametrize("char", [*map(chr, range(0x20)), "\x7f"], ids=lambda char: f"U+{ord(char):04X}")
def test_control_characters_are_not_printable(char: str) -> None:
    assert not sasl.printable(f"ali{char}ce")
    assert not sasl.printable("alice", f"se{char}cret")
    assert not sasl.printable("alice", f"se{char}cret".encode())


@pytest.mark.parametrize(
    "char",
    ["\u0085", "\u009b", "\u2028", "\u2029", "\u202e", "\u200f"],
    ids=lambda char: f"U+{ord(char):04X}",
)
def test_a_user_name_must_be_printable_text(char: str) -> None:
    """Review J7: C1 controls (U+009B: the 8-bit ESC [), line and paragraph separators and
    bidirectional marks passed, and forged session lines (a log reader splits at U+2028)."""
    assert not sasl.printable(f"ali{char}ce")
    assert sasl.printable("alice", f"se{char}cret".encode())  # a password's octets are its own


@pytest.mark.parametrize(
    "texts",
    [
        (),
        ("",),
        ("alice@example.com", "p\u00e4ss w\u00f6rd ~!"),
        ("alice", "s\u00e9same ~!".encode("latin-1")),
    ],
)
def test_everything_else_is_printable(texts: tuple[str | bytes, ...]) -> None:
    assert sasl.printable(*texts)


FORGED_LOG_LINE = "x\r\n2026-01-01 00:00:00,000 INFO mailgress.session: session user=root"


def _front_end_answers(make: Callable[[FrontendConfig], FrontendMachine], data: bytes) -> list[Command]:
    frontend = make(FrontendConfig())
    frontend.start()
    return frontend.handle(DataReceived(data))


@pytest.mark.parametrize(
    ("make", "prefix", "refusal", "continuation"),
    [
        (imap.Frontend, b"a AUTHENTICATE ", b"a NO " + imap.REFUSAL_TEXT + b"\r\n", b"+ "),
        (pop3.Frontend, b"AUTH ", pop3.REPLY_AUTH_FAILED, b"+ "),
        (smtp.Frontend, b"EHLO c\r\nAUTH ", smtp.REPLY_AUTH_FAILED, b"334 "),
    ],
    ids=["imap", "pop3", "smtp"],
)
def test_front_ends_agree_on_sasl(
    make: Callable[[FrontendConfig], FrontendMachine], prefix: bytes, refusal: bytes, continuation: bytes
) -> None:
    """The shared SASL rules hold in all three protocols: a name that could forge a log line
    is refused like a failed login, and LOGIN's "=" starts at the user name challenge."""
    forged = b"PLAIN " + b64(b"\x00" + FORGED_LOG_LINE.encode() + b"\x00pw")
    commands = _front_end_answers(make, prefix + forged + b"\r\n")
    assert not any(isinstance(command, Authenticate) for command in commands)
    assert commands[-1] == Send(refusal)
    commands = _front_end_answers(make, prefix + b"LOGIN =\r\n")
    assert commands[-1] == Send(continuation + sasl.LOGIN_USERNAME_PROMPT + b"\r\n")


@pytest.mark.parametrize(
    ("username", "password", "expected"),
    [
        ("a" * 241 + "@alpha.example", b"p" * 255, True),  # 255 octets each: RFC 4616's limit
        ("a" * 242 + "@alpha.example", b"secret", False),  # a name of 256 octets
        ("\u00e9" * 128, b"secret", False),  # 128 characters, 256 octets of UTF-8
        ("alice@alpha.example", b"p" * 256, False),
        ("ali\u2028ce@alpha.example", b"secret", False),  # what printable refuses
    ],
    ids=["at-the-limit", "long-name", "long-utf8-name", "long-password", "unprintable"],
)
def test_credentials_to_replay_are_printable_and_within_rfc_4616(
    username: str, password: bytes, expected: bool
) -> None:
    """Review J7: a 3,000-octet IMAP LOGIN literal made Dovecot answer "* BYE Input buffer full",
    which the proxy took for a failing backend (a warning, the next endpoint tried with the
    credentials, a temporary failure inviting the client to retry)."""
    credentials = sasl.Credentials(username=username, password=password, mechanism=sasl.Mechanism.NATIVE)
    assert sasl.replayable(credentials) is expected
