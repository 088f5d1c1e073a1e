"""Backend discovery: Service and EndpointSlice bodies in, the compiler's endpoints mapping out."""

from typing import Any

import pytest

from controller import compiler, endpoints, mailroute
from proxy import table


def service(name: str, *ports: dict[str, Any], namespace: str = "mail") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": {"ports": list(ports)}}


def endpoint(address: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [address], "conditions": conditions}


def endpoint_slice(
    name: str,
    owner: str,
    ports: list[dict[str, Any]],
    items: list[dict[str, Any]],
    *,
    namespace: str = "mail",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "labels": {endpoints.SERVICE_NAME_LABEL: owner}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": items,
    }


def resolve(
    keys: list[compiler.ServiceKey], services: list[dict[str, Any]], slices: list[dict[str, Any]]
) -> dict[compiler.ServiceKey, tuple[table.Endpoint, ...]]:
    """Run bodies through the views and ``resolve``, as the operator's indexes do."""
    service_views = [view for view in map(endpoints.service_view, services) if view is not None]
    grouped: dict[tuple[str, str], list[endpoints.Slice]] = {}
    for body in slices:
        view = endpoints.slice_view(body)
        if view is not None:
            grouped.setdefault((view.namespace, view.service), []).append(view)
    return endpoints.resolve(keys, {(s.namespace, s.name): s for s in service_views}, grouped)


IMAP_SLICE = [
    endpoint_slice("dovecot-a", "dovecot", [{"name": "imap", "port": 10143}], [endpoint("10.0.0.1")])
]
DOVECOT = service(
    "dovecot",
    {"name": "imap", "port": 143, "targetPort": "imap"},
    {"name": "pop3", "port": 110, "targetPort": 1110},
)


def test_port_by_number_maps_to_the_slice_port_of_the_same_name() -> None:
    slices = [
        endpoint_slice(
            "dovecot-a",
            "dovecot",
            [{"name": "imap", "port": 10143}, {"name": "pop3", "port": 1110}],
            [endpoint("10.0.0.1", ready=True), endpoint("10.0.0.2")],
        )
    ]
    found = resolve([("mail", "dovecot", "143"), ("mail", "dovecot", "110")], [DOVECOT], slices)
    assert found == {
        ("mail", "dovecot", "143"): (table.Endpoint("10.0.0.1", 10143), table.Endpoint("10.0.0.2", 10143)),
        ("mail", "dovecot", "110"): (table.Endpoint("10.0.0.1", 1110), table.Endpoint("10.0.0.2", 1110)),
    }


def test_port_by_name_and_a_target_port_that_differs_per_slice() -> None:
    """A named targetPort can resolve to different numbers in different slices."""
    slices = [
        endpoint_slice("dovecot-a", "dovecot", [{"name": "imap", "port": 10143}], [endpoint("10.0.0.1")]),
        endpoint_slice("dovecot-b", "dovecot", [{"name": "imap", "port": 20143}], [endpoint("10.0.0.2")]),
    ]
    found = resolve([("mail", "dovecot", "imap")], [DOVECOT], slices)
    assert sorted(found[("mail", "dovecot", "imap")]) == [
        table.Endpoint("10.0.0.1", 10143),
        table.Endpoint("10.0.0.2", 20143),
    ]


def test_unnamed_single_port() -> None:
    plain = service("postfix", {"port": 25, "targetPort": 10025})
    slices = [endpoint_slice("postfix-a", "postfix", [{"port": 10025}], [endpoint("10.0.0.9")])]
    assert resolve([("mail", "postfix", "25")], [plain], slices) == {
        ("mail", "postfix", "25"): (table.Endpoint("10.0.0.9", 10025),)
    }


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(("mail", "missing", "143"), id="no-such-service"),
        pytest.param(("other", "dovecot", "143"), id="service-in-another-namespace"),
        pytest.param(("mail", "dovecot", "993"), id="no-such-port-number"),
        pytest.param(("mail", "dovecot", "imaps"), id="no-such-port-name"),
    ],
)
def test_a_missing_service_or_port_is_left_out(key: compiler.ServiceKey) -> None:
    slices = [
        endpoint_slice("dovecot-a", "dovecot", [{"name": "imap", "port": 10143}], [endpoint("10.0.0.1")])
    ]
    assert resolve([key], [DOVECOT], slices) == {}


def test_udp_ports_are_not_mail_ports() -> None:
    dns_like = service("odd", {"name": "imap", "port": 143, "protocol": "UDP"})
    assert resolve([("mail", "odd", "143"), ("mail", "odd", "imap")], [dns_like], []) == {}


def test_no_slices_means_no_ready_endpoints() -> None:
    assert resolve([("mail", "dovecot", "143")], [DOVECOT], []) == {("mail", "dovecot", "143"): ()}


def test_slice_without_the_port_contributes_nothing() -> None:
    slices = [
        endpoint_slice("dovecot-a", "dovecot", [{"name": "pop3", "port": 1110}], [endpoint("10.0.0.1")])
    ]
    assert resolve([("mail", "dovecot", "imap")], [DOVECOT], slices) == {("mail", "dovecot", "imap"): ()}


def test_conditions_ready_wins_and_terminating_is_left_out() -> None:
    slices = [
        endpoint_slice(
            "dovecot-a",
            "dovecot",
            [{"name": "imap", "port": 10143}],
            [
                endpoint("10.0.0.1", ready=True, serving=True, terminating=False),
                endpoint("10.0.0.2", ready=False, serving=False),
                endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                # publishNotReadyAddresses keeps ready true while terminating: still left out.
                endpoint("10.0.0.4", ready=True, serving=True, terminating=True),
            ],
        )
    ]
    found = resolve([("mail", "dovecot", "imap")], [DOVECOT], slices)
    assert found == {("mail", "dovecot", "imap"): (table.Endpoint("10.0.0.1", 10143),)}


def test_serving_terminating_endpoints_are_the_fallback_when_none_is_ready() -> None:
    slices = [
        endpoint_slice(
            "dovecot-a",
            "dovecot",
            [{"name": "imap", "port": 10143}],
            [
                endpoint("10.0.0.2", ready=False, serving=False, terminating=True),
                endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                endpoint("10.0.0.5", ready=False, serving=False),
            ],
        )
    ]
    found = resolve([("mail", "dovecot", "imap")], [DOVECOT], slices)
    assert found == {("mail", "dovecot", "imap"): (table.Endpoint("10.0.0.3", 10143),)}


def test_ipv6_and_first_address_only() -> None:
    slices = [
        endpoint_slice(
            "dovecot-v6",
            "dovecot",
            [{"name": "imap", "port": 10143}],
            [{"addresses": ["fd00::1", "fd00::2"]}],
            address_type="IPv6",
        )
    ]
    (only,) = resolve([("mail", "dovecot", "imap")], [DOVECOT], slices)[("mail", "dovecot", "imap")]
    assert str(only) == "[fd00::1]:10143"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"metadata": {"namespace": "mail", "name": "x"}, "addressType": "IPv4"}, id="no-owner-label"
        ),
        pytest.param(
            endpoint_slice("x", "dovecot", [], [], address_type="Unknown"),
            id="unsupported-address-type",
        ),
        pytest.param({"metadata": "garbage"}, id="malformed-metadata"),
    ],
)
def test_slices_that_belong_to_no_usable_service_have_no_view(body: dict[str, Any]) -> None:
    assert endpoints.slice_view(body) is None


def test_malformed_parts_are_skipped() -> None:
    body = endpoint_slice(
        "dovecot-a",
        "dovecot",
        [
            {"name": "imap", "port": "10143"},
            {"name": "imap", "port": 0},
            "junk",
            {"name": "imap", "port": 10143},
        ],
        [{"addresses": []}, {"addresses": [7]}, "junk", endpoint("10.0.0.1")],
    )
    view = endpoints.slice_view(body)
    assert view is not None
    assert view.ports == (("imap", 10143),)
    assert view.ready == ("10.0.0.1",)
    assert endpoints.service_view({"metadata": {"name": "x"}}) is None
    broken_ports = endpoints.service_view(
        service("s", {"port": True}, {"port": 70000}, {"name": "ok", "port": 1})
    )
    assert broken_ports is not None
    assert broken_ports.ports == (endpoints.ServicePort("ok", 1, "TCP"),)


def test_feeds_the_compiler() -> None:
    """The mapping is what compile_table expects: ResolvedRefs follows from it."""
    route = mailroute.parse(
        {
            "apiVersion": mailroute.API_VERSION,
            "kind": mailroute.KIND,
            "metadata": {"namespace": "mail", "name": "example", "generation": 1},
            "spec": {
                "domains": ["example.com"],
                "imap": {"backend": {"service": "dovecot", "port": "imap"}},
                "pop3": {"backend": {"service": "dovecot", "port": 110}},
            },
        }
    )
    slices = [
        endpoint_slice(
            "dovecot-a",
            "dovecot",
            [{"name": "imap", "port": 10143}, {"name": "pop3", "port": 1110}],
            [endpoint("10.0.0.1", ready=False, serving=False)],
        )
    ]
    found = resolve(compiler.service_keys([route]), [DOVECOT], slices)
    compiled = compiler.compile_table([route], found)
    resolved = {c.type: c for c in compiled.conditions["mail/example"]}["ResolvedRefs"]
    assert (resolved.status, resolved.reason) == ("False", "NoReadyEndpoints")
