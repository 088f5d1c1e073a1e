"""Listener certificates: what cannot be loaded is refused with a message naming the file."""

import logging
import os
import ssl
import subprocess
from pathlib import Path

import pytest

from proxy.server import certificates
from proxy.server.certificates import CertificateError, CertificateStore
from proxy.settings import CertificateFiles
from testbed import tlscerts


def test_an_encrypted_key_is_refused_at_once_without_asking_for_a_passphrase(tmp_path: Path) -> None:
    """OpenSSL would prompt on a terminal (blocking the proxy) or fail with an obscure EINVAL."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=mail.example",
            "-passout", "pass:a-passphrase",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    with pytest.raises(CertificateError, match="the key is encrypted"):
        CertificateStore("imaps", (CertificateFiles(cert=cert, key=key),))


def unreadable_dns_name_pair(folder: Path) -> CertificateFiles:
    """A certificate OpenSSL loads whose DNS subjectAltName is not UTF-8 (b"\\xffa.test"), and
    its key."""
    folder.mkdir()
    commands = [
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "tls.key"],
        ["openssl", "req", "-new", "-key", "tls.key", "-out", "tls.csr", "-subj", "/CN=mail.example"],
        [
            "openssl", "x509", "-req", "-in", "tls.csr", "-signkey", "tls.key", "-out", "tls.crt",
            "-days", "1", "-extfile", "san",
        ],
    ]  # fmt: skip
    (folder / "san").write_text("subjectAltName=DER:30098207ff612e74657374\n")
    for command in commands:
        subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=folder)
    files = CertificateFiles(cert=folder / "tls.crt", key=folder / "tls.key")
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert, files.key)  # OpenSSL takes it
    return files


def test_a_certificate_with_an_unreadable_dns_name_is_refused_at_start(tmp_path: Path) -> None:
    """Review S1: the decoder's UnicodeDecodeError escaped; ``mailgress proxy`` exited with a
    traceback instead of the clear message."""
    with pytest.raises(CertificateError, match="subjectAltName is not readable"):
        CertificateStore("imaps", (unreadable_dns_name_pair(tmp_path / "bad"),))


def test_a_renewal_to_a_certificate_with_an_unreadable_dns_name_keeps_the_previous_one(
    tmp_path: Path,
) -> None:
    """Review S1: the error escaped ``refresh``, the certificate watch died silently, the proxy
    went unready for good and later renewals were never loaded."""
    issued = tlscerts.TestAuthority(tmp_path / "ca").issue("good", ["mail.example"])
    store = CertificateStore("imaps", (CertificateFiles(issued.cert, issued.key),))
    before = store.context
    bad = unreadable_dns_name_pair(tmp_path / "bad")
    os.replace(bad.key, issued.key)
    os.replace(bad.cert, issued.cert)
    assert store.refresh() is False
    assert store.context is before
    renewed = tlscerts.TestAuthority(tmp_path / "ca2").issue("renewed", ["mail.example"])
    os.replace(renewed.key, issued.key)
    os.replace(renewed.cert, issued.cert)
    assert store.refresh() is True


def test_a_renewal_finished_while_its_half_written_state_was_loaded_is_picked_up_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal written in two steps (certificate, then key) polled between them: the half-done
    pair fails to load; the finished pair must load at the next poll, not be taken for the broken
    state (the stamps marked broken are those read before the failed load)."""
    authority = tlscerts.TestAuthority(tmp_path / "ca")
    first = authority.issue("first", ["mail.example"])
    store = CertificateStore("imaps", (CertificateFiles(first.cert, first.key),))
    renewed = authority.issue("renewed", ["mail.example"])
    os.replace(renewed.cert, first.cert)  # the writer has put the new certificate, not its key yet
    load = certificates._server_context

    def load_while_the_writer_finishes(files: CertificateFiles) -> ssl.SSLContext:
        try:
            return load(files)  # new certificate, old key: refused
        finally:
            os.replace(renewed.key, first.key)

    monkeypatch.setattr(certificates, "_server_context", load_while_the_writer_finishes)
    assert store.refresh() is False
    monkeypatch.setattr(certificates, "_server_context", load)
    assert store.refresh() is True


def test_a_missing_key_file_is_reported_once_and_its_return_reloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    authority = tlscerts.TestAuthority(tmp_path / "ca")
    first = authority.issue("first", ["mail.example"])
    store = CertificateStore("imaps", (CertificateFiles(first.cert, first.key),))
    renewed = authority.issue("renewed", ["mail.example"])
    first.key.unlink()  # e.g. the key's entry removed from the Secret
    caplog.set_level(logging.ERROR)
    for _ in range(10):  # ten polls, one a second
        assert store.refresh() is False
    kept = [record for record in caplog.records if "keeping the certificates in use" in record.getMessage()]
    assert len(kept) == 1
    assert str(first.key) in kept[0].getMessage()
    os.replace(renewed.cert, first.cert)
    os.replace(renewed.key, first.key)
    assert store.refresh() is True
