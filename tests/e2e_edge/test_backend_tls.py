"""TLS from the proxy to the real backends, checked against the testbed's CA.

Routes reach Dovecot over implicit TLS (imaps, pop3s) and over STARTTLS/STLS, and Postfix (both
submission and the inbound MX) over STARTTLS, with ``backendTls.caFile`` the CA that signed the
servers' certificates for their Service names: logins and deliveries work, and the backends' own
records say the hop was encrypted (Dovecot's login line says TLS; Postfix's Received header names
the TLS version). A proxy that trusts another CA gets the protocol's temporary failure for the
same routes and never falls back to plaintext: the backend logs no login or message for that
attempt, only for the one made afterwards through a proxy that trusts the right CA.
"""

import poplib
from collections.abc import Callable

import pytest

from proxy.protocols import pop3, smtp
from testbed import clients, tlscerts
from testbed.backends import IMAPS_SERVICE_PORT, POP3S_SERVICE_PORT, Backends
from testbed.mailservers import LOOPBACK, User
from tests.e2e_edge.conftest import (
    SESSIONS,
    EdgeProxy,
    LaunchEdgeProxy,
    Origin,
    dovecot_login_line,
    logged_client_address,
    routes_with,
)

NewUser = Callable[..., User]
PLAIN_LISTENERS = {"imap": "imap", "pop3": "pop3", "submission": "submission", "smtp": "mx"}
# How each route reaches its backend, per case: (protocol, backend tls) -> the route block.
CASES = {
    ("imap", "tls"): {"tls": "tls", "port": int(IMAPS_SERVICE_PORT)},
    ("imap", "starttls"): {"tls": "starttls"},
    ("pop3", "tls"): {"tls": "tls", "port": int(POP3S_SERVICE_PORT)},
    ("pop3", "starttls"): {"tls": "starttls"},
    ("submission", "starttls"): {"tls": "starttls"},
    ("smtp", "starttls"): {"tls": "starttls"},
}
CASE_IDS = [f"{protocol}-{mode}" for protocol, mode in CASES]
# Every client comes from the proxy's own host here; the address is not what these tests check.
LOCAL = Origin(LOOPBACK)


@pytest.fixture(scope="module")
def impostor(edge_backends: Backends) -> tlscerts.TestAuthority:
    """A CA that signed none of the backends' certificates."""
    return tlscerts.TestAuthority(edge_backends.directory / "impostor-ca", name="not the testbed CA")


@pytest.fixture(scope="module")
def proxies(
    launch_edge_proxy: LaunchEdgeProxy,
    edge_backends: Backends,
    authority: tlscerts.TestAuthority,
    impostor: tlscerts.TestAuthority,
) -> dict[tuple[str, str], EdgeProxy]:
    """(implicit or starttls routes, trusted or impostor CA) -> a proxy."""
    route_sets = {
        # Implicit TLS is Dovecot's (imaps, pop3s): Postfix here speaks STARTTLS only.
        "tls": routes_with(edge_backends, imap=CASES["imap", "tls"], pop3=CASES["pop3", "tls"]),
        "starttls": routes_with(
            edge_backends, **{protocol: CASES[protocol, "starttls"] for protocol in PLAIN_LISTENERS}
        ),
    }
    cas = {"trusted": authority, "impostor": impostor}
    return {
        (routes_name, ca_name): launch_edge_proxy(
            f"backend-{routes_name}-{ca_name}", routes=routes, backend_tls={"caFile": str(ca.cert)}
        )
        for routes_name, routes in route_sets.items()
        for ca_name, ca in cas.items()
    }


def proxy_for(proxies: dict[tuple[str, str], EdgeProxy], mode: str, ca: str) -> EdgeProxy:
    return proxies["tls" if mode == "tls" else "starttls", ca]


def encrypted_hop(backends: Backends, protocol: str, user: User) -> bool:
    """True if the backend recorded ``user``'s one session as encrypted."""
    if protocol in ("imap", "pop3"):
        # Dovecot marks a login over TLS with ", TLS," (a plaintext one from a trusted network
        # says "secured" instead).
        return ", TLS," in dovecot_login_line(backends.dovecot_for(user.address), user, protocol)
    (delivered,) = backends.maildir(user.address).messages()
    # smtpd_tls_received_header: Postfix notes "(using TLSv1.3 with cipher ...)" for TLS sessions.
    return b"(using TLSv1." in received_header(delivered)


def received_header(message: bytes) -> bytes:
    """The first Received header of a stored message, its folded lines joined."""
    lines = message.split(b"\n\n", 1)[0].split(b"\n")
    for index, line in enumerate(lines):
        if line.lower().startswith(b"received:"):
            end = index + 1
            while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
                end += 1
            return b" ".join(lines[index:end])
    return b""


@pytest.mark.parametrize(
    ("protocol", "mode"),
    [pytest.param(protocol, mode, id=f"{protocol}-{mode}") for protocol, mode in CASES],
)
def test_logins_work_over_tls_to_the_backend(
    proxies: dict[tuple[str, str], EdgeProxy],
    edge_backends: Backends,
    edge_user: NewUser,
    protocol: str,
    mode: str,
) -> None:
    user = edge_user()
    proxy = proxy_for(proxies, mode, "trusted")
    SESSIONS[protocol](edge_backends, LOCAL, proxy.port(PLAIN_LISTENERS[protocol]), user)
    assert encrypted_hop(edge_backends, protocol, user)


def imap_refusal(port: int, user: User) -> str:
    # By hand: imaplib's error would drop the NO that matters here.
    with clients.RawClient(port) as client:
        assert client.reply(b"* OK")
        login = f"a LOGIN {clients.imap_quoted(user.address)} {clients.imap_quoted(user.password)}"
        return client.command(login.encode(), b"a ").decode()


def pop3_refusal(port: int, user: User) -> str:
    with clients.pop3(port) as client:
        client.user(user.address)
        with pytest.raises(poplib.error_proto) as refused:
            client.pass_(user.password)
    return refused.value.args[0].decode()


def submission_refusal(port: int, user: User) -> str:
    with clients.smtp(port) as client:
        client.ehlo("client.example")
        code, text = client.docmd("AUTH", f"PLAIN {clients.sasl_plain(user)}")
    return f"{code} {text.decode()}"


def mx_refusal(port: int, user: User) -> str:
    with clients.smtp(port) as client:
        client.ehlo("sender.example")
        assert client.docmd("MAIL", "FROM:<someone@sender.example>")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<{user.address}>")
    return f"{code} {text.decode()}"


REFUSALS: dict[str, Callable[[int, User], str]] = {
    "imap": imap_refusal,
    "pop3": pop3_refusal,
    "submission": submission_refusal,
    "smtp": mx_refusal,
}
# What the proxy logs when a backend's certificate does not verify (proxy/server/backends.py).
DISTRUSTED = "certificate not trusted"
# The temporary failure each protocol's client must see (IMAP's text is the proxy's own).
TEMPORARY_FAILURES = {
    "imap": "NO [UNAVAILABLE]",
    "pop3": pop3.REPLY_UNAVAILABLE.decode().strip(),
    "submission": smtp.REPLY_AUTH_UNAVAILABLE.decode().strip(),
    "smtp": smtp.REPLY_ROUTE_UNAVAILABLE.decode().strip(),
}


@pytest.mark.parametrize(("protocol", "mode"), CASES, ids=CASE_IDS)
def test_a_backend_certificate_from_another_ca_is_a_temporary_failure_without_plaintext_fallback(
    proxies: dict[tuple[str, str], EdgeProxy],
    edge_backends: Backends,
    edge_user: NewUser,
    protocol: str,
    mode: str,
) -> None:
    user = edge_user()
    distrustful = proxy_for(proxies, mode, "impostor")
    distrusted_before = distrustful.log_text().count(DISTRUSTED)
    refusal = REFUSALS[protocol](distrustful.port(PLAIN_LISTENERS[protocol]), user)
    assert TEMPORARY_FAILURES[protocol] in refusal
    # Logged before the refusal was sent.
    assert distrustful.log_text().count(DISTRUSTED) > distrusted_before
    # The same session through a proxy that trusts the right CA (over STARTTLS, which works for
    # every backend here): afterwards the backend holds exactly one login (or message) of this
    # user, so the refused attempt reached it with none.
    trusting = proxy_for(proxies, "starttls", "trusted")
    SESSIONS[protocol](edge_backends, LOCAL, trusting.port(PLAIN_LISTENERS[protocol]), user)
    assert logged_client_address(edge_backends, protocol, user) == LOOPBACK
    assert encrypted_hop(edge_backends, protocol, user)
