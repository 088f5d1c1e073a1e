"""Tests for proxy/protocols/imap.py: transcripts, limits, driver misuse, backend login, fuzzing.

The transcripts in transcripts/imap/ carry most of the front-end's behaviour; this module runs
them (whole and cut into random chunks), then covers what a transcript cannot express: limits
measured in kilobytes, LocalProtocolError for driver misuse, the BackendLogin dialogue (with
STARTTLS towards the backend), and hypothesis fuzzing of both machines with mutated input. The
tests every protocol runs come from the factories in dialogues.py, bound here to their names
with IMAP's data.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import imap, sasl
from proxy.protocols.errors import LocalProtocolError
from proxy.protocols.events import (
    Authenticate,
    BackendConfig,
    BackendFailed,
    ClientAddress,
    Close,
    ConnectionClosed,
    DataReceived,
    FrontendConfig,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    LoginRequest,
    LoginSucceeded,
    LoginUnavailable,
    Relay,
    Send,
    StartTls,
    TimedOut,
    TlsEstablished,
)
from tests.proxy.protocols import dialogues, transcript
from tests.proxy.protocols.dialogues import FUZZ, PASSWORD, feed

TRANSCRIPTS = transcript.paths("imap")


def started(config: FrontendConfig | None = None) -> imap.Frontend:
    return dialogues.started(imap.Frontend, config)


# ---------------------------------------------------------------------------------------------
# Transcripts


def test_there_are_transcripts_for_every_scenario_family() -> None:
    assert len(TRANSCRIPTS) >= 12


test_transcript, test_transcript_split_anywhere_gives_the_same_commands = dialogues.transcript_tests(
    TRANSCRIPTS, imap.Frontend
)


# ---------------------------------------------------------------------------------------------
# Front-end limits and details a transcript cannot carry


def test_greeting_is_one_line_with_capabilities() -> None:
    greeting = imap.Frontend(FrontendConfig(server_name="mx.example")).start()
    assert greeting == [
        Send(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] mx.example ready\r\n")
    ]


def test_line_too_long_gets_bad_and_close() -> None:
    frontend = started()
    commands = frontend.handle(DataReceived(b"a" * (imap.MAX_COMMAND_LINE + 1)))
    assert commands == [Send(b"* BAD Command line too long\r\n"), Close("line too long")]
    assert frontend.state is imap.State.LOGOUT


def test_line_of_exactly_the_limit_is_accepted() -> None:
    frontend = started()
    line = b"a NOOP" + b" " * (imap.MAX_COMMAND_LINE - 6)
    assert len(line) == imap.MAX_COMMAND_LINE
    # Trailing spaces are taken (as Dovecot does): the line is read and answered, not refused as
    # too long.
    assert frontend.handle(DataReceived(line + b"\r\n")) == [Send(b"a OK NOOP completed\r\n")]


def test_command_line_limit_counts_every_segment_of_a_command() -> None:
    frontend = started()
    first = b'a ID ("' + b"n" * 5000 + b'" {1+}\r\nx'
    second = b' "' + b"v" * 4000 + b'")\r\n'
    commands = frontend.handle(DataReceived(first + second))
    assert commands == [Send(b"* BAD Command line too long\r\n"), Close("command too long")]


def test_literal_limit_counts_every_literal_of_a_command() -> None:
    frontend = started()
    half = imap.MAX_LITERAL_OCTETS // 2
    assert frontend.handle(DataReceived(b"a LOGIN {%d}\r\n" % half)) == [
        Send(b"+ Ready for literal data\r\n")
    ]
    commands = frontend.handle(DataReceived(b"u" * half + b" {%d}\r\n" % (half + 1)))
    assert commands == [Send(b"a BAD [TOOBIG] Literal too large before login\r\n")]
    # Refused instead of "+": the client sends none of it, and the session goes on.
    assert frontend.handle(DataReceived(b"b NOOP\r\n")) == [Send(b"b OK NOOP completed\r\n")]


def test_literal_of_exactly_the_limit_is_accepted() -> None:
    """The parser takes it whole; the name it carries is then too long to replay (sasl.replayable)
    and gets the refusal of a failed login, not the BAD of an over-long literal."""
    frontend = started()
    size = imap.MAX_LITERAL_OCTETS
    frontend.handle(DataReceived(b"a LOGIN {%d+}\r\n" % size))
    commands = frontend.handle(DataReceived(b"u" * size + b" secret\r\n"))
    assert commands == [Send(b"a NO " + imap.REFUSAL_TEXT + b"\r\n")]


def test_pipelined_bytes_during_login_are_bounded() -> None:
    frontend = started()
    assert isinstance(frontend.handle(DataReceived(b"a LOGIN alice secret\r\n"))[0], Authenticate)
    assert frontend.handle(DataReceived(b"x" * imap.MAX_PIPELINED_OCTETS)) == []
    commands = frontend.handle(DataReceived(b"x"))
    assert commands == [
        Send(b"* BYE Too much data sent before login completed\r\n"),
        Close("too much pipelined data during login"),
    ]


def test_authenticate_ends_its_batch_and_keeps_the_rest_of_the_packet() -> None:
    """The driver acts on Authenticate at once: nothing may follow it in the same list."""
    frontend = started()
    rest = b"b NOOP\r\n" + b"x" * (imap.MAX_PIPELINED_OCTETS + 1)
    commands = frontend.handle(DataReceived(b"a LOGIN alice secret\r\n" + rest))
    assert [type(command) for command in commands] == [Authenticate]
    assert frontend.handle(LoginAccepted(b"a OK\r\n")) == [Send(b"a OK\r\n"), Relay(rest)]


def test_timeout_while_a_login_is_pending_says_bye() -> None:
    frontend = started()
    frontend.handle(DataReceived(b"a LOGIN alice secret\r\n"))
    assert frontend.handle(TimedOut()) == [
        Send(b"* BYE Autologout; idle for too long\r\n"),
        Close("idle timeout"),
    ]


def test_states_follow_rfc_3501() -> None:
    frontend = imap.Frontend(FrontendConfig())
    states = [frontend.state]
    frontend.start()
    frontend.handle(DataReceived(b"a LOGIN alice secret\r\nb SELECT INBOX\r\n"))
    states.append(frontend.state)
    assert frontend.handle(LoginAccepted(b"a OK done\r\n")) == [
        Send(b"a OK done\r\n"),
        Relay(b"b SELECT INBOX\r\n"),
    ]
    states.append(frontend.state)
    assert states == [imap.State.NOT_AUTHENTICATED, imap.State.NOT_AUTHENTICATED, imap.State.AUTHENTICATED]


def test_login_request_carries_protocol_tag_and_redacted_credentials() -> None:
    frontend = started()
    (command,) = frontend.handle(
        DataReceived(b'tag1 LOGIN "user@example.org" "' + PASSWORD.encode() + b'"\r\n')
    )
    assert command == Authenticate(
        LoginRequest(
            protocol="imap",
            routing_key="user@example.org",
            credentials=sasl.Credentials("user@example.org", PASSWORD.encode()),
            tag=b"tag1",
        )
    )
    assert PASSWORD not in repr(command)


# ---------------------------------------------------------------------------------------------
# Driver misuse raises LocalProtocolError; nothing else does


(
    test_handle_before_start_is_misuse,
    test_start_twice_is_misuse,
    test_verdicts_and_tls_news_out_of_turn_are_misuse,
) = dialogues.misuse_tests(imap.Frontend, b"a NOOP\r\n", accepted=b"a OK\r\n")


def test_events_after_relay_are_misuse() -> None:
    frontend = started()
    frontend.handle(DataReceived(b"a LOGIN alice secret\r\n"))
    frontend.handle(LoginAccepted(b"a OK\r\n"))
    for event in (DataReceived(b"b NOOP\r\n"), ConnectionClosed(), TimedOut()):
        with pytest.raises(LocalProtocolError):
            frontend.handle(event)


def test_after_close_only_the_eof_is_accepted() -> None:
    frontend = started()
    assert frontend.handle(ConnectionClosed()) == [Close("client closed the connection")]
    assert frontend.handle(ConnectionClosed()) == []
    with pytest.raises(LocalProtocolError):
        frontend.handle(DataReceived(b"a NOOP\r\n"))


# ---------------------------------------------------------------------------------------------
# BackendLogin


def backend_login(
    config: BackendConfig | None = None, username: str = "alice", password: bytes = PASSWORD.encode()
) -> imap.BackendLogin:
    credentials = sasl.Credentials(username, password)
    request = LoginRequest(protocol="imap", routing_key=username, credentials=credentials, tag=b"a1")
    return imap.BackendLogin(request, config or BackendConfig())


def test_backend_login_with_synchronizing_literals() -> None:
    login = backend_login()
    assert feed(login, b"* OK Dovecot ready.") == [Send(b"mg-login LOGIN {5}\r\n")]
    states = [login.state]
    assert feed(login, b"+ OK") == [Send(b"alice {%d}\r\n" % len(PASSWORD))]
    assert feed(login, b"+ OK") == [Send(PASSWORD.encode() + b"\r\n")]
    commands = feed(
        login, b"* CAPABILITY IMAP4rev1 IDLE", b"mg-login OK [CAPABILITY IMAP4rev1] Logged in", b"* 3 EXISTS"
    )
    assert commands == [
        LoginSucceeded(
            reply=b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK [CAPABILITY IMAP4rev1] Logged in\r\n",
            buffered=b"* 3 EXISTS\r\n",
        )
    ]
    assert [*states, login.state] == [imap.BackendState.LOGIN, imap.BackendState.LOGGED_IN]


def test_backend_login_uses_literal_plus_when_advertised() -> None:
    login = backend_login(username="bøb")
    commands = feed(login, b"* OK [CAPABILITY IMAP4rev1 SASL-IR literal+ ID] ready")
    user = "bøb".encode()
    literals = (len(user), user, len(PASSWORD), PASSWORD.encode())
    expected = b"mg-login LOGIN {%d+}\r\n%b {%d+}\r\n%b\r\n" % literals
    assert commands == [Send(expected)]
    assert feed(login, b"mg-login OK Logged in") == [LoginSucceeded(b"a1 OK Logged in\r\n")]


# Latin-1 "sésame": octets that are no UTF-8, with a quote and a backslash an RFC 3501 quoted
# string would have to escape. Literals carry them as they are.
LATIN1_PASSWORD = b's\xe9same "\\'


def test_backend_login_sends_an_8_bit_password_as_its_octets_in_a_literal() -> None:
    login = backend_login(password=LATIN1_PASSWORD)
    feed(login, b"* OK Dovecot ready.")
    assert feed(login, b"+ OK") == [Send(b"alice {%d}\r\n" % len(LATIN1_PASSWORD))]
    assert feed(login, b"+ OK") == [Send(LATIN1_PASSWORD + b"\r\n")]
    login = backend_login(password=LATIN1_PASSWORD)
    assert feed(login, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready") == [
        Send(b"mg-login LOGIN {5+}\r\nalice {%d+}\r\n%b\r\n" % (len(LATIN1_PASSWORD), LATIN1_PASSWORD))
    ]


def test_backend_login_sends_client_address_with_id_first() -> None:
    config = BackendConfig(client=ClientAddress("2001:db8::7", 40123), client_info="id")
    login = backend_login(config)
    (command,) = feed(login, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready")
    assert isinstance(command, Send)
    assert command.data.startswith(
        b'mg-id ID ("x-originating-ip" "2001:db8::7" "x-originating-port" "40123")\r\nmg-login LOGIN {5+}\r\n'
    )
    # The ID's own replies never reach the client; only the LOGIN's do.
    commands = feed(login, b'* ID ("name" "Dovecot")', b"mg-id OK ID completed.", b"mg-login OK Logged in")
    assert commands == [LoginSucceeded(b"a1 OK Logged in\r\n")]


@pytest.mark.parametrize("status", [b"NO", b"BAD"])
def test_backend_login_tolerates_a_refused_id(status: bytes) -> None:
    login = backend_login(BackendConfig(client=ClientAddress("192.0.2.1", 1), client_info="id"))
    feed(login, b"* OK ready")
    assert feed(login, b"mg-id " + status + b" not allowed", b"+ go on") == [
        Send(b"alice {%d}\r\n" % len(PASSWORD))
    ]


@pytest.mark.parametrize(
    "config",
    [
        BackendConfig(client_info="id"),
        BackendConfig(client=ClientAddress("192.0.2.1", 1), client_info="proxy-v2"),
    ],
    ids=["no-client-address", "other-forwarding"],
)
def test_backend_login_sends_no_id_unless_asked_with_an_address(config: BackendConfig) -> None:
    assert feed(backend_login(config), b"* OK ready") == [Send(b"mg-login LOGIN {5}\r\n")]


@pytest.mark.parametrize(
    ("reply", "credentials"),
    [
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", True),
        (b"no nope", True),
        (b"NO [authenticationfailed] lower case", True),
        # RFC 5530 codes that refuse the login for another reason than the credentials: final,
        # but no guess (Dovecot's [LIMIT] comes only after a correct password).
        (b"NO [LIMIT] Maximum number of connections from user+IP exceeded", False),
        (b"NO [INUSE] Mailbox in use", False),
        (b"NO [EXPIRED] Password expired", False),
        (b"NO [CONTACTADMIN] Account disabled", False),
        (b"NO [AUTHORIZATIONFAILED] Not authorized", False),
        (b"NO [PRIVACYREQUIRED] Use TLS", False),
        (b"NO [ALERT] Log in through the web site first", False),
        (b"BAD Error in IMAP command", False),
        (b"BAD [AUTHENTICATIONFAILED] A BAD is never about the password", False),
    ],
)
def test_backend_refusal_goes_to_the_client_with_the_client_tag(reply: bytes, credentials: bool) -> None:
    """A refusal of the credentials in the proxy's own words (review Q1 #4: a backend's own text
    would tell a routed user from an unrouted one); any other refusal as the backend said it."""
    login = backend_login()
    feed(login, b"* OK [CAPABILITY LITERAL+] ready")
    told = b"NO " + imap.REFUSAL_TEXT if credentials else reply
    assert feed(login, b"mg-login " + reply) == [LoginFailed(b"a1 " + told + b"\r\n", credentials)]
    assert login.state is imap.BackendState.FAILED


def test_backend_refusing_the_first_literal_is_a_refusal() -> None:
    login = backend_login()
    feed(login, b"* OK ready")
    assert feed(login, b"mg-login NO [CONTACTADMIN] Account disabled") == [
        LoginFailed(b"a1 NO [CONTACTADMIN] Account disabled\r\n", credentials=False)
    ]


def test_untagged_lines_before_a_refusal_reach_the_client_before_it() -> None:
    """RFC 3501 section 7.1: an [ALERT] must be presented to the user, a refusal's above all."""
    login = backend_login()
    feed(login, b"* OK [CAPABILITY LITERAL+] ready")
    # A bare LF line end comes out as CRLF, as on the success path.
    untagged = b"* OK [ALERT] Your account expires tomorrow\n* NO [ALERT] Really\r\n"
    (verdict,) = login.handle(DataReceived(untagged + b"mg-login NO Bad password\r\n"))
    refusal = b"a1 NO " + imap.REFUSAL_TEXT + b"\r\n"
    reply = b"* OK [ALERT] Your account expires tomorrow\r\n* NO [ALERT] Really\r\n" + refusal
    assert verdict == LoginFailed(reply, credentials=True)


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"* BYE Too many connections"], "backend greeted with BYE"),
        ([b"* PREAUTH welcome"], "backend greeted with PREAUTH"),
        ([b"+OK POP3 ready"], "backend greeting is not an IMAP greeting"),
        ([b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready"], "backend refuses LOGIN (LOGINDISABLED)"),
        (
            [b"* OK ready", b"mg-login NO [UNAVAILABLE] Try later"],
            "backend answered LOGIN with NO [UNAVAILABLE]",
        ),
        ([b"* OK ready", b"mg-login NO [SERVERBUG] oops"], "backend answered LOGIN with NO [SERVERBUG]"),
        ([b"* OK ready", b"mg-login PREAUTH x"], "backend answered LOGIN with PREAUTH []"),
        ([b"* OK ready", b"* BYE shutting down"], "backend said BYE during login"),
        ([b"* OK ready", b"garbage"], "backend sent an unexpected line during login"),
        ([b"* OK ready", b"b7 OK wrong tag"], "backend sent an unexpected line during login"),
        # The client's tag is never sent, so a reply with it answers nothing we asked.
        ([b"* OK ready", b"a1 OK Logged in"], "backend sent an unexpected line during login"),
        ([b"* OK ready", b"+", b"+", b"+"], "backend sent an unexpected continuation during login"),
        (
            [b"* OK [CAPABILITY LITERAL+] ready", b"+ OK"],
            "backend sent an unexpected continuation during login",
        ),
    ],
)
def test_backend_failures(lines: list[bytes], reason: str) -> None:
    login = backend_login()
    commands = feed(login, *lines)
    assert commands[-1] == BackendFailed(reason)
    assert login.state is imap.BackendState.FAILED


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"* OK ready", b"* BYE go away"], "backend said BYE during login"),
        ([b"* OK ready", b"+ too early"], "backend sent an unexpected line in reply to ID"),
        ([b"* OK ready", b"mg-id PREAUTH x"], "backend sent an unexpected status in reply to ID"),
    ],
)
def test_backend_failures_around_id(lines: list[bytes], reason: str) -> None:
    login = backend_login(BackendConfig(client=ClientAddress("192.0.2.1", 1), client_info="id"))
    assert feed(login, *lines)[-1] == BackendFailed(reason)


def test_backend_close_and_timeout_fail_the_login() -> None:
    assert backend_login().handle(ConnectionClosed()) == [
        BackendFailed("backend closed the connection during login")
    ]
    assert backend_login().handle(TimedOut()) == [BackendFailed("backend login timed out")]


def test_backend_reply_limits() -> None:
    login = backend_login()
    assert login.handle(DataReceived(b"*" * (imap.MAX_BACKEND_REPLY + 1))) == [
        BackendFailed("backend reply line too long")
    ]
    login = backend_login()
    feed(login, b"* OK [CAPABILITY LITERAL+] ready")
    line = b"* " + b"x" * 1000
    commands = feed(login, *[line] * (imap.MAX_BACKEND_REPLY // len(line) + 1))
    assert commands == [BackendFailed("backend sent too many untagged lines during login")]


def test_backend_login_refuses_credentials_imap_cannot_carry() -> None:
    assert feed(backend_login(password=b"a\x00b"), b"* OK ready") == [
        BackendFailed("login name or password contains NUL, which IMAP cannot carry")
    ]


def test_backend_login_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        imap.BackendLogin(LoginRequest(protocol="pop3", routing_key="a", tag=b"a1"), BackendConfig())
    with pytest.raises(LocalProtocolError):
        imap.BackendLogin(LoginRequest(protocol="imap", routing_key="a", tag=b"a1"), BackendConfig())
    credentials = sasl.Credentials("a", b"b")
    with pytest.raises(LocalProtocolError):
        imap.BackendLogin(LoginRequest("imap", "a", credentials), BackendConfig())
    login = backend_login()
    for event in (TlsEstablished(), LoginAccepted(b""), LoginRejected(), LoginUnavailable()):
        with pytest.raises(LocalProtocolError):
            login.handle(event)
    feed(login, b"* OK [CAPABILITY LITERAL+] ready")
    feed(login, b"mg-login OK in")
    with pytest.raises(LocalProtocolError):
        login.handle(DataReceived(b"* 1 EXISTS\r\n"))


# Tags RFC 3501 allows (1*<ASTRING-CHAR except "+">, where ASTRING-CHAR adds "]" to ATOM-CHAR)
# but nginx does not ([A-Za-z0-9._-] only), and backends may refuse: Dovecot says "* BAD" to "]".
ODD_TAGS = [b"a]1", b"]", b"[1]", b"!#$&'", b",./:;<=>?@", b"^_`|}~", b"c7"]
# Characters a tag may not hold: atom-specials (list-wildcards, quoted-specials among them), "+".
NOT_IN_TAGS = [b"%", b"*", b'"', b"\\", b"(", b")", b"{", b"+", b"\xc3\xa9"]


def frontend_login(client: bytes) -> tuple[imap.Frontend, LoginRequest]:
    """A front-end that has read ``client`` and asked for a login; the request it made."""
    frontend = started()
    (authenticate,) = frontend.handle(DataReceived(client))
    assert isinstance(authenticate, Authenticate)
    return frontend, authenticate.request


@pytest.mark.parametrize("tag", ODD_TAGS)
def test_any_valid_tag_logs_in_and_the_client_sees_its_own_on_ok(tag: bytes) -> None:
    """The backend hears only our tags; the client's comes back on the success reply."""
    frontend, request = frontend_login(tag + b" AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nc8 NOOP\r\n")
    assert request.tag == tag
    config = BackendConfig(client=ClientAddress("192.0.2.7", 40123), client_info="id")
    login = imap.BackendLogin(request, config)
    assert feed(login, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready") == [
        Send(
            b'mg-id ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40123")\r\n'
            b"mg-login LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n"
        )
    ]
    # The bytes after the OK are the backend's, for the client: even our tag in them stays.
    after = b"* 1 EXISTS\r\nmg-login OK not ours to touch\r\n* 2 EXI"
    # Bare LF line ends come out as CRLF, as from any line the machine passes on.
    backend = b"mg-id OK\r\n* CAPABILITY IMAP4rev1 IDLE\nmg-login OK [CAPABILITY IMAP4rev1 IDLE] Logged in\n"
    (verdict,) = login.handle(DataReceived(backend + after))
    reply = b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert verdict == LoginSucceeded(reply, after)
    assert frontend.handle(LoginAccepted(verdict.reply)) == [Send(reply), Relay(b"c8 NOOP\r\n")]


@pytest.mark.parametrize("tag", ODD_TAGS)
def test_any_valid_tag_is_refused_with_the_client_tag_on_no(tag: bytes) -> None:
    frontend, request = frontend_login(tag + b" LOGIN alice wrong\r\nc8 NOOP\r\n")
    login = imap.BackendLogin(request, BackendConfig())
    commands = feed(login, b"* OK ready") + feed(login, b"+ OK") + feed(login, b"+ OK")
    assert dialogues.sent(commands) == b"mg-login LOGIN {5}\r\nalice {5}\r\nwrong\r\n"
    refusal = b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    (verdict,) = login.handle(DataReceived(b"mg-login" + refusal))
    assert verdict == LoginFailed(tag + refusal, credentials=True)
    assert frontend.handle(LoginRejected(verdict.reply)) == [
        Send(tag + refusal),
        Send(b"c8 OK NOOP completed\r\n"),
    ]


@pytest.mark.parametrize("character", NOT_IN_TAGS)
def test_a_tag_with_a_character_the_grammar_excludes_gets_bad(character: bytes) -> None:
    """Like a mangled line: no tag could be read, so the BAD is untagged."""
    frontend = started()
    assert frontend.handle(DataReceived(b"a" + character + b"1 LOGIN alice secret\r\n")) == [
        Send(b"* BAD Invalid tag\r\n")
    ]


# ---------------------------------------------------------------------------------------------
# BackendLogin with STARTTLS towards the backend: no credential before TLS, ever

STARTTLS = BackendConfig(starttls=True)
NO_STARTTLS = BackendFailed("backend does not offer STARTTLS")
LITERAL_PLUS_LOGIN = b"mg-login LOGIN {5+}\r\nalice {%d+}\r\n%b\r\n" % (len(PASSWORD), PASSWORD.encode())


def test_backend_starttls_offered_in_the_greeting() -> None:
    login = backend_login(STARTTLS)
    # LOGINDISABLED before TLS is what a careful backend says; it does not count yet.
    assert feed(login, b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready") == [
        Send(b"mg-tls STARTTLS\r\n")
    ]
    assert feed(login, b"mg-tls OK Begin TLS negotiation now") == [StartTls()]
    assert login.state is imap.BackendState.TLS
    # RFC 3501 section 6.2.1: the capabilities are asked for again over TLS.
    assert login.handle(TlsEstablished()) == [Send(b"mg-capa CAPABILITY\r\n")]
    commands = feed(login, b"* CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN", b"mg-capa OK done")
    assert commands == [Send(LITERAL_PLUS_LOGIN)]
    assert feed(login, b"mg-login OK Logged in") == [LoginSucceeded(b"a1 OK Logged in\r\n")]


def test_backend_starttls_asks_for_capabilities_when_the_greeting_has_none() -> None:
    login = backend_login(STARTTLS)
    assert feed(login, b"* OK Dovecot ready.") == [Send(b"mg-capa CAPABILITY\r\n")]
    assert login.state is imap.BackendState.CAPABILITY
    assert feed(login, b"* CAPABILITY IMAP4rev1 STARTTLS", b"mg-capa OK done") == [
        Send(b"mg-tls STARTTLS\r\n")
    ]
    assert feed(login, b"mg-tls OK go") == [StartTls()]
    assert login.handle(TlsEstablished()) == [Send(b"mg-capa CAPABILITY\r\n")]
    # The tagged OK may carry the capabilities itself (RFC 3501 section 7.1).
    assert feed(login, b"mg-capa OK [CAPABILITY IMAP4rev1 LITERAL+] done") == [Send(LITERAL_PLUS_LOGIN)]


def test_backend_starttls_forgets_the_plaintext_capabilities() -> None:
    """LITERAL+ before TLS but not after: the login uses synchronizing literals."""
    login = backend_login(STARTTLS)
    feed(login, b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS] ready")
    feed(login, b"mg-tls OK go")
    login.handle(TlsEstablished())
    assert feed(login, b"* CAPABILITY IMAP4rev1", b"mg-capa OK done") == [Send(b"mg-login LOGIN {5}\r\n")]


def test_backend_starttls_then_logindisabled_fails() -> None:
    login = backend_login(STARTTLS)
    feed(login, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready")
    feed(login, b"mg-tls OK go")
    login.handle(TlsEstablished())
    assert feed(login, b"* CAPABILITY IMAP4rev1 LOGINDISABLED", b"mg-capa OK done") == [
        BackendFailed("backend refuses LOGIN (LOGINDISABLED)")
    ]


def test_backend_starttls_sends_id_only_after_tls() -> None:
    config = BackendConfig(client=ClientAddress("192.0.2.7", 40123), client_info="id", starttls=True)
    login = backend_login(config)
    commands = feed(login, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready") + feed(login, b"mg-tls OK go")
    assert dialogues.sent(commands) == b"mg-tls STARTTLS\r\n"
    login.handle(TlsEstablished())
    (command,) = feed(login, b"mg-capa OK [CAPABILITY IMAP4rev1 LITERAL+] done")
    assert command == Send(
        b'mg-id ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40123")\r\n' + LITERAL_PLUS_LOGIN
    )
    assert feed(login, b"mg-id OK", b"mg-login OK in") == [LoginSucceeded(b"a1 OK in\r\n")]


@pytest.mark.parametrize(
    "lines",
    [
        [b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready"],
        [b"* OK ready", b"* CAPABILITY IMAP4rev1 LITERAL+", b"mg-capa OK done"],
        [b"* OK ready", b"mg-capa OK done"],
        [b"* OK [CAPABILITY STARTTLS] ready", b"mg-tls NO [UNAVAILABLE] TLS not configured"],
        [b"* OK [CAPABILITY STARTTLS] ready", b"mg-tls BAD unknown command"],
    ],
    ids=["not-in-greeting", "not-in-capability", "no-capability-at-all", "refused-no", "refused-bad"],
)
def test_backend_without_starttls_fails_and_never_gets_the_login(lines: list[bytes]) -> None:
    commands = feed(backend_login(STARTTLS), *lines)
    assert commands[-1] == NO_STARTTLS
    assert b"LOGIN" not in dialogues.sent(commands)


def test_backend_bytes_after_the_starttls_ok_are_never_read() -> None:
    """A man in the middle appends a fake login success behind the OK (CVE-2014-3556 class)."""
    login = backend_login(STARTTLS)
    feed(login, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready")
    injected = b"mg-tls OK go\r\nmg-capa OK [CAPABILITY IMAP4rev1 LITERAL+]\r\nmg-login OK Logged in\r\n"
    assert login.handle(DataReceived(injected)) == [StartTls()]
    assert login.handle(DataReceived(b"mg-login OK Logged in\r\n")) == []  # before the handshake
    assert login.handle(TlsEstablished()) == [Send(b"mg-capa CAPABILITY\r\n")]
    assert feed(login, b"mg-capa OK done") == [Send(b"mg-login LOGIN {5}\r\n")]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"* OK ready", b"* BYE shutting down"], "backend said BYE during login"),
        ([b"* OK ready", b"+ go on"], "backend sent an unexpected line in reply to CAPABILITY"),
        ([b"* OK ready", b"mg-capa NO never"], "backend answered CAPABILITY with NO"),
        ([b"* OK [CAPABILITY STARTTLS] x", b"* BYE"], "backend said BYE during login"),
        (
            [b"* OK [CAPABILITY STARTTLS] x", b"mg-login OK [CAPABILITY STARTTLS]"],
            "backend sent an unexpected line in reply to STARTTLS",
        ),
    ],
)
def test_backend_starttls_failures(lines: list[bytes], reason: str) -> None:
    assert feed(backend_login(STARTTLS), *lines)[-1] == BackendFailed(reason)


def test_backend_starttls_ignores_untagged_lines_before_its_ok() -> None:
    login = backend_login(STARTTLS)
    feed(login, b"* OK [CAPABILITY STARTTLS] x")
    assert feed(login, b"* OK still here", b"mg-tls OK go") == [StartTls()]


(
    test_backend_close_or_timeout_during_the_handshake_fails_the_login,
    test_backend_tls_news_out_of_turn_is_misuse,
) = dialogues.handshake_tests(
    lambda: backend_login(STARTTLS),
    [b"* OK [CAPABILITY STARTTLS] x"],
    b"mg-tls OK go",
    closed="backend closed the connection during login",
)


# ---------------------------------------------------------------------------------------------
# Redaction: the password shows only where it must go (the backend's LOGIN literal)

REDACTION_DIALOGUES = [
    b"a LOGIN alice " + PASSWORD.encode() + b"\r\n",
    b'a LOGIN "alice" "' + PASSWORD.encode() + b'"\r\n',
    b"a LOGIN alice {%d+}\r\n%b\r\n" % (len(PASSWORD), PASSWORD.encode()),
    b"a AUTHENTICATE PLAIN " + sasl.plain_response(sasl.Credentials("alice", PASSWORD.encode())) + b"\r\n",
    b"a AUTHENTICATE LOGIN YWxpY2U=\r\n" + sasl.encode_base64(PASSWORD.encode()) + b"\r\n",
]


test_frontend_never_shows_the_password = dialogues.redaction_test(
    imap.Frontend, REDACTION_DIALOGUES, accepted=b"a OK in\r\n"
)


@pytest.mark.parametrize(
    "replies",
    [
        [b"mg-login OK Logged in"],
        [b"mg-login NO [AUTHENTICATIONFAILED] Authentication failed."],
        [b"mg-login NO [UNAVAILABLE] down"],
        [b"* BYE bye"],
        [b"junk"],
    ],
)
def test_backend_never_shows_the_password_outside_its_login(replies: list[bytes]) -> None:
    login = backend_login()
    (login_command,) = feed(login, b"* OK [CAPABILITY LITERAL+] ready")
    assert isinstance(login_command, Send)
    assert PASSWORD.encode() in login_command.data
    for command in feed(login, *replies):
        assert PASSWORD not in repr(command)
    with pytest.raises(LocalProtocolError) as raised:
        login.handle(DataReceived(b"more\r\n"))
    assert PASSWORD not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Fuzzing: mutated client input and random backend replies never make handle() raise

VALID_CLIENT_DATA = [transcript.load(path).client_data for path in TRANSCRIPTS]
test_frontend_survives_mutated_input = dialogues.mutated_input_test(
    imap.Frontend, VALID_CLIENT_DATA, dialogues.FRONTEND_CONFIGS, accepted=b"a OK in\r\n"
)


def verdict_given(login: imap.BackendLogin) -> bool:
    return login.state in (imap.BackendState.LOGGED_IN, imap.BackendState.FAILED)


BACKEND_LINES = [
    b"* OK ready",
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready",
    b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready",
    b"* BYE no",
    b"* PREAUTH hi",
    b"+ OK",
    b"+",
    b"* CAPABILITY IMAP4rev1",
    b"* ID NIL",
    b"mg-id OK done",
    b"mg-id NO nope",
    b"mg-login OK Logged in",
    b"mg-login NO [AUTHENTICATIONFAILED] no",
    b"mg-login NO [UNAVAILABLE] down",
    b"mg-login BAD what",
    b"mg-login [",
    b"a1 OK Logged in",
    b"",
]


STARTTLS_DIALOGUES = [
    [
        [b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready", b"mg-tls OK go"],
        [b"* CAPABILITY IMAP4rev1 LITERAL+", b"mg-capa OK done", b"mg-id OK", b"mg-login OK Logged in"],
    ],
    [
        [b"* OK ready", b"* CAPABILITY IMAP4rev1 STARTTLS", b"mg-capa OK done", b"mg-tls OK go"],
        [b"mg-capa OK [CAPABILITY IMAP4rev1] done", b"mg-id NO", b"+ OK", b"+ OK", b"mg-login NO no"],
    ],
]
STARTTLS_NOISE = [
    *BACKEND_LINES,
    b"mg-capa NO no",
    b"mg-tls NO no",
    b"mg-tls OK go",
    b"* CAPABILITY STARTTLS",
]
# All a backend may see from us before TLS when the route wants STARTTLS.
BEFORE_TLS = (
    b"",
    b"mg-capa CAPABILITY\r\n",
    b"mg-tls STARTTLS\r\n",
    b"mg-capa CAPABILITY\r\nmg-tls STARTTLS\r\n",
)


def fuzzed_login(starttls: bool, use_id: bool) -> imap.BackendLogin:
    """A login that forwards the client's address with ID or not."""
    client_info = "id" if use_id else "none"
    return backend_login(
        BackendConfig(client=ClientAddress("192.0.2.1", 1), client_info=client_info, starttls=starttls)
    )


(
    test_backend_login_survives_random_replies,
    test_backend_starttls_never_sends_more_than_starttls_in_plaintext,
) = dialogues.backend_fuzz_tests(
    fuzzed_login,
    verdict_given,
    replies=dialogues.backend_replies(BACKEND_LINES, max_lines=8),
    starttls_dialogues=dialogues.mutated_dialogue(STARTTLS_DIALOGUES, STARTTLS_NOISE),
    before_tls=BEFORE_TLS,
    max_examples=300,
    use_id=st.booleans(),
)


@FUZZ
@given(reply=st.sampled_from(BACKEND_LINES[5:]), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_backend_login_split_anywhere_gives_the_same_commands(reply: bytes, sizes: list[int]) -> None:
    dialogue = b"* OK ready\r\n+ OK\r\n+ OK\r\n" + reply + b"\r\nmg-login OK in\r\n* 1 EXISTS\r\n"
    dialogues.split_backend_dialogue(backend_login, verdict_given, [dialogue], sizes)


@FUZZ
@given(sizes=dialogues.SPLIT_READS)
def test_backend_starttls_dialogue_split_anywhere_gives_the_same_commands(sizes: list[int]) -> None:
    parts = [
        b"* OK ready\r\n* CAPABILITY IMAP4rev1 STARTTLS\r\nmg-capa OK done\r\nmg-tls OK go\r\n",
        b"* CAPABILITY IMAP4rev1 LITERAL+\r\nmg-capa OK done\r\nmg-id OK\r\nmg-login OK in\r\n* 1 EXISTS\r\n",
    ]
    config = BackendConfig(client=ClientAddress("192.0.2.1", 1), client_info="id", starttls=True)
    commands = dialogues.split_backend_dialogue(lambda: backend_login(config), verdict_given, parts, sizes)
    assert commands[-1] == LoginSucceeded(b"a1 OK in\r\n", b"* 1 EXISTS\r\n")
