"""Every proxy metric, defined once on a registry the caller passes in.

Drivers count what the machines and the table report; pure modules never import this.
Naming follows the Prometheus guide (one prefix, base units, ``_total``, ``_seconds``).
Labels are bounded sets only: never a user, an address, a route name or an IP.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mailgress_proxy"
# Backend connect latency buckets, in seconds: loopback is sub-millisecond, a sick backend
# runs into the connect timeout.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class ProxyMetrics:
    connections: Counter
    sessions_active: Gauge
    logins: Counter
    relay_bytes: Counter
    backend_connect_seconds: Histogram
    backend_connect_failures: Counter
    table_info: Gauge
    table_routes: Gauge
    refusals: Counter
    drained_sessions: Counter


def create(registry: CollectorRegistry) -> ProxyMetrics:
    """Register the proxy's metrics on ``registry`` (a fresh one per test)."""
    return ProxyMetrics(
        connections=Counter(
            f"{PREFIX}_connections",
            "Client connections accepted.",
            ["listener", "protocol"],
            registry=registry,
        ),
        sessions_active=Gauge(
            f"{PREFIX}_sessions_active", "Client sessions currently open.", ["protocol"], registry=registry
        ),
        logins=Counter(
            f"{PREFIX}_logins",
            "Login attempts by outcome (accepted, rejected, unavailable, no_route, throttled).",
            ["protocol", "outcome"],
            registry=registry,
        ),
        relay_bytes=Counter(
            f"{PREFIX}_relay_bytes",
            "Bytes relayed after login, by direction (upstream = client to backend).",
            ["protocol", "direction"],
            registry=registry,
        ),
        backend_connect_seconds=Histogram(
            f"{PREFIX}_backend_connect_seconds",
            "Time to open a TCP connection to a backend endpoint.",
            ["protocol"],
            buckets=CONNECT_BUCKETS,
            registry=registry,
        ),
        backend_connect_failures=Counter(
            f"{PREFIX}_backend_connect_failures",
            "Backend endpoints that refused or timed out.",
            ["protocol"],
            registry=registry,
        ),
        table_info=Gauge(
            f"{PREFIX}_routing_table_info",
            "The routing table version in use (value 1).",
            ["version"],
            registry=registry,
        ),
        table_routes=Gauge(
            f"{PREFIX}_routing_table_routes", "Routes in the table in use.", registry=registry
        ),
        refusals=Counter(
            f"{PREFIX}_refusals",
            "Sessions refused or closed, and logins refused, by a limit, by reason.",
            ["reason"],
            registry=registry,
        ),
        drained_sessions=Counter(
            f"{PREFIX}_drained_sessions",
            "Sessions that ended while the proxy was draining, by how they ended (closed_before_login, "
            "closed_when_quiet, ended_on_their_own, cut_at_deadline).",
            ["protocol", "outcome"],
            registry=registry,
        ),
    )
