"""Route a login, connect to the chosen backend endpoint and replay the login there.

Called by the session driver when its front-end machine asks to ``Authenticate``. Looks the
login up in the current table, orders the endpoints by the route's balance policy (endpoints
failing lately last, ``balancing.EndpointHealth``), connects, and drives the protocol's
``BackendLogin`` machine over the socket. The whole login has one budget, ``backendLogin``:
each endpoint tried gets an equal share of what is left to connect and greet, so an endpoint that
refuses, hangs or breaks the dialogue is skipped for the next one in time, and one that greeted has
all that is left for its dialogue (a late refusal is a refusal); when none is left the client gets the
temporary failure, as does every login before the first table is installed. An inbound envelope's
MAIL and RCPT replies have RFC 5321's times instead (minutes: a backend's policy checks), and one
not given in time is a temporary failure, not a failing endpoint. A refusal is final
(the backend's verdict): outcome ``rejected`` when it refused the credentials, ``refused`` when
it refused the login for another reason (a connection limit, an account in use or disabled),
which the failed-login throttle must not count. A route with auth mode ``http`` asks its auth_http
service first (``authhttp``): its refusal is final, and its grant may name the backend and the
credentials to log in with; a submission login it granted is verified, so a backend that takes
XCLIENT LOGIN from the proxy is told the user that way and gets no AUTH (``smtp.BackendLogin``). An
outage (an endpoint's, an auth service's) is logged as a warning when it begins and at INFO when it
ends; the failures in between are debug lines.
Never logs a credential: only the user name, route and endpoint.
"""

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from proxy import balancing, table
from proxy.protocols import authhttp as authhttp_protocol
from proxy.protocols import events, imap, pop3, proxyheader, smtp
from proxy.server import authhttp
from proxy.server.channel import SocketChannel, TransportChannel
from proxy.server.context import ProxyContext
from proxy.server.poller import Poller

log = logging.getLogger(__name__)

BACKEND_LOGINS: dict[
    table.Protocol, Callable[[events.LoginRequest, events.BackendConfig], events.BackendMachine]
] = {
    "imap": imap.BackendLogin,
    "pop3": pop3.BackendLogin,
    "submission": smtp.BackendLogin,
    "smtp": smtp.BackendLogin,
}

# The part of backendLogin an endpoint that greeted has at least for its dialogue, even when the
# endpoints tried before it used the rest (so a login takes at most 1.5 times backendLogin): a
# backend answers a wrong password only after its failure delay (Dovecot's auth_failure_delay,
# 2 s), and one cut short would be an outage where the throttle must count a refusal. Keep
# backendLogin above twice the backends' failure delay.
GREETED_MINIMUM = 0.5
# The logins metric's outcome label (with the session's "throttled"): a fixed small set.
Outcome = Literal["accepted", "rejected", "refused", "unavailable", "no_route"]
# Why a login dialogue failed after the TCP connect (the login-failures metric's reason label):
# the budget ran out, TLS failed, the connection broke, or the backend's replies broke it.
LoginFailure = Literal["timeout", "tls", "connection", "dialogue"]


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """The verdict for the front-end, and on success the logged-in backend socket."""

    event: events.LoginAccepted | events.LoginRejected | events.LoginUnavailable
    outcome: Outcome
    route: str = "-"
    endpoint: table.Endpoint | None = None
    backend: SocketChannel | TransportChannel | None = None
    buffered: bytes = b""  # backend bytes that followed its success reply
    waited: float = 0.0  # seconds the auth service and the backends took (``login``)
    # Of ``waited``, the seconds an inbound envelope's MAIL and RCPT replies took: RFC 5321's
    # times, outside the login budget (smtp.BackendLogin.reply_timeout).
    envelope_waited: float = 0.0


async def _connect(endpoint: table.Endpoint, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await _connect_literal(sock, (endpoint.host, endpoint.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_literal(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking ``sock`` to an IP literal without the resolver.

    The loop's ``sock_connect`` (uvloop's) sends every address through getaddrinfo in a thread
    pool, a tenth of a login's cost; endpoints are always IP literals, which ``connect`` takes
    as they are. Raises OSError with the connection's error, as ``sock_connect`` does.
    """
    try:
        sock.connect(address)
        return  # connected at once
    except (BlockingIOError, InterruptedError):  # under way, as asyncio's own sock_connect takes it
        pass
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    descriptor = sock.fileno()
    # On the loop's own epoll (poller.py), as the channel that reads from it next.
    poller = Poller.acquire(loop)
    poller.add_writer(descriptor, lambda: _set_once(writable))
    try:
        await writable
    finally:
        poller.remove_writer(descriptor)  # on success, failure, timeout and cancellation alike
        poller.release()
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def _set_once(future: asyncio.Future[None]) -> None:
    # The writer may fire again before the waiting task has run and removed it.
    if not future.done():
        future.set_result(None)


Verdict = events.LoginSucceeded | events.LoginFailed | events.BackendFailed


async def _replay_login(
    machine: events.BackendMachine,
    channel: SocketChannel | TransportChannel,
    tls: ssl.SSLContext,
    server_hostname: str,
    greeted: Callable[[], None],
    *,
    sent: Callable[[], None],
) -> Verdict:
    """Feed the backend's bytes to the machine and carry out its commands until a verdict;
    ``greeted`` is called once, when the backend's first bytes arrive, ``sent`` after the
    machine's lines for each event have gone out."""
    event: events.Event | None = None
    silent = True
    while True:
        if event is None:
            data = await channel.recv()
            if data and silent:
                silent = False
                greeted()
            event = events.DataReceived(data) if data else events.ConnectionClosed()
        commands, event = machine.handle(event), None
        for command in commands:
            match command:
                case events.Send(data=payload):
                    await channel.send(payload)
                case events.StartTls():
                    if not isinstance(channel, SocketChannel):
                        return events.BackendFailed("backend dialogue asked for STARTTLS inside TLS")
                    await channel.start_tls(tls, server_side=False, server_hostname=server_hostname)
                    event = events.TlsEstablished()
                case events.LoginSucceeded() | events.LoginFailed() | events.BackendFailed():
                    return command
                case other:
                    return events.BackendFailed(f"backend dialogue emitted {type(other).__name__}")
        sent()


def server_name(upstream: table.Upstream) -> str:
    """The name a backend's certificate must carry: its Service's cluster DNS name."""
    namespace, _, name = upstream.service.partition("/")
    return f"{name}.{namespace}.svc"


def _endpoint_order(
    context: ProxyContext, route: table.Route, upstream: table.Upstream, protocol: table.Protocol, key: str
) -> list[table.Endpoint]:
    slot = (route.name, protocol)
    position = context.positions.get(slot, 0)
    context.positions[slot] = position + 1
    return balancing.endpoint_order(
        upstream.endpoints,
        route.balance,
        key,
        position,
        connections=context.active,
        failing=context.health.failing(context.clock()),
    )


async def login(
    context: ProxyContext,
    request: events.LoginRequest,
    client: events.ClientAddress,
    local: events.ClientAddress,
    *,
    attempt: int = 1,
    client_tls: ssl.SSLObject | None = None,
) -> LoginOutcome:
    """Route ``request`` and log in on a backend; never raises for network trouble.

    Args:
        client: where the client connects from; ``local``: the proxy address it reached, both
            for the PROXY header a ``proxy-v2`` upstream gets (as nginx sends it).
        attempt: the number of this login attempt on the client's connection, from 1, and
            ``client_tls`` the client connection's TLS, if any: both for auth_http.

    Returns:
        The verdict, with the seconds it took in ``waited``: the auth service's and the
        backends' time, which the session does not count against the client's deadline.
    """
    started = time.monotonic()
    outcome = await _route_and_log_in(context, request, client, local, attempt=attempt, client_tls=client_tls)
    return dataclasses.replace(outcome, waited=time.monotonic() - started)


async def _route_and_log_in(
    context: ProxyContext,
    request: events.LoginRequest,
    client: events.ClientAddress,
    local: events.ClientAddress,
    *,
    attempt: int,
    client_tls: ssl.SSLObject | None,
) -> LoginOutcome:
    if not context.tables.ready:
        # No table yet (the controller is unreachable and there is no usable snapshot): no user
        # is known or unknown, so the answer is "try later", never a refusal a client takes as
        # final (a bounce, "wrong password") or that the failed-login throttle counts.
        if context.tables.first_unready_answer():
            log.warning(
                "%s login answered with a temporary failure: no routing table yet (logged once; "
                "every such login counts as outcome=unavailable in mailgress_proxy_logins_total)",
                request.protocol,
            )
        return LoginOutcome(events.LoginUnavailable(), "unavailable")
    route = table.lookup(context.routing_table(), request.protocol, request.routing_key)
    if route is None:
        return LoginOutcome(events.LoginRejected(), "no_route")
    upstream = route.upstream(request.protocol)
    assert upstream is not None  # lookup only returns routes serving the protocol
    start_login = BACKEND_LOGINS[request.protocol]
    if route.auth == "http":
        decision = await _ask_auth_http(
            context, route, request, client=client, attempt=attempt, client_tls=client_tls
        )
        _auth_http_answered(context, route, decision)
        match decision:
            case authhttp_protocol.Granted(server=server):
                credentials = authhttp_protocol.credentials_for(request, decision)
                request = dataclasses.replace(request, credentials=credentials)
                if server is not None:
                    # The auth service picked the backend, as with nginx; the route's TLS and
                    # client-info settings still say how to talk to it.
                    upstream = dataclasses.replace(upstream, endpoints=(server,))
                if request.protocol == "submission":
                    # The service has checked the password: a backend that takes XCLIENT LOGIN
                    # gets the login that way, even beside AUTH PLAIN, as behind nginx; its SASL
                    # need not know the service's users (smtp.BackendLogin).
                    start_login = functools.partial(smtp.BackendLogin, verified=True)
            case authhttp_protocol.Refused(reply=reply):
                return LoginOutcome(events.LoginRejected(reply), "rejected", route.name)
            case authhttp.Unavailable():
                return LoginOutcome(events.LoginUnavailable(), "unavailable", route.name)
    timeouts = context.settings.timeouts
    config = events.BackendConfig(
        server_name=context.settings.server_name,
        client=client,
        client_info=upstream.client_info,
        starttls=upstream.tls == "starttls",
    )
    hostname = server_name(upstream)
    metrics = context.metrics
    order = _endpoint_order(context, route, upstream, request.protocol, request.routing_key.lower())
    # One budget for the whole login, every endpoint tried included (Dovecot's
    # login_proxy_timeout), so endpoints that hang cannot hold a client longer than that.
    loop = asyncio.get_running_loop()
    budget_ends = loop.time() + timeouts.backend_login
    for index, endpoint in enumerate(order):
        # Each endpoint gets an equal share of what is left to connect and greet: one that hangs
        # leaves the others their turn. What a quick failure leaves goes to the endpoints after it.
        share = (budget_ends - loop.time()) / (len(order) - index)
        if share <= 0:
            break  # spent (the loop woke late, or a greeted endpoint used it): none tried after
        context.health.trying(endpoint, context.clock())
        machine = start_login(request, config)
        channel: SocketChannel | TransportChannel | None = None
        envelope = _Envelope(machine)
        try:
            async with asyncio.timeout(share) as scope:
                envelope.scope = scope

                started = time.monotonic()
                channel = SocketChannel(await _connect(endpoint, timeouts.backend_connect))
                connected_in = time.monotonic() - started
                context.labelled(metrics.backend_connect_seconds, request.protocol).observe(connected_in)
                if upstream.client_info == "proxy-v2":
                    header = proxyheader.build_v2((client.host, client.port), (local.host, local.port))
                    await channel.send(header)  # before any TLS: the header is for the TCP peer
                if upstream.tls == "tls":
                    assert isinstance(channel, SocketChannel)  # nothing has wrapped it yet
                    channel = await TransportChannel.connect_tls(
                        channel.detach(), context.backend_tls, hostname
                    )
                # Once the endpoint has greeted it is alive, and its dialogue may use all that is
                # left of the budget: a backend answers a wrong password only after its failure
                # delay (Dovecot's auth_failure_delay, 2 s), and a reply cut at the share would
                # pass a guess off as an outage, past the failed-login throttle. The budget is
                # then spent, so no other endpoint is given the credentials after a timeout.
                verdict = await _replay_login(
                    machine,
                    channel,
                    context.backend_tls,
                    hostname,
                    # At least GREETED_MINIMUM of the budget, however much the endpoints before
                    # it used: hanging ones ahead must not cut a late refusal either.
                    greeted=lambda: scope.reschedule(
                        max(budget_ends, loop.time() + timeouts.backend_login * GREETED_MINIMUM)
                    ),
                    sent=envelope.sent,
                )
        except (OSError, TimeoutError, ssl.SSLError) as error:
            if envelope.since is not None and isinstance(error, TimeoutError):
                assert channel is not None
                channel.close()
                # RFC 5321's minutes are over: the client's to retry, the endpoint alive (it
                # greeted and took EHLO), and no other endpoint is worth the wait again.
                log.info(
                    "backend %s of %s did not answer the envelope in RFC 5321's time", endpoint, route.name
                )
                return LoginOutcome(
                    events.LoginUnavailable(),
                    "unavailable",
                    route.name,
                    envelope_waited=envelope.waited(),
                )
            if channel is None:
                context.labelled(metrics.backend_connect_failures, request.protocol).inc()
                _endpoint_failed(context, route, endpoint, f"unreachable: {_describe(error)}")
                continue
            verdict = events.BackendFailed(_describe(error))
            failure = _failure_kind(error)
        except BaseException:
            if channel is not None:
                channel.close()
            raise
        else:
            failure = "dialogue"  # only used when the machine's verdict is BackendFailed
        match verdict:
            case events.LoginSucceeded(reply=reply, buffered=buffered):
                _endpoint_succeeded(context, route, endpoint)
                return LoginOutcome(
                    events.LoginAccepted(reply),
                    "accepted",
                    route.name,
                    endpoint,
                    channel,
                    buffered,
                    envelope_waited=envelope.waited(),
                )
            case events.LoginFailed(reply=reply, credentials=wrong):
                channel.close()
                _endpoint_succeeded(context, route, endpoint)  # it answered: a refusal is no fault
                outcome: Outcome = "rejected" if wrong else "refused"
                return LoginOutcome(
                    events.LoginRejected(reply),
                    outcome,
                    route.name,
                    endpoint,
                    envelope_waited=envelope.waited(),
                )
            case events.BackendFailed(reason=reason):
                channel.close()
                context.labelled(metrics.backend_login_failures, request.protocol, failure).inc()
                _endpoint_failed(context, route, endpoint, f"failed the login dialogue: {reason}")
    return LoginOutcome(events.LoginUnavailable(), "unavailable", route.name)


class _Envelope:
    """An inbound login's envelope: once its MAIL has gone out (the backend greeted and took
    EHLO/XCLIENT), the replies to MAIL and RCPT get RFC 5321's times (a backend's policy checks
    may take minutes; ``smtp.BackendLogin.reply_timeout``), not what is left of the budget."""

    __slots__ = ("machine", "scope", "since")

    def __init__(self, machine: events.BackendMachine) -> None:
        self.machine = machine
        self.scope: asyncio.Timeout | None = None  # the attempt's
        self.since: float | None = None  # when the MAIL went out (loop time)

    def sent(self) -> None:
        wait = self.machine.reply_timeout if isinstance(self.machine, smtp.BackendLogin) else None
        if wait is not None and self.scope is not None:
            now = asyncio.get_running_loop().time()
            self.since = now if self.since is None else self.since
            self.scope.reschedule(now + wait)

    def waited(self) -> float:
        """Seconds since the MAIL went out, or 0."""
        return 0.0 if self.since is None else asyncio.get_running_loop().time() - self.since


def _failure_kind(error: BaseException) -> LoginFailure:
    """The login-failures metric's reason label for an error after the connect."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ssl.SSLError):
        return "tls"
    return "connection"


def _endpoint_failed(context: ProxyContext, route: table.Route, endpoint: table.Endpoint, what: str) -> None:
    """Count a failure of ``endpoint``; the one that makes it failing is a warning, the rest of
    its episode debug lines, so an outage is one line, not one per login. An endpoint that a
    table swapped in during this login no longer has gets no episode: no later login can try
    it, and nothing would forget the entry until the next swap."""
    context.routing_table()  # trims the health state to the table in use first
    if endpoint not in context.endpoints_in_use:
        log.debug("backend %s of %s %s (it has left the routing table)", endpoint, route.name, what)
    elif context.health.failed(endpoint, what, context.clock()) is None:
        log.debug("backend %s of %s %s", endpoint, route.name, what)
    else:
        log.warning(
            "backend %s of %s %s; tried after the healthy endpoints until a login there works "
            "(further failures at debug level)",
            endpoint,
            route.name,
            what,
        )


def _endpoint_succeeded(context: ProxyContext, route: table.Route, endpoint: table.Endpoint) -> None:
    episode = context.health.succeeded(endpoint)
    if episode is not None:
        log.info(
            "backend %s of %s works again, %.0f s after it began failing (failed attempts: %d; "
            "the first: %s)",
            endpoint,
            route.name,
            context.clock() - episode.since,
            episode.failures,
            episode.reason,
        )


async def place_recipient(
    context: ProxyContext,
    route: table.Route,
    endpoint: table.Endpoint,
    request: events.LoginRequest,
    *,
    client: events.ClientAddress,
    attempt: int,
    client_tls: ssl.SSLObject | None,
) -> smtp.RecipientPlaced:
    """Where ``route``'s auth_http service places a later recipient of an inbound session logged
    in on ``endpoint`` (``request``: its envelope so far), asked as for the first recipient:
    ``here`` if it names ``endpoint`` (or names no server and ``endpoint`` is the route's). A
    route edited to auth mode backend since the login asks nobody: ``endpoint`` is its or not."""
    upstream = route.upstream("smtp")
    ours = upstream is not None and endpoint in upstream.endpoints
    if route.auth != "http":
        return smtp.RecipientPlaced("here" if ours else "elsewhere")
    decision = await _ask_auth_http(
        context, route, request, client=client, attempt=attempt, client_tls=client_tls
    )
    _auth_http_answered(context, route, decision)
    match decision:
        case authhttp_protocol.Granted(server=server):
            here = endpoint == server if server is not None else ours
            return smtp.RecipientPlaced("here" if here else "elsewhere")
        case authhttp_protocol.Refused(reply=reply):
            return smtp.RecipientPlaced("refused", reply)
        case authhttp.Unavailable():
            return smtp.RecipientPlaced("unavailable")


async def _ask_auth_http(
    context: ProxyContext,
    route: table.Route,
    request: events.LoginRequest,
    *,
    client: events.ClientAddress,
    attempt: int,
    client_tls: ssl.SSLObject | None,
) -> authhttp.Outcome:
    """The verdict of the route's auth_http service on this attempt."""
    if route.http_auth is None:  # the compiler does this while a headersFrom Secret does not resolve
        return authhttp.Unavailable("the route has auth mode http but no auth_http settings")
    try:
        target = authhttp_protocol.service(route.http_auth)
    except authhttp_protocol.AuthConfigError as error:
        return authhttp.Unavailable(str(error))
    facts = authhttp.tls_facts(client_tls)
    return await authhttp.authorize(
        target,
        authhttp_protocol.Attempt(request=request, number=attempt, client_ip=client.host, tls=facts),
        timeout=route.http_auth.timeout_seconds,
        tls=context.backend_tls,  # an https:// service is checked against the backends' CAs
        # Auth-Wait holds the client before its retry; no longer than the whole pre-login phase.
        max_wait=context.settings.timeouts.pre_login,
    )


def _auth_http_answered(context: ProxyContext, route: table.Route, decision: authhttp.Outcome) -> None:
    """Log an outage of a route's auth_http service when it begins (a warning) and ends; the
    failures in between are debug lines, so an outage is not one line per login."""
    if not isinstance(decision, authhttp.Unavailable):
        failures = context.auth_failures.pop(route.name, 0)
        if failures:
            log.info("auth_http service of %s answers again (failed requests: %d)", route.name, failures)
        return
    failures = context.auth_failures.get(route.name, 0)
    context.auth_failures[route.name] = failures + 1
    log.log(
        logging.DEBUG if failures else logging.WARNING,
        "auth_http service of %s failed: %s",
        route.name,
        decision.reason,
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({error.verify_message})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__
