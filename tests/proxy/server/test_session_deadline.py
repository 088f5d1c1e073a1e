"""The pre-login deadline bounds every wait of the login dialogue, writes included (session.py).

A client that pipelines valid commands and never reads its replies fills the proxy's send buffer;
the deadline must still end its session and give back its connection slot, on a plaintext and on
a TLS connection. After the deadline the timeout reply gets only a short grace, and a client that
asked for STARTTLS and then stays silent is timed out without a plaintext line. No assertion is
about time: every wait is bounded, and only the end state and the counters are checked.
"""

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from pathlib import Path

import pytest

from proxy.server import channel, session
from proxy.settings import CertificateFiles
from proxy.table import Endpoint
from testbed.tlscerts import IssuedCertificate, TestAuthority
from tests.proxy.server.conftest import (
    WAIT,
    ProxyFactory,
    RunningProxy,
    dead_port,
    imap_client,
    session_lines,
)

PRE_LOGIN = 1.0
COMMAND = b"a CAPABILITY\r\n"  # a reply several times its size, and never an error
MAX_SENT = 1024 * 1024  # what a client pushes at most
SEND_FOR = 3.0  # how long it pushes at most: well past the deadline
SMALL_RECEIVE_BUFFER = 4096  # the client's window: the proxy's replies back up quickly
POLL = 0.05


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestAuthority, IssuedCertificate]:
    authority = TestAuthority(tmp_path_factory.mktemp("ca"))
    return authority, authority.issue("default", ["mail.alpha.example"])


def small_window_socket(port: int) -> socket.socket:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)  # before connect
    client.connect(("127.0.0.1", port))
    client.setblocking(False)
    return client


def held_socket(ports: tuple[int, int]) -> bool:
    """Whether this process (the in-process proxy) still holds the server side of the connection
    between ``ports`` (the client's, the proxy's): its socket inode, found in /proc/net/tcp,
    among our descriptors."""
    client_port, server_port = ports
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if (local_port, remote_port) == (server_port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    held = []
    for descriptor in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we look
            held.append(os.readlink(descriptor))
    return not inodes.isdisjoint(held)


async def wait_until_released(ports: tuple[int, int]) -> None:
    for _ in range(int(WAIT / POLL)):
        if not held_socket(ports):
            return
        await asyncio.sleep(POLL)


async def wait_until_no_sessions(proxy: RunningProxy) -> None:
    for _ in range(int(WAIT / POLL)):
        if not proxy.listeners.sessions:
            return
        await asyncio.sleep(POLL)


async def test_a_client_that_never_reads_is_closed_at_the_deadline(start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy({}, [Endpoint("127.0.0.1", dead_port())], pre_login=PRE_LOGIN)
    client = small_window_socket(proxy.port)
    loop = asyncio.get_running_loop()
    chunk, sent = COMMAND * 4096, 0
    try:
        greeting = await asyncio.wait_for(loop.sock_recv(client, SMALL_RECEIVE_BUFFER), WAIT)
        assert greeting.startswith(b"* OK")  # the session runs: from here on the client reads nothing
        started = loop.time()
        while sent < MAX_SENT and loop.time() - started < SEND_FOR:
            try:
                sent += client.send(chunk)
            except BlockingIOError:  # the proxy stopped reading: it is stuck sending replies
                await asyncio.sleep(POLL)
            except ConnectionError:  # the deadline ended the session already
                break
            else:
                await asyncio.sleep(0)  # the proxy runs on this loop too
        await wait_until_no_sessions(proxy)
    finally:
        client.close()
    assert not proxy.listeners.sessions
    assert len(proxy.context.limits.connections) == 0  # the connection slot is given back
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1


async def test_a_tls_client_that_never_reads_is_closed_at_the_deadline(
    start_proxy: ProxyFactory, certificate: tuple[TestAuthority, IssuedCertificate]
) -> None:
    authority, issued = certificate
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", dead_port())],
        listener={"tls": "implicit", "certificates": (CertificateFiles(cert=issued.cert, key=issued.key),)},
        pre_login=PRE_LOGIN,
    )
    client = small_window_socket(proxy.port)
    ports = (client.getsockname()[1], proxy.port)
    tls = ssl.create_default_context(cafile=str(authority.cert))
    # The stream reader stops reading at its limit: from then on the client reads nothing.
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(sock=client, ssl=tls, server_hostname="mail.alpha.example"), WAIT
    )
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
    loop = asyncio.get_running_loop()
    chunk, sent = COMMAND * 4096, 0
    started = loop.time()
    try:
        while sent < MAX_SENT and loop.time() - started < SEND_FOR and not writer.is_closing():
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), SEND_FOR)
            except (TimeoutError, ConnectionError):
                break
        await wait_until_no_sessions(proxy)
        # The proxy does not keep the connection's descriptor while it tries to flush replies
        # nobody reads: its TLS shutdown is cut after channel.TLS_SHUTDOWN_TIMEOUT, within WAIT.
        await wait_until_released(ports)
        assert not held_socket(ports)
    finally:
        writer.transport.abort()
    assert not proxy.listeners.sessions
    assert len(proxy.context.limits.connections) == 0
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1


async def test_the_timeout_reply_gets_only_a_short_grace(
    start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose window is full when the deadline passes never takes the * BYE: the session
    ends after the grace all the same (the reply's send is made to hang, as for such a client)."""
    caplog.set_level(logging.INFO, logger="mailgress.session")
    real_send = channel.SocketChannel.send
    reply_sent = asyncio.Event()

    async def send_but_never_the_bye(self: channel.SocketChannel, data: bytes) -> None:
        if data.startswith(b"* BYE"):
            reply_sent.set()
            await asyncio.Event().wait()  # set by nobody: only the grace ends this
        await real_send(self, data)

    monkeypatch.setattr(channel.SocketChannel, "send", send_but_never_the_bye)
    monkeypatch.setattr(session, "TIMED_OUT_REPLY_GRACE", 0.2)
    proxy = await start_proxy({}, [Endpoint("127.0.0.1", dead_port())], pre_login=0.3)
    _, writer = await imap_client(proxy.port)
    try:
        await asyncio.wait_for(reply_sent.wait(), WAIT)
        await wait_until_no_sessions(proxy)
    finally:
        writer.close()
    assert not proxy.listeners.sessions
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1
    assert "outcome=timed out before login; the client read no timeout reply" in caplog.text


@pytest.mark.parametrize("protocol", ["imap", "pop3", "submission"])
async def test_a_silent_client_is_timed_out_before_login_not_idle(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    """The session line names the pre-login deadline, not the machine's reason ("idle timeout",
    "timed out"), which reads like the relay's idle timeout."""
    caplog.set_level(logging.INFO, logger="mailgress.session")
    proxy = await start_proxy(
        {}, [Endpoint("127.0.0.1", dead_port())], listener={"protocol": protocol}, pre_login=0.3
    )
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)
    try:
        await asyncio.wait_for(reader.readline(), WAIT)  # the greeting; then silence
        closing = await asyncio.wait_for(reader.read(), WAIT)  # the timeout reply, then the end
    finally:
        writer.close()
    assert closing  # the client read it: the deadline, not the grace after it, ended the session
    (line,) = await session_lines(caplog)
    assert f"protocol={protocol} " in line
    assert " outcome=timed out before login bytes_up=" in line


async def test_starttls_then_silence_is_timed_out_without_a_plaintext_line(
    start_proxy: ProxyFactory,
    certificate: tuple[TestAuthority, IssuedCertificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailgress.session")
    _, issued = certificate
    proxy = await start_proxy(
        {},
        [Endpoint("127.0.0.1", dead_port())],
        listener={"tls": "starttls", "certificates": (CertificateFiles(cert=issued.cert, key=issued.key),)},
        pre_login=0.3,
    )
    reader, writer = await imap_client(proxy.port)
    writer.write(b"a1 STARTTLS\r\n")
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
    try:
        rest = await asyncio.wait_for(reader.read(), WAIT)  # no handshake: the deadline ends it
    except ConnectionResetError:
        rest = b""
    writer.close()
    assert rest == b""  # a plaintext * BYE would land in the TLS stream the client may start
    await wait_until_no_sessions(proxy)
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1
    (line,) = await session_lines(caplog)
    assert " outcome=timed out before login, in the STARTTLS handshake bytes_up=" in line
