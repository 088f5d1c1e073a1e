"""Suite-wide fixtures: the testbed's real Dovecot and Postfix, started once per test session.

``backends`` starts ``testbed.backends.Backends`` in a short, world-searchable temporary folder
(pytest's own tmp_path is mode 0700, which Dovecot's and Postfix's unprivileged processes cannot
enter, and too long for the unix sockets below it) and stops it when the session ends. Nothing is
skipped: without Dovecot or Postfix every test that needs them fails with a message that names
testbed/install-system-packages.sh. Failure reports are cleaned of passwords (pytest shows the
arguments of the failing call, which for a login include one), and a failed comparison of values
that hold a password (any dataclass with a ``password`` field that is set: sasl.Credentials,
authhttp.Granted, testbed's User and Account) shows their redacting reprs, not pytest's
field-by-field diff. Set MAILGRESS_KEEP_TESTBED=1 to keep the folder (logs, maildirs)
after the session; its path is then printed.
"""

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping
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


@contextlib.contextmanager
def running_postfix(postfix: mailservers.Postfix, directory: Path, name: str) -> Iterator[None]:
    """A test's own Postfix (its files under ``directory``) started, or the test failed naming
    it; stopped and its directory removed afterwards."""
    try:
        postfix.start()
    except mailservers.MailServerError as error:
        remove_testbed_directory(directory)
        pytest.fail(f"the {name} Postfix could not start: {error}", pytrace=False)
    try:
        yield
    finally:
        postfix.stop()
        remove_testbed_directory(directory)


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


# Values a comparison walks before it gives up and treats the operands as holding a password.
MAX_WALKED_VALUES = 10_000
# Characters of each operand's repr in a redacted comparison.
MAX_REPR = 240


# The field a dataclass keeps a password in, whatever the class: sasl.Credentials,
# authhttp.Granted, testbed's mailservers.User and authservice.Account, and any later one.
PASSWORD_FIELD = "password"


def holds_a_password(value: object) -> bool:
    """Whether ``value`` is, or holds within dataclasses, tuples, lists, sets and dicts, a
    dataclass whose ``password`` field is set (not None: Granted's "the client's own"). True
    also when there is too much to walk."""
    pending = [value]
    for _ in range(MAX_WALKED_VALUES):
        if not pending:
            return False
        item = pending.pop()
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            values = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}
            if values.get(PASSWORD_FIELD) is not None:
                return True
            pending.extend(values.values())
        elif isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (tuple, list, set, frozenset)):
            pending.extend(item)
    return bool(pending)


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """A failed comparison of values holding a password: the operands' reprs (which redact it)
    and the names of the fields that differ, never pytest's own explanation, which reads the
    fields of dataclasses (and the octets of bytes) past their reprs. None: pytest's own.

    Bare strings and bytes are not recognised: a test that compares a password itself
    (``creds.password == b"..."``) compares its own test data, which its source spells anyway,
    and gets pytest's explanation."""
    if not (holds_a_password(left) or holds_a_password(right)):
        return None
    lines = [
        f"{_short_repr(left)} {op} {_short_repr(right)}",
        "(they hold a password: pytest's comparison of their fields is not shown)",
    ]
    if type(left) is type(right) and dataclasses.is_dataclass(left) and not isinstance(left, type):
        differing = [
            field.name
            for field in dataclasses.fields(left)
            if getattr(left, field.name) != getattr(right, field.name)
        ]
        lines.append(f"Differing fields: {', '.join(differing) or 'none'}")
    return lines


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
