"""The inbound mediation's driver over real loopback sockets, under uvloop and asyncio (conftest).

Proves what the machine's transcripts cannot: both sides are read at once and each command's
reply reaches the client before the next command reaches the backend, bytes are counted, a
silent session gets the machine's 421 at the idle timeout, a drain turn waits for the pending
reply and then sends its closing line (counted), and a backend that goes away is reported to the client.
Every wait is bounded; no assertion is about time.
"""

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from proxy.protocols import events, smtp
from proxy.protocols.events import LoginRequest
from proxy.server import mediation, relay
from proxy.server.channel import SocketChannel
from proxy.server.drain import Turn

from .conftest import WAIT

CLOSING = b"421 4.3.2 mailgress Service shutting down\r\n"
ROUTES = {"alpha.example": "mail/alpha", "beta.example": "mail/beta"}


class Peer:
    """The far end of one side (the client, or the backend): bounded reads and writes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_until(self, end: bytes) -> bytes:
        """Everything up to and including ``end``; b"" and what came if the connection closes."""
        async with asyncio.timeout(WAIT):
            while end not in self.buffer:
                chunk = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
                if not chunk:
                    rest, self.buffer = self.buffer, b""
                    return rest
                self.buffer += chunk
        got, _, self.buffer = self.buffer.partition(end)
        return got + end


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname(), timeout=WAIT)
        near, _ = server.accept()
    near.setblocking(False)
    return near, peer


class Sides:
    def __init__(self) -> None:
        client_near, client_far = _pair()
        backend_near, backend_far = _pair()
        self.client = SocketChannel(client_near)
        self.backend = SocketChannel(backend_near)
        self.client_peer = Peer(client_far)
        self.backend_peer = Peer(backend_far)
        self.turn = Turn("smtp", CLOSING, quiet_period=1.0)
        self.progress = relay.Progress()

    def mediate(self, *, idle: float = WAIT * 3, client_bytes: bytes = b"") -> "asyncio.Task[str]":
        machine = smtp.Mediator(
            events.FrontendConfig(inbound=True),
            smtp.InboundRouting("mail/alpha", lambda key: ROUTES.get(key.rpartition("@")[2])),
        )
        return asyncio.ensure_future(
            mediation.mediate(
                machine,
                self.client,
                self.backend,
                client_bytes=client_bytes,
                backend_bytes=b"",
                idle_timeout=idle,
                closing_grace=WAIT,
                drain=self.turn,
                progress=self.progress,
            )
        )

    def close(self) -> None:
        for channel in (self.client, self.backend):
            channel.close()
        for peer in (self.client_peer, self.backend_peer):
            peer.sock.close()


@pytest.fixture
async def sides() -> AsyncIterator[Sides]:
    both = Sides()
    yield both
    both.close()


async def _ended(task: "asyncio.Task[str]") -> str:
    async with asyncio.timeout(WAIT):
        return await task


async def test_commands_and_replies_alternate_and_are_counted(sides: Sides) -> None:
    task = sides.mediate(client_bytes=b"RCPT TO:<b@beta.example>\r\nNOOP\r\nQUIT\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"NOOP\r\n"
    assert await sides.client_peer.read_until(b"\r\n") == smtp.REPLY_OTHER_ROUTE
    await sides.backend_peer.send(b"250-one\r\n")
    await sides.backend_peer.send(b"250 two\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"QUIT\r\n"  # only after the whole reply
    assert await sides.client_peer.read_until(b"two\r\n") == b"250-one\r\n250 two\r\n"
    await sides.backend_peer.send(b"221 bye\r\n")
    assert await _ended(task) == "client quit"
    assert await sides.client_peer.read_until(b"\r\n") == b"221 bye\r\n"
    assert sides.progress.moved() == (len(b"NOOP\r\nQUIT\r\n"), len(smtp.REPLY_OTHER_ROUTE) + 27)


async def test_a_body_streams_to_the_backend_and_the_final_reply_comes_back(sides: Sides) -> None:
    task = sides.mediate(client_bytes=b"DATA\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"DATA\r\n"
    await sides.backend_peer.send(b"354 go\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"354 go\r\n"
    body = b"".join(b"line %d with a dot\r\n..\r\n" % number for number in range(5000))
    await sides.client_peer.send(body + b".\r\nQUIT\r\n")
    assert await sides.backend_peer.read_until(b"\r\n.\r\n") == body + b".\r\n"
    await sides.backend_peer.send(b"250 queued\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"250 queued\r\n"
    assert await sides.backend_peer.read_until(b"\r\n") == b"QUIT\r\n"
    await sides.backend_peer.send(b"221 bye\r\n")
    assert await _ended(task) == "client quit"


async def test_a_silent_session_gets_421_at_the_idle_timeout(sides: Sides) -> None:
    task = sides.mediate(idle=0.2)
    assert await sides.client_peer.read_until(b"\r\n") == b"421 4.4.2 mailgress Error: timeout exceeded\r\n"
    assert await _ended(task) == "idle timeout"


async def test_the_reply_to_the_body_is_waited_for_past_the_idle_timeout(sides: Sides) -> None:
    """Review M5 #4: the backend queued the message and answers after the idle timeout; before,
    the client got 421 (and sent the message again). RFC 5321 section 4.5.3.2.6 waits 10 min."""
    task = sides.mediate(idle=0.2, client_bytes=b"DATA\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"DATA\r\n"
    await sides.backend_peer.send(b"354 go\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"354 go\r\n"
    await sides.client_peer.send(b"body\r\n.\r\n")
    assert await sides.backend_peer.read_until(b"\r\n.\r\n") == b"body\r\n.\r\n"
    await asyncio.sleep(1.0)  # a slow queue-file write: five idle timeouts
    await sides.backend_peer.send(b"250 queued\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"250 queued\r\n"
    # Commands are the client's again: a silent one meets the idle timeout as before.
    assert await sides.client_peer.read_until(b"\r\n") == b"421 4.4.2 mailgress Error: timeout exceeded\r\n"
    assert await _ended(task) == "idle timeout"


async def test_the_auth_services_answer_is_waited_for_past_the_idle_timeout(sides: Sides) -> None:
    """Review O3 #5: the client is owed its RCPT reply while the auth service places the
    recipient; before, an idle timeout shorter than the service's answer gave it 421."""
    asked: list[smtp.AskRecipient] = []

    async def place(command: smtp.AskRecipient) -> smtp.RecipientPlaced:
        asked.append(command)
        await asyncio.sleep(1.0)  # a slow auth service: five idle timeouts
        return smtp.RecipientPlaced("here")

    login = LoginRequest(
        protocol="smtp",
        routing_key="a@alpha.example",
        helo=b"EHLO client.example",
        envelope=(b"MAIL FROM:<s@example.net>", b"RCPT TO:<a@alpha.example>"),
    )
    machine = smtp.Mediator(
        events.FrontendConfig(inbound=True),
        smtp.InboundRouting("mail/alpha", lambda key: ROUTES.get(key.rpartition("@")[2]), login),
    )
    task = asyncio.ensure_future(
        mediation.mediate(
            machine,
            sides.client,
            sides.backend,
            client_bytes=b"RCPT TO:<b@alpha.example>\r\n",
            backend_bytes=b"",
            idle_timeout=0.2,
            closing_grace=WAIT,
            drain=sides.turn,
            progress=sides.progress,
            place=place,
        )
    )
    assert await sides.backend_peer.read_until(b"\r\n") == b"RCPT TO:<b@alpha.example>\r\n"
    assert [command.request.routing_key for command in asked] == ["b@alpha.example"]
    await sides.backend_peer.send(b"250 2.1.5 Ok\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"250 2.1.5 Ok\r\n"
    # The client's silence after its reply meets the idle timeout as before.
    assert await sides.client_peer.read_until(b"\r\n") == b"421 4.4.2 mailgress Error: timeout exceeded\r\n"
    assert await _ended(task) == "idle timeout"


async def test_a_drain_waits_for_the_pending_reply_then_closes(sides: Sides) -> None:
    task = sides.mediate(client_bytes=b"RSET\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"RSET\r\n"
    sides.turn.arrive()
    await sides.backend_peer.send(b"250 ok\r\n")
    assert await sides.client_peer.read_until(b"down\r\n") == b"250 ok\r\n" + CLOSING
    assert await _ended(task) == relay.DRAINED
    assert sides.turn.on_due is None
    # The closing line is the proxy's own reply: counted as written to the client (Moved).
    assert sides.progress.moved() == (len(b"RSET\r\n"), len(b"250 ok\r\n") + len(CLOSING))


async def test_a_drain_lets_the_transaction_in_progress_end_before_closing(sides: Sides) -> None:
    """RFC 5321 section 3.3 (review M1 #2): a turn that comes between RCPT and DATA waits for the
    final reply to the body; before, the 421 came between the RCPT's reply and DATA."""
    task = sides.mediate(client_bytes=b"RCPT TO:<c@alpha.example>\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"RCPT TO:<c@alpha.example>\r\n"
    sides.turn.arrive()
    await sides.backend_peer.send(b"250 2.1.5 Ok\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"250 2.1.5 Ok\r\n"
    await sides.client_peer.send(b"DATA\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"DATA\r\n"
    await sides.backend_peer.send(b"354 go\r\n")
    assert await sides.client_peer.read_until(b"\r\n") == b"354 go\r\n"
    await sides.client_peer.send(b"Subject: drained\r\n\r\nbody\r\n.\r\n")
    assert await sides.backend_peer.read_until(b"\r\n.\r\n") == b"Subject: drained\r\n\r\nbody\r\n.\r\n"
    await sides.backend_peer.send(b"250 queued\r\n")
    assert await sides.client_peer.read_until(b"down\r\n") == b"250 queued\r\n" + CLOSING
    assert await _ended(task) == relay.DRAINED


async def test_a_backend_that_goes_away_is_reported_to_the_client(sides: Sides) -> None:
    task = sides.mediate(client_bytes=b"NOOP\r\n")
    assert await sides.backend_peer.read_until(b"\r\n") == b"NOOP\r\n"
    sides.backend_peer.sock.close()
    assert await sides.client_peer.read_until(b"\r\n") == b"421 4.4.2 mailgress Error: backend went away\r\n"
    assert await _ended(task) == "backend closed the connection"
