"""The admin HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for the kubelet.

Ready means: a routing table is installed and every listener is accepting. Healthy means the
event loop answers. Nothing here reveals users, routes' contents or credentials.
"""

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.settings import AdminSettings


async def start(
    settings: AdminSettings, registry: CollectorRegistry, ready: Callable[[], bool]
) -> web.AppRunner:
    """Serve the admin endpoint until the returned runner is cleaned up."""

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: no routing table yet or listeners down\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.address, settings.port).start()
    return runner
