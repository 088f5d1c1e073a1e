"""The admin endpoint on loopback: what /metrics, /healthz and /readyz answer, and the bounds on its
connections (a cap on how many are open, which evicts the one idle the longest and refuses only when
all are busy; a deadline to have a request answered).

Deadlines are set to two seconds through start()'s parameters. Nothing is timed: a test
waits, bounded by WAIT, for a connection to be closed, and the order in which deadlines passed is
read from the endpoint's debug log.
"""

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Info

from proxy.server import admin, connections
from proxy.settings import AdminSettings
from tests.proxy.server.conftest import WAIT

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n"  # the blank line that ends it never comes
POLL = 0.01  # between two looks at the server's connections
# The deadline in these tests: short, yet long enough that a busy machine does not close a
# connection before its request (sent at once) is answered.
DEADLINE = 2.0
# An answer larger than what the server's socket (at most 4 MiB here: net.ipv4.tcp_wmem) and a
# non-reading client's small buffers take: its writing lasts until the client reads it.
LARGE = 16_000_000


@contextlib.asynccontextmanager
async def serving(
    caplog: pytest.LogCaptureFixture,
    registry: CollectorRegistry | None = None,
    ready: Callable[[], bool] = lambda: True,
    *,
    max_connections: int = admin.MAX_CONNECTIONS,
    request_timeout: float = admin.REQUEST_TIMEOUT,
) -> AsyncIterator[tuple[web.Server, int]]:
    """Run the endpoint on a free loopback port; nothing at ERROR may be logged, cleanup included."""
    caplog.set_level(logging.DEBUG, logger=connections.__name__)
    runner = await admin.start(
        AdminSettings("127.0.0.1", 0),
        registry or CollectorRegistry(),
        ready,
        max_connections=max_connections,
        request_timeout=request_timeout,
    )
    try:
        assert runner.server is not None
        yield runner.server, runner.addresses[0][1]
    finally:
        await runner.cleanup()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
    """One request on a kept-alive connection: its status and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert b"connection: close" not in head.lower()
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
    assert length is not None, head
    body = await asyncio.wait_for(reader.readexactly(int(length[1])), WAIT)
    return int(head.split(b" ", 2)[1]), body


async def scrape(port: int) -> bytes:
    """/metrics on a new connection, which is then closed."""
    reader, writer = await connect(port)
    status, body = await get(reader, writer, "/metrics")
    writer.close()
    assert status == 200
    return body


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing the connection (a reset ends it too)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


async def until_open(server: web.Server, count: int) -> None:
    """Wait until the server has exactly ``count`` connections (admitted and not yet gone)."""
    for _ in range(int(WAIT / POLL)):
        if len(server.connections) == count:
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{len(server.connections)} admin connections open, expected {count}")


async def non_reading(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose client takes little before it reads: a 4 KiB receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT)
    return await asyncio.open_connection(sock=sock)


def large_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Info("admin_test_big", "a large scrape", registry=registry).info({"value": "x" * LARGE})
    return registry


async def busy_with_a_large_answer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A connection whose /metrics answer is being written: its head has arrived, the rest waits
    for the client to read. Returns the body's length."""
    reader, writer = await non_reading(port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
    assert length is not None, head
    assert int(length[1]) > LARGE
    return reader, writer, int(length[1])


def evictions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith("admin connection closed to make room")]


def expiries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == connections.__name__ and "no request answered" in r.getMessage()
    ]


async def test_metrics_and_probes_answer_on_one_kept_alive_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    Counter("admin_test_scrapes", "a counter to find in /metrics", registry=registry).inc()
    listening = [False]
    async with serving(caplog, registry, lambda: listening[0]) as (_, port):
        reader, writer = await connect(port)
        status, body = await get(reader, writer, "/metrics")
        assert status == 200
        assert b"admin_test_scrapes_total 1.0" in body
        assert await get(reader, writer, "/healthz") == (200, b"ok\n")
        status, body = await get(reader, writer, "/readyz")
        assert status == 503
        assert body.startswith(b"not ready")
        listening[0] = True
        assert await get(reader, writer, "/readyz") == (200, b"ready\n")
        assert (await get(reader, writer, "/users"))[0] == 404
        writer.close()


@pytest.mark.parametrize("sent", [b"", HALF_SENT], ids=["silent", "half-sent"])
async def test_a_connection_without_a_whole_request_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    # One connection at most: the scrape afterwards shows that the closed one gave its place back.
    async with serving(caplog, max_connections=1, request_timeout=DEADLINE) as (server, port):
        reader, writer = await connect(port)
        writer.write(sent)
        assert await until_closed(reader) == b""
        writer.close()
        assert expiries(caplog) == [
            "admin connection closed: no request answered within 2s (0 answered before)"
        ]
        await until_open(server, 0)
        await scrape(port)


async def test_a_client_that_stops_reading_its_answers_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = 3  # 48 MB of answers: more than a non-reading client's socket buffers take
    async with serving(caplog, large_registry(), request_timeout=DEADLINE) as (server, port):
        reader, writer = await non_reading(port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n" * requests)
        await until_open(server, 1)
        await until_open(server, 0)  # closed while the client still reads nothing
        received = await until_closed(reader)
        writer.close()
        answers = received.count(b"HTTP/1.1 200 OK")
        assert 1 <= answers < requests, answers
        assert len(received) < requests * LARGE
        assert expiries(caplog)


async def test_probes_are_answered_when_silent_connections_fill_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The review's scenario: 32 connections that send nothing, then the kubelet's probe.
    async with serving(caplog) as (server, port):  # the default cap and deadline: 32, 60 s
        silent = [await connect(port) for _ in range(admin.MAX_CONNECTIONS)]
        await until_open(server, admin.MAX_CONNECTIONS)
        reader, writer = await connect(port)
        assert await get(reader, writer, "/healthz") == (200, b"ok\n")
        assert await get(reader, writer, "/readyz") == (200, b"ready\n")
        writer.close()
        # The one accepted first made room, unanswered; the others are still open.
        assert await until_closed(silent[0][0]) == b""
        assert evictions(caplog) == [
            "admin connection closed to make room: idle the longest (0 answered before)"
        ]
        await until_open(server, admin.MAX_CONNECTIONS - 1)  # the probe's connection is closed
        for _, silent_writer in silent:
            silent_writer.close()
        assert not expiries(caplog)


async def test_the_connection_answered_last_is_evicted_after_older_idle_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `kept` is accepted first, but answered after `silent` was accepted: silent goes first.
    async with serving(caplog, max_connections=2) as (server, port):
        kept_reader, kept_writer = await connect(port)
        await until_open(server, 1)
        silent_reader, silent_writer = await connect(port)
        await until_open(server, 2)
        assert await get(kept_reader, kept_writer, "/healthz") == (200, b"ok\n")
        await scrape(port)
        assert await until_closed(silent_reader) == b""
        silent_writer.close()
        assert await get(kept_reader, kept_writer, "/healthz") == (200, b"ok\n")
        kept_writer.close()
        assert len(evictions(caplog)) == 1


async def test_a_connection_in_the_middle_of_an_answer_is_never_evicted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, large_registry(), max_connections=2) as (server, port):
        busy_reader, busy_writer, length = await busy_with_a_large_answer(port)
        idle_reader, idle_writer = await connect(port)
        await until_open(server, 2)
        # The busy connection is the older one; the idle one makes room.
        reader, writer = await connect(port)
        assert await get(reader, writer, "/healthz") == (200, b"ok\n")
        writer.close()
        assert await until_closed(idle_reader) == b""
        idle_writer.close()
        assert evictions(caplog) == [
            "admin connection closed to make room: idle the longest (0 answered before)"
        ]
        # The answer arrives whole, and its connection serves on.
        body = await asyncio.wait_for(busy_reader.readexactly(length), WAIT)
        assert body.count(b"x") >= LARGE
        assert await get(busy_reader, busy_writer, "/healthz") == (200, b"ok\n")
        busy_writer.close()


async def test_a_connection_over_the_cap_is_closed_unread_when_every_open_one_is_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, large_registry(), max_connections=1) as (server, port):
        busy_reader, busy_writer, length = await busy_with_a_large_answer(port)
        for _ in range(3):
            over_reader, over_writer = await connect(port)
            over_writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            assert await until_closed(over_reader) == b""  # no answer, and well before 60 s
            over_writer.close()
        assert caplog.messages.count("admin connection refused: all 1 connections open are busy") == 3
        assert not evictions(caplog)
        body = await asyncio.wait_for(busy_reader.readexactly(length), WAIT)
        assert body.count(b"x") >= LARGE
        # Answered, the connection is idle and makes room for the next one.
        await scrape(port)
        assert await until_closed(busy_reader) == b""
        busy_writer.close()
        await until_open(server, 0)
        assert not expiries(caplog)


async def test_each_answer_gives_the_connection_a_new_deadline(caplog: pytest.LogCaptureFixture) -> None:
    # `kept` is accepted before `idle` and answered after it: its deadline, counted from that
    # answer, passes after idle's. Counted from its accept it would pass first.
    async with serving(caplog, request_timeout=DEADLINE) as (server, port):
        kept_reader, kept_writer = await connect(port)
        await until_open(server, 1)
        idle_reader, idle_writer = await connect(port)
        await until_open(server, 2)
        assert await get(kept_reader, kept_writer, "/healthz") == (200, b"ok\n")
        assert await until_closed(idle_reader) == b""
        idle_writer.close()
        assert await until_closed(kept_reader) == b""
        kept_writer.close()
        assert expiries(caplog) == [
            "admin connection closed: no request answered within 2s (0 answered before)",
            "admin connection closed: no request answered within 2s (1 answered before)",
        ]
