"""Editing a MailRoute file takes effect for new sessions without a restart; open sessions go on.

A proxy of its own starts with the standard routes. The alpha route's IMAP backend is then
switched to Dovecot beta (which does not know alice): new logins of alice must reach beta and be
refused there within a few seconds, while a session alice opened before the edit keeps working
against Dovecot alpha. Restoring the file brings new logins back to alpha.
"""

import imaplib
import time

import pytest

from testbed import clients
from testbed.backends import Backends
from testbed.mailservers import User
from testbed.proxyprocess import ProxyProcess
from tests.e2e.helpers import StartProxy

# The proxy re-reads route files every quarter second; this bounds the wait on a busy machine.
ROUTE_CHANGE_TIMEOUT = 15.0
RETRY_INTERVAL = 0.2


def imap_login_works(proxy: ProxyProcess, user: User) -> bool:
    with clients.imap(proxy.settings.ports.imap) as client:
        try:
            client.login(user.address, user.password)
        except imaplib.IMAP4.error:
            return False
        return True


def wait_until_login(proxy: ProxyProcess, user: User, *, works: bool) -> None:
    deadline = time.monotonic() + ROUTE_CHANGE_TIMEOUT
    while imap_login_works(proxy, user) != works:
        if time.monotonic() >= deadline:
            state = "fail" if works else "work"
            pytest.fail(f"logins of {user.address} still {state} {ROUTE_CHANGE_TIMEOUT:g} s after the edit")
        time.sleep(RETRY_INTERVAL)


def test_a_route_edit_applies_to_new_sessions_and_spares_open_ones(
    start_proxy: StartProxy, backends: Backends
) -> None:
    proxy = start_proxy("proxy-live-routes")
    alice = backends.user("alice@alpha.example")
    with clients.imap(proxy.settings.ports.imap) as open_session:
        open_session.login(alice.address, alice.password)
        assert open_session.select("INBOX", readonly=True)[0] == "OK"
        asked_beta = backends.beta.log_text().count(alice.address)
        moved = backends.mailroutes()
        moved[0]["spec"]["imap"]["backend"]["service"] = "dovecot-beta"
        proxy.settings.write_routes(moved)
        wait_until_login(proxy, alice, works=False)
        # The refusal came from Dovecot beta, which was asked about alice (auth_verbose logs it).
        backends.beta.wait_log(alice.address, asked_beta + 1)
        typ, _ = open_session.noop()
        assert typ == "OK"
        typ, _ = open_session.search(None, "ALL")
        assert typ == "OK"
    proxy.settings.write_routes(backends.mailroutes())
    wait_until_login(proxy, alice, works=True)
    assert proxy.returncode is None  # never restarted
