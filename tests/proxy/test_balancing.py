"""Endpoint order: user-hash is sticky and consistent; round-robin rotates."""

from proxy.balancing import endpoint_order
from proxy.table import Endpoint

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


def test_round_robin_rotates_with_the_counter() -> None:
    pool = endpoints(3)
    firsts = [endpoint_order(pool, "round-robin", "x", counter)[0] for counter in range(6)]
    assert firsts == [pool[0], pool[1], pool[2], pool[0], pool[1], pool[2]]
    assert endpoint_order([], "user-hash", "x") == []
