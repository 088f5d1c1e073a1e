"""TLS server contexts for listeners: certificates from files, chosen by SNI, reloaded on change.

Kubernetes mounts a TLS Secret as files and cert-manager rewrites them on renewal; the store
notices a changed file (modification time, size or inode) on its next ``refresh`` and builds a
new context, which only connections accepted afterwards use: open sessions keep the context
they were accepted with. A renewal that leaves the files broken keeps the previous context in
force and says so in the log. The first certificate is the default; each other one answers for
the DNS names in its subjectAltName (wildcards as RFC 6125 section 6.4.3 allows: one label).
"""

import logging
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.settings import BackendTlsSettings, CertificateFiles

log = logging.getLogger(__name__)

# RFC 8996 retired TLS 1.0 and 1.1; nginx's default ssl_protocols is TLSv1.2 TLSv1.3 too.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class CertificateError(ValueError):
    """A certificate or key file that cannot be loaded; the message names the file."""


# A file's modification time, size and inode, per certificate and key file of a listener.
Stamps = tuple[tuple[int, int, int], ...]


def _stamp(path: Path) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size, status.st_ino


def dns_names(cert_file: Path) -> tuple[str, ...]:
    """The DNS names in a PEM certificate's subjectAltName, lower-cased."""
    # The stdlib has no public PEM parser; this helper backs ssl's own tests and has been stable
    # since Python 3.3. It is only used to learn the names, never to trust anything.
    decode = getattr(ssl, "_ssl")._test_decode_cert  # noqa: B009
    try:
        decoded: dict[str, Any] = decode(str(cert_file))
    except (OSError, ssl.SSLError) as error:
        raise CertificateError(f"{cert_file}: not a PEM certificate ({error})") from error
    except ValueError as error:
        # A DNS name that is not UTF-8 (OpenSSL loads such a certificate, the decoder refuses
        # it): a broken renewal like any other, kept out of force (review S1).
        raise CertificateError(f"{cert_file}: a subjectAltName is not readable ({error})") from error
    return tuple(value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS")


class _EncryptedKey(Exception):
    """Raised from the passphrase callback: a key that asks for a passphrase is not loaded."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL asks for the passphrase on the terminal, blocking the loop (or
    # failing with an obscure EINVAL without one); Secrets hold unencrypted keys.
    raise _EncryptedKey


def _server_context(files: CertificateFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except _EncryptedKey:
        raise CertificateError(
            f"{files.key}: the key is encrypted (it asks for a passphrase); use an unencrypted key"
        ) from None
    except (OSError, ssl.SSLError) as error:
        raise CertificateError(f"{files.cert} / {files.key}: cannot load ({error})") from error
    return context


def quiet_undecodable_server_names(unraisable: Any) -> None:
    """The proxy's ``sys.unraisablehook``: a client hello whose server name (SNI) is not ASCII
    makes CPython's ssl module print "Exception ignored" and a traceback to stderr before the
    server-name callback runs, four lines per connection from any unauthenticated client. The
    handshake fails either way and the session's line says so; this keeps the rest out of the
    log. Every other unraisable exception goes to Python's own hook."""
    if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(unraisable.object, bytes):
        log.debug("a TLS client hello named a server that is not ASCII; the handshake is refused")
        return
    sys.__unraisablehook__(unraisable)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == name


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamps: Stamps
    context: ssl.SSLContext


class CertificateStore:
    """The current server context of one listener."""

    def __init__(self, listener: str, files: tuple[CertificateFiles, ...]) -> None:
        self._listener = listener
        self._files = files
        self._loaded = self._load()  # a broken file at start is fatal: raise to the caller
        # The state of the files whose load failed (their stamps, or why they could not be read).
        self._failed: Stamps | tuple[str, str | None, int | None] | None = None

    @property
    def context(self) -> ssl.SSLContext:
        return self._loaded.context

    def _stamps(self) -> Stamps:
        return tuple(_stamp(path) for files in self._files for path in (files.cert, files.key))

    def _load(self, stamps: Stamps | None = None) -> _Loaded:
        """Load the files as they are now; ``stamps``: what the caller read of them just before."""
        if stamps is None:
            try:
                stamps = self._stamps()
            except OSError as error:
                raise CertificateError(_unreadable(self._listener, error)) from error
        contexts = [_server_context(files) for files in self._files]
        by_name = [
            (name, context)
            for files, context in zip(self._files, contexts, strict=True)
            for name in dns_names(files.cert)
        ]
        default = contexts[0]

        def choose(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            if server_name:
                wanted = server_name.lower()
                for pattern, context in by_name:
                    if _matches(pattern, wanted):
                        ssl_object.context = context
                        return
            ssl_object.context = default

        if len(contexts) > 1:
            default.sni_callback = choose
        return _Loaded(stamps, default)

    def refresh(self) -> bool:
        """Reload when a file changed; True when a new context is in force."""
        try:
            stamps = self._stamps()
        except OSError as error:
            # A missing or unreadable file is one broken state however many polls see it.
            return self._keep(("unreadable", error.filename, error.errno), _unreadable(self._listener, error))
        if stamps == self._loaded.stamps:
            self._failed = None  # back as loaded: a later breakage is news again
            return False
        if stamps == self._failed:
            return False
        try:
            self._loaded = self._load(stamps)
        except (OSError, CertificateError) as error:
            # Only the state just tried is marked broken: a writer that finishes its renewal
            # while the half-written one was being loaded changes the stamps again, and the next
            # poll loads the finished pair.
            return self._keep(stamps, str(error))
        self._failed = None
        log.info("listener %s: certificates reloaded", self._listener)
        return True

    def _keep(self, state: Stamps | tuple[str, str | None, int | None], problem: str) -> bool:
        """Report a broken renewal once per broken state, not at every poll; keep serving."""
        if state != self._failed:
            self._failed = state
            log.error("listener %s: keeping the certificates in use: %s", self._listener, problem)
        return False


def _unreadable(listener: str, error: OSError) -> str:
    return f"listener {listener}: {error.filename}: {error.strerror}"


def client_context(ca_file: Path | None, setting: str) -> ssl.SSLContext:
    """A client context, TLS 1.2 or later, that verifies the peer's certificate and name against
    ``ca_file`` as the file is now (None: the system CAs).

    Raises:
        CertificateError: ``ca_file`` cannot be loaded; the message names ``setting`` and the file.
    """
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as error:
        raise CertificateError(f"{setting} {ca_file}: cannot load ({error})") from error
    context.minimum_version = MINIMUM_TLS_VERSION
    return context


def backend_context(settings: BackendTlsSettings) -> ssl.SSLContext:
    """The client context for backends reached over TLS or STARTTLS.

    Verifies the backend's certificate and name against ``ca_file`` (or the system CAs) unless
    the settings explicitly opt out.
    """
    context = client_context(settings.ca_file, "backendTls.caFile")
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
