"""Drive one client connection: PROXY header, TLS, the protocol front-end, then the relay.

The listener hands over an accepted, non-blocking socket. A listener that trusts a load balancer
first reads its PROXY header (only trusted peers may connect there); an implicit-TLS listener
runs the handshake. Then the session feeds the client's bytes to the protocol's ``Frontend``
machine and carries out its commands: replies go to the client, ``StartTls`` upgrades the
channel, ``Authenticate`` goes to ``backends.login``, ``Relay`` hands both sides to ``relay`` (an
SMTP session, inbound or submission, to ``mediation``, which keeps reading its commands).
Everything before login is bounded by one deadline: reads, writes and TLS handshakes alike, so
neither a slow client nor one that never reads its replies can hold a socket open past it (the
backend login's time is added to it). A read reaches the machine ``FEED_SIZE`` octets at a
time, each slice's replies sent before the next is fed, so what a client that pipelines and never
reads makes the session hold is bounded by a slice, not by the read. The shared ``limits`` refuse
a client address over its connection limit (once a trusted PROXY header has named the real one)
and logins locked by failed attempts (each counted from when it is asked, so logins in flight at
once see each other), and hold back the refusal of each further failure; every
login refusal, routed or not, is answered no sooner than ``refusalTime`` after the login was
asked. When the proxy drains (drain.py) and the session's turn comes, a client still logging in
gets the protocol's closing line the next time the session waits for it, and a relayed one at
the relay's next quiet moment. Exactly one INFO line per session is logged when it ends; it names the user
but never a password.
"""

import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from proxy import table
from proxy.protocols import events, imap, pop3, proxyheader, smtp
from proxy.server import backends, drain, limits, mediation, relay
from proxy.server.certificates import CertificateStore
from proxy.server.channel import SocketChannel, TransportChannel, as_transport
from proxy.server.context import ProxyContext
from proxy.server.poller import Poller
from proxy.settings import ListenerSettings

log = logging.getLogger("mailgress.session")

FRONTENDS: dict[table.Protocol, Callable[[events.FrontendConfig], events.FrontendMachine]] = {
    "imap": imap.Frontend,
    "pop3": pop3.Frontend,
    "submission": smtp.Frontend,
    "smtp": smtp.Frontend,
}
# How a lock's scope is named in log lines.
LOCKED_SUBJECT: dict[limits.Scope, str] = {"ip": "client address", "user": "user"}
# The login outcomes the client gets as a refusal of its login, each held until refusalTime after
# the login was asked; a temporary failure (unavailable, throttled) says nothing about the user.
REFUSALS: frozenset[backends.Outcome] = frozenset({"rejected", "refused", "no_route"})
# After the pre-login deadline the client gets the protocol's timeout reply (* BYE, -ERR, 421)
# if it takes it within this many seconds; one that reads nothing gets nothing, and the session
# ends. Short: the reply is one line into the socket's buffer, which only a client that stopped
# reading keeps full, and its connection slot is held until then.
TIMED_OUT_REPLY_GRACE = 1.0
# The most of one read fed to the front-end machine at once. The replies to a slice go out
# before the next is fed, so what a client makes the session hold before login is bounded by
# this, not by the read: a client that pipelines cheap commands (IMAP CAPABILITY, POP3 CAPA,
# SMTP EHLO) and reads none of the replies waits in a send with the replies to one slice queued,
# at most about 12 KiB (POP3 CAPA asks the most per octet, 22 to 1), not the replies to a whole
# read (a megabyte and more from 16 KiB). A normal read (a few short lines) is one slice: no
# extra call. nginx reads a client into one page (IMAP, SMTP) or 128 octets (POP3), and reads
# no more until its replies are sent.
FEED_SIZE = 512
# The session line's outcome when the pre-login deadline ended the dialogue, in place of the
# machine's reason ("idle timeout", "timed out"), which would read like the relay's idle timeout.
PRE_LOGIN_TIMED_OUT = "timed out before login"
# The most an inbound login's MAIL and RCPT replies may take beyond backendLogin (RFC 5321
# section 4.5.3.2; backends._Envelope): the pre-login deadline waits for them too.
ENVELOPE_ALLOWANCE = smtp.MAIL_REPLY_TIMEOUT + smtp.RCPT_REPLY_TIMEOUT
STARTTLS_POLICY = {
    ("starttls", True): events.StartTlsPolicy.REQUIRED,
    ("starttls", False): events.StartTlsPolicy.ON,
}


@dataclass(frozen=True, slots=True)
class Listener:
    """A listener's settings and, for TLS listeners, its live certificates."""

    settings: ListenerSettings
    certificates: CertificateStore | None = None


@dataclass(slots=True)
class SessionRecord:
    """What the closing log line reports."""

    protocol: str
    client: str
    user: str = "-"
    route: str = "-"
    backend: str = "-"
    # The verdict on the session's last login attempt (a logins_total outcome), or "-": the
    # outcome field says how the session ended, which is later and often the client's doing.
    login: str = "-"
    outcome: str = "closed"
    upstream_bytes: int = 0
    downstream_bytes: int = 0
    # Seconds refusals were actually held back: the failed-login throttle's delay, and the hold up
    # to limits.failedLogins.refusalTime after the login was asked.
    held_back: float = 0.0


@dataclass(frozen=True, slots=True)
class Handover:
    """What the relay needs once the client logged in: the backend and the bytes in flight."""

    login: backends.LoginOutcome
    buffered: bytes  # client bytes that followed its login command
    # Inbound SMTP: the login's request (no credentials), its attempt number and the client's
    # address, for the auth service of an auth_http route, asked about each later recipient too.
    request: events.LoginRequest | None
    attempt: int
    client: events.ClientAddress


class SessionEnded(Exception):
    """The session ends before the front-end ran (untrusted peer, bad PROXY header, TLS failure)."""

    def __init__(self, outcome: str, refusal: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.refusal = refusal  # the refusals metric's reason label


def _address(sock: socket.socket, *, peer: bool) -> events.ClientAddress:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:  # the client is already gone
        return events.ClientAddress(host="0.0.0.0", port=0)
    return events.ClientAddress(host=str(address[0]), port=int(address[1]))


async def serve(
    context: ProxyContext, listener: Listener, client: socket.socket, draining: drain.Drain
) -> None:
    """Run one client session to its end, in ``draining``; never raises except on cancellation."""
    settings = listener.settings
    turn = draining.join(settings.protocol)
    peer = _address(client, peer=True)
    record = SessionRecord(protocol=settings.protocol, client=f"{peer.host}:{peer.port}")
    metrics = context.metrics
    context.labelled(metrics.connections, settings.name, settings.protocol).inc()
    active = context.labelled(metrics.sessions_active, settings.protocol)
    active.inc()
    started = time.monotonic()
    channel: SocketChannel | TransportChannel = SocketChannel(client)
    counted: str | None = None  # the address holding a connection slot
    try:
        deadline = asyncio.get_running_loop().time() + context.settings.timeouts.pre_login
        async with asyncio.timeout_at(deadline):
            peer, local = await _real_addresses(listener, client, peer, record)
            if not context.limits.connections.acquire(peer.host):
                _refuse_connection(settings, client, context.settings.server_name)
                raise SessionEnded("refused: too many connections from this address", "connection_limit")
            counted = peer.host
            if settings.tls == "implicit":
                assert listener.certificates is not None
                channel = await _handshake(channel, listener.certificates.context)
        handover = await _converse(
            context,
            listener,
            channel=channel,
            peer=peer,
            local=local,
            deadline=deadline,
            record=record,
            turn=turn,
        )
        # Relayed from here, once the login dialogue's frame (its machine, the login request and
        # so the client's credentials) is gone: nothing keeps them alive for the session.
        if handover is not None:
            await _relay(context, settings, channel=channel, handover=handover, record=record, turn=turn)
    except asyncio.CancelledError:
        record.outcome = "closed: the proxy is stopping"
        turn.outcome = drain.CUT_AT_DEADLINE
        raise
    except SessionEnded as ended:
        record.outcome = ended.outcome
        context.labelled(metrics.refusals, ended.refusal).inc()
    except TimeoutError:
        record.outcome = "timed out before the dialogue began"
        context.labelled(metrics.refusals, "pre_login_timeout").inc()
    except (OSError, ssl.SSLError) as error:
        record.outcome = f"connection error ({getattr(error, 'strerror', None) or type(error).__name__})"
    except Exception as error:
        # A bug of ours: close this session, keep serving the others, and leave a trace for the
        # operator. Machine events and commands redact credentials, so the traceback holds none.
        record.outcome = f"internal error ({type(error).__name__})"
        log.error("session from %s failed unexpectedly", record.client, exc_info=True)
    finally:
        channel.close()
        if counted is not None:
            context.limits.connections.release(counted)
        active.dec()
        draining.leave(turn)
        log.info(
            "session protocol=%s client=%s user=%s route=%s backend=%s login=%s outcome=%s "
            "bytes_up=%d bytes_down=%d duration=%.3fs held_back=%gs",
            record.protocol,
            record.client,
            record.user,
            record.route,
            record.backend,
            record.login,
            record.outcome,
            record.upstream_bytes,
            record.downstream_bytes,
            time.monotonic() - started,
            record.held_back,
        )


def _as_field(value: str) -> str:
    """A client's word as one field of the session line: as it is when it is one plain token,
    else a JSON string, so a user name holding spaces or ``key=value`` cannot pass for more
    fields (control characters never get this far: the machines refuse them)."""
    if value.isprintable() and _PLAIN_FIELD.fullmatch(value):
        return value
    # Anything the machines let through that is not printable (they refuse it: sasl.printable)
    # is escaped, so no line separator or terminal control ever reaches the log as itself.
    return json.dumps(value, ensure_ascii=not value.isprintable())


# One regular expression rather than a test per character: it runs for every session's line.
_PLAIN_FIELD = re.compile(r'[^\s"=\\]+')


def _refuse_connection(settings: ListenerSettings, client: socket.socket, server_name: str) -> None:
    """Say why before closing, where the client expects plaintext first."""
    if settings.tls == "implicit":
        # A TLS handshake just to say no would spend the CPU the limit is there to save: a
        # plain close, which clients take as a failed connection and retry later.
        return
    # One short line into an empty send buffer; a client that cannot take it is not waited for.
    with contextlib.suppress(OSError):
        client.send(limits.connection_refusal(settings.protocol, server_name))


async def _handshake(channel: SocketChannel | TransportChannel, context: ssl.SSLContext) -> TransportChannel:
    assert isinstance(channel, SocketChannel)
    try:
        return await TransportChannel.from_socket(channel.detach(), context)
    except (ssl.SSLError, ConnectionError) as error:
        raise _handshake_failed(error) from error


def _handshake_failed(error: BaseException, when: str = "") -> SessionEnded:
    """Implicit TLS and STARTTLS alike: one outcome and one refusal reason for a failed handshake."""
    return SessionEnded(f"TLS handshake failed ({type(error).__name__}){when}", "tls_handshake")


async def _wait_readable(client: socket.socket) -> None:
    """Until the client has bytes (or an error) for us, watched on the loop's own epoll."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():  # level-triggered: it may fire again before we stop watching
            readable.set_result(None)

    poller = Poller.acquire(loop)
    descriptor = client.fileno()
    poller.add_reader(descriptor, wake)
    try:
        await readable
    finally:
        poller.remove_reader(descriptor)  # on success, timeout and cancellation alike
        poller.release()


async def _read_proxy_header(client: socket.socket) -> proxyheader.ProxyHeader:
    """Read the PROXY header and not one byte past it: what follows (the client's first command,
    a TLS hello) is the session's. Mail is server-speaks-first, so nothing may wait for bytes the
    client would send only after our greeting: the shortest v1 header (``PROXY UNKNOWN``) is 15.

    The bytes are peeked (up to nginx's 4096, proxyheader.MAX_V2_LENGTH), which tells v1 from
    v2 and where the header ends; then exactly the header's bytes are taken. Peeked bytes of a
    header not yet complete are all its own, so they are taken too and the next peek waits for
    more.
    """
    data = b""
    while True:
        try:
            peeked = client.recv(proxyheader.MAX_V2_LENGTH - len(data), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _wait_readable(client)
            continue
        if not peeked:
            raise SessionEnded("closed while sending its PROXY header", "proxy_header")
        try:
            header = proxyheader.parse(data + peeked)
        except proxyheader.ProxyHeaderError as error:
            raise SessionEnded(f"bad PROXY header ({error})", "proxy_header") from error
        data += client.recv(len(peeked) if header is None else header.length - len(data))
        if header is not None and len(data) == header.length:
            return header


async def _real_addresses(
    listener: Listener, client: socket.socket, peer: events.ClientAddress, record: SessionRecord
) -> tuple[events.ClientAddress, events.ClientAddress]:
    """The client's and the proxy's address, as a trusted PROXY header states them."""
    local = _address(client, peer=False)
    trusted = listener.settings.proxy_protocol_from
    if not trusted:
        return peer, local
    try:
        peer_ip = ipaddress.ip_address(peer.host)
    except ValueError:
        peer_ip = None
    if peer_ip is None or not any(peer_ip in network for network in trusted):
        # Only the load balancer may speak here: anyone else could forge the client address.
        raise SessionEnded("refused: not a trusted PROXY protocol peer", "proxy_untrusted")
    header = await _read_proxy_header(client)
    if header.source is None:  # LOCAL / UNKNOWN: the balancer's own health check
        return peer, local
    real = events.ClientAddress(*header.source)
    record.client = f"{real.host}:{real.port} via {peer.host}:{peer.port}"
    destination = events.ClientAddress(*header.destination) if header.destination else local
    return real, destination


async def _converse(
    context: ProxyContext,
    listener: Listener,
    *,
    channel: SocketChannel | TransportChannel,
    peer: events.ClientAddress,
    local: events.ClientAddress,
    deadline: float,
    record: SessionRecord,
    turn: drain.Turn,
) -> Handover | None:
    """The login dialogue: the handover to the relay once the client logged in, else None."""
    settings = context.settings
    listener_settings = listener.settings
    frontend = FRONTENDS[listener_settings.protocol](
        events.FrontendConfig(
            server_name=settings.server_name,
            starttls=STARTTLS_POLICY.get(
                (listener_settings.tls, listener_settings.starttls_required), events.StartTlsPolicy.OFF
            ),
            tls_active=listener_settings.tls == "implicit",
            inbound=listener_settings.protocol == "smtp",
            max_errors=settings.max_errors,
        )
    )
    pending: collections.deque[events.Command] = collections.deque(frontend.start())
    login: backends.LoginOutcome | None = None
    attempts = 0  # logins tried on this connection (auth_http's Auth-Login-Attempt)
    loop = asyncio.get_running_loop()
    limit = deadline  # when the scope below ends: the deadline, then the timeout reply's grace
    extension_left = context.settings.timeouts.backend_login  # what backend time may add to it
    timed_out = False
    sending = False  # a reply is on its way out: a deadline now would cut it short
    handshaking = False  # the STARTTLS handshake is under way
    unfed = b""  # the rest of the last read: fed FEED_SIZE at a time, each after the replies
    try:
        while True:
            # One scope bounds the whole dialogue (reads, writes, the STARTTLS handshake), not
            # one per call: a timer per send would cost every reply, and a client that never
            # reads would otherwise hold the session (and its connection slot) in a send.
            scope = asyncio.timeout_at(limit)

            # A turn that comes while the session waits for the client ends the wait at once, as
            # the deadline would; elsewhere the session looks for it at its next safe point.
            def end_wait(scope: asyncio.Timeout = scope) -> None:
                scope.reschedule(loop.time())

            try:
                async with scope:
                    while True:
                        while pending:
                            match pending.popleft():
                                case events.Send(data=data):
                                    sending = True
                                    await channel.send(data)
                                    sending = False
                                case events.Close(reason=reason):
                                    if not timed_out:
                                        record.outcome = reason
                                    elif handshaking:
                                        record.outcome = f"{PRE_LOGIN_TIMED_OUT}, in the STARTTLS handshake"
                                    else:
                                        record.outcome = PRE_LOGIN_TIMED_OUT
                                    return None
                                case events.Authenticate(request=request):
                                    attempts += 1
                                    # The backend login has its own budget (backendLogin,
                                    # all endpoints together). The time the auth service and
                                    # the backends take (and the refusal-time hold, which
                                    # stands for it) is not the client's: the deadline moves
                                    # on by it (up to one backendLogin in all), so a temporary
                                    # failure leaves the client the time it had to retry. Only
                                    # the failed-login delay counts against it (_authenticate);
                                    # the reply is bounded again. Never disarmed: a login that
                                    # starts with no allowance left (a LOGIN pipelined behind the
                                    # one that used it) is ended by the deadline like anything else.
                                    # An inbound envelope's replies have RFC 5321's times on top
                                    # (backends._Envelope): the backend's, not the client's.
                                    envelope = ENVELOPE_ALLOWANCE if request.protocol == "smtp" else 0.0
                                    scope.reschedule(limit + extension_left + envelope)
                                    verdict, login = await _authenticate(
                                        context,
                                        request,
                                        peer=peer,
                                        local=local,
                                        deadline=deadline,
                                        record=record,
                                        attempt=attempts,
                                        client_tls=channel.tls,
                                    )
                                    if login is not None:
                                        # At most one backendLogin over the session: a client
                                        # retrying while every backend hangs still runs out of
                                        # pre-login time (nginx closes after a backend failure).
                                        extension = min(
                                            max(0.0, login.waited - login.envelope_waited), extension_left
                                        )
                                        extension_left -= extension
                                        deadline += extension + login.envelope_waited
                                        limit += extension + login.envelope_waited
                                    scope.reschedule(limit)
                                    pending.extend(frontend.handle(verdict))
                                case events.Relay(buffered=buffered):
                                    assert login is not None and login.backend is not None
                                    # What the machine held after the login command, then the
                                    # rest of the read it was in: the client's pipelined
                                    # commands for the backend, in the order they came.
                                    inbound = listener_settings.protocol == "smtp"
                                    handover = Handover(
                                        login,
                                        buffered + unfed,
                                        request if inbound else None,
                                        attempts,
                                        peer,
                                    )
                                    login = None  # the relay's to close
                                    return handover
                                case events.StartTls():
                                    # Machines ask only on plaintext listeners that offer STARTTLS.
                                    assert listener.certificates is not None and isinstance(
                                        channel, SocketChannel
                                    )
                                    # What followed STARTTLS in its read came in plaintext before
                                    # the handshake: never fed, least of all as if it came over
                                    # TLS (CVE-2011-0411; the machine drops its own share too).
                                    unfed = b""
                                    handshaking = True
                                    try:
                                        await channel.start_tls(
                                            listener.certificates.context,
                                            server_side=True,
                                            server_hostname=None,
                                        )
                                    except (ssl.SSLError, ConnectionError) as error:
                                        raise _handshake_failed(error, " after STARTTLS") from error
                                    handshaking = False
                                    pending.extend(frontend.handle(events.TlsEstablished()))
                                case other:
                                    raise AssertionError(f"front-end emitted {other!r}")
                        if turn.due:
                            break
                        if not unfed:
                            turn.on_due = end_wait
                            try:
                                unfed = await channel.recv()
                            finally:
                                turn.on_due = None
                            if not unfed:
                                pending.extend(frontend.handle(events.ConnectionClosed()))
                                continue
                        # A slice of a whole read is the read itself: no copy for a normal one.
                        data, unfed = unfed[:FEED_SIZE], unfed[FEED_SIZE:]
                        pending.extend(frontend.handle(events.DataReceived(data)))
            except TimeoutError:
                if not scope.expired():
                    raise  # the system's (a send or read that timed out), not our deadline
                if timed_out:  # the grace is over too: a client that reads nothing gets nothing
                    record.outcome = "timed out before login; the client read no timeout reply"
                    return None
                if not turn.due:
                    timed_out = True
                    context.labelled(context.metrics.refusals, "pre_login_timeout").inc()
                    if sending:  # a closing line now would land in the middle of the cut reply
                        record.outcome = "timed out before login; the client stopped reading"
                        return None
                    pending.extend(frontend.handle(events.TimedOut()))
                    limit = loop.time() + TIMED_OUT_REPLY_GRACE
                    continue
            # The turn has come. Every reply of the machine has gone out (unless the deadline cut
            # one short) and no TLS handshake is under way, so the line follows a complete reply;
            # a command the client has only half sent is dropped, as at the pre-login deadline
            # (nothing before login is worth keeping).
            record.outcome = "closed before login: the proxy is draining"
            turn.outcome = drain.CLOSED_BEFORE_LOGIN
            if not sending:
                with contextlib.suppress(TimeoutError):  # a client that reads nothing gets nothing
                    async with asyncio.timeout_at(deadline):
                        await channel.send(turn.closing)
            return None
    finally:
        if login is not None and login.backend is not None:
            login.backend.close()  # the login dialogue ended without handing it to the relay


async def _authenticate(
    context: ProxyContext,
    request: events.LoginRequest,
    *,
    peer: events.ClientAddress,
    local: events.ClientAddress,
    deadline: float,
    record: SessionRecord,
    attempt: int,
    client_tls: ssl.SSLObject | None,
) -> tuple[
    events.LoginAccepted | events.LoginRejected | events.LoginUnavailable, backends.LoginOutcome | None
]:
    """Route and log in within the failed-login limits: the verdict for the front-end, and the
    login (None when a lock refused it before any backend was asked)."""
    record.user = _as_field(request.routing_key)
    metrics, throttle, clock = context.metrics, context.limits.logins, context.limits.clock
    # Inbound MX routes a recipient and tries no password: max_errors bounds its guessing.
    guarded = request.credentials is not None
    # Counted from here, before anyone is asked: logins in flight at once (one guesser's parallel
    # connections) must see each other at the lock check, not only each other's verdicts (review
    # Q1). Nothing is awaited between the check and the count.
    counted = throttle.begin(peer.host, request.routing_key, clock()) if guarded else None
    loop = asyncio.get_running_loop()
    ticket: int | None = None  # the login's place among the logins that waited, once it waits
    while isinstance(counted, limits.Lock) and counted.until is None:
        # The limit is made up by logins still in flight (an office behind one address, a mail
        # client's parallel connections): wait for one of their verdicts and look again, within
        # the pre-login deadline. Refusing now would refuse right passwords nobody has failed
        # (review Q2), and waiting lets no more guesses reach a backend than the limit.
        lock, room = counted, loop.create_future()
        wake = functools.partial(_wake, room)
        ticket = throttle.wait_for_room(lock, peer.host, request.routing_key, wake, ticket=ticket)
        try:
            await room
        except BaseException:
            if room.done() and not room.cancelled():
                # Woken, then cut (the deadline, the proxy stopping): the wake-up goes on.
                throttle.after_wait(lock, peer.host, request.routing_key, clock(), ticket)
            raise
        counted = throttle.begin(peer.host, request.routing_key, clock(), ticket=ticket, woken=lock.scope)
        # Begun, refused by a lock with an end, or waiting again: the next waiter's turn if
        # there is room left under the key this one was woken from (review Q3).
        throttle.after_wait(lock, peer.host, request.routing_key, clock(), ticket)
    if isinstance(counted, limits.Lock):
        context.labelled(metrics.logins, request.protocol, "throttled").inc()
        context.labelled(metrics.refusals, f"login_lockout_{counted.scope}").inc()
        record.login = "throttled"
        return events.LoginUnavailable(), None
    asked = loop.time()
    try:
        login = await backends.login(context, request, peer, local, attempt=attempt, client_tls=client_tls)
    except BaseException:
        # Cut before its verdict came (the pre-login deadline, the proxy stopping): the backend
        # may have checked the password already, and how long it took may tell the client the
        # verdict (a right one answered at once, a wrong one after the failure delay), so the
        # guess stays counted (review Q1).
        if counted is not None:
            _failed(throttle, counted, clock())
        raise
    record.route = login.route
    record.backend = str(login.endpoint) if login.endpoint else "-"
    context.labelled(metrics.logins, request.protocol, login.outcome).inc()
    record.login = login.outcome
    penalty = None
    if counted is not None:
        match login.outcome:
            case "accepted":
                throttle.succeeded(counted)
            case "rejected" | "no_route":
                # Only a refusal of the credentials is a guess (no_route too: no hint who
                # exists). It was counted when asked; settled here, before any hold, so the lock
                # it makes stops the guesses asked while this refusal is held back (review P1).
                penalty = _failed(throttle, counted, clock())
            case "refused" | "unavailable":
                # A login the backend "refused" for another reason (a connection limit, an
                # account in use) may have had the right password, and counting it would lock
                # out the user's every device; an unavailable one got no verdict at all.
                throttle.withdrawn(counted)
            case other:
                assert_never(other)
    if guarded and login.outcome in REFUSALS and throttle.settings.refusal_time:
        # Every refusal is answered no sooner than refusalTime after the login was asked: a
        # login no route owns (refused at once) and a wrong password a backend refused sooner
        # (Dovecot's failure delay varies with its timer) are held up to it, a fixed time so that
        # no client's logins set it for others, and the time tells no more than the reply which
        # domains and users the proxy serves. A backend slower than it still shows. Counted as
        # the backend time it stands for (the caller moves the deadline on by ``waited``), or
        # the timeout reply would come that much sooner after it than after a backend's refusal.
        refusal_time = throttle.settings.refusal_time
        # A login no route owns asked no one: held all of it, whatever the lookup took.
        hold = refusal_time if login.outcome == "no_route" else asked + refusal_time - loop.time()
        held = await _hold(hold, record)
        login = dataclasses.replace(login, waited=login.waited + held)
    if penalty is not None:
        # Never past the pre-login deadline, which then ends the session as usual.
        await _hold(min(penalty.delay, deadline - loop.time()), record)
    return login.event, login


def _wake(room: asyncio.Future[None]) -> bool:
    """``LoginThrottle.wait_for_room``'s call-back: False once the waiting session has gone."""
    if room.done():
        return False
    room.set_result(None)
    return True


def _failed(throttle: limits.LoginThrottle, attempt: limits.Attempt, now: float) -> limits.Penalty:
    """Settle ``attempt`` as a failure, with a warning for each lock it makes."""
    penalty = throttle.failed(attempt, now)
    for scope in penalty.locked:
        log.warning(
            "too many failed logins: %s %r refused for %gs",
            LOCKED_SUBJECT[scope],
            attempt.key(scope),
            throttle.settings.lockout,
        )
    return penalty


async def _hold(seconds: float, record: SessionRecord) -> float:
    """Hold a refusal back ``seconds`` and return the time held, which the session line's
    ``held_back`` counts: ``seconds``, or only the time until the scope around the login (the
    pre-login deadline) cut the hold short."""
    if seconds <= 0:
        return 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    held = 0.0
    try:
        await asyncio.sleep(seconds)
        held = seconds
    finally:
        if not held:  # cut short
            held = min(seconds, loop.time() - started)
        record.held_back += held
    return held


async def _relay(
    context: ProxyContext,
    listener: ListenerSettings,
    *,
    channel: SocketChannel | TransportChannel,
    handover: Handover,
    record: SessionRecord,
    turn: drain.Turn,
) -> None:
    login, buffered = handover.login, handover.buffered
    backend = login.backend
    assert backend is not None and login.endpoint is not None
    idle = context.settings.timeouts.idle
    context.active[login.endpoint] += 1
    progress = relay.Progress()
    relayed = context.metrics.relay_bytes
    relayed.started(listener.protocol, progress)
    try:
        if listener.protocol in ("smtp", "submission"):
            # Every later command is mediated (mediation.py, smtp.Mediator): inbound, so no
            # recipient of another route reaches this backend; both, so no client command the
            # backend takes only from the proxy (XCLIENT) reaches it.
            record.outcome = await _mediate(
                context, channel, handover, inbound=listener.protocol == "smtp", turn=turn, progress=progress
            )
            return
        if (
            isinstance(channel, SocketChannel)
            and channel.upgraded is None
            and isinstance(backend, SocketChannel)
            and backend.upgraded is None
        ):
            result = await relay.relay(
                channel.detach(),
                backend.detach(),
                to_backend=buffered,
                to_client=login.buffered,
                idle_timeout=idle,
                drain=turn,
                progress=progress,
            )
        else:
            client_side, backend_side = await as_transport(channel), await as_transport(backend)
            # No await between taking what is unread and handing the transports over.
            result = await relay.relay_transports(
                client_side.transport,
                backend_side.transport,
                to_backend=buffered + client_side.take_unread(),
                to_client=login.buffered + backend_side.take_unread(),
                idle_timeout=idle,
                drain=turn,
                progress=progress,
                # A client may leave while the backend is being converted above: what the login
                # dialogue's protocols saw, or still get, of that is the relay's to know.
                client_before=client_side.receiver,
                backend_before=backend_side.receiver,
            )
    finally:
        backend.close()  # the relay has closed it already unless something broke first
        context.active[login.endpoint] -= 1
        if context.active[login.endpoint] <= 0:
            del context.active[login.endpoint]
        relayed.ended(progress)
        # Also when the stop cancelled the relay: the line says what moved until then.
        record.upstream_bytes, record.downstream_bytes = progress.moved()
    record.outcome = f"relayed, ended by {result.ended_by}"
    if result.ended_by == relay.DRAINED:
        turn.outcome = drain.CLOSED_WHEN_QUIET


async def _mediate(
    context: ProxyContext,
    channel: SocketChannel | TransportChannel,
    handover: Handover,
    *,
    inbound: bool,
    turn: drain.Turn,
    progress: relay.Progress,
) -> str:
    """An SMTP session after its backend login, to its end; the session line's outcome."""
    login = handover.login
    assert login.backend is not None
    settings = context.settings
    machine = smtp.Mediator(
        events.FrontendConfig(
            server_name=settings.server_name,
            tls_active=channel.tls is not None,
            inbound=inbound,
            max_errors=settings.max_errors,
        ),
        _inbound_routing(context, handover) if inbound else None,
    )
    ended_by = await mediation.mediate(
        machine,
        channel,
        login.backend,
        client_bytes=handover.buffered,
        backend_bytes=login.buffered,
        idle_timeout=settings.timeouts.idle,
        closing_grace=TIMED_OUT_REPLY_GRACE,
        drain=turn,
        progress=progress,
        # Only an inbound auth_http route's machine asks about recipients.
        place=_placement(context, handover, channel.tls) if inbound else None,
    )
    if ended_by == relay.DRAINED:
        turn.outcome = drain.CLOSED_WHEN_QUIET
    # Deferred recipients are mail that arrives later through another connection: worth a word.
    deferred = f"; recipients of other routes deferred: {machine.deferred}" if machine.deferred else ""
    return f"relayed, ended by {ended_by}{deferred}"


def _inbound_routing(context: ProxyContext, handover: Handover) -> smtp.InboundRouting:
    """How an inbound session's later recipients are routed, from the login's route."""
    login = handover.login
    assert login.endpoint is not None
    endpoint = login.endpoint
    routes = context.tables.current.routes
    first = next((route for route in routes if route.name == login.route), None)
    # How the backend connection was set up (TLS, XCLIENT or PROXY header): another route's
    # recipient may share it only if its route would have set it up the same way.
    setup = None if first is None else first.upstream("smtp")

    def route_of(recipient: str) -> str | None:
        """The recipient's route, in the current table (a route edited since the login answers as
        it is now); ``login.route`` also for another route served by this very backend endpoint
        (domains of several routes on one Postfix), which takes the recipient as it would have
        directly. Not for auth_http routes: their service may pick a server per recipient (the
        machine asks it about each of the login's route through ``place``)."""
        route = table.lookup(context.tables.current, "smtp", recipient)
        if route is None:
            return None
        upstream = route.upstream("smtp")
        shared = (
            first is not None
            and setup is not None
            and upstream is not None
            and first.auth == route.auth == "backend"
            and endpoint in upstream.endpoints
            and (upstream.tls, upstream.client_info) == (setup.tls, setup.client_info)
        )
        return login.route if shared else route.name

    # An auth_http route's service may place each recipient on another server: it is asked.
    ask = handover.request if first is not None and first.auth == "http" else None
    return smtp.InboundRouting(login.route, route_of, ask)


def _placement(
    context: ProxyContext, handover: Handover, client_tls: ssl.SSLObject | None
) -> mediation.Place:
    """How a mediation asks the login route's auth service about a later recipient of that
    route (inbound auth_http routes only: ``smtp.InboundRouting.ask``)."""
    login = handover.login
    asked = handover.attempt

    async def place(ask: smtp.AskRecipient) -> smtp.RecipientPlaced:
        """As the service was asked about the first recipient (the route as it is now: the
        routing found it in the current table)."""
        nonlocal asked
        asked += 1
        route = next((route for route in context.tables.current.routes if route.name == login.route), None)
        if route is None or login.endpoint is None:  # swapped out since the routing looked
            return smtp.RecipientPlaced("elsewhere")
        return await backends.place_recipient(
            context,
            route,
            login.endpoint,
            ask.request,
            client=handover.client,
            attempt=asked,
            client_tls=client_tls,
        )

    return place
