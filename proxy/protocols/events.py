"""The vocabulary between the driver and the sans-IO machines: events in, commands out.

Events are past tense (something happened); commands are imperative (the driver must do it).
Every protocol module (imap, pop3, smtp) exposes two machines with the same shape:

    frontend = imap.Frontend(FrontendConfig(...))      # talks to the client
    commands = frontend.start()                        # the greeting
    commands = frontend.handle(DataReceived(b"..."))   # -> [Send, Authenticate, Relay, Close, ...]

    backend = imap.BackendLogin(request, BackendConfig(...))   # talks to one backend
    commands = backend.handle(DataReceived(b"* OK ready\r\n"))  # -> [Send, LoginSucceeded, ...]

The driver composes them: ``Authenticate`` from a front-end starts route lookup, backend connect
and a ``BackendLogin``; its verdict goes back to the front-end as ``LoginAccepted``,
``LoginRejected`` or ``LoginUnavailable``. Nothing here does I/O or reads a clock.
"""

import typing
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.protocols.sasl import Credentials

# ---------------------------------------------------------------------------------------------
# Configuration handed to machines by the driver


class StartTlsPolicy(Enum):
    """Whether a plaintext listener offers STARTTLS, and whether a login needs it first."""

    OFF = "off"
    ON = "on"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """What a front-end machine needs to know about its listener."""

    server_name: str = "mailgress"
    starttls: StartTlsPolicy = StartTlsPolicy.OFF
    tls_active: bool = False  # implicit TLS: the connection is already encrypted
    inbound: bool = False  # SMTP only: an MX listener (no AUTH, route by recipient domain)
    max_errors: int = 5  # protocol errors before the connection is closed (nginx's max_errors)


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Where the client really is (after PROXY protocol, when trusted), for forwarding."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What a backend-login machine needs beyond the login request."""

    server_name: str = "mailgress"  # the name the proxy uses in its own EHLO
    client: ClientAddress | None = None
    client_info: Literal["none", "proxy-v2", "xclient", "id"] = "none"
    # The route wants STARTTLS towards this backend: the machine asks with ``StartTls`` after the
    # greeting (and capabilities) and goes on after ``TlsEstablished``; no credential before it.
    starttls: bool = False


# ---------------------------------------------------------------------------------------------
# Events: driver -> machine


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes arrived from the peer this machine talks to."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (EOF) or the connection broke."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The driver's pre-login timer expired."""


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """The TLS handshake the machine asked for with ``StartTls`` completed."""


@dataclass(frozen=True, slots=True)
class LoginAccepted:
    """The backend accepted the login; ``reply`` is its success reply, to pass on verbatim."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class LoginRejected:
    """The login was refused.

    ``reply`` is the backend's own refusal, to pass on verbatim (IMAP: it already carries the
    client's tag); None means the proxy refused before any backend was asked (unknown user or
    domain, no route), and the front-end renders its standard failure, which for inbound SMTP
    is ``550 5.7.1`` (never an open relay).
    """

    reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class LoginUnavailable:
    """No backend could be reached or it failed: answer with the protocol's temporary failure."""


Event = (
    DataReceived
    | ConnectionClosed
    | TimedOut
    | TlsEstablished
    | LoginAccepted
    | LoginRejected
    | LoginUnavailable
)

# ---------------------------------------------------------------------------------------------
# Commands: machine -> driver


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the peer, in order."""

    data: bytes

    def __repr__(self) -> str:
        # A Send towards a backend carries the password: never show the bytes themselves.
        return f"Send(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class Close:
    """Flush what was sent, then close the connection. ``reason`` goes to the session log."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Flush what was sent, then run the TLS handshake; answer with ``TlsEstablished``."""


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """Everything a backend-login machine needs to log in on the client's behalf.

    ``routing_key`` is the login name, or for inbound SMTP the first recipient's address.
    ``tag`` is the client's IMAP command tag: the backend login sends tags of its own and puts
    this one back on the tagged reply the client gets. ``helo`` is the client's HELO/EHLO command line
    and ``envelope`` its MAIL FROM and RCPT TO command lines (inbound SMTP), replayed as sent.
    """

    protocol: Literal["imap", "pop3", "submission", "smtp"]
    routing_key: str
    credentials: Credentials | None = None
    tag: bytes = b""
    helo: bytes = b""
    envelope: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Route and log in; answer with LoginAccepted, LoginRejected or LoginUnavailable."""

    request: LoginRequest


@dataclass(frozen=True, slots=True)
class Relay:
    """Login done: from now on copy bytes both ways; ``buffered`` goes to the backend first."""

    buffered: bytes


@dataclass(frozen=True, slots=True)
class LoginSucceeded:
    """Backend-login verdict: logged in. ``reply`` is for the client; ``buffered`` holds any
    backend bytes that followed it (to be relayed to the client after ``reply``)."""

    reply: bytes
    buffered: bytes = b""


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """Backend-login verdict: the backend refused the login; ``reply`` is its refusal rewritten
    for the client (IMAP: with the client's tag, after the untagged lines that came before it).

    ``credentials`` says whether the refusal is about the credentials (a wrong name or password:
    IMAP ``NO`` without a response code or with [AUTHENTICATIONFAILED], POP3 ``-ERR`` without a
    code or with [AUTH], SMTP 535). Any other refusal ([LIMIT], [IN-USE], an expired account
    ...) is final for this login but says nothing about the password, so the driver must not
    count it as a guess towards the failed-login lockout.
    """

    reply: bytes
    credentials: bool


@dataclass(frozen=True, slots=True)
class BackendFailed:
    """Backend-login verdict: the backend broke the dialogue or failed temporarily."""

    reason: str


Command = Send | Close | StartTls | Authenticate | Relay | LoginSucceeded | LoginFailed | BackendFailed


class FrontendMachine(typing.Protocol):
    """What the driver needs of a protocol's ``Frontend``."""

    def start(self) -> list[Command]: ...

    def handle(self, event: Event) -> list[Command]: ...


class BackendMachine(typing.Protocol):
    """What the driver needs of a protocol's ``BackendLogin``."""

    def handle(self, event: Event) -> list[Command]: ...
