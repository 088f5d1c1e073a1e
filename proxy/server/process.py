"""One proxy process: listeners, admin endpoint and a table source, until a stop signal.

The entry point (``mailgress proxy``) builds the settings and a table source (the standalone
MailRoute watcher, or the controller subscriber in a cluster) and calls ``run``. SIGINT and
SIGTERM stop accepting and close the sessions that are left.
"""

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from proxy import metrics as proxy_metrics
from proxy.server import admin, certificates, listeners
from proxy.server.context import ProxyContext
from proxy.server.routes import TableHolder
from proxy.settings import ProxySettings

log = logging.getLogger(__name__)

# A table source keeps the holder up to date for as long as it runs; it installs a first table
# as soon as it has one.
TableSource = Callable[[TableHolder], Coroutine[Any, Any, None]]


async def run(settings: ProxySettings, source: TableSource) -> None:
    """Serve until SIGINT/SIGTERM (or until cancelled)."""
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
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    source_task = asyncio.create_task(source(context.tables), name="table-source")
    runner = None
    try:
        server.start()
        if settings.admin is not None:
            runner = await admin.start(
                settings.admin, registry, lambda: context.tables.ready and server.listening
            )
        stop_wait = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait({stop_wait, source_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if source_task in done:
            source_task.result()  # a table source only ends by failing: let its error out
        log.info("stopping: no new connections; closing %d open sessions", len(server.sessions))
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.close()
        source_task.cancel()
        await asyncio.gather(source_task, return_exceptions=True)
        await server.stop_sessions()
        if runner is not None:
            await runner.cleanup()
