"""Backend endpoints that are down: one of two is skipped, all of them give temporary failures.

A proxy of its own sees every alpha.example service as two endpoints, a dead port first and the
live server second, balanced round-robin so that sessions do start at the dead one; every
beta.example service (Dovecot beta's and a Postfix of its own) has only dead endpoints. "Dead"
is a loopback port nothing listens on: the connection is refused at once.
"""

import imaplib
import poplib
import smtplib
from collections.abc import Callable

import pytest

from testbed import clients, mailservers, messages
from testbed.backends import ALPHA, BETA, Backends
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import StartProxy, serves_imap

NewUser = Callable[..., User]
DOWN_POSTFIX = "postfix-down"


@pytest.fixture(scope="module")
def failover_proxy(start_proxy: StartProxy, backends: Backends) -> ProxyProcess:
    dead = [f"{LOOPBACK}:{mailservers.free_port()}" for _ in range(2)]
    services = backends.services()
    for reference, ports in services.items():
        for port, endpoints in ports.items():
            ports[port] = dead + endpoints if reference != "mail/dovecot-beta" else list(dead)
    services[f"mail/{DOWN_POSTFIX}"] = {"25": list(dead), "587": list(dead)}
    routes = backends.mailroutes()
    routes[0]["spec"]["balance"] = "round-robin"
    assert routes[1]["spec"]["domains"] == [BETA]
    for protocol in ("submission", "smtp"):
        routes[1]["spec"][protocol]["backend"]["service"] = DOWN_POSTFIX
    return start_proxy("proxy-failover", services=services, routes=routes)


def test_a_dead_endpoint_of_two_is_skipped(
    failover_proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    ports = failover_proxy.settings.ports
    alice = backends.user("alice@alpha.example")
    recipient = new_user(ALPHA)
    # Round-robin over two endpoints: of any two consecutive sessions one starts at the dead one.
    for attempt in range(2):
        with clients.imap(ports.imap) as client:
            client.login(alice.address, alice.password)
            assert client.select("INBOX", readonly=True)[0] == "OK"
        with clients.pop3(ports.pop3) as client:
            client.user(alice.address)
            client.pass_(alice.password)
        with clients.smtp(ports.submission) as smtp:
            smtp.login(alice.address, alice.password)
            smtp.sendmail(
                alice.address,
                [recipient.address],
                messages.compose(alice.address, recipient.address, f"s{attempt}"),
            )
        with clients.smtp(ports.smtp) as smtp:
            smtp.sendmail(
                "x@example.net",
                [recipient.address],
                messages.compose("x@example.net", recipient.address, f"m{attempt}"),
            )
    assert len(backends.wait_delivered(recipient.address, 4)) == 4
    log = failover_proxy.log_text()
    assert "unreachable" in log  # the dead endpoint was tried, and skipped


def test_all_endpoints_dead_gives_temporary_failures(
    failover_proxy: ProxyProcess, backends: Backends
) -> None:
    ports = failover_proxy.settings.ports
    bob = backends.user("bob@beta.example")
    with clients.imap(ports.imap) as client, pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        client.login(bob.address, bob.password)
    with clients.pop3(ports.pop3) as client, pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
        client.user(bob.address)
        client.pass_(bob.password)
    with clients.smtp(ports.submission) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        smtp.login(bob.address, bob.password)
    assert 400 <= refused.value.smtp_code < 500
    with clients.smtp(ports.smtp) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused) as unavailable:
        smtp.sendmail("x@example.net", [bob.address], messages.compose("x@example.net", bob.address, "x"))
    assert 400 <= unavailable.value.recipients[bob.address][0] < 500
    assert serves_imap(failover_proxy, backends)
