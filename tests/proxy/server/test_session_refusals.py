"""A backend's refusal through the session driver: only one about the credentials is a guess.

A backend of its own refuses every LOGIN with a line the test picks, after an untagged
``[ALERT]``. The proxy locks a user after one counted failure, without delay, so a refusal that
were counted would make the next login of the same user the lockout's ``NO [UNAVAILABLE]``.
What the client gets is the backend's whole answer either way (the alert first, RFC 3501 section
7.1); the logins metric tells a refusal of the credentials (``rejected``) from one for another
reason (``refused``).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from proxy.protocols import imap
from proxy.server.limits import Limits
from proxy.settings import FailedLoginSettings, LimitSettings
from proxy.table import Endpoint
from tests.proxy.server.conftest import PASSWORD, WAIT, ProxyFactory, imap_client, session_lines

USER = "carol@alpha.example"
ALERT = b"* OK [ALERT] Close one of your other sessions first\r\n"
LOCKED = b"a1 NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
LOGIN_LINES = 3  # LOGIN with two non-synchronizing literals: three CRLF-ended lines
READS = 100  # bound on the backend's reads of one login (a few are ever needed)
REPLY_LINES = 5  # bound on the lines of one reply to the client (two at most here)


@contextlib.asynccontextmanager
async def refusing_backend(refusal: bytes) -> AsyncIterator[int]:
    """An IMAP backend on a free loopback port that answers every LOGIN with ALERT and ``refusal``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] refusing\r\n")
        received = b""
        for _ in range(READS):
            if received.count(b"\r\n") >= LOGIN_LINES:
                tag = received.split(b" ", 1)[0]
                writer.write(ALERT + tag + b" " + refusal + b"\r\n")
                break
            chunk = await reader.read(4096)
            if not chunk:
                break
            received += chunk
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def answer(port: int) -> bytes:
    """What a client's LOGIN gets, every line up to and with the tagged one."""
    reader, writer = await imap_client(port)
    try:
        writer.write(f'a1 LOGIN {USER} "{PASSWORD}"\r\n'.encode())
        lines = b""
        for _ in range(REPLY_LINES):
            line = await asyncio.wait_for(reader.readline(), WAIT)
            lines += line
            if not line or line.startswith(b"a1 "):
                break
        return lines
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("refusal", "outcome", "second"),
    [
        # The credentials refused: counted, so the second login finds the user locked.
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", "rejected", LOCKED),
        (b"NO Login failed.", "rejected", LOCKED),
        # Refused for another reason: passed on again, however often.
        (b"NO [LIMIT] Maximum number of connections from user+IP exceeded", "refused", None),
        (b"NO [CONTACTADMIN] Account disabled", "refused", None),
    ],
)
async def test_only_a_refusal_of_the_credentials_counts_towards_the_lockout(
    start_proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    refusal: bytes,
    outcome: str,
    second: bytes | None,
) -> None:
    caplog.set_level(logging.INFO)
    async with refusing_backend(refusal) as backend_port:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", backend_port)])
        # No refusal held back either (conftest.TEST_LIMITS): the count is checked, not the time.
        locking = FailedLoginSettings(per_user=1, per_ip=1000, first_delay=0, refusal_time=0)
        proxy.context.limits = Limits(LimitSettings(failed_logins=locking))
        # A refusal of the credentials in the proxy's own words, after the ALERT (review Q1 #4).
        told = b"NO " + imap.REFUSAL_TEXT if outcome == "rejected" else refusal
        backend_answer = ALERT + b"a1 " + told + b"\r\n"
        assert await answer(proxy.port) == backend_answer
        assert await answer(proxy.port) == (second or backend_answer)
    counted = 1 if second else 2
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome=outcome) == counted
    assert proxy.metric("mailgress_proxy_logins_total", protocol="imap", outcome="throttled") == 2 - counted
    # The session lines keep each login's verdict, though each session then ends by the client.
    lines = await session_lines(caplog, 2)
    assert [line.split(" login=")[1].split()[0] for line in lines] == [
        outcome,
        "throttled" if second else outcome,
    ]
