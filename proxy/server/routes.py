"""The routing table a proxy serves from, swapped atomically when a new one arrives.

Whatever produces tables (the standalone file watcher, or the push subscriber in a cluster)
calls ``swap``; every new session reads ``current`` once, so open sessions keep the backend they
have while new ones see the new table. One reference assignment is the whole swap.
"""

import logging

from proxy import table
from proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)


class TableHolder:
    """Holds the table in use; ``ready`` once a first table has been installed."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics
        self.current: table.RoutingTable = table.EMPTY_TABLE
        self.ready = False
        self._unready_told = False

    def first_unready_answer(self) -> bool:
        """True for the first login answered while no table is installed, False after.

        The warning is logged once, not per login: one client pipelining logins would otherwise
        write a line per attempt (the metric still counts each). ``swap`` logs the end of it.
        """
        told, self._unready_told = self._unready_told, True
        return not told

    def swap(self, new: table.RoutingTable) -> bool:
        """Install ``new``; returns False when it is the table already in use."""
        if self.ready and new.version == self.current.version:
            return False
        if self.ready:
            self._metrics.table_info.remove(self.current.version)
        self.current = new
        self.ready = True
        self._metrics.table_info.labels(version=new.version).set(1)
        self._metrics.table_routes.set(len(new.routes))
        log.info("routing table %s installed (%d routes)", new.version, len(new.routes))
        return True
