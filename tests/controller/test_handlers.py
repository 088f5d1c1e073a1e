"""The kopf glue's pure parts: proxy pod readiness and the reconciler's view of the indexes.
(The handlers themselves run under kopf in tests/kube/test_operator.py.)"""

from typing import Any

import pytest

from controller import endpoints, handlers, mailroute, reconciler


@pytest.mark.parametrize(
    ("pod", "ready"),
    [
        pytest.param({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, True, id="ready"),
        pytest.param(
            {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, False, id="not-ready"
        ),
        pytest.param(
            {"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}, False, id="scheduled"
        ),
        pytest.param({"status": {}}, False, id="no-conditions"),
        pytest.param(
            {
                "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            },
            False,
            id="terminating",
        ),
    ],
)
def test_pod_ready(pod: dict[str, Any], ready: bool) -> None:
    assert handlers._pod_ready(pod) is ready


def test_inputs_flatten_the_index_stores() -> None:
    """kopf's Index maps each key to a store of values; the reconciler wants plain mappings."""
    route = reconciler.RouteEntry(
        mailroute.parse({"metadata": {"namespace": "mail", "name": "r"}}),
        uid="u",
        resource_version="1",
        status={},
    )
    service = endpoints.Service("mail", "dovecot", ())
    piece = endpoints.Slice("mail", "dovecot", "a", (), ("10.0.0.1",), ())
    other = endpoints.Slice("mail", "dovecot", "b", (), ("10.0.0.2",), ())
    view = handlers.inputs(
        {
            handlers.ROUTES_INDEX: {("mail", "r"): [route]},
            handlers.SERVICES_INDEX: {("mail", "dovecot"): [service]},
            handlers.SLICES_INDEX: {("mail", "dovecot"): [piece, other]},
            handlers.PROXIES_INDEX: {"proxy-a": [True], "proxy-b": [False]},
        }
    )
    assert view == reconciler.Inputs(
        routes=[route],
        services={("mail", "dovecot"): service},
        slices={("mail", "dovecot"): [piece, other]},
        proxies={"proxy-a": True, "proxy-b": False},
    )
