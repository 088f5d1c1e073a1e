"""The proxy's metrics: the relayed-bytes counter reads running relays at each scrape."""

from prometheus_client import CollectorRegistry

from proxy import metrics


class FakeRelay:
    """A relay's progress as the collector sees it (relay.Progress)."""

    def __init__(self) -> None:
        self.counts = (0, 0)

    def moved(self) -> tuple[int, int]:
        return self.counts


def relayed(registry: CollectorRegistry, protocol: str, direction: str) -> float | None:
    return registry.get_sample_value(
        "mailgress_proxy_relay_bytes_total", {"protocol": protocol, "direction": direction}
    )


def test_running_and_ended_relays_add_up_by_protocol_and_direction() -> None:
    registry = CollectorRegistry()
    collector = metrics.create(registry).relay_bytes
    assert relayed(registry, "imap", "upstream") is None  # no series before the first relay
    first, second, other = FakeRelay(), FakeRelay(), FakeRelay()
    collector.started("imap", first)
    collector.started("imap", second)
    collector.started("pop3", other)
    first.counts, second.counts, other.counts = (10, 100), (1, 2), (5, 50)
    assert relayed(registry, "imap", "upstream") == 11
    assert relayed(registry, "imap", "downstream") == 102
    assert relayed(registry, "pop3", "downstream") == 50
    first.counts = (12, 300)  # it goes on, then ends
    collector.ended(first)
    first.counts = (0, 0)  # an ended relay is not read again
    assert relayed(registry, "imap", "upstream") == 13
    assert relayed(registry, "imap", "downstream") == 302
