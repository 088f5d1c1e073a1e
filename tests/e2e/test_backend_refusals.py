"""A backend's refusal that is not about the credentials locks nobody out; a wrong password does.

A Dovecot of its own takes at most two sessions of a user from one address
(``mail_max_userip_connections``) and serves alpha.example's IMAP and POP3 for a proxy of its own,
whose failed-login throttle locks a user after three failures (``firstDelay: 0`` and
``refusalTime: 0``, so no refusal is held back). With two sessions held, every further login
with the right password gets Dovecot's own refusal, counted as ``outcome="refused"``; more of
them than the lockout takes still reach Dovecot, never the lockout's temporary failure. Three
wrong passwords still lock.
Each test has users of its own: the throttle and Dovecot's count are per user.
"""

import contextlib
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed import clients, mailservers
from testbed.backends import ALPHA, IMAP_SERVICE_PORT, NAMESPACE, POP3_SERVICE_PORT, SERVICE_NAMES, Backends
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import StartProxy

SESSIONS_PER_USER = 2  # Dovecot's mail_max_userip_connections here
FAILURES_PER_USER = 3  # the proxy's failedLogins.perUser
SETTLE_ATTEMPTS = 50  # logins tried until Dovecot counts the held sessions (bounded)
SETTLE_PAUSE = 0.1  # seconds between them
PASSWORD = "limit-secret-Horse-9"
USERS = {
    "imap": mailservers.User(f"limited-imap@{ALPHA}", PASSWORD),
    "pop3": mailservers.User(f"limited-pop3@{ALPHA}", PASSWORD),
    "guessed": mailservers.User(f"guessed@{ALPHA}", PASSWORD),
}
LIMIT_CONFIG = f"""
protocol imap {{
  mail_max_userip_connections = {SESSIONS_PER_USER}
}}
protocol pop3 {{
  mail_max_userip_connections = {SESSIONS_PER_USER}
}}
"""


@pytest.fixture(scope="module")
def limited(backends: Backends) -> Iterator[mailservers.Dovecot]:
    dovecot = mailservers.Dovecot(
        backends.directory / "dovecot-limited",
        name="limited",
        users=list(USERS.values()),
        extra_config=LIMIT_CONFIG,
    )
    dovecot.start()
    yield dovecot
    dovecot.stop()


@pytest.fixture(scope="module")
def limit_proxy(start_proxy: StartProxy, backends: Backends, limited: mailservers.Dovecot) -> ProxyProcess:
    services = backends.services()
    alpha = services[f"{NAMESPACE}/{SERVICE_NAMES[ALPHA]}"]
    alpha[IMAP_SERVICE_PORT] = [f"{mailservers.LOOPBACK}:{limited.imap_port}"]
    alpha[POP3_SERVICE_PORT] = [f"{mailservers.LOOPBACK}:{limited.pop3_port}"]
    throttle = {"perUser": FAILURES_PER_USER, "perIp": 1000, "firstDelay": 0, "refusalTime": 0}
    return start_proxy("proxy-limits", services=services, extra={"limits": {"failedLogins": throttle}})


def imap_login(port: int, user: mailservers.User, password: str) -> tuple[clients.RawClient, bytes]:
    """A raw session that sent LOGIN, and the tagged reply."""
    client = clients.RawClient(port)
    client.line()
    return client, client.command(b'a LOGIN "%b" "%b"' % (user.address.encode(), password.encode()), b"a ")


def pop3_login(port: int, user: mailservers.User, password: str) -> tuple[clients.RawClient, bytes]:
    """A raw session that sent USER and PASS, and the reply to PASS."""
    client = clients.RawClient(port)
    client.line()
    assert client.command(b"USER " + user.address.encode(), b"").startswith(b"+OK")
    return client, client.command(b"PASS " + password.encode(), b"")


LOGINS = {"imap": imap_login, "pop3": pop3_login}
LIMIT_REFUSALS = {"imap": b"a NO [LIMIT] ", "pop3": b"-ERR [IN-USE] "}
OK = {"imap": b"a OK ", "pop3": b"+OK"}


def logins(proxy: ProxyProcess, protocol: str, outcome: str) -> float:
    """``mailgress_proxy_logins_total`` for this protocol and outcome, 0 if never counted."""
    for family in text_string_to_metric_families(proxy.metrics()):
        for sample in family.samples:
            if sample.name == "mailgress_proxy_logins_total" and sample.labels == {
                "protocol": protocol,
                "outcome": outcome,
            }:
                return sample.value
    return 0.0


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_connection_limit_refusal_is_passed_on_and_locks_nobody_out(
    limit_proxy: ProxyProcess, protocol: str
) -> None:
    user, login = USERS[protocol], LOGINS[protocol]
    port = limit_proxy.settings.ports.listener_port(protocol)
    before = {outcome: logins(limit_proxy, protocol, outcome) for outcome in ("refused", "throttled")}
    refusals = []
    with contextlib.ExitStack() as held:
        for _ in range(SESSIONS_PER_USER):
            client, reply = login(port, user, PASSWORD)
            held.callback(client.close)
            assert reply.startswith(OK[protocol]), reply
        # Dovecot's sessions register with its anvil process asynchronously: a login right
        # after the held ones may still get in. Wait (bounded) for the first refusal.
        for _ in range(SETTLE_ATTEMPTS):
            client, reply = login(port, user, PASSWORD)
            client.close()
            if not reply.startswith(OK[protocol]):
                refusals.append(reply)
                break
            time.sleep(SETTLE_PAUSE)
        # More than the lockout takes: each one is Dovecot's own answer, none the lockout's.
        for _ in range(FAILURES_PER_USER):
            client, reply = login(port, user, PASSWORD)
            client.close()
            refusals.append(reply)
    assert len(refusals) == FAILURES_PER_USER + 1, refusals
    assert all(reply.startswith(LIMIT_REFUSALS[protocol]) for reply in refusals), refusals
    assert logins(limit_proxy, protocol, "refused") - before["refused"] == FAILURES_PER_USER + 1
    assert logins(limit_proxy, protocol, "throttled") == before["throttled"]
    assert f"too many failed logins: user '{user.address}'" not in limit_proxy.log_text()


def test_wrong_passwords_still_lock_the_user(limit_proxy: ProxyProcess) -> None:
    user = USERS["guessed"]
    port = limit_proxy.settings.ports.imap
    before = {outcome: logins(limit_proxy, "imap", outcome) for outcome in ("rejected", "throttled")}
    for _ in range(FAILURES_PER_USER):
        client, reply = imap_login(port, user, "wrong-" + PASSWORD)
        client.close()
        assert reply.startswith(b"a NO [AUTHENTICATIONFAILED] "), reply
    client, reply = imap_login(port, user, PASSWORD)
    client.close()
    assert reply.startswith(b"a NO [UNAVAILABLE] "), reply  # locked: Dovecot was not asked
    assert logins(limit_proxy, "imap", "rejected") - before["rejected"] == FAILURES_PER_USER
    assert logins(limit_proxy, "imap", "throttled") - before["throttled"] == 1
