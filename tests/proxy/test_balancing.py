"""Endpoint order: user-hash is sticky and consistent; round-robin rotates; least-connections
prefers the emptiest; failing endpoints go last under every policy. Endpoint health: episodes,
retry periods, the one retry at a time, bounds."""

import pytest

from proxy.balancing import (
    ENDPOINT_RETRY_SECONDS,
    MAX_ENDPOINT_RETRY_SECONDS,
    EndpointHealth,
    Failing,
    endpoint_order,
)
from proxy.table import Balance, Endpoint

USERS = [f"user{n}@example.com" for n in range(2000)]


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{n}", 143) for n in range(1, count + 1)]


def first_choices(pool: list[Endpoint]) -> dict[str, Endpoint]:
    return {user: endpoint_order(pool, "user-hash", user)[0] for user in USERS}


def test_user_hash_is_sticky_and_orders_every_endpoint() -> None:
    pool = endpoints(4)
    order = endpoint_order(pool, "user-hash", "alice@example.com")
    assert sorted(order) == sorted(pool)
    assert endpoint_order(list(reversed(pool)), "user-hash", "alice@example.com") == order


def test_adding_an_endpoint_moves_about_one_in_n_users() -> None:
    before = first_choices(endpoints(4))
    after = first_choices(endpoints(5))
    moved = sum(before[user] != after[user] for user in USERS)
    # Ideal is 1/5 of users; every mover goes to the new endpoint, none shuffle between old ones.
    assert 0.12 * len(USERS) < moved < 0.28 * len(USERS)
    assert all(after[user] == Endpoint("10.0.0.5", 143) for user in USERS if before[user] != after[user])


def test_removing_an_endpoint_moves_only_its_users() -> None:
    pool = endpoints(5)
    before = first_choices(pool)
    removed = pool.pop(2)
    after = first_choices(pool)
    assert all(before[user] == after[user] for user in USERS if before[user] != removed)


def test_load_spreads_evenly() -> None:
    counts: dict[Endpoint, int] = {}
    for endpoint in first_choices(endpoints(4)).values():
        counts[endpoint] = counts.get(endpoint, 0) + 1
    assert all(0.18 * len(USERS) < count < 0.32 * len(USERS) for count in counts.values())


def test_round_robin_rotates_with_the_position() -> None:
    pool = endpoints(3)
    firsts = [endpoint_order(pool, "round-robin", "x", position)[0] for position in range(6)]
    assert firsts == [pool[0], pool[1], pool[2], pool[0], pool[1], pool[2]]
    assert endpoint_order([], "user-hash", "x") == []


def test_least_connections_prefers_the_emptiest_and_rotates_among_equals() -> None:
    a, b, c = endpoints(3)
    busy = {a: 2, b: 5}  # c has none
    assert endpoint_order([a, b, c], "least-connections", "x", 0, connections=busy) == [c, a, b]
    even = {a: 1, b: 1, c: 1}
    firsts = [endpoint_order([a, b, c], "least-connections", "x", n, connections=even)[0] for n in range(3)]
    assert firsts == [a, b, c]


@pytest.mark.parametrize("policy", ["user-hash", "round-robin", "least-connections"])
def test_failing_endpoints_go_last_in_the_policys_order(policy: Balance) -> None:
    pool = endpoints(5)
    for position in range(5):
        # The failing endpoint has no relayed session: least-connections would put it first.
        connections = {endpoint: 1 for endpoint in pool[1:]}
        usual = endpoint_order(pool, policy, "alice@example.com", position, connections=connections)
        failing = {usual[0], usual[2]}
        order = endpoint_order(
            pool, policy, "alice@example.com", position, connections=connections, failing=failing
        )
        assert order == [usual[1], usual[3], usual[4], usual[0], usual[2]]  # never left out
        everything = endpoint_order(
            pool, policy, "alice@example.com", position, connections=connections, failing=set(pool)
        )
        assert everything == usual  # all failing: all tried, in the usual order


def test_an_episode_begins_once_and_keeps_its_first_reason() -> None:
    health = EndpointHealth()
    endpoint = Endpoint("10.0.0.1", 143)
    begun = health.failed(endpoint, "unreachable: Connection refused", 100.0)
    assert begun == Failing(
        "unreachable: Connection refused", 100.0, 1, ENDPOINT_RETRY_SECONDS, 100.0 + ENDPOINT_RETRY_SECONDS
    )
    assert health.failed(endpoint, "failed the login dialogue: timed out", 101.0) is None
    episode = health.episode(endpoint)
    assert episode is not None and episode.reason == begun.reason and episode.failures == 2
    # A failure while failing (a last-resort attempt) keeps it failing a period from then.
    assert episode.until == 101.0 + ENDPOINT_RETRY_SECONDS and episode.period == ENDPOINT_RETRY_SECONDS
    ended = health.succeeded(endpoint)
    assert ended == episode
    assert health.succeeded(endpoint) is None and health.episode(endpoint) is None and len(health) == 0


def test_failing_until_the_period_is_over_then_one_login_retries() -> None:
    health = EndpointHealth(retry=10.0, max_retry=60.0)
    down, other = Endpoint("10.0.0.1", 143), Endpoint("10.0.0.2", 143)
    health.failed(down, "unreachable: timed out", 0.0)
    health.trying(down, 5.0)  # a last resort within the period: no retry
    assert health.failing(9.9) == {down}
    assert health.failing(10.0) == frozenset()  # over: back in its usual place
    health.trying(down, 12.0)  # the retry: the other logins keep it last meanwhile
    assert health.failing(12.0) == {down} and health.failing(21.9) == {down}
    assert health.failing(22.0) == frozenset()
    health.trying(other, 12.0)  # never failed: nothing to note
    assert health.episode(other) is None


def test_a_failed_retry_doubles_the_period_up_to_the_cap() -> None:
    health = EndpointHealth(retry=10.0, max_retry=MAX_ENDPOINT_RETRY_SECONDS)
    down = Endpoint("10.0.0.1", 143)
    now = 0.0
    health.failed(down, "unreachable: timed out", now)
    periods = []
    for _ in range(5):
        episode = health.episode(down)
        assert episode is not None
        now = episode.until  # each retry when the period is over
        health.trying(down, now)
        health.failed(down, "unreachable: timed out", now + 1.0)
        episode = health.episode(down)
        assert episode is not None
        periods.append(episode.period)
        assert episode.until == now + 1.0 + episode.period
    assert periods == [20.0, 40.0, 60.0, 60.0, 60.0]


def test_retain_forgets_endpoints_that_left_and_the_capacity_drops_the_oldest() -> None:
    health = EndpointHealth(capacity=3)
    pool = endpoints(4)
    for second, endpoint in enumerate(pool):
        health.failed(endpoint, "unreachable: timed out", float(second))
    assert len(health) == 3 and health.episode(pool[0]) is None  # the oldest went first
    health.retain({pool[1], pool[3]})
    assert health.failing(0.0) == {pool[1], pool[3]}
