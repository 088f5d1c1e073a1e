"""The admin HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for the kubelet.

Ready means: a routing table is installed and every listener is accepting. Healthy means the
event loop answers. process.py starts it and cleans the returned runner up. Nothing here reveals
users, routes' contents or credentials. Whoever reaches the port (by default the chart lets every
pod in) must never hold the proxy's descriptors: at most MAX_CONNECTIONS are open at once, and a
connection that has no request answered within REQUEST_TIMEOUT is closed, so silent, half-sent or
non-reading clients cannot leave the mail listeners without descriptors (EMFILE). Nor must they
keep the kubelet's probes out (failed liveness probes restart a healthy proxy and cut every mail
session on it): a connection over the cap makes room by aborting the one without a request in
progress that has waited longest for its next request, and is refused only when every open
connection is in the middle of a request or its answer.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.settings import AdminSettings

log = logging.getLogger(__name__)

# Admin connections open at once at most. Probes and scrapes take milliseconds, so a handful at a
# time is plenty (the kubelet's probes, one or two Prometheus), and 32 descriptors are a small
# share of even a 1024-descriptor limit. One more aborts the connection idle the longest (without
# a request in progress; answered or accepted the longest ago), so probes get through: an
# attacker's idle connections are the oldest and go first, and a probe's own connection is busy
# only for the milliseconds of its answer. Only when all are busy is the new one closed unread.
MAX_CONNECTIONS = 32
# How long a connection may go without a request answered, counted from its accept and again from
# each answer written. nginx gives a client 60 s for its request headers (client_header_timeout). Prometheus
# keeps its connection when it scrapes more often than this and reconnects otherwise. aiohttp's
# keepalive_timeout (3630 s by default) is no such bound: it never ends a response its client
# stopped reading.
REQUEST_TIMEOUT = 60.0


async def start(
    settings: AdminSettings,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
) -> web.AppRunner:
    """Serve the admin endpoint until the returned runner is cleaned up."""
    connections = _Connections(max_connections, request_timeout)

    @web.middleware
    async def tracked(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp runs each request in a task of its own that also writes the answer once this
        # returns: the request is over when that task ends, answer written or connection lost.
        # Its deadline restarts only then, so one that does not read its answer runs out of time.
        task = asyncio.current_task()
        assert task is not None  # a middleware runs in its request's task
        connections.started(request.protocol, task)
        return await handler(request)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: no routing table yet or listeners down\n")

    app = web.Application(middlewares=[tracked])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None  # set up just above
    await _Site(runner, settings.address, settings.port, lambda: connections.accept(server)).start()
    return runner


class _Connections:
    """The open admin connections: admits up to ``limit`` of them, each with a deadline, and makes
    room for a new one by aborting the one idle the longest."""

    def __init__(self, limit: int, timeout: float) -> None:
        self._limit = limit
        self._timeout = timeout
        # In the order of their last answer (or accept when none): the first idle one has waited
        # longest for a request, and its deadline is the nearest.
        self._open: dict[web.RequestHandler, _Connection] = {}

    def accept(self, server: web.Server) -> asyncio.Protocol:
        """The listener's protocol factory, called once per accepted connection."""
        # Counted here, not at connection_made: one wakeup of the loop accepts several
        # connections before any of them is made.
        if len(self._open) >= self._limit:
            idle = next((c for c in self._open.values() if c.evictable), None)
            if idle is None:
                log.debug("admin connection refused: all %d connections open are busy", self._limit)
                return _Refused()
            idle.evict()
        handler = server()
        connection = _Connection(handler, self._timeout, lambda: self._open.pop(handler, None))
        self._open[handler] = connection
        return connection

    def started(self, handler: web.RequestHandler, task: asyncio.Task[object]) -> None:
        """A request of ``handler``'s connection is handled by ``task``: busy until it ends."""
        connection = self._open.get(handler)
        if connection is not None:
            connection.busy = True
            task.add_done_callback(lambda _: self._answered(handler))

    def _answered(self, handler: web.RequestHandler) -> None:
        # Gone when the deadline or the client ended the connection while its answer was written.
        connection = self._open.pop(handler, None)
        if connection is not None:
            self._open[handler] = connection  # now idle the shortest
            connection.answered()


class _Connection(asyncio.Protocol):
    """An admitted connection: aiohttp's handler sees everything, and the deadline can close it."""

    __slots__ = ("_answers", "_forget", "_handler", "_timeout", "_timer", "_transport", "busy")

    def __init__(self, handler: web.RequestHandler, timeout: float, forget: Callable[[], object]) -> None:
        self._handler = handler
        self._timeout = timeout
        self._forget = forget
        self._answers = 0
        # A request is in progress: from its start until its answer is written (aiohttp waits for
        # the transport to drain), so a client reading a large answer slowly is not cut.
        self.busy = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's quack like asyncio.Transport without subclassing it).
        self._transport = cast(asyncio.Transport, transport)
        self._start_deadline()
        self._handler.connection_made(transport)

    def answered(self) -> None:
        self.busy = False
        self._answers += 1
        self._start_deadline()

    @property
    def evictable(self) -> bool:
        """Idle, and made: one accepted in the same wakeup of the loop has no transport yet."""
        return not self.busy and self._transport is not None

    def evict(self) -> None:
        """Abort to make room: forgotten at once, since connection_lost comes a loop turn later."""
        assert self._transport is not None  # evictable
        log.debug(
            "admin connection closed to make room: idle the longest (%d answered before)", self._answers
        )
        self._forget()
        self._transport.abort()

    def _start_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        assert self._transport is not None  # the timer starts in connection_made
        log.debug(
            "admin connection closed: no request answered within %gs (%d answered before)",
            self._timeout,
            self._answers,
        )
        # abort, not close: close would wait to send what a client that stopped reading never takes.
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        assert self._timer is not None  # the loop makes a connection before it loses it
        self._timer.cancel()
        self._forget()
        self._handler.connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed before anything is read from it."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Site(web.BaseSite):
    """aiohttp's TCPSite, except that connections come from ``protocol_factory``."""

    __slots__ = ("_address", "_port", "_protocol_factory")

    def __init__(
        self,
        runner: web.AppRunner,
        address: str,
        port: int,
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        super().__init__(runner)
        self._address = address
        self._port = port
        self._protocol_factory = protocol_factory

    @property
    def name(self) -> str:
        return f"http://{self._address}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory, self._address, self._port, backlog=self._backlog
        )
