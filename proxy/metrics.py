"""Every proxy metric, defined once on a registry the caller passes in.

Drivers count what the machines and the table report; pure modules never import this.
Naming follows the Prometheus guide (one prefix, base units, ``_total``, ``_seconds``).
Labels are bounded sets only: never a user, an address, a route name or an IP.
"""

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PREFIX = "mailgress_proxy"
# Backend connect latency buckets, in seconds: loopback is sub-millisecond, a sick backend
# runs into the connect timeout.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Moved(Protocol):
    """What a running relay tells about its bytes (relay.Progress): client to backend, backend
    to client, handed to the kernel so far."""

    def moved(self) -> tuple[int, int]: ...


class RelayedBytes(Collector):
    """``mailgress_proxy_relay_bytes_total``: bytes relayed after login, by protocol and
    direction, the relays still running included, read from them at each scrape. A session held
    for hours (IMAP IDLE) counts as it goes, not in one step when it ends, and a session cut by a
    stop counts what it moved; nothing is counted on the relay's hot path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._ended: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._running: dict[Moved, str] = {}  # a running relay's progress -> its protocol
        registry.register(self)

    def started(self, protocol: str, relay: Moved) -> None:
        self._running[relay] = protocol

    def ended(self, relay: Moved) -> None:
        """``relay`` is over: its final counts join the ended sessions' totals."""
        self._add(self._ended, self._running.pop(relay), relay)

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = self._ended.copy()
        for relay, protocol in self._running.items():
            self._add(totals, protocol, relay)
        family = CounterMetricFamily(
            f"{PREFIX}_relay_bytes",
            "Bytes relayed after login, by direction (upstream = client to backend); sessions "
            "still open count what they have relayed so far.",
            labels=["protocol", "direction"],
        )
        for (protocol, direction), value in sorted(totals.items()):
            family.add_metric([protocol, direction], value)
        yield family

    @staticmethod
    def _add(totals: defaultdict[tuple[str, str], int], protocol: str, relay: Moved) -> None:
        upstream, downstream = relay.moved()
        totals[(protocol, "upstream")] += upstream
        totals[(protocol, "downstream")] += downstream


@dataclass(frozen=True, slots=True)
class ProxyMetrics:
    connections: Counter
    sessions_active: Gauge
    logins: Counter
    relay_bytes: RelayedBytes
    backend_connect_seconds: Histogram
    backend_connect_failures: Counter
    backend_login_failures: Counter
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
            "Login attempts by outcome (accepted, rejected: the credentials refused, refused: the login "
            "refused for another reason, unavailable, no_route, throttled).",
            ["protocol", "outcome"],
            registry=registry,
        ),
        relay_bytes=RelayedBytes(registry),
        backend_connect_seconds=Histogram(
            f"{PREFIX}_backend_connect_seconds",
            "Time to open a TCP connection to a backend endpoint.",
            ["protocol"],
            buckets=CONNECT_BUCKETS,
            registry=registry,
        ),
        backend_connect_failures=Counter(
            f"{PREFIX}_backend_connect_failures",
            "Backend endpoints that refused the TCP connection or did not accept it in time.",
            ["protocol"],
            registry=registry,
        ),
        backend_login_failures=Counter(
            f"{PREFIX}_backend_login_failures",
            "Backend login dialogues that failed after the TCP connect, by reason (timeout, tls, "
            "connection, dialogue); a refused password is not one.",
            ["protocol", "reason"],
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
