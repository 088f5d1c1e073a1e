"""install-system-packages.sh, with apt-get, dpkg-query and debconf replaced by recording stand-ins.

What is checked: nothing is installed when everything is there; otherwise exactly the missing
packages are, non-interactively, with Postfix preseeded, and a policy-rc.d that exits 101 is in
place during the install and afterwards restored (or removed when there was none).
"""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "testbed" / "install-system-packages.sh"
STAND_INS = {
    # dpkg-query: every package is installed except those listed in $MISSING.
    "dpkg-query": """
        for package; do :; done
        case " $MISSING " in *" $package "*) exit 1;; esac
        printf 'install ok installed'
    """,
    "apt-get": """
        echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> "$RECORD"
        "$POLICY_RC_D" nginx start; echo "policy exit $?" >> "$RECORD"
    """,
    "debconf-set-selections": 'cat >> "$RECORD"',
}


def run_script(tmp_path: Path, missing: str, policy: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"
    record.write_text("")
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MISSING": missing,
        "RECORD": str(record),
        "POLICY_RC_D": str(policy),
    }
    result = subprocess.run(
        ["sh", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    return result, record.read_text()


def test_nothing_happens_when_everything_is_installed(tmp_path: Path) -> None:
    result, record = run_script(tmp_path, "", tmp_path / "policy-rc.d")
    assert result.returncode == 0, result.stderr
    assert "all packages are installed" in result.stdout
    assert record == ""


@pytest.mark.parametrize("policy_before", [None, "#!/bin/sh\nexit 0\n"], ids=["no-policy", "own-policy"])
def test_missing_packages_are_installed_with_services_blocked(
    tmp_path: Path, policy_before: str | None
) -> None:
    policy = tmp_path / "policy-rc.d"
    if policy_before is not None:
        policy.write_text(policy_before)
        policy.chmod(0o700)
    result, record = run_script(tmp_path, "swaks libnginx-mod-mail", policy)
    assert result.returncode == 0, result.stderr
    assert record.splitlines() == [
        "postfix postfix/main_mailer_type select No configuration",
        "apt-get update -qq DEBIAN_FRONTEND=noninteractive",
        "policy exit 101",
        "apt-get install -y -qq --no-install-recommends swaks libnginx-mod-mail"
        " DEBIAN_FRONTEND=noninteractive",
        "policy exit 101",
    ]
    if policy_before is None:
        assert not policy.exists()
    else:
        assert policy.read_text() == policy_before
        assert policy.stat().st_mode & 0o777 == 0o700
