"""One side of a session before the relay: a byte channel that may switch to TLS midway.

A plaintext connection stays a bare socket (``SocketChannel``: the cheapest reads, and the relay
can splice it); the moment TLS is needed (an implicit-TLS listener, STARTTLS, a TLS backend) the
socket is handed to an asyncio TLS transport (``TransportChannel``) that runs the handshake
itself. The socket never becomes a plain transport first: such a transport would start reading
at once and swallow the peer's TLS hello as if it were pipelined plaintext. The session and the
backend login only ever ``recv``, ``send`` and ``start_tls``; the relay takes the socket or the
transport, with whatever arrived but was not read yet. Works with uvloop's transports, which are
not ``asyncio.Transport`` subclasses.

A channel never lets its socket go with a reader still registered: the relay, a TLS transport
and ``close`` all take it through ``detach``, which drops the registration first (a registration
left behind would outlive the descriptor and fire for whatever socket reuses the number).
"""

import asyncio
import socket
import ssl
import typing
from typing import cast

from proxy.server.poller import Poller

# One read from a peer before login; pre-login dialogues are a few short lines. A transport
# channel hands out at most this much per ``recv`` too, as a socket read gives.
RECV_SIZE = 16384
# A transport stops reading from its peer when this much arrived unread, and reads again once the
# session took it below (only a misbehaving peer gets there before login: the machines bound
# lines and literals far below it). A client that pipelines commands and never reads the replies
# is thus held at one read's worth, as on a bare socket, where the kernel's buffer holds the rest;
# nginx keeps one page (IMAP, SMTP) or 128 octets (POP3) of a client unread.
MAX_UNREAD = RECV_SIZE
# What a client's TLS layer may hold before login, in place of the loops' defaults (256 KiB of
# input not yet decrypted, 512 KiB of replies not yet sent), which a client that pipelines and
# reads nothing would fill. Input: both marks above a whole record's ciphertext (RFC 5246
# section 6.2.3: 2^14 + 2048 octets), or a record cut in two would never be completed. The
# relay gets the defaults back for the input and sets its own marks for the output.
TLS_READ_HIGH_WATER = 4 * RECV_SIZE
TLS_READ_LOW_WATER = 2 * RECV_SIZE
TLS_WRITE_HIGH_WATER = RECV_SIZE
# The buffer a read of a transport channel gets when its TLS layer holds next to nothing
# encrypted (uvloop's asks for what it holds plus 256 octets).
MIN_LANDING = 256
# How long a closing TLS connection may take to flush what is left and exchange close_notify
# (RFC 8446 section 6.1) before it is cut: a peer that reads nothing would otherwise hold the
# descriptor for the loop's default of 30 seconds after its session ended. nginx gives
# SSL_shutdown the same 3 seconds (ngx_ssl_shutdown).
TLS_SHUTDOWN_TIMEOUT = 3.0


class SocketChannel:
    """A non-blocking plaintext socket, read and written through the event loop.

    Reads wait on one reader callback that stays registered, on the loop's own epoll (poller.py),
    while the dialogue goes back and forth. Not the loop's ``sock_recv``: it registers and drops a
    reader for every read, and uvloop builds and tears down a poll handle each time (about ten
    system calls per read); and uvloop falls silent on a socket once it reported an error on it,
    so a reset arriving with the peer's last bytes would leave a read waiting for the session's
    timeout. The reader is dropped when the peer speaks while nothing waits for it (it is
    level-triggered: it would fire on every loop iteration) and when the socket is detached.
    """

    # Slots: a channel lives as long as its session, thousands of them idle at a time.
    __slots__ = ("_loop", "_poller", "_readable", "_watched", "sock", "upgraded")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.upgraded: TransportChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: Poller | None = None  # held from the first wait until detached
        self._readable: asyncio.Future[None] | None = None  # what a waiting recv awaits
        # The descriptor number our reader is registered for, or -1. Kept, not read from the
        # socket when dropping: a socket closed behind the channel's back has no number anymore.
        self._watched = -1

    @property
    def tls(self) -> ssl.SSLObject | None:
        return self.upgraded.tls if self.upgraded else None

    async def recv(self, size: int = RECV_SIZE) -> bytes:
        """At most ``size`` octets, once there are any; b"" at the peer's EOF."""
        if self.upgraded:
            return await self.upgraded.recv(size)
        loop = self._loop or self._bind_loop()
        while True:
            waiter = self._readable = loop.create_future()
            if self._watched < 0:
                if self._poller is None:
                    self._poller = Poller.acquire(loop)
                self._watched = self.sock.fileno()
                self._poller.add_reader(self._watched, self._on_readable)
            try:
                await waiter
            finally:
                self._readable = None
            try:
                return self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                continue  # readable, then not after all: wait again

    def _on_readable(self) -> None:
        waiter = self._readable
        if waiter is None or waiter.done():
            self._stop_watching()  # nobody reads now: the next recv registers again
        else:
            waiter.set_result(None)

    def _stop_watching(self) -> None:
        if self._watched >= 0:
            assert self._poller is not None  # held before the first registration
            self._poller.remove_reader(self._watched)
            self._watched = -1

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def send(self, data: bytes) -> None:
        if self.upgraded:
            await self.upgraded.send(data)
        else:
            await (self._loop or self._bind_loop()).sock_sendall(self.sock, data)

    def detach(self) -> socket.socket:
        """The socket, with nothing of the channel's registered for it: for the relay or TLS."""
        self._stop_watching()
        if self._poller is not None:
            self._poller.release()
            self._poller = None
        return self.sock

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> None:
        """Hand the socket to a TLS transport, which runs the handshake (STARTTLS, either side)."""
        if self.upgraded is not None:
            raise ConnectionError("TLS is already active on this connection")
        if server_side:
            self.upgraded = await TransportChannel.from_socket(self.detach(), context)
        else:
            assert server_hostname is not None  # a backend's certificate is always checked by name
            self.upgraded = await TransportChannel.connect_tls(self.detach(), context, server_hostname)

    def close(self) -> None:
        if self.upgraded:
            self.upgraded.close()  # the transport owns the socket now
        else:
            self.detach().close()


class _Receiver(asyncio.BufferedProtocol):
    """Collects what a transport reads until the channel asks for it; honours flow control.

    Buffered (``get_buffer``): a transport hands over at most RECV_SIZE per call, so a TLS
    layer decrypts no more than that at a time and keeps the rest as records (bounded by its
    read marks) while the channel's input is paused; as a plain protocol it would get all it
    had decrypted in one call.

    Once the relay has taken the transport over (``forward_to``; relay.Predecessor), whatever
    the loop still delivers here goes to the relay's protocol: uvloop's TLS transport schedules a
    lost connection's ``connection_lost`` for the protocol of that moment, so a client that
    leaves right after its login reply could otherwise be reported to nobody.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.unread = bytearray()
        self.eof = False  # the peer sent EOF, or the connection is gone
        self.lost = False  # connection_lost has run: the transport is closed
        self.error: Exception | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._successor: asyncio.Protocol | None = None
        self._landing: bytearray | None = None  # where the transport writes its current read

    def forward_to(self, successor: asyncio.Protocol) -> None:
        """The relay took the transport over: pass on what still arrives here."""
        self._successor = successor
        self._landing = None  # left by a look that found nothing: the relay reads from here on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        # A buffer of its own for each read (the caller keeps a view of it until after
        # buffer_updated, so ``unread`` itself could not grow then); reads are few before login.
        # A TLS layer hints what it holds encrypted and asks even when it holds nothing (it only
        # looks): such a buffer stays unused until the next read, so it gets a small one.
        size = MIN_LANDING if 0 <= sizehint <= MIN_LANDING else RECV_SIZE
        self._landing = bytearray(size)
        return memoryview(self._landing)

    def buffer_updated(self, nbytes: int) -> None:
        landing, self._landing = self._landing, None
        assert landing is not None  # the transport asked for it first
        if self._successor is not None:
            self._successor.data_received(bytes(landing[:nbytes]))
            return
        self.unread += memoryview(landing)[:nbytes]
        if len(self.unread) > MAX_UNREAD and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self._successor is not None:
            return bool(self._successor.eof_received())
        self.eof = True
        self._wake()
        # Keep our writing side open (a reply may still be on its way out); TLS cannot half-close.
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._successor is not None:
            self._successor.connection_lost(exc)
            return
        self.eof = True
        self.lost = True
        self.error = exc
        self._landing = None  # a read that never came
        self._wake()
        if self._writable and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._successor is not None:
            self._successor.pause_writing()
            return
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._successor is not None:
            self._successor.resume_writing()
            return
        if self._writable and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _wake(self) -> None:
        if self._readable and not self._readable.done():
            self._readable.set_result(None)

    async def wait_readable(self) -> None:
        if self.unread or self.eof:
            return
        self._readable = asyncio.get_running_loop().create_future()
        await self._readable

    async def wait_writable(self) -> None:
        if self._writable is not None:
            await self._writable

    def take(self, limit: int | None = None) -> bytes:
        """What arrived unread, the first ``limit`` bytes of it at most; reads again below the
        bound."""
        if limit is None or limit >= len(self.unread):
            data = bytes(self.unread)
            self.unread.clear()
        else:
            data = bytes(self.unread[:limit])
            del self.unread[:limit]
        if self._reading_paused and self.transport and len(self.unread) <= MAX_UNREAD:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


class _ReadLimits(typing.Protocol):
    """A TLS transport of either loop: it bounds the input it holds not yet decrypted."""

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class TransportChannel:
    """An asyncio transport (plain, or TLS after ``start_tls``) read through a ``_Receiver``."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self.transport = transport
        self.receiver = receiver

    @classmethod
    async def from_socket(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> "TransportChannel":
        """Wrap an accepted socket; with ``context``, run the server-side TLS handshake first."""
        receiver = _Receiver()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: receiver,
            sock,
            ssl=context,
            ssl_handshake_timeout=handshake_timeout if context else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if context else None,
        )
        if context is not None:  # a client in TLS before its login
            cast(_ReadLimits, transport).set_read_buffer_limits(
                high=TLS_READ_HIGH_WATER, low=TLS_READ_LOW_WATER
            )
            transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        return cls(transport, receiver)

    @classmethod
    async def connect_tls(
        cls, sock: socket.socket, context: ssl.SSLContext, server_hostname: str
    ) -> "TransportChannel":
        """Wrap a connected client socket and run the TLS handshake (a backend reached over TLS)."""
        receiver = _Receiver()
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: receiver,
            sock=sock,
            ssl=context,
            server_hostname=server_hostname,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        return cls(transport, receiver)

    @property
    def tls(self) -> ssl.SSLObject | None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object if isinstance(ssl_object, ssl.SSLObject) else None

    async def recv(self, size: int = RECV_SIZE) -> bytes:
        """At most ``size`` octets of what arrived (no more than ``MAX_UNREAD`` and one read wait
        unread), once there are any; b"" at the peer's EOF."""
        await self.receiver.wait_readable()
        if not self.receiver.unread and self.receiver.error is not None:
            raise self.receiver.error
        return self.receiver.take(size)

    async def send(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)
        await self.receiver.wait_writable()

    def take_unread(self) -> bytes:
        """What arrived but was not read: handed to the relay with the transport, whose TLS layer
        gets its default input limits back (a bare transport has none)."""
        if self.tls is not None:
            cast(_ReadLimits, self.transport).set_read_buffer_limits()
        return self.receiver.take()

    def close(self) -> None:
        self.transport.close()


def transport_channel(channel: "SocketChannel | TransportChannel") -> "TransportChannel | None":
    """The transport behind a channel, or None while it is still a bare socket."""
    return channel.upgraded if isinstance(channel, SocketChannel) else channel


async def as_transport(channel: "SocketChannel | TransportChannel") -> TransportChannel:
    """Turn a bare-socket channel into a transport one (for a relay where the other side is TLS).

    Take its unread bytes only after every side is converted, and hand the transports to the relay
    without an ``await`` in between, so nothing arriving in the gap is lost.
    """
    existing = transport_channel(channel)
    if existing is not None:
        return existing
    assert isinstance(channel, SocketChannel)
    channel.upgraded = await TransportChannel.from_socket(channel.detach())
    return channel.upgraded
