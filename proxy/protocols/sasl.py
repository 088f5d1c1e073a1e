"""SASL pieces shared by the IMAP, POP3 and SMTP machines: credentials, PLAIN and LOGIN.

Decodes what clients send for AUTHENTICATE/AUTH PLAIN (RFC 4616) and LOGIN (draft-murchison-
sasl-login), and encodes the PLAIN response the proxy sends to a backend. Credentials carry a
redacting ``repr`` so that no log line, traceback or test failure can ever show a password.
Pure: no I/O, no logging.
"""

import base64
import binascii
from dataclasses import dataclass, field
from enum import Enum

from proxy.protocols.errors import RemoteProtocolError

# RFC 4616 section 2: authzid, authcid and passwd are each at most 255 octets of UTF-8.
MAX_PLAIN_FIELD = 255
# The base64 prompts of the LOGIN mechanism ("Username:" and "Password:"), as nginx and Dovecot send.
LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"
# RFC 4422 section 3.5 / RFC 3501 section 6.2.2: a lone "*" cancels an exchange.
CANCEL = b"*"


class Mechanism(Enum):
    """How the client handed over its credentials (auth_http calls all of these "plain")."""

    NATIVE = "native"  # IMAP LOGIN, POP3 USER/PASS
    PLAIN = "plain"
    LOGIN = "login"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login name and password; the password never appears in ``repr``/``str``."""

    username: str
    password: str = field(repr=False)
    mechanism: Mechanism = Mechanism.NATIVE
    authzid: str = ""

    def __repr__(self) -> str:
        return (
            f"Credentials(username={self.username!r}, password=<redacted>, mechanism={self.mechanism.value})"
        )

    __str__ = __repr__


class SaslError(RemoteProtocolError):
    """The client's SASL data was malformed (bad base64, missing NULs, over-long fields)."""


def decode_base64(data: bytes) -> bytes:
    """Strict base64 (RFC 4648 section 4), as RFC 4422 requires for SASL exchanges."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SaslError("invalid base64") from error


def encode_base64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_PLAIN_FIELD:
        raise SaslError(f"{what} longer than {MAX_PLAIN_FIELD} octets")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SaslError(f"{what} is not UTF-8") from error


def parse_plain(response: bytes) -> Credentials:
    """Decode a base64 PLAIN response ``authzid NUL authcid NUL passwd`` (RFC 4616 section 2)."""
    message = decode_base64(response)
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN response needs exactly two NUL separators")
    authzid, authcid, passwd = (
        _text(part, name) for part, name in zip(parts, ("authzid", "authcid", "passwd"), strict=True)
    )
    if not authcid:
        raise SaslError("PLAIN response has an empty authentication identity")
    return Credentials(username=authcid, password=passwd, mechanism=Mechanism.PLAIN, authzid=authzid)


def parse_login_field(response: bytes, what: str) -> str:
    """Decode one base64 answer of the LOGIN mechanism (the username or the password)."""
    return _text(decode_base64(response), what)


def plain_response(credentials: Credentials) -> bytes:
    """The base64 PLAIN response that logs ``credentials`` in on a backend."""
    message = b"\x00".join(
        (credentials.authzid.encode(), credentials.username.encode(), credentials.password.encode())
    )
    return encode_base64(message)
