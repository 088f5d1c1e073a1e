"""Fixtures for the security sweeps: ``mailgress proxy`` processes in front of the testbed's servers.

``launch_proxy(name, routes=..., services=..., extra=...)`` is the e2e ``start_proxy`` with a
shorter pre-login timeout (a sweep may set its own ``limits`` through ``extra``): the shared
``helpers.launch`` writes standalone settings under the session's testbed folder and starts the
proxy at debug log level with its whole output in a file the sweeps read; when the module ends
each proxy is stopped with the e2e ``stop``, which fails on any password in that log. Limits
default to the e2e ones, out of reach (every client here is 127.0.0.1). Routes default to the
testbed's standard ones; ``with_client_info`` gives them a ``clientInfo`` per protocol.
"""

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from testbed import backends as testbed_backends
from tests.e2e.helpers import StartProxy, launcher

# Short enough that the sweeps' stalled clients are timed out within seconds.
PRE_LOGIN_TIMEOUT = 3


def with_client_info(routes: Sequence[Mapping[str, Any]], **client_info: str) -> list[dict[str, Any]]:
    """Copies of ``routes`` whose protocol blocks carry ``clientInfo`` (``smtp="xclient"``...)."""
    changed = [copy.deepcopy(dict(route)) for route in routes]
    for route in changed:
        for protocol, mode in client_info.items():
            if protocol in route["spec"]:
                route["spec"][protocol]["clientInfo"] = mode
    return changed


@pytest.fixture(scope="module")
def launch_proxy(backends: testbed_backends.Backends) -> Iterator[StartProxy]:
    """Start proxies for one module; each is stopped (and its processes gone) when the module ends."""
    with launcher(backends, common={"timeouts": {"preLogin": PRE_LOGIN_TIMEOUT}}) as start:
        yield start
