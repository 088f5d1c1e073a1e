"""Submission through mailgress to Postfixes that trust the proxy with XCLIENT LOGIN.

nginx's defaults for SMTP (``xclient on; proxy_smtp_auth off``) log a user the auth_http service
accepted in with ``XCLIENT ... LOGIN=<user>`` and send no AUTH, whatever AUTH the Postfix offers
(review S2 #1, review T1 B1). Proves, behind an auth_http route:
- at a Postfix without SASL, the message arrives byte-identical and Postfix takes the login as the
  user the service granted (its log and the Received header say so, the name xtext-encoded on the
  way); a wrong password is the service's refusal;
- at a Postfix submission port with SASL (``smtpd_sasl_auth_enable = yes``, the testbed's Dovecot
  auth socket) that does not know the service's users, the login works all the same (AUTH PLAIN
  there was a 535 for a right password) and relays as its ``permit_sasl_authenticated`` lets a
  logged-in client: to its own mailboxes and to any other domain;
- a granted name Postfix would refuse as LOGIN (review T1 B2) is no failing endpoint: an empty one
  goes without LOGIN, as nginx sends it (Postfix then takes the session for any client's at its
  address: local mail yes, relaying no), one over 255 characters is the client's temporary failure.
Behind an ``auth: backend`` route the Postfix without SASL cannot check a password, so no login
gets in there, with a wrong password or the right one: the client hears the temporary failure and
MAIL is refused.
"""

import secrets
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import authservice, clients, mailservers, messages, proxysettings
from testbed.backends import ALPHA, BETA, NAMESPACE, Backends
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.conftest import running_postfix
from tests.conftest import testbed_directory as make_testbed_directory
from tests.e2e.helpers import StartProxy

# The trusting Postfix's own mail domain, and its Service in the proxy's settings.
TRUSTING = "trusting.example"
SERVICE = "trusting-postfix"
SERVICE_PORT = 25
# The name the auth service grants a renamed login: "+" and "=" are xtext-encoded in XCLIENT.
GRANTED_AS = f"granted+box=1@{ALPHA}"
# What the auth service grants as Auth-User, by the login's prefix (any other: none, the client's
# own name): a rename, an empty name, and one over Postfix's 255 characters for an XCLIENT value.
GRANTED_NAMES = {"rename": GRANTED_AS, "anon": "", "long": "x" * 242 + "@" + ALPHA}
# The SASL Postfix's own mail domain, and an outside one (Postfix relays there, nothing leaves).
SASL_DOMAIN = "sasl.example"
ELSEWHERE = "elsewhere.example"


@dataclass
class TrustingBackend:
    """A test's own Postfix, trusting 127.0.0.0/8 (the proxy) with XCLIENT, and its mail domain."""

    postfix: mailservers.Postfix
    directory: Path
    domain: str

    def new_address(self) -> str:
        address = f"r-{secrets.token_hex(4)}@{self.domain}"
        owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
        self.postfix.add_mailbox(address, mailservers.Maildir(self.directory / address, owner))
        return address


@pytest.fixture(scope="module")
def trusting() -> Iterator[TrustingBackend]:
    """A Postfix with no SASL at all."""
    directory = make_testbed_directory("mailgress-xclient-login-")
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[TRUSTING],
        # Received then names the login XCLIENT gave ("Authenticated sender: ...").
        extra_main_cf={"smtpd_sasl_authenticated_header": "yes"},
    )
    with running_postfix(postfix, directory, "trusting"):
        yield TrustingBackend(postfix, directory, TRUSTING)


@pytest.fixture(scope="module")
def with_sasl(backends: Backends) -> Iterator[TrustingBackend]:
    """A Postfix whose submission port has SASL (``smtpd_sasl_auth_enable = yes``, the testbed's
    Dovecot auth socket, so it offers AUTH PLAIN) and takes only logged-in clients
    (``smtpd_client_restrictions = permit_sasl_authenticated, reject``); they may relay anywhere
    (``permit_sasl_authenticated`` first in ``smtpd_relay_restrictions``). Its SASL knows the
    testbed's users, not the auth service's own (``service_accounts``)."""
    directory = make_testbed_directory("mailgress-xclient-sasl-")
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[SASL_DOMAIN],
        sasl_socket=backends.auth.auth_socket,
        extra_main_cf={
            "smtpd_sasl_authenticated_header": "yes",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            # What it relays is dropped here (the testbed's default, error:, refuses it at RCPT).
            "default_transport": "discard:relayed mail goes no further in this test",
        },
    )
    with running_postfix(postfix, directory, "SASL"):
        yield TrustingBackend(postfix, directory, SASL_DOMAIN)


@pytest.fixture(scope="module")
def service_accounts() -> dict[str, User]:
    """Users the auth service alone knows, by address (``service_account``)."""
    return {}


@pytest.fixture(scope="module")
def auth_service(
    backends: Backends,
    trusting: TrustingBackend,
    with_sasl: TrustingBackend,
    service_accounts: dict[str, User],
) -> Iterator[authservice.AuthService]:
    """A classic nginx auth service: checks the password of a testbed user or of one of its own,
    names the Postfix (with Auth-Pass, which nginx ignores for SMTP): the SASL one's submission port
    for a ``sasl-`` login, the trusting one for any other; grants ``GRANTED_NAMES`` by prefix."""

    def answer(received: authservice.Received) -> authservice.Reply:
        user = service_accounts.get(received.user.lower()) or backends.users.get(received.user.lower())
        if user is None or received.password != user.password:
            return authservice.refuse()
        prefix = user.address.partition("-")[0]
        postfix = with_sasl.postfix.submission_port if prefix == "sasl" else trusting.postfix.smtp_port
        return authservice.ok(LOOPBACK, postfix, user=GRANTED_NAMES.get(prefix), password=user.password)

    with authservice.AuthService(answer) as service:
        yield service


@pytest.fixture(scope="module")
def proxy(
    start_proxy: StartProxy,
    backends: Backends,
    trusting: TrustingBackend,
    auth_service: authservice.AuthService,
) -> ProxyProcess:
    """alpha.example's submission behind the auth service, beta.example's checked by the backend;
    both at the trusting Postfix with clientInfo xclient."""
    services = backends.services()
    services[f"{NAMESPACE}/{SERVICE}"] = {str(SERVICE_PORT): [f"{LOOPBACK}:{trusting.postfix.smtp_port}"]}
    routes = []
    for name, domain in (("granted", ALPHA), ("checked", BETA)):
        route = proxysettings.mailroute(
            name, [domain], namespace=NAMESPACE, submission=(SERVICE, SERVICE_PORT)
        )
        route["spec"]["submission"]["clientInfo"] = "xclient"
        if domain == ALPHA:
            route["spec"]["auth"] = {"mode": "http", "http": {"url": auth_service.url, "timeout": "5s"}}
        routes.append(route)
    return start_proxy("proxy-xclient-login", services=services, routes=routes)


def log_in(smtp: smtplib.SMTP, user: User, password: str) -> None:
    smtp.ehlo()
    smtp.user, smtp.password = user.address, password
    smtp.auth("PLAIN", smtp.auth_plain)


def service_account(accounts: dict[str, User], prefix: str) -> User:
    """A new user of alpha.example (the auth_http route) that only the auth service knows."""
    user = User(f"{prefix}-{secrets.token_hex(4)}@{ALPHA}", "pw-" + secrets.token_hex(8))
    accounts[user.address] = user
    return user


@pytest.mark.parametrize("renamed", [False, True], ids=["as-the-client", "as-the-service-grants"])
def test_a_login_the_auth_service_accepted_goes_in_with_xclient_login(
    proxy: ProxyProcess,
    backends: Backends,
    trusting: TrustingBackend,
    auth_service: authservice.AuthService,
    renamed: bool,
) -> None:
    user = backends.add_user(f"{'rename-' if renamed else 'plain-'}{secrets.token_hex(4)}@{ALPHA}")
    recipient = trusting.new_address()
    message = messages.compose(user.address, recipient, "xclient login", ".a dot\nand a line\n")
    auth_service.clear()
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        log_in(smtp, user, user.password)
        assert smtp.sendmail(user.address, [recipient], message) == {}
    assert [request.user for request in auth_service.requests] == [user.address]
    (delivered,) = trusting.postfix.wait_delivered(recipient, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    login = GRANTED_AS if renamed else user.address
    head = delivered.partition(b"\n\n")[0]
    assert f"(Authenticated sender: {login})".encode() in head
    trusting.postfix.wait_log(f"sasl_method=XCLIENT, sasl_username={login}")


def test_a_wrong_password_at_the_auth_http_route_is_the_services_refusal(
    proxy: ProxyProcess, backends: Backends, auth_service: authservice.AuthService
) -> None:
    user = backends.add_user(f"wrong-{secrets.token_hex(4)}@{ALPHA}")
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            log_in(smtp, user, "not-" + user.password)
        assert refused.value.smtp_code == 535
        assert smtp.mail(user.address)[0] == 530


@pytest.mark.parametrize("right_password", [False, True], ids=["wrong-password", "right-password"])
def test_an_auth_backend_route_never_logs_in_with_xclient_login(
    proxy: ProxyProcess, backends: Backends, trusting: TrustingBackend, right_password: bool
) -> None:
    """The backend's verdict is the authentication there, and this one has none to give: XCLIENT
    LOGIN would take any password, so the proxy sends none and the login fails for now."""
    user = backends.add_user(f"checked-{secrets.token_hex(4)}@{BETA}")
    password = user.password if right_password else "not-" + user.password
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            log_in(smtp, user, password)
        assert refused.value.smtp_code == 454
        assert smtp.mail(user.address)[0] == 530
    assert f"sasl_username={user.address}" not in trusting.postfix.log_text()


def test_the_sasl_postfix_does_not_know_the_services_users(
    with_sasl: TrustingBackend, service_accounts: dict[str, User]
) -> None:
    """The set-up of review T1 B1, checked without the proxy: AUTH PLAIN there is refused."""
    user = service_account(service_accounts, "direct")
    with clients.smtp(with_sasl.postfix.submission_port) as smtp:
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"].upper().split()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(user.address, user.password)
        assert refused.value.smtp_code == 535


def test_a_login_the_auth_service_accepted_goes_in_with_xclient_login_beside_auth_plain(
    proxy: ProxyProcess, with_sasl: TrustingBackend, service_accounts: dict[str, User]
) -> None:
    """Review T1 B1: the proxy sent AUTH PLAIN because the EHLO offered it, and the client heard
    535 for a right password. Now XCLIENT LOGIN: delivered intact, and relaying allowed."""
    user = service_account(service_accounts, "sasl")
    recipient = with_sasl.new_address()
    message = messages.compose(user.address, recipient, "xclient login beside sasl", ".a dot\nand a line\n")
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        log_in(smtp, user, user.password)
        # permit_sasl_authenticated: a logged-in client may relay, here to a discard transport.
        assert smtp.sendmail(user.address, [recipient, f"someone@{ELSEWHERE}"], message) == {}
    (delivered,) = with_sasl.postfix.wait_delivered(recipient, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    assert f"(Authenticated sender: {user.address})".encode() in delivered.partition(b"\n\n")[0]
    with_sasl.postfix.wait_log(f"sasl_method=XCLIENT, sasl_username={user.address}")


def test_an_empty_granted_name_goes_without_login_and_postfix_takes_a_stranger(
    proxy: ProxyProcess, trusting: TrustingBackend, service_accounts: dict[str, User]
) -> None:
    """Review T1 B2: Postfix refuses LOGIN= with an empty value (501), which the proxy took for
    XCLIENT not understood: a failing endpoint, and the client heard the temporary failure. As
    nginx, the proxy leaves LOGIN out: the client hears 235 (the service said OK), and Postfix,
    with no login for the session, treats it as any client at its address: mail for its own
    domain is taken, relaying is refused."""
    user = service_account(service_accounts, "anon")
    recipient = trusting.new_address()
    elsewhere = f"someone@{ELSEWHERE}"
    message = messages.compose(user.address, recipient, "xclient without login", "a line\n")
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        log_in(smtp, user, user.password)
        refused = smtp.sendmail(user.address, [recipient, elsewhere], message)
    assert list(refused) == [elsewhere]
    code, text = refused[elsewhere]
    assert code == 550 and b"Relay access denied" in text
    (delivered,) = trusting.postfix.wait_delivered(recipient, 1)
    assert b"Authenticated sender" not in delivered.partition(b"\n\n")[0]
    # Not read as "XCLIENT not understood" (an endpoint failure, with a warning blaming XCLIENT).
    assert "refused XCLIENT" not in proxy.log_text()


def test_a_granted_name_too_long_for_postfixs_login_is_a_temporary_failure(
    proxy: ProxyProcess, trusting: TrustingBackend, service_accounts: dict[str, User]
) -> None:
    """Review T1 B2: Postfix refuses a LOGIN value over 255 characters ("501 5.5.4 Error:
    attribute value too long"), which the proxy took for XCLIENT not understood and marked the
    endpoint failing. Now the proxy sends no XCLIENT LOGIN it cannot, and the client hears the
    temporary failure; the endpoint is not failing."""
    user = service_account(service_accounts, "long")
    with clients.smtp(proxy.settings.ports.submission) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            log_in(smtp, user, user.password)
        assert refused.value.smtp_code == 454
        assert smtp.mail(user.address)[0] == 530
    assert "refused XCLIENT" not in proxy.log_text()
