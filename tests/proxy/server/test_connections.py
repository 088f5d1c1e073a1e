"""The connection guard on loopback: a small aiohttp application served through a Guard, plain and
over TLS. The cap evicts the connection idle the longest (a request aiohttp answered before any
middleware counts as answered), else one whose client is behind on its answers (pipelining, then
taking nothing, then reading slowly; of these the one whose request was taken first, so a
keep-alive client's newest request outlasts fresher connections), and refuses only when all are
busy with clients that keep up; the deadline closes a connection without a request answered in
time (silent, half-sent, stopped reading, or silent in its TLS handshake); a lasting request has
no deadline and is never evicted; a whole request aiohttp has not started yet is not evicted, a
half-sent one is; a connection admitted as the site stops is closed.

Deadlines are two seconds. Nothing is timed: a test waits, bounded by WAIT, for a connection to
be closed, and the order in which deadlines passed is read from the guard's debug log.
"""

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.server import connections
from testbed.tlscerts import TestAuthority
from tests.proxy.server.conftest import WAIT

HALF_SENT = b"GET /small HTTP/1.1\r\nHost: guarded\r\n"  # the blank line that ends it never comes
POLL = 0.01  # between two looks at the server's connections
# The deadline in these tests: short, yet long enough that a busy machine does not close a
# connection before its request (sent at once) is answered.
DEADLINE = 2.0
LONG = 600.0  # a deadline no test reaches
# An answer larger than what the server's socket (at most 4 MiB here: net.ipv4.tcp_wmem) and a
# non-reading client's small buffers take: its writing lasts until the client reads it.
LARGE = 16_000_000
GET_LARGE = b"GET /large HTTP/1.1\r\nHost: guarded\r\n\r\n"
GET_HELD = b"GET /held HTTP/1.1\r\nHost: guarded\r\n\r\n"
GET_SLOW = b"GET /slow HTTP/1.1\r\nHost: guarded\r\n\r\n"
GET_SMALL = b"GET /small HTTP/1.1\r\nHost: guarded\r\n\r\n"
EVICTED = "guarded connection closed to make room: idle the longest (0 answered before)"


@dataclass
class Served:
    runner: web.AppRunner
    server: web.Server
    port: int
    # Set by a test to end the /held and /slow requests in progress.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a /slow request is in its handler.
    slow: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("guard-ca"))


def server_context(authority: TestAuthority, directory: Path) -> ssl.SSLContext:
    issued = authority.issue("guarded", ["127.0.0.1"], cert=directory / "tls.crt", key=directory / "tls.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    return context


@contextlib.asynccontextmanager
async def serving(
    caplog: pytest.LogCaptureFixture, limit: int, timeout: float, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Served]:
    """Serve /small, /large, /held (lasting until ``release``) and /slow (an ordinary request
    answered at ``release``) through a Guard on a free loopback port; nothing at ERROR may be
    logged, cleanup included."""
    caplog.set_level(logging.DEBUG, logger=connections.__name__)
    guard = connections.Guard("guarded", limit, timeout)
    release, slowed = asyncio.Event(), asyncio.Event()

    async def small(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def large(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * LARGE)

    async def held(request: web.Request) -> web.StreamResponse:
        guard.lasting(request)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"held\n")
        await release.wait()
        await response.write(b"released\n")
        return response

    async def slow(_: web.Request) -> web.Response:
        slowed.set()
        await release.wait()
        return web.Response(text="slow\n")

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    app.router.add_get("/held", held)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await guard.site(runner, "127.0.0.1", 0, tls).start()
        assert runner.server is not None
        yield Served(runner, runner.server, runner.addresses[0][1], release, slowed)
    finally:
        release.set()
        if runner.server is not None:  # else a test stopped it
            await runner.cleanup()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def connect(
    port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls), WAIT)


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
    """One request on a kept-alive connection: its status and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: guarded\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert b"connection: close" not in head.lower()
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
    assert length is not None, head
    body = await asyncio.wait_for(reader.readexactly(int(length[1])), WAIT)
    return int(head.split(b" ", 2)[1]), body


async def answered(port: int, tls: ssl.SSLContext | None = None) -> None:
    """/small on a new connection, which is then closed."""
    reader, writer = await connect(port, tls)
    assert await get(reader, writer, "/small") == (200, b"ok\n")
    writer.close()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing the connection (a reset ends it too)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


async def until_open(server: web.Server, count: int) -> None:
    """Wait until aiohttp has exactly ``count`` connections (admitted, made and not yet gone; a
    TLS connection counts once its handshake is over)."""
    for _ in range(int(WAIT / POLL)):
        if len(server.connections) == count:
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{len(server.connections)} connections open, expected {count}")


async def non_reading(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose client takes little before it reads: a 4 KiB receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT)
    return await asyncio.open_connection(sock=sock)


async def busy_with_a_large_answer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose /large answer is being written: its head has arrived, the rest waits
    for the client to read."""
    reader, writer = await non_reading(port)
    writer.write(GET_LARGE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert f"\r\nContent-Length: {LARGE}\r\n".encode() in head, head
    return reader, writer


async def held(
    port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a lasting /held request in progress."""
    reader, writer = await connect(port, tls)
    writer.write(GET_HELD)
    await asyncio.wait_for(reader.readuntil(b"held\n"), WAIT)
    return reader, writer


def evictions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith("guarded connection closed to make room")]


def expiries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith("guarded connection closed: no request answered")]


def expired(answers: int) -> str:
    """The debug line of a connection closed at its deadline with ``answers`` answered before."""
    return f"guarded connection closed: no request answered within 2s ({answers} answered before)"


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith("guarded connection refused")]


@pytest.mark.parametrize("sent", [b"", HALF_SENT], ids=["silent", "half-sent"])
async def test_a_connection_without_a_whole_request_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    # One connection at most: the request afterwards shows that the closed one gave its place back.
    async with serving(caplog, 1, DEADLINE) as served:
        reader, writer = await connect(served.port)
        writer.write(sent)
        assert await until_closed(reader) == b""
        writer.close()
        assert expiries(caplog) == [expired(0)]
        await until_open(served.server, 0)
        await answered(served.port)


async def test_a_client_that_stops_reading_its_answers_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = 3  # 48 MB of answers: more than a non-reading client's socket buffers take
    async with serving(caplog, 8, DEADLINE) as served:
        reader, writer = await non_reading(served.port)
        writer.write(GET_LARGE * requests)
        await until_open(served.server, 1)
        await until_open(served.server, 0)  # closed while the client still reads nothing
        received = await until_closed(reader)
        writer.close()
        answers = received.count(b"HTTP/1.1 200 OK")
        assert 1 <= answers < requests, answers
        assert len(received) < requests * LARGE
        assert expiries(caplog)


async def test_silent_connections_filling_the_cap_make_room_for_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, 4, LONG) as served:
        silent = [await connect(served.port) for _ in range(4)]
        await until_open(served.server, 4)
        await answered(served.port)
        # The one accepted first made room, unanswered; the others are still open.
        assert await until_closed(silent[0][0]) == b""
        assert evictions(caplog) == [
            "guarded connection closed to make room: idle the longest (0 answered before)"
        ]
        await until_open(served.server, 3)  # the request's connection is closed too
        for _, writer in silent:
            writer.close()
        assert not expiries(caplog)


async def test_the_connection_answered_last_is_evicted_after_older_idle_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `kept` is accepted first, but answered after `silent` was accepted: silent goes first.
    async with serving(caplog, 2, LONG) as served:
        kept_reader, kept_writer = await connect(served.port)
        await until_open(served.server, 1)
        silent_reader, silent_writer = await connect(served.port)
        await until_open(served.server, 2)
        assert await get(kept_reader, kept_writer, "/small") == (200, b"ok\n")
        await answered(served.port)
        assert await until_closed(silent_reader) == b""
        silent_writer.close()
        assert await get(kept_reader, kept_writer, "/small") == (200, b"ok\n")
        kept_writer.close()
        assert len(evictions(caplog)) == 1


async def test_a_connection_over_the_cap_is_closed_unread_when_every_open_one_is_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, 1, LONG) as served:
        # A request its handler is still working on, its client waiting for the answer.
        busy_reader, busy_writer = await connect(served.port)
        busy_writer.write(GET_SLOW)
        await asyncio.wait_for(served.slow.wait(), WAIT)
        for _ in range(3):
            over_reader, over_writer = await connect(served.port)
            over_writer.write(GET_SMALL)
            assert await until_closed(over_reader) == b""  # no answer, and no deadline involved
            over_writer.close()
        assert refusals(caplog) == ["guarded connection refused: all 1 connections open are busy"] * 3
        assert not evictions(caplog)
        served.release.set()
        assert await asyncio.wait_for(busy_reader.readuntil(b"slow\n"), WAIT)
        # Answered, the connection is idle and makes room for the next one.
        await answered(served.port)
        assert await until_closed(busy_reader) == b""
        busy_writer.close()
        await until_open(served.server, 0)


async def test_a_client_that_does_not_read_its_answer_makes_room_when_none_is_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its /large answer waits in the transport's buffer: were it busy, every new connection
    # would be refused until its deadline.
    async with serving(caplog, 1, LONG) as served:
        busy_reader, _ = await busy_with_a_large_answer(served.port)
        await answered(served.port)
        received = await until_closed(busy_reader)
        assert len(received) < LARGE
        assert evictions(caplog) == [
            "guarded connection closed to make room: its client is behind on its answers (0 answered before)"
        ]
        assert not refusals(caplog)


async def test_a_client_that_pipelines_makes_room_when_none_is_idle(caplog: pytest.LogCaptureFixture) -> None:
    # A second request waits behind /slow in progress: sent before the first answer was read.
    async with serving(caplog, 1, LONG) as served:
        reader, writer = await connect(served.port)
        writer.write(GET_SLOW + GET_SMALL)
        await asyncio.wait_for(served.slow.wait(), WAIT)
        await answered(served.port)
        assert await until_closed(reader) == b""
        writer.close()
        assert evictions(caplog) == [
            "guarded connection closed to make room: its client is behind on its answers (0 answered before)"
        ]


Opened = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def aborting() -> AsyncIterator[Callable[[Opened], Opened]]:
    """Aborts, however the test ends, each connection passed to what it yields: close would wait
    to send what the server no longer reads, and the site's cleanup for its answers to be taken."""
    connections: list[asyncio.StreamWriter] = []

    def opened(connection: Opened) -> Opened:
        connections.append(connection[1])
        return connection

    try:
        yield opened
    finally:
        for writer in connections:
            writer.transport.abort()


BEHIND = "guarded connection closed to make room: its client is behind on its answers (0 answered before)"
# What a client reading slowly takes between two looks of the guard: more than the server's socket
# buffer holds (at most 4 MiB here), so its answer's rest in the transport's buffer has shrunk.
TAKEN = 6 * 1024 * 1024


async def test_a_client_that_pipelines_makes_room_before_one_reading_a_large_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The review's scenario (O1 #3): a scrape over a slow link, accepted first, and clients that
    # pipeline and read nothing filling the rest of the cap. The scrape is answered whole.
    async with serving(caplog, 3, LONG) as served, aborting() as opened:
        reading_reader, _ = opened(await busy_with_a_large_answer(served.port))
        pipelining = []
        for _ in range(2):
            reader, writer = opened(await non_reading(served.port))
            writer.write(GET_LARGE * 2)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            pipelining.append(reader)
        await answered(served.port)
        await until_closed(pipelining[0])
        assert await asyncio.wait_for(reading_reader.readexactly(LARGE), WAIT) == b"x" * LARGE
        assert evictions(caplog) == [BEHIND]


async def test_a_client_that_takes_nothing_makes_room_before_one_reading_slowly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Both have a large answer in progress and read nothing at first; the guard looks at both when
    # an idle connection makes room. The older one then reads some of its answer, the younger
    # none: at the next look the younger one goes.
    async with serving(caplog, 3, LONG) as served, aborting() as opened:
        reading_reader, _ = opened(await busy_with_a_large_answer(served.port))
        stalled_reader, _ = opened(await busy_with_a_large_answer(served.port))
        opened(await connect(served.port))
        await until_open(served.server, 3)
        # The first look: the idle one makes room for one more that takes nothing.
        opened(await busy_with_a_large_answer(served.port))
        assert evictions(caplog) == [EVICTED]
        assert await asyncio.wait_for(reading_reader.readexactly(TAKEN), WAIT)
        await answered(served.port)  # the second look
        await until_closed(stalled_reader)
        assert evictions(caplog) == [EVICTED, BEHIND]
        assert await asyncio.wait_for(reading_reader.readexactly(LARGE - TAKEN), WAIT)


async def test_at_the_first_look_a_client_that_takes_nothing_goes_before_one_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Review P1: at the guard's first look no connection had been measured, so both counted as
    # draining and the older, reading one went. Its buffer is measured when writing pauses.
    async with serving(caplog, 2, LONG) as served, aborting() as opened:
        reading_reader, _ = opened(await busy_with_a_large_answer(served.port))
        stalled_reader, _ = opened(await busy_with_a_large_answer(served.port))
        assert await asyncio.wait_for(reading_reader.readexactly(TAKEN), WAIT)
        await answered(served.port)  # the first look
        await until_closed(stalled_reader)
        assert evictions(caplog) == [BEHIND]
        assert await asyncio.wait_for(reading_reader.readexactly(LARGE - TAKEN), WAIT)


async def test_a_keep_alive_client_reading_its_newest_request_goes_after_fresher_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Review Q1 #6: a scraper's last answer (its previous scrape) is older than the accept of
    # connections opened since, though its current request is the newest; all read the same
    # amount, and the one answered longest ago, the scraper, went. Now the oldest request goes.
    async with serving(caplog, 3, LONG) as served, aborting() as opened:
        scraper_reader, scraper_writer = opened(await non_reading(served.port))
        assert await get(scraper_reader, scraper_writer, "/small") == (200, b"ok\n")  # the last scrape
        fresher = [opened(await busy_with_a_large_answer(served.port)) for _ in range(2)]
        scraper_writer.write(GET_LARGE)  # the next scrape
        await asyncio.wait_for(scraper_reader.readuntil(b"\r\n\r\n"), WAIT)
        for reader in [scraper_reader] + [reader for reader, _ in fresher]:
            assert await asyncio.wait_for(reader.readexactly(TAKEN), WAIT)
        await answered(served.port)  # the look: all three are draining
        rest = await asyncio.wait_for(scraper_reader.readexactly(LARGE - TAKEN), WAIT)
        assert rest == b"x" * (LARGE - TAKEN)  # the scrape is answered whole
        await until_closed(fresher[0][0])
        assert evictions(caplog) == [BEHIND]  # 0 answered before: not the scraper
        assert await asyncio.wait_for(fresher[1][0].readexactly(LARGE - TAKEN), WAIT)


async def test_a_request_answered_by_aiohttp_before_any_middleware_leaves_its_connection_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp's expect handler answers 417 to an Expect other than 100-continue before the
    # application sees the request: once that answer is read, the connection waits for its next
    # request like any other, and makes room (it was counted busy until its deadline).
    async with serving(caplog, 1, LONG) as served:
        reader, writer = await connect(served.port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: guarded\r\nExpect: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 417 ") and b"connection: close" not in head.lower()
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
        assert length is not None, head
        await asyncio.wait_for(reader.readexactly(int(length[1])), WAIT)
        await answered(served.port)
        assert await until_closed(reader) == b""
        writer.close()
        assert evictions(caplog) == [
            "guarded connection closed to make room: idle the longest (1 answered before)"
        ]
        assert not refusals(caplog)


async def test_an_idle_connection_makes_room_before_one_whose_client_is_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The busy connection is the older one: still, the idle one goes first.
    async with serving(caplog, 2, LONG) as served:
        busy_reader, busy_writer = await busy_with_a_large_answer(served.port)
        idle_reader, idle_writer = await connect(served.port)
        await until_open(served.server, 2)
        await answered(served.port)
        assert await until_closed(idle_reader) == b""
        idle_writer.close()
        assert evictions(caplog) == [
            "guarded connection closed to make room: idle the longest (0 answered before)"
        ]
        # The answer arrives whole, and its connection serves on.
        assert await asyncio.wait_for(busy_reader.readexactly(LARGE), WAIT) == b"x" * LARGE
        assert await get(busy_reader, busy_writer, "/small") == (200, b"ok\n")
        busy_writer.close()


async def test_each_answer_gives_the_connection_a_new_deadline(caplog: pytest.LogCaptureFixture) -> None:
    # `kept` is accepted before `idle` and answered after it: its deadline, counted from that
    # answer, passes after idle's. Counted from its accept it would pass first.
    async with serving(caplog, 8, DEADLINE) as served:
        kept_reader, kept_writer = await connect(served.port)
        await until_open(served.server, 1)
        idle_reader, idle_writer = await connect(served.port)
        await until_open(served.server, 2)
        assert await get(kept_reader, kept_writer, "/small") == (200, b"ok\n")
        assert await until_closed(idle_reader) == b""
        idle_writer.close()
        assert await until_closed(kept_reader) == b""
        kept_writer.close()
        assert expiries(caplog) == [
            expired(0),
            expired(1),
        ]


async def test_a_lasting_request_has_no_deadline_and_is_never_evicted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, 2, DEADLINE) as served:
        lasting_reader, lasting_writer = await held(served.port)
        # A silent connection accepted later: its deadline passes after the lasting one's would.
        silent_reader, silent_writer = await connect(served.port)
        assert await until_closed(silent_reader) == b""
        silent_writer.close()
        assert expiries(caplog) == [expired(0)]
        # With the cap full of lasting requests, a new connection is refused.
        second_reader, second_writer = await held(served.port)
        over_reader, over_writer = await connect(served.port)
        assert await until_closed(over_reader) == b""
        over_writer.close()
        assert refusals(caplog) == ["guarded connection refused: all 2 connections open are busy"]
        assert not evictions(caplog)
        # Once it ends, the connection has a deadline again, counted from its answer.
        served.release.set()
        for reader, writer in ((lasting_reader, lasting_writer), (second_reader, second_writer)):
            await asyncio.wait_for(reader.readuntil(b"released\n\r\n0\r\n\r\n"), WAIT)
            assert await until_closed(reader) == b""
            writer.close()
        assert expiries(caplog)[1:] == [expired(1)] * 2


async def test_a_lasting_request_is_never_evicted_even_with_requests_pipelined_behind_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, 1, LONG) as served:
        reader, writer = await connect(served.port)
        writer.write(GET_HELD + GET_SMALL)
        await asyncio.wait_for(reader.readuntil(b"held\n"), WAIT)
        over_reader, over_writer = await connect(served.port)
        assert await until_closed(over_reader) == b""
        over_writer.close()
        assert refusals(caplog) == ["guarded connection refused: all 1 connections open are busy"]
        assert not evictions(caplog)
        served.release.set()
        await asyncio.wait_for(reader.readuntil(b"ok\n"), WAIT)  # then the pipelined one
        writer.close()


async def test_over_tls_requests_are_answered_and_lasting_ones_last(
    caplog: pytest.LogCaptureFixture, authority: TestAuthority, tmp_path: Path
) -> None:
    client = ssl.create_default_context(cafile=authority.cert)
    async with serving(caplog, 2, DEADLINE, server_context(authority, tmp_path)) as served:
        reader, writer = await connect(served.port, client)
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        assert await get(reader, writer, "/small") == (200, b"ok\n")
        assert await get(reader, writer, "/small") == (200, b"ok\n")
        writer.close()
        lasting_reader, lasting_writer = await held(served.port, client)
        silent_reader, silent_writer = await connect(served.port)  # never says ClientHello
        assert await until_closed(silent_reader) == b""
        silent_writer.close()
        served.release.set()
        await asyncio.wait_for(lasting_reader.readuntil(b"released\n\r\n0\r\n\r\n"), WAIT)
        lasting_writer.close()


async def test_over_tls_a_request_sent_with_the_last_handshake_message_is_answered(
    caplog: pytest.LogCaptureFixture, authority: TestAuthority, tmp_path: Path
) -> None:
    # aiohttp's client writes its request as soon as its side of the handshake is done, so it
    # arrives with its Finished: the TLS layer decrypts it before the handshake's task resumes.
    client = ssl.create_default_context(cafile=authority.cert)
    async with (
        serving(caplog, 2, DEADLINE, server_context(authority, tmp_path)) as served,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
    ):
        for _ in range(3):  # kept alive: the later ones on the same connection
            async with session.get(f"https://127.0.0.1:{served.port}/small", ssl=client) as response:
                assert (response.status, await response.text()) == (200, "ok\n")
        assert not expiries(caplog)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "half-a-hello"])
async def test_over_tls_a_connection_silent_in_its_handshake_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture, authority: TestAuthority, tmp_path: Path, sent: bytes
) -> None:
    async with serving(caplog, 1, DEADLINE, server_context(authority, tmp_path)) as served:
        reader, writer = await connect(served.port)
        writer.write(sent)
        assert await until_closed(reader) == b""
        writer.close()
        assert expiries(caplog) == [expired(0)]
        # It gave its place back.
        await answered(served.port, ssl.create_default_context(cafile=authority.cert))


async def test_over_tls_connections_silent_in_their_handshake_make_room_and_plain_http_is_closed(
    caplog: pytest.LogCaptureFixture, authority: TestAuthority, tmp_path: Path
) -> None:
    client = ssl.create_default_context(cafile=authority.cert)
    async with serving(caplog, 4, LONG, server_context(authority, tmp_path)) as served:
        silent = [await connect(served.port) for _ in range(4)]
        await answered(served.port, client)
        assert await until_closed(silent[0][0]) == b""
        assert evictions(caplog) == [
            "guarded connection closed to make room: idle the longest (0 answered before)"
        ]
        # Plain HTTP on the TLS port gets no answer: the failed handshake ends the connection
        # and gives its place back (the next one evicts another silent one, not it).
        plain_reader, plain_writer = await connect(served.port)
        plain_writer.write(b"GET /small HTTP/1.1\r\nHost: guarded\r\n\r\n")
        assert await until_closed(plain_reader) == b""
        plain_writer.close()
        await answered(served.port, client)  # fits in the place the plain one gave back
        assert len(evictions(caplog)) == 1
        for _, writer in silent:
            writer.close()
        assert not expiries(caplog)


async def test_over_tls_stopping_the_site_closes_the_connections_still_in_their_handshake(
    caplog: pytest.LogCaptureFixture, authority: TestAuthority, tmp_path: Path
) -> None:
    # aiohttp's shutdown closes the connections its handler has; these are the guard's alone.
    async with serving(caplog, 4, LONG, server_context(authority, tmp_path)) as served:
        silent = [await connect(served.port) for _ in range(2)]
    for reader, writer in silent:
        assert await until_closed(reader) == b""
        writer.close()
    assert not expiries(caplog)


async def sent_as_another_arrives(
    served: Served, sent: bytes
) -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    """``sent`` on an open idle connection and a new connection, both in the kernel before the
    loop looks again: it reads the first and accepts the second in the same wakeup, before
    aiohttp's task for a request could start."""
    first_reader, first_writer = await connect(served.port)
    await until_open(served.server, 1)
    first_writer.write(sent)  # the loop's transports send at once what the socket takes
    second = socket.create_connection(("127.0.0.1", served.port), timeout=WAIT)  # the kernel's
    return (first_reader, first_writer), await asyncio.open_connection(sock=second)


async def test_a_whole_request_not_yet_started_is_not_evicted(caplog: pytest.LogCaptureFixture) -> None:
    async with serving(caplog, 1, LONG) as served:
        (reader, writer), (over_reader, over_writer) = await sent_as_another_arrives(
            served, b"GET /small HTTP/1.1\r\nHost: guarded\r\n\r\n"
        )
        assert await until_closed(over_reader) == b""
        over_writer.close()
        assert refusals(caplog) == ["guarded connection refused: all 1 connections open are busy"]
        assert not evictions(caplog)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()


async def test_a_half_sent_request_is_evicted_by_a_connection_arriving_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(caplog, 1, LONG) as served:
        (reader, writer), (later_reader, later_writer) = await sent_as_another_arrives(served, HALF_SENT)
        assert await until_closed(reader) == b""
        writer.close()
        assert evictions(caplog) == [EVICTED]
        assert await get(later_reader, later_writer, "/small") == (200, b"ok\n")
        later_writer.close()
        assert not refusals(caplog)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
async def test_a_connection_admitted_as_the_site_stops_is_closed(
    caplog: pytest.LogCaptureFixture,
    authority: TestAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    secure: bool,
) -> None:
    # The listener admits a connection; its connection_made (TLS: its handshake) comes a loop
    # turn later, after the stop started here looked at the connections open.
    stopping: list[asyncio.Task[None]] = []
    admit = connections.Guard.accept

    def admit_then_stop(
        guard: connections.Guard, server: web.Server, tls: ssl.SSLContext | None
    ) -> asyncio.Protocol:
        protocol = admit(guard, server, tls)
        stopping.append(asyncio.get_running_loop().create_task(served.runner.cleanup()))
        return protocol

    tls = server_context(authority, tmp_path) if secure else None
    async with serving(caplog, 4, LONG, tls) as served:
        monkeypatch.setattr(connections.Guard, "accept", admit_then_stop)
        reader, writer = await connect(served.port)  # silent: no ClientHello either
        assert await until_closed(reader) == b""
        writer.close()
        await asyncio.wait_for(asyncio.gather(*stopping), WAIT)
        assert len(stopping) == 1
        assert "guarded connection closed: the site stopped" in caplog.messages
        assert not expiries(caplog)
