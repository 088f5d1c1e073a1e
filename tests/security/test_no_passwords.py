"""No password anywhere: every line the proxy logged and its whole /metrics, after logins that succeed,
fail, stall, break off, arrive malformed and get locked out, over every protocol and mechanism.

One proxy at debug log level, with client forwarding on every route (IMAP ID, POP3 and SMTP
XCLIENT), so the most talkative code paths run. Every testbed password contains the marker
"-secret-", and the wrong passwords tried here do too; the e2e ``leaked`` search finds a password
(or the part of one a stalled client sent) in the clear, IMAP-quoted or inside base64 (SASL PLAIN
and LOGIN), and any line with the marker itself counts too. Failures name accounts and line
numbers only: a report must not carry the password it found. The proxy's own counters show the
sweep really took every path.
"""

import base64
import imaplib
import poplib
import smtplib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import pytest

from testbed import backends as testbed_backends
from testbed import clients, proxyprocess
from testbed.mailservers import User
from tests.e2e.helpers import TEST_LIMITS, StartProxy, leaked, passwords
from tests.security.conftest import with_client_info

MARKER = testbed_backends.PASSWORD_MARKER
# Failures before a user is locked out: each standard user fails once per protocol, so it ends
# locked and its last, correct, login is refused without a backend.
FAILURES_PER_USER = 3
UNKNOWN = User(f"nobody@{testbed_backends.UNROUTED_DOMAIN}", f"gamma{MARKER}nobody-never-routed")


def wrong(user: User) -> User:
    return User(user.address, f"{user.password}-wrong")


def partial(password: str) -> str:
    """What a client stalled mid-password has sent: more than half of it."""
    return password[: len(password) // 2 + 2]


def marked_lines(text: str) -> list[int]:
    """Numbers (from 1) of the lines holding the password marker: a fragment of any password."""
    return [number for number, line in enumerate(text.splitlines(), start=1) if MARKER in line]


@dataclass
class Sweep:
    proxy: proxyprocess.ProxyProcess
    secrets: Mapping[str, str] = field(repr=False)  # what to search for, by a printable name


def log_in_every_way(ports: Sequence[int], user: User) -> None:
    imap, pop3, submission = ports
    imap_logins: list[Callable[[imaplib.IMAP4], object]] = [
        lambda client: client.login(user.address, user.password),
        lambda client: clients.imap_login_literal(client, user),
        lambda client: clients.imap_authenticate_plain(client, user),
        lambda client: clients.imap_authenticate_plain(client, user, initial_response=False),
    ]
    for imap_login in imap_logins:
        with clients.imap(imap) as imap_client:
            imap_login(imap_client)
            assert imap_client.noop()[0] == "OK"
    with clients.pop3(pop3) as pop3_client:
        pop3_client.user(user.address)
        pop3_client.pass_(user.password)
    with clients.pop3(pop3) as pop3_client:
        clients.pop3_auth_plain(pop3_client, user)
    for mechanism, initial_response in (("PLAIN", True), ("PLAIN", False), ("LOGIN", True)):
        with clients.smtp(submission) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = user.address, user.password
            authenticate = getattr(smtp, f"auth_{mechanism.lower()}")
            assert smtp.auth(mechanism, authenticate, initial_response_ok=initial_response)[0] == 235


def fail_to_log_in(ports: Sequence[int], user: User) -> None:
    imap, pop3, submission = ports
    with clients.imap(imap) as client, pytest.raises(imaplib.IMAP4.error):
        client.login(user.address, user.password)
    with clients.pop3(pop3) as client, pytest.raises(poplib.error_proto):
        clients.pop3_auth_plain(client, user)
    with clients.smtp(submission) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
        smtp.ehlo()
        smtp.user, smtp.password = user.address, user.password
        smtp.auth("LOGIN", smtp.auth_login)


def stall_mid_password(ports: Sequence[int], user: User) -> None:
    """Each protocol's client stops halfway through the password; the pre-login deadline ends it."""
    secret = user.password.encode()
    stalled = [clients.RawClient(port) for port in ports]
    try:
        raw_imap, raw_pop3, raw_smtp = stalled
        raw_imap.line()
        assert raw_imap.command(f'a1 LOGIN "{user.address}" {{{len(secret)}}}'.encode(), b"+").startswith(
            b"+"
        )
        raw_imap.send(partial(user.password).encode())
        raw_pop3.line()
        assert raw_pop3.command(f"USER {user.address}".encode(), b"+OK").startswith(b"+OK")
        raw_pop3.send(f"PASS {partial(user.password)}".encode())
        raw_smtp.line()
        raw_smtp.command(b"EHLO stalled.example", b"250 ")
        assert raw_smtp.command(b"AUTH LOGIN", b"334").startswith(b"334")
        assert raw_smtp.command(base64.b64encode(user.address.encode()), b"334").startswith(b"334")
        raw_smtp.send(base64.b64encode(secret)[: len(secret)])
        goodbyes = [raw.until_closed() for raw in stalled]
    finally:
        for raw in stalled:
            raw.close()
    assert goodbyes[0].startswith(b"* BYE") and goodbyes[1].startswith(b"-ERR"), goodbyes
    assert goodbyes[2].startswith(b"421 4.4.2"), goodbyes


def send_malformed(ports: Sequence[int], user: User) -> None:
    """Passwords inside commands the proxy must refuse: unterminated, over-long, not base64."""
    imap, pop3, submission = ports
    assert '"' not in user.password  # the unterminated quote must stay unterminated
    with clients.RawClient(imap) as raw:
        raw.line()
        unterminated = raw.command(f'a1 LOGIN {user.address} "{user.password}'.encode(), b"a1 ")
        assert unterminated.startswith(b"a1 BAD"), unterminated
        raw.send(f'a2 LOGIN {user.address} "{user.password}{"x" * 10_000}"\r\n'.encode())
        assert raw.until_closed().startswith((b"* BAD", b"* BYE"))
    with clients.RawClient(pop3) as raw:
        raw.line()
        raw.command(f"USER {user.address}".encode(), b"+OK")
        raw.send(f"PASS {user.password} {'y' * 1000}\r\n".encode())
        assert raw.until_closed().startswith(b"-ERR")
    with clients.RawClient(submission) as raw:
        raw.line()
        raw.command(b"EHLO malformed.example", b"250 ")
        assert raw.command(f"AUTH PLAIN {user.password}".encode(), b"5").startswith(b"501")
    # The whole login sent, then gone before the answer: the backend login runs for nobody.
    with clients.RawClient(pop3) as raw:
        raw.line()
        raw.send(f"USER {user.address}\r\nPASS {user.password}\r\n".encode())


@pytest.fixture(scope="module")
def sweep(launch_proxy: StartProxy, backends: testbed_backends.Backends) -> Sweep:
    routes = with_client_info(
        backends.mailroutes(), imap="id", pop3="xclient", submission="xclient", smtp="xclient"
    )
    failed_logins = {**cast(dict[str, int], TEST_LIMITS["failedLogins"]), "perUser": FAILURES_PER_USER}
    limits = {**TEST_LIMITS, "failedLogins": failed_logins}
    proxy = launch_proxy("secrets", routes=routes, extra={"limits": limits})
    ports = [proxy.settings.ports.imap, proxy.settings.ports.pop3, proxy.settings.ports.submission]
    users = [backends.user(address) for address in testbed_backends.standard_addresses()]
    for user in users:
        log_in_every_way(ports, user)
    special = backends.user(next(iter(testbed_backends.SPECIAL_PASSWORDS)))
    stall_mid_password(ports, special)
    send_malformed(ports, users[0])
    for user in users:
        fail_to_log_in(ports, wrong(user))
    with clients.imap(ports[0]) as client, pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(special.address, special.password)  # locked: even the right password is refused
    fail_to_log_in(ports, UNKNOWN)
    secrets = {
        **passwords(backends),
        **{f"{user.address} (wrong)": wrong(user).password for user in users},
        f"{UNKNOWN.address} (unknown)": UNKNOWN.password,
        f"{special.address} (stalled half)": partial(special.password),
    }
    return Sweep(proxy, secrets)


def test_no_log_line_holds_a_password(sweep: Sweep) -> None:
    log = sweep.proxy.log_text()
    for protocol in ("imap", "pop3", "submission"):  # the log is the proxy's whole output
        assert f"session protocol={protocol} " in log, protocol
    assert leaked(log, sweep.secrets) == [], f"see {sweep.proxy.log_path}"
    assert marked_lines(log) == [], f"see {sweep.proxy.log_path}"


def test_metrics_hold_no_password_and_no_user(sweep: Sweep, backends: testbed_backends.Backends) -> None:
    metrics = sweep.proxy.metrics()
    assert leaked(metrics, sweep.secrets) == []
    assert marked_lines(metrics) == []
    assert [address for address in backends.users if address in metrics] == []


def test_the_sweep_took_every_path(sweep: Sweep) -> None:
    """The proxy's own counters: successes, refusals, unknown users and a lockout in every protocol."""
    metrics = sweep.proxy.metrics()
    users = len(testbed_backends.standard_addresses())
    expected = {
        ("imap", "accepted"): 4 * users,
        ("pop3", "accepted"): 2 * users + 1,  # the client gone before its answer
        ("submission", "accepted"): 3 * users,
        ("imap", "rejected"): users,
        ("pop3", "rejected"): users,
        ("submission", "rejected"): users,
        ("imap", "throttled"): 1,
        ("imap", "no_route"): 1,
        ("pop3", "no_route"): 1,
        ("submission", "no_route"): 1,
    }
    for (protocol, outcome), count in expected.items():
        sample = f'mailgress_proxy_logins_total{{outcome="{outcome}",protocol="{protocol}"}} {count:.1f}'
        assert sample in metrics, sample
    assert 'mailgress_proxy_refusals_total{reason="pre_login_timeout"} 3.0' in metrics
    assert "user 'al@alpha.example' refused" in sweep.proxy.log_text()  # the lockout warning


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda secret: f"password={secret}", id="clear"),
        pytest.param(lambda secret: f"a1 LOGIN al {clients.imap_quoted(secret)}", id="imap-quoted"),
        pytest.param(
            lambda secret: "AUTH PLAIN " + base64.b64encode(f"\0al\0{secret}".encode()).decode(),
            id="sasl-plain",
        ),
        pytest.param(lambda secret: base64.b64encode(secret.encode()).decode(), id="sasl-login"),
        pytest.param(lambda secret: f"fragment {MARKER} of something", id="marker"),
    ],
)
def test_the_search_finds_a_password_in_every_form(form: Callable[[str], str]) -> None:
    secret = testbed_backends.default_password("al@alpha.example")
    text = f"clean line\n{form(secret)}\nclean again"
    assert leaked(text, {"al": secret}) == ["al"] or marked_lines(text) == [2]
    assert leaked("clean line", {"al": secret}) == []
    assert marked_lines("clean line") == []
