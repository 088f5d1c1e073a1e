"""SocketChannel and TransportChannel over real loopback sockets, under uvloop and asyncio
(conftest's loop hook).

What matters beyond "bytes arrive": the reader a channel keeps registered between reads is never
left behind when the socket is handed on or closed, bytes the peer sends while nobody reads are
not lost, and a transport channel holds little of a peer that sends more than is read (plain and
TLS) yet hands on every byte in order. Every wait is bounded; no assertion is about time.
"""

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.server import poller
from proxy.server.channel import (
    MAX_UNREAD,
    MIN_LANDING,
    RECV_SIZE,
    TLS_READ_HIGH_WATER,
    TLS_READ_LOW_WATER,
    TLS_WRITE_HIGH_WATER,
    SocketChannel,
    TransportChannel,
)
from testbed.tlscerts import TestAuthority

from .conftest import WAIT

Pair = tuple[socket.socket, socket.socket]
POLL = 0.01


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected TCP pair on loopback: (the proxy's end, non-blocking; the peer's end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname(), timeout=WAIT)
        near, _ = server.accept()
    near.setblocking(False)
    yield near, peer
    near.close()
    peer.close()


async def _read_in_this_task(channel: SocketChannel) -> bytes:
    # Not wait_for: its extra task gives asyncio's loop an iteration in which the reader fires
    # with nobody waiting and is dropped, and the tests below want it still registered.
    async with asyncio.timeout(WAIT):
        return await channel.recv()


async def test_a_lock_step_dialogue_reads_every_line(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    for number in range(5):
        line = f"a{number} NOOP\r\n".encode()
        peer.sendall(line)
        assert await asyncio.wait_for(channel.recv(), WAIT) == line
        await channel.send(b"a%d OK\r\n" % number)
        assert peer.recv(100) == b"a%d OK\r\n" % number
    channel.close()


async def test_bytes_sent_while_nobody_reads_are_read_later(
    pair: Pair,
) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.sendall(b"first\r\n")
    assert await asyncio.wait_for(channel.recv(), WAIT) == b"first\r\n"
    # The reader is still registered; the peer speaks while the session is busy elsewhere.
    peer.sendall(b"second\r\n")
    for _ in range(3):
        await asyncio.sleep(0)  # loop iterations in which the reader fires with nobody waiting
    assert await asyncio.wait_for(channel.recv(), WAIT) == b"second\r\n"
    channel.close()


async def test_a_cancelled_read_leaves_the_channel_usable(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    waiting = asyncio.ensure_future(channel.recv())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    peer.sendall(b"after\r\n")
    assert await asyncio.wait_for(channel.recv(), WAIT) == b"after\r\n"
    channel.close()


async def test_end_of_stream_reads_as_empty(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(channel.recv(), WAIT) == b""
    channel.close()


def _watched(descriptor: int) -> bool:
    """Whether the loop's poller (poller.py) watches this descriptor number for anyone."""
    held = poller._pollers.get(asyncio.get_running_loop())
    return held is not None and descriptor in held.watchers


async def test_detach_leaves_no_reader_behind(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.sendall(b"x")
    await _read_in_this_task(channel)
    assert _watched(near.fileno())
    assert channel.detach() is near
    # The relay or TLS starts from a clean slate, and the channel holds the poller no more.
    assert not _watched(near.fileno())
    assert asyncio.get_running_loop() not in poller._pollers


async def test_close_drops_the_reader_before_the_descriptor(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.sendall(b"x")
    await _read_in_this_task(channel)
    descriptor = near.fileno()
    channel.close()
    assert near.fileno() == -1
    # A registration left for the number would fire for whatever socket gets it next.
    assert not _watched(descriptor)
    assert asyncio.get_running_loop() not in poller._pollers


async def test_a_socket_closed_behind_the_channel_still_closes_cleanly(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.sendall(b"x")
    await _read_in_this_task(channel)
    descriptor = near.fileno()
    near.close()  # not through the channel: the number is gone from the socket
    channel.close()  # must not raise: the session's cleanup runs after it
    assert not _watched(descriptor)


async def test_a_reset_behind_the_last_bytes_ends_a_waiting_read(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    waiting = asyncio.ensure_future(channel.recv())
    await asyncio.sleep(0)  # the read waits, registered
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sendall(b"last")
    peer.close()  # bytes and reset arrive together while the read waits
    assert await asyncio.wait_for(waiting, WAIT) == b"last"
    with pytest.raises(ConnectionResetError):
        await _read_in_this_task(channel)
    channel.close()


async def test_last_bytes_then_a_reset_read_as_the_bytes_then_the_reset(pair: Pair) -> None:
    near, peer = pair
    channel = SocketChannel(near)
    peer.sendall(b"first")
    assert await _read_in_this_task(channel) == b"first"
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sendall(b"last")
    peer.close()  # with a zero linger: a reset, delivered on loopback before close returns
    for _ in range(3):
        await asyncio.sleep(0)  # the loop sees the error on the registered socket
    assert await _read_in_this_task(channel) == b"last"
    with pytest.raises(ConnectionResetError):
        await _read_in_this_task(channel)
    channel.close()


async def test_a_transport_channel_holds_one_read_unread_and_hands_on_every_byte(pair: Pair) -> None:
    """A peer that sends far more than the session reads: the transport stops reading once
    MAX_UNREAD waits unread, ``recv`` hands out RECV_SIZE at most, and what ``take_unread`` hands
    to the relay, with the reads before and after, is every byte the peer sent, in order."""
    near, peer = pair
    channel = await TransportChannel.from_socket(near)
    sent = bytes(range(256)) * (4 * MAX_UNREAD // 256 + 1)  # no two offsets alike within 256
    sender = threading.Thread(target=_send_and_end, args=(peer, sent))
    sender.start()
    try:
        for _ in range(int(WAIT / POLL)):
            if not channel.transport.is_reading():
                break
            await asyncio.sleep(POLL)
        assert not channel.transport.is_reading()  # paused: the peer's bytes wait in the kernel
        # Paused once over the mark: by then one read more at most (each is RECV_SIZE at most).
        assert len(channel.receiver.unread) <= MAX_UNREAD + RECV_SIZE
        received = [await asyncio.wait_for(channel.recv(), WAIT)]
        assert len(received[0]) == RECV_SIZE
        received.append(channel.take_unread())
        assert channel.transport.is_reading()  # taken: reading again
        for _ in range(len(sent)):  # each read brings at least one byte until the end
            data = await asyncio.wait_for(channel.recv(), WAIT)
            assert len(data) <= RECV_SIZE
            if not data:
                break
            received.append(data)
    finally:
        channel.close()
        sender.join(WAIT)
    assert b"".join(received) == sent


def _send_and_end(peer: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the test failed and closed the channel: nothing to send to
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)


async def test_a_tls_client_channel_holds_little_unsent_or_undecrypted_until_the_handover(
    pair: Pair, tmp_path: Path
) -> None:
    """Before login a client's TLS layer has the small marks (the loops' defaults let it hold
    256 KiB of input and 512 KiB of replies) and decrypts no more than the channel holds unread;
    records still flow through whole, in order, to a reader that takes RECV_SIZE at a time; the
    relay gets the loop's default input marks."""
    near, peer = pair
    authority = TestAuthority(tmp_path)
    issued = authority.issue("default", ["mail.alpha.example"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(issued.cert, issued.key)
    client = ssl.create_default_context(cafile=str(authority.cert))
    peer.setblocking(False)
    channel, (_, writer) = await asyncio.wait_for(
        asyncio.gather(
            TransportChannel.from_socket(near, server),
            asyncio.open_connection(sock=peer, ssl=client, server_hostname="mail.alpha.example"),
        ),
        WAIT,
    )
    try:
        transport = channel.transport
        assert transport.get_read_buffer_limits() == (TLS_READ_LOW_WATER, TLS_READ_HIGH_WATER)
        assert transport.get_write_buffer_limits() == (TLS_WRITE_HIGH_WATER // 4, TLS_WRITE_HIGH_WATER)
        # The TLS layer looked for input after the handshake and found none: what it was given
        # for it stays until the next read, so it is small.
        await asyncio.sleep(0)
        landing = channel.receiver._landing
        assert landing is None or len(landing) <= MIN_LANDING
        sent = bytes(range(256)) * (4 * TLS_READ_HIGH_WATER // 256 + 7)  # records cut anywhere
        writer.write(sent)
        for _ in range(int(WAIT / POLL)):
            if not transport.is_reading():
                break
            await asyncio.sleep(POLL)
        # Paused: the rest waits as records in the TLS layer (its read marks) and in the kernel.
        assert not transport.is_reading()
        assert len(channel.receiver.unread) <= MAX_UNREAD + RECV_SIZE
        received = b""
        for _ in range(len(sent)):  # each read brings at least one byte
            if len(received) >= len(sent):
                break
            data = await asyncio.wait_for(channel.recv(), WAIT)
            assert 0 < len(data) <= RECV_SIZE
            received += data
        assert received == sent
        assert channel.take_unread() == b""
        defaults = writer.transport.get_read_buffer_limits()  # a TLS transport left as it came
        assert transport.get_read_buffer_limits() == defaults != (TLS_READ_LOW_WATER, TLS_READ_HIGH_WATER)
    finally:
        writer.close()
        channel.close()
