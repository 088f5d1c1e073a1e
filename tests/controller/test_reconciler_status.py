"""The status fields the reconciler writes for a route in the table and for one left out of it:
what a merge patch (RFC 7386) must delete, given the status the API server keeps. The fakes are
test_reconciler's."""

from collections.abc import Mapping
from typing import Any

import pytest

from controller import reconciler
from tests.controller.test_reconciler import NOW, FakeCluster, FakePublisher, World, entry, route_body


@pytest.fixture
def world() -> World:
    return World(routes=[entry(route_body("example", "example.com"))])


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def worker(world: World, cluster: FakeCluster) -> reconciler.Reconciler:
    return reconciler.Reconciler(
        read=world.read, publisher=FakePublisher(), cluster=cluster, holdoff=0, now=lambda: NOW
    )


async def test_a_conflicted_route_lists_no_protocol_and_no_endpoint(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    world.routes.append(entry(route_body("zz-late", "example.com")))
    await worker.reconcile()
    late = cluster.last_status("mail/zz-late")
    assert late["conditions"][0]["reason"] == "Conflicted"
    # In no table, serving nothing: the fields go, as for an invalid route (None deletes them).
    assert (late["protocols"], late["endpoints"], late["proxies"]) == (None, None, None)
    served = cluster.last_status("mail/example")
    assert (served["protocols"], served["endpoints"]) == ("imap", {"imap": 1})


async def test_a_route_that_turns_conflicted_loses_the_fields_it_had(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    """Edited to claim a domain an older route holds, a served route is Conflicted: the status it
    had while in the table is the baseline, and the patch deletes what it listed."""
    had = {"protocols": "imap", "endpoints": {"imap": 1}}
    world.routes = [
        entry(route_body("first", "example.com")),
        entry(route_body("zz-late", "example.com"), version="7", status=had),
    ]
    await worker.reconcile()
    late = cluster.last_status("mail/zz-late")
    assert (late["protocols"], late["endpoints"]) == (None, None)


def merged(stored: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` applied to ``stored`` as the API server applies a merge patch (RFC 7386)."""
    result = dict(stored)
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        elif isinstance(value, Mapping) and isinstance(stored.get(name), Mapping):
            result[name] = merged(stored[name], value)
        else:
            result[name] = value
    return result


def both_protocols(generation: int) -> dict[str, Any]:
    body = route_body("both", "example.com", generation=generation)
    body["spec"]["pop3"] = {"backend": {"service": "dovecot", "port": 143}}
    return body


async def test_a_protocol_removed_leaves_status_endpoints_and_the_writes_stop(
    world: World, worker: reconciler.Reconciler, cluster: FakeCluster
) -> None:
    """Each pass sees the status the API server made of the last patch (its watch event): once
    the protocol's count is deleted, the status is the desired one and nothing more is written."""
    world.routes = [entry(both_protocols(1))]
    await worker.reconcile()
    stored = merged({}, cluster.last_status("mail/both"))
    assert (stored["protocols"], stored["endpoints"]) == ("imap,pop3", {"imap": 1, "pop3": 1})
    world.routes = [entry(route_body("both", "example.com", generation=2), version="2", status=stored)]
    await worker.reconcile()
    assert cluster.last_status("mail/both")["endpoints"] == {"imap": 1, "pop3": None}
    stored = merged(stored, cluster.last_status("mail/both"))
    assert (stored["protocols"], stored["endpoints"]) == ("imap", {"imap": 1})
    writes = len(cluster.patches)
    world.routes = [entry(route_body("both", "example.com", generation=2), version="3", status=stored)]
    await worker.reconcile()
    await worker.reconcile()
    assert len(cluster.patches) == writes
