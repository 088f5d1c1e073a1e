"""The relay: once a login succeeded, copy bytes both ways until both sides are done.

``session`` calls ``relay`` with the two connected sockets; a TLS driver calls
``relay_transports`` with two transports (from ``loop.start_tls``). Plaintext sockets on Linux
take a zero-copy path (socket -> pipe -> socket with ``os.splice``, the bytes never enter
Python); everything else takes a transport/Protocol path with flow control. Both half-close
like TCP, end on an idle timeout, close both sides, and count exactly the bytes handed to the
kernel towards each peer (one blind spot: on the transport path, bytes still buffered when a peer
resets during the final flush count as sent). The relay never parses, never logs, never touches
a credential.

Drain (drain.py): once a stopping proxy says a session's turn has come, the relay waits for a
quiet moment and then writes the protocol's closing line to the client and closes both sides.
Quiet means: no byte moved either way for the turn's quiet period, the last bytes read came from
the backend, neither side has ended, and neither direction holds bytes (on the splice path: no
pipe held). The relay cannot parse, so this is a heuristic, and it is this one because IMAP
and POP3 are lock-step: a client that waits for nothing has had the last word answered.
A client in the middle of an IMAP APPEND literal spoke last, however long it pauses, and a
backend answering a command keeps the stream busy, so neither gets the closing line in the
middle; bytes still flowing (a FETCH literal, a multi-line reply) keep it busy too. What it
cannot tell:
- a client that pauses longer than the quiet period right after the backend's ``+``
  continuation (IMAP literal) gets the closing line instead of finishing; it was told nothing
  was accepted, so it retries and nothing is lost;
- a backend that stalls longer than the quiet period in the middle of a response (inside a FETCH
  literal or a POP3 RETR, on slow storage) gets the closing line written into it: the client
  sees a broken response, then the end of the connection, and fetches the message again;
- after an IMAP COMPRESS (RFC 4978) the plaintext ``BYE`` lands inside a deflate stream, which
  the client cannot read: it sees a broken stream and reconnects, as it would on a close.
Following the protocols closes these gaps only by reading what they carry in Python: an IMAP
follower that spliced only literals of 16 KiB or more (review M1, built and measured, then taken
out) cost 3.4 times the CPU per GiB of a FETCH of 8 KiB messages (0.85 against 0.25 CPU s/GiB),
most mail being that small, and POP3 bodies end with a dot, not a length. A rare drain that
needs a client's retry is the better trade. SMTP does not come here (mediation.py), and has none
of these gaps: its backends trust the proxy with commands a client must not send (XCLIENT).
The closing line is the proxy's, not the backend's: it is counted with the bytes that went down
to the client.

Hot path rules (nginx is the benchmark): no timer is rescheduled per chunk (the idle watchdog
reads a last-activity timestamp when it fires), and the splice path allocates nothing per
chunk beyond the integers ``os.splice`` returns and the float of that timestamp.
"""

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

from proxy.server.drain import Turn
from proxy.server.poller import Poller

# ---------------------------------------------------------------------------------------------
# Limits and sizes

# Capacity of a splice pipe, and the most one os.splice call moves. On loopback the kernel's TCP
# work dominates (Python's share is about 0.01 CPU s/GiB) and larger moves are cheaper. Measured
# here with bench/relay_throughput.py (1 GiB, medians of 3): 128 KiB pipes cost 0.52 CPU s/GiB,
# 256 KiB 0.42, 512 KiB 0.28, 1 MiB 0.25; the transport path 0.32; nginx's mail relay 0.79 with
# its default one-page proxy_buffer and 0.41 with 64k. Larger pipes pin more kernel memory per
# blocked direction and use up faster the per-user pipe budget (fs.pipe-user-pages-soft, 64 MiB
# by default: 128 pipes of this size), past which F_SETPIPE_SZ is refused.
PIPE_SIZE = 512 * 1024
# Empty pipes kept for reuse. A pump holds a pipe only while bytes sit in it (a blocked
# writer), so a busy proxy needs about one pipe per blocked direction plus one: 5,000 idle
# sessions cost their two sockets and no pipes (the descriptor limit here is 20,000).
IDLE_PIPES_KEPT = 16
# Transport path back-pressure: when a peer's write buffer passes the high-water mark, stop
# reading from the other side until it drains below the low-water mark. One read can overshoot
# the mark by at most one read (asyncio and uvloop read up to 256 KiB at a time), so a slow reader
# costs at most about 320 KiB of Python memory per direction. These are asyncio's own defaults.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
SPLICE_AVAILABLE = hasattr(os, "splice")

# How a relay ended (RelayResult.ended_by).
CLIENT = "client"  # the client closed first (EOF), then the backend
BACKEND = "backend"  # the backend closed first, then the client
IDLE = "idle"  # no byte in either direction for idle_timeout seconds
ERROR = "error"  # a reset or socket error on either side
CANCELLED = "cancelled"  # the task was cancelled (CancelledError is re-raised to the caller)
DRAINED = "drain"  # the proxy is stopping: the closing line went to the client at a quiet moment


@dataclass(frozen=True, slots=True)
class RelayResult:
    upstream_bytes: int  # client -> backend, including `to_backend`
    downstream_bytes: int  # backend -> client, including `to_client`
    ended_by: str  # "client" | "backend" | "idle" | "error" | "cancelled" | "drain"


class Predecessor(typing.Protocol):
    """The protocol a transport had before ``relay_transports`` took it over (channel.py's
    receiver, the login dialogue's): what it saw of the peer ending, which the relay's own
    protocol will never be told, and a way to pass on what the loop still delivers to it
    (uvloop's TLS transport schedules a lost connection's ``connection_lost`` for the protocol of
    that moment, and forgets the protocol, so ``set_protocol`` cannot redirect it)."""

    @property
    def eof(self) -> bool:
        """The peer sent EOF (a FIN, or TLS close_notify), or the connection is gone."""

    @property
    def lost(self) -> bool:
        """Its ``connection_lost`` has run: the connection is gone."""

    def forward_to(self, successor: asyncio.Protocol) -> None:
        """From now on, pass what the loop delivers on to ``successor``."""


class _Moving(typing.Protocol):
    def moved(self) -> tuple[int, int]: ...


class Progress:
    """The bytes a relay has handed to the kernel towards each peer so far, for readers outside
    it (the relayed-bytes metric, read at each scrape; the session's log line when it is
    cancelled). Read on demand, never pushed: the relay's hot path counts nothing for it. Only
    grows, and once the relay has ended it holds the final counts of its ``RelayResult``. Two
    slots and no closure: one lives as long as each relayed session, thousands of them idle."""

    __slots__ = ("_final", "_relay")

    def __init__(self) -> None:
        self._relay: _Moving | None = None
        self._final = (0, 0)

    def moved(self) -> tuple[int, int]:
        """(client -> backend, backend -> client) bytes so far: never less than it said before."""
        relay = self._relay
        if relay is not None:
            self._final = _highest(self._final, relay.moved())
        return self._final

    def follow(self, relay: _Moving) -> None:
        self._relay = relay

    def settle(self, result: RelayResult) -> None:
        # A TLS transport's buffer holds records, not the bytes handed to it, so an estimate read
        # while it was backed up can be a little off either way: a counter must not go back.
        self._final = _highest(self._final, (result.upstream_bytes, result.downstream_bytes))
        self._relay = None  # and the relay's objects go with it


def _highest(said: tuple[int, int], now: tuple[int, int]) -> tuple[int, int]:
    return max(said[0], now[0]), max(said[1], now[1])


async def relay(
    client: socket.socket,
    backend: socket.socket,
    *,
    to_backend: bytes = b"",
    to_client: bytes = b"",
    idle_timeout: float,
    splice: bool = True,
    drain: Turn | None = None,
    progress: Progress | None = None,
) -> RelayResult:
    """Relay between two connected TCP sockets until both have closed; close both.

    Args:
        client, backend: connected sockets; the relay owns them from now on.
        to_backend: bytes the client pipelined before the login finished; sent first.
        to_client: backend bytes read during the login; delivered to the client first.
        idle_timeout: seconds without a byte in either direction before both are closed.
        splice: use the zero-copy path when the platform has ``os.splice``.
        drain: the session's turn in a drain: once due, end at a quiet moment with its line.
        progress: follows the bytes handed to each peer while the relay runs, and after it
            ended however it ended (cancellation included).

    Returns:
        Bytes handed to each peer, and which event ended the relay.

    Raises:
        asyncio.CancelledError: the task was cancelled; both sockets are closed first.
    """
    client.setblocking(False)
    backend.setblocking(False)
    loop = asyncio.get_running_loop()
    if splice and SPLICE_AVAILABLE:
        spliced = _SpliceRelay(
            loop,
            client,
            backend,
            to_backend=to_backend,
            to_client=to_client,
            idle_timeout=idle_timeout,
            progress=progress or Progress(),
        )
        try:
            result = await _wait(spliced.done, spliced.finish, drain, spliced.drain_when_quiet)
            if result.ended_by == DRAINED:
                assert drain is not None
                # The pumps are stopped and hold nothing: the line follows the last relayed byte.
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(client, drain.closing)
                    # Counted like the bytes before it, as the transport path and the mediation do.
                    result = dataclasses.replace(
                        result, downstream_bytes=result.downstream_bytes + len(drain.closing)
                    )
                    spliced.progress.settle(result)
            return result
        finally:
            client.close()  # a drained relay leaves it open for the closing line
    # The transports start reading as soon as they exist, before both are wrapped; their
    # protocols hold what arrives until linked (_Side.data_received).
    state = _TransportRelay(loop, idle_timeout, progress or Progress())
    try:
        await loop.connect_accepted_socket(lambda: state.client, client)
        await loop.create_connection(lambda: state.backend, sock=backend)
    except BaseException:
        state.finish(ERROR)  # aborts whichever transport exists
        client.close()
        backend.close()
        raise
    return await state.run(to_backend, to_client, drain)


async def relay_transports(
    client: asyncio.Transport,
    backend: asyncio.Transport,
    *,
    to_backend: bytes = b"",
    to_client: bytes = b"",
    idle_timeout: float,
    drain: Turn | None = None,
    progress: Progress | None = None,
    client_before: Predecessor | None = None,
    backend_before: Predecessor | None = None,
) -> RelayResult:
    """Relay between two transports (plain or TLS) until both have closed; close both.

    The caller hands the transports over synchronously after its last read (their protocols
    are replaced here), and passes what it read but did not forward as ``to_backend`` and
    ``to_client``, and its protocols as ``client_before`` and ``backend_before``: a client that
    leaves right after its login reply can do so while the session still converts the other
    side, and an EOF or a lost connection seen (or scheduled) then would reach nobody. TLS
    cannot half-close: an EOF on either side of a TLS transport ends the relay once what is
    buffered has been flushed.

    Returns and raises as ``relay``.
    """
    state = _TransportRelay(asyncio.get_running_loop(), idle_timeout, progress or Progress())
    sides = ((state.client, client, client_before), (state.backend, backend, backend_before))
    for side, transport, before in sides:
        side.transport = transport
        transport.set_protocol(side)
        if before is not None:
            side.eof, side.lost = before.eof, before.lost
            if before.lost:
                state.lost += 1  # its connection_lost went to the predecessor
            before.forward_to(side)  # what the loop already scheduled for it
    return await state.run(to_backend, to_client, drain)


async def _wait(
    done: "asyncio.Future[RelayResult]",
    finish: Callable[[str], None],
    drain: Turn | None,
    on_due: Callable[[Turn], None],
) -> RelayResult:
    """Await the relay's end; on cancellation close everything, then re-raise. While it waits, a
    drain turn that comes (or has come) is handed to ``on_due``."""
    if drain is not None:
        drain.on_due = lambda: on_due(drain)
        if drain.due:
            on_due(drain)
    try:
        return await done
    except asyncio.CancelledError:
        finish(CANCELLED)
        raise
    finally:
        if drain is not None:
            drain.on_due = None


class _IdleWatch:
    """Calls ``on_idle`` once nothing moved for ``timeout`` seconds.

    Relays store ``loop.time()`` in ``last_activity`` when bytes move, and in ``last_from`` who
    sent the last bytes read (for the drain's quiet moment); the one timer is only re-armed when
    it fires, for ``last_activity + timeout``. If nothing moved since it was armed, the full
    timeout has passed without a byte.
    """

    __slots__ = ("_armed_for", "_handle", "_on_idle", "last_activity", "last_from", "loop", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, on_idle: Callable[[], None]) -> None:
        self.loop = loop
        self.timeout = timeout
        self._on_idle = on_idle
        self.last_activity = self._armed_for = loop.time()
        # The relay starts right after the backend's login reply went to the client.
        self.last_from = BACKEND
        self._handle = loop.call_at(self._armed_for + timeout, self._fire)

    def _fire(self) -> None:
        if self.last_activity == self._armed_for:
            self._on_idle()
            return
        self._armed_for = self.last_activity
        self._handle = self.loop.call_at(self._armed_for + self.timeout, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()


class _QuietWatch:
    """During a drain: calls ``on_quiet`` at the relay's first quiet moment (module docstring).

    Checks when the quiet period since the last byte would be over, and again a period later
    while the backend has not spoken last or a direction still holds bytes.
    """

    __slots__ = ("_handle", "_holds_nothing", "_on_quiet", "period", "watch")

    def __init__(
        self,
        watch: _IdleWatch,
        period: float,
        holds_nothing: Callable[[], bool],
        on_quiet: Callable[[], None],
    ) -> None:
        self.watch = watch
        self.period = period
        self._holds_nothing = holds_nothing
        self._on_quiet = on_quiet
        self._handle: asyncio.TimerHandle | None = None
        self._check()

    def _check(self) -> None:
        watch = self.watch
        silent = watch.loop.time() - watch.last_activity
        if silent >= self.period and watch.last_from == BACKEND and self._holds_nothing():
            self._handle = None
            self._on_quiet()
            return
        wait = self.period - silent if silent < self.period else self.period
        self._handle = watch.loop.call_later(wait, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


# ---------------------------------------------------------------------------------------------
# Zero-copy path: socket -> pipe -> socket with os.splice
#
# Each direction is a _Pump. Its invariant: the reader on the source is registered only while
# the pump holds nothing (no head bytes, empty pipe), and the writer on the destination only
# while it does. So a pipe is always empty when a read starts (EAGAIN then means "no data", never
# "pipe full"), EOF can be forwarded at once, and a slow reader stops the reads from the other side
# after one pipe's worth: back-pressure comes from the kernel's socket buffers.


class _Pipe(NamedTuple):
    read: int
    write: int
    full_size: bool  # F_SETPIPE_SZ succeeded; only these go back to the pool


_idle_pipes: list[_Pipe] = []


def _take_pipe() -> _Pipe:
    if _idle_pipes:
        return _idle_pipes.pop()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        # Over the per-user pipe budget: the kernel's default size works, only slower. Such a
        # pipe is never pooled, so full-size pipes come back once the load has passed.
        return _Pipe(read_end, write_end, full_size=False)
    return _Pipe(read_end, write_end, full_size=True)


def _drop_pipe(pipe: _Pipe, *, empty: bool) -> None:
    if empty and pipe.full_size and len(_idle_pipes) < IDLE_PIPES_KEPT:
        _idle_pipes.append(pipe)
        return
    os.close(pipe.read)
    os.close(pipe.write)


class _Pump:
    """One direction of a spliced relay: src socket -> pipe -> dst socket."""

    __slots__ = (
        "clock",
        "dst",
        "dst_fd",
        "eof",
        "head",
        "in_pipe",
        "moved",
        "name",
        "pipe",
        "poller",
        "relay",
        "src_fd",
        "watch",
        "writing",
    )

    def __init__(
        self, relay: "_SpliceRelay", src: socket.socket, dst: socket.socket, head: bytes, name: str
    ) -> None:
        self.relay = relay
        self.poller = relay.poller
        self.clock = relay.loop.time
        self.watch = relay.watch
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.name = name  # who closed first when this pump sees EOF
        self.head = memoryview(head)  # bytes to deliver before anything read from src
        self.pipe: _Pipe | None = None
        self.in_pipe = 0
        self.moved = 0  # bytes handed to dst, head included
        self.eof = False
        self.writing = False  # a writer callback is registered on dst

    def start(self) -> None:
        if self.head:
            self._on_writable()
        else:
            self.poller.add_reader(self.src_fd, self._on_readable)

    def _flush(self) -> bool:
        """Write the head, then the pipe, to dst; True when nothing is left to write."""
        while self.head:
            try:
                sent = os.write(self.dst_fd, self.head)
            except BlockingIOError:
                return False
            self.head = self.head[sent:]
            self.moved += sent
        while self.in_pipe:
            assert self.pipe is not None
            try:
                spliced = os.splice(self.pipe.read, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            self.in_pipe -= spliced
            self.moved += spliced
        return True

    def _on_readable(self) -> None:
        # One read per wakeup: the poller calls again while the socket stays readable (or in
        # error), and a busy connection cannot starve the others.
        try:
            if self.pipe is None:
                self.pipe = _take_pipe()
            self.in_pipe = os.splice(self.src_fd, self.pipe.write, PIPE_SIZE, flags=_SPLICE_FLAGS)
            if not self.in_pipe:
                self._at_eof()
                return
            self.watch.last_activity = self.clock()
            self.watch.last_from = self.name
            if not self._flush():
                self.poller.remove_reader(self.src_fd)
                self.poller.add_writer(self.dst_fd, self._on_writable)
                self.writing = True
                return
        except BlockingIOError:
            pass  # a spurious wakeup: nothing to read after all
        except OSError:
            self.relay.finish(ERROR)
            return
        self._release_pipe()

    def _on_writable(self) -> None:
        try:
            flushed = self._flush()
        except OSError:
            self.relay.finish(ERROR)
            return
        self.watch.last_activity = self.clock()
        if not flushed:
            if not self.writing:
                self.poller.add_writer(self.dst_fd, self._on_writable)
                self.writing = True
            return
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
        self._release_pipe()
        self.poller.add_reader(self.src_fd, self._on_readable)

    def _at_eof(self) -> None:
        self.poller.remove_reader(self.src_fd)
        self._release_pipe()
        self.eof = True
        self.relay.pump_ended(self)

    def _release_pipe(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            _drop_pipe(self.pipe, empty=True)
            self.pipe = None

    def holds_nothing(self) -> bool:
        """Still open, no pipe held, no head left: every byte read has reached dst."""
        return not self.eof and self.pipe is None and not self.head

    def close(self) -> None:
        self.poller.remove_reader(self.src_fd)
        self.poller.remove_writer(self.dst_fd)
        if self.pipe is not None:
            _drop_pipe(self.pipe, empty=not self.in_pipe)
            self.pipe = None


class _SpliceRelay:
    """Both pumps of one spliced relay, its idle watchdog and its end."""

    __slots__ = (
        "backend",
        "client",
        "done",
        "down",
        "finished",
        "first_eof",
        "loop",
        "poller",
        "progress",
        "quiet",
        "up",
        "watch",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        *,
        to_backend: bytes,
        to_client: bytes,
        idle_timeout: float,
        progress: Progress,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.done: asyncio.Future[RelayResult] = loop.create_future()
        self.finished = False
        self.first_eof = ""
        self.watch = _IdleWatch(loop, idle_timeout, lambda: self.finish(IDLE))
        if to_backend:  # the client pipelined commands: the backend has not answered them yet
            self.watch.last_from = CLIENT
        self.quiet: _QuietWatch | None = None
        self.poller = Poller.acquire(loop)
        self.up = _Pump(self, client, backend, to_backend, CLIENT)
        self.down = _Pump(self, backend, client, to_client, BACKEND)
        self.progress = progress
        progress.follow(self)
        self.up.start()
        if not self.finished:
            self.down.start()

    def moved(self) -> tuple[int, int]:
        return self.up.moved, self.down.moved

    def pump_ended(self, pump: _Pump) -> None:
        """``pump`` read EOF with nothing held: half-close its destination, as TCP would."""
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish(ERROR)
            return
        self.first_eof = self.first_eof or pump.name
        if self.up.eof and self.down.eof:
            self.finish(self.first_eof)

    def drain_when_quiet(self, turn: Turn) -> None:
        if self.quiet is None and not self.finished:
            self.quiet = _QuietWatch(
                self.watch,
                turn.quiet_period,
                lambda: self.up.holds_nothing() and self.down.holds_nothing(),
                lambda: self.finish(DRAINED),
            )

    def finish(self, ended_by: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.watch.cancel()
        if self.quiet is not None:
            self.quiet.cancel()
        self.up.close()
        self.down.close()
        self.poller.release()
        if ended_by != DRAINED:  # else relay() writes the closing line first
            self.client.close()
        self.backend.close()
        result = RelayResult(self.up.moved, self.down.moved, ended_by)
        self.progress.settle(result)
        if not self.done.done():  # a cancelled wait has cancelled it already
            self.done.set_result(result)


# ---------------------------------------------------------------------------------------------
# Transport path: each side's Protocol writes what it receives to the other side's transport.
# Flow control is asyncio's: a transport whose write buffer passes the high-water mark calls
# pause_writing() on its own protocol, which pauses reading on the other transport.


class _Side(asyncio.Protocol):
    """One end of a transport relay: what its own transport receives goes to ``out``, the
    peer's transport; and when its own transport's write buffer is full, ``out`` stops reading."""

    __slots__ = (
        "clock",
        "eof",
        "forwarded",
        "held",
        "lost",
        "name",
        "out",
        "peer",
        "state",
        "transport",
        "watch",
    )

    def __init__(self, state: "_TransportRelay", name: str) -> None:
        self.state = state
        self.name = name
        self.clock = state.loop.time
        self.watch = state.watch
        self.peer = self  # the other side, set by _TransportRelay
        # uvloop's transports implement asyncio.Transport without subclassing it, hence the casts.
        self.transport: asyncio.Transport | None = None
        self.out: asyncio.Transport | None = None  # the peer's transport, once the relay runs
        self.held: list[bytes] = []  # received before the relay ran (both sockets being wrapped)
        self.forwarded = 0  # bytes written to out
        self.eof = False
        self.lost = False  # the connection was gone before the relay took it over

    def own(self) -> asyncio.Transport:
        assert self.transport is not None, "connection_made has not run"
        return self.transport

    def sent(self) -> int:
        """Bytes forwarded that have left ``out``'s buffer for the kernel."""
        return self.forwarded - (self.out.get_write_buffer_size() if self.out else 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.held.append(data)
            self.own().pause_reading()
            return
        out.write(data)
        self.forwarded += len(data)
        self.watch.last_activity = self.clock()
        self.watch.last_from = self.name

    def eof_received(self) -> bool:
        self.eof = True
        if self.out is not None:
            self.state.side_ended(self)
        # Keep a plain transport open: the other direction may still be flowing. TLS cannot
        # half-close, and its transport shuts down whatever this says (asking to keep it open
        # only gets a warning logged).
        return self.own().get_extra_info("ssl_object") is None

    def pause_writing(self) -> None:
        assert self.out is not None, "nothing is written before the relay runs"
        self.out.pause_reading()

    def resume_writing(self) -> None:
        assert self.out is not None, "nothing is written before the relay runs"
        self.watch.last_activity = self.clock()  # the slow reader took bytes
        if not self.peer.eof:  # reading again after EOF is undefined under uvloop
            self.out.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.side_lost(exc)


class _TransportRelay:
    """Both sides of a transport relay, its idle watchdog and its end."""

    __slots__ = (
        "backend",
        "client",
        "done",
        "finished",
        "first_eof",
        "flushing",
        "loop",
        "lost",
        "progress",
        "quiet",
        "result",
        "watch",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, progress: Progress) -> None:
        self.loop = loop
        self.watch = _IdleWatch(loop, idle_timeout, lambda: self.finish(IDLE))
        self.client = _Side(self, CLIENT)
        self.backend = _Side(self, BACKEND)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.done: asyncio.Future[RelayResult] = loop.create_future()
        self.finished = False
        self.first_eof = ""
        self.lost = 0  # transports whose connection_lost has run
        self.result = RelayResult(0, 0, ERROR)
        self.quiet: _QuietWatch | None = None
        self.progress = progress
        progress.follow(self)
        self.flushing: asyncio.TimerHandle | None = None  # the deadline of a graceful close

    async def run(self, to_backend: bytes, to_client: bytes, drain: Turn | None) -> RelayResult:
        if self.finished:  # reset while the sockets were being wrapped: close the late one too
            self._close(graceful=False)
        else:
            self._link(to_backend, to_client)
        return await _wait(self.done, self.finish, drain, self.drain_when_quiet)

    def _link(self, to_backend: bytes, to_client: bytes) -> None:
        pairs = ((self.client, self.backend, to_backend), (self.backend, self.client, to_client))
        for side, peer, head in pairs:
            side.out = out = peer.own()
            if peer.lost:  # gone before the handover: nothing reaches it any more
                continue
            out.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
            if not side.eof:
                side.own().resume_reading()
            # Writes come after resume_reading: one that fills the buffer pauses the reader again.
            held = b"".join([head, *side.held])
            side.held.clear()
            if held:
                out.write(held)
                side.forwarded += len(held)
        if self.client.forwarded:  # the client pipelined commands: the backend has not answered yet
            self.watch.last_from = CLIENT
        for side in (self.client, self.backend):
            if side.lost:
                # What it sent before it left has gone to the other side, which finish() flushes
                # and closes: no reply can reach it.
                self.first_eof = side.name
                self.finish(side.name)
                return
        for side in (self.client, self.backend):
            if side.eof and not self.finished:
                self.side_ended(side)

    def side_ended(self, side: _Side) -> None:
        """``side`` sent EOF: half-close its peer (after the peer's buffer drains) if possible."""
        self.first_eof = self.first_eof or side.name
        out = side.out
        assert out is not None
        if side.peer.eof or not out.can_write_eof():  # TLS cannot half-close: end with a flush
            self.finish(self.first_eof)
        else:
            out.write_eof()

    def moved(self) -> tuple[int, int]:
        return self.client.sent(), self.backend.sent()

    def side_lost(self, exc: Exception | None) -> None:
        self.lost += 1
        if not self.finished:  # not closed by us: a reset, or a transport that closed itself
            self.finish(ERROR if exc is not None else self.first_eof or ERROR)
        if self.lost == 2:
            if self.flushing is not None:
                self.flushing.cancel()
            if not self.done.done():  # a cancelled wait has cancelled it already
                self.done.set_result(self.result)

    def drain_when_quiet(self, turn: Turn) -> None:
        if self.quiet is None and not self.finished:
            self.quiet = _QuietWatch(
                self.watch, turn.quiet_period, self._holds_nothing, lambda: self._say_goodbye(turn.closing)
            )

    def _holds_nothing(self) -> bool:
        return not any(side.eof or side.own().get_write_buffer_size() for side in (self.client, self.backend))

    def _say_goodbye(self, closing: bytes) -> None:
        # Behind everything relayed so far; close() below flushes it before closing. Counted
        # with the backend's bytes: all that went down to the client.
        self.client.own().write(closing)
        self.backend.forwarded += len(closing)
        self.finish(DRAINED)

    def finish(self, ended_by: str) -> None:
        """Close both transports: flushed when both sides ended well or the proxy drains, aborted
        otherwise. Cancelled while a graceful close still flushes (the proxy stops): cut."""
        if self.finished:
            if ended_by == CANCELLED:
                self._cut()
            return
        self.finished = True
        self.watch.cancel()
        if self.quiet is not None:
            self.quiet.cancel()
        graceful = ended_by in (CLIENT, BACKEND, DRAINED)
        # A graceful close flushes what is buffered; an abort drops it: count what reached the kernel.
        if graceful:
            up, down = self.client.forwarded, self.backend.forwarded
        else:
            up, down = self.client.sent(), self.backend.sent()
        self.result = RelayResult(up, down, ended_by)
        self.progress.settle(self.result)
        self._close(graceful=graceful)
        if self.lost == 2 and not self.done.done():  # both were gone before the relay began
            self.done.set_result(self.result)

    def _close(self, *, graceful: bool) -> None:
        if not graceful:
            self._cut()
            return
        for side in (self.client, self.backend):
            if side.transport is not None:  # else still being wrapped; run() closes it
                side.transport.close()
        # A peer that reads nothing would keep a plain transport flushing for ever (a TLS one has
        # its shutdown timeout): it gets the idle timeout, as a relay that moved nothing would.
        if self.lost < 2:
            self.flushing = self.loop.call_later(self.watch.timeout, self._cut)

    def _cut(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None:
                side.transport.abort()
