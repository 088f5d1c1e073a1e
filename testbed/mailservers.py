"""Real Dovecot (IMAP, POP3, SASL) and Postfix (MX, submission) instances on loopback.

Test fixtures, the demo and the benchmarks call this to run the mail servers mailgress sits in front
of: ``Dovecot`` and ``Postfix`` each keep every file they use (configuration, sockets, queue, logs,
maildirs) under one directory given by the caller, listen on 127.0.0.1 only, are context managers with
``start()``/``stop()``, and leave no process behind. Several instances run side by side without
sharing anything. Their lifecycle (``Daemon``) and helpers (``find_program``, ``write_atomically``,
``greets``, ``free_port``) are public because testbed.nginx runs nginx the same way. Never touches
the system services, /etc or /var, and never binds beyond loopback.

Facts this module is built on (all observed on Debian 12 with Dovecot 2.3.19 and Postfix 3.7):
- Both need root: Postfix's ``postfix`` command and master are root-only, and Dovecot's master must
  switch users. Mail files belong to an unprivileged user (``nobody`` by default) because Dovecot
  refuses mail access as UID 0 ("userdb returned 0 as uid"), so the directory must be reachable by
  other users (mode o+x on it and every parent; pytest's own tmp_path is 0700 and is not).
- Postfix logs only to syslog unless ``maillog_file`` is set and its folder is in
  ``maillog_file_prefixes``; ``postfix -c DIR`` needs an absolute DIR; the data directory must belong
  to the ``postfix`` user; master.cf services run with chroot ``n`` because nothing is copied into
  a chroot here.
- Dovecot shuts down in about three seconds after SIGTERM, whatever its load; ``Backends`` stops its
  instances in parallel for that reason (``request_stop`` then ``wait_stopped``).
"""

import contextlib
import functools
import grp
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from testbed import tlscerts

LOOPBACK = "127.0.0.1"
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8",)
DEFAULT_MAIL_USER = "nobody"
DEFAULT_HOSTNAME = "mx.testbed.example"
INSTALL_HINT = "run testbed/install-system-packages.sh as root"

# A daemon must answer on all its ports within this time (a cold start takes well under a second).
START_TIMEOUT = 30.0
# Dovecot needs about 3 s to shut down; this leaves room on a loaded 2-core machine.
STOP_TIMEOUT = 20.0
# How long one readiness probe may wait for a greeting.
PROBE_TIMEOUT = 2.0
POLL_INTERVAL = 0.05
# A free port found by binding port 0 can be taken by someone else before the daemon binds it; a
# start that failed on "Address already in use" is retried with fresh ports this many times in all.
START_ATTEMPTS = 3
# How long ``Maildir.wait_for`` waits for Postfix to deliver (queue manager and virtual(8) take
# milliseconds; the margin is for a machine busy with other tests).
DELIVERY_TIMEOUT = 30.0
# unix(7): sun_path holds 108 bytes including the terminating NUL. The longest socket path either
# daemon creates below its directory is shorter than SOCKET_PATH_MARGIN characters
# ("run/token-login/tokenlogin", "queue/private/proxywrite").
MAX_SOCKET_PATH = 107
SOCKET_PATH_MARGIN = 40
# Postfix's message_size_limit (10 MB by default) would refuse the large messages tests send; 64 MiB.
MESSAGE_SIZE_LIMIT = 64 * 1024 * 1024
# Every test client comes from 127.0.0.1, so Dovecot's per user+IP limit (10) must be out of reach.
MAX_USERIP_CONNECTIONS = 100_000
# Sessions one imap/pop3 process serves (the mail-servers-here.md benchmark setting).
MAIL_PROCESS_CLIENT_LIMIT = 100
# A PROXY protocol v1 header (haproxy's proxy-protocol.txt, section 2.1) that readiness probes send
# to listeners expecting one: the daemon then greets as it would greet that client.
PROBE_PROXY_HEADER = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 40001\r\n"

# Where Debian (and other distributions) put Dovecot's service executables.
DOVECOT_LIBEXEC_DIRS = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))
# Dovecot service executables per protocol, and the Debian package that ships them.
DOVECOT_PROTOCOL_PACKAGES = {"imap": "dovecot-imapd", "pop3": "dovecot-pop3d"}
# Dovecot's default_internal_user (Debian's dovecot-core creates it); its auth process runs as it.
DOVECOT_INTERNAL_USER = "dovecot"

PasswordScheme = Literal["PLAIN", "SHA512-CRYPT"]
DovecotProtocol = Literal["imap", "pop3"]
# What each Dovecot protocol greets with, and how a readiness probe says goodbye.
_DOVECOT_GREETINGS: dict[str, tuple[bytes, bytes]] = {
    "imap": (b"* OK", b"0 LOGOUT\r\n"),
    "pop3": (b"+OK", b"QUIT\r\n"),
}
# Name suffix of the listeners that take a PROXY protocol header (Dovecot's and Postfix's "haproxy").
_HAPROXY_SUFFIX = "_haproxy"


class MailServerError(RuntimeError):
    """A mail server could not be set up, started or stopped; the message says why and what to do."""


class MissingSoftwareError(MailServerError):
    """A Debian package the testbed needs is not installed."""


class DeliveryTimeoutError(MailServerError):
    """Mail did not arrive in a maildir within the deadline."""


# ---------------------------------------------------------------------------------------------------
# Users and maildirs


# How a password that is octets, not UTF-8 text (a Latin-1 one), is held in a ``str``: each such
# octet as a lone surrogate, as os.fsdecode holds file names. UTF-8 and ASCII passwords are as typed.
PASSWORD_ERRORS = "surrogateescape"


def password_octets(password: str) -> bytes:
    """The octets a client sends for ``password`` (UTF-8, and the escaped octets as they were)."""
    return password.encode("utf-8", PASSWORD_ERRORS)


def password_text(octets: bytes) -> str:
    """The password made of ``octets``, as ``User.password`` holds it (see PASSWORD_ERRORS)."""
    return octets.decode("utf-8", PASSWORD_ERRORS)


@dataclass(frozen=True, slots=True)
class User:
    """A mail account: the login is the full address; the password never shows in ``repr``.

    ``password`` may hold octets that are no UTF-8 (see PASSWORD_ERRORS); ``octets`` is what a
    client sends.
    """

    address: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        local, at, domain = self.address.partition("@")
        if not at or not local or not domain or "@" in domain:
            raise ValueError(f"{self.address!r} is not local@domain")
        # Dovecot's passwd-file separates fields with ":" and entries with newlines.
        if any(c in self.address for c in ":/\0") or any(c.isspace() for c in self.address):
            raise ValueError(f"{self.address!r} cannot be a testbed login")
        if any(c in self.password for c in ":\r\n\0"):
            raise ValueError(f"the password of {self.address} contains ':', CR, LF or NUL")

    @property
    def octets(self) -> bytes:
        return password_octets(self.password)

    @property
    def local(self) -> str:
        return self.address.partition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.partition("@")[2]


@dataclass(frozen=True, slots=True)
class MailOwner:
    """The unprivileged account that owns maildirs and runs Dovecot's mail processes."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> "MailOwner":
        try:
            entry = pwd.getpwnam(name)
        except KeyError as error:
            raise MailServerError(f"mail user {name!r} does not exist on this machine") from error
        if entry.pw_uid == 0:
            raise MailServerError(f"mail user {name!r} is root; Dovecot refuses mail access as UID 0")
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


_delivery_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class Maildir:
    """One mailbox in maildir format: Dovecot serves it as INBOX, Postfix's virtual(8) delivers to it."""

    path: Path
    owner: MailOwner

    def create(self) -> None:
        """Make the maildir (and missing parents up to an existing folder) owned by the mail user."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        for folder in reversed(missing):
            self._make_folder(folder)
        for sub in ("cur", "new", "tmp"):
            if not (self.path / sub).exists():
                self._make_folder(self.path / sub)

    def _make_folder(self, folder: Path) -> None:
        folder.mkdir(mode=0o700)
        os.chown(folder, self.owner.uid, self.owner.gid)

    def deliver(self, message: bytes) -> Path:
        """Put ``message`` (stored exactly as given) into ``new/`` the way an MDA does; return its path."""
        self.create()
        now = time.time_ns()
        # The maildir naming convention: seconds.MmicrosecondsPpidQcounter.host, unique per delivery.
        name = f"{now // 10**9}.M{now // 1000 % 10**6}P{os.getpid()}Q{next(_delivery_counter)}.testbed"
        temporary = self.path / "tmp" / name
        # Write under tmp/ and rename: a reader never sees a half-written message (maildir contract).
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as output:
            output.write(message)
        os.chown(temporary, self.owner.uid, self.owner.gid)
        final = self.path / "new" / name
        temporary.rename(final)
        return final

    def messages(self) -> list[bytes]:
        """Every message in ``new/`` and ``cur/``, oldest first, as stored on disk."""
        # Dovecot moves files from new/ to cur/ while a client has the mailbox open, so a file
        # listed a moment ago can be gone; list again. Each move happens once per message.
        for _ in range(10):
            try:
                return [path.read_bytes() for path in self._paths()]
            except FileNotFoundError:
                continue
        raise MailServerError(f"{self.path}: messages keep moving while being read")

    def _paths(self) -> list[Path]:
        paths: list[Path] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                paths.extend(entry for entry in (self.path / sub).iterdir() if entry.is_file())
        return sorted(paths, key=lambda path: (path.stat().st_mtime_ns, path.name))

    def wait_for(self, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[bytes]:
        """Wait until at least ``count`` messages are here; return all of them.

        Raises:
            DeliveryTimeoutError: fewer than ``count`` arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages()
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise DeliveryTimeoutError(
                    f"{self.path}: {len(messages)} of {count} messages arrived within {timeout:g} s"
                )
            time.sleep(POLL_INTERVAL)


# Headers Postfix puts on top of a message: Received (cleanup(8)), then Return-Path, X-Original-To and
# Delivered-To (virtual(8)).
_TRACE_HEADERS = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")


def strip_delivery_headers(delivered: bytes) -> bytes:
    """The message as the client sent it: ``delivered`` without the trace headers Postfix prepended.

    Only leading Return-Path, X-Original-To, Delivered-To and Received headers (with their folded
    continuation lines) are removed, so a test message must not begin with one of those itself.
    """
    lines = delivered.split(b"\n")
    index = 0
    while index < len(lines) and lines[index].lower().startswith(_TRACE_HEADERS):
        index += 1
        while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
            index += 1
    return b"\n".join(lines[index:])


def as_stored(message: bytes) -> bytes:
    """What Postfix writes to a maildir for ``message`` sent over SMTP: lines end in LF, not CRLF.

    Postfix keeps the content byte for byte otherwise (the testbed's main.cf turns off header
    rewriting), so ``strip_delivery_headers(delivered) == as_stored(sent)`` is a byte comparison.
    """
    return message.replace(b"\r\n", b"\n")


# ---------------------------------------------------------------------------------------------------
# Small helpers shared by the daemons (Dovecot and Postfix here, nginx in testbed.nginx)


_handed_out: set[int] = set()
# Readiness probes ask whether a TLS port answers, not whom to trust: tests check certificates.
_PROBE_TLS = ssl.create_default_context()
_PROBE_TLS.check_hostname = False
_PROBE_TLS.verify_mode = ssl.CERT_NONE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (found by binding port 0).

    Never returns the same port twice in one process, so instances set up together do not collide.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port: int = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise MailServerError("no free TCP port on 127.0.0.1 after 100 tries")


def _read_line(connection: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = connection.recv(limit)
        if not chunk:
            break
        data += chunk
    return data


def greets(port: int, prefix: bytes, goodbye: bytes, *, preamble: bytes = b"", tls: bool = False) -> bool:
    """True if something on 127.0.0.1:``port`` greets with a line starting with ``prefix``.

    ``preamble`` is sent first (a PROXY header, for listeners that expect one); with ``tls`` the
    greeting is read after a TLS handshake (implicit-TLS ports such as imaps).
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT) as connection:
            if preamble:
                connection.sendall(preamble)
            if not tls:
                return _greeted(connection, prefix, goodbye)
            with _PROBE_TLS.wrap_socket(connection) as secured:
                return _greeted(secured, prefix, goodbye)
    except OSError:  # ssl.SSLError included
        return False


def _greeted(connection: socket.socket, prefix: bytes, goodbye: bytes) -> bool:
    greeting = _read_line(connection)
    with contextlib.suppress(OSError):
        connection.sendall(goodbye)
    return greeting.startswith(prefix)


def _auth_socket_answers(path: Path) -> bool:
    """True if a Dovecot auth server handshakes on the unix socket ``path`` (it speaks first)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(PROBE_TIMEOUT)
            connection.connect(str(path))
            handshake = b""
            while not handshake.endswith(b"DONE\n") and len(handshake) < 65536:
                chunk = connection.recv(4096)
                if not chunk:
                    return False
                handshake += chunk
            return handshake.startswith(b"VERSION\t1\t")
    except OSError:
        return False


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session, read from /proc (what ``pgrep -s`` matches)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone while we looked
            continue
        # Fields after the command name (which may itself contain spaces and parentheses):
        # state ppid pgrp session ... (proc(5)).
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _signal_all(pids: Iterable[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def find_program(name: str, package: str) -> str:
    """The path of the program ``name`` on PATH or in /usr/sbin, /sbin (where Debian puts daemons).

    Raises:
        MissingSoftwareError: it is not installed; the message names the Debian ``package`` and
            the install script.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        raise MissingSoftwareError(f"{name} is not installed (Debian package {package}); {INSTALL_HINT}")
    return found


def write_atomically(path: Path, text: str, mode: int = 0o644, group: int | None = None) -> None:
    """Replace ``path`` with ``text`` in one rename, with ``mode`` and (if given) owner root:``group``.

    For a daemon's configuration and data files; ``path``'s folder must exist.
    """
    # Daemons re-read some files (Dovecot's passwd-file) whenever they change: they must never see
    # half a file or one with the wrong owner, and nobody else may read it while it is written.
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as output:
        output.write(text)
    if group is not None:
        os.chown(temporary, 0, group)
    temporary.chmod(mode)
    temporary.replace(path)


def _tail(path: Path, lines: int = 30, since: int = 0) -> str:
    try:
        with path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def check_directory(directory: Path) -> None:
    """Refuse a directory the daemons cannot use: see the module docstring for why.

    Raises:
        MailServerError: ``directory`` is not absolute, too long for the sockets below it, or a
            folder on its path is not searchable by other users.
    """
    if not directory.is_absolute():
        raise MailServerError(f"{directory}: the testbed needs an absolute directory (postfix -c)")
    if len(str(directory)) + SOCKET_PATH_MARGIN > MAX_SOCKET_PATH:
        raise MailServerError(
            f"{directory}: too long for the unix sockets below it "
            f"(at most {MAX_SOCKET_PATH - SOCKET_PATH_MARGIN} characters); use a short folder under /tmp"
        )
    existing = directory
    while not existing.exists():
        existing = existing.parent
    for folder in (existing, *existing.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            raise MailServerError(
                f"{folder} is not searchable by other users (needs o+x): Dovecot's mail processes and "
                f"Postfix's daemons run unprivileged and must reach {directory}; "
                "use e.g. tempfile.mkdtemp() and chmod it 0755"
            )


# ---------------------------------------------------------------------------------------------------
# The lifecycle every daemon shares (Dovecot and Postfix here, nginx in testbed.nginx)


class Daemon:
    """A daemon under one directory: the base of ``Dovecot``, ``Postfix`` and ``testbed.nginx.Nginx``.

    Gives them ``start`` (bounded readiness, retried with fresh ports after a port collision),
    ``stop`` (until no process of the daemon's session is left), logs and the context manager.
    A subclass implements the underscored hooks below: it checks its software (``_preflight``),
    writes its files (``_write_files``), launches in a session of its own (``_launch``, which
    must set ``_session``), answers ``_ready`` and ``_failure``, asks its daemon to stop
    (``_ask_to_stop``), reaps its child (``_reap``), picks new ports (``_choose_ports``) and
    names its logs (``_log_paths``).
    """

    def __init__(self, directory: Path, name: str, *, auto_ports: bool, mail_user: str) -> None:
        """
        Args:
            directory: absolute folder for everything the daemon writes (see ``check_directory``).
            name: how messages name the daemon.
            auto_ports: some ports were picked free, so a collision is retried with new ones.
            mail_user: the unprivileged account that owns mail files and runs workers (``owner``).
        """
        self.directory = directory
        self.name = name
        self._auto_ports = auto_ports
        self._mail_user = mail_user
        self._owner: MailOwner | None = None
        self._session: int | None = None
        # Where each log file ended when the current start attempt began: errors are reported (and
        # port collisions recognised) from this attempt's lines only, not from an earlier run's.
        self._log_offsets: dict[Path, int] = {}

    # -- subclass hooks ------------------------------------------------------------------------

    def _preflight(self) -> None:
        raise NotImplementedError

    def _write_files(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _failure(self) -> str | None:
        """Why the daemon is not running any more, or None while it is."""
        raise NotImplementedError

    def _ask_to_stop(self) -> None:
        raise NotImplementedError

    def _reap(self) -> None:
        """Collect our own child process, if the daemon is one."""

    def _choose_ports(self) -> None:
        raise NotImplementedError

    def _log_paths(self) -> Sequence[Path]:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------

    @property
    def owner(self) -> MailOwner:
        if self._owner is None:
            self._owner = MailOwner.lookup(self._mail_user)
        return self._owner

    @property
    def running(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> int:
        """The session id shared by all of this daemon's processes (``pgrep -s`` finds them)."""
        if self._session is None:
            raise MailServerError(f"{self.name} is not running")
        return self._session

    def processes(self) -> list[int]:
        """The daemon's live processes."""
        return [] if self._session is None else session_processes(self._session)

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return "".join(path.read_text(errors="replace") for path in self._log_paths() if path.exists())

    def wait_log(self, text: str, count: int = 1, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``text`` occurs ``count`` times in the log (daemons log asynchronously).

        Raises:
            MailServerError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if time.monotonic() >= deadline:
                raise MailServerError(f"{self.name}: {text!r} not logged {count} times in {timeout:g} s")
            time.sleep(POLL_INTERVAL)

    def start(self) -> None:
        """Write the configuration, start the daemon and wait until every port or socket answers.

        Raises:
            MissingSoftwareError: a needed Debian package is missing.
            MailServerError: not root, unusable directory, or the daemon did not come up (the
                message carries the end of its log).
        """
        if self.running:
            raise MailServerError(f"{self.name} is already running")
        if os.geteuid() != 0:
            raise MailServerError(
                f"{self.name}: the testbed must run as root (Postfix's master and Dovecot's privilege "
                "separation need it)"
            )
        check_directory(self.directory)
        self._owner = MailOwner.lookup(self._mail_user)
        self._preflight()
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self._write_files()
            self._log_offsets = {path: _size(path) for path in self._log_paths()}
            self._launch()
            problem = self._wait_ready()
            if problem is None:
                return
            collided = "Address already in use" in problem
            self._kill()
            if not (collided and self._auto_ports and attempt < START_ATTEMPTS):
                raise MailServerError(f"{self.name} did not start: {problem}")
            self._choose_ports()

    def _wait_ready(self) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            failure = self._failure()
            if failure is not None:
                return f"{failure}\n{self._recent_log()}"
            if self._ready():
                return None
            if time.monotonic() >= deadline:
                return f"not answering after {START_TIMEOUT:g} s\n{self._recent_log()}"
            time.sleep(POLL_INTERVAL)

    def _recent_log(self) -> str:
        return "\n".join(_tail(path, since=self._log_offsets.get(path, 0)) for path in self._log_paths())

    def request_stop(self) -> None:
        """Ask the daemon to shut down and return at once (pair with ``wait_stopped``)."""
        if self._session is not None:
            self._ask_to_stop()

    def wait_stopped(self) -> None:
        """Wait until none of the daemon's processes is left, killing stragglers after STOP_TIMEOUT."""
        if self._session is None:
            return
        if not self._wait_gone(STOP_TIMEOUT):
            self._kill()
        self._reap()
        self._session = None

    def stop(self) -> None:
        """Shut the daemon down and wait until none of its processes is left. Idempotent."""
        self.request_stop()
        self.wait_stopped()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.processes():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def _kill(self) -> None:
        if self._session is None:
            return
        _signal_all(self.processes(), signal.SIGKILL)
        self._wait_gone(STOP_TIMEOUT)
        self._reap()
        self._session = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------
# Dovecot


@dataclass(frozen=True, slots=True)
class Login:
    """One successful login as Dovecot logged it (``imap-login: Login: user=<...>, method=..., rip=...``)."""

    protocol: str
    user: str
    method: str
    rip: str


_LOGIN_LINE = re.compile(
    r"(?P<protocol>imap|pop3)-login: Info: Login: user=<(?P<user>[^>]*)>, "
    r"method=(?P<method>[A-Za-z0-9-]+), rip=(?P<rip>[0-9A-Fa-f.:]+)"
)


def hash_passwords(passwords: Sequence[str], scheme: PasswordScheme) -> list[str]:
    """Dovecot passwd-file password fields (``{SCHEME}...``) for ``passwords``, in order.

    A PLAIN password that is no UTF-8 text goes in hex (``{PLAIN.HEX}``, Dovecot's encoding
    suffix), so that the passwd-file stays text; Dovecot compares the octets either way.
    """
    if scheme == "PLAIN":
        return [
            f"{{PLAIN}}{password}"
            if password.isprintable()
            else f"{{PLAIN.HEX}}{password_octets(password).hex()}"
            for password in passwords
        ]
    if not passwords:
        return []
    # One openssl run for the lot; passwords go through stdin, never through argv where ps shows them.
    result = subprocess.run(
        [find_program("openssl", "openssl"), "passwd", "-6", "-stdin"],
        input=b"".join(password_octets(password) + b"\n" for password in passwords),
        capture_output=True,
        timeout=60,
        check=False,
    )
    hashes = result.stdout.decode("ascii").split()
    if result.returncode != 0 or len(hashes) != len(passwords):
        raise MailServerError(f"openssl passwd -6 failed: {result.stderr.decode(errors='replace').strip()}")
    return [f"{{SHA512-CRYPT}}{digest}" for digest in hashes]


class Dovecot(Daemon):
    """One Dovecot: IMAP and/or POP3 on 127.0.0.1, or auth-only for Postfix's SASL.

    Layout under ``directory``: ``dovecot.conf``, ``users`` (passwd-file), ``run/`` (base_dir:
    sockets), ``state/``, ``mail/<domain>/<local>/`` (maildirs), ``dovecot.log`` (log_path and
    info_log_path, so logins with their ``rip=`` can be read) and ``dovecot.stderr``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "dovecot",
        users: Iterable[User] = (),
        protocols: Sequence[DovecotProtocol] = ("imap", "pop3"),
        imap_port: int | None = None,
        pop3_port: int | None = None,
        password_scheme: PasswordScheme = "PLAIN",
        trusted_networks: Sequence[str] = DEFAULT_TRUSTED_NETWORKS,
        mail_user: str = DEFAULT_MAIL_USER,
        auth_socket_user: str | None = None,
        extra_config: str = "",
        tls: tlscerts.IssuedCertificate | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        """
        Args:
            directory: absolute folder for everything of this instance (created if missing).
            name: used in process titles (``dovecot-<name>/imap-login``) and error messages.
            users: initial accounts; ``add_user`` adds more while running.
            protocols: ``("imap", "pop3")``, one of them, or ``()`` for an auth-only instance.
            imap_port, pop3_port: fixed ports; by default free ones are picked.
            password_scheme: how passwords are stored in the passwd-file.
            trusted_networks: ``login_trusted_networks`` (IMAP ID / POP3 XCLIENT client IP forwarding).
            mail_user: owner of the maildirs and of the mail processes.
            auth_socket_user: if set, an ``auth-smtp`` unix socket for this user (Postfix's smtpd
                runs as ``postfix``) is opened; see ``auth_socket``.
            extra_config: appended verbatim to dovecot.conf (benchmarks tune services with it).
            tls: a certificate and key: ``ssl = yes`` (STARTTLS and STLS are offered) and one
                implicit-TLS listener per protocol (``tls_port``); off by default.
            proxy_protocol: one more listener per protocol with ``haproxy = yes`` (``haproxy_port``),
                taking a PROXY protocol header from ``trusted_networks``; off by default.
        """
        self.protocols = tuple(protocols)
        unknown = set(self.protocols) - set(DOVECOT_PROTOCOL_PACKAGES)
        if unknown:
            raise ValueError(f"unknown Dovecot protocols {sorted(unknown)}")
        wants_imap = "imap" in self.protocols
        wants_pop3 = "pop3" in self.protocols
        self.tls = tls
        self.proxy_protocol = proxy_protocol
        # Listener name ("imaps", "pop3_haproxy") -> port; always picked free.
        self._extra_ports = {
            f"{protocol}{suffix}": free_port()
            for protocol in self.protocols
            for suffix, wanted in (("s", tls is not None), (_HAPROXY_SUFFIX, proxy_protocol))
            if wanted
        }
        super().__init__(
            directory,
            name,
            auto_ports=(wants_imap and imap_port is None)
            or (wants_pop3 and pop3_port is None)
            or bool(self._extra_ports),
            mail_user=mail_user,
        )
        self._fixed_imap_port = imap_port
        self._fixed_pop3_port = pop3_port
        self._imap_port = (imap_port or free_port()) if wants_imap else None
        self._pop3_port = (pop3_port or free_port()) if wants_pop3 else None
        self.password_scheme: PasswordScheme = password_scheme
        self.trusted_networks = tuple(trusted_networks)
        self.auth_socket_user = auth_socket_user
        self.extra_config = extra_config
        self._users: dict[str, User] = {}
        self._entries: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._add_entries(list(users))

    # -- what callers read ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        return self.directory / "run"

    @property
    def mail_root(self) -> Path:
        return self.directory / "mail"

    @property
    def log_path(self) -> Path:
        return self.directory / "dovecot.log"

    @property
    def imap_port(self) -> int:
        if self._imap_port is None:
            raise MailServerError(f"{self.name} does not serve IMAP")
        return self._imap_port

    @property
    def pop3_port(self) -> int:
        if self._pop3_port is None:
            raise MailServerError(f"{self.name} does not serve POP3")
        return self._pop3_port

    def tls_port(self, protocol: DovecotProtocol) -> int:
        """The implicit-TLS port (imaps, pop3s) of ``protocol``; needs ``tls``."""
        return self._extra_port(f"{protocol}s", "tls")

    def haproxy_port(self, protocol: DovecotProtocol) -> int:
        """The port of ``protocol`` that takes a PROXY protocol header first; needs ``proxy_protocol``."""
        return self._extra_port(f"{protocol}{_HAPROXY_SUFFIX}", "proxy_protocol")

    def _extra_port(self, listener: str, option: str) -> int:
        try:
            return self._extra_ports[listener]
        except KeyError:
            raise MailServerError(f"{self.name} has no {listener} listener (made without {option})") from None

    @property
    def auth_socket(self) -> Path:
        """The unix socket Postfix's ``smtpd_sasl_type = dovecot`` connects to."""
        if self.auth_socket_user is None:
            raise MailServerError(f"{self.name} was made without auth_socket_user")
        return self.base_dir / "auth-smtp"

    @property
    def users(self) -> tuple[User, ...]:
        return tuple(self._users.values())

    def maildir(self, address: str) -> Maildir:
        """The INBOX maildir of ``address`` (``mail/<domain>/<local>/``)."""
        local, _, domain = address.lower().partition("@")
        return Maildir(self.mail_root / domain / local, self.owner)

    def deliver(self, address: str, message: bytes) -> Path:
        """Put ``message`` into the INBOX of ``address`` as a local delivery would."""
        return self.maildir(address).deliver(message)

    def messages(self, address: str) -> list[bytes]:
        """The messages in the INBOX of ``address``, oldest first, as stored."""
        return self.maildir(address).messages()

    def logins(self) -> list[Login]:
        """Every successful IMAP/POP3 login so far, from the log."""
        return [
            Login(match["protocol"], match["user"], match["method"], match["rip"])
            for match in _LOGIN_LINE.finditer(self.log_text())
        ]

    def wait_logins(
        self, user: str, count: int, protocol: str | None = None, timeout: float = START_TIMEOUT
    ) -> list[Login]:
        """Wait until the log shows at least ``count`` logins of ``user`` (over ``protocol``).

        Dovecot's log process writes the line a moment after the client already has its OK.

        Raises:
            MailServerError: fewer logins were logged within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            logins = [
                login
                for login in self.logins()
                if login.user == user.lower() and protocol in (None, login.protocol)
            ]
            if len(logins) >= count:
                return logins
            if time.monotonic() >= deadline:
                raise MailServerError(f"{self.name}: {len(logins)} of {count} logins of {user} logged")
            time.sleep(POLL_INTERVAL)

    def add_user(self, user: User) -> None:
        """Add (or change) an account; a running Dovecot sees it at the next login.

        Dovecot re-reads a passwd-file whose modification time changed, so no reload is needed.
        """
        self._add_entries([user])
        if self.directory.exists():
            self._write_users()
            self.maildir(user.address).create()

    def _add_entries(self, users: list[User]) -> None:
        for user, entry in zip(
            users, hash_passwords([u.password for u in users], self.password_scheme), strict=True
        ):
            self._users[user.address.lower()] = user
            self._entries[user.address.lower()] = entry

    # -- lifecycle hooks -----------------------------------------------------------------------

    def _preflight(self) -> None:
        find_program("dovecot", "dovecot-core")
        for protocol in self.protocols:
            executables = (protocol, f"{protocol}-login")
            if not any(all((d / e).exists() for e in executables) for d in DOVECOT_LIBEXEC_DIRS):
                package = DOVECOT_PROTOCOL_PACKAGES[protocol]
                raise MissingSoftwareError(
                    f"Dovecot's {protocol.upper()} server is not installed (Debian package {package}); "
                    f"{INSTALL_HINT}"
                )
        if self.auth_socket_user is not None:
            try:
                pwd.getpwnam(self.auth_socket_user)
            except KeyError as error:
                raise MissingSoftwareError(
                    f"user {self.auth_socket_user!r} for the SASL socket does not exist "
                    f"(Debian package postfix creates it); {INSTALL_HINT}"
                ) from error

    def _choose_ports(self) -> None:
        if self._imap_port is not None and self._fixed_imap_port is None:
            self._imap_port = free_port()
        if self._pop3_port is not None and self._fixed_pop3_port is None:
            self._pop3_port = free_port()
        self._extra_ports = {listener: free_port() for listener in self._extra_ports}

    def _log_paths(self) -> Sequence[Path]:
        return (self.directory / "dovecot.stderr", self.log_path)

    def _write_files(self) -> None:
        for folder in (self.base_dir, self.directory / "state"):
            folder.mkdir(exist_ok=True)
        if not self.mail_root.exists():
            Maildir(self.mail_root, self.owner).create()
        self._write_users()
        for user in self._users.values():
            self.maildir(user.address).create()
        write_atomically(self.config_path, self._config())

    def _write_users(self) -> None:
        # The auth process runs as Dovecot's internal user and reads the file at every lookup.
        write_atomically(
            self.directory / "users",
            "".join(f"{address}:{entry}\n" for address, entry in sorted(self._entries.items())),
            mode=0o640,
            group=pwd.getpwnam(DOVECOT_INTERNAL_USER).pw_gid,
        )

    def _config(self) -> str:
        owner = self.owner
        protocols = " ".join(self.protocols) or "none"
        sections = [
            f"""# Written by testbed/mailservers.py for one test instance; rewritten at every start.
base_dir = {self.base_dir}
state_dir = {self.directory / "state"}
instance_name = dovecot-{self.name}
protocols = {protocols}
listen = {LOOPBACK}
log_path = {self.log_path}
info_log_path = {self.log_path}
{self._ssl_settings()}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Tests try wrong passwords on purpose; the default 2 s delay per failure only slows them down.
auth_failure_delay = 0
login_trusted_networks = {" ".join(self.trusted_networks)}
mail_location = maildir:{self.mail_root}/%d/%n
passdb {{
  driver = passwd-file
  args = {self.directory / "users"}
}}
userdb {{
  driver = static
  args = uid={owner.uid} gid={owner.gid} home={self.mail_root}/%d/%n
}}
# The auth penalty delays every login from an IP that failed before; all test clients share 127.0.0.1.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        ]
        if self.auth_socket_user is not None:
            sections.append(
                f"""service auth {{
  unix_listener auth-smtp {{
    mode = 0660
    user = {self.auth_socket_user}
    group = {grp.getgrgid(pwd.getpwnam(self.auth_socket_user).pw_gid).gr_name}
  }}
}}
"""
            )
        for protocol, port in self._client_ports():
            if port is None:
                continue
            sections.append(
                f"""service {protocol}-login {{
  inet_listener {protocol} {{
    address = {LOOPBACK}
    port = {port}
  }}
{self._extra_listeners(protocol)}
  # One long-lived login process serves many connections instead of a fork per connection.
  service_count = 0
}}
service {protocol} {{
  client_limit = {MAIL_PROCESS_CLIENT_LIMIT}
}}
protocol {protocol} {{
  mail_max_userip_connections = {MAX_USERIP_CONNECTIONS}
}}
"""
            )
        sections.append(self.extra_config)
        return "".join(sections)

    def _ssl_settings(self) -> str:
        lines = [f"ssl = {'no' if self.tls is None else 'yes'}"]
        if self.tls is not None:
            # "<" makes Dovecot read the files (as root, when it reads its configuration).
            lines += [f"ssl_cert = <{self.tls.cert}", f"ssl_key = <{self.tls.key}"]
        if self.proxy_protocol:
            lines.append(f"haproxy_trusted_networks = {' '.join(self.trusted_networks)}")
        return "\n".join(lines)

    def _extra_listeners(self, protocol: str) -> str:
        """The implicit-TLS listener (port 0, closed, unless ``tls``) and the haproxy listener."""
        tls_port = self._extra_ports.get(f"{protocol}s")
        if tls_port is None:
            listeners = f"  inet_listener {protocol}s {{\n    port = 0\n  }}\n"
        else:
            listeners = (
                f"  inet_listener {protocol}s {{\n    address = {LOOPBACK}\n    port = {tls_port}\n"
                "    ssl = yes\n  }\n"
            )
        haproxy_port = self._extra_ports.get(f"{protocol}{_HAPROXY_SUFFIX}")
        if haproxy_port is not None:
            listeners += (
                f"  inet_listener {protocol}{_HAPROXY_SUFFIX} {{\n    address = {LOOPBACK}\n"
                f"    port = {haproxy_port}\n    haproxy = yes\n  }}\n"
            )
        return listeners.rstrip("\n")

    def _launch(self) -> None:
        self._remove_stale_pid_file()
        with (self.directory / "dovecot.stderr").open("ab") as stderr:
            # -F keeps the master in the foreground as our child, in its own session: stop() can
            # wait for it and find every process it spawned.
            self._process = subprocess.Popen(
                [find_program("dovecot", "dovecot-core"), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        self._session = self._process.pid

    def _remove_stale_pid_file(self) -> None:
        # A master.pid left by a killed instance makes Dovecot refuse to start if its pid has been
        # reused by any other process.
        pid_file = self.base_dir / "master.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_file.read_text().strip())
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                command = b""
            if str(self.config_path).encode() not in command:
                pid_file.unlink()

    def _client_ports(self) -> tuple[tuple[DovecotProtocol, int | None], ...]:
        return (("imap", self._imap_port), ("pop3", self._pop3_port))

    def _ready(self) -> bool:
        checks: list[Callable[[], bool]] = []
        for protocol, port in self._client_ports():
            if port is None:
                continue
            prefix, goodbye = _DOVECOT_GREETINGS[protocol]
            checks.append(functools.partial(greets, port, prefix, goodbye))
            if self.tls is not None:
                checks.append(functools.partial(greets, self.tls_port(protocol), prefix, goodbye, tls=True))
            if self.proxy_protocol:
                checks.append(
                    functools.partial(
                        greets, self.haproxy_port(protocol), prefix, goodbye, preamble=PROBE_PROXY_HEADER
                    )
                )
        if self.auth_socket_user is not None:
            checks.append(lambda: _auth_socket_answers(self.auth_socket))
        if not checks:  # auth-only without a client socket: the master answers on its own socket
            checks.append((self.base_dir / "master.pid").exists)
        return all(check() for check in checks)

    def _failure(self) -> str | None:
        if self._process is None or self._process.poll() is None:
            return None
        return f"dovecot exited with status {self._process.returncode}"

    def _ask_to_stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=STOP_TIMEOUT)
            self._process = None


# ---------------------------------------------------------------------------------------------------
# Postfix

# master.cf services besides the two smtpd listeners: what virtual(8) delivery needs, with chroot "n"
# (Debian's master.cf chroots most of them, which needs files copied into the queue directory).
_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Daemon):
    """One Postfix: an inbound MX port and, with a SASL socket, a submission port, on 127.0.0.1.

    Mail for ``domains`` is delivered by virtual(8) into the maildirs given in ``mailboxes`` (any
    other recipient in those domains is unknown: 550); every other domain is refused (550 5.7.1,
    no relaying), and nothing ever leaves the machine. Submission requires AUTH PLAIN or LOGIN,
    checked by a Dovecot auth socket. Layout under ``directory``: ``conf/`` (main.cf, master.cf,
    mailboxes), ``queue/``, ``data/`` and ``maillog``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        domains: Iterable[str],
        mailboxes: Mapping[str, Maildir] | None = None,
        sasl_socket: Path | None = None,
        smtp_port: int | None = None,
        submission_port: int | None = None,
        xclient_hosts: Sequence[str] = DEFAULT_TRUSTED_NETWORKS,
        mail_user: str = DEFAULT_MAIL_USER,
        hostname: str = DEFAULT_HOSTNAME,
        extra_main_cf: Mapping[str, str] | None = None,
        tls: tlscerts.IssuedCertificate | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        """
        Args:
            directory: absolute folder for everything of this instance (created if missing).
            domains: the virtual mailbox domains this server accepts mail for.
            mailboxes: recipient address -> maildir it is delivered to (``add_mailbox`` adds more).
            sasl_socket: a Dovecot ``auth_socket``; without it there is no submission port.
            smtp_port, submission_port: fixed ports; by default free ones are picked.
            xclient_hosts: ``smtpd_authorized_xclient_hosts``.
            mail_user: the owner of the maildirs (must match the Dovecot serving them).
            hostname: ``myhostname``, shown in the greeting and in Received headers.
            extra_main_cf: more main.cf parameters (benchmarks raise process limits with it).
            tls: a certificate and key: every smtpd offers STARTTLS (``smtpd_tls_security_level =
                may``, with the ``tlsmgr`` service); off by default.
            proxy_protocol: one more MX and (with ``sasl_socket``) submission listener that take a
                PROXY protocol header first (``smtpd_upstream_proxy_protocol = haproxy``), see
                ``haproxy_port``; off by default.
        """
        super().__init__(
            directory,
            "postfix",
            auto_ports=smtp_port is None
            or (sasl_socket is not None and submission_port is None)
            or proxy_protocol,
            mail_user=mail_user,
        )
        self.tls = tls
        # Service ("smtp", "submission") -> the port of its PROXY protocol twin; always picked free.
        services = ("smtp", "submission") if sasl_socket is not None else ("smtp",)
        self._haproxy_ports = {service: free_port() for service in services} if proxy_protocol else {}
        self.domains = tuple(sorted({domain.lower() for domain in domains}))
        self.sasl_socket = sasl_socket
        self.xclient_hosts = tuple(xclient_hosts)
        self.hostname = hostname
        self.extra_main_cf = dict(extra_main_cf or {})
        self._fixed_smtp_port = smtp_port
        self._fixed_submission_port = submission_port
        self._smtp_port = smtp_port or free_port()
        self._submission_port = (submission_port or free_port()) if sasl_socket is not None else None
        self._start_failure = ""
        self._mailboxes: dict[str, Maildir] = {}
        for address, maildir in (mailboxes or {}).items():
            self._check_mailbox(address, maildir)
            self._mailboxes[address.lower()] = maildir

    @property
    def config_directory(self) -> Path:
        return self.directory / "conf"

    @property
    def queue_directory(self) -> Path:
        return self.directory / "queue"

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def maillog_path(self) -> Path:
        return self.directory / "maillog"

    @property
    def smtp_port(self) -> int:
        return self._smtp_port

    @property
    def submission_port(self) -> int:
        if self._submission_port is None:
            raise MailServerError("this Postfix has no submission port (it was made without sasl_socket)")
        return self._submission_port

    def haproxy_port(self, service: Literal["smtp", "submission"]) -> int:
        """The port of the MX or submission listener that takes a PROXY header; needs ``proxy_protocol``."""
        try:
            return self._haproxy_ports[service]
        except KeyError:
            raise MailServerError(f"this Postfix has no {service} listener for PROXY headers") from None

    def maildir(self, address: str) -> Maildir:
        try:
            return self._mailboxes[address.lower()]
        except KeyError:
            raise MailServerError(f"{address} has no mailbox on this Postfix") from None

    def wait_delivered(self, address: str, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[bytes]:
        """Wait until ``address``'s maildir holds at least ``count`` messages; return them all.

        Raises:
            DeliveryTimeoutError: not delivered in time; the message includes Postfix's log about it.
        """
        try:
            return self.maildir(address).wait_for(count, timeout)
        except DeliveryTimeoutError as error:
            mentions = [line for line in self.log_text().splitlines() if address.lower() in line.lower()]
            raise DeliveryTimeoutError(
                f"{error}; maillog about {address}:\n" + "\n".join(mentions[-20:])
            ) from None

    def add_mailbox(self, address: str, maildir: Maildir) -> None:
        """Accept mail for one more address; a running Postfix is reloaded and checked to accept it."""
        self._check_mailbox(address, maildir)
        self._mailboxes[address.lower()] = maildir
        maildir.create()
        if not self.running:
            return
        self._write_mailboxes()
        self._postfix("reload")
        # smtpd processes started before the reload still hold the old table until they are
        # recycled, so ask the MX itself until it accepts the new recipient.
        deadline = time.monotonic() + START_TIMEOUT
        while not self.accepts_recipient(address):
            if time.monotonic() >= deadline:
                raise MailServerError(f"Postfix still refuses {address} {START_TIMEOUT:g} s after a reload")
            time.sleep(POLL_INTERVAL)

    def accepts_recipient(self, address: str) -> bool:
        """True if the MX port answers RCPT TO:<address> with 250 (the transaction is then reset)."""
        try:
            with socket.create_connection((LOOPBACK, self.smtp_port), timeout=PROBE_TIMEOUT) as connection:
                if not _read_line(connection).startswith(b"220"):
                    return False
                replies = []
                for command in (
                    b"HELO testbed\r\n",
                    b"MAIL FROM:<>\r\n",
                    f"RCPT TO:<{address}>\r\n".encode(),
                ):
                    connection.sendall(command)
                    replies.append(_read_line(connection))
                connection.sendall(b"QUIT\r\n")
                return replies[-1].startswith(b"250")
        except OSError:
            return False

    def _check_mailbox(self, address: str, maildir: Maildir) -> None:
        domain = address.rpartition("@")[2].lower()
        if domain not in self.domains:
            raise ValueError(f"{address}: {domain} is not one of this Postfix's domains {self.domains}")
        if not maildir.path.is_absolute():
            raise ValueError(f"{maildir.path}: maildirs must be absolute paths")
        if maildir.owner.uid != self.owner.uid:
            raise ValueError(f"{maildir.path} belongs to {maildir.owner.name}, not {self.owner.name}")

    # -- lifecycle hooks -----------------------------------------------------------------------

    def _preflight(self) -> None:
        find_program("postfix", "postfix")
        try:
            pwd.getpwnam("postfix")
        except KeyError as error:
            raise MissingSoftwareError(
                f"user 'postfix' is missing (Debian package postfix); {INSTALL_HINT}"
            ) from error

    def _choose_ports(self) -> None:
        if self._fixed_smtp_port is None:
            self._smtp_port = free_port()
        if self._submission_port is not None and self._fixed_submission_port is None:
            self._submission_port = free_port()
        self._haproxy_ports = {service: free_port() for service in self._haproxy_ports}

    def _log_paths(self) -> Sequence[Path]:
        return (self.maillog_path,)

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [find_program("postfix", "postfix"), "-c", str(self.config_directory), command],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )

    def _write_files(self) -> None:
        for folder in (self.config_directory, self.queue_directory, self.data_directory):
            folder.mkdir(exist_ok=True)
        # postfix check insists on these owners; the queue's subfolders are made by postfix itself.
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_directory, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chown(self.queue_directory, 0, 0)
        for maildir in self._mailboxes.values():
            maildir.create()
        self._write_mailboxes()
        write_atomically(self.config_directory / "main.cf", self._main_cf())
        write_atomically(self.config_directory / "master.cf", self._master_cf())

    def _write_mailboxes(self) -> None:
        # virtual_mailbox_base is "/", so each value is the absolute maildir path without its leading
        # "/"; the trailing "/" makes virtual(8) write maildir instead of mbox.
        write_atomically(
            self.config_directory / "mailboxes",
            "".join(
                f"{address} {str(maildir.path).lstrip('/')}/\n"
                for address, maildir in sorted(self._mailboxes.items())
            ),
        )

    def _main_cf(self) -> str:
        owner = self.owner
        parameters = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled in the testbed",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": " ".join(DEFAULT_TRUSTED_NETWORKS),
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_maps": f"texthash:{self.config_directory / 'mailboxes'}",
            "virtual_mailbox_base": "/",
            "virtual_uid_maps": f"static:{owner.uid}",
            "virtual_gid_maps": f"static:{owner.gid}",
            "virtual_mailbox_limit": "0",
            "message_size_limit": str(MESSAGE_SIZE_LIMIT),
            # Nothing leaves the machine: no relay domains, every non-virtual destination errors.
            "relay_domains": "",
            "default_transport": "error:outbound mail is disabled in the testbed",
            "relay_transport": "error:outbound mail is disabled in the testbed",
            # No permit_mynetworks: loopback clients (the proxy) get no relaying either. 550 rather
            # than Postfix's 554 is what RFC 5321 section 3.6.2 suggests and what the proxy says.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "relay_domains_reject_code": "550",
            "smtpd_authorized_xclient_hosts": " ".join(self.xclient_hosts),
            # Store messages as received: no header address rewriting, no added headers.
            "local_header_rewrite_clients": "",
            # Tests provoke errors and open many sessions from 127.0.0.1; no tarpit, no per-client cap,
            # no pause when the queue is busy.
            "smtpd_error_sleep_time": "0",
            "smtpd_client_connection_count_limit": "0",
            "in_flow_delay": "0",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "append_dot_mydomain": "no",
            **self._tls_main_cf(),
            **self.extra_main_cf,
        }
        header = "# Written by testbed/mailservers.py for one test instance; rewritten at every start.\n"
        return header + "".join(f"{key} = {value}\n" for key, value in parameters.items())

    def _tls_main_cf(self) -> dict[str, str]:
        if self.tls is None:
            return {}
        # smtpd reads the key as root before it drops privileges.
        return {
            "smtpd_tls_cert_file": str(self.tls.cert),
            "smtpd_tls_key_file": str(self.tls.key),
            "smtpd_tls_security_level": "may",
        }

    def _master_cf(self) -> str:
        lines = [
            "# Written by testbed/mailservers.py; every service runs without chroot.\n",
            f"{LOOPBACK}:{self._smtp_port} inet n - n - - smtpd\n",
        ]
        submission = ""
        if self._submission_port is not None and self.sasl_socket is not None:
            submission = (
                "  -o smtpd_sasl_auth_enable=yes\n"
                "  -o smtpd_sasl_type=dovecot\n"
                f"  -o smtpd_sasl_path={self.sasl_socket}\n"
                "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            )
            lines.append(
                f"{LOOPBACK}:{self._submission_port} inet n - n - - smtpd\n"
                "  -o syslog_name=postfix/submission\n" + submission
            )
        for service, port in self._haproxy_ports.items():
            lines.append(
                f"{LOOPBACK}:{port} inet n - n - - smtpd\n"
                f"  -o syslog_name=postfix/{service}{_HAPROXY_SUFFIX}\n"
                "  -o smtpd_upstream_proxy_protocol=haproxy\n"
                + (submission if service == "submission" else "")
            )
        lines.append(_MASTER_CF_SERVICES)
        if self.tls is not None:
            # smtpd asks tlsmgr(8) for its PRNG seed and TLS session cache.
            lines.append("tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n")
        return "".join(lines)

    def _launch(self) -> None:
        result = self._postfix("start")
        self._start_failure = "" if result.returncode == 0 else (result.stdout + result.stderr).strip()
        self._session = self._master_pid()

    def _master_pid(self) -> int | None:
        # The master calls setsid(), so its pid is the session id of all Postfix processes.
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _ready(self) -> bool:
        if not greets(self._smtp_port, b"220", b"QUIT\r\n"):
            return False
        if self._submission_port is not None and not greets(self._submission_port, b"220", b"QUIT\r\n"):
            return False
        return all(
            greets(port, b"220", b"QUIT\r\n", preamble=PROBE_PROXY_HEADER)
            for port in self._haproxy_ports.values()
        )

    def _failure(self) -> str | None:
        if self._start_failure:
            return f"postfix start failed: {self._start_failure}"
        if self._session is None or not session_processes(self._session):
            return "the Postfix master is not running"
        return None

    def _ask_to_stop(self) -> None:
        # Returns at once; wait_stopped() waits for the processes and kills what is left.
        self._postfix("stop")
