"""Listening sockets: bind each configured listener and start one session task per client.

Binding happens before anything else so a port clash fails the start with a clear error.
Sessions are tracked so a shutdown can stop accepting and close what is left. Accepted sockets
are non-blocking with TCP_NODELAY (login replies are small and latency-bound).
"""

import asyncio
import logging
import socket

from proxy.server import session
from proxy.server.context import ProxyContext
from proxy.settings import ListenerSettings

log = logging.getLogger(__name__)

# The accept queue; nginx's default backlog is 511 on Linux.
LISTEN_BACKLOG = 511


class ListenerError(OSError):
    """A listener could not be bound (address in use, not permitted, ...)."""


def bind(listener: ListenerSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenerError(
            error.errno,
            f"listener {listener.name}: cannot bind {listener.address}:{listener.port}: {error.strerror}",
        ) from error
    return sock


class Listeners:
    """All listeners of one proxy process and the sessions they started."""

    def __init__(self, context: ProxyContext) -> None:
        self._context = context
        self._sockets: list[tuple[ListenerSettings, socket.socket]] = []
        self._accepting: list[asyncio.Task[None]] = []
        self.sessions: set[asyncio.Task[None]] = set()

    def bind_all(self) -> None:
        try:
            for listener in self._context.settings.listeners:
                self._sockets.append((listener, bind(listener)))
        except ListenerError:
            self.close()
            raise

    def start(self) -> None:
        for listener, sock in self._sockets:
            self._accepting.append(
                asyncio.create_task(self._accept(listener, sock), name=f"accept-{listener.name}")
            )
            log.info(
                "listening for %s on %s:%d (%s)",
                listener.protocol,
                listener.address,
                listener.port,
                listener.name,
            )

    @property
    def listening(self) -> bool:
        return bool(self._accepting) and not any(task.done() for task in self._accepting)

    async def _accept(self, listener: ListenerSettings, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as error:
                # EMFILE and friends: say so, back off briefly instead of spinning.
                log.error("accept on %s failed: %s", listener.name, error.strerror)
                self._context.metrics.refusals.labels(reason="accept_error").inc()
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(session.serve(self._context, listener, client))
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    def close(self) -> None:
        """Stop accepting; open sessions go on until ``stop_sessions``."""
        for task in self._accepting:
            task.cancel()
        for _, sock in self._sockets:
            sock.close()
        self._accepting.clear()
        self._sockets.clear()

    async def stop_sessions(self) -> None:
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)
