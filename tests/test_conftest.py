"""tests/conftest.py's redaction of failed comparisons: values holding a password are compared
in failure output by their redacting reprs and the names of the differing fields, never by
pytest's field-by-field diff (which printed the passwords of Credentials, Granted and testbed's
User and Account).

The end-to-end checks run a small failing test file in a pytest subprocess, with and without
tests/conftest.py as a plugin, and read its output.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.protocols import authhttp, events, sasl
from proxy.table import Endpoint
from testbed import authservice, mailservers
from tests import conftest

ROOT = Path(__file__).parents[1]
# Seconds the inner pytest run may take (its collection imports the project).
RUN_TIMEOUT = 120
SECRET = "s\u00e9same-never-shown"
OTHER = "other-never-shown"
# The inner tests build the passwords from hex, so that their source (which pytest shows) does
# not spell them.
FAILING = f"""
from proxy.protocols import authhttp, events, sasl
from testbed import authservice, mailservers

SECRET = bytes.fromhex("{SECRET.encode("latin-1").hex()}")
OTHER = bytes.fromhex("{OTHER.encode().hex()}")

def test_credentials():
    assert sasl.Credentials("alice", SECRET) == sasl.Credentials("alice", OTHER)

def test_granted():
    assert authhttp.Granted(user="alice", password=SECRET) == authhttp.Granted(user="alice", password=OTHER)

def test_nested():
    first = events.LoginRequest("imap", "alice", sasl.Credentials("alice", SECRET))
    assert first == events.LoginRequest("imap", "bob", sasl.Credentials("alice", OTHER))

def test_in_a_list():
    assert [sasl.Credentials("alice", SECRET)] == [sasl.Credentials("bob", b"")]

def test_testbed_user():
    user = mailservers.User("ceo@alpha.example", SECRET.decode("latin-1"))
    assert user == mailservers.User("ceo@alpha.example", OTHER.decode())

def test_auth_service_account():
    account = authservice.Account(SECRET.decode("latin-1"), "127.0.0.1", 143)
    assert account == authservice.Account(OTHER.decode(), "127.0.0.1", 143)
"""


def run_failing(tmp_path: Path, *plugin: str) -> str:
    (tmp_path / "test_failing.py").write_text(FAILING)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-vv", *plugin, "test_failing.py"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return done.stdout + done.stderr


def test_pytest_alone_shows_the_password(tmp_path: Path) -> None:
    """What the hook is for: without it, pytest's diff of the fields prints the octets."""
    output = run_failing(tmp_path)
    assert "6 failed" in output
    assert "never-shown" in output


def test_failed_comparisons_of_passwords_never_show_them(tmp_path: Path) -> None:
    output = run_failing(tmp_path, "-p", "tests.conftest")
    assert "6 failed" in output
    assert "never-shown" not in output
    assert output.count("they hold a password") >= 6  # each failure (-vv repeats it in the summary)
    assert output.count("Differing fields: password") >= 4  # Credentials, Granted, User, Account
    assert "Differing fields: routing_key, credentials" in output
    assert "password=<redacted>" in output


@pytest.mark.parametrize(
    "value",
    [
        sasl.Credentials("alice", b"x"),
        authhttp.Granted(password=b"x"),
        events.LoginRequest("imap", "alice", sasl.Credentials("alice", b"x")),
        {"key": [(1, sasl.Credentials("alice", b"x"))]},
        {sasl.Credentials("alice", b"x")},
        mailservers.User("ceo@alpha.example", "x"),
        (authservice.Account("x", "127.0.0.1", 143),),
        [[0]] * (conftest.MAX_WALKED_VALUES + 1),  # too much to walk: treated as holding one
    ],
)
def test_what_holds_a_password(value: object) -> None:
    assert conftest.holds_a_password(value)


@pytest.mark.parametrize(
    "value",
    [
        authhttp.Granted(server=Endpoint("127.0.0.1", 143), user="alice"),
        events.LoginRequest("imap", "alice"),
        b"octets",
        {"key": ["value"]},
        sasl.Credentials,  # the class, not an instance
    ],
)
def test_what_holds_none(value: object) -> None:
    assert not conftest.holds_a_password(value)


def test_other_comparisons_keep_pytest_s_explanation() -> None:
    assert conftest.pytest_assertrepr_compare(pytest.Config.__new__(pytest.Config), "==", [1], [2]) is None
