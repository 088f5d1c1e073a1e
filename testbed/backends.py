"""The standard backends behind a test or demo proxy: two Dovecots, one Postfix, one SASL Dovecot.

``Backends`` starts Dovecot "alpha" (IMAP/POP3 for alpha.example, PLAIN passwords), Dovecot "beta"
(IMAP/POP3 for beta.example, SHA512-CRYPT passwords), an auth-only Dovecot that knows every user and
answers Postfix's SASL questions, and one Postfix that is MX and submission server for both domains
and delivers into the two Dovecots' maildirs. It reports ports, users and passwords, and writes the
standalone proxy settings (``services`` and MailRoutes) for a proxy in front of it. Used by
tests/conftest.py, testbed/demo.py and the benchmarks; never starts a proxy itself.

Why a separate SASL Dovecot: Postfix takes one SASL socket, and using alpha's would make every beta
login fail at submission; it also keeps the alpha and beta logs a clean record of which IMAP/POP3
server a login reached.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from testbed import mailservers, proxysettings, tlscerts

ALPHA = "alpha.example"
BETA = "beta.example"
DOMAINS = (ALPHA, BETA)
# Routed by no MailRoute and served by no server: for "unknown domain" and "relay refused" tests.
UNROUTED_DOMAIN = "gamma.example"
NAMESPACE = "mail"
# Service names and ports as the MailRoutes (and examples/mailroutes.yaml) name them.
SERVICE_NAMES = {ALPHA: "dovecot-alpha", BETA: "dovecot-beta"}
POSTFIX_SERVICE = "postfix"
IMAP_SERVICE_PORT = "143"
POP3_SERVICE_PORT = "110"
SMTP_SERVICE_PORT = "25"
SUBMISSION_SERVICE_PORT = "587"
# The opt-in listeners' Service ports: implicit TLS on the IANA ports (RFC 8314), and named ports
# (RFC 6335 names: at most 15 characters) for the listeners that take a PROXY protocol header.
IMAPS_SERVICE_PORT = "993"
POP3S_SERVICE_PORT = "995"
HAPROXY_SERVICE_PORTS = {
    "imap": "imap-haproxy",
    "pop3": "pop3-haproxy",
    "smtp": "smtp-haproxy",
    "submission": "subm-haproxy",
}

STANDARD_USERS = {
    ALPHA: ("alice", "al", "anna", "arne", "ava"),
    BETA: ("bob", "bea", "ben", "bruno", "beth"),
}
# Every testbed password contains this, so a log can be searched for any of them at once.
PASSWORD_MARKER = "-secret-"
# al's password is built to trip naive parsers: an IMAP literal marker, spaces, quotes, a backslash.
SPECIAL_PASSWORDS = {"al@alpha.example": 'alpha-secret-al {4} "x\\y"'}


def default_password(address: str) -> str:
    """The testbed password of ``address``: distinctive, stable across runs, easy to grep for."""
    if address in SPECIAL_PASSWORDS:
        return SPECIAL_PASSWORDS[address]
    local, _, domain = address.partition("@")
    # A digest makes each password unique even where local parts repeat across domains.
    digest = hashlib.sha256(address.encode()).hexdigest()[:6]
    return f"{domain.partition('.')[0]}{PASSWORD_MARKER}{local}-{digest}"


def standard_addresses() -> list[str]:
    return [f"{local}@{domain}" for domain, locals_ in STANDARD_USERS.items() for local in locals_]


def service_host_name(service: str) -> str:
    """The name a proxy checks a backend's certificate for: its Service's cluster DNS name.

    mailgress verifies ``<service>.<namespace>.svc`` (proxy/server/backends.py, ``server_name``).
    """
    return f"{service}.{NAMESPACE}.svc"


class Backends:
    """The standard set of mail servers, under one directory; a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        extra_addresses: Iterable[str] = (),
        dovecot_extra_config: str = "",
        postfix_extra_main_cf: Mapping[str, str] | None = None,
        tls: tlscerts.TestAuthority | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        """
        Args:
            directory: absolute, short, world-searchable folder (see mailservers.check_directory).
            extra_addresses: more users in alpha.example or beta.example (benchmarks add hundreds).
            dovecot_extra_config: appended to the alpha and beta dovecot.conf.
            postfix_extra_main_cf: more main.cf parameters.
            tls: a CA that issues each server a certificate for its Service name
                (``service_host_name``) and 127.0.0.1: Dovecot offers STARTTLS/STLS and imaps/pop3s,
                Postfix STARTTLS; ``services()`` lists the 993 and 995 ports. Off by default.
            proxy_protocol: every IMAP, POP3, MX and submission server gets a twin listener that
                takes a PROXY protocol header, listed under ``HAPROXY_SERVICE_PORTS``. Off by default.
        """
        self.directory = directory
        self.proxy_protocol = proxy_protocol
        certificates = self._issue_certificates(tls) if tls is not None else {}
        addresses = standard_addresses() + [a.lower() for a in extra_addresses]
        for address in addresses:
            self._check_domain(address)
        self._users = {address: mailservers.User(address, default_password(address)) for address in addresses}
        self.alpha = mailservers.Dovecot(
            directory / "dovecot-alpha",
            name="alpha",
            users=self._users_in(ALPHA),
            password_scheme="PLAIN",
            extra_config=dovecot_extra_config,
            tls=certificates.get(SERVICE_NAMES[ALPHA]),
            proxy_protocol=proxy_protocol,
        )
        self.beta = mailservers.Dovecot(
            directory / "dovecot-beta",
            name="beta",
            users=self._users_in(BETA),
            password_scheme="SHA512-CRYPT",
            extra_config=dovecot_extra_config,
            tls=certificates.get(SERVICE_NAMES[BETA]),
            proxy_protocol=proxy_protocol,
        )
        self.auth = mailservers.Dovecot(
            directory / "dovecot-auth",
            name="auth",
            users=self._users.values(),
            protocols=(),
            auth_socket_user="postfix",
        )
        self.dovecots = {ALPHA: self.alpha, BETA: self.beta}
        self.postfix = mailservers.Postfix(
            directory / "postfix",
            domains=DOMAINS,
            mailboxes={address: self.maildir(address) for address in self._users},
            sasl_socket=self.auth.auth_socket,
            extra_main_cf=postfix_extra_main_cf,
            tls=certificates.get(POSTFIX_SERVICE),
            proxy_protocol=proxy_protocol,
        )

    def _issue_certificates(self, authority: tlscerts.TestAuthority) -> dict[str, tlscerts.IssuedCertificate]:
        """A certificate per server, by Service name, under ``directory``/tls."""
        folder = self.directory / "tls"
        folder.mkdir(parents=True, exist_ok=True)
        return {
            service: authority.issue(
                service,
                [service_host_name(service), mailservers.LOOPBACK],
                cert=folder / f"{service}.crt",
                key=folder / f"{service}.key",
            )
            for service in (*SERVICE_NAMES.values(), POSTFIX_SERVICE)
        }

    @staticmethod
    def _check_domain(address: str) -> None:
        if address.rpartition("@")[2] not in DOMAINS:
            raise ValueError(f"{address}: testbed users live in {' or '.join(DOMAINS)}")

    def _users_in(self, domain: str) -> list[mailservers.User]:
        return [user for user in self._users.values() if user.domain == domain]

    @property
    def daemons(self) -> tuple[mailservers.Dovecot | mailservers.Postfix, ...]:
        """In start order: Postfix's SASL socket must exist before Postfix takes logins."""
        return (self.auth, self.alpha, self.beta, self.postfix)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every server; if one fails, stop those already running and re-raise."""
        try:
            for daemon in self.daemons:
                daemon.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server (in parallel: Dovecot takes seconds to shut down). Idempotent."""
        for daemon in self.daemons:
            daemon.request_stop()
        for daemon in self.daemons:
            daemon.wait_stopped()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- users and mailboxes -------------------------------------------------------------------

    @property
    def users(self) -> Mapping[str, mailservers.User]:
        """Every account by address."""
        return dict(self._users)

    def user(self, address: str) -> mailservers.User:
        return self._users[address.lower()]

    def add_user(self, address: str, password: str | None = None) -> mailservers.User:
        """Create an account on its domain's Dovecot, the SASL Dovecot and Postfix, even while running."""
        address = address.lower()
        self._check_domain(address)
        user = mailservers.User(address, password if password is not None else default_password(address))
        self._users[address] = user
        self.dovecot_for(address).add_user(user)
        self.auth.add_user(user)
        self.postfix.add_mailbox(address, self.maildir(address))
        return user

    def dovecot_for(self, address: str) -> mailservers.Dovecot:
        """The Dovecot that owns ``address``'s domain."""
        domain = address.rpartition("@")[2].lower()
        try:
            return self.dovecots[domain]
        except KeyError:
            raise mailservers.MailServerError(f"no testbed Dovecot serves {domain}") from None

    def maildir(self, address: str) -> mailservers.Maildir:
        return self.dovecot_for(address).maildir(address)

    def deliver(self, address: str, message: bytes) -> Path:
        """Put ``message`` into ``address``'s INBOX directly (no SMTP); return the file."""
        return self.maildir(address).deliver(message)

    def wait_delivered(
        self, address: str, count: int, timeout: float = mailservers.DELIVERY_TIMEOUT
    ) -> list[bytes]:
        """Wait until ``address``'s INBOX holds at least ``count`` messages; return them all."""
        return self.postfix.wait_delivered(address, count, timeout)

    # -- what a proxy in front needs -----------------------------------------------------------

    def services(self) -> dict[str, dict[str, list[str]]]:
        """The settings' ``services`` stand-in for EndpointSlices, one endpoint per port.

        A fresh dict each call, so a test can add (dead) endpoints before writing settings.
        """
        services = {
            f"{NAMESPACE}/{SERVICE_NAMES[domain]}": {
                IMAP_SERVICE_PORT: [f"{mailservers.LOOPBACK}:{dovecot.imap_port}"],
                POP3_SERVICE_PORT: [f"{mailservers.LOOPBACK}:{dovecot.pop3_port}"],
            }
            for domain, dovecot in self.dovecots.items()
        }
        services[f"{NAMESPACE}/{POSTFIX_SERVICE}"] = {
            SMTP_SERVICE_PORT: [f"{mailservers.LOOPBACK}:{self.postfix.smtp_port}"],
            SUBMISSION_SERVICE_PORT: [f"{mailservers.LOOPBACK}:{self.postfix.submission_port}"],
        }
        for domain, dovecot in self.dovecots.items():
            ports = services[f"{NAMESPACE}/{SERVICE_NAMES[domain]}"]
            if dovecot.tls is not None:
                ports[IMAPS_SERVICE_PORT] = [f"{mailservers.LOOPBACK}:{dovecot.tls_port('imap')}"]
                ports[POP3S_SERVICE_PORT] = [f"{mailservers.LOOPBACK}:{dovecot.tls_port('pop3')}"]
            if self.proxy_protocol:
                for protocol in ("imap", "pop3"):
                    port = dovecot.haproxy_port(protocol)
                    ports[HAPROXY_SERVICE_PORTS[protocol]] = [f"{mailservers.LOOPBACK}:{port}"]
        if self.proxy_protocol:
            for service in ("smtp", "submission"):
                port = self.postfix.haproxy_port(service)
                services[f"{NAMESPACE}/{POSTFIX_SERVICE}"][HAPROXY_SERVICE_PORTS[service]] = [
                    f"{mailservers.LOOPBACK}:{port}"
                ]
        return services

    def mailroutes(self) -> list[dict[str, Any]]:
        """One MailRoute per domain, the same as examples/mailroutes.yaml."""
        return [
            proxysettings.mailroute(
                domain.partition(".")[0],
                [domain],
                namespace=NAMESPACE,
                imap=(SERVICE_NAMES[domain], int(IMAP_SERVICE_PORT)),
                pop3=(SERVICE_NAMES[domain], int(POP3_SERVICE_PORT)),
                submission=(POSTFIX_SERVICE, int(SUBMISSION_SERVICE_PORT)),
                smtp=(POSTFIX_SERVICE, int(SMTP_SERVICE_PORT)),
            )
            for domain in DOMAINS
        ]

    def write_proxy_settings(
        self,
        directory: Path,
        *,
        ports: proxysettings.ProxyPorts | None = None,
        services: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        routes: Sequence[Mapping[str, Any]] | None = None,
        route_files: Sequence[Path] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> proxysettings.SettingsFile:
        """Write settings (and, unless ``route_files`` are given, a route file) for a proxy in front.

        Defaults: free ports, ``services()``, ``mailroutes()``.
        """
        return proxysettings.write(
            directory,
            ports=ports or proxysettings.ProxyPorts.free(),
            services=services if services is not None else self.services(),
            routes=None if route_files else (routes if routes is not None else self.mailroutes()),
            route_files=route_files,
            extra=extra,
        )

    def describe(self) -> str:
        """Ports, log files, users and passwords, for people (the demo prints it)."""
        lines = [
            f"Dovecot alpha ({ALPHA}): IMAP 127.0.0.1:{self.alpha.imap_port}, "
            f"POP3 127.0.0.1:{self.alpha.pop3_port}, log {self.alpha.log_path}",
            f"Dovecot beta  ({BETA}): IMAP 127.0.0.1:{self.beta.imap_port}, "
            f"POP3 127.0.0.1:{self.beta.pop3_port}, log {self.beta.log_path}",
            f"Postfix (both domains): MX 127.0.0.1:{self.postfix.smtp_port}, "
            f"submission 127.0.0.1:{self.postfix.submission_port}, log {self.postfix.maillog_path}",
            "Users (login = address):",
        ]
        width = max(len(address) for address in self._users)
        lines.extend(
            f"  {address:<{width}}  {user.password}" for address, user in sorted(self._users.items())
        )
        return "\n".join(lines)
