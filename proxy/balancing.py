"""Which endpoint a login tries first, second, ...: user-hash (sticky) and round-robin.

``user-hash`` is rendezvous (highest-random-weight) hashing: every endpoint gets a score from
a hash of (endpoint, user) and the order is by score. Adding or removing one of N endpoints
moves only the users whose top choice changed, about 1/N of them, and a down endpoint's users
fall over to their own second choice, spread evenly (what Dovecot's director gave).
Pure: the round-robin counter is passed in by the driver; no I/O, no clocks.
"""

import hashlib
from collections.abc import Sequence

from proxy.table import Balance, Endpoint


def _score(endpoint: Endpoint, key: str) -> bytes:
    # blake2b is fast, keyless here, and stable across processes (unlike hash()).
    return hashlib.blake2b(f"{endpoint.host}|{endpoint.port}|{key}".encode(), digest_size=8).digest()


def endpoint_order(
    endpoints: Sequence[Endpoint], policy: Balance, key: str, counter: int = 0
) -> list[Endpoint]:
    """All endpoints in the order to try them for this login.

    Args:
        endpoints: the upstream's ready endpoints.
        policy: the route's balance policy; ``least-connections`` is ordered by the driver from
            this round-robin order (it alone knows the counts).
        key: the routing key (login name or recipient), folded to lower case by the caller.
        counter: the driver's running count of sessions, for round-robin.
    """
    if not endpoints:
        return []
    if policy == "user-hash":
        return sorted(endpoints, key=lambda endpoint: _score(endpoint, key), reverse=True)
    start = counter % len(endpoints)
    return [*endpoints[start:], *endpoints[:start]]
