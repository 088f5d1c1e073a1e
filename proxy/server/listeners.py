"""Listening sockets: bind each configured listener and start one session task per client.

Binding happens before anything else so a port clash fails the start with a clear error.
Sessions are tracked so a shutdown can stop accepting, drain them over the grace period
(drain.py) and close what is left. Accepted sockets are non-blocking with TCP_NODELAY (login
replies are small and latency-bound).
"""

import asyncio
import logging
import socket

from proxy.server import drain, session
from proxy.server.certificates import CertificateStore
from proxy.server.context import ProxyContext
from proxy.settings import ListenerSettings

log = logging.getLogger(__name__)

# The accept queue; nginx's default backlog is 511 on Linux.
LISTEN_BACKLOG = 511
# How often certificate files are checked for renewal: new connections get a renewed certificate
# within this many seconds.
CERTIFICATE_POLL_INTERVAL = 1.0


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
        self._sockets: list[tuple[session.Listener, socket.socket]] = []
        self._accepting: list[asyncio.Task[None]] = []
        self.sessions: set[asyncio.Task[None]] = set()
        settings = context.settings
        self.drain = drain.Drain(settings.drain, settings.server_name, context.metrics)

    def bind_all(self) -> None:
        """Load certificates and bind every listener; raises CertificateError or ListenerError."""
        try:
            for settings in self._context.settings.listeners:
                certificates = (
                    CertificateStore(settings.name, settings.certificates) if settings.certificates else None
                )
                self._sockets.append((session.Listener(settings, certificates), bind(settings)))
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Each listener's bound address (port 0 in the settings means the kernel chose one)."""
        return {listener.settings.name: sock.getsockname()[:2] for listener, sock in self._sockets}

    def start(self) -> None:
        for listener, sock in self._sockets:
            settings = listener.settings
            self._accepting.append(
                asyncio.create_task(self._accept(listener, sock), name=f"accept-{settings.name}")
            )
            log.info(
                "listening for %s on %s:%d (%s, tls %s)",
                settings.protocol,
                settings.address,
                sock.getsockname()[1],
                settings.name,
                settings.tls,
            )
        stores = [listener.certificates for listener, _ in self._sockets if listener.certificates]
        if stores:
            self._accepting.append(asyncio.create_task(self._watch_certificates(stores), name="certificates"))

    @staticmethod
    async def _watch_certificates(stores: list[CertificateStore]) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_POLL_INTERVAL)
            for store in stores:
                store.refresh()

    @property
    def listening(self) -> bool:
        return bool(self._accepting) and not any(task.done() for task in self._accepting)

    async def _accept(self, listener: session.Listener, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as error:
                # EMFILE and friends: say so, back off briefly instead of spinning.
                log.error("accept on %s failed: %s", listener.settings.name, error.strerror)
                self._context.metrics.refusals.labels(reason="accept_error").inc()
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(session.serve(self._context, listener, client, self.drain))
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

    async def drain_sessions(self) -> None:
        """After ``close``: drain the open sessions until none is left or the grace period is
        over, then close what is left (at once with a grace period of 0)."""
        grace = self.drain.settings.grace_period
        if grace and self.sessions:  # no new one can start: the listeners are closed
            self.drain.begin()
            await asyncio.wait(set(self.sessions), timeout=grace)
        await self.stop_sessions()

    async def stop_sessions(self) -> None:
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)
