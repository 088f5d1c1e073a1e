"""No password reaches the proxy's log (captured at debug level) or its /metrics.

Every standard user logs in through every mechanism the proxy speaks, and refused attempts use a
distinctive wrong password; then the log and /metrics are searched for each password in the
clear, IMAP-quoted and inside base64 (SASL PLAIN and LOGIN). /metrics must not name users either
(labels are bounded: design.md). The proxy fixtures search their whole log again when they stop.
"""

import imaplib
import poplib
import smtplib

import pytest

from testbed import clients
from testbed.backends import Backends, standard_addresses
from testbed.mailservers import User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import leaked, passwords

WRONG_PASSWORD = "wrong-secret-Zq8v"


def log_in_every_way(proxy: ProxyProcess, user: User) -> None:
    ports = proxy.settings.ports
    for login in (
        lambda client: client.login(user.address, user.password),
        lambda client: clients.imap_login_literal(client, user),
        lambda client: clients.imap_authenticate_plain(client, user),
    ):
        with clients.imap(ports.imap) as client:
            login(client)
    with clients.pop3(ports.pop3) as pop:
        pop.user(user.address)
        pop.pass_(user.password)
    with clients.pop3(ports.pop3) as pop:
        clients.pop3_auth_plain(pop, user)
    for mechanism in ("PLAIN", "LOGIN"):
        with clients.smtp(ports.submission) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = user.address, user.password
            smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))


def fail_to_log_in(proxy: ProxyProcess, user: User) -> None:
    ports = proxy.settings.ports
    with clients.imap(ports.imap) as client, pytest.raises(imaplib.IMAP4.error):
        client.login(user.address, user.password)
    with clients.pop3(ports.pop3) as pop, pytest.raises(poplib.error_proto):
        clients.pop3_auth_plain(pop, user)
    with clients.smtp(ports.submission) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
        smtp.login(user.address, user.password)


def test_no_password_in_the_log_or_metrics(proxy: ProxyProcess, backends: Backends) -> None:
    for address in standard_addresses():
        log_in_every_way(proxy, backends.user(address))
        fail_to_log_in(proxy, User(address, WRONG_PASSWORD))
    secrets = {**passwords(backends), "the wrong password": WRONG_PASSWORD}
    log = proxy.log_text()
    metrics = proxy.metrics()
    assert "alice@alpha.example" in log  # the log is captured, and names users
    assert leaked(log, secrets) == []
    assert leaked(metrics, secrets) == []
    assert [address for address in backends.users if address in metrics] == []
