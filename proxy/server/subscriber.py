"""The proxy's end of the push channel: follow the controller's table stream, swap, acknowledge.

``mailgress proxy`` runs ``Subscriber(settings.controller).run`` as the process's table source
when the settings name a controller. It holds one stream open (``GET /v1/tables/stream``, one
canonical table per NDJSON line, empty lines are heartbeats; wire protocol in
controller/publisher.py), checks every table with ``table.from_json`` (the version must match the
content), installs it with ``TableHolder.swap`` (open sessions keep their backend) and
acknowledges it with ``POST /v1/acks``, also when it was already in use, so a restarted controller
learns what every proxy serves. A rejected table is acked with its error and the last good table
stays. Acks go out in order, before the next line is read.

Outages: whatever the controller does, the last table stays in force. A stream that fails or ends
is reopened after an exponential backoff with full jitter (bounded by ``Backoff.cap``, reset by
every table received). Until a first table arrived, each failed attempt tries the snapshot file
(the controller's snapshot Secret, mounted), so a proxy that starts while the controller is away
serves, and switches to the stream as soon as it comes. The controller stores a table too large
for the Secret's 1 MiB gzip-compressed under a second key, mounted beside the first:
``read_snapshot`` takes the configured file, else its ``.gz`` sibling, and decompresses what
starts with gzip's magic number (stdlib gzip, bounded by MAX_TABLE_BYTES). A snapshot that
cannot be read or is no valid table is logged and leaves the proxy as it was.

Token: the token file (a mounted Secret) is read for every stream request, and the token kept
only in that stream's headers, which its acks carry too: a rotated Secret takes effect at the next
stream. The token a stream was opened with is the one the controller knows that stream by, and
keeps accepting until the grace after its own copy rotates (controller/publisher.py); the
controller then ends the stream and the proxy reconnects with the file as it is. A file that
cannot be read or holds no token the controller would take (read as the controller reads it,
proxy.push: a leading byte order mark and surrounding whitespace dropped) is a ChannelError:
logged, retried. Never logs the token. The proxy name (controller.proxyName, else POD_NAME, else
the host name in lower case) must be a pod name as the controller requires (proxy.push): one that
is not refuses to start the subscriber, saying why.

TLS: an https:// url is verified against ``caFile`` (the chart mounts the controller's CA), or
the system CAs without one, and against the url's host name (the controller Service's DNS name),
TLS 1.2 or later. The CA file is read again for every stream (it may rotate), and a stream's acks
go out with the context the stream was opened with. A CA that cannot be loaded and a certificate
that does not verify are ChannelErrors like any connect failure: logged once, retried, the table
in use kept. An http:// url (standalone tests, or an explicit opt-out) works, with one WARNING at
start: the token and the tables, auth_http headers included, then cross the network in clear.
"""

import asyncio
import gzip
import io
import json
import logging
import os
import random
import socket
import ssl
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy import push, table
from proxy.protocols.errors import LineTooLongError
from proxy.protocols.lines import LineBuffer
from proxy.server import certificates
from proxy.server.routes import TableHolder
from proxy.settings import ControllerSettings, SettingsError

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/tables/stream"
ACK_PATH = "/v1/acks"
# The controller writes a heartbeat every 15 s; three missed ones mean the stream is dead even
# if TCP has not noticed (a controller node that vanished without a FIN).
STREAM_IDLE_TIMEOUT = 45.0
CONNECT_TIMEOUT = 5.0
ACK_TIMEOUT = 10.0
# One table is one line. 10,000 routes take a few MB; this bounds what a broken peer can make
# the proxy buffer.
MAX_TABLE_BYTES = 64 * 1024 * 1024
# What an ack carries of a rejected table's claimed version and of the error message.
MAX_ACK_TEXT = 1024
# The compressed snapshot's file: the controller's Secret key for it is the plain key plus
# this (controller/reconciler.py SNAPSHOT_GZIP_KEY; the proxy never imports the controller).
SNAPSHOT_GZIP_SUFFIX = ".gz"
# RFC 1952 section 2.3.1: every gzip member starts with ID1 ID2; JSON never starts with 0x1f.
GZIP_MAGIC = b"\x1f\x8b"


class ChannelError(Exception):
    """The stream could not be opened or broke off; the message is safe to log."""


class SnapshotError(Exception):
    """The snapshot file cannot be served; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base: float = 0.25
    cap: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        # The exponent is clamped so a long outage cannot overflow the float.
        return rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 32)))


def resolve_proxy_name(configured: str | None) -> str:
    """The name this proxy acks under: the setting (checked by proxy.settings), else POD_NAME
    (the downward API's pod name), else the host name in lower case (DNS names ignore case).

    Raises:
        SettingsError: POD_NAME or the host name is no name the controller takes.
    """
    if configured:
        return configured
    pod = os.environ.get("POD_NAME")
    name, source = (pod, "POD_NAME") if pod else (socket.gethostname().lower(), "the host name")
    if not push.valid_proxy_name(name):
        raise SettingsError(
            f"controller.proxyName is not set, and {source} {name!r} cannot stand in for it: the"
            f" controller takes {push.PROXY_NAME_RULE}; set controller.proxyName"
        )
    return name


class Subscriber:
    """Keeps a TableHolder in step with the controller for as long as ``run`` runs."""

    def __init__(
        self, settings: ControllerSettings, *, backoff: Backoff = Backoff(), rng: random.Random | None = None
    ) -> None:
        self._settings = settings
        self._name = resolve_proxy_name(settings.proxy_name)
        self._backoff = backoff
        self._rng = rng or random.Random()  # noqa: S311  jitter, not cryptography
        self._attempt = 0
        self._reported: dict[str, str] = {}  # "stream" / "snapshot" -> the last problem logged

    async def run(self, holder: TableHolder) -> None:
        """Follow the controller until cancelled; never returns on its own."""
        if not self._settings.url.startswith("https://"):
            log.warning(
                "push channel: %s is plain HTTP: the push token and the routing tables (auth_http"
                " headers included) cross the network unencrypted; use an https:// url with caFile",
                self._settings.url,
            )
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=STREAM_IDLE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self._follow(session, holder)
                    self._report("stream", "the controller ended the table stream")
                except ChannelError as error:
                    self._report("stream", str(error))
                if not holder.ready:
                    self._serve_snapshot(holder)
                delay = self._backoff.delay(self._attempt, self._rng)
                self._attempt += 1
                await asyncio.sleep(delay)

    def _report(self, kind: str, problem: str) -> None:
        # Once per distinct problem: a long outage must not flood the log every few seconds.
        if self._reported.get(kind) != problem:
            log.warning("push channel: %s; the table in use stays, retrying", problem)
        self._reported[kind] = problem

    def _authorization(self) -> dict[str, str]:
        """The headers of one stream and its acks, with the token the file holds now.

        Raises:
            ChannelError: the file holds no token (``push.read_token_file``).
        """
        # Re-read for every stream, never kept beyond it: a rotated Secret takes effect without
        # a restart.
        # Read as the controller reads it. A line break or NUL cannot go into a header (aiohttp
        # refuses it with a ValueError, which would end the table source and so the proxy): the
        # reader refuses it, and a broken Secret is retried.
        try:
            token, _ = push.read_token_file(self._settings.token_file)
        except push.TokenFileError as error:
            raise ChannelError(str(error)) from error
        return {"Authorization": f"Bearer {token}"}

    def _tls(self) -> ssl.SSLContext | bool:
        """The TLS context of one stream and its acks (True, aiohttp's default, for http://).

        Raises:
            ChannelError: the CA file cannot be loaded.
        """
        if not self._settings.url.startswith("https://"):
            return True
        try:
            # Built afresh for every stream: the CA file as it is now (a rotated CA Secret).
            return certificates.client_context(self._settings.ca_file, "controller.caFile")
        except certificates.CertificateError as error:
            raise ChannelError(str(error)) from error

    async def _follow(self, session: aiohttp.ClientSession, holder: TableHolder) -> None:
        url = self._settings.url + STREAM_PATH
        # The stream's token, for its acks too: the controller accepts it for as long as the
        # stream lives (a copy rotated before the controller's must not lose the stream).
        headers = self._authorization()
        tls = self._tls()
        try:
            async with session.get(url, params={"proxy": self._name}, headers=headers, ssl=tls) as response:
                if response.status != 200:
                    raise ChannelError(f"the controller answered {response.status} to the stream request")
                log.info("push channel: following %s as %s", self._settings.url, self._name)
                self._reported.clear()
                lines = LineBuffer(MAX_TABLE_BYTES)
                async for chunk in response.content.iter_any():
                    lines.feed(chunk)
                    while (line := lines.pop_line()) is not None:
                        if line.strip():  # an empty line is a heartbeat
                            await self._apply(session, holder, line, headers, tls)
        except LineTooLongError as error:
            raise ChannelError(f"a table line exceeded {MAX_TABLE_BYTES} bytes") from error
        # aiohttp's own text for these names the TLS context object, a new one at every connect:
        # with it no failure would read the same twice, and every retry would be logged again.
        except aiohttp.ClientConnectorCertificateError as error:
            raise ChannelError(
                f"the controller's certificate did not verify: {error.certificate_error}"
            ) from error
        except aiohttp.ClientConnectorError as error:
            raise ChannelError(f"cannot connect to {error.host}:{error.port}: {error.os_error}") from error
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ChannelError(f"{type(error).__name__}: {error}") from error

    async def _apply(
        self,
        session: aiohttp.ClientSession,
        holder: TableHolder,
        line: bytes,
        headers: dict[str, str],
        tls: ssl.SSLContext | bool,
    ) -> None:
        try:
            # A large table takes a while to parse; a thread keeps the sessions' loop responsive.
            new = await asyncio.to_thread(table.from_json, line)
        except table.TableError as error:
            version, message = _claimed_version(line), str(error)
            log.error(
                "push channel: routing table %s rejected: %s; keeping %s",
                version or "(no version)",
                message,
                holder.current.version if holder.ready else "no table",
            )
            await self._ack(session, headers, tls, version, accepted=False, error=message)
        else:
            holder.swap(new)
            await self._ack(session, headers, tls, new.version, accepted=True, error="")
        self._attempt = 0  # the channel works: the next outage starts the backoff afresh

    async def _ack(
        self,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        tls: ssl.SSLContext | bool,
        version: str,
        *,
        accepted: bool,
        error: str,
    ) -> None:
        body = {
            "proxy": self._name,
            "version": version[:MAX_ACK_TEXT],
            "accepted": accepted,
            "error": error[:MAX_ACK_TEXT],
        }
        url = self._settings.url + ACK_PATH
        timeout = aiohttp.ClientTimeout(total=ACK_TIMEOUT)
        async with session.post(url, json=body, headers=headers, ssl=tls, timeout=timeout) as response:
            if response.status != 204:
                # The stream is reopened and its first line acked again: no ack is lost.
                raise ChannelError(f"the controller answered {response.status} to an ack")

    def _serve_snapshot(self, holder: TableHolder) -> None:
        if self._settings.snapshot_file is None:
            return
        try:
            path, snapshot = read_snapshot(self._settings.snapshot_file)
        except SnapshotError as error:
            self._report("snapshot", str(error))
            return
        log.info(
            "push channel: serving the snapshot %s (%s) until the controller answers", path, snapshot.version
        )
        holder.swap(snapshot)


def read_snapshot(path: Path) -> tuple[Path, table.RoutingTable]:
    """The file read and the table in it: ``path``, else (absent) its compressed sibling.

    Either file may hold either form: gzip is told by its magic number, not by the name.

    Raises:
        SnapshotError: neither file can be read, the gzip data is corrupt or decompresses to
            more than MAX_TABLE_BYTES, or the document is no valid table.
    """
    compressed = path.with_name(path.name + SNAPSHOT_GZIP_SUFFIX)
    for candidate in (path, compressed):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise SnapshotError(f"cannot read the snapshot {candidate}: {error.strerror}") from error
        break
    else:
        raise SnapshotError(f"cannot read the snapshot {path}: neither it nor {compressed.name} exists")
    if data.startswith(GZIP_MAGIC):
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                data = stream.read(MAX_TABLE_BYTES + 1)
        except (OSError, EOFError, zlib.error) as error:
            # OSError: gzip.BadGzipFile (header, CRC, length); EOFError: cut short.
            raise SnapshotError(f"the snapshot {candidate} is not valid gzip: {error}") from error
        if len(data) > MAX_TABLE_BYTES:
            raise SnapshotError(f"the snapshot {candidate} decompresses to more than {MAX_TABLE_BYTES} bytes")
    try:
        return candidate, table.from_json(data)
    except table.TableError as error:
        raise SnapshotError(
            f"the snapshot {candidate} is not a valid table (JSON, or gzip-compressed JSON): {error}"
        ) from error


def _claimed_version(line: bytes) -> str:
    """The version a rejected table claims, if it is JSON enough to say; else empty."""
    try:
        document: Any = json.loads(line)
    except (ValueError, RecursionError):
        return ""
    version = document.get("version") if isinstance(document, dict) else None
    return version if isinstance(version, str) else ""
