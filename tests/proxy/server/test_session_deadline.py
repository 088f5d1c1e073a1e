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
from proxy.server.limits import Limits
from proxy.settings import CertificateFiles, FailedLoginSettings, LimitSettings
from proxy.table import Endpoint
from testbed.tlscerts import IssuedCertificate, TestAuthority
from tests.proxy.server.conftest import (
    WAIT,
    ProxyFactory,
    RunningProxy,
    dead_port,
    imap_client,
    login,
    session_lines,
)
from tests.proxy.server.test_backends_health import refusing_after, serving

PRE_LOGIN = 1.0
COMMAND = b"a CAPABILITY\r\n"  # a reply several times its size, and never an error
MAX_SENT = 1024 * 1024  # what a client pushes at most
SEND_FOR = 3.0  # how long it pushes at most: well past the deadline
SMALL_RECEIVE_BUFFER = 4096  # the client's window: the proxy's replies back up quickly
POLL = 0.05
# A backend's failure delay, and the refusal time a login no route owns is held: longer than
# PRE_LOGIN.
FAILURE_DELAY = 1.2


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


@pytest.mark.parametrize("user", ["anna@alpha.example", "anna@unrouted.example"])
async def test_a_refused_login_leaves_the_client_its_time_routed_or_not(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, user: str
) -> None:
    """Review N1: the hold of a login no route owns used up the client's pre-login time, while a
    routed refusal's backend time moved the deadline on, so the timeout reply came one failure
    delay sooner after an unknown domain's refusal than after a routed one: the timing the hold
    hides, read off the closing line. Both count as backend time now. The backend's failure
    delay and the hold are longer than the whole pre-login time: a refusal counted against it
    would end the session instead of leaving the client time for another command."""
    caplog.set_level(logging.INFO)
    async with serving(refusing_after(FAILURE_DELAY)) as (endpoint, _):
        proxy = await start_proxy({}, [endpoint], pre_login=PRE_LOGIN)
        failed = FailedLoginSettings(first_delay=0, refusal_time=FAILURE_DELAY)
        proxy.context.limits = Limits(LimitSettings(failed_logins=failed))
        reply, reader, writer = await login(proxy.port, user, password="Wrong-Pass-1")
        assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        writer.write(b"a2 NOOP\r\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"a2 OK NOOP completed\r\n"
        # Then silence: the deadline, moved on by the refusal's time, ends the session.
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"* BYE Autologout; idle for too long\r\n"
        writer.close()
    [line] = await session_lines(caplog)
    assert f" outcome={session.PRE_LOGIN_TIMED_OUT} " in line, line


async def test_holds_of_logins_no_route_owns_add_at_most_one_backend_login(
    start_proxy: ProxyFactory,
) -> None:
    """Counted as backend time, the hold has its cap too: a client retrying unknown domains runs
    out of pre-login time after at most one backendLogin more, as one retrying while the
    backends hang (test_backends_health)."""
    proxy = await start_proxy(
        {}, [Endpoint("127.0.0.1", dead_port())], backend_login=0.5, pre_login=PRE_LOGIN
    )
    failed = FailedLoginSettings(first_delay=0, refusal_time=0.4, per_user=100, per_ip=100)
    proxy.context.limits = Limits(LimitSettings(failed_logins=failed))
    reader, writer = await imap_client(proxy.port)
    replies = []
    for attempt in range(40):  # 40 holds would be 16 s; the session ends first
        writer.write(b"a%d LOGIN anna@unrouted.example secret\r\n" % attempt)
        reply = await asyncio.wait_for(reader.readline(), WAIT)
        replies.append(reply)
        if reply.startswith(b"* BYE") or not reply:
            break
    writer.close()
    assert replies[-1].startswith(b"* BYE"), replies
    # preLogin (1 s) and one backendLogin (0.5 s): three holds of 0.4 s at most, and part of a fourth.
    assert len(replies) <= 5, replies


async def test_the_session_line_counts_only_the_time_a_cut_hold_held(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Review O4: logins no route owns pipelined in one write; the deadline cuts the last hold
    short, and held_back counted it whole, more than the session lasted."""
    caplog.set_level(logging.INFO)
    proxy = await start_proxy(
        {}, [Endpoint("127.0.0.1", dead_port())], backend_login=0.5, pre_login=PRE_LOGIN
    )
    failed = FailedLoginSettings(first_delay=0, refusal_time=0.4, per_user=100, per_ip=100)
    proxy.context.limits = Limits(LimitSettings(failed_logins=failed))
    reader, writer = await imap_client(proxy.port)
    writer.write(b"".join(b"a%d LOGIN anna@unrouted.example secret\r\n" % n for n in range(20)))
    replies = []
    for _ in range(25):  # 20 refusals would take 8 s; the deadline ends it first
        line = await asyncio.wait_for(reader.readline(), WAIT)
        if not line:
            break
        replies.append(line)
    writer.close()
    assert replies[-1] == b"* BYE Autologout; idle for too long\r\n", replies
    [line] = await session_lines(caplog)
    duration = float(line.split(" duration=")[1].split()[0].rstrip("s"))
    held_back = float(line.split(" held_back=")[1].rstrip("s"))
    # Rounded to the millisecond in the line; the holds are parts of the session's time.
    assert held_back <= duration + 0.0005, line
