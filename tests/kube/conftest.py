"""Fixtures for the operator against the emulator: the API server, the running controller, fake
proxies on the real push channel, and the log of what the controller asked the API for.

- ``emulator``: a fresh ``tests.kube.emulator.Emulator`` on a loopback port, kmock's bundled
  discovery loaded (no CRD: tests create it from the chart, as a user would).
- ``api``: an HTTP client for the test's own writes (its own token, so they are not mistaken for
  the controller's requests).
- ``controller``: controller.operator.run in its own thread and event loop (kopf stops in
  milliseconds that way), logging in through a kubeconfig with the controller's token, its push
  channel on 127.0.0.1 with a random port (over TLS when the settings name certificate files,
  loaded as ``mailgress controller`` loads them; its connections guarded as that command's are).
  The snapshot Secret exists before it starts, empty, as the chart renders it (the chart grants
  the controller no create; ``ControllerRunner`` creates it). Stopped at teardown, after which
  every (verb, resource) it used is added to ``controller_accesses``, but for those a test still
  forbids then (refused, as RBAC refuses what the chart does not grant: the controller got by
  without them).
- ``controller_accesses``: one JSON file for the whole session under pytest's base temp folder,
  the union of the accesses of every controller run; an RBAC check reads it.
- ``FakeProxy``: a proxy pod's end of the push channel (stream, parse, ack) without the proxy.

Every wait is bounded (``eventually``); nothing asserts on durations.
"""

import asyncio
import base64
import contextlib
import copy
import functools
import gzip
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import pytest
import yaml

from controller import handlers, operator, publisher, reconciler
from deploy import render
from mailgress import cli
from proxy import table
from proxy.server import connections
from tests.kube.emulator import Emulator

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "charts" / "mailgress" / "crds" / "mailroutes.yaml"
CONTROLLER_TOKEN = "controller-token"
TEST_TOKEN = "test-token"
PUSH_TOKEN = "push-channel-token-for-tests"
CONTROLLER_NAMESPACE = "mailgress-system"
NAMESPACE = "mail"
OTHER_NAMESPACE = "team-x"  # a namespace the default controller does not serve
NAMESPACES = (CONTROLLER_NAMESPACE, NAMESPACE, OTHER_NAMESPACE)
PROXY_LABELS = {"app.kubernetes.io/component": "proxy"}
# kmock's ObjectsArray finds objects by resource objects only ("in" is False for a string key).
MAILROUTES = kmock.resource("mailgress.io", "v1alpha1", "mailroutes")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
SECRETS = kmock.resource("", "v1", "secrets")
SNAPSHOT_NAME = "mailgress-routing-table"
SNAPSHOT_TEMPLATE = "controller-snapshot-secret.yaml"
# Generous bounds for waits on a shared 2-core machine; reaching a state sooner ends the wait.
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.02
# How often a fake proxy retries a stream the controller refused (503 before the first table).
MAX_CONNECT_ATTEMPTS = 1500


async def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll ``check`` until it returns something truthy (and return that), at most ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    for _ in range(int(timeout / POLL_SECONDS) + 1):
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"not reached within {timeout:.0f} s: {what}")


AnyEmulator = TypeVar("AnyEmulator", bound=Emulator)


@contextlib.asynccontextmanager
async def serving(emu: AnyEmulator) -> AsyncIterator[AnyEmulator]:
    """``emu`` (this module's Emulator or a subclass of a test's) served, with NAMESPACES in it."""
    emu.resources.load_bundled()
    async with emu, kmock.Server(emu):
        # A controller serving some namespaces watches those that exist (kopf lists them).
        async with client_session(emu) as session:
            for namespace in NAMESPACES:
                await Api(session).create("/api/v1/namespaces", namespace_body(namespace))
        yield emu


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with serving(Emulator()) as emu:
        yield emu


class Api:
    """The test's own API client (bearer TEST_TOKEN), raising on any unexpected status."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def call(self, method: str, path: str, body: Any = None, *, content_type: str = "") -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            text = await response.text()
            assert response.status < 300, f"{method} {path}: HTTP {response.status}: {text[:500]}"
            return json.loads(text) if text else None

    async def create(self, path: str, body: dict[str, Any]) -> Any:
        return await self.call("POST", path, body)

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self.call("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str) -> Any:
        return await self.call("DELETE", path)


def client_session(emulator: Emulator) -> aiohttp.ClientSession:
    """An HTTP session to ``emulator`` with the test's own token."""
    headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
    return aiohttp.ClientSession(base_url=str(emulator.url), headers=headers)


@pytest.fixture
async def api(emulator: Emulator) -> AsyncIterator[Api]:
    async with client_session(emulator) as session:
        yield Api(session)


def kubeconfig_text(server: str, token: str) -> str:
    """A kubeconfig with one plain-HTTP cluster and a bearer token (what kubectl and kopf read)."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": server}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "user"}}],
            "current-context": "emulator",
        }
    )


@dataclass
class AccessLog:
    """The union of every access the controller made in this session, kept in ``path``."""

    path: Path
    entries: set[tuple[tuple[str, str], ...]] = field(default_factory=set)

    def add(self, accesses: list[dict[str, str]]) -> None:
        self.entries.update(tuple(sorted(access.items())) for access in accesses)
        document = sorted((dict(entry) for entry in self.entries), key=lambda item: sorted(item.items()))
        self.path.write_text(json.dumps(document, indent=2) + "\n")

    def load(self) -> list[dict[str, str]]:
        loaded: list[dict[str, str]] = json.loads(self.path.read_text())
        return loaded


@pytest.fixture(scope="session")
def controller_accesses(tmp_path_factory: pytest.TempPathFactory) -> AccessLog:
    """Every (verb, group, resource, subresource) the controller asked the emulator for."""
    return AccessLog(tmp_path_factory.getbasetemp() / "controller-accesses.json")


@dataclass
class Controller:
    """A running controller: its settings and its push channel."""

    settings: operator.Settings
    channel: publisher.Publisher

    @property
    def port(self) -> int:
        return self.channel.port


@contextlib.contextmanager
def running_controller(
    settings: operator.Settings, *, resync: float = handlers.RESYNC_SECONDS
) -> Iterator[Controller]:
    """controller.operator.run in a thread of its own, until the block ends."""
    served = None if settings.tls_files is None else cli.push_certificates(*settings.tls_files)
    channel = publisher.Publisher(token=PUSH_TOKEN, certificates=served, guards=connections.Guard)
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(
                operator.run(
                    settings, channel=channel, stop_flag=stop, ready_flag=ready, holdoff=0.01, resync=resync
                )
            )
        except BaseException as error:  # reported to the test below, not lost in the thread
            failures.append(error)
            ready.set()

    thread = threading.Thread(target=main, name="controller", daemon=True)
    thread.start()
    try:
        assert ready.wait(WAIT_SECONDS), "the operator did not start"
        assert not failures, f"the operator failed: {failures[0]!r}"
        yield Controller(settings, channel)
    finally:
        stop.set()
        thread.join(WAIT_SECONDS)
    assert not thread.is_alive(), "the operator did not stop"
    assert not failures, f"the operator failed: {failures[0]!r}"


@pytest.fixture
def controller_settings(emulator: Emulator, tmp_path: Path) -> operator.Settings:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(str(emulator.url), CONTROLLER_TOKEN))
    token_file = tmp_path / "push-token"
    token_file.write_text(PUSH_TOKEN + "\n")
    return operator.Settings(
        namespace=CONTROLLER_NAMESPACE,
        proxy_selector=PROXY_LABELS,
        listen_address="127.0.0.1",
        listen_port=0,
        token_file=token_file,
        snapshot_secret=SNAPSHOT_NAME,
        kubeconfig=kubeconfig,
        health="",
        watch_namespaces=frozenset({NAMESPACE}),
    )


class ControllerRunner:
    """Starts the controller when the test wants it (objects may be created first) and stops it
    at the latest at teardown, adding what it asked the API for to the session's access log.
    Before the first start it creates the snapshot Secret as the chart does, unless told
    ``chart_secret=False`` (an install without the chart)."""

    def __init__(
        self,
        emulator: Emulator,
        settings: operator.Settings,
        accesses: AccessLog,
        *,
        chart_secret: bool = True,
        resync: float = handlers.RESYNC_SECONDS,
    ) -> None:
        self._emulator = emulator
        self._resync = resync
        self._settings = settings
        self._accesses = accesses
        self._chart_secret_due = chart_secret
        self._stack = contextlib.ExitStack()

    async def start(self) -> Controller:
        if self._chart_secret_due:
            self._chart_secret_due = False
            async with client_session(self._emulator) as session:
                await create_snapshot_secret(Api(session))
        # The operator thread talks to the emulator served by this loop: keep the loop running
        # while the thread starts and stops.
        running: Controller = await asyncio.to_thread(
            self._stack.enter_context, running_controller(self._settings, resync=self._resync)
        )
        return running

    async def stop(self) -> None:
        await asyncio.to_thread(self._stack.close)
        refused = self._emulator.forbidden.get(CONTROLLER_TOKEN, set())
        self._accesses.add(
            [
                access.as_json()
                for access in self._emulator.accesses(CONTROLLER_TOKEN)
                if access not in refused
            ]
        )


@functools.cache
def chart_snapshot_secret() -> dict[str, Any]:
    """The snapshot Secret as the chart renders it (release "mailgress", the controller's
    namespace): no data, the controller fills it."""
    [document] = [
        document
        for document in render.documents(namespace=CONTROLLER_NAMESPACE)
        if document.template == SNAPSHOT_TEMPLATE
    ]
    body = dict(document.body)
    assert body["metadata"]["name"] == SNAPSHOT_NAME
    return body


async def create_snapshot_secret(api: Api) -> None:
    """What Helm installs before the controller runs: the empty snapshot Secret."""
    await api.create(
        f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/secrets", copy.deepcopy(chart_snapshot_secret())
    )


@pytest.fixture
async def controller_runner(
    emulator: Emulator, controller_settings: operator.Settings, controller_accesses: AccessLog
) -> AsyncIterator[ControllerRunner]:
    runner = ControllerRunner(emulator, controller_settings, controller_accesses)
    try:
        yield runner
    finally:
        await runner.stop()


@pytest.fixture
async def controller(api: Api, controller_runner: ControllerRunner) -> Controller:
    """A controller already running, the MailRoute CRD installed before it started.

    Installed first, as Helm does: kopf scans API discovery once at startup and ignores the CRDs
    of its first CRD listing, so a CRD created during that scan would go unnoticed until a restart.
    """
    await create_crd(api)
    return await controller_runner.start()


class FakeProxy:
    """A proxy pod's side of the push channel: streams tables and acks each one."""

    def __init__(self, name: str, port: int, *, reject: bool = False) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.reject = reject
        self.tables: list[table.RoutingTable] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def latest(self) -> table.RoutingTable | None:
        return self.tables[-1] if self.tables else None

    async def __aenter__(self) -> "FakeProxy":
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        headers = {"Authorization": f"Bearer {PUSH_TOKEN}"}
        async with aiohttp.ClientSession(self.url, headers=headers) as session:
            for _ in range(MAX_CONNECT_ATTEMPTS):
                async with session.get(publisher.STREAM_PATH, params={"proxy": self.name}) as response:
                    if response.status == 503:  # no table published yet
                        await asyncio.sleep(POLL_SECONDS)
                        continue
                    assert response.status == 200, f"stream refused: HTTP {response.status}"
                    # The stream ends when the controller stops, or cut short when it exits on
                    # an error (to be restarted): either way this proxy keeps what it has.
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        async for line in response.content:
                            if line.strip():
                                await self._apply(session, line)
                return

    async def _apply(self, session: aiohttp.ClientSession, line: bytes) -> None:
        received = table.from_json(line)
        if not self.reject:
            self.tables.append(received)
        ack = {
            "proxy": self.name,
            "version": received.version,
            "accepted": not self.reject,
            "error": "rejected by the test" if self.reject else "",
        }
        async with session.post(publisher.ACK_PATH, json=ack) as response:
            assert response.status == 204


def namespace_body(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def mailroute_body(name: str, spec: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "mailgress.io/v1alpha1",
        "kind": "MailRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def imap_route(name: str, domain: str, service: str = "dovecot", port: int | str = 143) -> dict[str, Any]:
    return mailroute_body(
        name, {"domains": [domain], "imap": {"backend": {"service": service, "port": port}}}
    )


def service_body(name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "imap", "port": 143, "targetPort": 10143}]},
    }


def slice_body(
    service: str, addresses: list[str], *, ready: bool = True, namespace: str = NAMESPACE
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "imap", "port": 10143, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}} for address in addresses],
    }


def proxy_pod(name: str, *, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": CONTROLLER_NAMESPACE, "labels": dict(PROXY_LABELS)},
        "spec": {"containers": [{"name": "proxy", "image": "mailgress"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def crd_body() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return crd


async def create_crd(api: Api) -> None:
    await api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd_body())


async def create_backend(api: Api, service: str, addresses: list[str], *, ready: bool = True) -> None:
    await api.create(f"/api/v1/namespaces/{NAMESPACE}/services", service_body(service))
    await api.create(
        f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices",
        slice_body(service, addresses, ready=ready),
    )


async def create_route(api: Api, body: dict[str, Any]) -> None:
    await api.create(
        f"/apis/mailgress.io/v1alpha1/namespaces/{body['metadata']['namespace']}/mailroutes", body
    )


def route_path(name: str, namespace: str = NAMESPACE) -> str:
    return f"/apis/mailgress.io/v1alpha1/namespaces/{namespace}/mailroutes/{name}"


def status_of(emulator: Emulator, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    key = (MAILROUTES, namespace, name)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return {}
    status: dict[str, Any] = emulator.objects[key].raw.get("status") or {}
    return status


def condition(emulator: Emulator, name: str, kind: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    for item in status_of(emulator, name, namespace).get("conditions", []):
        if item.get("type") == kind:
            found: dict[str, Any] = item
            return found
    return {}


def route_events(emulator: Emulator, name: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The Event objects about the MailRoute ``name``, oldest first."""
    found = [
        obj.raw
        for (resource, where, _), obj in emulator.objects.items()
        if resource.plural == "events" and where == namespace and not obj.deleted
        if obj.raw.get("involvedObject", {}).get("name") == name
    ]
    return sorted(found, key=lambda event: int(event["metadata"]["resourceVersion"]))


def snapshot_of(emulator: Emulator) -> str | None:
    """The table JSON in the snapshot Secret, plain or compressed (None: not written)."""
    key = (SECRETS, CONTROLLER_NAMESPACE, SNAPSHOT_NAME)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return None
    data: dict[str, str] = emulator.objects[key].raw.get("data") or {}
    compressed = data.get(reconciler.SNAPSHOT_GZIP_KEY)
    if compressed is not None:
        return gzip.decompress(base64.b64decode(compressed)).decode()
    plain = data.get(reconciler.SNAPSHOT_KEY)
    return None if plain is None else base64.b64decode(plain).decode()
