"""Tests for proxy/protocols/smtp.py: transcripts, open relay, addresses, backend login, fuzzing.

The transcripts in transcripts/smtp/ carry the front-end's dialogue in both modes (submission
and inbound MX); this module runs them (whole and cut into random chunks), then checks that
nothing gets past the relay checks, the envelope address grammar, limits in octets, driver
misuse, the BackendLogin dialogue (EHLO, STARTTLS, XCLIENT, AUTH PLAIN or, after an auth_http
grant, XCLIENT LOGIN, MAIL/RCPT replay), redaction, and hypothesis fuzzing of both machines.
The tests every protocol runs come from the factories in dialogues.py, bound here to their names
with SMTP's data.
"""

import base64
import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import table
from proxy.protocols import events, sasl, smtp
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

TRANSCRIPTS = transcript.paths("smtp")
CREDENTIALS = sasl.Credentials("alice@example.com", PASSWORD.encode(), sasl.Mechanism.PLAIN)
INBOUND = FrontendConfig(inbound=True)
EHLO = b"EHLO client.example\r\n"
ENVELOPE = (b"MAIL FROM:<alice@sender.example>", b"RCPT TO:<bob@example.com>")


def started(config: FrontendConfig | None = None) -> smtp.Frontend:
    return dialogues.started(smtp.Frontend, config)


# ---------------------------------------------------------------------------------------------
# Transcripts


def test_there_are_transcripts_for_every_scenario_family() -> None:
    assert len(TRANSCRIPTS) >= 30
    assert sum(path.name.startswith("mx-") for path in TRANSCRIPTS) >= 10


test_transcript, test_transcript_split_anywhere_gives_the_same_commands = dialogues.transcript_tests(
    TRANSCRIPTS, smtp.Frontend
)


# ---------------------------------------------------------------------------------------------
# Never an open relay


MX_PREFIX = b"EHLO sender.example\r\nMAIL FROM:<spammer@sender.example>\r\n"
RELAY_ATTEMPTS = [
    pytest.param(
        INBOUND, MX_PREFIX + b"RCPT TO:<victim%elsewhere.example@example.com>\r\n", id="percent-hack"
    ),
    pytest.param(INBOUND, MX_PREFIX + b"RCPT TO:<elsewhere.example!victim@example.com>\r\n", id="bang-path"),
    pytest.param(
        INBOUND, MX_PREFIX + b"RCPT TO:<@example.com:victim@elsewhere.example>\r\n", id="source-route"
    ),
    pytest.param(
        INBOUND, MX_PREFIX + b"RCPT TO:<@a.example,@b.example:v@elsewhere.example>\r\n", id="source-route-2"
    ),
    pytest.param(
        INBOUND, MX_PREFIX + b'RCPT TO:<"victim@elsewhere.example"@example.com>\r\n', id="quoted-at"
    ),
    pytest.param(
        INBOUND, MX_PREFIX + b'RCPT TO:<"victim%elsewhere.example"@example.com>\r\n', id="quoted-percent"
    ),
    pytest.param(
        INBOUND, MX_PREFIX + b'RCPT TO:<"elsewhere.example!victim"@example.com>\r\n', id="quoted-bang"
    ),
    pytest.param(INBOUND, MX_PREFIX + b"RCPT TO:<victim@[192.0.2.66]>\r\n", id="address-literal"),
    pytest.param(INBOUND, MX_PREFIX + b"RCPT TO:<victim@elsewhere.example@example.com>\r\n", id="two-ats"),
    pytest.param(INBOUND, MX_PREFIX + b"RCPT TO:victim@elsewhere.example\r\n", id="no-brackets"),
    pytest.param(INBOUND, MX_PREFIX + b"RCPT TO:<victim@example.com\r\n>\r\n", id="split-line"),
    pytest.param(
        INBOUND, MX_PREFIX + b"RCPT TO:<victim@example.com>\rRCPT TO:<v@elsewhere.example>\r\n", id="bare-cr"
    ),
    pytest.param(INBOUND, b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\n", id="no-ehlo"),
    pytest.param(INBOUND, b"EHLO x\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n", id="no-mail"),
    pytest.param(INBOUND, b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", id="auth-on-mx"),
    pytest.param(
        FrontendConfig(),
        b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
        id="submission",
    ),
    pytest.param(FrontendConfig(), b"MAIL FROM:<a@b.example>\r\n", id="submission-without-ehlo"),
    pytest.param(
        FrontendConfig(starttls=StartTlsPolicy.REQUIRED),
        b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        id="submission-auth-before-required-tls",
    ),
]


@pytest.mark.parametrize(("config", "dialogue"), RELAY_ATTEMPTS)
def test_nothing_gets_past_without_a_route(config: FrontendConfig, dialogue: bytes) -> None:
    frontend = started(config)
    commands = frontend.handle(DataReceived(dialogue))
    assert not any(isinstance(command, Authenticate | Relay) for command in commands)
    replies = sent(commands).split(b"\r\n")
    assert any(reply[:1] == b"5" for reply in replies)
    assert frontend.state is not smtp.State.RELAYING


def test_an_unrouted_domain_is_refused_and_nothing_is_relayed() -> None:
    frontend = started(INBOUND)
    commands = frontend.handle(DataReceived(MX_PREFIX + b"RCPT TO:<victim@elsewhere.example>\r\nDATA\r\n"))
    assert isinstance(commands[-1], Authenticate)
    assert commands[-1].request.routing_key == "victim@elsewhere.example"
    commands = frontend.handle(LoginRejected())
    assert commands == [
        Send(b"550 5.7.1 Relay access denied\r\n"),
        Send(b"554 5.5.1 Error: no valid recipients\r\n"),
    ]
    assert frontend.state is smtp.State.MAIL


# ---------------------------------------------------------------------------------------------
# Envelope addresses


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("<bob@example.com>", "bob@example.com"),
        ("<Bob.Smith+tag@Mail.Example.COM>", "Bob.Smith+tag@Mail.Example.COM"),
        ("<o'brien@example.com>", "o'brien@example.com"),
        ('<"john smith"@example.com>', '"john smith"@example.com'),
        # RFC 5321 section 4.1.1.3: the bare <Postmaster> is routed as the user, as typed.
        ("<postmaster>", "postmaster"),
        ("<POSTMASTER>", "POSTMASTER"),
        ("<a@b>", "a@b"),
        # Dots anywhere hide no route; Postfix takes them (Japanese carriers' addresses).
        ("<taro..yamada@docomo.ne.jp>", "taro..yamada@docomo.ne.jp"),
        ("<hanako.@ezweb.ne.jp>", "hanako.@ezweb.ne.jp"),
        ("<.bob@example.com>", ".bob@example.com"),
        # RFC 5321 section 4.5.3.1.1: 64 octets is the least a server takes, not the most.
        ("<" + "b" * 65 + "@example.com>", "b" * 65 + "@example.com"),
        # One trailing dot, as Postfix takes it: the same mailbox (table.lookup drops the dot).
        ("<bob@example.com.>", "bob@example.com."),
    ],
)
def test_forward_path_gives_the_routing_key(path: str, key: str) -> None:
    assert smtp.parse_forward_path(path) == key


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        ("bob@example.com", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@example.com", smtp.REPLY_BAD_RECIPIENT),
        ("<bob>", smtp.REPLY_BAD_RECIPIENT),
        ("<>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@>", smtp.REPLY_BAD_RECIPIENT),
        ("<@example.com>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@example..com>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@example.com..>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@.>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@exa_mple.com>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@example.com>x", smtp.REPLY_BAD_RECIPIENT),
        ("<postmaster@>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@" + "d" * 252 + ".com>", smtp.REPLY_BAD_RECIPIENT),
        ("<bob@example.com> =x", smtp.REPLY_BAD_PARAMETERS),
        ("<bob@example.com> A=b=c", smtp.REPLY_BAD_PARAMETERS),
        # No DSN is advertised (RFC 5321 section 4.1.1.11), nor any other RCPT extension.
        ("<bob@example.com> NOTIFY=NEVER", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<bob@example.com> ORCPT=rfc822;bob@example.com", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<bob@example.com> BODY=8BITMIME", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<postmaster> NOTIFY=NEVER", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<@relay.example:bob@example.com>", smtp.REPLY_SOURCE_ROUTE),
        ("<a%b@example.com>", smtp.REPLY_RELAY_DENIED),
        ("<a!b@example.com>", smtp.REPLY_RELAY_DENIED),
        ('<"a@b"@example.com>', smtp.REPLY_RELAY_DENIED),
        ('<"a\\"b"@example.com>', smtp.REPLY_RELAY_DENIED),
        ("<bob@[IPv6:::1]>", smtp.REPLY_ADDRESS_LITERAL),
        # A long local part still goes through the relay checks.
        ("<" + "a" * 300 + "%elsewhere.example@example.com>", smtp.REPLY_RELAY_DENIED),
    ],
)
def test_forward_path_refusals(path: str, reply: bytes) -> None:
    with pytest.raises(smtp.AddressError) as raised:
        smtp.parse_forward_path(path)
    assert raised.value.reply == reply
    assert str(raised.value) == reply.decode().rstrip()


def test_only_the_domain_has_a_length_limit() -> None:
    """A local part and a path as long as the command line allows are routed (RFC 5321
    section 4.5.3.1: 64 and 256 octets are minimums); a domain has at most 255 octets."""
    domain = ".".join(["d" * 63] * 4)
    assert len(domain) == smtp.MAX_DOMAIN
    local = "l" * (smtp.MAX_CLIENT_LINE - len(f"RCPT TO:<@{domain}>"))
    line = f"RCPT TO:<{local}@{domain}>"
    assert len(line) == smtp.MAX_CLIENT_LINE
    frontend = started(INBOUND)
    frontend.handle(DataReceived(EHLO + b"MAIL FROM:<>\r\n"))
    (command,) = frontend.handle(DataReceived(line.encode() + b"\r\n"))
    assert isinstance(command, Authenticate)
    assert command.request.routing_key == f"{local}@{domain}"
    with pytest.raises(smtp.AddressError) as raised:
        smtp.parse_forward_path(f"<l@e{domain}>")
    assert raised.value.reply == smtp.REPLY_BAD_RECIPIENT


@pytest.mark.parametrize(
    "path",
    [
        "<>",
        "<> BODY=8BITMIME",
        "<alice@sender.example>  body=7bit",
        "<@relay.example:alice@sender.example>",
        "<a%b@c.example>",
        # What Postfix takes: an SRS sender (79-octet local part), dots anywhere, no domain.
        "<SRS0=HHH6=TT=sub.originaldomain.example=first.last.very.long.name@forwarder.example>",
        "<bounces+1234567-abcd-first.lastname=recipient-company.example@em1234.sender.example>",
        "<taro..yamada@docomo.ne.jp>",
        "<hanako.@ezweb.ne.jp>",
        "<postmaster>",
        "<alice>",
        '<"john <smith>"@example.com>',
        "<" + "s" * 2000 + "@sender.example>",
    ],
)
def test_reverse_path_checks_the_form_only(path: str) -> None:
    smtp.check_reverse_path(path)


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        ("alice@sender.example", smtp.REPLY_BAD_SENDER),
        ("<alice@sender.example", smtp.REPLY_BAD_SENDER),
        ("<<>>", smtp.REPLY_BAD_SENDER),
        ("<a<b@sender.example>", smtp.REPLY_BAD_SENDER),
        ("<john smith@sender.example>", smtp.REPLY_BAD_SENDER),
        ('<"john@sender.example>', smtp.REPLY_BAD_SENDER),
        ("<>x", smtp.REPLY_BAD_SENDER),
        ("", smtp.REPLY_BAD_SENDER),
        ("<> x=", smtp.REPLY_BAD_PARAMETERS),
        ("<> <evil@example.net>", smtp.REPLY_BAD_PARAMETERS),
        # RFC 5321 section 4.1.1.11: only parameters of advertised extensions (8BITMIME).
        ("<> BODY=BINARYMIME", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> BODY", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> SIZE=100", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> SMTPUTF8", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> RET=HDRS", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> ENVID=abc", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> AUTH=<>", smtp.REPLY_UNSUPPORTED_PARAMETER),
        ("<> BODY=8BITMIME FOO=BAR", smtp.REPLY_UNSUPPORTED_PARAMETER),
    ],
)
def test_reverse_path_refusals(path: str, reply: bytes) -> None:
    with pytest.raises(smtp.AddressError) as raised:
        smtp.check_reverse_path(path)
    assert raised.value.reply == reply


@FUZZ
@given(text=st.text(alphabet=st.sampled_from('<>@.,:%!"\\ abc-=[]'), max_size=80))
def test_address_parsing_never_raises_anything_else(text: str) -> None:
    for parse in (smtp.parse_forward_path, smtp.check_reverse_path):
        try:
            parse(text)
        except smtp.AddressError as error:
            assert error.reply.startswith((b"501 ", b"550 ", b"555 "))


# ---------------------------------------------------------------------------------------------
# Front-end details a transcript cannot carry


def test_command_line_of_2048_octets_is_accepted_and_a_longer_one_skipped() -> None:
    line = b"NOOP " + b"x" * (smtp.MAX_CLIENT_LINE - len(b"NOOP "))
    assert len(line + b"\r\n") == 2048  # Postfix's line_length_limit
    frontend = started()
    assert frontend.handle(DataReceived(line + b"\r\n")) == [Send(smtp.REPLY_OK)]
    assert frontend.handle(DataReceived(line + b"x\r\nNOOP\r\n")) == [
        Send(smtp.REPLY_LINE_TOO_LONG),
        Send(smtp.REPLY_OK),
    ]
    assert frontend.state is smtp.State.CONNECTED


@FUZZ
@given(
    sizes=st.lists(st.integers(1, smtp.MAX_CLIENT_LINE + 10), min_size=1, max_size=5),
    length=st.integers(smtp.MAX_CLIENT_LINE - 8, 8 * smtp.MAX_CLIENT_LINE),
)
def test_an_over_long_line_is_skipped_to_its_end_however_it_arrives(sizes: list[int], length: int) -> None:
    """An over-long line is refused once however its bytes are cut (the rest is dropped as it
    arrives, never buffered), and the command behind it is answered; a line within the limit
    is answered as a command."""
    frontend = started(INBOUND)
    data = EHLO + b"NOOP " + b"y" * length + b"\r\nMAIL FROM:<>\r\n"
    commands: list[Command] = []
    for index, offset in enumerate(range(0, len(data), max(sizes))):
        end = offset + sizes[index % len(sizes)]
        commands += frontend.handle(DataReceived(data[offset:end]))
        commands += frontend.handle(DataReceived(data[end : offset + max(sizes)]))
    noop = smtp.REPLY_OK if len(b"NOOP ") + length <= smtp.MAX_CLIENT_LINE else smtp.REPLY_LINE_TOO_LONG
    assert commands[-2:] == [Send(noop), Send(smtp.REPLY_SENDER_OK)]
    assert frontend.state is smtp.State.MAIL


def test_sasl_line_of_the_largest_plain_response_is_accepted() -> None:
    credentials = sasl.Credentials("u" * 255, b"p" * 255, sasl.Mechanism.PLAIN, authzid="u" * 255)
    response = sasl.plain_response(credentials)
    assert len(response) == smtp.MAX_SASL_LINE == 1024
    frontend = started()
    frontend.handle(DataReceived(EHLO))
    assert frontend.handle(DataReceived(b"AUTH PLAIN\r\n")) == [Send(b"334 \r\n")]
    (command,) = frontend.handle(DataReceived(response + b"\r\n"))
    assert isinstance(command, Authenticate)
    assert command.request.credentials == credentials


def test_pipelined_bytes_during_login_are_bounded() -> None:
    frontend = started(INBOUND)
    commands = frontend.handle(DataReceived(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.example>\r\n"))
    assert isinstance(commands[-1], Authenticate)
    assert frontend.handle(DataReceived(b"x" * smtp.MAX_HELD_BYTES)) == []
    commands = frontend.handle(DataReceived(b"x"))
    assert commands == [
        Send(b"421 4.7.0 mailgress Error: too much data before the login completed\r\n"),
        Close("client pipelined too much data during login"),
    ]


def test_states_follow_the_order_of_commands() -> None:
    frontend = smtp.Frontend(FrontendConfig(starttls=StartTlsPolicy.ON))
    assert frontend.state is smtp.State.CONNECTED
    frontend.start()
    frontend.handle(DataReceived(EHLO + b"AUTH LOGIN\r\n"))
    assert frontend.state is smtp.State.AUTH_LOGIN_USERNAME
    frontend.handle(DataReceived(b"YWxpY2U=\r\n"))
    assert frontend.state is smtp.State.AUTH_LOGIN_PASSWORD
    frontend.handle(DataReceived(b"*\r\nSTARTTLS\r\n"))
    assert frontend.state is smtp.State.STARTING_TLS
    frontend.handle(TlsEstablished())
    assert frontend.state is smtp.State.CONNECTED
    frontend.handle(DataReceived(EHLO + b"AUTH PLAIN\r\n"))
    assert frontend.state is smtp.State.AUTH_PLAIN
    frontend.handle(DataReceived(b"AGFsaWNlAHNlY3JldA==\r\n"))
    assert frontend.state is smtp.State.AUTHENTICATING
    frontend.handle(LoginAccepted(b"235 ok\r\n"))
    assert frontend.state is smtp.State.RELAYING
    inbound = started(INBOUND)
    inbound.handle(DataReceived(EHLO))
    assert inbound.state is smtp.State.READY
    inbound.handle(DataReceived(b"MAIL FROM:<>\r\n"))
    assert inbound.state is smtp.State.MAIL


def test_login_requests_carry_helo_envelope_and_redacted_credentials() -> None:
    frontend = started()
    auth = b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS) + b"\r\n"
    (command,) = frontend.handle(DataReceived(EHLO + auth))[-1:]
    assert command == Authenticate(
        LoginRequest(
            protocol="submission",
            routing_key="alice@example.com",
            credentials=CREDENTIALS,
            helo=b"EHLO client.example",
        )
    )
    assert PASSWORD not in repr(command)
    inbound = started(INBOUND)
    (command,) = inbound.handle(DataReceived(EHLO + b"\r\n".join(ENVELOPE) + b"\r\n"))[-1:]
    assert command == Authenticate(
        LoginRequest(
            protocol="smtp", routing_key="bob@example.com", helo=b"EHLO client.example", envelope=ENVELOPE
        )
    )


(
    test_handle_before_start_is_misuse,
    test_start_twice_is_misuse,
    test_verdicts_and_tls_news_out_of_turn_are_misuse,
) = dialogues.misuse_tests(smtp.Frontend, EHLO, accepted=b"235 ok\r\n")


def test_events_after_relay_are_misuse() -> None:
    frontend = started(INBOUND)
    frontend.handle(DataReceived(EHLO + b"\r\n".join(ENVELOPE) + b"\r\n"))
    frontend.handle(LoginAccepted(b"250 ok\r\n"))
    with pytest.raises(LocalProtocolError):
        frontend.handle(DataReceived(b"DATA\r\n"))


@pytest.mark.parametrize(
    "event",
    [
        DataReceived(b"NOOP\r\n"),
        ConnectionClosed(),
        TimedOut(),
        LoginAccepted(b"235 ok\r\n"),
        LoginRejected(),
    ],
    ids=dialogues.event_name,
)
def test_after_close_events_in_flight_are_ignored(event: events.Event) -> None:
    frontend = started()
    frontend.handle(DataReceived(EHLO + b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"))
    assert frontend.handle(TimedOut())[-1] == Close("timed out")
    assert frontend.handle(event) == []


def test_credentials_with_control_characters_are_refused() -> None:
    frontend = started()
    response = sasl.encode_base64(b"\x00ali\rce\x00secret")
    commands = frontend.handle(DataReceived(EHLO + b"AUTH PLAIN " + response + b"\r\n"))
    assert commands[-1] == Send(smtp.REPLY_AUTH_FAILED)


# RFC 5321 sections 4.1.1.3 and 4.5.1: <Postmaster> without a domain MUST be accepted. It is
# routed as the bare user "postmaster" whatever the proxy's server_name (the default, "mailgress",
# is a name no route claims): a route listing that user owns it, else the "*" catch-all.
POSTFIX = table.Upstream(service="mail/postfix", endpoints=(table.Endpoint("127.0.0.1", 25),))
MX_CONFIGS = [INBOUND, FrontendConfig(inbound=True, server_name="mx.example.com")]
POSTMASTER_RECIPIENTS = [b"<Postmaster>", b"<postmaster>", b"<POSTMASTER>", b"<pOsTmAsTeR>"]


def _mx_route(name: str, *, users: tuple[str, ...] = (), domains: tuple[str, ...] = ()) -> table.Route:
    return table.Route(name=name, generation=1, users=users, domains=domains, upstreams=(("smtp", POSTFIX),))


# The domains include the proxy's own name: claiming it does not take <Postmaster>.
MX_DOMAINS = _mx_route("mail/mx", domains=("example.org", "mx.example.com"))
CATCH_ALL = _mx_route("mail/any", domains=("*",))
POSTMASTER_TABLES = [
    pytest.param(
        [MX_DOMAINS, _mx_route("mail/postmaster", users=("PostMaster",)), CATCH_ALL],
        "mail/postmaster",
        id="user",
    ),
    pytest.param([MX_DOMAINS, CATCH_ALL], "mail/any", id="catch-all"),
]


def _postmaster_request(frontend: smtp.Frontend, rcpt: bytes) -> LoginRequest:
    """What the MX ``frontend`` asks the driver to route for the RCPT line ``rcpt``."""
    commands = frontend.handle(DataReceived(b"EHLO c\r\nMAIL FROM:<>\r\n" + rcpt + b"\r\n"))
    assert isinstance(commands[-1], Authenticate)
    return commands[-1].request


@pytest.mark.parametrize("config", MX_CONFIGS, ids=["default-server-name", "server-name"])
@pytest.mark.parametrize("recipient", POSTMASTER_RECIPIENTS)
@pytest.mark.parametrize(("routes", "owner"), POSTMASTER_TABLES)
def test_postmaster_without_a_domain_is_routed_as_the_user_postmaster(
    config: FrontendConfig, recipient: bytes, routes: list[table.Route], owner: str
) -> None:
    """The route listing the user postmaster (in any case) owns <Postmaster>, else the
    catch-all; the backend gets the RCPT line as the client sent it."""
    rcpt = b"RCPT TO:" + recipient
    request = _postmaster_request(started(config), rcpt)
    found = table.lookup(table.make_table(routes), "smtp", request.routing_key)
    assert found is not None and found.name == owner
    login = smtp.BackendLogin(request, BackendConfig())
    replayed = sent(feed(login, b"220 backend", b"250 backend", b"250 2.1.0 Ok"))
    assert replayed.endswith(b"\r\n" + rcpt + b"\r\n")


@pytest.mark.parametrize("config", MX_CONFIGS, ids=["default-server-name", "server-name"])
@pytest.mark.parametrize("recipient", POSTMASTER_RECIPIENTS)
def test_postmaster_is_refused_when_no_route_lists_it_and_there_is_no_catch_all(
    config: FrontendConfig, recipient: bytes
) -> None:
    frontend = started(config)
    request = _postmaster_request(frontend, b"RCPT TO:" + recipient)
    # A postmaster login route that does not serve inbound SMTP does not take it either.
    dovecot = table.Upstream(service="mail/dovecot", endpoints=(table.Endpoint("127.0.0.1", 143),))
    imap_only = table.Route(
        name="mail/login", generation=1, users=("postmaster",), domains=(), upstreams=(("imap", dovecot),)
    )
    assert table.lookup(table.make_table([MX_DOMAINS, imap_only]), "smtp", request.routing_key) is None
    assert frontend.handle(LoginRejected()) == [Send(smtp.REPLY_RELAY_DENIED)]
    assert frontend.state is smtp.State.MAIL


# ---------------------------------------------------------------------------------------------
# Backend login


def submission_login(
    config: BackendConfig | None = None,
    credentials: sasl.Credentials = CREDENTIALS,
    helo: bytes = b"EHLO client.example",
) -> smtp.BackendLogin:
    request = LoginRequest(
        protocol="submission", routing_key=credentials.username, credentials=credentials, helo=helo
    )
    return smtp.BackendLogin(request, config or BackendConfig())


def inbound_login(config: BackendConfig | None = None) -> smtp.BackendLogin:
    request = LoginRequest(
        protocol="smtp", routing_key="bob@example.com", helo=b"EHLO client.example", envelope=ENVELOPE
    )
    return smtp.BackendLogin(request, config or BackendConfig())


POSTFIX_EHLO = [b"250-postfix.example", b"250-PIPELINING", b"250-AUTH PLAIN LOGIN", b"250 8BITMIME"]
POSTFIX_XCLIENT_EHLO = [
    b"250-postfix.example",
    b"250-XCLIENT NAME ADDR PROTO HELO PORT LOGIN",
    b"250 AUTH PLAIN",
]
AUTH_LINE = b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS) + b"\r\n"
XCLIENT = BackendConfig(client=ClientAddress("192.0.2.7", 40123), client_info="xclient")


def test_submission_login_with_auth_plain() -> None:
    login = submission_login()
    assert feed(login, b"220 postfix.example ESMTP") == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_EHLO) == [Send(AUTH_LINE)]
    assert feed(login, b"235 2.7.0 Authentication successful") == [
        LoginSucceeded(reply=b"235 2.7.0 Authentication successful\r\n")
    ]
    assert login.state is smtp.BackendState.DONE


def test_submission_login_replays_an_8_bit_password_as_its_octets() -> None:
    latin1 = sasl.Credentials("alice@example.com", b"s\xe9same", sasl.Mechanism.LOGIN)  # no UTF-8
    login = submission_login(credentials=latin1)
    feed(login, b"220 postfix.example ESMTP")
    response = base64.b64encode(b"\x00alice@example.com\x00s\xe9same")
    assert feed(login, *POSTFIX_EHLO) == [Send(b"AUTH PLAIN " + response + b"\r\n")]


def test_multi_line_replies_may_arrive_in_any_pieces() -> None:
    login = submission_login(BackendConfig(server_name="proxy.example"))
    assert login.handle(DataReceived(b"220-postfix.example ESMTP\r\n220-")) == []
    assert login.handle(DataReceived(b"second line\r\n220 last\r\n250-postfix")) == [
        Send(b"EHLO proxy.example\r\n")
    ]
    assert login.handle(DataReceived(b".example\r\n250-AUTH PLAIN\r")) == []
    assert login.handle(DataReceived(b"\n250 8BITMIME\r\n")) == [Send(AUTH_LINE)]


@pytest.mark.parametrize(
    ("client", "fields"),
    [
        (ClientAddress("192.0.2.7", 40123), b"ADDR=192.0.2.7 PORT=40123 NAME=[UNAVAILABLE]"),
        (ClientAddress("2001:db8::7", 1), b"ADDR=IPV6:2001:db8::7 PORT=1 NAME=[UNAVAILABLE]"),
        (ClientAddress("::ffff:192.0.2.7", 2), b"ADDR=192.0.2.7 PORT=2 NAME=[UNAVAILABLE]"),
    ],
)
def test_xclient_tells_postfix_the_real_client(client: ClientAddress, fields: bytes) -> None:
    login = submission_login(BackendConfig(client=client, client_info="xclient"))
    feed(login, b"220 postfix.example ESMTP")
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [Send(b"XCLIENT " + fields + b"\r\n")]
    # Postfix greets afresh; the client's own EHLO name is replayed, then the login.
    assert feed(login, b"220 postfix.example ESMTP") == [Send(b"EHLO client.example\r\n")]
    assert feed(login, b"250-postfix.example", b"250 AUTH PLAIN") == [Send(AUTH_LINE)]


def test_xclient_sends_only_the_attributes_the_backend_lists() -> None:
    login = inbound_login(XCLIENT)
    feed(login, b"220 mx")
    assert feed(login, b"250-mx", b"250 XCLIENT ADDR HELO") == [Send(b"XCLIENT ADDR=192.0.2.7\r\n")]
    assert feed(login, b"250 2.0.0 Ok") == [Send(b"EHLO client.example\r\n")]
    assert feed(login, b"250 mx") == [Send(ENVELOPE[0] + b"\r\n")]


@pytest.mark.parametrize("starttls", [False, True])
def test_behind_a_proxy_header_the_backend_gets_the_clients_name(starttls: bool) -> None:
    """Review M5 #6: the PROXY header gives the backend the client's address, so the EHLO gives
    its name (as after XCLIENT); before, the proxy's own name went with the client's address."""
    config = BackendConfig(
        client=ClientAddress("192.0.2.7", 40123), client_info="proxy-v2", starttls=starttls
    )
    login = inbound_login(config)
    assert feed(login, b"220 mx") == [Send(b"EHLO client.example\r\n")]
    if starttls:
        assert feed(login, b"250-mx", b"250 STARTTLS") == [Send(b"STARTTLS\r\n")]
        assert feed(login, b"220 go") == [StartTls()]
        assert login.handle(TlsEstablished()) == [Send(b"EHLO client.example\r\n")]
    assert feed(login, b"250-mx", b"250 XCLIENT ADDR") == [Send(ENVELOPE[0] + b"\r\n")]


def test_xclient_after_a_helo_client_replays_its_name_with_ehlo() -> None:
    login = submission_login(XCLIENT, helo=b"HELO old.example")
    feed(login, b"220 mx", *POSTFIX_XCLIENT_EHLO)
    assert feed(login, b"220 mx") == [Send(b"EHLO old.example\r\n")]


@pytest.mark.parametrize(
    ("config", "ehlo"),
    [
        (XCLIENT, POSTFIX_EHLO),  # not offered (Postfix lists it only for authorized hosts)
        (BackendConfig(client=ClientAddress("192.0.2.7", 1)), POSTFIX_XCLIENT_EHLO),  # not asked for
        (BackendConfig(client_info="xclient"), POSTFIX_XCLIENT_EHLO),  # no client address known
        (
            BackendConfig(client=ClientAddress("/run/proxy.sock", 0), client_info="xclient"),
            POSTFIX_XCLIENT_EHLO,
        ),
        (XCLIENT, [b"250-mx", b"250-XCLIENT NAME PORT", b"250 AUTH PLAIN"]),  # ADDR not supported
    ],
)
def test_no_xclient_unless_asked_offered_and_possible(config: BackendConfig, ehlo: list[bytes]) -> None:
    login = submission_login(config)
    feed(login, b"220 mx")
    assert feed(login, *ehlo) == [Send(AUTH_LINE)]


def test_xtext_encoding_follows_rfc_3461() -> None:
    assert smtp.xtext("192.0.2.7") == "192.0.2.7"
    assert smtp.xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert smtp.xtext("\x7f\x00é") == "+7F+00+C3+A9"


@pytest.mark.parametrize("code", [b"554 5.7.1", b"450 4.7.1", b"550 5.7.1"])
@pytest.mark.parametrize("after_ehlo", [False, True], ids=["to-xclient", "to-the-ehlo-after-it"])
def test_a_refusal_of_the_real_client_is_the_clients_reply(code: bytes, after_ehlo: bool) -> None:
    """Review M5 #2: Postfix's client restrictions refuse the address XCLIENT gave it (or its
    HELO restrictions the name): the backend's verdict, passed on; before, a failing endpoint and
    451 (so any blocked client made every endpoint look down)."""
    login = inbound_login(XCLIENT)
    feed(login, b"220 mx", *POSTFIX_XCLIENT_EHLO)
    refusal = code + b" <unknown[192.0.2.7]>: Client host rejected: Access denied"
    if after_ehlo:
        assert feed(login, b"220 mx") == [Send(b"EHLO client.example\r\n")]
    assert feed(login, refusal) == [LoginFailed(reply=refusal + b"\r\n", credentials=False)]


def test_the_envelope_replies_have_rfc_5321s_times_in_the_login() -> None:
    """Review M5 #3: the driver bounds the replies to MAIL and RCPT by these, not by the budget."""
    login = inbound_login(XCLIENT)
    feed(login, b"220 mx", *POSTFIX_XCLIENT_EHLO)
    assert login.reply_timeout is None  # greeting, EHLO, XCLIENT: the login budget's
    assert feed(login, b"220 mx") == [Send(b"EHLO client.example\r\n")]
    assert login.reply_timeout is None
    assert feed(login, b"250 mx") == [Send(ENVELOPE[0] + b"\r\n")]
    assert login.reply_timeout == smtp.MAIL_REPLY_TIMEOUT
    assert feed(login, b"250 2.1.0 Ok") == [Send(ENVELOPE[1] + b"\r\n")]
    assert login.reply_timeout == smtp.RCPT_REPLY_TIMEOUT
    feed(login, b"250 2.1.5 Ok")
    assert login.reply_timeout is None


def test_a_backend_closing_at_the_first_recipient_is_heard_once() -> None:
    """Review M5 #7: its 421 is the client's only one, and the session ends with it; before, the
    mediation started on the closed connection and added its own 421."""
    login = inbound_login()
    feed(login, b"220 mx", b"250 mx", b"250 2.1.0 Ok")
    closing = b"421 4.3.2 mx.example Service shutting down"
    assert feed(login, closing) == [LoginFailed(reply=closing + b"\r\n", credentials=False)]
    frontend = started(INBOUND)
    feed(frontend, b"EHLO client.example", b"MAIL FROM:<s@example.net>")
    assert isinstance(feed(frontend, b"RCPT TO:<a@alpha.example>")[-1], Authenticate)
    assert frontend.handle(LoginRejected(closing + b"\r\n")) == [
        Send(closing + b"\r\n"),
        Close("backend closed the connection"),
    ]


@pytest.mark.parametrize("code", [b"550 5.7.0 Error: insufficient authorization", b"501 5.5.4 Bad syntax"])
def test_an_xclient_refused_to_the_proxy_is_an_endpoint_failure_not_a_bounce(code: bytes) -> None:
    """A backend that lists XCLIENT but does not trust the proxy (or cannot parse the command):
    every client would get a permanent refusal over a configuration error; it is 451 instead."""
    login = inbound_login(XCLIENT)
    feed(login, b"220 mx", *POSTFIX_XCLIENT_EHLO)
    [failed] = feed(login, code)
    assert isinstance(failed, BackendFailed)
    assert failed.reason.startswith(f"backend refused XCLIENT with {int(code[:3])}")


def test_a_backend_closing_at_a_submission_login_ends_the_session_with_its_421() -> None:
    """Review O3 #3: a 421 (RFC 5321 section 3.8: the backend is closing; here Postfix's client
    restrictions after XCLIENT) was the AUTH reply and the session went on; it ends it, as inbound."""
    frontend = started()
    auth = b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS) + b"\r\n"
    assert isinstance(frontend.handle(DataReceived(EHLO + auth))[-1], Authenticate)
    closing = b"421 4.7.0 <unknown[192.0.2.7]>: Client host rejected: too busy\r\n"
    assert frontend.handle(LoginRejected(closing)) == [Send(closing), Close("backend closed the connection")]


def test_an_xclient_reply_that_is_neither_success_nor_refusal_fails_the_login() -> None:
    login = submission_login(XCLIENT)
    feed(login, b"220 mx", *POSTFIX_XCLIENT_EHLO)
    assert feed(login, b"354 what") == [BackendFailed("backend answered 354 in state XCLIENT")]


def test_long_credentials_go_after_a_334_challenge() -> None:
    """RFC 4954 section 4: no initial response that would make the AUTH line overflow 512 octets."""
    credentials = sasl.Credentials("u" * 200, b"p" * 200)
    login = submission_login(credentials=credentials)
    feed(login, b"220 mx")
    assert feed(login, *POSTFIX_EHLO) == [Send(b"AUTH PLAIN\r\n")]
    assert feed(login, b"334 ") == [Send(sasl.plain_response(credentials) + b"\r\n")]
    assert feed(login, b"235 2.7.0 ok") == [LoginSucceeded(reply=b"235 2.7.0 ok\r\n")]


# ---------------------------------------------------------------------------------------------
# Backend login with XCLIENT LOGIN: a submission an auth_http service has already accepted, at a
# backend that takes LOGIN from the proxy, AUTH or none (nginx's default xclient on, proxy_smtp_auth off)

# Postfix without SASL, to a host in smtpd_authorized_xclient_hosts.
NO_SASL_XCLIENT_EHLO = [
    b"250-postfix.example",
    b"250-PIPELINING",
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT",
    b"250 8BITMIME",
]
NO_SASL_EHLO = [b"250-postfix.example", b"250-PIPELINING", b"250 8BITMIME"]
CLIENT_FIELDS = b"XCLIENT ADDR=192.0.2.7 PORT=40123 NAME=[UNAVAILABLE]"


def verified_login(
    config: BackendConfig = XCLIENT, credentials: sasl.Credentials = CREDENTIALS
) -> smtp.BackendLogin:
    request = LoginRequest(
        protocol="submission", routing_key=credentials.username, credentials=credentials, helo=EHLO.rstrip()
    )
    return smtp.BackendLogin(request, config, verified=True)


def test_a_verified_login_goes_in_with_xclient_login_where_the_backend_has_no_auth() -> None:
    """Review S2 #1: behind nginx's defaults a Postfix port without SASL takes the login from
    XCLIENT LOGIN; mailgress sent AUTH PLAIN there, got nothing to send it to, and failed."""
    login = verified_login()
    assert feed(login, b"220 postfix.example ESMTP") == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *NO_SASL_XCLIENT_EHLO) == [Send(CLIENT_FIELDS + b" LOGIN=alice@example.com\r\n")]
    assert feed(login, b"220 postfix.example ESMTP") == [Send(EHLO)]
    assert login.handle(DataReceived(b"".join(line + b"\r\n" for line in NO_SASL_EHLO) + b"421 early")) == [
        LoginSucceeded(reply=smtp.REPLY_AUTH_SUCCEEDED, buffered=b"421 early")
    ]
    assert login.state is smtp.BackendState.DONE


def test_the_login_name_goes_xtext_encoded_and_never_the_password() -> None:
    credentials = sasl.Credentials("a+b=c é@example.com", PASSWORD.encode(), sasl.Mechanism.LOGIN)
    login = verified_login(credentials=credentials)
    wire = feed(login, b"220 mx", *NO_SASL_XCLIENT_EHLO, b"220 mx", *NO_SASL_EHLO)
    assert sent(wire) == (
        b"EHLO mailgress\r\n" + CLIENT_FIELDS + b" LOGIN=a+2Bb+3Dc+20+C3+A9@example.com\r\n" + EHLO
    )
    assert PASSWORD.encode() not in sent(wire)
    assert wire[-1] == LoginSucceeded(reply=smtp.REPLY_AUTH_SUCCEEDED)


def test_a_verified_login_goes_in_with_xclient_login_where_the_backend_offers_auth_plain_too() -> None:
    """Review T1 B1: a Postfix with smtpd_sasl_auth_enable = yes lists AUTH PLAIN beside XCLIENT
    LOGIN, and its SASL need not know the service's users: AUTH PLAIN there was a 535 for a right
    password. nginx sends LOGIN= whatever AUTH the backend offers; so does the proxy, and no AUTH."""
    login = verified_login()
    assert feed(login, b"220 mx") == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [Send(CLIENT_FIELDS + b" LOGIN=alice@example.com\r\n")]
    assert feed(login, b"220 mx") == [Send(EHLO)]
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [LoginSucceeded(smtp.REPLY_AUTH_SUCCEEDED)]


def without_xclient_login(
    verified: bool, config: BackendConfig, ehlo: list[bytes], xclient: bytes | None
) -> tuple[smtp.BackendLogin, list[Command]]:
    """A submission backend login through the greeting, the EHLO ``ehlo`` and the XCLIENT the
    route asks for (``xclient``: its line, None for none): the machine and all it sent, no LOGIN=
    among it."""
    login = verified_login(config) if verified else submission_login(config)
    wire = feed(login, b"220 mx", *ehlo)
    if xclient is not None:
        assert wire[-1] == Send(xclient + b"\r\n")
        wire += feed(login, b"220 mx", *ehlo)
    assert b"LOGIN=" not in sent(wire)
    return login, wire


@pytest.mark.parametrize(
    ("verified", "config", "ehlo", "xclient"),
    [
        # auth: backend: the backend checks the password, whatever XCLIENT it takes (kept from
        # before review T1: XCLIENT LOGIN would let any password in).
        (False, XCLIENT, POSTFIX_XCLIENT_EHLO, CLIENT_FIELDS),
        # Verified, but the backend does not take LOGIN from the proxy.
        (True, XCLIENT, [b"250-mx", b"250-XCLIENT NAME ADDR PORT", b"250 AUTH PLAIN"], CLIENT_FIELDS),
        # Verified, but the route forwards no client information with XCLIENT.
        (True, BackendConfig(client=ClientAddress("192.0.2.7", 40123)), POSTFIX_XCLIENT_EHLO, None),
    ],
    ids=["auth-backend", "no-login-attribute", "client-info-none"],
)
def test_auth_plain_only_where_xclient_login_is_not_available(
    verified: bool, config: BackendConfig, ehlo: list[bytes], xclient: bytes | None
) -> None:
    """AUTH PLAIN, with the password the service granted (here the client's), and no LOGIN=."""
    login, wire = without_xclient_login(verified, config, ehlo, xclient)
    assert wire[-1] == Send(AUTH_LINE)
    assert feed(login, b"235 2.7.0 Authentication successful") == [
        LoginSucceeded(reply=b"235 2.7.0 Authentication successful\r\n")
    ]


def test_a_verified_login_goes_in_with_xclient_login_after_starttls() -> None:
    login = verified_login(XCLIENT_STARTTLS)
    feed(login, b"220 mx")
    # LOGIN listed in plaintext decides nothing: only what the backend says after TLS counts.
    assert feed(login, *NO_SASL_XCLIENT_EHLO[:-1], b"250 STARTTLS") == [Send(b"STARTTLS\r\n")]
    assert feed(login, b"220 go") == [StartTls()]
    assert login.handle(TlsEstablished()) == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *NO_SASL_XCLIENT_EHLO) == [Send(CLIENT_FIELDS + b" LOGIN=alice@example.com\r\n")]
    assert feed(login, b"220 mx", *NO_SASL_EHLO) == [Send(EHLO), LoginSucceeded(smtp.REPLY_AUTH_SUCCEEDED)]


@pytest.mark.parametrize(
    ("verified", "config", "ehlo", "xclient"),
    [
        # auth: backend: the backend's verdict on the password is the authentication, and this
        # backend has none to give; XCLIENT LOGIN would let any password in.
        (False, XCLIENT, NO_SASL_XCLIENT_EHLO, CLIENT_FIELDS),
        # Verified, but the backend does not take LOGIN from the proxy.
        (True, XCLIENT, [b"250-mx", b"250 XCLIENT NAME ADDR PORT"], CLIENT_FIELDS),
        # Verified, but the route forwards no client information with XCLIENT.
        (True, BackendConfig(client=ClientAddress("192.0.2.7", 40123)), NO_SASL_XCLIENT_EHLO, None),
        (True, dataclasses.replace(XCLIENT, client_info="proxy-v2"), NO_SASL_XCLIENT_EHLO, None),
    ],
    ids=["auth-backend", "no-login-attribute", "client-info-none", "client-info-proxy-v2"],
)
def test_no_xclient_login_without_a_verified_login_and_a_backend_that_takes_it(
    verified: bool, config: BackendConfig, ehlo: list[bytes], xclient: bytes | None
) -> None:
    """Only a login an auth_http service accepted goes in by XCLIENT LOGIN, and only in the
    XCLIENT the route asks for: otherwise a backend without AUTH PLAIN fails the attempt (the
    client hears the temporary failure), however right or wrong the password."""
    _, wire = without_xclient_login(verified, config, ehlo, xclient)
    assert wire[-1] == BackendFailed("backend does not offer AUTH PLAIN")


@pytest.mark.parametrize(
    "username",
    [
        "x" * 242 + "@alpha.example",  # 256 characters
        "+" * 81 + "@alpha.example",  # 95 characters, 257 xtext-encoded ("+" is "+2B")
        "é" * 50 + "@alpha.example",  # 114 octets of UTF-8, 314 xtext-encoded
    ],
    ids=["ascii", "plus-signs", "utf-8"],
)
@pytest.mark.parametrize("ehlo", [NO_SASL_XCLIENT_EHLO, POSTFIX_XCLIENT_EHLO], ids=["no-auth", "auth-plain"])
def test_a_granted_name_postfix_would_refuse_as_login_is_a_temporary_failure(
    username: str, ehlo: list[bytes]
) -> None:
    """Review T1 B2: Postfix answers a LOGIN value over 255 characters (as sent, xtext-encoded)
    with 501 "attribute value too long", which reads as XCLIENT not understood: the endpoint, and
    every other in turn, was marked failing. Now nothing is sent, the client hears the temporary
    failure and the endpoint is fine; not AUTH PLAIN either (that SASL need not know the user)."""
    login = verified_login(credentials=sasl.Credentials(username, PASSWORD.encode()))
    feed(login, b"220 mx")
    assert feed(login, *ehlo) == [LoginFailed(reply=smtp.REPLY_AUTH_UNAVAILABLE, credentials=False)]
    assert login.state is smtp.BackendState.DONE


def test_a_granted_name_of_255_characters_goes_whole_within_rfc_5321s_line() -> None:
    """Postfix's limit is inclusive, and with the longest ADDR (IPv6) and PORT the line keeps RFC
    5321's 512 octets (XCLIENT_README asks for that)."""
    name = "+" * 80 + "a@alpha.example"  # 240 + 15 = 255 characters xtext-encoded
    config = BackendConfig(
        client=ClientAddress("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535), client_info="xclient"
    )
    login = verified_login(config, sasl.Credentials(name, PASSWORD.encode()))
    feed(login, b"220 mx")
    [xclient] = feed(login, *NO_SASL_XCLIENT_EHLO)
    assert isinstance(xclient, Send)
    value = xclient.data.rstrip(b"\r\n").rpartition(b" LOGIN=")[2]
    assert len(value) == smtp.MAX_XCLIENT_VALUE and value.startswith(b"+2B+2B")
    assert len(xclient.data) <= 512


def test_an_empty_granted_name_goes_without_login_as_behind_nginx() -> None:
    """Review T1 B2: Postfix refuses LOGIN= with an empty value ("501 5.5.4 Error: attribute=value
    expected"). nginx leaves LOGIN out for an empty name: the service said OK, so the client hears
    235, and the backend takes the session as an unauthenticated client at ADDR."""
    login = verified_login(credentials=sasl.Credentials("", PASSWORD.encode()))
    feed(login, b"220 mx")
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [Send(CLIENT_FIELDS + b"\r\n")]
    assert feed(login, b"220 mx") == [Send(EHLO)]
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [LoginSucceeded(smtp.REPLY_AUTH_SUCCEEDED)]


def test_a_refusal_of_the_client_after_xclient_login_is_still_the_clients_reply() -> None:
    login = verified_login()
    feed(login, b"220 mx", *NO_SASL_XCLIENT_EHLO)
    refusal = b"554 5.7.1 <unknown[192.0.2.7]>: Client host rejected: Access denied"
    assert feed(login, refusal) == [LoginFailed(reply=refusal + b"\r\n", credentials=False)]


def test_only_a_submission_login_is_verified() -> None:
    request = LoginRequest(
        protocol="smtp", routing_key="bob@example.com", helo=EHLO.rstrip(), envelope=ENVELOPE
    )
    with pytest.raises(LocalProtocolError):
        smtp.BackendLogin(request, XCLIENT, verified=True)


def test_frontend_and_xclient_login_compose() -> None:
    """The front-end hears the proxy's 235 and relays what the client pipelined behind its AUTH."""
    frontend = started()
    auth = b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS) + b"\r\n"
    *_, authenticate = frontend.handle(DataReceived(EHLO + auth + b"MAIL FROM:<alice@example.com>\r\n"))
    assert isinstance(authenticate, Authenticate)
    login = smtp.BackendLogin(authenticate.request, XCLIENT, verified=True)
    wire = feed(login, b"220 mx", *NO_SASL_XCLIENT_EHLO, b"220 mx", *NO_SASL_EHLO)
    verdict = wire[-1]
    assert isinstance(verdict, LoginSucceeded)
    assert frontend.handle(LoginAccepted(verdict.reply)) == [
        Send(b"235 2.7.0 Authentication successful\r\n"),
        Relay(b"MAIL FROM:<alice@example.com>\r\n"),
    ]


@pytest.mark.parametrize(
    ("refusal", "credentials"),
    [
        ([b"535 5.7.8 Error: authentication failed: authentication failure"], True),
        ([b"535-5.7.8 Error: authentication failed", b"535 5.7.8 try again"], True),
        # Refused for another reason (RFC 4954 section 6, RFC 5321): not a wrong password.
        ([b"534 5.7.9 Authentication mechanism is too weak"], False),
        ([b"538 5.7.11 Encryption required for requested authentication mechanism"], False),
        ([b"554 5.7.0 Account disabled"], False),
        ([b"503 5.5.1 Error: already authenticated"], False),
    ],
)
def test_backend_auth_refusal_goes_to_the_client(refusal: list[bytes], credentials: bool) -> None:
    """A refusal of the credentials in the proxy's own words (review Q1 #4: Postfix's "(reason
    unavailable)" told a routed user from an unrouted one); any other as the backend said it."""
    login = submission_login()
    feed(login, b"220 mx", *POSTFIX_EHLO)
    reply = smtp.REPLY_AUTH_FAILED if credentials else b"".join(line + b"\r\n" for line in refusal)
    assert feed(login, *refusal) == [LoginFailed(reply=reply, credentials=credentials)]


def test_inbound_replays_the_envelope_and_passes_on_any_rcpt_reply() -> None:
    login = inbound_login()
    assert feed(login, b"220 mx") == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, b"250-mx", b"250 PIPELINING") == [Send(ENVELOPE[0] + b"\r\n")]
    assert feed(login, b"250 2.1.0 Ok") == [Send(ENVELOPE[1] + b"\r\n")]
    # As nginx: even a refusal of the recipient is the client's reply; the session is proxied.
    commands = login.handle(DataReceived(b"550 5.1.1 <bob@example.com>: Recipient address rejected\r\n"))
    assert commands == [LoginSucceeded(reply=b"550 5.1.1 <bob@example.com>: Recipient address rejected\r\n")]


def test_inbound_success_keeps_what_follows_the_rcpt_reply() -> None:
    login = inbound_login()
    commands = feed(login, b"220 mx", b"250 mx", b"250 2.1.0 Ok")
    assert sent(commands) == b"EHLO mailgress\r\n" + b"\r\n".join(ENVELOPE) + b"\r\n"
    assert login.handle(DataReceived(b"250 2.1.5 Ok\r\n354 early")) == [
        LoginSucceeded(reply=b"250 2.1.5 Ok\r\n", buffered=b"354 early")
    ]


def test_inbound_sender_refused_for_good_is_the_clients_rcpt_reply() -> None:
    login = inbound_login()
    feed(login, b"220 mx", b"250 mx")
    refusal = b"553 5.1.8 <alice@sender.example>: Sender address rejected: Domain not found\r\n"
    # The sender's refusal: no credentials were tried, so none were refused.
    assert login.handle(DataReceived(refusal)) == [LoginFailed(reply=refusal, credentials=False)]


def test_inbound_sender_refused_for_now_is_a_backend_failure() -> None:
    login = inbound_login()
    feed(login, b"220 mx", b"250 mx")
    assert feed(login, b"451 4.3.0 Temporary lookup failure") == [
        BackendFailed("backend answered 451 in state MAIL")
    ]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([b"554 5.3.2 No service"], "backend answered 554 in state GREETING"),
        ([b"220 mx", b"502 5.5.2 EHLO not recognized"], "backend answered 502 in state EHLO"),
        ([b"220 mx", b"250 mx"], "backend does not offer AUTH PLAIN"),
        ([b"220 mx", b"250-mx", b"250 AUTH LOGIN"], "backend does not offer AUTH PLAIN"),
        (
            [b"220 mx", *POSTFIX_EHLO, b"454 4.7.0 Temporary authentication failure"],
            "backend answered 454 to AUTH",
        ),
        ([b"220 mx", *POSTFIX_EHLO, b"334 "], "backend answered 334 to AUTH"),
        ([b"* OK IMAP4rev1"], "backend sent a malformed reply in state GREETING"),
        ([b"220-mx", b"250 mixed codes"], "backend sent a malformed reply in state GREETING"),
        ([b"22 short"], "backend sent a malformed reply in state GREETING"),
        ([b"220_mx"], "backend sent a malformed reply in state GREETING"),
        ([b"120 delayed"], "backend sent a malformed reply in state GREETING"),
        ([b"220 mx", b"650 nonsense"], "backend sent a malformed reply in state EHLO"),
    ],
)
def test_backend_failures(lines: list[bytes], reason: str) -> None:
    assert feed(submission_login(), *lines)[-1] == BackendFailed(reason)


def test_backend_close_and_timeout_fail_the_login_once() -> None:
    login = inbound_login()
    assert login.handle(TimedOut()) == [BackendFailed("backend login timed out")]
    assert login.handle(ConnectionClosed()) == []  # raced with the verdict
    assert inbound_login().handle(ConnectionClosed()) == [BackendFailed("backend closed the connection")]


def test_backend_reply_limits() -> None:
    line = b"220 " + b"x" * (smtp.MAX_REPLY_LINE - 4)
    assert len(line) >= smtp.MAX_CLIENT_LINE + 512 - 2  # a whole client line and the RFC's 512
    assert feed(submission_login(), line) == [Send(b"EHLO mailgress\r\n")]
    assert feed(submission_login(), line + b"x") == [
        BackendFailed("backend reply line too long in state GREETING")
    ]
    endless = [b"220-more"] * smtp.MAX_REPLY_LINES
    assert feed(submission_login(), *endless) == []  # 100 lines, still open
    assert feed(submission_login(), *endless, b"220-more") == [
        BackendFailed("backend reply too long in state GREETING")
    ]
    assert feed(submission_login(), *endless[1:], b"220 end") == [Send(b"EHLO mailgress\r\n")]
    # The octets of one reply are bounded too (here four lines of the longest), line ends not counted.
    longest = b"x" * (smtp.MAX_REPLY_LINE - 4)
    assert smtp.MAX_REPLY_OCTETS == 4 * smtp.MAX_REPLY_LINE
    assert feed(submission_login(), *[b"220-" + longest] * 3, b"220 " + longest) == [
        Send(b"EHLO mailgress\r\n")
    ]
    assert feed(submission_login(), *[b"220-" + longest] * 4, b"220 x") == [
        BackendFailed("backend reply too long in state GREETING")
    ]


def test_a_recipient_refused_with_a_long_reply_is_the_clients_answer() -> None:
    """Postfix's 550 quotes the recipient: a RCPT line as long as a client may send echoed in a
    reply longer than 512 octets is still the backend's verdict, not a backend failure (451)."""
    local = b"n" * (smtp.MAX_CLIENT_LINE - len(b"RCPT TO:<@alpha.example>"))
    rcpt = b"RCPT TO:<" + local + b"@alpha.example>"
    assert len(rcpt) == smtp.MAX_CLIENT_LINE
    login = smtp.BackendLogin(
        LoginRequest(protocol="smtp", routing_key="n@alpha.example", envelope=(ENVELOPE[0], rcpt)),
        BackendConfig(),
    )
    refusal = b"550 5.1.1 <" + local + b"@alpha.example>: Recipient address rejected: User unknown in"
    refusal += b" virtual mailbox table"
    assert feed(login, b"220 mx", b"250 mx", b"250 2.1.0 Ok", refusal)[-1] == LoginSucceeded(
        reply=refusal + b"\r\n", buffered=b""
    )


def test_backend_login_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        smtp.BackendLogin(LoginRequest(protocol="submission", routing_key="alice"), BackendConfig())
    with pytest.raises(LocalProtocolError):
        smtp.BackendLogin(
            LoginRequest(protocol="smtp", routing_key="a@b", envelope=ENVELOPE[:1]), BackendConfig()
        )
    with pytest.raises(LocalProtocolError):
        smtp.BackendLogin(
            LoginRequest(protocol="pop3", routing_key="a", credentials=CREDENTIALS), BackendConfig()
        )
    with pytest.raises(LocalProtocolError):
        bad_envelope = (ENVELOPE[0], b"RCPT TO:<a@b.example>\r\nRCPT TO:<evil@c.example>")
        smtp.BackendLogin(
            LoginRequest(protocol="smtp", routing_key="a@b", envelope=bad_envelope), BackendConfig()
        )
    login = submission_login()
    for event in (TlsEstablished(), LoginAccepted(b"235\r\n"), LoginRejected(), LoginUnavailable()):
        with pytest.raises(LocalProtocolError):
            login.handle(event)
    feed(login, b"554 no")
    with pytest.raises(LocalProtocolError):
        login.handle(DataReceived(b"220 late\r\n"))


@pytest.mark.parametrize("inbound", [False, True], ids=["submission", "inbound"])
def test_frontend_and_backend_compose(inbound: bool) -> None:
    """The front-end's request drives the backend login, whose verdict the front-end relays."""
    frontend = started(FrontendConfig(inbound=inbound))
    login_line = b"\r\n".join(ENVELOPE) if inbound else b"AUTH PLAIN " + sasl.plain_response(CREDENTIALS)
    *_, authenticate = frontend.handle(DataReceived(EHLO + login_line + b"\r\nDATA\r\n"))
    assert isinstance(authenticate, Authenticate)
    login = smtp.BackendLogin(authenticate.request, XCLIENT)
    wire = feed(login, b"220 mx") + feed(login, *POSTFIX_XCLIENT_EHLO) + feed(login, b"220 mx")
    wire += feed(login, *POSTFIX_EHLO)
    wire += feed(login, b"250 2.1.0 Ok", b"250 2.1.5 Ok") if inbound else feed(login, b"235 2.7.0 Ok")
    expected = [
        b"EHLO mailgress",
        b"XCLIENT ADDR=192.0.2.7 PORT=40123 NAME=[UNAVAILABLE]",
        b"EHLO client.example",
    ]
    expected += list(ENVELOPE) if inbound else [AUTH_LINE.rstrip()]
    assert sent(wire) == b"".join(line + b"\r\n" for line in expected)
    verdict = wire[-1]
    assert isinstance(verdict, LoginSucceeded)
    assert frontend.handle(LoginAccepted(verdict.reply)) == [Send(verdict.reply), Relay(b"DATA\r\n")]


# ---------------------------------------------------------------------------------------------
# Backend login with STARTTLS towards the backend: no credential or envelope before TLS, ever

STARTTLS = BackendConfig(starttls=True)
XCLIENT_STARTTLS = BackendConfig(
    client=ClientAddress("192.0.2.7", 40123), client_info="xclient", starttls=True
)
NO_STARTTLS = BackendFailed("backend does not offer STARTTLS")
# Postfix with smtpd_tls_auth_only offers AUTH only over TLS.
POSTFIX_PLAINTEXT_EHLO = [b"250-postfix.example", b"250-PIPELINING", b"250-STARTTLS", b"250 8BITMIME"]


def test_submission_starttls_then_ehlo_again_then_auth() -> None:
    login = submission_login(STARTTLS)
    assert feed(login, b"220 postfix.example ESMTP") == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_PLAINTEXT_EHLO) == [Send(b"STARTTLS\r\n")]
    assert login.state is smtp.BackendState.STARTTLS
    assert feed(login, b"220 2.0.0 Ready to start TLS") == [StartTls()]
    assert login.state is smtp.BackendState.TLS
    # RFC 3207 section 4.2: no new greeting; everything learned before is forgotten.
    assert login.handle(TlsEstablished()) == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_EHLO) == [Send(AUTH_LINE)]
    assert feed(login, b"235 2.7.0 Authentication successful") == [
        LoginSucceeded(reply=b"235 2.7.0 Authentication successful\r\n")
    ]


def test_starttls_forgets_extensions_learned_in_plaintext() -> None:
    """XCLIENT offered before TLS but not after: none is sent; AUTH is read from the new reply."""
    login = submission_login(XCLIENT_STARTTLS)
    feed(login, b"220 mx")
    assert feed(login, b"250-mx", b"250-XCLIENT ADDR PORT NAME", b"250-AUTH PLAIN", b"250 STARTTLS") == [
        Send(b"STARTTLS\r\n")
    ]
    feed(login, b"220 go")
    login.handle(TlsEstablished())
    assert feed(login, b"250-mx", b"250 AUTH PLAIN") == [Send(AUTH_LINE)]


def test_starttls_then_no_auth_plain_fails() -> None:
    login = submission_login(STARTTLS)
    feed(login, b"220 mx", *POSTFIX_EHLO[:-1], b"250 STARTTLS")
    feed(login, b"220 go")
    login.handle(TlsEstablished())
    assert feed(login, *POSTFIX_PLAINTEXT_EHLO[:2], b"250 AUTH LOGIN") == [
        BackendFailed("backend does not offer AUTH PLAIN")
    ]


def test_starttls_sends_xclient_only_after_tls() -> None:
    login = submission_login(XCLIENT_STARTTLS)
    feed(login, b"220 mx", *POSTFIX_PLAINTEXT_EHLO, b"220 go")
    assert login.handle(TlsEstablished()) == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_XCLIENT_EHLO) == [
        Send(b"XCLIENT ADDR=192.0.2.7 PORT=40123 NAME=[UNAVAILABLE]\r\n")
    ]
    assert feed(login, b"220 postfix.example ESMTP") == [Send(b"EHLO client.example\r\n")]
    assert feed(login, *POSTFIX_EHLO) == [Send(AUTH_LINE)]


def test_inbound_starttls_replays_the_envelope_only_after_tls() -> None:
    login = inbound_login(STARTTLS)
    commands = feed(login, b"220 mx", b"250-mx", b"250 STARTTLS", b"220 go")
    assert commands == [Send(b"EHLO mailgress\r\n"), Send(b"STARTTLS\r\n"), StartTls()]
    assert login.handle(TlsEstablished()) == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, b"250 mx") == [Send(ENVELOPE[0] + b"\r\n")]
    assert feed(login, b"250 2.1.0 Ok") == [Send(ENVELOPE[1] + b"\r\n")]
    assert feed(login, b"250 2.1.5 Ok") == [LoginSucceeded(reply=b"250 2.1.5 Ok\r\n")]


@pytest.mark.parametrize(
    "lines",
    [
        POSTFIX_EHLO,
        [b"250 mx"],
        [*POSTFIX_PLAINTEXT_EHLO, b"454 4.7.0 TLS not available due to local problem"],
        [*POSTFIX_PLAINTEXT_EHLO, b"502 5.5.1 Error: command not implemented"],
        [*POSTFIX_PLAINTEXT_EHLO, b"250 2.0.0 Ok"],
    ],
    ids=["not-offered", "bare-ehlo", "refused-454", "refused-502", "not-220"],
)
def test_backend_without_starttls_fails_and_never_gets_the_login(lines: list[bytes]) -> None:
    for login in (submission_login(STARTTLS), inbound_login(STARTTLS)):
        commands = feed(login, b"220 mx", *lines)
        assert commands[-1] == NO_STARTTLS
        assert dialogues.sent(commands) in (b"EHLO mailgress\r\n", b"EHLO mailgress\r\nSTARTTLS\r\n")


def test_backend_bytes_after_the_starttls_220_are_never_read() -> None:
    """A man in the middle appends replies behind the 220 (CVE-2014-3556 class)."""
    login = submission_login(STARTTLS)
    feed(login, b"220 mx", *POSTFIX_PLAINTEXT_EHLO)
    injected = b"220 2.0.0 Ready\r\n250-mx\r\n250 AUTH PLAIN\r\n235 2.7.0 Ok\r\n"
    assert login.handle(DataReceived(injected)) == [StartTls()]
    assert login.handle(DataReceived(b"235 2.7.0 Ok\r\n")) == []  # before the handshake
    assert login.handle(TlsEstablished()) == [Send(b"EHLO mailgress\r\n")]
    assert feed(login, *POSTFIX_EHLO) == [Send(AUTH_LINE)]


def test_backend_partial_multi_line_reply_before_tls_is_forgotten() -> None:
    login = submission_login(STARTTLS)
    feed(login, b"220 mx", *POSTFIX_PLAINTEXT_EHLO)
    assert login.handle(DataReceived(b"220 2.0.0 Ready\r\n250-injected\r\n")) == [StartTls()]
    login.handle(TlsEstablished())
    assert feed(login, b"250-mx", b"250 AUTH PLAIN") == [Send(AUTH_LINE)]


(
    test_backend_close_or_timeout_during_the_handshake_fails_the_login,
    test_backend_tls_news_out_of_turn_is_misuse,
) = dialogues.handshake_tests(
    lambda: submission_login(STARTTLS),
    [b"220 mx", *POSTFIX_PLAINTEXT_EHLO],
    b"220 go",
    closed="backend closed the connection",
)


# ---------------------------------------------------------------------------------------------
# Redaction


PLAIN_RESPONSE = sasl.plain_response(CREDENTIALS)
REDACTION_DIALOGUES = [
    EHLO + b"AUTH PLAIN " + PLAIN_RESPONSE + b"\r\n",
    EHLO + b"AUTH PLAIN\r\n" + PLAIN_RESPONSE + b"\r\n",
    EHLO + b"AUTH LOGIN YWxpY2U=\r\n" + sasl.encode_base64(PASSWORD.encode()) + b"\r\n",
]


test_frontend_never_shows_the_password = dialogues.redaction_test(
    smtp.Frontend, REDACTION_DIALOGUES, accepted=b"235 ok\r\n", secrets=(PASSWORD, PLAIN_RESPONSE.decode())
)


@pytest.mark.parametrize(
    "replies",
    [
        [b"235 ok"],
        [b"535 5.7.8 no"],
        [b"454 4.7.0 later"],
        [b"500 unknown command AUTH PLAIN " + PLAIN_RESPONSE],
        [b"x"],
    ],
)
def test_backend_never_shows_the_password_outside_its_auth_line(replies: list[bytes]) -> None:
    login = submission_login()
    feed(login, b"220 mx")
    assert feed(login, *POSTFIX_EHLO) == [Send(AUTH_LINE)]
    for command in feed(login, *replies):
        if isinstance(command, BackendFailed):
            assert PASSWORD not in command.reason
            assert PLAIN_RESPONSE.decode() not in command.reason
    with pytest.raises(LocalProtocolError) as raised:
        login.handle(DataReceived(b"more\r\n"))
    assert PLAIN_RESPONSE.decode() not in str(raised.value)
    assert PASSWORD not in repr(login)


# ---------------------------------------------------------------------------------------------
# Fuzzing: mutated client input and random backend replies never make handle() raise


VALID_CLIENT_DATA = [transcript.load(path).client_data for path in TRANSCRIPTS] + REDACTION_DIALOGUES
CONFIGS = [
    *dialogues.FRONTEND_CONFIGS,
    FrontendConfig(inbound=True),
    FrontendConfig(inbound=True, starttls=StartTlsPolicy.REQUIRED, max_errors=20),
]


def routed_keys_are_plain(commands: list[Command]) -> None:
    """Whatever got routed is a plain local@domain (or the domain-less postmaster)."""
    for command in commands:
        if isinstance(command, Authenticate) and command.request.protocol == "smtp":
            local, _, domain = command.request.routing_key.rpartition("@")
            assert not set("%!\\[]").intersection(command.request.routing_key)
            assert (local and domain) or command.request.routing_key.lower() == "postmaster"


test_frontend_survives_mutated_input = dialogues.mutated_input_test(
    smtp.Frontend, VALID_CLIENT_DATA, CONFIGS, accepted=b"250 ok\r\n", check=routed_keys_are_plain
)


BACKEND_LINES = [
    b"220 mx ESMTP",
    b"220-mx",
    b"250-mx",
    b"250-XCLIENT NAME ADDR PORT",
    b"250-XCLIENT NAME ADDR PORT LOGIN",
    b"250-AUTH PLAIN LOGIN",
    b"250 AUTH PLAIN",
    b"250 2.1.0 Ok",
    b"235 2.7.0 Authentication successful",
    b"334 ",
    b"535 5.7.8 Error: authentication failed",
    b"454 4.7.0 Temporary authentication failure",
    b"550 5.1.1 Recipient address rejected",
    b"421 4.3.2 Service shutting down",
    b"+OK",
    b"",
]


def verdict_given(login: smtp.BackendLogin) -> bool:
    return login.state is smtp.BackendState.DONE


def fuzzed_login(starttls: bool, inbound: bool, use_xclient: bool, verified: bool) -> smtp.BackendLogin:
    """An inbound or submission login that forwards the client's address with XCLIENT or not; a
    submission maybe verified by an auth_http service (XCLIENT LOGIN where the backend takes it)."""
    config = dataclasses.replace(XCLIENT if use_xclient else BackendConfig(), starttls=starttls)
    if inbound:
        return inbound_login(config)
    return verified_login(config) if verified else submission_login(config)


def one_line_each_and_credentials_only_in_auth(commands: list[Command]) -> None:
    for command in commands:
        if isinstance(command, Send) and PLAIN_RESPONSE in command.data:
            assert command.data in (AUTH_LINE, PLAIN_RESPONSE + b"\r\n")
        if isinstance(command, Send):
            assert command.data.count(b"\r\n") == 1 and command.data.endswith(b"\r\n")


STARTTLS_DIALOGUES = [
    [
        [b"220 mx", *POSTFIX_PLAINTEXT_EHLO, b"220 2.0.0 Ready to start TLS"],
        [*POSTFIX_XCLIENT_EHLO, b"220 mx", *POSTFIX_EHLO, b"235 2.7.0 Ok"],
    ],
    [
        [b"220-mx", b"220 ESMTP", b"250-mx", b"250 STARTTLS", b"220 go"],
        [b"250-mx", b"250 AUTH PLAIN", b"250 2.1.0 Ok", b"250 2.1.5 Ok"],
    ],
    [
        [b"220 mx", *NO_SASL_EHLO[:-1], b"250 STARTTLS", b"220 2.0.0 Ready to start TLS"],
        [*NO_SASL_XCLIENT_EHLO, b"220 mx", *NO_SASL_EHLO],
    ],
]
STARTTLS_NOISE = [*BACKEND_LINES, b"250-STARTTLS", b"220 2.0.0 Ready to start TLS"]
# All a backend may see from us before TLS when the route wants STARTTLS.
BEFORE_TLS = (b"", b"EHLO mailgress\r\n", b"EHLO mailgress\r\nSTARTTLS\r\n")


(
    test_backend_login_survives_random_replies,
    test_backend_starttls_never_sends_more_than_starttls_in_plaintext,
) = dialogues.backend_fuzz_tests(
    fuzzed_login,
    verdict_given,
    replies=dialogues.backend_replies(BACKEND_LINES, max_lines=10),
    starttls_dialogues=dialogues.mutated_dialogue(STARTTLS_DIALOGUES, STARTTLS_NOISE),
    before_tls=BEFORE_TLS,
    max_examples=400,
    check=one_line_each_and_credentials_only_in_auth,
    inbound=st.booleans(),
    use_xclient=st.booleans(),
    verified=st.booleans(),
)


@FUZZ
@given(sizes=dialogues.SPLIT_READS, inbound=st.booleans())
def test_backend_login_split_anywhere_gives_the_same_commands(sizes: list[int], inbound: bool) -> None:
    """Multi-line replies cut anywhere read the same."""
    final = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" if inbound else b"235 2.7.0 Ok\r\n"
    dialogue = (
        b"220-mx ESMTP\r\n220 more\r\n250-mx\r\n250-XCLIENT NAME ADDR PORT\r\n250 AUTH PLAIN\r\n"
        b"220 mx again\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n" + final + b"354 early\r\n"
    )

    def make() -> smtp.BackendLogin:
        return inbound_login(XCLIENT) if inbound else submission_login(XCLIENT)

    commands = dialogues.split_backend_dialogue(make, verdict_given, [dialogue], sizes)
    assert isinstance(commands[-1], LoginSucceeded)


@FUZZ
@given(sizes=dialogues.SPLIT_READS, inbound=st.booleans())
def test_backend_starttls_dialogue_split_anywhere_gives_the_same_commands(
    sizes: list[int], inbound: bool
) -> None:
    final = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" if inbound else b"235 2.7.0 Ok\r\n"
    parts = [
        b"220-mx ESMTP\r\n220 more\r\n250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n220 2.0.0 Ready\r\n",
        b"250-mx\r\n250-XCLIENT NAME ADDR PORT\r\n250 AUTH PLAIN\r\n220 mx again\r\n250-mx\r\n"
        b"250 AUTH PLAIN LOGIN\r\n" + final + b"354 early\r\n",
    ]

    def make() -> smtp.BackendLogin:
        return inbound_login(XCLIENT_STARTTLS) if inbound else submission_login(XCLIENT_STARTTLS)

    commands = dialogues.split_backend_dialogue(make, verdict_given, parts, sizes)
    assert isinstance(commands[-1], LoginSucceeded)
    assert commands[-1].buffered == b"354 early\r\n"


# ---------------------------------------------------------------------------------------------
# Inbound mediation (after the backend login): transcripts of both sides, the DATA end, fuzzing

ROUTES = {"alpha.example": "mail/alpha", "beta.example": "mail/beta"}
MX_EHLO = b"250-mailgress\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def route_of(recipient: str) -> str | None:
    return ROUTES.get(recipient.rpartition("@")[2].lower())


def mediator(config: FrontendConfig = INBOUND) -> smtp.Mediator:
    """A mediation whose backend serves mail/alpha, started with nothing pipelined."""
    machine = smtp.Mediator(config, smtp.InboundRouting("mail/alpha", route_of))
    assert machine.start(b"", b"") == []
    return machine


def to_client(commands: list[smtp.MediationCommand]) -> bytes:
    return b"".join(command.data for command in commands if isinstance(command, Send))


def to_backend(commands: list[smtp.MediationCommand]) -> bytes:
    return b"".join(command.data for command in commands if isinstance(command, smtp.SendToBackend))


def client_says(machine: smtp.Mediator, data: bytes) -> list[smtp.MediationCommand]:
    return machine.handle(DataReceived(data))


def backend_says(machine: smtp.Mediator, data: bytes) -> list[smtp.MediationCommand]:
    return machine.handle(smtp.BackendData(data))


def test_a_recipient_of_another_route_is_deferred_and_the_transaction_goes_on() -> None:
    """Exim's multi_domain: one transaction, recipients of two routes and of none."""
    machine = mediator()
    commands = client_says(machine, b"RCPT TO:<b@alpha.example>\r\n")
    assert to_backend(commands) == b"RCPT TO:<b@alpha.example>\r\n" and to_client(commands) == b""
    assert to_client(backend_says(machine, b"250 2.1.5 Ok\r\n")) == b"250 2.1.5 Ok\r\n"
    commands = client_says(machine, b"RCPT TO:<c@Beta.Example>\r\n")
    assert commands == [Send(smtp.REPLY_OTHER_ROUTE)]
    assert client_says(machine, b"RCPT TO:<d@gamma.example>\r\n") == [Send(smtp.REPLY_RELAY_DENIED)]
    assert to_backend(client_says(machine, b"DATA\r\n")) == b"DATA\r\n"
    assert to_client(backend_says(machine, b"354 End data with <CR><LF>.<CR><LF>\r\n")).startswith(b"354 ")
    body = b"Subject: x\r\n\r\n..leading dot\r\nbare\nLF and CR\rend\r\n"
    # Dots stay stuffed; a bare LF is a line end, sent as CRLF, a bare CR a space (see BodyStream).
    expected = b"Subject: x\r\n\r\n..leading dot\r\nbare\r\nLF and CR end\r\n"
    assert to_backend(client_says(machine, body)) == expected
    assert client_says(machine, b".\r\n") == [smtp.SendToBackend(b".\r\n")]
    assert (
        to_client(backend_says(machine, b"250 2.0.0 Ok: queued as 1\r\n")) == b"250 2.0.0 Ok: queued as 1\r\n"
    )
    assert machine.deferred == 1 and machine.quiet


ASKED_LOGIN = LoginRequest(
    protocol="smtp",
    routing_key="a@alpha.example",
    helo=b"EHLO client.example",
    envelope=(b"MAIL FROM:<s@example.net>", b"RCPT TO:<a@alpha.example>"),
)


def asked(recipient: str, sender: bytes = b"MAIL FROM:<s@example.net>") -> smtp.AskRecipient:
    rcpt = b"RCPT TO:<" + recipient.encode() + b">"
    return smtp.AskRecipient(dataclasses.replace(ASKED_LOGIN, routing_key=recipient, envelope=(sender, rcpt)))


def test_each_later_recipient_of_an_auth_http_route_is_placed_by_its_service() -> None:
    """Review M5 #1: the service may place each recipient on another server; before, a later
    recipient of the login's route went to the first recipient's server unasked."""
    machine = smtp.Mediator(INBOUND, smtp.InboundRouting("mail/alpha", route_of, ASKED_LOGIN))
    assert machine.start(b"", b"") == []
    group = b"".join(b"RCPT TO:<%s@alpha.example>\r\n" % name for name in (b"b", b"c", b"d", b"e", b"f"))
    # The commands behind the recipient wait for the service's answer, as for a backend reply.
    assert client_says(machine, group + b"RCPT TO:<g@beta.example>\r\nDATA\r\n") == [asked("b@alpha.example")]
    assert not machine.quiet
    assert machine.handle(smtp.RecipientPlaced("here")) == [
        smtp.SendToBackend(b"RCPT TO:<b@alpha.example>\r\n")
    ]
    assert backend_says(machine, b"250 2.1.5 Ok\r\n") == [Send(b"250 2.1.5 Ok\r\n"), asked("c@alpha.example")]
    # Another server: deferred as another route's recipient (452, sent later on its own).
    assert machine.handle(smtp.RecipientPlaced("elsewhere")) == [
        Send(smtp.REPLY_OTHER_ROUTE),
        asked("d@alpha.example"),
    ]
    refusal = b"550 5.1.1 <d@alpha.example>: no such user\r\n"
    assert machine.handle(smtp.RecipientPlaced("refused", refusal)) == [
        Send(refusal),
        asked("e@alpha.example"),
    ]
    assert machine.handle(smtp.RecipientPlaced("refused")) == [
        Send(smtp.REPLY_RELAY_DENIED),
        asked("f@alpha.example"),
    ]
    assert machine.handle(smtp.RecipientPlaced("unavailable")) == [
        Send(smtp.REPLY_ROUTE_UNAVAILABLE),
        Send(smtp.REPLY_OTHER_ROUTE),  # another route's: deferred without asking anyone
        smtp.SendToBackend(b"DATA\r\n"),
    ]
    assert machine.deferred == 2
    with pytest.raises(LocalProtocolError):
        machine.handle(smtp.RecipientPlaced("here"))


def test_a_placed_recipient_is_asked_about_with_its_own_transactions_sender() -> None:
    machine = smtp.Mediator(INBOUND, smtp.InboundRouting("mail/alpha", route_of, ASKED_LOGIN))
    assert machine.start(b"", b"") == []
    assert to_backend(client_says(machine, b"RSET\r\nRCPT TO:<b@alpha.example>\r\n")) == b"RSET\r\n"
    # No transaction: nothing to ask about, and the backend answers the RCPT (503) itself.
    assert backend_says(machine, b"250 2.0.0 Ok\r\n") == [
        Send(b"250 2.0.0 Ok\r\n"),
        smtp.SendToBackend(b"RCPT TO:<b@alpha.example>\r\n"),
    ]
    assert to_client(backend_says(machine, b"503 5.5.1 Error: need MAIL command\r\n")).startswith(b"503 ")
    sender = b"MAIL FROM:<t@example.org>"
    assert to_backend(client_says(machine, sender + b"\r\nRCPT TO:<c@alpha.example>\r\n")) == sender + b"\r\n"
    assert backend_says(machine, b"250 2.1.0 Ok\r\n") == [
        Send(b"250 2.1.0 Ok\r\n"),
        asked("c@alpha.example", sender),
    ]


def test_the_pending_reply_to_mail_rcpt_and_the_body_is_waited_for_as_rfc_5321_says() -> None:
    """Review M5 #3 and #4: RFC 5321 section 4.5.3.2's timeouts, which the driver keeps whatever its
    idle timeout; before, a backend slower than idle after the final dot got the client a 421
    for a message it queued."""
    machine = mediator()
    assert machine.reply_timeout is None
    client_says(machine, b"RCPT TO:<b@alpha.example>\r\n")
    assert machine.reply_timeout == smtp.RCPT_REPLY_TIMEOUT == 300
    backend_says(machine, b"250 2.1.5 Ok\r\n")
    client_says(machine, b"DATA\r\n")
    assert machine.reply_timeout is None
    backend_says(machine, b"354 go\r\n")
    client_says(machine, b"body\r\n")
    assert machine.reply_timeout is None  # the client's to send: the idle timeout
    client_says(machine, b".\r\n")
    assert machine.reply_timeout == smtp.FINAL_REPLY_TIMEOUT == 600
    backend_says(machine, b"250 2.0.0 queued\r\n")
    client_says(machine, b"MAIL FROM:<s@example.net>\r\n")
    assert machine.reply_timeout == smtp.MAIL_REPLY_TIMEOUT == 300
    backend_says(machine, b"250 2.1.0 Ok\r\n")
    client_says(machine, b"NOOP\r\n")
    assert machine.reply_timeout is None


def test_the_transaction_ends_only_with_the_final_reply_or_a_reset() -> None:
    """Review M1 #2: ``quiet`` (when a drain may close) holds between transactions only."""
    machine = mediator()
    assert not machine.quiet  # the login's MAIL opened one
    for command, reply, quiet in [
        (b"NOOP", b"250 2.0.0 Ok", False),
        (b"RSET", b"250 2.0.0 Ok", True),
        (b"MAIL FROM:<s@example.net>", b"550 5.7.1 refused", True),
        (b"MAIL FROM:<s@example.net>", b"250 2.1.0 Ok", False),
        (b"EHLO client.example", b"250 2.0.0 Ok", True),
        (b"MAIL FROM:<s@example.net>", b"250 2.1.0 Ok", False),
        (b"RSET", b"421 4.4.2 closing", False),
    ]:
        client_says(machine, command + b"\r\n")
        assert not machine.quiet  # a reply pending
        backend_says(machine, reply + b"\r\n")
        assert machine.quiet is quiet, command
    assert machine.closed


def test_mediated_commands_take_runs_of_spaces_after_the_verb() -> None:
    """As before the first recipient (and as Postfix): the line goes to the backend as typed."""
    machine = mediator()
    for command, reply in [
        (b"RSET  ", b"250 2.0.0 Ok"),
        (b"MAIL  FROM:<s@example.net>", b"250 2.1.0 Ok"),
        (b"RCPT   TO:<x@alpha.example>", b"250 2.1.5 Ok"),
    ]:
        assert to_backend(client_says(machine, command + b"\r\n")) == command + b"\r\n"
        assert to_client(backend_says(machine, reply + b"\r\n")) == reply + b"\r\n"
    assert client_says(machine, b"RCPT  TO:<y@beta.example>\r\n") == [Send(smtp.REPLY_OTHER_ROUTE)]


def test_every_later_transaction_defers_other_routes_too() -> None:
    """Postfix's connection cache: the next transaction on the same connection, after RSET."""
    machine = mediator()
    for command, reply in [
        (b"RSET", b"250 2.0.0 Ok"),
        (b"MAIL FROM:<s@example.net>", b"250 2.1.0 Ok"),
        (b"RCPT TO:<x@alpha.example>", b"250 2.1.5 Ok"),
    ]:
        assert to_backend(client_says(machine, command + b"\r\n")) == command + b"\r\n"
        assert to_client(backend_says(machine, reply + b"\r\n")) == reply + b"\r\n"
    assert client_says(machine, b"RCPT TO:<y@beta.example>\r\n") == [Send(smtp.REPLY_OTHER_ROUTE)]
    assert to_backend(client_says(machine, b"QUIT\r\n")) == b"QUIT\r\n"
    assert backend_says(machine, b"221 2.0.0 Bye\r\n") == [Send(b"221 2.0.0 Bye\r\n"), Close("client quit")]
    assert machine.closed and machine.deferred == 1


def test_pipelined_commands_go_one_at_a_time_and_replies_keep_their_order() -> None:
    """RFC 2920: a whole group in one read; each command waits for the reply to the one before."""
    machine = mediator()
    group = (
        b"RSET\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<a@beta.example>\r\n"
        b"RCPT TO:<b@alpha.example>\r\nRCPT TO:<c@nowhere.example>\r\nDATA\r\n"
    )
    assert client_says(machine, group) == [smtp.SendToBackend(b"RSET\r\n")]
    assert not machine.quiet
    assert backend_says(machine, b"250 2.0.0 Ok\r\n") == [
        Send(b"250 2.0.0 Ok\r\n"),
        smtp.SendToBackend(b"MAIL FROM:<s@example.net>\r\n"),
    ]
    assert backend_says(machine, b"250 2.1.0 Ok\r\n") == [
        Send(b"250 2.1.0 Ok\r\n"),
        Send(smtp.REPLY_OTHER_ROUTE),
        smtp.SendToBackend(b"RCPT TO:<b@alpha.example>\r\n"),
    ]
    assert backend_says(machine, b"550 5.1.1 <b@alpha.example>: unknown\r\n") == [
        Send(b"550 5.1.1 <b@alpha.example>: unknown\r\n"),
        Send(smtp.REPLY_RELAY_DENIED),
        smtp.SendToBackend(b"DATA\r\n"),
    ]
    # The backend has no recipient: its refusal of DATA is the client's, and commands go on.
    assert backend_says(machine, b"554 5.5.1 Error: no valid recipients\r\n") == [
        Send(b"554 5.5.1 Error: no valid recipients\r\n")
    ]
    # Between commands, but the transaction its MAIL opened stands until RSET (RFC 5321 4.1.1.5).
    assert not machine.quiet
    assert backend_says(machine, b"250 2.0.0 Ok\r\n" if client_says(machine, b"RSET\r\n") else b"") == [
        Send(b"250 2.0.0 Ok\r\n")
    ]
    assert machine.quiet


def test_a_multi_line_reply_cut_anywhere_is_passed_on_whole_and_once() -> None:
    machine = mediator()
    client_says(machine, b"NOOP\r\nNOOP\r\n")
    assert backend_says(machine, b"250-first\r\n250") == []
    assert backend_says(machine, b" second\r\n") == [
        Send(b"250-first\r\n250 second\r\n"),
        smtp.SendToBackend(b"NOOP\r\n"),
    ]


@pytest.mark.parametrize(
    ("hello", "reply"),
    [(b"EHLO other.example", MX_EHLO), (b"HELO other.example", b"250 mailgress\r\n")],
)
def test_ehlo_and_helo_reset_the_backend_and_get_the_proxys_own_reply(hello: bytes, reply: bytes) -> None:
    """The backend keeps the name from the login; its own extensions (XCLIENT, SIZE) never show."""
    machine = mediator(dataclasses.replace(INBOUND, starttls=StartTlsPolicy.ON))
    assert client_says(machine, hello + b"\r\n") == [smtp.SendToBackend(b"RSET\r\n")]
    assert backend_says(machine, b"250 2.0.0 Ok\r\n") == [Send(reply)]
    client_says(machine, hello + b"\r\n")
    assert backend_says(machine, b"451 4.3.0 try later\r\n") == [Send(b"451 4.3.0 try later\r\n")]
    assert client_says(machine, hello[:4] + b"\r\n") == [
        Send(b"501 5.5.4 Syntax: " + hello[:4] + b" hostname\r\n")
    ]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"XCLIENT ADDR=10.0.0.1", smtp.REPLY_UNKNOWN),
        (b"AUTH PLAIN AGFsaWNl", smtp.REPLY_NO_AUTH_HERE),
        (b"VRFY root", smtp.REPLY_NOT_VERIFIED),
        (b"EXPN staff", smtp.REPLY_NOT_VERIFIED),
        (b"STARTTLS", smtp.REPLY_TLS_UNAVAILABLE),
        (b"RCPT TO:<a%b@alpha.example>", smtp.REPLY_RELAY_DENIED),
        (b"RCPT TO:<@relay.example:a@alpha.example>", smtp.REPLY_SOURCE_ROUTE),
        (b"RCPT FROM:<a@alpha.example>", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (b"MAIL FROM:<a\x01@example.net>", smtp.REPLY_BAD_SYNTAX),
        (b"", smtp.REPLY_BAD_SYNTAX),
    ],
)
def test_the_proxy_answers_what_must_never_reach_the_backend(command: bytes, reply: bytes) -> None:
    """A backend trusts the proxy (XCLIENT, relaying for it): only checked commands go through."""
    machine = mediator()
    assert client_says(machine, command + b"\r\n") == [Send(reply)]


def test_bdat_without_chunking_is_refused_and_closes() -> None:
    """Its chunk would follow at once: never read as commands (Postfix without CHUNKING: same)."""
    machine = mediator()
    assert client_says(machine, b"BDAT 21 LAST\r\nRCPT TO:<a@alpha.example>\r\n") == [
        Send(b"521 5.5.1 Error: command not implemented\r\n"),
        Close("BDAT without CHUNKING"),
    ]


def test_starttls_inside_tls_is_554() -> None:
    machine = mediator(dataclasses.replace(INBOUND, tls_active=True))
    assert client_says(machine, b"STARTTLS\r\n") == [Send(smtp.REPLY_TLS_ACTIVE)]


def test_the_proxys_refusals_count_towards_max_errors_but_deferrals_do_not() -> None:
    machine = mediator(dataclasses.replace(INBOUND, max_errors=2))
    for _ in range(5):
        assert client_says(machine, b"RCPT TO:<a@beta.example>\r\n") == [Send(smtp.REPLY_OTHER_ROUTE)]
    assert client_says(machine, b"VRFY x\r\n") == [Send(smtp.REPLY_NOT_VERIFIED)]  # nor does 252
    assert client_says(machine, b"XYZZY\r\n") == [Send(smtp.REPLY_UNKNOWN)]
    commands = client_says(machine, b"RCPT TO:<a@gamma.example>\r\n")
    assert commands == [
        Send(smtp.REPLY_RELAY_DENIED),
        Send(b"421 4.7.0 mailgress Error: too many errors, closing connection\r\n"),
        Close("too many errors"),
    ]
    assert client_says(machine, b"NOOP\r\n") == [] and machine.closed


def test_bytes_pipelined_behind_the_body_wait_for_its_final_reply() -> None:
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    # A client that did not wait for the 354: what it sent is the body's beginning.
    assert client_says(machine, b"Subject: early\r\n") == []
    assert backend_says(machine, b"354 go ahead\r\n") == [
        Send(b"354 go ahead\r\n"),
        smtp.SendToBackend(b"Subject: early\r\n"),
    ]
    commands = client_says(machine, b"\r\nbody\r\n.\r\nMAIL FROM:<s@example.net>\r\nQUIT\r\n")
    assert commands == [smtp.SendToBackend(b"\r\nbody\r\n.\r\n")]
    assert backend_says(machine, b"250 2.0.0 Ok: queued\r\n") == [
        Send(b"250 2.0.0 Ok: queued\r\n"),
        smtp.SendToBackend(b"MAIL FROM:<s@example.net>\r\n"),
    ]


def test_an_empty_body_ends_at_once() -> None:
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    assert client_says(machine, b".\r\nNOOP\r\n") == [smtp.SendToBackend(b".\r\n")]


def test_a_client_that_half_closes_behind_its_last_commands_gets_their_replies() -> None:
    """The final reply to DATA above all: without it the sender would send the message again."""
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    assert client_says(machine, b"x\r\n.\r\nQUIT\r\n") == [smtp.SendToBackend(b"x\r\n.\r\n")]
    assert machine.handle(ConnectionClosed()) == []
    assert not machine.wants_client_data
    assert backend_says(machine, b"250 Ok: queued\r\n") == [
        Send(b"250 Ok: queued\r\n"),
        smtp.SendToBackend(b"QUIT\r\n"),
    ]
    assert backend_says(machine, b"221 Bye\r\n") == [Send(b"221 Bye\r\n"), Close("client quit")]


@pytest.mark.parametrize(
    ("pending", "closes"),
    [(b"", True), (b"NOOP\r\n", False), (b"NOOP", True)],
    ids=["quiet", "command-pending", "half-a-line"],
)
def test_client_close_ends_the_mediation_once_nothing_is_left_to_answer(pending: bytes, closes: bool) -> None:
    machine = mediator()
    client_says(machine, pending)
    commands = machine.handle(ConnectionClosed())
    assert (commands == [Close("client closed the connection")]) is closes


def test_a_body_cut_short_by_the_client_is_dropped() -> None:
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    client_says(machine, b"half a message\r\n")
    assert machine.handle(ConnectionClosed()) == [Close("client closed the connection")]


@pytest.mark.parametrize(
    ("setup", "event", "reason"),
    [
        (b"", smtp.BackendClosed(), "backend closed the connection"),
        (b"NOOP\r\n", smtp.BackendClosed(), "backend closed the connection"),
        (b"", smtp.BackendData(b"250 2.0.0 idle\r\n"), "backend replied out of turn"),
        (b"NOOP\r\n", smtp.BackendData(b"250 ok\r\n250 again\r\n"), "backend replied out of turn"),
        (b"NOOP\r\n", smtp.BackendData(b"hello\r\n"), "backend sent a malformed reply"),
        (
            b"NOOP\r\n",
            smtp.BackendData(b"250 " + b"x" * smtp.MAX_REPLY_LINE + b"\r\n"),
            "backend reply line too long",
        ),
        (b"NOOP\r\n", smtp.BackendData(b"250-x\r\n" * 101), "backend reply too long"),
        (b"", TimedOut(), "idle timeout"),
    ],
)
def test_a_backend_out_of_step_or_gone_ends_the_session_with_421(
    setup: bytes, event: smtp.MediationEvent, reason: str
) -> None:
    machine = mediator()
    client_says(machine, setup)
    *_, notice, close = machine.handle(event)
    assert isinstance(notice, Send) and notice.data.startswith(b"421 4.")
    assert close == Close(reason) and machine.closed


def test_a_backend_that_answers_inside_the_body_ends_the_session() -> None:
    """A backend that took something else for the end: never resynchronised, so what follows in
    the body can never pass for commands."""
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    assert to_backend(client_says(machine, b"x\r\n")) == b"x\r\n"
    commands = backend_says(machine, b"250 Ok: queued\r\n")
    assert commands[-1] == Close("backend replied out of turn") and machine.closed


SMUGGLED = b"XCLIENT ADDR=203.0.113.66\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<v@outside.example>\r\n"


@pytest.mark.parametrize("terminator", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r\r\n.\r\r\n"], ids=repr)
def test_a_dot_line_with_any_line_ends_ends_the_body_for_the_backend_and_the_proxy(terminator: bytes) -> None:
    """SMTP smuggling (CVE-2023-51764 class): the body reaches the backend with only CRLF line
    ends, so it ends at the same line ``.`` for both, and what the client put behind it is read
    by the proxy as commands, after the final reply: XCLIENT refused, an outside recipient too."""
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    commands = client_says(machine, b"Subject: cover\r\n\r\ncover\rtext" + terminator + SMUGGLED)
    assert commands == [smtp.SendToBackend(b"Subject: cover\r\n\r\ncover text\r\n.\r\n")]
    assert backend_says(machine, b"250 2.0.0 Ok: queued\r\n") == [
        Send(b"250 2.0.0 Ok: queued\r\n"),
        Send(smtp.REPLY_UNKNOWN),
        smtp.SendToBackend(b"MAIL FROM:<ceo@bank.example>\r\n"),
    ]
    assert backend_says(machine, b"250 2.1.0 Ok\r\n") == [
        Send(b"250 2.1.0 Ok\r\n"),
        Send(smtp.REPLY_RELAY_DENIED),
    ]


@pytest.mark.parametrize(
    ("terminator", "sent"),
    [(b"\r.\r", b" . "), (b"\r.\n", b" .\r\n"), (b"\n.\r", b"\r\n. "), (b"\r\n.\r", b"\r\n. ")],
    ids=repr,
)
def test_a_bare_cr_is_a_space_so_a_dot_line_it_would_end_is_body(terminator: bytes, sent: bytes) -> None:
    """A CR in no ``CR* LF`` run ends no line for the proxy, and reaches the backend as a space,
    so no backend can end a line (or the body) there either; the body goes on to its real end."""
    machine = mediator()
    client_says(machine, b"DATA\r\n")
    backend_says(machine, b"354 go\r\n")
    commands = client_says(machine, b"cover" + terminator + b"XCLIENT ADDR=203.0.113.66\r\n")
    assert to_backend(commands) == b"cover" + sent + b"XCLIENT ADDR=203.0.113.66\r\n"
    assert client_says(machine, b".\r\nNOOP\r\n") == [smtp.SendToBackend(b".\r\n")]


def test_cr_runs_before_an_lf_are_one_line_end_and_a_held_run_is_bounded() -> None:
    """``CR CR LF`` (a message converted twice) keeps its header section whole, as Postfix does;
    CRs ending a read wait for the next byte, at most ``MAX_HELD_CRS`` of them."""
    stream = smtp.BodyStream()
    assert stream.feed(b"Subject: x\r\r\nFrom: a@b.example\r\r\r\n\r\r\nbody\r") == (
        b"Subject: x\r\nFrom: a@b.example\r\n\r\nbody",
        None,
    )
    # The CR held from before and these: all but the last MAX_HELD_CRS go as spaces.
    assert stream.feed(b"\r" * 3 * smtp.MAX_HELD_CRS) == (b" " * (2 * smtp.MAX_HELD_CRS + 1), None)
    assert stream.feed(b"\r\n.\r") == (b"\r\n.", None)
    assert stream.feed(b"\r\nQUIT\r\n") == (b"\r\n", 2)


@pytest.mark.parametrize("behind", [b"", b"Subject: cut\r\n\r\npartial"], ids=["nothing", "part-of-a-body"])
def test_a_client_that_leaves_before_the_354_ends_the_session_and_sends_no_body(behind: bytes) -> None:
    """A client that left behind DATA and less than a whole body never completes a message: the
    session ends at the 354, the backend gets none of it and drops the transaction at the close."""
    machine = mediator()
    client_says(machine, b"DATA\r\n" + behind)
    assert machine.handle(ConnectionClosed()) == []
    assert backend_says(machine, b"354 go\r\n") == [
        Send(b"354 go\r\n"),
        Close("client closed the connection"),
    ]
    assert machine.closed


def test_a_client_that_leaves_behind_a_whole_pipelined_body_gets_its_final_reply() -> None:
    machine = mediator()
    client_says(machine, b"DATA\r\nSubject: x\r\n\r\nall\r\n.\r\n")
    assert machine.handle(ConnectionClosed()) == []
    assert backend_says(machine, b"354 go\r\n") == [
        Send(b"354 go\r\n"),
        smtp.SendToBackend(b"Subject: x\r\n\r\nall\r\n.\r\n"),
    ]
    assert backend_says(machine, b"250 2.0.0 Ok: queued\r\n") == [
        Send(b"250 2.0.0 Ok: queued\r\n"),
        Close("client closed the connection"),
    ]


@pytest.mark.parametrize("setup", [b"", b"DATA\r\n"], ids=["between-commands", "in-the-body"])
def test_a_backends_unprompted_421_is_passed_on_unchanged(setup: bytes) -> None:
    """Postfix's smtpd_timeout (300 s, shorter than the proxy's idle timeout) closes with its own
    421: the client hears why, not that the backend is out of step."""
    machine = mediator()
    if setup:
        client_says(machine, setup)
        backend_says(machine, b"354 go\r\n")
    assert backend_says(machine, b"421 4.4.2 mx Error: timeout exceeded\r\n") == [
        Send(b"421 4.4.2 mx Error: timeout exceeded\r\n"),
        Close("backend closed the connection"),
    ]


def test_a_backends_421_is_passed_on_once_and_ends_the_session() -> None:
    machine = mediator()
    client_says(machine, b"NOOP\r\nNOOP\r\n")
    assert backend_says(machine, b"421 4.3.2 Service shutting down\r\n") == [
        Send(b"421 4.3.2 Service shutting down\r\n"),
        Close("backend closed the connection"),
    ]
    assert machine.closed and machine.handle(smtp.BackendClosed()) == []


def test_an_over_long_line_is_refused_and_skipped_as_before_the_login() -> None:
    """500 5.5.2, dropped up to its LF even when it arrives in pieces, and the session goes on."""
    machine = mediator()
    long_line = b"NOOP " + b"x" * smtp.MAX_CLIENT_LINE
    assert client_says(machine, long_line[:3000]) == [Send(smtp.REPLY_LINE_TOO_LONG)]
    assert client_says(machine, b"x" * 5000) == []
    assert client_says(machine, b"RCPT TO:<a@beta.example>\r\nNOOP\r\n") == [smtp.SendToBackend(b"NOOP\r\n")]


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        (b"MAIL FROM:<s@example.net> SMTPUTF8", smtp.REPLY_UNSUPPORTED_PARAMETER),
        (b"MAIL FROM:<s@example.net> RET=HDRS", smtp.REPLY_UNSUPPORTED_PARAMETER),
        (b"MAIL TO:<s@example.net>", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (b"MAIL FROM:s@example.net", smtp.REPLY_BAD_SENDER),
    ],
)
def test_a_later_mail_is_checked_as_the_first(mail: bytes, reply: bytes) -> None:
    """The backend may offer SMTPUTF8 or DSN; the proxy did not, so their parameters never pass."""
    machine = mediator()
    assert client_says(machine, mail + b"\r\n") == [Send(reply)]
    ok = b"MAIL FROM:<s@example.net> BODY=8BITMIME\r\n"
    assert client_says(machine, ok) == [smtp.SendToBackend(ok)]


def test_reading_pauses_while_too_much_waits_behind_a_pending_command() -> None:
    machine = mediator()
    client_says(machine, b"NOOP\r\n")
    client_says(machine, b"NOOP\r\n" * (smtp.MAX_HELD_BYTES // 6 + 1))
    assert not machine.wants_client_data
    backend_says(machine, b"250 ok\r\n" * 2)
    assert machine.wants_client_data


def test_the_start_takes_what_each_side_sent_behind_the_login() -> None:
    machine = smtp.Mediator(INBOUND, smtp.InboundRouting("mail/alpha", route_of))
    assert machine.start(b"RCPT TO:<a@beta.example>\r\nNOOP\r\n", b"") == [
        Send(smtp.REPLY_OTHER_ROUTE),
        smtp.SendToBackend(b"NOOP\r\n"),
    ]
    machine = smtp.Mediator(INBOUND, smtp.InboundRouting("mail/alpha", route_of))
    assert machine.start(b"NOOP\r\n", b"250 bye\r\n")[-1] == Close("backend replied out of turn")


def test_a_route_edited_during_the_session_is_asked_again_for_each_recipient() -> None:
    current = {"alpha.example": "mail/alpha"}
    machine = smtp.Mediator(
        INBOUND, smtp.InboundRouting("mail/alpha", lambda key: current.get(key.rpartition("@")[2]))
    )
    machine.start(b"", b"")
    assert to_backend(client_says(machine, b"RCPT TO:<a@alpha.example>\r\n"))
    backend_says(machine, b"250 ok\r\n")
    current["alpha.example"] = "mail/moved"
    assert client_says(machine, b"RCPT TO:<a@alpha.example>\r\n") == [Send(smtp.REPLY_OTHER_ROUTE)]


def test_mediation_reprs_show_no_message_bytes() -> None:
    assert repr(smtp.SendToBackend(b"secret body")) == "SendToBackend(<11 bytes>)"


# The end of DATA, fuzzed: bodies of lines with dots and odd line ends, cut anywhere.

# ---------------------------------------------------------------------------------------------
# Submission mediation: the same machine, without inbound routing

SUBMISSION = FrontendConfig()


def submission_mediator() -> smtp.Mediator:
    machine = smtp.Mediator(SUBMISSION, None)
    assert machine.start(b"", b"") == []
    return machine


def test_a_submission_is_mediated_between_transactions_from_the_start_and_every_recipient_goes_on() -> None:
    """AUTH came before MAIL: a drain may close at once; an authenticated user's recipients, of
    any domain and in any form the backend may take, are the submission server's to judge."""
    machine = submission_mediator()
    assert machine.quiet
    assert to_backend(client_says(machine, b"MAIL FROM:<a@alpha.example> BODY=8BITMIME\r\n")) == (
        b"MAIL FROM:<a@alpha.example> BODY=8BITMIME\r\n"
    )
    assert to_client(backend_says(machine, b"250 2.1.0 Ok\r\n")) == b"250 2.1.0 Ok\r\n"
    assert not machine.quiet
    for recipient in (b"<b@elsewhere.example>", b"<c%d@alpha.example>", b"<e@[192.0.2.1]>", b"<Postmaster>"):
        rcpt = b"RCPT TO:" + recipient + b"\r\n"
        assert client_says(machine, rcpt) == [smtp.SendToBackend(rcpt)]
        assert backend_says(machine, b"250 2.1.5 Ok\r\n") == [Send(b"250 2.1.5 Ok\r\n")]
    assert to_backend(client_says(machine, b"DATA\r\n")) == b"DATA\r\n"
    assert not machine.streaming_body  # not before the 354
    backend_says(machine, b"354 go\r\n")
    assert not machine.quiet and machine.streaming_body
    assert (
        to_backend(client_says(machine, b"Subject: x\n\nbody\r\n.\r\n")) == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert not machine.quiet and not machine.streaming_body  # the final reply is still to come
    assert backend_says(machine, b"250 2.0.0 queued\r\n") == [Send(b"250 2.0.0 queued\r\n")]
    assert machine.quiet and machine.deferred == 0


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        # Postfix obeys XCLIENT from the proxy's address at any time outside a transaction: a
        # client's own would take another login name or a trusted address.
        (b"XCLIENT ADDR=10.0.0.1 LOGIN=someone.else", smtp.REPLY_UNKNOWN),
        (b"AUTH PLAIN AGFsaWNl", smtp.REPLY_ALREADY_AUTHENTICATED),
        (b"VRFY root", smtp.REPLY_NOT_VERIFIED),
        (b"ETRN alpha.example", smtp.REPLY_UNKNOWN),
        (b"STARTTLS", smtp.REPLY_TLS_UNAVAILABLE),
        (b"RCPT TO:<a@alpha.example> NOTIFY=NEVER", smtp.REPLY_UNSUPPORTED_PARAMETER),
        (b"RCPT TO:<a b@alpha.example>", smtp.REPLY_BAD_RECIPIENT),
        (b"RCPT TO:a@alpha.example>", smtp.REPLY_BAD_RECIPIENT),
        (b"RCPT FROM:<a@alpha.example>", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (b"MAIL FROM:<a@alpha.example> SIZE=10", smtp.REPLY_UNSUPPORTED_PARAMETER),
    ],
)
def test_a_submission_client_gets_the_proxys_answer_to_what_must_never_reach_the_backend(
    command: bytes, reply: bytes
) -> None:
    machine = submission_mediator()
    assert client_says(machine, command + b"\r\n") == [Send(reply)]


@pytest.mark.parametrize(
    "command",
    [
        # RFC 4954 section 5: the proxy's EHLO listed AUTH, so MAIL takes its AUTH parameter
        # (review R1: curl --mail-auth and relaying clients send it with every message).
        b"MAIL FROM:<u@alpha.example> AUTH=<>",
        b"MAIL FROM:<u@alpha.example> BODY=8BITMIME AUTH=u+2Bx@alpha.example",
        # As Postfix takes them (strict_rfc821_envelopes = no): no brackets, no domain, a space.
        b"MAIL FROM:u@alpha.example",
        b"MAIL FROM: u@alpha.example AUTH=<>",
        b"RCPT TO:b@beta.example",
        b"RCPT TO: <alice>",
        b"RCPT TO:<user@under_score.example>",
    ],
)
def test_a_submission_envelope_in_a_form_postfix_takes_goes_to_the_backend_as_sent(command: bytes) -> None:
    machine = submission_mediator()
    assert client_says(machine, command + b"\r\n") == [smtp.SendToBackend(command + b"\r\n")]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"MAIL FROM:<s@example.net> AUTH=<>", smtp.REPLY_UNSUPPORTED_PARAMETER),
        (b"MAIL FROM:s@example.net", smtp.REPLY_BAD_SENDER),
        (b"RCPT TO:b@alpha.example", smtp.REPLY_BAD_RECIPIENT),
    ],
)
def test_the_mx_keeps_its_stricter_envelope(command: bytes, reply: bytes) -> None:
    """Inbound, the proxy lists no AUTH, and a recipient's form decides its route."""
    assert client_says(mediator(), command + b"\r\n") == [Send(reply)]


def test_a_submission_clients_ehlo_resets_the_backend_and_offers_no_auth_again() -> None:
    machine = submission_mediator()
    assert client_says(machine, b"EHLO client.example\r\n") == [smtp.SendToBackend(b"RSET\r\n")]
    # The MX's reply after its login too: no AUTH, no STARTTLS, none of the backend's own.
    assert backend_says(machine, b"250 2.0.0 Ok\r\n") == [Send(MX_EHLO)]


def test_a_mediator_is_inbound_exactly_when_it_has_inbound_routing() -> None:
    with pytest.raises(LocalProtocolError):
        smtp.Mediator(SUBMISSION, smtp.InboundRouting("mail/alpha", route_of))
    with pytest.raises(LocalProtocolError):
        smtp.Mediator(INBOUND, None)


BODY_LINES = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a\rb", b"a\nb", b"\r", b"\n", b"text", b". ."]),
    max_size=12,
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])


def stuffed(lines: list[bytes]) -> bytes:
    """A body as a client sends it: each line dot-stuffed (RFC 5321 section 4.5.2), CRLF-ended."""
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF_BYTES for line in lines)


CRLF_BYTES = b"\r\n"


def fed(stream: bytes, cuts: list[int]) -> tuple[bytes, int | None]:
    """What a ``BodyStream`` sends for ``stream`` cut at ``cuts``, and the length of the body in
    ``stream`` if it ended (None if it goes on)."""
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    tracker = smtp.BodyStream()
    sent = b""
    for start, end in itertools.pairwise(points):
        body, found = tracker.feed(stream[start:end])
        sent += body
        if found is not None:
            return sent, start + found
    return sent, None


def line_by_line(stream: bytes) -> tuple[bytes, int | None]:
    """The same, one byte at a time: each line end (an LF and the CRs before it) is CRLF, any
    other CR a space, and the body ends behind the first line that is a single dot. CRs last
    may start a line end: unsent (the streams here are shorter than ``MAX_HELD_CRS``)."""
    sent, line = bytearray(), bytearray()
    at = 0
    while at < len(stream):
        byte = stream[at]
        at += 1
        if byte == ord("\r"):
            run = len(stream[at:]) - len(stream[at:].lstrip(b"\r"))
            if at + run == len(stream):
                break
            if stream[at + run] != ord("\n"):
                sent += b" "
                line += b" "
                continue
            at += run + 1
        elif byte != ord("\n"):
            sent.append(byte)
            line.append(byte)
            continue
        sent += CRLF_BYTES
        if line == b".":
            return bytes(sent), at
        line.clear()
    return bytes(sent), None


@FUZZ
@given(
    lines=BODY_LINES,
    ending=st.tuples(LINE_ENDS, LINE_ENDS),
    after=st.binary(max_size=12),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_the_end_of_data_is_found_wherever_the_stream_is_cut(
    lines: list[bytes], ending: tuple[bytes, bytes], after: bytes, cuts: list[int]
) -> None:
    """A body ended by a dot line with any line ends (the first of them the body's last line's
    own) ends there, and the bytes behind it are not sent."""
    body = stuffed(lines)[:-2] + ending[0] + b"." + ending[1] if lines else b"." + ending[1]
    sent, end = fed(body + after, cuts)
    assert end == len(body)
    assert sent.endswith(b"\r\n.\r\n") or sent == b".\r\n"
    assert b"\n" not in sent.replace(b"\r\n", b"") and b"\r" not in sent.replace(b"\r\n", b"")


@FUZZ
@given(
    data=st.binary(max_size=40)
    | st.lists(st.sampled_from([b"\r", b"\n", b".", b"x"]), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_the_normalised_body_and_its_end_agree_with_a_line_by_line_reading(
    data: bytes, cuts: list[int]
) -> None:
    """On any bytes cut anywhere: what is sent is the input with each line end made CRLF, up to
    and including the first line that is a single dot, and the end is reported just behind it."""
    assert fed(data, cuts) == line_by_line(data)


MEDIATED_CLIENT = (
    b"MAIL FROM:<s@example.net>\r\nRCPT TO:<a@alpha.example>\r\nRCPT TO:<b@beta.example>\r\n"
    b"DATA\r\nSubject: hi\r\n\r\n..dot\r\nline\r\n.\r\nRSET\r\nEHLO again.example\r\nQUIT\r\n"
)
# What the backend gets, cut after each command (or body) it owes a reply to, and those replies.
MEDIATED_UPSTREAM = [
    b"MAIL FROM:<s@example.net>\r\n",
    b"RCPT TO:<a@alpha.example>\r\n",
    b"DATA\r\n",
    b"Subject: hi\r\n\r\n..dot\r\nline\r\n.\r\n",
    b"RSET\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
]
MEDIATED_REPLIES = [
    b"250 2.1.0 Ok\r\n",
    b"250-2.1.5\r\n250 Ok\r\n",
    b"354 go\r\n",
    b"250 2.0.0 queued\r\n",
    b"250 2.0.0 Ok\r\n",
    b"250 2.0.0 Ok\r\n",
    b"221 2.0.0 Bye\r\n",
]


@FUZZ
@given(client_sizes=dialogues.SPLIT_READS, backend_sizes=dialogues.SPLIT_READS, backend_first=st.booleans())
def test_a_mediated_session_cut_anywhere_gives_the_same_bytes_to_each_side(
    client_sizes: list[int], backend_sizes: list[int], backend_first: bool
) -> None:
    """However both sides' bytes are cut and interleaved, each side gets the same bytes, in order,
    and the session ends the same. The backend speaks only when spoken to, as a real one does."""
    ends = list(itertools.accumulate(len(part) for part in MEDIATED_UPSTREAM))
    reply_ends = list(itertools.accumulate(len(reply) for reply in MEDIATED_REPLIES))
    backend_stream = b"".join(MEDIATED_REPLIES)
    machine = mediator()
    commands: list[smtp.MediationCommand] = []
    client_at = backend_at = reads = 0
    for reads in range(1000):
        answered = sum(end <= len(to_backend(commands)) for end in ends)
        owed = reply_ends[answered - 1] if answered else 0
        client_size = client_sizes[reads % len(client_sizes)] * 5
        backend_size = backend_sizes[reads % len(backend_sizes)] * 3
        if backend_at < owed and (backend_first or client_at == len(MEDIATED_CLIENT)):
            piece = backend_stream[backend_at : min(owed, backend_at + backend_size)]
            backend_at += len(piece)
            commands += backend_says(machine, piece)
        elif client_at < len(MEDIATED_CLIENT):
            piece = MEDIATED_CLIENT[client_at : client_at + client_size]
            client_at += len(piece)
            commands += client_says(machine, piece)
        else:
            break
    assert reads < 999
    assert to_backend(commands) == b"".join(MEDIATED_UPSTREAM)
    assert to_client(commands) == (
        b"250 2.1.0 Ok\r\n250-2.1.5\r\n250 Ok\r\n" + smtp.REPLY_OTHER_ROUTE + b"354 go\r\n"
        b"250 2.0.0 queued\r\n250 2.0.0 Ok\r\n" + MX_EHLO + b"221 2.0.0 Bye\r\n"
    )
    assert commands[-1] == Close("client quit")
