"""The controller's metrics: defined on a fresh registry, updated by the publisher and the
reconciler, served on the push port without the token and revealing nothing secret.

The publisher is spoken to over loopback HTTP as a proxy would (test_publisher's helpers); every
wait is bounded and no assertion is about how long anything took, only how often it happened.
"""

from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from controller import metrics, publisher, reconciler
from tests.controller.test_publisher import (
    BOUND,
    FIRST,
    SECOND,
    TOKEN,
    Changes,
    ack_body,
    base,
    next_table,
    open_stream,
    post_ack,
)
from tests.controller.test_reconciler import FakeCluster

LAG_COUNT = "mailgress_controller_push_lag_seconds_count"
CONNECTED = "mailgress_controller_proxies_connected"
ACKS = "mailgress_controller_acks_total"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def channel(registry: CollectorRegistry) -> AsyncIterator[publisher.Publisher]:
    started = publisher.Publisher(TOKEN, registry=registry)
    await started.start("127.0.0.1", 0)
    yield started
    await started.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as session:
        yield session


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_metric_is_named_described_and_labelled_by_bounded_sets_only(
    registry: CollectorRegistry,
) -> None:
    created = metrics.create(registry)
    created.table_info.labels(version="sha256:" + "0" * 64).set(1)
    created.acks.labels(accepted="true").inc()
    families = {family.name: family for family in registry.collect()}
    assert set(families) == {
        "mailgress_controller_push_lag_seconds",
        "mailgress_controller_proxies_connected",
        "mailgress_controller_table_info",
        "mailgress_controller_table_routes",
        "mailgress_controller_compile_seconds",
        "mailgress_controller_acks",
        "mailgress_controller_snapshot_failures",
    }
    assert all(family.documentation for family in families.values())
    assert families["mailgress_controller_push_lag_seconds"].type == "histogram"
    assert families["mailgress_controller_compile_seconds"].type == "histogram"
    assert families["mailgress_controller_acks"].type == "counter"
    assert families["mailgress_controller_snapshot_failures"].type == "counter"
    labels = {name for family in families.values() for sample in family.samples for name in sample.labels}
    assert labels == {"version", "accepted", "le", "reason"}  # never a proxy, user, route or address
    # Every snapshot failure reason is exported from the start, at 0.
    failures = {
        sample.labels["reason"]: sample.value
        for sample in families["mailgress_controller_snapshot_failures"].samples
        if sample.name.endswith("_total")
    }
    assert failures == {metrics.SNAPSHOT_API_ERROR: 0, metrics.SNAPSHOT_TOO_LARGE: 0}


async def test_one_push_lag_observation_per_proxy_ack_of_a_published_version(
    channel: publisher.Publisher, client: aiohttp.ClientSession, registry: CollectorRegistry
) -> None:
    changes = Changes(channel)
    channel.publish(FIRST)
    streams = [await open_stream(client, channel, proxy) for proxy in ("proxy-a", "proxy-b")]
    for stream in streams:
        assert await next_table(stream) == FIRST
    await changes.wait_until(lambda: value(registry, CONNECTED) == 2)
    assert value(registry, LAG_COUNT) == 0
    for proxy in ("proxy-a", "proxy-b"):
        assert await post_ack(client, channel, ack_body(proxy, FIRST.version)) == 204
    assert value(registry, LAG_COUNT) == 2
    # The same ack again is counted as an ack but is no new delivery.
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    assert value(registry, LAG_COUNT) == 2
    assert value(registry, ACKS, accepted="true") == 3

    channel.publish(SECOND)
    for stream in streams:
        assert await next_table(stream) == SECOND
    assert await post_ack(client, channel, ack_body("proxy-a", SECOND.version)) == 204
    rejected = ack_body("proxy-b", SECOND.version, accepted=False, error="no such listener")
    assert await post_ack(client, channel, rejected) == 204
    assert value(registry, LAG_COUNT) == 4
    assert value(registry, ACKS, accepted="false") == 1
    # A version never published here (from before a restart) says nothing about the lag.
    assert await post_ack(client, channel, ack_body("proxy-a", "sha256:" + "0" * 64)) == 204
    assert value(registry, LAG_COUNT) == 4
    # Only the version out now is shown, with its route count.
    assert value(registry, "mailgress_controller_table_info", version=SECOND.version) == 1
    assert value(registry, "mailgress_controller_table_info", version=FIRST.version) is None
    assert value(registry, "mailgress_controller_table_routes") == len(SECOND.routes)

    streams[0].close()
    await changes.wait_until(lambda: value(registry, CONNECTED) == 1)
    # An ack from a proxy without an open stream is dropped, and not counted.
    assert await post_ack(client, channel, ack_body("proxy-a", SECOND.version)) == 204
    assert value(registry, ACKS, accepted="true") == 5
    assert value(registry, LAG_COUNT) == 4


async def test_metrics_answer_without_the_token_and_reveal_no_secret(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    changes = Changes(channel)
    channel.publish(FIRST)
    stream = await open_stream(client, channel, "proxy-a")
    await next_table(stream)
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    await changes.wait_until(lambda: "proxy-a" in channel.acks())
    async with client.get(base(channel) + publisher.METRICS_PATH) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert f"{LAG_COUNT} 1.0" in text
    assert f'mailgress_controller_table_info{{version="{FIRST.version}"}} 1.0' in text
    for secret in (TOKEN, "proxy-a", "example.com", "mail/dovecot", "127.0.0.1"):
        assert secret not in text, "the metrics page must not reveal the token, proxies or routes"
    # The push paths still demand the token.
    async with client.get(base(channel) + publisher.STREAM_PATH, params={"proxy": "proxy-b"}) as refused:
        assert refused.status == 401


async def test_the_reconciler_times_each_compilation_not_each_pass(registry: CollectorRegistry) -> None:
    channel = publisher.Publisher(TOKEN, registry=registry)
    inputs = reconciler.Inputs(routes=[], services={}, slices={}, proxies={})
    worker = reconciler.Reconciler(
        read=lambda: inputs, publisher=channel, cluster=FakeCluster(), metrics=channel.metrics
    )
    await worker.reconcile()
    await worker.reconcile()  # the same input: no second compilation
    assert value(registry, "mailgress_controller_compile_seconds_count") == 1
    assert value(registry, "mailgress_controller_table_routes") == 0
