"""SMTP through mailgress to the real Postfix: submission with AUTH, and the inbound MX.

Proves: AUTH PLAIN and LOGIN (smtplib, swaks) submit mail that arrives byte-identical, AUTH PLAIN
also with a Latin-1 password (8-bit octets that are no UTF-8, checked by Dovecot's SASL); 100
messages submitted in parallel sessions all arrive intact; inbound mail for a routed domain is
delivered and for an unrouted one refused with 550, also from an SRS sender or with dots where
RFC 5321 puts none and to a local part over 64 octets (Postfix takes them, so the proxy must);
MAIL parameters of extensions not advertised get 555 as from Postfix; wrong passwords and
unrouted logins get 535; over-long lines get 500 and the session goes on until max_errors,
garbage and a stalled client get SMTP's answer or a timely close while the proxy keeps serving
everyone else.
"""

import secrets
import smtplib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed import clients, mailservers, messages
from testbed.backends import ALPHA, BETA, UNROUTED_DOMAIN, Backends
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import latin1_user, octets_in_log, sasl_plain, serves_imap

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


def submit(port: int, user: User, mechanism: str, recipient: str, message: bytes) -> None:
    with clients.smtp(port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user.address, user.password
        smtp.auth(
            mechanism, getattr(smtp, f"auth_{mechanism.lower()}"), initial_response_ok=mechanism == "PLAIN"
        )
        smtp.sendmail(user.address, [recipient], message)


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
    [("alice@alpha.example", "not-the-password"), (f"alice@{UNROUTED_DOMAIN}", None)],
    ids=["wrong-password", "unrouted-domain"],
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
    assert refused.value.smtp_code == 535
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
