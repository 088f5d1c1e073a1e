"""The testbed's Dovecot and Postfix work as the proxy tests assume, with real clients.

Against the session's running backends: logins land only on the right Dovecot (imaplib, poplib,
curl), messages stored or submitted are byte-identical where they arrive (smtplib, swaks, curl),
the MX delivers for alpha and beta and refuses everything else, and client-IP forwarding is
trusted from loopback. On instances of their own: several run side by side, a taken port is
retried, bad setups fail with a clear message, and stop() leaves no process (pgrep).
Passwords are never part of an asserted expression, so no failure output can show one.
"""

import grp
import imaplib
import os
import poplib
import smtplib
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed import clients, mailservers, messages
from testbed.backends import BETA, UNROUTED_DOMAIN, Backends
from testbed.mailservers import LOOPBACK, User

NewUser = Callable[..., User]
# pgrep run states of a process that still exists (everything but zombies).
LIVE_STATES = "R,S,D,T,t"


def pgrep_session(session: int) -> list[str]:
    result = subprocess.run(
        ["pgrep", "-s", str(session), "-r", LIVE_STATES], capture_output=True, text=True, check=False
    )
    return result.stdout.split()


# -- IMAP and POP3 on the two Dovecots ----------------------------------------------------------


def test_alice_logs_in_on_dovecot_alpha_and_not_on_beta(backends: Backends) -> None:
    alice = backends.user("alice@alpha.example")
    with clients.imap(backends.alpha.imap_port) as client:
        client.login(alice.address, alice.password)
        typ, _ = client.select("INBOX")
        assert typ == "OK"
    with (
        clients.imap(backends.beta.imap_port) as client,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        client.login(alice.address, alice.password)
    assert mailservers.Login("imap", alice.address, "PLAIN", LOOPBACK) in backends.alpha.wait_logins(
        alice.address, 1
    )
    assert all(login.user != alice.address for login in backends.beta.logins())


def test_bob_with_a_sha512_crypt_password_logs_in_on_dovecot_beta_only(backends: Backends) -> None:
    bob = backends.user("bob@beta.example")
    assert backends.beta.password_scheme == "SHA512-CRYPT"
    with clients.imap(backends.beta.imap_port) as client:
        client.login(bob.address, bob.password)
    with clients.imap(backends.alpha.imap_port) as client, pytest.raises(imaplib.IMAP4.error):
        client.login(bob.address, bob.password)


def test_the_awkward_password_works_quoted_as_a_literal_and_with_sasl_ir(backends: Backends) -> None:
    al = backends.user("al@alpha.example")
    awkward = {"{", '"', "\\", " "} <= set(al.password)
    assert awkward, "al's password must contain a brace, a quote, a backslash and a space"
    with clients.imap(backends.alpha.imap_port) as client:
        client.login(al.address, al.password)  # imaplib sends a quoted string with escapes
    with clients.imap(backends.alpha.imap_port) as client:
        clients.imap_login_literal(client, al)
        assert client.select("INBOX")[0] == "OK"
    with clients.imap(backends.alpha.imap_port) as client:
        clients.imap_authenticate_plain(client, al)
        assert client.select("INBOX")[0] == "OK"
    with clients.imap(backends.alpha.imap_port) as client:
        clients.imap_authenticate_plain(client, al, initial_response=False)
        assert client.select("INBOX")[0] == "OK"


def test_a_stored_message_is_fetched_byte_for_byte_over_imap_and_pop3(
    backends: Backends, new_user: NewUser
) -> None:
    user = new_user(BETA)
    message = messages.compose("x@example.net", user.address, "stored", ".leading dot\n..two\nend\n")
    backends.deliver(user.address, message)
    with clients.imap(backends.beta.imap_port) as client:
        client.login(user.address, user.password)
        client.select("INBOX", readonly=True)
        typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == message
    with clients.pop3(backends.beta.pop3_port) as pop:
        pop.user(user.address)
        pop.pass_(user.password)
        _, lines, _ = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == message


def test_pop3_user_pass_and_auth_plain(backends: Backends) -> None:
    anna = backends.user("anna@alpha.example")
    before = len(
        [
            login
            for login in backends.alpha.logins()
            if login.user == anna.address and login.protocol == "pop3"
        ]
    )
    with clients.pop3(backends.alpha.pop3_port) as pop:
        pop.user(anna.address)
        pop.pass_(anna.password)  # raises poplib.error_proto unless +OK
        pop.stat()
    with clients.pop3(backends.alpha.pop3_port) as pop:
        assert clients.pop3_auth_plain(pop, anna).startswith(b"+OK")
        pop.stat()
    with clients.pop3(backends.beta.pop3_port) as pop, pytest.raises(poplib.error_proto):
        pop.user(anna.address)
        pop.pass_(anna.password)
    backends.alpha.wait_logins(anna.address, before + 2, protocol="pop3")


def test_client_ip_forwarding_is_trusted_from_loopback(backends: Backends) -> None:
    """IMAP ID x-originating-ip changes Dovecot's rip=; POP3 offers XCLIENT; Postfix offers XCLIENT."""
    ava = backends.user("ava@alpha.example")
    with clients.RawClient(backends.alpha.imap_port) as raw:
        raw.line()
        assert raw.command(b'a ID ("x-originating-ip" "192.0.2.7")', b"a ").startswith(b"a OK")
        assert raw.command(b"b AUTHENTICATE PLAIN " + clients.sasl_plain(ava).encode(), b"b ").startswith(
            b"b OK"
        )
    assert mailservers.Login("imap", ava.address, "PLAIN", "192.0.2.7") in backends.alpha.wait_logins(
        ava.address, 1
    )
    with clients.pop3(backends.alpha.pop3_port) as pop:
        assert b"[XCLIENT]" in pop.getwelcome()
    with clients.smtp(backends.postfix.smtp_port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("xclient")


def test_curl_examines_and_fetches_over_imap_and_pop3(backends: Backends, new_user: NewUser) -> None:
    user = new_user()
    message = messages.compose("x@example.net", user.address, "for curl", ".dot line\nbody\n")
    backends.deliver(user.address, message)
    imap = f"imap://{LOOPBACK}:{backends.alpha.imap_port}"
    examined = clients.curl(f"{imap}/INBOX", "--request", "EXAMINE INBOX", user=user)
    assert examined.returncode == 0, examined.describe()
    assert b"* 1 EXISTS" in examined.output
    fetched = clients.curl(f"{imap}/INBOX;UID=1", user=user)
    assert fetched.returncode == 0, fetched.describe()
    assert fetched.output == message
    with_sasl_ir = clients.curl(
        f"{imap}/INBOX;UID=1", "--sasl-ir", "--login-options", "AUTH=PLAIN", user=user
    )
    assert with_sasl_ir.output == message, with_sasl_ir.describe()
    retrieved = clients.curl(f"pop3://{LOOPBACK}:{backends.alpha.pop3_port}/1", user=user)
    assert retrieved.returncode == 0, retrieved.describe()
    assert retrieved.output == message


def test_curl_with_a_wrong_password_exits_67(backends: Backends) -> None:
    wrong = User("alice@alpha.example", "not-the-password")
    result = clients.curl(f"imap://{LOOPBACK}:{backends.alpha.imap_port}/INBOX", user=wrong)
    assert result.returncode == 67, result.describe()  # CURLE_LOGIN_DENIED


# -- Postfix: submission and MX ---------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submission_with_auth_delivers_byte_identical(
    backends: Backends, new_user: NewUser, mechanism: str
) -> None:
    sender = new_user()
    recipient = new_user(BETA)
    message = messages.compose(sender.address, recipient.address, f"AUTH {mechanism}", ".a\n..b\nc\n")
    with clients.smtp(backends.postfix.submission_port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = sender.address, sender.password
        smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"), initial_response_ok=False)
        smtp.sendmail(sender.address, [recipient.address], message)
    (delivered,) = backends.wait_delivered(recipient.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
    assert backends.maildir(recipient.address).path.is_relative_to(backends.beta.mail_root)


def test_swaks_submits_with_auth_login(backends: Backends, new_user: NewUser) -> None:
    user = new_user()
    message = messages.compose(user.address, user.address, "swaks", "sent by swaks\n")
    result = clients.swaks(
        "--server", f"{LOOPBACK}:{backends.postfix.submission_port}", "--auth", "LOGIN",
        "--from", user.address, "--to", user.address,
        user=user, data=message.removesuffix(b"\r\n"),  # swaks ends DATA with its own CRLF
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    leaked = user.password in result.transcript
    assert not leaked
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)


def test_submission_refuses_wrong_passwords_and_anonymous_senders(backends: Backends) -> None:
    alice = backends.user("alice@alpha.example")
    with clients.smtp(backends.postfix.submission_port) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(alice.address, "not-the-password")
        assert refused.value.smtp_code == 535
    with clients.smtp(backends.postfix.submission_port) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused):
        smtp.sendmail(alice.address, [alice.address], messages.compose(alice.address, alice.address, "anon"))


def test_mx_delivers_for_alpha_and_beta_into_their_dovecots(backends: Backends, new_user: NewUser) -> None:
    for domain, dovecot in backends.dovecots.items():
        user = new_user(domain)
        message = messages.compose("sender@example.net", user.address, f"inbound for {domain}", "hi\n")
        with clients.smtp(backends.postfix.smtp_port) as smtp:
            smtp.sendmail("sender@example.net", [user.address], message)
        (delivered,) = backends.wait_delivered(user.address, 1)
        assert mailservers.strip_delivery_headers(delivered) == mailservers.as_stored(message)
        assert delivered in dovecot.messages(user.address)


def test_swaks_delivers_inbound_mail(backends: Backends, new_user: NewUser) -> None:
    user = new_user(BETA)
    result = clients.swaks(
        "--server", f"{LOOPBACK}:{backends.postfix.smtp_port}", "--from", "someone@example.net",
        "--to", user.address, "--header", "Subject: swaks inbound",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    (delivered,) = backends.wait_delivered(user.address, 1)
    assert b"Subject: swaks inbound" in delivered


@pytest.mark.parametrize(
    ("recipient", "code"),
    [(f"anyone@{UNROUTED_DOMAIN}", 550), ("nobody-here@alpha.example", 550)],
    ids=["other-domain", "unknown-user"],
)
def test_mx_refuses_other_domains_and_unknown_users(backends: Backends, recipient: str, code: int) -> None:
    with (
        clients.smtp(backends.postfix.smtp_port) as smtp,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        smtp.sendmail(
            "sender@example.net", [recipient], messages.compose("sender@example.net", recipient, "x")
        )
    assert refused.value.recipients[recipient][0] == code


def test_swaks_sees_the_relay_refusal(backends: Backends) -> None:
    result = clients.swaks(
        "--server", f"{LOOPBACK}:{backends.postfix.smtp_port}", "--from", "someone@example.net",
        "--to", f"anyone@{UNROUTED_DOMAIN}",
    )  # fmt: skip
    assert result.returncode == 24, result.describe()  # swaks: the server refused the RCPT
    assert "550 5.7.1" in result.transcript


def test_added_users_work_at_once_everywhere(backends: Backends, new_user: NewUser) -> None:
    user = new_user(BETA)
    with clients.imap(backends.beta.imap_port) as client:
        client.login(user.address, user.password)
    with clients.smtp(backends.postfix.submission_port) as smtp:
        smtp.login(user.address, user.password)
    assert backends.postfix.accepts_recipient(user.address)
    assert user.address in backends.users


# -- instances of their own: lifecycle, side by side, failures ----------------------------------


def test_two_dovecots_run_side_by_side_and_stop_without_leftovers(scratch_directory: Path) -> None:
    one = User("one@alpha.example", "alpha-secret-one")
    two = User("two@beta.example", "beta-secret-two")
    first = mailservers.Dovecot(scratch_directory / "first", name="first", users=[one])
    second = mailservers.Dovecot(scratch_directory / "second", name="second", users=[two])
    with first, second:
        sessions = [first.session, second.session]
        first.wait_log("starting up for imap, pop3")
        assert all(pgrep_session(session) for session in sessions)
        assert len({first.imap_port, first.pop3_port, second.imap_port, second.pop3_port}) == 4
        with clients.imap(first.imap_port) as client:
            client.login(one.address, one.password)
        with clients.imap(second.imap_port) as client:
            client.login(two.address, two.password)
        assert [login.user for login in first.wait_logins(one.address, 1)] == [one.address]
        assert [login.user for login in second.wait_logins(two.address, 1)] == [two.address]
        assert [login.user for login in first.logins() + second.logins()] == [one.address, two.address]
    assert [pgrep_session(session) for session in sessions] == [[], []]
    assert not first.running
    first.stop()  # idempotent


def test_postfix_stops_without_leftovers(scratch_directory: Path) -> None:
    postfix = mailservers.Postfix(scratch_directory / "postfix", domains=["alpha.example"])
    with postfix:
        session = postfix.session
        assert len(pgrep_session(session)) >= 3  # master, qmgr, pickup, ...
        assert mailservers.greets(postfix.smtp_port, b"220 ", b"QUIT\r\n")
    assert pgrep_session(session) == []


def test_a_taken_free_port_is_replaced_by_another(scratch_directory: Path) -> None:
    dovecot = mailservers.Dovecot(scratch_directory / "dovecot", name="retry", protocols=("imap",))
    taken = dovecot.imap_port
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, taken))
        squatter.listen()
        with dovecot:
            assert dovecot.imap_port != taken
            assert mailservers.greets(dovecot.imap_port, b"* OK", b"0 LOGOUT\r\n")


def test_a_taken_fixed_port_fails_with_the_reason(scratch_directory: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        dovecot = mailservers.Dovecot(
            scratch_directory / "d", name="fixed", protocols=("imap",), imap_port=port
        )
        mentions = []
        for _ in range(2):
            with pytest.raises(mailservers.MailServerError, match="Address already in use") as failed:
                dovecot.start()
            mentions.append(str(failed.value).count("Address already in use"))
    # The second report carries the second attempt's log lines only, not the first one's again.
    assert mentions[0] == mentions[1]
    # Dovecot titles its processes dovecot-<name>/<service>: none may be left after the failure.
    assert subprocess.run(["pgrep", "-f", "dovecot-fixed"], check=False).returncode == 1


def test_an_auth_only_dovecot_answers_on_its_sasl_socket(scratch_directory: Path) -> None:
    auth = mailservers.Dovecot(
        scratch_directory / "auth", name="sasl", protocols=(), auth_socket_user="postfix"
    )
    with auth:
        assert auth.auth_socket.is_socket()
        with pytest.raises(mailservers.MailServerError):
            auth.imap_port  # noqa: B018 - the property raises


def test_directories_the_mail_users_cannot_reach_are_refused(scratch_directory: Path) -> None:
    private = scratch_directory / "private"
    private.mkdir(mode=0o700)  # like pytest's basetemp
    with pytest.raises(mailservers.MailServerError, match="not searchable by other users"):
        mailservers.check_directory(private / "testbed")
    with pytest.raises(mailservers.MailServerError, match="too long"):
        mailservers.check_directory(scratch_directory / ("x" * 80))
    with pytest.raises(mailservers.MailServerError, match="absolute"):
        mailservers.check_directory(Path("relative"))
    mailservers.check_directory(scratch_directory / "fine")


def test_missing_packages_are_named_with_the_install_script(
    scratch_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailservers, "DOVECOT_LIBEXEC_DIRS", (scratch_directory,))
    with pytest.raises(mailservers.MissingSoftwareError, match="dovecot-pop3d") as missing:
        mailservers.Dovecot(scratch_directory / "d", protocols=("pop3",)).start()
    assert "testbed/install-system-packages.sh" in str(missing.value)
    monkeypatch.setattr(mailservers.shutil, "which", lambda *_args, **_kwargs: None)
    with pytest.raises(mailservers.MissingSoftwareError, match=r"postfix is not installed.*install-system"):
        mailservers.Postfix(scratch_directory / "p", domains=["alpha.example"]).start()


def test_only_root_can_start_the_servers(scratch_directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(mailservers.MailServerError, match="must run as root"):
        mailservers.Dovecot(scratch_directory / "d").start()


# -- pure helpers -----------------------------------------------------------------------------


def test_users_hide_their_password_and_refuse_what_the_files_cannot_hold() -> None:
    user = User("someone@alpha.example", "alpha-secret-hidden")
    assert "alpha-secret-hidden" not in repr(user)
    assert (user.local, user.domain) == ("someone", "alpha.example")
    for address in ("no-at-sign", "a@b@c", "with space@alpha.example", "colon:@alpha.example"):
        with pytest.raises(ValueError, match=r"cannot be a testbed login|is not local@domain"):
            User(address, "x")
    with pytest.raises(ValueError, match="contains") as refused:
        User("someone@alpha.example", "alpha-secret-with:colon")
    assert "alpha-secret" not in str(refused.value)


def test_sha512_crypt_hashes_are_salted_and_plain_is_tagged() -> None:
    first, second = mailservers.hash_passwords(["same-secret", "same-secret"], "SHA512-CRYPT")
    assert first.startswith("{SHA512-CRYPT}$6$")
    assert first != second
    assert mailservers.hash_passwords(["p"], "PLAIN") == ["{PLAIN}p"]


def test_maildir_stores_exact_bytes_for_the_mail_user_in_order(scratch_directory: Path) -> None:
    owner = mailservers.MailOwner.lookup(mailservers.DEFAULT_MAIL_USER)
    maildir = mailservers.Maildir(scratch_directory / "mail" / "alpha.example" / "u", owner)
    first = maildir.deliver(b"first\r\n")
    maildir.deliver(b"second\n")
    assert maildir.messages() == [b"first\r\n", b"second\n"]
    assert (first.stat().st_uid, first.stat().st_mode & 0o777) == (owner.uid, 0o600)
    assert (maildir.path / "cur").stat().st_uid == owner.uid
    with pytest.raises(mailservers.DeliveryTimeoutError, match="2 of 3 messages"):
        maildir.wait_for(3, timeout=0.1)


def test_delivery_headers_are_stripped_and_only_those() -> None:
    sent = b"Message-ID: <1@x>\r\nReceived: from the sender\r\n\r\nbody\r\n"
    delivered = (
        b"Return-Path: <a@x>\nX-Original-To: b@y\nDelivered-To: b@y\n"
        b"Received: from vm (unknown [127.0.0.1])\n\tby mx (Postfix)\n\tfor <b@y>; now\n"
        + mailservers.as_stored(sent)
    )
    assert (
        mailservers.strip_delivery_headers(delivered)
        == b"Message-ID: <1@x>\nReceived: from the sender\n\nbody\n"
    )


def test_write_atomically_replaces_the_file_with_its_mode_and_group(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    mail_group = grp.getgrnam("mail").gr_gid
    mailservers.write_atomically(target, "new\n", mode=0o640, group=mail_group)
    status = target.stat()
    assert target.read_text() == "new\n"
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (0, mail_group, 0o640)
    mailservers.write_atomically(target, "newer\n")
    assert (target.read_text(), target.stat().st_mode & 0o777) == ("newer\n", 0o644)
    assert [path.name for path in tmp_path.iterdir()] == ["passwd"]  # no temporary file left


def test_find_program_looks_in_sbin_and_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert mailservers.find_program("postfix", "postfix") == "/usr/sbin/postfix"
    with pytest.raises(mailservers.MissingSoftwareError, match=r"no-such-daemon is not installed.*package"):
        mailservers.find_program("no-such-daemon", "package")


def test_free_ports_are_never_handed_out_twice() -> None:
    ports = [mailservers.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
