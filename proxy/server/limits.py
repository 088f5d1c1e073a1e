"""Abuse limits at the edge: failed logins per client address and per user, connections per address.

One ``Limits`` lives in the ``ProxyContext``, so every listener of a proxy shares it. The session
driver takes a connection slot per client once it knows the client's real address (after a
trusted PROXY header) and gives it back when the session ends; before a login goes to a backend
it asks ``LoginThrottle.locked`` (a locked address or user gets the protocol's temporary failure,
and no backend is asked), and afterwards it reports the verdict: ``failed`` answers how long to
hold the refusal back, ``succeeded`` forgets the user's failures (never the address's: one valid
account must not wash away an address's guessing).

The bookkeeping takes ``now`` as an argument (the driver reads ``Limits.clock``), so tests step
time by hand. Memory is bounded: failure records expire ``lockout`` seconds after their last
failure and each map keeps at most MAX_TRACKED_ADDRESSES / MAX_TRACKED_USERS entries (the least
recently failed is dropped first), so spraying addresses or user names cannot grow it; connection
slots exist only while their sessions are open. Never sees a password, never logs, never sleeps.
"""

import collections
import functools
import ipaddress
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
# client_key runs three times per session (the connection slot taken and given back, the lockout
# check) and ipaddress's parsing is most of a login's bookkeeping; a proxy sees far fewer distinct
# addresses at once than this, and 4,096 short strings cost well under 1 MB.
CLIENT_KEY_CACHE_SIZE = 4096
# 2 ** 62 seconds is beyond any cap a settings file can name; keeps the float power finite.
MAX_DELAY_DOUBLINGS = 62

Scope = Literal["ip", "user"]


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
    """Logins are refused for this address or user until ``until`` (clock seconds)."""

    scope: Scope
    until: float


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


class LoginThrottle:
    """Failed logins per client address and per user: a growing delay, then temporary refusal."""

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

    def tracked(self, scope: Scope) -> int:
        """How many addresses or users have failures on record."""
        return len(self._counts[scope])

    def _keys(self, address: str, user: str) -> dict[Scope, str]:
        return {"ip": client_key(address), "user": user_key(user)}

    def locked(self, address: str, user: str, now: float) -> Lock | None:
        """The lock (address first) that refuses this login now, if any."""
        for scope, key in self._keys(address, user).items():
            record = self._counts[scope].get(key, now)
            if record is not None and record.count >= self._limits[scope]:
                # The lock ends when the record expires: a refused login is not a failure and
                # extends nothing, so a patient user gets one try per lockout.
                return Lock(scope, record.last + self.settings.lockout)
        return None

    def failed(self, address: str, user: str, now: float) -> Penalty:
        """Count a failed login of ``user`` from ``address``."""
        counts = {
            scope: self._counts[scope].add(key, now) for scope, key in self._keys(address, user).items()
        }
        locked = tuple(scope for scope, count in counts.items() if count == self._limits[scope])
        return Penalty(self.delay(max(counts.values())), locked)

    def succeeded(self, user: str) -> None:
        """A login of ``user`` worked: its failures are forgotten (the address's are not)."""
        self._counts["user"].forget(user_key(user))

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
        key = client_key(address)
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]


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
