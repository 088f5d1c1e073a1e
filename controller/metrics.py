"""Every controller metric, defined once on a registry the caller passes in.

controller.publisher creates them and serves them on ``GET /metrics``; it and controller.reconciler
update them. Pure of I/O: no clocks, no sockets, no logging here (callers measure, this records).
Labels are bounded sets only: never a proxy name, a user, a route name or an address.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mailgress_controller"
# Push lag buckets, in seconds: a proxy on the same node acks in milliseconds; one that is
# reconnecting gets the table on its next stream, after up to three missed heartbeats
# (controller.publisher.HEARTBEAT_INTERVAL, 15 s).
PUSH_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Compile buckets, in seconds: a handful of routes compile in well under a millisecond, 10,000
# take a large fraction of a second (bench/convergence.py).
COMPILE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Why a snapshot Secret write failed (the reason label): the API refused or failed it (RBAC,
# network, 5xx), or the table exceeds a Secret's 1 MiB even compressed.
SNAPSHOT_API_ERROR = "api_error"
SNAPSHOT_TOO_LARGE = "too_large"


@dataclass(frozen=True, slots=True)
class ControllerMetrics:
    push_lag_seconds: Histogram
    proxies_connected: Gauge
    table_info: Gauge
    table_routes: Gauge
    compile_seconds: Histogram
    acks: Counter
    snapshot_failures: Counter


def create(registry: CollectorRegistry) -> ControllerMetrics:
    """Register the controller's metrics on ``registry`` (a fresh one per test)."""
    snapshot_failures = Counter(
        f"{PREFIX}_snapshot_failures",
        "Writes of the routing table snapshot Secret that failed, by reason (api_error: the API "
        "refused or failed it; too_large: the table exceeds a Secret even compressed).",
        ["reason"],
        registry=registry,
    )
    for reason in (SNAPSHOT_API_ERROR, SNAPSHOT_TOO_LARGE):
        snapshot_failures.labels(reason=reason)  # exported as 0 from the start, so rate() sees the first
    return ControllerMetrics(
        push_lag_seconds=Histogram(
            f"{PREFIX}_push_lag_seconds",
            "Time from publishing a table version (or a proxy's stream opening, if later) to that "
            "proxy's ack of it.",
            buckets=PUSH_LAG_BUCKETS,
            registry=registry,
        ),
        proxies_connected=Gauge(
            f"{PREFIX}_proxies_connected", "Proxies with an open table stream.", registry=registry
        ),
        table_info=Gauge(
            f"{PREFIX}_table_info",
            "The routing table version last published (value 1).",
            ["version"],
            registry=registry,
        ),
        table_routes=Gauge(
            f"{PREFIX}_table_routes", "Routes in the routing table last published.", registry=registry
        ),
        compile_seconds=Histogram(
            f"{PREFIX}_compile_seconds",
            "Time to compile the MailRoutes and endpoints into a routing table.",
            buckets=COMPILE_BUCKETS,
            registry=registry,
        ),
        acks=Counter(
            f"{PREFIX}_acks",
            "Acks received from proxies with an open stream, by whether the proxy applied the table.",
            ["accepted"],
            registry=registry,
        ),
        snapshot_failures=snapshot_failures,
    )
