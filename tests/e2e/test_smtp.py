"""SMTP through mailgress to the real Postfix: submission with AUTH, and the inbound MX.

Proves: AUTH PLAIN and LOGIN (smtplib, swaks) submit mail that arrives byte-identical, AUTH PLAIN
also with a Latin-1 password (8-bit octets that are no UTF-8, checked by Dovecot's SASL); 100
messages submitted in parallel sessions all arrive intact; inbound mail for a routed domain is
delivered and for an unrouted one refused with 550, also from an SRS sender or with dots where
RFC 5321 puts none and to a local part over 64 octets (Postfix takes them, so the proxy must);
MAIL parameters of extensions not advertised get 555 as from Postfix; wrong passwords and
unrouted logins get 535; over-long lines get 500 and the session goes on until max_errors,
garbage and a stalled client get SMTP's answer or a timely close while the proxy keeps serving
everyone else. Inbound to two backends (the testbed's Postfix and a second one for
delta.example): a recipient of the other backend, in the same transaction or on a reused
connection, gets 452 4.5.3 and, sent again alone, arrives byte-identical at its own Postfix, also
when an auth_http route's service places it there (it is asked about every recipient); a Postfix
refusing the client's HELO name after XCLIENT is heard at RCPT, no endpoint failure; two
routes on one Postfix share a transaction; a pipelined envelope is answered in order; a 6 MiB
message passes the mediation intact; XCLIENT, BDAT, STARTTLS and EHLO after the backend login get
the proxy's answers. SMTP smuggling: a dot line with a bare LF ends the body for Postfix 3.7 and
the proxy alike, so what follows is mediated (a forged XCLIENT gets 500, a second message is an
ordinary one with the real client in its Received header) and a Postfix trusting mynetworks
never relays for it. Postfix's 550 quoting a long recipient (a reply line over 512 octets)
reaches the client before and after the backend login, and the other recipient's mail arrives.
Line ends in a body are stored as Postfix stores them directly (CR CR LF one line end, a bare CR
a space), and a client that leaves behind DATA and half a body is closed at the 354, not held.
"""

import secrets
import smtplib
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import authservice, clients, mailservers, messages, proxysettings
from testbed.backends import ALPHA, BETA, NAMESPACE, POSTFIX_SERVICE, UNROUTED_DOMAIN, Backends
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.conftest import running_postfix
from tests.conftest import testbed_directory as make_testbed_directory
from tests.e2e.helpers import StartProxy, latin1_user, octets_in_log, sasl_plain, serves_imap

NewUser = Callable[..., User]
MESSAGE_COUNT = 100
# Parallel submission sessions: enough to interleave logins and relays in the proxy.
SUBMITTERS = 4
# Senders real mail comes from that RFC 5321's Dot-string or its 64-octet minimum would refuse:
# an SRS-rewritten forwarder's (79-octet local part) and Japanese carriers' dotted addresses.
REAL_WORLD_SENDERS = [
    "SRS0=HHH6=TT=sub.originaldomain.example=first.last.very.long.name@forwarder.example",
    "taro..yamada@docomo.ne.jp",
    "hanako.@ezweb.ne.jp",
]
# Over-long lines a client sends in a row: more than any max_errors the tests configure.
OVER_LONG_LINES = 20
# A reply line read from a plain socket: RFC 5321 section 4.5.3.1.5 (512 octets) with room to spare.
SMTP_LINE = 4096


def submit(port: int, user: User, mechanism: str, recipient: str, message: bytes) -> None:
    with clients.smtp(port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user.address, user.password
        smtp.auth(
            mechanism, getattr(smtp, f"auth_{mechanism.lower()}"), initial_response_ok=mechanism == "PLAIN"
        )
        smtp.sendmail(user.address, [recipient], message)


def test_submission_takes_the_auth_parameter_and_envelopes_without_brackets(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    """Review R1: after AUTH, MAIL's AUTH= (RFC 4954 section 5; curl --mail-auth, relaying
    clients) and addresses without their brackets (Postfix's strict_rfc821_envelopes = no) reached
    Postfix through the byte relay; the mediation must take them as Postfix does."""
    sender, first, second = new_user(BETA), new_user(ALPHA), new_user(ALPHA)
    message = messages.compose(sender.address, first.address, "auth parameter", "x\n")
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        smtp.login(sender.address, sender.password)
        smtp.sendmail(sender.address, [first.address], message, mail_options=[f"AUTH={sender.address}"])
        assert smtp.docmd(f"MAIL FROM: {sender.address}")[0] == 250
        assert smtp.docmd(f"RCPT TO:{second.address}")[0] == 250
        assert smtp.data(message)[0] == 250
    for recipient in (first, second):
        (delivered,) = backends.wait_delivered(recipient.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submission_with_auth_delivers_byte_identical(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, mechanism: str
) -> None:
    sender = new_user(BETA)
    recipient = new_user(ALPHA)
    message = messages.compose(sender.address, recipient.address, f"AUTH {mechanism}", ".a\n..b\nc\n")
    submit(proxy.settings.ports.submission, sender, mechanism, recipient.address, message)
    (delivered,) = backends.wait_delivered(recipient.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_submits_through_the_proxy(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, mechanism: str
) -> None:
    user = new_user()
    message = messages.compose(user.address, user.address, f"swaks {mechanism}", "through mailgress\n")
    result = clients.swaks(
        "--server", f"{LOOPBACK}:{proxy.settings.ports.submission}", "--auth", mechanism,
        "--from", user.address, "--to", user.address,
        user=user, data=message.removesuffix(b"\r\n"),  # swaks ends DATA with its own CRLF
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


def test_the_awkward_password_submits(proxy: ProxyProcess, backends: Backends, new_user: NewUser) -> None:
    recipient = new_user()
    message = messages.compose("al@alpha.example", recipient.address, "awkward", "ok\n")
    for mechanism in ("PLAIN", "LOGIN"):
        submit(
            proxy.settings.ports.submission,
            backends.user("al@alpha.example"),
            mechanism,
            recipient.address,
            message,
        )
    assert len(backends.wait_delivered(recipient.address, 2)) == 2


def test_a_latin1_password_submits(proxy: ProxyProcess, backends: Backends, new_user: NewUser) -> None:
    sender = latin1_user(backends, "latin1-submission", BETA)
    recipient = new_user()
    message = messages.compose(sender.address, recipient.address, "latin-1", "ok\n")
    as_utf8 = sender.octets.decode("latin-1").encode()  # the same characters, other octets
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        smtp.ehlo()
        # smtplib sends AUTH as ASCII only: the response is made by hand. Codes first, asserted
        # after: a failing assertion must not show a password argument.
        refused, _ = smtp.docmd("AUTH", "PLAIN " + sasl_plain(sender.address, as_utf8).decode())
        accepted, _ = smtp.docmd("AUTH", "PLAIN " + sasl_plain(sender.address, sender.octets).decode())
        assert (refused, accepted) == (535, 235)
        smtp.sendmail(sender.address, [recipient.address], message)
    (delivered,) = backends.wait_delivered(recipient.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    assert not octets_in_log(proxy, sender)


def test_a_hundred_messages_all_arrive_intact(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    senders = [new_user(ALPHA), new_user(BETA)]
    recipients = [new_user(BETA), new_user(ALPHA)]
    sent: dict[str, dict[str, bytes]] = {recipient.address: {} for recipient in recipients}
    jobs = []
    for number in range(MESSAGE_COUNT):
        sender, recipient = senders[number % 2], recipients[number % 2]
        identifier = messages.message_id()
        body = f"message {number}\n.dotted line {number}\n" + f"{number:04d} " * 200 + "\n"
        message = messages.compose(
            sender.address, recipient.address, f"bulk {number}", body, identifier=identifier
        )
        sent[recipient.address][identifier] = message
        jobs.append((sender, "PLAIN" if number % 3 else "LOGIN", recipient.address, message))
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        for done in [pool.submit(submit, proxy.settings.ports.submission, *job) for job in jobs]:
            done.result(timeout=120)
    for recipient in recipients:
        expected = sent[recipient.address]
        delivered = backends.wait_delivered(recipient.address, len(expected), timeout=120)
        received = {}
        for raw in delivered:
            original = mailservers.strip_delivery_headers(raw)
            identifier = original.split(b"\n", 1)[0].removeprefix(b"Message-ID: ").decode()
            received[identifier] = original
        assert sorted(received) == sorted(expected)  # none lost, none duplicated
        damaged = [i for i, message in expected.items() if received[i] != mailservers.as_stored(message)]
        assert damaged == []


@pytest.mark.parametrize("domain", [ALPHA, BETA])
def test_inbound_mail_for_a_routed_domain_is_delivered(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, domain: str
) -> None:
    user = new_user(domain)
    message = messages.compose("sender@example.net", user.address, f"inbound {domain}", "hello\n")
    with clients.smtp(proxy.settings.ports.smtp) as smtp:
        smtp.sendmail("sender@example.net", [user.address], message)
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    assert delivered in backends.dovecots[domain].messages(user.address)
    swaks = clients.swaks(
        "--server", f"{LOOPBACK}:{proxy.settings.ports.smtp}", "--from", "other@example.net",
        "--to", user.address, "--header", "Subject: swaks inbound",
    )  # fmt: skip
    assert swaks.returncode == 0, swaks.describe()
    assert b"Subject: swaks inbound" in backends.wait_delivered(user.address, 2)[-1]


def test_inbound_mail_for_an_unrouted_domain_is_refused_with_550(
    proxy: ProxyProcess, backends: Backends
) -> None:
    recipient = f"anyone@{UNROUTED_DOMAIN}"
    with (
        clients.smtp(proxy.settings.ports.smtp) as smtp,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        smtp.sendmail(
            "sender@example.net", [recipient], messages.compose("sender@example.net", recipient, "x")
        )
    assert refused.value.recipients[recipient][0] == 550
    swaks = clients.swaks(
        "--server",
        f"{LOOPBACK}:{proxy.settings.ports.smtp}",
        "--from",
        "other@example.net",
        "--to",
        recipient,
    )
    assert swaks.returncode == 24, swaks.describe()  # swaks: the RCPT was refused
    assert "550 5.7.1" in swaks.transcript


def envelope_replies(port: int, lines: list[bytes]) -> list[bytes]:
    """EHLO, then each line with its reply line (single-line replies only), then QUIT."""
    with clients.RawClient(port) as raw:
        assert raw.line().startswith(b"220 ")
        assert raw.command(b"EHLO client.example", b"250 ").startswith(b"250 ")
        replies = [raw.command(line, b"") for line in lines]
        raw.command(b"QUIT", b"221 ")
    return replies


@pytest.mark.parametrize("sender", REAL_WORLD_SENDERS)
def test_inbound_mail_from_real_world_senders_to_a_long_local_part_is_delivered(
    proxy: ProxyProcess, backends: Backends, sender: str
) -> None:
    """Postfix takes these envelopes, so the proxy passes them on (RFC 5321 section 4.5.3.1:
    64 octets is the least a local part may have, and servers should avoid limits)."""
    local = "first.last+" + "newsletter-" * 5 + secrets.token_hex(4)
    user = backends.add_user(f"{local}@{ALPHA}")
    assert len(local) > 64
    envelope = [f"MAIL FROM:<{sender}>".encode(), f"RCPT TO:<{user.address}>".encode()]
    direct = envelope_replies(backends.postfix.smtp_port, envelope)
    assert [reply[:4] for reply in direct] == [b"250 ", b"250 "]
    message = messages.compose(sender, user.address, "real-world envelope", "hello\n")
    with clients.smtp(proxy.settings.ports.smtp) as smtp:
        smtp.ehlo()
        # Raw lines: smtplib would re-quote the dotted addresses.
        assert smtp.docmd(f"MAIL FROM:<{sender}>")[0] == 250
        assert smtp.docmd(f"RCPT TO:<{user.address}>")[0] == 250
        assert smtp.data(message)[0] == 250
    (delivered,) = backends.wait_delivered(user.address, 1)
    # Postfix quotes a local part with dots where RFC 5321's Dot-string has none.
    return_path = delivered.split(b"\n", 1)[0].replace(b'"', b"")
    assert return_path == f"Return-Path: <{sender}>".encode()
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


@pytest.mark.parametrize(
    "parameter", [b"FOO=BAR", b"SIZE=99999999999", b"BODY=BINARYMIME", b"SMTPUTF8", b"RET=HDRS"]
)
def test_mail_parameters_of_unadvertised_extensions_get_555(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, parameter: bytes
) -> None:
    """RFC 5321 section 4.1.1.11; Postfix answers an unknown one the same way (it advertises
    SIZE, SMTPUTF8 and DSN itself, the proxy none of them)."""
    user = new_user(ALPHA)
    envelope = [b"MAIL FROM:<s@example.net> " + parameter, f"RCPT TO:<{user.address}>".encode()]
    (mail, rcpt) = envelope_replies(proxy.settings.ports.smtp, envelope)
    assert mail.startswith(b"555 5.5.4 ")
    assert rcpt.startswith(b"503 ")  # no transaction was started
    if parameter == b"FOO=BAR":
        assert envelope_replies(backends.postfix.smtp_port, envelope)[0].startswith(b"555 5.5.4 ")


def test_mail_with_body_8bitmime_is_delivered(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    user = new_user(ALPHA)
    message = messages.compose("s@example.net", user.address, "8bitmime", "gr\u00fc\u00dfe\n")
    with clients.smtp(proxy.settings.ports.smtp) as smtp:
        smtp.sendmail("s@example.net", [user.address], message, mail_options=["BODY=8BITMIME"])
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


@pytest.mark.parametrize(
    "login",
    [
        ("alice@alpha.example", "not-the-password"),
        ("nobody@alpha.example", "not-the-password"),
        (f"alice@{UNROUTED_DOMAIN}", None),
    ],
    ids=["wrong-password", "unknown-user", "unrouted-domain"],
)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_refused_logins_get_535(
    proxy: ProxyProcess, backends: Backends, mechanism: str, login: tuple[str, str | None]
) -> None:
    address, password = login
    user = User(address, password or backends.user("alice@alpha.example").password)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        submit(
            proxy.settings.ports.submission, user, mechanism, "bob@beta.example", b"Subject: x\r\n\r\nx\r\n"
        )
    # One text for all three (review Q1 #4: Postfix's own told a routed login from an unrouted one).
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        535,
        b"5.7.8 Authentication credentials invalid",
    )
    assert serves_imap(proxy, backends)


@pytest.mark.parametrize("listener", ["submission", "smtp"])
def test_an_over_long_line_gets_500_and_the_session_goes_on_until_max_errors(
    proxy: ProxyProcess, backends: Backends, listener: str
) -> None:
    """2048 octets with the CRLF (Postfix's limit) are taken; a longer line gets RFC 5321
    section 4.5.3.1.10's 500, and only a client that keeps sending them is closed."""
    with clients.RawClient(proxy.settings.ports.listener_port(listener)) as raw:
        assert raw.line().startswith(b"220 ")
        assert raw.command(b"EHLO " + b"x" * (2048 - len(b"EHLO \r\n")), b"250 ").startswith(b"250 ")
        assert raw.command(b"NOOP " + b"y" * 100_000, b"").startswith(b"500 5.5.2 ")
        assert raw.command(b"NOOP", b"").startswith(b"250 ")
        raw.send((b"NOOP " + b"z" * 5000 + b"\r\n") * OVER_LONG_LINES)
        replies = [raw.line()]
        while replies[-1].startswith(b"500 ") and len(replies) <= OVER_LONG_LINES:
            replies.append(raw.line())
        try:
            rest = raw.line()
        except ConnectionResetError:  # the proxy closed with lines of ours still unread
            rest = b""
    assert replies[-1].startswith(b"421 4.7.0 ")
    assert replies[:-1] == [b"500 5.5.2 Error: line too long\r\n"] * (len(replies) - 1)
    assert len(replies) - 1 < OVER_LONG_LINES
    assert rest == b""
    assert serves_imap(proxy, backends)


@pytest.mark.parametrize("listener", ["submission", "smtp"])
def test_garbage_gets_500(proxy: ProxyProcess, backends: Backends, listener: str) -> None:
    with clients.RawClient(proxy.settings.ports.listener_port(listener)) as raw:
        assert raw.line().startswith(b"220 ")
        raw.send(b"\x00\xff\xfe\x80 \x01\x02 garbage\r\n")
        assert raw.line().startswith(b"500 ")
        assert raw.command(b"NOOP", b"").startswith(b"250 ")  # still talking SMTP
    assert serves_imap(proxy, backends)


@pytest.mark.parametrize("listener", ["submission", "smtp"])
def test_a_client_that_stops_mid_command_is_closed_while_others_are_served(
    proxy: ProxyProcess, backends: Backends, listener: str
) -> None:
    with clients.RawClient(proxy.settings.ports.listener_port(listener)) as stalled:
        assert stalled.line().startswith(b"220 ")
        stalled.send(b"EHLO client.example\r\nMAIL FROM:<a@example.net")  # no line end, ever
        assert serves_imap(proxy, backends)
        rest = stalled.until_closed()
    assert rest.splitlines()[-1].startswith(b"421 ")


# ---------------------------------------------------------------------------------------------
# Inbound: recipients of a second route. delta.example is a route on a second, real Postfix;
# alpha.example and beta.example are two routes on the testbed's Postfix. After the first routed
# recipient every command is mediated: a recipient another backend owns gets 452 4.5.3, which
# MTAs deliver later in another transaction (never a bounce); one of a route served by the same
# backend endpoint goes to it, as it would directly.

DELTA = "delta.example"
PICKY = "picky.example"
BIG_MESSAGE_BYTES = 6 * 1024 * 1024


@dataclass
class DeltaBackend:
    """A second Postfix that owns delta.example, with mailboxes made on demand."""

    postfix: mailservers.Postfix
    directory: Path
    made: int = 0

    def new_address(self) -> str:
        self.made += 1
        address = f"d{self.made}-{secrets.token_hex(4)}@{DELTA}"
        owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
        self.postfix.add_mailbox(address, mailservers.Maildir(self.directory / address, owner))
        return address


@pytest.fixture(scope="module")
def delta() -> Iterator[DeltaBackend]:
    directory = make_testbed_directory("mailgress-delta-")
    postfix = mailservers.Postfix(directory / "postfix", domains=[DELTA])
    with running_postfix(postfix, directory, "delta"):
        yield DeltaBackend(postfix, directory)


@pytest.fixture(scope="module")
def two_backends(start_proxy: StartProxy, backends: Backends, delta: DeltaBackend) -> ProxyProcess:
    """A proxy with the standard routes and delta.example on the second Postfix."""
    services = backends.services()
    services[f"{NAMESPACE}/delta-postfix"] = {"25": [f"{LOOPBACK}:{delta.postfix.smtp_port}"]}
    routes = [
        *backends.mailroutes(),
        proxysettings.mailroute("delta", [DELTA], namespace=NAMESPACE, smtp=("delta-postfix", 25)),
    ]
    return start_proxy("two-backends", services=services, routes=routes)


def smtp_reply(raw: clients.RawClient) -> bytes:
    """One whole SMTP reply (RFC 5321 section 4.2.1: lines until ``code SP``)."""
    reply = b""
    for _ in range(100):
        line = raw.line()
        reply += line
        if line[3:4] != b"-":
            return reply
    raise AssertionError(f"no end of reply in 100 lines: {reply[:200]!r}")


def dot_stuffed(message: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 section 4.5.2), without the final dot line."""
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in message.split(b"\r\n"))


def send_alone(port: int, recipient: str, message: bytes) -> None:
    """What the sender does with a deferred recipient: its own transaction, on a new connection."""
    with clients.smtp(port) as smtp:
        assert smtp.sendmail("sender@example.net", [recipient], message) == {}


def test_a_second_backends_recipient_in_the_same_transaction_is_deferred_then_delivered(
    two_backends: ProxyProcess, backends: Backends, delta: DeltaBackend, new_user: NewUser
) -> None:
    """Exim's multi_domain: one transaction for alpha and delta; delta's recipient gets 452 (never
    the 550 of a backend that does not own it), then arrives on its own, byte-identical."""
    first, second = new_user(ALPHA), delta.new_address()
    message = messages.compose("sender@example.net", first.address, "two routes", ".dot\nline\n")
    port = two_backends.settings.ports.smtp
    with clients.smtp(port) as smtp:
        refused = smtp.sendmail("sender@example.net", [first.address, second], message)
    assert list(refused) == [second] and refused[second][0] == 452
    (delivered,) = backends.wait_delivered(first.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    send_alone(port, second, message)
    (delivered,) = delta.postfix.wait_delivered(second, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


def test_a_second_backends_recipient_on_a_reused_connection_is_deferred_then_delivered(
    two_backends: ProxyProcess, backends: Backends, delta: DeltaBackend, new_user: NewUser
) -> None:
    """Postfix's connection cache: the next transaction on the same connection is for delta."""
    first, second = new_user(ALPHA), delta.new_address()
    one = messages.compose("sender@example.net", first.address, "first transaction")
    two = messages.compose("sender@example.net", second, "second transaction")
    port = two_backends.settings.ports.smtp
    with clients.smtp(port) as smtp:
        assert smtp.sendmail("sender@example.net", [first.address], one) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as deferred:
            smtp.sendmail("sender@example.net", [second], two)
        assert deferred.value.recipients[second][0] == 452
        assert smtp.noop()[0] == 250  # the connection goes on
        assert smtp.sendmail("sender@example.net", [first.address], one) == {}
    send_alone(port, second, two)
    (delivered,) = delta.postfix.wait_delivered(second, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(two)
    assert len(backends.wait_delivered(first.address, 2)) == 2


@pytest.fixture(scope="module")
def placing_service(backends: Backends, delta: DeltaBackend) -> Iterator[authservice.AuthService]:
    """An auth service that places each recipient on the Postfix owning its domain."""

    def answer(received: authservice.Received) -> authservice.Reply:
        owner = delta.postfix if f"@{DELTA}>" in (received.header("Auth-SMTP-To") or "") else backends.postfix
        return authservice.ok(LOOPBACK, owner.smtp_port)

    with authservice.AuthService(answer) as service:
        yield service


@pytest.fixture(scope="module")
def placing_proxy(
    start_proxy: StartProxy, backends: Backends, placing_service: authservice.AuthService
) -> ProxyProcess:
    """One auth_http route for alpha.example and delta.example, whose service places mailboxes."""
    route = proxysettings.mailroute("placed", [ALPHA, DELTA], namespace=NAMESPACE, smtp=(POSTFIX_SERVICE, 25))
    route["spec"]["auth"] = {"mode": "http", "http": {"url": placing_service.url}}
    return start_proxy("placing", routes=[route])


def test_an_auth_http_route_asks_its_service_about_each_recipient(
    placing_proxy: ProxyProcess,
    placing_service: authservice.AuthService,
    backends: Backends,
    delta: DeltaBackend,
    new_user: NewUser,
) -> None:
    """Review M5 #1: the service places the second recipient (of the same route) on the other
    Postfix, so it is deferred (452) and arrives there on its own; before, it went to the first
    recipient's Postfix unasked and was refused there for good (550: a bounce)."""
    first, second = new_user(ALPHA), delta.new_address()
    message = messages.compose("sender@example.net", first.address, "placed", "one route, two servers\n")
    port = placing_proxy.settings.ports.smtp
    placing_service.clear()
    with clients.smtp(port) as smtp:
        refused = smtp.sendmail("sender@example.net", [first.address, second], message)
    assert list(refused) == [second] and refused[second][0] == 452
    asked = [received.header("Auth-SMTP-To") for received in placing_service.requests]
    assert asked == [f"rcpt TO:<{first.address}>", f"rcpt TO:<{second}>"]  # the lines as smtplib sent them
    (delivered,) = backends.wait_delivered(first.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    send_alone(port, second, message)
    (delivered,) = delta.postfix.wait_delivered(second, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


@pytest.fixture(scope="module")
def picky(start_proxy: StartProxy, backends: Backends) -> Iterator[ProxyProcess]:
    """A proxy routing picky.example (XCLIENT) to a Postfix that judges a client by its HELO name
    as soon as it gives it (smtpd_delay_reject = no)."""
    directory = make_testbed_directory("mailgress-picky-")
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[PICKY],
        extra_main_cf={
            "smtpd_delay_reject": "no",
            "smtpd_helo_restrictions": "check_helo_access inline:{blocked.example=REJECT}",
        },
    )
    with running_postfix(postfix, directory, "picky"):
        services = backends.services()
        services[f"{NAMESPACE}/picky-postfix"] = {"25": [f"{LOOPBACK}:{postfix.smtp_port}"]}
        route = proxysettings.mailroute("picky", [PICKY], namespace=NAMESPACE, smtp=("picky-postfix", 25))
        route["spec"]["smtp"]["clientInfo"] = "xclient"
        yield start_proxy("picky", services=services, routes=[route])


def test_a_backend_refusing_the_real_client_is_heard_and_no_endpoint_failure(picky: ProxyProcess) -> None:
    """Review M5 #2: Postfix refuses the EHLO name the proxy gives it after XCLIENT; the client
    hears that refusal at its RCPT, and the endpoint is not failing (before: 451, and a warning
    that the endpoint failed the login dialogue, for every blocked client)."""
    raw = clients.RawClient(picky.settings.ports.smtp)
    try:
        smtp_reply(raw)  # the greeting
        for line in (b"EHLO blocked.example", b"MAIL FROM:<s@example.net>", f"RCPT TO:<x@{PICKY}>".encode()):
            raw.send(line + b"\r\n")
            reply = smtp_reply(raw)
    finally:
        raw.close()
    assert reply.startswith(b"554 5.7.1 <blocked.example>: Helo command rejected"), reply
    assert "failed the login dialogue" not in picky.log_text()


def test_routes_on_the_same_backend_share_the_transaction(
    two_backends: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    """alpha and beta are two routes on one Postfix endpoint: nothing to defer, both delivered."""
    first, second = new_user(ALPHA), new_user(BETA)
    message = messages.compose("sender@example.net", first.address, "one backend", "both\n")
    with clients.smtp(two_backends.settings.ports.smtp) as smtp:
        assert smtp.sendmail("sender@example.net", [first.address, second.address], message) == {}
    for user in (first, second):
        (delivered,) = backends.wait_delivered(user.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
        assert delivered in backends.dovecots[user.address.partition("@")[2]].messages(user.address)


def test_a_pipelined_group_is_answered_in_order(
    two_backends: ProxyProcess, backends: Backends, delta: DeltaBackend, new_user: NewUser
) -> None:
    """RFC 2920: the whole envelope in one write, the body and the rest in another; each command
    gets its own reply in order, whoever answers it (the proxy or Postfix)."""
    first, second = new_user(ALPHA), new_user(BETA)
    message = messages.compose("sender@example.net", first.address, "pipelined", "..\n.x\n")
    recipients = (first.address, delta.new_address(), second.address, "nobody@gamma.example")
    with clients.RawClient(two_backends.settings.ports.smtp) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        raw.send(b"EHLO client.example\r\n")
        assert b"250-PIPELINING" in smtp_reply(raw)
        raw.send(
            b"MAIL FROM:<sender@example.net>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % address.encode() for address in recipients)
            + b"DATA\r\n"
        )
        replies = [smtp_reply(raw)[:9] for _ in range(6)]
        assert replies == [b"250 2.1.0", b"250 2.1.5", b"452 4.5.3", b"250 2.1.5", b"550 5.7.1", b"354 End d"]
        raw.send(dot_stuffed(message) + b".\r\nRSET\r\nQUIT\r\n")
        assert smtp_reply(raw).startswith(b"250 2.0.0 Ok: queued")
        assert smtp_reply(raw).startswith(b"250 ")
        assert smtp_reply(raw).startswith(b"221 ")
        assert raw.until_closed() == b""
    for user in (first, second):
        (delivered,) = backends.wait_delivered(user.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


def test_a_big_message_passes_the_mediation_intact(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    """Megabytes of body, with dot-stuffed lines and lines longer than a read, byte-identical."""
    user = new_user(BETA)
    line = "." + "0123456789abcdef" * 5 + "\n"
    long_line = "x" * 70_000 + "\n"
    body = (line * 100 + long_line) * (BIG_MESSAGE_BYTES // (len(line) * 100 + len(long_line)) + 1)
    message = messages.compose("sender@example.net", user.address, "big", body)
    assert len(message) > BIG_MESSAGE_BYTES
    with clients.smtp(proxy.settings.ports.smtp) as smtp:
        assert smtp.sendmail("sender@example.net", [user.address], message) == {}
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


def test_what_the_backend_must_never_hear_is_answered_by_the_proxy(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    """After the backend login: XCLIENT (Postfix trusts the proxy with it), STARTTLS and EHLO get
    the proxy's answers and the session goes on; BDAT (no CHUNKING advertised) ends it, as
    Postfix without CHUNKING does, before its chunk could be read as commands."""
    user = new_user(ALPHA)
    with clients.RawClient(proxy.settings.ports.smtp) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        for command, reply in [
            (b"EHLO client.example", b"250-mailgress.test"),
            (b"MAIL FROM:<sender@example.net>", b"250 "),
            (b"RCPT TO:<%s>" % user.address.encode(), b"250 "),
            (b"XCLIENT ADDR=192.0.2.1", b"500 5.5.2"),
            (b"STARTTLS", b"454 4.7.0"),
            (b"EHLO again.example", b"250-mailgress.test"),
            (b"RCPT TO:<%s>" % user.address.encode(), b"503 "),  # EHLO ended the transaction
            (b"BDAT 10 LAST\r\nQUIT", b"521 5.5.1"),
        ]:
            raw.send(command + b"\r\n")
            got = smtp_reply(raw)
            assert got.startswith(reply), (command, got)
            assert b"XCLIENT" not in got and b"CHUNKING" not in got
        assert raw.until_closed() == b""


# SMTP smuggling (CVE-2023-51764 class): a dot line with a bare LF ends DATA at the testbed's
# Postfix 3.7 (smtpd_forbid_bare_newline = no). The proxy sends every body line end as CRLF, so
# such a line ends the body for both, and what follows is the proxy's to read as commands.
SMUGGLING_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n"]


@pytest.mark.parametrize("terminator", SMUGGLING_ENDS, ids=repr)
def test_a_bare_lf_dot_line_ends_the_body_and_what_follows_is_mediated(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, terminator: bytes
) -> None:
    """The review's repro: a forged XCLIENT and a second message behind a bare-LF dot line. The
    XCLIENT gets the proxy's 500, the second message is an ordinary transaction of the session
    (its Received header names the real client, no forged address or name)."""
    first, second = new_user(ALPHA), new_user(BETA)
    marker = secrets.token_hex(6).encode()
    with clients.RawClient(proxy.settings.ports.smtp) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        for command in (
            b"EHLO client.example",
            b"MAIL FROM:<s@example.net>",
            b"RCPT TO:<%s>" % first.address.encode(),
        ):
            raw.send(command + b"\r\n")
            assert smtp_reply(raw).startswith(b"250"), command
        raw.send(b"DATA\r\n")
        assert smtp_reply(raw).startswith(b"354 ")
        raw.send(
            b"Subject: cover\r\n\r\ncover text" + terminator
            + b"XCLIENT ADDR=203.0.113.66 NAME=forged.example\r\nEHLO forged.example\r\n"
            + b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<%s>\r\nDATA\r\n" % second.address.encode()
            + b"Subject: second " + marker + b"\r\n\r\nsecond body\r\n.\r\nQUIT\r\n"
        )  # fmt: skip
        replies = [smtp_reply(raw)[:9] for _ in range(8)]
        assert replies == [
            b"250 2.0.0", b"500 5.5.2", b"250-mailg", b"250 2.1.0", b"250 2.1.5", b"354 End d", b"250 2.0.0",
            b"221 2.0.0",
        ]  # fmt: skip
        assert raw.until_closed() == b""
    (cover,) = backends.wait_delivered(first.address, 1)
    assert mailservers.strip_delivery_headers(cover) == b"Subject: cover\n\ncover text\n"
    (smuggled,) = backends.wait_delivered(second.address, 1)
    assert mailservers.strip_delivery_headers(smuggled) == b"Subject: second " + marker + b"\n\nsecond body\n"
    assert b"203.0.113.66" not in smuggled and b"forged" not in smuggled


# Line ends Postfix reads otherwise than RFC 5321 says: CR CR LF (a message converted to CRLF
# twice) is one line end, a bare CR a space (Postfix 3.7 stores them so received directly).
ODD_LINE_ENDS = {
    "cr-cr-lf": b"Subject: crcrlf\r\r\nFrom: a@sender.example\r\r\n\r\r\nbody line\r\r\n",
    "bare-cr": b"Subject: t\r\n\r\nbare\rcr\r\ncrcrlf\r\r\nend\r\r\r\n",
}


def delivered_through(port: int, recipient: str, body: bytes) -> None:
    with clients.RawClient(port) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        for command in (
            b"EHLO client.example",
            b"MAIL FROM:<s@example.net>",
            b"RCPT TO:<%s>" % recipient.encode(),
        ):
            raw.send(command + b"\r\n")
            assert smtp_reply(raw).startswith(b"250"), command
        raw.send(b"DATA\r\n")
        assert smtp_reply(raw).startswith(b"354 ")
        raw.send(body + b".\r\nQUIT\r\n")
        assert smtp_reply(raw).startswith(b"250 ")
        assert smtp_reply(raw).startswith(b"221 ")


@pytest.mark.parametrize("body", list(ODD_LINE_ENDS.values()), ids=list(ODD_LINE_ENDS))
def test_odd_line_ends_are_stored_as_postfix_stores_them_directly(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, body: bytes
) -> None:
    """The header section stays whole (CR CR LF split it: From became body), and no line is
    gained or lost: the same bytes arrive through the proxy as sent to Postfix directly."""
    via, direct = new_user(ALPHA), new_user(ALPHA)
    delivered_through(proxy.settings.ports.smtp, via.address, body)
    delivered_through(backends.postfix.smtp_port, direct.address, body)
    (through_proxy,) = backends.wait_delivered(via.address, 1)
    (straight,) = backends.wait_delivered(direct.address, 1)
    stored = mailservers.strip_delivery_headers(through_proxy)
    assert stored == mailservers.strip_delivery_headers(straight)
    assert b"\r" not in stored and stored.count(b"\n") == body.count(b"\n")


def test_a_client_that_leaves_behind_data_and_half_a_body_is_closed_at_the_354(
    proxy: ProxyProcess, new_user: NewUser
) -> None:
    """Review H's repro: DATA and part of a body, then the client shuts its sending side before
    the 354. The body can never end: the proxy answers the 354 and closes (it held the session
    and its backend connection until Postfix timed out, 300 s)."""
    user = new_user(ALPHA)
    address = (LOOPBACK, proxy.settings.ports.smtp)
    with socket.create_connection(address, timeout=clients.SOCKET_TIMEOUT) as client:
        replies = client.makefile("rb")
        assert replies.readline(SMTP_LINE).startswith(b"220 ")
        for command in (
            b"HELO client.example",
            b"MAIL FROM:<s@example.net>",
            b"RCPT TO:<%s>" % user.address.encode(),
        ):
            client.sendall(command + b"\r\n")
            assert replies.readline(SMTP_LINE).startswith(b"250 "), command
        client.sendall(b"DATA\r\nSubject: cut\r\n\r\npartial")
        client.shutdown(socket.SHUT_WR)
        rest = replies.read(SMTP_LINE)  # to the proxy's close, or the socket's timeout
        assert rest.startswith(b"354 ") and rest.count(b"\n") == 1, rest


OMEGA = "omega.example"


@dataclass
class TrustingBackend:
    """A Postfix that relays for a network it trusts (mynetworks), as many do; it owns omega.example."""

    postfix: mailservers.Postfix
    address: str  # its one mailbox


@pytest.fixture(scope="module")
def trusting() -> Iterator[TrustingBackend]:
    directory = make_testbed_directory("mailgress-omega-")
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[OMEGA],
        extra_main_cf={
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # The proxy and the test client are 127.0.0.1, which it does not trust.
            "mynetworks": "127.0.0.99/32",
            # Mail it would relay never leaves the machine: discarded, and logged.
            "default_transport": "discard:never-sent",
            "relay_transport": "discard:never-sent",
        },
    )
    with running_postfix(postfix, directory, "trusting"):
        address = f"u-{secrets.token_hex(4)}@{OMEGA}"
        owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
        postfix.add_mailbox(address, mailservers.Maildir(directory / address, owner))
        yield TrustingBackend(postfix, address)


def test_a_smuggled_xclient_never_makes_a_trusting_backend_an_open_relay(
    start_proxy: StartProxy, backends: Backends, trusting: TrustingBackend
) -> None:
    """The review's second repro: behind a bare-LF dot line, XCLIENT naming a trusted address,
    then an outside recipient. The proxy answers both (500, 550 5.7.1), and the trusting Postfix
    hears of neither: its log of the session shows no outside recipient and no such client."""
    services = backends.services()
    services[f"{NAMESPACE}/omega"] = {"25": [f"{LOOPBACK}:{trusting.postfix.smtp_port}"]}
    route = proxysettings.mailroute("omega", [OMEGA], namespace=NAMESPACE, smtp=("omega", 25))
    route["spec"]["smtp"]["clientInfo"] = "xclient"
    proxy = start_proxy("omega", services=services, routes=[*backends.mailroutes(), route])
    with clients.RawClient(proxy.settings.ports.smtp) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        for command in (
            b"EHLO client.example",
            b"MAIL FROM:<s@example.net>",
            b"RCPT TO:<%s>" % trusting.address.encode(),
        ):
            raw.send(command + b"\r\n")
            assert smtp_reply(raw).startswith(b"250"), command
        raw.send(b"DATA\r\n")
        assert smtp_reply(raw).startswith(b"354 ")
        raw.send(
            b"Subject: cover\r\n\r\ncover\n.\nXCLIENT ADDR=127.0.0.99\r\nEHLO localhost\r\n"
            b"MAIL FROM:<spam@example.org>\r\nRCPT TO:<victim@outside.example>\r\nQUIT\r\n"
        )
        replies = [smtp_reply(raw)[:9] for _ in range(6)]
        assert replies == [b"250 2.0.0", b"500 5.5.2", b"250-mailg", b"250 2.1.0", b"550 5.7.1", b"221 2.0.0"]
        assert raw.until_closed() == b""
    (cover,) = trusting.postfix.wait_delivered(trusting.address, 1)
    assert mailservers.strip_delivery_headers(cover) == b"Subject: cover\n\ncover\n"
    # The session's last log line (its command counts) comes after all it did.
    trusting.postfix.wait_log("quit=1")
    log = trusting.postfix.log_text()
    assert "outside.example" not in log and "127.0.0.99" not in log and "xclient=2" not in log


def transaction_replies(port: int, recipients: list[bytes]) -> list[bytes]:
    """The reply codes to each RCPT, then to DATA and the body (when DATA got 354)."""
    with clients.RawClient(port) as raw:
        assert smtp_reply(raw).startswith(b"220 ")
        raw.send(b"EHLO client.example\r\n")
        assert smtp_reply(raw).startswith(b"250")
        raw.send(b"MAIL FROM:<sender@example.net>\r\n")
        assert smtp_reply(raw).startswith(b"250")
        replies = []
        for recipient in recipients:
            raw.send(b"RCPT TO:<" + recipient + b">\r\n")
            replies.append(smtp_reply(raw))
        raw.send(b"DATA\r\n")
        replies.append(smtp_reply(raw))
        if replies[-1].startswith(b"354"):
            raw.send(b"Subject: long refusal\r\n\r\nhello\r\n.\r\n")
            replies.append(smtp_reply(raw))
    return replies


@pytest.mark.parametrize("long_first", [False, True], ids=["after-the-login", "at-the-login"])
def test_a_refusal_quoting_a_long_recipient_is_passed_on(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, long_first: bool
) -> None:
    """Postfix's 550 echoes the recipient: for a long unknown local part the reply line is longer
    than 512 octets. It is the client's answer, before the backend login (not 451) and after it
    (not 421 and a lost transaction): the valid recipient's mail is delivered."""
    user = new_user(ALPHA)
    unknown = b"n" * 1500 + b"@" + ALPHA.encode()
    recipients = [unknown, user.address.encode()] if long_first else [user.address.encode(), unknown]
    replies = transaction_replies(proxy.settings.ports.smtp, recipients)
    refusal = replies[0] if long_first else replies[1]
    assert refusal.startswith(b"550 5.1.1 <" + unknown + b">") and len(refusal) > 512
    codes = [b"550", b"250"] if long_first else [b"250", b"550"]
    assert [reply[:3] for reply in replies] == [*codes, b"354", b"250"]
    backends.wait_delivered(user.address, 1)
