"""The testbed's nginx: a private mail proxy from a generated configuration, stopped without leftovers.

Against the session's Dovecot and Postfix with the testbed auth service: each listener greets as
nginx does and a login goes through to the backend the auth service names; the configuration
carries what the options say; taken ports are retried; stop() leaves no process behind.
"""

import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from testbed import authservice, clients, mailservers, nginx, tlscerts
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK


def test_standard_listeners_greet_and_a_login_reaches_the_named_backend(
    backends: Backends, scratch_directory: Path
) -> None:
    anna = backends.user("anna@alpha.example")
    answer = authservice.check_passwords(
        {anna.address: authservice.Account(anna.password, LOOPBACK, backends.alpha.imap_port)}
    )
    with (
        authservice.AuthService(answer) as service,
        nginx.Nginx(scratch_directory / "nginx", nginx.AuthHttp(service.url)) as proxy,
    ):
        assert len(proxy.processes()) == 2  # the master and its one worker
        assert mailservers.greets(proxy.port("imap"), b"* OK IMAP4 ready", b"a LOGOUT\r\n")
        assert mailservers.greets(proxy.port("pop3"), b"+OK POP3 ready", b"QUIT\r\n")
        assert mailservers.greets(proxy.port("submission"), b"220 nginx.test ESMTP ready", b"QUIT\r\n")
        assert mailservers.greets(proxy.port("mx"), b"220 nginx.test ESMTP ready", b"QUIT\r\n")
        with clients.imap(proxy.port("imap")) as client:
            client.login(anna.address, anna.password)
            assert client.select("INBOX", readonly=True)[0] == "OK"
        # A refusal without Auth-Wait: nginx says why and closes.
        with socket.create_connection((LOOPBACK, proxy.port("imap")), timeout=10) as raw:
            raw.sendall(b"a1 LOGIN anna@alpha.example wrong\r\n")
            received = b""
            for _ in range(100):  # until nginx closes; each read waits at most the socket timeout
                chunk = raw.recv(4096)
                if not chunk:
                    break
                received += chunk
        assert received == b"* OK IMAP4 ready\r\na1 NO Invalid login or password\r\n"
        with smtplib.SMTP(LOOPBACK, proxy.port("submission"), timeout=10) as smtp:
            assert "auth" in smtp.ehlo()[1].decode().lower()
        session = proxy.session
        assert "client login failed" in proxy.log_text()
    assert [request.header("Auth-Protocol") for request in service.requests] == ["imap", "imap"]
    assert mailservers.session_processes(session) == []


def test_the_configuration_follows_the_options(scratch_directory: Path) -> None:
    authority = tlscerts.TestAuthority(scratch_directory / "ca")
    issued = authority.issue("nginx", ["localhost"])
    proxy = nginx.Nginx(
        scratch_directory / "nginx",
        nginx.AuthHttp("http://127.0.0.1:9/auth", timeout=0.5, headers=(("X-Key", 'a "b" \\c'),)),
        listeners=(
            nginx.MailListener("imap", "imap", port=11143, starttls="on"),
            nginx.MailListener("mx", "smtp", port=11025, smtp_auth=("none",)),
        ),
        xclient=False,
        proxy_smtp_auth=True,
        proxy_buffer="64k",
        certificate=nginx.Certificate(issued.cert, issued.key),
    )
    config = proxy.config()
    for line in (
        "auth_http http://127.0.0.1:9/auth;",
        "auth_http_timeout 500ms;",
        'auth_http_header X-Key "a \\"b\\" \\\\c";',
        "proxy_pass_error_message on;",
        "xclient off;",
        "proxy_smtp_auth on;",
        "proxy_buffer 64k;",
        f"ssl_certificate {issued.cert};",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        "listen 127.0.0.1:11143;",
        "starttls on;",
        "smtp_auth none;",
        "worker_processes 1;",
        f"error_log {proxy.error_log_path} info;",
    ):
        assert line in config, line
    assert (proxy.port("imap"), proxy.port("mx")) == (11143, 11025)


def test_bad_options_are_refused_before_anything_starts(scratch_directory: Path) -> None:
    auth = nginx.AuthHttp("http://127.0.0.1:9/auth")
    with pytest.raises(ValueError, match="certificate"):
        nginx.Nginx(
            scratch_directory / "a", auth, listeners=(nginx.MailListener("imap", "imap", starttls="on"),)
        )
    with pytest.raises(ValueError, match="repeat"):
        nginx.Nginx(
            scratch_directory / "b",
            auth,
            listeners=(nginx.MailListener("imap", "imap"), nginx.MailListener("imap", "pop3")),
        )


def test_a_taken_port_is_replaced_and_a_fixed_one_fails_with_the_reason(scratch_directory: Path) -> None:
    auth = nginx.AuthHttp("http://127.0.0.1:9/auth")
    proxy = nginx.Nginx(scratch_directory / "free", auth, listeners=(nginx.MailListener("pop3", "pop3"),))
    taken = proxy.port("pop3")
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, taken))
        squatter.listen()
        with proxy:
            assert proxy.port("pop3") != taken
            assert mailservers.greets(proxy.port("pop3"), b"+OK", b"QUIT\r\n")
        fixed = nginx.Nginx(
            scratch_directory / "fixed", auth, listeners=(nginx.MailListener("pop3", "pop3", port=taken),)
        )
        with pytest.raises(mailservers.MailServerError, match="Address already in use"):
            fixed.start()
    assert subprocess.run(["pgrep", "-f", str(scratch_directory / "fixed")], check=False).returncode == 1


def test_a_missing_mail_module_is_named_with_its_package(
    scratch_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nginx, "MAIL_MODULE", scratch_directory / "ngx_mail_module.so")
    with pytest.raises(mailservers.MissingSoftwareError, match="libnginx-mod-mail"):
        nginx.Nginx(scratch_directory / "n", nginx.AuthHttp("http://127.0.0.1:9/auth")).start()
