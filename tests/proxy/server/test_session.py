"""The session driver end to end on loopback, with scripted IMAP backends standing in for Dovecot.

What the real-server tests in tests/e2e cannot steer precisely lives here: which endpoint a login
reaches, fail-over order, the PROXY header a backend receives, the pre-login deadline, refusals
that never touch a backend, and what the session log line says (and never says).
"""

import asyncio
import logging

import pytest

from proxy.protocols import proxyheader
from proxy.server import backends, session
from proxy.table import Endpoint
from tests.proxy.server.conftest import (
    PASSWORD,
    WAIT,
    ProxyFactory,
    dead_port,
    fake_backend,
    imap_client,
    login,
    session_lines,
)


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


async def test_relayed_bytes_count_while_the_session_runs_and_when_the_stop_cuts_it(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An IMAP session may stay open for hours: its bytes reach the metric at each scrape, not in
    one step when it ends, and a session the stop cuts counts, and logs, what it relayed."""
    caplog.set_level(logging.INFO)
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        _, reader, writer = await login(proxy.port, "alice@alpha.example")
        writer.write(b"a2 NOOP\r\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 NOOP\r\n"
        relayed = {
            direction: proxy.metric("mailgress_proxy_relay_bytes_total", protocol="imap", direction=direction)
            for direction in ("upstream", "downstream")
        }
        assert relayed == {"upstream": 9, "downstream": 14}
        await proxy.listeners.stop_sessions()
        writer.close()
    assert proxy.metric("mailgress_proxy_relay_bytes_total", protocol="imap", direction="downstream") == 14
    [line] = await session_lines(caplog)
    assert "outcome=closed: the proxy is stopping bytes_up=9 bytes_down=14" in line


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
        lines = await session_lines(caplog, 2)
    assert len(lines) == 2
    assert all("user=alice@alpha.example" in line and "route=mail/alpha" in line for line in lines)
    assert PASSWORD not in caplog.text


async def test_a_user_name_cannot_pass_for_more_fields_of_the_session_line(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        reader, writer = await imap_client(proxy.port)
        writer.write(f'a1 LOGIN "x route=mail/alpha outcome=ok" "{PASSWORD}"\r\n'.encode())
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 NO")
        writer.close()
        [line] = await session_lines(caplog)
    assert 'user="x route=mail/alpha outcome=ok" route=- ' in line


async def test_a_user_name_with_a_line_separator_is_refused_and_never_logged_as_one(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Review J7: a LOGIN name holding U+2028 forged a whole session line for a log reader."""
    caplog.set_level(logging.INFO)
    forged = "x\u2028session protocol=imap user=ceo@alpha.example outcome=forged"
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        reader, writer = await imap_client(proxy.port)
        name = forged.encode()
        writer.write(b"a1 LOGIN {%d+}\r\n%s " % (len(name), name) + f'"{PASSWORD}"\r\n'.encode())
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 NO")
        writer.close()
        await session_lines(caplog)
    assert "\u2028" not in caplog.text and len(caplog.text.splitlines()) == len(caplog.records)


def test_a_field_that_is_not_printable_is_escaped() -> None:
    assert session._as_field("a\u2028b") == '"a\\u2028b"'
    assert session._as_field("\u00e9l\u00e8ve@example.org") == "\u00e9l\u00e8ve@example.org"
    assert session._as_field("\u00e9 l") == '"\u00e9 l"'


async def test_a_bug_ends_only_its_own_session_and_is_logged(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)])
        real_login = backends.login
        calls = 0

        async def broken_once(*args: object, **kwargs: object) -> backends.LoginOutcome:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("simulated bug")
            return await real_login(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(backends, "login", broken_once)
        reader, writer = await imap_client(proxy.port)
        writer.write(f'a1 LOGIN alice@alpha.example "{PASSWORD}"\r\n'.encode())
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, no traceback sent
        writer.close()
        reply, _, writer = await login(proxy.port, "alice@alpha.example")
        assert reply.startswith(b"a1 OK")  # the proxy goes on serving
        writer.close()
    assert "failed unexpectedly" in caplog.text and "simulated bug" in caplog.text
    assert PASSWORD not in caplog.text
