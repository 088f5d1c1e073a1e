"""The refusal time against a real Dovecot (session.py): every login refusal, routed or not, is
answered no sooner than ``limits.failedLogins.refusalTime`` after the login was asked.

Dovecot answers a wrong password after its ``auth_failure_delay`` (2 s by default), checked on a
0.5 s timer, so after 1.5 or 2 s: a login no route owns held exactly 2 s told them apart (review
O4). Only lower bounds are checked, never how much later an answer came (a shared machine).
"""

import asyncio
import time

from proxy import settings as proxy_settings
from proxy.server.limits import Limits
from proxy.settings import FailedLoginSettings, LimitSettings
from proxy.table import Endpoint
from testbed import mailservers
from tests import conftest as testbed_folders  # its testbed_directory is no test of this file
from tests.proxy.server.conftest import WAIT, ProxyFactory, imap_client

ANNA = mailservers.User("anna@alpha.example", "Right-Pass-1")
# Dovecot's own default, which the testbed turns off to keep the other tests fast.
DOVECOT_FAILURE_DELAY = "auth_failure_delay = 2 secs\n"
ROUNDS = 3  # each a routed and an unknown domain's wrong password, at another phase of the timer
PHASE_STEP = 0.37  # seconds between rounds: not a multiple of Dovecot's 0.5 s timer


async def refused_after(port: int, user: str) -> tuple[float, bytes]:
    """A wrong-password LOGIN's reply and the seconds from sending it to reading the reply."""
    reader, writer = await imap_client(port)
    try:
        asked = time.monotonic()
        writer.write(f'a1 LOGIN {user} "Wrong-Pass-1"\r\n'.encode())
        reply = await asyncio.wait_for(reader.readline(), WAIT)
        return time.monotonic() - asked, reply
    finally:
        writer.close()


async def test_routed_and_unknown_refusals_both_come_after_the_refusal_time(
    start_proxy: ProxyFactory,
) -> None:
    directory = testbed_folders.testbed_directory("refusal-time-")
    dovecot = mailservers.Dovecot(
        directory / "dovecot",
        name="refusal-time",
        users=[ANNA],
        protocols=("imap",),
        extra_config=DOVECOT_FAILURE_DELAY,
    )
    dovecot.start()
    try:
        proxy = await start_proxy({}, [Endpoint("127.0.0.1", dovecot.imap_port)])
        # The default refusalTime; no throttle delay, so only its hold shows.
        failed = FailedLoginSettings(first_delay=0, per_user=1000, per_ip=1000)
        proxy.context.limits = Limits(LimitSettings(failed_logins=failed))
        refusal_time = proxy_settings.DEFAULT_LOGIN_REFUSAL_TIME
        answers = []
        for index in range(ROUNDS):
            answers.append(await refused_after(proxy.port, f"user{index}@alpha.example"))
            answers.append(await refused_after(proxy.port, f"user{index}@unknown.example"))
            await asyncio.sleep(PHASE_STEP)
    finally:
        dovecot.stop()
        testbed_folders.remove_testbed_directory(directory)
    assert {reply for _, reply in answers} == {b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"}
    assert all(took >= refusal_time for took, _ in answers), answers
