"""Listeners: accepting under a burst, pausing after an accept error, and closing.

Runs the in-process proxy of conftest (one IMAP listener) under uvloop and asyncio; the clients
are real loopback connections that only wait for the greeting. Every wait is bounded.
"""

import asyncio
import errno
import os
import socket
from collections.abc import Iterator

import pytest

from proxy.server import listeners, poller

from .conftest import WAIT, ProxyFactory, imap_client

BURST = 3 * listeners.ACCEPTS_PER_WAKEUP  # more than one wakeup's worth of queued connections
FAILURES = 20  # failed accepts in a row: as many pauses


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
def failing_accept(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[socket.socket, int]]]:
    """Listening sockets put in the list (with an errno) fail their next accept with it, once."""
    failing: list[tuple[socket.socket, int]] = []
    accept = socket.socket.accept

    def accept_or_fail(sock: socket.socket) -> tuple[socket.socket, object]:
        for entry in failing:
            if entry[0] is sock:
                failing.remove(entry)
                raise OSError(entry[1], os.strerror(entry[1]))
        return accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept_or_fail)
    yield failing


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ECONNABORTED], ids=["EMFILE", "ECONNABORTED"])
async def test_an_accept_error_is_counted_and_the_listener_serves_on(
    start_proxy: ProxyFactory,
    failing_accept: list[tuple[socket.socket, int]],
    error: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy({}, [])
    failing_accept.extend((sock, error) for _, sock in proxy.listeners._sockets)
    # The first connection meets the failing accept; it waits in the queue until it is taken:
    # at once after an aborted connection, after the pause when out of descriptors.
    _, writer = await imap_client(proxy.port)
    assert proxy.metric("mailgress_proxy_refusals_total", reason="accept_error") == 1
    assert proxy.listeners.listening  # a pause is not a reason to go unready
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("accept on imap")]
    if error == errno.EMFILE:
        assert logged == [
            "accept on imap failed: Too many open files; retrying every 0.5s until it recovers",
            "accept on imap recovered; failed accepts: 1",
        ]
    else:
        assert logged == []
    _, second = await imap_client(proxy.port)
    for done in (writer, second):
        done.close()


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE], ids=["EMFILE", "ENFILE"])
async def test_a_descriptor_shortage_is_logged_once_until_it_recovers(
    start_proxy: ProxyFactory,
    failing_accept: list[tuple[socket.socket, int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: int,
) -> None:
    """Accepts failing again and again, one pause apart: one line when it begins, one when an
    accept succeeds again, and every failure counted; then a new shortage is logged anew."""
    monkeypatch.setattr(listeners, "ACCEPT_ERROR_PAUSE", 0.01)  # the pauses only make it slow
    proxy = await start_proxy({}, [])
    (sock,) = (sock for _, sock in proxy.listeners._sockets)
    failing_accept.extend([(sock, error)] * FAILURES)
    _, writer = await imap_client(proxy.port)  # taken once the failures ran out
    assert not failing_accept
    failing_accept.append((sock, error))
    _, second = await imap_client(proxy.port)
    strerror = os.strerror(error)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("accept on imap")] == [
        f"accept on imap failed: {strerror}; retrying every 0.01s until it recovers",
        f"accept on imap recovered; failed accepts: {FAILURES}",
        f"accept on imap failed: {strerror}; retrying every 0.01s until it recovers",
        "accept on imap recovered; failed accepts: 1",
    ]
    assert proxy.metric("mailgress_proxy_refusals_total", reason="accept_error") == FAILURES + 1
    for done in (writer, second):
        done.close()


async def test_closed_listeners_accept_nothing(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [])
    assert proxy.listeners.listening
    proxy.listeners.close()
    assert not proxy.listeners.listening
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)


async def test_listeners_hold_the_poller_while_they_accept(start_proxy: ProxyFactory) -> None:
    loop = asyncio.get_running_loop()
    proxy = await start_proxy({}, [])
    # One poller for every session while the proxy accepts, not one made per session.
    assert poller._pollers[loop].users == 1
    proxy.listeners.close()
    assert loop not in poller._pollers
