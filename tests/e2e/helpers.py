"""Small pieces the end-to-end tests share: "the proxy still serves", login counts, leak search."""

from collections.abc import Callable, Mapping

from testbed import backends as testbed_backends
from testbed import clients, proxyprocess

# The type of the ``start_proxy`` fixture: start_proxy(name, services=..., routes=...).
StartProxy = Callable[..., proxyprocess.ProxyProcess]


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


def passwords(backends: testbed_backends.Backends) -> dict[str, str]:
    """Every testbed user's password by address (to search for, never to print)."""
    return {address: user.password for address, user in backends.users.items()}
