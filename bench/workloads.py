"""The measured runs: one workload against one started target, read into a ``Measurement``.

``bench.runner`` has a ``Runner`` measure every (round, workload, target). Each run warms the
target up (login sessions, or a few submissions before an SMTP run), reads the CPU counters
(the proxy's, the mail servers', this process's and the machine's), does a bounded amount of
work, reads them again and returns what happened: operations, failures, wall time, CPU by
whom, login latencies, bytes relayed, resident memory per idle connection, messages delivered
intact. Every loop here is bounded in count, and every client dialogue in time. Failures are
counted, never hidden.
"""

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import uvloop

from bench import clients, measure, targets
from testbed import mailservers, messages

# Sessions a target serves before the counters are read: the first sessions of a fresh process
# pay for lazy imports, first allocations and pool fills that a long-lived proxy paid long ago.
WARMUP_SESSIONS = 20
WARMUP_MESSAGES = 3
# Idle connections are opened this many at a time (the backends' login processes queue the rest).
IDLE_OPENERS = 50
# After the last idle connection logged in, wait this long before reading the proxy's memory, so
# replies still in flight are done and the reading is of idle connections.
IDLE_SETTLE = 1.0
SMTP_MESSAGE_SIZE = 100 * 1024  # "SMTP submission of 100 KiB messages"
# Postfix delivers asynchronously; every submitted message must be in the maildir within this.
DELIVERY_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True, slots=True)
class Scale:
    """How much work each run does; ``FULL`` for the published table, ``QUICK`` to try things."""

    rounds: int
    sessions: int  # per saturation run
    concurrency: int  # clients at once in session and SMTP runs (SMTP: enough to fill Postfix)
    paced_sessions: int
    paced_rate: float  # sessions per second, the same for every target
    fetches: int  # 20 MB FETCHes per relay run
    small_fetches: int  # FETCH 1:N of the small messages per run (targets.SMALL_MESSAGES each)
    smtp_messages: int
    idle: tuple[int, ...]  # idle connection counts, one workload each
    load_users: int


FULL = Scale(
    # Five rounds: the medians must hold up against neighbours that use a core or more at times.
    rounds=5,
    sessions=3000,
    concurrency=50,
    paced_sessions=1000,
    paced_rate=100.0,
    fetches=50,
    # 80 FETCHes of 1,000 8 KiB messages: 655 MB per run. A FETCH 1:1000 took 20-70 ms here (a
    # quick run: 120-440 MB/s), and the proxy's CPU is counted in 10 ms ticks: at 0.4 CPU s per
    # GB, 655 MB is about 26 ticks, where 200 MB would be 8 (one tick more or less: 12%).
    small_fetches=80,
    # 2,000 messages: a run of 500 lasted under a second, short enough that one burst of a
    # neighbour's work moved its rate by a third (the min-max spread in docs/benchmarks.md).
    smtp_messages=2000,
    idle=(2000, 5000),
    load_users=250,
)
QUICK = Scale(
    rounds=3,
    sessions=400,
    concurrency=50,
    paced_sessions=200,
    paced_rate=100.0,
    fetches=10,
    small_fetches=10,
    smtp_messages=200,
    idle=(2000,),
    load_users=250,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """One workload against one target in one round."""

    workload: str
    target: str
    round: int
    operations: int  # sessions, FETCHes, messages (also fetched ones) or idle connections completed
    failures: int
    first_failure: str  # "" when there was none
    seconds: float  # wall time of the measured part
    cpu: measure.CpuUse
    latencies: tuple[float, ...] = ()  # login latencies, seconds
    relayed_bytes: int = 0  # FETCH literal octets moved
    rss_per_connection: float | None = None  # bytes; idle runs through a proxy only
    intact: int | None = None  # SMTP: submitted messages found byte-identical at the backend

    @classmethod
    def failed(cls, workload: str, target: str, round_number: int, reason: str) -> "Measurement":
        """A run that could not start: its target failed the warm-up."""
        idle = measure.CpuUse(proxy=0.0, proxy_user=0.0, auth=0.0, backends=0.0, bench=0.0, other=0.0)
        return cls(workload, target, round_number, 0, 1, reason, 0.0, idle)


class WarmUpError(Exception):
    """The target failed the few operations that precede a measured run; the run is skipped."""


@dataclasses.dataclass(slots=True)
class _Tally:
    """What the clients of one run report back."""

    done: int = 0
    failures: int = 0
    first_failure: str = ""

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if not self.first_failure:
            self.first_failure = f"{type(error).__name__}: {error}"[:200]


def compare_copies(stored: Sequence[bytes], fetched: Sequence[bytes], tally: _Tally, step: str) -> None:
    """Count each stored message that came back byte for byte as done, any other as failed.

    The comparison is by content, not by position: Dovecot numbers maildir messages in the order
    it lists them, which need not be the order they were delivered in. A message that came back
    twice while another is missing counts the missing one as failed; an altered copy is one
    failure (its stored message is missing, the copy matches none).
    """
    wanted = collections.Counter(stored)
    unexpected = 0
    for message in fetched:
        if wanted[message] > 0:
            wanted[message] -= 1
            tally.done += 1
        else:
            unexpected += 1
    missing = sum(wanted.values())
    for _ in range(max(missing, unexpected)):
        tally.failed(
            clients.DialogueError(
                f"{step}: {missing} stored messages did not come back intact; "
                f"{unexpected} copies match none of them"
            )
        )


_CLIENT_ERRORS = (clients.DialogueError, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError)


class _Accounts:
    """Hands each client slot its own accounts in turn, so no account is in two sessions at once."""

    def __init__(self, accounts: Sequence[clients.Account], slots: int) -> None:
        if len(accounts) < slots:
            raise ValueError(f"{slots} concurrent clients need at least {slots} accounts")
        self._accounts = accounts
        self._slots = slots
        self._uses = [0] * slots

    def next(self, slot: int) -> clients.Account:
        index = (slot + self._uses[slot] * self._slots) % len(self._accounts)
        self._uses[slot] += 1
        return self._accounts[index]


Session = Callable[[clients.Account], Awaitable[float]]


async def _one(session: Session, account: clients.Account, tally: _Tally, latencies: list[float]) -> None:
    try:
        latencies.append(await session(account))
        tally.done += 1
    except _CLIENT_ERRORS as error:
        tally.failed(error)


async def _saturate(
    session: Session, accounts: _Accounts, count: int, concurrency: int, tally: _Tally
) -> list[float]:
    """``count`` sessions, ``concurrency`` at a time, each client starting its next at once."""
    latencies: list[float] = []
    started = itertools.count()

    async def client(slot: int) -> None:
        while next(started) < count:
            await _one(session, accounts.next(slot), tally, latencies)

    await asyncio.gather(*(client(slot) for slot in range(concurrency)))
    return latencies


async def _paced(
    session: Session, accounts: _Accounts, count: int, *, rate: float, concurrency: int, tally: _Tally
) -> list[float]:
    """``count`` sessions started at ``rate`` per second (open loop), at most ``concurrency`` at once."""
    latencies: list[float] = []
    free_slots: asyncio.Queue[int] = asyncio.Queue()
    for slot in range(concurrency):
        free_slots.put_nowait(slot)
    loop = asyncio.get_running_loop()

    async def client(slot: int) -> None:
        try:
            await _one(session, accounts.next(slot), tally, latencies)
        finally:
            free_slots.put_nowait(slot)

    begin = loop.time()
    tasks = []
    for number in range(count):
        delay = begin + number / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client(await free_slots.get())))
    await asyncio.gather(*tasks)
    return latencies


class Runner:
    """Runs workloads against one target within one round's bed."""

    def __init__(self, bed: targets.Bed, target: targets.Target, scale: Scale, round_number: int) -> None:
        self.bed = bed
        self.target = target
        self.scale = scale
        self.round = round_number
        self._meter = measure.CpuMeter(
            [] if target.session is None else [target.session],
            [] if target.auth_session is None else [target.auth_session],
            bed.backend_sessions(),
        )

    def _imap(self, account: clients.Account) -> Awaitable[float]:
        return clients.imap_session(self.target.port("imap", account.address), account)

    def _pop3(self, account: clients.Account) -> Awaitable[float]:
        return clients.pop3_session(self.target.port("pop3", account.address), account)

    def _accounts(self, slots: int) -> _Accounts:
        return _Accounts(self.bed.load_accounts, slots)

    async def _warm_up(self, session: Session, count: int = WARMUP_SESSIONS) -> None:
        """A few operations before the counters are read; raises WarmUpError if one fails."""
        tally = _Tally()
        await _saturate(session, self._accounts(1), count, 1, tally)
        if tally.failures:
            raise WarmUpError(f"warm-up: {tally.first_failure}")

    def _measurement(
        self,
        workload: str,
        tally: _Tally,
        seconds: float,
        cpu: measure.CpuUse,
        *,
        latencies: Sequence[float] = (),
        relayed_bytes: int = 0,
        rss_per_connection: float | None = None,
    ) -> Measurement:
        return Measurement(
            workload=workload,
            target=self.target.name,
            round=self.round,
            operations=tally.done,
            failures=tally.failures,
            first_failure=tally.first_failure,
            seconds=seconds,
            cpu=cpu,
            latencies=tuple(latencies),
            relayed_bytes=relayed_bytes,
            rss_per_connection=rss_per_connection,
        )

    # -- login sessions ------------------------------------------------------------------------

    def sessions(self, workload: str, protocol: str, *, paced: bool) -> Measurement:
        """IMAP LOGIN/SELECT/LOGOUT or POP3 USER/PASS/STAT/RETR/QUIT sessions."""
        session = self._imap if protocol == "imap" else self._pop3
        scale = self.scale

        async def work() -> Measurement:
            await self._warm_up(session)
            tally = _Tally()
            before, started = self._meter.read(), time.perf_counter()
            if paced:
                latencies = await _paced(
                    session,
                    self._accounts(scale.concurrency),
                    scale.paced_sessions,
                    rate=scale.paced_rate,
                    concurrency=scale.concurrency,
                    tally=tally,
                )
            else:
                latencies = await _saturate(
                    session, self._accounts(scale.concurrency), scale.sessions, scale.concurrency, tally
                )
            seconds, after = time.perf_counter() - started, self._meter.read()
            return self._measurement(
                workload, tally, seconds, measure.CpuUse.between(before, after), latencies=latencies
            )

        return uvloop.run(work())

    # -- the 20 MB FETCH -----------------------------------------------------------------------

    def fetch(self, workload: str) -> Measurement:
        """One IMAP session FETCHes the 20 MB message ``scale.fetches`` times; compares every copy."""
        expected = self.bed.fetch_message
        into = bytearray(len(expected))

        def fetch_once(client: clients.BlockingImap, number: int, tally: _Tally) -> int:
            size = client.fetch_into(f"f{number} ".encode(), 1, into)
            if size == len(expected) and into == expected:
                tally.done += 1
            else:
                tally.failed(clients.DialogueError(f"FETCH {number}: the message came back altered"))
            return size

        return self._fetch_runs(workload, targets.FETCH_ADDRESS, self.scale.fetches, fetch_once)

    # -- many small messages -------------------------------------------------------------------

    def fetch_small(self, workload: str) -> Measurement:
        """One IMAP session FETCHes 1:N (the small messages) ``scale.small_fetches`` times; every
        message of every reply is compared with what was stored."""
        stored = self.bed.small_messages

        def fetch_once(client: clients.BlockingImap, number: int, tally: _Tally) -> int:
            fetched = client.fetch_all(f"f{number} ".encode(), len(stored))
            compare_copies(stored, fetched, tally, f"FETCH {number}")
            return sum(map(len, fetched))

        def index(client: clients.BlockingImap) -> None:
            # Unmeasured: Dovecot's first read of the maildir builds its index and cache.
            client.fetch_all(b"w ", len(stored))

        return self._fetch_runs(
            workload, targets.SMALL_ADDRESS, self.scale.small_fetches, fetch_once, prepare=index
        )

    def _fetch_runs(
        self,
        workload: str,
        address: str,
        rounds: int,
        fetch_once: Callable[[clients.BlockingImap, int, _Tally], int],
        *,
        prepare: Callable[[clients.BlockingImap], None] | None = None,
    ) -> Measurement:
        """After the warm-up, one IMAP session of ``address`` selects INBOX, runs ``prepare``
        (unmeasured), then ``fetch_once`` ``rounds`` times, measured: each tallies its copies and
        returns the bytes it relayed. A broken FETCH ends the runs."""
        uvloop.run(self._warm_up(self._imap))
        account = self.bed.account(address)
        tally = _Tally()
        relayed = 0
        try:
            client = clients.BlockingImap(self.target.port("imap", account.address))
        except OSError as error:
            raise WarmUpError(f"connecting for the FETCH: {error}") from error
        try:
            try:
                client.login(account)
                client.command(b"b ", b"SELECT INBOX", "SELECT")
                if prepare is not None:
                    prepare(client)
            except _CLIENT_ERRORS as error:
                raise WarmUpError(f"login before the FETCH: {error}") from error
            before, started = self._meter.read(), time.perf_counter()
            for number in range(rounds):
                try:
                    relayed += fetch_once(client, number, tally)
                except _CLIENT_ERRORS as error:
                    tally.failed(error)
                    break  # the connection's state is unknown after a broken FETCH
            seconds, after = time.perf_counter() - started, self._meter.read()
        finally:
            client.close()
        return self._measurement(
            workload, tally, seconds, measure.CpuUse.between(before, after), relayed_bytes=relayed
        )

    # -- SMTP submission -----------------------------------------------------------------------

    def _message_batch(self, recipient: str, count: int) -> list[bytes]:
        sender = self.bed.load_accounts[0].address
        return [messages.large(sender, recipient, SMTP_MESSAGE_SIZE) for _ in range(count)]

    def _submitter(self, recipient: str, data: Iterator[bytes]) -> Session:
        def submit(account: clients.Account) -> Awaitable[float]:
            port = self.target.port("submission", account.address)
            return clients.smtp_submission(port, account, recipient, next(data))

        return submit

    def smtp(self, workload: str) -> Measurement:
        """Submit 100 KiB messages (one session each, AUTH PLAIN); byte-compare each delivery."""
        scale = self.scale
        recipient = targets.sink_address(self.target.name)
        sent = self._message_batch(recipient, scale.smtp_messages)
        stuffed = iter([clients.dot_stuffed(message) for message in sent])
        warmup = iter(
            [clients.dot_stuffed(m) for m in self._message_batch(targets.WARMUP_RECIPIENT, WARMUP_MESSAGES)]
        )

        async def work() -> Measurement:
            await self._warm_up(self._submitter(targets.WARMUP_RECIPIENT, warmup), WARMUP_MESSAGES)
            tally = _Tally()
            before, started = self._meter.read(), time.perf_counter()
            latencies = await _saturate(
                self._submitter(recipient, stuffed),
                self._accounts(scale.concurrency),
                scale.smtp_messages,
                scale.concurrency,
                tally,
            )
            seconds, after = time.perf_counter() - started, self._meter.read()
            return self._measurement(
                workload, tally, seconds, measure.CpuUse.between(before, after), latencies=latencies
            )

        result = uvloop.run(work())
        return dataclasses.replace(result, intact=self._intact(recipient, sent, result.operations))

    def _intact(self, recipient: str, sent: Sequence[bytes], accepted: int) -> int:
        """How many of ``sent`` arrived at ``recipient`` byte for byte (as Postfix stores them)."""
        with contextlib.suppress(mailservers.DeliveryTimeoutError):
            self.bed.backends.wait_delivered(recipient, accepted, timeout=DELIVERY_TIMEOUT)
        delivered = {
            mailservers.strip_delivery_headers(m) for m in self.bed.backends.maildir(recipient).messages()
        }
        return sum(mailservers.as_stored(message) in delivered for message in sent)

    # -- idle connections ----------------------------------------------------------------------

    def idle(self, workload: str, count: int) -> Measurement:
        """Open ``count`` logged-in IMAP connections in two halves; the memory per connection is
        the proxy's resident memory's slope over the second half.

        Not (RSS after ``count`` - RSS before) / ``count``: a fresh Python process holds resident
        free memory after start-up that its first connections fill, so that figure undercounts
        (and moves with how the process was launched). The second half's connections find none
        left: (RSS(count) - RSS(count / 2)) / (count / 2), for every target alike.
        """
        session = self.target.session

        def resident() -> int:
            return 0 if session is None else sum(map(measure.resident_bytes, measure.session_pids(session)))

        async def work() -> Measurement:
            await self._warm_up(self._imap)
            await asyncio.sleep(IDLE_SETTLE)
            tally = _Tally()
            held: list[asyncio.StreamWriter] = []
            latencies: list[float] = []
            accounts = self._accounts(IDLE_OPENERS)

            async def opener(slot: int, opened: Iterator[int], limit: int) -> None:
                while next(opened) < limit:
                    account = accounts.next(slot)
                    begin = time.perf_counter()
                    try:
                        async with asyncio.timeout(clients.SESSION_TIMEOUT):
                            _, writer = await clients.imap_login(
                                self.target.port("imap", account.address), account
                            )
                    except _CLIENT_ERRORS as error:
                        tally.failed(error)
                        continue
                    latencies.append(time.perf_counter() - begin)
                    held.append(writer)
                    tally.done += 1

            async def open_more(limit: int) -> None:
                opened = itertools.count()
                await asyncio.gather(*(opener(slot, opened, limit) for slot in range(IDLE_OPENERS)))

            first_half = count // 2
            try:
                before, started = self._meter.read(), time.perf_counter()
                await open_more(first_half)
                seconds, halfway = time.perf_counter() - started, self._meter.read()
                # The second half's memory is read apart from the first's, so both settle first.
                await asyncio.sleep(IDLE_SETTLE)
                half_resident, half_done = resident(), tally.done
                middle, resumed = self._meter.read(), time.perf_counter()
                await open_more(count - first_half)
                seconds, after = seconds + time.perf_counter() - resumed, self._meter.read()
                await asyncio.sleep(IDLE_SETTLE)
                added = tally.done - half_done
                per_connection = (resident() - half_resident) / added if session and added else None
            finally:
                for writer in held:
                    writer.close()
            # The CPU of every login, the settling pause between the halves left out.
            halves = (measure.CpuUse.between(before, halfway), measure.CpuUse.between(middle, after))
            return self._measurement(
                workload,
                tally,
                seconds,
                measure.CpuUse.sum(halves),
                latencies=latencies,
                rss_per_connection=per_connection,
            )

        return uvloop.run(work())
