"""The real client address reaches the real backends, as their own logs prove.

A client bound to 127.0.0.2 logs in (or hands over mail) through the proxy, which itself talks to
the backends from 127.0.0.1. For every forwarding mode a route offers, the backend's own log names
127.0.0.2: Dovecot's ``rip=`` after IMAP ID or POP3 XCLIENT, and after a PROXY v2 header on its
haproxy listener; Postfix's ``client=`` after XCLIENT and after a PROXY v2 header on its
``smtpd_upstream_proxy_protocol`` listener, for submission and for the inbound MX. The same holds
when a load balancer in front of the proxy announces the client (192.0.2.7) in a PROXY header on a
listener that trusts it. Without forwarding, the same logs name the proxy: the check can fail.
Postfix's Received header pairs the inbound client's EHLO name with its address whenever it has
that address (XCLIENT, PROXY v2), and the proxy's name with the proxy's address otherwise.
"""

import re
import smtplib
from collections.abc import Callable

import pytest

from testbed import messages
from testbed.backends import ALPHA, HAPROXY_SERVICE_PORTS, Backends
from testbed.mailservers import User
from tests.e2e.helpers import SERVER_NAME
from tests.e2e_edge.conftest import (
    SESSIONS,
    EdgeProxy,
    LaunchEdgeProxy,
    Origin,
    OriginSMTP,
    logged_client_address,
    routes_with,
)

NewUser = Callable[..., User]
PROTOCOLS = ("imap", "pop3", "submission", "smtp")
# What a route uses when it forwards the client in the protocol's own words.
NATIVE = {"imap": "id", "pop3": "xclient", "submission": "xclient", "smtp": "xclient"}
ORIGINS = {
    "client-on-127.0.0.2": Origin("127.0.0.2"),
    "proxy-header-naming-192.0.2.7": Origin("192.0.2.7", header=True),
}
# The proxy's own address towards the backends.
PROXY_ADDRESS = "127.0.0.1"
# Listeners that take a PROXY header from the test (which connects from 127.0.0.1) alone.
HEADER_LISTENERS = [
    {"name": f"{protocol}-pp", "protocol": protocol, "proxyProtocol": {"trustedCidrs": ["127.0.0.1/32"]}}
    for protocol in PROTOCOLS
]


def listener(protocol: str, origin: Origin) -> str:
    """The proxy listener an origin uses: the plain one, or the one that trusts a PROXY header."""
    plain = {"imap": "imap", "pop3": "pop3", "submission": "submission", "smtp": "mx"}
    return f"{protocol}-pp" if origin.header else plain[protocol]


@pytest.fixture(scope="module")
def proxies(launch_edge_proxy: LaunchEdgeProxy, edge_backends: Backends) -> dict[str, EdgeProxy]:
    """One proxy per forwarding mode: none, each protocol's native one, and PROXY v2 for all."""
    return {
        "none": launch_edge_proxy("client-ip-none", listeners=HEADER_LISTENERS),
        "native": launch_edge_proxy(
            "client-ip-native",
            listeners=HEADER_LISTENERS,
            routes=routes_with(edge_backends, **{p: {"clientInfo": NATIVE[p]} for p in PROTOCOLS}),
        ),
        "proxy-v2": launch_edge_proxy(
            "client-ip-proxy-v2",
            listeners=HEADER_LISTENERS,
            routes=routes_with(
                edge_backends,
                **{p: {"clientInfo": "proxy-v2", "port": HAPROXY_SERVICE_PORTS[p]} for p in PROTOCOLS},
            ),
        ),
    }


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("mode", ["native", "proxy-v2"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_backend_logs_the_real_client_address(
    proxies: dict[str, EdgeProxy],
    edge_backends: Backends,
    edge_user: NewUser,
    protocol: str,
    mode: str,
    origin: str,
) -> None:
    client = ORIGINS[origin]
    port = proxies[mode].port(listener(protocol, client))
    user = edge_user()
    SESSIONS[protocol](edge_backends, client, port, user)
    assert logged_client_address(edge_backends, protocol, user) == client.address


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_client_info_the_backend_logs_the_proxy(
    proxies: dict[str, EdgeProxy], edge_backends: Backends, edge_user: NewUser, protocol: str, origin: str
) -> None:
    client = ORIGINS[origin]
    port = proxies["none"].port(listener(protocol, client))
    user = edge_user()
    SESSIONS[protocol](edge_backends, client, port, user)
    assert logged_client_address(edge_backends, protocol, user) == PROXY_ADDRESS


@pytest.mark.parametrize("origin", ORIGINS)
def test_the_proxy_logs_the_real_client_address(
    proxies: dict[str, EdgeProxy], edge_backends: Backends, edge_user: NewUser, origin: str
) -> None:
    client = ORIGINS[origin]
    user = edge_user()
    proxy = proxies["native"]
    SESSIONS["imap"](edge_backends, client, proxy.port(listener("imap", client)), user)
    (closing,) = proxy.session_lines("imap", user)
    assert f" client={client.address}:" in closing


@pytest.mark.parametrize("mode", ["native", "proxy-v2", "none"])
def test_the_mx_backend_hears_the_clients_ehlo_name_with_its_address(
    proxies: dict[str, EdgeProxy], edge_backends: Backends, edge_user: NewUser, mode: str
) -> None:
    """Review M5 #6: Postfix's Received header pairs the client's EHLO name with the client's
    address after XCLIENT and behind a PROXY header, and the proxy's name with the proxy's
    address otherwise; before, a PROXY header paired the proxy's name with the client's address."""
    client = ORIGINS["client-on-127.0.0.2"]
    user = edge_user()
    SESSIONS["smtp"](edge_backends, client, proxies[mode].port(listener("smtp", client)), user)
    (delivered,) = edge_backends.wait_delivered(user.address, 1)
    received = re.search(rb"^Received: from (\S+) \([^\[]*\[([^\]]+)\]\)", delivered, re.MULTILINE)
    assert received is not None, delivered[:300]
    # smtplib's EHLO name (OriginSMTP leaves it to smtplib; an SMTP without a host connects nowhere).
    expected = (
        (SERVER_NAME, PROXY_ADDRESS) if mode == "none" else (smtplib.SMTP().local_hostname, client.address)
    )
    assert (received[1].decode(), received[2].decode()) == expected


def test_a_logged_in_submission_client_cannot_send_its_own_xclient(
    proxies: dict[str, EdgeProxy], edge_backends: Backends, edge_user: NewUser
) -> None:
    """Postfix obeys XCLIENT from the proxy's address at any time outside a transaction
    (smtpd_authorized_xclient_hosts). Behind a relayed login, a client's own ``XCLIENT
    ADDR=... LOGIN=...`` reached Postfix, which then took the client for another address and
    another user: the proxy answers it and Postfix never hears it."""
    client = ORIGINS["client-on-127.0.0.2"]
    user = edge_user()
    forged = "192.0.2.99"
    with OriginSMTP(client, proxies["native"].port(listener("submission", client))) as smtp:
        smtp.login(user.address, user.password)
        code, _ = smtp.docmd(f"XCLIENT ADDR={forged} LOGIN=someone.else@{ALPHA}")
        assert code == 500
        smtp.sendmail(
            user.address, [user.address], messages.compose(user.address, user.address, "after", "x\n")
        )
    edge_backends.wait_delivered(user.address, 1)
    assert logged_client_address(edge_backends, "submission", user) == client.address
    assert forged not in edge_backends.postfix.log_text()
