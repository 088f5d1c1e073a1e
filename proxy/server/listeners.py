"""Listening sockets: bind each configured listener and start one session task per client.

Binding happens before anything else so a port clash fails the start with a clear error.
Sessions are tracked so a shutdown can stop accepting, drain them over the grace period
(drain.py) and close what is left. Accepted sockets are non-blocking with TCP_NODELAY (login
replies are small and latency-bound). Each listening socket has one reader registered for as
long as it listens, which accepts what is queued: the loop's ``sock_accept`` registers and drops
a reader per connection, which under uvloop costs about ten system calls each time. Accepting
never blocks and never raises into the loop; out of descriptors (or memory), a listener pauses
between attempts and logs once when that begins and once when it ends.
"""

import asyncio
import errno
import logging
import socket

from proxy.server import drain, session
from proxy.server.certificates import CertificateStore
from proxy.server.context import ProxyContext
from proxy.server.poller import Poller
from proxy.settings import ListenerSettings

log = logging.getLogger(__name__)

# The accept queue; nginx's default backlog is 511 on Linux.
LISTEN_BACKLOG = 511
# Connections accepted per wakeup of a listener at most, so that a flood of connections cannot
# keep the loop from serving the sessions it already has (asyncio's own accept loop takes up to
# its backlog, 100 by default, per wakeup).
ACCEPTS_PER_WAKEUP = 64
# After an accept that failed for want of resources, how long a listener stops accepting, instead
# of spinning on a queue it cannot take from: nginx's wait at the descriptor limit (its
# accept_mutex_delay, 500 ms). Other accept errors concern one connection only.
ACCEPT_ERROR_PAUSE = 0.5
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
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
        self._watching: list[socket.socket] = []  # listening sockets with our reader registered
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}  # after an accept error
        # Listening sockets out of resources: accepts failed since the last that succeeded. One
        # line when such an episode begins and one when it ends, not one per pause.
        self._failing: dict[socket.socket, int] = {}
        self._certificate_watch: asyncio.Task[None] | None = None
        # Held while accepting, so that the sessions share one poller (poller.py).
        self._poller: Poller | None = None
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
        loop = asyncio.get_running_loop()
        self._poller = Poller.acquire(loop)
        for listener, sock in self._sockets:
            settings = listener.settings
            self._watch(loop, listener, sock)
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
            self._certificate_watch = asyncio.create_task(
                self._watch_certificates(stores), name="certificates"
            )

    @staticmethod
    async def _watch_certificates(stores: list[CertificateStore]) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_POLL_INTERVAL)
            for store in stores:
                store.refresh()

    @property
    def listening(self) -> bool:
        watch = self._certificate_watch
        return bool(self._watching or self._paused) and (watch is None or not watch.done())

    def _watch(
        self, loop: asyncio.AbstractEventLoop, listener: session.Listener, sock: socket.socket
    ) -> None:
        loop.add_reader(sock.fileno(), self._accept, loop, listener, sock)
        self._watching.append(sock)

    def _accept(
        self, loop: asyncio.AbstractEventLoop, listener: session.Listener, sock: socket.socket
    ) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except OSError as error:
                self._context.metrics.refusals.labels(reason="accept_error").inc()
                if error.errno not in OUT_OF_RESOURCES:
                    continue  # this connection only (aborted by the client, refused by a firewall)
                # Out of descriptors or memory: say so, and pause this listener instead of spinning.
                failed = self._failing.get(sock, 0)
                if not failed:
                    log.error(
                        "accept on %s failed: %s; retrying every %gs until it recovers",
                        listener.settings.name,
                        error.strerror,
                        ACCEPT_ERROR_PAUSE,
                    )
                self._failing[sock] = failed + 1
                loop.remove_reader(sock.fileno())
                self._watching.remove(sock)
                self._paused[sock] = loop.call_later(ACCEPT_ERROR_PAUSE, self._resume, loop, listener, sock)
                return
            if self._failing and sock in self._failing:
                log.warning(
                    "accept on %s recovered; failed accepts: %d",
                    listener.settings.name,
                    self._failing.pop(sock),
                )
            try:
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                client.close()  # reset before we could set it up: nothing to serve
                continue
            task = loop.create_task(session.serve(self._context, listener, client, self.drain))
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    def _resume(
        self, loop: asyncio.AbstractEventLoop, listener: session.Listener, sock: socket.socket
    ) -> None:
        del self._paused[sock]
        self._watch(loop, listener, sock)

    def close(self) -> None:
        """Stop accepting; open sessions go on until ``stop_sessions``."""
        if self._watching:
            loop = asyncio.get_running_loop()
            for sock in self._watching:
                loop.remove_reader(sock.fileno())
        for handle in self._paused.values():
            handle.cancel()
        if self._certificate_watch is not None:
            self._certificate_watch.cancel()
        if self._poller is not None:
            self._poller.release()  # the sessions still running keep it until they end
            self._poller = None
        for _, sock in self._sockets:
            sock.close()
        self._watching.clear()
        self._paused.clear()
        self._failing.clear()
        self._certificate_watch = None
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
