"""``python -m testbed.demo`` runs the proxy in front of the backends and cleans up after itself."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed import backends, clients, demo, mailservers
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK, User

# Starting four daemons and the proxy takes seconds; this bounds a wedged start.
DEMO_START_TIMEOUT = 90.0


def test_the_welcome_message_and_the_lines_to_try(backends: Backends) -> None:
    welcome = demo.welcome_message("alice@alpha.example")
    assert b"To: <alice@alpha.example>" in welcome
    alice = backends.user("alice@alpha.example")
    lines = clients.redact(demo.try_lines(backends, demo.DEMO_PORTS), [alice.password])
    assert "curl --user alice@alpha.example:<redacted> 'imap://127.0.0.1:1143/INBOX'" in lines
    assert "swaks --server 127.0.0.1:1025 " in lines
    assert "http://127.0.0.1:9901/metrics" in lines


def wait_for_line(output: Path, process: subprocess.Popen[bytes], line: str) -> str:
    deadline = time.monotonic() + DEMO_START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        text = output.read_text()
        if line in text:
            return text
        time.sleep(mailservers.POLL_INTERVAL)
    raise AssertionError(f"the demo never printed {line!r}:\n{redacted(output.read_text())}")


def redacted(text: str) -> str:
    """The demo prints its users' passwords; failure output must not."""
    return clients.redact(text, [backends.default_password(a) for a in backends.standard_addresses()])


def test_the_demo_serves_through_the_proxy_and_stops_everything(scratch_directory: Path) -> None:
    output = scratch_directory / "demo.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.demo",
                "--directory",
                str(scratch_directory / "demo"),
                "--free-ports",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        text = wait_for_line(output, process, demo.READY_LINE)
        master_pid = (scratch_directory / "demo/backends/postfix/queue/pid/master.pid").read_text().strip()
        match = re.search(r"IMAP (\d+), POP3 (\d+)", text)
        assert match is not None, redacted(text)
        alice = User("alice@alpha.example", backends.default_password("alice@alpha.example"))
        printed = alice.password in text
        assert printed, "the demo prints its users' passwords"
        fetched = clients.curl(f"imap://{LOOPBACK}:{match[1]}/INBOX;UID=1", user=alice)
        assert fetched.returncode == 0, fetched.describe()
        inbox = scratch_directory / "demo/backends/dovecot-alpha/mail/alpha.example/alice"
        owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
        assert [fetched.output] == mailservers.Maildir(inbox, owner).messages()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    leftovers = subprocess.run(
        ["pgrep", "-f", str(scratch_directory)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == ""
    postfix = subprocess.run(["pgrep", "-s", master_pid, "-r", "R,S,D,T,t"], capture_output=True, check=False)
    assert postfix.stdout == b""
