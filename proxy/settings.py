"""The proxy's settings file: listeners, admin port, timeouts, abuse limits, drain and the route source.

One format serves the standalone mode (MailRoute files plus a ``services`` stand-in for
EndpointSlices and a ``secrets`` stand-in for the Secrets auth_http ``headersFrom`` reads) and the
settings ConfigMap the Helm chart renders. In a cluster ``controller`` takes the place of ``routes``,
``services`` and ``secrets``: the proxy subscribes to the controller's push channel.
``parse`` checks a loaded document and turns every mistake into a ``SettingsError`` naming the
offending key; ``load`` reads the file. Holds no credential but the standalone ``secrets`` values,
which no repr and no error message shows (in a cluster: only the path to the token).
"""

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from proxy import push
from proxy.table import Endpoint

ListenerProtocol = Literal["imap", "pop3", "submission", "smtp"]
ListenerTls = Literal["none", "starttls", "implicit"]

# nginx's `timeout` (60 s) bounds everything before login; RFC 5321 section 4.5.3.2.7 asks an SMTP
# server to wait at least 5 minutes for a command, but before login a short bound is what keeps
# slow-loris clients from holding sockets, and real clients log in within seconds.
DEFAULT_PRE_LOGIN_TIMEOUT = 60.0
# Opening the TCP connection to one endpoint, within the login's budget below.
DEFAULT_BACKEND_CONNECT_TIMEOUT = 5.0
# The whole backend side of one login: the connects and login dialogues of every endpoint it
# tries, each getting an equal share of what is left to connect and greet, and one that greeted all
# that is left, at least half of it (backends.GREETED_MINIMUM). Dovecot's login_proxy_timeout, 30 s,
# also spans its reconnects; nginx's one `timeout`, 60 s, covers its one backend's connect and login
# along with the client's pre-login time. The session's pre-login deadline does not run meanwhile,
# up to one such budget a session.
DEFAULT_BACKEND_LOGIN_TIMEOUT = 30.0
# After login: IMAP IDLE clients re-issue IDLE every 29 minutes (RFC 2177), so anything below
# 30 minutes would cut idling clients; one hour leaves margin. nginx's proxy_timeout is 24 h.
DEFAULT_IDLE_TIMEOUT = 3600.0
# nginx max_errors default.
DEFAULT_MAX_ERRORS = 5
# Abuse limits (proxy/server/limits.py). Concurrent sessions from one client address: Postfix's
# smtpd_client_connection_count_limit is 50, but an office behind NAT whose mail clients each hold
# several IMAP connections (one per watched folder) needs more.
DEFAULT_CONNECTIONS_PER_IP = 100
# Failed logins before further logins are refused for `lockout` seconds: few for one user (someone
# guessing its password), more for one address (an office behind NAT mistyping for many users).
DEFAULT_FAILED_LOGINS_PER_USER = 10
DEFAULT_FAILED_LOGINS_PER_IP = 30
# The second failure's refusal is held back this long, each further one twice as long up to the
# cap (0: never held back); Dovecot's auth penalty starts at 2 s and caps at 15 s (auth-penalty.h).
DEFAULT_FIRST_LOGIN_DELAY = 1.0
DEFAULT_MAX_LOGIN_DELAY = 15.0
# How long a tripped lock refuses logins; failures are remembered as long after the last one.
DEFAULT_LOGIN_LOCKOUT = 300.0
# Every login refusal (a wrong password, a backend's refusal, a login no route owns) is answered
# no sooner than this long after the login was asked, so that its speed tells no more than the
# reply which users and domains the proxy serves: about a backend's failure delay, Dovecot's
# auth_failure_delay, default "2 secs", which it answers after 1.5 to 2 s
# (https://doc.dovecot.org/2.3/settings/core/#core_setting-auth_failure_delay); 0 turns it off.
DEFAULT_LOGIN_REFUSAL_TIME = 2.0
# Graceful drain on SIGTERM (proxy/server/drain.py), for a proxy run without the chart: 540 s
# leaves a 600 s kill deadline room for the last closes and the process exit. The chart sets its
# own: terminationGracePeriodSeconds less the preStop sleep and 10 s (600 - 5 - 10 = 585).
DEFAULT_DRAIN_GRACE_PERIOD = 540.0
# No byte in either direction for this long, the backend having spoken last: a relayed session
# is between exchanges and can get its closing line (a FETCH literal or a DATA transfer moves
# more often than that).
DEFAULT_DRAIN_QUIET_PERIOD = 2.0


class SettingsError(ValueError):
    """The settings document is wrong; the message names the key and the problem."""


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A PEM certificate chain and its key, as Kubernetes mounts a TLS Secret (tls.crt, tls.key)."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    name: str
    protocol: ListenerProtocol
    address: str
    port: int
    tls: ListenerTls = "none"
    # With tls: starttls, refuse every login before the client switched to TLS.
    starttls_required: bool = False
    # The first is the default; the others are chosen by SNI from the names they carry.
    certificates: tuple[CertificateFiles, ...] = ()
    # Peers allowed to send a PROXY protocol header; empty: the listener takes no PROXY header.
    # Written as trustedCidrs; address bits past the prefix are dropped without a warning.
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendTlsSettings:
    """How the proxy checks backends that a route reaches over TLS or STARTTLS."""

    ca_file: Path | None = None  # None: the system's trusted CAs
    # An explicit opt-out of certificate verification, for lab setups only.
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """The controller's push channel: where it is, and how this proxy joins it."""

    url: str  # http(s)://host:port of the controller's Service
    token_file: Path  # the bearer token, from a mounted Secret; read at every connect
    # A pod name (proxy.push). None: the POD_NAME environment variable, else the host name.
    proxy_name: str | None
    snapshot_file: Path | None  # the table Secret, mounted: served while the controller is away
    # The CA an https url's certificate is verified with (and the url's host name); read at every
    # connect, since it may rotate. None: the system's trusted CAs. Only with https.
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    pre_login: float = DEFAULT_PRE_LOGIN_TIMEOUT  # the client's time before login
    backend_connect: float = DEFAULT_BACKEND_CONNECT_TIMEOUT  # one endpoint's TCP connect
    backend_login: float = DEFAULT_BACKEND_LOGIN_TIMEOUT  # all endpoints of one login together
    idle: float = DEFAULT_IDLE_TIMEOUT


@dataclass(frozen=True, slots=True)
class FailedLoginSettings:
    """When failed logins slow down and then lock out a user or a client address."""

    per_user: int = DEFAULT_FAILED_LOGINS_PER_USER
    per_ip: int = DEFAULT_FAILED_LOGINS_PER_IP
    first_delay: float = DEFAULT_FIRST_LOGIN_DELAY
    max_delay: float = DEFAULT_MAX_LOGIN_DELAY
    lockout: float = DEFAULT_LOGIN_LOCKOUT
    refusal_time: float = DEFAULT_LOGIN_REFUSAL_TIME  # least seconds from a login to its refusal


@dataclass(frozen=True, slots=True)
class LimitSettings:
    connections_per_ip: int = DEFAULT_CONNECTIONS_PER_IP
    failed_logins: FailedLoginSettings = FailedLoginSettings()


@dataclass(frozen=True, slots=True)
class DrainSettings:
    """How a stopping proxy ends its sessions (0 s of grace: all at once)."""

    grace_period: float = DEFAULT_DRAIN_GRACE_PERIOD
    quiet_period: float = DEFAULT_DRAIN_QUIET_PERIOD


ServiceEndpoints = Mapping[tuple[str, str, str], tuple[Endpoint, ...]]
# (namespace, Secret name) -> data key -> value, as a labelled Secret would hold it.
SecretData = Mapping[tuple[str, str], Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listeners: tuple[ListenerSettings, ...]
    admin: AdminSettings | None
    server_name: str
    timeouts: Timeouts
    max_errors: int
    route_files: tuple[Path, ...]
    # (namespace, service, port as written in the MailRoute) -> addresses: stand-in for EndpointSlices.
    services: ServiceEndpoints
    backend_tls: BackendTlsSettings = BackendTlsSettings()
    controller: ControllerSettings | None = None  # None: standalone, tables from route_files
    limits: LimitSettings = LimitSettings()
    drain: DrainSettings = DrainSettings()
    # Standalone: stand-in for the Secrets auth_http headersFrom reads. Values: never in a repr.
    secrets: SecretData = field(default_factory=dict, repr=False)


def _only(document: Mapping[str, Any], known: set[str], spot: str) -> None:
    """Refuse keys a section does not define: a misspelt key (``starttsl: required``) would
    otherwise be ignored without a word, and leave its section at the default."""
    unknown = sorted(map(str, set(document) - known))
    if unknown:
        raise SettingsError(f"{spot}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _require(document: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in document:
        raise SettingsError(f"{where}: missing {key!r}")
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as error:
        raise SettingsError(f"{where}: {value!r} is not an IP address") from error


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise SettingsError(f"{where}: port must be a number from 1 to 65535, got {value!r}")
    return value


def parse_endpoint(text: str, where: str) -> Endpoint:
    """``"127.0.0.1:143"`` or ``"[::1]:143"`` -> Endpoint."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise SettingsError(f"{where}: {text!r} is not host:port")
    return Endpoint(host=_address(host.strip("[]"), where), port=_port(int(port), where))


def _file(base: Path, name: str) -> Path:
    """A file the proxy reads again later, relative to the settings file's folder.

    Made absolute but never resolved: Kubernetes mounts Secrets and ConfigMaps through symlinks
    (``tls.crt -> ..data/tls.crt``, ``..data -> ..2026_11_26_...``) and renews them by pointing
    ``..data`` at a new folder and deleting the old one. A resolved path would pin the first
    version's folder: renewed certificates, rotated tokens and edited routes would never be read.
    """
    return (base / name).absolute()


def _certificates(item: Mapping[str, Any], where: str, base: Path) -> tuple[CertificateFiles, ...]:
    raw = item.get("certificates", [])
    if not isinstance(raw, list):
        raise SettingsError(f"{where}.certificates: expected a list of {{cert, key}} file pairs")
    files = []
    for number, pair in enumerate(raw):
        spot = f"{where}.certificates[{number}]"
        if not isinstance(pair, dict):
            raise SettingsError(f"{spot}: expected a mapping with cert and key")
        _only(pair, {"cert", "key"}, spot)
        files.append(
            CertificateFiles(
                cert=_file(base, _require(pair, "cert", str, spot)),
                key=_file(base, _require(pair, "key", str, spot)),
            )
        )
    return tuple(files)


def _networks(
    item: Mapping[str, Any], where: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = item.get("proxyProtocol")
    if raw is None:
        return ()
    spot = f"{where}.proxyProtocol"
    if not isinstance(raw, dict):
        raise SettingsError(f"{spot}: expected {{trustedCidrs: [...]}}")
    _only(raw, {"trustedCidrs"}, spot)
    cidrs = _require(raw, "trustedCidrs", list, spot)
    if not cidrs:
        raise SettingsError(f"{spot}.trustedCidrs: name at least one network, or leave proxyProtocol out")
    networks = []
    for cidr in cidrs:
        # Address bits past the prefix are ignored, as nginx's set_real_ip_from does (10.0.0.1/8 is
        # 10.0.0.0/8). nginx warns that they are meaningless; this parser has no way to warn, so
        # it takes them silently (the chart's schema says so).
        try:
            networks.append(ipaddress.ip_network(str(cidr), strict=False))
        except ValueError as error:
            raise SettingsError(f"{spot}.trustedCidrs: {cidr!r} is not a network ({error})") from error
    return tuple(networks)


def _listener(item: Any, where: str, base: Path) -> ListenerSettings:
    if not isinstance(item, dict):
        raise SettingsError(f"{where}: expected a mapping")
    _only(
        item,
        {"name", "protocol", "address", "port", "tls", "starttls", "certificates", "proxyProtocol"},
        where,
    )
    protocol = _require(item, "protocol", str, where)
    if protocol not in get_args(ListenerProtocol):
        raise SettingsError(f"{where}.protocol: {protocol!r} is not one of imap, pop3, submission, smtp")
    tls = item.get("tls", "none")
    if tls not in get_args(ListenerTls):
        raise SettingsError(f"{where}.tls: {tls!r} is not one of none, starttls, implicit")
    starttls = item.get("starttls", "optional")
    if starttls not in ("optional", "required"):
        raise SettingsError(f"{where}.starttls: {starttls!r} is not one of optional, required")
    if starttls == "required" and tls != "starttls":
        raise SettingsError(f"{where}.starttls: 'required' needs tls: starttls")
    certificates = _certificates(item, where, base)
    if tls != "none" and not certificates:
        raise SettingsError(f"{where}.certificates: tls: {tls} needs at least one certificate and key")
    if protocol == "smtp" and starttls == "required":
        # RFC 3207 section 4: a publicly-referenced MX must not require STARTTLS.
        raise SettingsError(f"{where}.starttls: an inbound MX listener must not require STARTTLS (RFC 3207)")
    return ListenerSettings(
        name=str(item.get("name", protocol)),
        protocol=protocol,
        address=_address(_require(item, "address", str, where), f"{where}.address"),
        port=_port(item.get("port"), f"{where}.port"),
        tls=tls,
        starttls_required=starttls == "required",
        certificates=certificates,
        proxy_protocol_from=_networks(item, where),
    )


def _backend_tls(document: Any, base: Path) -> BackendTlsSettings:
    if not isinstance(document, dict):
        raise SettingsError("backendTls: expected {caFile: PATH, insecureSkipVerify: false}")
    _only(document, {"caFile", "insecureSkipVerify"}, "backendTls")
    ca_file = document.get("caFile")
    if ca_file is not None and not isinstance(ca_file, str):
        raise SettingsError("backendTls.caFile: expected a file path")
    skip = document.get("insecureSkipVerify", False)
    if not isinstance(skip, bool):
        raise SettingsError("backendTls.insecureSkipVerify: expected true or false")
    return BackendTlsSettings(ca_file=_file(base, ca_file) if ca_file else None, insecure_skip_verify=skip)


def _listeners(items: Any, base: Path) -> tuple[ListenerSettings, ...]:
    if not isinstance(items, list) or not items:
        raise SettingsError("listeners: expected a non-empty list")
    listeners = [_listener(item, f"listeners[{number}]", base) for number, item in enumerate(items)]
    names = [listener.name for listener in listeners]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SettingsError(f"listeners: duplicate names {', '.join(duplicates)}")
    return tuple(listeners)


def _reference(reference: Any, section: str) -> tuple[str, str]:
    """A ``namespace/name`` key of the services or secrets section."""
    namespace, slash, name = str(reference).partition("/")
    if not slash or not namespace or not name:
        raise SettingsError(f"{section}: {reference!r} must be written namespace/name")
    return namespace, name


def _services(document: Any) -> ServiceEndpoints:
    if not isinstance(document, dict):
        raise SettingsError("services: expected a mapping of 'namespace/name' to ports")
    services: dict[tuple[str, str, str], tuple[Endpoint, ...]] = {}
    for reference, ports in document.items():
        namespace, name = _reference(reference, "services")
        if not isinstance(ports, dict):
            raise SettingsError(f"services.{reference}: expected a mapping of port to addresses")
        for port, addresses in ports.items():
            where = f"services.{reference}.{port}"
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise SettingsError(f"{where}: expected a list of 'host:port' strings")
            services[(namespace, name, str(port))] = tuple(parse_endpoint(a, where) for a in addresses)
    return services


def _secrets(document: Any) -> SecretData:
    """The ``secrets`` section: each message names the Secret and key, never a value."""
    if not isinstance(document, dict):
        raise SettingsError("secrets: expected a mapping of 'namespace/name' to {key: value}")
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for reference, data in document.items():
        secret, where = _reference(reference, "secrets"), f"secrets.{reference}"
        if not isinstance(data, dict):
            raise SettingsError(f"{where}: expected a mapping of key to value")
        for key, value in data.items():
            if not isinstance(value, str):
                kind = type(value).__name__
                raise SettingsError(f"{where}.{key}: expected a string (quote it), got a {kind}")
        secrets[secret] = {str(key): value for key, value in data.items()}
    return secrets


def _controller(document: Any, base: Path) -> ControllerSettings:
    if not isinstance(document, dict):
        raise SettingsError("controller: expected {url, tokenFile, proxyName, snapshotFile, caFile}")
    _only(document, {"url", "tokenFile", "proxyName", "snapshotFile", "caFile"}, "controller")
    url = _require(document, "url", str, "controller")
    # Only ASCII, and never echoed when it is not: urlsplit reads characters that NFKC folds to
    # '@', '/', '?', '#' or ':' (the full-width at sign, U+FF20) and raises a ValueError that quotes the
    # whole authority, password included. A host name outside ASCII is written in its A-labels.
    if not url.isascii():
        raise SettingsError(
            "controller.url: expected an ASCII http(s)://host:port (a host name outside ASCII in its"
            " xn-- form); not echoed, as it may hold a password"
        )
    # User information is the authority's part before an '@' (RFC 3986 3.2.1). Where it ends is
    # not for us to guess: a password holding '/', '?' or '#' moves the '@' into what urlsplit
    # calls the path (and a numeric one reads as host:port), so any '@' is refused, and never
    # echoed: what precedes it may be a password, and this message is printed. The channel
    # authenticates with tokenFile (aiohttp would refuse both in one request); the controller's
    # own paths hold no '@', and one elsewhere is written %40 (RFC 3986 2.1).
    if "@" in url:
        raise SettingsError(
            "controller.url: must not hold a user name or password (user:password@host); the push"
            " channel authenticates with tokenFile (write an '@' that belongs in a path as %40)"
        )
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018  urlsplit checks the port only when asked for it
    except ValueError as error:
        raise SettingsError(f"controller.url: expected http(s)://host:port, got {url!r} ({error})") from error
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SettingsError(f"controller.url: expected http(s)://host:port, got {url!r}")
    name = document.get("proxyName")
    if name is not None and (not isinstance(name, str) or not push.valid_proxy_name(name)):
        # The controller refuses any other name at every stream (proxy.push).
        raise SettingsError(f"controller.proxyName: expected {push.PROXY_NAME_RULE}, got {name!r}")
    snapshot = document.get("snapshotFile")
    if snapshot is not None and not isinstance(snapshot, str):
        raise SettingsError("controller.snapshotFile: expected a file path")
    ca_file = document.get("caFile")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise SettingsError("controller.caFile: expected a file path")
    if ca_file and parts.scheme != "https":
        # A CA for a plain-HTTP channel would verify nothing while looking as if it did.
        raise SettingsError(f"controller.caFile: needs an https:// url, got {url!r}")
    return ControllerSettings(
        # The scheme in lower case (urlsplit lowers it): the subscriber tells TLS by it.
        url=urllib.parse.urlunsplit(parts).rstrip("/"),
        token_file=_file(base, _require(document, "tokenFile", str, "controller")),
        proxy_name=name,
        snapshot_file=_file(base, snapshot) if snapshot else None,
        ca_file=_file(base, ca_file) if ca_file else None,
    )


def _spot(where: str, key: str) -> str:
    """The dotted name of ``key`` inside ``where`` (empty: the top level), for error messages."""
    return f"{where}.{key}" if where else key


def _seconds(
    document: Mapping[str, Any], key: str, default: float, where: str = "timeouts", *, zero: bool = False
) -> float:
    """A positive number of seconds (or 0, where ``zero`` says that turns something off)."""
    value = document.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value < 0
        or (value == 0 and not zero)
    ):
        expected = "0 or a positive number" if zero else "a positive number"
        raise SettingsError(f"{_spot(where, key)}: expected {expected} of seconds, got {value!r}")
    return float(value)


def _count(document: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = document.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"{_spot(where, key)}: expected a positive whole number, got {value!r}")
    return value


def _mapping(document: Mapping[str, Any], key: str, known: set[str], where: str) -> Mapping[str, Any]:
    """An optional nested mapping (empty when absent) that may hold only ``known`` keys."""
    value = document.get(key, {})
    spot = _spot(where, key)
    if not isinstance(value, dict):
        raise SettingsError(f"{spot}: expected a mapping")
    _only(value, known, spot)
    return value


def _limits(document: Mapping[str, Any]) -> LimitSettings:
    raw = _mapping(document, "limits", {"connectionsPerIp", "failedLogins"}, "")
    where = "limits.failedLogins"
    failures = _mapping(
        raw,
        "failedLogins",
        {"perUser", "perIp", "firstDelay", "maxDelay", "lockout", "refusalTime"},
        "limits",
    )
    return LimitSettings(
        connections_per_ip=_count(raw, "connectionsPerIp", DEFAULT_CONNECTIONS_PER_IP, "limits"),
        failed_logins=FailedLoginSettings(
            per_user=_count(failures, "perUser", DEFAULT_FAILED_LOGINS_PER_USER, where),
            per_ip=_count(failures, "perIp", DEFAULT_FAILED_LOGINS_PER_IP, where),
            first_delay=_seconds(failures, "firstDelay", DEFAULT_FIRST_LOGIN_DELAY, where, zero=True),
            max_delay=_seconds(failures, "maxDelay", DEFAULT_MAX_LOGIN_DELAY, where),
            lockout=_seconds(failures, "lockout", DEFAULT_LOGIN_LOCKOUT, where),
            refusal_time=_seconds(failures, "refusalTime", DEFAULT_LOGIN_REFUSAL_TIME, where, zero=True),
        ),
    )


def _drain(document: Mapping[str, Any]) -> DrainSettings:
    raw = _mapping(document, "drain", {"gracePeriod", "quietPeriod"}, "")
    grace = _seconds(raw, "gracePeriod", DEFAULT_DRAIN_GRACE_PERIOD, "drain", zero=True)
    quiet = _seconds(raw, "quietPeriod", DEFAULT_DRAIN_QUIET_PERIOD, "drain")
    if grace and quiet >= grace:
        raise SettingsError(
            f"drain.quietPeriod: {quiet:g} s leaves no quiet moment within the {grace:g} s gracePeriod"
        )
    return DrainSettings(grace_period=grace, quiet_period=quiet)


def parse(document: Any, base: Path) -> ProxySettings:
    """Check a loaded settings document; relative file paths (routes, certificates, keys, the CA,
    the token and the snapshot) are taken from ``base``."""
    if not isinstance(document, dict):
        raise SettingsError("settings: expected a mapping at the top level")
    known = {
        "listeners",
        "admin",
        "serverName",
        "timeouts",
        "maxErrors",
        "routes",
        "services",
        "secrets",
        "backendTls",
        "controller",
        "limits",
        "drain",
    }
    _only(document, known, "settings")
    admin = None
    if "admin" in document:
        raw = _require(document, "admin", dict, "settings")
        _only(raw, {"address", "port"}, "admin")
        admin = AdminSettings(
            address=_address(_require(raw, "address", str, "admin"), "admin.address"),
            port=_port(raw.get("port"), "admin.port"),
        )
    raw_timeouts = _mapping(document, "timeouts", {"preLogin", "backendConnect", "backendLogin", "idle"}, "")
    timeouts = Timeouts(
        pre_login=_seconds(raw_timeouts, "preLogin", DEFAULT_PRE_LOGIN_TIMEOUT),
        backend_connect=_seconds(raw_timeouts, "backendConnect", DEFAULT_BACKEND_CONNECT_TIMEOUT),
        backend_login=_seconds(raw_timeouts, "backendLogin", DEFAULT_BACKEND_LOGIN_TIMEOUT),
        idle=_seconds(raw_timeouts, "idle", DEFAULT_IDLE_TIMEOUT),
    )
    routes = document.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise SettingsError("routes: expected a list of MailRoute file paths")
    max_errors = _count(document, "maxErrors", DEFAULT_MAX_ERRORS, "")
    server_name = document.get("serverName", "mailgress")
    if not isinstance(server_name, str) or not server_name or any(c.isspace() for c in server_name):
        raise SettingsError(f"serverName: expected a host name without spaces, got {server_name!r}")
    controller = None
    if "controller" in document:
        if {"routes", "services", "secrets"} & set(document):
            raise SettingsError(
                "controller: cannot be combined with routes, services or secrets "
                "(in a cluster the controller sends the table; standalone, leave controller out)"
            )
        controller = _controller(document["controller"], base)
    return ProxySettings(
        listeners=_listeners(document.get("listeners"), base),
        admin=admin,
        server_name=server_name,
        timeouts=timeouts,
        max_errors=max_errors,
        route_files=tuple(_file(base, route) for route in routes),
        services=_services(document.get("services", {})),
        backend_tls=_backend_tls(document.get("backendTls", {}), base),
        controller=controller,
        limits=_limits(document),
        drain=_drain(document),
        secrets=_secrets(document.get("secrets", {})),
    )


def load(path: Path) -> ProxySettings:
    """Read and check a settings file."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SettingsError(f"{path}: cannot read: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML: {yaml_problem(error)}") from error
    return parse(document, path.parent)


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, without the lines it quotes: a settings file's
    ``secrets`` and a MailRoute's auth_http ``headers`` hold values no message may repeat."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return type(error).__name__
    parts = [
        f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text
        for text, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark))
        if text
    ]
    return ": ".join(parts) or type(error).__name__
