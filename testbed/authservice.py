"""An nginx-style auth_http service on loopback, scriptable per test, recording every request.

The differential tests put one instance behind nginx's mail module and behind mailgress and
compare what each sent it; the in-process driver tests and the benchmarks use it as "the auth
service". ``AuthService`` answers each request with whatever its ``answer`` callable returns
for it (``by_user``, ``check_passwords`` and ``for_backends`` build the usual ones) and keeps the
exact bytes of every request head it received. It serves from a background thread, so
synchronous client scripts (imaplib, poplib, smtplib) and asyncio tests can both use it. Only
ever binds 127.0.0.1. It records passwords because that is what it is for: never log a
``Received``; its ``repr`` hides the password.
"""

import contextlib
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from testbed import backends, mailservers

# nginx's requests are a few hundred bytes; a request head this long is not an auth_http request.
MAX_REQUEST_HEAD = 64 * 1024
# Bounds a slow client (and a test's mistake): no request takes longer to arrive.
READ_TIMEOUT = 10.0
# serve_forever polls for shutdown this often.
POLL_INTERVAL = 0.05
STOP_TIMEOUT = 10.0
PATH = "/auth"
# listen(2)'s backlog. socketserver's default of 5 overflows under 50 concurrent logins (the
# benchmarks' load): the kernel drops the SYNs beyond it, the proxy's retransmission comes a second
# later or the proxy gives up on the login. 511 is nginx's own listen backlog on Linux.
LISTEN_BACKLOG = 511


@dataclass(frozen=True, slots=True)
class Reply:
    """What the service sends back for one request.

    ``headers`` follow ``status_line``; ``raw`` replaces the whole reply (garbage tests);
    ``delay`` holds the reply back that many seconds (slow-service tests); ``close`` hangs up
    without a word.
    """

    headers: tuple[tuple[str, str], ...] = ()
    status_line: str = "HTTP/1.0 200 OK"
    raw: bytes | None = None
    delay: float = 0.0
    close: bool = False

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        lines = [self.status_line, *(f"{name}: {value}" for name, value in self.headers), "", ""]
        # A password holding octets that are no UTF-8 goes as those octets (see mailservers).
        return mailservers.password_octets("\r\n".join(lines))


def ok(
    server: str | None = None,
    port: int | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
) -> Reply:
    """``Auth-Status: OK``, naming the backend (and overriding the credentials) where given."""
    headers = [("Auth-Status", "OK")]
    if server is not None:
        headers.append(("Auth-Server", server))
    if port is not None:
        headers.append(("Auth-Port", str(port)))
    if user is not None:
        headers.append(("Auth-User", user))
    if password is not None:
        headers.append(("Auth-Pass", password))
    return Reply(headers=tuple(headers))


def refuse(
    text: str = "Invalid login or password", *, wait: int | None = None, error_code: str | None = None
) -> Reply:
    """A refusal with ``text``, optionally with Auth-Wait and (for SMTP) Auth-Error-Code."""
    headers = [("Auth-Status", text)]
    if wait is not None:
        headers.append(("Auth-Wait", str(wait)))
    if error_code is not None:
        headers.append(("Auth-Error-Code", error_code))
    return Reply(headers=tuple(headers))


def wait(seconds: int) -> Reply:
    """``Auth-Status: WAIT``: ask again after ``seconds``."""
    return Reply(headers=(("Auth-Status", "WAIT"), ("Auth-Wait", str(seconds))))


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived: the raw head and its header lines in order."""

    head: bytes = field(repr=False)
    request_line: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)

    def __repr__(self) -> str:
        shown = [
            (name, "<redacted>" if name.lower() == "auth-pass" else value) for name, value in self.headers
        ]
        return f"Received({self.request_line!r}, {shown!r})"

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    @property
    def user(self) -> str:
        """Auth-User with nginx's %XX escaping undone."""
        return _unescape(self.header("Auth-User") or "")

    @property
    def password(self) -> str:
        """Auth-Pass with nginx's %XX escaping undone, held as ``mailservers.User.password`` is
        (octets that are no UTF-8 as surrogate escapes)."""
        return _unescape(self.header("Auth-Pass") or "")

    @property
    def attempt(self) -> int:
        return int(self.header("Auth-Login-Attempt") or 0)


Answer = Callable[[Received], Reply]


def by_user(replies: Mapping[str, Reply | Callable[[Received], Reply]], default: Reply) -> Answer:
    """Answer by Auth-User (lower-cased): a fixed Reply or a callable; ``default`` for the rest."""
    table = {user.lower(): reply for user, reply in replies.items()}

    def answer(received: Received) -> Reply:
        reply = table.get(received.user.lower(), default)
        return reply(received) if callable(reply) else reply

    return answer


@dataclass(frozen=True, slots=True)
class Account:
    """A login the service knows, and where it lives (the backend nginx is sent to)."""

    password: str = field(repr=False)
    server: str
    port: int


def check_passwords(
    accounts: Mapping[str, Account],
    failure: Reply | None = None,
) -> Answer:
    """The classic auth service: a known login with its password gets OK with its backend and
    Auth-Pass; anything else gets ``failure`` (default: nginx's example refusal)."""
    known = {address.lower(): account for address, account in accounts.items()}
    refusal = failure or refuse()

    def answer(received: Received) -> Reply:
        account = known.get(received.user.lower())
        if account is None or received.password != account.password:
            return refusal
        return ok(account.server, account.port, password=account.password)

    return answer


def for_backends(bed: backends.Backends, failure: Reply | None = None) -> Answer:
    """What an nginx deployment's auth service does for the testbed's servers: check the password,
    then name the backend of the login's domain for its protocol (Dovecot IMAP/POP3, Postfix
    submission) with Auth-Pass; for Auth-Method none (an MX), name Postfix's MX port if the
    recipient's domain is served here, else refuse with ``550 5.7.1``."""
    refusal = failure or refuse()

    def answer(received: Received) -> Reply:
        if received.header("Auth-Method") == "none":
            recipient = (received.header("Auth-SMTP-To") or "").partition("<")[2].partition(">")[0]
            if recipient.rpartition("@")[2].lower() in backends.DOMAINS:
                return ok(mailservers.LOOPBACK, bed.postfix.smtp_port)
            return refuse("Relay access denied", error_code="550 5.7.1")
        user = bed.users.get(received.user.lower())
        if user is None or received.password != user.password:
            return refusal
        dovecot = bed.dovecot_for(user.address)
        ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port, "smtp": bed.postfix.submission_port}
        port = ports.get(received.header("Auth-Protocol") or "")
        if port is None:
            return refusal
        return ok(mailservers.LOOPBACK, port, password=user.password)

    return answer


def _unescape(value: str) -> str:
    # The head was read as Latin-1, one character per octet; nginx escapes only some octets and
    # sends the rest (UTF-8 or not) as they are.
    return mailservers.password_text(urllib.parse.unquote_to_bytes(value.encode("latin-1")))


def _parse_head(head: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.lstrip(" ")))
    return lines[0], tuple(headers)


class AuthService:
    """The service; a context manager. ``url`` goes into nginx's auth_http and a MailRoute."""

    def __init__(self, answer: Answer | None = None, *, port: int = 0) -> None:
        """
        Args:
            answer: decides each reply; the default refuses everyone. ``answer`` may be set
                again at any time (between tests of a module sharing one service).
            port: a fixed port; by default the system picks one at start.
        """
        self.answer: Answer = answer or (lambda received: refuse())
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[Received] = []
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the auth service has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{mailservers.LOOPBACK}:{self.port}{PATH}"

    @property
    def requests(self) -> list[Received]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the requests received so far."""
        with self._lock:
            self._requests.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 (the same port again after ``stop``) and serve in a thread."""
        if self._server is not None:
            raise RuntimeError("the auth service is already running")
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                service._serve(self.request)

        server = socketserver.ThreadingTCPServer(
            (mailservers.LOOPBACK, self._port), Handler, bind_and_activate=False
        )
        server.allow_reuse_address = True  # restart on the same port right after stop()
        server.daemon_threads = True
        server.block_on_close = False  # a delayed reply must not hold stop() up
        server.request_queue_size = LISTEN_BACKLOG  # read by server_activate()
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        self._port = int(server.server_address[1])
        self._stopping.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (connections then fail with "connection refused"). Idempotent."""
        if self._server is None:
            return
        self._stopping.set()  # cuts short replies waiting on their delay
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        self._server = self._thread = None

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The service is down inside the block (nothing listens on its port) and back after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

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

    # -- one request -----------------------------------------------------------------------------

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(READ_TIMEOUT)
        head = self._read_head(connection)
        if head is None:
            return
        request_line, headers = _parse_head(head)
        received = Received(head=head, request_line=request_line, headers=headers)
        with self._lock:
            self._requests.append(received)
        reply = self.answer(received)
        if reply.delay and self._stopping.wait(reply.delay):
            return
        if not reply.close:
            with contextlib.suppress(OSError):
                connection.sendall(reply.encode())

    @staticmethod
    def _read_head(connection: socket.socket) -> bytes | None:
        """The request up to its empty line (nginx sends no body), or None if it never ends."""
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST_HEAD:
                return None
            try:
                chunk = connection.recv(4096)
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data[: data.index(b"\r\n\r\n") + 4]
