"""The testbed's auth_http service answers as scripted and records requests exactly.

Raw sockets stand in for nginx and mailgress here, so what the service receives and sends is
checked byte for byte; tests/differential uses it behind the real ones.
"""

import socket
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest

from testbed import authservice
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK

REQUEST = (
    b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\nAuth-User: an%20na\r\n"
    b"Auth-Pass: pa%25ss\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: 2\r\nClient-IP: 127.0.0.1\r\n\r\n"
)


def ask(service: authservice.AuthService, request: bytes = REQUEST) -> bytes:
    with socket.create_connection((LOOPBACK, service.port), timeout=10) as connection:
        connection.sendall(request)
        reply = b""
        for _ in range(100):  # until the service closes; each read waits at most the socket timeout
            chunk = connection.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


def test_requests_are_recorded_byte_for_byte_with_headers_in_order() -> None:
    with authservice.AuthService() as service:
        ask(service)
        (received,) = service.requests
    assert received.head == REQUEST
    assert received.request_line == "GET /auth HTTP/1.0"
    assert [name for name, _ in received.headers][:3] == ["Host", "Auth-Method", "Auth-User"]
    assert (received.user, received.password, received.attempt) == ("an na", "pa%ss", 2)
    assert received.header("client-ip") == "127.0.0.1"
    assert received.header("Auth-SSL") is None
    assert "pa%25ss" not in repr(received)
    assert service.url == f"http://{LOOPBACK}:{service.port}/auth"


def test_replies_are_encoded_as_nginx_expects_them() -> None:
    assert authservice.ok("127.0.0.1", 143, user="u", password="p").encode() == (
        b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n"
        b"Auth-User: u\r\nAuth-Pass: p\r\n\r\n"
    )
    assert authservice.refuse("No", wait=3, error_code="550 5.1.1").encode() == (
        b"HTTP/1.0 200 OK\r\nAuth-Status: No\r\nAuth-Wait: 3\r\nAuth-Error-Code: 550 5.1.1\r\n\r\n"
    )
    assert authservice.wait(2).encode() == b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n"
    assert authservice.Reply(raw=b"garbage").encode() == b"garbage"


def test_by_user_answers_per_login_and_callables_see_the_request() -> None:
    answer = authservice.by_user(
        {
            "AN NA": lambda received: authservice.refuse(f"attempt {received.attempt}"),
            "bob": authservice.ok("::1", 110),
        },
        default=authservice.refuse("who?"),
    )
    with authservice.AuthService(answer) as service:
        assert ask(service).endswith(b"Auth-Status: attempt 2\r\n\r\n")
        assert ask(service, REQUEST.replace(b"an%20na", b"bob")).endswith(b"Auth-Port: 110\r\n\r\n")
        assert ask(service, REQUEST.replace(b"an%20na", b"carl")).endswith(b"Auth-Status: who?\r\n\r\n")
        assert len(service.requests) == 3
        service.clear()
        assert service.requests == []


def test_check_passwords_grants_known_logins_with_their_backend_only() -> None:
    answer = authservice.check_passwords({"an na": authservice.Account("pa%ss", "127.0.0.1", 10143)})
    with authservice.AuthService(answer) as service:
        assert ask(service) == authservice.ok("127.0.0.1", 10143, password="pa%ss").encode()
        assert ask(service, REQUEST.replace(b"pa%25ss", b"wrong")) == authservice.refuse().encode()


def test_close_and_delay_and_down() -> None:
    with authservice.AuthService(lambda received: authservice.Reply(close=True)) as service:
        assert ask(service) == b""
        # A reply held back by its delay does not hold stop() up, and is never sent.
        service.answer = lambda received: authservice.Reply(delay=60)
        service.clear()
        connection = socket.create_connection((LOOPBACK, service.port), timeout=10)
        connection.sendall(REQUEST)
        for _ in range(1000):  # at most 10 s for the handler thread to record the request
            if service.requests:
                break
            threading.Event().wait(0.01)
        assert len(service.requests) == 1
        with service.down():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((LOOPBACK, service.port), timeout=10)
            assert connection.recv(100) == b""
        connection.close()
        service.answer = lambda received: authservice.ok()
        assert ask(service) == authservice.ok().encode()


def test_a_request_without_an_end_is_not_answered() -> None:
    with authservice.AuthService(lambda received: authservice.ok()) as service:
        with socket.create_connection((LOOPBACK, service.port), timeout=10) as connection:
            connection.sendall(b"GET /auth HTTP/1.0\r\n" + b"X: " + b"x" * authservice.MAX_REQUEST_HEAD)
            connection.shutdown(socket.SHUT_WR)
            assert connection.recv(100) == b""
        assert service.requests == []


def test_the_listen_backlog_is_nginxs_not_socketservers() -> None:
    """For a listening socket, ``ss`` shows the accept queue's limit as Send-Q (capped at somaxconn)."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with authservice.AuthService() as service:
        listing = subprocess.run(
            ["ss", "-H", "-l", "-t", "-n", f"sport = :{service.port}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    (line,) = listing.splitlines()
    state, _queued, limit, local, *_ = line.split()
    assert (state, local) == ("LISTEN", f"{LOOPBACK}:{service.port}")
    assert int(limit) == min(authservice.LISTEN_BACKLOG, somaxconn) > 5


def test_for_backends_names_each_logins_server_per_protocol(backends: Backends) -> None:
    answer = authservice.for_backends(backends)
    bob = backends.user("bob@beta.example")

    def received(**headers: str) -> authservice.Received:
        lines = tuple(headers.items())
        return authservice.Received(head=b"", request_line="GET /auth HTTP/1.0", headers=lines)

    def login(protocol: str, password: str) -> authservice.Reply:
        escaped = urllib.parse.quote(password, safe="")
        return answer(
            received(
                **{
                    "Auth-Method": "plain",
                    "Auth-User": bob.address,
                    "Auth-Pass": escaped,
                    "Auth-Protocol": protocol,
                }
            )
        )

    beta, postfix = backends.beta, backends.postfix
    for protocol, port in (
        ("imap", beta.imap_port),
        ("pop3", beta.pop3_port),
        ("smtp", postfix.submission_port),
    ):
        assert login(protocol, bob.password) == authservice.ok(LOOPBACK, port, password=bob.password)
    assert login("imap", "wrong") == authservice.refuse()
    for recipient, reply in (
        ("bob@beta.example", authservice.ok(LOOPBACK, postfix.smtp_port)),
        ("x@elsewhere.example", authservice.refuse("Relay access denied", error_code="550 5.7.1")),
    ):
        inbound = received(**{"Auth-Method": "none", "Auth-SMTP-To": f"RCPT TO:<{recipient}>"})
        assert answer(inbound) == reply
