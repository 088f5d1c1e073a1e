"""auth_http ``headersFrom`` through a real ``mailgress proxy`` in standalone mode: the settings'
``secrets`` stand in for the labelled Secrets, and the proxy sends the value to a real auth_http
service (the testbed's, which then names the login's Dovecot); a route whose Secret the settings
lack gets the temporary failure, not another route's backend. The value is in neither the proxy's
log nor what ``routes check`` prints.

alpha.example's route reads its key from ``mail/auth-key``, beta.example's from a Secret that is
not there.
"""

import imaplib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from testbed import authservice, clients, proxyprocess
from testbed.backends import ALPHA, BETA, Backends
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import StartProxy

SECRET_VALUE = "e2e-Auth-Key-Rq4v"
KEY_HEADER = "X-Auth-Key"


def keyed_auth(url: str, secret: str) -> dict[str, Any]:
    return {
        "mode": "http",
        "http": {
            "url": url,
            "headersFrom": [{"name": KEY_HEADER, "secretKeyRef": {"name": secret, "key": "key"}}],
        },
    }


@pytest.fixture(scope="module")
def auth_service(backends: Backends) -> Iterator[authservice.AuthService]:
    with authservice.AuthService(authservice.for_backends(backends)) as service:
        yield service


@pytest.fixture(scope="module")
def keyed_proxy(
    start_proxy: StartProxy, backends: Backends, auth_service: authservice.AuthService
) -> ProxyProcess:
    routes = backends.mailroutes()
    assert [route["spec"]["domains"] for route in routes] == [[ALPHA], [BETA]]
    routes[0]["spec"]["auth"] = keyed_auth(auth_service.url, "auth-key")
    routes[1]["spec"]["auth"] = keyed_auth(auth_service.url, "not-there")
    return start_proxy(
        "proxy-headers-from", routes=routes, extra={"secrets": {"mail/auth-key": {"key": SECRET_VALUE}}}
    )


def test_the_value_reaches_the_auth_service(
    keyed_proxy: ProxyProcess, backends: Backends, auth_service: authservice.AuthService
) -> None:
    anna = backends.user(f"anna@{ALPHA}")
    auth_service.clear()
    with clients.imap(keyed_proxy.settings.ports.imap) as client:
        client.login(anna.address, anna.password)
        assert client.select("INBOX", readonly=True)[0] == "OK"
    [received] = auth_service.requests
    assert received.user == anna.address
    assert received.header(KEY_HEADER) == SECRET_VALUE


def test_a_route_without_its_secret_fails_temporarily(
    keyed_proxy: ProxyProcess, backends: Backends, auth_service: authservice.AuthService
) -> None:
    bob = backends.user(f"bob@{BETA}")
    auth_service.clear()
    with (
        clients.imap(keyed_proxy.settings.ports.imap) as client,
        pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"),
    ):
        client.login(bob.address, bob.password)
    assert auth_service.requests == []  # no auth_http request without its header
    assert "headersFrom X-Auth-Key: Secret mail/not-there not found" in keyed_proxy.log_text()


def test_the_value_is_never_logged_nor_printed(keyed_proxy: ProxyProcess, backends: Backends) -> None:
    anna = backends.user(f"anna@{ALPHA}")
    with clients.imap(keyed_proxy.settings.ports.imap) as client:
        client.login(anna.address, anna.password)
    assert keyed_proxy.settings.routes_path is not None
    check = subprocess.run(
        [
            *proxyprocess.mailgress_command(),
            "routes",
            "check",
            str(keyed_proxy.settings.routes_path),
            "--settings",
            str(keyed_proxy.settings.path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert f'"{KEY_HEADER}",\n' in check.stdout  # the table is printed, its header named
    assert SECRET_VALUE not in check.stdout + check.stderr
    assert SECRET_VALUE not in keyed_proxy.log_text()
