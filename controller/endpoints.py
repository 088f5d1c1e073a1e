"""Backend discovery: Services and EndpointSlices in, the compiler's endpoints mapping out.

The operator's indexes call ``service_view`` and ``slice_view`` on every Service and
EndpointSlice they see and keep only these small views; the reconciler calls ``resolve`` with
the Service ports the MailRoutes name (``compiler.service_keys``) before each compilation.
Pure: no I/O, no clocks, no logging; malformed objects are skipped (a view of None), never
raised about, because they are not the MailRoute author's mistake to be reported here.
Never lets an address into the result that the proxy's table would refuse.

How a MailRoute's backend port becomes addresses, as kube-proxy does it:
1. The route's port (a number or a name) selects one TCP port of the Service: by ``port`` when it
   is a number, by ``name`` when it is a name. No such Service or port: the key is left out
   (the compiler reports BackendNotFound).
2. Each EndpointSlice of that Service (label ``kubernetes.io/service-name``) carries a port of
   the same name (the Service port's name, "" when unnamed) whose number is the resolved
   targetPort; it can differ per slice when targetPort is a name.
3. Endpoint conditions (discovery.k8s.io/v1 EndpointConditions): an endpoint is used when it is
   ready (nil means true) and not terminating (nil means false). When a Service port has no
   such endpoint at all, endpoints that are still serving while terminating are used instead
   (KEP-1669, kube-proxy's fallback): a rolling update of a one-replica mail server then keeps
   taking logins instead of failing them for the seconds the new pod needs to get ready.
   No endpoint either way: an empty tuple (the compiler reports NoReadyEndpoints).
4. Only addresses the proxy's table takes are used: IP literals of the slice's own family, as
   ``ipaddress.ip_address`` reads them (the rule of ``table.from_json``). An FQDN slice, or an
   address such as "010.0.0.7" (stored by the API server, refused by the table), would make
   every proxy reject the whole table, every namespace's routes with it. Such an address is
   left out and listed in the view (``Slice.ignored``); ``IgnoredAddresses`` tells the caller
   which to warn about, once each. A Service left with no usable address has no ready endpoints.
5. A dual-stack Service has one slice per family, each listing every pod: an endpoint with a
   targetRef is used once, by its IPv4 address when it has one; endpoints without one all count.
"""

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller import compiler
from proxy import table

# The label the EndpointSlice controller puts on every slice it manages for a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Only TCP carries IMAP, POP3 and SMTP; a Service port's protocol defaults to TCP.
TCP = "TCP"
# EndpointSlice addressType values (discovery.k8s.io/v1). FQDN (deprecated) slices get a view
# so that their addresses can be reported, but none of them is used: the proxy never resolves.
IPV4, IPV6, FQDN = "IPv4", "IPv6", "FQDN"
ADDRESS_TYPES = (IPV4, IPV6, FQDN)
MAX_PORT = 65535  # RFC 793 section 3.1


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service: its name ("" when unnamed), number and protocol."""

    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Service:
    """What resolution needs of a Service: its TCP-or-not ports."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True, slots=True)
class Target:
    """An endpoint's targetRef (usually its Pod): one backend, in every slice that lists it."""

    kind: str
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Slice:
    """What resolution needs of an EndpointSlice.

    ``ports`` maps a port name ("" when unnamed) to its number, TCP ports only. ``ready`` holds
    the first usable address (see the module docstring) of every ready, non-terminating
    endpoint; ``draining`` that of every endpoint that is terminating but still serving (the
    fallback). ``targets`` pairs such an address with its endpoint's targetRef, when it has
    one. ``ignored`` lists, once each, the addresses left out as unusable, whatever their
    endpoint's conditions. The defaults describe a slice without targetRefs or bad addresses.
    """

    namespace: str
    service: str
    name: str
    ports: tuple[tuple[str, int], ...]
    ready: tuple[str, ...]
    draining: tuple[str, ...]
    targets: tuple[tuple[str, Target], ...] = ()
    ignored: tuple[str, ...] = ()
    address_type: str = IPV4


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _port_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PORT:
        return value
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def service_view(body: Mapping[str, Any]) -> Service | None:
    """The ``Service`` view of a v1 Service object, or None when it has no name."""
    metadata = _mapping(body.get("metadata"))
    namespace, name = _text(metadata.get("namespace")), _text(metadata.get("name"))
    if not namespace or not name:
        return None
    ports = []
    for raw in _sequence(_mapping(body.get("spec")).get("ports")):
        entry = _mapping(raw)
        number = _port_number(entry.get("port"))
        if number is not None:
            ports.append(ServicePort(_text(entry.get("name")), number, _text(entry.get("protocol")) or TCP))
    return Service(namespace=namespace, name=name, ports=tuple(ports))


def _conditions(endpoint: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating) with the API's defaults for nil: true, true, false."""
    raw = _mapping(endpoint.get("conditions"))
    return (raw.get("ready") is not False, raw.get("serving") is not False, raw.get("terminating") is True)


def _usable(address: str, address_type: str) -> bool:
    """Whether ``address`` is an IP literal of the slice's family that the proxy's table takes.

    ``ipaddress.ip_address`` is the table's own check (``table.from_json``); it refuses leading
    zeros ("010.0.0.7" is octal to some parsers, decimal to others), which the API server still
    stores. An IPv6 slice also loses two forms its API validation refuses, should a view ever
    hold them: an IPv4-mapped address (an IPv4 host, reachable over an IPv6 socket only where
    the proxy's kernel maps it) and a zone ("%eth0" names an interface of the host that wrote
    it, not of the proxy's). In an IPv4 slice a mapped address is IPv6 to the table: ignored.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv4Address):
        return address_type == IPV4
    return address_type == IPV6 and parsed.ipv4_mapped is None and parsed.scope_id is None


def _target(value: Any) -> Target | None:
    """The endpoint's targetRef, or None without one: a reference without a name names nothing."""
    raw = _mapping(value)
    name = _text(raw.get("name"))
    if not name:
        return None
    return Target(_text(raw.get("kind")), _text(raw.get("namespace")), name, _text(raw.get("uid")))


def slice_view(body: Mapping[str, Any]) -> Slice | None:
    """The ``Slice`` view of a discovery.k8s.io/v1 EndpointSlice, or None when it belongs to no
    Service (no service-name label) or has an address type the API does not define."""
    metadata = _mapping(body.get("metadata"))
    namespace, name = _text(metadata.get("namespace")), _text(metadata.get("name"))
    service = _text(_mapping(metadata.get("labels")).get(SERVICE_NAME_LABEL))
    address_type = body.get("addressType")
    if not namespace or not service or address_type not in ADDRESS_TYPES:
        return None
    ports = []
    for raw in _sequence(body.get("ports")):
        entry = _mapping(raw)
        number = _port_number(entry.get("port"))
        if number is not None and (_text(entry.get("protocol")) or TCP) == TCP:
            ports.append((_text(entry.get("name")), number))
    ready: list[str] = []
    draining: list[str] = []
    targets: list[tuple[str, Target]] = []
    ignored: dict[str, None] = {}  # insertion-ordered set: each address reported once
    for raw in _sequence(body.get("endpoints")):
        endpoint = _mapping(raw)
        addresses = [address for address in _sequence(endpoint.get("addresses")) if isinstance(address, str)]
        usable = [address for address in addresses if _usable(address, address_type)]
        ignored.update((address, None) for address in addresses if address not in usable)
        if not usable:
            continue
        # The addresses of one endpoint are fungible; consumers may use only the first.
        host = usable[0]
        is_ready, is_serving, is_terminating = _conditions(endpoint)
        if is_ready and not is_terminating:
            ready.append(host)
        elif is_serving and is_terminating:
            draining.append(host)
        else:
            continue
        target = _target(endpoint.get("targetRef"))
        if target is not None:
            targets.append((host, target))
    return Slice(
        namespace=namespace,
        service=service,
        name=name,
        ports=tuple(ports),
        ready=tuple(ready),
        draining=tuple(draining),
        targets=tuple(targets),
        ignored=tuple(ignored),
        address_type=address_type,
    )


class IgnoredAddresses:
    """Which ignored addresses of each slice have been reported, so each is reported once.

    The operator's index calls ``slice_view`` on every event of a slice (each readiness change
    of each backend pod), so a warning per view would repeat for as long as the slice exists.
    Only the latest view's ignored addresses are remembered, per slice: an address that is
    fixed and later broken again is reported again. A deleted slice's few entries stay.
    """

    def __init__(self) -> None:
        self._reported: dict[tuple[str, str], frozenset[str]] = {}

    def report(self, view: Slice) -> list[str]:
        """Warning texts (no credentials in a slice) for the addresses ``view`` ignores that the
        previous view of the same slice did not; the caller logs each at WARNING."""
        key = (view.namespace, view.name)
        before = self._reported.pop(key, frozenset())
        if view.ignored:
            self._reported[key] = frozenset(view.ignored)
        if view.address_type == FQDN:
            why = "addressType FQDN, and the proxy dials IP addresses only"
        else:
            why = (
                f"not an {view.address_type} address the proxy takes "
                "(leading zeros, IPv4-mapped and zoned forms are refused)"
            )
        return [
            f"EndpointSlice {view.namespace}/{view.name} of Service {view.namespace}/{view.service}: "
            f"address {address!r} ignored: {why}"
            for address in view.ignored
            if address not in before
        ]


def _service_port(service: Service, wanted: str) -> ServicePort | None:
    """The TCP Service port a MailRoute names: by number when ``wanted`` is digits, else by name
    (the CRD makes a port name contain a letter, so the two never overlap)."""
    by_number = wanted.isascii() and wanted.isdigit()
    for port in service.ports:
        if port.protocol == TCP and (port.port == int(wanted) if by_number else port.name == wanted):
            return port
    return None


def _preference(endpoint: table.Endpoint) -> tuple[bool, table.Endpoint]:
    """The order in which one backend's addresses are chosen: IPv4 first. In a dual-stack
    cluster proxies and backends reach each other over both families, so either would do;
    one fixed choice, then the lowest address, keeps every proxy's table identical whatever
    order the slices were listed in."""
    return (":" in endpoint.host, endpoint)


def _once_per_target(candidates: Iterable[tuple[table.Endpoint, Target | None]]) -> list[table.Endpoint]:
    """One endpoint per targetRef (the preferred one), every endpoint without a targetRef."""
    chosen: dict[Target, table.Endpoint] = {}
    untargeted: list[table.Endpoint] = []
    for endpoint, target in candidates:
        if target is None:
            untargeted.append(endpoint)
        elif target not in chosen or _preference(endpoint) < _preference(chosen[target]):
            chosen[target] = endpoint
    return untargeted + list(chosen.values())


def _addresses(slices: Iterable[Slice], port_name: str) -> tuple[list[table.Endpoint], list[table.Endpoint]]:
    ready: list[tuple[table.Endpoint, Target | None]] = []
    draining: list[tuple[table.Endpoint, Target | None]] = []
    for piece in slices:
        number = dict(piece.ports).get(port_name)
        if number is None:
            continue
        targets = dict(piece.targets)
        ready.extend((table.Endpoint(host, number), targets.get(host)) for host in piece.ready)
        draining.extend((table.Endpoint(host, number), targets.get(host)) for host in piece.draining)
    return _once_per_target(ready), _once_per_target(draining)


def resolve(
    keys: Iterable[compiler.ServiceKey],
    services: Mapping[tuple[str, str], Service],
    slices: Mapping[tuple[str, str], Sequence[Slice]],
) -> dict[compiler.ServiceKey, tuple[table.Endpoint, ...]]:
    """The endpoints of each Service port the MailRoutes name.

    Args:
        keys: (namespace, Service name, port as the MailRoute wrote it) triples, as
            ``compiler.service_keys`` lists them.
        services: every known Service by (namespace, name).
        slices: every known EndpointSlice by (namespace, Service name) of its owner.

    Returns:
        For each key whose Service and port exist: the endpoints to use (ready ones, or the
        draining ones when there is no ready one; each targetRef once; possibly none). Keys
        whose Service or port does not exist are left out, as ``compiler.compile_table`` expects.
    """
    found: dict[compiler.ServiceKey, tuple[table.Endpoint, ...]] = {}
    for key in keys:
        namespace, name, wanted = key
        service = services.get((namespace, name))
        port = None if service is None else _service_port(service, wanted)
        if port is None:
            continue
        ready, draining = _addresses(slices.get((namespace, name), ()), port.name)
        found[key] = tuple(ready or draining)
    return found
