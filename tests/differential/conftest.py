"""Differential fixtures: nginx's mail module and mailgress behind one auth_http service.

``reference`` is a private nginx (testbed.nginx) and ``candidate`` a ``mailgress proxy`` process
(standalone, every route with auth mode http), both in front of the session's Dovecot and
Postfix, both asking the same ``auth`` service (testbed.authservice), started once per module.
Each offers IMAP (with STARTTLS, certificate from a throw-away CA), POP3, submission and an MX
on 127.0.0.1. ``both`` runs one client script against each in turn and returns what the client
saw and what the auth service received, for the tests to compare.

Configured alike on purpose: nginx with ``proxy_smtp_auth on`` (it logs in to Postfix's
submission with AUTH PLAIN, as mailgress does) and ``proxy_pass_error_message on``; both with a
2-second auth timeout. mailgress runs without its failed-login throttle and without its
refusal-time hold (nginx has neither, and the tests fail logins on purpose from one address; no
test here compares timing).
"""

import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import authservice, nginx, proxyprocess, proxysettings, tlscerts
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK, MailServerError

AUTH_TIMEOUT = 2.0
PRE_LOGIN_TIMEOUT = 30
# The name both proxies' certificates carry: clients connect to 127.0.0.1 and check it.
CERTIFICATE_NAMES = [LOOPBACK]


@dataclass(frozen=True, slots=True)
class Target:
    """A proxy under test: its name and its listener ports by listener name."""

    name: str
    ports: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Run:
    """One script's run against one target: what the client saw, what the auth service received."""

    seen: list[Any]
    requests: list[authservice.Received]

    @property
    def headers(self) -> list[tuple[tuple[str, str], ...]]:
        """Every request's header lines in order: what "header for header" compares."""
        return [request.headers for request in self.requests]


@pytest.fixture(scope="module")
def tls_files(backends: Backends) -> tlscerts.IssuedCertificate:
    authority = tlscerts.TestAuthority(backends.directory / "differential-ca")
    return authority.issue("proxies", CERTIFICATE_NAMES)


@pytest.fixture(scope="module")
def client_tls(backends: Backends, tls_files: tlscerts.IssuedCertificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(backends.directory / "differential-ca" / "ca.crt"))


@pytest.fixture(scope="module")
def auth(backends: Backends) -> Iterator[authservice.AuthService]:
    """The shared auth service; tests set ``answer`` and reset it to the testbed answer after."""
    with authservice.AuthService(authservice.for_backends(backends)) as service:
        yield service


@pytest.fixture
def answer(
    auth: authservice.AuthService, backends: Backends
) -> Iterator[Callable[[authservice.Answer], None]]:
    """``answer(fn)``: script the auth service for this test only."""

    def script(fn: authservice.Answer) -> None:
        auth.answer = fn

    yield script
    auth.answer = authservice.for_backends(backends)


@pytest.fixture(scope="module")
def reference(
    backends: Backends, auth: authservice.AuthService, tls_files: tlscerts.IssuedCertificate
) -> Iterator[Target]:
    listeners = (
        nginx.MailListener("imap", "imap", starttls="on"),
        nginx.MailListener("pop3", "pop3"),
        nginx.MailListener("submission", "smtp"),
        nginx.MailListener("mx", "smtp", smtp_auth=("none",)),
    )
    server = nginx.Nginx(
        backends.directory / "differential-nginx",
        nginx.AuthHttp(auth.url, timeout=AUTH_TIMEOUT),
        listeners=listeners,
        proxy_smtp_auth=True,
        certificate=nginx.Certificate(tls_files.cert, tls_files.key),
    )
    try:
        server.start()
    except MailServerError as error:
        pytest.fail(f"nginx with its mail module could not start: {error}", pytrace=False)
    yield Target("nginx", {listener.name: server.port(listener.name) for listener in listeners})
    server.stop()


def mailroutes(backends: Backends, url: str) -> list[dict[str, Any]]:
    """The testbed's MailRoutes, each with auth mode http on ``url``."""
    routes = backends.mailroutes()
    for route in routes:
        route["spec"]["auth"] = {"mode": "http", "http": {"url": url, "timeout": f"{AUTH_TIMEOUT:g}s"}}
    return routes


@pytest.fixture(scope="module")
def candidate(
    backends: Backends, auth: authservice.AuthService, tls_files: tlscerts.IssuedCertificate
) -> Iterator[Target]:
    directory: Path = backends.directory / "differential-mailgress"
    ports = proxysettings.ProxyPorts.free()
    listeners = [
        {
            "name": name,
            "protocol": protocol,
            "address": LOOPBACK,
            "port": ports.listener_port(protocol),
        }
        for protocol, name in proxysettings.LISTENER_NAMES.items()
    ]
    listeners[0].update(
        tls="starttls", certificates=[{"cert": str(tls_files.cert), "key": str(tls_files.key)}]
    )
    settings = backends.write_proxy_settings(
        directory,
        ports=ports,
        routes=mailroutes(backends, auth.url),
        extra={
            "serverName": "mailgress.test",
            "listeners": listeners,
            "timeouts": {"preLogin": PRE_LOGIN_TIMEOUT},
            "limits": {
                "failedLogins": {"firstDelay": 0, "perUser": 10_000, "perIp": 10_000, "refusalTime": 0}
            },
        },
    )
    proxy = proxyprocess.ProxyProcess(settings, directory / "mailgress.log", log_level="debug")
    try:
        proxy.start()
    except proxyprocess.ProxyError as error:
        pytest.fail(f"mailgress could not start: {error}", pytrace=False)
    names = {protocol: name for protocol, name in proxysettings.LISTENER_NAMES.items()}
    yield Target("mailgress", {names[protocol]: ports.listener_port(protocol) for protocol in names})
    proxy.stop()


Both = Callable[[Callable[[Target], list[Any]]], tuple[Run, Run]]


@pytest.fixture
def both(reference: Target, candidate: Target, auth: authservice.AuthService) -> Both:
    """``both(script)``: run ``script(target)`` against nginx, then mailgress; (nginx, mailgress)."""

    def run(script: Callable[[Target], list[Any]]) -> tuple[Run, Run]:
        runs = []
        for target in (reference, candidate):
            auth.clear()
            seen = script(target)
            runs.append(Run(seen, auth.requests))
        return runs[0], runs[1]

    return run
