"""The admin endpoint on loopback: what /metrics, /healthz and /readyz answer, and that its
connections are guarded (start()'s cap and deadline reach the guard; the kubelet's probes get in
when silent connections, or clients that pipeline scrapes and never read them, fill the cap). The
guard's own behaviour is tested in test_connections.py.

Deadlines are set to two seconds through start()'s parameters. Nothing is timed: a test waits,
bounded by WAIT, for a connection to be closed, and what closed it is read from the debug log.
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from proxy.server import admin, connections
from proxy.settings import AdminSettings
from tests.proxy.server.conftest import WAIT
from tests.proxy.server.test_connections import connect, get, non_reading

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n"  # the blank line that ends it never comes
POLL = 0.01  # between two looks at the server's connections
# The deadline in these tests: short, yet long enough that a busy machine does not close a
# connection before its request (sent at once) is answered.
DEADLINE = 2.0
# Scrapes one flooding client pipelines: with SERIES series of about 50 octets in /metrics, some MB
# of answers, more than the socket buffers between it and the endpoint take.
PIPELINED = 100
SERIES = 1000


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


async def test_probes_are_answered_when_clients_that_pipeline_scrapes_and_never_read_fill_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The review's scenario (M3): no token needed, one connection per slot, scrapes pipelined and
    # the answers never read: each connection has a request in progress until its deadline.
    registry = CollectorRegistry()
    series = Counter("admin_test_series", "many series make a large answer", ["n"], registry=registry)
    for n in range(SERIES):
        series.labels(n=str(n)).inc()
    limit = 4
    async with serving(caplog, registry, max_connections=limit) as (server, port):
        flooding = []
        for _ in range(limit):
            reader, writer = await non_reading(port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n" * PIPELINED)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)  # then reads nothing
            flooding.append((reader, writer))
        await until_open(server, limit)
        reader, writer = await connect(port)
        assert await get(reader, writer, "/healthz") == (200, b"ok\n")
        assert await get(reader, writer, "/readyz") == (200, b"ready\n")
        writer.close()
        # The probe took the place of the flooding connection answered longest ago.
        (eviction,) = evictions(caplog)
        assert eviction.startswith(
            "admin connection closed to make room: its client is behind on its answers"
        )
        await until_open(server, limit - 1)  # it is gone, and the probe's connection closed
        for _, flooding_writer in flooding:
            # abort: close would wait to send requests the endpoint no longer reads.
            flooding_writer.transport.abort()


async def test_probes_are_answered_when_clients_sending_an_unmet_expectation_fill_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The review's scenario (O1): no token needed, one connection per slot, each with one request
    # that aiohttp answers 417 before any middleware runs, the answer read whole, nothing more sent.
    limit = 4
    async with serving(caplog, max_connections=limit) as (_, port):
        expecting = []
        for _ in range(limit):
            reader, writer = await connect(port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nExpect: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 417 "), head
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
            assert length is not None, head
            await asyncio.wait_for(reader.readexactly(int(length[1])), WAIT)
            expecting.append((reader, writer))
        reader, writer = await connect(port)
        assert await get(reader, writer, "/healthz") == (200, b"ok\n")
        writer.close()
        assert await until_closed(expecting[0][0]) == b""
        assert evictions(caplog) == [
            "admin connection closed to make room: idle the longest (1 answered before)"
        ]
        for _, expecting_writer in expecting:
            expecting_writer.close()
