"""Line framing for the pre-login dialogues: CRLF lines and exact-size literals.

Used by every protocol machine to cut a byte stream into lines (and IMAP literals) without
ever growing past a named limit. Work is O(n) in the bytes fed: the scan for LF resumes where
it stopped. Pure: no I/O, no clocks, no logging.
A bare LF is accepted as a line end, as nginx and Dovecot do, because real clients send it.
"""

from proxy.protocols.errors import LineTooLongError


class LineBuffer:
    """Accumulates bytes and hands out complete lines or exact-size chunks."""

    __slots__ = ("_buffer", "_scanned", "max_line")

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes already known to hold no LF
        self.max_line = max_line

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def pop_line(self) -> bytes | None:
        """Return the next line without its CRLF (or LF), or None if none is complete yet.

        Raises:
            LineTooLongError: more than ``max_line`` bytes arrived without a line end.
        """
        newline = self._buffer.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._buffer)
            # A trailing CR may be the first half of the CRLF: it does not count yet.
            if self._scanned - self._buffer.endswith(b"\r") > self.max_line:
                raise LineTooLongError(f"line longer than {self.max_line} bytes")
            return None
        end = newline - 1 if newline > 0 and self._buffer[newline - 1] == 0x0D else newline
        if end > self.max_line:
            raise LineTooLongError(f"line longer than {self.max_line} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: newline + 1]
        self._scanned = 0
        return line

    def pop_exact(self, size: int) -> bytes | None:
        """Return exactly ``size`` bytes (an IMAP literal), or None until they have all arrived."""
        if len(self._buffer) < size:
            return None
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._scanned = 0
        return chunk

    def take_all(self) -> bytes:
        """Hand over everything buffered (pipelined bytes for the relay) and empty the buffer."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return rest

    def clear(self) -> None:
        """Drop everything buffered (after STARTTLS: plaintext pipelined behind it is never read)."""
        self._buffer.clear()
        self._scanned = 0
