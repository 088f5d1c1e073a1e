"""The status fields the reconciler writes for a route in the table and for one left out of it:
what a merge patch (RFC 7386) must delete, given the status the API server keeps. The fakes are
test_reconciler's."""

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
