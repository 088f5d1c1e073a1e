"""Fixtures for the mail edge against real servers: client addresses forwarded, TLS on both sides.

``edge_backends`` is a testbed of its own (testbed.backends.Backends) with the opt-in extras the
session's standard one lacks: a certificate per server from ``authority`` (a throw-away CA), so
Dovecot offers STARTTLS, STLS, imaps and pop3s and Postfix offers STARTTLS, and twin listeners
that take a PROXY protocol header. ``launch_edge_proxy`` starts ``mailgress proxy`` processes in
front of it with extra listeners, routes and ``backendTls`` through the launcher every e2e suite
shares (tests.e2e.helpers); they stop when their module ends, and each one's log is searched for
every password (the e2e ``stop``). ``edge_user`` makes a fresh account per test, so that a
backend log line found by user name belongs to that test. ``Origin`` opens client connections
from 127.0.0.2, or behind a PROXY header naming another address.
"""

import copy
import imaplib
import itertools
import poplib
import re
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.protocols import proxyheader
from testbed import backends as testbed_backends
from testbed import clients, mailservers, messages, proxyprocess, tlscerts
from testbed.backends import Backends
from testbed.mailservers import User
from tests.conftest import remove_testbed_directory, testbed_directory
from tests.e2e.helpers import launcher

LOOPBACK = mailservers.LOOPBACK
# The port a PROXY header claims for the client; any will do, the backends log only the address.
CLAIMED_CLIENT_PORT = 40123
# The Received header Postfix adds names the TLS version when asked to: proof of a TLS hop.
POSTFIX_EXTRA = {"smtpd_tls_received_header": "yes"}
# How long a backend may take to write a log line about something that already happened.
LOG_WAIT = 30.0
# openssl and curl runs are bounded like the testbed's own client runs.
TOOL_TIMEOUT = clients.CLIENT_TIMEOUT

_user_numbers = itertools.count(1)


@pytest.fixture(scope="package")
def edge_directory() -> Iterator[Path]:
    directory = testbed_directory("mailgress-edge-")
    yield directory
    remove_testbed_directory(directory)


@pytest.fixture(scope="package")
def authority(edge_directory: Path) -> tlscerts.TestAuthority:
    """The CA that signs every backend's and every proxy listener's certificate here."""
    return tlscerts.TestAuthority(edge_directory / "ca")


@pytest.fixture(scope="package")
def edge_backends(edge_directory: Path, authority: tlscerts.TestAuthority) -> Iterator[Backends]:
    """The standard servers with TLS and PROXY-header listeners, running."""
    bed = Backends(
        edge_directory / "bed", tls=authority, proxy_protocol=True, postfix_extra_main_cf=POSTFIX_EXTRA
    )
    try:
        bed.start()
    except mailservers.MailServerError as error:
        pytest.fail(f"the edge testbed's mail servers could not start: {error}", pytrace=False)
    yield bed
    bed.stop()


@pytest.fixture
def edge_user(edge_backends: Backends, request: pytest.FixtureRequest) -> Callable[..., User]:
    """``edge_user()`` or ``edge_user(BETA)``: a fresh account with an empty INBOX."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]

    def make(domain: str = testbed_backends.ALPHA) -> User:
        return edge_backends.add_user(f"e{next(_user_numbers)}-{slug}@{domain}")

    return make


# ---------------------------------------------------------------------------------------------------
# Proxies


@dataclass(frozen=True, slots=True)
class EdgeProxy:
    """A running proxy and the port of each of its listeners, by listener name."""

    process: proxyprocess.ProxyProcess
    ports: Mapping[str, int]

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def log_text(self) -> str:
        return self.process.log_text()

    def session_lines(self, protocol: str, user: User) -> list[str]:
        """The closing lines of ``user``'s sessions over ``protocol`` (waits for one, bounded).

        The proxy writes the line when the session has ended on both sides, a moment after the
        client saw its last reply.
        """
        deadline = time.monotonic() + LOG_WAIT
        while True:
            lines = [
                line
                for line in self.process.log_text().splitlines()
                if f"session protocol={protocol} " in line and f" user={user.address} " in line
            ]
            if lines or time.monotonic() >= deadline:
                return lines
            time.sleep(mailservers.POLL_INTERVAL)


LaunchEdgeProxy = Callable[..., EdgeProxy]


def routes_with(backends: Backends, **changes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The standard MailRoutes with protocol blocks changed, e.g. ``imap={"tls": "tls", "port": 993}``.

    ``port`` replaces the backend's Service port (a number, or a port name as a string); every
    other key is set on the block itself.
    """
    routes = [copy.deepcopy(route) for route in backends.mailroutes()]
    for route in routes:
        for protocol, change in changes.items():
            block = route["spec"][protocol]
            for key, value in change.items():
                if key == "port":
                    block["backend"]["port"] = value
                else:
                    block[key] = value
    return routes


@pytest.fixture(scope="module")
def launch_edge_proxy(edge_backends: Backends) -> Iterator[LaunchEdgeProxy]:
    """``launch_edge_proxy(name, listeners=[...], routes=[...], backend_tls={...})``: a running proxy.

    ``listeners`` are added to the four plain ones (each gets a free port); a start that failed on
    "Address already in use" is retried with fresh ports, as for every e2e proxy.
    """
    with launcher(edge_backends) as start:

        def launch(
            name: str,
            *,
            listeners: Sequence[Mapping[str, Any]] = (),
            routes: Sequence[Mapping[str, Any]] | None = None,
            backend_tls: Mapping[str, Any] | None = None,
        ) -> EdgeProxy:
            extra = {} if backend_tls is None else {"backendTls": dict(backend_tls)}
            process = start(name, listeners=listeners, routes=routes, extra=extra)
            # A refused MailRoute leaves a ready proxy that routes nothing: say so at once.
            refused = [line for line in process.log_text().splitlines() if "Accepted=False" in line]
            if refused:
                lines = "\n".join(refused)
                pytest.fail(f"mailgress proxy {name} refused routes:\n{lines}", pytrace=False)
            return EdgeProxy(process, process.settings.listener_ports())

        yield launch


# ---------------------------------------------------------------------------------------------------
# Clients that come from somewhere else


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a test client comes from, as the backend should log it.

    Without ``header`` the client socket is bound to ``address`` (a second loopback address);
    with it the client connects from 127.0.0.1 and opens with a PROXY v2 header naming ``address``
    (the way a load balancer in front of the proxy announces the real client).
    """

    address: str
    header: bool = False

    def connect(self, port: int) -> socket.socket:
        if not self.header:
            return socket.create_connection(
                (LOOPBACK, port), timeout=clients.SOCKET_TIMEOUT, source_address=(self.address, 0)
            )
        connection = socket.create_connection((LOOPBACK, port), timeout=clients.SOCKET_TIMEOUT)
        connection.sendall(proxyheader.build_v2((self.address, CLAIMED_CLIENT_PORT), (LOOPBACK, port)))
        return connection


class OriginIMAP4(imaplib.IMAP4):
    """imaplib from an ``Origin`` (``_create_socket`` is imaplib's documented override point)."""

    def __init__(self, origin: Origin, port: int) -> None:
        self._origin = origin
        super().__init__(LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return self._origin.connect(self.port)


class OriginPOP3(poplib.POP3):
    """poplib from an ``Origin``."""

    def __init__(self, origin: Origin, port: int) -> None:
        self._origin = origin
        super().__init__(LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        return self._origin.connect(self.port)


class OriginSMTP(smtplib.SMTP):
    """smtplib from an ``Origin``."""

    def __init__(self, origin: Origin, port: int) -> None:
        self._origin = origin
        super().__init__(LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._origin.connect(port)


# ---------------------------------------------------------------------------------------------------
# One real session per protocol; submission and MX return once the mail is delivered


def imap_session(backends: Backends, origin: Origin, port: int, user: User) -> None:
    with OriginIMAP4(origin, port) as client:
        client.login(user.address, user.password)
        assert client.select("INBOX", readonly=True)[0] == "OK"


def pop3_session(backends: Backends, origin: Origin, port: int, user: User) -> None:
    client = OriginPOP3(origin, port)
    try:
        client.user(user.address)
        client.pass_(user.password)
        assert client.stat()[0] == len(backends.maildir(user.address).messages())
    finally:
        client.quit()


def submission_session(backends: Backends, origin: Origin, port: int, user: User) -> None:
    """``user`` sends one message to themselves."""
    before = len(backends.maildir(user.address).messages())
    message = messages.compose(user.address, user.address, "submitted", "through the edge\n")
    with OriginSMTP(origin, port) as client:
        client.login(user.address, user.password)
        client.sendmail(user.address, [user.address], message)
    backends.wait_delivered(user.address, before + 1)


def mx_session(backends: Backends, origin: Origin, port: int, user: User) -> None:
    """Someone elsewhere sends ``user`` one message."""
    before = len(backends.maildir(user.address).messages())
    sender = "someone@sender.example"
    with OriginSMTP(origin, port) as client:
        client.sendmail(sender, [user.address], messages.compose(sender, user.address, "inbound"))
    backends.wait_delivered(user.address, before + 1)


Session = Callable[[Backends, Origin, int, User], None]
SESSIONS: dict[str, Session] = {
    "imap": imap_session,
    "pop3": pop3_session,
    "submission": submission_session,
    "smtp": mx_session,
}


# ---------------------------------------------------------------------------------------------------
# What the backends logged


def dovecot_login_line(dovecot: mailservers.Dovecot, user: User, protocol: str) -> str:
    """Dovecot's one ``Login:`` line for ``user`` over ``protocol`` (waits for it, bounded)."""
    dovecot.wait_logins(user.address, 1, protocol, timeout=LOG_WAIT)
    marker = f"{protocol}-login: Info: Login: user=<{user.address}>,"
    lines = [line for line in dovecot.log_text().splitlines() if marker in line]
    assert len(lines) == 1, f"{len(lines)} logins of {user.address} over {protocol}"
    return lines[0]


def remote_ip(login_line: str) -> str:
    """The ``rip=`` (the client address as Dovecot took it) of a ``Login:`` line."""
    match = re.search(r", rip=([0-9A-Fa-f.:]+),", login_line)
    assert match is not None, login_line
    return match.group(1)


_CLIENT_LINE = r"\]: (?P<queue_id>[0-9A-F]+): client=[^\s\[]*\[(?P<address>[^\]]+)\]"


def postfix_submission_client(postfix: mailservers.Postfix, user: User) -> list[str]:
    """The client address of each message ``user`` submitted, as Postfix logged it (``client=``)."""
    sasl = f", sasl_username={user.address}"
    postfix.wait_log(sasl, timeout=LOG_WAIT)
    pattern = re.compile(_CLIENT_LINE + r", sasl_method=\S+" + re.escape(sasl) + "$")
    return [match["address"] for line in postfix.log_text().splitlines() if (match := pattern.search(line))]


def postfix_delivery_client(postfix: mailservers.Postfix, recipient: User) -> list[str]:
    """The client address of each message delivered to ``recipient``, as Postfix logged it."""
    delivered = f": to=<{recipient.address}>,"
    postfix.wait_log(delivered, timeout=LOG_WAIT)
    lines = postfix.log_text().splitlines()
    queue_ids = {line.split(delivered)[0].rsplit(" ", 1)[-1] for line in lines if delivered in line}
    pattern = re.compile(_CLIENT_LINE)
    return [
        match["address"]
        for line in lines
        if (match := pattern.search(line)) and match["queue_id"] in queue_ids
    ]


def logged_client_address(backends: Backends, protocol: str, user: User) -> str:
    """The client address the backend logged for ``user``'s one session over ``protocol``."""
    if protocol in ("imap", "pop3"):
        return remote_ip(dovecot_login_line(backends.dovecot_for(user.address), user, protocol))
    clients_logged = (
        postfix_submission_client(backends.postfix, user)
        if protocol == "submission"
        else postfix_delivery_client(backends.postfix, user)
    )
    assert len(clients_logged) == 1, clients_logged
    return clients_logged[0]


# ---------------------------------------------------------------------------------------------------
# Certificates as the clients see them


def serial_of(pem: bytes) -> int:
    """The serial number of the first PEM certificate in ``pem`` (``openssl x509 -serial``)."""
    result = subprocess.run(
        ["openssl", "x509", "-noout", "-serial"],
        input=pem,
        capture_output=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )
    text = result.stdout.decode().strip()
    assert result.returncode == 0 and text.startswith("serial="), result.stderr.decode()
    return int(text.removeprefix("serial="), 16)
