"""``mailgress proxy --config FILE`` as a child process, for the e2e tests, the demo and the benchmarks.

Starts the proxy in its own session with its stdout and stderr going to a log file, waits until the
admin endpoint's /readyz answers 200, or answers at all for a proxy meant to start without a routing
table (bounded), fetches admin pages, and stops it with SIGTERM (then
SIGKILL after a bound) leaving no process behind. Never parses the proxy's settings itself beyond the
admin port it was given, and never talks to anything but 127.0.0.1.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from testbed import mailservers, proxysettings

# Readiness means listeners bound and the first routing table compiled: well under a second normally.
READY_TIMEOUT = 30.0
# On SIGTERM the proxy drains its sessions (testbed settings give it a few seconds) and exits;
# beyond this it is killed.
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 5.0
# Talk to the admin port directly even when the environment names an HTTP proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProxyError(mailservers.MailServerError):
    """The proxy did not start, or exited; the message carries the end of its log."""


def mailgress_command() -> list[str]:
    """The ``mailgress`` console script of the running virtualenv (or on PATH)."""
    beside_python = Path(sys.executable).parent / "mailgress"
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("mailgress")
    if found is None:
        raise ProxyError("the mailgress console script is not installed (pip install -e .)")
    return [found]


class ProxyProcess:
    """One running proxy; a context manager."""

    def __init__(
        self,
        settings: proxysettings.SettingsFile,
        log_path: Path,
        *,
        command: Sequence[str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self._command = list(command) if command is not None else None
        self.log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ProxyError("the proxy is not running")
        return self._process.pid

    def processes(self) -> list[int]:
        """The proxy's live processes (it runs in a session of its own)."""
        return [] if self._process is None else mailservers.session_processes(self._process.pid)

    def start(self, *, ready: bool = True) -> None:
        """Start the proxy and wait until /readyz says ready.

        Args:
            ready: False for a proxy that is to have no routing table (a broken route file, an
                unreachable controller): wait only until /readyz answers, 503 included. The proxy
                starts its listeners before its admin endpoint, so they accept connections by then.

        Raises:
            ProxyError: it exited or did not become ready in READY_TIMEOUT seconds.
        """
        if self._process is not None:
            raise ProxyError("the proxy is already running")
        command = [
            *(self._command or mailgress_command()),
            "proxy",
            "--config",
            str(self.settings.path),
            "--log-level",
            self.log_level,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._process.poll() is not None:
                status = self._process.returncode
                self._process = None
                raise ProxyError(f"mailgress proxy exited with status {status}:\n{self.log_tail()}")
            status = self.get("/readyz")[0]
            if status == 200 or (status and not ready):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ProxyError(f"mailgress proxy not ready after {READY_TIMEOUT:g} s:\n{self.log_tail()}")
            time.sleep(mailservers.POLL_INTERVAL)

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL whatever is left. Idempotent."""
        if self._process is None:
            return
        session = self._process.pid
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=STOP_TIMEOUT)
        # Anything the proxy spawned dies with it.
        for pid in mailservers.session_processes(session):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._process = None

    @property
    def returncode(self) -> int | None:
        """The exit status if the proxy has exited on its own, else None."""
        return None if self._process is None else self._process.poll()

    def get(self, path: str) -> tuple[int, str]:
        """GET an admin page: (status, body); status 0 if nothing answered."""
        try:
            with _opener.open(self.settings.admin_url + path, timeout=HTTP_TIMEOUT) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", "replace")
        except OSError:
            return 0, ""

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise ProxyError(f"/metrics answered {status}")
        return body

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
