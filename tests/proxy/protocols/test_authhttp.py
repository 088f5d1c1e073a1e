"""Tests for proxy/protocols/authhttp.py: nginx's auth_http request byte for byte, its escaping,
the route settings check, and the reading of replies (grammar, bounds, verdicts, rendering).

The byte strings marked "as nginx 1.22.1 sent it" were captured from the Debian nginx with
libnginx-mod-mail; tests/differential checks the same against a running nginx.
"""

import re
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols import authhttp
from proxy.protocols.events import LoginRequest
from proxy.protocols.sasl import Credentials, Mechanism
from proxy.table import Endpoint, HttpAuth

PASSWORD = "Pa55-unique-W0rd"
BACKEND_PASSWORD = "backend-0nly-secret"
DETERMINISTIC = settings(derandomize=True, database=None, deadline=None)
SERVICE = authhttp.service(HttpAuth("http://127.0.0.1:9000/auth"))
IMAP = LoginRequest(
    "imap", "alice@alpha.example", Credentials("alice@alpha.example", PASSWORD.encode()), tag=b"a1"
)
POP3 = LoginRequest("pop3", "bob", Credentials("bob", PASSWORD.encode()))
SUBMISSION = LoginRequest(
    "submission",
    "carol@alpha.example",
    Credentials("carol@alpha.example", PASSWORD.encode(), Mechanism.PLAIN),
    helo=b"EHLO client.example",
)
INBOUND = LoginRequest(
    "smtp",
    "dave@alpha.example",
    helo=b"EHLO  mx.sender.example ",
    envelope=(b"MAIL FROM:<x@sender.example> SIZE=100  ", b"RCPT TO:<dave@alpha.example>"),
)


def request_bytes(
    request: LoginRequest,
    *,
    number: int = 1,
    tls: authhttp.TlsFacts | None = None,
    target: authhttp.Service = SERVICE,
) -> bytes:
    return authhttp.build_request(target, authhttp.Attempt(request, number, "127.0.0.2", tls)).data


# ---------------------------------------------------------------------------------------------
# The request


def test_imap_login_request_is_nginxs_byte_for_byte() -> None:
    # As nginx 1.22.1 sent it for `a1 LOGIN "us er%x" "pa\"ss"` from 127.0.0.1 (Client-IP differs).
    request = LoginRequest("imap", "us er%x", Credentials("us er%x", b'pa"ss'), tag=b"a1")
    assert request_bytes(request) == (
        b"GET /auth HTTP/1.0\r\n"
        b"Host: 127.0.0.1\r\n"
        b"Auth-Method: plain\r\n"
        b"Auth-User: us%20er%25x\r\n"
        b'Auth-Pass: pa"ss\r\n'
        b"Auth-Protocol: imap\r\n"
        b"Auth-Login-Attempt: 1\r\n"
        b"Client-IP: 127.0.0.2\r\n"
        b"\r\n"
    )


def test_an_8_bit_password_goes_as_its_octets_escaped_as_nginx_escapes() -> None:
    # ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH) escapes space, "%" and 0x00-0x1F only: Latin-1 octets
    # (no UTF-8) go as they are, in Auth-Pass as in the LOGIN literal that carried them.
    request = LoginRequest("imap", "anna", Credentials("anna", b"s\xe9same 100%\xff"), tag=b"a1")
    assert b"\r\nAuth-Pass: s\xe9same%20100%25\xff\r\n" in request_bytes(request)


def test_pop3_and_every_sasl_mechanism_are_auth_method_plain() -> None:
    for mechanism in Mechanism:
        request = LoginRequest("pop3", "bob", Credentials("bob", PASSWORD.encode(), mechanism))
        assert b"\r\nAuth-Method: plain\r\n" in request_bytes(request)
    assert b"\r\nAuth-Protocol: pop3\r\n" in request_bytes(POP3)
    assert b"Client-Host" not in request_bytes(POP3)


def test_submission_is_smtp_with_client_host_unavailable_and_no_envelope() -> None:
    data = request_bytes(SUBMISSION, number=3)
    assert data.endswith(
        b"Auth-Method: plain\r\nAuth-User: carol@alpha.example\r\nAuth-Pass: " + PASSWORD.encode() + b"\r\n"
        b"Auth-Protocol: smtp\r\nAuth-Login-Attempt: 3\r\nClient-IP: 127.0.0.2\r\n"
        b"Client-Host: [UNAVAILABLE]\r\n\r\n"
    )


def test_inbound_smtp_is_auth_method_none_with_the_helo_argument_and_whole_command_lines() -> None:
    data = request_bytes(INBOUND)
    assert data.endswith(
        b"Auth-Method: none\r\nAuth-User: \r\nAuth-Pass: \r\nAuth-Protocol: smtp\r\n"
        b"Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.2\r\nClient-Host: [UNAVAILABLE]\r\n"
        b"Auth-SMTP-Helo: mx.sender.example\r\n"
        b"Auth-SMTP-From: MAIL FROM:<x@sender.example> SIZE=100\r\n"
        b"Auth-SMTP-To: RCPT TO:<dave@alpha.example>\r\n\r\n"
    )


def test_tls_facts_follow_the_client_headers_and_extra_headers_come_last() -> None:
    target = authhttp.service(HttpAuth("http://auth.mail.svc:9000/", headers=(("X-Auth-Key", "s3cr3t k"),)))
    tls = authhttp.TlsFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert request_bytes(INBOUND, tls=tls, target=target).endswith(
        b"Auth-SMTP-To: RCPT TO:<dave@alpha.example>\r\n"
        b"Auth-SSL: on\r\nAuth-SSL-Protocol: TLSv1.3\r\nAuth-SSL-Cipher: TLS_AES_256_GCM_SHA384\r\n"
        b"X-Auth-Key: s3cr3t k\r\n\r\n"
    )


def test_the_request_repr_shows_its_size_only() -> None:
    request = authhttp.build_request(SERVICE, authhttp.Attempt(IMAP, 1, "127.0.0.1"))
    assert PASSWORD.encode() in request.data
    assert PASSWORD not in repr(request)
    assert PASSWORD not in repr(authhttp.Attempt(IMAP, 1, "127.0.0.1"))


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"plain", b"plain"),
        (b"a b", b"a%20b"),
        (b"100%", b"100%25"),
        (b"\x00\x01\x1f\t\r\n", b"%00%01%1F%09%0D%0A"),
        # Only those: "+", "&", DEL and UTF-8 go through as they are, as in nginx.
        (b"a+b&c\x7f", b"a+b&c\x7f"),
        ("pässwörd".encode(), "pässwörd".encode()),
    ],
)
def test_escape_is_nginxs_mail_auth_escaping(raw: bytes, escaped: bytes) -> None:
    assert authhttp.escape(raw) == escaped


@DETERMINISTIC
@given(st.binary(max_size=64))
def test_escaped_values_are_one_header_line_and_unescape_back(raw: bytes) -> None:
    escaped = authhttp.escape(raw)
    assert not any(byte <= 0x20 for byte in escaped)
    assert urllib.parse.unquote_to_bytes(escaped) == raw


def test_credentials_with_line_breaks_cannot_add_headers() -> None:
    request = LoginRequest("imap", "x", Credentials("x\r\nAuth-Status: OK", b"p\nq"), tag=b"a1")
    lines = request_bytes(request).split(b"\r\n")
    assert b"Auth-User: x%0D%0AAuth-Status:%20OK" in lines
    assert b"Auth-Pass: p%0Aq" in lines
    assert not any(line.startswith(b"Auth-Status") for line in lines)


# ---------------------------------------------------------------------------------------------
# Route settings


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "uri", "scheme"),
    [
        ("http://127.0.0.1:9000/auth", "127.0.0.1", 9000, b"127.0.0.1", b"/auth", "http"),
        ("http://auth.mail.svc", "auth.mail.svc", 80, b"auth.mail.svc", b"/", "http"),
        ("https://auth.example/check?x=1", "auth.example", 443, b"auth.example", b"/check?x=1", "https"),
        ("HTTP://[::1]:8080/a/b", "::1", 8080, b"[::1]", b"/a/b", "http"),
        ("http://[::1]", "::1", 80, b"[::1]", b"/", "http"),
        ("http://auth:0080/", "auth", 80, b"auth", b"/", "http"),  # ngx_atoi: leading zeros
    ],
)
def test_service_reads_the_url_as_nginx_does(
    url: str, host: str, port: int, host_header: bytes, uri: bytes, scheme: str
) -> None:
    target = authhttp.service(HttpAuth(url))
    assert (target.scheme, target.host, target.port, target.host_header, target.uri) == (
        scheme,
        host,
        port,
        host_header,
        uri,
    )


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:9000/auth",
        "ftp://auth/",
        "http://user:pw@auth/",
        "http://auth:0/",
        "http://auth:65536/",
        "http://auth:x/",
        "http://auth:/",
        "http://:80/",
        "http://[::1/",
        "http://[::1]x/",
        "http://[auth]/",
        "http://::1/",
        "http://auth:1:2/",
        "http://auth:99999/",
        "http://aut\u00e9/",
        "http://auth/a b",
        "http://auth/\u00e9",
    ],
)
def test_service_refuses_urls_it_cannot_request(url: str) -> None:
    with pytest.raises(authhttp.AuthConfigError):
        authhttp.service(HttpAuth(url))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Key", "s3cr3t\r\nAuth-Status: OK"),
        ("X_Key", "s3cr3t"),
        ("X Key", "s3cr3t"),
        ("X-Key", "s3cr3t\u00e9"),
    ],
)
def test_service_refuses_extra_headers_that_would_break_the_request(name: str, value: str) -> None:
    with pytest.raises(authhttp.AuthConfigError) as raised:
        authhttp.service(HttpAuth("http://auth/", headers=((name, value),)))
    assert "s3cr3t" not in str(raised.value)


def test_extra_headers_keep_their_order_and_stay_out_of_repr() -> None:
    target = authhttp.service(HttpAuth("http://auth/", headers=(("X-B", "s3cr3t"), ("X-A", "\tv v"))))
    assert target.extra_headers == b"X-B: s3cr3t\r\nX-A: \tv v\r\n"
    assert "s3cr3t" not in repr(target)


# ---------------------------------------------------------------------------------------------
# The reply


def parse(data: bytes, request: LoginRequest = IMAP) -> authhttp.Verdict | None:
    return authhttp.parse_response(data, request)


def test_ok_with_server_port_user_and_password() -> None:
    verdict = parse(
        b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 10143\r\n"
        b"Auth-User: anna@alpha.example\r\nAuth-Pass: " + BACKEND_PASSWORD.encode() + b"\r\n\r\n"
    )
    assert verdict == authhttp.Granted(
        Endpoint("127.0.0.1", 10143), "anna@alpha.example", BACKEND_PASSWORD.encode()
    )
    assert BACKEND_PASSWORD not in repr(verdict)
    assert "anna@alpha.example" in repr(verdict)


def test_a_grants_auth_pass_is_taken_octet_for_octet() -> None:
    # As nginx copies it: 8-bit octets kept (a Latin-1 backend password), no %XX unescaping.
    verdict = parse(b"Auth-Status: OK\r\nAuth-Pass: s\xe9same%20x\r\n\r\n")
    assert verdict == authhttp.Granted(password=b"s\xe9same%20x")
    assert authhttp.credentials_for(IMAP, authhttp.Granted(password=b"s\xe9same")) == Credentials(
        "alice@alpha.example", b"s\xe9same"
    )


def test_ok_alone_leaves_server_and_credentials_to_the_route() -> None:
    assert parse(b"HTTP/1.1 204 No Content\r\nAuth-Status: OK\r\n\r\n") == authhttp.Granted()
    # nginx treats empty values as missing ones.
    assert parse(b"Auth-Status: OK\r\nAuth-Server:\r\nAuth-Port: \r\n\r\n") == authhttp.Granted()


@pytest.mark.parametrize(
    ("server", "port", "endpoint"),
    [
        # ngx_inet_addr reads each part of a dotted quad as decimal, leading zeros and all, and
        # ngx_atoi a port (review J2: both were refused as a temporary failure).
        (b"127.000.000.001", b"143", Endpoint("127.0.0.1", 143)),
        (b"010.001.0.00255", b"143", Endpoint("10.1.0.255", 143)),
        (b"127.0.0.1", b"000143", Endpoint("127.0.0.1", 143)),
        (b"127.0.0.1", b"0" * 200 + b"65535", Endpoint("127.0.0.1", 65535)),
        (b"::ffff:127.0.0.1", b"143", Endpoint("::ffff:7f00:1", 143)),
    ],
)
def test_addresses_and_ports_with_leading_zeros_as_nginx_reads_them(
    server: bytes, port: bytes, endpoint: Endpoint
) -> None:
    head = b"Auth-Status: OK\r\nAuth-Server: " + server + b"\r\nAuth-Port: " + port + b"\r\n\r\n"
    assert parse(head) == authhttp.Granted(endpoint)


@pytest.mark.parametrize(
    "head",
    [
        # No status line at all, bare LF, and a status code that means nothing: all as nginx.
        b"Auth-Status: OK\nAuth-Server: ::1\nAuth-Port: 143\n\n",
        b"HTTP/1.0 500 Whatever\nauth-status:OK\nAUTH-SERVER:   ::1   \nauth-port: 143\r\n\n",
        # The last of a header wins.
        b"Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Server: ::1\r\n"
        b"Auth-Port: 1\r\nAuth-Port: 143\r\n\r\n",
        # Unknown headers and a body are ignored.
        b"HTTP/1.0 200 OK\r\nX-Other: x\r\nAuth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: 143\r\n\r\nbody",
    ],
)
def test_grammar_as_nginx_accepts_it(head: bytes) -> None:
    assert parse(head) == authhttp.Granted(Endpoint("::1", 143))


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        (IMAP, b"a1 NO Invalid login or password\r\n"),
        (POP3, b"-ERR Invalid login or password\r\n"),
        (SUBMISSION, b"535 5.7.0 Invalid login or password\r\n"),
        (INBOUND, b"535 5.7.0 Invalid login or password\r\n"),
    ],
    ids=["imap", "pop3", "submission", "inbound"],
)
def test_refusal_is_rendered_per_protocol(login: LoginRequest, expected: bytes) -> None:
    assert parse(b"Auth-Status: Invalid login or password  \r\n\r\n", login) == authhttp.Refused(expected)


# RFC 9051 section 9 (RFC 3501 the same): response-tagged = tag SP resp-cond-state CRLF, where
# resp-cond-state = "NO" SP resp-text and resp-text = ["[" resp-text-code "]" SP] 1*TEXT-CHAR.
TAGGED_NO = re.compile(rb"[^ ]+ NO (\[[^\]]*\] )?[^\r\n]+\r\n")
IMAP_DEFAULT_REFUSAL = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nAuth-Status: \r\n\r\n",
        b"HTTP/1.0 200 OK\r\nAuth-Status\r\n\r\n",
        b"Auth-Status: \t \r\n\r\n",
        b"Auth-Status:\nAuth-Wait: 2\n\n",
    ],
    ids=["empty", "no-value", "blank", "bare-lf"],
)
@pytest.mark.parametrize(
    ("login", "expected"),
    [
        (IMAP, IMAP_DEFAULT_REFUSAL),
        (POP3, b"-ERR [AUTH] Authentication failed.\r\n"),
        (SUBMISSION, b"535 5.7.0 Authentication credentials invalid\r\n"),
        (INBOUND, b"535 5.7.0 Relay access denied\r\n"),
    ],
    ids=["imap", "pop3", "submission", "inbound"],
)
def test_refusal_without_a_text_gets_the_front_ends_own(
    head: bytes, login: LoginRequest, expected: bytes
) -> None:
    verdict = parse(head, login)
    assert isinstance(verdict, authhttp.Refused)
    assert verdict.reply == expected
    if login is IMAP:
        assert TAGGED_NO.fullmatch(verdict.reply)


def test_refusal_without_a_text_keeps_the_auth_error_code() -> None:
    head = b"Auth-Status:\r\nAuth-Error-Code: 550 5.1.1\r\n\r\n"
    assert parse(head, INBOUND) == authhttp.Refused(b"550 5.1.1 Relay access denied\r\n")


def test_smtp_refusal_takes_auth_error_code_and_auth_wait() -> None:
    head = b"Auth-Status: No such user\r\nAuth-Error-Code: 550 5.1.1\r\nAuth-Wait: 3\r\n\r\n"
    assert parse(head, INBOUND) == authhttp.Refused(b"550 5.1.1 No such user\r\n", wait=3)
    # Auth-Error-Code means nothing outside SMTP.
    assert parse(head, POP3) == authhttp.Refused(b"-ERR No such user\r\n", wait=3)


@pytest.mark.parametrize(
    ("head", "verdict"),
    [
        (b"Auth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n", authhttp.TryAgain(2)),
        (b"Auth-Status: WAIT\r\n\r\n", authhttp.TryAgain(0)),
        # ngx_atoi: a wait that is not all digits leaves the wait as it was.
        (
            b"Auth-Status: WAIT\r\nAuth-Wait: 2\r\nAuth-Wait: -1\r\nAuth-Wait: 3s\r\n\r\n",
            authhttp.TryAgain(2),
        ),
        # A refusal outranks WAIT and OK, whatever the order (nginx checks it first).
        (
            b"Auth-Status: no\r\nAuth-Status: WAIT\r\nAuth-Status: OK\r\n\r\n",
            authhttp.Refused(b"a1 NO no\r\n"),
        ),
        # Status values are case-sensitive: "ok" is a refusal text.
        (b"Auth-Status: ok\r\nAuth-Server: ::1\r\nAuth-Port: 143\r\n\r\n", authhttp.Refused(b"a1 NO ok\r\n")),
        # An empty status is a refusal with the front-end's own text (nginx sends none).
        (
            b"Auth-Status:\r\n\r\n",
            authhttp.Refused(IMAP_DEFAULT_REFUSAL),
        ),
        # A name without a colon is a header with an empty value, as in nginx.
        (
            b"Auth-Status\r\n\r\n",
            authhttp.Refused(IMAP_DEFAULT_REFUSAL),
        ),
    ],
)
def test_wait_and_refusal_precedence(head: bytes, verdict: authhttp.Verdict) -> None:
    assert parse(head) == verdict


@pytest.mark.parametrize(
    "head",
    [
        # nginx would log this one in: without Auth-Status there is no grant here.
        b"Auth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: mail.example\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: [::1]\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: fe80::1%eth0\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 0\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 65536\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 14 3\r\n\r\n",
        # Leading zeros change no value: still 1-65535, each part of a quad still 0-255.
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 0000\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 065536\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.256\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.0256\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.1\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1.2\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: +143\r\n\r\n",
        # ngx_inet_addr would read an empty part as 0; no auth service writes one: refused.
        b"Auth-Status: OK\r\nAuth-Server: 127..0.1\r\nAuth-Port: 143\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-User: \xc3\r\n\r\n",
        # Header names: letters, digits and "-" only, starting with a letter or digit.
        b"Auth_Status: OK\r\n\r\n",
        b"Auth Status: OK\r\n\r\n",
        b"-Auth-Status: OK\r\n\r\n",
        b"Auth-Status : OK\r\n\r\n",
        b"\tAuth-Status: OK\r\n\r\n",
        b"Auth-St\xe4tus: OK\r\n\r\n",
        # A CR must be followed by LF, in the status line too.
        b"Auth-Status: O\rK\r\n\r\n",
        b"HTTP/1.0 200\rOK\r\nAuth-Status: OK\r\n\r\n",
        b"Auth-Status: OK\r\n\r\r\n",
    ],
)
def test_replies_that_break_the_protocol_are_invalid(head: bytes) -> None:
    verdict = parse(head)
    assert isinstance(verdict, authhttp.Invalid), verdict


def test_invalid_reasons_quote_no_header_value() -> None:
    for head in (
        b"Auth-Status: OK\r\nAuth-User: \xffs3cr3t\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: s3cr3t\r\nAuth-Port: 1\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: s3cr3t\r\n\r\n",
        b"Auth-Status: s3cr3t\rx\r\n\r\n",
    ):
        verdict = parse(head)
        assert isinstance(verdict, authhttp.Invalid)
        assert "s3cr3t" not in verdict.reason


def test_a_header_that_does_not_end_within_1024_bytes_is_invalid() -> None:
    padding = b"X-Pad: " + b"p" * 2000 + b"\r\n"
    head = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n" + padding + b"\r\n"
    assert parse(head[: authhttp.MAX_RESPONSE_HEAD - 1]) is None
    assert parse(head[: authhttp.MAX_RESPONSE_HEAD]) == authhttp.Invalid(
        f"response header longer than {authhttp.MAX_RESPONSE_HEAD} bytes"
    )
    assert isinstance(parse(head), authhttp.Invalid)


def test_a_header_ending_exactly_at_1024_bytes_is_read() -> None:
    start = b"Auth-Status: OK\r\nX-Pad: "
    head = start + b"p" * (authhttp.MAX_RESPONSE_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == authhttp.MAX_RESPONSE_HEAD
    assert parse(head + b"body" * 1000) == authhttp.Granted()


replies = st.lists(
    st.tuples(
        st.sampled_from(["Auth-Status", "auth-server", "Auth-Port", "Auth-Wait", "X-Other", "Auth-Pass"]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    ),
    max_size=6,
)


@DETERMINISTIC
@given(replies, st.booleans(), st.sampled_from([b"\r\n", b"\n"]))
def test_no_verdict_before_the_empty_line_and_the_same_one_after_it(
    headers: list[tuple[str, str]], status_line: bool, newline: bytes
) -> None:
    head = (b"HTTP/1.0 200 OK" + newline if status_line else b"") + b"".join(
        f"{name}: {value}".encode() + newline for name, value in headers
    )
    full = head + newline
    verdict = parse(full)
    assert verdict is not None
    for cut in range(len(full)):
        assert parse(full[:cut]) is None, full[:cut]
    assert parse(full + b"more bytes\r\n\r\n") == verdict


@DETERMINISTIC
@given(st.binary(max_size=1200))
def test_any_bytes_give_none_or_a_verdict(data: bytes) -> None:
    verdict = parse(data)
    assert verdict is None or isinstance(
        verdict, authhttp.Granted | authhttp.Refused | authhttp.TryAgain | authhttp.Invalid
    )
    if len(data) >= authhttp.MAX_RESPONSE_HEAD:
        assert verdict is not None


# ---------------------------------------------------------------------------------------------
# Credentials for the backend


def test_credentials_for_applies_the_overrides() -> None:
    plain = LoginRequest(
        "imap", "alias", Credentials("alias", PASSWORD.encode(), Mechanism.PLAIN, authzid="alias"), tag=b"a1"
    )
    assert authhttp.credentials_for(plain, authhttp.Granted()) == plain.credentials
    assert authhttp.credentials_for(
        plain, authhttp.Granted(password=BACKEND_PASSWORD.encode())
    ) == Credentials("alias", BACKEND_PASSWORD.encode(), Mechanism.PLAIN, authzid="alias")
    assert authhttp.credentials_for(plain, authhttp.Granted(user="anna", password=b"")) == Credentials(
        "anna", b"", Mechanism.PLAIN, authzid=""
    )
    assert authhttp.credentials_for(INBOUND, authhttp.Granted(user="anna", password=b"x")) is None
