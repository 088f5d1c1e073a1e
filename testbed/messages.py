"""Test messages: small RFC 5322 messages with a unique Message-ID, and large ones of an exact size.

Used by the tests, the demo and the benchmarks to build what they send or store. Every message
uses CRLF line ends (what SMTP and IMAP carry), starts with its Message-ID header (never with a
trace header, so ``mailservers.strip_delivery_headers`` leaves it intact) and keeps lines short
enough that no server folds or splits them. Pure: builds bytes, does no I/O.
"""

import itertools
import uuid
from email.utils import formatdate

# RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters; Postfix splits beyond 2048.
LINE_LENGTH = 76
_sequence = itertools.count(1)


def message_id() -> str:
    return f"<{uuid.uuid4().hex}.{next(_sequence)}@testbed.example>"


def compose(
    sender: str, recipient: str, subject: str, body: str = "", *, identifier: str | None = None
) -> bytes:
    """A plain-text message from ``sender`` to ``recipient``; ``body`` lines may end in LF or CRLF."""
    headers = [
        f"Message-ID: {identifier or message_id()}",
        f"Date: {formatdate(localtime=False)}",
        f"From: <{sender}>",
        f"To: <{recipient}>",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    text = body.replace("\r\n", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return ("\r\n".join(headers) + "\r\n\r\n" + text.replace("\n", "\r\n")).encode()


def large(sender: str, recipient: str, size: int, *, subject: str = "large message") -> bytes:
    """A message of exactly ``size`` bytes whose numbered body lines make any corruption findable.

    Every tenth line starts with a dot, which SMTP must stuff and unstuff (RFC 5321 section 4.5.2).
    """
    head = compose(sender, recipient, subject)
    if size < len(head) + 2:
        raise ValueError(f"{size} bytes is smaller than the headers of a message")
    lines = []
    length = len(head)
    number = 0
    # Full lines while at least two bytes (a CRLF) would be left for the last, shorter line.
    while size - length - LINE_LENGTH >= 2:
        prefix = "." if number % 10 == 0 else ""
        lines.append(f"{prefix}{number:09d} ".ljust(LINE_LENGTH - 2, "abcdefghij"[number % 10]) + "\r\n")
        length += LINE_LENGTH
        number += 1
    lines.append("x" * (size - length - 2) + "\r\n")
    return head + "".join(lines).encode()
