"""IMAP through mailgress to the real Dovecots, with imaplib, curl and hand-made lines.

Proves: each user lands on the Dovecot of its domain (its log and its mailbox say so); LOGIN with
quoted strings and literals, AUTHENTICATE PLAIN with and without SASL-IR and AUTHENTICATE LOGIN
all work, also for a password full of IMAP syntax and for a Latin-1 one (8-bit octets that are
no UTF-8: Dovecot gets them as they came); a 20 MB message arrives byte-identical; wrong
passwords, unrouted domains, over-long lines, garbage and a stalled client each get IMAP's answer
or a timely close while the proxy keeps serving everyone else.
"""

import hashlib
import imaplib
from collections.abc import Callable

import pytest

from testbed import clients, messages
from testbed.backends import ALPHA, BETA, UNROUTED_DOMAIN, Backends, standard_addresses
from testbed.mailservers import LOOPBACK, User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import latin1_user, login_count, octets_in_log, sasl_plain, serves_imap

NewUser = Callable[..., User]

LOGINS: dict[str, Callable[[imaplib.IMAP4, User], object]] = {
    "login-quoted": lambda client, user: client.login(user.address, user.password),
    "login-literal": clients.imap_login_literal,
    "authenticate-plain-sasl-ir": clients.imap_authenticate_plain,
    "authenticate-plain": lambda client, user: clients.imap_authenticate_plain(
        client, user, initial_response=False
    ),
    "authenticate-login": lambda client, user: client.authenticate(
        "LOGIN", lambda challenge: (user.address if b"sername" in challenge else user.password).encode()
    ),
}


def test_each_user_lands_on_the_dovecot_of_its_domain(proxy: ProxyProcess, backends: Backends) -> None:
    for address in standard_addresses():
        user = backends.user(address)
        other = BETA if user.domain == ALPHA else ALPHA
        logged_here = login_count(backends, user.domain, address, "imap")
        logged_there = login_count(backends, other, address, "imap")
        identifier = messages.message_id()
        backends.deliver(
            address, messages.compose("routing@example.net", address, "routing", identifier=identifier)
        )
        with clients.imap(proxy.settings.ports.imap) as client:
            client.login(user.address, user.password)
            client.select("INBOX", readonly=True)
            typ, found = client.search(None, "HEADER", "Message-ID", identifier)
        assert (typ, len(found[0].split())) == ("OK", 1), address
        backends.dovecots[user.domain].wait_logins(address, logged_here + 1, "imap")
        assert login_count(backends, other, address, "imap") == logged_there, address


@pytest.mark.parametrize("address", ["alice@alpha.example", "al@alpha.example", "bea@beta.example"])
@pytest.mark.parametrize("method", LOGINS)
def test_every_login_form_works(proxy: ProxyProcess, backends: Backends, method: str, address: str) -> None:
    user = backends.user(address)
    with clients.imap(proxy.settings.ports.imap) as client:
        LOGINS[method](client, user)
        typ, _ = client.select("INBOX", readonly=True)
    assert typ == "OK"


def latin1_login(raw: clients.RawClient, tag: bytes, user: User, password: bytes, form: str) -> bytes:
    """Log in with ``password``'s octets in ``form``; the tagged reply."""
    address = clients.imap_quoted(user.address).encode()
    if form == "literal":
        assert raw.command(tag + b" LOGIN %b {%d}" % (address, len(password)), b"+").startswith(b"+")
        return raw.command(password, tag + b" ")
    if form == "quoted":  # 8-bit in a quoted string: RFC 9051 allows UTF-8 only, old clients send it
        return raw.command(tag + b' LOGIN %b "%b"' % (address, password), tag + b" ")
    return raw.command(tag + b" AUTHENTICATE PLAIN " + sasl_plain(user.address, password), tag + b" ")


@pytest.mark.parametrize("form", ["literal", "quoted", "authenticate-plain"])
def test_a_latin1_password_logs_in_as_its_octets(proxy: ProxyProcess, backends: Backends, form: str) -> None:
    user = latin1_user(backends, f"latin1-imap-{form}", ALPHA)
    # The same characters in UTF-8 are another password: the proxy must not re-encode the octets.
    as_utf8 = user.octets.decode("latin-1").encode()
    with clients.RawClient(proxy.settings.ports.imap) as raw:
        assert raw.line().startswith(b"* OK")
        # Replies first, asserted after: a failing assertion must not show a password argument.
        refused = latin1_login(raw, b"a1", user, as_utf8, form)
        accepted = latin1_login(raw, b"a2", user, user.octets, form)
        assert refused.startswith(b"a1 NO [AUTHENTICATIONFAILED]")
        assert accepted.startswith(b"a2 OK")
        assert raw.command(b"a3 SELECT INBOX", b"a3 ").startswith(b"a3 OK")
    backends.dovecots[ALPHA].wait_logins(user.address, 1, "imap")
    assert not octets_in_log(proxy, user)


def test_a_20_mb_message_is_fetched_byte_identical(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    user = new_user(BETA)
    stored = backends.deliver(user.address, messages.large("big@example.net", user.address, 20 * 1024 * 1024))
    expected = hashlib.sha256(stored.read_bytes()).hexdigest()
    with clients.imap(proxy.settings.ports.imap) as client:
        client.login(user.address, user.password)
        client.select("INBOX", readonly=True)
        typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    # Digests, not the bytes: a failure must not print 20 MB.
    assert hashlib.sha256(data[0][1]).hexdigest() == expected
    fetched = clients.curl(f"imap://{LOOPBACK}:{proxy.settings.ports.imap}/INBOX;UID=1", user=user)
    assert fetched.returncode == 0, fetched.describe()
    assert hashlib.sha256(fetched.output).hexdigest() == expected


def test_curl_examines_fetches_and_is_refused(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    user = new_user()
    message = messages.compose("x@example.net", user.address, "curl through the proxy", ".dot\nbody\n")
    backends.deliver(user.address, message)
    url = f"imap://{LOOPBACK}:{proxy.settings.ports.imap}/INBOX"
    examined = clients.curl(url, "--request", "EXAMINE INBOX", user=user)
    assert examined.returncode == 0, examined.describe()
    assert b"* 1 EXISTS" in examined.output
    with_sasl_ir = clients.curl(f"{url};UID=1", "--sasl-ir", "--login-options", "AUTH=PLAIN", user=user)
    assert with_sasl_ir.returncode == 0, with_sasl_ir.describe()
    assert with_sasl_ir.output == message
    wrong = clients.curl(url, user=User(user.address, "not-the-password"))
    assert wrong.returncode == 67, wrong.describe()  # CURLE_LOGIN_DENIED


@pytest.mark.parametrize(
    "login",
    [
        ("alice@alpha.example", "not-the-password"),
        ("nobody@alpha.example", "not-the-password"),
        (f"alice@{UNROUTED_DOMAIN}", None),
    ],
    ids=["wrong-password", "unknown-user", "unrouted-domain"],
)
def test_refused_logins_get_authenticationfailed(
    proxy: ProxyProcess, backends: Backends, login: tuple[str, str | None]
) -> None:
    address, password = login
    user = User(address, password or backends.user("alice@alpha.example").password)
    with (
        clients.imap(proxy.settings.ports.imap) as client,
        pytest.raises(
            imaplib.IMAP4.error,
            match=r"^b'\[AUTHENTICATIONFAILED\] Authentication failed\.'$",
        ),
    ):
        clients.imap_authenticate_plain(client, user)
    assert serves_imap(proxy, backends)


def test_a_tag_with_a_bracket_logs_in_and_gets_its_own_tag_back(
    proxy: ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    """RFC 3501 allows "]" in a tag and Dovecot refuses one; the proxy never sends it there."""
    user = new_user()
    login = f"LOGIN {clients.imap_quoted(user.address)} {clients.imap_quoted(user.password)}".encode()
    wrong = f"LOGIN {clients.imap_quoted(user.address)} {clients.imap_quoted('not-the-password')}".encode()
    with clients.RawClient(proxy.settings.ports.imap) as raw:
        assert raw.line().startswith(b"* OK")
        assert raw.command(b"a]0 " + wrong, b"a]0 ").startswith(b"a]0 NO [AUTHENTICATIONFAILED]")
        assert raw.command(b"a]1 " + login, b"a]1 ").startswith(b"a]1 OK")
        # Relayed from here on: the client talks to Dovecot with tags Dovecot takes.
        assert raw.command(b"a2 SELECT INBOX", b"a2 ").startswith(b"a2 OK")
    backends.dovecots[user.domain].wait_logins(user.address, 1, "imap")


def test_an_over_long_line_is_refused_and_closed(proxy: ProxyProcess, backends: Backends) -> None:
    with clients.RawClient(proxy.settings.ports.imap) as raw:
        assert raw.line().startswith(b"* OK")
        raw.send(b"a LOGIN " + b"x" * 10_000 + b"\r\n")
        assert raw.line().startswith(b"* BAD")
        raw.until_closed()
    assert serves_imap(proxy, backends)


def test_garbage_gets_bad(proxy: ProxyProcess, backends: Backends) -> None:
    with clients.RawClient(proxy.settings.ports.imap) as raw:
        assert raw.line().startswith(b"* OK")
        raw.send(b"\x00\xff\xfe\x80 \x01\x02 garbage\r\n")
        assert b" BAD" in raw.line()
        raw.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n")  # a TLS ClientHello on a plain port
        assert b" BAD" in raw.line()
    assert serves_imap(proxy, backends)


def test_a_client_that_stops_mid_command_is_closed_while_others_are_served(
    proxy: ProxyProcess, backends: Backends
) -> None:
    with clients.RawClient(proxy.settings.ports.imap) as stalled:
        assert stalled.line().startswith(b"* OK")
        stalled.send(b"a LOGIN alice@alpha.example {12}\r\n")
        assert stalled.line().startswith(b"+")
        assert serves_imap(proxy, backends)
        # The pre-login timeout closes it; the socket timeout bounds the wait if it never does.
        rest = stalled.until_closed()
    assert b"* BYE" in rest
