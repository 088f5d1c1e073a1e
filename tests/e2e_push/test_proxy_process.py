"""``mailgress proxy`` in controller mode, as a real process, fed by a real Publisher.

The test plays the controller: it compiles the testbed's MailRoutes, publishes the table on a
loopback Publisher and writes the snapshot file, while real proxy processes (testbed.proxyfleet:
settings with a ``controller`` key) subscribe, acknowledge and carry IMAP logins to the testbed's
Dovecot. It checks the wiring the unit tests cannot: the CLI picks the subscriber, readiness waits
for a table, a pushed table changes where logins go, a controller outage changes nothing, and a
proxy started during the outage serves the snapshot. These proxies keep the default limits: the
login refused once its route is gone is held the default refusalTime, the end-to-end run of the
hold the other e2e suites turn off to stay fast. A proxy started while the controller is away
and with no snapshot has no table: it listens, and imaplib, poplib and smtplib (submission and
MX) get their protocol's temporary failure, which counts towards neither the lockout nor
max_errors. Blocking clients run in threads so the Publisher keeps serving; every wait is bounded
in count and time.
"""

import asyncio
import imaplib
import poplib
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controller import publisher
from mailgress import standalone
from proxy import settings as proxy_settings
from proxy import table
from testbed import backends as testbed_backends
from testbed import clients, mailservers, proxyfleet, proxyprocess

POLL = 0.02
POLLS = 1000  # 20 s at most for any one wait


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"never happened: {what}")


def compile_routes(bed: testbed_backends.Backends, domains: tuple[str, ...]) -> table.RoutingTable:
    """The table the controller would publish for the testbed routes of ``domains``."""
    services = proxy_settings.parse(
        {"listeners": [{"protocol": "imap", "address": "127.0.0.1", "port": 1}], "services": bed.services()},
        bed.directory,
    ).services
    bodies = [route for route in bed.mailroutes() if route["spec"]["domains"][0] in domains]
    compiled, problems = standalone.compile_bodies(bodies, services)
    assert problems == []
    return compiled.table


def user_of(bed: testbed_backends.Backends, domain: str) -> mailservers.User:
    return next(user for address, user in bed.users.items() if address.endswith("@" + domain))


def refusals_held(proxy: proxyprocess.ProxyProcess) -> list[str]:
    """The ``held_back`` of each session line in ``proxy``'s log whose login no route owned."""
    return [
        line.rsplit(" held_back=", 1)[1]
        for line in proxy.log_text().splitlines()
        if "mailgress.session: session " in line and " login=no_route " in line
    ]


def imap_login(port: int, user: mailservers.User) -> None:
    """Log in through the proxy and out again; raises imaplib.IMAP4.error when refused."""
    with clients.imap(port) as client:
        client.login(user.address, user.password)


@pytest.fixture
async def deployment(backends: testbed_backends.Backends) -> AsyncIterator[proxyfleet.Deployment]:
    directory = backends.directory / "push"
    directory.mkdir(exist_ok=True)
    made = proxyfleet.Deployment(Path(directory))
    yield made
    await made.stop_proxies()
    for proxy in made.proxies:
        log = proxy.log_text()
        assert proxyfleet.PUSH_TOKEN not in log
        assert testbed_backends.PASSWORD_MARKER not in log


async def test_pushed_tables_route_real_logins_through_an_outage(
    backends: testbed_backends.Backends, deployment: proxyfleet.Deployment
) -> None:
    alpha, beta = user_of(backends, testbed_backends.ALPHA), user_of(backends, testbed_backends.BETA)
    both = compile_routes(backends, testbed_backends.DOMAINS)
    beta_only = compile_routes(backends, (testbed_backends.BETA,))
    controller = await deployment.start_controller(both)
    try:
        first = await deployment.start_proxy("proxy-a")
        await eventually(
            lambda: controller.acks().get("proxy-a") == publisher.Ack(both.version, True, ""), "ack"
        )
        assert f'version="{both.version}"' in first.metrics()
        await asyncio.to_thread(imap_login, first.settings.ports.imap, alpha)

        controller.publish(beta_only)  # the alpha route is deleted
        await eventually(lambda: controller.acks()["proxy-a"].version == beta_only.version, "ack")
        with pytest.raises(imaplib.IMAP4.error):
            await asyncio.to_thread(imap_login, first.settings.ports.imap, alpha)
        default_hold = f"{proxy_settings.DEFAULT_LOGIN_REFUSAL_TIME:g}s"
        await eventually(lambda: refusals_held(first) == [default_hold], "the refusal held refusalTime")
        await asyncio.to_thread(imap_login, first.settings.ports.imap, beta)
        deployment.snapshot_file.write_bytes(table.to_json(beta_only))  # as the Secret would hold
    finally:
        await controller.stop()

    # The controller is away: the running proxy keeps its table, a new one boots from the snapshot.
    await asyncio.to_thread(imap_login, first.settings.ports.imap, beta)
    second = await deployment.start_proxy("proxy-b")
    assert f'version="{beta_only.version}"' in second.metrics()
    await asyncio.to_thread(imap_login, second.settings.ports.imap, beta)

    controller = await deployment.start_controller(both)  # back, with the alpha route restored
    try:
        expected = {name: publisher.Ack(both.version, True, "") for name in ("proxy-a", "proxy-b")}
        await eventually(lambda: controller.acks() == expected, "both proxies ack")
        for proxy in (first, second):
            await asyncio.to_thread(imap_login, proxy.settings.ports.imap, alpha)
    finally:
        await controller.stop()


# A password never sent to any backend: the proxy's log must not hold it either.
NO_TABLE_PASSWORD = "no-table-password-never-logged"
NO_TABLE_USER = "anna@alpha.example"
# More attempts on one connection than the default maxErrors (5): none of them may count.
NO_TABLE_ATTEMPTS = 6


def imap_without_table(port: int) -> None:
    with clients.imap(port) as client:
        for _ in range(NO_TABLE_ATTEMPTS):
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Service temporarily unavailable"):
                client.login(NO_TABLE_USER, NO_TABLE_PASSWORD)
        assert client.noop()[0] == "OK"


def pop3_without_table(port: int) -> None:
    with clients.pop3(port) as client:
        for _ in range(NO_TABLE_ATTEMPTS):
            client.user(NO_TABLE_USER)
            with pytest.raises(
                poplib.error_proto, match=r"-ERR \[SYS/TEMP\] Temporary authentication failure"
            ):
                client.pass_(NO_TABLE_PASSWORD)
        assert client.noop().startswith(b"+OK")


def submission_without_table(port: int) -> None:
    with clients.smtp(port) as client:
        client.ehlo()
        client.user, client.password = NO_TABLE_USER, NO_TABLE_PASSWORD
        for _ in range(NO_TABLE_ATTEMPTS):
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.auth("PLAIN", client.auth_plain)
            assert (refused.value.smtp_code, refused.value.smtp_error) == (
                454,
                b"4.7.0 Temporary authentication failure",
            )
        assert client.noop()[0] == 250


def mx_without_table(port: int) -> None:
    with clients.smtp(port) as client:
        for _ in range(NO_TABLE_ATTEMPTS):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("sender@example.net", [NO_TABLE_USER], b"Subject: x\r\n\r\nx\r\n")
            # 4xx: the sender keeps the mail and retries; a 5xx here would bounce it.
            assert refused.value.recipients == {
                NO_TABLE_USER: (451, b"4.4.1 Mail server unavailable, try again later")
            }
        assert client.noop()[0] == 250


@pytest.mark.parametrize(
    ("protocol", "client"),
    [
        ("imap", imap_without_table),
        ("pop3", pop3_without_table),
        ("submission", submission_without_table),
        ("smtp", mx_without_table),
    ],
)
async def test_a_proxy_without_a_table_answers_logins_with_temporary_failures(
    tmp_path: Path, protocol: str, client: Callable[[int], None]
) -> None:
    deployment = proxyfleet.Deployment(tmp_path)  # no controller on its port, no snapshot
    try:
        proxy = await deployment.start_proxy("proxy-a", ready=False)
        await asyncio.to_thread(client, proxy.settings.ports.listener_port(protocol))
        assert proxy.get("/readyz")[0] == 503
        metrics = proxy.metrics()
    finally:
        await deployment.stop_proxies()
    counted = (
        f'mailgress_proxy_logins_total{{outcome="unavailable",protocol="{protocol}"}} {NO_TABLE_ATTEMPTS:.1f}'
    )
    assert counted in metrics
    assert 'outcome="throttled"' not in metrics
    log = proxy.log_text()
    reason = f"{protocol} login answered with a temporary failure: no routing table yet"
    assert log.count(reason) == 1  # logged once; the metric above counts every attempt
    sessions = [line for line in log.splitlines() if "mailgress.session: session " in line]
    assert len(sessions) == 1 and sessions[0].endswith(" held_back=0s"), sessions
    assert NO_TABLE_PASSWORD not in log
