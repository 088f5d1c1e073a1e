"""The proxy child process helper, against a stand-in proxy: readiness, admin pages, logs, stop.

The stand-in is a few lines of Python that accept ``proxy --config FILE`` like ``mailgress`` does
and serve the admin port named in the settings; the e2e tests run the real proxy with this helper.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed import proxyprocess, proxysettings

STAND_IN = textwrap.dedent(
    """
    import http.server, signal, sys, yaml
    mode = sys.argv[1]
    config = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    print("stand-in proxy up", flush=True)
    if mode == "crash":
        sys.exit(3)
    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = 200 if mode == "ready" or self.path != "/readyz" else 503
            body = b"metric_total 1\\n" if self.path == "/metrics" else b"ok\\n"
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer((config["admin"]["address"], config["admin"]["port"]), Admin)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()
    """
)


def stand_in(tmp_path: Path, mode: str) -> proxyprocess.ProxyProcess:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    settings = proxysettings.write(tmp_path, ports=proxysettings.ProxyPorts.free(), services={}, routes=[])
    return proxyprocess.ProxyProcess(
        settings, tmp_path / "proxy.log", command=[sys.executable, str(script), mode]
    )


def test_start_waits_for_readyz_then_stop_leaves_nothing(tmp_path: Path) -> None:
    proxy = stand_in(tmp_path, "ready")
    with proxy:
        session = proxy.pid
        assert proxy.get("/readyz") == (200, "ok\n")
        assert proxy.metrics() == "metric_total 1\n"
        assert proxy.returncode is None
    assert proxy.processes() == []
    leftover = subprocess.run(["pgrep", "-s", str(session), "-r", "R,S,D,T,t"], check=False)
    assert leftover.returncode == 1
    assert "stand-in proxy up" in proxy.log_text()
    proxy.stop()  # idempotent


def test_a_proxy_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    proxy = stand_in(tmp_path, "crash")
    with pytest.raises(proxyprocess.ProxyError, match=r"exited with status 3:\nstand-in proxy up"):
        proxy.start()


def test_a_proxy_that_never_gets_ready_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyprocess, "READY_TIMEOUT", 0.5)
    proxy = stand_in(tmp_path, "unready")
    with pytest.raises(proxyprocess.ProxyError, match="not ready"):
        proxy.start()
    assert proxy.processes() == []
    assert proxy.get("/readyz") == (0, "")


def test_a_proxy_started_without_a_table_is_waited_for_until_its_admin_answers(tmp_path: Path) -> None:
    proxy = stand_in(tmp_path, "unready")
    proxy.start(ready=False)
    try:
        assert proxy.get("/readyz") == (503, "ok\n")
        assert proxy.returncode is None
    finally:
        proxy.stop()
    assert proxy.processes() == []


def test_the_real_console_script_is_found() -> None:
    (command,) = proxyprocess.mailgress_command()
    assert Path(command).name == "mailgress"
