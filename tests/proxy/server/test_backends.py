"""``backends.login`` through the session driver, for a proxy that has no routing table yet.

A proxy whose controller is unreachable and which has no usable snapshot listens all the same
(process.py says why). Until its first table is installed, every login and every inbound
recipient gets the protocol's temporary failure, which neither counts towards the failed-login
lockout nor towards ``max_errors``; once the table is there, the same connection is routed as
usual. Each protocol is driven over loopback on the shared fixture's
proxy, its holder replaced by one that has not had a table. And ``backends.place_recipient``: where
an auth_http route's service places a later recipient of an inbound session (review M5 #1).
"""

import asyncio
import base64
import dataclasses
import logging
from dataclasses import dataclass

import pytest

from proxy.protocols import pop3, smtp
from proxy.protocols.events import ClientAddress, LoginRequest
from proxy.server import backends
from proxy.server.limits import Limits
from proxy.server.routes import TableHolder
from proxy.settings import FailedLoginSettings, LimitSettings
from proxy.table import Endpoint
from testbed import authservice
from tests.proxy.server.conftest import WAIT, ProxyFactory, dead_port

USER = "anna@other.example"  # a domain no route serves: refused once there is a table
PLAIN = base64.b64encode(b"\0" + USER.encode() + b"\0whatever")
MAX_ERRORS = 3  # what the start_proxy fixture sets
REPLY_LINES = 50  # the most lines any one reply here may have (an EHLO reply has a handful)


@dataclass(frozen=True, slots=True)
class Dialogue:
    """How a client of one protocol gets to the login (``prelude``) and logs in (``attempt``),
    one command per reply, the login's verdict last; then the verdicts without and with a table."""

    prelude: tuple[bytes, ...]
    attempt: tuple[bytes, ...]
    no_table: bytes
    refused: bytes


DIALOGUES = {
    "imap": Dialogue(
        prelude=(),
        attempt=(f"a1 LOGIN {USER} whatever".encode(),),
        no_table=b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n",
        refused=b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    ),
    "pop3": Dialogue(
        prelude=(),
        attempt=(f"USER {USER}".encode(), b"PASS whatever"),
        no_table=pop3.REPLY_UNAVAILABLE,
        refused=pop3.REPLY_AUTH_FAILED,
    ),
    "submission": Dialogue(
        prelude=(b"EHLO client.example",),
        attempt=(b"AUTH PLAIN " + PLAIN,),
        no_table=smtp.REPLY_AUTH_UNAVAILABLE,
        refused=smtp.REPLY_AUTH_FAILED,
    ),
    "smtp": Dialogue(
        prelude=(b"EHLO sender.example", b"MAIL FROM:<sender@sender.example>"),
        attempt=(f"RCPT TO:<{USER}>".encode(),),
        no_table=smtp.REPLY_ROUTE_UNAVAILABLE,
        refused=smtp.REPLY_RELAY_DENIED,
    ),
}


async def reply(reader: asyncio.StreamReader, protocol: str) -> bytes:
    """One whole reply's last line (the status): IMAP's untagged lines and SMTP's ``250-`` lines
    before it are skipped."""
    for _ in range(REPLY_LINES):
        line = await asyncio.wait_for(reader.readline(), WAIT)
        more = (
            line[3:4] == b"-"
            if protocol in ("smtp", "submission")
            else protocol == "imap" and line[:2] == b"* "
        )
        if not more:
            return line
    raise AssertionError(f"no reply of {REPLY_LINES} lines ended")


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str, line: bytes
) -> bytes:
    writer.write(line + b"\r\n")
    return await reply(reader, protocol)


@pytest.mark.parametrize("protocol", list(DIALOGUES))
async def test_without_a_table_logins_fail_temporarily_and_count_for_nothing(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    caplog.set_level(logging.INFO)
    dialogue = DIALOGUES[protocol]
    proxy = await start_proxy({}, [Endpoint("127.0.0.1", dead_port())], listener={"protocol": protocol})
    context = proxy.context
    table = context.tables.current
    context.tables = TableHolder(context.metrics)  # as at the start: nothing installed yet
    # One failure locks a user and an address: any attempt counted would lock the next one out.
    # No refusal held back (conftest.TEST_LIMITS): the last, refused login is about its reply.
    locking = FailedLoginSettings(per_user=1, per_ip=1, first_delay=0, refusal_time=0)
    context.limits = Limits(LimitSettings(failed_logins=locking))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await asyncio.wait_for(reader.readline(), WAIT)  # the greeting, one line in each protocol
        for line in dialogue.prelude:
            assert (await command(reader, writer, protocol, line)).startswith((b"2", b"+", b"*"))
        attempts = MAX_ERRORS + 1  # more than max_errors: none of them counts as an error
        for _ in range(attempts):
            verdicts = [await command(reader, writer, protocol, line) for line in dialogue.attempt]
            assert verdicts[-1] == dialogue.no_table
        context.tables.swap(table)
        verdicts = [await command(reader, writer, protocol, line) for line in dialogue.attempt]
        assert verdicts[-1] == dialogue.refused  # routed now: no route for the domain, not a lock
    finally:
        writer.close()
    labels = {"protocol": protocol}
    assert proxy.metric("mailgress_proxy_logins_total", **labels, outcome="unavailable") == attempts
    assert proxy.metric("mailgress_proxy_logins_total", **labels, outcome="no_route") == 1
    assert proxy.metric("mailgress_proxy_logins_total", **labels, outcome="throttled") == 0
    warning = f"{protocol} login answered with a temporary failure: no routing table yet"
    assert caplog.text.count(warning) == 1  # once, not per attempt: a pipelining client cannot flood the log


async def test_a_later_recipient_is_placed_where_the_auth_service_says(start_proxy: ProxyFactory) -> None:
    """Review M5 #1: each later recipient of an auth_http route is asked about as the first was."""
    endpoint, other = Endpoint("127.0.0.1", dead_port()), Endpoint("127.0.0.2", dead_port())
    answers = {
        "here@alpha.example": authservice.ok(endpoint.host, endpoint.port),
        "there@alpha.example": authservice.ok(other.host, other.port),
        "anywhere@alpha.example": authservice.ok(),  # one of the route's endpoints: this one
        "nobody@alpha.example": authservice.refuse("No such user", error_code="550 5.1.1"),
    }
    # Auth-SMTP-To is the RCPT line: "RCPT TO:<" address ">".
    with authservice.AuthService(
        lambda received: answers[(received.header("Auth-SMTP-To") or "")[9:-1]]
    ) as service:
        spec = {
            "smtp": {"backend": {"service": "dovecot", "port": 143}},
            "auth": {"mode": "http", "http": {"url": service.url}},
        }
        proxy = await start_proxy(spec, [endpoint], listener={"protocol": "smtp"})
        (route,) = proxy.context.tables.current.routes
        request = LoginRequest(
            "smtp", "a@alpha.example", helo=b"EHLO client.example", envelope=(b"MAIL FROM:<>", b"")
        )

        async def placed(recipient: str, at: Endpoint = endpoint) -> smtp.RecipientPlaced:
            asked = dataclasses.replace(
                request, routing_key=recipient, envelope=(b"MAIL FROM:<>", f"RCPT TO:<{recipient}>".encode())
            )
            return await backends.place_recipient(
                proxy.context,
                route,
                at,
                asked,
                client=ClientAddress("192.0.2.7", 1),
                attempt=2,
                client_tls=None,
            )

        assert await placed("here@alpha.example") == smtp.RecipientPlaced("here")
        assert await placed("there@alpha.example") == smtp.RecipientPlaced("elsewhere")
        assert await placed("anywhere@alpha.example") == smtp.RecipientPlaced("here")
        assert await placed("anywhere@alpha.example", other) == smtp.RecipientPlaced("elsewhere")
        assert await placed("nobody@alpha.example") == smtp.RecipientPlaced(
            "refused", b"550 5.1.1 No such user\r\n"
        )
        assert [received.attempt for received in service.requests] == [2] * 5
    # The service is gone: no verdict, a temporary failure.
    assert await placed("here@alpha.example") == smtp.RecipientPlaced("unavailable")
