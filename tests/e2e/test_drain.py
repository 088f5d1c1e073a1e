"""SIGTERM drains a real ``mailgress proxy`` process in front of the real Dovecot and Postfix.

Proves, with imaplib, poplib, smtplib and a raw socket: right after SIGTERM /readyz answers 503
and the listeners refuse new connections; an idle IMAP session gets ``* BYE [UNAVAILABLE]`` and
then the connection ends, an idle POP3 session a closing ``-ERR``, a client still logging in
``421 4.3.2``; a submission in the middle of DATA, pausing longer than the quiet period after its
turn has come, is not cut: its message reaches Postfix's maildir byte for byte and only then does
the client get ``421 4.3.2``; so is one pausing as long between its answered RCPT and its DATA
(the backend spoke last: no byte relay could tell that from the end of a transaction); the process
exits 0 once the sessions are gone, before the grace
period is over. The proxy runs with a short drain so the test stays short; every wait is bounded.
"""

import imaplib
import os
import poplib
import re
import signal
import smtplib
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from testbed import clients, mailservers, messages, proxyprocess
from testbed.backends import ALPHA, Backends
from testbed.mailservers import LOOPBACK, User
from tests.e2e.helpers import launch, stop

# Turns come within gracePeriod / 2 = 8 s of SIGTERM. The submission pauses longer than that
# (PAUSE), so its turn has come and its stream has been quiet for longer than quietPeriod while
# it is in the middle of DATA; what follows the pause (the rest of the message, Postfix's 250,
# one more quiet period) has GRACE_PERIOD - PAUSE = 7 s to finish on a loaded machine.
GRACE_PERIOD = 16
QUIET_PERIOD = 1
PAUSE = GRACE_PERIOD / 2 + QUIET_PERIOD
# Longer than the pause: a client still logging in is drained, not timed out.
PRE_LOGIN_TIMEOUT = 60
MESSAGE_SIZE = 8 * 1024 * 1024
NewUser = Callable[..., User]
# Polls for what follows SIGTERM at once (readiness, the closed listeners) and for the exit.
POLLS = 200
POLL_INTERVAL = 0.1


@pytest.fixture
def draining_proxy(backends: Backends) -> Iterator[proxyprocess.ProxyProcess]:
    """A proxy with the standard routes and a short drain; the leak check of every e2e proxy at the end."""
    proxy = launch(
        backends,
        "drain",
        extra={
            "timeouts": {"preLogin": PRE_LOGIN_TIMEOUT},
            "drain": {"gracePeriod": GRACE_PERIOD, "quietPeriod": QUIET_PERIOD},
        },
    )
    yield proxy
    stop(proxy, backends)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=clients.SOCKET_TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def poll(condition: str, check: Callable[[], bool]) -> None:
    """Wait (bounded) until ``check()`` is true."""
    for _ in range(POLLS):
        if check():
            return
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"not {condition} after {POLLS * POLL_INTERVAL:g} s")


def stuffed(message: bytes) -> bytes:
    """The message as DATA carries it: lines starting with a dot get one more (RFC 5321 4.5.2)."""
    return re.sub(rb"(?m)^\.", b"..", message)


def test_sigterm_drains_every_session_and_loses_no_message_in_flight(
    draining_proxy: proxyprocess.ProxyProcess, backends: Backends, new_user: NewUser
) -> None:
    reader, pop_user, sender, recipient, pauser, pauser_recipient = (new_user(ALPHA) for _ in range(6))
    ports = draining_proxy.settings.ports
    imap = imaplib.IMAP4(LOOPBACK, ports.imap, timeout=clients.SOCKET_TIMEOUT)
    pop = poplib.POP3(LOOPBACK, ports.pop3, timeout=clients.SOCKET_TIMEOUT)
    smtp = smtplib.SMTP(LOOPBACK, ports.submission, timeout=clients.SOCKET_TIMEOUT)
    paused = smtplib.SMTP(LOOPBACK, ports.submission, timeout=clients.SOCKET_TIMEOUT)
    logging_in = clients.RawClient(ports.smtp)
    try:
        imap.login(reader.address, reader.password)
        assert imap.select("INBOX")[0] == "OK"
        pop.user(pop_user.address)
        pop.pass_(pop_user.password)
        assert pop.stat() == (0, 0)
        assert logging_in.line().startswith(b"220 ")
        smtp.ehlo()
        smtp.login(sender.address, sender.password)
        assert smtp.mail(sender.address)[0] == 250
        assert smtp.rcpt(recipient.address)[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        message = messages.large(sender.address, recipient.address, MESSAGE_SIZE, subject="in flight")
        data = stuffed(message)
        assert smtp.sock is not None
        smtp.sock.sendall(data[: len(data) // 2])
        paused.login(pauser.address, pauser.password)
        assert paused.mail(pauser.address)[0] == 250
        assert paused.rcpt(pauser_recipient.address)[0] == 250

        os.kill(draining_proxy.pid, signal.SIGTERM)
        poll("not ready", lambda: draining_proxy.get("/readyz")[0] == 503)
        poll("refusing IMAP connections", lambda: refuses_connections(ports.imap))
        assert draining_proxy.returncode is None  # still draining the sessions

        time.sleep(PAUSE)  # mid-DATA, the client speaking last: quiet, but not between transactions
        smtp.sock.sendall(data[len(data) // 2 :] + b".\r\n")
        code, text = smtp.getreply()
        assert code == 250, text
        code, text = smtp.getreply()
        assert (code, text) == (421, b"4.3.2 mailgress.test Service shutting down")
        second = messages.compose(
            pauser.address, pauser_recipient.address, "after a pause", "in a transaction\n"
        )
        assert paused.data(second)[0] == 250
        code, text = paused.getreply()
        assert (code, text) == (421, b"4.3.2 mailgress.test Service shutting down")

        assert imap.readline() == b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n"
        assert imap.readline() == b""
        assert pop.file.readline() == b"-ERR [SYS/TEMP] Server shutting down, please reconnect\r\n"
        assert pop.file.readline() == b""
        assert logging_in.line() == b"421 4.3.2 mailgress.test Service shutting down\r\n"
        assert logging_in.line() == b""

        poll("exited", lambda: draining_proxy.returncode is not None)
        assert draining_proxy.returncode == 0
        (delivered,) = backends.wait_delivered(recipient.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
        (delivered,) = backends.wait_delivered(pauser_recipient.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(second)
        log = draining_proxy.log_text()
        assert log.count("outcome=relayed, ended by drain") == 4, draining_proxy.log_tail()
        assert log.count("outcome=closed before login: the proxy is draining") == 1
    finally:
        imap.shutdown()
        pop.close()
        smtp.close()
        paused.close()
        logging_in.close()
