"""Abuse limits at the edge: failed logins per client address and per user, connections per address.

One ``Limits`` lives in the ``ProxyContext``, so every listener of a proxy shares it. The session
driver takes a connection slot per client once it knows the client's real address (after a trusted
PROXY header) and gives it back when the session ends. A login starts as ``LoginThrottle.begin``:
a locked address or user gets the protocol's temporary failure and no backend is asked; else the
attempt counts from then on, so logins in flight at once see each other. A login that finds the
limit made up by attempts still in flight (a lock with no end yet) is not refused: the driver asks
``wait_for_room`` to be called back when one of them settles, and begins again; one waiter per
settled attempt is woken, oldest login first (by a ticket taken when it first waited), and each
woken login says when it is done with its wake-up (``after_wait``), which passes it on while
there is room. An attempt's verdict settles
it: ``failed`` (a refused credential, a login no route owns, or no verdict at all) keeps it as a
failure and answers how long to hold the refusal back, ``succeeded`` drops it and forgets the
user's failures (never the address's: one valid account must not wash away an address's guessing),
``withdrawn`` drops it (no verdict on the password).

The bookkeeping takes ``now`` as an argument (the driver reads ``Limits.clock``), so tests step
time by hand. Memory is bounded: failure records expire ``lockout`` seconds after their last
failure and each map keeps at most MAX_TRACKED_ADDRESSES / MAX_TRACKED_USERS entries (the least
recently failed is dropped first), so spraying addresses or user names cannot grow it; attempts
in flight, waiters and connection slots exist only while their sessions are open. Never sees a
password, never logs, never sleeps.
"""

import collections
import functools
import heapq
import ipaddress
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, assert_never

from proxy.settings import FailedLoginSettings, LimitSettings, ListenerProtocol

# One IPv6 client usually owns a whole /64 (RFC 4291 section 2.5.1: 64-bit interface identifiers),
# so its addresses count as one; Dovecot's auth penalty groups IPv6 clients too (by /48).
IPV6_CLIENT_PREFIX = 64
# A failure record costs about 230 bytes (key, record, map slot; measured with tracemalloc), so
# 100,000 per map stay under 25 MB each whatever an attacker sends, far above the addresses and
# users a proxy sees failing within `lockout` seconds. Beyond it the least recently failed go first.
MAX_TRACKED_ADDRESSES = 100_000
MAX_TRACKED_USERS = 100_000
# client_key runs three times per session (the connection slot taken and given back, the login's
# attempt) and ipaddress's parsing is most of a login's bookkeeping; a proxy sees far fewer distinct
# addresses at once than this, and 4,096 short strings cost well under 1 MB.
CLIENT_KEY_CACHE_SIZE = 4096
# 2 ** 62 seconds is beyond any cap a settings file can name; keeps the float power finite.
MAX_DELAY_DOUBLINGS = 62

Scope = Literal["ip", "user"]
# The order locks are looked for in: a locked address is named before a locked user.
SCOPES: tuple[Scope, ...] = ("ip", "user")


@functools.lru_cache(maxsize=CLIENT_KEY_CACHE_SIZE)
def client_key(host: str) -> str:
    """The address a client is counted under: IPv4 as is, IPv6 by its /64, IPv4-mapped as IPv4."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a PROXY header never yields one): counted as written
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


def user_key(user: str) -> str:
    """Logins differ in case only (Dovecot and the routing table ignore it): one user."""
    return user.lower()


@dataclass(frozen=True, slots=True)
class Lock:
    """Logins are refused for this address or user until ``until`` (clock seconds); None: while
    attempts still in flight make up the limit (each that fails turns it into a lock of
    ``lockout`` from its failure; each answered otherwise lifts it)."""

    scope: Scope
    until: float | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """A login asked of a backend or an auth service, counted under these keys until settled."""

    ip: str
    user: str

    def key(self, scope: Scope) -> str:
        """The address or user this attempt counts under in ``scope``."""
        return self.ip if scope == "ip" else self.user


@dataclass(frozen=True, slots=True)
class Penalty:
    """What one failed login costs: ``delay`` seconds before its refusal goes out, and the
    scopes this failure has just locked (for the driver's warning)."""

    delay: float
    locked: tuple[Scope, ...] = ()


@dataclass(frozen=True, slots=True)
class _Failures:
    count: int
    last: float


class _FailureCounts:
    """Failures per key, kept in order of their last failure so expiry and eviction pop the front.

    ``now`` must never go backwards (the driver's clock is monotonic).
    """

    def __init__(self, lifetime: float, capacity: int) -> None:
        self._lifetime = lifetime
        self._capacity = capacity
        self._entries: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.last + self._lifetime > now:
                return
            self._entries.popitem(last=False)

    def get(self, key: str, now: float) -> _Failures | None:
        self._expire(now)
        return self._entries.get(key)

    def add(self, key: str, now: float) -> int:
        """Count one more failure of ``key``; returns its count."""
        self._expire(now)
        previous = self._entries.pop(key, None)
        count = 1 if previous is None else previous.count + 1
        self._entries[key] = _Failures(count, now)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return count

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)


# A waiter's callback: True if it took the wake-up (its login looks again), False if its session
# has gone meanwhile (the next waiter is woken instead).
Wake = Callable[[], bool]


def _release(counter: collections.Counter[str], key: str) -> None:
    """One fewer for ``key``, which leaves the counter at none: only live entries take memory."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class LoginThrottle:
    """Failed logins per client address and per user: a growing delay, then temporary refusal.

    An attempt in flight counts as a failure towards the lock, as it may well be one: the lock
    check of a login that comes while others are being answered (a guesser's parallel
    connections, or pipelined logins on several) must see them, or every one of them would pass
    it before the first verdict came back (review Q1). It is not yet a failure record: the
    growing delay, the lock's warning and expiry follow the verdicts, as they come.
    """

    def __init__(
        self,
        settings: FailedLoginSettings,
        *,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        max_users: int = MAX_TRACKED_USERS,
    ) -> None:
        self.settings = settings
        self._counts: dict[Scope, _FailureCounts] = {
            "ip": _FailureCounts(settings.lockout, max_addresses),
            "user": _FailureCounts(settings.lockout, max_users),
        }
        self._limits: dict[Scope, int] = {"ip": settings.per_ip, "user": settings.per_user}
        # Attempts asked and not yet settled, per key: entries live only while their logins do.
        self._in_flight: dict[Scope, collections.Counter[str]] = {
            "ip": collections.Counter(),
            "user": collections.Counter(),
        }
        # Logins waiting for an attempt in flight under their key to settle: a heap by ticket,
        # the oldest login first wherever it waited before.
        self._waiting: dict[Scope, dict[str, list[tuple[int, Wake]]]] = {"ip": {}, "user": {}}
        # The tickets of logins woken and not yet done with their wake-up (``after_wait``), per
        # key: each holds one room of its key against younger logins.
        self._woken: dict[Scope, dict[str, list[int]]] = {"ip": {}, "user": {}}
        self._tickets = itertools.count()

    def tracked(self, scope: Scope) -> int:
        """How many addresses or users have failures on record."""
        return len(self._counts[scope])

    def in_flight(self, scope: Scope) -> int:
        """How many addresses or users have attempts in flight."""
        return len(self._in_flight[scope])

    def locked(self, address: str, user: str, now: float) -> Lock | None:
        """The lock (address first) that refuses a login of ``user`` from ``address`` now, if any."""
        return self._lock(Attempt(client_key(address), user_key(user)), now)

    def _lock(self, attempt: Attempt, now: float) -> Lock | None:
        """The lock ``attempt``'s keys are under: failures on record and attempts in flight."""
        for scope in SCOPES:
            key = attempt.key(scope)
            record = self._counts[scope].get(key, now)
            failures = 0 if record is None else record.count
            if failures + self._in_flight[scope][key] < self._limits[scope]:
                continue
            if record is not None and failures >= self._limits[scope]:
                # The lock ends when the record expires: a refused login is not a failure and
                # extends nothing, so a patient user gets one try per lockout.
                return Lock(scope, record.last + self.settings.lockout)
            return Lock(scope, None)  # made up by attempts in flight: their verdicts decide
        return None

    def begin(
        self, address: str, user: str, now: float, *, ticket: int | None = None, woken: Scope | None = None
    ) -> Attempt | Lock:
        """A login of ``user`` from ``address`` is about to be asked of a backend or an auth
        service: the lock that refuses it, or the attempt, counted until it is settled.

        Args:
            now: the clock's seconds, for the expiry of failure records.
            ticket: the login's ticket from ``wait_for_room`` once it has waited; None for a
                login that has not (younger than every login that has).
            woken: the scope of the key the login was just woken under: the room it finds there
                is its own. Under any other key the room older logins were woken for is theirs,
                and while older logins wait there the first of them is woken and this one goes
                behind them (a lock with no end). So room opened by records that expired reaches
                the logins that waited, no newcomer takes the room a woken login was woken for
                (review Q4), and a login woken under its address does not take its user's room
                from an older login woken for it (review S4). Only older logins hold a login
                back, so the oldest woken login is never held back by another's wake-up: logins
                woken under different keys cannot hand their wake-ups round for ever.

        Returns:
            A ``Lock`` (address first; nothing counted), or the ``Attempt`` the caller must
            settle exactly once: ``failed``, ``succeeded`` or ``withdrawn``.
        """
        attempt = Attempt(client_key(address), user_key(user))
        lock = self._lock(attempt, now)
        if lock is not None:
            return lock
        for scope in SCOPES:
            if scope != woken and self._behind_older(scope, attempt.key(scope), ticket, now):
                return Lock(scope, None)
        for scope in SCOPES:
            self._in_flight[scope][attempt.key(scope)] += 1
        return attempt

    def _behind_older(self, scope: Scope, key: str, ticket: int | None, now: float) -> bool:
        """Whether a login holding ``ticket`` waits under ``key`` for older logins: those woken
        for the key's room use up what is left of it, or one still waits there (it is woken
        now, to use the room)."""

        def older(other: int) -> bool:
            return ticket is None or other < ticket

        record = self._counts[scope].get(key, now)
        failures = 0 if record is None else record.count
        held = sum(1 for other in self._woken[scope].get(key, ()) if older(other))
        if failures + self._in_flight[scope][key] + held >= self._limits[scope]:
            return True
        queue = self._waiting[scope].get(key, [])
        return bool(queue) and older(queue[0][0]) and self._wake(scope, key, everyone=False)

    def wait_for_room(
        self, lock: Lock, address: str, user: str, wake: Wake, *, ticket: int | None = None
    ) -> int:
        """Call ``wake`` when an attempt in flight under the key ``lock`` (one with no end: made
        up by attempts in flight, ``begin``) holds for this login settles, after the logins
        with older tickets waiting there.

        Args:
            ticket: the login's ticket if it has waited before (under either key), else None.

        Returns:
            The login's ticket: every later ``begin``, ``wait_for_room`` and ``after_wait`` of
            this login passes it.

        Raises:
            ValueError: ``lock`` has an end (only time lifts it).
        """
        if lock.until is not None:
            raise ValueError("a lock with an end is lifted by time, not by a settled attempt")
        if ticket is None:
            ticket = next(self._tickets)
        key = Attempt(client_key(address), user_key(user)).key(lock.scope)
        heapq.heappush(self._waiting[lock.scope].setdefault(key, []), (ticket, wake))
        return ticket

    def after_wait(self, lock: Lock, address: str, user: str, now: float, ticket: int) -> None:
        """A login woken from ``wait_for_room`` under ``lock``'s key is done with its wake-up: it
        began, was refused by a lock with an end, waits again (here or under its other key), or
        its session ended. Until then its wake-up holds the room it was woken for against
        newcomers (``begin``). While the key still has room the next waiter is woken, so a
        wake-up that was not used is never lost (review Q3), and room that opened for more than
        one (failure records expired, a user's failures forgotten) reaches more than one. Called
        exactly once per wake-up, with the lock the login waited under and its ticket."""
        key = Attempt(client_key(address), user_key(user)).key(lock.scope)
        held = self._woken[lock.scope][key]
        held.remove(ticket)
        if not held:
            del self._woken[lock.scope][key]
        record = self._counts[lock.scope].get(key, now)
        failures = 0 if record is None else record.count
        if failures + self._in_flight[lock.scope][key] < self._limits[lock.scope]:
            self._wake(lock.scope, key, everyone=False)

    def waiting(self, scope: Scope) -> int:
        """How many logins wait for room under an address or a user (a session gone meanwhile
        counts until its turn to be woken comes)."""
        return sum(len(queue) for queue in self._waiting[scope].values())

    def _settle(self, attempt: Attempt) -> None:
        for scope in SCOPES:
            key = attempt.key(scope)
            _release(self._in_flight[scope], key)
            self._wake(scope, key, everyone=False)

    def _wake(self, scope: Scope, key: str, *, everyone: bool) -> bool:
        """Wake the first waiter under ``key`` whose session is still there (room for one more),
        or ``everyone`` (a lock with an end: each of them is refused at once); whether anyone was."""
        queue = self._waiting[scope].get(key)
        if queue is None:
            return False
        woke = False
        while queue and not (woke and not everyone):
            ticket, wake = heapq.heappop(queue)
            if wake():
                woke = True
                # Holds the room until it is done with the wake-up (after_wait).
                self._woken[scope].setdefault(key, []).append(ticket)
        if not queue:
            del self._waiting[scope][key]
        return woke

    def failed(self, attempt: Attempt, now: float) -> Penalty:
        """The attempt is a failure (a refused credential, a login no route owns, a login cut off
        before its verdict): kept as a failure record of its address and user."""
        self._settle(attempt)
        counts = {scope: self._counts[scope].add(attempt.key(scope), now) for scope in SCOPES}
        # Attempts in flight keep a count from passing the limit, so it reaches it exactly once
        # per lock: the lock is announced once, and whoever waited for room under it hears now.
        locked = tuple(scope for scope, count in counts.items() if count == self._limits[scope])
        for scope in locked:
            self._wake(scope, attempt.key(scope), everyone=True)
        return Penalty(self.delay(max(counts.values())), locked)

    def succeeded(self, attempt: Attempt) -> None:
        """The login worked: the attempt is dropped and the user's failures are forgotten (the
        address's are not)."""
        self._settle(attempt)
        self._counts["user"].forget(attempt.user)

    def withdrawn(self, attempt: Attempt) -> None:
        """The attempt got no verdict on its password (a refusal for another reason, a backend
        or auth service unavailable): dropped, it counts as nothing."""
        self._settle(attempt)

    def delay(self, failures: int) -> float:
        """Seconds to hold back the refusal of the ``failures``-th failure: 0, then doubling."""
        if failures <= 1:
            return 0.0
        settings = self.settings
        doublings = min(failures - 2, MAX_DELAY_DOUBLINGS)
        return float(min(settings.first_delay * 2.0**doublings, settings.max_delay))


class ConnectionCounts:
    """Open sessions per client address, refused above the limit.

    An entry lives only while its sessions are open, so the map is bounded by the process's
    open sockets.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._open)

    def acquire(self, address: str) -> bool:
        """Take a slot for a new session from ``address``; False: the address has too many."""
        key = client_key(address)
        if self._open[key] >= self.limit:
            return False
        self._open[key] += 1
        return True

    def release(self, address: str) -> None:
        """Give back the slot ``acquire`` granted."""
        _release(self._open, client_key(address))


class Limits:
    """All limits of one proxy process, with the clock their bookkeeping reads."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.logins = LoginThrottle(settings.failed_logins)
        self.connections = ConnectionCounts(settings.connections_per_ip)


def connection_refusal(protocol: ListenerProtocol, server_name: str) -> bytes:
    """What a plaintext listener sends instead of its greeting to a client above the limit.

    Each protocol's own refusal at that point, all temporary so clients and MTAs retry later:
    IMAP ``BYE`` (RFC 3501 section 7.1.5) with RFC 5530 ``[UNAVAILABLE]``; POP3 ``-ERR`` with
    RFC 3206 ``[SYS/TEMP]``; SMTP ``421`` with the server's name (RFC 5321 sections 3.8 and 4.2.3),
    worded as Postfix words its own per-client connection limit.
    """
    match protocol:
        case "imap":
            return b"* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n"
        case "pop3":
            return b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"
        case "submission" | "smtp":
            return b"421 4.7.0 %s Error: too many connections from your address\r\n" % server_name.encode()
        case _:
            assert_never(protocol)
