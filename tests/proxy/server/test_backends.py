"""``backends.login`` through the session driver, for a proxy that has no routing table yet.

A proxy whose controller is unreachable and which has no usable snapshot listens all the same
(process.py says why). Until its first table is installed, every login and every inbound
recipient gets the protocol's temporary failure, which neither counts towards the failed-login
lockout nor towards ``max_errors``; once the table is there, the same connection is routed as
usual. Each protocol is driven over loopback on the shared fixture's
proxy, its holder replaced by one that has not had a table.
"""

import asyncio
import base64
import logging
from dataclasses import dataclass

import pytest

from proxy.protocols import pop3, smtp
from proxy.server.limits import Limits
from proxy.server.routes import TableHolder
from proxy.settings import FailedLoginSettings, LimitSettings
from proxy.table import Endpoint
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
    locking = FailedLoginSettings(per_user=1, per_ip=1, first_delay=0)
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
