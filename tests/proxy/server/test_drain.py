"""Graceful drain: turns spread over the grace period, closing lines only where they cannot cut in.

Three levels. ``Drain`` alone: when turns come and what is counted. The relay with a turn, on both
paths (splice and transports), between a scripted client and a scripted backend on loopback: the
closing line comes only at a quiet moment, after the backend spoke last, behind every relayed
byte (a slowly sent FETCH literal, a pausing DATA transfer, a client that does not read). The
in-process proxy (``start_proxy``): clients still logging in get their protocol's closing reply,
and ``Listeners.drain_sessions`` ends when the sessions are gone or cuts them at the grace
period's end. The drain settings are parsed here too. No assertion is about time: waits are
bounded, and the pauses only make a stream quiet for longer than the quiet period.
"""

import asyncio
import contextlib
import random
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy import metrics as proxy_metrics
from proxy.server import drain, relay
from proxy.settings import DrainSettings, ListenerProtocol, SettingsError, parse
from proxy.table import Endpoint
from tests.proxy.server.conftest import (
    PASSWORD,
    WAIT,
    ProxyFactory,
    RunningProxy,
    dead_port,
    fake_backend,
    imap_client,
    login,
)

# Quiet period of the relay tests: far above the gaps of a stream that is busy (CHUNK_GAP), so a
# loaded machine does not make a busy stream look quiet.
QUIET = 1.0
CHUNK_GAP = 0.02
LONG_IDLE = 3600.0  # an idle timeout that never fires during a test
SMALL_RECEIVE_BUFFER = 64 * 1024
# More than a client that reads nothing lets the kernel buffer with that window, the proxy's socket
# send buffer (4 MiB at most here) and a splice pipe: the proxy has to hold bytes back.
UNREAD = 16 * 1024 * 1024
BYE = drain.closing_line("imap", "proxy.test")
REPLY_421 = drain.closing_line("smtp", "proxy.test")
SETTINGS_BASE = {"listeners": [{"protocol": "imap", "address": "127.0.0.1", "port": 1143}]}


class FixedDelay(random.Random):
    """Every turn comes at the same fraction of its allowed span (0: at once)."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def new_drain(
    grace: float = 60.0, quiet: float = QUIET, rng: random.Random | None = None
) -> tuple[drain.Drain, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = proxy_metrics.create(registry)
    return drain.Drain(DrainSettings(grace, quiet), "proxy.test", metrics, rng or FixedDelay(0)), registry


def drained(registry: CollectorRegistry, protocol: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "mailgress_proxy_drained_sessions_total", {"protocol": protocol, "outcome": outcome}
    )
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------------------------
# Settings and closing lines


def test_drain_settings_default_below_the_charts_grace_period() -> None:
    settings = parse(SETTINGS_BASE, Path("."))
    assert settings.drain == DrainSettings(grace_period=540.0, quiet_period=2.0)


def test_drain_settings_are_read_and_checked() -> None:
    custom = parse({**SETTINGS_BASE, "drain": {"gracePeriod": 30, "quietPeriod": 0.5}}, Path("."))
    assert custom.drain == DrainSettings(grace_period=30.0, quiet_period=0.5)
    assert parse({**SETTINGS_BASE, "drain": {"gracePeriod": 0}}, Path(".")).drain.grace_period == 0.0
    refused = {
        "quietPeriod": {"gracePeriod": 2, "quietPeriod": 2},
        "drain.gracePeriod": {"gracePeriod": -1},
        "drain.quietPeriod": {"quietPeriod": 0},
        "unknown keys": {"grace": 10},
    }
    for message, document in refused.items():
        with pytest.raises(SettingsError, match=re.escape(message)):
            parse({**SETTINGS_BASE, "drain": document}, Path("."))


@pytest.mark.parametrize(
    ("protocol", "line"),
    [
        ("imap", b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n"),
        ("pop3", b"-ERR [SYS/TEMP] Server shutting down, please reconnect\r\n"),
        ("submission", b"421 4.3.2 mx.test Service shutting down\r\n"),
        ("smtp", b"421 4.3.2 mx.test Service shutting down\r\n"),
    ],
)
def test_each_protocol_has_its_closing_line(protocol: ListenerProtocol, line: bytes) -> None:
    assert drain.closing_line(protocol, "mx.test") == line


# ---------------------------------------------------------------------------------------------
# The Drain: turns and counts


async def test_turns_are_spread_over_the_first_half_of_the_grace_period() -> None:
    draining, _ = new_drain(grace=100.0, rng=random.Random(5))
    turns = [draining.join("imap") for _ in range(50)]
    assert not any(turn.timer for turn in turns)  # nothing is scheduled before the drain begins
    draining.begin()
    now = asyncio.get_running_loop().time()
    delays = []
    for turn in turns:
        assert turn.timer is not None
        delays.append(turn.timer.when() - now)
    assert all(-0.5 <= delay <= 50.5 for delay in delays), delays  # loop clock resolution aside
    assert len({round(delay) for delay in delays}) > 10  # spread out, not a stampede
    late = draining.join("pop3")  # a session that started while the listeners closed
    assert late.timer is not None
    for turn in [*turns, late]:
        draining.leave(turn)
        assert turn.timer is None  # cancelled with its session


async def test_a_turn_tells_its_session_and_only_drains_are_counted() -> None:
    draining, registry = new_drain()
    before = draining.join("smtp")
    draining.leave(before)  # ended before any drain: not a drained session
    turn = draining.join("smtp")
    told: list[bool] = []
    turn.on_due = lambda: told.append(turn.due)
    draining.begin()
    draining.begin()  # idempotent: the turn is not scheduled twice
    for _ in range(10):
        if told:
            break
        await asyncio.sleep(0)
    assert told == [True]
    turn.outcome = drain.CLOSED_WHEN_QUIET
    draining.leave(turn)
    assert drained(registry, "smtp", drain.CLOSED_WHEN_QUIET) == 1
    assert drained(registry, "smtp", drain.ENDED_ON_THEIR_OWN) == 0


# ---------------------------------------------------------------------------------------------
# The relay with a turn, on both paths


@pytest.fixture(params=[True, False], ids=["splice", "transports"])
def splice(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def small_window(port: int) -> socket.socket:
    """A client socket connected to ``port`` with a small receive buffer: loopback's autotuning
    would otherwise let the kernel buffer tens of MiB that the client has not read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)  # before connect
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: (the connecting end, with a small window; the
    accepted end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        connecting = small_window(server.getsockname()[1])
        accepted, _ = server.accept()
    return connecting, accepted


@dataclass
class Relayed:
    """A relay with its turn, the mail client's end and the backend's end of it."""

    turn: drain.Turn
    task: "asyncio.Task[relay.RelayResult]"
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    backend: tuple[asyncio.StreamReader, asyncio.StreamWriter]

    async def result(self) -> relay.RelayResult:
        return await asyncio.wait_for(self.task, WAIT)


@pytest.fixture
async def start_relay(splice: bool) -> AsyncIterator[Any]:
    relays: list[Relayed] = []

    async def start(protocol: ListenerProtocol = "imap", *, due: bool = True) -> Relayed:
        client_far, client_near = tcp_pair()
        backend_near, backend_far = tcp_pair()
        turn = drain.Turn(protocol, drain.closing_line(protocol, "proxy.test"), QUIET)
        if due:
            turn.arrive()
        task = asyncio.create_task(
            relay.relay(client_near, backend_near, idle_timeout=LONG_IDLE, splice=splice, drain=turn)
        )
        started = Relayed(
            turn,
            task,
            await asyncio.open_connection(sock=client_far),
            await asyncio.open_connection(sock=backend_far),
        )
        relays.append(started)
        return started

    yield start
    for started in relays:
        started.task.cancel()
        for _, writer in (started.client, started.backend):
            writer.close()
        await asyncio.gather(started.task, return_exceptions=True)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), WAIT)


async def test_a_quiet_session_gets_the_line_after_the_backends_last_bytes(start_relay: Any) -> None:
    relayed: Relayed = await start_relay(due=False)
    (client_reader, _), (backend_reader, backend_writer) = relayed.client, relayed.backend
    backend_writer.write(b"* 3 EXISTS\r\n")
    await backend_writer.drain()
    assert await asyncio.wait_for(client_reader.readline(), WAIT) == b"* 3 EXISTS\r\n"
    relayed.turn.arrive()  # the turn comes while the relay runs
    assert await until_closed(client_reader) == BYE
    assert await until_closed(backend_reader) == b""  # the backend is closed too
    result = await relayed.result()
    # The closing line is counted with what went down before it (review J7: it was left out).
    assert result == relay.RelayResult(
        upstream_bytes=0, downstream_bytes=12 + len(BYE), ended_by=relay.DRAINED
    )


async def test_a_slowly_sent_literal_gets_through_before_the_bye(start_relay: Any) -> None:
    relayed: Relayed = await start_relay()
    (client_reader, client_writer), (backend_reader, backend_writer) = relayed.client, relayed.backend
    client_writer.write(b"a2 FETCH 1 BODY[]\r\n")
    assert await asyncio.wait_for(backend_reader.readline(), WAIT) == b"a2 FETCH 1 BODY[]\r\n"
    literal = b"".join(b"line %03d of a message\r\n" % number for number in range(40))
    response = [b"* 1 FETCH (BODY[] {%d}\r\n" % len(literal)]
    response += [literal[start : start + 24] for start in range(0, len(literal), 24)]
    response.append(b")\r\na2 OK Fetch completed.\r\n")
    for chunk in response:  # the turn has come; every gap is far shorter than the quiet period
        backend_writer.write(chunk)
        await backend_writer.drain()
        await asyncio.sleep(CHUNK_GAP)
    assert await until_closed(client_reader) == b"".join(response) + BYE


async def test_a_client_pausing_in_the_middle_of_data_is_not_cut(start_relay: Any) -> None:
    relayed: Relayed = await start_relay("submission")
    (client_reader, client_writer), (backend_reader, backend_writer) = relayed.client, relayed.backend
    client_writer.write(b"DATA\r\n")
    assert await asyncio.wait_for(backend_reader.readline(), WAIT) == b"DATA\r\n"
    backend_writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert (await asyncio.wait_for(client_reader.readline(), WAIT)).startswith(b"354")
    client_writer.write(b"Subject: first half\r\n\r\n")
    await client_writer.drain()
    await asyncio.sleep(2 * QUIET)  # the client spoke last: quiet, but in the middle of DATA
    client_writer.write(b"second half\r\n.\r\n")
    body = await asyncio.wait_for(backend_reader.readuntil(b"\r\n.\r\n"), WAIT)
    assert body == b"Subject: first half\r\n\r\nsecond half\r\n.\r\n"
    backend_writer.write(b"250 2.0.0 Ok: queued as 4XyZ\r\n")
    assert await until_closed(client_reader) == b"250 2.0.0 Ok: queued as 4XyZ\r\n" + REPLY_421


async def test_bytes_the_client_has_not_read_yet_come_before_the_line(start_relay: Any) -> None:
    relayed: Relayed = await start_relay()
    (client_reader, _), (_, backend_writer) = relayed.client, relayed.backend
    payload = random.Random(3).randbytes(UNREAD)
    backend_writer.write(payload)
    sending = asyncio.create_task(backend_writer.drain())
    await asyncio.sleep(2 * QUIET)  # nothing moves while the client reads nothing: held, not quiet
    received = await until_closed(client_reader)
    await asyncio.wait_for(sending, WAIT)
    assert len(received) == len(payload) + len(BYE)
    assert received == payload + BYE


# ---------------------------------------------------------------------------------------------
# The in-process proxy


@pytest.fixture
async def draining_proxy(start_proxy: ProxyFactory) -> AsyncIterator[Any]:
    """``draining_proxy(endpoint_port=..., grace=..., quiet=..., delay=..., listener=...)``: a proxy
    routing alpha.example to that port, whose Drain has these settings and turns that come at
    ``delay`` (a fraction of half the grace period)."""

    async def start(
        *,
        endpoint_port: int | None = None,
        grace: float = 60.0,
        quiet: float = QUIET,
        delay: float = 0.0,
        **options: Any,
    ) -> tuple[RunningProxy, CollectorRegistry]:
        endpoint = Endpoint("127.0.0.1", endpoint_port or dead_port())
        running = await start_proxy({}, [endpoint], **options)
        # Replaced before any session starts, so every session joins this one.
        running.listeners.drain = drain.Drain(
            DrainSettings(grace, quiet), "proxy.test", running.context.metrics, FixedDelay(delay)
        )
        return running, running.registry

    yield start


async def drain_in_background(running: RunningProxy) -> "asyncio.Task[None]":
    running.listeners.close()
    return asyncio.create_task(running.listeners.drain_sessions())


GREETINGS: dict[ListenerProtocol, bytes] = {
    "imap": b"* OK",
    "pop3": b"+OK",
    "submission": b"220 ",
    "smtp": b"220 ",
}


@pytest.mark.parametrize(("protocol", "greeting"), GREETINGS.items())
async def test_a_client_still_logging_in_gets_its_protocols_closing_reply(
    draining_proxy: Any, protocol: ListenerProtocol, greeting: bytes
) -> None:
    running, registry = await draining_proxy(listener={"protocol": protocol})
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", running.port), WAIT)
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(greeting)
    drained_all = await drain_in_background(running)
    assert await until_closed(reader) == drain.closing_line(protocol, "proxy.test")
    await asyncio.wait_for(drained_all, WAIT)  # the drain ends when its last session is gone
    assert drained(registry, protocol, drain.CLOSED_BEFORE_LOGIN) == 1
    writer.close()


async def test_a_relayed_imap_session_gets_bye_and_the_drain_ends(draining_proxy: Any) -> None:
    async with fake_backend() as backend:
        running, registry = await draining_proxy(endpoint_port=backend.port)
        reply, reader, writer = await login(running.port, "u@alpha.example")
        assert reply.startswith(b"a1 OK"), reply
        writer.write(b"a2 NOOP\r\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 NOOP\r\n"
        drained_all = await drain_in_background(running)
        assert await until_closed(reader) == BYE
        await asyncio.wait_for(drained_all, WAIT)
        assert drained(registry, "imap", drain.CLOSED_WHEN_QUIET) == 1
        writer.close()


async def test_a_session_that_ends_itself_ends_the_drain_early(draining_proxy: Any) -> None:
    async with fake_backend() as backend:
        # Turns come after half the grace period: far beyond this test's bounded waits.
        running, registry = await draining_proxy(endpoint_port=backend.port, grace=600.0, delay=1.0)
        reply, reader, writer = await login(running.port, "u@alpha.example")
        assert reply.startswith(b"a1 OK"), reply
        drained_all = await drain_in_background(running)
        writer.write_eof()  # the client leaves on its own
        assert await until_closed(reader) == b""  # the backend followed: no closing line
        await asyncio.wait_for(drained_all, WAIT)
        assert drained(registry, "imap", drain.ENDED_ON_THEIR_OWN) == 1
        assert drained(registry, "imap", drain.CLOSED_WHEN_QUIET) == 0


async def test_a_session_never_quiet_is_cut_when_the_grace_period_ends(draining_proxy: Any) -> None:
    async with fake_backend() as backend:
        running, registry = await draining_proxy(endpoint_port=backend.port, grace=2.0, quiet=0.2)
        reader, writer = await asyncio.open_connection(sock=small_window(running.port))
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
        writer.write(f'a1 LOGIN u@alpha.example "{PASSWORD}"\r\n'.encode())
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
        # The echo backend answers everything while this client reads nothing: the proxy holds
        # bytes for the client for ever, so no moment is quiet.
        writer.write(b"x" * UNREAD)
        await asyncio.wait_for(writer.drain(), WAIT)
        drained_all = await drain_in_background(running)
        await asyncio.wait_for(drained_all, WAIT)
        assert drained(registry, "imap", drain.CUT_AT_DEADLINE) == 1
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):  # a close with bytes unread is a reset
            for _ in range(10_000):
                chunk = await asyncio.wait_for(reader.read(1024 * 1024), WAIT)
                if not chunk:
                    break
                received += chunk
        assert received.startswith(b"echo:x")
        assert BYE not in received
        writer.close()


async def test_no_grace_period_closes_every_session_at_once(draining_proxy: Any) -> None:
    running, registry = await draining_proxy(grace=0.0)
    reader, writer = await imap_client(running.port)
    drained_all = await drain_in_background(running)
    await asyncio.wait_for(drained_all, WAIT)
    assert await until_closed(reader) == b""  # no drain: cut without a closing line
    assert drained(registry, "imap", drain.CUT_AT_DEADLINE) == 0  # and not counted as drained
    writer.close()
