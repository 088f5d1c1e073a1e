"""A private nginx with its mail module (Debian ``nginx`` + ``libnginx-mod-mail``) on loopback.

The reference system mailgress is compared with: the differential tests put it and mailgress
behind the same auth_http service, and the benchmarks measure it side by side with mailgress.
``Nginx`` writes ``nginx.conf`` under the directory it is given (one worker, a ``mail`` block
with one ``server`` per ``MailListener``, ``auth_http``, ``proxy_pass_error_message``,
``error_log`` to a file there), starts nginx in the foreground in a session of its own, waits
until every listener greets, and stops it leaving no process behind (``mailservers.Daemon``
does that part for Dovecot and Postfix too). Never touches /etc/nginx or the system service,
and listens on 127.0.0.1 only.

Facts this is built on (nginx 1.22.1 on Debian 12): the mail module is a dynamic module that
``load_module`` must name by path; ``-e`` sends the log of the start-up phase (before the
configuration is read) to our file instead of /var/log/nginx; run as root, the worker switches
to ``user`` (Debian's nobody has no group of its own name, so the group is named too).
"""

import contextlib
import grp
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from testbed import mailservers

MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
INSTALL_HINT = "Debian packages nginx and libnginx-mod-mail; " + mailservers.INSTALL_HINT
# What a greeting starts with and what ends the probe session, per protocol.
GREETINGS = {
    "imap": (b"* OK", b"a LOGOUT\r\n"),
    "pop3": (b"+OK", b"QUIT\r\n"),
    "smtp": (b"220", b"QUIT\r\n"),
}
# nginx's own default is 60 s (auth_http_timeout); tests want a dead service noticed sooner.
DEFAULT_AUTH_TIMEOUT = 5.0
# nginx's default since 1.23.4; Debian's 1.22 still defaults to TLSv1 TLSv1.1 TLSv1.2, which would
# make it the odd one out next to any current TLS server.
DEFAULT_SSL_PROTOCOLS = "TLSv1.2 TLSv1.3"

NginxProtocol = Literal["imap", "pop3", "smtp"]
StartTls = Literal["off", "on", "only"]


@dataclass(frozen=True, slots=True)
class MailListener:
    """One ``server {}`` of the mail block: a protocol on a port of 127.0.0.1.

    ``smtp_auth`` is nginx's list: ``("plain", "login")`` for submission, ``("none",)`` for an
    MX that routes by recipient (nginx then calls auth_http at the first RCPT TO).
    """

    name: str
    protocol: NginxProtocol
    port: int | None = None  # None: a free port, picked at start
    smtp_auth: tuple[str, ...] = ("plain", "login")
    starttls: StartTls = "off"


def standard_listeners() -> tuple[MailListener, ...]:
    """IMAP, POP3, submission and MX, named as testbed.proxysettings names mailgress's listeners."""
    return (
        MailListener("imap", "imap"),
        MailListener("pop3", "pop3"),
        MailListener("submission", "smtp"),
        MailListener("mx", "smtp", smtp_auth=("none",)),
    )


@dataclass(frozen=True, slots=True)
class Certificate:
    """PEM files for ``ssl_certificate`` and ``ssl_certificate_key`` (testbed.tlscerts issues them)."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class AuthHttp:
    """nginx's ``auth_http`` directives for the whole mail block."""

    url: str
    timeout: float = DEFAULT_AUTH_TIMEOUT
    # auth_http_header lines, in order (they often carry a shared secret: not in repr).
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


class Nginx(mailservers.Daemon):
    """One nginx mail proxy; a context manager (``start``/``stop`` from mailservers.Daemon)."""

    def __init__(
        self,
        directory: Path,
        auth: AuthHttp,
        *,
        listeners: Sequence[MailListener] | None = None,
        server_name: str = "nginx.test",
        proxy_pass_error_message: bool = True,
        xclient: bool = True,
        proxy_smtp_auth: bool = False,
        proxy_buffer: str | None = None,
        certificate: Certificate | None = None,
        ssl_protocols: str = DEFAULT_SSL_PROTOCOLS,
        worker_processes: int = 1,
        mail_user: str = mailservers.DEFAULT_MAIL_USER,
        extra_mail_config: str = "",
    ) -> None:
        """
        Args:
            directory: absolute folder for nginx.conf, the pid file and the logs.
            auth: the auth_http service.
            listeners: default ``standard_listeners()``.
            server_name: nginx's ``server_name`` (greetings, its own EHLO).
            proxy_pass_error_message, xclient, proxy_smtp_auth: the directives of the same name.
            proxy_buffer: e.g. ``"64k"``; None keeps nginx's default (one page).
            certificate: for listeners with ``starttls`` other than ``off``.
            ssl_protocols: nginx's directive (written with a certificate only).
            worker_processes: one is at least as efficient per operation on two cores.
            mail_user: the account the worker runs as.
            extra_mail_config: appended inside the ``mail`` block.
        """
        chosen = tuple(listeners) if listeners is not None else standard_listeners()
        names = [listener.name for listener in chosen]
        if len(set(names)) != len(names):
            raise ValueError(f"listener names repeat: {names}")
        if any(listener.starttls != "off" for listener in chosen) and certificate is None:
            raise ValueError("a STARTTLS listener needs a certificate")
        super().__init__(
            directory,
            "nginx",
            auto_ports=any(listener.port is None for listener in chosen),
            mail_user=mail_user,
        )
        self.auth = auth
        self.listeners = chosen
        self.server_name = server_name
        self.proxy_pass_error_message = proxy_pass_error_message
        self.xclient = xclient
        self.proxy_smtp_auth = proxy_smtp_auth
        self.proxy_buffer = proxy_buffer
        self.certificate = certificate
        self.ssl_protocols = ssl_protocols
        self.worker_processes = worker_processes
        self.extra_mail_config = extra_mail_config
        self._ports = {listener.name: listener.port or mailservers.free_port() for listener in chosen}
        self._process: subprocess.Popen[bytes] | None = None

    # -- what callers read ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def error_log_path(self) -> Path:
        return self.directory / "error.log"

    def port(self, name: str) -> int:
        """The port of listener ``name``."""
        return self._ports[name]

    @property
    def pid(self) -> int:
        """The master process (the benchmarks read its and its worker's CPU time)."""
        if self._process is None:
            raise mailservers.MailServerError("nginx is not running")
        return self._process.pid

    # -- lifecycle hooks -----------------------------------------------------------------------

    def _preflight(self) -> None:
        mailservers.find_program("nginx", "nginx")
        if not MAIL_MODULE.exists():
            raise mailservers.MissingSoftwareError(f"{MAIL_MODULE} is missing; {INSTALL_HINT}")

    def _choose_ports(self) -> None:
        for listener in self.listeners:
            if listener.port is None:
                self._ports[listener.name] = mailservers.free_port()

    def _log_paths(self) -> Sequence[Path]:
        return (self.directory / "nginx.stderr", self.error_log_path)

    def _write_files(self) -> None:
        mailservers.write_atomically(self.config_path, self.config())

    def config(self) -> str:
        """The nginx.conf text."""
        owner = self.owner
        group = grp.getgrgid(owner.gid).gr_name
        auth = self.auth
        mail = [
            f"server_name {self.server_name};",
            f"auth_http {auth.url};",
            f"auth_http_timeout {round(auth.timeout * 1000)}ms;",
            *(f"auth_http_header {name} {_quoted(value)};" for name, value in auth.headers),
            f"proxy_pass_error_message {'on' if self.proxy_pass_error_message else 'off'};",
            f"xclient {'on' if self.xclient else 'off'};",
            f"proxy_smtp_auth {'on' if self.proxy_smtp_auth else 'off'};",
            # Every method the listeners take is offered, so clients' AUTH commands match.
            "imap_auth plain login;",
            "pop3_auth plain;",
        ]
        if self.proxy_buffer is not None:
            mail.append(f"proxy_buffer {self.proxy_buffer};")
        if self.certificate is not None:
            mail += [
                f"ssl_certificate {self.certificate.cert};",
                f"ssl_certificate_key {self.certificate.key};",
                f"ssl_protocols {self.ssl_protocols};",
            ]
        for listener in self.listeners:
            server = [
                f"listen {mailservers.LOOPBACK}:{self._ports[listener.name]};",
                f"protocol {listener.protocol};",
                f"starttls {listener.starttls};",
            ]
            if listener.protocol == "smtp":
                server.append(f"smtp_auth {' '.join(listener.smtp_auth)};")
            mail.append("server {\n" + "".join(f"        {line}\n" for line in server) + "    }")
        mail.append(self.extra_mail_config)
        return (
            "# Written by testbed/nginx.py for one test instance; rewritten at every start.\n"
            f"load_module {MAIL_MODULE};\n"
            # In the foreground, as our child in a session of its own: stop() finds every process.
            "daemon off;\n"
            f"worker_processes {self.worker_processes};\n"
            f"pid {self.directory / 'nginx.pid'};\n"
            f"error_log {self.error_log_path} info;\n"
            f"user {owner.name} {group};\n"
            "events {\n    worker_connections 16384;\n}\n"
            "mail {\n" + "".join(f"    {line}\n" for line in mail if line) + "}\n"
        )

    def _launch(self) -> None:
        with (self.directory / "nginx.stderr").open("ab") as stderr:
            self._process = subprocess.Popen(
                [
                    mailservers.find_program("nginx", "nginx"),
                    "-e", str(self.error_log_path),
                    "-p", f"{self.directory}/",
                    "-c", str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
        self._session = self._process.pid

    def _ready(self) -> bool:
        return all(
            mailservers.greets(self._ports[listener.name], *GREETINGS[listener.protocol])
            for listener in self.listeners
        )

    def _failure(self) -> str | None:
        if self._process is None or self._process.poll() is None:
            return None
        return f"nginx exited with status {self._process.returncode}"

    def _ask_to_stop(self) -> None:
        # SIGTERM is nginx's fast shutdown: open sessions are cut, as a test's end wants.
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=mailservers.STOP_TIMEOUT)
            self._process = None


def _quoted(value: str) -> str:
    """A value as an nginx configuration string: in double quotes, with " and \\ escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
