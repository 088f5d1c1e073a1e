"""Tests for proxy/server/authhttp.py and the auth_http branch of the backend login.

``authorize`` against the testbed's auth service on loopback (and small asyncio servers where a
reply must be dribbled or come over TLS): grants, refusals, Auth-Wait and WAIT within their
budget (waits are recorded, never timed), and every way a service can fail. Then whole IMAP
sessions through the in-process proxy with scripted backends: the grant's server and credential
overrides, the route's own endpoints, refusals that let the client retry with the next
Auth-Login-Attempt, Auth-SSL on TLS, and no password in any log line.
"""

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from proxy import table
from proxy.protocols import authhttp as protocol
from proxy.protocols.events import LoginRequest
from proxy.protocols.sasl import Credentials
from proxy.server import authhttp
from proxy.settings import CertificateFiles
from proxy.table import Endpoint, HttpAuth
from testbed import authservice
from testbed.tlscerts import TestAuthority
from tests.proxy.server.conftest import (
    PASSWORD,
    WAIT,
    ProxyFactory,
    RunningProxy,
    dead_port,
    fake_backend,
    login,
)

CLIENT_PASSWORD = "client-typed-Secret-42"
REQUEST = LoginRequest(
    "imap", "alice@alpha.example", Credentials("alice@alpha.example", PASSWORD.encode()), tag=b"a1"
)
ATTEMPT = protocol.Attempt(REQUEST, 1, "127.0.0.1")
NO_TLS = ssl.create_default_context()


class Sleeps:
    """Records the waits ``authorize`` asks for instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def service() -> Iterator[authservice.AuthService]:
    with authservice.AuthService() as running:
        yield running


def target(url: str) -> protocol.Service:
    return protocol.service(HttpAuth(url))


async def ask(
    service: authservice.AuthService,
    answer: authservice.Answer,
    *,
    sleeps: Sleeps | None = None,
    timeout: float = WAIT,
    max_wait: float = 60.0,
) -> authhttp.Outcome:
    service.answer = answer
    return await authhttp.authorize(
        target(service.url),
        ATTEMPT,
        timeout=timeout,
        tls=NO_TLS,
        max_wait=max_wait,
        sleep=sleeps or Sleeps(),
    )


# ---------------------------------------------------------------------------------------------
# authorize


async def test_a_grant_comes_back_and_the_service_got_nginxs_request(
    service: authservice.AuthService,
) -> None:
    outcome = await ask(service, lambda received: authservice.ok("127.0.0.1", 143, password="backend"))
    assert outcome == protocol.Granted(Endpoint("127.0.0.1", 143), None, b"backend")
    (received,) = service.requests
    assert received.head == protocol.build_request(target(service.url), ATTEMPT).data


async def test_a_refusal_waits_its_auth_wait_first(service: authservice.AuthService) -> None:
    sleeps = Sleeps()
    outcome = await ask(service, lambda received: authservice.refuse("Go away", wait=3), sleeps=sleeps)
    assert outcome == protocol.Refused(b"a1 NO Go away\r\n", wait=3)
    assert sleeps.calls == [3]
    sleeps = Sleeps()
    await ask(service, lambda received: authservice.refuse("Go away", wait=3600), sleeps=sleeps, max_wait=5)
    assert sleeps.calls == [5]  # never past the budget
    sleeps = Sleeps()
    await ask(service, lambda received: authservice.refuse("Go away"), sleeps=sleeps)
    assert sleeps.calls == []


async def test_wait_repeats_the_same_request_after_auth_wait(service: authservice.AuthService) -> None:
    sleeps = Sleeps()
    outcome = await ask(
        service,
        lambda received: authservice.wait(2) if len(service.requests) < 3 else authservice.ok(),
        sleeps=sleeps,
        max_wait=5,
    )
    assert outcome == protocol.Granted()
    assert sleeps.calls == [2, 2]
    first, second, third = service.requests
    assert first.head == second.head == third.head  # Auth-Login-Attempt included, as in nginx


async def test_wait_past_the_budget_or_for_ever_is_unavailable(service: authservice.AuthService) -> None:
    sleeps = Sleeps()
    outcome = await ask(service, lambda received: authservice.wait(2), sleeps=sleeps, max_wait=3)
    assert outcome == authhttp.Unavailable("the service asks to wait past the 3 s a login may wait")
    assert sleeps.calls == [2]
    service.clear()
    outcome = await ask(service, lambda received: authservice.wait(0))
    assert outcome == authhttp.Unavailable("the service kept answering Auth-Status: WAIT")
    assert len(service.requests) == authhttp.MAX_WAIT_ROUNDS + 1


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (authservice.Reply(close=True), "the service closed the connection before the end of its header"),
        (authservice.Reply(raw=b"HTTP/1.0 200 OK\r\nAuth_Status: OK\r\n\r\n"), "invalid header in response"),
        (
            authservice.Reply(headers=(("Auth-Status", "OK"), ("X-Pad", "p" * 2000))),
            f"response header longer than {protocol.MAX_RESPONSE_HEAD} bytes",
        ),
        (
            authservice.Reply(headers=(("Auth-Server", "127.0.0.1"), ("Auth-Port", "143"))),
            "no Auth-Status in response",
        ),
        (authservice.Reply(delay=30, headers=(("Auth-Status", "OK"),)), "no reply within 0.3 s"),
    ],
    ids=["closed", "bad-header", "too-long", "no-status", "slow"],
)
async def test_a_service_that_misbehaves_is_unavailable(
    service: authservice.AuthService, reply: authservice.Reply, reason: str
) -> None:
    assert await ask(service, lambda received: reply, timeout=0.3) == authhttp.Unavailable(reason)


async def test_a_service_that_is_down_is_unavailable(service: authservice.AuthService) -> None:
    with service.down():
        outcome = await ask(service, lambda received: authservice.ok())
    assert isinstance(outcome, authhttp.Unavailable)
    assert outcome.reason.startswith("unreachable (")
    invalid_name = target("http://" + "a" * 64 + ".example/")
    outcome = await authhttp.authorize(invalid_name, ATTEMPT, timeout=WAIT, tls=NO_TLS, max_wait=1)
    assert outcome == authhttp.Unavailable("unreachable (invalid host name)")


async def serve(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    return server, int(server.sockets[0].getsockname()[1])


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 204 No Content\r\nAuth-Status: OK\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_a_reply_dribbled_byte_by_byte_is_read() -> None:
    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for byte in b"Auth-Status: OK\nAuth-Server: ::1\nAuth-Port: 143\n\n":
            writer.write(bytes((byte,)))
            await writer.drain()
        writer.close()

    server, port = await serve(dribble)
    async with server:
        outcome = await authhttp.authorize(
            target(f"http://127.0.0.1:{port}/"), ATTEMPT, timeout=WAIT, tls=NO_TLS, max_wait=1
        )
    assert outcome == protocol.Granted(Endpoint("::1", 143))


async def test_https_services_are_verified(tmp_path: Path) -> None:
    authority = TestAuthority(tmp_path / "ca")
    issued = authority.issue("auth", ["localhost"])
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(issued.cert, issued.key)
    server, port = await serve(answer_ok, server_tls)
    async with server:
        trusted = ssl.create_default_context(cafile=str(authority.cert))
        url = f"https://localhost:{port}/auth"
        outcome = await authhttp.authorize(target(url), ATTEMPT, timeout=WAIT, tls=trusted, max_wait=1)
        assert outcome == protocol.Granted()
        outcome = await authhttp.authorize(target(url), ATTEMPT, timeout=WAIT, tls=NO_TLS, max_wait=1)
        assert isinstance(outcome, authhttp.Unavailable)
        assert outcome.reason.startswith("unreachable (")


def test_tls_facts_of_no_tls_are_none() -> None:
    assert authhttp.tls_facts(None) is None


# ---------------------------------------------------------------------------------------------
# Through the proxy (IMAP): backends.login's auth_http branch


def http_auth(service: authservice.AuthService, **extra: object) -> dict[str, object]:
    return {"auth": {"mode": "http", "http": {"url": service.url, "timeout": "5s", **extra}}}


async def test_the_grant_picks_the_backend_and_the_credentials(
    start_proxy: ProxyFactory, service: authservice.AuthService
) -> None:
    async with fake_backend(password=PASSWORD) as backend:
        service.answer = authservice.by_user(
            {
                "alias@alpha.example": authservice.ok(
                    "127.0.0.1", backend.port, user="anna@alpha.example", password=PASSWORD
                )
            },
            default=authservice.refuse(),
        )
        # The route's own endpoint is dead: only the auth service's choice can work.
        proxy = await start_proxy(http_auth(service), [Endpoint("127.0.0.1", dead_port())])
        reply, _, writer = await login(proxy.port, "alias@alpha.example", password=CLIENT_PASSWORD)
        writer.close()
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    (received,) = backend.received
    assert b"anna@alpha.example" in received
    assert b"alias@alpha.example" not in received
    assert CLIENT_PASSWORD.encode() not in received
    (asked,) = service.requests
    assert (asked.user, asked.password, asked.attempt) == ("alias@alpha.example", CLIENT_PASSWORD, 1)
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="accepted") == 1


async def test_a_grant_without_a_server_uses_the_route_endpoints_and_the_client_password(
    start_proxy: ProxyFactory, service: authservice.AuthService
) -> None:
    service.answer = lambda received: authservice.ok()
    async with fake_backend() as backend:
        proxy = await start_proxy(
            http_auth(service), [Endpoint("127.0.0.1", dead_port()), Endpoint("127.0.0.1", backend.port)]
        )
        reply, _, writer = await login(proxy.port, "alice@alpha.example")
        writer.close()
    assert reply == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert backend.logins == 1


async def test_a_refusal_is_the_clients_answer_and_the_next_attempt_counts_up(
    start_proxy: ProxyFactory, service: authservice.AuthService
) -> None:
    async with fake_backend() as backend:
        service.answer = lambda received: (
            authservice.refuse("Sorry, try again")
            if received.attempt == 1
            else authservice.ok("127.0.0.1", backend.port)
        )
        proxy = await start_proxy(http_auth(service), [Endpoint("127.0.0.1", dead_port())])
        reply, reader, writer = await login(proxy.port, "alice@alpha.example")
        assert reply == b"a1 NO Sorry, try again\r\n"
        assert backend.received == []  # a refusal is final: no backend is asked
        writer.write(f'a2 LOGIN alice@alpha.example "{PASSWORD}"\r\n'.encode())
        assert (
            await asyncio.wait_for(reader.readline(), WAIT)
            == b"a2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        )
        writer.close()
    assert [request.attempt for request in service.requests] == [1, 2]
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="rejected") == 1


async def test_a_failed_service_is_the_temporary_failure_and_logged_without_secrets(
    start_proxy: ProxyFactory, service: authservice.AuthService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service.answer = lambda received: authservice.Reply(
        raw=b"Auth-Status: OK\r\nAuth-Pass: " + PASSWORD.encode() + b"\r\nAuth-Server: mail.example\r\n"
        b"Auth-Port: 143\r\n\r\n"
    )
    async with fake_backend() as backend:
        proxy = await start_proxy(
            http_auth(service, headers={"X-Auth-Key": "shared-Key-s3cr3t"}),
            [Endpoint("127.0.0.1", backend.port)],
        )
        reply, reader, writer = await login(proxy.port, "alice@alpha.example")
        assert reply.startswith(b"a1 NO [UNAVAILABLE]")
        with service.down():
            writer.write(b"a2 LOGIN alice@alpha.example " + CLIENT_PASSWORD.encode() + b"\r\n")
            assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a2 NO [UNAVAILABLE]")
        writer.close()
        assert backend.received == []
    assert service.requests[0].header("X-Auth-Key") == "shared-Key-s3cr3t"
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="unavailable") == 2
    garbage, down = [r.getMessage() for r in caplog.records if r.name == "proxy.server.backends"]
    assert garbage == "auth_http service of mail/alpha failed: Auth-Server is not an IP address"
    assert down.startswith("auth_http service of mail/alpha failed: unreachable (")
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (PASSWORD, CLIENT_PASSWORD, "shared-Key-s3cr3t"):
        assert secret not in text


async def test_a_route_without_auth_http_settings_is_unavailable(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [Endpoint("127.0.0.1", dead_port())])
    (route,) = proxy.context.tables.current.routes
    proxy.context.tables.swap(table.make_table([dataclasses.replace(route, auth="http")]))
    reply, _, writer = await login(proxy.port, "alice@alpha.example")
    writer.close()
    assert reply.startswith(b"a1 NO [UNAVAILABLE]")


async def tls_session(proxy: RunningProxy, authority: TestAuthority) -> ssl.SSLObject:
    reply, _, writer = await login(
        proxy.port,
        "alice@alpha.example",
        tls=ssl.create_default_context(cafile=str(authority.cert)),
        server_hostname="mail.alpha.example",
    )
    assert reply.startswith(b"a1 OK")
    ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
    writer.close()
    return ssl_object


async def test_auth_ssl_headers_describe_the_clients_tls(
    start_proxy: ProxyFactory, service: authservice.AuthService, tmp_path: Path
) -> None:
    authority = TestAuthority(tmp_path / "ca")
    issued = authority.issue("imap", ["mail.alpha.example"])
    async with fake_backend() as backend:
        service.answer = lambda received: authservice.ok("127.0.0.1", backend.port)
        plain = await start_proxy(http_auth(service), [])
        _, _, writer = await login(plain.port, "alice@alpha.example")
        writer.close()
        secure = await start_proxy(
            http_auth(service),
            [],
            listener={"tls": "implicit", "certificates": (CertificateFiles(issued.cert, issued.key),)},
        )
        client_side = await tls_session(secure, authority)
    plaintext, encrypted = service.requests
    assert [name for name, _ in plaintext.headers if name.startswith("Auth-SSL")] == []
    assert encrypted.headers[-3:] == (
        ("Auth-SSL", "on"),
        ("Auth-SSL-Protocol", client_side.version()),
        ("Auth-SSL-Cipher", client_side.cipher()[0]),
    )
