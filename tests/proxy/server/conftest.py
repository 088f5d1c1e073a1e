"""Fixtures for the driver tests: scripted IMAP backends and an in-process proxy on loopback."""

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml
from prometheus_client import CollectorRegistry

from mailgress import standalone
from proxy import metrics as proxy_metrics
from proxy.protocols import proxyheader
from proxy.server import certificates
from proxy.server.context import ProxyContext
from proxy.server.listeners import Listeners
from proxy.server.routes import TableHolder
from proxy.settings import (
    BackendTlsSettings,
    FailedLoginSettings,
    LimitSettings,
    ListenerSettings,
    ProxySettings,
    Timeouts,
)
from proxy.table import Endpoint

PASSWORD = "s3cret-Password-never-logged"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async driver test runs on both loops: uvloop in production, asyncio as the reference
    (uvloop's transports, for one, are not asyncio.Transport subclasses)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


WAIT = 10.0  # generous bound for any single step on a loaded machine
# The proxies here answer a refused login at once: held to the default refusalTime (2 s), every
# test that refuses a password would wait that long, and none of them is about the hold. The
# tests of the hold give the proxy limits of their own (test_session_refusal_time.py holds the
# default, test_limits.py and test_session_deadline.py shorter times).
TEST_LIMITS = LimitSettings(failed_logins=FailedLoginSettings(refusal_time=0.0))


@dataclass
class FakeImapBackend:
    """Greets, accepts one LOGIN (LITERAL+), then echoes whatever it gets after that.

    With ``starttls`` it offers STARTTLS and wants it before LOGIN; ``tls`` makes it implicit TLS.
    """

    password: str = PASSWORD
    tls: ssl.SSLContext | None = None
    starttls: bool = False
    received: list[bytes] = field(default_factory=list)
    logins: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        capabilities = b"IMAP4rev1 LITERAL+ STARTTLS" if self.starttls else b"IMAP4rev1 LITERAL+"
        writer.write(b"* OK [CAPABILITY " + capabilities + b"] fake ready\r\n")
        buffer = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            if self.starttls:
                line = await reader.readline()
                tag = line.split(b" ")[0]
                if b"STARTTLS" not in line.upper():
                    writer.write(tag + b" BAD STARTTLS first\r\n")
                    return
                writer.write(tag + b" OK Begin TLS negotiation now\r\n")
                await writer.drain()
                assert self.tls is not None
                await writer.start_tls(self.tls)
                # RFC 3501 6.2.1: a client forgets capabilities learned before TLS and asks again.
                line = await reader.readline()
                tag = line.split(b" ")[0]
                if b"CAPABILITY" in line.upper():
                    writer.write(b"* CAPABILITY IMAP4rev1 LITERAL+\r\n" + tag + b" OK done\r\n")
                else:
                    buffer = line
            while b"LOGIN" not in buffer or not buffer.endswith(b"\r\n") or buffer.count(b"\r\n") < 3:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buffer += chunk
            self.received.append(buffer)
            header = proxyheader.parse(buffer) if buffer.startswith(proxyheader.V2_SIGNATURE) else None
            tag = _login_tag(buffer[header.length :] if header else buffer)
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
    raise AssertionError("no LOGIN in what the backend received")


@contextlib.asynccontextmanager
async def fake_backend(**options: Any) -> AsyncIterator[FakeImapBackend]:
    backend = FakeImapBackend(**options)
    implicit = backend.tls if not backend.starttls else None
    backend.server = await asyncio.start_server(backend.handle, "127.0.0.1", 0, ssl=implicit)
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
    listeners: Listeners

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    """Start a proxy with one IMAP listener and one MailRoute for alpha.example.

    ``spec`` is merged into the MailRoute's spec; ``listener`` overrides listener settings;
    ``backend_tls`` sets how backends are verified; the rest are timeouts. Its limits are
    TEST_LIMITS: no refusal is held back.
    """
    started: list[Listeners] = []

    async def start(
        spec: dict[str, object],
        endpoints: list[Endpoint],
        *,
        listener: dict[str, Any] | None = None,
        backend_tls: BackendTlsSettings | None = None,
        **timeouts: float,
    ) -> RunningProxy:
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
        compiled, problems = standalone.compile_bodies([yaml.safe_load(yaml.safe_dump(route))], services)
        assert not [p for p in problems if p.message.startswith("Accepted=")], problems
        listener_settings = dataclasses.replace(
            ListenerSettings("imap", "imap", "127.0.0.1", 0), **(listener or {})
        )
        settings = ProxySettings(
            listeners=(listener_settings,),
            admin=None,
            server_name="proxy.test",
            timeouts=Timeouts(**timeouts),
            max_errors=3,
            route_files=(Path("unused"),),
            services=services,
            backend_tls=backend_tls or BackendTlsSettings(),
            limits=TEST_LIMITS,
        )
        registry = CollectorRegistry()
        metrics = proxy_metrics.create(registry)
        context = ProxyContext(
            settings=settings,
            tables=TableHolder(metrics),
            metrics=metrics,
            backend_tls=certificates.backend_context(settings.backend_tls),
        )
        context.tables.swap(compiled.table)
        listeners = Listeners(context)
        listeners.bind_all()
        listeners.start()
        started.append(listeners)
        return RunningProxy(listeners.addresses["imap"][1], context, registry, listeners)

    yield start
    for listeners in started:
        listeners.close()
        await listeners.stop_sessions()


async def imap_client(
    port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=server_hostname), WAIT
    )
    greeting = await asyncio.wait_for(reader.readline(), WAIT)
    assert greeting.startswith(b"* OK"), greeting
    return reader, writer


async def session_lines(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[str]:
    """The sessions' closing log lines, once at least ``count`` are in (each is written when its
    session ends, after the client saw the end; bounded by WAIT)."""
    lines: list[str] = []
    for _ in range(int(WAIT / 0.05)):
        lines = [
            record.getMessage() for record in caplog.records if record.getMessage().startswith("session ")
        ]
        if len(lines) >= count:
            break
        await asyncio.sleep(0.05)
    return lines


async def login(
    port: int, user: str, password: str = PASSWORD, pipelined: bytes = b"", **client: Any
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await imap_client(port, **client)
    writer.write(f'a1 LOGIN {user} "{password}"\r\n'.encode() + pipelined)
    reply = await asyncio.wait_for(reader.readline(), WAIT)
    return reply, reader, writer
