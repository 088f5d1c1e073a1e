"""What every session of a proxy process shares: settings, the table holder, metrics, counters.

Built once by the process entry point and handed to listeners and sessions; it holds no
sockets of its own. The abuse limits are built from the settings, so every listener shares them.
"""

import collections
import ssl
from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from proxy.metrics import ProxyMetrics
from proxy.server.limits import Limits
from proxy.server.routes import TableHolder
from proxy.settings import ProxySettings
from proxy.table import Endpoint

Metric = TypeVar("Metric", Counter, Gauge, Histogram)


@dataclass(slots=True)
class ProxyContext:
    settings: ProxySettings
    tables: TableHolder
    metrics: ProxyMetrics
    # Client context for backends reached over TLS or STARTTLS (certificates.backend_context).
    backend_tls: ssl.SSLContext
    # Sessions started so far: the round-robin position.
    sessions_started: int = 0
    # Relayed sessions per backend endpoint, for least-connections.
    active: collections.Counter[Endpoint] = field(default_factory=collections.Counter)
    # Failed-login throttle and connections per client address, shared by all listeners.
    limits: Limits = field(init=False)
    # Metric children by metric and label values (``labelled``).
    children: dict[tuple[Counter | Gauge | Histogram, tuple[str, ...]], object] = field(
        init=False, default_factory=dict, repr=False
    )

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
