"""Drive one client connection: the protocol front-end before login, then the relay.

The listener hands over an accepted, non-blocking socket. The session feeds the client's bytes
to the protocol's ``Frontend`` machine and carries out its commands: replies go to the client,
``Authenticate`` goes to ``backends.login``, ``Relay`` hands both sockets to ``relay``. The
pre-login phase is bounded by one deadline (slow clients cannot hold a socket open past it).
Exactly one INFO line per session is logged when it ends; it names the user but never a
password.
"""

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy import table
from proxy.protocols import events, imap, pop3, smtp
from proxy.server import backends, relay
from proxy.server.context import ProxyContext
from proxy.settings import ListenerSettings

log = logging.getLogger("mailgress.session")

# One read from a client before login; commands are short, literals before login are capped
# by the machines far below this.
RECV_SIZE = 16384

FRONTENDS: dict[table.Protocol, Callable[[events.FrontendConfig], events.FrontendMachine]] = {
    "imap": imap.Frontend,
    "pop3": pop3.Frontend,
    "submission": smtp.Frontend,
    "smtp": smtp.Frontend,
}


@dataclass(slots=True)
class SessionRecord:
    """What the closing log line reports."""

    protocol: str
    client: str
    user: str = "-"
    route: str = "-"
    backend: str = "-"
    outcome: str = "closed"
    upstream_bytes: int = 0
    downstream_bytes: int = 0


def _address(sock: socket.socket, *, peer: bool) -> events.ClientAddress:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:  # the client is already gone
        return events.ClientAddress(host="0.0.0.0", port=0)
    return events.ClientAddress(host=str(address[0]), port=int(address[1]))


async def serve(context: ProxyContext, listener: ListenerSettings, client: socket.socket) -> None:
    """Run one client session to its end; never raises except on cancellation."""
    peer = _address(client, peer=True)
    record = SessionRecord(protocol=listener.protocol, client=f"{peer.host}:{peer.port}")
    metrics = context.metrics
    metrics.connections.labels(listener=listener.name, protocol=listener.protocol).inc()
    metrics.sessions_active.labels(protocol=listener.protocol).inc()
    started = time.monotonic()
    try:
        await _run(context, listener, client, peer, record)
    except OSError as error:
        record.outcome = f"connection error ({error.strerror or type(error).__name__})"
    finally:
        client.close()
        metrics.sessions_active.labels(protocol=listener.protocol).dec()
        log.info(
            "session protocol=%s client=%s user=%s route=%s backend=%s outcome=%s "
            "bytes_up=%d bytes_down=%d duration=%.3fs",
            record.protocol,
            record.client,
            record.user,
            record.route,
            record.backend,
            record.outcome,
            record.upstream_bytes,
            record.downstream_bytes,
            time.monotonic() - started,
        )


async def _run(
    context: ProxyContext,
    listener: ListenerSettings,
    client: socket.socket,
    peer: events.ClientAddress,
    record: SessionRecord,
) -> None:
    loop = asyncio.get_running_loop()
    settings = context.settings
    frontend = FRONTENDS[listener.protocol](
        events.FrontendConfig(
            server_name=settings.server_name,
            inbound=listener.protocol == "smtp",
            max_errors=settings.max_errors,
        )
    )
    deadline = loop.time() + settings.timeouts.pre_login
    pending: collections.deque[events.Command] = collections.deque(frontend.start())
    login: backends.LoginOutcome | None = None
    try:
        while True:
            while pending:
                match pending.popleft():
                    case events.Send(data=data):
                        await loop.sock_sendall(client, data)
                    case events.Close(reason=reason):
                        record.outcome = reason
                        return
                    case events.Authenticate(request=request):
                        record.user = request.routing_key
                        login = await backends.login(context, request, peer, _address(client, peer=False))
                        record.route = login.route
                        record.backend = str(login.endpoint) if login.endpoint else "-"
                        context.metrics.logins.labels(protocol=listener.protocol, outcome=login.outcome).inc()
                        record.outcome = f"login {login.outcome}"
                        pending.extend(frontend.handle(login.event))
                    case events.Relay(buffered=buffered):
                        assert login is not None
                        await _relay(
                            context,
                            listener=listener,
                            client=client,
                            login=login,
                            buffered=buffered,
                            record=record,
                        )
                        return
                    case events.StartTls():
                        # Listeners do not offer STARTTLS yet, so machines are never configured to ask.
                        record.outcome = "STARTTLS requested but TLS is not configured"
                        return
                    case other:
                        raise AssertionError(f"front-end emitted {other!r}")
            try:
                async with asyncio.timeout_at(deadline):
                    data = await loop.sock_recv(client, RECV_SIZE)
            except TimeoutError:
                context.metrics.refusals.labels(reason="pre_login_timeout").inc()
                pending.extend(frontend.handle(events.TimedOut()))
                continue
            pending.extend(frontend.handle(events.DataReceived(data) if data else events.ConnectionClosed()))
    finally:
        if login is not None and login.backend is not None:
            login.backend.close()  # the relay has closed it already unless something broke first


async def _relay(
    context: ProxyContext,
    *,
    listener: ListenerSettings,
    client: socket.socket,
    login: backends.LoginOutcome,
    buffered: bytes,
    record: SessionRecord,
) -> None:
    assert login.backend is not None and login.endpoint is not None
    context.active[login.endpoint] += 1
    try:
        result = await relay.relay(
            client,
            login.backend,
            to_backend=buffered,
            to_client=login.buffered,
            idle_timeout=context.settings.timeouts.idle,
        )
    finally:
        context.active[login.endpoint] -= 1
        if context.active[login.endpoint] <= 0:
            del context.active[login.endpoint]
    record.upstream_bytes = result.upstream_bytes
    record.downstream_bytes = result.downstream_bytes
    record.outcome = f"relayed, ended by {result.ended_by}"
    bytes_counter = context.metrics.relay_bytes
    bytes_counter.labels(protocol=listener.protocol, direction="upstream").inc(result.upstream_bytes)
    bytes_counter.labels(protocol=listener.protocol, direction="downstream").inc(result.downstream_bytes)
