"""What the end-to-end suites share: one proxy launcher, "the proxy still serves", login counts, leak search.

``launch`` starts every ``mailgress proxy`` process of tests/e2e, tests/security and tests/e2e_edge
(settings written under a testbed folder, debug log in a file beside them, a start that lost its
ports to a race retried); ``stop`` stops one and fails if its log holds a testbed password;
``launcher`` starts a module's proxies and stops them all when the module ends. Fixtures live in
each suite's conftest; this module has none, so that every suite can import it.
"""

import base64
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from testbed import backends as testbed_backends
from testbed import clients, mailservers, proxyprocess, proxysettings

# The type of the ``start_proxy`` fixtures: start_proxy(name, services=..., routes=..., extra=...).
StartProxy = Callable[..., proxyprocess.ProxyProcess]

SERVER_NAME = "mailgress.test"
# Short enough that "a client that stops mid-command is closed" is observed within a test's
# socket timeout (clients.SOCKET_TIMEOUT), long enough for any real login on a busy machine.
PRE_LOGIN_TIMEOUT = 5
# Every test client comes from 127.0.0.1 and many fail logins on purpose: the proxy's abuse limits
# (proxy/server/limits.py) would lock the whole suite out, so they are set out of reach here. A
# refused login is answered at once: held to the default refusalTime (2 s), each refusal would
# cost its test that long, and no test here is about the hold (tests/proxy/server checks it; the
# proxies of tests/e2e_push and tests/kube, started by testbed.proxyfleet, keep the default).
TEST_LIMITS = {
    "connectionsPerIp": 10_000,
    "failedLogins": {"perUser": 100_000, "perIp": 100_000, "firstDelay": 0, "refusalTime": 0},
}


def launch(
    backends: testbed_backends.Backends,
    name: str,
    *,
    services: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    routes: Sequence[Mapping[str, Any]] | None = None,
    listeners: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> proxyprocess.ProxyProcess:
    """Write settings under the testbed folder and start a proxy; pytest.fail with its log if it won't.

    Args:
        backends: the testbed the proxy fronts; the settings go to its folder, under ``name``.
        name: the proxy's folder (settings, route file, mailgress.log).
        services, routes: as ``Backends.write_proxy_settings`` takes them (default: the standard ones).
        listeners: more listeners beside the four plain ones, each given 127.0.0.1 and a free port
            (the returned proxy's ``settings.listener_ports()`` says which).
        extra: top-level settings merged over the test ones (SERVER_NAME, PRE_LOGIN_TIMEOUT,
            TEST_LIMITS): a key given here replaces that key whole.

    A free port can be taken by another process between choosing and binding it: a start that
    failed on "Address already in use" is retried with fresh ports.
    """
    directory = backends.directory / name
    attempt = 1
    while True:
        ports = proxysettings.ProxyPorts.free()
        settings = backends.write_proxy_settings(
            directory,
            ports=ports,
            services=services,
            routes=routes,
            extra={
                "listeners": proxysettings.listeners(ports, listeners),
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
            if "Address already in use" not in str(error) or attempt == mailservers.START_ATTEMPTS:
                pytest.fail(f"mailgress proxy {name} could not start: {error}", pytrace=False)
            attempt += 1
        else:
            return proxy


def stop(proxy: proxyprocess.ProxyProcess, backends: testbed_backends.Backends) -> None:
    """Stop the proxy, then fail if its log holds any testbed password."""
    proxy.stop()
    # Decoded as the testbed holds 8-bit passwords (surrogate escapes), so their octets can match.
    log = proxy.log_path.read_bytes().decode("utf-8", mailservers.PASSWORD_ERRORS)
    leaks = leaked(log, passwords(backends))
    if leaks:
        pytest.fail(f"passwords of {', '.join(leaks)} are in {proxy.log_path}", pytrace=False)


@contextlib.contextmanager
def launcher(
    backends: testbed_backends.Backends, *, common: Mapping[str, Any] | None = None
) -> Iterator[StartProxy]:
    """``start(name, **options)``: ``launch`` in front of ``backends``; each proxy is ``stop``ped at the end.

    ``common`` holds settings for every proxy started here; a start's own ``extra`` is merged over it.
    """
    started: list[proxyprocess.ProxyProcess] = []

    def start(
        name: str, *, extra: Mapping[str, Any] | None = None, **options: Any
    ) -> proxyprocess.ProxyProcess:
        started.append(launch(backends, name, extra={**(common or {}), **(extra or {})}, **options))
        return started[-1]

    yield start
    for proxy in started:
        stop(proxy, backends)


def serves_imap(proxy: proxyprocess.ProxyProcess, backends: testbed_backends.Backends) -> bool:
    """True if a well-behaved client logs in through ``proxy`` and gets an answer to NOOP."""
    anna = backends.user("anna@alpha.example")
    with clients.imap(proxy.settings.ports.imap) as client:
        client.login(anna.address, anna.password)
        return client.noop()[0] == "OK"


def login_count(backends: testbed_backends.Backends, domain: str, address: str, protocol: str) -> int:
    """How many logins of ``address`` over ``protocol`` the Dovecot of ``domain`` has logged."""
    return len(
        [
            login
            for login in backends.dovecots[domain].logins()
            if login.user == address and login.protocol == protocol
        ]
    )


def leaked(text: str, secrets: Mapping[str, str]) -> list[str]:
    """The names of the secrets that show in ``text``: in the clear, IMAP-quoted or inside base64."""
    return sorted(name for name, secret in secrets.items() if clients.redact(text, [secret]) != text)


# Latin-1 "sésame": 0xE9 is no UTF-8. Held as testbed passwords hold octets (mailservers.PASSWORD_ERRORS).
LATIN1 = mailservers.password_text("s\u00e9same".encode("latin-1"))


def latin1_user(backends: testbed_backends.Backends, name: str, domain: str) -> mailservers.User:
    """A new account ``name@domain`` (``name`` unused so far) whose password ends in Latin-1 octets.

    The password starts with its own ASCII part, the testbed marker and ``name``:
    ``octets_in_log`` looks for that part too, since a log decoded as text cannot show the octets.
    """
    return backends.add_user(f"{name}@{domain}", f"{ascii_part(name, domain)}{LATIN1}")


def ascii_part(name: str, domain: str) -> str:
    return f"{domain.partition('.')[0]}{testbed_backends.PASSWORD_MARKER}{name}-"


def sasl_plain(address: str, password: bytes) -> bytes:
    """The base64 SASL PLAIN response for any password octets (``clients.sasl_plain`` takes a User)."""
    return base64.b64encode(b"\0" + address.encode() + b"\0" + password)


def octets_in_log(proxy: proxyprocess.ProxyProcess, user: mailservers.User) -> bool:
    """True if the proxy's log holds ``user``'s password octets or the ASCII part of them."""
    log = proxy.log_path.read_bytes()
    return user.octets in log or ascii_part(user.local, user.domain).encode() in log


def passwords(backends: testbed_backends.Backends) -> dict[str, str]:
    """Every testbed user's password by address (to search for, never to print)."""
    return {address: user.password for address, user in backends.users.items()}
