"""The machine and software a benchmark ran on, for the report's header.

Called once per run by ``bench.runner``. Asks the installed programs for their versions and
reads /proc for the machine; a program that is missing or silent shows as "unknown" rather
than stopping the benchmark. Starts only short-lived version queries, never a daemon.
"""

import os
import platform
import re
import resource
import subprocess
from importlib import metadata
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
QUERY_TIMEOUT = 10.0
UNKNOWN = "unknown"


def _output(command: list[str]) -> str:
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False, cwd=REPOSITORY
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (completed.stdout + completed.stderr).strip()


def _first_match(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1) if match else UNKNOWN


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def mailgress_revision() -> str:
    """The commit the benchmark ran from, marked when the working tree had uncommitted changes."""
    commit = _output(["git", "rev-parse", "--short=12", "HEAD"]) or UNKNOWN
    dirty = _output(["git", "status", "--porcelain", "--untracked-files=no", "--", "proxy", "mailgress"])
    return f"{commit} (uncommitted changes in proxy/ or mailgress/)" if dirty else commit


def describe() -> dict[str, str]:
    """Versions and machine facts, as label -> text."""
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    meminfo = Path("/proc/meminfo").read_text(errors="replace")
    memory = _first_match(r"MemTotal:\s+(\d+)", meminfo)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    model = _first_match(r"model name\s*:\s*(.+)", cpuinfo)
    return {
        "mailgress": mailgress_revision(),
        "Python": platform.python_version(),
        "uvloop": _package("uvloop"),
        "nginx": _first_match(r"nginx/(\S+)", _output(["nginx", "-v"])),
        "Dovecot": _output(["dovecot", "--version"]) or UNKNOWN,
        "Postfix": _first_match(r"mail_version = (\S+)", _output(["postconf", "-d", "mail_version"])),
        "py-spy": _package("py-spy"),
        "kernel": platform.release(),
        "CPU": f"{model}, {os.cpu_count()} cores",
        "memory": UNKNOWN if memory == UNKNOWN else f"{int(memory) / 1024 / 1024:.0f} GiB",
        "descriptors": f"ulimit -n {soft} (hard {hard})",
    }
