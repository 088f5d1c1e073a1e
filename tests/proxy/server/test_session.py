"""The session driver end to end on loopback, with scripted IMAP backends standing in for Dovecot.

What the real-server tests in tests/e2e cannot steer precisely lives here: which endpoint a login
reaches, fail-over order, the PROXY header a backend receives, the pre-login deadline, refusals
that never touch a backend, and what the session log line says (and never says).
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailgress import standalone
from proxy import metrics as proxy_metrics
from proxy.protocols import proxyheader
from proxy.server import certificates
from proxy.server.context import ProxyContext
from proxy.server.listeners import Listeners
from proxy.server.routes import TableHolder
from proxy.settings import BackendTlsSettings, ListenerSettings, ProxySettings, Timeouts
from proxy.table import Endpoint

PASSWORD = "s3cret-Password-never-logged"
WAIT = 10.0  # generous bound for any single step on a loaded machine


@dataclass
class FakeImapBackend:
    """Greets, accepts one LOGIN (LITERAL+), then echoes whatever it gets after that."""

    password: str = PASSWORD
    received: list[bytes] = field(default_factory=list)
    logins: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake ready\r\n")
        buffer = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while b"LOGIN" not in buffer or not buffer.endswith(b"\r\n") or buffer.count(b"\r\n") < 3:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buffer += chunk
            self.received.append(buffer)
            tag = _login_tag(buffer)
            if self.password.encode() in buffer:
                self.logins += 1
                writer.write(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
                while chunk := await reader.read(4096):
                    writer.write(b"echo:" + chunk)
            else:
                writer.write(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        writer.close()


def _login_tag(buffer: bytes) -> bytes:
    for line in buffer.split(b"\r\n"):
        parts = line.split(b" ")
        if len(parts) > 1 and parts[1].upper() == b"LOGIN":
            return parts[0]
    raise AssertionError(f"no LOGIN in {buffer!r}")


@contextlib.asynccontextmanager
async def fake_backend(**options: str) -> AsyncIterator[FakeImapBackend]:
    backend = FakeImapBackend(**options)
    backend.server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    try:
        yield backend
    finally:
        backend.server.close()


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


@dataclass
class RunningProxy:
    port: int
    context: ProxyContext
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    started: list[Listeners] = []

    async def start(spec: dict[str, object], endpoints: list[Endpoint], **timeouts: float) -> RunningProxy:
        route = {
            "apiVersion": "mailgress.io/v1alpha1",
            "kind": "MailRoute",
            "metadata": {"name": "alpha", "namespace": "mail"},
            "spec": {
                "domains": ["alpha.example"],
                "imap": {"backend": {"service": "dovecot", "port": 143}},
                **spec,
            },
        }
        services = {("mail", "dovecot", "143"): tuple(endpoints)}
        compiled, _ = standalone.compile_bodies([yaml.safe_load(yaml.safe_dump(route))], services)
        settings = ProxySettings(
            listeners=(ListenerSettings("imap", "imap", "127.0.0.1", 0),),
            admin=None,
            server_name="proxy.test",
            timeouts=Timeouts(**timeouts),
            max_errors=3,
            route_files=(Path("unused"),),
            services=services,
        )
        registry = CollectorRegistry()
        metrics = proxy_metrics.create(registry)
        context = ProxyContext(
            settings=settings,
            tables=TableHolder(metrics),
            metrics=metrics,
            backend_tls=certificates.backend_context(BackendTlsSettings()),
        )
        context.tables.swap(compiled.table)
        listeners = Listeners(context)
        listeners.bind_all()
        listeners.start()
        started.append(listeners)
        port = listeners.addresses["imap"][1]
        return RunningProxy(port, context, registry)

    yield start
    for listeners in started:
        listeners.close()
        await listeners.stop_sessions()


async def imap_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await asyncio.wait_for(reader.readline(), WAIT)
    assert greeting.startswith(b"* OK")
    return reader, writer


async def login(
    port: int, user: str, password: str = PASSWORD, pipelined: bytes = b""
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await imap_client(port)
    writer.write(f'a1 LOGIN {user} "{password}"\r\n'.encode() + pipelined)
    reply = await asyncio.wait_for(reader.readline(), WAIT)
    return reply, reader, writer


async def test_login_reaches_backend_and_pipelined_bytes_follow(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        reply, reader, writer = await login(
            proxy.port, "alice@alpha.example", pipelined=b"a2 SELECT INBOX\r\n"
        )
        assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 SELECT INBOX\r\n"
        writer.write(b"a3 NOOP\r\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a3 NOOP\r\n"
        writer.close()
        assert backend.logins == 1
        assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="accepted") == 1


async def test_wrong_password_gets_the_backends_refusal(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        reply, _, writer = await login(proxy.port, "alice@alpha.example", password="wrong")
        assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        writer.close()


async def test_unknown_domain_is_refused_without_asking_a_backend(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        reply, _, writer = await login(proxy.port, "mallory@other.example")
        assert reply.startswith(b"a1 NO [AUTHENTICATIONFAILED]")
        writer.close()
        assert backend.received == []
        assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="no_route") == 1


async def test_dead_endpoint_falls_over_then_both_dead_is_unavailable(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        dead = Endpoint("127.0.0.1", dead_port())
        proxy = await start_proxy({"balance": "round-robin"}, [dead, Endpoint("127.0.0.1", backend.port)])
        for _ in range(2):  # round-robin starts once on each endpoint; both sessions must succeed
            reply, _, writer = await login(proxy.port, "alice@alpha.example")
            assert reply.startswith(b"a1 OK"), reply
            writer.close()
        assert backend.logins == 2
        assert proxy.metric("mailgress_proxy_backend_connect_failures_total", protocol="imap") >= 1
    proxy = await start_proxy({}, [dead, Endpoint("127.0.0.1", dead_port())])
    reply, reader, writer = await login(proxy.port, "alice@alpha.example")
    assert reply.startswith(b"a1 NO [UNAVAILABLE]")
    writer.write(b"a2 LOGOUT\r\n")  # the session stays usable after a temporary failure
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* BYE")
    writer.close()


async def test_user_hash_keeps_a_user_on_one_endpoint(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as first, fake_backend() as second:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", first.port), Endpoint("127.0.0.1", second.port)])
        for _ in range(4):
            reply, _, writer = await login(proxy.port, "alice@alpha.example")
            assert reply.startswith(b"a1 OK")
            writer.close()
        assert sorted((first.logins, second.logins)) == [0, 4]


async def test_proxy_v2_header_carries_the_client_address(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        spec = {"imap": {"backend": {"service": "dovecot", "port": 143}, "clientInfo": "proxy-v2"}}
        proxy = await start_proxy(spec, [Endpoint("127.0.0.1", backend.port)])
        reply, _, writer = await login(proxy.port, "alice@alpha.example")
        client_port = writer.get_extra_info("sockname")[1]
        writer.close()
    assert backend.received, reply
    header = proxyheader.parse(backend.received[0])
    assert header is not None
    assert header.source == ("127.0.0.1", client_port)
    assert header.destination == ("127.0.0.1", proxy.port)


async def test_pre_login_deadline_closes_slow_clients(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [Endpoint("127.0.0.1", dead_port())], pre_login=0.3)
    reader, writer = await imap_client(proxy.port)
    writer.write(b"a1 NOOP\r\n")
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
    # Then silence: the deadline counts from the connection, not from the last command.
    rest = await asyncio.wait_for(reader.read(), WAIT)
    assert rest.startswith(b"* BYE")
    writer.close()
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1


async def test_session_log_line_names_the_user_never_the_password(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        for password in (PASSWORD, "wrong-" + PASSWORD):
            _, _, writer = await login(proxy.port, "alice@alpha.example", password=password)
            writer.close()
        for _ in range(int(WAIT / 0.05)):
            if sum("session protocol=imap" in r.getMessage() for r in caplog.records) >= 2:
                break
            await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "session protocol=imap" in r.getMessage()]
    assert len(lines) == 2
    assert all("user=alice@alpha.example" in line and "route=mail/alpha" in line for line in lines)
    assert PASSWORD not in caplog.text
