"""``backends.login`` when endpoints fail: passive health, one budget per login, the logs and the
metrics of an outage, and round-robin per upstream (review J5 M1, M2, L1, L2; review J7 #5); a
backend refusing the client XCLIENT names is that client's refusal, no failure (review M5 #2);
a first recipient's reply has RFC 5321's time, not the budget's (review M5 #3).

Endpoints here are loopback servers that hang (accept, never greet), close or reset in the
dialogue, or refuse the connection. The health clock is a hand-stepped fake, so whether an
endpoint is still failing never depends on how fast the machine runs; the budget's share of an
endpoint that hangs is real time, kept short, and nothing asserts a duration.
"""

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import yaml

from mailgress import standalone
from proxy import balancing
from proxy.protocols import smtp
from proxy.table import Endpoint
from testbed import authservice
from tests.proxy.server.conftest import (
    PASSWORD,
    WAIT,
    FakeImapBackend,
    ProxyFactory,
    RunningProxy,
    dead_port,
    fake_backend,
    imap_client,
    login,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+] fake\r\n"
LOGGER = "proxy.server.backends"


class Clock:
    """The health clock, stepped by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[Endpoint, list[int]]]:
    """A loopback server running ``handler`` per connection; the list counts its connections."""
    accepted: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]), accepted
    finally:
        server.close()
        for writer in writers:
            writer.close()


async def hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts and never greets (a wedged server, a full accept queue behind a balancer)."""
    await reader.read()  # until the proxy gives up


async def greets_in_another_protocol(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 mail.example ESMTP\r\n")  # an SMTP server behind the IMAP port
    await reader.read()


async def resets_at_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    await reader.readline()  # the LOGIN command (LITERAL+: the rest follows unasked)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST, not FIN


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def logs_in(proxy: RunningProxy, user: str) -> bool:
    reply, _, writer = await login(proxy.port, user)
    writer.close()
    return reply.startswith(b"a1 OK")


def pinned_to(first: Endpoint, pool: list[Endpoint]) -> str:
    """A user whose user-hash first choice in ``pool`` is ``first``."""
    return next(
        user
        for user in (f"user{n}@alpha.example" for n in range(1000))
        if balancing.endpoint_order(pool, "user-hash", user)[0] == first
    )


async def test_a_hanging_endpoint_costs_one_login_a_share_then_goes_last(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    async with serving(hangs) as (dead, accepted), fake_backend() as good:
        live = Endpoint("127.0.0.1", good.port)
        user = pinned_to(dead, [dead, live])
        # Two endpoints: the hanging one gets half the budget (1 s), the other the rest.
        proxy = await start_proxy({}, [dead, live], backend_login=2.0)
        proxy.context.clock = clock
        for _ in range(4):
            assert await logs_in(proxy, user)
        assert len(accepted) == 1  # only the first login tried it
        assert good.logins == 4
        assert (
            proxy.metric("mailgress_proxy_backend_login_failures_total", protocol="imap", reason="timeout")
            == 1
        )
        assert proxy.metric("mailgress_proxy_backend_connect_failures_total", protocol="imap") == 0
        [warning] = warnings(caplog)
        assert warning.startswith(f"backend {dead} of mail/alpha failed the login dialogue: timed out;")
        # Its period over, one login retries it; it still hangs, so the period doubles.
        clock.now += balancing.ENDPOINT_RETRY_SECONDS
        assert await logs_in(proxy, user)
        assert await logs_in(proxy, user)
        assert len(accepted) == 2
        episode = proxy.context.health.episode(dead)
        assert episode is not None and episode.failures == 2
        assert episode.period == 2 * balancing.ENDPOINT_RETRY_SECONDS
        assert len(warnings(caplog)) == 1  # the same episode: the retry's failure is a debug line
        assert messages(caplog, logging.DEBUG) == [
            f"backend {dead} of mail/alpha failed the login dialogue: timed out"
        ]


async def test_least_connections_tries_a_failing_endpoint_last(start_proxy: ProxyFactory) -> None:
    clock = Clock()
    async with fake_backend() as good:
        live, dead = Endpoint("127.0.0.1", good.port), Endpoint("127.0.0.1", dead_port())
        proxy = await start_proxy({"balance": "least-connections"}, [live, dead])
        proxy.context.clock = clock
        writers = []
        for n in range(5):  # users staying logged in (IDLE): live has the sessions, dead none
            reply, _, writer = await login(proxy.port, f"user{n}@alpha.example")
            assert reply.startswith(b"a1 OK"), reply
            writers.append(writer)
            for _ in range(int(WAIT / 0.01)):  # until the relay counts the session
                if proxy.context.active[live] == n + 1:
                    break
                await asyncio.sleep(0.01)
        for writer in writers:
            writer.close()
    # The second login found dead first (no sessions) and refused; from then on it came last.
    assert proxy.metric("mailgress_proxy_backend_connect_failures_total", protocol="imap") == 1


async def test_one_budget_for_every_endpoint_and_the_client_keeps_its_time(
    start_proxy: ProxyFactory,
) -> None:
    async with serving(hangs) as (a, _), serving(hangs) as (b, _), serving(hangs) as (c, _):
        # Three endpoints hanging in a budget of 3 s (1 s each); the client's pre-login deadline
        # (2 s) would be over long before the backends gave up if their time were the client's.
        proxy = await start_proxy({"balance": "round-robin"}, [a, b, c], backend_login=3.0, pre_login=2.0)
        reply, reader, writer = await login(proxy.port, "anna@alpha.example")
        assert reply == b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
        writer.write(b"a2 NOOP\r\n")  # the client may retry on the same connection
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"a2 OK NOOP completed\r\n"
        writer.close()
    assert (
        proxy.metric("mailgress_proxy_backend_login_failures_total", protocol="imap", reason="timeout") == 3
    )
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 0


def refusing_after(delay: float) -> Handler:
    """A backend that greets at once and refuses the password after ``delay`` seconds (Dovecot's
    auth_failure_delay: a wrong password is answered late, the right one at once)."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        line = b""
        for _ in range(8):  # LOGIN with two literals: three lines at most; bounded
            line = await reader.readline()
            if not line or b"LOGIN" in line:
                break
        await asyncio.sleep(delay)
        tag = line.split(b" ", 1)[0]
        writer.write(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        await writer.drain()

    return refuse


async def test_a_greeted_endpoints_late_refusal_is_a_refusal_not_an_outage(start_proxy: ProxyFactory) -> None:
    """Review K1: each endpoint's share cut a refusal its backend delays (a guessed password),
    so the guess got NO [UNAVAILABLE], the throttle never counted it, and the next endpoint was
    given the credentials too. Once greeted, an endpoint has what is left of the budget."""
    slow = refusing_after(3.5)  # longer than an endpoint's share (2 s), shorter than the budget (6 s)
    async with serving(slow) as (a, first), serving(slow) as (b, second), serving(slow) as (c, third):
        proxy = await start_proxy({"balance": "round-robin"}, [a, b, c], backend_login=6.0)
        reply, _, writer = await login(proxy.port, "anna@alpha.example")
        writer.close()
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert sum(first) + sum(second) + sum(third) == 1, "the credentials went to one endpoint only"
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="rejected") == 1


async def test_an_endpoint_greeting_late_in_the_budget_still_has_time_to_refuse(
    start_proxy: ProxyFactory,
) -> None:
    """Review L1: two hanging endpoints ahead used 2/3 of the budget, the one that greeted had
    the third left, less than its failure delay: every guess was an outage the throttle never
    counted. A greeted endpoint has at least half of backendLogin."""
    async with serving(hangs) as (a, _), serving(hangs) as (b, _), serving(refusing_after(4.2)) as (live, _):
        pool = [a, b, live]
        user = next(  # a user whose user-hash order tries both hanging endpoints first
            f"user{n}@alpha.example"
            for n in range(5000)
            if balancing.endpoint_order(pool, "user-hash", f"user{n}@alpha.example") == [a, b, live]
        )
        # Shares of 10/3 s each: the live endpoint greets with 3.3 s left, and refuses at 4.2 s.
        proxy = await start_proxy({"balance": "user-hash"}, pool, backend_login=10.0)
        reader, writer = await imap_client(proxy.port)
        writer.write(f'a1 LOGIN {user} "{PASSWORD}"\r\n'.encode())
        reply = await asyncio.wait_for(reader.readline(), 10.0 * 1.5 + WAIT)  # a login's bound, and more
        writer.close()
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="rejected") == 1


async def test_retrying_while_backends_hang_still_runs_out_of_pre_login_time(
    start_proxy: ProxyFactory,
) -> None:
    """Review K1: every temporary failure moved the pre-login deadline on by the backends' time,
    so a client retrying LOGIN held its connection for ever; backend time adds at most one
    backendLogin over the session."""
    async with serving(hangs) as (endpoint, _):
        proxy = await start_proxy({}, [endpoint], backend_login=0.5, pre_login=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.wait_for(reader.readline(), WAIT)  # the greeting
        closed = False
        for attempt in range(40):  # 40 backend timeouts would be 20 s; the session ends first
            writer.write(b"a%d LOGIN anna@alpha.example secret\r\n" % attempt)
            reply = await asyncio.wait_for(reader.readline(), WAIT)
            if reply.startswith(b"* BYE") or not reply:
                closed = True
                break
            assert b"[UNAVAILABLE]" in reply
        writer.close()
    assert closed, "the session outlived every retry"
    assert proxy.metric("mailgress_proxy_refusals_total", reason="pre_login_timeout") == 1


async def test_pipelined_logins_cannot_outlive_the_pre_login_time(start_proxy: ProxyFactory) -> None:
    """Review L1: the pre-login scope was disarmed for every login, and the timeout queued when the
    deadline passed was disarmed again by the next LOGIN pipelined behind it: 300 LOGINs in one
    write held a session 15 s against a bound of 0.55 s, each with a backend connection."""
    async with serving(hangs) as (endpoint, connections):
        proxy = await start_proxy({}, [endpoint], backend_login=0.5, pre_login=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.wait_for(reader.readline(), WAIT)  # the greeting
        writer.write(b"".join(b"a%d LOGIN anna@alpha.example secret\r\n" % n for n in range(20)))
        replies = []
        for _ in range(21):  # bounded: one reply per LOGIN and the closing line at most
            line = await asyncio.wait_for(reader.readline(), WAIT)
            replies.append(line)
            if not line or line.startswith(b"* BYE"):
                break
        writer.close()
    assert replies[-1].startswith(b"* BYE"), replies
    # preLogin (1 s) and one backendLogin (0.5 s) of backend time: three logins at most.
    assert len(connections) <= 3 and len(replies) <= 4, (len(connections), replies)


async def test_login_dialogue_failures_are_counted_by_reason(start_proxy: ProxyFactory) -> None:
    async with (
        serving(greets_in_another_protocol) as (smtp, _),
        serving(resets_at_login) as (resets, _),
        fake_backend() as good,
    ):
        proxy = await start_proxy({}, [smtp, resets])
        assert not await logs_in(proxy, "anna@alpha.example")
        plain = await start_proxy(  # TLS towards a plaintext server: the handshake fails
            {"imap": {"backend": {"service": "dovecot", "port": 143}, "tls": "tls"}},
            [Endpoint("127.0.0.1", good.port)],
        )
        assert not await logs_in(plain, "anna@alpha.example")

    def failures(running: RunningProxy, reason: str) -> float:
        return running.metric("mailgress_proxy_backend_login_failures_total", protocol="imap", reason=reason)

    assert [failures(proxy, reason) for reason in ("dialogue", "connection", "timeout", "tls")] == [
        1,
        1,
        0,
        0,
    ]
    assert failures(plain, "tls") == 1
    assert proxy.metric("mailgress_proxy_backend_connect_failures_total", protocol="imap") == 0


async def test_an_outage_is_logged_when_it_begins_and_when_it_ends(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    backend = FakeImapBackend()
    broken = True

    async def switchable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if broken:
            writer.close()  # closed before the greeting
        else:
            await backend.handle(reader, writer)

    async with serving(switchable) as (endpoint, _), serving(switchable) as (other, _):
        proxy = await start_proxy({"balance": "round-robin"}, [endpoint, other])
        proxy.context.clock = clock
        for _ in range(5):
            assert not await logs_in(proxy, "anna@alpha.example")
        assert len(warnings(caplog)) == 2  # one per endpoint, not one per login and endpoint
        assert len(messages(caplog, logging.DEBUG)) == 8
        broken = False
        clock.now += 5.0
        assert await logs_in(proxy, "anna@alpha.example")
        [recovered] = messages(caplog, logging.INFO)
        told = "works again, 5 s after it began failing (failed attempts: 5; the first: failed the login"
        assert any(
            recovered.startswith(f"backend {either} of mail/alpha {told}") for either in (endpoint, other)
        )
        broken = True  # a new outage of the same endpoint is a new episode
        clock.now += balancing.MAX_ENDPOINT_RETRY_SECONDS
        assert not await logs_in(proxy, "anna@alpha.example")
    assert len(warnings(caplog)) == 3


async def test_a_refused_password_is_an_answer_and_ends_the_episode(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    backend = FakeImapBackend()
    broken = True

    async def switchable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if broken:
            writer.close()
        else:
            await backend.handle(reader, writer)

    async with serving(switchable) as (endpoint, _):
        proxy = await start_proxy({}, [endpoint])
        proxy.context.clock = clock
        assert not await logs_in(proxy, "anna@alpha.example")
        assert proxy.context.health.episode(endpoint) is not None
        broken = False
        reply, _, writer = await login(proxy.port, "anna@alpha.example", password="wrong")
        writer.close()
    assert reply == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert proxy.context.health.episode(endpoint) is None
    [recovered] = messages(caplog, logging.INFO)
    assert recovered.startswith(
        f"backend {endpoint} of mail/alpha works again, 0 s after it began failing (failed attempts: 1;"
    )


async def test_an_auth_http_outage_is_logged_once_per_route(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with authservice.AuthService() as service:
        proxy = await start_proxy(
            {"auth": {"mode": "http", "http": {"url": service.url, "timeout": "5s"}}},
            [Endpoint("127.0.0.1", dead_port())],
        )
        with service.down():
            for _ in range(4):
                assert not await logs_in(proxy, "anna@alpha.example")
        assert not await logs_in(proxy, "anna@alpha.example")  # refused: the service answers
    [warning] = warnings(caplog)
    assert warning.startswith("auth_http service of mail/alpha failed: unreachable (")
    assert len(messages(caplog, logging.DEBUG)) == 3
    assert messages(caplog, logging.INFO) == [
        "auth_http service of mail/alpha answers again (failed requests: 4)"
    ]
    assert not proxy.context.auth_failures


def two_routes(services: dict[tuple[str, str, str], tuple[Endpoint, ...]]) -> list[dict[str, object]]:
    return [
        yaml.safe_load(
            yaml.safe_dump(
                {
                    "apiVersion": "mailgress.io/v1alpha1",
                    "kind": "MailRoute",
                    "metadata": {"name": name, "namespace": "mail"},
                    "spec": {
                        "domains": [f"{name}.example"],
                        "imap": {"backend": {"service": service, "port": 143}},
                        "balance": "round-robin",
                    },
                }
            )
        )
        for name, (_, service, _) in zip(("alpha", "beta"), services, strict=True)
    ]


async def test_round_robin_keeps_a_position_per_route(start_proxy: ProxyFactory) -> None:
    async with fake_backend() as a1, fake_backend() as a2, fake_backend() as b1, fake_backend() as b2:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", a1.port)])
        services = {
            ("mail", "dovecot-a", "143"): (Endpoint("127.0.0.1", a1.port), Endpoint("127.0.0.1", a2.port)),
            ("mail", "dovecot-b", "143"): (Endpoint("127.0.0.1", b1.port), Endpoint("127.0.0.1", b2.port)),
        }
        compiled, _ = standalone.compile_bodies(two_routes(services), services)
        proxy.context.tables.swap(compiled.table)
        for _ in range(6):  # a client polling one account on each route, in turn
            for user in ("anna@alpha.example", "bob@beta.example"):
                assert await logs_in(proxy, user)
    assert (a1.logins, a2.logins, b1.logins, b2.logins) == (3, 3, 3, 3)


async def test_a_new_table_forgets_what_it_no_longer_has(start_proxy: ProxyFactory) -> None:
    clock = Clock()
    async with fake_backend() as good:
        live, dead = Endpoint("127.0.0.1", good.port), Endpoint("127.0.0.1", dead_port())
        proxy = await start_proxy({"balance": "round-robin"}, [dead])
        context = proxy.context
        context.clock = clock
        assert not await logs_in(proxy, "anna@alpha.example")
        assert context.health.failing(clock.now) == {dead}
        assert context.positions == {("mail/alpha", "imap"): 1}
        services = {
            ("mail", "dovecot-a", "143"): (dead,),
            ("mail", "dovecot-b", "143"): (live,),
        }
        compiled, _ = standalone.compile_bodies(two_routes(services)[1:], services)  # beta only
        context.tables.swap(compiled.table)
        assert await logs_in(proxy, "bob@beta.example")
    assert len(context.health) == 0
    assert context.positions == {("mail/beta", "imap"): 1}


async def test_an_endpoint_that_left_the_table_during_a_login_gets_no_episode(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(hangs) as (dead, accepted), fake_backend() as good:
        live = Endpoint("127.0.0.1", good.port)
        proxy = await start_proxy({}, [dead], backend_login=1.0)
        attempt = asyncio.create_task(logs_in(proxy, "anna@alpha.example"))
        async with asyncio.timeout(WAIT):
            while not accepted:  # the login is waiting for the hanging endpoint's greeting
                await asyncio.sleep(0.01)
        services = {("mail", "dovecot-a", "143"): (live,), ("mail", "dovecot-b", "143"): (live,)}
        compiled, _ = standalone.compile_bodies(two_routes(services)[:1], services)
        proxy.context.tables.swap(compiled.table)  # the endpoint leaves while its login runs
        assert not await attempt
        assert len(proxy.context.health) == 0
        assert warnings(caplog) == []
        assert messages(caplog, logging.DEBUG) == [
            f"backend {dead} of mail/alpha failed the login dialogue: timed out "
            "(it has left the routing table)"
        ]
        assert await logs_in(proxy, "anna@alpha.example")


@pytest.fixture(autouse=True)
def no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    assert PASSWORD not in caplog.text


# An inbound client up to its first recipient: the greeting, then one command per reply.
FIRST_RECIPIENT = (
    b"",
    b"EHLO client\r\n",
    b"MAIL FROM:<s@example.net>\r\n",
    b"RCPT TO:<a@alpha.example>\r\n",
)


async def smtp_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    """Send ``line`` (b"": nothing); the last line of the reply."""
    writer.write(line)
    for _ in range(20):  # the lines of one reply
        reply = await asyncio.wait_for(reader.readline(), WAIT)
        if reply[3:4] != b"-":
            return reply
    raise AssertionError("no end of reply in 20 lines")


def postfix_refusing_the_client(after: bytes) -> Handler:
    """A Postfix whose client restrictions (smtpd_delay_reject = no) refuse the address XCLIENT
    names: at XCLIENT (``after`` b"XCLIENT") or at the EHLO after it (b"EHLO client")."""
    refusal = b"554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: blocked\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example ESMTP\r\n")
        for _ in range(3):  # EHLO, XCLIENT, EHLO: bounded
            line = await reader.readline()
            if line.startswith(after):
                writer.write(refusal)
            elif line.startswith(b"XCLIENT"):
                writer.write(b"220 mx.example ESMTP\r\n")
            elif line.startswith(b"EHLO"):
                writer.write(b"250-mx.example\r\n250 XCLIENT NAME ADDR PORT\r\n")
            await writer.drain()
        await reader.read()

    return handler


@pytest.mark.parametrize("after", [b"XCLIENT", b"EHLO client"])
async def test_a_backend_refusing_the_real_client_is_no_endpoint_failure(
    start_proxy: ProxyFactory, after: bytes
) -> None:
    """Review M5 #2: the refusal is the client's RCPT reply; before, 451 and a failing endpoint
    (so one blocked client pushed every endpoint to the back of the queue)."""
    async with serving(postfix_refusing_the_client(after)) as (endpoint, _):
        smtp_route = {"smtp": {"backend": {"service": "dovecot", "port": 143}, "clientInfo": "xclient"}}
        proxy = await start_proxy(smtp_route, [endpoint], listener={"protocol": "smtp"})
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            replies = [await smtp_reply(reader, writer, line) for line in FIRST_RECIPIENT]
        finally:
            writer.close()
    assert replies[-1] == b"554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: blocked\r\n"
    context = proxy.context
    assert not context.health.failing(context.clock())
    assert proxy.metric("mailgress_proxy_logins_total", protocol="smtp", outcome="refused") == 1
    assert (
        proxy.metric("mailgress_proxy_backend_login_failures_total", protocol="smtp", reason="dialogue") == 0
    )


def postfix_with_a_slow_policy_check(delay: float) -> Handler:
    """A Postfix whose RCPT policy check (a milter, greylisting) answers after ``delay`` seconds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example ESMTP\r\n")
        for _ in range(4):  # EHLO, MAIL, RCPT, QUIT: bounded
            line = await reader.readline()
            if line.startswith(b"RCPT"):
                await asyncio.sleep(delay)
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 2.0.0 Ok\r\n")
            await writer.drain()
        await reader.read()

    return handler


async def test_the_first_recipients_reply_has_rfc_5321s_time_not_the_login_budgets(
    start_proxy: ProxyFactory,
) -> None:
    """Review M5 #3: RFC 5321 section 4.5.3.2.3 waits 5 minutes for a RCPT reply; before, the
    backendLogin budget cut it (451, and the endpoint counted as failing)."""
    budget, pre_login = 0.2, 1.0
    # Slower than the budget (with its greeted minimum) and than the pre-login time it extends.
    async with serving(postfix_with_a_slow_policy_check(pre_login + budget * 2)) as (endpoint, _):
        smtp_route = {"smtp": {"backend": {"service": "dovecot", "port": 143}}}
        proxy = await start_proxy(
            smtp_route, [endpoint], listener={"protocol": "smtp"}, backend_login=budget, pre_login=pre_login
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            replies = [await smtp_reply(reader, writer, line) for line in FIRST_RECIPIENT]
            assert replies[-1] == b"250 2.0.0 Ok\r\n"
            writer.write(b"QUIT\r\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"221 bye\r\n"  # the backend's
        finally:
            writer.close()
    context = proxy.context
    assert not context.health.failing(context.clock())
    assert proxy.metric("mailgress_proxy_logins_total", protocol="smtp", outcome="accepted") == 1


async def test_a_first_recipient_never_answered_is_a_temporary_failure_not_a_failing_endpoint(
    start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 5321's RCPT time (shortened here) ran out: 451 for the client to retry; the endpoint
    greeted and took EHLO, so it is not failing (no other endpoint is tried after minutes)."""
    monkeypatch.setitem(smtp.ENVELOPE_REPLY_TIMEOUTS, smtp.BackendState.RCPT, 0.3)
    async with serving(postfix_with_a_slow_policy_check(WAIT)) as (endpoint, _):
        smtp_route = {"smtp": {"backend": {"service": "dovecot", "port": 143}}}
        proxy = await start_proxy(smtp_route, [endpoint], listener={"protocol": "smtp"}, backend_login=0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            replies = [await smtp_reply(reader, writer, line) for line in FIRST_RECIPIENT]
        finally:
            writer.close()
    assert replies[-1] == smtp.REPLY_ROUTE_UNAVAILABLE
    context = proxy.context
    assert not context.health.failing(context.clock())
    assert proxy.metric("mailgress_proxy_logins_total", protocol="smtp", outcome="unavailable") == 1
    assert (
        proxy.metric("mailgress_proxy_backend_login_failures_total", protocol="smtp", reason="timeout") == 0
    )


async def closes_at_the_first_recipient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A Postfix going down (or over its limits) between MAIL and RCPT: 421, then the close."""
    writer.write(b"220 mx.example ESMTP\r\n")
    for _ in range(3):  # EHLO, MAIL, RCPT: bounded
        line = await reader.readline()
        writer.write(b"421 4.3.2 Service shutting down\r\n" if line.startswith(b"RCPT") else b"250 Ok\r\n")
        await writer.drain()
    writer.close()


async def test_a_backend_closing_at_the_first_recipient_is_one_421(start_proxy: ProxyFactory) -> None:
    """Review M5 #7: before, the client got the backend's 421 and then the proxy's own."""
    async with serving(closes_at_the_first_recipient) as (endpoint, _):
        smtp_route = {"smtp": {"backend": {"service": "dovecot", "port": 143}}}
        proxy = await start_proxy(smtp_route, [endpoint], listener={"protocol": "smtp"})
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            replies = [await smtp_reply(reader, writer, line) for line in FIRST_RECIPIENT]
            assert replies[-1] == b"421 4.3.2 Service shutting down\r\n"
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, and nothing more
        finally:
            writer.close()
