"""IMAP before login: the client-facing ``Frontend`` and the backend-facing ``BackendLogin``.

The session driver in ``proxy.server`` feeds both machines events and carries out the commands
they return (see ``proxy.protocols.events``). They speak only the pre-authentication subset of
IMAP4rev1 (RFC 3501; RFC 9051 agrees on all of it): CAPABILITY, NOOP, LOGOUT, ID, STARTTLS,
LOGIN and AUTHENTICATE PLAIN/LOGIN. They never do I/O, never read a clock, never raise for
anything a peer sends, and never put a password into a reply, a reason or a ``repr``.

Theory of operation (Frontend)
------------------------------
Bytes go into one ``LineBuffer``. A command is one or more line *segments*: a segment that
ends in a literal marker ``{n}`` or ``{n+}`` is followed by exactly n octets of literal data
and then by the next segment (RFC 3501 section 4.3, RFC 7888). Every time a segment completes,
the whole command so far is parsed again from its first byte (commands are short and carry at
most a few literals, so this stays cheap). The parse ends in one of three ways:

- a complete command, which is executed;
- "incomplete": the grammar is satisfied up to a literal whose data has not arrived. For a
  synchronizing literal we say ``+ Ready`` only now, after the prefix proved valid, so a
  client never sends a literal into a command we are going to refuse;
- a syntax error, answered with BAD. If the bad line ended in a non-synchronizing literal
  the client is already sending data we cannot tell apart from commands, so we close.

When credentials are complete the machine emits ``Authenticate`` and stops interpreting:
later bytes stay buffered, because they are the client's pipelined commands for the backend
(``Relay.buffered``) if the login succeeds, and ours to answer if it fails. After STARTTLS
everything the client pipelined in plaintext is dropped and never read (CVE-2014-3556).

Where we differ from nginx on purpose: the greeting carries the capabilities; response codes
come from RFC 5530; SASL cancel ``*`` and the empty initial response ``=`` are honoured
(RFC 3501 section 6.2.2, RFC 4959); PLAIN with an authorization identity other than the user
is refused instead of silently ignored; ID is answered (``* ID NIL``) instead of being an
invalid command; literals are bounded by a named limit, not by a buffer size.

Theory of operation (BackendLogin)
----------------------------------
Wait for the ``* OK`` greeting, then send (in one write) an optional ID carrying the client's
address and LOGIN with the name and password as literals, non-synchronizing when the greeting
advertised LITERAL+, else synchronizing (one ``+`` round trip each, as nginx). Literals, never
quoted strings: they carry the password's octets as they are (quotes, backslashes and 8-bit
octets, which an RFC 3501 quoted string cannot hold) and need no escaping. Every command
we send carries a tag of our own, never the client's: RFC 3501 lets a client's tag hold
characters a backend may refuse (Dovecot answers ``* BAD`` to a ``]``, which nginx never lets
through), and a client's byte must not turn into a backend failure. The LOGIN's tagged reply
and the untagged lines before it reach the client line by line (a backend's bare LF line ends
come out as CRLF), the tagged one with the client's tag in place of ours and the rest of it
verbatim, except a refusal of the credentials, which is the proxy's own ``REFUSAL_TEXT``, as for a
login no route owns (a backend's own words would tell the two apart); the bytes after a success
reply pass untouched. Where nginx gives up on any
unexpected reply, we tell a refusal (``LoginFailed``; of the credentials only without a
response code or with [AUTHENTICATIONFAILED]) from a backend at fault (``BackendFailed``:
[UNAVAILABLE], [SERVERBUG], BYE, garbage), which the driver may retry elsewhere.

With ``BackendConfig.starttls`` no credential goes out before TLS. The greeting's CAPABILITY
code (or, without one, our ``CAPABILITY``) must list STARTTLS; we send ``STARTTLS`` and, on its
OK, emit ``StartTls`` and drop whatever the backend sent behind the OK in plaintext (the
CVE-2014-3556 class, seen from the other side). After ``TlsEstablished`` the capabilities
learned in plaintext are forgotten and asked for again (RFC 3501 section 6.2.1: LITERAL+ and
LOGINDISABLED may differ now); then ID and LOGIN follow as above. A backend that does not
offer STARTTLS or refuses it fails the attempt: there is no plaintext fallback.
"""

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import assert_never

from proxy.protocols import sasl
from proxy.protocols.errors import LineTooLongError, LocalProtocolError, RemoteProtocolError
from proxy.protocols.events import (
    Authenticate,
    BackendConfig,
    BackendFailed,
    Close,
    Command,
    ConnectionClosed,
    DataReceived,
    Event,
    FrontendConfig,
    LoginAccepted,
    LoginFailed,
    LoginRejected,
    LoginRequest,
    LoginSucceeded,
    LoginUnavailable,
    Relay,
    Send,
    StartTls,
    StartTlsPolicy,
    TimedOut,
    TlsEstablished,
)
from proxy.protocols.lines import LineBuffer

# ---------------------------------------------------------------------------------------------
# Limits

# RFC 7162 section 4: command lines up to about 8192 octets, counting quoted strings but not
# literal data. We apply it to the segments of one command together.
MAX_COMMAND_LINE = 8192
# Literal octets one command may carry before login. LOGIN needs two short strings and ID a
# few; a larger literal is refused with [TOOBIG] (RFC 9051 section 7.1, RFC 7889 section 4).
MAX_LITERAL_OCTETS = 8192
# nginx's limit on tags (ngx_mail_parse.c); RFC 3501 sets none, and no real client comes close.
MAX_TAG = 32
# RFC 2971 section 3.3: at most 30 field-value pairs, fields of 30 octets, values of 1024.
MAX_ID_PAIRS = 30
MAX_ID_FIELD = 30
MAX_ID_VALUE = 1024
# Client bytes held while the driver decides a login. No RFC; a client pipelines a few
# commands behind LOGIN, and this bounds what a client can make us hold.
MAX_PIPELINED_OCTETS = 65536
# Backend replies before login are a greeting, a CAPABILITY or two and a tagged line; this
# bounds a line and the untagged lines collected before the tagged reply.
MAX_BACKEND_REPLY = 65536

CRLF = b"\r\n"
# The text of the tagged NO that refuses a login when no backend reply says otherwise
# (response code from RFC 5530 section 3); auth_http refusals without a text use it too.
REFUSAL_TEXT = b"[AUTHENTICATIONFAILED] Authentication failed."

# ---------------------------------------------------------------------------------------------
# Grammar (RFC 3501 section 9; RFC 9051 section 9 is the same for everything used here)
#
#   atom-specials   = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials
#   list-wildcards  = "%" / "*"          quoted-specials = DQUOTE / "\"       resp-specials = "]"
#   ATOM-CHAR       = <any CHAR except atom-specials>          atom = 1*ATOM-CHAR
#   ASTRING-CHAR    = ATOM-CHAR / resp-specials                astring = 1*ASTRING-CHAR / string
#   tag             = 1*<any ASTRING-CHAR except "+">
#   string          = quoted / literal                         nstring = string / nil
#   quoted          = DQUOTE *QUOTED-CHAR DQUOTE
#   QUOTED-CHAR     = <any TEXT-CHAR except quoted-specials> / "\" quoted-specials
#                     / UTF8-2 / UTF8-3 / UTF8-4               (the last three: RFC 9051)
#   literal         = "{" number ["+"] "}" CRLF *CHAR8        ("+": RFC 7888; CHAR8 = %x01-ff)

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
_ATOM_CHARS = frozenset(byte for byte in range(0x21, 0x7F) if byte not in _ATOM_SPECIALS)
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}
_TAG_CHARS = _ASTRING_CHARS - {ord("+")}
# LOGIN's atoms also take the list-wildcards, which only matter to LIST: Dovecot and nginx log
# in with a password such as pa*ss%1 sent bare. What Dovecot refuses in an atom ("(", ")", "{",
# DQUOTE, CTL, 8-bit octets) stays refused.
_LOGIN_ATOM_CHARS = _ASTRING_CHARS | frozenset(b"%*")
_SPACE = frozenset(b" ")
# Octets that may stand for themselves in a quoted string: TEXT-CHAR minus quoted-specials,
# plus 8-bit octets (RFC 9051 UTF-8). A user name is checked as UTF-8 when it is decoded; a
# password stays octets, so Latin-1 in a quoted string passes as nginx and Dovecot let it.
_QUOTED_CHARS = frozenset(range(0x01, 0x100)) - {0x0A, 0x0D, ord('"'), ord("\\")}
_NON_SYNC_LITERAL_AT_END = re.compile(rb"\{[0-9]+\+\}\Z")
# An RFC 3501 number is 32 bits: ten digits at most. Longer is too big for any limit.
_MAX_NUMBER_DIGITS = 10


class _SyntaxError(RemoteProtocolError):
    """The client's command does not parse; the message is our BAD text (never client data)."""


class _Incomplete(Exception):
    """The command is valid so far but waits for the data of its last literal."""

    def __init__(self, size: int, synchronizing: bool) -> None:
        super().__init__(size, synchronizing)
        self.size = size
        self.synchronizing = synchronizing


@dataclass(frozen=True, slots=True)
class _Command:
    """A parsed command. ``arguments`` may hold a password, so it stays out of ``repr``."""

    tag: bytes
    name: str
    arguments: tuple[bytes, ...] = field(default=(), repr=False)


class _Parser:
    """Recursive descent over one command: text segments with literal data between them.

    ``tag`` and ``name`` are kept as soon as they are parsed, so the caller can still answer
    with the right tag (and know which command it was) when a later part fails or is pending.
    """

    def __init__(self, segments: Sequence[bytes], literals: Sequence[bytes]) -> None:
        self._segments = segments
        self._literals = literals
        self._index = 0  # current segment
        self._pos = 0  # offset in the current segment
        self.tag: bytes | None = None
        self.name = ""

    def parse(self) -> _Command:
        """Raises: _SyntaxError, _Incomplete."""
        tag = self._take(_TAG_CHARS)
        if not tag or len(tag) > MAX_TAG or self._peek() not in (ord(" "), None):
            raise _SyntaxError("Invalid tag")
        self.tag = tag
        # Spaces as Dovecot takes them (RFC 3501 wants exactly one): one after the tag and
        # around AUTHENTICATE's mechanism, runs of them between LOGIN's and ID's arguments, and
        # any number at the end of every command.
        self._space()
        self.name = self._atom("command name").upper().decode()
        arguments: tuple[bytes, ...] = ()
        match self.name:
            case "CAPABILITY" | "NOOP" | "LOGOUT" | "STARTTLS":
                pass
            case "LOGIN":
                self._spaces()
                user = self._astring()
                self._spaces()
                arguments = (user, self._astring())
            case "AUTHENTICATE":
                self._space()
                arguments = (self._atom("mechanism").upper(),)
                if self._peek() == ord(" ") and not self._only_spaces_left():
                    self._space()
                    # RFC 4959: the initial response is base64 or "="; both are atoms.
                    arguments += (self._atom("initial response"),)
            case "ID":
                self._spaces()
                self._id_parameters()
            case _:
                raise _SyntaxError("Command unknown or not allowed before login")
        self._take(_SPACE)
        if self._pos != len(self._segments[self._index]):
            raise _SyntaxError("Unexpected characters after the command")
        return _Command(tag, self.name, arguments)

    # -- primitives --------------------------------------------------------------------------

    def _peek(self) -> int | None:
        text = self._segments[self._index]
        return text[self._pos] if self._pos < len(text) else None

    def _take(self, allowed: frozenset[int]) -> bytes:
        text = self._segments[self._index]
        start = self._pos
        while self._pos < len(text) and text[self._pos] in allowed:
            self._pos += 1
        return text[start : self._pos]

    def _expect(self, byte: bytes, what: str) -> None:
        if self._peek() != byte[0]:
            raise _SyntaxError(f"Expected {what}")
        self._pos += 1

    def _space(self) -> None:
        self._expect(b" ", "a single space between arguments")

    def _spaces(self) -> None:
        if not self._take(_SPACE):
            raise _SyntaxError("Expected a space between arguments")

    def _only_spaces_left(self) -> bool:
        """Whether the rest of the current segment is spaces (or nothing)."""
        return not self._segments[self._index][self._pos :].strip(b" ")

    def _atom(self, what: str) -> bytes:
        atom = self._take(_ATOM_CHARS)
        if not atom:
            raise _SyntaxError(f"Missing or invalid {what}")
        return atom

    # -- strings -------------------------------------------------------------------------------

    def _astring(self) -> bytes:
        """LOGIN's arguments (no other command here takes an astring)."""
        if self._peek() in (ord('"'), ord("{")):
            return self._string()
        atom = self._take(_LOGIN_ATOM_CHARS)
        if not atom:
            raise _SyntaxError("Expected an atom, a quoted string or a literal")
        return atom

    def _string(self) -> bytes:
        match self._peek():
            case 0x22:  # DQUOTE
                return self._quoted()
            case 0x7B:  # "{"
                return self._literal()
        raise _SyntaxError("Expected a quoted string or a literal")

    def _nstring(self) -> bytes | None:
        if self._peek() not in (ord('"'), ord("{")):
            if self._take(_ATOM_CHARS).upper() != b"NIL":
                raise _SyntaxError("Expected a string or NIL")
            return None
        return self._string()

    def _quoted(self) -> bytes:
        self._pos += 1  # the opening DQUOTE
        text = self._segments[self._index]
        value = bytearray()
        while True:
            value += self._take(_QUOTED_CHARS)
            match self._peek():
                case 0x22:
                    self._pos += 1
                    return bytes(value)
                case 0x5C if self._pos + 1 < len(text) and text[self._pos + 1] in b'"\\':
                    value.append(text[self._pos + 1])
                    self._pos += 2
                case 0x5C:
                    raise _SyntaxError("Invalid escape in a quoted string")
                case None:
                    raise _SyntaxError("Unterminated quoted string")
                case _:
                    raise _SyntaxError("Invalid character in a quoted string")

    def _literal(self) -> bytes:
        self._pos += 1  # the "{"
        digits = self._take(frozenset(b"0123456789"))
        synchronizing = self._peek() != ord("+")
        if not synchronizing:
            self._pos += 1
        self._expect(b"}", "a literal size in braces")
        if not digits:
            raise _SyntaxError("Missing literal size")
        if self._pos != len(self._segments[self._index]):
            raise _SyntaxError("A literal must end the line")
        size = int(digits) if len(digits) <= _MAX_NUMBER_DIGITS else 1 << 32
        if self._index >= len(self._literals):
            raise _Incomplete(size, synchronizing)
        value = self._literals[self._index]
        if b"\x00" in value:
            raise _SyntaxError("NUL in a literal")  # CHAR8 excludes it (RFC 3501 section 9)
        self._index += 1
        self._pos = 0
        return value

    # -- ID (RFC 2971 section 4) ---------------------------------------------------------------
    #   id_params_list ::= "(" #(string SP nstring) ")" / nil

    def _id_parameters(self) -> None:
        if self._peek() != ord("("):
            if self._take(_ATOM_CHARS).upper() != b"NIL":
                raise _SyntaxError("ID takes a parenthesized list or NIL")
            return
        self._pos += 1
        self._take(_SPACE)  # Dovecot takes spaces inside the parentheses too
        pairs = 0
        while self._peek() != ord(")"):
            pairs += 1
            name = self._string()
            self._spaces()
            value = self._nstring()
            if pairs > MAX_ID_PAIRS or len(name) > MAX_ID_FIELD or len(value or b"") > MAX_ID_VALUE:
                raise _SyntaxError("ID parameters exceed the limits of RFC 2971")
            if not self._take(_SPACE) and self._peek() != ord(")"):
                raise _SyntaxError("Expected a space between arguments")
        self._pos += 1


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _SyntaxError(f"{what} is not UTF-8") from None


# ---------------------------------------------------------------------------------------------
# Frontend


class State(enum.Enum):
    """The RFC 3501 section 3 connection states the front-end passes through."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"  # logged in on a backend: the driver relays from here on
    LOGOUT = "logout"  # closed (or closing)


class _Phase(enum.Enum):
    """What the front-end waits for; all but RELAYING and CLOSED are NOT_AUTHENTICATED."""

    COMMAND = enum.auto()  # a command line (or the next segment of one)
    LITERAL = enum.auto()  # literal data
    SASL = enum.auto()  # a response to our AUTHENTICATE continuation
    LOGIN = enum.auto()  # the driver's verdict on an Authenticate
    TLS = enum.auto()  # the driver's TlsEstablished
    RELAYING = enum.auto()
    CLOSED = enum.auto()


class Frontend:
    """The IMAP server the client sees until it has logged in."""

    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._buffer = LineBuffer(MAX_COMMAND_LINE)
        self._phase = _Phase.COMMAND
        self._started = False
        self._tls = config.tls_active
        self._errors = 0
        # The command being assembled: its segments and the literal data after each one.
        self._segments: list[bytes] = []
        self._literals: list[bytes] = []
        self._literal_size = 0
        self._sasl: sasl.SaslExchange | None = None  # an AUTHENTICATE waiting for a response
        self._sasl_tag = b""
        self._login_tag = b""

    @property
    def state(self) -> State:
        if self._phase is _Phase.RELAYING:
            return State.AUTHENTICATED
        if self._phase is _Phase.CLOSED:
            return State.LOGOUT
        return State.NOT_AUTHENTICATED

    def start(self) -> list[Command]:
        """The greeting, with capabilities so that clients need not ask (RFC 3501 section 7.1)."""
        if self._started:
            raise LocalProtocolError("start() was already called")
        self._started = True
        server_name = self._config.server_name.encode()
        return [Send(b"* OK [CAPABILITY " + self._capabilities() + b"] " + server_name + b" ready" + CRLF)]

    def handle(self, event: Event) -> list[Command]:
        """Take one event from the driver; return what the driver must do, in order.

        Raises:
            LocalProtocolError: the event makes no sense now (before ``start()``, after
                ``Relay`` or ``Close``, a verdict with no ``Authenticate`` pending, TLS news
                without ``StartTls``). Nothing the client sends raises.
        """
        if not self._started:
            raise LocalProtocolError("handle() before start()")
        if self._phase is _Phase.RELAYING:
            raise LocalProtocolError(f"{type(event).__name__} after Relay: the driver relays now")
        if self._phase is _Phase.CLOSED:
            if isinstance(event, ConnectionClosed):
                return []  # the driver may report the EOF its own Close caused
            raise LocalProtocolError(f"{type(event).__name__} after Close")
        match event:
            case DataReceived(data):
                return self._data_received(data)
            case ConnectionClosed():
                return self._close("client closed the connection")
            case TimedOut():
                if self._phase is _Phase.TLS:
                    # Mid-handshake a plaintext BYE would only corrupt the TLS stream.
                    return self._close("TLS handshake timed out")
                return [self._send(b"* BYE Autologout; idle for too long"), *self._close("idle timeout")]
            case TlsEstablished():
                if self._phase is not _Phase.TLS:
                    raise LocalProtocolError("TlsEstablished without StartTls")
                self._tls = True
                self._phase = _Phase.COMMAND
                return []  # RFC 3501 section 6.2.1: no new greeting; CAPABILITY now lacks STARTTLS
            case LoginAccepted(reply):
                self._expect_login_pending()
                self._phase = _Phase.RELAYING
                return [Send(reply), Relay(self._buffer.take_all())]
            case LoginRejected(reply):
                self._expect_login_pending()
                default = self._tagged(self._login_tag, b"NO " + REFUSAL_TEXT)
                return self._resume(Send(reply) if reply is not None else default)
            case LoginUnavailable():
                self._expect_login_pending()
                message = b"NO [UNAVAILABLE] Service temporarily unavailable, try again later"
                return self._resume(self._tagged(self._login_tag, message))
            case _:
                assert_never(event)

    # -- events ----------------------------------------------------------------------------------

    def _data_received(self, data: bytes) -> list[Command]:
        match self._phase:
            case _Phase.TLS:
                return []  # plaintext pipelined behind STARTTLS: never interpreted (CVE-2014-3556)
            case _Phase.LOGIN:
                # Held for the backend (or for us, if the login fails). Only this path grows
                # the buffer while a login is pending, so the limit is checked here; a packet
                # that carried the login itself is bounded by the driver's read size, and
                # Authenticate is always the last command of a batch.
                self._buffer.feed(data)
                if len(self._buffer) > MAX_PIPELINED_OCTETS:
                    reply = self._send(b"* BYE Too much data sent before login completed")
                    return [reply, *self._close("too much pipelined data during login")]
                return []
        self._buffer.feed(data)
        return self._process()

    def _expect_login_pending(self) -> None:
        if self._phase is not _Phase.LOGIN:
            raise LocalProtocolError("login verdict without a pending Authenticate")

    def _resume(self, reply: Send) -> list[Command]:
        """After a failed login: answer, then read what the client pipelined.

        A refused login is no invalid command and does not count toward max_errors, as in
        nginx: stopping password guessing is the failed-login throttle's and the auth
        service's job (Auth-Login-Attempt), and a client refused a few times (an auth service
        asking it to wait) must not be disconnected for it.
        """
        self._phase = _Phase.COMMAND
        self._login_tag = b""
        return [reply, *self._process()]

    # -- input -------------------------------------------------------------------------------

    def _process(self) -> list[Command]:
        """Interpret buffered input until it runs out or the machine must stop reading."""
        commands: list[Command] = []
        while self._phase in (_Phase.COMMAND, _Phase.LITERAL, _Phase.SASL):
            if self._phase is _Phase.LITERAL:
                data = self._buffer.pop_exact(self._literal_size)
                if data is None:
                    break
                self._literals.append(data)
                self._phase = _Phase.COMMAND
                continue
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                commands += [self._send(b"* BAD Command line too long"), *self._close("line too long")]
                break
            if line is None:
                break
            if self._phase is _Phase.SASL:
                commands += self._sasl_response(line)
            else:
                commands += self._segment(line)
        return commands

    def _segment(self, line: bytes) -> list[Command]:
        """One more line of the current command: parse it all, then act on the outcome."""
        self._segments.append(line)
        if not line and len(self._segments) == 1:
            self._segments.clear()
            return self._bad(None, b"Empty command line")
        if sum(map(len, self._segments)) > MAX_COMMAND_LINE:
            return [self._send(b"* BAD Command line too long"), *self._close("command too long")]
        parser = _Parser(self._segments, self._literals)
        try:
            command = parser.parse()
        except _Incomplete as pending:
            return self._await_literal(parser, pending)
        except _SyntaxError as error:
            self._reset_command()
            replies = self._bad(parser.tag, str(error).encode())
            if self._phase is not _Phase.CLOSED and _NON_SYNC_LITERAL_AT_END.search(line):
                # The client is sending the literal regardless; we cannot tell it from commands.
                replies += self._close("invalid command ending in a non-synchronizing literal")
            return replies
        self._reset_command()
        return self._execute(command)

    def _await_literal(self, parser: _Parser, pending: _Incomplete) -> list[Command]:
        assert parser.tag is not None  # a literal is only reached after the tag parsed
        if sum(map(len, self._literals)) + pending.size > MAX_LITERAL_OCTETS:
            if pending.synchronizing:
                # Refused instead of "+": the client sends none of it (RFC 9051 section 4.3), so
                # the session goes on (review S5). A {n+} literal is on its way regardless, and
                # its bytes could not be told from commands: that closes.
                self._reset_command()
                return self._bad(parser.tag, b"[TOOBIG] Literal too large before login")
            reply = self._tagged(parser.tag, b"BAD [TOOBIG] Literal too large before login")
            return [reply, *self._close("literal too large")]
        if parser.name == "LOGIN" and self._privacy_required() and pending.synchronizing:
            # Refuse before the client sends its password in clear; with {n+} it is on the
            # way anyway, so the command is read to its end and refused then.
            self._reset_command()
            return [self._tagged(parser.tag, _PRIVACY_REQUIRED)]
        self._phase = _Phase.LITERAL
        self._literal_size = pending.size
        return [self._send(b"+ Ready for literal data")] if pending.synchronizing else []

    def _reset_command(self) -> None:
        self._segments = []
        self._literals = []

    # -- commands ------------------------------------------------------------------------------

    def _execute(self, command: _Command) -> list[Command]:
        tag = command.tag
        match command.name:
            case "CAPABILITY":
                capabilities = self._send(b"* CAPABILITY " + self._capabilities())
                return [capabilities, self._tagged(tag, b"OK CAPABILITY completed")]
            case "NOOP":
                return [self._tagged(tag, b"OK NOOP completed")]
            case "LOGOUT":
                replies = [self._send(b"* BYE Logging out"), self._tagged(tag, b"OK LOGOUT completed")]
                return replies + self._close("client logged out")
            case "ID":
                # We tell the client nothing about ourselves (RFC 2971 allows NIL).
                return [self._send(b"* ID NIL"), self._tagged(tag, b"OK ID completed")]
            case "STARTTLS":
                return self._starttls(tag)
            case "LOGIN":
                if self._privacy_required():
                    return [self._tagged(tag, _PRIVACY_REQUIRED)]
                user, password = command.arguments
                try:
                    username = _utf8(user, "User name")
                except _SyntaxError as error:
                    return self._bad(tag, str(error).encode())
                # The password is the client's octets (RFC 3501 literals are 8-bit): see sasl.
                return self._authenticate(tag, sasl.Credentials(username, password))
            case _:  # AUTHENTICATE: the parser knows no other command
                return self._start_sasl(tag, command.arguments)

    def _starttls(self, tag: bytes) -> list[Command]:
        if self._tls:
            return self._bad(tag, b"TLS is already active")
        if self._config.starttls is StartTlsPolicy.OFF:
            return self._bad(tag, b"STARTTLS is not available")
        # Anything pipelined behind STARTTLS was sent in plaintext: drop it unread.
        self._buffer.clear()
        self._phase = _Phase.TLS
        return [self._tagged(tag, b"OK Begin TLS negotiation now"), StartTls()]

    def _start_sasl(self, tag: bytes, arguments: tuple[bytes, ...]) -> list[Command]:
        if self._privacy_required():
            return [self._tagged(tag, _PRIVACY_REQUIRED)]
        step = sasl.begin(arguments[0], arguments[1] if len(arguments) > 1 else None)
        if step is None:
            # RFC 3501 section 6.2.2: an unsupported mechanism gets NO.
            return [self._tagged(tag, b"NO Unsupported authentication mechanism")]
        return self._sasl_step(tag, step)

    def _sasl_response(self, line: bytes) -> list[Command]:
        """One client response in an AUTHENTICATE exchange (RFC 3501 section 6.2.2)."""
        exchange = self._sasl
        assert exchange is not None  # the SASL phase always has an exchange
        return self._sasl_step(self._sasl_tag, exchange.respond(line))

    def _sasl_step(self, tag: bytes, step: sasl.SaslStep) -> list[Command]:
        if isinstance(step, sasl.SaslExchange):
            self._sasl, self._sasl_tag = step, tag
            self._phase = _Phase.SASL
            return [self._send(b"+ " + step.challenge)]
        self._sasl = None
        self._phase = _Phase.COMMAND
        match step:
            case sasl.SaslCancelled():
                # Not counted as an error: the client chose to stop.
                return [self._tagged(tag, b"BAD Authentication cancelled")]
            case sasl.SaslInvalid(reason):
                return self._bad(tag, b"Invalid authentication data: " + reason.encode())
            case sasl.SaslAuthzidRefused():
                # Not counted, as a failed login is not (see sasl for why it is refused).
                return [self._tagged(tag, b"NO [AUTHORIZATIONFAILED] " + sasl.AUTHZID_REFUSED_TEXT)]
            case sasl.Credentials():
                return self._authenticate(tag, step)
            case _:
                assert_never(step)

    def _authenticate(self, tag: bytes, credentials: sasl.Credentials) -> list[Command]:
        if not credentials.username or not sasl.replayable(credentials):
            # A literal, a quoted string or a SASL response can carry CR, LF and other control
            # characters, and a literal a name of kilobytes: refused like a failed login (and,
            # like one, not counted), as POP3 and SMTP do and with Dovecot's words, so such a
            # name never reaches a log line, an auth_http request or a backend. An empty name
            # is a valid astring (RFC 9051 section 6.2.3): a failed login too (review S5).
            return [self._tagged(tag, b"NO " + REFUSAL_TEXT)]
        self._phase = _Phase.LOGIN
        self._login_tag = tag
        request = LoginRequest(
            protocol="imap", routing_key=credentials.username, credentials=credentials, tag=tag
        )
        return [Authenticate(request)]

    # -- replies -----------------------------------------------------------------------------

    def _capabilities(self) -> bytes:
        words = [b"IMAP4rev1", b"SASL-IR", b"LITERAL+", b"ID"]
        if not self._tls and self._config.starttls is not StartTlsPolicy.OFF:
            words.append(b"STARTTLS")
        # RFC 3501 section 6.2.3: LOGINDISABLED, and no AUTH=, while plaintext login is refused.
        if self._privacy_required():
            words.append(b"LOGINDISABLED")
        else:
            words += [b"AUTH=" + name for name in sasl.MECHANISMS]
        return b" ".join(words)

    def _privacy_required(self) -> bool:
        return self._config.starttls is StartTlsPolicy.REQUIRED and not self._tls

    @staticmethod
    def _send(line: bytes) -> Send:
        return Send(line + CRLF)

    @staticmethod
    def _tagged(tag: bytes, rest: bytes) -> Send:
        return Send(tag + b" " + rest + CRLF)

    def _bad(self, tag: bytes | None, message: bytes) -> list[Command]:
        """A BAD reply (``* BAD`` without a tag); every one counts toward max_errors."""
        return [self._tagged(tag or b"*", b"BAD " + message), *self._count_error()]

    def _count_error(self) -> list[Command]:
        self._errors += 1
        if self._errors < self._config.max_errors:
            return []
        return [self._send(b"* BYE Too many invalid commands."), *self._close("too many invalid commands")]

    def _close(self, reason: str) -> list[Command]:
        self._phase = _Phase.CLOSED
        self._buffer.clear()
        self._reset_command()
        self._sasl = None
        return [Close(reason)]


_PRIVACY_REQUIRED = b"NO [PRIVACYREQUIRED] Plaintext login is disabled, use STARTTLS first"


# ---------------------------------------------------------------------------------------------
# BackendLogin


class BackendState(enum.Enum):
    """Where the backend login stands."""

    GREETING = "greeting"  # waiting for "* OK"
    CAPABILITY = "capability"  # our CAPABILITY sent: its untagged reply and tagged OK to come
    STARTTLS = "starttls"  # our STARTTLS sent: its tagged OK to come
    TLS = "tls"  # StartTls emitted: the driver runs the handshake
    LOGIN = "login"  # LOGIN (and ID) sent: continuations and the tagged reply to come
    LOGGED_IN = "logged in"  # LoginSucceeded emitted
    FAILED = "failed"  # LoginFailed or BackendFailed emitted


# States in which the machine reads the backend's lines.
_BACKEND_READING = frozenset(
    {BackendState.GREETING, BackendState.CAPABILITY, BackendState.STARTTLS, BackendState.LOGIN}
)
_RESPONSE = re.compile(rb"(?P<status>[A-Za-z]+)(?: \[(?P<code>[A-Za-z0-9.-]+)(?P<data>[^\]]*)\])?")
# Refusals that say the backend, not the credentials, is at fault (RFC 5530): try elsewhere.
_BACKEND_FAULT_CODES = frozenset({b"UNAVAILABLE", b"SERVERBUG"})
# The response codes of a tagged NO that refuses the credentials themselves: none, or RFC 5530's
# AUTHENTICATIONFAILED. Any other code ([LIMIT], [INUSE], [EXPIRED], [CONTACTADMIN],
# [AUTHORIZATIONFAILED], [PRIVACYREQUIRED] ...) and a BAD refuse the login for another reason.
_CREDENTIALS_REFUSED = frozenset({b"", b"AUTHENTICATIONFAILED"})
_NO_STARTTLS = "backend does not offer STARTTLS"
# Our tags towards the backend, one per kind of command; the CAPABILITY asked again after TLS
# reuses its tag, as nothing is pending then. Only nginx's tag characters [A-Za-z0-9._-], so
# that any backend takes them. Until the verdict the backend hears only us, so the client's own
# commands (relayed after it) never meet these tags.
_ID_TAG = b"mg-id"
_CAPABILITY_TAG = b"mg-capa"
_STARTTLS_TAG = b"mg-tls"
_LOGIN_TAG = b"mg-login"


def _quoted(text: str) -> bytes:
    """An IMAP quoted string (RFC 3501 section 9) for a value we produce ourselves."""
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _is_bye(line: bytes) -> bool:
    """An untagged BYE (RFC 3501 section 7.1.5): the backend is about to close."""
    return line[2:6].upper() == b"BYE " or line[2:].upper() == b"BYE"


def _tagged_reply(line: bytes, tag: bytes) -> re.Match[bytes] | None:
    """The status (and response code) of the tagged reply to ``tag``, or None if it is not one."""
    if not line.startswith(tag + b" "):
        return None
    return _RESPONSE.match(line, len(tag) + 1)


class BackendLogin:
    """Logs the client in on one backend by replaying its credentials with LOGIN."""

    def __init__(self, request: LoginRequest, config: BackendConfig) -> None:
        """Raises: LocalProtocolError if the request is not an IMAP login with a tag."""
        if request.protocol != "imap" or request.credentials is None or not request.tag:
            raise LocalProtocolError("BackendLogin needs an IMAP LoginRequest with credentials and a tag")
        self.state = BackendState.GREETING
        self._credentials = request.credentials
        self._client_tag = request.tag  # only for the reply the client gets, never sent
        self._config = config
        self._buffer = LineBuffer(MAX_BACKEND_REPLY)
        self._id_pending = False
        self._tls = False  # the backend connection is encrypted (after STARTTLS)
        self._capabilities: frozenset[bytes] = frozenset()  # the last untagged CAPABILITY
        self._continuations = 0  # "+" replies still expected for synchronizing literals
        self._untagged: list[bytes] = []

    def handle(self, event: Event) -> list[Command]:
        """Take one event from the driver; return what to send and, in the end, a verdict.

        With ``BackendConfig.starttls`` the machine emits ``StartTls`` before any credential
        and goes on after ``TlsEstablished``; bytes the backend sends in between are dropped.

        Raises:
            LocalProtocolError: after the verdict, ``TlsEstablished`` without ``StartTls``, or
                events a backend dialogue never has (login verdicts). Nothing the backend
                sends raises.
        """
        if self.state in (BackendState.LOGGED_IN, BackendState.FAILED):
            raise LocalProtocolError(f"{type(event).__name__} after the backend login ended")
        match event:
            case DataReceived(data):
                if self.state is BackendState.TLS:
                    return []  # plaintext after the STARTTLS OK: never read (CVE-2014-3556 class)
                self._buffer.feed(data)
                return self._process()
            case ConnectionClosed():
                return self._fail("backend closed the connection during login")
            case TimedOut():
                return self._fail("backend login timed out")
            case TlsEstablished():
                if self.state is not BackendState.TLS:
                    raise LocalProtocolError("TlsEstablished without StartTls")
                self._tls = True
                # RFC 3501 section 6.2.1: forget the capabilities learned in plaintext, ask again.
                return self._ask_capabilities()
            case LoginAccepted() | LoginRejected() | LoginUnavailable():
                raise LocalProtocolError(f"{type(event).__name__} is not an event of a backend login")
            case _:
                assert_never(event)

    def _process(self) -> list[Command]:
        commands: list[Command] = []
        while self.state in _BACKEND_READING:
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                return [*commands, *self._fail("backend reply line too long")]
            if line is None:
                break
            match self.state:
                case BackendState.GREETING:
                    commands += self._greeting(line)
                case BackendState.CAPABILITY:
                    commands += self._capability_reply(line)
                case BackendState.STARTTLS:
                    commands += self._starttls_reply(line)
                case _:
                    commands += self._reply(line)
        return commands

    def _greeting(self, line: bytes) -> list[Command]:
        response = _RESPONSE.match(line, 2)
        if not line.startswith(b"* ") or not response:
            return self._fail("backend greeting is not an IMAP greeting")
        if response["status"].upper() != b"OK":
            # BYE: the backend refuses connections; PREAUTH would skip the login we must do.
            return self._fail(f"backend greeted with {response['status'].upper().decode()}")
        listed = (response["code"] or b"").upper() == b"CAPABILITY"
        capabilities = frozenset(response["data"].upper().split()) if listed else frozenset()
        if not self._config.starttls:
            return self._login(capabilities)
        # Whether the backend offers STARTTLS: from the greeting, or by asking.
        return self._starttls(capabilities) if listed else self._ask_capabilities()

    def _ask_capabilities(self) -> list[Command]:
        self.state = BackendState.CAPABILITY
        self._capabilities = frozenset()
        return [Send(_CAPABILITY_TAG + b" CAPABILITY" + CRLF)]

    def _capability_reply(self, line: bytes) -> list[Command]:
        if line.startswith(b"* "):
            if _is_bye(line):
                return self._fail("backend said BYE during login")
            words = line[2:].upper().split()
            if words[:1] == [b"CAPABILITY"]:
                self._capabilities = frozenset(words[1:])  # the latest one counts: bounded
            return []
        reply = _tagged_reply(line, _CAPABILITY_TAG)
        if reply is None:
            return self._fail("backend sent an unexpected line in reply to CAPABILITY")
        if reply["status"].upper() != b"OK":
            return self._fail(f"backend answered CAPABILITY with {reply['status'].upper().decode()}")
        capabilities = self._capabilities
        if (reply["code"] or b"").upper() == b"CAPABILITY":
            capabilities |= frozenset(reply["data"].upper().split())
        return self._login(capabilities) if self._tls else self._starttls(capabilities)

    def _starttls(self, capabilities: frozenset[bytes]) -> list[Command]:
        """Ask for TLS (RFC 3501 section 6.2.1), or give up: never a credential in plaintext."""
        if b"STARTTLS" not in capabilities:
            return self._fail(_NO_STARTTLS)
        self.state = BackendState.STARTTLS
        return [Send(_STARTTLS_TAG + b" STARTTLS" + CRLF)]

    def _starttls_reply(self, line: bytes) -> list[Command]:
        if line.startswith(b"* "):
            return self._fail("backend said BYE during login") if _is_bye(line) else []
        reply = _tagged_reply(line, _STARTTLS_TAG)
        if reply is None:
            return self._fail("backend sent an unexpected line in reply to STARTTLS")
        if reply["status"].upper() != b"OK":
            return self._fail(_NO_STARTTLS)
        # Whatever followed the OK in plaintext could be an attacker's: it is never read.
        self.state = BackendState.TLS
        self._buffer.clear()
        return [StartTls()]

    def _login(self, capabilities: frozenset[bytes]) -> list[Command]:
        if b"LOGINDISABLED" in capabilities:
            return self._fail("backend refuses LOGIN (LOGINDISABLED)")
        user = self._credentials.username.encode()
        password = self._credentials.password
        if b"\x00" in user or b"\x00" in password:
            return self._fail("login name or password contains NUL, which IMAP cannot carry")
        self.state = BackendState.LOGIN
        request = b""
        client = self._config.client
        if self._config.client_info == "id" and client is not None:
            # Dovecot takes these from trusted proxies (login_trusted_networks).
            fields = (b'"x-originating-ip" ', _quoted(client.host), b' "x-originating-port" ')
            request += _ID_TAG + b" ID (" + b"".join(fields) + _quoted(str(client.port)) + b")" + CRLF
            self._id_pending = True
        if b"LITERAL+" in capabilities:
            # RFC 7888: no round trips; the whole login goes in one write.
            request += _LOGIN_TAG + b" LOGIN {%d+}\r\n%b {%d+}\r\n" % (len(user), user, len(password))
            request += password + CRLF
        else:
            request += _LOGIN_TAG + b" LOGIN {%d}\r\n" % len(user)
            self._continuations = 2
        return [Send(request)]

    def _reply(self, line: bytes) -> list[Command]:
        if self._id_pending:
            return self._id_reply(line)
        if line.startswith(b"+"):
            return self._continue_login()
        if line.startswith(b"* "):
            if _is_bye(line):
                return self._fail("backend said BYE during login")
            if sum(map(len, self._untagged)) + len(line) > MAX_BACKEND_REPLY:
                return self._fail("backend sent too many untagged lines during login")
            self._untagged.append(line + CRLF)
            return []
        response = _tagged_reply(line, _LOGIN_TAG)
        if response is None:
            return self._fail("backend sent an unexpected line during login")
        status = response["status"].upper()
        code = (response["code"] or b"").upper()
        # The client hears its own tag; the backend's status, code and text follow verbatim
        # (but for a refusal of the credentials, below).
        retagged = self._client_tag + line[len(_LOGIN_TAG) :] + CRLF
        # The untagged lines before it reach the client either way: an [ALERT] among them must
        # be presented to the user (RFC 3501 section 7.1), a refusal's above all.
        reply = b"".join(self._untagged) + retagged
        if status == b"OK":
            self.state = BackendState.LOGGED_IN
            # What followed the OK is the backend's first output for the client: untouched.
            return [LoginSucceeded(reply, self._buffer.take_all())]
        if status == b"NO" and code in _CREDENTIALS_REFUSED:
            self.state = BackendState.FAILED
            # The proxy's own words after the untagged lines, as for a login no route owns: a
            # backend's own text would tell a routed user from an unrouted one.
            refusal = b"".join(self._untagged) + self._client_tag + b" NO " + REFUSAL_TEXT + CRLF
            return [LoginFailed(refusal, credentials=True)]
        if status in (b"NO", b"BAD") and code not in _BACKEND_FAULT_CODES:
            self.state = BackendState.FAILED
            return [LoginFailed(reply, credentials=False)]
        return self._fail(f"backend answered LOGIN with {status.decode()} [{code.decode()}]")

    def _id_reply(self, line: bytes) -> list[Command]:
        """Our ID's replies come first; the client never sees them, and a refusal is harmless."""
        if line.startswith(b"* "):
            return self._fail("backend said BYE during login") if _is_bye(line) else []
        response = _tagged_reply(line, _ID_TAG)
        if response is None:
            return self._fail("backend sent an unexpected line in reply to ID")
        if response["status"].upper() not in (b"OK", b"NO", b"BAD"):
            return self._fail("backend sent an unexpected status in reply to ID")
        self._id_pending = False
        return []

    def _continue_login(self) -> list[Command]:
        """A "+" for a synchronizing literal: send the next piece of the login."""
        password = self._credentials.password
        match self._continuations:
            case 2:
                self._continuations = 1
                user = self._credentials.username.encode()
                return [Send(b"%b {%d}\r\n" % (user, len(password)))]
            case 1:
                self._continuations = 0
                return [Send(password + CRLF)]
        return self._fail("backend sent an unexpected continuation during login")

    def _fail(self, reason: str) -> list[Command]:
        self.state = BackendState.FAILED
        self._buffer.clear()
        return [BackendFailed(reason)]
