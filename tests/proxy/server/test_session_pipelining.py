"""What a client that pipelines before login makes the session hold (session.py, channel.py).

A client that pipelines valid pre-login commands (IMAP CAPABILITY, POP3 CAPA, SMTP EHLO) and never
reads the replies must not make the proxy hold the replies to everything it sent: the session
feeds the front-end machine ``session.FEED_SIZE`` octets at a time and sends one slice's replies
before feeding the next, and a channel hands out at most ``channel.RECV_SIZE`` per read, on
plaintext and TLS alike. Slicing must keep two things: bytes that followed STARTTLS in its read
(plaintext injected before the handshake) never reach the machine as if they came over TLS, and
bytes that followed a successful login reach the backend, every one, in order.

The machines are wrapped to record what they are fed and what they answer per call; assertions
are about those sizes and the bytes seen, never about time or memory use. Every loop is bounded.
"""

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from proxy.protocols import events
from proxy.server import channel, session
from proxy.settings import CertificateFiles
from proxy.table import Endpoint
from testbed.tlscerts import IssuedCertificate, TestAuthority
from tests.proxy.server.conftest import PASSWORD, WAIT, ProxyFactory, dead_port, fake_backend

SERVER_NAME = "mail.alpha.example"
SMALL_RECEIVE_BUFFER = 4096  # the client's window: the proxy's replies back up at once
CHUNK = 256 * 1024  # one client write: far more than one read of the proxy
MAX_SENT = 16 * 1024 * 1024  # what a client pushes at most
STALLED = 0.5  # a write the proxy has not taken within this is taken for a stall (no assertion)


@dataclass(frozen=True)
class Dialect:
    """How a protocol's client asks for STARTTLS, pipelines and probes, in the listener's words."""

    listener: str
    starttls: bytes
    cheap: bytes  # a valid pre-login command with a reply many times its size
    injected: bytes  # a valid command, pipelined behind STARTTLS
    probe: bytes  # sent over TLS; its reply is the first line back
    probe_reply: bytes


DIALECTS = {
    "imap": Dialect("imap", b"a STARTTLS\r\n", b"a CAPABILITY\r\n", b"inj NOOP\r\n", b"p NOOP\r\n", b"p OK"),
    "pop3": Dialect("pop3", b"STLS\r\n", b"CAPA\r\n", b"USER inj\r\n", b"NOOP\r\n", b"+OK"),
    "smtp": Dialect("submission", b"STARTTLS\r\n", b"EHLO x\r\n", b"EHLO inj\r\n", b"NOOP\r\n", b"250 "),
}


@dataclass
class Seen:
    """What the sessions' machines were fed and answered, and what their channels handed out."""

    configs: list[events.FrontendConfig] = field(default_factory=list)
    largest_feed: int = 0
    feeds: int = 0
    largest_answer: int = 0  # octets of replies to one event
    largest_recv: int = 0
    tls_channels: set[channel.TransportChannel] = field(default_factory=set)  # that sent replies
    after_tls: list[bytes] = field(default_factory=list)  # data fed after TlsEstablished


class Recording:
    """A front-end machine that records what it is fed and answers, then passes it on."""

    def __init__(self, machine: events.FrontendMachine, seen: Seen) -> None:
        self.machine, self.seen = machine, seen
        self.tls = False

    def start(self) -> list[events.Command]:
        return self.machine.start()

    def handle(self, event: events.Event) -> list[events.Command]:
        commands = self.machine.handle(event)
        if isinstance(event, events.TlsEstablished):
            self.tls = True
        if isinstance(event, events.DataReceived):
            self.seen.feeds += 1
            self.seen.largest_feed = max(self.seen.largest_feed, len(event.data))
            if self.tls:
                self.seen.after_tls.append(event.data)
            answer = sum(len(command.data) for command in commands if isinstance(command, events.Send))
            self.seen.largest_answer = max(self.seen.largest_answer, answer)
        return commands


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    record = Seen()
    for protocol, make in list(session.FRONTENDS.items()):

        def recording(
            config: events.FrontendConfig,
            make: Callable[[events.FrontendConfig], events.FrontendMachine] = make,
        ) -> events.FrontendMachine:
            record.configs.append(config)
            return Recording(make(config), record)

        monkeypatch.setitem(session.FRONTENDS, protocol, recording)
    real_recv = channel.TransportChannel.recv

    async def recording_recv(self: channel.TransportChannel, size: int = channel.RECV_SIZE) -> bytes:
        data = await real_recv(self, size)
        record.largest_recv = max(record.largest_recv, len(data))
        return data

    monkeypatch.setattr(channel.TransportChannel, "recv", recording_recv)
    real_send = channel.TransportChannel.send

    async def recording_send(self: channel.TransportChannel, data: bytes) -> None:
        record.tls_channels.add(self)
        await real_send(self, data)

    monkeypatch.setattr(channel.TransportChannel, "send", recording_send)
    real_socket_recv = channel.SocketChannel.recv

    async def recording_socket_recv(self: channel.SocketChannel, size: int = channel.RECV_SIZE) -> bytes:
        data = await real_socket_recv(self, size)
        record.largest_recv = max(record.largest_recv, len(data))
        return data

    monkeypatch.setattr(channel.SocketChannel, "recv", recording_socket_recv)
    yield record


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestAuthority, IssuedCertificate]:
    authority = TestAuthority(tmp_path_factory.mktemp("ca"))
    return authority, authority.issue("default", [SERVER_NAME])


def one_slice_answer(protocol: str, config: events.FrontendConfig, cheap: bytes) -> int:
    """The most reply octets one slice of ``cheap`` commands asks for: a slice cut anywhere holds
    at most the commands that fit in it, plus the one it ends inside of (completed by it)."""
    machine = session.FRONTENDS[protocol](config)  # the real machine: the fixture is not set yet
    machine.start()
    commands = machine.handle(events.DataReceived(cheap * (session.FEED_SIZE // len(cheap) + 1)))
    return sum(len(command.data) for command in commands if isinstance(command, events.Send))


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One reply, the last line of a multi-line SMTP one (``250-``...``250 ``)."""
    for _ in range(64):
        line = await asyncio.wait_for(reader.readline(), WAIT)
        if not (line[:3].isdigit() and line[3:4] == b"-"):
            return line
    raise AssertionError("a reply of more than 64 lines")


async def connect(
    port: int, dialect: Dialect, mode: str, authority: TestAuthority, *, after_starttls: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a small window, greeted, and in TLS if ``mode`` says so; ``after_starttls``
    rides behind STARTTLS in the same write."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)  # before connect
    raw.connect(("127.0.0.1", port))
    raw.setblocking(False)
    tls = ssl.create_default_context(cafile=str(authority.cert))
    if mode == "implicit":
        connected = asyncio.open_connection(sock=raw, ssl=tls, server_hostname=SERVER_NAME)
    else:
        connected = asyncio.open_connection(sock=raw)
    reader, writer = await asyncio.wait_for(connected, WAIT)
    await reply(reader)  # the greeting
    if mode == "starttls":
        if dialect.listener == "submission":
            writer.write(b"EHLO client\r\n")  # SMTP offers STARTTLS in its EHLO reply
            assert (await reply(reader)).startswith(b"250 ")
        writer.write(dialect.starttls + after_starttls)
        assert b"OK" in (line := await reply(reader)) or line.startswith(b"220 "), line
        await asyncio.wait_for(writer.start_tls(tls, server_hostname=SERVER_NAME), WAIT)
    return reader, writer


async def push_until_stalled(writer: asyncio.StreamWriter, command: bytes) -> bool:
    """Pipeline ``command`` without reading a reply, until the proxy stops taking it (True) or
    MAX_SENT went out."""
    chunk, sent = command * (CHUNK // len(command)), 0
    while sent < MAX_SENT:
        writer.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), STALLED)
        except TimeoutError:
            return True
    return False


def listener(dialect: Dialect, mode: str, issued: IssuedCertificate) -> dict[str, object]:
    files = (CertificateFiles(cert=issued.cert, key=issued.key),) if mode != "none" else ()
    return {"protocol": dialect.listener, "tls": mode, "certificates": files}


@pytest.mark.parametrize("mode", ["none", "implicit", "starttls"])
@pytest.mark.parametrize("protocol", DIALECTS)
async def test_a_client_that_pipelines_and_never_reads_gets_one_slice_answered_at_a_time(
    start_proxy: ProxyFactory,
    certificate: tuple[TestAuthority, IssuedCertificate],
    seen: Seen,
    protocol: str,
    mode: str,
) -> None:
    authority, issued = certificate
    dialect = DIALECTS[protocol]
    proxy = await start_proxy(
        {}, [Endpoint("127.0.0.1", dead_port())], listener=listener(dialect, mode, issued), pre_login=WAIT
    )
    _, writer = await connect(proxy.port, dialect, mode, authority)
    try:
        stalled = await push_until_stalled(writer, dialect.cheap)
        # What the client's TLS layer holds unsent while the session waits for it to read.
        unsent = [sent.transport.get_write_buffer_size() for sent in seen.tls_channels]
    finally:
        writer.transport.abort()
    assert stalled  # the proxy stopped reading: it waits to send replies nobody reads
    assert seen.feeds > 8  # it answered many slices before that, one after the other
    assert seen.largest_feed <= session.FEED_SIZE
    assert seen.largest_recv <= channel.RECV_SIZE
    (config,) = seen.configs
    answer = one_slice_answer(dialect.listener, config, dialect.cheap)
    assert seen.largest_answer <= answer
    # Over TLS, what waits in the transport unsent: its pre-login mark, then one more reply.
    assert len(unsent) == (0 if mode == "none" else 1)
    assert all(0 < size <= channel.TLS_WRITE_HIGH_WATER + answer for size in unsent)


@pytest.mark.parametrize("protocol", DIALECTS)
async def test_bytes_behind_starttls_never_reach_the_machine_after_the_handshake(
    start_proxy: ProxyFactory,
    certificate: tuple[TestAuthority, IssuedCertificate],
    seen: Seen,
    protocol: str,
) -> None:
    """More than one slice of plaintext behind STARTTLS in the same write (CVE-2011-0411): the
    slices after the one holding STARTTLS are dropped, not fed once TLS is up."""
    authority, issued = certificate
    dialect = DIALECTS[protocol]
    proxy = await start_proxy(
        {}, [Endpoint("127.0.0.1", dead_port())], listener=listener(dialect, "starttls", issued)
    )
    injected = dialect.injected * (4 * session.FEED_SIZE // len(dialect.injected))
    reader, writer = await connect(proxy.port, dialect, "starttls", authority, after_starttls=injected)
    try:
        writer.write(dialect.probe)
        assert (await reply(reader)).startswith(dialect.probe_reply)
    finally:
        writer.close()
    assert seen.after_tls == [dialect.probe]


@pytest.mark.parametrize("mode", ["none", "implicit"])
async def test_every_byte_pipelined_behind_a_login_reaches_the_backend_in_order(
    start_proxy: ProxyFactory,
    certificate: tuple[TestAuthority, IssuedCertificate],
    seen: Seen,
    mode: str,
) -> None:
    """The login and many slices of post-login commands in one write: what the machine held, the
    rest of the read and whatever the channel has not read yet go to the backend in order."""
    authority, issued = certificate
    pipelined = b"".join(b"p%d SELECT INBOX\r\n" % number for number in range(400))
    assert len(pipelined) > 8 * session.FEED_SIZE
    async with fake_backend() as backend:
        proxy = await start_proxy(
            {}, [Endpoint("127.0.0.1", backend.port)], listener=listener(DIALECTS["imap"], mode, issued)
        )
        reader, writer = await connect(proxy.port, DIALECTS["imap"], mode, authority)
        try:
            writer.write(f'a1 LOGIN alice@alpha.example "{PASSWORD}"\r\n'.encode() + pipelined)
            assert (await reply(reader)).startswith(b"a1 OK")
            echoed = b""
            for _ in range(len(pipelined)):  # the backend echoes each read it gets: "echo:" + read
                if len(echoed.replace(b"echo:", b"")) >= len(pipelined):
                    break
                echoed += await asyncio.wait_for(reader.read(65536), WAIT)
        finally:
            writer.close()
    assert echoed.replace(b"echo:", b"") == pipelined
    assert backend.logins == 1
