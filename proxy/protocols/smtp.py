"""SMTP: the client-facing ``Frontend``, the ``BackendLogin`` replay and the ``Mediator``.

The session driver (proxy.server.session) runs a ``Frontend`` per submission or inbound-MX
client; the backend driver (proxy.server.backends) runs a ``BackendLogin`` per backend attempt;
proxy.server.mediation runs a ``Mediator`` once a client has a backend.
Submission (``inbound=False``): EHLO, STARTTLS, AUTH PLAIN/LOGIN, and the credentials go out as
``Authenticate``. Inbound MX (``inbound=True``): EHLO, MAIL FROM, and the first RCPT TO whose
address passes the relay checks goes out as ``Authenticate``, routed by recipient. After the
login of either, the ``Mediator`` takes every command.
Pure: no I/O, no clocks, no logging; never puts a password into a reply, reason or repr.

Theory of operation (front-end)::

    CONNECTED --EHLO/HELO--> READY
    READY --AUTH without initial response--> AUTH_PLAIN / AUTH_LOGIN_USERNAME --> ...
    READY / AUTH_* --credentials complete--> AUTHENTICATING             (submission)
    READY --MAIL FROM--> MAIL --RCPT TO passing the relay checks--> AUTHENTICATING  (inbound)
    AUTHENTICATING --LoginAccepted--> RELAYING   (the driver starts a Mediator)
    AUTHENTICATING --LoginRejected / LoginUnavailable--> READY (submission) or MAIL (inbound)
    CONNECTED / READY --STARTTLS--> STARTING_TLS --TlsEstablished--> CONNECTED
    any --QUIT, max_errors, TimedOut, ConnectionClosed--> CLOSED

RFC 5321 section 4.1.4 fixes the order (EHLO first, EHLO resets a transaction); RFC 3207
section 4.2 makes STARTTLS forget everything the client said before it; RFC 4954 section 4
fixes the AUTH exchange (``334`` continuations, ``*`` cancels with 501, undecodable data is
501 5.5.2); RFC 2920: pipelined commands are answered in order and the bytes behind the
command that triggered ``Authenticate`` are held for the backend (``Relay``). Enhanced
status codes follow RFC 3463 (RFC 4954 section 6 for the AUTH ones). Every 4xx/5xx reply counts
towards ``max_errors`` (refused recipients too: no throttle guards the MX, so this bounds address
guessing, and Postfix counts them as well) except the temporary failures, which are not the
client's fault, and a refused login (also one refused before it was asked, for control characters
or another authorization identity), as in nginx: stopping password guessing is the failed-login
throttle's and the auth service's job, and a client an auth service asked to wait must not be
disconnected for it. The last error is followed by ``421`` and a close, as Postfix does.
``helo`` and ``envelope`` in the ``LoginRequest`` are the client's command lines without their
CRLF, for the backend replay and for auth_http's Auth-SMTP-* headers.

Limits no stricter than Postfix's: a client's command line may have ``MAX_CLIENT_LINE`` octets
(Postfix's line_length_limit; RFC 5321 section 4.5.3.1 makes 512 the minimum and asks to avoid
limits). A longer one is answered ``500 5.5.2`` (section 4.5.3.1.10; ``500 5.5.6`` inside an AUTH
exchange, RFC 4954 section 6, which ends the exchange) and skipped up to its line end without
being buffered; it counts towards ``max_errors`` and the session goes on. The sender takes no part
in routing and MAIL reaches the backend verbatim, so it is only checked for the ``<...>`` form
(printable ASCII, hence no CR, LF or NUL): SRS and VERP senders, dots anywhere, a local part of
any length are the backend's to judge. A recipient needs only what the relay checks below need;
its local part is bounded by the line alone (RFC 5321's 64 octets is a minimum to accept, section
4.5.3.1.1), its domain by the 255 octets of a DNS name. MAIL and RCPT take only the parameters of
extensions the proxy advertises: ``BODY=7BIT`` or ``BODY=8BITMIME`` (RFC 6152) at MAIL (and after
a submission's AUTH, RFC 4954's ``AUTH=``), none at RCPT; any other is refused ``555 5.5.4`` (RFC
5321 section 4.1.1.11), as Postfix does. No DSN (RFC 3461) either: a server that lists DSN must
honour NOTIFY, ORCPT, RET and ENVID, and the proxy cannot promise that for a backend it has not
asked yet (Postfix with ``smtpd_discard_ehlo_keywords = dsn`` refuses them); unadvertised, clients
leave them out and mail flows with the backend's default notices instead of failing at RCPT.

Never an open relay: a recipient is routed only if it is a plain ``local@domain`` (no source
route, percent hack, bang path, quoted local part hiding one of those, or address literal) and
the routing table owns it (``LoginRejected(None)`` renders ``550 5.7.1``; ``<Postmaster>`` is
routed as the bare user ``postmaster``); submission refuses MAIL, RCPT and DATA before login.
What passes the proxy reaches the backend verbatim, so the backend parses the very address the
proxy checked. The backend must still refuse relaying for the proxy's own address (defence in
depth: every later RCPT is checked by the ``Mediator`` too).
Deliberate deviations: no SIZE in EHLO (the proxy does not know the backend's limit), no
SMTPUTF8 (so envelope addresses are ASCII), VRFY and EXPN verify nothing (252, as RFC 5321
section 7.3 asks of a server that disables them, and not counted as errors),
AUTH PLAIN with an authorization identity other than the user gets ``535 5.7.8`` (nginx drops
the identity; sasl says why we refuse).

Inbound mediation (``Mediator``): one backend connection serves one route, the first routed
recipient's; nginx relays bytes from there, so a second recipient of another route reached the
first backend and got its permanent ``550 Relay access denied``: a bounce, for mail another
route would have taken (Exim groups the recipients of domains sharing an MX in one transaction,
Postfix reuses a connection for another domain with the same MX address). So the proxy keeps
reading the client's commands: each goes to the backend alone and its one complete reply comes
back before the next is read (pipelined ones wait, in order), a recipient of a route on another
backend gets ``452 4.5.3`` (RFC 5321 4.5.3.1.10: "too many recipients", which senders deliver
later in another transaction; never 550, which would bounce) while routes on the same backend
endpoint share the transaction, the DATA body streams through with every line end made CRLF
(a bare LF or CR too) until the line ``.`` (``BodyStream``), so a backend cannot see the body end
anywhere else and run what follows as commands the proxy never read (SMTP smuggling), and what
a trusting backend must not hear from a client (XCLIENT above all) is answered by the proxy. A
backend's ``421`` is passed on and ends the session (RFC 5321 section 3.8: it closes).

Submission is mediated too, with the recipients left to the backend (``Mediator`` without
``InboundRouting``; MAIL and RCPT paths in the forms Postfix takes by default, brackets or not):
the backend trusts the proxy's address, and a byte relay would hand that trust to the client.
Behind a relayed login a client could send its own ``XCLIENT ADDR=... LOGIN=...``, which Postfix
obeys from a host in ``smtpd_authorized_xclient_hosts`` at any time outside a transaction (its
XCLIENT_README), so an authenticated user could take another user's login name or an address in
``mynetworks``; nginx's mail proxy relays such a command. The same follow-up makes the drain wait
for a submission transaction to complete (RFC 5321 section 3.3) and keeps a body's end where the
proxy sees it. It costs the zero-copy relay for submission (the body passes through
``BodyStream``); docs/benchmarks.md gives the price.

The backend login (``BackendLogin``, nginx's order): greeting ``220``, ``EHLO <server_name>``; with
client_info xclient and ``XCLIENT`` in the EHLO reply, Postfix's ``XCLIENT ADDR= PORT=
NAME=[UNAVAILABLE]`` (the attributes it lists, xtext-encoded) and, after its fresh ``220``, ``EHLO
<the client's own name>``. With ``proxy-v2`` the backend has the client's address from the PROXY
header, so the first EHLO gives the client's name too. Otherwise the backend takes the proxy for the
client, so the proxy introduces itself by its own name: replaying the client's name would only put
an unverifiable name next to the proxy's address. Then submission sends ``AUTH PLAIN`` (235 is
success), except after a ``verified`` login: one an auth_http service has already accepted. There a
backend whose EHLO lists ``LOGIN`` among the XCLIENT attributes gets ``LOGIN=<the user the service
granted>`` in that XCLIENT and no AUTH, whatever AUTH it offers, as nginx's default ``xclient on;
proxy_smtp_auth off`` does, and its 250 to the EHLO after it is the success (the client hears
``235``). A Postfix with ``smtpd_sasl_auth_enable = yes`` offers AUTH PLAIN too, but its SASL need
not know the service's users, and only a SASL or XCLIENT login passes its
``permit_sasl_authenticated``: AUTH PLAIN there would be a 535 for a right password. AUTH PLAIN
(with the service's Auth-Pass) is for a backend that does not take LOGIN from the proxy. A name that
cannot go as LOGIN (longer than ``MAX_XCLIENT_VALUE`` xtext-encoded) is the client's temporary
failure, the endpoint untouched; an empty one is left out, as nginx does (see ``_on_reply``). Never
for a login the backend must verify (auth mode backend): XCLIENT LOGIN carries no password, so it
would let any password in; such a backend without AUTH PLAIN fails the attempt as before. Inbound
replays MAIL FROM and RCPT TO, and whatever the backend answers to RCPT is the client's reply, as
nginx does (a 421 ends the session with it). A MAIL refused with 5xx becomes the client's RCPT reply
(Postfix itself reports sender refusals at RCPT time by default), with 4xx it is a backend failure,
so the client hears 451 and retries: either way no mail is accepted that the backend did not take. A
4xx or 5xx to XCLIENT or to the EHLO after it is the backend's verdict on the client it now sees
(Postfix's client and HELO restrictions with ``smtpd_delay_reject = no``): the client hears it as
the reply to its RCPT (submission: to its AUTH), and the endpoint, which answered, is not failing. A
refusal of XCLIENT itself as not understood (500-504) or not authorized (Postfix's 550 "insufficient
authorization") is about the proxy, not the client: a failure of the endpoint and 451 to the client,
never a bounce (Postfix lists XCLIENT only to hosts it authorizes, so with Postfix the second does
not happen).

With ``BackendConfig.starttls`` the first EHLO reply must list STARTTLS (RFC 3207); the machine
sends it and, on ``220``, emits ``StartTls`` and drops whatever the backend sent behind the 220
in plaintext. After ``TlsEstablished`` it forgets everything learned before (RFC 3207 section
4.2) and sends ``EHLO <server_name>`` again; XCLIENT, AUTH or the envelope follow that second
reply only. A backend that does not offer STARTTLS or refuses it fails the attempt: there is no
plaintext fallback, so neither a credential nor the envelope is ever sent in the clear.
"""

import ipaddress
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum, auto
from typing import Literal, assert_never

from proxy.protocols import sasl
from proxy.protocols.errors import LineTooLongError, LocalProtocolError, RemoteProtocolError
from proxy.protocols.events import (
    Authenticate,
    BackendConfig,
    BackendFailed,
    ClientAddress,
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
# RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets including its CRLF
# (LineBuffer limits count without the line end). The lines the proxy itself makes (AUTH PLAIN
# to a backend, RFC 4954 section 4) stay within it.
MAX_COMMAND_LINE = 512 - len(CRLF)
# The lines accepted from a client: 512 is only the minimum a server must take, and RFC 5321
# section 4.5.3.1 asks to avoid limits. 2048 octets with the CRLF is Postfix's line_length_limit
# (nginx's smtp_client_buffer is one 4 KiB page): no longer, because MAIL and RCPT lines are
# replayed verbatim to a backend, which would cut a longer one in two commands.
MAX_CLIENT_LINE = 2048 - len(CRLF)
# RFC 4954 section 4 keeps the AUTH command itself within that limit but not the client's
# responses to 334 challenges (see sasl.py).
MAX_SASL_LINE = sasl.MAX_RESPONSE_LINE
# RFC 5321 section 4.5.3.1.5 makes 512 octets with the CRLF the reply line a client must take,
# and section 4.5.3.1 asks to avoid limits: a reply may echo a whole client line the proxy
# forwarded (Postfix's 550 quotes the recipient of a RCPT line of MAX_CLIENT_LINE octets), so a
# backend's reply line may have that much and 512 octets of its own text.
MAX_REPLY_LINE = MAX_CLIENT_LINE + 512 - len(CRLF)
# RFC 5321 sets no limit on the lines of one reply; a Postfix EHLO reply has about a dozen. The
# bounds keep a broken backend from growing one reply for ever: in lines, and in octets (a few
# long lines, not a hundred of them; line ends not counted).
MAX_REPLY_LINES = 100
MAX_REPLY_OCTETS = 4 * MAX_REPLY_LINE
# RFC 1035 section 2.3.4: a domain name (as text, without a final dot) fits in 255 octets, so a
# longer recipient domain cannot be anyone's. Local parts and paths have no bound but the line:
# RFC 5321 sections 4.5.3.1.1 and 4.5.3.1.3 give minimums to accept, not maximums.
MAX_DOMAIN = 255
# Bytes a client may pipeline behind the command that triggered Authenticate while the login
# or routing runs (they go to the backend first). RFC 2920 groups end at DATA, so a real client
# sends a few hundred octets here; 64 KiB keeps a client from parking data in the proxy.
MAX_HELD_BYTES = 64 * 1024

# Replies (RFC 5321 section 4.2, enhanced codes RFC 3463 / RFC 4954 section 6).
REPLY_OK = b"250 2.0.0 Ok" + CRLF
REPLY_SENDER_OK = b"250 2.1.0 Ok" + CRLF
REPLY_BYE = b"221 2.0.0 Bye" + CRLF
REPLY_READY_FOR_TLS = b"220 2.0.0 Ready to start TLS" + CRLF
REPLY_UNKNOWN = b"500 5.5.2 Error: command not recognized" + CRLF
REPLY_LINE_TOO_LONG = b"500 5.5.2 Error: line too long" + CRLF  # RFC 5321 section 4.5.3.1.10
REPLY_SASL_LINE_TOO_LONG = b"500 5.5.6 Authentication exchange line is too long" + CRLF  # RFC 4954
REPLY_BAD_SYNTAX = b"500 5.5.2 Error: bad syntax" + CRLF
REPLY_NOT_IMPLEMENTED = b"502 5.5.1 Error: command not implemented" + CRLF
# RFC 5321 section 7.3: a server that disables VRFY and EXPN MUST answer 252, not a code that
# could be read as a verdict on the address.
REPLY_NOT_VERIFIED = b"252 2.5.0 Cannot VRFY or EXPN; send the message and delivery will be attempted" + CRLF
# RFC 3030 section 2: BDAT only after CHUNKING was advertised, which the proxy never does. Its
# chunk follows at once and cannot be told from commands, so the answer closes the connection,
# as Postfix's without CHUNKING does, with Postfix's words (smtpd.c, bdat_cmd).
REPLY_NO_BDAT = b"521 5.5.1 Error: command not implemented" + CRLF
REPLY_HELO_FIRST = b"503 5.5.1 Error: send HELO/EHLO first" + CRLF
REPLY_NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command" + CRLF
REPLY_NEED_MAIL = b"503 5.5.1 Error: need MAIL command" + CRLF
REPLY_NEED_RCPT = b"503 5.5.1 Error: need RCPT command" + CRLF
REPLY_IN_TRANSACTION = b"503 5.5.1 Error: MAIL transaction in progress" + CRLF
REPLY_NO_AUTH_HERE = b"503 5.5.1 Error: authentication not enabled" + CRLF
REPLY_ALREADY_AUTHENTICATED = b"503 5.5.1 Error: already authenticated" + CRLF  # RFC 4954 section 4
REPLY_NO_RECIPIENTS = b"554 5.5.1 Error: no valid recipients" + CRLF
REPLY_TLS_ACTIVE = b"554 5.5.1 Error: TLS already active" + CRLF
REPLY_MECHANISM = b"504 5.5.4 Unrecognized authentication type" + CRLF
REPLY_CANCELLED = b"501 5.7.0 Authentication cancelled" + CRLF
REPLY_BAD_SASL = b"501 5.5.2 Cannot decode response" + CRLF
REPLY_AUTH_REQUIRED = b"530 5.7.0 Authentication required" + CRLF
REPLY_TLS_REQUIRED = b"530 5.7.0 Must issue a STARTTLS command first" + CRLF
# The texts of the two refusals a login can end in (auth_http refusals without a text use them).
AUTH_FAILED_TEXT = b"Authentication credentials invalid"
RELAY_DENIED_TEXT = b"Relay access denied"
REPLY_AUTH_FAILED = b"535 5.7.8 " + AUTH_FAILED_TEXT + CRLF
# A login the proxy completed with XCLIENT LOGIN, where no backend 235 exists to pass on: RFC 4954
# section 6's code in Postfix's words, what the client hears from a login with AUTH at Postfix.
REPLY_AUTH_SUCCEEDED = b"235 2.7.0 Authentication successful" + CRLF
REPLY_AUTHZID_REFUSED = b"535 5.7.8 " + sasl.AUTHZID_REFUSED_TEXT + CRLF  # see sasl: why
REPLY_AUTH_UNAVAILABLE = b"454 4.7.0 Temporary authentication failure" + CRLF
REPLY_RELAY_DENIED = b"550 5.7.1 " + RELAY_DENIED_TEXT + CRLF
REPLY_SOURCE_ROUTE = b"550 5.7.1 Source routes are not accepted" + CRLF
REPLY_ADDRESS_LITERAL = b"550 5.7.1 Address literals are not accepted" + CRLF
REPLY_ROUTE_UNAVAILABLE = b"451 4.4.1 Mail server unavailable, try again later" + CRLF
REPLY_BAD_SENDER = b"501 5.1.7 Bad sender address syntax" + CRLF
REPLY_BAD_RECIPIENT = b"501 5.1.3 Bad recipient address syntax" + CRLF
REPLY_BAD_PARAMETERS = b"501 5.5.4 Syntax error in parameters" + CRLF
REPLY_UNSUPPORTED_PARAMETER = b"555 5.5.4 Unsupported option" + CRLF  # RFC 5321 section 4.1.1.11


def _syntax(usage: str) -> bytes:
    return f"501 5.5.4 Syntax: {usage}".encode() + CRLF


def _closing(enhanced: str, server_name: str, why: str) -> bytes:
    """RFC 5321 section 3.8: a 421 reply before the server closes the channel."""
    return f"421 {enhanced} {server_name} {why}".encode() + CRLF


# ---------------------------------------------------------------------------------------------
# Envelope addresses (RFC 5321 section 4.1.2)


class AddressError(RemoteProtocolError):
    """An envelope address the proxy refuses; ``reply`` is the SMTP reply that says why."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply.decode("ascii").rstrip())
        self.reply = reply


# atext = ALPHA / DIGIT / "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "/" / "="
#         / "?" / "^" / "_" / "`" / "{" / "|" / "}" / "~"           (RFC 5322 section 3.2.3)
# RFC 5321's Dot-string is Atom *("." Atom); dots anywhere (taro..yamada, hanako.) are taken
# as Postfix takes them: they hide no route, and the backend judges the mailbox.
_DOTS_AND_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE
# QcontentSMTP = qtextSMTP / quoted-pairSMTP; qtextSMTP = %d32-33 / %d35-91 / %d93-126
# quoted-pairSMTP = %d92 %d32-126
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
# sub-domain = Let-dig [Ldh-str]; Domain = sub-domain *("." sub-domain)
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
# address-literal = "[" ( IPv4 / IPv6 / General-address-literal ) "]", loosely: refused anyway
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
# A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain (a source route)
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"
# Forward-path = "<" [ A-d-l ":" ] Mailbox ">"; Mailbox = Local-part "@" ( Domain /
# address-literal ), or RFC 5321 section 4.1.1.3's "<Postmaster>" without a domain. The domain
# may end in one dot, as Postfix accepts it (user@example.com. is the same mailbox; refusing it
# with a 5xx would bounce the mail); table.lookup compares the domain without it.
_FORWARD_PATH = re.compile(
    rf"<(?:(?:(?P<route>{_ADL}):)?"
    rf"(?P<local>{_DOTS_AND_ATEXT}|{_QUOTED_STRING})@(?P<domain>{_DOMAIN}\.?|{_ADDRESS_LITERAL})"
    r"|(?P<postmaster>(?i:postmaster)))>"
)
# Reverse-path, loosely (Postfix takes even a bare address): "<", then anything but SP, "<", ">"
# and DQUOTE outside quoted strings, then ">"; "<>", "<alice>" and source routes pass. The
# brackets are kept because without them the path could not be told from the parameters.
_REVERSE_PATH = re.compile(rf"<(?:[\x21\x23-\x3b\x3d\x3f-\x7e]|{_QUOTED_STRING})*>")
# esmtp-param = esmtp-keyword ["=" esmtp-value]; esmtp-value = 1*(%d33-60 / %d62-126)
_PARAMETER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?")
# The parameters of the extensions the proxy advertises, upper-cased: RFC 6152's BODY at MAIL
# (8BITMIME); none at RCPT, as no DSN is advertised.
MAIL_PARAMETERS = frozenset({"BODY=7BIT", "BODY=8BITMIME"})
RCPT_PARAMETERS: frozenset[str] = frozenset()
# After a submission's AUTH, MAIL also takes RFC 4954 section 5's AUTH=<mailbox in xtext> or
# AUTH=<>: a server that lists AUTH (the proxy's EHLO does, before the login) MUST take it, and
# relaying clients (Postfix's smtp_send_dummy_mail_auth, curl --mail-auth) send it with every
# message. It reaches the backend as sent, which decides how far it trusts it.
SUBMISSION_MAIL_KEYWORDS = frozenset({"AUTH"})
# A submission's MAIL and RCPT paths, as Postfix takes them by default (strict_rfc821_envelopes =
# no): the loose bracketed form above, or an address without its brackets, as scanners and
# scripts send it; the authenticated user's mail is the submission server's to judge.
_SUBMISSION_PATH = re.compile(rf"{_REVERSE_PATH.pattern}|[^ <>\"]+")
# In a recipient's local part these make a backend forward elsewhere: the percent hack
# (user%other@here), bang paths (other!user@here), and inside quotes an "@" or escapes.
_RELAY_MARKERS = frozenset("@%!\\")


def _path(
    text: str,
    path: re.Pattern[str],
    bad: bytes,
    parameters: frozenset[str],
    keywords: frozenset[str] = frozenset(),
) -> re.Match[str]:
    """Match ``Path [SP Mail-parameters]`` (RFC 5321 section 4.1.2).

    Raises:
        AddressError: with ``bad`` for a malformed path, 501 for a malformed parameter, 555 for
            one that is neither in ``parameters`` nor has its keyword in ``keywords`` (any
            value; RFC 5321 section 4.1.1.11).
    """
    match = path.match(text)
    rest = "" if match is None else text[match.end() :]
    if match is None or (rest and not rest.startswith(" ")):
        raise AddressError(bad)
    words = rest.split()
    if not all(_PARAMETER.fullmatch(word) for word in words):
        raise AddressError(REPLY_BAD_PARAMETERS)
    for word in (word.upper() for word in words):
        if word not in parameters and word.partition("=")[0] not in keywords:
            raise AddressError(REPLY_UNSUPPORTED_PARAMETER)
    return match


def check_reverse_path(text: str) -> None:
    """Check the argument of ``MAIL FROM:`` (RFC 5321 section 4.1.1.2): the form only.

    The sender takes no part in routing and reaches the backend verbatim, which judges it.

    Raises:
        AddressError: the reply to send instead of 250.
    """
    _path(text, _REVERSE_PATH, REPLY_BAD_SENDER, MAIL_PARAMETERS)


def parse_forward_path(text: str) -> str:
    """Check the argument of ``RCPT TO:`` and return the address to route by.

    ``<Postmaster>`` without a domain (RFC 5321 sections 4.1.1.3 and 4.5.1: a server MUST
    accept it) is routed as the bare user ``postmaster``: a route listing ``postmaster`` in its
    users owns it, else the ``"*"`` catch-all, else it is refused like any unrouted recipient.
    Not by the proxy's ``server_name``: that defaults to a name no route claims, and which
    route takes the postmaster's mail is better said explicitly.

    Raises:
        AddressError: the reply to send: 501 for bad syntax, 555 for a parameter the proxy did
            not advertise, 550 5.7.1 for anything that would make a backend forward the message
            elsewhere.
    """
    match = _path(text, _FORWARD_PATH, REPLY_BAD_RECIPIENT, RCPT_PARAMETERS)
    if match["postmaster"]:
        # <Postmaster>: as typed (the table folds case); the client's RCPT line, replayed to
        # the backend, still says <Postmaster>.
        return match["postmaster"]
    if len(match["domain"]) > MAX_DOMAIN:
        raise AddressError(REPLY_BAD_RECIPIENT)
    if match["route"]:
        raise AddressError(REPLY_SOURCE_ROUTE)
    if match["domain"].startswith("["):
        raise AddressError(REPLY_ADDRESS_LITERAL)
    if _RELAY_MARKERS.intersection(match["local"]):
        raise AddressError(REPLY_RELAY_DENIED)
    return f"{match['local']}@{match['domain']}"


def check_sender(argument: str, *, submission: bool = False) -> None:
    """Check the argument of ``MAIL`` (``FROM:<path>``, RFC 5321 section 4.1.1.2; clients often
    write ``FROM: <path>``); after a submission's AUTH, ``_SUBMISSION_PATH`` and
    ``SUBMISSION_MAIL_KEYWORDS`` too.

    Raises:
        AddressError: as ``check_reverse_path``, or 501 for a missing ``FROM:``.
    """
    prefix, path = argument[:5], argument[5:].lstrip(" ")
    if prefix.upper() != "FROM:":
        raise AddressError(_syntax("MAIL FROM:<address>"))
    if submission:
        _path(path, _SUBMISSION_PATH, REPLY_BAD_SENDER, MAIL_PARAMETERS, SUBMISSION_MAIL_KEYWORDS)
    else:
        check_reverse_path(path)


def recipient_of(argument: str) -> str:
    """The address to route by, from the argument of ``RCPT`` (``TO:<path>``, RFC 5321 section
    4.1.1.3; clients often write ``TO: <path>``).

    Raises:
        AddressError: as ``parse_forward_path``, or 501 for a missing ``TO:``.
    """
    return parse_forward_path(_forward_path_of(argument))


def check_recipient(argument: str) -> None:
    """Check the argument of a submission's ``RCPT`` for its form (``_SUBMISSION_PATH``) and
    parameters only: where an authenticated user's mail may go (source routes, address literals,
    other domains) is the submission server's to judge, as it is where the recipients' domains
    are its own.

    Raises:
        AddressError: 501 for bad syntax or a missing ``TO:``, 555 for a parameter the proxy did
            not advertise.
    """
    _path(_forward_path_of(argument), _SUBMISSION_PATH, REPLY_BAD_RECIPIENT, RCPT_PARAMETERS)


def _forward_path_of(argument: str) -> str:
    """The path of ``RCPT``'s argument, behind its ``TO:``; 501 without one."""
    prefix, path = argument[:3], argument[3:].lstrip(" ")
    if prefix.upper() != "TO:":
        raise AddressError(_syntax("RCPT TO:<address>"))
    return path


def _ehlo_reply(server_name: str, extensions: list[bytes]) -> list[bytes]:
    """The lines of the proxy's EHLO reply (RFC 5321 section 4.1.1.1), ``extensions`` after the
    ones it always offers. Never CHUNKING (BDAT gets 521 and a close), SIZE or SMTPUTF8 (module
    docstring)."""
    lines = [server_name.encode(), b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", *extensions]
    last = len(lines) - 1
    return [b"250" + (b" " if i == last else b"-") + line + CRLF for i, line in enumerate(lines)]


def _command_text(line: bytes) -> str | None:
    """The line as text if it is printable ASCII (RFC 5321 section 2.4: commands are ASCII;
    without SMTPUTF8 so are addresses, and no control character may reach a backend)."""
    if _PRINTABLE_ASCII.fullmatch(line):
        return line.decode("ascii")
    return None


_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")


def _split_command(text: str) -> tuple[str, str]:
    """A command line's verb and its argument, without the spaces between them.

    RFC 5321 section 4.1.1 puts one SP there, but Postfix reads a command as words separated by
    runs of spaces (``MAIL  FROM:<x>``, ``RSET ``), as nginx passes them on, and clients that
    send two get no 501 from either; the argument keeps its own spaces for the command to read.
    """
    verb, _, argument = text.partition(" ")
    return verb, argument.lstrip(" ")


def drop_over_long_line(buffer: LineBuffer) -> bool:
    """After ``LineTooLongError``: drop the over-long line at the head of ``buffer`` up to its LF
    and keep what follows it. True if the LF has not arrived yet: the caller then drops what
    arrives with ``after_line_end`` until it has, so none of the line is ever buffered."""
    rest = buffer.take_all()
    end = rest.find(b"\n")
    if end >= 0:
        buffer.feed(rest[end + 1 :])
    return end < 0


def after_line_end(data: bytes) -> bytes | None:
    """What follows the first LF in ``data``, or None if there is none (all of it is dropped)."""
    end = data.find(b"\n")
    return None if end < 0 else data[end + 1 :]


# ---------------------------------------------------------------------------------------------
# Front-end


class State(Enum):
    """Where the front-end dialogue stands (RFC 5321 section 4.1.4 order of commands)."""

    CONNECTED = auto()  # greeted; EHLO or HELO expected
    READY = auto()  # after EHLO/HELO, no transaction
    AUTH_PLAIN = auto()  # waiting for the PLAIN response
    AUTH_LOGIN_USERNAME = auto()  # waiting for the LOGIN username
    AUTH_LOGIN_PASSWORD = auto()  # waiting for the LOGIN password
    MAIL = auto()  # inbound: MAIL FROM accepted, waiting for a routable RCPT TO
    STARTING_TLS = auto()  # StartTls emitted, waiting for TlsEstablished
    AUTHENTICATING = auto()  # Authenticate emitted, waiting for the verdict
    RELAYING = auto()  # Relay emitted: the driver copies bytes now
    CLOSED = auto()


_SASL = frozenset({State.AUTH_PLAIN, State.AUTH_LOGIN_USERNAME, State.AUTH_LOGIN_PASSWORD})
# States in which complete lines from the client are interpreted.
_READING = frozenset({State.CONNECTED, State.READY, State.MAIL}) | _SASL


def _sasl_state(exchange: sasl.SaslExchange) -> State:
    """The AUTH_* state that waits for the response to ``exchange``'s challenge."""
    if exchange.mechanism is sasl.Mechanism.PLAIN:
        return State.AUTH_PLAIN
    return State.AUTH_LOGIN_USERNAME if exchange.username is None else State.AUTH_LOGIN_PASSWORD


class Frontend:
    """The SMTP dialogue with the client up to the login or the first routed recipient."""

    __slots__ = (
        "_buffer",
        "_config",
        "_errors",
        "_helo",
        "_mail",
        "_sasl_exchange",
        "_skipping",
        "_started",
        "_state",
        "_tls_active",
    )

    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._buffer = LineBuffer(MAX_CLIENT_LINE)
        self._skipping = False  # the rest of an over-long line is being dropped up to its LF
        self._state = State.CONNECTED
        self._started = False
        self._tls_active = config.tls_active
        self._errors = 0
        self._helo = b""  # the client's EHLO/HELO line
        self._mail = b""  # inbound: the client's MAIL FROM line
        self._sasl_exchange: sasl.SaslExchange | None = None  # the AUTH waiting for a response

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> list[Command]:
        """The greeting (RFC 5321 section 4.2, code 220).

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        return [Send(f"220 {self._config.server_name} ESMTP ready".encode() + CRLF)]

    def handle(self, event: Event) -> list[Command]:
        """Take one event; return what the driver must do, in order.

        Once closed, the machine ignores events still in flight (a read or a verdict that raced
        with the close). Bytes arriving between STARTTLS and the handshake are discarded.

        Raises:
            LocalProtocolError: before ``start()``, after ``Relay``, or an event this state
                cannot take (a verdict nobody asked for, a handshake nobody started).
        """
        if not self._started:
            raise LocalProtocolError("handle() before start()")
        if self._state is State.CLOSED:
            return []
        if self._state is State.RELAYING:
            raise LocalProtocolError(f"{type(event).__name__} after Relay")
        match event:
            case DataReceived(data=data):
                return self._receive(data)
            case ConnectionClosed():
                return self._close("client closed the connection")
            case TimedOut():
                # Plaintext must not go into a TLS handshake under way.
                timeout = self._closing("4.4.2", "Error: timeout exceeded")
                return self._close("timed out", None if self._state is State.STARTING_TLS else timeout)
            case TlsEstablished():
                self._expect(State.STARTING_TLS, event)
                self._tls_active = True
                self._enter(State.CONNECTED)
                return []
            case LoginAccepted(reply=reply):
                self._expect(State.AUTHENTICATING, event)
                self._enter(State.RELAYING)
                return [Send(reply), Relay(self._buffer.take_all())]
            case LoginRejected(reply=reply):
                self._expect(State.AUTHENTICATING, event)
                if reply is not None and reply.startswith(b"%d" % CLOSING_CODE):
                    # The backend's 421 (RFC 5321 section 3.8): the session ends with it, on
                    # submission as on inbound (a client-restriction 421 after XCLIENT, say).
                    return self._close("backend closed the connection", reply)
                if self._config.inbound:
                    # Stays in the transaction: the client may try other recipients. A refused
                    # recipient counts: no throttle guards the MX, max_errors bounds guessing.
                    self._enter(State.MAIL)
                    return self._refuse(REPLY_RELAY_DENIED if reply is None else reply) + self._interpret()
                # A refused login does not count (module docstring).
                self._enter(State.READY)
                return [Send(REPLY_AUTH_FAILED if reply is None else reply), *self._interpret()]
            case LoginUnavailable():
                self._expect(State.AUTHENTICATING, event)
                self._enter(State.MAIL if self._config.inbound else State.READY)
                reply = REPLY_ROUTE_UNAVAILABLE if self._config.inbound else REPLY_AUTH_UNAVAILABLE
                return [Send(reply), *self._interpret()]
            case _:
                assert_never(event)

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def _expect(self, state: State, event: Event) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{type(event).__name__} in state {self._state.name}")

    def _enter(self, state: State) -> None:
        self._state = state
        self._buffer.max_line = MAX_SASL_LINE if state in _SASL else MAX_CLIENT_LINE

    def _receive(self, data: bytes) -> list[Command]:
        if self._state is State.STARTING_TLS:
            return []  # RFC 3207 section 4.2, CVE-2014-3556: plaintext behind STARTTLS is never read
        if self._skipping:
            rest = after_line_end(data)
            if rest is None:
                return []
            self._skipping, data = False, rest
        self._buffer.feed(data)
        if self._state is State.AUTHENTICATING:
            if len(self._buffer) > MAX_HELD_BYTES:
                notice = self._closing("4.7.0", "Error: too much data before the login completed")
                return self._close("client pipelined too much data during login", notice)
            return []
        return self._interpret()

    def _interpret(self) -> list[Command]:
        """Answer every complete line, in order, while the state reads lines."""
        commands: list[Command] = []
        while self._state in _READING:
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                commands += self._too_long()
                continue
            if line is None:
                break
            commands += self._sasl(line) if self._state in _SASL else self._command(line)
        return commands

    def _too_long(self) -> list[Command]:
        """Refuse the over-long line at the head of the buffer and drop it up to its LF, now or
        (``_skipping``) as the rest arrives: memory stays bounded by one read and the limit."""
        self._skipping = drop_over_long_line(self._buffer)
        if self._state in _SASL:
            # RFC 4954 section 6: the exchange fails; the client starts again with AUTH.
            self._enter(State.READY)
            return self._refuse(REPLY_SASL_LINE_TOO_LONG)
        return self._refuse(REPLY_LINE_TOO_LONG)

    def _closing(self, enhanced: str, why: str) -> bytes:
        return _closing(enhanced, self._config.server_name, why)

    def _refuse(self, reply: bytes) -> list[Command]:
        """An error reply; the ``max_errors``-th one is followed by 421 and a close (Postfix's
        hard error limit, nginx's max_errors)."""
        self._errors += 1
        if self._errors >= self._config.max_errors:
            notice = self._closing("4.7.0", "Error: too many errors, closing connection")
            return [Send(reply), *self._close("too many errors", notice)]
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
    # Commands (RFC 5321 section 4.1.1, RFC 3207, RFC 4954)

    def _command(self, line: bytes) -> list[Command]:
        text = _command_text(line)
        if text is None or not text:
            return self._refuse(REPLY_BAD_SYNTAX)
        verb, argument = _split_command(text)
        match verb.upper():
            case "EHLO" | "HELO" as verb_name:
                return self._hello(line, verb_name, argument.strip())
            case "STARTTLS":
                return self._starttls(argument)
            case "AUTH":
                return self._auth(argument)
            case "MAIL":
                return self._mail_from(line, argument)
            case "RCPT":
                return self._rcpt_to(line, argument)
            case "DATA":
                return self._data()
            case "RSET" if not argument:
                if self._state is State.MAIL:
                    self._mail = b""
                    self._enter(State.READY)
                return [Send(REPLY_OK)]
            case "NOOP":  # RFC 5321 section 4.1.1.9: NOOP may carry a string, which is ignored
                return [Send(REPLY_OK)]
            case "QUIT" if not argument:
                return self._close("client quit", REPLY_BYE)
            case "RSET" | "QUIT":
                return self._refuse(_syntax(verb.upper()))
            case "VRFY" | "EXPN":
                return [Send(REPLY_NOT_VERIFIED)]
            case "BDAT":  # its chunk follows at once: never read it as commands (REPLY_NO_BDAT)
                return self._close("BDAT without CHUNKING", REPLY_NO_BDAT)
            case _:
                return self._refuse(REPLY_UNKNOWN)

    def _hello(self, line: bytes, verb: str, name: str) -> list[Command]:
        if not name:
            return self._refuse(_syntax(f"{verb} hostname"))
        # RFC 5321 section 4.1.4: EHLO/HELO also ends a transaction, as RSET does.
        self._helo, self._mail = line, b""
        self._enter(State.READY)
        server_name = self._config.server_name.encode()
        if verb == "HELO":
            return [Send(b"250 " + server_name + CRLF)]
        extensions: list[bytes] = []
        if self._starttls_offered():
            extensions.append(b"STARTTLS")
        if not self._config.inbound and not self._tls_required():
            extensions.append(b"AUTH " + b" ".join(sasl.MECHANISMS))
        return [Send(line) for line in _ehlo_reply(self._config.server_name, extensions)]

    def _starttls(self, argument: str) -> list[Command]:
        if argument:
            return self._refuse(_syntax("STARTTLS"))
        if self._tls_active:
            return self._refuse(REPLY_TLS_ACTIVE)
        if not self._starttls_offered():
            return self._refuse(REPLY_NOT_IMPLEMENTED)
        if self._state is State.MAIL:
            return self._refuse(REPLY_IN_TRANSACTION)
        # RFC 3207 section 4.2: forget all the client said; it must EHLO again.
        self._buffer.clear()
        self._helo, self._mail = b"", b""
        self._enter(State.STARTING_TLS)
        return [Send(REPLY_READY_FOR_TLS), StartTls()]

    def _auth(self, argument: str) -> list[Command]:
        if self._config.inbound:
            return self._refuse(REPLY_NO_AUTH_HERE)
        if self._state is State.CONNECTED:
            return self._refuse(REPLY_HELO_FIRST)
        if self._tls_required():
            return self._refuse(REPLY_TLS_REQUIRED)
        # Split at runs of spaces (the line is printable ASCII), as between verb and argument.
        match argument.split():
            case [mechanism]:
                initial = None
            case [mechanism, response]:
                initial = response.encode("ascii")
            case _:
                return self._refuse(_syntax("AUTH mechanism [initial-response]"))
        step = sasl.begin(mechanism.encode("ascii"), initial)
        if step is None:
            return self._refuse(REPLY_MECHANISM)
        return self._sasl_step(step)

    def _sasl(self, line: bytes) -> list[Command]:
        """A continuation line of an AUTH exchange (RFC 4954 section 4)."""
        exchange = self._sasl_exchange
        assert exchange is not None  # the AUTH_* states always have an exchange
        self._enter(State.READY)
        return self._sasl_step(exchange.respond(line))

    def _sasl_step(self, step: sasl.SaslStep) -> list[Command]:
        """Where the client's SASL response leads: the next challenge, a refusal, or the login."""
        match step:
            case sasl.Credentials():
                return self._authenticate(step)
            case sasl.SaslExchange():
                self._sasl_exchange = step
                self._enter(_sasl_state(step))
                return [Send(b"334 " + step.challenge + CRLF)]
            case sasl.SaslCancelled():
                # Not counted as an error, as in IMAP and POP3: the client chose to stop.
                return [Send(REPLY_CANCELLED)]
            case sasl.SaslInvalid():
                return self._refuse(REPLY_BAD_SASL)
            case sasl.SaslAuthzidRefused():
                return [Send(REPLY_AUTHZID_REFUSED)]  # a refused login: not counted
            case _:
                assert_never(step)

    def _authenticate(self, credentials: sasl.Credentials) -> list[Command]:
        # Control characters in a name would reach logs and auth_http headers; no account has
        # them. Refused like a failed login, and like one not counted.
        if not sasl.replayable(credentials):
            return [Send(REPLY_AUTH_FAILED)]
        self._enter(State.AUTHENTICATING)
        request = LoginRequest(
            protocol="submission", routing_key=credentials.username, credentials=credentials, helo=self._helo
        )
        return [Authenticate(request)]

    def _mail_from(self, line: bytes, argument: str) -> list[Command]:
        if not self._config.inbound:
            return self._refuse(REPLY_AUTH_REQUIRED)
        if self._tls_required():
            return self._refuse(REPLY_TLS_REQUIRED)
        if self._state is State.CONNECTED:
            return self._refuse(REPLY_HELO_FIRST)
        if self._state is State.MAIL:
            return self._refuse(REPLY_NESTED_MAIL)
        try:
            check_sender(argument)
        except AddressError as error:
            return self._refuse(error.reply)
        self._mail = line
        self._enter(State.MAIL)
        return [Send(REPLY_SENDER_OK)]

    def _rcpt_to(self, line: bytes, argument: str) -> list[Command]:
        if not self._config.inbound:
            return self._refuse(REPLY_AUTH_REQUIRED)
        if self._state is not State.MAIL:
            return self._refuse(REPLY_NEED_MAIL)
        try:
            recipient = recipient_of(argument)
        except AddressError as error:
            return self._refuse(error.reply)
        self._enter(State.AUTHENTICATING)
        request = LoginRequest(
            protocol="smtp", routing_key=recipient, helo=self._helo, envelope=(self._mail, line)
        )
        return [Authenticate(request)]

    def _data(self) -> list[Command]:
        if not self._config.inbound:
            return self._refuse(REPLY_AUTH_REQUIRED)
        # RFC 5321 section 3.3: DATA needs at least one accepted recipient, and the proxy
        # accepts none itself (the first routed one hands the session over to a backend).
        return self._refuse(REPLY_NO_RECIPIENTS if self._state is State.MAIL else REPLY_NEED_RCPT)


# ---------------------------------------------------------------------------------------------
# Backend login


class BackendState(Enum):
    """Which backend reply the login replay waits for."""

    GREETING = auto()  # the 220 greeting
    EHLO = auto()  # the reply to EHLO <server_name> (again after TLS)
    STARTTLS = auto()  # the reply to STARTTLS
    TLS = auto()  # StartTls emitted: the driver runs the handshake
    XCLIENT = auto()  # the reply to XCLIENT (Postfix greets afresh with 220)
    CLIENT_EHLO = auto()  # the reply to EHLO <the client's name>, after XCLIENT
    AUTH_CHALLENGE = auto()  # the 334 to AUTH PLAIN sent without initial response
    AUTH = auto()  # the verdict on AUTH PLAIN
    MAIL = auto()  # the reply to the client's MAIL FROM
    RCPT = auto()  # the reply to the client's RCPT TO, which goes to the client
    DONE = auto()  # a verdict was given


# RFC 5321 section 4.5.3.2: a client waits at least this long (seconds) for each reply, however
# long the proxy lets an idle session sit, for a backend's policy checks (RBL, greylisting,
# milters) may take that long; a timeout cut shorter turns a delivery into a retry or, after
# the body, into a duplicate (the backend queued the message, the client heard it failed).
MAIL_REPLY_TIMEOUT = 5 * 60.0  # section 4.5.3.2.2, MAIL
RCPT_REPLY_TIMEOUT = 5 * 60.0  # section 4.5.3.2.3, RCPT
FINAL_REPLY_TIMEOUT = 10 * 60.0  # section 4.5.3.2.6, DATA termination
# The envelope's replies during the backend login: RFC 5321's times, not the login budget's.
ENVELOPE_REPLY_TIMEOUTS = {BackendState.MAIL: MAIL_REPLY_TIMEOUT, BackendState.RCPT: RCPT_REPLY_TIMEOUT}

_NO_STARTTLS = "backend does not offer STARTTLS"
# RFC 5321 section 3.8: "421 Service not available, closing transmission channel".
CLOSING_CODE = 421
# Replies to XCLIENT itself that are about the proxy, not the client: 500-504 (RFC 5321 section
# 4.2.2: the command was not understood or not allowed), and Postfix's refusal of a host it does
# not trust (XCLIENT_README: "550 5.7.0 Error: insufficient authorization"; its text tells it from
# a 550 of the client restrictions, which Postfix also sends to XCLIENT). Passing these on as the
# client's reply would bounce every message over a configuration error; they are the endpoint's
# failure (451 to the client, who retries).
XCLIENT_NOT_UNDERSTOOD = frozenset({500, 501, 502, 503, 504})
XCLIENT_NOT_AUTHORIZED = b"insufficient authorization"
# Postfix refuses an XCLIENT attribute value longer than 255 characters as sent, that is xtext-encoded
# (src/smtpd/smtpd.c, xclient_cmd(): "strlen(raw_value) > 255" is checked before xtext_unquote(),
# and answered "501 5.5.4 Error: attribute value too long"), and an empty one ("501 5.5.4 Error:
# attribute=value expected"). Those 501s would read as XCLIENT not understood (an endpoint failure,
# above), so a LOGIN value is checked against this before it is sent. ADDR, PORT and NAME always
# fit, and with LOGIN within it the line stays within RFC 5321's 512 octets, as XCLIENT_README asks.
MAX_XCLIENT_VALUE = 255
# The one AUTH refusal that says the credentials are wrong (RFC 4954 section 6: 535 5.7.8
# Authentication credentials invalid). Other permanent refusals (534 mechanism too weak, 538
# encryption required, 554 ...) refuse the login for another reason.
AUTH_CREDENTIALS_INVALID = 535


def xtext(value: str) -> str:
    """RFC 3461 section 4: "+", "=" and anything outside "!".."~" become "+XX" (upper hex)."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in value
    )


def _xclient_address(client: ClientAddress) -> str | None:
    """Postfix's ADDR value (IPv6 with the "IPV6:" prefix), or None if the host is not an IP."""
    try:
        address = ipaddress.ip_address(client.host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"IPV6:{address}"
        address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
    return str(address)


def _extensions(lines: list[bytes]) -> dict[str, frozenset[str]]:
    """The EHLO keywords (RFC 5321 section 4.1.1.1) with their parameters, upper-cased."""
    extensions: dict[str, frozenset[str]] = {}
    for line in lines[1:]:
        words = line[4:].decode("ascii", "replace").upper().split()
        if words:
            extensions[words[0]] = frozenset(words[1:])
    return extensions


class MalformedReplyError(RemoteProtocolError):
    """A backend reply the proxy cannot read; the message never quotes it (a broken backend might
    echo the AUTH line)."""


class ReplyReader:
    """Cuts a backend's bytes into complete replies (RFC 5321 section 4.2.1: ``code-text`` lines
    until ``code text``, one code throughout), each line within ``MAX_REPLY_LINE`` and each reply
    within ``MAX_REPLY_LINES`` and ``MAX_REPLY_OCTETS``. Used by the backend login and by the
    inbound mediation."""

    __slots__ = ("_buffer", "_lines", "_octets")

    def __init__(self) -> None:
        self._buffer = LineBuffer(MAX_REPLY_LINE)
        self._lines: list[bytes] = []  # lines of the multi-line reply being read
        self._octets = 0  # their length

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def pop(self) -> tuple[int, list[bytes]] | None:
        """The next complete reply (its code and lines without CRLF), or None until one is.

        Raises:
            MalformedReplyError: a line too long or not a reply line, or too many lines.
        """
        while True:
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                raise MalformedReplyError("backend reply line too long") from None
            if line is None:
                return None
            code, separator = line[:3], line[3:4]
            if not (
                len(code) == 3
                and code.isdigit()
                and code[:1] in b"2345"
                and separator in (b"", b" ", b"-")
                and (not self._lines or self._lines[0][:3] == code)
            ):
                raise MalformedReplyError("backend sent a malformed reply")
            self._lines.append(line)
            self._octets += len(line)
            if len(self._lines) > MAX_REPLY_LINES or self._octets > MAX_REPLY_OCTETS:
                raise MalformedReplyError("backend reply too long")
            if separator != b"-":
                lines, self._lines, self._octets = self._lines, [], 0
                return int(code), lines

    def take_all(self) -> bytes:
        """Whatever arrived behind the last complete reply."""
        return self._buffer.take_all()

    def clear(self) -> None:
        """Forget everything not yet read (the plaintext behind a STARTTLS 220)."""
        self._buffer.clear()
        self._lines, self._octets = [], 0


class BackendLogin:
    """Replays a submission login (EHLO, STARTTLS, XCLIENT, AUTH PLAIN or XCLIENT LOGIN) or an
    inbound envelope (EHLO, STARTTLS, XCLIENT, MAIL FROM, RCPT TO) on one backend."""

    __slots__ = (
        "_config",
        "_helo_name",
        "_replies",
        "_request",
        "_state",
        "_tls",
        "_verified",
        "_xclient_login",
    )

    def __init__(self, request: LoginRequest, config: BackendConfig, *, verified: bool = False) -> None:
        """Prepare the replay of ``request``; the backend speaks first.

        Args:
            verified: an auth_http service has already accepted this submission login, so a
                backend that takes XCLIENT LOGIN from the proxy is told the user that way, with no
                AUTH (module docstring). Never for a login the backend verifies.

        Raises:
            LocalProtocolError: a submission request without credentials, an inbound one
                without its MAIL and RCPT lines or ``verified``, or lines that are not single
                printable lines.
        """
        if request.protocol == "submission" and request.credentials is None:
            raise LocalProtocolError("a submission login needs credentials")
        if verified and request.protocol != "submission":
            raise LocalProtocolError("only a submission login is verified before the backend login")
        if request.protocol == "smtp" and len(request.envelope) != 2:
            raise LocalProtocolError("an inbound SMTP login needs the MAIL FROM and RCPT TO lines")
        if request.protocol not in ("submission", "smtp"):
            raise LocalProtocolError(f"not an SMTP request: {request.protocol}")
        if any(_command_text(line) is None for line in (request.helo, *request.envelope)):
            raise LocalProtocolError("HELO and envelope lines must be printable ASCII")
        self._request = request
        self._config = config
        self._replies = ReplyReader()
        self._state = BackendState.GREETING
        self._tls = False  # the backend connection is encrypted (after STARTTLS)
        self._verified = verified
        self._xclient_login = False  # the XCLIENT sent carries LOGIN: its EHLO 250 is the login
        # The client's own name, for the EHLO after XCLIENT or behind a PROXY header (nginx
        # replays it after XCLIENT the same way).
        _, _, name = request.helo.partition(b" ")
        self._helo_name = name.strip() or config.server_name.encode()

    @property
    def state(self) -> BackendState:
        return self._state

    @property
    def reply_timeout(self) -> float | None:
        """How long the pending reply to MAIL or RCPT (inbound) is waited for, RFC 5321 section
        4.5.3.2's, in place of what is left of the login budget; None for the others."""
        return ENVELOPE_REPLY_TIMEOUTS.get(self._state)

    def handle(self, event: Event) -> list[Command]:
        """Take one event from the backend side; return the lines to send and, once, a verdict.

        After the verdict, a close or timeout that raced with it is ignored. With
        ``BackendConfig.starttls`` the machine emits ``StartTls`` before XCLIENT, AUTH or the
        envelope and goes on after ``TlsEstablished``; bytes the backend sends in between are
        dropped.

        Raises:
            LocalProtocolError: bytes after the verdict, ``TlsEstablished`` without
                ``StartTls``, or a front-end event.
        """
        match event:
            case DataReceived(data=data):
                if self._state is BackendState.DONE:
                    raise LocalProtocolError("backend data after the login verdict")
                if self._state is BackendState.TLS:
                    return []  # plaintext after the STARTTLS 220: never read (CVE-2014-3556 class)
                self._replies.feed(data)
                return self._read()
            case ConnectionClosed():
                return self._fail("backend closed the connection")
            case TimedOut():
                return self._fail("backend login timed out")
            case TlsEstablished():
                if self._state is not BackendState.TLS:
                    raise LocalProtocolError(f"TlsEstablished in state {self._state.name}")
                # RFC 3207 section 4.2: forget everything learned before TLS; EHLO again.
                self._tls = True
                return self._ehlo()
            case LoginAccepted() | LoginRejected() | LoginUnavailable():
                raise LocalProtocolError(f"{type(event).__name__} is not an event for a backend login")
            case _:
                assert_never(event)

    def _read(self) -> list[Command]:
        commands: list[Command] = []
        while self._state not in (BackendState.DONE, BackendState.TLS):
            try:
                reply = self._replies.pop()
            except MalformedReplyError as error:
                return commands + self._fail(f"{error} in state {self._state.name}")
            if reply is None:
                break
            commands += self._on_reply(*reply)
        return commands

    def _on_reply(self, code: int, lines: list[bytes]) -> list[Command]:
        reply = b"".join(line + CRLF for line in lines)
        match self._state:
            case BackendState.GREETING if code == 220:
                return self._ehlo()
            case BackendState.EHLO if code == 250 and self._config.starttls and not self._tls:
                if "STARTTLS" not in _extensions(lines):
                    return self._fail(_NO_STARTTLS)
                self._state = BackendState.STARTTLS
                return [Send(b"STARTTLS" + CRLF)]
            case BackendState.STARTTLS if code == 220:
                # Whatever followed the 220 in plaintext could be an attacker's: never read.
                self._state = BackendState.TLS
                self._replies.clear()
                return [StartTls()]
            case BackendState.STARTTLS:
                return self._fail(_NO_STARTTLS)
            case BackendState.EHLO if code == 250:
                extensions = _extensions(lines)
                xclient = self._xclient(extensions.get("XCLIENT"))
                if xclient is None:
                    return self._login(extensions)
                if self._logs_in_with_xclient(extensions):
                    login = xtext(self._credentials().username)
                    if len(login) > MAX_XCLIENT_VALUE:
                        # The service's name for the user cannot reach this backend whole: no
                        # fault of the endpoint, and no other endpoint would do better. Not AUTH
                        # PLAIN instead: this backend's SASL need not know the user (a 535 for a
                        # right password, counted by the failed-login throttle).
                        return self._verdict(LoginFailed(reply=REPLY_AUTH_UNAVAILABLE, credentials=False))
                    if login:
                        xclient += b" LOGIN=" + login.encode("ascii")
                    # An empty name (an ``Auth-User:`` without a value in the service's grant)
                    # goes without LOGIN, as nginx sends it: the client hears 235, since the
                    # service said OK, but the backend has no login for the session and treats it
                    # as an unauthenticated client at ADDR (Postfix: no permit_sasl_authenticated,
                    # so no relaying past its restrictions for strangers).
                    self._xclient_login = True
                self._state = BackendState.XCLIENT
                return [Send(xclient + CRLF)]
            case BackendState.XCLIENT if code in (220, 250):
                self._state = BackendState.CLIENT_EHLO
                return [Send(b"EHLO " + self._helo_name + CRLF)]
            case BackendState.CLIENT_EHLO if code == 250:
                return self._login(_extensions(lines))
            case BackendState.XCLIENT if code in XCLIENT_NOT_UNDERSTOOD or (
                code == 550 and XCLIENT_NOT_AUTHORIZED in reply.lower()
            ):
                return self._fail(
                    f"backend refused XCLIENT with {code} (is the proxy an authorized XCLIENT host?)"
                )
            case BackendState.XCLIENT | BackendState.CLIENT_EHLO if code >= 400:
                # The backend's verdict on the client it now sees (Postfix's client or HELO
                # restrictions): the client's reply, as a refused sender's; the endpoint is fine.
                return self._verdict(LoginFailed(reply=reply, credentials=False))
            case BackendState.AUTH_CHALLENGE if code == 334:
                self._state = BackendState.AUTH
                return [Send(self._plain_response() + CRLF)]
            case BackendState.AUTH | BackendState.AUTH_CHALLENGE:
                return self._auth_verdict(code, reply)
            case BackendState.MAIL if code == 250:
                self._state = BackendState.RCPT
                return [Send(self._request.envelope[1] + CRLF)]
            case BackendState.MAIL if code >= 500:
                # The sender refused for good: the client hears it as the answer to its RCPT.
                return self._verdict(LoginFailed(reply=reply, credentials=False))
            case BackendState.RCPT if code == CLOSING_CODE:
                # The backend is closing (RFC 5321 section 3.8): no connection to relay; the
                # front-end passes its 421 on and closes, so the client hears one 421.
                return self._verdict(LoginFailed(reply=reply, credentials=False))
            case BackendState.RCPT:
                return self._verdict(LoginSucceeded(reply=reply, buffered=self._replies.take_all()))
            case _:
                return self._fail(f"backend answered {code} in state {self._state.name}")

    def _ehlo(self) -> list[Command]:
        self._state = BackendState.EHLO
        # With a PROXY header the backend sees the real client's address, so the name goes with
        # it (as after XCLIENT); otherwise it sees the proxy's, which goes with the proxy's name.
        proxied = self._config.client_info == "proxy-v2" and self._config.client is not None
        name = self._helo_name if proxied else self._config.server_name.encode()
        return [Send(b"EHLO " + name + CRLF)]

    def _xclient(self, attributes: frozenset[str] | None) -> bytes | None:
        """``XCLIENT`` with the attributes the backend lists, when wanted and possible (no CRLF)."""
        client = self._config.client
        if self._config.client_info != "xclient" or client is None or attributes is None:
            return None
        address = _xclient_address(client)
        if address is None or "ADDR" not in attributes:
            return None
        # NAME: the proxy resolves no names; without it Postfix would keep the proxy's own.
        values = (("ADDR", address), ("PORT", str(client.port)), ("NAME", "[UNAVAILABLE]"))
        fields = " ".join(f"{name}={xtext(value)}" for name, value in values if name in attributes)
        return b"XCLIENT " + fields.encode("ascii")

    def _logs_in_with_xclient(self, extensions: dict[str, frozenset[str]]) -> bool:
        """The XCLIENT about to go out logs a verified submission in with LOGIN: the backend takes
        LOGIN there, whatever AUTH it offers too (module docstring: its SASL need not know the
        users the service grants, as behind nginx)."""
        return self._verified and "LOGIN" in extensions.get("XCLIENT", frozenset())

    def _login(self, extensions: dict[str, frozenset[str]]) -> list[Command]:
        if self._request.protocol == "smtp":
            self._state = BackendState.MAIL
            return [Send(self._request.envelope[0] + CRLF)]
        if self._xclient_login:
            # The backend took the login with XCLIENT and greeted the client's EHLO: logged in.
            return self._verdict(
                LoginSucceeded(reply=REPLY_AUTH_SUCCEEDED, buffered=self._replies.take_all())
            )
        if "PLAIN" not in extensions.get("AUTH", frozenset()):
            # Sending AUTH anyway would make a configuration problem look like a bad password.
            return self._fail("backend does not offer AUTH PLAIN")
        command = b"AUTH PLAIN " + self._plain_response()
        if len(command) <= MAX_COMMAND_LINE:
            self._state = BackendState.AUTH
            return [Send(command + CRLF)]
        # RFC 4954 section 4: an initial response that would overflow the line goes after 334.
        self._state = BackendState.AUTH_CHALLENGE
        return [Send(b"AUTH PLAIN" + CRLF)]

    def _plain_response(self) -> bytes:
        return sasl.plain_response(self._credentials())

    def _credentials(self) -> sasl.Credentials:
        credentials = self._request.credentials
        assert credentials is not None  # checked in __init__ for submission
        return credentials

    def _auth_verdict(self, code: int, reply: bytes) -> list[Command]:
        if code == 235:
            return self._verdict(LoginSucceeded(reply=reply, buffered=self._replies.take_all()))
        if code == AUTH_CREDENTIALS_INVALID:
            # The proxy's own words, as for a login no route owns: a backend's own text (Postfix's
            # "authentication failed: (reason unavailable)") would tell the two apart.
            return self._verdict(LoginFailed(reply=REPLY_AUTH_FAILED, credentials=True))
        if code >= 500:
            return self._verdict(LoginFailed(reply=reply, credentials=False))
        # 4xx (454 4.7.0 temporary authentication failure) or nonsense: another endpoint may do.
        return self._fail(f"backend answered {code} to AUTH")

    def _verdict(self, verdict: Command) -> list[Command]:
        self._state = BackendState.DONE
        return [verdict]

    def _fail(self, reason: str) -> list[Command]:
        if self._state is BackendState.DONE:
            return []
        return self._verdict(BackendFailed(reason))


# ---------------------------------------------------------------------------------------------
# Inbound mediation: after the backend login, one command at a time


@dataclass(frozen=True, slots=True)
class BackendData:
    """Mediation event: bytes arrived from the backend."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BackendClosed:
    """Mediation event: the backend closed its side or the connection broke."""


@dataclass(frozen=True, slots=True)
class SendToBackend:
    """Mediation command: write these bytes to the backend, in order (``Send`` goes to the client)."""

    data: bytes

    def __repr__(self) -> str:
        # As Send: the bytes are a client's message; a repr in a traceback shows their size only.
        return f"SendToBackend(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class AskRecipient:
    """Mediation command: ask the route's auth service where it places a later recipient of the
    login's route (auth_http picks a server per recipient); answer with ``RecipientPlaced``.
    ``request`` is the login's, with this transaction's MAIL line and this RCPT line as its
    envelope and the recipient as its routing key (Auth-SMTP-From, Auth-SMTP-To)."""

    request: LoginRequest


@dataclass(frozen=True, slots=True)
class RecipientPlaced:
    """Mediation event, the answer to ``AskRecipient``: ``here`` (this backend: the RCPT goes to
    it), ``elsewhere`` (another server: deferred as another route's recipient), ``refused``
    (``reply``, the service's refusal, or None: 550 5.7.1, as for a first recipient) or
    ``unavailable`` (the service gave no verdict: 451, as for a first recipient)."""

    where: Literal["here", "elsewhere", "refused", "unavailable"]
    reply: bytes | None = None


# What the mediation takes: the client's bytes (DataReceived), its close (ConnectionClosed), the
# driver's idle timeout (TimedOut), the backend's bytes and close, and the auth service's answer.
MediationEvent = DataReceived | ConnectionClosed | TimedOut | BackendData | BackendClosed | RecipientPlaced
MediationCommand = Send | SendToBackend | Close | AskRecipient

# RFC 5321 section 4.1.1.4: the body ends with a line holding a single ".": CRLF "." CRLF, where
# the first CRLF may be the one that ended the DATA command itself.
END_OF_DATA = CRLF + b"." + CRLF
# RFC 5321 sections 4.5.3.1.10 and 3.3: 452 to a RCPT is "too many recipients": the sender
# delivers to the recipients accepted so far and sends the others in a later transaction
# (a temporary reply: at worst at its next queue run). So a recipient of another route
# than the one this connection's backend serves is deferred, never refused: 550 would bounce it.
REPLY_OTHER_ROUTE = b"452 4.5.3 Too many recipients, send the others in another transaction" + CRLF
# RFC 3207 section 4: 454 is "TLS not available due to temporary reason". STARTTLS is offered
# only before the first routed recipient (the backend connection is set up by then).
REPLY_TLS_UNAVAILABLE = b"454 4.7.0 TLS not available now" + CRLF


class BodyStream:
    """A DATA body on its way to the backend: every line end made CRLF, and its end found.

    RFC 5321 section 2.3.8 allows CR and LF only as CRLF, but servers differ on what else ends
    a line, and so on where a body ends: Postfix before 3.9 (``smtpd_forbid_bare_newline = no``)
    ends it at ``LF . LF`` too, and behind such an end a client could make a trusting backend run
    commands the proxy never saw (SMTP smuggling, CVE-2023-51764: a forged XCLIENT, a relayed
    message). So the proxy decides alone where every line ends and sends only CRLF: a line end
    is an LF with the run of CRs before it (``CR* LF``, one line end: ``CR CR LF`` is a message
    converted to CRLF twice, and Postfix drops the CRs before an LF too), sent as CRLF; a bare
    LF thus becomes CRLF (Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``), and a CR
    that is no part of such a run becomes a space, as Postfix stores it (other servers have
    taken it for a line end: CVE-2023-51765 class). With no line end but CRLF in the stream and
    no CR elsewhere, every backend cuts the same lines as the proxy whatever it takes for a line
    end, so a body ends where the proxy's line ``.`` is (``END_OF_DATA`` in the normalised
    stream), and what follows is the proxy's to read as commands. CRs that end a chunk wait for
    the next byte (they may start a line end), so the client must send the byte after them for
    the body to go on: a client does (the CRLF's LF). At most ``MAX_HELD_CRS`` wait: the earlier
    ones of a longer run are sent as spaces. No dot-unstuffing: lines pass as they came
    otherwise. Memory is constant whatever the size of the body: the last four bytes sent and
    the count of the CRs held.
    """

    __slots__ = ("_crs", "_tail")

    def __init__(self) -> None:
        self._tail = CRLF  # the CRLF of the DATA command line: ".\r\n" alone is an empty body
        self._crs = 0  # how many CRs ended the last chunk and were not sent yet

    def feed(self, chunk: bytes) -> tuple[bytes, int | None]:
        """The body bytes to send for ``chunk`` and, once the body ended within it, how many of
        its bytes were body (the terminator included; the rest are commands), else None. Not to
        be called again once the end was found."""
        held = self._crs
        data = b"\r" * held + chunk
        self._crs = min(len(data) - len(data.rstrip(b"\r")), MAX_HELD_CRS) if data.endswith(b"\r") else 0
        if self._crs:
            data = data[: -self._crs]
        line_ends = data.count(b"\n")
        # Mail as clients send it: every CR and every LF in a CRLF (three counts in C, where the
        # rewriting below costs twice as much on a 64 KiB read): the bytes are the body as they are.
        as_sent = data.count(b"\r") == line_ends == data.count(CRLF)
        body = data if as_sent else _crlf_lines(data)
        # A terminator that begins in the tail ends within the first bytes of ``body``.
        window = self._tail + body
        at = window.find(END_OF_DATA)
        if at < 0:
            self._tail = window[-(len(END_OF_DATA) - 1) :]
            return body, None
        body = body[: at + len(END_OF_DATA) - len(self._tail)]
        if as_sent:
            return body, len(body) - held
        # Each CRLF of ``body`` stands for one LF of ``data`` (the LF of one line end): the body
        # ends behind the LF that stands for its last CRLF.
        ends = _LF.finditer(data)
        last = next(itertools.islice(ends, body.count(CRLF) - 1, None))
        return body, last.end() - held


def _crlf_lines(data: bytes) -> bytes:
    """``data`` with each line end (an LF and the run of CRs before it) made CRLF and every other
    CR a space (``BodyStream``)."""
    if b"\r\r" in data:
        # Each run of CRs before an LF goes, reversed so that the pattern starts at the LF:
        # a regular expression would try a long run of CRs once from each of them.
        data = _LF_AFTER_CRS_REVERSED.sub(b"\n", data[::-1])[::-1]
    # A CRLF is an LF; each CR left (in no line end) a space; each LF a CRLF.
    return data.replace(CRLF, b"\n").replace(b"\r", b" ").replace(b"\n", CRLF)


# RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with its CRLF; a run of CRs
# longer than a line waits no more than that at the end of a read (see ``BodyStream``).
MAX_HELD_CRS = 1000
# An LF and the run of CRs before it, in a reversed stream (see ``BodyStream``).
_LF_AFTER_CRS_REVERSED = re.compile(rb"\n\r+")
_LF = re.compile(rb"\n")


_CLIENT_ENDED = "client closed the connection"


class Expecting(Enum):
    """What the backend's next reply answers, and so what becomes of it."""

    NOTHING = auto()  # no command pending: a reply now is the backend out of step
    REPLY = auto()  # NOOP: passed on as it is
    RCPT = auto()  # passed on as it is
    MAIL = auto()  # passed on; a 250 opens a transaction
    RSET = auto()  # passed on; a 250 ends the transaction
    HELLO = auto()  # the RSET sent for EHLO: a 250 becomes the proxy's own EHLO reply
    HELO = auto()  # the RSET sent for HELO: a 250 becomes the proxy's own HELO reply
    DATA = auto()  # a 354 opens the body
    BODY = auto()  # no reply may come while the body streams
    FINAL = auto()  # the reply to the body: passed on; it ends the transaction, whatever it says
    QUIT = auto()  # passed on, then the connection ends
    PLACEMENT = auto()  # the driver asks the auth service about a recipient (``AskRecipient``)


_REPLY_TIMEOUTS = {
    Expecting.MAIL: MAIL_REPLY_TIMEOUT,
    Expecting.RCPT: RCPT_REPLY_TIMEOUT,
    Expecting.FINAL: FINAL_REPLY_TIMEOUT,
}


@dataclass(frozen=True, slots=True)
class InboundRouting:
    """How an inbound ``Mediator`` routes each later recipient: ``route`` got the backend, and
    ``route_of`` is the current table's route for a recipient (None: no route), which the driver
    answers with ``route`` for every route this backend serves alike (several domains' routes on
    one Postfix endpoint). ``ask`` is the login's request on an auth_http route, whose service
    may place each recipient on another server (``AskRecipient``)."""

    route: str
    route_of: Callable[[str], str | None]
    ask: LoginRequest | None = None


class Mediator:
    """SMTP after the backend login: the client's commands go to the backend one at a time, and
    each gets exactly the backend's one complete reply before the next is read.

    The driver creates it when the front-end emits ``Relay``: on an inbound listener with the
    ``InboundRouting`` of the first routed recipient, on a submission listener without (the
    recipients of an authenticated user are the submission server's to judge). Commands:

    - ``RCPT TO``: inbound, checked as before the login (``recipient_of``); a recipient of the
      routing's ``route`` goes to the backend, one of another route gets ``REPLY_OTHER_ROUTE``,
      an unrouted one 550 5.7.1. With ``ask``, a recipient of ``route`` inside a transaction is
      first the subject of ``AskRecipient``: placed here it goes to the backend, elsewhere it is
      deferred as another route's, refused it gets the service's refusal and unavailable 451
      4.4.1, as a first recipient would (``Frontend``); the commands behind it wait for the
      answer. Submission: checked for its form and parameters (``check_recipient``), then to
      the backend.
    - ``MAIL`` (checked as the first, ``check_sender``: only advertised parameters), ``RSET``,
      ``NOOP``, ``DATA``, ``QUIT``: to the backend, its reply to the client;
      after a 354 the body streams to the backend as it comes, its line ends made CRLF, until
      the line ``.`` (``BodyStream``), then the backend's final reply goes to the client and
      commands are read again. A ``421`` reply goes to the client and the session ends: the
      backend is closing (RFC 5321 section 3.8), and the client hears it once.
    - ``EHLO``/``HELO``: end the transaction (RFC 5321 section 4.1.4), so the backend gets
      ``RSET`` and the client the proxy's own reply, the same extensions as before minus STARTTLS:
      the backend keeps the name it was given at login (the client's, with XCLIENT or proxy-v2).
    - ``STARTTLS`` 454 (or 554 inside TLS), ``AUTH`` 503 (submission: already authenticated,
      RFC 4954 section 4), ``VRFY``/``EXPN`` 252, anything else 500, as before the login; ``BDAT`` 521
      and a close (``REPLY_NO_BDAT``). Nothing but the commands above ever reaches the backend,
      which trusts the proxy (XCLIENT from a client would otherwise forge its address or, on
      submission, its login name).

    An over-long line (``MAX_CLIENT_LINE``) is refused and skipped as before the login. Pipelined
    commands wait in the buffer behind the pending one, so replies keep their order (RFC 2920);
    ``wants_client_data`` tells the driver to stop reading while more than ``MAX_HELD_BYTES``
    wait. Refusals of the proxy's own count towards ``max_errors`` as before
    the login (the deferral of another route's recipient does not: no fault of the client's).
    The machine follows the transaction (RFC 5321 section 3.3): it is open from the start of an
    inbound mediation (the login's MAIL was accepted) and closed at the start of a submission
    (AUTH comes before MAIL), opened by a MAIL the backend accepts, and ended by the final
    reply to the body or by RSET (EHLO, HELO), so ``quiet`` holds only between transactions.
    Pure: no I/O, no clocks, no logging.
    """

    __slots__ = (
        "_body",
        "_buffer",
        "_client_ended",
        "_closed",
        "_config",
        "_deferred",
        "_errors",
        "_expecting",
        "_pending",
        "_replies",
        "_routing",
        "_sender",
        "_skipping",
    )

    def __init__(self, config: FrontendConfig, routing: InboundRouting | None) -> None:
        """``routing`` for an inbound listener's client (``config.inbound``), None for submission.

        Raises:
            LocalProtocolError: ``routing`` given for a submission listener, or none for an
                inbound one.
        """
        if config.inbound != (routing is not None):
            raise LocalProtocolError("inbound mediation needs InboundRouting, submission none")
        self._config = config
        self._routing = routing
        self._buffer = LineBuffer(MAX_CLIENT_LINE)
        self._skipping = False  # the rest of an over-long line is being dropped up to its LF
        self._replies = ReplyReader()
        self._expecting = Expecting.NOTHING
        self._body: BodyStream | None = None  # while the body streams
        self._errors = 0
        self._deferred = 0  # recipients of other routes answered with REPLY_OTHER_ROUTE
        self._client_ended = False  # EOF from the client: answer what it sent, then close
        self._closed = False
        # The MAIL line of the open transaction (inbound, from the start the login's, which the
        # backend accepted; b"" when nobody asks about recipients), or None between transactions.
        self._sender: bytes | None = None
        if routing is not None:
            self._sender = b"" if routing.ask is None else routing.ask.envelope[0]
        self._pending = b""  # the MAIL line at the backend, or the RCPT line at the auth service

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def deferred(self) -> int:
        """How many recipients of other routes were deferred (for the session line)."""
        return self._deferred

    @property
    def streaming_body(self) -> bool:
        """Whether the client's bytes are a DATA body now: they go on as they come, unbuffered."""
        return self._body is not None

    @property
    def wants_client_data(self) -> bool:
        """Whether the driver should read the client now: not while too much waits unread."""
        if self._closed or self._client_ended:
            return False
        return self.streaming_body or len(self._buffer) <= MAX_HELD_BYTES

    @property
    def reply_timeout(self) -> float | None:
        """The least time the backend's pending reply is waited for whatever the idle timeout
        (RFC 5321 section 4.5.3.2's for MAIL, RCPT and the end of the body), or None."""
        return _REPLY_TIMEOUTS.get(self._expecting)

    @property
    def quiet(self) -> bool:
        """Between transactions and commands, nothing half-said: a closing line now interrupts
        nothing (RFC 5321 section 3.3: a transaction in progress completes first)."""
        return (
            not self._closed
            and self._sender is None
            and self._expecting is Expecting.NOTHING
            and not len(self._buffer)
        )

    def start(self, client: bytes, backend: bytes) -> list[MediationCommand]:
        """Take what each side sent behind the login (the client's pipelined commands)."""
        return self.handle(BackendData(backend)) + self.handle(DataReceived(client))

    def handle(self, event: MediationEvent) -> list[MediationCommand]:
        """Take one event; return what the driver must do, in order. Once closed, nothing.

        Raises:
            LocalProtocolError: ``RecipientPlaced`` without ``AskRecipient``.
        """
        if self._closed:
            return []
        match event:
            case RecipientPlaced():
                return self._placed(event)
            case DataReceived(data=data):
                return self._from_client(data)
            case BackendData(data=data):
                self._replies.feed(data)
                return self._from_backend()
            case ConnectionClosed():
                # A client may half-close behind its last commands (".", QUIT): they still get
                # their replies, above all the final reply to DATA, or it would send the message
                # again. A body cut short is no message: the backend drops it when we close
                # (one whose 354 is still to come, once that comes: see ``_on_reply``).
                self._client_ended = True
                return self._close(_CLIENT_ENDED) if self._body is not None else self._interpret()
            case BackendClosed():
                return self._close("backend closed the connection", "4.4.2", "Error: backend went away")
            case TimedOut():
                return self._close("idle timeout", "4.4.2", "Error: timeout exceeded")
            case _:
                assert_never(event)

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def _close(self, reason: str, enhanced: str = "", why: str = "") -> list[MediationCommand]:
        self._closed = True
        notice = [Send(_closing(enhanced, self._config.server_name, why))] if why else []
        return [*notice, Close(reason)]

    def _refuse(self, reply: bytes) -> list[MediationCommand]:
        """As the front-end: the ``max_errors``-th refusal is followed by 421 and a close."""
        self._errors += 1
        if self._errors >= self._config.max_errors:
            return [
                Send(reply),
                *self._close("too many errors", "4.7.0", "Error: too many errors, closing connection"),
            ]
        return [Send(reply)]

    def _forward(self, line: bytes, expecting: Expecting) -> list[MediationCommand]:
        self._expecting = expecting
        return [SendToBackend(line + CRLF)]

    def _from_client(self, data: bytes) -> list[MediationCommand]:
        if self._body is None:
            if self._skipping:
                rest = after_line_end(data)
                if rest is None:
                    return []
                self._skipping, data = False, rest
            self._buffer.feed(data)
            return self._interpret()
        body, end = self._body.feed(data)
        sends: list[MediationCommand] = [SendToBackend(body)] if body else []
        if end is None:
            return sends
        # The final reply comes next; whatever the client pipelined behind the body waits for it.
        self._body = None
        self._expecting = Expecting.FINAL
        self._buffer.feed(data[end:])
        return sends

    def _from_backend(self) -> list[MediationCommand]:
        commands: list[MediationCommand] = []
        while not self._closed:
            try:
                reply = self._replies.pop()
            except MalformedReplyError as error:
                return commands + self._close(str(error), "4.4.2", "Error: backend failed")
            if reply is None:
                break
            commands += self._on_reply(*reply)
        return commands

    def _on_reply(self, code: int, lines: list[bytes]) -> list[MediationCommand]:
        reply = b"".join(line + CRLF for line in lines)
        expecting, self._expecting = self._expecting, Expecting.NOTHING
        match expecting:
            case Expecting.NOTHING | Expecting.BODY | Expecting.PLACEMENT if code == 421:
                # The backend is closing unasked (Postfix's smtpd_timeout, RFC 5321 section
                # 3.8): its own 421 says why, and is the client's only one.
                return [Send(reply), *self._close("backend closed the connection")]
            case Expecting.NOTHING | Expecting.BODY | Expecting.PLACEMENT:
                # A reply nobody asked for (a backend that took the body's end elsewhere than
                # the proxy): the two no longer agree; end it.
                return self._close("backend replied out of turn", "4.4.2", "Error: backend out of step")
            case Expecting.HELLO if code == 250:
                self._sender = None
                reply = b"".join(_ehlo_reply(self._config.server_name, []))
            case Expecting.HELO if code == 250:
                self._sender = None
                reply = b"250 " + self._config.server_name.encode() + CRLF
            case Expecting.MAIL if code == 250:
                self._sender = self._pending
            case Expecting.RSET if code == 250:
                self._sender = None
            case Expecting.FINAL if code != 421:
                self._sender = None
            case Expecting.DATA if code == 354:
                self._body = BodyStream()
                self._expecting = Expecting.BODY
                # Bytes the client sent behind DATA before the 354 are the body's beginning.
                body = self._from_client(self._buffer.take_all())
                if self._client_ended and self._body is not None:
                    # The client left before the body's end: a body cut short is no message,
                    # and none of it is sent; the backend drops the transaction when we close.
                    return [Send(reply), *self._close(_CLIENT_ENDED)]
                return [Send(reply), *body]
            case Expecting.QUIT:
                return [Send(reply), *self._close("client quit")]
            case _ if code == 421:
                # The backend is closing (RFC 5321 section 3.8): its own 421 is the client's only one.
                return [Send(reply), *self._close("backend closed the connection")]
        return [Send(reply), *self._interpret()]

    def _interpret(self) -> list[MediationCommand]:
        """Answer complete lines, in order, while no command is pending at the backend."""
        commands: list[MediationCommand] = []
        while not self._closed and self._expecting is Expecting.NOTHING:
            try:
                line = self._buffer.pop_line()
            except LineTooLongError:
                # As before the login: refused, dropped up to its LF, and the session goes on.
                self._skipping = drop_over_long_line(self._buffer)
                commands += self._refuse(REPLY_LINE_TOO_LONG)
                continue
            if line is None:
                if self._client_ended:  # all it sent is answered
                    commands += self._close(_CLIENT_ENDED)
                break
            commands += self._command(line)
        return commands

    # -----------------------------------------------------------------------------------------
    # Commands

    def _command(self, line: bytes) -> list[MediationCommand]:
        text = _command_text(line)
        if not text:
            return self._refuse(REPLY_BAD_SYNTAX)
        verb, argument = _split_command(text)
        match verb.upper():
            case "RCPT":
                return self._rcpt_to(line, argument)
            case "MAIL":
                return self._mail_from(line, argument)
            case "RSET":
                return self._forward(line, Expecting.RSET)
            case "NOOP":
                return self._forward(line, Expecting.REPLY)
            case "DATA":
                return self._forward(line, Expecting.DATA)
            case "QUIT":
                return self._forward(line, Expecting.QUIT)
            case "EHLO" | "HELO" as verb_name:
                if not argument.strip():
                    return self._refuse(_syntax(f"{verb_name} hostname"))
                return self._forward(b"RSET", Expecting.HELLO if verb_name == "EHLO" else Expecting.HELO)
            case "STARTTLS":
                return [Send(REPLY_TLS_ACTIVE if self._config.tls_active else REPLY_TLS_UNAVAILABLE)]
            case "AUTH":
                return self._refuse(REPLY_NO_AUTH_HERE if self._routing else REPLY_ALREADY_AUTHENTICATED)
            case "VRFY" | "EXPN":
                return [Send(REPLY_NOT_VERIFIED)]
            case "BDAT":
                return [Send(REPLY_NO_BDAT), *self._close("BDAT without CHUNKING")]
            case _:
                return self._refuse(REPLY_UNKNOWN)

    def _mail_from(self, line: bytes, argument: str) -> list[MediationCommand]:
        # The same checks as the first MAIL: only the parameters the proxy advertised pass.
        try:
            check_sender(argument, submission=self._routing is None)
        except AddressError as error:
            return self._refuse(error.reply)
        self._pending = line  # the sender, once the backend accepts it
        return self._forward(line, Expecting.MAIL)

    def _rcpt_to(self, line: bytes, argument: str) -> list[MediationCommand]:
        routing = self._routing
        try:
            if routing is None:
                check_recipient(argument)
                return self._forward(line, Expecting.RCPT)
            recipient = recipient_of(argument)
        except AddressError as error:
            return self._refuse(error.reply)
        route = routing.route_of(recipient)
        if route is None:
            return self._refuse(REPLY_RELAY_DENIED)
        if route != routing.route:
            return self._defer()
        if routing.ask is None or self._sender is None:
            # Outside a transaction the backend answers 503 itself: nothing to ask about.
            return self._forward(line, Expecting.RCPT)
        self._expecting, self._pending = Expecting.PLACEMENT, line
        envelope = (self._sender, line)
        return [AskRecipient(replace(routing.ask, routing_key=recipient, envelope=envelope))]

    def _defer(self) -> list[MediationCommand]:
        self._deferred += 1
        return [Send(REPLY_OTHER_ROUTE)]

    def _placed(self, placed: RecipientPlaced) -> list[MediationCommand]:
        if self._expecting is not Expecting.PLACEMENT:
            raise LocalProtocolError("RecipientPlaced without AskRecipient")
        self._expecting = Expecting.NOTHING
        match placed.where:
            case "here":
                return self._forward(self._pending, Expecting.RCPT)
            case "elsewhere":
                commands = self._defer()
            case "refused":
                # As the front-end's refused first recipient: it counts towards max_errors.
                commands = self._refuse(REPLY_RELAY_DENIED if placed.reply is None else placed.reply)
            case "unavailable":
                commands = [Send(REPLY_ROUTE_UNAVAILABLE)]
            case _:
                assert_never(placed.where)
        return commands + self._interpret()
