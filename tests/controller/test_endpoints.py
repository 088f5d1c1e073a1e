"""Backend discovery: Service and EndpointSlice bodies in, the compiler's endpoints mapping out:
ports and conditions, addresses the proxy's table would refuse (left out, reported once each),
dual-stack slices (each targetRef once)."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import compiler, endpoints, mailroute
from proxy import table


def service(name: str, *ports: dict[str, Any], namespace: str = "mail") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": {"ports": list(ports)}}


def endpoint(address: str, pod: str = "", **conditions: bool) -> dict[str, Any]:
    """One endpoint; with ``pod``, the targetRef the EndpointSlice controller writes for it."""
    body: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if pod:
        body["targetRef"] = {"kind": "Pod", "namespace": "mail", "name": pod, "uid": f"uid-{pod}"}
    return body


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


def route(namespace: str, name: str, domain: str, backend: str) -> mailroute.MailRoute:
    parsed = mailroute.parse(
        {
            "apiVersion": mailroute.API_VERSION,
            "kind": mailroute.KIND,
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"domains": [domain], "imap": {"backend": {"service": backend, "port": 143}}},
        }
    )
    assert isinstance(parsed, mailroute.MailRoute)
    return parsed


IMAP_PORT = [{"name": "imap", "port": 10143}]
IMAP_KEY = ("mail", "dovecot", "imap")


@pytest.mark.parametrize(
    ("address_type", "address"),
    [
        pytest.param("IPv4", "010.0.0.7", id="ipv4-leading-zero"),
        pytest.param("IPv4", "10.0.0.07", id="ipv4-leading-zero-last-octet"),
        pytest.param("IPv4", "::ffff:10.0.0.7", id="ipv4-mapped-in-ipv4-slice"),
        pytest.param("IPv4", "fd00::1", id="ipv6-in-ipv4-slice"),
        pytest.param("IPv4", "10.0.0.1 ", id="trailing-space"),
        pytest.param("IPv4", "10.0.0", id="three-octets"),
        pytest.param("IPv4", "", id="empty"),
        pytest.param("IPv6", "10.0.0.1", id="ipv4-in-ipv6-slice"),
        pytest.param("IPv6", "::ffff:10.0.0.7", id="ipv4-mapped-dotted"),
        pytest.param("IPv6", "::ffff:a00:7", id="ipv4-mapped-hex"),
        pytest.param("IPv6", "fe80::1%eth0", id="ipv6-with-zone"),
        pytest.param("IPv6", "[fd00::1]", id="bracketed"),
        pytest.param("FQDN", "mail.tenant-b.example", id="fqdn"),
        pytest.param("FQDN", "10.0.0.1", id="ip-in-fqdn-slice"),
    ],
)
def test_an_address_the_table_would_refuse_is_ignored(address_type: str, address: str) -> None:
    body = endpoint_slice("dovecot-a", "dovecot", IMAP_PORT, [endpoint(address)], address_type=address_type)
    view = endpoints.slice_view(body)
    assert view is not None
    assert (view.ready, view.ignored) == ((), (address,))
    # Left with no usable address, the Service port has no ready endpoints.
    assert resolve([IMAP_KEY], [DOVECOT], [body]) == {IMAP_KEY: ()}


@pytest.mark.parametrize(
    ("address_type", "address"),
    [
        pytest.param("IPv4", "10.0.0.7", id="ipv4"),
        pytest.param("IPv6", "fd00::1", id="ipv6"),
        pytest.param("IPv6", "FD00:0:0::2", id="ipv6-upper-case-long-form"),
        pytest.param("IPv6", "64:ff9b::10.0.0.7", id="ipv6-nat64-dotted-tail"),
        pytest.param("IPv6", "2001:db8::ffff:a00:7", id="ipv6-not-mapped"),
    ],
)
def test_an_ip_literal_of_the_slices_family_is_used_as_written(address_type: str, address: str) -> None:
    body = endpoint_slice("dovecot-a", "dovecot", IMAP_PORT, [endpoint(address)], address_type=address_type)
    view = endpoints.slice_view(body)
    assert view is not None
    assert (view.ready, view.ignored) == ((address,), ())
    assert resolve([IMAP_KEY], [DOVECOT], [body]) == {IMAP_KEY: (table.Endpoint(address, 10143),)}


def test_the_first_usable_address_of_an_endpoint_is_taken() -> None:
    body = endpoint_slice(
        "dovecot-a", "dovecot", IMAP_PORT, [{"addresses": ["010.0.0.7", "10.0.0.7", "junk"]}]
    )
    view = endpoints.slice_view(body)
    assert view is not None
    assert (view.ready, view.ignored) == (("10.0.0.7",), ("010.0.0.7", "junk"))


def test_ignored_addresses_are_listed_once_whatever_the_conditions() -> None:
    body = endpoint_slice(
        "dovecot-a",
        "dovecot",
        IMAP_PORT,
        [
            endpoint("010.0.0.7"),
            endpoint("010.0.0.7", ready=False),
            endpoint("010.0.0.8", ready=False, serving=False),
            endpoint("10.0.0.9"),
        ],
    )
    view = endpoints.slice_view(body)
    assert view is not None
    assert (view.ready, view.ignored) == (("10.0.0.9",), ("010.0.0.7", "010.0.0.8"))


@pytest.mark.parametrize(
    ("address_type", "address"),
    [pytest.param("FQDN", "mail.tenant-b.example", id="fqdn"), pytest.param("IPv4", "010.0.0.7", id="zero")],
)
def test_one_tenants_bad_slice_leaves_every_other_route_and_the_table_intact(
    address_type: str, address: str
) -> None:
    """The review's reproduction: tenant B's hand-made slice used to make every proxy refuse the
    whole table (tenant A's route with it) and reported ResolvedRefs=True for B."""
    good = route("tenant-a", "a", "a.example", "dovecot")
    bad = route("tenant-b", "b", "b.example", "legacy")
    services = [
        service("dovecot", {"name": "imap", "port": 143}, namespace="tenant-a"),
        service("legacy", {"name": "imap", "port": 143}, namespace="tenant-b"),
    ]
    port = [{"name": "imap", "port": 143}]
    slices = [
        endpoint_slice("dovecot-1", "dovecot", port, [endpoint("10.0.0.1")], namespace="tenant-a"),
        endpoint_slice(
            "legacy-1", "legacy", port, [endpoint(address)], namespace="tenant-b", address_type=address_type
        ),
    ]
    compiled = compiler.compile_table(
        [good, bad], resolve(compiler.service_keys([good, bad]), services, slices)
    )
    assert table.from_json(table.to_json(compiled.table)) == compiled.table
    resolved = {key: {c.type: c for c in found}["ResolvedRefs"] for key, found in compiled.conditions.items()}
    assert (resolved["tenant-a/a"].status, resolved["tenant-a/a"].reason) == ("True", "ResolvedRefs")
    assert (resolved["tenant-b/b"].status, resolved["tenant-b/b"].reason) == ("False", "NoReadyEndpoints")
    assert compiled.endpoint_counts == {"tenant-a/a": (("imap", 1),), "tenant-b/b": (("imap", 0),)}


ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda address: str(address).upper()),
    st.text(alphabet="0123456789abcdefABCDEF.:%[]x ", max_size=24),
)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(
    address_type=st.sampled_from(endpoints.ADDRESS_TYPES),
    addresses=st.lists(st.lists(ADDRESSES, min_size=1, max_size=3), max_size=4),
)
def test_every_address_that_gets_through_is_one_the_table_takes(
    address_type: str, addresses: list[list[str]]
) -> None:
    body = endpoint_slice(
        "dovecot-a",
        "dovecot",
        IMAP_PORT,
        [{"addresses": some} for some in addresses],
        address_type=address_type,
    )
    dovecot = route("mail", "r", "example.com", "dovecot")
    compiled = compiler.compile_table([dovecot], resolve(compiler.service_keys([dovecot]), [DOVECOT], [body]))
    assert table.from_json(table.to_json(compiled.table)) == compiled.table
    view = endpoints.slice_view(body)
    assert view is not None
    # Nothing is lost without a trace: every address is used, listed as ignored, or an endpoint's spare.
    assert {some[0] for some in addresses if some[0] not in view.ignored} <= set(view.ready)


def test_ignored_addresses_are_reported_once_per_slice_and_address() -> None:
    reported = endpoints.IgnoredAddresses()
    first = endpoints.slice_view(
        endpoint_slice(
            "legacy-1",
            "legacy",
            IMAP_PORT,
            [endpoint("010.0.0.7"), endpoint("10.0.0.8")],
            namespace="tenant-b",
        )
    )
    assert first is not None
    assert reported.report(first) == [
        "EndpointSlice tenant-b/legacy-1 of Service tenant-b/legacy: address '010.0.0.7' ignored: not an "
        "IPv4 address the proxy takes (leading zeros, IPv4-mapped and zoned forms are refused)"
    ]
    # An event storm on the slice (every readiness change of every pod): nothing more.
    for _ in range(100):
        assert reported.report(first) == []
    second = endpoints.slice_view(
        endpoint_slice(
            "legacy-1",
            "legacy",
            IMAP_PORT,
            [endpoint("010.0.0.7", ready=False), endpoint("010.0.0.9")],
            namespace="tenant-b",
        )
    )
    assert second is not None
    (only,) = reported.report(second)
    assert "'010.0.0.9'" in only
    other = endpoints.slice_view(
        endpoint_slice("legacy-2", "legacy", IMAP_PORT, [endpoint("010.0.0.7")], namespace="tenant-b")
    )
    assert other is not None
    (elsewhere,) = reported.report(other)
    assert elsewhere.startswith(
        "EndpointSlice tenant-b/legacy-2 of Service tenant-b/legacy: address '010.0.0.7'"
    )
    # Fixed, then broken again: a new mistake, reported again.
    fixed = endpoints.slice_view(
        endpoint_slice("legacy-2", "legacy", IMAP_PORT, [endpoint("10.0.0.7")], namespace="tenant-b")
    )
    assert fixed is not None
    assert reported.report(fixed) == []
    assert len(reported.report(other)) == 1


def test_an_fqdn_slice_is_reported_as_such() -> None:
    view = endpoints.slice_view(
        endpoint_slice("legacy-1", "legacy", IMAP_PORT, [endpoint("mail.example")], address_type="FQDN")
    )
    assert view is not None
    assert endpoints.IgnoredAddresses().report(view) == [
        "EndpointSlice mail/legacy-1 of Service mail/legacy: address 'mail.example' ignored: "
        "addressType FQDN, and the proxy dials IP addresses only"
    ]


def dual_stack(v4: list[dict[str, Any]], v6: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two slices the EndpointSlice controller writes for ipFamilyPolicy: RequireDualStack."""
    return [
        endpoint_slice("dovecot-v4", "dovecot", IMAP_PORT, v4),
        endpoint_slice("dovecot-v6", "dovecot", IMAP_PORT, v6, address_type="IPv6"),
    ]


def test_dual_stack_pods_count_once_by_their_ipv4_address() -> None:
    slices = dual_stack(
        [endpoint("10.0.0.1", "pod-1"), endpoint("10.0.0.2", "pod-2")],
        [endpoint("fd00::2", "pod-2"), endpoint("fd00::1", "pod-1")],
    )
    expected = (table.Endpoint("10.0.0.1", 10143), table.Endpoint("10.0.0.2", 10143))
    assert sorted(resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY]) == list(expected)
    # The listing order of the slices changes nothing.
    assert sorted(resolve([IMAP_KEY], [DOVECOT], slices[::-1])[IMAP_KEY]) == list(expected)
    dovecot = route("mail", "r", "example.com", "dovecot")
    imap_service = [service("dovecot", {"name": "imap", "port": 143})]
    compiled = compiler.compile_table(
        [dovecot], resolve(compiler.service_keys([dovecot]), imap_service, slices)
    )
    assert compiled.endpoint_counts["mail/r"] == (("imap", 2),)


def test_dual_stack_a_pod_only_one_family_lists_is_taken_from_it() -> None:
    slices = dual_stack(
        [endpoint("10.0.0.1", "pod-1")], [endpoint("fd00::1", "pod-1"), endpoint("fd00::2", "pod-2")]
    )
    assert sorted(resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY]) == [
        table.Endpoint("10.0.0.1", 10143),
        table.Endpoint("fd00::2", 10143),
    ]


def test_dual_stack_an_unusable_ipv4_address_falls_back_to_the_pods_ipv6_one() -> None:
    slices = dual_stack([endpoint("010.0.0.1", "pod-1")], [endpoint("fd00::1", "pod-1")])
    assert resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY] == (table.Endpoint("fd00::1", 10143),)


def test_dual_stack_draining_pods_count_once_too() -> None:
    gone = {"ready": False, "serving": True, "terminating": True}
    slices = dual_stack([endpoint("10.0.0.1", "pod-1", **gone)], [endpoint("fd00::1", "pod-1", **gone)])
    assert resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY] == (table.Endpoint("10.0.0.1", 10143),)


def test_one_pod_in_two_slices_of_one_family_counts_once_by_its_lowest_address() -> None:
    """The EndpointSlice controller may briefly list a pod in two slices while it rebalances."""
    slices = [
        endpoint_slice("dovecot-a", "dovecot", IMAP_PORT, [endpoint("10.0.0.9", "pod-1")]),
        endpoint_slice("dovecot-b", "dovecot", IMAP_PORT, [endpoint("10.0.0.1", "pod-1")]),
    ]
    assert resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY] == (table.Endpoint("10.0.0.1", 10143),)
    assert resolve([IMAP_KEY], [DOVECOT], slices[::-1])[IMAP_KEY] == (table.Endpoint("10.0.0.1", 10143),)


def test_endpoints_without_a_target_ref_are_all_kept() -> None:
    nameless = {"addresses": ["fd00::3"], "targetRef": {"kind": "Pod", "uid": "uid-x"}}
    slices = dual_stack([endpoint("10.0.0.1"), endpoint("10.0.0.2")], [endpoint("fd00::1"), nameless])
    assert len(resolve([IMAP_KEY], [DOVECOT], slices)[IMAP_KEY]) == 4


def test_targets_differ_by_kind_namespace_name_or_uid() -> None:
    """A pod re-created under the same name (a StatefulSet's) is another backend: another uid."""
    old = endpoint("10.0.0.1", "pod-1")
    new = endpoint("10.0.0.2", "pod-1")
    new["targetRef"]["uid"] = "uid-recreated"
    assert len(resolve([IMAP_KEY], [DOVECOT], dual_stack([old, new], []))[IMAP_KEY]) == 2
