"""End to end under the emulator: the real kopf operator, real ``mailgress proxy`` processes
subscribed to its push channel over loopback, and real Dovecots behind them (issue 4).

The cluster is what a user would have: the MailRoute CRD, proxy Pods (Ready, named as the
proxies' proxyName), a Service and an EndpointSlice per Dovecot pointing at 127.0.0.1, and
MailRoutes. The controller runs in a thread (tests.kube.conftest.ControllerRunner) with its push
channel on a fixed port, so proxies find it again after a restart. The push channel speaks TLS, as
the chart's defaults have it: the controller serves a certificate of a test CA, which the proxies
verify. Proxies start through ``testbed.proxyfleet.Deployment``. Each Dovecot holds one message per user whose
subject names that Dovecot: reading it through the proxy shows where a login landed. Blocking
clients and process starts run in threads so the emulator (served by the test's loop) answers;
every wait is bounded, nothing asserts on durations.
"""

import asyncio
import contextlib
import dataclasses
import email
import functools
import imaplib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller import operator
from proxy import table
from testbed import backends as testbed_backends
from testbed import clients, mailservers, messages, proxyprocess, tlscerts
from testbed.proxyfleet import Deployment
from tests import conftest as suite
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    NAMESPACE,
    PUSH_TOKEN,
    AccessLog,
    Api,
    Controller,
    ControllerRunner,
    condition,
    create_crd,
    create_route,
    eventually,
    imap_route,
    proxy_pod,
    route_path,
    service_body,
    slice_body,
    snapshot_of,
)
from tests.kube.emulator import Emulator

SERVERS = ("dovecot-one", "dovecot-two")
DOMAIN = "example.com"
OTHER_DOMAIN = "example.org"
# Both Dovecots know both users: a route can move a user from one to the other.
ALICE = mailservers.User(f"alice@{DOMAIN}", testbed_backends.default_password(f"alice@{DOMAIN}"))
BOB = mailservers.User(f"bob@{OTHER_DOMAIN}", testbed_backends.default_password(f"bob@{OTHER_DOMAIN}"))
PROXIES = ("proxy-a", "proxy-b")
SUBJECT_PREFIX = "stored on "
# What a proxy logs (proxy/server/subscriber.py) when its stream broke off, and when it serves
# the snapshot file.
OUTAGE_LOGGED = "the table in use stays, retrying"
SNAPSHOT_LOGGED = "push channel: serving the snapshot"
IMAP_SERVICE_PORT = 143  # the Service port MailRoutes name; the slice carries Dovecot's real port


@pytest.fixture(scope="module")
def dovecots() -> Iterator[dict[str, mailservers.Dovecot]]:
    """Two IMAP Dovecots with the same users; each INBOX holds one message naming its server."""
    directory = suite.testbed_directory("mailgress-kube-")
    servers = {
        name: mailservers.Dovecot(directory / name, name=name, users=(ALICE, BOB), protocols=("imap",))
        for name in SERVERS
    }
    try:
        for name, server in servers.items():
            server.start()
            for user in (ALICE, BOB):
                server.deliver(
                    user.address, messages.compose("x@example.net", user.address, SUBJECT_PREFIX + name)
                )
        yield servers
    finally:
        for server in servers.values():
            server.stop()
        suite.remove_testbed_directory(directory)


@dataclasses.dataclass
class Cluster:
    """The emulated cluster, a controller that can be stopped and started again, and the proxies."""

    emulator: Emulator
    api: Api
    runner: ControllerRunner
    deployment: Deployment
    dovecots: dict[str, mailservers.Dovecot]
    controller: Controller | None = None
    proxies: dict[str, proxyprocess.ProxyProcess] = dataclasses.field(default_factory=dict)

    async def start_controller(self) -> Controller:
        self.controller = await self.runner.start()
        return self.controller

    async def stop_controller(self) -> None:
        await self.runner.stop()
        self.controller = None

    async def start_proxy(self, name: str) -> proxyprocess.ProxyProcess:
        """A Ready proxy Pod named ``name`` and the proxy process acking under that name."""
        await self.api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", proxy_pod(name))
        self.proxies[name] = await self.deployment.start_proxy(name)
        return self.proxies[name]

    async def add_backend(self, service: str, server: str, *, ready: bool = True) -> None:
        """A Service and its EndpointSlice pointing at the Dovecot ``server`` on 127.0.0.1."""
        endpoint_slice = slice_body(service, [mailservers.LOOPBACK], ready=ready)
        endpoint_slice["ports"][0]["port"] = self.dovecots[server].imap_port
        await self.api.create(f"/api/v1/namespaces/{NAMESPACE}/services", service_body(service))
        await self.api.create(
            f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices", endpoint_slice
        )

    def imap_port(self, proxy: str) -> int:
        return self.proxies[proxy].settings.ports.imap


@pytest.fixture
async def cluster(
    emulator: Emulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
    dovecots: dict[str, mailservers.Dovecot],
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    """CRD installed, both Dovecots behind Services, the controller, proxy-a and proxy-b running.

    Teardown stops every proxy (and checks that none left a process behind), then the controller,
    then checks that no proxy logged the push token or a password.
    """
    directory = tmp_path / "pods"
    directory.mkdir()
    deployment = Deployment(directory, authority=tlscerts.TestAuthority(tmp_path / "push-ca"))
    # The Secret both ends mount: the conftest's controller serves PUSH_TOKEN.
    deployment.token_file.write_text(PUSH_TOKEN)
    settings = dataclasses.replace(
        controller_settings, listen_port=deployment.port, tls_files=deployment.controller_tls
    )
    runner = ControllerRunner(emulator, settings, controller_accesses)
    made = Cluster(emulator, api, runner, deployment, dovecots)
    try:
        await create_crd(api)
        for server in SERVERS:
            await made.add_backend(server, server)
        await made.start_controller()
        # A proxy becomes ready once it holds a table: the controller's first (empty) one.
        await asyncio.gather(*(made.start_proxy(name) for name in PROXIES))
        yield made
    finally:
        sessions = [proxy.pid if proxy.processes() else None for proxy in deployment.proxies]
        await deployment.stop_proxies()
        await runner.stop()
    for proxy, session in zip(deployment.proxies, sessions, strict=True):
        assert session is None or mailservers.session_processes(session) == [], f"{proxy.log_path}: left over"
        log = proxy.log_text()
        assert f"push channel: following {deployment.url} as" in log, f"{proxy.log_path}: not over TLS"
        assert "is plain HTTP" not in log
        assert PUSH_TOKEN not in log, f"{proxy.log_path} holds the push token"
        assert testbed_backends.PASSWORD_MARKER not in log, f"{proxy.log_path} holds a password"


# ---------------------------------------------------------------------------------------------
# Blocking IMAP clients (run in threads)


def inbox_subject(client: imaplib.IMAP4) -> str:
    """SELECT INBOX, NOOP and FETCH the first message's subject, which names its Dovecot."""
    typ, _ = client.select("INBOX")
    assert typ == "OK"
    typ, _ = client.noop()
    assert typ == "OK"
    typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    header = data[0]
    assert isinstance(header, tuple)
    return str(email.message_from_bytes(header[1])["Subject"]).removeprefix(SUBJECT_PREFIX)


def landed_on(port: int, user: mailservers.User) -> str:
    """Log in through the proxy on ``port``: which Dovecot holds the mailbox."""
    with clients.imap(port) as client:
        client.login(user.address, user.password)
        return inbox_subject(client)


def refusal(port: int, user: mailservers.User) -> str:
    """The proxy's answer to a login it refuses ("" if it accepted the login)."""
    with clients.imap(port) as client:
        try:
            client.login(user.address, user.password)
        except imaplib.IMAP4.error as error:
            return str(error)
        return ""


def open_session(port: int, user: mailservers.User) -> imaplib.IMAP4:
    """A logged-in session through the proxy on ``port``, left open for the caller."""
    client = imaplib.IMAP4(mailservers.LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT)
    try:
        client.login(user.address, user.password)
    except BaseException:
        client.shutdown()
        raise
    return client


@contextlib.asynccontextmanager
async def session_through(port: int, user: mailservers.User) -> AsyncIterator[imaplib.IMAP4]:
    """An open session for the block; LOGOUT at the end (a proxy already gone is no news then)."""
    client = await asyncio.to_thread(open_session, port, user)
    try:
        yield client
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            await asyncio.to_thread(client.logout)


def logged(proxy: proxyprocess.ProxyProcess, text: str) -> bool:
    return text in proxy.log_text()


async def landing(cluster: Cluster, user: mailservers.User, proxies: tuple[str, ...] = PROXIES) -> set[str]:
    """Which Dovecots logins of ``user`` through each of ``proxies`` reached."""
    return {await asyncio.to_thread(landed_on, cluster.imap_port(name), user) for name in proxies}


# ---------------------------------------------------------------------------------------------
# Waiting for the controller


def has(emulator: Emulator, name: str, kind: str, status: str, reason: str, **more: Any) -> bool:
    """The MailRoute ``name`` has condition ``kind`` with these fields."""
    found = condition(emulator, name, kind)
    wanted = {"status": status, "reason": reason, **more}
    return all(found.get(key) == value for key, value in wanted.items())


async def wait_programmed(emulator: Emulator, name: str, proxies: int, generation: int = 1) -> None:
    """Programmed True on ``proxies`` of ``proxies`` ready proxies, for this generation."""
    await eventually(
        lambda: has(
            emulator,
            name,
            "Programmed",
            "True",
            "Programmed",
            message=f"{proxies} of {proxies} proxies",
            observedGeneration=generation,
        ),
        f"{name} generation {generation} Programmed on {proxies} proxies",
    )


async def wait_applied(cluster: Cluster, routes: list[str]) -> table.RoutingTable:
    """The snapshot holds exactly ``routes`` and every proxy has acked that very table."""
    assert cluster.controller is not None
    channel = cluster.controller.channel

    def applied() -> table.RoutingTable | None:
        snapshot = snapshot_of(cluster.emulator)
        current = table.from_json(snapshot) if snapshot else None
        if current is None or [route.name for route in current.routes] != routes:
            return None
        acks = channel.acks()
        running = [(ack.version, ack.accepted) for name, ack in acks.items() if name in cluster.proxies]
        return current if running == [(current.version, True)] * len(cluster.proxies) else None

    found: table.RoutingTable = await eventually(applied, f"every proxy runs the table of {routes}")
    return found


# ---------------------------------------------------------------------------------------------
# The tests


async def test_route_moves_and_goes_while_open_sessions_stay(cluster: Cluster) -> None:
    """Programmed 2 of 2 and logins through either proxy; a backend change keeps the open
    session where it is and sends the next login to the new Dovecot; deletion refuses logins."""
    emulator, api = cluster.emulator, cluster.api
    await create_route(api, imap_route("mail", DOMAIN, service="dovecot-one", port=IMAP_SERVICE_PORT))
    await wait_programmed(emulator, "mail", proxies=2)
    assert has(emulator, "mail", "Accepted", "True", "Accepted")
    assert has(emulator, "mail", "ResolvedRefs", "True", "ResolvedRefs")
    assert await landing(cluster, ALICE) == {"dovecot-one"}

    async with session_through(cluster.imap_port("proxy-a"), ALICE) as open_client:
        assert await asyncio.to_thread(inbox_subject, open_client) == "dovecot-one"
        await api.patch(route_path("mail"), {"spec": {"imap": {"backend": {"service": "dovecot-two"}}}})
        await wait_programmed(emulator, "mail", proxies=2, generation=2)
        # The session opened before the change still talks to the first Dovecot...
        assert await asyncio.to_thread(inbox_subject, open_client) == "dovecot-one"
        # ...while new logins, through either proxy, reach the second.
        assert await landing(cluster, ALICE) == {"dovecot-two"}

        await api.delete(route_path("mail"))
        await wait_applied(cluster, routes=[])
        for name in PROXIES:
            answer = await asyncio.to_thread(refusal, cluster.imap_port(name), ALICE)
            assert "[AUTHENTICATIONFAILED]" in answer, f"{name} answered {answer!r}"
        # Withdrawing the route does not cut a session it carried.
        assert await asyncio.to_thread(inbox_subject, open_client) == "dovecot-one"


async def test_conflict_and_backend_without_ready_endpoints(cluster: Cluster) -> None:
    """A second route for the same domain is Conflicted and changes nothing for its users; a
    route whose Service has no ready endpoint is ResolvedRefs False, its logins a temporary
    failure."""
    emulator, api = cluster.emulator, cluster.api
    await create_route(api, imap_route("first", DOMAIN, service="dovecot-one", port=IMAP_SERVICE_PORT))
    await wait_programmed(emulator, "first", proxies=2)
    await create_route(api, imap_route("second", DOMAIN, service="dovecot-two", port=IMAP_SERVICE_PORT))
    await eventually(lambda: has(emulator, "second", "Accepted", "False", "Conflicted"), "second Conflicted")
    assert f"{NAMESPACE}/first" in condition(emulator, "second", "Accepted")["message"]
    assert has(emulator, "first", "Accepted", "True", "Accepted")
    assert await landing(cluster, ALICE) == {"dovecot-one"}

    await cluster.add_backend("dovecot-down", "dovecot-two", ready=False)
    await create_route(api, imap_route("other", OTHER_DOMAIN, service="dovecot-down", port=IMAP_SERVICE_PORT))
    await eventually(
        lambda: has(emulator, "other", "ResolvedRefs", "False", "NoReadyEndpoints"), "NoReadyEndpoints"
    )
    # In the table without endpoints: its users hear "try later", not "no such user".
    await wait_programmed(emulator, "other", proxies=2)
    for name in PROXIES:
        answer = await asyncio.to_thread(refusal, cluster.imap_port(name), BOB)
        assert "[UNAVAILABLE]" in answer, f"{name} answered {answer!r}"


async def test_proxies_outlive_the_controller_and_a_new_one_boots_from_the_snapshot(
    cluster: Cluster,
) -> None:
    """With the controller stopped both proxies keep serving, and a third one started meanwhile
    serves the snapshot Secret; when the controller is back, all three are programmed."""
    emulator, api = cluster.emulator, cluster.api
    await create_route(api, imap_route("mail", DOMAIN, service="dovecot-one", port=IMAP_SERVICE_PORT))
    await wait_programmed(emulator, "mail", proxies=2)
    published = await wait_applied(cluster, routes=[f"{NAMESPACE}/mail"])
    snapshot = snapshot_of(emulator)
    assert snapshot is not None

    await cluster.stop_controller()
    for name in PROXIES:
        await eventually(functools.partial(logged, cluster.proxies[name], OUTAGE_LOGGED), f"{name}'s outage")
    assert await landing(cluster, ALICE) == {"dovecot-one"}

    # As kubelet would mount the Secret's key (decoded) into the new pod.
    cluster.deployment.snapshot_file.write_text(snapshot)
    third = await cluster.start_proxy("proxy-c")
    assert f'version="{published.version}"' in third.metrics()
    assert logged(third, SNAPSHOT_LOGGED)
    assert await landing(cluster, ALICE, ("proxy-c",)) == {"dovecot-one"}
    assert await landing(cluster, ALICE) == {"dovecot-one"}

    # Back on the same address: every proxy reconnects (with backoff) and acks.
    await cluster.start_controller()
    await wait_programmed(emulator, "mail", proxies=3)
    assert await wait_applied(cluster, routes=[f"{NAMESPACE}/mail"]) == published
