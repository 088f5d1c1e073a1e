"""What every session of a proxy process shares: settings, the table holder, metrics, counters.

Built once by the process entry point and handed to listeners and sessions; it holds no
sockets of its own. The abuse limits are built from the settings, so every listener shares them.
The balancing state (round-robin positions, endpoint health, auth_http outages) is kept per
route and endpoint of the table in use: ``routing_table`` forgets what a new table no longer
has, so it stays bounded by the table.
"""

import collections
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from proxy import balancing
from proxy.metrics import ProxyMetrics
from proxy.server.limits import Limits
from proxy.server.routes import TableHolder
from proxy.settings import ProxySettings
from proxy.table import Endpoint, Protocol, RoutingTable

Metric = TypeVar("Metric", Counter, Gauge, Histogram)


@dataclass(slots=True)
class ProxyContext:
    settings: ProxySettings
    tables: TableHolder
    metrics: ProxyMetrics
    # Client context for backends reached over TLS or STARTTLS (certificates.backend_context).
    backend_tls: ssl.SSLContext
    # What endpoint health reads the time from (tests step a clock by hand).
    clock: Callable[[], float] = time.monotonic
    # The round-robin position of each route's upstream per protocol (nginx keeps one per
    # upstream block): routes balanced side by side each rotate over their own endpoints.
    positions: dict[tuple[str, Protocol], int] = field(default_factory=dict)
    # Relayed sessions per backend endpoint, for least-connections.
    active: collections.Counter[Endpoint] = field(default_factory=collections.Counter)
    # Endpoints whose connect or login dialogue failed lately: tried after the healthy ones.
    health: balancing.EndpointHealth = field(default_factory=balancing.EndpointHealth)
    # Routes whose auth_http service is failing, and how many of its requests failed: each
    # outage is logged when it begins and when it ends, not at every login.
    auth_failures: dict[str, int] = field(default_factory=dict)
    # Failed-login throttle and connections per client address, shared by all listeners.
    limits: Limits = field(init=False)
    # Metric children by metric and label values (``labelled``).
    children: dict[tuple[Counter | Gauge | Histogram, tuple[str, ...]], object] = field(
        init=False, default_factory=dict, repr=False
    )
    # The table version the balancing state was last trimmed to, and that table's endpoints.
    trimmed_for: str = field(init=False, default="")
    endpoints_in_use: frozenset[Endpoint] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.limits = Limits(self.settings.limits)

    def labelled(self, metric: Metric, *values: str) -> Metric:
        """``metric.labels(*values)`` (values in the order of its label names), resolved once.

        Every session counts into the same few children, and ``labels`` checks its arguments and
        takes a lock on each call. A child is still made on its first use, as ``labels`` makes it.
        """
        key = (metric, values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(*values)
        return cast(Metric, child)

    def routing_table(self) -> RoutingTable:
        """The table in use; the first call after a swap forgets the positions, endpoint health
        and auth_http outages of the routes and endpoints it no longer has."""
        current = self.tables.current
        if current.version != self.trimmed_for:
            self.trimmed_for = current.version
            names = {route.name for route in current.routes}
            self.endpoints_in_use = frozenset(
                endpoint
                for route in current.routes
                for _, upstream in route.upstreams
                for endpoint in upstream.endpoints
            )
            self.positions = {key: value for key, value in self.positions.items() if key[0] in names}
            self.auth_failures = {name: n for name, n in self.auth_failures.items() if name in names}
            self.health.retain(self.endpoints_in_use)
        return current
