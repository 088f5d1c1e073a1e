"""Tests for proxy/protocols/pop3.py: transcripts, limits, driver misuse, backend login, fuzzing.

The transcripts in transcripts/pop3/ carry the front-end's dialogue; this module runs them
(whole and cut into random chunks), then covers what a transcript cannot express: limits in
octets, LocalProtocolError for driver misuse, the BackendLogin dialogue (with STLS towards the
backend), redaction, and hypothesis fuzzing of both machines. The tests every protocol runs
come from the factories in dialogues.py, bound here to their names with POP3's data.
"""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import events, pop3, sasl
from proxy.protocols.errors import LocalProtocolError
from proxy.protocols.events import (
    Authenticate,
    BackendConfig,
    BackendFailed,
    ClientAddress,
    Close,
    Command,
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
    StartTlsPolicy,
    TimedOut,
    TlsEstablished,
)
from tests.proxy.protocols import dialogues, transcript
from tests.proxy.protocols.dialogues import FUZZ, PASSWORD, feed, sent

TRANSCRIPTS = transcript.paths("pop3")
CREDENTIALS = sasl.Credentials("alice", PASSWORD.encode())


def started(config: FrontendConfig | None = None) -> pop3.Frontend:
    return dialogues.started(pop3.Frontend, config)


# ---------------------------------------------------------------------------------------------
# Transcripts


def test_there_are_transcripts_for_every_scenario_family() -> None:
    assert len(TRANSCRIPTS) >= 25


test_transcript, test_transcript_split_anywhere_gives_the_same_commands = dialogues.transcript_tests(
    TRANSCRIPTS, pop3.Frontend
)


# ---------------------------------------------------------------------------------------------
# Front-end details a transcript cannot carry


def test_command_line_of_exactly_255_octets_is_accepted() -> None:
    line = b"USER " + b"u" * (pop3.MAX_COMMAND_LINE - len(b"USER "))
    assert len(line + b"\r\n") == 255  # RFC 2449 section 4
    frontend = started()
    assert frontend.handle(DataReceived(line + b"\r\n")) == [Send(b"+OK\r\n")]
    commands = frontend.handle(DataReceived(line + b"x\r\n"))
    assert commands == [Send(pop3.REPLY_TOO_LONG), Close("line too long")]


def test_sasl_line_of_the_largest_plain_response_is_accepted() -> None:
    credentials = sasl.Credentials("u" * 255, b"p" * 255, sasl.Mechanism.PLAIN, authzid="u" * 255)
    response = sasl.plain_response(credentials)
    assert len(response) == pop3.MAX_SASL_LINE == 1024
    frontend = started()
    assert frontend.handle(DataReceived(b"AUTH PLAIN\r\n")) == [Send(b"+ \r\n")]
    (command,) = frontend.handle(DataReceived(response + b"\r\n"))
    assert isinstance(command, Authenticate)
    assert command.request.credentials == credentials


def test_initial_response_is_held_to_the_command_limit() -> None:
    """RFC 5034 section 4: a client must not send an initial response that overflows 255 octets."""
    response = sasl.plain_response(sasl.Credentials("u" * 100, b"p" * 100))
    frontend = started()
    commands = frontend.handle(DataReceived(b"AUTH PLAIN " + response + b"\r\n"))
    assert commands == [Send(pop3.REPLY_TOO_LONG), Close("line too long")]


def test_pipelined_bytes_during_login_are_bounded() -> None:
    frontend = started()
    assert isinstance(frontend.handle(DataReceived(b"USER a\r\nPASS b\r\n"))[-1], Authenticate)
    assert frontend.handle(DataReceived(b"x" * pop3.MAX_HELD_BYTES)) == []
    commands = frontend.handle(DataReceived(b"x"))
    assert commands == [Send(pop3.REPLY_TOO_MUCH), Close("client pipelined too much data during login")]
    assert frontend.state is pop3.State.CLOSED


def test_states_follow_rfc_1939() -> None:
    frontend = pop3.Frontend(FrontendConfig(starttls=StartTlsPolicy.ON))
    assert frontend.state is pop3.State.AUTHORIZATION
    frontend.start()
    frontend.handle(DataReceived(b"AUTH LOGIN\r\n"))
    assert frontend.state is pop3.State.AUTH_LOGIN_USERNAME
    frontend.handle(DataReceived(b"YWxpY2U=\r\n"))
    assert frontend.state is pop3.State.AUTH_LOGIN_PASSWORD
    frontend.handle(DataReceived(b"*\r\nSTLS\r\n"))
    assert frontend.state is pop3.State.STARTING_TLS
    frontend.handle(TlsEstablished())
    frontend.handle(DataReceived(b"AUTH PLAIN\r\n"))
    assert frontend.state is pop3.State.AUTH_PLAIN
    frontend.handle(DataReceived(b"AGFsaWNlAHNlY3JldA==\r\n"))
    assert frontend.state is pop3.State.AUTHENTICATING
    frontend.handle(LoginAccepted(b"+OK\r\n"))
    assert frontend.state is pop3.State.TRANSACTION


def test_login_request_carries_protocol_and_redacted_credentials() -> None:
    frontend = started()
    (command,) = frontend.handle(DataReceived(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n"))[1:]
    assert command == Authenticate(
        LoginRequest(protocol="pop3", routing_key="alice", credentials=CREDENTIALS)
    )
    assert PASSWORD not in repr(command)


(
    test_handle_before_start_is_misuse,
    test_start_twice_is_misuse,
    test_verdicts_and_tls_news_out_of_turn_are_misuse,
) = dialogues.misuse_tests(pop3.Frontend, b"CAPA\r\n", accepted=b"+OK\r\n")


def test_events_after_relay_are_misuse() -> None:
    frontend = started()
    frontend.handle(DataReceived(b"USER a\r\nPASS b\r\n"))
    frontend.handle(LoginAccepted(b"+OK\r\n"))
    with pytest.raises(LocalProtocolError):
        frontend.handle(DataReceived(b"STAT\r\n"))


@pytest.mark.parametrize(
    "event",
    [DataReceived(b"NOOP\r\n"), ConnectionClosed(), TimedOut(), LoginAccepted(b"+OK\r\n"), LoginRejected()],
    ids=dialogues.event_name,
)
def test_after_close_events_in_flight_are_ignored(event: events.Event) -> None:
    frontend = started()
    frontend.handle(DataReceived(b"USER a\r\nPASS b\r\n"))
    assert frontend.handle(ConnectionClosed()) == [Close("client closed the connection")]
    assert frontend.handle(event) == []


# ---------------------------------------------------------------------------------------------
# Backend login


def backend_login(
    config: BackendConfig | None = None, credentials: sasl.Credentials = CREDENTIALS
) -> pop3.BackendLogin:
    request = LoginRequest(protocol="pop3", routing_key=credentials.username, credentials=credentials)
    return pop3.BackendLogin(request, config or BackendConfig())


XCLIENT = BackendConfig(client=ClientAddress("192.0.2.7", 40123), client_info="xclient")


def test_backend_login_with_user_and_pass() -> None:
    login = backend_login()
    assert feed(login, b"+OK Dovecot ready.") == [Send(b"USER alice\r\n")]
    assert feed(login, b"+OK") == [Send(b"PASS " + PASSWORD.encode() + b"\r\n")]
    commands = login.handle(DataReceived(b"+OK Logged in.\r\n+OK early"))
    assert commands == [LoginSucceeded(reply=b"+OK Logged in.\r\n", buffered=b"+OK early")]
    assert login.state is pop3.BackendState.DONE


def test_backend_login_replays_an_8_bit_password_as_its_octets() -> None:
    latin1 = sasl.Credentials("alice", b"s\xe9same p\xe4ss")  # Latin-1: no UTF-8
    login = backend_login(credentials=latin1)
    feed(login, b"+OK Dovecot ready.")
    assert feed(login, b"+OK") == [Send(b"PASS s\xe9same p\xe4ss\r\n")]


def test_backend_login_in_one_read() -> None:
    """A backend that answers everything at once (it cannot, but the machine must not care)."""
    commands = feed(backend_login(), b"+OK hi", b"+OK", b"+OK Logged in.")
    assert commands == [
        Send(b"USER alice\r\n"),
        Send(b"PASS " + PASSWORD.encode() + b"\r\n"),
        LoginSucceeded(reply=b"+OK Logged in.\r\n"),
    ]


@pytest.mark.parametrize(
    ("host", "addr"),
    [
        ("192.0.2.7", b"192.0.2.7"),
        ("2001:db8::7", b"2001:db8::7"),
        ("::ffff:192.0.2.7", b"192.0.2.7"),
    ],
)
def test_backend_login_sends_xclient_when_the_greeting_offers_it(host: str, addr: bytes) -> None:
    login = backend_login(BackendConfig(client=ClientAddress(host, 40123), client_info="xclient"))
    assert feed(login, b"+OK [XCLIENT] Dovecot ready.") == [
        Send(b"XCLIENT ADDR=" + addr + b" PORT=40123\r\n")
    ]
    assert login.state is pop3.BackendState.XCLIENT
    assert feed(login, b"+OK Updated") == [Send(b"USER alice\r\n")]


@pytest.mark.parametrize(
    ("config", "greeting"),
    [
        (XCLIENT, b"+OK Dovecot ready."),  # an untrusting Dovecot does not offer it
        (BackendConfig(client=ClientAddress("192.0.2.7", 1)), b"+OK [XCLIENT] ready."),  # not asked for
        (BackendConfig(client_info="xclient"), b"+OK [XCLIENT] ready."),  # no client address
        (BackendConfig(client=ClientAddress("/run/sock", 0), client_info="xclient"), b"+OK [XCLIENT] hi"),
    ],
)
def test_backend_login_sends_no_xclient_unless_asked_offered_and_possible(
    config: BackendConfig, greeting: bytes
) -> None:
    assert feed(backend_login(config), greeting) == [Send(b"USER alice\r\n")]


@pytest.mark.parametrize(
    ("refusal", "credentials"),
    [
        (b"-ERR [AUTH] Authentication failed.", True),
        (b"-ERR [auth/unknown-user] Bad password.", True),  # a sub-code of AUTH (RFC 2449 section 8)
        (b"-ERR Authentication failed.", True),
        (b"-ERR", True),
        (b"-ERR [no closing bracket", True),
        # The client should see why; another endpoint will not help; none of them is a guess.
        (b"-ERR [IN-USE] Mailbox is locked.", False),
        (b"-ERR [SYS/PERM] Account disabled.", False),
        (b"-ERR [LOGIN-DELAY] Wait 300 seconds between logins.", False),
        (b"-ERR [AUTHX] Not the AUTH code.", False),
    ],
)
def test_backend_refusal_after_pass_goes_to_the_client(refusal: bytes, credentials: bool) -> None:
    """A refusal of the credentials in the proxy's own words (review Q1 #4: a backend's own text
    would tell a routed user from an unrouted one); any other refusal as the backend said it."""
    login = backend_login()
    feed(login, b"+OK hi", b"+OK")
    told = pop3.REPLY_AUTH_FAILED if credentials else refusal + b"\r\n"
    assert feed(login, refusal) == [LoginFailed(reply=told, credentials=credentials)]


@pytest.mark.parametrize(
    ("refusal", "credentials"),
    [(b"-ERR [AUTH] Unknown user.", True), (b"-ERR [IN-USE] Maildrop busy.", False)],
)
def test_backend_refusing_user_is_a_refusal(refusal: bytes, credentials: bool) -> None:
    login = backend_login()
    feed(login, b"+OK hi")
    told = pop3.REPLY_AUTH_FAILED if credentials else refusal + b"\r\n"
    assert feed(login, refusal) == [LoginFailed(reply=told, credentials=credentials)]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"-ERR go away"], "backend greeting was -ERR"),
        ([b"* OK IMAP4rev1"], "backend sent a malformed response in state GREETING"),
        ([b"+OKAY"], "backend sent a malformed response in state GREETING"),
        (
            [b"+OK hi", b"+OK", b"-ERR [SYS/TEMP] Storage down."],
            "backend reported a temporary failure ([SYS/TEMP])",
        ),
        ([b"+OK hi", b"-ERR [SYS/TEMP] Auth down."], "backend reported a temporary failure ([SYS/TEMP])"),
        ([b"+OK hi", b"+OK", b"garbage"], "backend sent a malformed response in state PASS"),
    ],
)
def test_backend_failures(lines: list[bytes], reason: str) -> None:
    commands = feed(backend_login(), *lines)
    assert commands[-1] == BackendFailed(reason)


def test_backend_refusing_xclient_fails_the_login() -> None:
    login = backend_login(XCLIENT)
    feed(login, b"+OK [XCLIENT] ready")
    assert feed(login, b"-ERR You are not from trusted IP") == [BackendFailed("backend refused XCLIENT")]


def test_backend_close_and_timeout_fail_the_login_once() -> None:
    login = backend_login()
    assert login.handle(ConnectionClosed()) == [BackendFailed("backend closed the connection")]
    assert login.handle(TimedOut()) == []  # raced with the verdict
    assert backend_login().handle(TimedOut()) == [BackendFailed("backend login timed out")]


def test_backend_response_limit() -> None:
    line = b"+OK " + b"x" * (pop3.MAX_RESPONSE_LINE - 4)
    assert len(line + b"\r\n") == 512  # RFC 2449 section 4
    assert feed(backend_login(), line) == [Send(b"USER alice\r\n")]
    commands = feed(backend_login(), line + b"x")
    assert commands == [BackendFailed("backend response too long in state GREETING")]


@pytest.mark.parametrize(
    "credentials",
    [
        sasl.Credentials("ali\r\nce", PASSWORD.encode()),
        sasl.Credentials("alice", b"pass\nQUIT"),
        sasl.Credentials("a", b"\x00"),
    ],
)
def test_backend_login_never_sends_credentials_that_would_break_the_line(
    credentials: sasl.Credentials,
) -> None:
    login = backend_login(credentials=credentials)
    assert feed(login, b"+OK hi") == [LoginFailed(reply=pop3.REPLY_AUTH_FAILED, credentials=True)]


def test_backend_login_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        pop3.BackendLogin(LoginRequest(protocol="pop3", routing_key="alice"), BackendConfig())
    with pytest.raises(LocalProtocolError):
        pop3.BackendLogin(
            LoginRequest(protocol="imap", routing_key="a", credentials=CREDENTIALS), BackendConfig()
        )
    login = backend_login()
    for event in (TlsEstablished(), LoginAccepted(b"+OK\r\n"), LoginRejected(), LoginUnavailable()):
        with pytest.raises(LocalProtocolError):
            login.handle(event)
    feed(login, b"-ERR no")
    with pytest.raises(LocalProtocolError):
        login.handle(DataReceived(b"+OK\r\n"))


def test_frontend_and_backend_compose() -> None:
    """The front-end's request drives the backend login, whose verdict the front-end relays."""
    frontend = started()
    *_, authenticate = frontend.handle(DataReceived(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nSTAT\r\n"))
    assert isinstance(authenticate, Authenticate)
    login = pop3.BackendLogin(authenticate.request, BackendConfig())
    wire = feed(login, b"+OK ready") + feed(login, b"+OK") + feed(login, b"+OK Logged in.")
    assert sent(wire) == b"USER alice\r\nPASS secret\r\n"
    verdict = wire[-1]
    assert isinstance(verdict, LoginSucceeded)
    assert frontend.handle(LoginAccepted(verdict.reply)) == [Send(b"+OK Logged in.\r\n"), Relay(b"STAT\r\n")]


# ---------------------------------------------------------------------------------------------
# Backend login with STLS towards the backend: no credential before TLS, ever

STARTTLS = BackendConfig(starttls=True)
XCLIENT_STARTTLS = BackendConfig(
    client=ClientAddress("192.0.2.7", 40123), client_info="xclient", starttls=True
)
NO_STARTTLS = BackendFailed("backend does not offer STARTTLS")


def test_backend_stls_then_user_and_pass() -> None:
    login = backend_login(STARTTLS)
    assert feed(login, b"+OK Dovecot ready.") == [Send(b"STLS\r\n")]
    assert login.state is pop3.BackendState.STLS
    assert feed(login, b"+OK Begin TLS negotiation now.") == [StartTls()]
    assert login.state is pop3.BackendState.TLS
    assert login.handle(TlsEstablished()) == [Send(b"USER alice\r\n")]
    assert feed(login, b"+OK") == [Send(b"PASS " + PASSWORD.encode() + b"\r\n")]
    assert feed(login, b"+OK Logged in.") == [LoginSucceeded(reply=b"+OK Logged in.\r\n")]


def test_backend_stls_sends_xclient_only_after_tls() -> None:
    login = backend_login(XCLIENT_STARTTLS)
    assert feed(login, b"+OK [XCLIENT] Dovecot ready.") == [Send(b"STLS\r\n")]
    assert feed(login, b"+OK Begin TLS") == [StartTls()]
    assert login.handle(TlsEstablished()) == [Send(b"XCLIENT ADDR=192.0.2.7 PORT=40123\r\n")]
    assert feed(login, b"+OK Updated") == [Send(b"USER alice\r\n")]


@pytest.mark.parametrize(
    "refusal",
    [b"-ERR Unknown command: STLS", b"-ERR [SYS/TEMP] TLS not available", b"-ERR"],
)
def test_backend_without_stls_fails_and_never_gets_the_login(refusal: bytes) -> None:
    login = backend_login(STARTTLS)
    commands = feed(login, b"+OK ready", refusal)
    assert commands == [Send(b"STLS\r\n"), NO_STARTTLS]
    assert login.state is pop3.BackendState.DONE


def test_backend_bytes_after_the_stls_ok_are_never_read() -> None:
    """A man in the middle appends replies behind the +OK (CVE-2014-3556 class)."""
    login = backend_login(STARTTLS)
    feed(login, b"+OK ready")
    assert login.handle(DataReceived(b"+OK Begin TLS\r\n+OK\r\n+OK Logged in.\r\n")) == [StartTls()]
    assert login.handle(DataReceived(b"+OK\r\n")) == []  # before the handshake
    assert login.handle(TlsEstablished()) == [Send(b"USER alice\r\n")]
    assert feed(login, b"-ERR [AUTH] Unknown user.") == [
        LoginFailed(reply=pop3.REPLY_AUTH_FAILED, credentials=True)
    ]


(
    test_backend_close_or_timeout_during_the_handshake_fails_the_login,
    test_backend_tls_news_out_of_turn_is_misuse,
) = dialogues.handshake_tests(
    lambda: backend_login(STARTTLS), [b"+OK ready"], b"+OK go", closed="backend closed the connection"
)


def test_backend_malformed_reply_to_stls_fails_the_login() -> None:
    assert feed(backend_login(STARTTLS), b"+OK ready", b"* OK") == [
        Send(b"STLS\r\n"),
        BackendFailed("backend sent a malformed response in state STLS"),
    ]


# ---------------------------------------------------------------------------------------------
# Redaction


REDACTION_DIALOGUES = [
    b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n",
    b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS) + b"\r\n",
    b"AUTH LOGIN YWxpY2U=\r\n" + sasl.encode_base64(PASSWORD.encode()) + b"\r\n",
]


test_frontend_never_shows_the_password = dialogues.redaction_test(
    pop3.Frontend, REDACTION_DIALOGUES, accepted=b"+OK in\r\n"
)


@pytest.mark.parametrize(
    "responses",
    [
        [b"+OK Logged in."],
        [b"-ERR [AUTH] no"],
        [b"-ERR [SYS/TEMP] down"],
        [b"PASS " + PASSWORD.encode()],
        [b"+"],
    ],
)
def test_backend_never_shows_the_password_outside_its_pass_line(responses: list[bytes]) -> None:
    login = backend_login()
    feed(login, b"+OK hi")
    (pass_line,) = feed(login, b"+OK")
    assert pass_line == Send(b"PASS " + PASSWORD.encode() + b"\r\n")
    for command in feed(login, *responses):
        if isinstance(command, BackendFailed):
            assert PASSWORD not in command.reason
    with pytest.raises(LocalProtocolError) as raised:
        login.handle(DataReceived(b"more\r\n"))
    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in repr(login)


# ---------------------------------------------------------------------------------------------
# Fuzzing: mutated client input and random backend replies never make handle() raise

VALID_CLIENT_DATA = [transcript.load(path).client_data for path in TRANSCRIPTS] + REDACTION_DIALOGUES
test_frontend_survives_mutated_input = dialogues.mutated_input_test(
    pop3.Frontend, VALID_CLIENT_DATA, dialogues.FRONTEND_CONFIGS, accepted=b"+OK in\r\n"
)


BACKEND_LINES = [
    b"+OK Dovecot ready.",
    b"+OK [XCLIENT] Dovecot ready.",
    b"+OK",
    b"+OK Logged in.",
    b"-ERR [AUTH] Authentication failed.",
    b"-ERR [SYS/TEMP] down",
    b"-ERR [IN-USE] locked",
    b"-ERR",
    b"+ ",
    b"* OK IMAP",
    b"",
]


def verdict_given(login: pop3.BackendLogin) -> bool:
    return login.state is pop3.BackendState.DONE


def fuzzed_login(starttls: bool, use_xclient: bool) -> pop3.BackendLogin:
    """A login that forwards the client's address with XCLIENT or not."""
    return backend_login(dataclasses.replace(XCLIENT if use_xclient else BackendConfig(), starttls=starttls))


def password_only_in_the_pass_line(commands: list[Command]) -> None:
    for command in commands:
        if isinstance(command, Send) and PASSWORD.encode() in command.data:
            assert command.data == b"PASS " + PASSWORD.encode() + b"\r\n"


STARTTLS_DIALOGUES = [
    [[b"+OK [XCLIENT] Dovecot ready.", b"+OK Begin TLS"], [b"+OK Updated", b"+OK", b"+OK Logged in."]],
    [[b"+OK Dovecot ready.", b"+OK Begin TLS"], [b"+OK", b"-ERR [AUTH] Authentication failed."]],
]
STARTTLS_NOISE = [*BACKEND_LINES, b"+OK Begin TLS"]


(
    test_backend_login_survives_random_replies,
    test_backend_stls_never_sends_more_than_stls_in_plaintext,
) = dialogues.backend_fuzz_tests(
    fuzzed_login,
    verdict_given,
    replies=dialogues.backend_replies(BACKEND_LINES, max_lines=6),
    starttls_dialogues=dialogues.mutated_dialogue(STARTTLS_DIALOGUES, STARTTLS_NOISE),
    before_tls=(b"", b"STLS\r\n"),
    max_examples=300,
    check=password_only_in_the_pass_line,
    use_xclient=st.booleans(),
)


@FUZZ
@given(sizes=dialogues.SPLIT_READS)
def test_backend_login_split_anywhere_gives_the_same_commands(sizes: list[int]) -> None:
    dialogue = b"+OK [XCLIENT] Dovecot ready.\r\n+OK Updated\r\n+OK\r\n+OK Logged in.\r\n+OK 2 messages\r\n"
    commands = dialogues.split_backend_dialogue(
        lambda: backend_login(XCLIENT), verdict_given, [dialogue], sizes
    )
    assert isinstance(commands[-1], LoginSucceeded)


@FUZZ
@given(sizes=dialogues.SPLIT_READS)
def test_backend_stls_dialogue_split_anywhere_gives_the_same_commands(sizes: list[int]) -> None:
    parts = [
        b"+OK [XCLIENT] Dovecot ready.\r\n+OK Begin TLS\r\n",
        b"+OK Updated\r\n+OK\r\n+OK Logged in.\r\n+OK 2\r\n",
    ]
    commands = dialogues.split_backend_dialogue(
        lambda: backend_login(XCLIENT_STARTTLS), verdict_given, parts, sizes
    )
    assert commands[-1] == LoginSucceeded(reply=b"+OK Logged in.\r\n", buffered=b"+OK 2\r\n")
