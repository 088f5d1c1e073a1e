"""POP3 through mailgress to the real Dovecots, with poplib, curl and hand-made lines.

Proves: USER/PASS and AUTH PLAIN log in on the Dovecot of the user's domain; RETR returns the
stored message byte for byte (dot-stuffing undone); wrong passwords and unrouted domains get
``-ERR [AUTH]``; a Latin-1 password (8-bit octets that are no UTF-8) logs in with USER/PASS and
AUTH PLAIN on the SHA512-CRYPT Dovecot, and its UTF-8 look-alike does not; over-long lines,
garbage and a stalled client get POP3's answer or a timely close
while the proxy keeps serving everyone else.
"""

import poplib
from collections.abc import Callable

import pytest

from testbed import clients, messages
from testbed.backends import ALPHA, BETA, UNROUTED_DOMAIN, Backends
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import latin1_user, login_count, octets_in_log, sasl_plain, serves_imap

NewUser = Callable[..., User]


def user_pass(client: poplib.POP3, user: User) -> None:
    client.user(user.address)
    client.pass_(user.password)


LOGINS: dict[str, Callable[[poplib.POP3, User], object]] = {
    "user-pass": user_pass,
    "auth-plain": clients.pop3_auth_plain,
}


@pytest.mark.parametrize("domain", [ALPHA, BETA])
@pytest.mark.parametrize("method", LOGINS)
def test_logins_land_on_the_right_dovecot_and_retr_is_byte_identical(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser, method: str, domain: str
) -> None:
    user = new_user(domain)
    message = messages.compose("x@example.net", user.address, "pop3", ".one dot\n..two dots\nend\n")
    backends.deliver(user.address, message)
    with clients.pop3(proxy.settings.ports.pop3) as client:
        LOGINS[method](client, user)
        count, _ = client.stat()
        _, lines, _ = client.retr(1)
    assert count == 1
    assert b"\r\n".join(lines) + b"\r\n" == message
    backends.dovecots[domain].wait_logins(user.address, 1, "pop3")
    other = BETA if domain == ALPHA else ALPHA
    assert login_count(backends, other, user.address, "pop3") == 0


def test_the_awkward_password_works_with_user_pass_and_auth_plain(
    proxy: ProxyProcess, backends: Backends
) -> None:
    al = backends.user("al@alpha.example")
    for login in LOGINS.values():
        with clients.pop3(proxy.settings.ports.pop3) as client:
            login(client, al)
            client.stat()


def latin1_login(raw: clients.RawClient, user: User, password: bytes, method: str) -> bytes:
    """Log in with ``password``'s octets by ``method``; the final reply line."""
    if method == "user-pass":
        assert raw.command(b"USER " + user.address.encode(), b"").startswith(b"+OK")
        return raw.command(b"PASS " + password, b"")
    return raw.command(b"AUTH PLAIN " + sasl_plain(user.address, password), b"")


@pytest.mark.parametrize("method", LOGINS)
def test_a_latin1_password_logs_in_as_its_octets(
    proxy: ProxyProcess, backends: Backends, method: str
) -> None:
    user = latin1_user(backends, f"latin1-pop3-{method}", BETA)
    as_utf8 = user.octets.decode("latin-1").encode()  # the same characters, other octets
    with clients.RawClient(proxy.settings.ports.pop3) as raw:
        assert raw.line().startswith(b"+OK")
        # Replies first, asserted after: a failing assertion must not show a password argument.
        refused = latin1_login(raw, user, as_utf8, method)
        accepted = latin1_login(raw, user, user.octets, method)
        assert refused.startswith(b"-ERR [AUTH]")
        assert accepted.startswith(b"+OK")
        assert raw.command(b"STAT", b"").startswith(b"+OK 0 0")
    backends.dovecots[BETA].wait_logins(user.address, 1, "pop3")
    assert not octets_in_log(proxy, user)


def test_curl_retrieves_through_the_proxy(proxy: ProxyProcess, backends: Backends, new_user: NewUser) -> None:
    user = new_user(BETA)
    message = messages.compose("x@example.net", user.address, "curl pop3", ".dot\nbody\n")
    backends.deliver(user.address, message)
    retrieved = clients.curl(f"pop3://{LOOPBACK}:{proxy.settings.ports.pop3}/1", user=user)
    assert retrieved.returncode == 0, retrieved.describe()
    assert retrieved.output == message
    wrong = clients.curl(f"pop3://{LOOPBACK}:{proxy.settings.ports.pop3}/1", user=User(user.address, "wrong"))
    assert wrong.returncode == 67, wrong.describe()


@pytest.mark.parametrize("method", LOGINS)
@pytest.mark.parametrize(
    "login",
    [
        ("alice@alpha.example", "not-the-password"),
        ("nobody@alpha.example", "not-the-password"),
        (f"alice@{UNROUTED_DOMAIN}", None),
    ],
    ids=["wrong-password", "unknown-user", "unrouted-domain"],
)
def test_refused_logins_get_err_auth(
    proxy: ProxyProcess, backends: Backends, method: str, login: tuple[str, str | None]
) -> None:
    address, password = login
    user = User(address, password or backends.user("alice@alpha.example").password)
    with (
        clients.pop3(proxy.settings.ports.pop3) as client,
        pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] Authentication failed\.'$"),
    ):
        LOGINS[method](client, user)
    assert serves_imap(proxy, backends)


def test_an_over_long_line_is_refused_and_closed(proxy: ProxyProcess, backends: Backends) -> None:
    with clients.RawClient(proxy.settings.ports.pop3) as raw:
        assert raw.line().startswith(b"+OK")
        raw.send(b"USER " + b"x" * 1000 + b"\r\n")
        assert raw.line().startswith(b"-ERR")
        raw.until_closed()
    assert serves_imap(proxy, backends)


def test_garbage_gets_err(proxy: ProxyProcess, backends: Backends) -> None:
    with clients.RawClient(proxy.settings.ports.pop3) as raw:
        assert raw.line().startswith(b"+OK")
        raw.send(b"\x00\xff\xfe\x80 \x01\x02 garbage\r\n")
        assert raw.line().startswith(b"-ERR")
        assert raw.command(b"CAPA", b"").startswith(b"+OK")  # still talking POP3
    assert serves_imap(proxy, backends)


def test_a_client_that_stops_mid_command_is_closed_while_others_are_served(
    proxy: ProxyProcess, backends: Backends
) -> None:
    with clients.RawClient(proxy.settings.ports.pop3) as stalled:
        assert stalled.line().startswith(b"+OK")
        stalled.send(b"USER alice@alpha.example")  # no line end, ever
        assert serves_imap(proxy, backends)
        rest = stalled.until_closed()
    assert rest.startswith(b"-ERR [SYS/TEMP]")
