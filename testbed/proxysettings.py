"""Standalone proxy settings files and MailRoute manifests, written for a proxy in front of a testbed.

Writes the format ``proxy/settings.py`` reads (listeners, admin, routes, services, plus any other
top-level keys a caller passes) and MailRoute manifests in the form users ``kubectl apply``.
Called by ``backends.Backends.write_proxy_settings``, the e2e tests (which also rewrite route files
to test live edits, add listeners and read back the ports they got) and the demo. Writes and reads
files only; never starts anything and never holds a password.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed import mailservers

MAILROUTE_API_VERSION = "mailgress.io/v1alpha1"
SETTINGS_NAME = "mailgress.yaml"
ROUTES_NAME = "mailroutes.yaml"
# Listener names in the settings file, per protocol (the README's example uses these).
LISTENER_NAMES = {"imap": "imap", "pop3": "pop3", "submission": "submission", "smtp": "mx"}


@dataclass(frozen=True, slots=True)
class ProxyPorts:
    """The proxy's listening ports on 127.0.0.1."""

    imap: int
    pop3: int
    submission: int
    smtp: int
    admin: int

    @classmethod
    def free(cls) -> "ProxyPorts":
        """Five ports nothing listens on now."""
        return cls(*(mailservers.free_port() for _ in range(5)))

    def listener_port(self, protocol: str) -> int:
        ports = {"imap": self.imap, "pop3": self.pop3, "submission": self.submission, "smtp": self.smtp}
        return ports[protocol]


@dataclass(frozen=True, slots=True)
class SettingsFile:
    """A written settings file, the route file written with it (if any), and its ports."""

    path: Path
    routes_path: Path | None
    ports: ProxyPorts

    @property
    def admin_url(self) -> str:
        return f"http://{mailservers.LOOPBACK}:{self.ports.admin}"

    def listener_ports(self) -> dict[str, int]:
        """The port of each listener by name, as the file says (listeners a caller added included)."""
        document = yaml.safe_load(self.path.read_text())
        return {listener["name"]: listener["port"] for listener in document["listeners"]}

    def write_routes(self, manifests: Sequence[Mapping[str, Any]]) -> None:
        """Replace the route file's content (a proxy watching it picks the change up)."""
        if self.routes_path is None:
            raise ValueError(f"{self.path} names route files written by someone else")
        write_routes(self.routes_path, manifests)


BackendRef = tuple[str, int | str]


def mailroute(
    name: str,
    domains: Sequence[str],
    *,
    namespace: str = "mail",
    users: Sequence[str] = (),
    imap: BackendRef | None = None,
    pop3: BackendRef | None = None,
    submission: BackendRef | None = None,
    smtp: BackendRef | None = None,
    balance: str | None = None,
) -> dict[str, Any]:
    """A MailRoute manifest; each protocol is ``(service, port)`` in the route's own namespace."""
    spec: dict[str, Any] = {"domains": list(domains)}
    if users:
        spec["users"] = list(users)
    for protocol, reference in (("imap", imap), ("pop3", pop3), ("submission", submission), ("smtp", smtp)):
        if reference is not None:
            service, port = reference
            spec[protocol] = {"backend": {"service": service, "port": port}}
    if balance is not None:
        spec["balance"] = balance
    return {
        "apiVersion": MAILROUTE_API_VERSION,
        "kind": "MailRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def listeners(ports: ProxyPorts, more: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The four plain listeners on ``ports``, then each of ``more`` on 127.0.0.1 and a free port."""
    plain = [
        {
            "name": name,
            "protocol": protocol,
            "address": mailservers.LOOPBACK,
            "port": ports.listener_port(protocol),
        }
        for protocol, name in LISTENER_NAMES.items()
    ]
    return plain + [
        {**listener, "address": mailservers.LOOPBACK, "port": mailservers.free_port()} for listener in more
    ]


def _dump_atomically(path: Path, text: str) -> None:
    # The proxy polls route files; it must never read a half-written one.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    temporary.write_text(text)
    temporary.replace(path)


# Fits well inside proxyprocess.STOP_TIMEOUT; ``extra`` may set another drain.
TESTBED_DRAIN = {"gracePeriod": 3, "quietPeriod": 0.5}


def write_routes(path: Path, manifests: Sequence[Mapping[str, Any]]) -> None:
    """Write MailRoute manifests as one multi-document YAML file."""
    _dump_atomically(path, yaml.safe_dump_all([dict(m) for m in manifests], sort_keys=False))


def write(
    directory: Path,
    *,
    ports: ProxyPorts,
    services: Mapping[str, Mapping[str, Sequence[str]]],
    routes: Sequence[Mapping[str, Any]] | None = None,
    route_files: Sequence[Path] = (),
    extra: Mapping[str, Any] | None = None,
) -> SettingsFile:
    """Write ``directory``/mailgress.yaml (and ``mailroutes.yaml`` when ``routes`` are given).

    Args:
        directory: created if missing.
        ports: the proxy's listener and admin ports.
        services: ``"namespace/service" -> port (as the MailRoute writes it) -> ["host:port", ...]``.
        routes: MailRoute manifests to write next to the settings (and list first under ``routes``).
        route_files: more route files to list (absolute, or relative to ``directory``).
        extra: more top-level settings keys (``timeouts``, ``serverName``, ``maxErrors``...).
    """
    directory.mkdir(parents=True, exist_ok=True)
    routes_path = None
    route_names = [str(path) for path in route_files]
    if routes is not None:
        routes_path = directory / ROUTES_NAME
        write_routes(routes_path, routes)
        route_names.insert(0, ROUTES_NAME)
    document: dict[str, Any] = {
        "listeners": listeners(ports),
        "admin": {"address": mailservers.LOOPBACK, "port": ports.admin},
        "routes": route_names,
        "services": {
            reference: {str(port): list(addresses) for port, addresses in by_port.items()}
            for reference, by_port in services.items()
        },
        # Test and demo proxies stop within seconds of SIGTERM (production drains for minutes).
        "drain": TESTBED_DRAIN,
        **(extra or {}),
    }
    path = directory / SETTINGS_NAME
    _dump_atomically(path, yaml.safe_dump(document, sort_keys=False))
    return SettingsFile(path=path, routes_path=routes_path, ports=ports)
