"""Real clients speak TLS to the proxy: curl, openssl s_client, swaks, imaplib.

One proxy has a STARTTLS and an implicit-TLS listener per protocol (the roles of IMAP 143/993,
POP3 110/995 and submission 587/465), each with two certificates from the testbed CA: the
default for ``mailgress.test`` (and 127.0.0.1) and one for ``mail.other.test`` chosen by SNI.
``curl --ssl-reqd`` with ``--cacert`` logs in and fetches, lists or sends over every listener;
``openssl s_client -starttls imap|pop3|smtp`` verifies the certificate each SNI name gets; swaks
submits with ``--tls``. When the default certificate's files are renewed in place (as
cert-manager does), new connections get the new serial within a bounded wait while an imaplib
session opened before keeps its own TLS session and goes on working.
The SNI and renewal checks use the STARTTLS listeners; the implicit ones share the same
certificate store.
"""

import imaplib
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.server import listeners as proxy_listeners
from testbed import clients, messages, tlscerts
from testbed.backends import Backends
from testbed.mailservers import LOOPBACK, User
from tests.e2e.helpers import SERVER_NAME
from tests.e2e_edge.conftest import (
    TOOL_TIMEOUT,
    EdgeProxy,
    LaunchEdgeProxy,
    serial_of,
)

NewUser = Callable[..., User]
OTHER_NAME = "mail.other.test"
# Certificate names: the default answers for the proxy's name and its address (clients that
# connect by IP, such as imaplib here, send no SNI), the other only for its own name.
DEFAULT_NAMES = [SERVER_NAME, LOOPBACK]
OTHER_NAMES = [OTHER_NAME]
# listener name -> (protocol, tls mode), as a mail administrator would set them up.
FRONT = {
    "imap-starttls": ("imap", "starttls"),
    "imaps": ("imap", "implicit"),
    "pop3-starttls": ("pop3", "starttls"),
    "pop3s": ("pop3", "implicit"),
    "submission-starttls": ("submission", "starttls"),
    "smtps": ("submission", "implicit"),
}
# The STARTTLS listeners and what ``openssl s_client -starttls`` calls their protocols.
STARTTLS_LISTENERS = {"imap-starttls": "imap", "pop3-starttls": "pop3", "submission-starttls": "smtp"}
# The proxy re-reads changed certificate files every CERTIFICATE_POLL_INTERVAL (1 s); a renewal
# must show within RENEWAL_WAIT, probed at most RENEWAL_PROBES times.
RENEWAL_WAIT = 30.0
RENEWAL_PROBES = 100


@pytest.fixture(scope="module")
def certificates(
    edge_backends: Backends, authority: tlscerts.TestAuthority
) -> dict[str, tlscerts.IssuedCertificate]:
    """The listeners' certificate files: "default" and "other" (the SNI one)."""
    folder = edge_backends.directory / "front-tls"
    folder.mkdir()
    return {
        stem: authority.issue(f"front-{stem}", names, cert=folder / f"{stem}.crt", key=folder / f"{stem}.key")
        for stem, names in (("default", DEFAULT_NAMES), ("other", OTHER_NAMES))
    }


@pytest.fixture(scope="module")
def front(
    launch_edge_proxy: LaunchEdgeProxy, certificates: dict[str, tlscerts.IssuedCertificate]
) -> EdgeProxy:
    files = [{"cert": str(issued.cert), "key": str(issued.key)} for issued in certificates.values()]
    return launch_edge_proxy(
        "client-tls",
        listeners=[
            {"name": name, "protocol": protocol, "tls": tls, "certificates": files}
            for name, (protocol, tls) in FRONT.items()
        ],
    )


def curl_options(port: int, authority: tlscerts.TestAuthority) -> list[str]:
    """TLS required and checked against the testbed CA; the proxy's name resolves to 127.0.0.1."""
    return ["--ssl-reqd", "--cacert", str(authority.cert), "--resolve", f"{SERVER_NAME}:{port}:{LOOPBACK}"]


@pytest.mark.parametrize(
    ("scheme", "listener"),
    [("imap", "imap-starttls"), ("imaps", "imaps")],
)
def test_curl_fetches_over_imap_with_tls(
    front: EdgeProxy,
    edge_backends: Backends,
    edge_user: NewUser,
    authority: tlscerts.TestAuthority,
    scheme: str,
    listener: str,
) -> None:
    user = edge_user()
    identifier = messages.message_id()
    edge_backends.deliver(
        user.address, messages.compose("a@example.net", user.address, "curl", identifier=identifier)
    )
    port = front.port(listener)
    fetched = clients.curl(
        f"{scheme}://{SERVER_NAME}:{port}/INBOX;UID=1", *curl_options(port, authority), user=user
    )
    assert fetched.returncode == 0, fetched.describe()
    assert identifier.encode() in fetched.output


@pytest.mark.parametrize(
    ("scheme", "listener"),
    [("pop3", "pop3-starttls"), ("pop3s", "pop3s")],
)
def test_curl_lists_and_retrieves_over_pop3_with_tls(
    front: EdgeProxy,
    edge_backends: Backends,
    edge_user: NewUser,
    authority: tlscerts.TestAuthority,
    scheme: str,
    listener: str,
) -> None:
    user = edge_user()
    identifier = messages.message_id()
    message = messages.compose("a@example.net", user.address, "curl", identifier=identifier)
    edge_backends.deliver(user.address, message)
    port = front.port(listener)
    listed = clients.curl(f"{scheme}://{SERVER_NAME}:{port}/", *curl_options(port, authority), user=user)
    assert listed.returncode == 0, listed.describe()
    assert listed.output.split() == [b"1", str(len(message)).encode()]  # stored with CRLF: as sent
    retrieved = clients.curl(f"{scheme}://{SERVER_NAME}:{port}/1", *curl_options(port, authority), user=user)
    assert retrieved.returncode == 0, retrieved.describe()
    assert identifier.encode() in retrieved.output


@pytest.mark.parametrize(
    ("scheme", "listener"),
    [("smtp", "submission-starttls"), ("smtps", "smtps")],
)
def test_curl_sends_over_submission_with_tls(
    front: EdgeProxy,
    edge_backends: Backends,
    edge_user: NewUser,
    authority: tlscerts.TestAuthority,
    tmp_path: Path,
    scheme: str,
    listener: str,
) -> None:
    user = edge_user()
    identifier = messages.message_id()
    message = tmp_path / "message.eml"
    message.write_bytes(messages.compose(user.address, user.address, "curl", identifier=identifier))
    port = front.port(listener)
    sent = clients.curl(
        f"{scheme}://{SERVER_NAME}:{port}/client.example",
        *curl_options(port, authority),
        "--mail-from", user.address, "--mail-rcpt", user.address, "--upload-file", str(message),
        user=user,
    )  # fmt: skip
    assert sent.returncode == 0, sent.describe()
    (delivered,) = edge_backends.wait_delivered(user.address, 1)
    assert identifier.encode() in delivered


def served_serial(front: EdgeProxy, listener: str, name: str, authority: tlscerts.TestAuthority) -> int:
    """The serial of the certificate ``openssl s_client -starttls`` verifies for SNI ``name``."""
    command = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{front.port(listener)}"]
    command += ["-starttls", STARTTLS_LISTENERS[listener], "-servername", name]
    command += ["-CAfile", str(authority.cert), "-verify_return_error"]
    if name in (*DEFAULT_NAMES, *OTHER_NAMES):
        command += ["-verify_hostname", name]
    # Closed stdin: s_client completes the handshake, prints what it saw and hangs up.
    result = subprocess.run(command, input=b"", capture_output=True, timeout=TOOL_TIMEOUT, check=False)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr.decode()}\n{output[-2000:]}"
    assert "Verify return code: 0 (ok)" in output, output[-2000:]
    return serial_of(result.stdout)


@pytest.mark.parametrize(
    ("name", "expected"),
    [(SERVER_NAME, "default"), (OTHER_NAME, "other"), ("unknown.example", "default")],
    ids=["default-name", "other-name", "unknown-name-gets-the-default"],
)
@pytest.mark.parametrize("listener", STARTTLS_LISTENERS)
def test_each_sni_name_gets_its_certificate(
    front: EdgeProxy,
    certificates: dict[str, tlscerts.IssuedCertificate],
    authority: tlscerts.TestAuthority,
    listener: str,
    name: str,
    expected: str,
) -> None:
    # The files on disk, not the fixture's serial: the renewal test may have replaced them.
    on_disk = serial_of(certificates[expected].cert.read_bytes())
    assert served_serial(front, listener, name, authority) == on_disk


def peer_serial(client: imaplib.IMAP4) -> int:
    certificate = client.sock.getpeercert()  # an SSLSocket after STARTTLS
    return int(certificate["serialNumber"], 16)


def test_a_renewed_certificate_reaches_new_connections_and_open_sessions_keep_working(
    front: EdgeProxy,
    edge_backends: Backends,
    edge_user: NewUser,
    certificates: dict[str, tlscerts.IssuedCertificate],
    authority: tlscerts.TestAuthority,
) -> None:
    user = edge_user()
    identifier = messages.message_id()
    edge_backends.deliver(
        user.address, messages.compose("a@example.net", user.address, "renewal", identifier=identifier)
    )
    context = ssl.create_default_context(cafile=str(authority.cert))
    default = certificates["default"]
    with clients.imap(front.port("imap-starttls")) as before:
        before.starttls(context)
        before.login(user.address, user.password)
        assert before.select("INBOX", readonly=True)[0] == "OK"
        old_serial = peer_serial(before)
        assert old_serial == serial_of(default.cert.read_bytes())

        renewed = authority.issue("front-default", DEFAULT_NAMES, cert=default.cert, key=default.key)
        assert renewed.serial != old_serial
        deadline = time.monotonic() + RENEWAL_WAIT
        for _ in range(RENEWAL_PROBES):
            serving = {
                listener: served_serial(front, listener, SERVER_NAME, authority)
                for listener in STARTTLS_LISTENERS
            }
            if set(serving.values()) == {renewed.serial} or time.monotonic() >= deadline:
                break
            time.sleep(proxy_listeners.CERTIFICATE_POLL_INTERVAL / 4)
        assert serving == dict.fromkeys(STARTTLS_LISTENERS, renewed.serial)

        # The session from before the renewal: same TLS session, still served.
        assert before.noop()[0] == "OK"
        typ, data = before.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK" and identifier.encode() in data[0][1]
        assert peer_serial(before) == old_serial

    with clients.imap(front.port("imap-starttls")) as after:
        after.starttls(context)
        assert peer_serial(after) == renewed.serial
        after.login(user.address, user.password)
        assert after.select("INBOX", readonly=True)[0] == "OK"
    assert "certificates reloaded" in front.log_text()


def test_swaks_submits_with_starttls(
    front: EdgeProxy, edge_backends: Backends, edge_user: NewUser, authority: tlscerts.TestAuthority
) -> None:
    user = edge_user()
    identifier = messages.message_id()
    message = messages.compose(user.address, user.address, "swaks tls", identifier=identifier)
    result = clients.swaks(
        "--server", f"{LOOPBACK}:{front.port('submission-starttls')}",
        "--tls", "--tls-verify", "--tls-ca-path", str(authority.cert), "--tls-sni", SERVER_NAME,
        "--auth", "PLAIN", "--from", user.address, "--to", user.address,
        user=user, data=message.removesuffix(b"\r\n"),  # swaks ends DATA with its own CRLF
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert "STARTTLS" in result.transcript and "TLS started" in result.transcript, result.describe()
    (delivered,) = edge_backends.wait_delivered(user.address, 1)
    assert identifier.encode() in delivered
