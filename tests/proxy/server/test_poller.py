"""The loop's own epoll for relays and login dialogues, under uvloop and asyncio (conftest's hook).

The relay and channel tests exercise it through their owners; these check what is its own:
callbacks isolated from one another, errors reported for as long as they last, and the epoll
closed with its last holder. Every wait is bounded; no assertion is about time.
"""

import asyncio
import socket
import struct
from typing import Any

from proxy.server import poller

WAIT = 10.0


async def test_a_failing_callback_leaves_the_others_running() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    ran = asyncio.Event()

    def broken() -> None:
        raise RuntimeError("a bug")

    held = poller.Poller.acquire(loop)
    try:
        held.add_reader(first.fileno(), broken)
        held.add_reader(second.fileno(), ran.set)
        first_peer.send(b"x")
        second_peer.send(b"y")
        await asyncio.wait_for(ran.wait(), WAIT)
        assert [type(context["exception"]) for context in reported][:1] == [RuntimeError]
    finally:
        held.remove_reader(first.fileno())
        held.remove_reader(second.fileno())
        held.release()
        for sock in (first, first_peer, second, second_peer):
            sock.close()


async def test_an_error_is_reported_again_until_it_is_dealt_with() -> None:
    """uvloop's own readers fall silent after reporting an error once; these do not."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname(), timeout=WAIT)
        near, _ = server.accept()
    near.setblocking(False)
    calls = 0
    twice = asyncio.Event()

    def count() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            twice.set()

    held = poller.Poller.acquire(loop)
    try:
        held.add_reader(near.fileno(), count)  # counts, never reads: the condition stays
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sendall(b"last words")
        peer.close()  # a reset behind the bytes
        await asyncio.wait_for(twice.wait(), WAIT)
    finally:
        held.remove_reader(near.fileno())
        held.release()
        near.close()


async def test_the_last_holder_closes_the_epoll() -> None:
    loop = asyncio.get_running_loop()
    first = poller.Poller.acquire(loop)
    second = poller.Poller.acquire(loop)
    assert first is second
    descriptor = first.epoll.fileno()
    first.release()
    assert not first.epoll.closed and poller._pollers[loop] is first
    second.release()
    assert first.epoll.closed and loop not in poller._pollers
    assert not loop.remove_reader(descriptor)
