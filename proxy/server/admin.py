"""The admin HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for the kubelet.

Ready means: a routing table is installed and every listener is accepting. Healthy means the
event loop answers. process.py starts it and cleans the returned runner up. Nothing here reveals
users, routes' contents or credentials. Whoever reaches the port (by default the chart lets every
pod in) must never hold the proxy's descriptors: at most MAX_CONNECTIONS are open at once, and a
connection that has no request answered within REQUEST_TIMEOUT is closed, so silent, half-sent or
non-reading clients cannot leave the mail listeners without descriptors (EMFILE). Nor must they
keep the kubelet's probes out (failed liveness probes restart a healthy proxy and cut every mail
session on it): a connection over the cap makes room by aborting the one without a request in
progress that has waited longest for its next request, else one whose client is behind on its
answers (an answer it does not read waits to be written, or requests it pipelined wait behind
one: /metrics needs no token, and such a client would otherwise hold its place until its
deadline); it is refused only when every open connection is in the middle of a request its client
keeps up with. proxy.server.connections.Guard does this guarding (the controller's push port has
one too).
"""

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.server import connections
from proxy.settings import AdminSettings

# Admin connections open at once at most. Probes and scrapes take milliseconds, so a handful at a
# time is plenty (the kubelet's probes, one or two Prometheus), and 32 descriptors are a small
# share of even a 1024-descriptor limit. One more aborts the connection idle the longest (without
# a request in progress; answered or accepted the longest ago), so probes get through: an
# attacker's idle connections are the oldest and go first, and a probe's own connection is busy
# only for the milliseconds of its answer. Then one whose client pipelines or does not read its
# answers makes room; only when all are busy with clients that keep up is the new one closed unread.
MAX_CONNECTIONS = 32
# How long a connection may go without a request answered, counted from its accept and again from
# each answer written. nginx gives a client 60 s for its request headers (client_header_timeout). Prometheus
# keeps its connection when it scrapes more often than this and reconnects otherwise. aiohttp's
# keepalive_timeout (3630 s by default) is no such bound: it never ends a response its client
# stopped reading.
REQUEST_TIMEOUT = 60.0


async def start(
    settings: AdminSettings,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
) -> web.AppRunner:
    """Serve the admin endpoint until the returned runner is cleaned up."""
    guard = connections.Guard("admin", max_connections, request_timeout)

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
    await guard.site(runner, settings.address, settings.port).start()
    return runner
