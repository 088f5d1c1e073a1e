"""Listeners: accepting under a burst, pausing after an accept error, and closing.

Runs the in-process proxy of conftest (one IMAP listener) under uvloop and asyncio; the clients
are real loopback connections that only wait for the greeting. Every wait is bounded.
"""

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from proxy.server import listeners

from .conftest import WAIT, ProxyFactory, imap_client

BURST = 3 * listeners.ACCEPTS_PER_WAKEUP  # more than one wakeup's worth of queued connections


async def _greeted_from(port: int, source: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), WAIT
    )
    greeting = await asyncio.wait_for(reader.readline(), WAIT)
    assert greeting.startswith(b"* OK"), greeting
    return writer


async def test_a_burst_of_connections_is_greeted_in_full(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [])
    # Each from an address of its own: the per-address connection limit is not what is tested.
    sources = [f"127.0.{1 + number // 200}.{1 + number % 200}" for number in range(BURST)]
    writers = await asyncio.gather(*(_greeted_from(proxy.port, source) for source in sources))
    assert proxy.metric("mailgress_proxy_connections_total", listener="imap", protocol="imap") == BURST
    for writer in writers:
        writer.close()


@pytest.fixture
def failing_accept(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """Listening sockets put in the list fail their next accept with EMFILE, once each."""
    failing: list[socket.socket] = []
    accept = socket.socket.accept

    def accept_or_fail(sock: socket.socket) -> tuple[socket.socket, object]:
        if sock in failing:
            failing.remove(sock)
            raise OSError(errno.EMFILE, "Too many open files")
        return accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept_or_fail)
    yield failing


async def test_an_accept_error_pauses_the_listener_then_it_serves_again(
    start_proxy: ProxyFactory, failing_accept: list[socket.socket]
) -> None:
    proxy = await start_proxy({}, [])
    failing_accept.extend(sock for _, sock in proxy.listeners._sockets)
    # The first connection meets the failing accept; it waits in the queue until the pause ends.
    _, writer = await imap_client(proxy.port)
    assert proxy.metric("mailgress_proxy_refusals_total", reason="accept_error") == 1
    assert proxy.listeners.listening  # a pause is not a reason to go unready
    _, second = await imap_client(proxy.port)
    for done in (writer, second):
        done.close()


async def test_closed_listeners_accept_nothing(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [])
    assert proxy.listeners.listening
    proxy.listeners.close()
    assert not proxy.listeners.listening
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)
