"""How the FETCH of many small messages counts its copies: by content, every stored message once.

Plain byte strings stand in for the stored and fetched messages (no servers run).
"""

from bench import workloads

STORED = [b"one", b"two", b"three"]


def _tally(fetched: list[bytes]) -> workloads._Tally:
    tally = workloads._Tally()
    workloads.compare_copies(STORED, fetched, tally, "FETCH 0")
    return tally


def test_every_message_back_intact_in_any_order_counts_each_as_done() -> None:
    tally = _tally([b"three", b"one", b"two"])
    assert (tally.done, tally.failures, tally.first_failure) == (3, 0, "")


def test_an_altered_message_is_one_failure() -> None:
    tally = _tally([b"one", b"twO", b"three"])
    assert (tally.done, tally.failures) == (2, 1)
    assert tally.first_failure == (
        "DialogueError: FETCH 0: 1 stored messages did not come back intact; 1 copies match none of them"
    )


def test_a_missing_message_is_a_failure_even_when_another_came_back_twice() -> None:
    twice = _tally([b"one", b"one", b"three"])
    assert (twice.done, twice.failures) == (2, 1)
    short = _tally([b"two"])
    assert (short.done, short.failures) == (1, 2)
    assert short.first_failure.endswith(
        "2 stored messages did not come back intact; 0 copies match none of them"
    )
