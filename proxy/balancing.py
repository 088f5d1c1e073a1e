"""Which endpoint a login tries first, second, ...: the balance policy, then passive health.

``user-hash`` is rendezvous (highest-random-weight) hashing: every endpoint gets a score from
a hash of (endpoint, user) and the order is by score. Adding or removing one of N endpoints
moves only the users whose top choice changed, about 1/N of them, and a down endpoint's users
fall over to their own second choice, spread evenly (what Dovecot's director gave).
``round-robin`` rotates from a position the driver keeps per upstream; ``least-connections``
takes the round-robin order sorted by the driver's count of relayed sessions.
Passive health (``EndpointHealth``) remembers endpoints whose connect or login dialogue failed,
as nginx's upstream ``max_fails``/``fail_timeout`` and Dovecot's failing proxy hosts do: they are
tried after every healthy one, never left out (all failing: all tried, the usual order).
Pure: positions, counts and the clock's reading are passed in by the driver; no I/O, no clocks.
"""

import collections
import dataclasses
import hashlib
from collections.abc import Collection, Container, Mapping, Sequence
from dataclasses import dataclass

from proxy.table import Balance, Endpoint

# How long an endpoint that failed is tried after the healthy ones: nginx's upstream
# `fail_timeout` default. A retry that fails doubles it, up to the cap, so an endpoint that stays
# down costs one login a retry per minute at most, and one back from an outage gets its users
# (user-hash) again within a minute of its recovery.
ENDPOINT_RETRY_SECONDS = 10.0
MAX_ENDPOINT_RETRY_SECONDS = 60.0
# Failing endpoints remembered at most; the oldest episode is forgotten first. Far above any
# table's endpoints; what bounds the endpoints an auth_http service names (Auth-Server).
MAX_FAILING_ENDPOINTS = 4096


def _score(endpoint: Endpoint, key: str) -> bytes:
    # blake2b is fast, keyless here, and stable across processes (unlike hash()).
    return hashlib.blake2b(f"{endpoint.host}|{endpoint.port}|{key}".encode(), digest_size=8).digest()


def endpoint_order(
    endpoints: Sequence[Endpoint],
    policy: Balance,
    key: str,
    position: int = 0,
    *,
    connections: Mapping[Endpoint, int] | None = None,
    failing: Container[Endpoint] = (),
) -> list[Endpoint]:
    """All endpoints in the order to try them for this login.

    Args:
        endpoints: the upstream's ready endpoints.
        policy: the route's balance policy.
        key: the routing key (login name or recipient), folded to lower case by the caller.
        position: the upstream's round-robin position (round-robin, least-connections).
        connections: relayed sessions per endpoint (least-connections; missing: none).
        failing: endpoints to try after all the others (``EndpointHealth.failing``).

    Returns:
        Every endpoint once: the healthy ones in the policy's order, then the failing ones in
        the policy's order.
    """
    if not endpoints:
        return []
    if policy == "user-hash":
        order = sorted(endpoints, key=lambda endpoint: _score(endpoint, key), reverse=True)
    else:
        start = position % len(endpoints)
        order = [*endpoints[start:], *endpoints[:start]]
        if policy == "least-connections" and connections is not None:
            order.sort(key=lambda endpoint: connections.get(endpoint, 0))  # stable: ties rotate
    # Stable: each group keeps the policy's order.
    order.sort(key=lambda endpoint: endpoint in failing)
    return order


@dataclass(frozen=True, slots=True)
class Failing:
    """One episode of an endpoint's failures, from the first failure to the next success."""

    reason: str  # what failed first, for the log
    since: float  # clock seconds of the first failure
    failures: int  # failed attempts in this episode
    period: float  # the retry period now in force
    until: float  # tried after the healthy endpoints until then
    retrying: bool = False  # one login has been let through to retry it


class EndpointHealth:
    """Endpoints whose connect or login dialogue failed lately (not a refused password).

    The driver reports every attempt: ``trying`` before it, then ``failed`` or ``succeeded``.
    An endpoint is failing from its first failure until ``until``; then the next login that
    reaches it retries it while the others keep it last for another period, so a burst of
    logins sends one, not all, to an endpoint that may still hang. A failed retry doubles the
    period (up to the cap); a failure of an attempt made as a last resort while it is failing
    keeps it failing a period from then. Any success ends the episode. ``now`` is the driver's
    monotonic clock and must never go backwards.
    """

    def __init__(
        self,
        retry: float = ENDPOINT_RETRY_SECONDS,
        max_retry: float = MAX_ENDPOINT_RETRY_SECONDS,
        capacity: int = MAX_FAILING_ENDPOINTS,
    ) -> None:
        self._retry = retry
        self._max_retry = max_retry
        self._capacity = capacity
        # In order of their first failure, so the oldest episode is the first to go.
        self._episodes: collections.OrderedDict[Endpoint, Failing] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._episodes)

    def episode(self, endpoint: Endpoint) -> Failing | None:
        """The endpoint's current episode, if it has one."""
        return self._episodes.get(endpoint)

    def failing(self, now: float) -> frozenset[Endpoint]:
        """The endpoints to try last at ``now``: failing, their period not over."""
        return frozenset(endpoint for endpoint, failing in self._episodes.items() if now < failing.until)

    def trying(self, endpoint: Endpoint, now: float) -> None:
        """A login is about to try ``endpoint``; past its period that is the retry, and the
        other logins keep trying it last until the retry's result or another period is over."""
        failing = self._episodes.get(endpoint)
        if failing is not None and now >= failing.until:
            self._episodes[endpoint] = dataclasses.replace(failing, until=now + failing.period, retrying=True)

    def failed(self, endpoint: Endpoint, reason: str, now: float) -> Failing | None:
        """An attempt at ``endpoint`` failed; returns the episode when this failure began it."""
        failing = self._episodes.get(endpoint)
        if failing is None:
            started = Failing(reason, now, 1, self._retry, now + self._retry)
            self._episodes[endpoint] = started
            if len(self._episodes) > self._capacity:
                self._episodes.popitem(last=False)
            return started
        period = min(failing.period * 2, self._max_retry) if failing.retrying else failing.period
        self._episodes[endpoint] = dataclasses.replace(
            failing, failures=failing.failures + 1, period=period, until=now + period, retrying=False
        )
        return None

    def succeeded(self, endpoint: Endpoint) -> Failing | None:
        """An attempt at ``endpoint`` got through its login dialogue; returns the episode this
        ended, if the endpoint was failing."""
        return self._episodes.pop(endpoint, None)

    def retain(self, endpoints: Collection[Endpoint]) -> None:
        """Forget the endpoints not in ``endpoints`` (they left the routing table)."""
        for endpoint in [endpoint for endpoint in self._episodes if endpoint not in endpoints]:
            del self._episodes[endpoint]
