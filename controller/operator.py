"""The ``mailgress controller`` process: settings, the API writer, and kopf's run. mailgress/cli.py
adds ``add_arguments`` to its ``controller`` subcommand and calls ``command``; tests call ``run``
with a kubeconfig that points at the emulator. ``run`` loads the Kubernetes client configuration (a
kubeconfig, or the pod's service account), starts the push channel (controller.publisher, its
connections bounded by the guard mailgress/cli.py hands in), registers controller.handlers on a
fresh kopf registry and runs kopf until stopped. A run that ends on an error (a watch ERROR event
kopf treats as fatal), or that the handlers give up on (``handlers.RouteGate``), raises
``OperatorError``: ``command`` logs it in one line and the process exits with EXIT_RESTART, to be
restarted by Kubernetes (with the kubelet's backoff), which scans API discovery afresh.
``KubeApi`` is the reconciler's ``Cluster``: the few writes kopf does not make for us (status
patches with a resourceVersion precondition, the snapshot Secret, Events) and two reads (the
snapshot Secret at start, and the handlers' resync LISTs of uids), over aiohttp with the same
credentials kopf logs in with. The snapshot is a Secret because tables carry auth_http request
headers; a ConfigMap an earlier release wrote is never read (that needs rights on ConfigMaps the
chart no longer grants). The chart renders the Secret empty and grants only get and patch on it; the
controller creates it only when it is missing and it may (an install without the chart).
Served namespaces: a MailRoute names the backend that gets its users' passwords, so whoever may
write MailRoutes in a served namespace can route logins; a release serves the namespaces it is
given and no other (as ingress-nginx's --watch-namespace, and Gateway API's allowedRoutes, whose
default is the Gateway's own namespace). Without a flag that is the controller's own namespace,
never every namespace: serving the whole cluster is a choice made with --all-namespaces. kopf then
watches those namespaces plus the controller's own (where the proxy pods are); the handlers keep
objects of served namespaces only.
Never logs the push token, an API bearer token or the snapshot's content; never imports anything
of the proxy but the table contract.

Settings (flag, then environment variable, then default):
  --namespace          MAILGRESS_NAMESPACE, POD_NAMESPACE    the controller's namespace (proxy pods,
                                                             snapshot Secret); else the service
                                                             account's, else "default"
  --watch-namespace    MAILGRESS_WATCH_NAMESPACES            a namespace whose MailRoutes this
                                                             release serves (repeatable; the
                                                             variable: names separated by
                                                             commas, "*" for all); else the
                                                             controller's own namespace only
  --all-namespaces     MAILGRESS_WATCH_NAMESPACES="*"        serve MailRoutes of every namespace
                                                             (kopf cluster-wide)
  --proxy-selector     MAILGRESS_PROXY_SELECTOR              labels of proxy pods
                                                             (app.kubernetes.io/component=proxy)
  --listen-address     MAILGRESS_LISTEN_ADDRESS              push channel address (0.0.0.0)
  --listen-port        MAILGRESS_LISTEN_PORT                 push channel and /metrics port (9400)
  --token-file         MAILGRESS_TOKEN_FILE                  file holding the push channel token
                                                             (a mounted Secret, re-read when
                                                             it changes); required
  --tls-cert-file      MAILGRESS_TLS_CERT_FILE               PEM certificate chain of the push
                                                             channel (and its /metrics); with
                                                             --tls-key-file it serves TLS 1.2+,
                                                             reloaded when the files change;
                                                             neither: plain HTTP
  --tls-key-file       MAILGRESS_TLS_KEY_FILE                its PEM private key
  --snapshot-secret    MAILGRESS_SNAPSHOT_SECRET             Secret for the table snapshot
                                                             (mailgress-routing-table);
                                                             --snapshot-configmap and
                                                             MAILGRESS_SNAPSHOT_CONFIGMAP are
                                                             deprecated aliases (a warning)
  --kubeconfig         KUBECONFIG                            kubeconfig file; else in-cluster
  --health             MAILGRESS_HEALTH                      kopf liveness URL
                                                             (http://0.0.0.0:8081/healthz; "" = off)
  --log-level          -                                     debug, info, warning or error (info)
"""

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import ssl
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import kopf
import kubernetes.client
import kubernetes.config
import uvloop

from controller import handlers, publisher, reconciler
from controller.mailroute import API_VERSION, KIND

log = logging.getLogger(__name__)

DEFAULT_PROXY_SELECTOR = "app.kubernetes.io/component=proxy"
DEFAULT_LISTEN_ADDRESS = "0.0.0.0"
DEFAULT_LISTEN_PORT = 9400
DEFAULT_SNAPSHOT_NAME = "mailgress-routing-table"
# The snapshot Secret's type: arbitrary user data, no keys the API server checks (as it does for
# the kubernetes.io/* types).
SNAPSHOT_TYPE = "Opaque"
DEFAULT_HEALTH = "http://0.0.0.0:8081/healthz"
DEFAULT_NAMESPACE = "default"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_PORT = 65535  # RFC 793 section 3.1
# A namespace name is an RFC 1123 label (Kubernetes' DNS label rule): lower-case letters, digits
# and '-', starting and ending with a letter or digit, at most 63 characters (RFC 1035 2.3.4).
MAX_NAMESPACE = 63
_LABEL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
ALL_NAMESPACES = "*"  # MAILGRESS_WATCH_NAMESPACES' word for --all-namespaces
# One API write must not hold a pass forever; kopf's own requests use the same order of magnitude.
REQUEST_TIMEOUT_SECONDS = 30.0
# Who posts the Events (core/v1 Event source.component and reportingComponent).
COMPONENT = "mailgress-controller"
# Events are aggregated as client-go's EventRecorder does (tools/record/events_cache.go): one like
# an Event posted at most this long ago (same MailRoute uid, type, reason and message) is counted
# in it (PATCH count + 1, lastTimestamp) instead of created again; a flapping backend otherwise
# makes an Event object per condition flip. 10 minutes: client-go's aggregation interval
# (defaultAggregateIntervalInSeconds), well within the API server's Event TTL (--event-ttl, 1 h).
EVENT_AGGREGATION_SECONDS = 600.0
# Events, and MailRoutes' create budgets, remembered at most (least recently posted forgotten
# first): client-go's maxLruCacheEntries.
MAX_REMEMBERED_EVENTS = 4096
# Events created per MailRoute: a token bucket of EVENT_BURST, refilled by one every
# EVENT_REFILL_SECONDS (client-go's spam filter: defaultSpamBurst 25, defaultSpamQPS 1/300), so a
# flapping backend behind many routes, with messages that keep changing, cannot create thousands
# of Events an hour. What goes over is dropped (logged at debug level).
EVENT_BURST = 25
EVENT_REFILL_SECONDS = 300.0
# After a 403 on an Event PATCH in a namespace (a chart that grants only create, a per-namespace
# Role, an admission webhook), repeats there are created anew for this long, then PATCH is tried
# again: a grant may come without a restart. One aggregation interval, as client-go's.
EVENT_PATCH_RETRY_SECONDS = EVENT_AGGREGATION_SECONDS
EXIT_USAGE = 2
# The exit status of ``mailgress controller`` when the operator stopped on an error
# (``OperatorError``): kopf ends its run on a watch ERROR event other than 410 Gone (an API
# server's 500 while etcd times out, say), fatal by design (kopf's watching.continuous_watch has no
# setting to resume instead), and the handlers give up when kopf's scan of API discovery at start
# missed a kind (``handlers.RouteGate``). Kubernetes restarts the container, backing off up to five
# minutes when it keeps failing; the fresh process lists and scans everything afresh, which a
# second kopf run in the same process could not do soundly (kopf's SIGKILL timer of the run that
# ended, its signal handlers, its threads). The proxies keep serving their tables meanwhile and
# reconnect to the new process.
EXIT_RESTART = 1

# Builds the push channel's certificates from the certificate and key files. mailgress/cli.py,
# the composition root, passes proxy.server.certificates.CertificateStore's (the one reload logic
# the project has), which the controller may not import itself (pyproject.toml's contracts).
# Raises SettingsError when the files cannot be loaded.
CertificateLoader = Callable[[Path, Path], publisher.ServerCertificates]


class SettingsError(ValueError):
    """A flag or environment variable with a value the controller cannot run with."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``run`` needs, resolved from flags and the environment."""

    namespace: str
    proxy_selector: Mapping[str, str]
    listen_address: str
    listen_port: int
    token_file: Path
    snapshot_secret: str
    kubeconfig: Path | None
    health: str
    # The namespaces whose MailRoutes (and Services, EndpointSlices, labelled Secrets) this
    # release serves; None: every namespace.
    watch_namespaces: frozenset[str] | None
    log_level: str = "info"
    # The push channel's TLS certificate and key; None: plain HTTP.
    tls_files: tuple[Path, Path] | None = None


def _selector(text: str) -> dict[str, str]:
    """An equality-based label selector "k=v,k2=v2" (what kopf's label filter takes)."""
    labels: dict[str, str] = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip() or value.startswith("="):
            raise SettingsError(f"--proxy-selector: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    if not labels:
        raise SettingsError("--proxy-selector must name at least one label")
    return labels


def _namespace_name(text: str, source: str) -> str:
    if (
        not 0 < len(text) <= MAX_NAMESPACE
        or not set(text) <= _LABEL_CHARACTERS
        or text.startswith("-")
        or text.endswith("-")
    ):
        raise SettingsError(
            f"{source}: {text!r} is not a namespace name (lower-case letters, digits and '-', "
            f"at most {MAX_NAMESPACE} characters, no '-' first or last)"
        )
    return text


def _watch_namespaces(
    arguments: argparse.Namespace, environ: Mapping[str, str], own: str
) -> frozenset[str] | None:
    """The served namespaces: flags, else MAILGRESS_WATCH_NAMESPACES, else ``own`` alone."""
    named: list[str] = arguments.watch_namespace or []
    if arguments.all_namespaces:
        if named:
            raise SettingsError("--all-namespaces and --watch-namespace exclude each other")
        return None
    if named:
        return frozenset(_namespace_name(name, "--watch-namespace") for name in named)
    listed = [part.strip() for part in environ.get("MAILGRESS_WATCH_NAMESPACES", "").split(",")]
    listed = [part for part in listed if part]
    if listed == [ALL_NAMESPACES]:
        return None
    if listed:
        return frozenset(_namespace_name(name, "MAILGRESS_WATCH_NAMESPACES") for name in listed)
    return frozenset({own})


def add_arguments(flags: argparse.ArgumentParser) -> None:
    """The flags of ``mailgress controller`` (mailgress/cli.py adds them to its subcommand)."""
    flags.add_argument("--namespace", help="the controller's namespace (proxy pods, snapshot Secret)")
    flags.add_argument(
        "--watch-namespace",
        action="append",
        metavar="NAME",
        help="serve the MailRoutes of this namespace (repeatable; default: the controller's own)",
    )
    flags.add_argument(
        "--all-namespaces", action="store_true", help="serve the MailRoutes of every namespace"
    )
    flags.add_argument("--proxy-selector", help="label selector of proxy pods, k=v[,k=v]")
    flags.add_argument("--listen-address", help="push channel listen address")
    flags.add_argument("--listen-port", help="push channel listen port")
    flags.add_argument("--token-file", help="file with the push channel token")
    flags.add_argument("--tls-cert-file", help="push channel TLS certificate chain (PEM)")
    flags.add_argument("--tls-key-file", help="push channel TLS private key (PEM)")
    flags.add_argument("--snapshot-secret", help="Secret that keeps the table snapshot")
    flags.add_argument("--snapshot-configmap", help="deprecated alias of --snapshot-secret")
    flags.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    flags.add_argument("--health", help='kopf liveness endpoint URL ("" to disable)')
    flags.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from(arguments: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Resolve flags, then environment variables, then defaults.

    Raises:
        SettingsError: a value is missing or malformed.
    """

    def pick(flag: str | None, *names: str, default: str | None = None) -> str | None:
        if flag is not None:
            return flag
        return next((environ[name] for name in names if environ.get(name)), default)

    namespace = pick(arguments.namespace, "MAILGRESS_NAMESPACE", "POD_NAMESPACE")
    if namespace is None:
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
        except OSError:
            namespace = DEFAULT_NAMESPACE
    port_text = pick(arguments.listen_port, "MAILGRESS_LISTEN_PORT", default=str(DEFAULT_LISTEN_PORT)) or ""
    if not port_text.isdigit() or int(port_text) > MAX_PORT:
        raise SettingsError(f"--listen-port: {port_text!r} is not a port number")
    token_file = pick(arguments.token_file, "MAILGRESS_TOKEN_FILE")
    if not token_file:
        raise SettingsError("--token-file (or MAILGRESS_TOKEN_FILE) is required: the push channel token")
    tls_cert = pick(arguments.tls_cert_file, "MAILGRESS_TLS_CERT_FILE")
    tls_key = pick(arguments.tls_key_file, "MAILGRESS_TLS_KEY_FILE")
    if bool(tls_cert) != bool(tls_key):
        raise SettingsError("--tls-cert-file and --tls-key-file go together: give both, or neither for HTTP")
    kubeconfig = pick(arguments.kubeconfig, "KUBECONFIG")
    # The ConfigMap names are deprecated aliases, accepted for one release so that an upgrade keeps
    # a deployment's own snapshot name; each comes after its new form.
    snapshot_flag = arguments.snapshot_secret
    if snapshot_flag is None:
        snapshot_flag = arguments.snapshot_configmap
    snapshot_secret = pick(snapshot_flag, "MAILGRESS_SNAPSHOT_SECRET", "MAILGRESS_SNAPSHOT_CONFIGMAP")
    for alias, given in (
        ("--snapshot-configmap", arguments.snapshot_configmap is not None),
        ("MAILGRESS_SNAPSHOT_CONFIGMAP", bool(environ.get("MAILGRESS_SNAPSHOT_CONFIGMAP"))),
    ):
        if given:
            log.warning(
                "%s is deprecated and goes away in the next release: the snapshot is a Secret now; "
                "use --snapshot-secret or MAILGRESS_SNAPSHOT_SECRET",
                alias,
            )
    return Settings(
        namespace=namespace,
        proxy_selector=_selector(
            pick(arguments.proxy_selector, "MAILGRESS_PROXY_SELECTOR", default=DEFAULT_PROXY_SELECTOR) or ""
        ),
        listen_address=pick(
            arguments.listen_address, "MAILGRESS_LISTEN_ADDRESS", default=DEFAULT_LISTEN_ADDRESS
        )
        or DEFAULT_LISTEN_ADDRESS,
        listen_port=int(port_text),
        token_file=Path(token_file),
        snapshot_secret=snapshot_secret or DEFAULT_SNAPSHOT_NAME,
        # KUBECONFIG may list several files; kopf and kubectl merge them, we take the first.
        kubeconfig=Path(kubeconfig.split(os.pathsep)[0]) if kubeconfig else None,
        health=pick(arguments.health, "MAILGRESS_HEALTH", default=DEFAULT_HEALTH) or "",
        watch_namespaces=_watch_namespaces(arguments, environ, namespace),
        log_level=arguments.log_level,
        tls_files=(Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None,
    )


# ---------------------------------------------------------------------------------------------
# Credentials


def kube_configuration(kubeconfig: Path | None) -> kubernetes.client.Configuration:
    """The client configuration: the kubeconfig file if given, else the pod's service account.

    Raises:
        SettingsError: neither can be loaded.
    """
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig is not None:
            load = kubernetes.config.load_kube_config
            load(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (kubernetes.config.ConfigException, OSError) as error:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise SettingsError(f"cannot load Kubernetes credentials from {where}: {error}") from error
    return configuration


def _authorization(configuration: kubernetes.client.Configuration) -> str | None:
    # As kopf.login_via_client: clients after 36.0.1 keep the token under "BearerToken"; calling
    # the getter (not reading api_key) runs the refresh hook of rotating service-account tokens.
    header: str | None = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    return header


def connection_info(configuration: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client configuration (what ``kopf.login_via_client`` does)."""
    header = _authorization(configuration)
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def _ssl_context(configuration: kubernetes.client.Configuration) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https:"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------------------------
# The reconciler's API writes


# At most this much of the API server's explanation of a refusal (a metav1.Status message: the
# object, the field and the rule; an admission webhook's own words) goes into an error.
MAX_REFUSAL_MESSAGE = 300


def _refusal(content: bytes) -> str:
    """ ": " and the message of the metav1.Status the API server refused a request with ("" if
    the answer holds none)."""
    try:
        answer = json.loads(content)
    except (ValueError, RecursionError):  # ValueError: JSON or UTF-8
        return ""
    message = answer.get("message") if isinstance(answer, dict) else None
    return f": {message[:MAX_REFUSAL_MESSAGE]}" if isinstance(message, str) and message else ""


# An Event's identity for aggregation: the MailRoute's uid, the type, the reason and the message.
EventKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class PostedEvent:
    """An Event object this controller created, or last counted a repeat in."""

    name: str  # the object's (the API server chose it: generateName)
    count: int  # its count as last written
    at: float  # when (RecentEvents' clock)


@dataclass(frozen=True, slots=True)
class _Budget:
    """A MailRoute's Event creates still allowed (a token bucket)."""

    tokens: float
    at: float  # when last counted (RecentEvents' clock)


class RecentEvents:
    """What ``KubeApi.post_event`` remembers between posts: the Events posted in the last
    EVENT_AGGREGATION_SECONDS, each MailRoute's create budget, and the namespaces where a PATCH
    of an Event was forbidden lately. The maps are LRUs of at most MAX_REMEMBERED_EVENTS. No I/O:
    the caller asks, calls the API, and reports back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._posted: OrderedDict[EventKey, PostedEvent] = OrderedDict()
        self._budgets: OrderedDict[str, _Budget] = OrderedDict()
        # Namespace to when a PATCH of an Event there was last forbidden; kept after
        # EVENT_PATCH_RETRY_SECONDS so the refusal is named once per namespace.
        self._unpatchable: OrderedDict[str, float] = OrderedDict()

    def recent(self, key: EventKey) -> PostedEvent | None:
        """The Event like ``key`` posted within EVENT_AGGREGATION_SECONDS, if any (an older one
        is forgotten). It stays remembered: a PATCH that meets an unavailable API may count in
        it at the next post; ``forget`` it when the API refuses the count."""
        posted = self._posted.get(key)
        if posted is not None and self._clock() - posted.at > EVENT_AGGREGATION_SECONDS:
            del self._posted[key]
            return None
        return posted

    def forget(self, key: EventKey) -> None:
        """The Event like ``key`` is not to be counted in (gone, or its PATCH refused)."""
        self._posted.pop(key, None)

    def posted(self, key: EventKey, name: str, count: int) -> None:
        """The Event ``name`` now counts ``count`` posts like ``key``."""
        self._posted[key] = PostedEvent(name, count, self._clock())
        self._posted.move_to_end(key)  # least recently posted forgotten first
        while len(self._posted) > MAX_REMEMBERED_EVENTS:
            self._posted.popitem(last=False)

    def may_patch(self, namespace: str) -> bool:
        """Whether to count a repeat in ``namespace`` with a PATCH: none was forbidden there in
        the last EVENT_PATCH_RETRY_SECONDS."""
        refused = self._unpatchable.get(namespace)
        return refused is None or self._clock() - refused >= EVENT_PATCH_RETRY_SECONDS

    def patch_forbidden(self, namespace: str) -> bool:
        """A PATCH of an Event in ``namespace`` was forbidden: none is tried there for
        EVENT_PATCH_RETRY_SECONDS. True the first time for ``namespace`` (to be logged)."""
        first = namespace not in self._unpatchable
        self._unpatchable[namespace] = self._clock()
        self._unpatchable.move_to_end(namespace)
        while len(self._unpatchable) > MAX_REMEMBERED_EVENTS:
            self._unpatchable.popitem(last=False)
        return first

    def may_create(self, uid: str) -> bool:
        """Whether the MailRoute ``uid`` may have one more Event created (and count it)."""
        now = self._clock()
        budget = self._budgets.pop(uid, None)
        tokens = (
            float(EVENT_BURST)
            if budget is None
            else min(float(EVENT_BURST), budget.tokens + (now - budget.at) / EVENT_REFILL_SECONDS)
        )
        allowed = tokens >= 1
        self._budgets[uid] = _Budget(tokens - 1 if allowed else tokens, now)
        while len(self._budgets) > MAX_REMEMBERED_EVENTS:
            self._budgets.popitem(last=False)
        return allowed


def _object_name(content: bytes) -> str | None:
    """metadata.name of the object an API answer holds (None: none, or not JSON)."""
    try:
        answer = json.loads(content)
    except (ValueError, RecursionError):  # ValueError: JSON or UTF-8
        return None
    metadata = answer.get("metadata") if isinstance(answer, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name else None


class KubeApi:
    """``reconciler.Cluster`` over aiohttp: status patches, the snapshot Secret, Events; and
    ``list_uids``, the read controller.handlers' resync makes (``handlers.Cluster``)."""

    # Objects per page of a resync's LIST: the page size of client-go's pager and of kubectl's
    # --chunk-size. The API server may send fewer, and pages of one LIST are one snapshot.
    LIST_PAGE_SIZE = 500
    # A resync needs uids only: asked for as PartialObjectMetadataList (Kubernetes 1.15+), no
    # spec, status or Secret data travels; an API server that cannot answer so sends plain JSON.
    METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"

    def __init__(self, configuration: kubernetes.client.Configuration, namespace: str, secret: str) -> None:
        self._configuration = configuration
        self._namespace = namespace
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None
        self._events = RecentEvents()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            base_url=self._configuration.host.rstrip("/") + "/",
            connector=aiohttp.TCPConnector(ssl=_ssl_context(self._configuration)),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, content_type: str, accept: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": accept, "User-Agent": COMPONENT}
        credential = _authorization(self._configuration)
        if not credential and self._configuration.username:
            credential = self._configuration.get_basic_auth_token()
        if credential:
            headers["Authorization"] = credential
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        content_type: str,
        *,
        params: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> tuple[int, bytes]:
        """The HTTP status and body of one request; network trouble, 401, 429 and 5xx are
        ClusterUnavailableError (no other request would fare better), 403 ForbiddenError."""
        if self._session is None:
            raise RuntimeError("KubeApi.start() was not called")
        try:
            async with self._session.request(
                method,
                path.lstrip("/"),
                params=params,
                json=body,
                headers=self._headers(content_type, accept),
            ) as response:
                content = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise reconciler.ClusterUnavailableError(f"{method} {path}: {error!r}") from error
        if status == 403:
            raise reconciler.ForbiddenError(f"{method} {path}: HTTP {status}{_refusal(content)}")
        if status >= 500 or status in (401, 429):
            raise reconciler.ClusterUnavailableError(f"{method} {path}: HTTP {status}")
        return status, content

    async def patch_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> bool:
        group, version = API_VERSION.split("/")
        path = f"/apis/{group}/{version}/namespaces/{namespace}/mailroutes/{name}/status"
        # A resourceVersion in a merge patch is a precondition: 409 if the object moved on.
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        code, content = await self._call("PATCH", path, body, "application/merge-patch+json")
        if code in (404, 409):
            return False
        if code >= 300:
            raise reconciler.ClusterError(f"PATCH {path}: HTTP {code}{_refusal(content)}")
        return True

    async def list_uids(
        self, kind: tuple[str, ...], namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> frozenset[str]:
        """The uids of every object of ``kind`` (kopf's form: (version, plural) for the core group,
        else (group, version, plural)) in ``namespace`` (None: every namespace) that match both
        selectors (as the API's labelSelector and fieldSelector; "" matches all), read page by
        page from one snapshot of the API server.

        Raises:
            ClusterUnavailableError: the API is unavailable (see ``_call``).
            ForbiddenError: HTTP 403.
            ClusterError: any other answer but 200 (410 when a continue token expired), or an
                answer that is not a list of objects with uids; nothing of the pages read so far
                is returned.
        """
        *group, version, plural = kind
        root = f"/apis/{group[0]}/{version}" if group else f"/api/{version}"
        path = f"{root}/namespaces/{namespace}/{plural}" if namespace is not None else f"{root}/{plural}"
        query = {"limit": str(self.LIST_PAGE_SIZE)}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        uids: set[str] = set()
        token = ""
        while True:
            params = {**query, "continue": token} if token else query
            code, content = await self._call(
                "GET", path, None, "application/json", params=params, accept=self.METADATA_ONLY
            )
            if code >= 300:
                raise reconciler.ClusterError(f"GET {path}: HTTP {code}{_refusal(content)}")
            try:
                found, token = self._list_page(content)
            except ValueError as error:
                raise reconciler.ClusterError(f"GET {path}: {error}") from error
            uids.update(found)
            if not token:
                return frozenset(uids)

    @staticmethod
    def _list_page(content: bytes) -> tuple[list[str], str]:
        """The uids on one page of a LIST and its continue token ("" on the last page).

        Raises:
            ValueError: the page is not a list of objects that each have a uid.
        """
        try:
            page = json.loads(content)
        except RecursionError as error:
            raise ValueError("the answer is nested too deep") from error
        if not isinstance(page, dict) or not isinstance(page.get("items"), list | None):
            raise ValueError("the answer is not a list")
        uids = []
        for item in page.get("items") or ():
            metadata = item.get("metadata") if isinstance(item, dict) else None
            uid = metadata.get("uid") if isinstance(metadata, dict) else None
            if not isinstance(uid, str) or not uid:
                raise ValueError("an item of the list has no uid")
            uids.append(uid)
        metadata = page.get("metadata")
        token = metadata.get("continue") if isinstance(metadata, dict) else None
        return uids, token if isinstance(token, str) else ""

    async def load_snapshot(self) -> Mapping[str, Any] | None:
        path = f"/api/v1/namespaces/{self._namespace}/secrets/{self._secret}"
        code, content = await self._call("GET", path, None, "application/json")
        if code == 404:
            return None
        if code >= 300:
            raise reconciler.ClusterError(f"GET {path}: HTTP {code}")
        try:
            stored = json.loads(content)
        except ValueError as error:
            raise reconciler.ClusterError(f"GET {path}: the answer is not JSON: {error}") from error
        if not isinstance(stored, dict):
            raise reconciler.ClusterError(f"GET {path}: the answer is not an object")
        if not stored.get("data"):
            return None  # the chart's Secret before the first table: nothing to restore
        return stored

    async def save_snapshot(self, snapshot: reconciler.Snapshot) -> None:
        base = f"/api/v1/namespaces/{self._namespace}/secrets"
        patch = snapshot.merge_patch()
        path = f"{base}/{self._secret}"
        code, _ = await self._call("PATCH", path, patch, "application/merge-patch+json")
        if code == 404:
            # Only without the chart: it renders the Secret and grants no create.
            created = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": self._secret},
                "type": SNAPSHOT_TYPE,
                **snapshot.fields(),
            }
            try:
                code, _ = await self._call("POST", base, created, "application/json")
            except reconciler.ForbiddenError as error:
                # The same words at every retry: the reconciler logs a repeated failure once.
                raise reconciler.ClusterError(
                    f"the Secret {self._secret} does not exist in {self._namespace} and creating it "
                    f"is forbidden (HTTP 403): create the Secret {self._secret} or grant create on "
                    "secrets"
                ) from error
        if code >= 300:
            raise reconciler.ClusterError(f"saving the snapshot Secret {self._secret}: HTTP {code}")

    async def post_event(self, entry: reconciler.RouteEntry, kind: str, reason: str, message: str) -> None:
        """Count it in the Event like it posted within EVENT_AGGREGATION_SECONDS, else create one
        (within the MailRoute's budget, ``RecentEvents.may_create``)."""
        now = reconciler.utc_now()
        route = entry.route
        key: EventKey = (entry.uid, kind, reason, message)
        path = f"/api/v1/namespaces/{route.namespace}/events"
        last = self._events.recent(key)
        if last is not None and self._events.may_patch(route.namespace):
            # An unavailable API raises here, and the Event stays remembered for the retry:
            # forgetting it would make the next post create a duplicate.
            if await self._count_event(route.namespace, f"{path}/{last.name}", last.count + 1, now):
                self._events.posted(key, last.name, last.count + 1)
                return
            self._events.forget(key)
        if not self._events.may_create(entry.uid):
            log.debug(
                "Event %s for %s dropped: %d were created for it lately (one more every %.0f s)",
                reason,
                route.key,
                EVENT_BURST,
                EVENT_REFILL_SECONDS,
            )
            return
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{route.name}.", "namespace": route.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": route.name,
                "namespace": route.namespace,
                "uid": entry.uid,
                "resourceVersion": entry.resource_version,
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        # An Event is a courtesy: a refusal (e.g. 403 in a terminating namespace, where the
        # NamespaceLifecycle admission plugin refuses every create) is logged only, and the sweep
        # goes on; an unavailable API still ends it.
        try:
            code, content = await self._call("POST", path, event, "application/json")
        except reconciler.ForbiddenError as error:
            refused = str(error)
        else:
            if code < 300:
                name = _object_name(content)
                if name is not None:  # else the next one like it is created: nothing to count in
                    self._events.posted(key, name, 1)
                return
            refused = f"POST {path}: HTTP {code}{_refusal(content)}"
        log.warning("Event %s for %s was refused: %s", reason, route.key, refused)

    async def _count_event(self, namespace: str, path: str, count: int, now: str) -> bool:
        """PATCH the Event at ``path`` (in ``namespace``) to ``count`` posts, the last ``now``.
        False when it is to be created anew: it is gone (404: its TTL ran out), refused (logged
        at debug level), or forbidden (a chart that grants only create, a per-namespace Role, a
        webhook: logged once per namespace, and no Event there is patched for
        EVENT_PATCH_RETRY_SECONDS). Raises ClusterUnavailableError as ``_call``."""
        body = {"count": count, "lastTimestamp": now}
        try:
            code, content = await self._call("PATCH", path, body, "application/merge-patch+json")
        except reconciler.ForbiddenError as error:
            first = self._events.patch_forbidden(namespace)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "patching Events is forbidden in namespace %s, so each repeated Event there is "
                "created anew (at most %d per MailRoute, then one every %.0f s), and PATCH tried "
                "again every %.0f s; grant patch on events: %s",
                namespace,
                EVENT_BURST,
                EVENT_REFILL_SECONDS,
                EVENT_PATCH_RETRY_SECONDS,
                error,
            )
            return False
        if code < 300:
            return True
        if code != 404:
            log.debug("PATCH %s: HTTP %d%s: the Event is created anew", path, code, _refusal(content))
        return False


# ---------------------------------------------------------------------------------------------
# Running


def read_token(path: Path) -> str:
    """The push channel token from its file (a mounted Secret), surrounding whitespace removed.

    Raises:
        SettingsError: the file cannot be read or holds no token.
    """
    try:
        return publisher.read_token(path)
    except publisher.TokenFileError as error:
        raise SettingsError(str(error)) from error


# Where kopf binds a liveness URL without a host or a port (kopf/_core/engines/probing.py).
KOPF_HEALTH_HOST = "localhost"
KOPF_HEALTH_PORT = 80


def _may_share_sockets(first: str, second: str) -> bool:
    """Whether listeners on ``first`` and ``second`` take the same port's sockets: one address, or
    a wildcard of the same family (asyncio binds IPv6 only-v6, so "::" leaves IPv4 alone), or a
    host name (it may resolve to the other)."""
    try:
        one, other = ipaddress.ip_address(first), ipaddress.ip_address(second)
    except ValueError:
        return True
    return one.version == other.version and (one == other or one.is_unspecified or other.is_unspecified)


def check_ports(settings: Settings) -> None:
    """Refuse a liveness endpoint on the push channel's port: kopf would fail to bind it
    (EADDRINUSE) after the channel started, and the operator end with a traceback.

    Raises:
        SettingsError: naming both settings, or a --health URL whose port is not a number.
    """
    if not settings.health:
        return
    health = urllib.parse.urlsplit(settings.health)
    try:
        port = health.port or KOPF_HEALTH_PORT
    except ValueError as error:
        raise SettingsError(f"--health: {settings.health!r} has no valid port ({error})") from error
    if port == settings.listen_port and _may_share_sockets(
        health.hostname or KOPF_HEALTH_HOST, settings.listen_address
    ):
        raise SettingsError(
            f"--listen-port (MAILGRESS_LISTEN_PORT) {settings.listen_port} and --health "
            f"(MAILGRESS_HEALTH) {settings.health} name the same port: the push channel and kopf's "
            "liveness endpoint each need their own (the chart's controller.pushPort and "
            "controller.healthPort)"
        )


def push_channel(
    settings: Settings,
    certificates: CertificateLoader | None = None,
    guards: publisher.ConnectionGuards | None = None,
) -> publisher.Publisher:
    """The push channel of ``settings``: it checks every request against the token file as it is
    then, so a rotated Secret takes effect without a restart (the proxies re-read it too), serves
    TLS with ``certificates`` made from the settings' files, if they name any, and bounds its
    connections with a guard from ``guards`` (None: unguarded, see ``publisher.Publisher``).

    Raises:
        SettingsError: the token file cannot be read or holds no token at start (a setup error;
            later, such a file only refuses proxies, logged by the channel); the TLS files
            cannot be loaded, or no ``certificates`` was given to load them with.
    """
    read_token(settings.token_file)
    served = None
    if settings.tls_files is not None:
        if certificates is None:
            raise SettingsError("--tls-cert-file: this entry point cannot load certificates")
        served = certificates(*settings.tls_files)
    return publisher.Publisher(
        token=publisher.TokenFile(settings.token_file), certificates=served, guards=guards
    )


class OperatorError(Exception):
    """The operator stopped on an error (see EXIT_RESTART); the message says what failed."""


async def _given_up(reason: asyncio.Future[str]) -> NoReturn:
    """A kopf root task that fails with the reason the handlers gave up for, once they do: kopf
    then stops its run as it does when a watch fails (its other root tasks, its cleanup handlers)
    and raises that error."""
    raise OperatorError(f"the handlers gave up: {await reason}")


async def run(
    settings: Settings,
    *,
    channel: publisher.Publisher | None = None,
    certificates: CertificateLoader | None = None,
    guards: publisher.ConnectionGuards | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    holdoff: float = reconciler.HOLDOFF_SECONDS,
    resync: float = handlers.RESYNC_SECONDS,
) -> None:
    """Run the operator until ``stop_flag`` is set (or SIGTERM/SIGINT in the main thread).

    Args:
        settings: as ``settings_from`` resolved them.
        channel: the publisher to start on the settings' address (tests keep a reference to
            learn its port); None makes ``push_channel(settings, certificates, guards)``.
        certificates: loads the settings' TLS files (see ``CertificateLoader``).
        guards: bounds the push port's connections (``command`` always passes it).
        stop_flag, ready_flag: passed to kopf.operator.
        holdoff: the reconciler's debounce (tests shorten it).
        resync: seconds between the handlers' LISTs that find objects a watch gap hid the
            deletion of (tests shorten it).

    Raises:
        SettingsError: two listeners on one port (``check_ports``), or credentials, the token or
            the TLS files cannot be loaded.
        OperatorError: kopf's run ended on an error, or the handlers gave up on it (see
            EXIT_RESTART); the push channel and the API client are stopped first.
    """
    check_ports(settings)
    configuration = kube_configuration(settings.kubeconfig)
    if channel is None:
        channel = push_channel(settings, certificates, guards)
    await channel.start(settings.listen_address, settings.listen_port)
    api = KubeApi(configuration, settings.namespace, settings.snapshot_secret)
    await api.start()
    given_up: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def give_up(reason: str) -> None:
        if not given_up.done():
            given_up.set_result(reason)

    registry = kopf.OperatorRegistry()
    handlers.register(
        registry,
        handlers.Wiring(
            namespace=settings.namespace,
            served=settings.watch_namespaces,
            proxy_labels=dict(settings.proxy_selector),
            login=lambda: connection_info(configuration),
            publisher=channel,
            cluster=api,
            holdoff=holdoff,
            resync=resync,
            metrics=channel.metrics,
            give_up=give_up,
        ),
    )
    # kopf watches every kind it handles in every namespace it serves: the proxy pods are in the
    # controller's own namespace, served or not (the handlers drop the rest of what it sees there).
    watched = (
        ()
        if settings.watch_namespaces is None
        else tuple(sorted(settings.watch_namespaces | {settings.namespace}))
    )
    try:
        # kopf.operator's two halves, with one root task of ours beside kopf's: the tasks that
        # exist now are not kopf's to stop when its run ends.
        existing = asyncio.all_tasks()
        kopf_tasks = await kopf.spawn_tasks(
            registry=registry,
            clusterwide=settings.watch_namespaces is None,
            namespaces=watched,
            standalone=True,
            liveness_endpoint=settings.health or None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
        ours = asyncio.create_task(_given_up(given_up), name="mailgress handlers given up")
        # A run that ends without its stop flag has kopf schedule a SIGKILL of this thread
        # (settings.process.ultimate_exiting_timeout, 10 minutes) on this loop: the loop, and
        # with it the process, ends long before.
        await kopf.run_tasks([*kopf_tasks, ours], ignored=existing)
    except OperatorError:
        raise
    except Exception as error:
        raise OperatorError(f"the operator stopped on an error: {error}") from error
    finally:
        await api.stop()
        await channel.stop()


def _fatal_failures_at_debug(record: logging.LogRecord) -> bool:
    """kopf logs the failure of each task a fatal error ends (a watcher, then the task that ran
    it) at ERROR with its traceback (its aiotasks.guard: "... has failed: ERROR"); ``command``
    says what failed once, in one line, so those records become DEBUG lines without the
    traceback, kept only when debug logging is on. Any other record of kopf's is left alone."""
    error = record.exc_info[1] if record.exc_info else None
    if (
        error is None
        or not record.name.startswith("kopf.")
        or not record.getMessage().endswith(f" has failed: {error}")
    ):
        return True
    # Changed in place: Python 3.11's filters cannot hand back a replacement record.
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    record.exc_info, record.exc_text = None, None
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def command(
    arguments: argparse.Namespace, *, certificates: CertificateLoader, guards: publisher.ConnectionGuards
) -> int:
    """``mailgress controller``: run until SIGTERM (exit status 0); exit status 2 on bad
    settings, EXIT_RESTART when the operator stopped on an error (one error line, no traceback).

    ``certificates`` loads the push channel's TLS files and ``guards`` bounds its connections
    (mailgress/cli.py passes both: the controller never runs an unguarded push port).
    """
    logging.basicConfig(
        level=getattr(logging, arguments.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_fatal_failures_at_debug)
    try:
        settings = settings_from(arguments, os.environ)
        uvloop.run(run(settings, certificates=certificates, guards=guards))
    except SettingsError as error:
        print(f"mailgress controller: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OperatorError as error:
        log.error("%s; the proxies keep serving their tables; the controller exits to be restarted", error)
        return EXIT_RESTART
    return 0
