"""nginx's mail module and mailgress behind the same auth_http service, driven by the same clients.

Each test runs one imaplib, poplib or smtplib script (raw lines for a password that is octets)
against nginx and then against mailgress, and compares what the client saw and the requests the
auth service received, header for header (names, order and values). Covered: success (IMAP,
POP3, submission, an MX with Auth-Method none, also from an SRS sender to a local part over 64
octets, which neither nginx nor Postfix refuses), a Latin-1 password (8-bit octets that are no
UTF-8: Auth-Pass carries them unescaped, the grant's Auth-Pass brings them back, Dovecot gets
them as they were), a refused password, Auth-Wait then a retry on the same connection, an auth
service that picks another server and other credentials, an auth service that is down, slow or
answers garbage, Auth-Error-Code for an MX, and the Auth-SSL headers after STARTTLS.

Where mailgress differs on purpose, the test asserts each side's behaviour and says why:
- A refusal without Auth-Wait: nginx closes the connection; mailgress keeps it open so the
  client may retry (its failed-login throttle bounds guessing; as in nginx, refusals do not
  count towards max_errors, only invalid commands do), as IMAP, POP3 and SMTP clients expect
  after a failed login.
- A failing auth service: nginx answers with its internal error and closes; mailgress answers
  with the protocol's temporary failure (IMAP [UNAVAILABLE] from RFC 5530, POP3 [SYS/TEMP] from
  RFC 3206, SMTP 454 4.7.0 from RFC 4954) and stays open.
- ``Auth-Status: OK`` without Auth-Server and Auth-Port: nginx fails with its internal error;
  mailgress logs in on the route's own endpoints (the auth service says who, the table where).
- Replies that are the proxy's own words differ in text, so only their codes are compared:
  SMTP AUTH success (nginx makes up "235 2.0.0 OK", mailgress passes Postfix's own 235 on),
  MAIL FROM on the MX, and the queue id in the DATA reply.
Passwords never appear in an assertion's expression: failures cannot print one.
"""

import base64
import dataclasses
import hashlib
import imaplib
import poplib
import secrets
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from testbed import authservice, clients, messages
from testbed.backends import ALPHA, BETA, Backends
from testbed.clients import SOCKET_TIMEOUT
from testbed.mailservers import LOOPBACK, User
from tests.differential.conftest import AUTH_TIMEOUT, Both, Run, Target
from tests.e2e.helpers import latin1_user, sasl_plain

PROTOCOLS = ["imap", "pop3", "submission"]
CLIENT_NAME = "client.example"  # the EHLO name both proxies see (Auth-SMTP-Helo)
SENDER = "sender@example.net"


@dataclass(frozen=True, slots=True)
class Seen:
    """One step as the client saw it: ``result`` is ok, no (with the server's text) or closed."""

    step: str
    result: str
    text: str = ""


Login = tuple[str, str]
Script = Callable[[Target], list["Seen"]]
NewUser = Callable[..., User]
Answerer = Callable[[authservice.Answer], None]


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Client scripts: the same for both proxies


def imap_script(port: int, logins: list[Login], *, tls: ssl.SSLContext | None = None) -> list[Seen]:
    """Try each login until one works (then SELECT), else see whether the connection is open."""
    seen: list[Seen] = []
    client = imaplib.IMAP4(LOOPBACK, port, timeout=SOCKET_TIMEOUT)
    try:
        if tls is not None:
            typ, _ = client.starttls(tls)
            seen.append(Seen("starttls", typ.lower()))
        for user, password in logins:
            try:
                typ, data = client.login(user, password)
            except client.abort:
                seen.append(Seen("login", "closed"))
                return seen
            except client.error as refusal:
                seen.append(Seen("login", "no", _text(refusal.args[0])))
                continue
            # The backend's own reply, passed on verbatim by both proxies.
            seen.append(Seen("login", typ.lower(), _text(data[-1])))
            seen.append(Seen("select", client.select("INBOX", readonly=True)[0].lower()))
            return seen
        try:
            seen.append(Seen("noop", client.noop()[0].lower()))
        except (client.abort, OSError):
            seen.append(Seen("noop", "closed"))
        return seen
    finally:
        client.shutdown()


def pop3_script(port: int, logins: list[Login]) -> list[Seen]:
    seen: list[Seen] = []
    client = poplib.POP3(LOOPBACK, port, timeout=SOCKET_TIMEOUT)
    try:
        for user, password in logins:
            try:
                client.user(user)
                reply = client.pass_(password)
            except poplib.error_proto as refusal:
                text = _text(refusal.args[0])
                if text == "-ERR EOF":  # poplib's word for a closed connection
                    seen.append(Seen("login", "closed"))
                    return seen
                seen.append(Seen("login", "no", text.removeprefix("-ERR ")))
                continue
            seen.append(Seen("login", "ok", _text(reply)))
            seen.append(Seen("stat", "ok" if client.stat()[0] >= 0 else "no"))
            return seen
        try:
            client.noop()
            seen.append(Seen("noop", "ok"))
        except (poplib.error_proto, OSError):
            seen.append(Seen("noop", "closed"))
        return seen
    finally:
        client.close()


def submission_script(port: int, logins: list[Login], recipient: str) -> list[Seen]:
    """AUTH PLAIN (one mechanism, so one auth request per attempt), then send to ``recipient``."""
    seen: list[Seen] = []
    client = smtplib.SMTP(LOOPBACK, port, timeout=SOCKET_TIMEOUT, local_hostname=CLIENT_NAME)
    try:
        client.ehlo()
        for user, password in logins:
            client.user, client.password = user, password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as refusal:
                seen.append(Seen("login", "no", f"{refusal.smtp_code} {_text(refusal.smtp_error)}"))
                continue
            except (smtplib.SMTPServerDisconnected, OSError):
                seen.append(Seen("login", "closed"))
                return seen
            # The text is the proxy's own (see the module docstring): the code only.
            seen.append(Seen("login", "ok" if code == 235 else "no", str(code)))
            message = messages.compose(SENDER, recipient, "differential", identifier=messages.message_id())
            client.sendmail(SENDER, [recipient], message)
            seen.append(Seen("send", "ok"))
            return seen
        try:
            seen.append(Seen("noop", "ok" if client.noop()[0] == 250 else "no"))
        except (smtplib.SMTPServerDisconnected, OSError):
            seen.append(Seen("noop", "closed"))
        return seen
    finally:
        client.close()


def mx_script(port: int, recipient: str, sender: str = SENDER) -> list[Seen]:
    """Inbound mail: MAIL FROM, RCPT TO (where both proxies ask auth_http), DATA."""
    seen: list[Seen] = []
    client = smtplib.SMTP(LOOPBACK, port, timeout=SOCKET_TIMEOUT, local_hostname=CLIENT_NAME)
    try:
        client.ehlo()
        code, _ = client.mail(sender)
        seen.append(Seen("mail", str(code)))  # the proxies' own texts: the code only
        try:
            code, reply = client.rcpt(recipient)
        except smtplib.SMTPServerDisconnected:
            seen.append(Seen("rcpt", "closed"))
            return seen
        seen.append(Seen("rcpt", "ok" if code == 250 else "no", f"{code} {_text(reply)}"))
        if code != 250:
            try:
                seen.append(Seen("noop", "ok" if client.noop()[0] == 250 else "no"))
            except (smtplib.SMTPServerDisconnected, OSError):
                seen.append(Seen("noop", "closed"))
            return seen
        code, _ = client.data(
            messages.compose(sender, recipient, "inbound", identifier=messages.message_id())
        )
        seen.append(Seen("data", str(code)))  # Postfix's queue id differs: the code only
        return seen
    finally:
        client.close()


def octets_script(protocol: str, user: User, recipient: str) -> Script:
    """Log in with ``user``'s password octets as they are (imaplib, poplib and smtplib would
    encode a password as ASCII or UTF-8), then use the session."""

    def script(target: Target) -> list[Seen]:
        port = target.ports[protocol]
        if protocol == "submission":
            with clients.smtp(port) as smtp:
                smtp.ehlo(CLIENT_NAME)
                code, _ = smtp.docmd("AUTH", "PLAIN " + sasl_plain(user.address, user.octets).decode())
                smtp.sendmail(SENDER, [recipient], messages.compose(SENDER, recipient, "latin-1"))
            # The text is the proxy's own (see the module docstring): the code only.
            return [Seen("login", "ok" if code == 235 else "no", str(code)), Seen("send", "ok")]
        with clients.RawClient(port) as raw:
            raw.line()  # the greetings differ
            if protocol == "imap":
                address = clients.imap_quoted(user.address).encode()
                raw.command(b"a1 LOGIN %b {%d}" % (address, len(user.octets)), b"+")
                login, after = raw.command(user.octets, b"a1 "), raw.command(b"a2 SELECT INBOX", b"a2 ")
                ok = login.startswith(b"a1 OK"), after.startswith(b"a2 OK")
            else:
                raw.command(b"USER " + user.address.encode(), b"")
                login, after = raw.command(b"PASS " + user.octets, b""), raw.command(b"STAT", b"")
                ok = login.startswith(b"+OK"), after.startswith(b"+OK")
        # The login reply is the backend's own line, passed on by both proxies.
        results = ["ok" if each else "no" for each in ok]
        return [Seen("login", results[0], _text(login)), Seen("use", results[1])]

    return script


def login_script(protocol: str, logins: list[Login], recipient: str = "") -> Script:
    def script(target: Target) -> list[Seen]:
        port = target.ports[protocol]
        if protocol == "imap":
            return imap_script(port, logins)
        if protocol == "pop3":
            return pop3_script(port, logins)
        return submission_script(port, logins, recipient)

    return script


def same_requests(nginx: Run, mailgress: Run) -> None:
    """Header for header; Auth-Pass is compared by digest, so a failure never prints a password."""
    assert len(nginx.requests) == len(mailgress.requests)
    for sent_by_nginx, sent_by_mailgress in zip(nginx.headers, mailgress.headers, strict=True):
        assert _redacted(sent_by_mailgress) == _redacted(sent_by_nginx)
        assert _password_digests(sent_by_mailgress) == _password_digests(sent_by_nginx)


def _password_digests(headers: tuple[tuple[str, str], ...]) -> list[str]:
    return [hashlib.sha256(value.encode()).hexdigest() for name, value in headers if name == "Auth-Pass"]


def _redacted(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(name, "<redacted>" if name == "Auth-Pass" else value) for name, value in headers]


def auth_protocol(protocol: str) -> str:
    return "smtp" if protocol == "submission" else protocol


# ---------------------------------------------------------------------------------------------
# Success


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_good_password_logs_in_the_same_way(
    both: Both, backends: Backends, new_user: NewUser, protocol: str
) -> None:
    user = new_user(ALPHA)
    nginx, mailgress = both(login_script(protocol, [(user.address, user.password)], recipient=user.address))
    assert mailgress.seen == nginx.seen
    assert nginx.seen[0].result == "ok"
    same_requests(nginx, mailgress)
    (request,) = mailgress.requests
    assert request.header("Auth-Protocol") == auth_protocol(protocol)
    assert (request.header("Auth-Method"), request.attempt, request.header("Client-IP")) == (
        "plain",
        1,
        LOOPBACK,
    )
    if protocol == "submission":
        assert len(backends.wait_delivered(user.address, 2)) == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_latin1_password_logs_in_the_same_way(both: Both, backends: Backends, protocol: str) -> None:
    user = latin1_user(backends, f"latin1-differential-{protocol}", ALPHA)
    nginx, mailgress = both(octets_script(protocol, user, user.address))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen] == ["ok", "ok"]
    same_requests(nginx, mailgress)  # Auth-Pass byte for byte, by digest
    (request,) = mailgress.requests
    # nginx escapes only space, "%" and C0: the Latin-1 octets go raw (never shown on failure).
    carried_raw = b"\r\nAuth-Pass: " + user.octets + b"\r\n" in request.head
    assert carried_raw
    if protocol != "submission":
        backends.alpha.wait_logins(user.address, 2, protocol)


def test_inbound_mail_is_routed_at_rcpt_the_same_way(
    both: Both, backends: Backends, new_user: NewUser
) -> None:
    user = new_user(BETA)
    nginx, mailgress = both(lambda target: mx_script(target.ports["mx"], user.address))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen[1:]] == ["ok", "250"]
    same_requests(nginx, mailgress)
    (request,) = mailgress.requests
    assert request.header("Auth-Method") == "none"
    assert request.header("Auth-SMTP-Helo") == CLIENT_NAME
    assert request.header("Auth-SMTP-From") == f"mail FROM:<{SENDER}>"
    assert request.header("Auth-SMTP-To") == f"rcpt TO:<{user.address}>"
    assert len(backends.wait_delivered(user.address, 2)) == 2


def test_long_envelope_addresses_are_routed_the_same_way(both: Both, backends: Backends) -> None:
    """An SRS sender (a 79-octet local part) to a 74-octet local part: RFC 5321's 64 octets is a
    minimum, nginx checks neither address and Postfix takes both."""
    sender = "SRS0=HHH6=TT=sub.originaldomain.example=first.last.very.long.name@forwarder.example"
    user = backends.add_user(f"first.last+{'newsletter-' * 5}{secrets.token_hex(4)}@{BETA}")
    nginx, mailgress = both(lambda target: mx_script(target.ports["mx"], user.address, sender))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen[1:]] == ["ok", "250"]
    same_requests(nginx, mailgress)
    (request,) = mailgress.requests
    assert request.header("Auth-SMTP-From") == f"mail FROM:<{sender}>"
    assert len(backends.wait_delivered(user.address, 2)) == 2


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        ("MAIL  FROM:<{sender}>", "RCPT   TO:<{recipient}>"),
        ("MAIL FROM: <{sender}>  BODY=8BITMIME", "RCPT  TO: <{recipient}>  "),
    ],
    ids=["two-and-three-spaces", "spaces-around-the-path"],
)
def test_runs_of_spaces_in_the_envelope_are_routed_the_same_way(
    both: Both, backends: Backends, new_user: NewUser, mail: str, rcpt: str
) -> None:
    """Postfix and nginx take runs of spaces after MAIL and RCPT (review J2: mailgress said 501);
    Auth-SMTP-From and -To carry the lines as typed."""
    user = new_user(BETA)

    def script(target: Target) -> list[Seen]:
        with clients.RawClient(target.ports["mx"]) as raw:
            raw.line()  # the greetings differ
            raw.command(f"EHLO {CLIENT_NAME}".encode(), b"250 ")
            sender_reply = raw.command(mail.format(sender=SENDER).encode(), b"")
            recipient_reply = raw.command(rcpt.format(recipient=user.address).encode(), b"")
            raw.command(b"QUIT", b"")
        # The proxies' own texts for MAIL: the code only; the RCPT reply is Postfix's.
        return [Seen("mail", _text(sender_reply[:3])), Seen("rcpt", _text(recipient_reply[:3]))]

    nginx, mailgress = both(script)
    assert mailgress.seen == nginx.seen == [Seen("mail", "250"), Seen("rcpt", "250")]
    same_requests(nginx, mailgress)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_password_gets_the_services_text(both: Both, backends: Backends, protocol: str) -> None:
    anna = backends.user("anna@alpha.example")
    nginx, mailgress = both(
        login_script(protocol, [(anna.address, "not-her-password")], recipient=anna.address)
    )
    refusal = {
        "imap": "Invalid login or password",
        "pop3": "Invalid login or password",
        "submission": "535 5.7.0 Invalid login or password",
    }[protocol]
    # Deliberate difference: nginx closes after a refusal without Auth-Wait, mailgress lets the
    # client try again on the same connection.
    assert nginx.seen == [Seen("login", "no", refusal), Seen("noop", "closed")]
    assert mailgress.seen == [Seen("login", "no", refusal), Seen("noop", "ok")]
    same_requests(nginx, mailgress)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_auth_wait_then_a_retry_on_the_same_connection(
    both: Both, backends: Backends, answer: Answerer, protocol: str
) -> None:
    bea = backends.user("bea@beta.example")
    testbed_answer = authservice.for_backends(backends)
    answer(
        lambda received: (
            authservice.refuse("Too fast, wait", wait=1)
            if received.attempt == 1
            else testbed_answer(received)
        )
    )
    logins = [(bea.address, bea.password), (bea.address, bea.password)]
    nginx, mailgress = both(login_script(protocol, logins, recipient=bea.address))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen[:2]] == ["no", "ok"]
    assert "Too fast, wait" in nginx.seen[0].text
    same_requests(nginx, mailgress)
    assert [request.attempt for request in mailgress.requests] == [1, 2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_refusals_do_not_count_towards_max_errors(
    both: Both, backends: Backends, new_user: NewUser, answer: Answerer, protocol: str
) -> None:
    """Six refusals with Auth-Wait (one more than the default max_errors), then the right
    password: nginx counts only invalid commands, and so does mailgress."""
    user = new_user(ALPHA)
    refusal = authservice.refuse("Invalid login or password", wait=1)
    answer(authservice.for_backends(backends, failure=refusal))
    logins = [(user.address, "not-the-password")] * 6 + [(user.address, user.password)]
    nginx, mailgress = both(login_script(protocol, logins, recipient=user.address))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen[:7]] == ["no"] * 6 + ["ok"]
    same_requests(nginx, mailgress)


def test_an_authorization_identity_of_another_user_is_refused(
    both: Both, backends: Backends, new_user: NewUser, answer: Answerer
) -> None:
    me, victim = new_user(ALPHA), new_user(ALPHA)
    answer(authservice.for_backends(backends))
    response = base64.b64encode(b"%b\0%b\0%b" % (victim.address.encode(), me.address.encode(), me.octets))

    def script(target: Target) -> list[Seen]:
        with clients.smtp(target.ports["submission"]) as smtp:
            smtp.ehlo(CLIENT_NAME)
            code, text = smtp.docmd("AUTH", "PLAIN " + response.decode())
            seen = [Seen("login", str(code), _text(text) if code != 235 else "")]
            if code == 235:
                seen.append(Seen("mail", str(smtp.mail(victim.address)[0])))
        return seen

    nginx, mailgress = both(script)
    # Deliberate difference (proxy.protocols.sasl): nginx drops the authzid and logs in as the
    # user, whom alone the auth service was asked about; mailgress refuses, the service unasked.
    assert nginx.seen == [Seen("login", "235"), Seen("mail", "250")]
    assert [request.header("Auth-User") for request in nginx.requests] == [me.address]
    assert mailgress.seen == [Seen("login", "535", "5.7.8 Authorization identity must be the user name")]
    assert mailgress.requests == []


def test_an_mx_refusal_carries_auth_error_code(both: Both, answer: Answerer) -> None:
    answer(lambda received: authservice.refuse("Recipient unknown", error_code="550 5.1.1"))
    nginx, mailgress = both(lambda target: mx_script(target.ports["mx"], f"nobody@{ALPHA}"))
    refused = [Seen("mail", "250"), Seen("rcpt", "no", "550 5.1.1 Recipient unknown")]
    # Deliberate difference (as for logins): nginx closes, mailgress lets the client go on
    # with another recipient.
    assert nginx.seen == [*refused, Seen("noop", "closed")]
    assert mailgress.seen == [*refused, Seen("noop", "ok")]
    same_requests(nginx, mailgress)


def test_the_service_names_another_server_and_other_credentials(
    both: Both, backends: Backends, answer: Answerer, new_user: NewUser
) -> None:
    bob = backends.user("bob@beta.example")
    recipient = new_user(ALPHA)
    ports = {
        "imap": backends.beta.imap_port,
        "pop3": backends.beta.pop3_port,
        "smtp": backends.postfix.submission_port,
    }
    answer(
        lambda received: authservice.ok(
            LOOPBACK, ports[received.header("Auth-Protocol") or ""], user=bob.address, password=bob.password
        )
    )
    alias = "alias@alpha.example"  # routed to Dovecot alpha by mailgress's table; the reply wins
    for protocol, dovecot_protocol in (("imap", "imap"), ("pop3", "pop3"), ("submission", None)):
        before = [(login.user, login.protocol) for login in backends.beta.logins()].count(
            (bob.address, dovecot_protocol)
        )
        nginx, mailgress = both(login_script(protocol, [(alias, "any-token")], recipient=recipient.address))
        assert mailgress.seen == nginx.seen
        assert nginx.seen[0].result == "ok"
        same_requests(nginx, mailgress)
        if dovecot_protocol is not None:
            backends.beta.wait_logins(bob.address, before + 2, dovecot_protocol)
    assert not [login for login in backends.alpha.logins() if login.user == alias]
    assert len(backends.wait_delivered(recipient.address, 2)) == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_grant_without_auth_pass_logs_in_with_the_clients_password(
    both: Both, backends: Backends, answer: Answerer, protocol: str
) -> None:
    # nginx needs Auth-Pass only where it holds no password itself (APOP, CRAM-MD5).
    ben = backends.user("ben@beta.example")
    ports = {
        "imap": backends.beta.imap_port,
        "pop3": backends.beta.pop3_port,
        "smtp": backends.postfix.submission_port,
    }
    answer(lambda received: authservice.ok(LOOPBACK, ports[received.header("Auth-Protocol") or ""]))
    nginx, mailgress = both(login_script(protocol, [(ben.address, ben.password)], recipient=ben.address))
    assert mailgress.seen == nginx.seen
    assert nginx.seen[0].result == "ok"
    same_requests(nginx, mailgress)


# ---------------------------------------------------------------------------------------------
# A failing auth service


TEMPORARY = {
    "imap": Seen("login", "no", "[UNAVAILABLE] Service temporarily unavailable, try again later"),
    "pop3": Seen("login", "no", "[SYS/TEMP] Temporary authentication failure, try again later."),
    "submission": Seen("login", "no", "454 4.7.0 Temporary authentication failure"),
}
# nginx's internal error, then it closes: poplib and smtplib read the line, imaplib sees the close.
INTERNAL_ERROR = {
    "imap": [Seen("login", "closed")],
    "pop3": [Seen("login", "no", "internal server error"), Seen("noop", "closed")],
    "submission": [Seen("login", "no", "451 4.3.2 Internal server error"), Seen("noop", "closed")],
}


def expect_temporary_failure(protocol: str, nginx: Run, mailgress: Run) -> None:
    # Deliberate difference: see the module docstring (RFC 5530/3206/4954 temporary failures,
    # and the session stays open for a later retry).
    assert nginx.seen == INTERNAL_ERROR[protocol]
    assert mailgress.seen == [TEMPORARY[protocol], Seen("noop", "ok")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_auth_service_that_is_down(
    both: Both, backends: Backends, auth: authservice.AuthService, protocol: str
) -> None:
    anna = backends.user("anna@alpha.example")
    with auth.down():
        nginx, mailgress = both(
            login_script(protocol, [(anna.address, anna.password)], recipient=anna.address)
        )
    expect_temporary_failure(protocol, nginx, mailgress)
    assert nginx.requests == mailgress.requests == []


@pytest.mark.parametrize(
    "reply",
    [
        authservice.Reply(delay=AUTH_TIMEOUT * 5, headers=(("Auth-Status", "OK"),)),
        authservice.Reply(raw=b"HTTP/1.0 200 OK\r\nAuth_Status: OK\r\n\r\n"),
        authservice.Reply(close=True),
        # OK without a server: nginx's internal error; mailgress would use the route's own
        # endpoints, so here the server is there but is no IP address.
        authservice.Reply(
            headers=(("Auth-Status", "OK"), ("Auth-Server", "localhost"), ("Auth-Port", "143"))
        ),
    ],
    ids=["slow", "garbage", "closed", "server-name"],
)
def test_an_auth_service_that_fails(
    both: Both, backends: Backends, answer: Answerer, reply: authservice.Reply
) -> None:
    anna = backends.user("anna@alpha.example")
    answer(lambda received: reply)
    nginx, mailgress = both(login_script("imap", [(anna.address, anna.password)]))
    expect_temporary_failure("imap", nginx, mailgress)
    same_requests(nginx, mailgress)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("header", "rewrite"),
    [("Auth-Server", lambda value: "127.000.000.001"), ("Auth-Port", lambda value: "000" + value)],
    ids=["server-with-leading-zeros", "port-with-leading-zeros"],
)
def test_a_grant_with_leading_zeros_logs_in_the_same_way(
    both: Both,
    backends: Backends,
    answer: Answerer,
    new_user: NewUser,
    protocol: str,
    header: str,
    rewrite: Callable[[str], str],
) -> None:
    """ngx_inet_addr and ngx_atoi read decimal with leading zeros (review J2: mailgress answered
    with its temporary failure)."""
    user = new_user(ALPHA)
    testbed_answer = authservice.for_backends(backends)

    def reply(received: authservice.Received) -> authservice.Reply:
        granted = testbed_answer(received)
        rewritten = tuple(
            (name, rewrite(value) if name == header else value) for name, value in granted.headers
        )
        return dataclasses.replace(granted, headers=rewritten)

    answer(reply)
    nginx, mailgress = both(login_script(protocol, [(user.address, user.password)], recipient=user.address))
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen] == ["ok", "ok"]
    same_requests(nginx, mailgress)


def test_ok_without_a_server_uses_the_routes_endpoints(
    both: Both, backends: Backends, answer: Answerer
) -> None:
    alice = backends.user("alice@alpha.example")
    answer(lambda received: authservice.ok())
    nginx, mailgress = both(login_script("imap", [(alice.address, alice.password)]))
    # Deliberate difference (a mailgress extension): nginx cannot proceed without Auth-Server and
    # Auth-Port; mailgress lets the auth service decide who and the routing table decide where.
    assert nginx.seen == INTERNAL_ERROR["imap"]
    assert [step.result for step in mailgress.seen] == ["ok", "ok"]
    same_requests(nginx, mailgress)


# ---------------------------------------------------------------------------------------------
# TLS


def test_auth_ssl_headers_after_starttls(both: Both, backends: Backends, client_tls: ssl.SSLContext) -> None:
    alice = backends.user("alice@alpha.example")
    nginx, mailgress = both(
        lambda target: imap_script(target.ports["imap"], [(alice.address, alice.password)], tls=client_tls)
    )
    assert mailgress.seen == nginx.seen
    assert [step.result for step in nginx.seen] == ["ok", "ok", "ok"]
    same_requests(nginx, mailgress)
    (request,) = mailgress.requests
    assert request.header("Auth-SSL") == "on"
    assert (request.header("Auth-SSL-Protocol") or "").startswith("TLSv1.")
