"""Two micro-benchmarks behind design choices in docs/benchmarks.md ("What was tried").

Not a test, and not part of ``make bench``. Run it by hand: ``.venv/bin/python -m bench.micro``.

- ``exchange``: one small relayed exchange (a 120-byte command line) moved from one loopback
  socket to another by two ``splice`` calls through a pipe (the relay's path) or by
  ``recv_into`` and ``send`` (a copy through a buffer): CPU microseconds per exchange, producer
  and consumer included (the same for both, so the difference is the relay's own).
- ``session``: a minimal IMAP-like server (greeting, one tagged command, LOGOUT) under uvloop,
  written as asyncio ``Protocol`` callbacks, as one coroutine task per connection reading from
  a reader that stays registered (as ``SocketChannel`` does), or as the same coroutine without a
  task, resumed straight from that reader's callback (a "trampoline": no task, no future, no
  extra loop iteration per wait): server CPU microseconds per session, driven by client
  processes at saturation.

Bounded in count (``--exchanges``, ``--sessions``) and in time (client sockets time out); only
loopback addresses are used, and every process and socket it opens is closed before it returns.
"""

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import socket
from collections.abc import Awaitable, Callable, Generator
from multiprocessing.synchronize import Event
from typing import cast

import uvloop

LINE = b"a1 NOOP " + b"x" * 110 + b"\r\n"  # a 120-byte command line
GREETING = b"* OK ready\r\n"
CLIENT_TIMEOUT = 10.0  # seconds; a client never waits longer for one reply
CLIENT_PROCESSES = 4
WARM_UP_SESSIONS = 200
SESSION_STYLES = ("callbacks", "trampoline", "coroutines")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname(), timeout=CLIENT_TIMEOUT)
        far, _ = listener.accept()
    far.settimeout(CLIENT_TIMEOUT)
    return near, far


def exchange(count: int) -> dict[str, float]:
    """CPU microseconds per small exchange, by splice and by copy."""
    source_in, source = _loopback_pair()
    target, target_out = _loopback_pair()
    pipe_read, pipe_write = os.pipe()
    buffer = bytearray(65536)

    def by_splice() -> None:
        moved = os.splice(source.fileno(), pipe_write, len(buffer))
        os.splice(pipe_read, target.fileno(), moved)

    def by_copy() -> None:
        moved = source.recv_into(buffer)
        target.send(memoryview(buffer)[:moved])

    def measure(relay: Callable[[], None]) -> float:
        started = _cpu_seconds()
        for _ in range(count):
            source_in.send(LINE)
            relay()
            target_out.recv(len(buffer))
        return (_cpu_seconds() - started) / count * 1e6

    try:
        return {"splice": measure(by_splice), "recv/send": measure(by_copy)}
    finally:
        for sock in (source_in, source, target, target_out):
            sock.close()
        os.close(pipe_read)
        os.close(pipe_write)


class _CallbackSession(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"b"):
            self.transport.write(b"* BYE\r\nb OK\r\n")
            self.transport.close()
        else:
            self.transport.write(b"a OK\r\n")


async def _dialogue(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, readable: Callable[[], Awaitable[None]]
) -> None:
    """The minimal server's side of a session, whichever way it waits for the socket; it closes
    the socket (its reader is dropped first)."""
    try:
        await loop.sock_sendall(sock, GREETING)
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                await readable()
                continue
            if not data:
                return
            if data.startswith(b"b"):
                await loop.sock_sendall(sock, b"* BYE\r\nb OK\r\n")
                return
            await loop.sock_sendall(sock, b"a OK\r\n")
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def _coroutine_session(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Run as a task: each wait is a future the socket's reader sets."""
    waiter: asyncio.Future[None] | None = None

    def on_readable() -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def readable() -> asyncio.Future[None]:
        nonlocal waiter
        waiter = loop.create_future()
        return waiter

    loop.add_reader(sock.fileno(), on_readable)
    await _dialogue(loop, sock, readable)


class _Readable:
    """What a trampolined session awaits: the driver resumes it when its socket is readable."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield None


_READABLE = _Readable()


def _start_trampolined(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Run without a task: the socket's reader resumes the coroutine itself."""
    session = _dialogue(loop, sock, lambda: _READABLE)

    def step() -> None:
        with contextlib.suppress(StopIteration):
            session.send(None)

    loop.add_reader(sock.fileno(), step)
    step()


async def _serve(style: str, listener: socket.socket, ready: Event, stop: Event) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    if style == "callbacks":
        server = await loop.create_server(_CallbackSession, sock=listener)
    elif style == "trampoline":

        def accept_ready() -> None:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    return
                sock.setblocking(False)
                _start_trampolined(loop, sock)

        loop.add_reader(listener.fileno(), accept_ready)
    else:

        async def accept() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                sock.setblocking(False)
                task = loop.create_task(_coroutine_session(loop, sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = loop.create_task(accept())
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    if style == "callbacks":
        server.close()
    elif style == "trampoline":
        loop.remove_reader(listener.fileno())
    else:
        acceptor.cancel()


def _server_process(
    style: str, listener: socket.socket, ready: Event, stop: Event, cpu: "multiprocessing.Queue[float]"
) -> None:
    started = _cpu_seconds()
    uvloop.run(_serve(style, listener, ready, stop))
    cpu.put(_cpu_seconds() - started)


def _client(port: int, sessions: int) -> None:
    for _ in range(sessions):
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
            sock.recv(100)
            sock.sendall(b"a LOGIN user secret\r\n")
            sock.recv(100)
            sock.sendall(b"b LOGOUT\r\n")
            while sock.recv(100):
                pass


def session(style: str, sessions: int) -> float:
    """Server CPU microseconds per session in ``style`` ("callbacks", "trampoline" or "coroutines")."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    cpu: multiprocessing.Queue[float] = multiprocessing.Queue()
    server = multiprocessing.Process(target=_server_process, args=(style, listener, ready, stop, cpu))
    server.start()
    try:
        if not ready.wait(CLIENT_TIMEOUT):
            raise RuntimeError(f"the {style} server did not start")
        _client(port, WARM_UP_SESSIONS)
        per_client = sessions // CLIENT_PROCESSES
        clients = [
            multiprocessing.Process(target=_client, args=(port, per_client)) for _ in range(CLIENT_PROCESSES)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        stop.set()
        total = WARM_UP_SESSIONS + per_client * CLIENT_PROCESSES
        seconds: float = cpu.get(timeout=CLIENT_TIMEOUT)
        return seconds / total * 1e6
    finally:
        stop.set()
        server.join(CLIENT_TIMEOUT)
        if server.is_alive():
            server.kill()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=50_000)
    parser.add_argument("--sessions", type=int, default=4_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    for round_number in range(1, arguments.rounds + 1):
        per_exchange = exchange(arguments.exchanges)
        per_session = {style: session(style, arguments.sessions) for style in SESSION_STYLES}
        print(
            f"round {round_number}: exchange "
            + ", ".join(f"{name} {value:.2f} us" for name, value in per_exchange.items())
            + "; session "
            + ", ".join(f"{name} {value:.1f} us" for name, value in per_session.items())
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
