"""What the benchmark measures against: the mail servers directly, mailgress, and nginx mail.

``Bed`` is one round's mail servers (``testbed.backends``) with the benchmark's accounts: load
users on Dovecot alpha (PLAIN passwords, so the backend's password hashing does not dominate a
login), each with one small message for POP3 RETR; one account holding the 20 MB message; one
SMTP recipient per target. A ``Target`` is started fresh for every measured run and stopped
after it, and says which port serves a protocol for an address and which process session is
the proxy (None for the direct connection). Everything here starts processes on 127.0.0.1 only
and stops them again; nothing here measures.
"""

import copy
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from bench import authserver, clients
from testbed import backends, mailservers, messages, nginx, proxyprocess

ClientProtocol = Literal["imap", "pop3", "submission"]

# Dovecot settings for benchmarking (reference/mail-servers-here.md): no per-login log lines, and
# imap/pop3 processes that live on (service_count 0) so the testbed's 100 clients per process
# apply: with the default service_count 1 every session forks a process of its own, which costs
# Dovecot several milliseconds per login and stops at process_limit (1024) idle sessions. The
# testbed already sets long-lived login processes and no per-user connection cap. Dovecot merges
# a repeated service section; a later setting wins.
DOVECOT_BENCH_CONFIG = """\
info_log_path = /dev/null
auth_verbose = no
service imap {
  service_count = 0
}
service pop3 {
  service_count = 0
}
"""
# mailgress settings that differ from its defaults. Every benchmark client comes from 127.0.0.1,
# which the per-address connection cap (100 by default) would refuse after the hundredth idle
# connection, and whose logins in flight at once count towards the failed-login limits (30 per
# address, 10 per user by default: the 31st waits for a verdict); nginx has neither, so both are
# lifted here.
BENCH_LIMIT = 1_000_000
MAILGRESS_BENCH_SETTINGS = {
    "limits": {
        "connectionsPerIp": BENCH_LIMIT,
        "failedLogins": {"perIp": BENCH_LIMIT, "perUser": BENCH_LIMIT},
    }
}
# nginx configured as mailgress behaves with the testbed's routes: no client address forwarded
# (the routes set no clientInfo, so mailgress sends no XCLIENT), and the submission login replayed
# to Postfix with AUTH PLAIN, as mailgress replays it. Only the listeners the workloads use.
NGINX_LISTENERS = (
    nginx.MailListener("imap", "imap"),
    nginx.MailListener("pop3", "pop3"),
    nginx.MailListener("submission", "smtp"),
)
NGINX_LISTENER_FOR = {"imap": "imap", "pop3": "pop3", "submission": "submission"}
# nginx at its shipped log level ("error": nothing per session), mailgress at its own default
# (one INFO line per session, the house rule). The testbed's nginx.conf logs at info for tests;
# a mail-level error_log overrides that for the mail sessions.
NGINX_MAIL_LOG_LEVEL = "error"
# nginx with its default proxy_buffer (one page) and with 64k (reference/mail-servers-here.md:
# the default halves relay throughput); None keeps the default.
NGINX_BUFFERS = {"nginx": None, "nginx-64k": "64k"}
# Targets that differ from another only in relay buffers: measured where bytes are relayed or
# buffers sit allocated, not in the login runs.
BUFFER_VARIANTS = ("nginx-64k",)
# mailgress with the same routes in "auth: http" mode against the very auth_http service nginx
# asks: the like-for-like comparison of a login with nginx, which asks that service at every
# login (the "mailgress" target's routes use "auth: backend" and ask none). Measured where logins
# are the work (the login runs and the idle connections), not in the relay or SMTP runs.
MAILGRESS_AUTH_HTTP = "mailgress-authhttp"
AUTH_VARIANTS = (MAILGRESS_AUTH_HTTP,)
LOAD_DOMAIN = backends.ALPHA
POP3_MESSAGE_SIZE = 4 * 1024  # a typical short mail: RETR is part of every POP3 session
FETCH_MESSAGE_SIZE = 20 * 1000 * 1000  # "IMAP FETCH of a 20 MB message" (decimal megabytes)
FETCH_ADDRESS = f"fetch@{LOAD_DOMAIN}"
# "IMAP FETCH of many small messages": most mail is 5-50 KiB, so a FETCH 1:N of 8 KiB messages
# is the relay's common case (one 20 MB literal is its best). 1,000 of them: 8.2 MB per FETCH.
SMALL_MESSAGE_SIZE = 8 * 1024
SMALL_MESSAGES = 1000
SMALL_ADDRESS = f"small@{LOAD_DOMAIN}"
WARMUP_RECIPIENT = f"warmup@{LOAD_DOMAIN}"


def load_address(number: int) -> str:
    return f"load{number:04d}@{LOAD_DOMAIN}"


def sink_address(target: str) -> str:
    """Where a target's SMTP run delivers; one mailbox per target keeps the byte check simple."""
    return f"sink-{target}@{LOAD_DOMAIN}"


class Bed:
    """One round's mail servers and the benchmark's accounts and messages; a context manager."""

    def __init__(self, directory: Path, *, load_users: int, target_names: Sequence[str]) -> None:
        self.directory = directory
        addresses = [load_address(n) for n in range(load_users)]
        sinks = [sink_address(t) for t in target_names]
        extra = [*addresses, FETCH_ADDRESS, SMALL_ADDRESS, WARMUP_RECIPIENT, *sinks]
        self.backends = backends.Backends(
            directory / "backends",
            extra_addresses=extra,
            dovecot_extra_config=DOVECOT_BENCH_CONFIG,
        )
        self.load_accounts = [self.account(address) for address in addresses]
        self.fetch_message = messages.large(f"sender@{LOAD_DOMAIN}", FETCH_ADDRESS, FETCH_MESSAGE_SIZE)
        # Distinct subjects make every small message's bytes distinct.
        self.small_messages = [
            messages.large(
                f"sender@{LOAD_DOMAIN}", SMALL_ADDRESS, SMALL_MESSAGE_SIZE, subject=f"small message {number}"
            )
            for number in range(SMALL_MESSAGES)
        ]

    def account(self, address: str) -> clients.Account:
        user = self.backends.user(address)
        return clients.Account(user.address, user.password)

    def start(self) -> None:
        self.backends.start()
        try:
            for account in self.load_accounts:
                self.backends.deliver(
                    account.address,
                    messages.large(f"sender@{LOAD_DOMAIN}", account.address, POP3_MESSAGE_SIZE),
                )
            self.backends.deliver(FETCH_ADDRESS, self.fetch_message)
            for message in self.small_messages:
                self.backends.deliver(SMALL_ADDRESS, message)
        except BaseException:
            self.backends.stop()
            raise

    def stop(self) -> None:
        self.backends.stop()

    def backend_sessions(self) -> list[int]:
        """The process sessions of every mail server (for their CPU)."""
        return [daemon.session for daemon in self.backends.daemons]

    def __enter__(self) -> "Bed":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Target(Protocol):
    """Something the clients connect to; started fresh for each measured run."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def session(self) -> int | None:
        """The proxy's process session (all its processes), or None for the direct connection."""

    @property
    def auth_session(self) -> int | None:
        """The process session of the auth service the proxy asks at each login, if any."""

    def port(self, protocol: ClientProtocol, address: str) -> int:
        """The port on 127.0.0.1 where ``address`` logs in over ``protocol``."""


class Direct:
    """No proxy: clients connect to the Dovecot or Postfix that serves them (the no-proxy limit)."""

    name = "direct"

    def __init__(self, bed: Bed) -> None:
        self._bed = bed

    def start(self) -> None:
        """Nothing to start: the mail servers run for the whole round."""

    def stop(self) -> None:
        """Nothing to stop."""

    @property
    def session(self) -> int | None:
        return None

    @property
    def auth_session(self) -> int | None:
        return None

    def port(self, protocol: ClientProtocol, address: str) -> int:
        if protocol == "submission":
            return self._bed.backends.postfix.submission_port
        dovecot = self._bed.backends.dovecot_for(address)
        return dovecot.imap_port if protocol == "imap" else dovecot.pop3_port


class Mailgress:
    """``mailgress proxy`` in standalone mode (uvloop) in front of the round's mail servers.

    ``command`` runs another build of the proxy (a patched source tree) under another name.
    With ``auth_http`` every route asks the benchmark's auth_http service (``AuthProcess``, the
    one nginx asks, counted apart as nginx's is) before the backend login, instead of taking the
    backend's verdict alone.
    """

    def __init__(
        self,
        bed: Bed,
        directory: Path,
        *,
        name: str = "mailgress",
        command: Sequence[str] | None = None,
        log_level: str = "info",
        auth_http: bool = False,
    ) -> None:
        self.name = name
        self._bed = bed
        self._directory = directory
        self._command = command
        self._log_level = log_level
        self._auth_http = auth_http
        self._auth: authserver.AuthProcess | None = None
        self._process: proxyprocess.ProxyProcess | None = None

    def _routes(self) -> list[dict[str, Any]]:
        """The testbed's MailRoutes; with auth_http, each in "auth: http" mode against the service."""
        routes = self._bed.backends.mailroutes()
        if self._auth is None:
            return routes
        asking = copy.deepcopy(routes)
        for route in asking:
            route["spec"]["auth"] = {"mode": "http", "http": {"url": self._auth.url}}
        return asking

    def start(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)
        try:
            if self._auth_http:
                self._auth = authserver.AuthProcess(self._bed.backends)
                self._auth.start()
            settings = self._bed.backends.write_proxy_settings(
                self._directory, routes=self._routes(), extra=MAILGRESS_BENCH_SETTINGS
            )
            process = proxyprocess.ProxyProcess(
                settings, self._directory / "mailgress.log", command=self._command, log_level=self._log_level
            )
            process.start()
        except BaseException:
            self.stop()
            raise
        self._process = process

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _running(self) -> proxyprocess.ProxyProcess:
        if self._process is None:
            raise mailservers.MailServerError(f"{self.name} is not running")
        return self._process

    @property
    def session(self) -> int | None:
        return self._running().pid  # started with start_new_session: its pid is the session id

    @property
    def auth_session(self) -> int | None:
        # Without auth_http the routes check passwords at the backend ("auth: backend").
        return None if self._auth is None else self._auth.session

    def port(self, protocol: ClientProtocol, address: str) -> int:
        return self._running().settings.ports.listener_port(protocol)


def variant_command(tree: Path) -> list[str]:
    """The ``mailgress`` command, importing the proxy from another source tree first."""
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from mailgress.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code]


class NginxMail:
    """nginx's mail proxy, one worker, with its own auth_http service (``AuthProcess``)."""

    def __init__(self, bed: Bed, directory: Path, *, name: str, proxy_buffer: str | None) -> None:
        self.name = name
        self._bed = bed
        self._directory = directory
        self._proxy_buffer = proxy_buffer
        self._auth: authserver.AuthProcess | None = None
        self._nginx: nginx.Nginx | None = None

    def start(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)
        auth = authserver.AuthProcess(self._bed.backends)
        auth.start()
        self._auth = auth
        server = nginx.Nginx(
            self._directory,
            nginx.AuthHttp(auth.url),
            listeners=NGINX_LISTENERS,
            xclient=False,
            proxy_smtp_auth=True,
            proxy_buffer=self._proxy_buffer,
            extra_mail_config=f"error_log {self._directory / 'mail.log'} {NGINX_MAIL_LOG_LEVEL};",
        )
        try:
            server.start()
        except BaseException:
            self.stop()
            raise
        self._nginx = server

    def stop(self) -> None:
        if self._nginx is not None:
            self._nginx.stop()
            self._nginx = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _running(self) -> nginx.Nginx:
        if self._nginx is None:
            raise mailservers.MailServerError(f"{self.name} is not running")
        return self._nginx

    @property
    def session(self) -> int | None:
        return self._running().session

    @property
    def auth_session(self) -> int | None:
        return None if self._auth is None else self._auth.session

    def port(self, protocol: ClientProtocol, address: str) -> int:
        return self._running().port(NGINX_LISTENER_FOR[protocol])


def nginx_targets(bed: Bed, directory: Path) -> list[Target]:
    return [
        NginxMail(bed, directory / name, name=name, proxy_buffer=buffer)
        for name, buffer in NGINX_BUFFERS.items()
    ]
