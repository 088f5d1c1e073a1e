"""curl and swaks runs: passwords stay off command lines and out of transcripts; awkward ones work."""

import base64
import os
from pathlib import Path

import pytest

from testbed import clients
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK, User

SECRET = 'alpha-secret-x {3} "q\\z"'


def test_redaction_covers_plain_quoted_and_base64_forms() -> None:
    plain_response = base64.b64encode(f"\0me@alpha.example\0{SECRET}".encode()).decode()
    login_response = base64.b64encode(SECRET.encode()).decode()
    text = "\n".join(
        [
            f"PASS {SECRET}",
            f"a LOGIN me@alpha.example {clients.imap_quoted(SECRET)}",
            f"AUTH PLAIN {plain_response}",
            login_response,
            f"password = {SECRET!r}",
            "334 VXNlcm5hbWU6",
        ]
    )
    redacted = clients.redact(text, [SECRET])
    assert redacted.splitlines() == [
        "PASS <redacted>",
        "a LOGIN me@alpha.example <redacted>",
        "AUTH PLAIN <redacted>",
        "<redacted>",
        "password = '<redacted>'",
        "334 VXNlcm5hbWU6",
    ]


def test_failure_reports_also_lose_passwords_nobody_listed() -> None:
    text = "user = 'bob@beta.example', password = 'beta-secret-bob-123456'\nknown: alpha-secret-al {4} x"
    assert clients.redact_marked(text, ["alpha-secret-al {4} x"]) == (
        "user = 'bob@beta.example', password = <redacted>\nknown: <redacted>"
    )


def test_curl_and_swaks_get_the_password_off_their_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-ins on PATH record what the real programs would have received."""
    for program in ("curl", "swaks"):
        stand_in = tmp_path / program
        stand_in.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$@" > {tmp_path}/{program}.argv\n'
            f"cat > {tmp_path}/{program}.stdin\n"
            f'printf "%s" "$SWAKS_OPT_auth_password" > {tmp_path}/{program}.env\n'
            f"cat {tmp_path}/said >&2\n"
        )
        stand_in.chmod(0o755)
    (tmp_path / "said").write_text(f"password was {SECRET}\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    user = User("me@alpha.example", SECRET)
    curl = clients.curl("imap://127.0.0.1:1/INBOX", "--request", "NOOP", user=user)
    swaks = clients.swaks("--server", "127.0.0.1:1", user=user, data=b"Subject: x\r\n\r\nbody\r\n")
    for program in ("curl", "swaks"):
        assert SECRET not in (tmp_path / f"{program}.argv").read_text()
    assert (
        tmp_path / "curl.stdin"
    ).read_text() == 'user = "me@alpha.example:alpha-secret-x {3} \\"q\\\\z\\""\n'
    assert (tmp_path / "swaks.env").read_text() == SECRET
    assert (tmp_path / "swaks.stdin").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    for run in (curl, swaks):
        assert run.returncode == 0
        assert "password was <redacted>" in run.describe()
        assert SECRET not in run.describe()


def test_the_awkward_password_survives_curl_and_swaks(backends: Backends) -> None:
    al = backends.user("al@alpha.example")
    examined = clients.curl(
        f"imap://{LOOPBACK}:{backends.alpha.imap_port}/INBOX", "--request", "EXAMINE INBOX", user=al
    )
    assert examined.returncode == 0, examined.describe()
    submitted = clients.swaks(
        "--server", f"{LOOPBACK}:{backends.postfix.submission_port}", "--auth", "PLAIN",
        "--from", al.address, "--to", "bob@beta.example", user=al,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.describe()
    assert "AUTH PLAIN <redacted>" in submitted.transcript
    leaked = al.password in submitted.transcript
    assert not leaked
