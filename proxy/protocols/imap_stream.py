"""Where one direction of a relayed IMAP stream is: at a line boundary, inside a line, or inside a
literal (and how many of its octets are still to come).

The relay (``proxy.server.relay``) keeps one ``ImapStream`` per direction of an IMAP session and
feeds it the bytes it forwards, so that a draining proxy writes its ``* BYE`` only where RFC 3501
section 7.1.5 allows a response to start: at a line boundary of both directions, outside any
literal. It also tells the relay how long a literal body is, so the body can be spliced without
being looked at. It never interprets a command or a response beyond that, never buffers a whole
line, never raises for anything a peer sends; pure: no I/O, no clocks, no logging.

Theory of operation
-------------------
IMAP is made of lines; a line that ends in a literal marker is followed by exactly that many
octets and then by the rest of the line (RFC 3501 sections 4.3 and 9). The marker is ``{N}``
(both directions), ``{N+}`` (RFC 7888 LITERAL+ and LITERAL-) or ``~{N}`` (RFC 3516 BINARY), and
it always ends its line segment: a quoted string cannot hold CR or LF. So once literal bodies are
skipped, the last few octets before each LF say whether a literal follows. Only those octets
(``TAIL_KEPT``) are kept, and for the client direction the first few octets of a command line
(``COMMAND_HEAD_KEPT``), to see COMPRESS. A bare LF ends a line, as in ``lines.LineBuffer``.

The stream becomes *opaque*, for good, when it cannot be followed any more: a literal marker
beyond RFC 9051's number64, or a COMPRESS command from the client (RFC 4978: both directions are
deflate streams from the next octet on, whether the server accepts or not is not worth reading;
a refused COMPRESS only costs the drain its closing line). An opaque stream is never at a boundary.

What it cannot tell: a response whose human-readable text happens to end in ``{N}`` (resp-text
allows it; no server is known to write one) is taken for a literal, and the next N octets are
skipped; the tracker is in step again at the next LF. A client's synchronizing literal that the
server refuses (a tagged NO instead of ``+``) is never sent, so the client direction waits inside
it for good: that session is never at a boundary again and the drain cuts it at its deadline.
"""

import re
from dataclasses import dataclass

# RFC 9051 section 9: a literal's length is a number64 (at most 2**63 - 1; RFC 3501's number is
# 32-bit, RFC 3516's literal8 and IMAP4rev2 allow the wider one). Longer markers are absurd: the
# tracker gives up on the stream (opaque) rather than guess.
MAX_LITERAL = 2**63 - 1
MAX_LITERAL_DIGITS = len(str(MAX_LITERAL))
# The last octets of a line segment kept to find its marker: "{", the digits, "+", "}" and a CR,
# plus one to tell a digit run longer than MAX_LITERAL_DIGITS from a shorter one.
TAIL_KEPT = MAX_LITERAL_DIGITS + 5
# The first octets of a client command line kept to read its tag and command name (RFC 3501
# section 2.2.1: tag SP command). RFC 3501 sets no limit on tags; imap.py holds clients to
# nginx's 128-octet limit before login, and a command whose name does not fit here is taken for
# a COMPRESS (opaque), which costs only the drain's closing line.
COMMAND_HEAD_KEPT = 160

# literal = "{" number64 ["+"] "}" CRLF *CHAR8 ; literal8 = "~{" number64 "}" CRLF *OCTET
# (RFC 9051 section 9, RFC 7888, RFC 3516). Matched on a segment's last octets before its LF; the
# "{" is optional here so that a digit run too long to be a number64 is seen as such.
_MARKER = re.compile(rb"(\{)?([0-9]+)\+?\}\r?\Z")
# RFC 4978 section 3: COMPRESS DEFLATE; the command name is case-insensitive (RFC 3501 section 9).
_COMPRESS = b"COMPRESS"


@dataclass(frozen=True, slots=True)
class Position:
    """A snapshot of where a stream is (``ImapStream.position``)."""

    boundary: bool  # at the start of a line, outside any literal: a whole response may come here
    literal: int  # octets of the current literal still to come (0 outside a literal)
    opaque: bool  # no longer followed (COMPRESS, an absurd literal): never a boundary


class ImapStream:
    """One direction of an IMAP session after login: bytes in, position out.

    ``client`` says the direction is client -> server (only there is COMPRESS looked for). The
    relay calls ``feed`` with every octet it forwards, or ``skip`` for literal octets it moved
    without looking (at most ``literal`` of them), and reads ``at_boundary``, ``literal`` and
    ``opaque``. Small while idle: a few slots and no buffer (the kept octets are emptied at
    every line end).
    """

    __slots__ = ("_command", "_head", "_mid_line", "_tail", "client", "literal", "opaque")

    def __init__(self, *, client: bool) -> None:
        self.client = client
        self.literal = 0  # octets of the current literal still to come
        self.opaque = False
        self._mid_line = False  # octets of the current line seen (or a literal just ended)
        self._tail = b""  # the current segment's last octets, at most TAIL_KEPT
        self._command = client  # the current line starts a client command (not a continuation)
        self._head = b""  # its first octets, at most COMMAND_HEAD_KEPT

    @property
    def at_boundary(self) -> bool:
        """At the start of a line, outside any literal, and still followed."""
        return not (self.opaque or self.literal or self._mid_line)

    def position(self) -> Position:
        return Position(self.at_boundary, self.literal, self.opaque)

    def go_opaque(self) -> None:
        """Stop following the stream, for good (the other direction saw COMPRESS)."""
        self.opaque = True
        self.literal = 0
        self._tail = self._head = b""

    def skip(self, size: int) -> None:
        """``size`` octets of the current literal went by unseen (spliced)."""
        assert 0 <= size <= self.literal, "only literal octets can be skipped"
        self.literal -= size

    def feed(self, data: bytes) -> None:
        """The next octets of the stream, cut anywhere."""
        if self.opaque:
            return
        end = len(data)
        start = 0
        while start < end:
            if self.literal:
                taken = min(self.literal, end - start)
                self.literal -= taken
                start += taken
                continue
            newline = data.find(b"\n", start)
            if newline < 0:
                self._keep(data, start, end)
                return
            self._keep(data, start, newline)
            self._line_ended()
            if self.opaque:
                return
            start = newline + 1

    def _keep(self, data: bytes, start: int, end: int) -> None:
        if start == end:
            return
        self._mid_line = True
        if end - start >= TAIL_KEPT:
            self._tail = data[end - TAIL_KEPT : end]
        else:
            self._tail = (self._tail + data[start:end])[-TAIL_KEPT:]
        if self._command and len(self._head) < COMMAND_HEAD_KEPT:
            self._head += data[start : min(end, start + COMMAND_HEAD_KEPT - len(self._head))]

    def _line_ended(self) -> None:
        """An LF outside a literal: the segment before it ends in a literal marker or a line."""
        tail, self._tail = self._tail, b""
        marker = _MARKER.search(tail)
        # Without its "{" in view, a digit run is a marker only if it may have begun before the
        # kept octets: then it is longer than a number64.
        if marker is not None and (marker[1] is not None or (marker.start() == 0 and len(tail) == TAIL_KEPT)):
            digits = marker[2]
            if marker[1] is None or len(digits) > MAX_LITERAL_DIGITS or int(digits) > MAX_LITERAL:
                self.go_opaque()  # too long to be a number64, or a run whose start fell out
                return
            # The line goes on after the literal's octets (even after an empty one), and it is
            # the same command: what follows the literal is no command name.
            self.literal = int(digits)
            self._mid_line = True
            self._command = False
            return
        if self._command and self._compresses():
            self.go_opaque()
            return
        self._mid_line = False
        self._command = self.client
        self._head = b""

    def _compresses(self) -> bool:
        """The client command line just ended may be a COMPRESS (or cannot be read to tell)."""
        words = self._head.rstrip(b"\r").split(b" ", 2)
        if len(words) > 1 and words[1].upper() == _COMPRESS:
            return True
        # The head was cut before the command name had surely ended.
        return len(self._head) >= COMMAND_HEAD_KEPT and len(words) < 3
