"""TLS and client addresses at the edge: implicit TLS, STARTTLS, SNI, renewal, PROXY headers,
and TLS towards backends with certificate verification."""

import asyncio
import ipaddress
import logging
import ssl
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from proxy import settings
from proxy.protocols import proxyheader
from proxy.server import certificates, session
from proxy.server.channel import SocketChannel, TransportChannel, as_transport
from proxy.settings import BackendTlsSettings, CertificateFiles
from proxy.table import Endpoint
from testbed.tlscerts import IssuedCertificate, TestAuthority
from testbed.volumes import KubeletVolume
from tests.proxy.server.conftest import WAIT, ProxyFactory, fake_backend, imap_client, login, session_lines


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_certificates(authority: TestAuthority) -> tuple[IssuedCertificate, IssuedCertificate]:
    default = authority.issue("default", ["mail.alpha.example"])
    beta = authority.issue("beta", ["mail.beta.example", "*.beta.example"])
    return default, beta


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the proxy sent before closing; a close with our bytes still unread arrives as a reset."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


def files(*issued: IssuedCertificate) -> tuple[CertificateFiles, ...]:
    return tuple(CertificateFiles(cert=i.cert, key=i.key) for i in issued)


async def served_serial(port: int, tls: ssl.SSLContext, *, awaited: int) -> int:
    """The serial new connections get, once it is ``awaited`` (the store polls its files about
    once a second; bounded by WAIT)."""
    serial = -1
    for _ in range(int(WAIT / 0.1)):
        _, writer = await imap_client(port, tls=tls, server_hostname="mail.alpha.example")
        serial = serial_of(writer)
        writer.close()
        if serial == awaited:
            break
        await asyncio.sleep(0.1)
    return serial


def tls_secret(issued: IssuedCertificate) -> dict[str, bytes]:
    """A certificate as the keys of a kubernetes.io/tls Secret."""
    return {"tls.crt": issued.cert.read_bytes(), "tls.key": issued.key.read_bytes()}


def client_context(authority: TestAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(authority.cert))


def serial_of(writer: asyncio.StreamWriter) -> int:
    ssl_object = writer.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert()
    return int(certificate["serialNumber"], 16)


async def test_implicit_tls_picks_the_certificate_by_sni(
    start_proxy: ProxyFactory, authority: TestAuthority, server_certificates: tuple[IssuedCertificate, ...]
) -> None:
    default, beta = server_certificates
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {},
            [Endpoint("127.0.0.1", backend.port)],
            listener={"tls": "implicit", "certificates": files(default, beta)},
        )
        tls = client_context(authority)
        for name, expected in (
            ("mail.alpha.example", default),
            ("imap.beta.example", beta),
            ("mail.beta.example", beta),
        ):
            _, writer = await imap_client(proxy.port, tls=tls, server_hostname=name)
            assert serial_of(writer) == expected.serial
            writer.close()
        # An unknown name gets the default certificate (and this client refuses it: wrong name).
        with pytest.raises(ssl.SSLCertVerificationError):
            await imap_client(proxy.port, tls=tls, server_hostname="other.example")
        reply, reader, writer = await login(
            proxy.port,
            "alice@alpha.example",
            pipelined=b"a2 NOOP\r\n",
            tls=tls,
            server_hostname="mail.alpha.example",
        )
        assert reply.startswith(b"a1 OK")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 NOOP\r\n"
        writer.close()


async def test_a_server_name_that_is_not_ascii_leaves_no_traceback(
    start_proxy: ProxyFactory,
    authority: TestAuthority,
    server_certificates: tuple[IssuedCertificate, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython's ssl module cannot decode such a name for the SNI callback and reports it as an
    unraisable exception (a traceback on stderr, from any client); the proxy's hook, as
    ``mailgress proxy`` installs it, passes nothing of it on while the handshake is refused."""
    reported: list[type[BaseException]] = []
    passed_on: list[object] = []

    def hook(unraisable: Any) -> None:
        reported.append(type(unraisable.exc_value))
        certificates.quiet_undecodable_server_names(unraisable)

    monkeypatch.setattr(sys, "__unraisablehook__", passed_on.append)  # Python's own: stderr
    monkeypatch.setattr(sys, "unraisablehook", hook)
    listener = {"tls": "implicit", "certificates": files(*server_certificates)}
    async with fake_backend() as backend:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend.port)], listener=listener)
        client = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}",
            "-servername", "\udcff\udcfe.example",  # the bytes ff fe: not ASCII
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(client.wait(), WAIT) != 0  # the handshake was refused
        tls = client_context(authority)
        _, writer = await imap_client(proxy.port, tls=tls, server_hostname="mail.alpha.example")
        writer.close()  # the listener goes on
    assert reported == [UnicodeDecodeError] and passed_on == []
    certificates.quiet_undecodable_server_names(types.SimpleNamespace(exc_value=ValueError(), object=None))
    assert len(passed_on) == 1  # anything else still reaches Python's hook


async def test_plaintext_client_on_an_implicit_tls_listener_is_dropped(
    start_proxy: ProxyFactory, server_certificates: tuple[IssuedCertificate, ...]
) -> None:
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", 1)],
        listener={"tls": "implicit", "certificates": files(server_certificates[0])},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a1 LOGIN alice@alpha.example secret\r\n")
    assert await read_until_closed(reader) == b""  # no greeting, no plaintext reply
    writer.close()
    assert proxy.metric("mailgress_proxy_refusals_total", reason="tls_handshake") == 1


async def test_a_failed_starttls_handshake_is_reported_as_one(
    start_proxy: ProxyFactory,
    server_certificates: tuple[IssuedCertificate, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review J7: after STARTTLS, plaintext where the ClientHello belongs ended the session as a
    'connection error' and counted no refusal, unlike the same failure on an implicit-TLS listener."""
    caplog.set_level(logging.INFO)
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", 1)],
        listener={"tls": "starttls", "certificates": files(server_certificates[0])},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await asyncio.wait_for(reader.readline(), WAIT)  # the greeting
    writer.write(b"a1 STARTTLS\r\n")
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
    writer.write(b"GET / HTTP/1.1\r\nHost: mail.alpha.example\r\n\r\n")
    await read_until_closed(reader)
    writer.close()
    [line] = await session_lines(caplog)
    assert "outcome=TLS handshake failed (SSLError) after STARTTLS " in line
    assert proxy.metric("mailgress_proxy_refusals_total", reason="tls_handshake") == 1


async def test_starttls_discards_pipelined_plaintext_then_logs_in(
    start_proxy: ProxyFactory, authority: TestAuthority, server_certificates: tuple[IssuedCertificate, ...]
) -> None:
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {},
            [Endpoint("127.0.0.1", backend.port)],
            listener={"tls": "starttls", "certificates": files(server_certificates[0])},
        )
        reader, writer = await imap_client(proxy.port)
        writer.write(b"a0 CAPABILITY\r\n")
        capability = await asyncio.wait_for(reader.readline(), WAIT)
        assert b"STARTTLS" in capability
        await asyncio.wait_for(reader.readline(), WAIT)
        # The injected LOGIN rides behind STARTTLS in the same packet: it must never be read.
        writer.write(b"a1 STARTTLS\r\na2 LOGIN alice@alpha.example injected\r\n")
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
        await asyncio.wait_for(
            writer.start_tls(client_context(authority), server_hostname="mail.alpha.example"), WAIT
        )
        writer.write(b"a3 CAPABILITY\r\n")
        capability = await asyncio.wait_for(reader.readline(), WAIT)
        assert b"STARTTLS" not in capability and b"AUTH=PLAIN" in capability
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a3 OK")
        writer.write(b'a4 LOGIN alice@alpha.example "s3cret-Password-never-logged"\r\n')
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a4 OK")
        writer.close()
        assert backend.logins == 1
        assert all(b"injected" not in received for received in backend.received)


async def test_required_starttls_refuses_plaintext_logins(
    start_proxy: ProxyFactory, server_certificates: tuple[IssuedCertificate, ...]
) -> None:
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", 1)],
        listener={
            "tls": "starttls",
            "starttls_required": True,
            "certificates": files(server_certificates[0]),
        },
    )
    reader, writer = await imap_client(proxy.port)
    writer.write(b"a0 CAPABILITY\r\n")
    capability = await asyncio.wait_for(reader.readline(), WAIT)
    assert b"LOGINDISABLED" in capability and b"AUTH=" not in capability
    await asyncio.wait_for(reader.readline(), WAIT)
    writer.write(b'a1 LOGIN alice@alpha.example "pw"\r\n')
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 NO [PRIVACYREQUIRED]")
    writer.close()


async def test_a_tls_client_gone_right_after_its_login_ends_the_session(
    start_proxy: ProxyFactory,
    authority: TestAuthority,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS client that leaves right after its login reply, while the session still converts
    the plain backend for the relay: its end reaches the login dialogue's protocol, not the
    relay's. The session must end then, not hold its slot (and the drain) for ever. The test
    makes the gap certain: the backend's conversion waits until the client is gone."""
    caplog.set_level(logging.INFO)
    converted: list[TransportChannel] = []

    async def after_the_client_left(channel: SocketChannel | TransportChannel) -> TransportChannel:
        if converted:  # the backend's turn: the client's conversion came first
            client = converted[0].receiver
            for _ in range(int(WAIT / 0.01)):
                if client.lost:
                    break
                await asyncio.sleep(0.01)
            assert client.lost
        converted.append(await as_transport(channel))
        return converted[-1]

    monkeypatch.setattr(session, "as_transport", after_the_client_left)
    certificate = authority.issue("gone", ["mail.alpha.example"])
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {},
            [Endpoint("127.0.0.1", backend.port)],
            listener={"tls": "implicit", "certificates": files(certificate)},
        )
        reply, _, writer = await login(
            proxy.port,
            "alice@alpha.example",
            tls=client_context(authority),
            server_hostname="mail.alpha.example",
        )
        assert reply.startswith(b"a1 OK")
        writer.transport.abort()
        [line] = await session_lines(caplog)
    assert "outcome=relayed, ended by client" in line
    assert proxy.metric("mailgress_proxy_sessions_active", protocol="imap") == 0


async def test_renewed_certificate_reaches_new_connections_only(
    start_proxy: ProxyFactory, authority: TestAuthority, tmp_path: Path
) -> None:
    first = authority.issue(
        "renewed", ["mail.alpha.example"], cert=tmp_path / "tls.crt", key=tmp_path / "tls.key"
    )
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {},
            [Endpoint("127.0.0.1", backend.port)],
            listener={"tls": "implicit", "certificates": files(first)},
        )
        tls = client_context(authority)
        reply, reader, open_writer = await login(
            proxy.port, "alice@alpha.example", tls=tls, server_hostname="mail.alpha.example"
        )
        assert reply.startswith(b"a1 OK") and serial_of(open_writer) == first.serial
        second = authority.issue("renewed", ["mail.alpha.example"], cert=first.cert, key=first.key)
        assert await served_serial(proxy.port, tls, awaited=second.serial) == second.serial
        open_writer.write(b"a2 NOOP\r\n")  # the session opened before the renewal goes on
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 NOOP\r\n"
        open_writer.close()


async def test_a_certificate_renewed_in_a_kubelet_volume_reaches_new_connections(
    start_proxy: ProxyFactory, authority: TestAuthority, tmp_path: Path
) -> None:
    """Kubernetes mounts a TLS Secret through symlinks and renews it by pointing ``..data`` at a
    new folder and deleting the old one (testbed/volumes.py). The files named in the settings
    are read through the links, so the renewal reaches new connections."""
    first = authority.issue("first", ["mail.alpha.example"])
    volume = KubeletVolume(tmp_path / "tls", tls_secret(first))
    listener = {
        "name": "imaps", "protocol": "imap", "address": "127.0.0.1", "port": 993, "tls": "implicit",
        "certificates": [{"cert": "tls/tls.crt", "key": "tls/tls.key"}],
    }  # fmt: skip
    mounted = settings.parse({"listeners": [listener]}, tmp_path).listeners[0].certificates
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {}, [Endpoint("127.0.0.1", backend.port)], listener={"tls": "implicit", "certificates": mounted}
        )
        tls = client_context(authority)
        _, writer = await imap_client(proxy.port, tls=tls, server_hostname="mail.alpha.example")
        assert serial_of(writer) == first.serial
        writer.close()
        second = authority.issue("second", ["mail.alpha.example"])
        volume.update(tls_secret(second))
        assert await served_serial(proxy.port, tls, awaited=second.serial) == second.serial


async def test_trusted_proxy_header_sets_the_client_address(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as backend:
        spec = {"imap": {"backend": {"service": "dovecot", "port": 143}, "clientInfo": "proxy-v2"}}
        proxy = await start_proxy(
            spec,
            [Endpoint("127.0.0.1", backend.port)],
            listener={"proxy_protocol_from": (ipaddress.ip_network("127.0.0.0/8"),)},
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n")
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
        writer.write(b'a1 LOGIN alice@alpha.example "s3cret-Password-never-logged"\r\n')
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
        writer.close()
    header = proxyheader.parse(backend.received[0])
    assert header is not None and header.source == ("192.0.2.7", 40000)
    assert header.destination == ("198.51.100.1", 143)


@pytest.mark.parametrize(
    "first_bytes",
    [b"a1 LOGIN alice@alpha.example pw\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 extra\r\n"],
    ids=["no-header", "bad-header"],
)
async def test_trusted_peer_without_a_valid_header_is_closed(
    start_proxy: ProxyFactory, first_bytes: bytes
) -> None:
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", 1)],
        listener={"proxy_protocol_from": (ipaddress.ip_network("127.0.0.1/32"),)},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(first_bytes)
    assert await read_until_closed(reader) == b""
    writer.close()
    assert proxy.metric("mailgress_proxy_refusals_total", reason="proxy_header") == 1


async def test_untrusted_peer_is_refused_on_a_proxy_protocol_listener(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", 1)],
        listener={"proxy_protocol_from": (ipaddress.ip_network("10.0.0.0/8"),)},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n")
    assert await read_until_closed(reader) == b""
    writer.close()
    assert proxy.metric("mailgress_proxy_refusals_total", reason="proxy_untrusted") == 1


def backend_server_context(issued: IssuedCertificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    return context


@pytest.mark.parametrize(
    ("ca", "names", "skip_verify", "logged_in"),
    [
        ("ours", ["dovecot.mail.svc"], False, True),
        ("ours", ["wrong-name.mail.svc"], False, False),
        ("other", ["dovecot.mail.svc"], False, False),
        ("other", ["dovecot.mail.svc"], True, True),
    ],
    ids=["verified", "wrong-name", "unknown-ca", "explicit-skip"],
)
async def test_tls_backends_are_verified_unless_explicitly_skipped(
    start_proxy: ProxyFactory,
    authority: TestAuthority,
    tmp_path: Path,
    ca: str,
    names: list[str],
    skip_verify: bool,
    logged_in: bool,
) -> None:
    issuer = authority if ca == "ours" else TestAuthority(tmp_path / "other-ca", name="someone else")
    issued = issuer.issue("backend", names)
    async with fake_backend(tls=backend_server_context(issued)) as backend:
        proxy = await start_proxy(
            {"imap": {"backend": {"service": "dovecot", "port": 143}, "tls": "tls"}},
            [Endpoint("127.0.0.1", backend.port)],
            backend_tls=BackendTlsSettings(ca_file=authority.cert, insecure_skip_verify=skip_verify),
        )
        reply, _, writer = await login(proxy.port, "alice@alpha.example")
        writer.close()
    if logged_in:
        assert reply.startswith(b"a1 OK"), reply
        assert backend.logins == 1
    else:
        assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
        assert backend.logins == 0


async def test_starttls_backend_gets_credentials_only_after_the_handshake(
    start_proxy: ProxyFactory, authority: TestAuthority
) -> None:
    issued = authority.issue("starttls-backend", ["dovecot.mail.svc"])
    async with fake_backend(tls=backend_server_context(issued), starttls=True) as backend:
        proxy = await start_proxy(
            {"imap": {"backend": {"service": "dovecot", "port": 143}, "tls": "starttls"}},
            [Endpoint("127.0.0.1", backend.port)],
            backend_tls=BackendTlsSettings(ca_file=authority.cert),
        )
        reply, reader, writer = await login(proxy.port, "alice@alpha.example", pipelined=b"a2 NOOP\r\n")
        assert reply.startswith(b"a1 OK"), reply
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"echo:a2 NOOP\r\n"
        writer.close()
    assert backend.logins == 1
