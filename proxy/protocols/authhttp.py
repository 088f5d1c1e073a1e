"""nginx's auth_http protocol: the request one login attempt sends, and the verdict in the reply.

The HTTP client in ``proxy.server.authhttp`` calls ``service`` once per route to check its
settings, ``build_request`` for every attempt, and ``parse_response`` on the bytes read so far
until it returns a verdict. Wire-compatible with ngx_mail_auth_http_module, so an auth service
written for nginx works unchanged. Pure: no I/O, no clocks, no logging. The request carries the
password and a reply may carry the backend's password: neither ever appears in a ``repr``, an
error message or a verdict's ``reason``.

The request, as nginx writes it (ngx_mail_auth_http_create_request), in this order::

    GET <uri> HTTP/1.0                 Host: <host part of the URL, without the port>
    Auth-Method: plain | none          (none: inbound SMTP, routed at its first RCPT)
    Auth-User / Auth-Pass              escaped: space, "%" and bytes 0x00-0x1F become %XX;
                                       8-bit octets go as they are (a Latin-1 password too)
    Auth-Protocol: imap | pop3 | smtp  Auth-Login-Attempt: <n, per connection, from 1>
    Client-IP                          Client-Host: [UNAVAILABLE] (SMTP only: no resolver)
    Auth-SMTP-Helo / -From / -To       (Auth-Method none: the HELO argument, the MAIL and RCPT lines)
    Auth-SSL: on, Auth-SSL-Protocol, Auth-SSL-Cipher   (the client is on TLS)
    the route's extra headers, last

The reply, as nginx reads it (ngx_mail_auth_http_process_headers): at most 1024 bytes up to the
empty line that ends the header; the status line is skipped if there is one (its code means
nothing); each header line is a name of letters, digits and "-", then ":", spaces, and a value
up to CRLF or bare LF with trailing spaces trimmed; anything else makes the reply invalid.
``Auth-Status: OK`` grants the login, ``WAIT`` asks for the same request again after
``Auth-Wait`` seconds, any other text refuses it, rendered as the client's failure line (IMAP
``<tag> NO <text>``, POP3 ``-ERR <text>``, SMTP ``<Auth-Error-Code or 535 5.7.0> <text>``),
after ``Auth-Wait`` seconds if given. A grant's Auth-Pass is the backend password's octets,
copied as nginx copies it (no %XX unescaping, 8-bit octets kept); its Auth-User is a user
name and must be UTF-8, as a client's (see sasl).

Where mailgress differs on purpose:
- A grant needs ``Auth-Status: OK``. nginx takes a reply without any Auth-Status but with
  Auth-Server and Auth-Port as a success; a broken auth service must never log anyone in.
- ``OK`` without Auth-Server and Auth-Port (nginx: an internal error) lets the route's own
  endpoints serve the login, with its balance policy and fail-over: the auth service says who,
  the routing table says where. Only one of the two is still invalid, as in nginx.
- An empty ``Auth-Status`` refuses the login for SMTP too (nginx goes on as if none was sent).
- An empty or blank status text is replaced by the front-end's own refusal text: nginx sends
  ``a1 NO `` and ``-ERR `` with nothing after the space, which IMAP's resp-text (RFC 9051
  section 9: ``1*TEXT-CHAR``) forbids and which tells a user nothing in POP3 and SMTP.
- Auth-Pass is never required: nginx requires it only where it has no password of its own
  (APOP, CRAM-MD5), which mailgress does not offer; otherwise the client's password is used.
- No ``Proxy-Protocol-*``, ``Auth-Salt`` or client-certificate headers: the driver does not
  hand those facts over, and mailgress offers no mechanism that needs a salt.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import assert_never

from proxy.protocols import imap, pop3, sasl, smtp
from proxy.protocols.events import LoginRequest
from proxy.protocols.lines import LineBuffer
from proxy.table import Endpoint, HttpAuth, TableError, auth_http_url, port_number

# ngx_mail_auth_http_module.c reads the reply into a fixed 1024-byte buffer: a header that does
# not end within it is an error there, and here.
MAX_RESPONSE_HEAD = 1024
# ngx_mail_smtp_errcode: the SMTP refusal's prefix when the reply names no Auth-Error-Code
# (RFC 4954 section 6: 535 5.7.8 would be the RFC's choice; nginx sends 5.7.0).
DEFAULT_SMTP_ERROR_CODE = b"535 5.7.0"
# What nginx's Client-Host says when it has no resolver (ngx_mail_smtp_handler.c); mailgress
# resolves no client names (CVE-2026-28753 came from trusting PTR records).
CLIENT_HOST_UNAVAILABLE = b"[UNAVAILABLE]"
CRLF = b"\r\n"

# ngx_escape_uri with NGX_ESCAPE_MAIL_AUTH: " ", "%" and %00-%1F, as %XX with upper-case hex.
_ESCAPE = re.compile(rb"[\x00-\x20%]")
# ngx_mail_auth_http_parse_header_line: a name starts with a letter or digit and goes on with
# letters, digits and "-"; then either the line ends (an empty value) or ":" and spaces come,
# and the value runs to the end of the line (the caller has cut CR and LF off).
_HEADER_LINE = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?::( *)(.*))?", re.DOTALL)
_STATUS_LINE_PREFIX = b"HTTP/"
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")
# Extra header values travel as typed in the MailRoute: printable ASCII, spaces and tabs (the CRD).
_HEADER_VALUE = re.compile(r"[\t -~]*")
_AUTH_PROTOCOLS = {"imap": b"imap", "pop3": b"pop3", "submission": b"smtp", "smtp": b"smtp"}
# RFC 791 section 3.2: an IPv4 address is four octets, written as four decimal parts.
_DOTTED_QUAD = re.compile(rb"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")
_MAX_OCTET = 255


class AuthConfigError(ValueError):
    """A route's auth_http settings cannot make a request (bad URL or extra header).

    The message names the problem and at most a header name, never a header value (those are
    often shared secrets).
    """


@dataclass(frozen=True, slots=True)
class Service:
    """Where an auth_http service is and what every request to it carries besides the login."""

    scheme: str  # "http", or "https" (a mailgress extension: nginx speaks plain HTTP only)
    host: str  # to connect to: a name or an IP address, without IPv6 brackets
    port: int
    host_header: bytes  # the URL's host part as written (IPv6 in brackets), without the port
    uri: bytes
    extra_headers: bytes = field(repr=False)  # "Name: value" CRLF lines; values may be secrets


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """The client connection's TLS, as OpenSSL names it (``TLSv1.3``, ``TLS_AES_256_GCM_SHA384``)."""

    protocol: str
    cipher: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt of one client connection: what the auth service is told about it."""

    request: LoginRequest  # its credentials redact themselves in repr
    number: int  # Auth-Login-Attempt: 1 for the first attempt on a connection
    client_ip: str  # the real client, after a trusted PROXY header
    tls: TlsFacts | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """The bytes of one auth_http request; they carry the password, so ``repr`` shows a size only."""

    data: bytes

    def __repr__(self) -> str:
        return f"Request(<{len(self.data)} bytes>)"


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True, slots=True)
class Granted:
    """``Auth-Status: OK``: log in on ``server`` (None: one of the route's endpoints), as
    ``user`` with ``password`` where the reply overrides them (None: the client's own)."""

    server: Endpoint | None = None
    user: str | None = None
    password: bytes | None = field(default=None, repr=False)  # octets, as Credentials.password

    def __repr__(self) -> str:
        hidden = "None" if self.password is None else "<redacted>"
        return f"Granted(server={self.server!r}, user={self.user!r}, password={hidden})"


@dataclass(frozen=True, slots=True)
class Refused:
    """Any other ``Auth-Status``: send ``reply`` to the client after ``wait`` seconds."""

    reply: bytes
    wait: int = 0


@dataclass(frozen=True, slots=True)
class TryAgain:
    """``Auth-Status: WAIT``: send the same request again after ``wait`` seconds."""

    wait: int = 0


@dataclass(frozen=True, slots=True)
class Invalid:
    """The reply breaks the protocol; ``reason`` is for the log and quotes no header value."""

    reason: str


Verdict = Granted | Refused | TryAgain | Invalid


class _Malformed(Exception):
    """Internal: the reply cannot be read; the message becomes ``Invalid.reason``."""


# ---------------------------------------------------------------------------------------------
# Settings and request


def service(settings: HttpAuth) -> Service:
    """Check a route's auth_http settings once and prepare what every request reuses.

    Raises:
        AuthConfigError: the URL is not ``http(s)://host[:port][/path]`` or an extra header
            could not be sent as it is.
    """
    try:
        # The controller refused a MailRoute whose URL this refuses: the same rule (table).
        url = auth_http_url(settings.url)
    except TableError as error:
        raise AuthConfigError(str(error)) from error
    lines = []
    for name, value in settings.headers:
        if not _HEADER_NAME.fullmatch(name):
            raise AuthConfigError(f"extra auth_http header name {name!r} is not letters, digits and '-'")
        if not _HEADER_VALUE.fullmatch(value):
            raise AuthConfigError(f"extra auth_http header {name} has a value that is not printable ASCII")
        lines.append(f"{name}: {value}".encode() + CRLF)
    return Service(
        scheme=url.scheme,
        host=url.host,
        port=url.port,
        host_header=url.host_header.encode("ascii"),
        uri=url.uri.encode("ascii"),
        extra_headers=b"".join(lines),
    )


def escape(value: bytes) -> bytes:
    """Escape a login or password as nginx does: space, "%" and bytes 0x00-0x1F become %XX."""
    return _ESCAPE.sub(lambda match: b"%%%02X" % match[0][0], value)


def _smtp_argument(helo: bytes) -> bytes:
    # ngx_mail_smtp_helo keeps the first argument of HELO/EHLO.
    words = helo.split()
    return words[1] if len(words) > 1 else b""


def _smtp_command(line: bytes) -> bytes:
    # ngx_mail_smtp_mail/rcpt keep the whole command line without trailing spaces.
    return line.rstrip(b" ")


def build_request(target: Service, attempt: Attempt) -> Request:
    """The auth_http request for ``attempt``, byte for byte as nginx sends it."""
    request = attempt.request
    credentials = request.credentials
    lines = [
        b"GET " + target.uri + b" HTTP/1.0",
        b"Host: " + target.host_header,
        # Every mechanism mailgress offers hands over a clear-text password: nginx calls them
        # all "plain"; "none" is SMTP without AUTH (inbound mail, routed at its first RCPT).
        b"Auth-Method: " + (b"none" if credentials is None else b"plain"),
        b"Auth-User: " + (b"" if credentials is None else escape(credentials.username.encode())),
        b"Auth-Pass: " + (b"" if credentials is None else escape(credentials.password)),
        b"Auth-Protocol: " + _AUTH_PROTOCOLS[request.protocol],
        b"Auth-Login-Attempt: %d" % attempt.number,
        b"Client-IP: " + attempt.client_ip.encode("ascii"),
    ]
    if request.protocol in ("submission", "smtp"):
        lines.append(b"Client-Host: " + CLIENT_HOST_UNAVAILABLE)
    if credentials is None:
        mail, rcpt = request.envelope if len(request.envelope) == 2 else (b"", b"")
        lines += [
            # Not escaped, as in nginx: SMTP command lines cannot hold CR or LF.
            b"Auth-SMTP-Helo: " + _smtp_argument(request.helo),
            b"Auth-SMTP-From: " + _smtp_command(mail),
            b"Auth-SMTP-To: " + _smtp_command(rcpt),
        ]
    if attempt.tls is not None:
        lines += [
            b"Auth-SSL: on",
            b"Auth-SSL-Protocol: " + attempt.tls.protocol.encode("ascii"),
            b"Auth-SSL-Cipher: " + attempt.tls.cipher.encode("ascii"),
        ]
    return Request(CRLF.join(lines) + CRLF + target.extra_headers + CRLF)


# ---------------------------------------------------------------------------------------------
# Reply


def _header_lines(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The reply's header lines as (name, value), or None while the empty line has not come.

    Raises:
        _Malformed: a line breaks nginx's header grammar.
    """
    if len(head) < len(_STATUS_LINE_PREFIX) and _STATUS_LINE_PREFIX.startswith(head):
        return None  # it may still turn out to be a status line
    lines = LineBuffer(MAX_RESPONSE_HEAD)
    lines.feed(head)
    if head.startswith(_STATUS_LINE_PREFIX):
        status = lines.pop_line()
        if status is None:
            return None
        if b"\r" in status:  # nginx: a CR in the status line must be followed by LF
            raise _Malformed("invalid status line in response")
    headers: list[tuple[bytes, bytes]] = []
    while (line := lines.pop_line()) is not None:
        if b"\r" in line:
            raise _Malformed("invalid header in response")
        if not line:
            return headers
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise _Malformed("invalid header in response")
        headers.append((match[1].lower(), (match[3] or b"").rstrip(b" ")))
    return None


def _server(text: bytes) -> str:
    # ngx_parse_addr: a literal IPv4 or IPv6 address, never a name to resolve. ngx_inet_addr
    # reads a dotted quad's parts as decimal with any leading zeros ("127.000.000.001"), where
    # Python's parser refuses them (they could be meant as octal); each part is still 0-255.
    quad = _DOTTED_QUAD.fullmatch(text)
    if quad is not None:
        parts = [part.lstrip(b"0") or b"0" for part in quad.groups()]
        if any(len(part) > len(str(_MAX_OCTET)) or int(part) > _MAX_OCTET for part in parts):
            raise _Malformed("Auth-Server is not an IP address")
        return b".".join(parts).decode("ascii")
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as error:
        raise _Malformed("Auth-Server is not an IP address") from error
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise _Malformed("Auth-Server is not an IP address")
    return str(address)


def _text(value: bytes | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Malformed(f"{name} is not UTF-8") from error


def _refusal(request: LoginRequest, text: bytes, error_code: bytes | None) -> bytes:
    """The client's failure line for ``text``, as nginx renders it per protocol; a blank
    ``text`` becomes the front-end's own refusal text (a reply needs one)."""
    blank = not text.strip()
    match request.protocol:
        case "imap":
            return request.tag + b" NO " + (imap.REFUSAL_TEXT if blank else text) + CRLF
        case "pop3":
            return pop3.REPLY_AUTH_FAILED if blank else b"-ERR " + text + CRLF
        case "submission" | "smtp":
            if blank:
                text = smtp.AUTH_FAILED_TEXT if request.protocol == "submission" else smtp.RELAY_DENIED_TEXT
            return (error_code or DEFAULT_SMTP_ERROR_CODE) + b" " + text + CRLF
        case _:
            assert_never(request.protocol)


def parse_response(head: bytes, request: LoginRequest) -> Verdict | None:
    """The verdict in the reply to ``request``, or None until more of the reply has arrived.

    ``head`` is everything read so far; bytes after the header's empty line (a body) are
    ignored. A reply whose header has not ended within ``MAX_RESPONSE_HEAD`` bytes is Invalid.
    """
    try:
        headers = _header_lines(head[:MAX_RESPONSE_HEAD])
        if headers is None:
            if len(head) >= MAX_RESPONSE_HEAD:
                return Invalid(f"response header longer than {MAX_RESPONSE_HEAD} bytes")
            return None
        return _verdict(headers, request)
    except _Malformed as error:
        return Invalid(str(error))


def _verdict(headers: list[tuple[bytes, bytes]], request: LoginRequest) -> Verdict:
    """nginx's reading of the headers: the last of each wins; a refusal outranks WAIT and OK.

    Raises:
        _Malformed: a grant names no usable server, port or credentials.
    """
    granted = wait_status = False
    refusal: bytes | None = None
    values: dict[bytes, bytes] = {}
    wait = 0
    for name, value in headers:
        if name == b"auth-status":
            # Case-sensitive, as nginx compares them.
            if value == b"OK":
                granted = True
            elif value == b"WAIT":
                wait_status = True
            else:
                refusal = value
        elif name == b"auth-wait":
            if value.isdigit():  # ngx_atoi: anything else leaves the wait as it was
                wait = int(value)
        else:
            values[name] = value
    if refusal is not None:
        return Refused(_refusal(request, refusal, values.get(b"auth-error-code")), wait)
    if wait_status:
        return TryAgain(wait)
    if not granted:
        raise _Malformed("no Auth-Status in response")
    # nginx treats an empty Auth-Server or Auth-Port as a missing one.
    address, port_text = values.get(b"auth-server", b""), values.get(b"auth-port", b"")
    server = None
    if address or port_text:
        if not (address and port_text):
            raise _Malformed("Auth-Server without Auth-Port, or Auth-Port without Auth-Server")
        # ngx_atoi, as for the URL's port: leading zeros too ("000143"); Latin-1 maps each
        # octet to one character, so an 8-bit octet is no digit and fails.
        port = port_number(port_text.decode("latin-1"))
        if port is None:
            raise _Malformed("invalid Auth-Port")
        server = Endpoint(_server(address), port)
    return Granted(
        server=server,
        user=_text(values.get(b"auth-user"), "Auth-User"),
        # Octets, copied as nginx copies them (no %XX unescaping, any 8-bit octet).
        password=values.get(b"auth-pass"),
    )


def credentials_for(request: LoginRequest, grant: Granted) -> sasl.Credentials | None:
    """The credentials to replay on the backend: the client's, with the grant's overrides."""
    credentials = request.credentials
    if credentials is None:  # inbound SMTP logs in as nobody
        return None
    if grant.user is None:
        username, authzid = credentials.username, credentials.authzid
    else:  # an authorization identity named the client's login, not the one granted
        username, authzid = grant.user, ""
    return sasl.Credentials(
        username=username,
        password=credentials.password if grant.password is None else grant.password,
        mechanism=credentials.mechanism,
        authzid=authzid,
    )
