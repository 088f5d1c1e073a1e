"""The push channel's rules that both of its ends apply: what a proxy name is, how a token file reads.

controller/publisher.py (which may import nothing from the proxy but this and proxy.table) and
proxy/settings.py with proxy/server/subscriber.py take them from here, so a name or a token file
one end accepts is never one the other refuses (a proxy would otherwise serve its snapshot for
ever, refused at every stream). Reads a token file and nothing else; never logs, and no message
it makes holds a token.
"""

import os
import re
import stat
from pathlib import Path

# A proxy acks under its pod's name: a Kubernetes object name, an RFC 1123 DNS subdomain (lower-case
# letters, digits, '-' and '.'; each label starting and ending with a letter or digit), at most
# 253 characters.
MAX_PROXY_NAME = 253
PROXY_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
PROXY_NAME_RULE = (
    "lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter"
    f" or digit, at most {MAX_PROXY_NAME} characters (a pod name, RFC 1123)"
)
# What is read of a token file at most: a Secret holds at most 1 MiB (Kubernetes'
# core.MaxSecretSize), so a path that names anything larger (a device, a log) is not a token.
MAX_TOKEN_FILE_BYTES = 1024 * 1024
# How a token file is opened: never waiting (a FIFO's open waits for a writer, and both ends read
# on their event loop), never inherited by a child, never a controlling terminal. A regular file
# ignores O_NONBLOCK; anything else is refused once opened.
TOKEN_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# What a path that is not a regular file names instead, for the message.
FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class TokenFileError(Exception):
    """The token file cannot be read or holds no token; the message is safe to log."""


def valid_proxy_name(name: str) -> bool:
    """True if ``name`` is one a proxy may ack under (PROXY_NAME_RULE)."""
    return len(name) <= MAX_PROXY_NAME and PROXY_NAME.fullmatch(name) is not None


def read_token_file(path: Path) -> tuple[str, os.stat_result]:
    """The token ``path`` holds and the status of the very file read (fstat, not a second stat).

    The token is the file's UTF-8 text without a leading byte order mark (an editor on Windows
    writes one; it is no part of the token) and without surrounding whitespace (``echo`` ends the
    file with a line break).

    Raises:
        TokenFileError: the file cannot be read, is not a regular file (a named pipe's open and
            read would wait on the caller's event loop), is larger than MAX_TOKEN_FILE_BYTES, is
            not UTF-8 text, holds only whitespace, or its token holds a character that cannot go into an
            HTTP header (a line break, another control character; HTTP clients refuse them).
    """
    try:
        descriptor = os.open(path, TOKEN_FILE_FLAGS)  # follows symlinks (Kubernetes' ..data)
    except OSError as error:
        raise TokenFileError(f"cannot read the token file {path}: {error.strerror}") from error
    # Python's file object refuses a directory itself: the descriptor's type is checked first.
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        # Reading a pipe or a device could wait for ever (or never end): it holds no Secret.
        kind = FILE_KINDS.get(stat.S_IFMT(status.st_mode), "another kind of file")
        raise TokenFileError(f"the token file {path} is not a regular file but {kind}")
    try:
        with open(descriptor, "rb") as file:
            raw = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as error:
        raise TokenFileError(f"cannot read the token file {path}: {error.strerror}") from error
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise TokenFileError(f"the token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    try:
        # utf-8-sig: UTF-8 that drops one leading byte order mark.
        token = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise TokenFileError(f"the token file {path} is not UTF-8 text") from error
    if not token:
        raise TokenFileError(f"the token file {path} is empty")
    if not token.isprintable():
        # The proxy sends it in an Authorization header: a line break there would end the header,
        # and its HTTP client refuses one with a ValueError. The controller refuses it alike,
        # rather than wait for a token no proxy can send.
        raise TokenFileError(
            f"the token file {path} holds a control character or another non-printing one"
            " (a line break?) in its token"
        )
    return token, status
