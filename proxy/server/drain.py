"""Graceful drain of a stopping proxy: when each open session gets its turn to end, and with what.

``listeners.Listeners`` owns one ``Drain``; every session joins it when it starts and leaves it
when it ends. On SIGTERM ``process.run`` stops accepting and ``Listeners.drain_sessions`` calls
``begin``, which gives each session a turn at a random moment in the first half of the grace
period, so the clients reconnecting to the other pods arrive spread out, not in one stampede.
When its turn comes, the session driver ends the session at its next safe point with the
protocol's closing line: before login at once (session.py), in the relay only at a quiet moment
(relay.py). Whatever is left when the grace period ends is cancelled. This module only keeps
time and counts how drained sessions ended; it never reads a session's bytes, never logs.
"""

import asyncio
import random
from collections.abc import Callable
from typing import assert_never, get_args

from proxy.metrics import ProxyMetrics
from proxy.settings import DrainSettings, ListenerProtocol

# How a session that was open during a drain ended (the drained_sessions metric's outcome label).
CLOSED_BEFORE_LOGIN = "closed_before_login"  # the closing reply while the client was logging in
CLOSED_WHEN_QUIET = "closed_when_quiet"  # the closing line at a quiet moment of the relay
ENDED_ON_THEIR_OWN = "ended_on_their_own"  # client or backend ended it first (QUIT, LOGOUT, ...)
CUT_AT_DEADLINE = "cut_at_deadline"  # still busy when the grace period ended: closed without a word


def closing_line(protocol: ListenerProtocol, server_name: str) -> bytes:
    """What a client gets when the proxy ends its session because it is stopping.

    All three are allowed at any moment and tell the client to come back: IMAP's untagged
    ``BYE`` (RFC 3501 section 7.1.5) with RFC 5530 ``[UNAVAILABLE]``; POP3 ``-ERR`` with RFC 3206
    ``[SYS/TEMP]``; SMTP ``421`` with the server's name (RFC 5321 section 3.8) and RFC 3463's
    4.3.2 "system not accepting network messages", which tells an MTA to retry elsewhere.
    """
    match protocol:
        case "imap":
            return b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n"
        case "pop3":
            return b"-ERR [SYS/TEMP] Server shutting down, please reconnect\r\n"
        case "submission" | "smtp":
            return b"421 4.3.2 %s Service shutting down\r\n" % server_name.encode()
        case _:
            assert_never(protocol)


class Turn:
    """One session's place in the drain: whether its turn has come, and whom to tell when it does.

    The session driver sets ``on_due`` while it waits somewhere a turn should interrupt (a read
    before login, the relay) and clears it afterwards; elsewhere it checks ``due`` at its next
    safe point. ``outcome`` is set by whoever ends the session because of the drain.
    """

    __slots__ = ("closing", "due", "on_due", "outcome", "protocol", "quiet_period", "timer")

    def __init__(self, protocol: ListenerProtocol, closing: bytes, quiet_period: float) -> None:
        self.protocol = protocol
        self.closing = closing  # the protocol's closing line (closing_line)
        self.quiet_period = quiet_period  # seconds without a byte that make a relay quiet
        self.due = False
        self.on_due: Callable[[], None] | None = None
        self.outcome = ENDED_ON_THEIR_OWN
        self.timer: asyncio.TimerHandle | None = None

    def arrive(self) -> None:
        """The turn has come: the session should end at its next safe point."""
        self.timer = None
        self.due = True
        if self.on_due is not None:
            self.on_due()


class Drain:
    """The drain of one proxy process: every open session's turn, and the count of how they ended."""

    def __init__(
        self,
        settings: DrainSettings,
        server_name: str,
        metrics: ProxyMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # Replaceable, so tests can choose when the turns come.
        self.rng = rng or random.Random()  # noqa: S311  spreading reconnections, not cryptography
        self.started = False
        self._turns: set[Turn] = set()
        self._closing: dict[ListenerProtocol, bytes] = {
            protocol: closing_line(protocol, server_name) for protocol in get_args(ListenerProtocol)
        }

    def join(self, protocol: ListenerProtocol) -> Turn:
        """A new session's turn (scheduled at once if the drain has begun)."""
        turn = Turn(protocol, self._closing[protocol], self.settings.quiet_period)
        self._turns.add(turn)
        if self.started:
            self._schedule(turn)
        return turn

    def leave(self, turn: Turn) -> None:
        """The session has ended; during a drain, count how."""
        self._turns.discard(turn)
        if turn.timer is not None:
            turn.timer.cancel()
            turn.timer = None
        if self.started:
            self.metrics.drained_sessions.labels(protocol=turn.protocol, outcome=turn.outcome).inc()

    def begin(self) -> None:
        """Give every open session its turn, each at a random moment in the first half of the grace
        period (so reconnections spread over it). Idempotent."""
        if self.started:
            return
        self.started = True
        for turn in self._turns:
            self._schedule(turn)

    def _schedule(self, turn: Turn) -> None:
        delay = self.rng.uniform(0.0, self.settings.grace_period / 2)
        turn.timer = asyncio.get_running_loop().call_later(delay, turn.arrive)
