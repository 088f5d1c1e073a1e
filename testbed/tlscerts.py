"""Throw-away TLS certificates for tests and the demo: a private CA and leaves signed by it.

Uses the ``openssl`` command-line tool (Debian's openssl package), so nothing here needs a
Python crypto library. Keys are EC P-256, valid for two days; every file lands in the directory
given. ``serial`` differs per leaf so a renewed certificate is recognisably new.
"""

import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path

VALID_DAYS = "2"
_serials = itertools.count(1000)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    cert: Path
    key: Path
    serial: int


def _openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=60)


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


class TestAuthority:
    """A CA whose certificate tests pass to clients (and to the proxy for backend checks)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "mailgress test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = directory / "ca.key"
        self.cert = directory / "ca.crt"
        _new_key(self.key)
        _openssl(
            "req", "-x509", "-new", "-key", str(self.key), "-out", str(self.cert), "-days", VALID_DAYS,
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(
        self, stem: str, names: list[str], cert: Path | None = None, key: Path | None = None
    ) -> IssuedCertificate:
        """A leaf for ``names`` (DNS or IP SANs); ``cert``/``key`` let a renewal overwrite files."""
        serial = next(_serials)
        key = key or self.directory / f"{stem}.key"
        cert = cert or self.directory / f"{stem}.crt"
        request = self.directory / f"{stem}.csr"
        extensions = self.directory / f"{stem}.ext"
        alt_names = ",".join(
            f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names
        )
        extensions.write_text(f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\n")
        staged_key = key.with_suffix(".new-key")
        staged_cert = cert.with_suffix(".new-crt")
        _new_key(staged_key)
        _openssl("req", "-new", "-key", str(staged_key), "-out", str(request), "-subj", f"/CN={names[0]}")
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(serial), "-out", str(staged_cert), "-days", VALID_DAYS,
            "-extfile", str(extensions),
        )  # fmt: skip
        # Replace key and certificate as Kubernetes updates a mounted Secret: new files, renamed in.
        staged_key.replace(key)
        staged_cert.replace(cert)
        return IssuedCertificate(cert=cert, key=key, serial=serial)
