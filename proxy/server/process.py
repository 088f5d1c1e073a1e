"""One proxy process: listeners, admin endpoint and a table source, until a stop signal.

The entry point (``mailgress proxy``) builds the settings and a table source (the standalone
MailRoute watcher, or the controller subscriber in a cluster) and calls ``run``. SIGTERM (what
Kubernetes sends a pod it removes) turns the proxy not-ready, stops accepting and drains the open
sessions over the grace period (drain.py); ``run`` returns once they are gone. SIGINT stops
accepting and closes every session at once, also in the middle of a drain.
"""

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import metrics as proxy_metrics
from proxy.server import admin, certificates, listeners
from proxy.server.context import ProxyContext
from proxy.server.routes import TableHolder
from proxy.settings import AdminSettings, ProxySettings

log = logging.getLogger(__name__)

# A table source keeps the holder up to date for as long as it runs; it installs a first table
# as soon as it has one.
TableSource = Callable[[TableHolder], Coroutine[Any, Any, None]]


async def run(settings: ProxySettings, source: TableSource) -> None:
    """Serve until SIGTERM (then drain) or SIGINT (or until cancelled)."""
    registry = CollectorRegistry()
    metrics = proxy_metrics.create(registry)
    context = ProxyContext(
        settings=settings,
        tables=TableHolder(metrics),
        metrics=metrics,
        backend_tls=certificates.backend_context(settings.backend_tls),
    )
    server = listeners.Listeners(context)
    server.bind_all()
    loop = asyncio.get_running_loop()
    terminated, interrupted = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    source_task = asyncio.create_task(source(context.tables), name="table-source")
    on_sigterm = asyncio.create_task(terminated.wait())
    on_sigint = asyncio.create_task(interrupted.wait())
    background: list[asyncio.Task[object]] = [on_sigterm, on_sigint]
    runner = None
    try:
        # Listening before the first table is installed, on purpose: until then every login and
        # recipient gets the protocol's temporary failure (backends.login, which logs why) and
        # /readyz says 503, which keeps a cluster's traffic away. In a cluster that lasts while
        # the controller is away and there is no usable snapshot; a proxy that waited for a table
        # would refuse connections meanwhile without a word to the client, and a SIGTERM in that
        # wait would need a stop of its own. Standalone, the CLI does not start on a route file it
        # cannot read or parse, so the file watcher installs a table at once.
        if settings.admin is not None:
            # Bound before the mail listeners accept, so that a taken admin port stops the
            # start-up before any client is let in (and then cut).
            runner = await _start_admin(
                settings.admin, registry, lambda: context.tables.ready and server.listening
            )
        server.start()
        done, _ = await asyncio.wait(
            {on_sigterm, on_sigint, source_task}, return_when=asyncio.FIRST_COMPLETED
        )
        if source_task in done:
            source_task.result()  # a table source only ends by failing: let its error out
        server.close()  # not listening: /readyz answers 503 from now on
        if not interrupted.is_set():
            log.info(
                "draining: no new connections; %d open sessions get up to %gs to end",
                len(server.sessions),
                settings.drain.grace_period,
            )
            # The table source keeps running: clients still logging in are routed as usual.
            draining = asyncio.create_task(server.drain_sessions())
            background.append(draining)
            await asyncio.wait({draining, on_sigint}, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: closing %d open sessions", len(server.sessions))
    finally:
        for task in background:
            task.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.close()
        source_task.cancel()
        await asyncio.gather(source_task, return_exceptions=True)
        await server.stop_sessions()
        if runner is not None:
            await runner.cleanup()


async def _start_admin(
    settings: AdminSettings, registry: CollectorRegistry, ready: Callable[[], bool]
) -> web.AppRunner:
    """The admin endpoint, or ListenerError naming its address when it cannot bind."""
    try:
        return await admin.start(settings, registry, ready)
    except OSError as error:
        raise listeners.ListenerError(
            error.errno,
            f"admin endpoint: cannot bind {settings.address}:{settings.port}: {error.strerror or error}",
        ) from error
