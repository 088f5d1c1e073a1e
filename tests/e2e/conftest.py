"""End-to-end fixtures: ``mailgress proxy`` as a real process in front of the testbed's servers.

``proxy`` runs one proxy for the whole session with the standard routes (alpha.example on
Dovecot alpha, beta.example on Dovecot beta, both on Postfix) on free ports, waits for /readyz,
captures its stdout/stderr (at debug level) to a file next to its settings, and stops it at the
end. ``start_proxy`` runs extra proxies with other services or routes for one module (fail-over,
live route edits) and stops them with the module. A proxy that cannot start fails the tests
that need it with its log; nothing is skipped. Every proxy's whole log is searched for the
testbed's passwords when it stops: a leak anywhere in the session fails its teardown.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from testbed import backends as testbed_backends
from testbed import mailservers, proxyprocess
from tests.e2e.helpers import StartProxy, leaked, passwords

# Short enough that "a client that stops mid-command is closed" is observed within a test's
# socket timeout (clients.SOCKET_TIMEOUT), long enough for any real login on a busy machine.
PRE_LOGIN_TIMEOUT = 5
# Every test client comes from 127.0.0.1 and many fail logins on purpose: the proxy's abuse limits
# (proxy/server/limits.py) would lock the whole suite out, so they are set out of reach here.
TEST_LIMITS = {
    "connectionsPerIp": 10_000,
    "failedLogins": {"perUser": 100_000, "perIp": 100_000, "firstDelay": 0},
}


def launch(
    backends: testbed_backends.Backends,
    name: str,
    *,
    services: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    routes: Sequence[Mapping[str, Any]] | None = None,
) -> proxyprocess.ProxyProcess:
    """Write settings under the testbed folder and start a proxy; pytest.fail with its log if it won't.

    A free port can be taken by another process between choosing and binding it: a start that
    failed on "Address already in use" is retried with fresh ports.
    """
    directory = backends.directory / name
    attempt = 1
    while True:
        settings = backends.write_proxy_settings(
            directory,
            services=services,
            routes=routes,
            extra={
                "serverName": "mailgress.test",
                "timeouts": {"preLogin": PRE_LOGIN_TIMEOUT},
                "limits": TEST_LIMITS,
            },
        )
        proxy = proxyprocess.ProxyProcess(settings, directory / "mailgress.log", log_level="debug")
        try:
            proxy.start()
        except proxyprocess.ProxyError as error:
            if "Address already in use" not in str(error) or attempt == mailservers.START_ATTEMPTS:
                pytest.fail(f"mailgress proxy {name} could not start: {error}", pytrace=False)
            attempt += 1
        else:
            return proxy


def stop(proxy: proxyprocess.ProxyProcess, backends: testbed_backends.Backends) -> None:
    """Stop the proxy, then fail if its log holds any testbed password."""
    proxy.stop()
    leaks = leaked(proxy.log_text(), passwords(backends))
    if leaks:
        pytest.fail(f"passwords of {', '.join(leaks)} are in {proxy.log_path}", pytrace=False)


@pytest.fixture(scope="session")
def proxy(backends: testbed_backends.Backends) -> Iterator[proxyprocess.ProxyProcess]:
    """The proxy with the standard routes and services, for the whole session."""
    running = launch(backends, "proxy")
    yield running
    stop(running, backends)


@pytest.fixture(scope="module")
def start_proxy(backends: testbed_backends.Backends) -> Iterator[StartProxy]:
    """``start_proxy(name, services=..., routes=...)``: another proxy, stopped with the module."""
    started: list[proxyprocess.ProxyProcess] = []

    def start(
        name: str,
        *,
        services: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        routes: Sequence[Mapping[str, Any]] | None = None,
    ) -> proxyprocess.ProxyProcess:
        started.append(launch(backends, name, services=services, routes=routes))
        return started[-1]

    yield start
    for running in started:
        stop(running, backends)
