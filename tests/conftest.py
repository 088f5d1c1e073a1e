"""Suite-wide fixtures: the testbed's real Dovecot and Postfix, started once per test session.

``backends`` starts ``testbed.backends.Backends`` in a short, world-searchable temporary folder
(pytest's own tmp_path is mode 0700, which Dovecot's and Postfix's unprivileged processes cannot
enter, and too long for the unix sockets below it) and stops it when the session ends. Nothing is
skipped: without Dovecot or Postfix every test that needs them fails with a message that names
testbed/install-system-packages.sh. Failure reports are cleaned of passwords (pytest shows the
arguments of the failing call, which for a login include one). Set MAILGRESS_KEEP_TESTBED=1 to
keep the folder (logs, maildirs) after the session; its path is then printed.
"""

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from testbed import backends as testbed_backends
from testbed import clients, mailservers

KEEP_VARIABLE = "MAILGRESS_KEEP_TESTBED"
_user_numbers = itertools.count(1)


def testbed_directory(prefix: str) -> Path:
    """A fresh folder under /tmp that the mail servers' unprivileged users can reach."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def remove_testbed_directory(directory: Path) -> None:
    if os.environ.get(KEEP_VARIABLE):
        print(f"\n{KEEP_VARIABLE}: kept {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)


# The running backends, so that failure reports can be cleaned of every password they know.
_running: list[testbed_backends.Backends] = []


@pytest.fixture(scope="session")
def backends() -> Iterator[testbed_backends.Backends]:
    """The standard backends (Dovecot alpha and beta, SASL Dovecot, Postfix), running."""
    directory = testbed_directory("mailgress-")
    try:
        bed = testbed_backends.Backends(directory)
        bed.start()
    except mailservers.MailServerError as error:
        remove_testbed_directory(directory)
        pytest.fail(f"the testbed's mail servers could not start: {error}", pytrace=False)
    _running.append(bed)
    yield bed
    _running.remove(bed)
    bed.stop()
    remove_testbed_directory(directory)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep passwords out of failure output.

    pytest prints the arguments of the failing call (``login(self, user, password)``) and captured
    output; every known testbed password, and any token that looks like one, becomes <redacted>.
    """
    report = yield
    if report.failed:
        known = [testbed_backends.default_password(a) for a in testbed_backends.standard_addresses()]
        known += [user.password for bed in _running for user in bed.users.values()]
        secrets = sorted(set(known), key=len, reverse=True)  # longest first: no half-redacted passwords
        if report.longrepr is not None:
            report.longrepr = clients.redact_marked(str(report.longrepr), secrets)
        report.sections = [(title, clients.redact_marked(text, secrets)) for title, text in report.sections]
    return report


@pytest.fixture
def scratch_directory() -> Iterator[Path]:
    """A short, world-searchable folder for a test's own mail server instances; removed afterwards."""
    directory = testbed_directory("mailgress-scratch-")
    yield directory
    remove_testbed_directory(directory)


@pytest.fixture
def new_user(
    backends: testbed_backends.Backends, request: pytest.FixtureRequest
) -> Callable[..., mailservers.User]:
    """Make a fresh account (empty INBOX) on the running backends: ``new_user()`` or ``new_user(BETA)``.

    Tests that count messages use one so they never see each other's mail.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]

    def make(domain: str = testbed_backends.ALPHA) -> mailservers.User:
        return backends.add_user(f"t{next(_user_numbers)}-{slug}@{domain}")

    return make
