"""Drive an SMTP session after its backend login: ``smtp.Mediator`` between two channels.

Called by the session driver (session.py) in place of the byte relay once an inbound-MX client's
first routed recipient, or a submission client's AUTH, has a backend. The machine decides
everything (which command goes to the backend, which recipient is deferred, where a body ends);
this driver only reads both sides at once, carries out the machine's commands in order (an
``AskRecipient`` through the caller's ``place``) and keeps time: a session in which neither side
moves a byte for the idle timeout gets the machine's ``TimedOut`` (421, close), except that a
reply the backend owes to MAIL, RCPT or the end of a body is waited for at least as long as RFC
5321 section 4.5.3.2 says (``Mediator.reply_timeout``); and when the proxy drains, the session
ends with the turn's closing line at the first moment the machine is between transactions (the
drain's grace period bounds the wait). Reads of the client pause while the machine holds too much
unread (its ``wants_client_data``); writes wait for each peer to take the bytes, inside the same
idle bound.
Never logs and never looks at the bytes: they may be anyone's mail.
"""

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import assert_never

from proxy.protocols import events, smtp
from proxy.server import relay
from proxy.server.channel import RECV_SIZE, SocketChannel, TransportChannel
from proxy.server.drain import Turn

Channel = SocketChannel | TransportChannel
# Where the route's auth service places a recipient (``smtp.AskRecipient``); the session's.
Place = Callable[[smtp.AskRecipient], Awaitable[smtp.RecipientPlaced]]


class Moved:
    """Bytes written to each side so far (the proxy's own replies included): for relay.Progress."""

    __slots__ = ("down", "up")

    def __init__(self) -> None:
        self.up = 0  # to the backend
        self.down = 0  # to the client

    def moved(self) -> tuple[int, int]:
        return self.up, self.down


# One read of a message body on its way through (``Mediator.streaming_body``): a body of 100 KiB
# took seven trips round the loop at the channel's 16 KiB (a task, a wait and a timeout scope
# each), more than the body's bytes cost; 64 KiB is the relay's pipe-sized read, and stays below
# the allocator's threshold for a mapping of its own. Commands are read at the channel's size,
# so what a pipelining client can make the machine hold stays bounded by it.
BODY_READ_SIZE = 64 * 1024


async def _read(channel: Channel, size: int) -> bytes:
    """One read; a broken connection reads as closed (b""), as the machine only needs to know that."""
    try:
        return await channel.recv(size)
    except (OSError, ssl.SSLError):
        return b""


async def mediate(
    machine: smtp.Mediator,
    client: Channel,
    backend: Channel,
    *,
    client_bytes: bytes,
    backend_bytes: bytes,
    idle_timeout: float,
    closing_grace: float,
    drain: Turn,
    progress: relay.Progress,
    place: Place | None = None,
) -> str:
    """Run ``machine`` until it closes; return why (its ``Close`` reason, or ``relay.DRAINED``).

    Args:
        client_bytes, backend_bytes: what each side sent behind the login, not yet read by anyone.
        idle_timeout: seconds without a byte either way (or a write that long stuck) before the
            machine gets ``TimedOut``; its 421 then gets ``closing_grace`` seconds to go out.
        progress: follows the bytes written to each side, until and after the end.
        place: answers the machine's ``AskRecipient`` (None: it never asks).

    Raises:
        OSError, ssl.SSLError: a write failed (the session reports a connection error).
    """
    moved = Moved()
    progress.follow(moved)
    loop = asyncio.get_running_loop()
    # What the loop waits on between its turns: set when a read ends or the drain's turn comes.
    # One future and done-callbacks, not asyncio.wait over the reads: that adds and removes a
    # callback on each of them at every turn, and a 100 KiB message takes a dozen turns.
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    def read(channel: Channel, size: int) -> asyncio.Task[bytes]:
        task = asyncio.ensure_future(_read(channel, size))
        task.add_done_callback(wake)
        return task

    reads: dict[str, asyncio.Task[bytes] | None] = {"client": None, "backend": None}
    ended = relay.CANCELLED  # until the session ends otherwise
    drain.on_due = wake
    try:
        commands = machine.start(client_bytes, backend_bytes)
        try:
            # One idle bound for the whole mediation, moved on at every turn.
            async with asyncio.timeout(None) as scope:
                while True:
                    scope.reschedule(loop.time() + idle_timeout)
                    reason = await _carry_out(
                        machine, commands, client, backend, moved, place=place, scope=scope
                    )
                    if reason is not None:
                        ended = reason
                        return ended
                    if drain.due and machine.quiet:
                        await client.send(drain.closing)
                        moved.down += len(drain.closing)
                        ended = relay.DRAINED
                        return ended
                    if reads["client"] is None and machine.wants_client_data:
                        reads["client"] = read(
                            client, BODY_READ_SIZE if machine.streaming_body else RECV_SIZE
                        )
                    if reads["backend"] is None:
                        reads["backend"] = read(backend, RECV_SIZE)
                    least = machine.reply_timeout
                    if least is not None and least > idle_timeout:
                        scope.reschedule(loop.time() + least)
                    # A fresh future before looking: a read that ends from here on wakes it (one
                    # that ended earlier may wake it too: a turn that finds nothing is harmless).
                    woken = loop.create_future()
                    if not any(task.done() for task in reads.values() if task is not None):
                        await woken
                    commands = []
                    # The backend first: its reply settles the pending command before the client's next.
                    backend_read = reads["backend"]
                    if backend_read is not None and backend_read.done():
                        reads["backend"] = None
                        data = backend_read.result()
                        commands += machine.handle(smtp.BackendData(data) if data else smtp.BackendClosed())
                    client_read = reads["client"]
                    if client_read is not None and client_read.done():
                        reads["client"] = None
                        data = client_read.result()
                        commands += machine.handle(
                            events.DataReceived(data) if data else events.ConnectionClosed()
                        )
        except TimeoutError:
            with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
                async with asyncio.timeout(closing_grace):  # a client that reads nothing gets nothing
                    await _carry_out(
                        machine, machine.handle(events.TimedOut()), client, backend, moved, place=place
                    )
            ended = "idle timeout"
            return ended
    finally:
        drain.on_due = None
        for task in reads.values():
            if task is not None:
                task.cancel()
        progress.settle(relay.RelayResult(moved.up, moved.down, ended))


async def _carry_out(
    machine: smtp.Mediator,
    commands: list[smtp.MediationCommand],
    client: Channel,
    backend: Channel,
    moved: Moved,
    *,
    place: Place | None,
    scope: asyncio.Timeout | None = None,
) -> str | None:
    """Do the machine's commands in order (and those its answers bring); the reason if one of
    them closes the session. While the auth service places a recipient, ``scope`` (the idle
    timeout's) is moved on to a RCPT reply's time: the client is owed that reply (RFC 5321
    section 4.5.3.2.3), however short ``idle`` is; the service's own timeout bounds the ask."""
    pending = collections.deque(commands)
    while pending:
        command = pending.popleft()
        match command:
            case events.Send(data=data):
                await client.send(data)
                moved.down += len(data)
            case smtp.SendToBackend(data=data):
                await backend.send(data)
                moved.up += len(data)
            case events.Close(reason=reason):
                return reason
            case smtp.AskRecipient():
                assert place is not None, "the machine asks only when given a login request to ask with"
                if scope is not None:
                    owed = asyncio.get_running_loop().time() + smtp.RCPT_REPLY_TIMEOUT
                    scope.reschedule(max(owed, scope.when() or owed))
                pending.extend(machine.handle(await place(command)))
            case _:
                assert_never(command)
    return None
