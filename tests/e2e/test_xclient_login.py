"""Submission through mailgress to a Postfix without SASL that trusts the proxy with XCLIENT.

nginx's defaults for SMTP (``xclient on; proxy_smtp_auth off``) log a user the auth_http service
accepted in at such a Postfix with ``XCLIENT ... LOGIN=<user>`` and send no AUTH (review S2 #1).
Proves: behind an auth_http route the proxy does the same, so the message arrives byte-identical
and Postfix takes the login as the user the service granted (its log and the Received header
say so, the name xtext-encoded on the way); a wrong password is the service's refusal. Behind an
``auth: backend`` route the same Postfix cannot check a password, so no login gets in there, with
a wrong password or the right one: the client hears the temporary failure and MAIL is refused.
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


@dataclass
class TrustingBackend:
    """A Postfix with no SASL at all, trusting 127.0.0.0/8 (the proxy) with XCLIENT."""

    postfix: mailservers.Postfix
    directory: Path

    def new_address(self) -> str:
        address = f"r-{secrets.token_hex(4)}@{TRUSTING}"
        owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
        self.postfix.add_mailbox(address, mailservers.Maildir(self.directory / address, owner))
        return address


@pytest.fixture(scope="module")
def trusting() -> Iterator[TrustingBackend]:
    directory = make_testbed_directory("mailgress-xclient-login-")
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[TRUSTING],
        # Received then names the login XCLIENT gave ("Authenticated sender: ...").
        extra_main_cf={"smtpd_sasl_authenticated_header": "yes"},
    )
    with running_postfix(postfix, directory, "trusting"):
        yield TrustingBackend(postfix, directory)


@pytest.fixture(scope="module")
def auth_service(backends: Backends, trusting: TrustingBackend) -> Iterator[authservice.AuthService]:
    """A classic nginx auth service: checks the password, names the trusting Postfix (with
    Auth-Pass, which nginx ignores for SMTP); renames the one login of ``GRANTED_AS``'s mailbox."""
    backend = (LOOPBACK, trusting.postfix.smtp_port)

    def answer(received: authservice.Received) -> authservice.Reply:
        user = backends.users.get(received.user.lower())
        if user is None or received.password != user.password:
            return authservice.refuse()
        renamed = GRANTED_AS if user.address.startswith("rename-") else None
        return authservice.ok(*backend, user=renamed, password=user.password)

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
