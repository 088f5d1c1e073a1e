"""POP3 before login: the client-facing ``Frontend`` and the ``BackendLogin`` replay.

The session driver (proxy.server.session) runs a ``Frontend`` per POP3 client; the backend
driver (proxy.server.backends) runs a ``BackendLogin`` per backend attempt. The front-end
greets, answers CAPA, STLS, NOOP, QUIT, USER/PASS and AUTH PLAIN/LOGIN, and hands complete
credentials over as ``Authenticate``; the backend login replays them as USER/PASS.
Pure: no I/O, no clocks, no logging; never puts a password into a reply, reason or repr.

Theory of operation (front-end)::

    AUTHORIZATION --AUTH without initial response--> AUTH_PLAIN / AUTH_LOGIN_USERNAME
    AUTH_LOGIN_USERNAME --username--> AUTH_LOGIN_PASSWORD
    AUTHORIZATION / AUTH_* --credentials complete--> AUTHENTICATING --LoginAccepted--> TRANSACTION
    AUTHENTICATING --LoginRejected / LoginUnavailable--> AUTHORIZATION
    AUTHORIZATION --STLS--> STARTING_TLS --TlsEstablished--> AUTHORIZATION
    any --QUIT, max_errors, over-long line, TimedOut, ConnectionClosed--> CLOSED

State names follow RFC 1939 section 3 (AUTHORIZATION before login, TRANSACTION after it; here
TRANSACTION means "the driver relays bytes"). Replies use the response codes of RFC 2449
section 8 and RFC 3206 ([AUTH], [SYS/TEMP]). Pipelined commands (RFC 2449 section 6.6) are
answered in order; bytes behind the command that completed the credentials are held and go to
the backend first (``Relay``). Every error reply to an invalid command counts towards
``max_errors``; a refused login does not (nor one refused before it was asked, for control
characters or another authorization identity), as in nginx: stopping password guessing is the
failed-login throttle's and the auth service's job, and a client an auth service asked to wait
must not be disconnected for it. Nor does the temporary failure, which is not the client's
fault. Deliberate deviations: no APOP (the proxy cannot verify a digest);
TimedOut says why before closing, as Dovecot does, although RFC 1939 section 3 allows a silent
close; an authorization identity in AUTH PLAIN other than the user is refused with ``[AUTH]``
(nginx ignores it; sasl says why we do not).

The backend login (``BackendLogin``) expects the ``+OK`` greeting, sends Dovecot's
``XCLIENT ADDR= PORT=`` when asked to and the greeting advertises ``[XCLIENT]`` (Dovecot's
pop3-login does so only for its login_trusted_networks, and its own proxy checks the greeting
the same way), then USER and PASS. USER/PASS, not AUTH PLAIN: RFC 1939 makes them the one login
every POP3 server has (SASL is optional, RFC 5034), nginx does the same, and the one extra round
trip is paid once per session.

With ``BackendConfig.starttls`` the greeting is followed by ``STLS`` (RFC 2595 section 4); on
its ``+OK`` the machine emits ``StartTls``, drops whatever the backend sent behind the ``+OK`` in
plaintext, and sends XCLIENT and USER/PASS only after ``TlsEstablished``. A ``-ERR`` (no STLS
here, or refused) fails the attempt: there is no plaintext fallback. STLS is sent without asking
CAPA first: a backend without it says ``-ERR`` just the same, one round trip sooner. The
``[XCLIENT]`` mark is taken from the plaintext greeting, as Dovecot's own proxy does (RFC 2595
brings no new greeting and Dovecot lists XCLIENT nowhere else); a forged mark can only make the
backend refuse our XCLIENT, which fails the attempt, and never exposes a credential.
"""

import ipaddress
from enum import Enum, auto
from typing import assert_never

from proxy.protocols import sasl
from proxy.protocols.errors import LineTooLongError, LocalProtocolError
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

CRLF = b"\r\n"
# RFC 2449 section 4: a command line is at most 255 octets including its CRLF (LineBuffer
# limits count without the line end).
MAX_COMMAND_LINE = 255 - len(CRLF)
# RFC 5034 section 4 exempts the client's SASL responses from that limit (see sasl.py).
MAX_SASL_LINE = sasl.MAX_RESPONSE_LINE
# RFC 2449 section 4: a response line is at most 512 octets including its CRLF.
MAX_RESPONSE_LINE = 512 - len(CRLF)
# Bytes a client may pipeline behind its login command while the login runs (they go to the
# backend first). nginx holds them in a 128-octet POP3 buffer; 64 KiB fits any pipelined
# command group a real client sends, and keeps a client from parking data in the proxy.
MAX_HELD_BYTES = 64 * 1024

# Replies (RFC 1939, response codes from RFC 2449 section 8 and RFC 3206).
REPLY_OK = b"+OK" + CRLF
REPLY_CAPA = b"+OK Capability list follows" + CRLF
REPLY_MECHANISMS = b"+OK Supported mechanisms follow" + CRLF
END_OF_LIST = b"." + CRLF
REPLY_BYE = b"+OK Logging out." + CRLF
REPLY_STLS = b"+OK Begin TLS negotiation." + CRLF
REPLY_UNKNOWN = b"-ERR Unknown command." + CRLF
REPLY_BAD_ARGUMENTS = b"-ERR Invalid arguments." + CRLF
REPLY_NO_USER = b"-ERR No username given." + CRLF
REPLY_BAD_TEXT = b"-ERR Invalid characters in login or password." + CRLF
REPLY_MECHANISM = b"-ERR Unsupported authentication mechanism." + CRLF
REPLY_CANCELLED = b"-ERR Authentication cancelled." + CRLF
REPLY_BAD_SASL = b"-ERR Invalid authentication data." + CRLF
REPLY_TLS_REQUIRED = b"-ERR [AUTH] Plaintext authentication disallowed; use STLS first." + CRLF
REPLY_NO_STLS = b"-ERR STLS not available." + CRLF
REPLY_TLS_ACTIVE = b"-ERR Command not permitted when TLS active." + CRLF
REPLY_AUTH_FAILED = b"-ERR [AUTH] Authentication failed." + CRLF
REPLY_AUTHZID_REFUSED = b"-ERR [AUTH] " + sasl.AUTHZID_REFUSED_TEXT + b"." + CRLF
REPLY_UNAVAILABLE = b"-ERR [SYS/TEMP] Temporary authentication failure, try again later." + CRLF
REPLY_TIMEOUT = b"-ERR [SYS/TEMP] Disconnected for inactivity." + CRLF
REPLY_TOO_LONG = b"-ERR Line too long." + CRLF
REPLY_TOO_MUCH = b"-ERR Too much data before the login completed." + CRLF

# RFC 2449 section 6: what the backends (Dovecot) offer after login, advertised before it so a
# client's cached CAPA stays true; RESP-CODES and AUTH-RESP-CODE because the replies carry them.
BASE_CAPABILITIES = (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING")


class State(Enum):
    """Where the front-end dialogue stands (RFC 1939 section 3 names)."""

    AUTHORIZATION = auto()  # reading commands
    AUTH_PLAIN = auto()  # waiting for the PLAIN response
    AUTH_LOGIN_USERNAME = auto()  # waiting for the LOGIN username
    AUTH_LOGIN_PASSWORD = auto()  # waiting for the LOGIN password
    STARTING_TLS = auto()  # StartTls emitted, waiting for TlsEstablished
    AUTHENTICATING = auto()  # Authenticate emitted, waiting for the verdict
    TRANSACTION = auto()  # Relay emitted: the driver copies bytes now
    CLOSED = auto()


# States in which complete lines from the client are interpreted.
_READING = frozenset(
    {State.AUTHORIZATION, State.AUTH_PLAIN, State.AUTH_LOGIN_USERNAME, State.AUTH_LOGIN_PASSWORD}
)
_SASL = frozenset({State.AUTH_PLAIN, State.AUTH_LOGIN_USERNAME, State.AUTH_LOGIN_PASSWORD})


def _sasl_state(exchange: sasl.SaslExchange) -> State:
    """The AUTH_* state that waits for the response to ``exchange``'s challenge."""
    if exchange.mechanism is sasl.Mechanism.PLAIN:
        return State.AUTH_PLAIN
    return State.AUTH_LOGIN_USERNAME if exchange.username is None else State.AUTH_LOGIN_PASSWORD


def _decode(raw: bytes) -> str | None:
    """A user name as text: UTF-8 without control characters, else None (see sasl)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if sasl.printable(text) else None


class Frontend:
    """The POP3 dialogue with the client up to the login (RFC 1939, 2449, 2595, 5034)."""

    __slots__ = (
        "_buffer",
        "_config",
        "_errors",
        "_sasl_exchange",
        "_started",
        "_state",
        "_tls_active",
        "_user",
    )

    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._buffer = LineBuffer(MAX_COMMAND_LINE)
        self._state = State.AUTHORIZATION
        self._started = False
        self._tls_active = config.tls_active
        self._errors = 0
        self._user: str | None = None  # USER accepted, PASS expected
        self._sasl_exchange: sasl.SaslExchange | None = None  # the AUTH waiting for a response

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> list[Command]:
        """The greeting (RFC 1939 section 4).

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        return [Send(b"+OK " + self._config.server_name.encode() + b" ready." + CRLF)]

    def handle(self, event: Event) -> list[Command]:
        """Take one event; return what the driver must do, in order.

        Once closed, the machine ignores events still in flight (a read or a verdict that raced
        with the close). Bytes arriving between STLS and the handshake are discarded.

        Raises:
            LocalProtocolError: before ``start()``, after ``Relay``, or an event this state
                cannot take (a verdict nobody asked for, a handshake nobody started).
        """
        if not self._started:
            raise LocalProtocolError("handle() before start()")
        if self._state is State.CLOSED:
            return []
        if self._state is State.TRANSACTION:
            raise LocalProtocolError(f"{type(event).__name__} after Relay")
        match event:
            case DataReceived(data=data):
                return self._receive(data)
            case ConnectionClosed():
                return self._close("client closed the connection")
            case TimedOut():
                # Plaintext must not go into a TLS handshake under way.
                reply = None if self._state is State.STARTING_TLS else REPLY_TIMEOUT
                return self._close("timed out", reply)
            case TlsEstablished():
                self._expect(State.STARTING_TLS, event)
                self._tls_active = True
                self._enter(State.AUTHORIZATION)
                return []
            case LoginAccepted(reply=reply):
                self._expect(State.AUTHENTICATING, event)
                self._enter(State.TRANSACTION)
                return [Send(reply), Relay(self._buffer.take_all())]
            case LoginRejected(reply=reply):
                self._expect(State.AUTHENTICATING, event)
                self._enter(State.AUTHORIZATION)
                return [Send(REPLY_AUTH_FAILED if reply is None else reply), *self._interpret()]
            case LoginUnavailable():
                self._expect(State.AUTHENTICATING, event)
                self._enter(State.AUTHORIZATION)
                return [Send(REPLY_UNAVAILABLE), *self._interpret()]
            case _:
                assert_never(event)

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def _expect(self, state: State, event: Event) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{type(event).__name__} in state {self._state.name}")

    def _enter(self, state: State) -> None:
        self._state = state
        self._buffer.max_line = MAX_SASL_LINE if state in _SASL else MAX_COMMAND_LINE

    def _receive(self, data: bytes) -> list[Command]:
        if self._state is State.STARTING_TLS:
            return []  # RFC 2595 section 4, CVE-2014-3556: plaintext behind STLS is never read
        self._buffer.feed(data)
        if self._state is State.AUTHENTICATING:
            if len(self._buffer) > MAX_HELD_BYTES:
                return self._close("client pipelined too much data during login", REPLY_TOO_MUCH)
            return []
        return self._interpret()

    def _interpret(self) -> list[Command]:
        """Answer every complete line, in order, while the state reads lines."""
        commands: list[Command] = []
        while self._state in _READING:
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                return commands + self._close("line too long", REPLY_TOO_LONG)
            if line is None:
                break
            commands += self._command(line) if self._state is State.AUTHORIZATION else self._sasl(line)
        return commands

    def _refuse(self, reply: bytes) -> list[Command]:
        """An error reply; the ``max_errors``-th one also closes (nginx's max_errors)."""
        self._user = None  # as nginx: an error forgets a pending USER
        self._errors += 1
        if self._errors >= self._config.max_errors:
            return self._close("too many errors", reply)
        return [Send(reply)]

    def _close(self, reason: str, reply: bytes | None = None) -> list[Command]:
        self._enter(State.CLOSED)
        commands: list[Command] = [] if reply is None else [Send(reply)]
        return [*commands, Close(reason)]

    def _starttls_offered(self) -> bool:
        return self._config.starttls is not StartTlsPolicy.OFF and not self._tls_active

    def _tls_required(self) -> bool:
        return self._config.starttls is StartTlsPolicy.REQUIRED and not self._tls_active

    # -----------------------------------------------------------------------------------------
    # Commands (RFC 1939 section 4, RFC 2449 section 5, RFC 2595 section 4, RFC 5034 section 4)

    def _command(self, line: bytes) -> list[Command]:
        verb, _, argument = line.partition(b" ")
        match verb.upper():
            case b"CAPA" if not argument:
                return self._capa()
            case b"NOOP" if not argument:
                return [Send(REPLY_OK)]
            case b"QUIT" if not argument:
                return self._close("client quit", REPLY_BYE)
            case b"STLS" if not argument:
                return self._stls()
            case b"USER":
                return self._user_command(argument)
            case b"PASS":
                return self._pass_command(argument)
            case b"AUTH":
                return self._auth(argument)
            case b"CAPA" | b"NOOP" | b"QUIT" | b"STLS":
                return self._refuse(REPLY_BAD_ARGUMENTS)
            case _:
                return self._refuse(REPLY_UNKNOWN)

    def _capa(self) -> list[Command]:
        capabilities = list(BASE_CAPABILITIES)
        if not self._tls_required():  # as nginx: no login offered before the required TLS
            capabilities += [b"USER", b"SASL " + b" ".join(sasl.MECHANISMS)]
        if self._starttls_offered():
            capabilities.append(b"STLS")
        return [Send(REPLY_CAPA), *(Send(name + CRLF) for name in capabilities), Send(END_OF_LIST)]

    def _stls(self) -> list[Command]:
        if self._tls_active:
            return self._refuse(REPLY_TLS_ACTIVE)
        if not self._starttls_offered():
            return self._refuse(REPLY_NO_STLS)
        self._buffer.clear()
        self._user = None
        self._enter(State.STARTING_TLS)
        return [Send(REPLY_STLS), StartTls()]

    def _user_command(self, argument: bytes) -> list[Command]:
        if self._tls_required():
            return self._refuse(REPLY_TLS_REQUIRED)
        if not argument:
            return self._refuse(REPLY_NO_USER)
        user = _decode(argument)
        if user is None:
            return self._refuse(REPLY_BAD_TEXT)
        self._user = user
        return [Send(REPLY_OK)]

    def _pass_command(self, argument: bytes) -> list[Command]:
        if self._tls_required():
            return self._refuse(REPLY_TLS_REQUIRED)
        if self._user is None:
            return self._refuse(REPLY_NO_USER)
        # nginx and Dovecot keep embedded spaces: the password is the rest of the line, and
        # its octets as they came (RFC 1939 allows any but CR and LF; Latin-1 ones pass).
        password = argument
        if not password or not sasl.printable(password):
            return self._refuse(REPLY_BAD_TEXT)
        user, self._user = self._user, None
        return self._authenticate(sasl.Credentials(username=user, password=password))

    def _auth(self, argument: bytes) -> list[Command]:
        if self._tls_required():
            return self._refuse(REPLY_TLS_REQUIRED)
        self._user = None
        if not argument:
            mechanisms = (Send(name + CRLF) for name in sasl.MECHANISMS)
            return [Send(REPLY_MECHANISMS), *mechanisms, Send(END_OF_LIST)]
        mechanism, _, initial = argument.partition(b" ")
        step = sasl.begin(mechanism, initial or None)
        if step is None:
            return self._refuse(REPLY_MECHANISM)
        return self._sasl_step(step)

    def _sasl(self, line: bytes) -> list[Command]:
        """A continuation line of an AUTH exchange (RFC 5034 section 4)."""
        exchange = self._sasl_exchange
        assert exchange is not None  # the AUTH_* states always have an exchange
        self._enter(State.AUTHORIZATION)
        return self._sasl_step(exchange.respond(line))

    def _sasl_step(self, step: sasl.SaslStep) -> list[Command]:
        """Where the client's SASL response leads: the next challenge, a refusal, or the login."""
        match step:
            case sasl.Credentials():
                return self._authenticate(step)
            case sasl.SaslExchange():
                self._sasl_exchange = step
                self._enter(_sasl_state(step))
                return [Send(b"+ " + step.challenge + CRLF)]
            case sasl.SaslCancelled():
                # Not counted as an error, as in IMAP: the client chose to stop (review S5).
                return [Send(REPLY_CANCELLED)]
            case sasl.SaslInvalid():
                return self._refuse(REPLY_BAD_SASL)
            case sasl.SaslAuthzidRefused():
                return [Send(REPLY_AUTHZID_REFUSED)]  # a refused login: not counted
            case _:
                assert_never(step)

    def _authenticate(self, credentials: sasl.Credentials) -> list[Command]:
        if not sasl.replayable(credentials):
            return [Send(REPLY_AUTH_FAILED)]  # refused like a failed login: not counted
        self._enter(State.AUTHENTICATING)
        request = LoginRequest(protocol="pop3", routing_key=credentials.username, credentials=credentials)
        return [Authenticate(request)]


# ---------------------------------------------------------------------------------------------
# Backend login


class BackendState(Enum):
    """Which backend reply the login replay waits for."""

    GREETING = auto()
    STLS = auto()  # the reply to STLS
    TLS = auto()  # StartTls emitted: the driver runs the handshake
    XCLIENT = auto()
    USER = auto()
    PASS = auto()
    DONE = auto()  # a verdict was given


# Dovecot's pop3-login puts this code first in its greeting for trusted peers.
XCLIENT_GREETING = b"+OK [XCLIENT]"
# A -ERR with this code is the backend's own trouble (RFC 3206 section 4): another endpoint
# may do better. Any other -ERR after USER or PASS is the verdict on this login; that includes
# [IN-USE] (RFC 2449 section 8.1.2: the maildrop is locked by another session, which another
# endpoint of the same storage cannot help with, and the client should see why).
TEMPORARY_FAILURE = b"-ERR [SYS/TEMP]"
# Of those verdicts, only a -ERR without a response code or with [AUTH] (RFC 3206 section 4)
# refuses the credentials themselves; [IN-USE], [LOGIN-DELAY] (RFC 2449 section 8.1) and
# [SYS/PERM] refuse the login for another reason. A code is "[" 1*level ("/" level) "]" and
# its first level decides (RFC 2449 section 8).
_ERR_CODE = b"-ERR ["
_AUTH_CODE_LEVEL = b"AUTH"
_NO_STARTTLS = "backend does not offer STARTTLS"


def _refuses_credentials(refusal: bytes) -> bool:
    """Whether a -ERR to USER or PASS says the name or password is wrong (see _AUTH_CODE_LEVEL)."""
    if not refusal.startswith(_ERR_CODE):
        return True
    code, bracket, _ = refusal[len(_ERR_CODE) :].partition(b"]")
    if not bracket:
        return True  # an opening bracket in the text, not a response code
    return code.split(b"/", 1)[0].upper() == _AUTH_CODE_LEVEL


def _positive(line: bytes) -> bool | None:
    """True for +OK, False for -ERR, None for anything else (RFC 1939 section 3)."""
    for indicator, verdict in ((b"+OK", True), (b"-ERR", False)):
        if line == indicator or line.startswith(indicator + b" "):
            return verdict
    return None


class BackendLogin:
    """Replays a POP3 login on one backend: greeting, optional STLS, optional XCLIENT, USER, PASS."""

    __slots__ = ("_buffer", "_config", "_credentials", "_state", "_xclient_offered")

    def __init__(self, request: LoginRequest, config: BackendConfig) -> None:
        """Prepare the replay of ``request``; the backend speaks first.

        Raises:
            LocalProtocolError: the request is not a POP3 login with credentials.
        """
        if request.protocol != "pop3" or request.credentials is None:
            raise LocalProtocolError("a POP3 backend login needs a pop3 request with credentials")
        self._credentials = request.credentials
        self._config = config
        self._buffer = LineBuffer(MAX_RESPONSE_LINE)
        self._state = BackendState.GREETING
        self._xclient_offered = False  # the greeting carried [XCLIENT]

    @property
    def state(self) -> BackendState:
        return self._state

    def handle(self, event: Event) -> list[Command]:
        """Take one event from the backend side; return the lines to send and, once, a verdict.

        After the verdict, a close or timeout that raced with it is ignored. With
        ``BackendConfig.starttls`` the machine emits ``StartTls`` before any credential and
        goes on after ``TlsEstablished``; bytes the backend sends in between are dropped.

        Raises:
            LocalProtocolError: bytes after the verdict, ``TlsEstablished`` without
                ``StartTls``, or a front-end event.
        """
        match event:
            case DataReceived(data=data):
                if self._state is BackendState.DONE:
                    raise LocalProtocolError("backend data after the login verdict")
                if self._state is BackendState.TLS:
                    return []  # plaintext after the STLS +OK: never read (CVE-2014-3556 class)
                self._buffer.feed(data)
                return self._read()
            case ConnectionClosed():
                return self._fail("backend closed the connection")
            case TimedOut():
                return self._fail("backend login timed out")
            case TlsEstablished():
                if self._state is not BackendState.TLS:
                    raise LocalProtocolError(f"TlsEstablished in state {self._state.name}")
                return self._introduce()
            case LoginAccepted() | LoginRejected() | LoginUnavailable():
                raise LocalProtocolError(f"{type(event).__name__} is not an event for a backend login")
            case _:
                assert_never(event)

    def _read(self) -> list[Command]:
        commands: list[Command] = []
        while self._state not in (BackendState.DONE, BackendState.TLS):
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                return commands + self._fail(f"backend response too long in state {self._state.name}")
            if line is None:
                break
            commands += self._response(line)
        return commands

    def _response(self, line: bytes) -> list[Command]:
        positive = _positive(line)
        if positive is None:
            # Never quote the backend: a broken one might echo the PASS line.
            return self._fail(f"backend sent a malformed response in state {self._state.name}")
        match self._state:
            case BackendState.GREETING if positive:
                self._xclient_offered = line.startswith(XCLIENT_GREETING)
                if self._config.starttls:
                    self._state = BackendState.STLS
                    return [Send(b"STLS" + CRLF)]
                return self._introduce()
            case BackendState.GREETING:
                return self._fail("backend greeting was -ERR")
            case BackendState.STLS if positive:
                # Whatever followed the +OK in plaintext could be an attacker's: never read.
                self._state = BackendState.TLS
                self._buffer.clear()
                return [StartTls()]
            case BackendState.STLS:
                return self._fail(_NO_STARTTLS)
            case BackendState.XCLIENT if positive:
                return self._send_user()
            case BackendState.XCLIENT:
                return self._fail("backend refused XCLIENT")
            case BackendState.USER if positive:
                self._state = BackendState.PASS
                return [Send(b"PASS " + self._credentials.password + CRLF)]
            case BackendState.PASS if positive:
                self._state = BackendState.DONE
                return [LoginSucceeded(reply=line + CRLF, buffered=self._buffer.take_all())]
            case BackendState.USER | BackendState.PASS if line.startswith(TEMPORARY_FAILURE):
                return self._fail("backend reported a temporary failure ([SYS/TEMP])")
            case _:
                self._state = BackendState.DONE
                if _refuses_credentials(line):
                    # The proxy's own words, as for a login no route owns: a backend's own text
                    # would tell a routed user from an unrouted one.
                    return [LoginFailed(reply=REPLY_AUTH_FAILED, credentials=True)]
                return [LoginFailed(reply=line + CRLF, credentials=False)]

    def _introduce(self) -> list[Command]:
        """After the greeting (and TLS): XCLIENT if the greeting offered it, else the login."""
        xclient = self._xclient()
        if xclient is not None:
            self._state = BackendState.XCLIENT
            return [Send(xclient)]
        return self._send_user()

    def _xclient(self) -> bytes | None:
        """Dovecot's ``XCLIENT ADDR= PORT=`` for the real client, when offered, wanted and known."""
        client = self._config.client
        if not self._xclient_offered or self._config.client_info != "xclient" or client is None:
            return None
        try:
            address = ipaddress.ip_address(client.host)
        except ValueError:
            return None  # not an IP address (a unix socket): nothing Dovecot could use
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
        return f"XCLIENT ADDR={address} PORT={client.port}".encode() + CRLF

    def _send_user(self) -> list[Command]:
        credentials = self._credentials
        # A CR or LF could only be replayed on a USER/PASS line by ending it early and starting
        # a command of the client's choosing; no account has such a name.
        if not sasl.printable(credentials.username, credentials.password):
            self._state = BackendState.DONE
            return [LoginFailed(reply=REPLY_AUTH_FAILED, credentials=True)]
        self._state = BackendState.USER
        return [Send(b"USER " + credentials.username.encode() + CRLF)]

    def _fail(self, reason: str) -> list[Command]:
        if self._state is BackendState.DONE:
            return []
        self._state = BackendState.DONE
        return [BackendFailed(reason)]
