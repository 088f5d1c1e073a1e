"""Real mail clients as the tests use them: ``curl``, ``swaks``, and the logins imaplib/poplib lack.

``curl`` (imap://, pop3://) and ``swaks`` (SMTP) run as child processes. Passwords never go on a
command line (``ps`` shows those): curl reads its ``user`` from a config on
stdin, swaks from a SWAKS_OPT_ environment variable. Whatever a run prints is redacted before it
can reach an assertion message: the password itself, its IMAP-quoted form and any base64 token that
decodes to something containing it (SASL PLAIN and LOGIN) become ``<redacted>``. Used by
tests/testbed and tests/e2e; talks to 127.0.0.1 only, never through an HTTP or SOCKS proxy.
The imaplib/poplib helpers add what those modules do not offer (IMAP LOGIN with a literal, IMAP
AUTHENTICATE with SASL-IR, POP3 AUTH PLAIN) through their documented-private command methods.
"""

import base64
import binascii
import contextlib
import imaplib
import os
import poplib
import re
import smtplib
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from testbed import backends, mailservers

REDACTED = "<redacted>"
# A client run that hangs is a failure, not a stuck test session.
CLIENT_TIMEOUT = 120.0
# Socket timeout of the Python clients: each read and write, not the whole session.
SOCKET_TIMEOUT = 30.0
# RawClient reads at most this much while waiting for one reply or for the peer to close.
RAW_READ_LIMIT = 1024 * 1024
# A token with backends.PASSWORD_MARKER in it is a testbed password (or a piece of one).
_MARKED_TOKEN = re.compile(r"\S*" + re.escape(backends.PASSWORD_MARKER) + r"\S*")
# Long enough to hold an encoded SASL PLAIN response for any testbed user.
_BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")


def redact_marked(text: str, secrets: Sequence[str]) -> str:
    """``redact``, and also every whitespace-free token carrying the testbed's password marker.

    For text that may hold passwords nobody listed (pytest failure reports show the arguments of
    the failing call, e.g. ``IMAP4.login(user, password)``).
    """
    return _MARKED_TOKEN.sub(REDACTED, redact(text, secrets))


def imap_quoted(text: str) -> str:
    """``text`` as an IMAP quoted string (RFC 3501 section 4.3), which is how curl sends LOGIN."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret (also quoted or repr'd) and every base64 token hiding one redacted."""
    for secret in secrets:
        # IMAP-quoted (how clients send LOGIN) and Python-repr'd (how pytest shows arguments) forms
        # carry extra backslashes; replace those before the bare secret.
        for form in (imap_quoted(secret), repr(secret)[1:-1], secret):
            text = text.replace(form, REDACTED)

    def hide(match: re.Match[str]) -> str:
        token = match.group(0)
        try:
            decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            return token
        return (
            REDACTED if any(mailservers.password_octets(secret) in decoded for secret in secrets) else token
        )

    return _BASE64_TOKEN.sub(hide, text)


@dataclass(frozen=True, slots=True)
class ClientRun:
    """One finished client run; ``output`` is binary data (curl's download) and stays out of repr."""

    program: str
    returncode: int
    output: bytes = field(repr=False)
    transcript: str

    def describe(self) -> str:
        """For assertion messages: the exit status and the (redacted) transcript."""
        return f"{self.program} exited with {self.returncode}:\n{self.transcript[-4000:]}"


def _run(
    program: str,
    command: list[str],
    secrets: Sequence[str],
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float,
) -> ClientRun:
    try:
        completed = subprocess.run(
            command, input=stdin, capture_output=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        partial = (error.stderr or b"").decode("utf-8", "replace")
        return ClientRun(program, -1, b"", redact(f"timed out after {timeout:g} s\n{partial}", secrets))
    return ClientRun(
        program,
        completed.returncode,
        completed.stdout,
        redact(completed.stderr.decode("utf-8", "replace"), secrets),
    )


def _curl_config_string(text: str) -> str:
    # curl config files: a quoted value takes backslash escapes for \ and " (curl(1), -K).
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl(
    url: str, *options: str, user: mailservers.User | None = None, timeout: float = CLIENT_TIMEOUT
) -> ClientRun:
    """Run ``curl`` on ``url`` (imap://, pop3://, smtp://) as ``user``; stdout is ``output``.

    ``options`` are passed as they are (e.g. ``"--request", "EXAMINE INBOX"``, ``"--sasl-ir"``).
    """
    config = ""
    secrets: list[str] = []
    if user is not None:
        config = f"user = {_curl_config_string(f'{user.address}:{user.password}')}\n"
        secrets.append(user.password)
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        f"{timeout:g}",
        "--config",
        "-",
        *options,
        "--url",
        url,
    ]
    return _run("curl", command, secrets, stdin=config.encode(), timeout=timeout + 5)


def swaks(
    *options: str,
    user: mailservers.User | None = None,
    data: bytes | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> ClientRun:
    """Run ``swaks`` with ``options``; with ``user``, authenticates as them (add ``--auth PLAIN``...).

    ``data`` is the whole message (swaks ``--data -``). The transcript is swaks' own output.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWAKS_OPT_")}
    secrets: list[str] = []
    if user is not None:
        env["SWAKS_OPT_auth_user"] = user.address
        env["SWAKS_OPT_auth_password"] = user.password
        secrets.append(user.password)
    command = ["swaks", "--timeout", f"{timeout:g}", *options]
    if data is not None:
        command += ["--data", "-"]
    completed = _run("swaks", command, secrets, stdin=data or b"", env=env, timeout=timeout + 5)
    # swaks writes the SMTP dialogue to stdout: that is the transcript worth reading.
    return ClientRun(
        "swaks",
        completed.returncode,
        b"",
        redact(completed.output.decode("utf-8", "replace"), secrets) + completed.transcript,
    )


@contextlib.contextmanager
def imap(port: int) -> Iterator[imaplib.IMAP4]:
    """An imaplib client on 127.0.0.1:``port`` with a socket timeout; logs out at the end."""
    with imaplib.IMAP4(mailservers.LOOPBACK, port, timeout=SOCKET_TIMEOUT) as client:
        yield client


@contextlib.contextmanager
def pop3(port: int) -> Iterator[poplib.POP3]:
    """A poplib client on 127.0.0.1:``port`` with a socket timeout; says QUIT at the end if it can."""
    client = poplib.POP3(mailservers.LOOPBACK, port, timeout=SOCKET_TIMEOUT)
    try:
        yield client
    finally:
        with contextlib.suppress(poplib.error_proto, OSError):
            client.quit()
        client.close()


@contextlib.contextmanager
def smtp(port: int) -> Iterator[smtplib.SMTP]:
    """An smtplib client on 127.0.0.1:``port`` with a socket timeout; says QUIT at the end."""
    with smtplib.SMTP(mailservers.LOOPBACK, port, timeout=SOCKET_TIMEOUT) as client:
        yield client


def sasl_plain(user: mailservers.User) -> str:
    """The base64 SASL PLAIN response for ``user`` (RFC 4616: empty authzid, login, password)."""
    return base64.b64encode(b"\0" + user.address.encode() + b"\0" + user.octets).decode()


def imap_login_literal(client: imaplib.IMAP4, user: mailservers.User) -> None:
    """``LOGIN "address" {n}`` with the password as a synchronizing literal (RFC 3501 section 4.3).

    Raises:
        imaplib.IMAP4.error: the server did not answer OK (as ``IMAP4.login`` does).
    """
    # typeshed declares `literal` as str, but imaplib sends it with socket.sendall: it must be bytes.
    client.literal = user.octets  # type: ignore[assignment]
    _imap_authenticated(client, *client._simple_command("LOGIN", client._quote(user.address)))


def imap_authenticate_plain(
    client: imaplib.IMAP4, user: mailservers.User, *, initial_response: bool = True
) -> None:
    """``AUTHENTICATE PLAIN``, by default with the response on the command line (SASL-IR, RFC 4959).

    Raises:
        imaplib.IMAP4.error: the server did not answer OK.
    """
    if initial_response:
        _imap_authenticated(client, *client._simple_command("AUTHENTICATE", "PLAIN", sasl_plain(user)))
    else:
        client.authenticate("PLAIN", lambda _challenge: base64.b64decode(sasl_plain(user)))


def _imap_authenticated(client: imaplib.IMAP4, typ: str, data: list[bytes]) -> None:
    if typ != "OK":
        raise client.error(data[-1] if data else typ)
    client.state = "AUTH"


def pop3_auth_plain(client: poplib.POP3, user: mailservers.User) -> bytes:
    """``AUTH PLAIN <response>`` (RFC 5034); returns the +OK line.

    Raises:
        poplib.error_proto: the server answered -ERR.
    """
    # poplib has no AUTH command; _shortcmd is how its own user()/pass_() send theirs.
    reply: bytes = client._shortcmd(f"AUTH PLAIN {sasl_plain(user)}")  # type: ignore[attr-defined]
    return reply


class RawClient:
    """A plain socket speaking a line protocol by hand, for what library clients refuse to send.

    Every read is bounded by the socket timeout and by RAW_READ_LIMIT, so a silent or endless
    peer fails the test instead of hanging it.
    """

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT) -> None:
        self._socket = socket.create_connection((mailservers.LOOPBACK, port), timeout=timeout)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self._socket.sendall(data)

    def line(self) -> bytes:
        """The next line with its line end; b"" once the peer has closed (TimeoutError if silent)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > RAW_READ_LIMIT:
                raise AssertionError(f"no line end in {RAW_READ_LIMIT} bytes")
            chunk = self._socket.recv(65536)
            if not chunk:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def reply(self, prefix: bytes, max_lines: int = 1000) -> bytes:
        """Skip lines up to the first that starts with ``prefix`` (a tag, ``+OK``...); b"" if closed."""
        for _ in range(max_lines):
            line = self.line()
            if not line or line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r} within {max_lines} lines")

    def command(self, line: bytes, prefix: bytes) -> bytes:
        """Send ``line`` with CRLF and return the reply line starting with ``prefix``."""
        self.send(line + b"\r\n")
        return self.reply(prefix)

    def until_closed(self) -> bytes:
        """Everything the peer sends until it closes (TimeoutError if it stays open and silent)."""
        received = self._buffer
        self._buffer = b""
        while len(received) <= RAW_READ_LIMIT:
            chunk = self._socket.recv(65536)
            if not chunk:
                return received
            received += chunk
        raise AssertionError(f"the peer sent more than {RAW_READ_LIMIT} bytes without closing")

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
