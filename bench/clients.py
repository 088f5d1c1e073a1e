"""The benchmark's mail clients: lean IMAP, POP3 and SMTP dialogues that time their logins.

``bench.workloads`` runs thousands of these at once under uvloop, so they do only what a real
client does on the wire (one command, wait for its reply) with as little Python as possible: the
load generator shares the machine's two cores with the proxy and the mail servers. The 20 MB
FETCH uses a blocking socket that reads the literal straight into a preallocated buffer; the
FETCH of many small messages reads each literal of its reply on that socket too. Every
read and the whole dialogue are bounded in time; every failure is a ``DialogueError`` whose
message never carries a password. Talks to 127.0.0.1 only.
"""

import asyncio
import base64
import contextlib
import socket
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
# One session (connect to close) may take this long before it counts as failed; generous, since
# saturation runs queue sessions behind each other on purpose.
SESSION_TIMEOUT = 60.0
# Blocking sockets (the FETCH) wait at most this long for any one read or write.
SOCKET_TIMEOUT = 60.0
# Longest reply line the clients accept (RFC 3501 and 5321 lines are far shorter; Dovecot's
# CAPABILITY line is the longest seen here, under 300 octets).
MAX_LINE = 8192
# StreamReader buffer limit: a POP3 RETR response is read whole with readuntil.
STREAM_LIMIT = 1024 * 1024
# Largest literal ``BlockingImap.fetch_all`` accepts: it holds each one in memory, and its
# messages are of kilobytes (the 20 MB FETCH reads into a buffer of its own instead).
MAX_LITERAL = 1024 * 1024
CRLF = b"\r\n"


class DialogueError(Exception):
    """A server answered something other than what the dialogue expects; says which step."""


@dataclass(frozen=True, slots=True)
class Account:
    """A login; the password stays out of ``repr`` (it is a testbed password, but still)."""

    address: str
    password: str = field(repr=False)


def imap_quoted(text: str) -> bytes:
    """``text`` as an IMAP quoted string (RFC 3501 section 4.3)."""
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


async def _line(reader: asyncio.StreamReader, step: str) -> bytes:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise DialogueError(f"{step}: connection closed")
    return line


async def _imap_tagged(reader: asyncio.StreamReader, tag: bytes, step: str) -> None:
    """Skip untagged lines up to ``tag``'s completion, which must be OK."""
    while True:
        line = await _line(reader, step)
        if line.startswith(tag):
            if line[len(tag) : len(tag) + 2] != b"OK":
                raise DialogueError(f"{step}: {line[:80]!r}")
            return


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, limit=STREAM_LIMIT)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # A reset after our last command changes nothing about the session's result.
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def imap_login(port: int, account: Account) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, read the greeting and LOGIN; the connection stays open (and the caller's)."""
    reader, writer = await _open(port)
    try:
        if not (await _line(reader, "IMAP greeting")).startswith(b"* OK"):
            raise DialogueError("IMAP greeting is not * OK")
        writer.write(b"a LOGIN " + imap_quoted(account.address) + b" " + imap_quoted(account.password) + CRLF)
        await _imap_tagged(reader, b"a ", "IMAP LOGIN")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def imap_session(port: int, account: Account) -> float:
    """LOGIN, SELECT INBOX, LOGOUT; returns the login latency (connect to LOGIN OK) in seconds."""
    started = time.perf_counter()
    async with asyncio.timeout(SESSION_TIMEOUT):
        reader, writer = await imap_login(port, account)
        latency = time.perf_counter() - started
        try:
            writer.write(b"b SELECT INBOX\r\n")
            await _imap_tagged(reader, b"b ", "IMAP SELECT")
            writer.write(b"c LOGOUT\r\n")
            await _imap_tagged(reader, b"c ", "IMAP LOGOUT")
        finally:
            await _close(writer)
    return latency


async def _pop3_ok(reader: asyncio.StreamReader, step: str) -> bytes:
    line = await _line(reader, step)
    if not line.startswith(b"+OK"):
        raise DialogueError(f"{step}: {line[:80]!r}")
    return line


async def pop3_session(port: int, account: Account) -> float:
    """USER, PASS, STAT, RETR 1, QUIT; returns the login latency (connect to PASS +OK)."""
    started = time.perf_counter()
    async with asyncio.timeout(SESSION_TIMEOUT):
        reader, writer = await _open(port)
        try:
            await _pop3_ok(reader, "POP3 greeting")
            writer.write(b"USER " + account.address.encode() + CRLF)
            await _pop3_ok(reader, "POP3 USER")
            writer.write(b"PASS " + account.password.encode() + CRLF)
            await _pop3_ok(reader, "POP3 PASS")
            latency = time.perf_counter() - started
            writer.write(b"STAT\r\n")
            if (await _pop3_ok(reader, "POP3 STAT")).split()[1:2] == [b"0"]:
                raise DialogueError("POP3 STAT: the mailbox is empty")
            writer.write(b"RETR 1\r\n")
            await _pop3_ok(reader, "POP3 RETR")
            # RFC 1939 section 3: a multi-line response ends with a line holding a single dot; a
            # message line that starts with a dot is stuffed, so this cannot match inside one.
            await reader.readuntil(b"\r\n.\r\n")
            writer.write(b"QUIT\r\n")
            await _pop3_ok(reader, "POP3 QUIT")
        finally:
            await _close(writer)
    return latency


def dot_stuffed(message: bytes) -> bytes:
    """``message`` (CRLF lines) as SMTP DATA carries it, terminator included (RFC 5321 4.5.2)."""
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(CRLF):
        body += CRLF
    return body + b".\r\n"


async def _smtp_reply(reader: asyncio.StreamReader, expected: bytes, step: str) -> None:
    """Read a (multi-line) reply; its code must be ``expected`` (RFC 5321 section 4.2.1)."""
    while True:
        line = await _line(reader, step)
        if not line.startswith(expected):
            raise DialogueError(f"{step}: {line[:80]!r}")
        if line[3:4] != b"-":
            return


async def smtp_submission(port: int, account: Account, recipient: str, data: bytes) -> float:
    """EHLO, AUTH PLAIN, MAIL, RCPT, DATA (``data`` already stuffed), QUIT; returns the login latency."""
    token = base64.b64encode(f"\0{account.address}\0{account.password}".encode())
    started = time.perf_counter()
    async with asyncio.timeout(SESSION_TIMEOUT):
        reader, writer = await _open(port)
        try:
            await _smtp_reply(reader, b"220", "SMTP greeting")
            writer.write(b"EHLO bench.example\r\n")
            await _smtp_reply(reader, b"250", "SMTP EHLO")
            writer.write(b"AUTH PLAIN " + token + CRLF)
            await _smtp_reply(reader, b"235", "SMTP AUTH")
            latency = time.perf_counter() - started
            writer.write(b"MAIL FROM:<" + account.address.encode() + b">\r\n")
            await _smtp_reply(reader, b"250", "SMTP MAIL")
            writer.write(b"RCPT TO:<" + recipient.encode() + b">\r\n")
            await _smtp_reply(reader, b"250", "SMTP RCPT")
            writer.write(b"DATA\r\n")
            await _smtp_reply(reader, b"354", "SMTP DATA")
            writer.write(data)
            await _smtp_reply(reader, b"250", "SMTP end of data")
            writer.write(b"QUIT\r\n")
            await _smtp_reply(reader, b"221", "SMTP QUIT")
        finally:
            await _close(writer)
    return latency


def _literal_size(header: bytes) -> int:
    """The octet count of the literal that ends a reply line: ``... {1234}\\r\\n`` (RFC 3501 4.3)."""
    return int(header[header.rindex(b"{") + 1 : -3])


class BlockingImap:
    """One IMAP connection on a blocking socket, for the FETCH of a large literal."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
        self._buffer = bytearray()

    def _line(self, step: str) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise DialogueError(f"{step}: no line end in {MAX_LINE} octets")
            chunk = self._socket.recv(65536)
            if not chunk:
                raise DialogueError(f"{step}: connection closed")
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    def _tagged(self, tag: bytes, step: str) -> None:
        while not (line := self._line(step)).startswith(tag):
            pass
        if line[len(tag) : len(tag) + 2] != b"OK":
            raise DialogueError(f"{step}: {line[:80]!r}")

    def command(self, tag: bytes, text: bytes, step: str) -> None:
        self._socket.sendall(tag + text + CRLF)
        self._tagged(tag, step)

    def login(self, account: Account) -> None:
        if not self._line("IMAP greeting").startswith(b"* OK"):
            raise DialogueError("IMAP greeting is not * OK")
        self.command(
            b"a ", b"LOGIN " + imap_quoted(account.address) + b" " + imap_quoted(account.password), "LOGIN"
        )

    def fetch_into(self, tag: bytes, sequence: int, into: bytearray) -> int:
        """FETCH message ``sequence``'s BODY.PEEK[] into ``into``; return the literal's size.

        Raises:
            DialogueError: no literal in the reply, or one larger than ``into``.
        """
        self._socket.sendall(tag + b"FETCH " + str(sequence).encode() + b" BODY.PEEK[]" + CRLF)
        header = self._line("FETCH")
        if not header.startswith(b"* ") or not header.endswith(b"}\r\n"):
            raise DialogueError(f"FETCH: {header[:80]!r}")
        size = _literal_size(header)
        if size > len(into):
            raise DialogueError(f"FETCH: a {size}-octet literal does not fit")
        self._literal_into(memoryview(into)[:size])
        self._tagged(tag, "FETCH completion")
        return size

    def fetch_all(self, tag: bytes, last: int) -> list[bytes]:
        """FETCH 1:``last`` BODY.PEEK[]; return every literal of the reply, in the order sent.

        Untagged replies without a literal (a FLAGS update, EXISTS) are skipped.

        Raises:
            DialogueError: the tagged completion is not OK, or a literal is longer than
                MAX_LITERAL octets.
        """
        self._socket.sendall(tag + b"FETCH 1:" + str(last).encode() + b" BODY.PEEK[]" + CRLF)
        literals: list[bytes] = []
        while not (line := self._line("FETCH")).startswith(tag):
            if line.startswith(b"* ") and line.endswith(b"}\r\n"):
                size = _literal_size(line)
                if size > MAX_LITERAL:
                    raise DialogueError(f"FETCH: a {size}-octet literal is over {MAX_LITERAL}")
                literal = bytearray(size)
                self._literal_into(memoryview(literal))
                literals.append(bytes(literal))
        if line[len(tag) : len(tag) + 2] != b"OK":
            raise DialogueError(f"FETCH: {line[:80]!r}")
        return literals

    def _literal_into(self, view: memoryview) -> None:
        """Fill ``view`` with the literal that follows the header line just read."""
        size = len(view)
        # What was read past the header line is the literal's start.
        have = min(size, len(self._buffer))
        view[:have] = self._buffer[:have]
        del self._buffer[:have]
        while have < size:
            received = self._socket.recv_into(view[have:size])
            if not received:
                raise DialogueError("FETCH: connection closed inside the literal")
            have += received

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone: closing is all that is left to do
            self._socket.sendall(b"z LOGOUT\r\n")
        self._socket.close()
