"""End-to-end fixtures: ``mailgress proxy`` as a real process in front of the testbed's servers.

``proxy`` runs one proxy for the whole session with the standard routes (alpha.example on
Dovecot alpha, beta.example on Dovecot beta, both on Postfix) on free ports, waits for /readyz,
captures its stdout/stderr (at debug level) to a file next to its settings, and stops it at the
end. ``start_proxy`` runs extra proxies with other services, routes or settings for one module
(fail-over, live route edits) and stops them with the module. Both start through
``helpers.launch``, the launcher every e2e suite shares. A proxy that cannot start fails the tests
that need it with its log; nothing is skipped. Every proxy's whole log is searched for the
testbed's passwords when it stops: a leak anywhere in the session fails its teardown.
"""

from collections.abc import Iterator

import pytest

from testbed import backends as testbed_backends
from testbed import proxyprocess
from tests.e2e.helpers import StartProxy, launch, launcher, stop


@pytest.fixture(scope="session")
def proxy(backends: testbed_backends.Backends) -> Iterator[proxyprocess.ProxyProcess]:
    """The proxy with the standard routes and services, for the whole session."""
    running = launch(backends, "proxy")
    yield running
    stop(running, backends)


@pytest.fixture(scope="module")
def start_proxy(backends: testbed_backends.Backends) -> Iterator[StartProxy]:
    """``start_proxy(name, services=..., routes=..., extra=...)``: another proxy, stopped with the module."""
    with launcher(backends) as start:
        yield start
