"""Fixtures for the security sweeps: ``mailgress proxy`` processes in front of the testbed's servers.

``launch_proxy(name, routes=..., services=..., extra=...)`` is the e2e ``launch`` plus more
settings (a sweep sets its own ``limits``): it writes standalone settings under the session's
testbed folder, starts the proxy at debug log level with its whole output in a file the sweeps
read, and when the module ends stops it with the e2e ``stop``, which fails on any password in that
log. Limits default to the e2e ones, out of reach (every client here is 127.0.0.1). Routes default
to the testbed's standard ones; ``with_client_info`` gives them a ``clientInfo`` per protocol.
"""

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from testbed import backends as testbed_backends
from testbed import proxyprocess
from tests.e2e.conftest import TEST_LIMITS, stop

SERVER_NAME = "mailgress.test"
# Short enough that the sweeps' stalled clients are timed out within seconds.
PRE_LOGIN_TIMEOUT = 3

LaunchProxy = Callable[..., proxyprocess.ProxyProcess]


def with_client_info(routes: Sequence[Mapping[str, Any]], **client_info: str) -> list[dict[str, Any]]:
    """Copies of ``routes`` whose protocol blocks carry ``clientInfo`` (``smtp="xclient"``...)."""
    changed = [copy.deepcopy(dict(route)) for route in routes]
    for route in changed:
        for protocol, mode in client_info.items():
            if protocol in route["spec"]:
                route["spec"][protocol]["clientInfo"] = mode
    return changed


@pytest.fixture(scope="module")
def launch_proxy(backends: testbed_backends.Backends) -> Iterator[LaunchProxy]:
    """Start proxies for one module; each is stopped (and its processes gone) when the module ends."""
    started: list[proxyprocess.ProxyProcess] = []

    def launch(
        name: str,
        *,
        routes: Sequence[Mapping[str, Any]] | None = None,
        services: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> proxyprocess.ProxyProcess:
        directory = backends.directory / name
        settings = backends.write_proxy_settings(
            directory,
            routes=routes,
            services=services,
            extra={
                "serverName": SERVER_NAME,
                "timeouts": {"preLogin": PRE_LOGIN_TIMEOUT},
                "limits": TEST_LIMITS,
                **(extra or {}),
            },
        )
        proxy = proxyprocess.ProxyProcess(settings, directory / "mailgress.log", log_level="debug")
        try:
            proxy.start()
        except proxyprocess.ProxyError as error:
            pytest.fail(f"mailgress proxy {name} could not start: {error}", pytrace=False)
        started.append(proxy)
        return proxy

    yield launch
    for proxy in started:
        stop(proxy, backends)
