"""The relay over real loopback TCP: both paths (splice, transports) under uvloop and asyncio.

Each test plays the mail client and the backend on the far ends of two TCP connections and
runs ``relay.relay`` on the near ends, as the session driver does. Every scenario runs under
one overall time bound and every read loop is bounded in count; no assertion is about time.
"""

import asyncio
import hashlib
import os
import random
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.server import relay

T = TypeVar("T")

SCENARIO_BOUND = 120.0  # seconds: a hung relay fails the test instead of hanging the suite
LONG_IDLE = 3600.0  # an idle timeout that never fires during a test
ENDS_WITHIN = 10.0  # seconds a relay whose peers are done may take to end (it takes milliseconds)
WAIT_FOR_END = 10.0  # seconds a relay that should end at once may take on a loaded machine
BULK = 20 * 1024 * 1024
RECV_SIZE = 256 * 1024
UP_PAYLOAD = random.Random(1).randbytes(BULK)
DOWN_PAYLOAD = random.Random(2).randbytes(BULK)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run one scenario to completion on a fresh event loop of the parametrized kind."""

    async def bounded(scenario: Coroutine[Any, Any, T]) -> T:
        async with asyncio.timeout(SCENARIO_BOUND):
            return await scenario

    def runner(scenario: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            return loop_runner.run(bounded(scenario))

    return runner


@pytest.fixture(params=[True, False], ids=["splice", "transports"])
def splice(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _open_fds() -> int:
    """Descriptors this process holds, not counting the relay's pool of idle pipes."""
    return len(os.listdir("/proc/self/fd")) - 2 * len(relay._idle_pipes)


@pytest.fixture(scope="module")
def uvloop_process_state() -> None:
    """libuv opens a process-wide signal pipe with its first loop, and keeps it: open it now."""
    uvloop.new_event_loop().close()


@pytest.fixture(autouse=True)
def no_descriptor_leak(uvloop_process_state: None) -> Iterator[None]:
    before = _open_fds()
    yield
    assert _open_fds() == before


# Small socket buffers (the kernel doubles them; setting one turns autotuning off) so that a
# few hundred KiB fill everything between the relay and a peer that does not read.
TIGHT_BUFFER = 16 * 1024


def _tcp_pair(*, tight: bool) -> tuple[socket.socket, socket.socket]:
    """A TCP connection on 127.0.0.1 as (connecting end, accepted end), both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connecting = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if tight:  # before connect and accept, so the advertised windows are small from the start
            for sock in (listener, connecting):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TIGHT_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TIGHT_BUFFER)
        connecting.connect(listener.getsockname())
        accepted, _ = listener.accept()
    connecting.setblocking(False)
    accepted.setblocking(False)
    return connecting, accepted


@dataclass
class Ends:
    """The four ends: client -- proxy_client | relay | proxy_backend -- backend."""

    client: socket.socket
    proxy_client: socket.socket
    proxy_backend: socket.socket
    backend: socket.socket

    def all(self) -> tuple[socket.socket, ...]:
        return (self.client, self.proxy_client, self.proxy_backend, self.backend)


def _ends(*, tight: bool) -> Iterator[Ends]:
    client, proxy_client = _tcp_pair(tight=tight)
    proxy_backend, backend = _tcp_pair(tight=tight)
    made = Ends(client, proxy_client, proxy_backend, backend)
    yield made
    for sock in made.all():
        sock.close()


@pytest.fixture
def ends() -> Iterator[Ends]:
    """Loopback connections with the kernel's default (autotuned) buffers."""
    yield from _ends(tight=False)


@pytest.fixture
def tight_ends() -> Iterator[Ends]:
    """Loopback connections whose buffers hold little: the relay's writes block early."""
    yield from _ends(tight=True)


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (bounded: 3,000 polls of 10 ms) until ``condition`` holds."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def _read_to_eof(sock: socket.socket, *, limit: int) -> bytes:
    """Everything ``sock`` receives until EOF; fails past ``limit`` bytes."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    for _ in range(limit + 2):  # every read but the last returns at least one byte
        chunk = await loop.sock_recv(sock, RECV_SIZE)
        if not chunk:
            return bytes(received)
        received += chunk
        assert len(received) <= limit, "received more than was sent"
    raise AssertionError("no EOF")


async def _digest_to_eof(sock: socket.socket, *, limit: int) -> tuple[int, str]:
    """Length and SHA-256 of everything ``sock`` receives until EOF, without keeping it."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    buffer = bytearray(RECV_SIZE)
    total = 0
    for _ in range(limit + 2):
        size = await loop.sock_recv_into(sock, buffer)
        if not size:
            return total, digest.hexdigest()
        digest.update(memoryview(buffer)[:size])
        total += size
        assert total <= limit, "received more than was sent"
    raise AssertionError("no EOF")


def _start(
    ends: Ends,
    *,
    splice: bool,
    idle_timeout: float = LONG_IDLE,
    progress: relay.Progress | None = None,
    **heads: bytes,
) -> asyncio.Task[relay.RelayResult]:
    """Run the relay on the proxy's two ends, as the session driver does after a login."""
    return asyncio.create_task(
        relay.relay(
            ends.proxy_client,
            ends.proxy_backend,
            idle_timeout=idle_timeout,
            splice=splice,
            progress=progress,
            **heads,
        )
    )


def _assert_closed(*socks: socket.socket) -> None:
    assert all(sock.fileno() == -1 for sock in socks)


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout zero)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("buffers", ["ends", "tight_ends"], ids=["default-buffers", "tight-buffers"])
def test_bulk_both_directions_at_once_is_byte_identical(
    run: Callable[[Coroutine[Any, Any, None]], None],
    splice: bool,
    buffers: str,
    request: pytest.FixtureRequest,
) -> None:
    """20 MB each way at the same time arrive unchanged, counted exactly; the client closed first.

    With tight buffers the relay's writes block over and over (pipe held, or transport paused).
    """
    ends: Ends = request.getfixturevalue(buffers)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)

        async def client() -> tuple[int, str]:
            async def send() -> None:
                await loop.sock_sendall(ends.client, UP_PAYLOAD)
                ends.client.shutdown(socket.SHUT_WR)

            sending = asyncio.create_task(send())
            received = await _digest_to_eof(ends.client, limit=BULK)
            await sending
            return received

        async def backend() -> tuple[int, str]:
            sending = asyncio.create_task(loop.sock_sendall(ends.backend, DOWN_PAYLOAD))
            received = await _digest_to_eof(ends.backend, limit=BULK)
            await sending
            ends.backend.shutdown(socket.SHUT_WR)  # only after the client's EOF came through
            return received

        at_client, at_backend, result = await asyncio.gather(client(), backend(), task)
        assert at_backend == (BULK, hashlib.sha256(UP_PAYLOAD).hexdigest())
        assert at_client == (BULK, hashlib.sha256(DOWN_PAYLOAD).hexdigest())
        assert result == relay.RelayResult(BULK, BULK, relay.CLIENT)
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


@pytest.mark.parametrize(
    ("closer", "first", "tail", "ended_by"),
    [
        ("client", b"a1 LOGOUT\r\n", b"* BYE logging out\r\na1 OK LOGOUT completed\r\n", relay.CLIENT),
        ("backend", b"* BYE server shutting down\r\n", b"a2 LOGOUT\r\n", relay.BACKEND),
    ],
)
def test_half_close_lets_the_other_side_finish(
    run: Callable[[Coroutine[Any, Any, None]], None],
    splice: bool,
    ends: Ends,
    closer: str,
    first: bytes,
    tail: bytes,
    ended_by: str,
) -> None:
    """EOF from one side half-closes the other; what the other side still sends gets through."""
    closing, peer = (ends.client, ends.backend) if closer == "client" else (ends.backend, ends.client)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        await loop.sock_sendall(closing, first)
        closing.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(peer, limit=len(first)) == first
        await loop.sock_sendall(peer, tail)
        peer.close()
        assert await _read_to_eof(closing, limit=len(tail)) == tail
        upstream, downstream = (first, tail) if closer == "client" else (tail, first)
        assert await task == relay.RelayResult(len(upstream), len(downstream), ended_by)

    run(scenario())


@pytest.mark.parametrize("head_size", [32, 2 * 1024 * 1024], ids=["pipelined-line", "larger-than-buffers"])
def test_buffered_bytes_go_first_and_are_counted(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, tight_ends: Ends, head_size: int
) -> None:
    """to_backend and to_client precede bytes already waiting in the sockets, and are counted."""
    ends = tight_ends
    to_backend = (b"a2 NOOP\r\n" * head_size)[:head_size]
    to_client = (b"* 3 EXISTS\r\n" * head_size)[:head_size]
    from_client, from_backend = b"a3 SELECT INBOX\r\n", b"* 1 RECENT\r\n"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(ends.client, from_client)  # already waiting when the relay starts
        await loop.sock_sendall(ends.backend, from_backend)
        ends.client.shutdown(socket.SHUT_WR)
        task = _start(ends, splice=splice, to_backend=to_backend, to_client=to_client)
        expected_up, expected_down = to_backend + from_client, to_client + from_backend
        at_backend = await _read_to_eof(ends.backend, limit=len(expected_up))
        ends.backend.shutdown(socket.SHUT_WR)
        at_client = await _read_to_eof(ends.client, limit=len(expected_down))
        assert at_backend == expected_up
        assert at_client == expected_down
        assert await task == relay.RelayResult(len(expected_up), len(expected_down), relay.CLIENT)

    run(scenario())


def test_eof_before_the_relay_starts_is_forwarded(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    """A client that half-closed during the login still gets the backend's answer."""
    tail = b"* BYE\r\na1 OK LOGOUT completed\r\n"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ends.client.shutdown(socket.SHUT_WR)
        task = _start(ends, splice=splice)
        assert await _read_to_eof(ends.backend, limit=0) == b""
        await loop.sock_sendall(ends.backend, tail)
        ends.backend.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(ends.client, limit=len(tail)) == tail
        assert await task == relay.RelayResult(0, len(tail), relay.CLIENT)

    run(scenario())


@dataclass
class Held:
    """What a hook saw of the relay holding bytes for a peer that does not keep up."""

    blocked: int = 0  # splice: flushes that left bytes in the pipe; transports: pause_writing calls
    most: int = 0  # the most bytes held at once (in the pipe, or in the peer's write buffer)
    largest_read: int = 0  # transports: the largest chunk one read delivered


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Held:
    """Hook both paths to record how many bytes the relay holds for a peer."""
    seen = Held()
    flush, forward, pause = relay._Pump._flush, relay._Side.data_received, relay._Side.pause_writing

    def watched_flush(pump: relay._Pump) -> bool:
        seen.most = max(seen.most, pump.in_pipe)
        flushed = flush(pump)
        seen.blocked += not flushed
        return flushed

    def watched_forward(side: relay._Side, data: bytes) -> None:
        forward(side, data)
        if side.out is not None:
            seen.most = max(seen.most, side.out.get_write_buffer_size())
            seen.largest_read = max(seen.largest_read, len(data))

    def watched_pause(side: relay._Side) -> None:
        seen.blocked += 1
        pause(side)

    monkeypatch.setattr(relay._Pump, "_flush", watched_flush)
    monkeypatch.setattr(relay._Side, "data_received", watched_forward)
    monkeypatch.setattr(relay._Side, "pause_writing", watched_pause)
    return seen


def test_slow_reader_bounds_what_the_relay_holds(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, tight_ends: Ends, held: Held
) -> None:
    """A client reading 4 KiB at a time never makes the relay hold more than its limit.

    Spliced, the relay holds at most one pipe; with transports, at most the high-water mark
    plus the one read that crossed it. Either way far less than the 8 MB the backend sends.
    """
    ends = tight_ends
    flood = DOWN_PAYLOAD[: 8 * 1024 * 1024]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)

        async def backend() -> None:
            await loop.sock_sendall(ends.backend, flood)
            ends.backend.shutdown(socket.SHUT_WR)

        sending = asyncio.create_task(backend())
        received = bytearray()
        for _ in range(len(flood) + 1):  # small reads with a yield in between: a slow client
            chunk = await loop.sock_recv(ends.client, 4096)
            if not chunk:
                break
            received += chunk
            await asyncio.sleep(0)
        await sending
        assert received == flood
        ends.client.shutdown(socket.SHUT_WR)
        assert await task == relay.RelayResult(0, len(flood), relay.BACKEND)

    run(scenario())
    assert held.blocked > 0, "the relay never had to hold bytes back"
    if splice:
        assert 0 < held.most <= relay.PIPE_SIZE
    else:
        assert 0 < held.most <= relay.WRITE_HIGH_WATER + held.largest_read
    assert held.most < len(flood) // 8


def test_reset_while_bytes_are_held_frees_everything(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, tight_ends: Ends, held: Held
) -> None:
    """The client resets while the relay holds backend bytes for it: all closed, nothing leaks."""
    ends = tight_ends
    flood = DOWN_PAYLOAD[: 4 * 1024 * 1024]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        sending = asyncio.create_task(loop.sock_sendall(ends.backend, flood))
        await _until(lambda: held.blocked > 0)
        _reset(ends.client)
        result = await task
        assert result.ended_by == relay.ERROR
        assert result.upstream_bytes == 0
        assert 0 < result.downstream_bytes < len(flood)
        with pytest.raises(ConnectionError):  # the relay closed on bytes it had not read: an RST
            await sending
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


def test_idle_timeout_closes_both(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    """No byte either way for idle_timeout: both closed, ended_by 'idle', bytes so far counted."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice, idle_timeout=0.2)
        await loop.sock_sendall(ends.client, b"a1 IDLE\r\n")
        assert await loop.sock_recv(ends.backend, 64) == b"a1 IDLE\r\n"
        assert await task == relay.RelayResult(9, 0, relay.IDLE)
        assert await loop.sock_recv(ends.client, 64) == b""
        assert await loop.sock_recv(ends.backend, 64) == b""
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


def test_traffic_keeps_the_relay_from_idling(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    """Round trips for twice the idle timeout keep the relay up; silence then ends it."""
    idle_timeout, rounds, gap = 1.0, 40, 0.05  # 40 gaps of 50 ms: at least 2 s of traffic

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice, idle_timeout=idle_timeout)
        started = loop.time()
        for _ in range(rounds):
            await loop.sock_sendall(ends.client, b"a NOOP\r\n")
            assert await loop.sock_recv(ends.backend, 64) == b"a NOOP\r\n"
            await loop.sock_sendall(ends.backend, b"a OK\r\n")
            assert await loop.sock_recv(ends.client, 64) == b"a OK\r\n"
            await asyncio.sleep(gap)
        assert loop.time() - started >= 2 * idle_timeout  # the traffic outlasted the timeout
        assert not task.done()
        assert await task == relay.RelayResult(8 * rounds, 6 * rounds, relay.IDLE)

    run(scenario())


def test_cancellation_closes_both_and_reraises(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        await loop.sock_sendall(ends.client, b"a1 NOOP\r\n")
        assert await loop.sock_recv(ends.backend, 64) == b"a1 NOOP\r\n"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _assert_closed(ends.proxy_client, ends.proxy_backend)
        assert await loop.sock_recv(ends.client, 64) == b""
        assert await loop.sock_recv(ends.backend, 64) == b""

    run(scenario())


def test_progress_follows_the_relay_and_keeps_its_counts_after_a_cancellation(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    """What the metrics read while a relay runs (nothing is pushed from the hot path), and what
    the session logs when the stop cancels it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        progress = relay.Progress()
        task = _start(ends, splice=splice, progress=progress, to_client=b"a0 OK\r\n")
        assert await loop.sock_recv(ends.client, 64) == b"a0 OK\r\n"
        await loop.sock_sendall(ends.client, b"a1 NOOP\r\n")
        assert await loop.sock_recv(ends.backend, 64) == b"a1 NOOP\r\n"
        await _until(lambda: progress.moved() == (9, 7))
        await loop.sock_sendall(ends.backend, b"a1 OK\r\n")
        assert await loop.sock_recv(ends.client, 64) == b"a1 OK\r\n"
        await _until(lambda: progress.moved() == (9, 14))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert progress.moved() == (9, 14)

    run(scenario())


def test_progress_never_goes_back() -> None:
    """A TLS transport's buffer counts records, not the bytes handed to it: a reading taken while
    it is backed up can come out a little lower than the one before. The metric is a counter."""

    class Relay:
        readings = iter([(10, 1000), (10, 978), (12, 1200)])

        def moved(self) -> tuple[int, int]:
            return next(self.readings)

    progress = relay.Progress()
    progress.follow(Relay())
    assert [progress.moved() for _ in range(3)] == [(10, 1000), (10, 1000), (12, 1200)]
    progress.settle(relay.RelayResult(12, 1190, relay.ERROR))  # an abort's estimate
    assert progress.moved() == (12, 1200)


def test_progress_ends_with_the_relays_result(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        progress = relay.Progress()
        task = _start(ends, splice=splice, progress=progress)
        await loop.sock_sendall(ends.backend, b"* BYE\r\n")
        assert await loop.sock_recv(ends.client, 64) == b"* BYE\r\n"
        ends.backend.shutdown(socket.SHUT_WR)
        ends.client.shutdown(socket.SHUT_WR)
        result = await task
        assert progress.moved() == (result.upstream_bytes, result.downstream_bytes) == (0, 7)

    run(scenario())


@pytest.mark.parametrize("resetting", ["client", "backend"])
def test_reset_on_one_side_ends_both(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends, resetting: str
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        await loop.sock_sendall(ends.client, b"a1 NOOP\r\n")
        assert await loop.sock_recv(ends.backend, 64) == b"a1 NOOP\r\n"
        _reset(ends.client if resetting == "client" else ends.backend)
        assert await task == relay.RelayResult(9, 0, relay.ERROR)
        survivor = ends.backend if resetting == "client" else ends.client
        assert await loop.sock_recv(survivor, 64) == b""
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


@pytest.mark.parametrize("resetting", ["client", "backend"])
def test_last_bytes_then_a_reset_reach_the_other_side_and_end_both(
    run: Callable[[Coroutine[Any, Any, None]], None], splice: bool, ends: Ends, resetting: str
) -> None:
    """Under uvloop a socket that errors is watched no longer once the error was reported, so a
    peer's last bytes and its reset, arriving together, must still end the relay (it waited for
    the idle timeout before)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        last = b"* BYE last words\r\n"
        speaker, survivor = (
            (ends.client, ends.backend) if resetting == "client" else (ends.backend, ends.client)
        )
        await loop.sock_sendall(speaker, last)
        _reset(speaker)
        async with asyncio.timeout(WAIT_FOR_END):
            result = await task
        assert result.ended_by == relay.ERROR
        assert (result.upstream_bytes, result.downstream_bytes) == (
            (len(last), 0) if resetting == "client" else (0, len(last))
        )
        assert await _read_to_eof(survivor, limit=len(last)) == last
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


def test_splice_flag_selects_the_zero_copy_path(
    run: Callable[[Coroutine[Any, Any, None]], None],
    splice: bool,
    ends: Ends,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """splice=True moves the bytes with os.splice; splice=False never calls it."""
    calls = 0
    real_splice = os.splice

    def counting_splice(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        return real_splice(*args, **kwargs)

    monkeypatch.setattr(os, "splice", counting_splice)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=splice)
        await loop.sock_sendall(ends.client, b"a1 NOOP\r\n")
        ends.client.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(ends.backend, limit=9) == b"a1 NOOP\r\n"
        ends.backend.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(ends.client, limit=0) == b""
        assert await task == relay.RelayResult(9, 0, relay.CLIENT)

    run(scenario())
    assert (calls > 0) == splice


# ---------------------------------------------------------------------------------------------
# relay_transports: the same transport path over TLS, as a driver after STARTTLS would use it


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class _Handshaking(asyncio.Protocol):
    """The driver's protocol before the hand-over; the client sends nothing until the relay runs."""

    def data_received(self, data: bytes) -> None:
        raise AssertionError(f"{len(data)} bytes arrived before the hand-over")


class _Watching(asyncio.Protocol):
    """The driver's protocol before the hand-over (a relay.Predecessor): records what it sees of
    the peer ending, and passes on what still arrives once the relay took over."""

    def __init__(self) -> None:
        self.eof = False
        self.lost = False
        self.successor: asyncio.Protocol | None = None

    def forward_to(self, successor: asyncio.Protocol) -> None:
        self.successor = successor

    def eof_received(self) -> bool:
        if self.successor is not None:
            return bool(self.successor.eof_received())
        self.eof = True
        return True  # kept open, as the login dialogue's receiver keeps a plain transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.successor is not None:
            self.successor.connection_lost(exc)
            return
        self.eof = self.lost = True


@pytest.mark.parametrize("leaving", ["client", "backend"])
def test_a_peer_gone_before_the_hand_over_ends_the_relay(
    run: Callable[[Coroutine[Any, Any, None]], None], ends: Ends, leaving: str
) -> None:
    """A client that resets right after its login reply, while the session is still converting
    the backend, has its connection_lost go to the driver's protocol: told so (Predecessor), the
    relay ends at once, after what was pipelined towards the other side has been delivered."""
    pipelined = b"a2 NOOP\r\n"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, client_protocol = await loop.connect_accepted_socket(_Watching, ends.proxy_client)
        backend, backend_protocol = await loop.create_connection(_Watching, sock=ends.proxy_backend)
        gone, protocol, other = (
            (ends.client, client_protocol, ends.backend)
            if leaving == "client"
            else (ends.backend, backend_protocol, ends.client)
        )
        _reset(gone)
        await _until(lambda: protocol.lost)
        result = await asyncio.wait_for(
            relay.relay_transports(
                client,
                backend,
                to_backend=pipelined,
                idle_timeout=LONG_IDLE,
                client_before=client_protocol,
                backend_before=backend_protocol,
            ),
            ENDS_WITHIN,
        )
        assert result.ended_by == leaving
        assert await _read_to_eof(other, limit=64) == (pipelined if leaving == "client" else b"")

    run(scenario())


def test_a_closing_flush_to_a_client_that_reads_nothing_is_cut_after_the_idle_timeout(
    run: Callable[[Coroutine[Any, Any, None]], None], tight_ends: Ends
) -> None:
    """Both peers have ended, but the client takes none of the backend's last answer: a plain
    transport's close would wait to flush it for ever, holding the session. It gets the idle
    timeout, as a relay that moved nothing would."""
    ends = tight_ends

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = _start(ends, splice=False, idle_timeout=0.5)
        ends.client.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(ends.backend, limit=64) == b""
        # More than the tight client socket takes, less than the relay's high-water mark (so it
        # keeps reading the backend, and sees its EOF).
        await loop.sock_sendall(ends.backend, b"x" * (relay.WRITE_HIGH_WATER - 1024))
        ends.backend.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(task, ENDS_WITHIN)
        assert result.ended_by == relay.CLIENT
        _assert_closed(ends.proxy_client, ends.proxy_backend)

    run(scenario())


def test_an_eof_before_the_hand_over_is_forwarded(
    run: Callable[[Coroutine[Any, Any, None]], None], ends: Ends
) -> None:
    """A plain peer's FIN seen by the driver's protocol half-closes the other side once relayed."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, client_protocol = await loop.connect_accepted_socket(_Watching, ends.proxy_client)
        backend, _ = await loop.create_connection(_Watching, sock=ends.proxy_backend)
        ends.client.shutdown(socket.SHUT_WR)
        await _until(lambda: client_protocol.eof)
        task = asyncio.create_task(
            relay.relay_transports(client, backend, idle_timeout=LONG_IDLE, client_before=client_protocol)
        )
        assert await _read_to_eof(ends.backend, limit=64) == b""
        await loop.sock_sendall(ends.backend, b"* BYE\r\n")
        ends.backend.shutdown(socket.SHUT_WR)
        assert await _read_to_eof(ends.client, limit=64) == b"* BYE\r\n"
        assert await asyncio.wait_for(task, ENDS_WITHIN) == relay.RelayResult(0, 7, relay.CLIENT)

    run(scenario())


def test_relay_transports_carries_tls(
    run: Callable[[Coroutine[Any, Any, None]], None], ends: Ends, certificate: tuple[Path, Path]
) -> None:
    """A TLS client transport relays to a plain backend; the client's close ends the relay."""
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    up, down = UP_PAYLOAD[: 1024 * 1024], DOWN_PAYLOAD[: 1024 * 1024]
    to_backend, to_client = b"a1 NOOP\r\n", b"* OK [CAPABILITY IMAP4rev1] ready\r\n"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        plain, protocol = await loop.connect_accepted_socket(_Handshaking, ends.proxy_client)
        backend, _ = await loop.create_connection(_Handshaking, sock=ends.proxy_backend)
        (reader, writer), tls = await asyncio.gather(
            asyncio.open_connection(sock=ends.client, ssl=client_context, server_hostname="localhost"),
            loop.start_tls(plain, protocol, server_context, server_side=True),
        )
        assert tls is not None

        async def peers() -> None:
            writer.write(up)
            await loop.sock_sendall(ends.backend, down)
            assert await reader.readexactly(len(to_client) + len(down)) == to_client + down
            writer.close()  # TLS cannot half-close: this ends the relay
            received = await _read_to_eof(ends.backend, limit=len(to_backend) + len(up))
            assert received == to_backend + up
            await writer.wait_closed()

        # Created first but started only once this task waits inside relay_transports: the
        # hand-over (set_protocol) happens before any byte is sent, as a driver would do it.
        peering = asyncio.create_task(peers())
        result = await relay.relay_transports(
            tls, backend, to_backend=to_backend, to_client=to_client, idle_timeout=LONG_IDLE
        )
        await peering
        expected = relay.RelayResult(len(to_backend) + len(up), len(to_client) + len(down), relay.CLIENT)
        assert result == expected

    run(scenario())
