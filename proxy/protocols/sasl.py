"""SASL pieces shared by the IMAP, POP3 and SMTP machines: credentials, PLAIN and LOGIN.

Decodes what clients send for AUTHENTICATE/AUTH PLAIN (RFC 4616) and LOGIN (draft-murchison-
sasl-login), runs the protocol-neutral part of that exchange (``begin`` and ``SaslExchange``:
challenges, the ``*`` cancel, the ``=`` initial response), checks credentials for control
characters, and encodes the PLAIN response the proxy sends to a backend. The front-ends keep
only their own framing (``+ `` or ``334 ``) and replies. Credentials carry a redacting ``repr``
so that no log line, traceback or test failure can ever show a password. Pure: no I/O, no
logging.

A password is the client's octets, carried as ``bytes`` from the front-end to every place it
goes (an IMAP literal, a POP3 PASS line, a PLAIN response, auth_http's Auth-Pass), never
decoded. RFC 3501 literals and POP3 PASS (RFC 1939) carry any octets, old clients send Latin-1
passwords, and nginx and Dovecot take them. Not ``str`` with surrogateescape: every ``encode()``
on the way out would have to name that error handler, and one that did not would raise or
re-encode the password wrongly, which mypy cannot see; with ``bytes`` there is nothing to
re-encode and mypy catches a mix-up. PLAIN and LOGIN take 8-bit passwords too, although RFC
4616 says UTF-8: nginx passes the octets on unchecked, Dovecot accepts them, and a password is
only ever compared, never interpreted. A user name stays text and must be UTF-8 (nginx would
pass 8-bit octets on): it is the routing key, matched by its domain against the table's text,
it names the user in the session's log line and it goes to auth_http as Auth-User, so octets
there would have to be decoded after all; the front-ends refuse such a name with their error.

An authorization identity (PLAIN's authzid, RFC 4616 section 2) other than the user is refused
here, once for the three front-ends (``SaslAuthzidRefused``, answered like a failed login):
the routing table, the failed-login throttle and auth_http's Auth-User all judge the user,
while the backend would be asked to act as the authzid (a Dovecot master user logs in to that
mailbox, Postfix sends as that identity). The identity approved and the one acting would
differ. nginx drops the authzid and logs in as the user instead; silently acting as the user
opens the wrong mailbox, or sends as the wrong sender, from the client's point of view, so a
refusal that says why is the honest answer. An authzid equal to the user asks for nothing more
and passes.
"""

import base64
import binascii
from dataclasses import dataclass, field
from enum import Enum

from proxy.protocols.errors import RemoteProtocolError

# RFC 4616 section 2: authzid, authcid and passwd are each at most 255 octets (of UTF-8; we take
# any octets in passwd, see above).
MAX_PLAIN_FIELD = 255
# The base64 prompts of the LOGIN mechanism ("Username:" and "Password:"), as nginx and Dovecot send.
LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"
# RFC 4422 section 3.5 / RFC 3501 section 6.2.2: a lone "*" cancels an exchange.
CANCEL = b"*"
# RFC 4959 (IMAP), RFC 5034 section 4 (POP3), RFC 4954 section 4 (SMTP): "=" as the initial
# response stands for an empty one.
EMPTY_INITIAL_RESPONSE = b"="
# Control characters (RFC 20: C0 and DEL) refused in login names and passwords.
_CONTROL_CHARACTERS = frozenset(map(chr, (*range(0x20), 0x7F)))
# Octets as the code points of the same number, so that one check serves text and octets.
_OCTETS = "latin-1"
# The front-ends' refusal of another authorization identity, in their own reply framing.
AUTHZID_REFUSED_TEXT = b"Authorization identity must be the user name"
# RFC 5034 section 4 and RFC 4954 section 4 exempt the client's responses from the command line
# limit. The longest response the offered mechanisms can produce is PLAIN's: three RFC 4616
# fields of at most 255 octets and two NULs, 767 octets, which base64 turns into 1024.
MAX_RESPONSE_LINE = 4 * ((3 * MAX_PLAIN_FIELD + 2 + 2) // 3)


class Mechanism(Enum):
    """How the client handed over its credentials (auth_http calls all of these "plain")."""

    NATIVE = "native"  # IMAP LOGIN, POP3 USER/PASS
    PLAIN = "plain"
    LOGIN = "login"


# The SASL mechanisms the front-ends offer, by their RFC 4422 names, in the advertised order.
MECHANISMS = {b"PLAIN": Mechanism.PLAIN, b"LOGIN": Mechanism.LOGIN}


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login name and password; the password never appears in ``repr``/``str``."""

    username: str
    password: bytes = field(repr=False)  # the client's octets, never decoded (see above)
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


def _octets(raw: bytes, what: str) -> bytes:
    if len(raw) > MAX_PLAIN_FIELD:
        raise SaslError(f"{what} longer than {MAX_PLAIN_FIELD} octets")
    return raw


def _text(raw: bytes, what: str) -> str:
    try:
        return _octets(raw, what).decode("utf-8")
    except UnicodeDecodeError as error:
        raise SaslError(f"{what} is not UTF-8") from error


def replayable(credentials: Credentials) -> bool:
    """True if a front-end may route, ask about and replay these credentials: ``printable``
    (below), and the user name and the password each within RFC 4616's 255 octets.

    SASL PLAIN holds every field to that as it decodes; IMAP LOGIN and POP3 USER/PASS must too. A
    longer name is no mailbox address (RFC 5321 section 4.5.3.1.3: a path is at most 256 octets
    with its brackets), and Dovecot's login process drops a connection whose LOGIN passes about
    a kilobyte ("* BYE Input buffer full"), which the proxy would take for a broken backend and
    try the next one with.
    """
    return (
        printable(credentials.username, credentials.password)
        and len(credentials.username.encode()) <= MAX_PLAIN_FIELD
        and len(credentials.password) <= MAX_PLAIN_FIELD
    )


def printable(*values: str | bytes) -> bool:
    """True if none of ``values`` (user names as text, passwords as octets) holds a control
    character, and every user name is printable text.

    The front-ends refuse credentials that fail this: a CR or LF in a user name would split
    the session's log line (a forged entry) or a replayed USER/PASS line, a NUL ends a C string
    in the backend, and no real account name or password carries any of them. A user name must
    also be printable as Unicode defines it (``str.isprintable``): no C1 control (U+009B is the
    8-bit form of a terminal's ESC [), no line or paragraph separator (U+0085, U+2028: line ends
    to a log reader), no bidirectional override or other format character that would make the
    log line read otherwise than it is. Octets from 0x80 up pass in a password: they are
    Latin-1 or UTF-8 text there, and a password is never logged.
    """
    return all(
        value.isprintable()
        if isinstance(value, str)
        else not _CONTROL_CHARACTERS.intersection(value.decode(_OCTETS))
        for value in values
    )


def parse_plain(response: bytes) -> Credentials:
    """Decode a base64 PLAIN response ``authzid NUL authcid NUL passwd`` (RFC 4616 section 2)."""
    message = decode_base64(response)
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN response needs exactly two NUL separators")
    authzid, authcid = (
        _text(part, name) for part, name in zip(parts[:2], ("authzid", "authcid"), strict=True)
    )
    passwd = _octets(parts[2], "passwd")
    if not authcid:
        raise SaslError("PLAIN response has an empty authentication identity")
    return Credentials(username=authcid, password=passwd, mechanism=Mechanism.PLAIN, authzid=authzid)


def parse_login_user(response: bytes) -> str:
    """Decode the LOGIN mechanism's answer to "Username:" (UTF-8 text)."""
    return _text(decode_base64(response), "user name")


def parse_login_password(response: bytes) -> bytes:
    """Decode the LOGIN mechanism's answer to "Password:" (octets, as the client sent them)."""
    return _octets(decode_base64(response), "password")


def plain_response(credentials: Credentials) -> bytes:
    """The base64 PLAIN response that logs ``credentials`` in on a backend."""
    message = b"\x00".join(
        (credentials.authzid.encode(), credentials.username.encode(), credentials.password)
    )
    return encode_base64(message)


# ---------------------------------------------------------------------------------------------
# The exchange (RFC 4422 section 3): the server challenges, the client responds, until the
# mechanism has the credentials. The front-ends frame challenges and replies in their protocol.


@dataclass(frozen=True, slots=True)
class SaslCancelled:
    """The client answered a challenge with "*": the exchange ends without credentials."""


@dataclass(frozen=True, slots=True)
class SaslInvalid:
    """The client's response was malformed; ``reason`` says how, never what it contained."""

    reason: str


@dataclass(frozen=True, slots=True)
class SaslAuthzidRefused:
    """The PLAIN response names an authorization identity other than its user: refused, as
    the module docstring says why; the front-ends answer with ``AUTHZID_REFUSED_TEXT``."""


@dataclass(frozen=True, slots=True)
class SaslExchange:
    """An exchange waiting for the client's next response to ``challenge``.

    PLAIN takes everything in one response to an empty challenge (RFC 4616 section 2); LOGIN
    asks for the user name, then the password. Holds no password: the response that carries
    one completes the exchange.
    """

    mechanism: Mechanism
    username: str | None = None  # LOGIN: the user name, once the client gave it

    @property
    def challenge(self) -> bytes:
        """The base64 challenge to send in the protocol's continuation (empty for PLAIN)."""
        if self.mechanism is Mechanism.PLAIN:
            return b""
        return LOGIN_USERNAME_PROMPT if self.username is None else LOGIN_PASSWORD_PROMPT

    def respond(self, line: bytes) -> "SaslStep":
        """Take the client's continuation line (without its line end): "*" cancels."""
        if line == CANCEL:
            return SaslCancelled()
        return self._answer(line)

    def _answer(self, response: bytes) -> "SaslStep":
        try:
            if self.mechanism is Mechanism.PLAIN:
                credentials = parse_plain(response)
                if credentials.authzid not in ("", credentials.username):
                    return SaslAuthzidRefused()
                return credentials
            if self.username is None:
                username = parse_login_user(response)
                if not username:
                    return SaslInvalid("empty user name")
                return SaslExchange(self.mechanism, username)
            return Credentials(self.username, parse_login_password(response), Mechanism.LOGIN)
        except SaslError as error:
            return SaslInvalid(str(error))


# What one client response leads to: the next challenge (the exchange that waits for its
# answer), complete credentials, a cancel, malformed data, or another identity refused.
SaslStep = SaslExchange | Credentials | SaslCancelled | SaslInvalid | SaslAuthzidRefused


def begin(name: bytes, initial: bytes | None) -> SaslStep | None:
    """Start an exchange for the mechanism ``name`` (any case), with the client's initial
    response if it gave one (RFC 4422 section 3.3; "=" stands for an empty one).

    Returns None when the mechanism is not one we offer. "*" is no cancel here: only a
    response to a challenge can cancel (RFC 4954 section 4), so it is malformed data.
    """
    mechanism = MECHANISMS.get(name.upper())
    if mechanism is None:
        return None
    exchange = SaslExchange(mechanism)
    if initial is None:
        return exchange
    if initial == EMPTY_INITIAL_RESPONSE:
        # LOGIN is server-first: its data answers the "Username:" challenge, so an empty
        # initial response only means "no data yet" and the exchange starts with that
        # challenge, as Dovecot does. An empty PLAIN message lacks its NULs: malformed.
        return exchange if mechanism is Mechanism.LOGIN else exchange._answer(b"")
    return exchange._answer(initial)
