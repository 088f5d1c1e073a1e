"""Backend discovery: Services and EndpointSlices in, the compiler's endpoints mapping out.

The operator's indexes call ``service_view`` and ``slice_view`` on every Service and
EndpointSlice they see and keep only these small views; the reconciler calls ``resolve`` with
the Service ports the MailRoutes name (``compiler.service_keys``) before each compilation.
Pure: no I/O, no clocks, no logging; malformed objects are skipped (a view of None), never
raised about, because they are not the MailRoute author's mistake to be reported here.

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
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller import compiler
from proxy import table

# The label the EndpointSlice controller puts on every slice it manages for a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Only TCP carries IMAP, POP3 and SMTP; a Service port's protocol defaults to TCP.
TCP = "TCP"
# EndpointSlice addressType values (discovery.k8s.io/v1): FQDN is deprecated but still a host.
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
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
class Slice:
    """What resolution needs of an EndpointSlice.

    ``ports`` maps a port name ("" when unnamed) to its number, TCP ports only. ``ready`` holds
    the first address of every ready, non-terminating endpoint; ``draining`` that of every
    endpoint that is terminating but still serving (the fallback, see the module docstring).
    """

    namespace: str
    service: str
    name: str
    ports: tuple[tuple[str, int], ...]
    ready: tuple[str, ...]
    draining: tuple[str, ...]


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


def slice_view(body: Mapping[str, Any]) -> Slice | None:
    """The ``Slice`` view of a discovery.k8s.io/v1 EndpointSlice, or None when it belongs to no
    Service (no service-name label) or has an address type the proxy cannot dial."""
    metadata = _mapping(body.get("metadata"))
    namespace, name = _text(metadata.get("namespace")), _text(metadata.get("name"))
    service = _text(_mapping(metadata.get("labels")).get(SERVICE_NAME_LABEL))
    if not namespace or not service or body.get("addressType") not in ADDRESS_TYPES:
        return None
    ports = []
    for raw in _sequence(body.get("ports")):
        entry = _mapping(raw)
        number = _port_number(entry.get("port"))
        if number is not None and (_text(entry.get("protocol")) or TCP) == TCP:
            ports.append((_text(entry.get("name")), number))
    ready: list[str] = []
    draining: list[str] = []
    for raw in _sequence(body.get("endpoints")):
        endpoint = _mapping(raw)
        addresses = [address for address in _sequence(endpoint.get("addresses")) if isinstance(address, str)]
        if not addresses:
            continue
        # The addresses of one endpoint are fungible; consumers may use only the first.
        is_ready, is_serving, is_terminating = _conditions(endpoint)
        if is_ready and not is_terminating:
            ready.append(addresses[0])
        elif is_serving and is_terminating:
            draining.append(addresses[0])
    return Slice(
        namespace=namespace,
        service=service,
        name=name,
        ports=tuple(ports),
        ready=tuple(ready),
        draining=tuple(draining),
    )


def _service_port(service: Service, wanted: str) -> ServicePort | None:
    """The TCP Service port a MailRoute names: by number when ``wanted`` is digits, else by name
    (the CRD makes a port name contain a letter, so the two never overlap)."""
    by_number = wanted.isascii() and wanted.isdigit()
    for port in service.ports:
        if port.protocol == TCP and (port.port == int(wanted) if by_number else port.name == wanted):
            return port
    return None


def _addresses(slices: Iterable[Slice], port_name: str) -> tuple[list[table.Endpoint], list[table.Endpoint]]:
    ready: list[table.Endpoint] = []
    draining: list[table.Endpoint] = []
    for piece in slices:
        number = dict(piece.ports).get(port_name)
        if number is None:
            continue
        ready.extend(table.Endpoint(host, number) for host in piece.ready)
        draining.extend(table.Endpoint(host, number) for host in piece.draining)
    return ready, draining


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
        draining ones when there is no ready one; possibly none). Keys whose Service or port
        does not exist are left out, as ``compiler.compile_table`` expects.
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
