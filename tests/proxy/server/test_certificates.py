"""Listener certificates: what cannot be loaded is refused with a message naming the file."""

import subprocess
from pathlib import Path

import pytest

from proxy.server.certificates import CertificateError, CertificateStore
from proxy.settings import CertificateFiles


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
