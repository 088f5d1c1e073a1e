"""A guard on an aiohttp port that anyone may reach: a cap on open connections and a deadline.

proxy/server/admin.py serves its endpoint through a ``Guard``; mailgress/cli.py hands ``Guard`` to
the controller as the push port's guard (controller.publisher.ConnectionGuards: the controller never
imports proxy.server). Whoever reaches such a port must never hold the process's descriptors: at
most ``limit`` connections are open at once, and one without a request answered within ``timeout``
of its accept or of its last answer is aborted, the TLS handshake counted in that time. A connection
over the cap makes room by aborting the one without a request in progress that has waited longest
for its next request; when there is none, one whose client is behind on its answers, in this order:
more requests wait behind the one in progress (pipelined), else an answer sits unwritten in the
transport's buffer and that buffer has not shrunk since the guard last looked (the client takes
nothing), else one whose buffer shrank (a slow reader, making progress, goes last); within each,
the one whose request in progress was taken first. Not the one answered longest ago: a keep-alive
scraper's last answer is its previous scrape, older than the accept of any connection opened since,
though its current request is the newest, and it went before fresher connections reading no more
than it. The trade-off: a connection whose request is newer than a scrape in progress keeps its
place over the scraper while it takes anything at all (taking nothing, it goes first): nothing tells
it from a scraper without a token. A client that pipelines requests and reads nothing holds its
connection so, and would otherwise keep every probe or proxy out until its deadline; no probe,
scraper or proxy sends a request before it has read the last answer. Progress is judged only when
room is needed, from one number kept per connection: no timer. A new connection is closed unread
only when every open one is busy with a request its client keeps up with. A request is in progress
from the moment aiohttp has parsed its head (it waits in aiohttp's queue) until its answer is
written, whoever answers it: the application, or aiohttp before any middleware runs (its expect
handler answers 417 to any Expect but 100-continue), so the guard hooks aiohttp's request handler,
not a middleware such a request never reaches. A half-sent request is not in progress, so partial
requests never hold the cap. A request the application marks ``lasting`` (a long-lived stream it
accepted) has no deadline and is never evicted until it ends, even while its client reads nothing:
the application watches its own writes (the push channel ends a stream that takes no line for three
heartbeats). Pipelining is bounded by aiohttp (its MAX_MSG_QUEUE_SIZE: at most 32 parsed requests
wait, then it stops reading) and by its transport's write buffer (an answer beyond the high-water
mark waits for the client): a connection that pipelines and does not read holds a few answers'
worth of memory, the kernel's buffers hold the rest. Over TLS the guard runs each handshake
itself (start_tls) after admitting the connection, so one silent before or within its ClientHello
is timed and evicted like any other; stopping the site aborts those still in their handshake, and
any admitted in the same loop turn whose connection is made after the stop. Never interprets what a
client sends; logs at debug only (a flood must not flood the log), never an address.
"""

import asyncio
import functools
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import streams, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage

log = logging.getLogger(__name__)

# A connection's standing when room is needed: the lowest goes first (of idle ones the one answered
# longest ago, of the others the one whose request in progress was taken first). Idle: no request
# in progress. Pipelining: requests wait behind the one in progress. Stalled: its answer waits in
# the transport's buffer, which has not shrunk since writing paused or the guard last looked.
# Draining: its buffer shrank, or it was never measured since its last answer (a small answer,
# under the high-water mark).
IDLE, PIPELINING, STALLED, DRAINING = range(4)

# aiohttp's server calls one with each request it takes: the application's handling.
_RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Guard:
    """The open connections of one port: admits up to ``limit`` of them, each with a deadline,
    and makes room for a new one by aborting the one idle the longest, else one whose client is
    behind on its answers (pipelining, then taking nothing, then reading slowly).

    The port must be served by ``site`` (it tells the guard of each request aiohttp takes and of
    its end): one site, once it stops the guard admits nothing more.
    """

    __slots__ = ("_limit", "_name", "_open", "_order", "_stopped", "_timeout")

    def __init__(self, name: str, limit: int, timeout: float) -> None:
        """``name`` starts this guard's log lines ("admin", "push channel")."""
        self._name = name
        self._limit = limit
        self._timeout = timeout
        # In the order of their last answer (or accept when none): the first idle one has waited
        # longest for a request, and its deadline is the nearest.
        self._open: dict[web.RequestHandler, _Connection] = {}
        # Numbers each accept and each request taken: orders connections behind on their answers.
        self._order = itertools.count()
        # Set when a site stops: a connection the listener accepted before it closed is made
        # (connection_made) a loop turn or more later, after the stop looked at the open ones.
        self._stopped = False

    def site(
        self, runner: web.BaseRunner, address: str, port: int, tls: ssl.SSLContext | None = None
    ) -> web.BaseSite:
        """A site for ``runner`` (set up) on ``address:port`` whose connections this guards;
        with ``tls`` they speak TLS with that context."""
        return _Site(runner, address, port, self, tls)

    def lasting(self, request: web.BaseRequest) -> None:
        """``request`` (in progress) lasts as long as its client wants: no deadline until it ends."""
        connection = self._open.get(request.protocol)
        if connection is not None:
            connection.hold()

    def _taking(self, server: web.Server) -> None:
        """Make ``server``'s handlers tell this guard of each request they take and of its end
        (once: before the site accepts, a handler reads both when it is made)."""
        factory = server.request_factory
        if not (isinstance(factory, _Taken) and factory.guard is self):
            server.request_factory = _Taken(self, factory)
            server.request_handler = functools.partial(self._handle, server.request_handler)

    async def _handle(self, handle: _RequestHandler, request: web.BaseRequest) -> web.StreamResponse:
        # aiohttp runs each request it takes in a task of its own, which calls this (the
        # application's handling: expect handler, router, middlewares) and then writes the answer:
        # the request is over when that task ends, answer written or connection lost, however
        # the answer was made. Its deadline restarts only then, so one that does not read its
        # answer runs out of time. (A request aiohttp could not parse gets its error answer from
        # another handler, and then the connection is closed.)
        task = asyncio.current_task()
        assert task is not None  # aiohttp calls its request handler in the request's task
        if request.protocol in self._open:
            task.add_done_callback(lambda _: self._answered(request.protocol, request))
        return await handle(request)

    def _took(self, handler: web.RequestHandler, request: web.BaseRequest) -> None:
        # aiohttp takes a request from its queue and makes its task, which runs (and reaches
        # ``_handle``) a loop turn later: in progress from here.
        connection = self._open.get(handler)
        if connection is not None:
            connection.take(request, next(self._order))

    def accept(self, server: web.Server, tls: ssl.SSLContext | None) -> asyncio.Protocol:
        """The listener's protocol factory (``site``'s), called once per accepted connection."""
        if self._stopped:
            return _Refused()  # accepted before the listener closed, admitted after the stop
        # Counted here, not at connection_made: one wakeup of the loop accepts several
        # connections before any of them is made.
        if len(self._open) >= self._limit:
            room = self._room()
            if room is None:
                log.debug("%s connection refused: all %d connections open are busy", self._name, self._limit)
                return _Refused()
            room.evict()
        handler = server()
        connection = _Connection(
            self._name,
            handler,
            self._timeout,
            tls,
            next(self._order),
            forget=lambda: self._open.pop(handler, None),
            stopped=lambda: self._stopped,
        )
        self._open[handler] = connection
        return connection

    def _room(self) -> "_Connection | None":
        """The connection to abort for a new one, if any may go: the first idle one (in the order of
        their last answer), else of the lowest standing the one whose request was taken first."""
        chosen, lowest = None, None
        for connection in self._open.values():
            standing = connection.standing()
            if standing == IDLE:
                return connection  # none goes before it
            if standing is not None:
                rank = (standing, connection.taken)
                if lowest is None or rank < lowest:
                    chosen, lowest = connection, rank
        return chosen

    def stop(self) -> None:
        """``site`` stops: abort every connection still in its TLS handshake (aiohttp's shutdown
        closes only the connections its handler has), and from now on every one made."""
        self._stopped = True
        for connection in list(self._open.values()):
            connection.abort_handshake()

    def _answered(self, handler: web.RequestHandler, request: web.BaseRequest) -> None:
        # Gone when the deadline or the client ended the connection while its answer was written.
        connection = self._open.pop(handler, None)
        if connection is not None:
            self._open[handler] = connection  # now idle the shortest
            connection.answered(request)


class _Taken:
    """A server's request factory that tells ``guard`` which handler took a request."""

    __slots__ = ("_factory", "guard")

    def __init__(self, guard: Guard, factory: Callable[..., web.BaseRequest]) -> None:
        self.guard = guard
        self._factory = factory

    def __call__(
        self,
        message: RawRequestMessage,
        payload: streams.StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: "asyncio.Task[None]",
    ) -> web.BaseRequest:
        request = self._factory(message, payload, protocol, writer, task)
        self.guard._took(protocol, request)
        return request


class _Connection(asyncio.Protocol):
    """An admitted connection: aiohttp's handler sees everything (after the TLS handshake, if
    any), and the deadline can close it."""

    __slots__ = (
        "_answers",
        "_early",
        "_forget",
        "_handler",
        "_handshaking",
        "_held",
        "_made",
        "_measured",
        "_name",
        "_request",
        "_stopped",
        "_timeout",
        "_timer",
        "_tls",
        "_transport",
        "_unmade",
        "_writing_paused",
        "taken",
    )

    def __init__(
        self,
        name: str,
        handler: web.RequestHandler,
        timeout: float,
        tls: ssl.SSLContext | None,
        accepted: int,
        *,
        forget: Callable[[], object],
        stopped: Callable[[], bool],
    ) -> None:
        """``accepted`` is its place in the guard's order (``taken`` until it takes a request)."""
        self._name = name
        self._handler = handler
        self._timeout = timeout
        self._tls = tls
        self._forget = forget
        self._stopped = stopped
        self._answers = 0
        # The request in progress: from aiohttp taking it until its answer is written (aiohttp
        # waits for the transport to drain), so a client reading a large answer slowly is not cut.
        self._request: web.BaseRequest | None = None
        # The guard's number of the request in progress (or the last one) when taken, else of the
        # accept: among connections behind on their answers, the lowest goes first.
        self.taken = accepted
        self._held = False  # the request in progress is lasting (``hold``)
        # The transport holds more than its high-water mark that the client has not taken.
        self._writing_paused = False
        # The transport's write buffer when writing paused or ``standing`` last found the client
        # behind, since its last answer (None: not since): a client that takes some of it has
        # shrunk it by the next look.
        self._measured: int | None = None
        # The accepted socket's transport until the handshake is over, then the TLS one.
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # What the client sent before the TLS layer took the transport over (its ClientHello, or
        # part of it); None when there is no TLS or once the TLS layer has it.
        self._early: bytearray | None = None
        # What the TLS layer decrypted after the handshake and before this connection's task
        # resumed to hand aiohttp's handler its connection (a client sends its request at once).
        self._unmade = bytearray()
        self._made = False  # aiohttp's handler has its connection: events go to it
        # The loop keeps only a weak reference to a task: this one holds the handshake's.
        self._handshaking: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's quack like asyncio.Transport without subclassing it).
        self._transport = cast(asyncio.Transport, transport)
        self._start_deadline()
        if self._stopped():
            # Admitted in the loop turn the site stopped in: aiohttp's shutdown is over or
            # under way, and would never see it.
            log.debug("%s connection closed: the site stopped", self._name)
            self._transport.abort()
            return
        if self._tls is None:
            self._made = True
            self._handler.connection_made(transport)
            return
        # The handshake runs here, not through the listener's ssl=: there the protocol is made
        # only after the handshake, and a connection silent before its ClientHello could be
        # neither evicted nor timed. It is inside the first deadline.
        self._early = bytearray()
        self._transport.pause_reading()  # asyncio's; uvloop starts reading after this returns
        loop = asyncio.get_running_loop()
        self._handshaking = loop.create_task(self._handshake(self._transport, self._tls))
        # Runs right after the task's first step, in which start_tls makes its TLS layer the
        # transport's protocol (and schedules its connection_made and resume_reading): what came
        # before is handed to that layer while reading is still paused, so nothing overtakes it.
        loop.call_soon(self._hand_over_early, self._transport)

    def _hand_over_early(self, accepted: asyncio.Transport) -> None:
        early, self._early = self._early, None
        if accepted.is_closing() or early is None:
            return  # gone already: the handshake's end cleans up
        # asyncio's and uvloop's TLS layers are buffered protocols (uvloop's without subclassing).
        protocol = accepted.get_protocol()
        if protocol is self or not hasattr(protocol, "buffer_updated"):
            # Never seen: the TLS layer would have to read what is not there. Give up cleanly.
            log.debug("%s connection closed: its TLS layer did not take over", self._name)
            accepted.abort()
            return
        # The TLS layer takes bytes before its connection_made into its incoming buffer; its
        # handshake then starts with them.
        layer = cast(asyncio.BufferedProtocol, protocol)
        view = memoryview(early)
        while view:
            buffer = memoryview(layer.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            layer.buffer_updated(size)
            view = view[size:]

    async def _handshake(self, accepted: asyncio.Transport, tls: ssl.SSLContext) -> None:
        if accepted.is_closing():  # evicted or gone before this task's first step
            self._ended()
            return
        try:
            # No await before start_tls's own: the check above still holds when it takes over.
            secured = await asyncio.get_running_loop().start_tls(accepted, self, tls, server_side=True)
        except OSError as error:  # ssl.SSLError and ConnectionError are OSErrors
            # The transport's protocol was the TLS layer's, which tells this one nothing of the
            # loss; start_tls closed the transport. The deadline or an eviction aborted it, or the
            # client hung up or spoke no TLS.
            log.debug("%s connection closed in its TLS handshake: %s", self._name, type(error).__name__)
            self._ended()
            return
        if secured is None:  # the client closed the connection during the handshake
            self._ended()
            return
        self._transport = secured
        self._made = True
        self._handler.connection_made(secured)
        if self._unmade:
            early_request, self._unmade = bytes(self._unmade), bytearray()
            self._handler.data_received(early_request)

    def take(self, request: web.BaseRequest, order: int) -> None:
        self._request = request
        self.taken = order

    def answered(self, request: web.BaseRequest) -> None:
        if request is self._request:  # else aiohttp took the next one (pipelined) already
            self._request = None
        self._answers += 1
        self._held = False
        self._measured = None
        self._start_deadline()

    def hold(self) -> None:
        """No deadline and no eviction until the request in progress is answered (``answered``
        starts a deadline)."""
        self._held = True
        if self._timer is not None:
            self._timer.cancel()

    @property
    def busy(self) -> bool:
        """A request in progress, or one aiohttp parsed whole and has not taken yet: its task
        starts a loop turn or two later (a half-sent request is not one: it holds nothing)."""
        # aiohttp's queue of parsed requests has no public view; it is empty until the whole
        # head has arrived.
        return self._request is not None or (self._made and bool(self._handler._messages))

    @property
    def evictable(self) -> bool:
        """Idle, and made: one accepted in the same wakeup of the loop has no transport yet."""
        return not self.busy and self._transport is not None

    def standing(self) -> int | None:
        """Its place in the order of eviction (IDLE, PIPELINING, STALLED or DRAINING), or None
        when it must not go: busy with a request its client keeps up with, lasting (its
        application watches its own writes) or not made. Measures its write buffer (``_measured``)."""
        if self.evictable:
            return IDLE
        if self._held or not self._made or self._transport is None:
            return None
        if self._request is not None and self._handler._messages:
            return PIPELINING  # no probe, scraper or proxy sends a request before it read the last
        buffered = self._transport.get_write_buffer_size()
        if not (self._writing_paused or buffered > 0):
            return None
        measured, self._measured = self._measured, buffered
        return STALLED if measured is not None and buffered >= measured else DRAINING

    def evict(self) -> None:
        """Abort to make room: forgotten at once, since connection_lost comes a loop turn later."""
        assert self._transport is not None  # it has a standing
        log.debug(
            "%s connection closed to make room: %s (%d answered before)",
            self._name,
            "its client is behind on its answers" if self.busy else "idle the longest",
            self._answers,
        )
        self._forget()
        self._transport.abort()

    def abort_handshake(self) -> None:
        if not self._made and self._transport is not None:
            self._transport.abort()

    def _start_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        assert self._transport is not None  # the timer starts in connection_made
        log.debug(
            "%s connection closed: no request answered within %gs (%d answered before)",
            self._name,
            self._timeout,
            self._answers,
        )
        # abort, not close: close would wait to send what a client that stopped reading never takes.
        self._transport.abort()

    def _ended(self) -> None:
        assert self._timer is not None  # the loop makes a connection before it loses it
        self._timer.cancel()
        self._forget()

    def data_received(self, data: bytes) -> None:
        if self._made:
            self._handler.data_received(data)
        elif self._early is not None:
            # Before start_tls took over (uvloop reads before its first step): kept for the TLS
            # layer, and no more read until it has them. Reading is effectively paused now.
            self._early += data
            assert self._transport is not None  # made
            self._transport.pause_reading()
        else:
            self._unmade += data  # from the TLS layer: the handler gets it once it is made

    def eof_received(self) -> None:
        if self._made:
            self._handler.eof_received()
        # Else the client left before its handshake: returning None closes the transport.

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._measured is None and self._transport is not None:
            # The first measure of an answer the client is behind on: the guard's first look
            # then already tells a client that has taken some of it from one that took nothing.
            self._measured = self._transport.get_write_buffer_size()
        if self._made:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._made:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        if self._made:
            self._handler.connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed before anything is read from it."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Site(web.BaseSite):
    """aiohttp's TCPSite, except that ``guard`` admits the connections (and makes their TLS)."""

    __slots__ = ("_address", "_guard", "_port", "_tls")

    def __init__(
        self, runner: web.BaseRunner, address: str, port: int, guard: Guard, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(runner)
        self._address = address
        self._port = port
        self._guard = guard
        self._tls = tls

    @property
    def name(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self._address}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up before its sites start
        self._guard._taking(server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._guard.accept(server, self._tls), self._address, self._port, backlog=self._backlog
        )

    async def stop(self) -> None:
        await super().stop()
        self._guard.stop()
