"""Open-relay checks in the style of the classic relay testers, against the real Postfix behind the proxy.

Every probe recipient hides a domain no route owns (gamma.example) behind a trick a careless mail
server once honoured: the percent hack, UUCP bang paths, quoted local parts, RFC 5321 source
routes, address literals, two at signs, a bare local part. Each goes to the proxy's MX listener
from a foreign, a spoofed local and the null sender, once as the first recipient and once behind
a routed recipient (the proxy mediates every later command too), through a route without and one
with XCLIENT: the proxy must refuse each itself, so Postfix never hears of one. Submission is tried
without AUTH, command by command and as one pipelined transaction. Then Postfix's log, queue
and maildirs must show that nothing was accepted for a foreign domain.

A second Postfix trusts the proxy's own address for relaying (mynetworks), as a backend set up
before the proxy existed might: with XCLIENT it judges the real client (127.0.0.2) and refuses a
recipient its route sends it but it does not host.
"""

import secrets
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import backends as testbed_backends
from testbed import clients, mailservers, proxyprocess, proxysettings
from tests.conftest import running_postfix
from tests.conftest import testbed_directory as make_testbed_directory
from tests.e2e.helpers import SERVER_NAME, StartProxy
from tests.security.conftest import with_client_info

LOCAL = testbed_backends.ALPHA
FOREIGN = testbed_backends.UNROUTED_DOMAIN
LOOPBACK = mailservers.LOOPBACK
# A second loopback address for the client, so a backend can tell it from the proxy (127.0.0.1).
CLIENT_ADDRESS = "127.0.0.2"
SENDERS = {"foreign sender": "relay-check@relay-check.example", "spoofed local sender": f"alice@{LOCAL}"}
SENDERS["null sender"] = ""
# How long Postfix may take to log what it refused (its log goes through postlogd).
LOG_WAIT = 30.0


def probes(marker: str) -> dict[str, str]:
    """Recipient addresses that must never be relayed; each names ``marker`` for the log search."""
    return {
        "unrouted domain": f"{marker}@{FOREIGN}",
        "unrouted domain in capitals": f"{marker}@{FOREIGN.upper()}",
        "unrouted domain with a trailing dot": f"{marker}@{FOREIGN}.",
        "local domain as a prefix": f"{marker}@{LOCAL}.{FOREIGN}",
        "percent hack": f"{marker}%{FOREIGN}@{LOCAL}",
        "percent hack at an address literal": f"{marker}%{FOREIGN}@[127.0.0.1]",
        "bang path": f"{FOREIGN}!{marker}@{LOCAL}",
        "bare bang path": f"{FOREIGN}!{marker}",
        "quoted local part": f'"{marker}@{FOREIGN}"@{LOCAL}',
        "bare quoted local part": f'"{marker}@{FOREIGN}"',
        "quoted percent hack": f'"{marker}%{FOREIGN}"@{LOCAL}',
        "source route": f"@{LOCAL}:{marker}@{FOREIGN}",
        "source route with two hops": f"@{LOCAL},@{SERVER_NAME}:{marker}@{FOREIGN}",
        "two at signs": f"{marker}@{FOREIGN}@{LOCAL}",
        "address literal": f"{marker}@[127.0.0.1]",
        "bare local part": marker,
    }


def new_marker() -> str:
    return f"relaytest-{secrets.token_hex(4)}"


Reply = tuple[int, bytes]


def rcpt_replies(port: int, sender: str, recipients: list[str], source: str = LOOPBACK) -> list[Reply]:
    """One SMTP transaction up to its recipients (never DATA): the reply to each RCPT TO."""
    with smtplib.SMTP(LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT, source_address=(source, 0)) as client:
        client.ehlo("relay-check.example")
        # Raw lines: smtplib's own MAIL/RCPT would re-parse and "fix" the tricky addresses.
        mail = client.docmd(f"MAIL FROM:<{sender}>")
        assert mail[0] == 250, mail
        return [client.docmd(f"RCPT TO:<{recipient}>") for recipient in recipients]


def accepted(reply: Reply) -> bool:
    return 200 <= reply[0] < 300


def lines_naming(postfix: mailservers.Postfix, marker: str, at_least: int) -> list[str]:
    """Postfix's log lines that name ``marker``, once at least ``at_least`` are there (bounded)."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        lines = [line for line in postfix.log_text().splitlines() if marker in line]
        if len(lines) >= at_least or time.monotonic() >= deadline:
            return lines
        time.sleep(mailservers.POLL_INTERVAL)


def queued_files_naming(postfix: mailservers.Postfix, marker: str) -> list[Path]:
    return [
        path
        for path in postfix.queue_directory.rglob("*")
        if path.is_file() and marker.encode() in path.read_bytes()
    ]


@pytest.fixture(scope="module")
def target(backends: testbed_backends.Backends) -> mailservers.User:
    """A routed recipient of this module alone: the one a probe hides behind."""
    return backends.add_user(f"relay-target-{secrets.token_hex(3)}@{LOCAL}")


@pytest.fixture(scope="module")
def relay_proxies(
    launch_proxy: StartProxy, backends: testbed_backends.Backends
) -> dict[str, proxyprocess.ProxyProcess]:
    """Proxies over the standard routes: without client forwarding, and with XCLIENT."""
    routes = backends.mailroutes()
    return {
        "none": launch_proxy("relay-none", routes=routes),
        "xclient": launch_proxy(
            "relay-xclient", routes=with_client_info(routes, smtp="xclient", submission="xclient")
        ),
    }


@pytest.mark.parametrize("client_info", ["none", "xclient"])
def test_mx_relays_nothing(
    relay_proxies: dict[str, proxyprocess.ProxyProcess],
    backends: testbed_backends.Backends,
    target: mailservers.User,
    client_info: str,
) -> None:
    port = relay_proxies[client_info].settings.ports.smtp
    marker = new_marker()
    relayed = []
    for sender_name, sender in SENDERS.items():
        for probe_name, probe in probes(marker).items():
            first = rcpt_replies(port, sender, [probe])
            behind_target = rcpt_replies(port, sender, [target.address, probe])
            assert accepted(behind_target[0]), (sender_name, behind_target)  # Postfix answers the rest
            for position, reply in (("first", first[0]), ("behind a routed one", behind_target[1])):
                if accepted(reply):
                    relayed.append(
                        f"{probe_name} ({probe}) as the {position} recipient, {sender_name}: {reply}"
                    )
    assert relayed == []
    postfix = backends.postfix
    # Last, a recipient Postfix refuses itself (routed, but no such user): once its line is in
    # the log, a probe Postfix had heard of would be there before it.
    sentinel = f"{marker}-unknown@{LOCAL}"
    assert rcpt_replies(port, "", [sentinel])[0][0] == 550
    logged = lines_naming(postfix, marker, 1)
    # The proxy refused every probe itself, behind a routed recipient too: Postfix heard of none,
    # nothing was queued, nothing delivered.
    assert len(logged) == 1 and sentinel in logged[0] and "reject: RCPT" in logged[0], "\n".join(logged)
    assert queued_files_naming(postfix, marker) == []
    delivered = [
        address
        for address in backends.users
        if any(marker.encode() in message for message in backends.maildir(address).messages())
    ]
    assert delivered == []
    assert backends.maildir(target.address).messages() == []


@pytest.mark.parametrize("client_info", ["none", "xclient"])
def test_submission_without_auth_relays_nothing(
    relay_proxies: dict[str, proxyprocess.ProxyProcess], backends: testbed_backends.Backends, client_info: str
) -> None:
    port = relay_proxies[client_info].settings.ports.submission
    marker = new_marker()
    recipient = f"{marker}@{FOREIGN}"
    with smtplib.SMTP(LOOPBACK, port, timeout=clients.SOCKET_TIMEOUT) as client:
        client.ehlo("relay-check.example")
        replies = [
            client.docmd(line) for line in (f"MAIL FROM:<alice@{LOCAL}>", f"RCPT TO:<{recipient}>", "DATA")
        ]
    assert replies[0] == (530, b"5.7.0 Authentication required"), replies
    assert all(500 <= code < 600 for code, _ in replies), replies
    # The whole transaction pipelined in one write: every command refused, the body never taken.
    with clients.RawClient(port) as raw:
        assert raw.line().startswith(b"220 ")
        raw.send(
            b"EHLO relay-check.example\r\nMAIL FROM:<alice@alpha.example>\r\n"
            + f"RCPT TO:<{recipient}>\r\n".encode()
            + b"DATA\r\nSubject: relay test\r\n\r\nrelayed?\r\n.\r\nQUIT\r\n"
        )
        answers = raw.until_closed().decode().splitlines()
    taken = [line for line in answers if line[:3] not in ("250", "221") and line[:1] in ("2", "3")]
    assert taken == [], answers  # no 354 "go ahead" and no "queued"
    assert [line for line in answers if line.startswith("250 ")][1:] == [], answers  # only EHLO's
    # Submission refused everything before AUTH: Postfix never heard of the recipient.
    assert [line for line in backends.postfix.log_text().splitlines() if marker in line] == []


@pytest.fixture(scope="module")
def trusting_postfix() -> Iterator[mailservers.Postfix]:
    """A Postfix that relays for the proxy's own address (mynetworks) and takes XCLIENT from it."""
    directory = make_testbed_directory("mailgress-relay-")
    owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
    postfix = mailservers.Postfix(
        directory / "postfix",
        domains=[LOCAL],
        mailboxes={f"target@{LOCAL}": mailservers.Maildir(directory / "target", owner)},
        xclient_hosts=(f"{LOOPBACK}/32",),
        extra_main_cf={
            "mynetworks": f"{LOOPBACK}/32",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        },
    )
    with running_postfix(postfix, directory, "trusting"):
        yield postfix


def test_xclient_makes_a_trusting_postfix_judge_the_real_client(
    launch_proxy: StartProxy, trusting_postfix: mailservers.Postfix
) -> None:
    services = {"mail/trusting-postfix": {"25": [f"{LOOPBACK}:{trusting_postfix.smtp_port}"]}}
    marker = new_marker()
    probe = f"{marker}@{FOREIGN}"
    replies = {}
    for client_info in ("xclient", "none"):
        # The route sends FOREIGN to this Postfix too, so the probe passes the proxy (a route's
        # recipient) and this Postfix's own relay check is what decides.
        [route] = with_client_info(
            [proxysettings.mailroute("alpha", [LOCAL, FOREIGN], smtp=("trusting-postfix", 25))],
            smtp=client_info,
        )
        proxy = launch_proxy(f"relay-trusting-{client_info}", routes=[route], services=services)
        port = proxy.settings.ports.smtp
        replies[client_info] = rcpt_replies(port, "", [f"target@{LOCAL}", probe], source=CLIENT_ADDRESS)
    assert [accepted(reply) for reply in replies["xclient"]] == [True, False], replies
    assert replies["xclient"][1] == (550, f"5.7.1 <{probe}>: Relay access denied".encode())
    logged = lines_naming(trusting_postfix, marker, 2)
    assert any(f"unknown[{CLIENT_ADDRESS}]" in line and "Relay access denied" in line for line in logged), (
        logged
    )
    # The control, and why XCLIENT matters: without it this Postfix takes the proxy (127.0.0.1,
    # its mynetworks) for the client and its relay check lets the probe pass; only its disabled
    # outbound transport refuses. A backend behind a proxy without XCLIENT must not trust the
    # proxy's address for relaying.
    assert not accepted(replies["none"][1]), replies
    assert b"Relay access denied" not in replies["none"][1][1], replies
    assert queued_files_naming(trusting_postfix, marker) == []
