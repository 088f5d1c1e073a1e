"""The controller's end of the push channel: every proxy's table stream, and what each acked.

The reconciler calls ``publish(table)`` with each compiled table; each proxy pod keeps one
long-lived stream open here and receives the new version at once, then acknowledges what it did
with it. ``acks()`` is what the reconciler turns into the Programmed condition, and ``on_change``
tells it when to look again. controller.operator builds it on a ``TokenFile`` (the mounted push
token Secret). Never imports kopf; from the proxy only the table contract and the rules both
ends of the channel share (proxy.push: proxy names, token files). Never logs, echoes or stores the
token itself.
The controller's metrics (controller.metrics) live on ``registry`` and are updated here.

Wire protocol (HTTP/1.1; every request carries ``Authorization: Bearer <token>``):
- ``GET /v1/tables/stream?proxy=NAME`` -> 200, chunked NDJSON: one canonical table
  (``table.to_json``) per line, the current one first, then every newly published version.
  An empty line every ``heartbeat`` seconds lets the proxy tell a quiet controller from a dead
  one. 503 before the first ``publish`` (the proxy then serves its snapshot and retries).
- ``POST /v1/acks`` with ``{"proxy", "version", "accepted", "error"}`` -> 204.
- A missing or wrong token gets 401 with an empty body on both, before anything else is looked
  at; a malformed request gets 400 with an empty body.
- The token to compare with is the token file's content as it is now (``TokenFile``, a mounted
  Secret the proxies mount too; read as they read it, proxy.push: UTF-8 without a leading byte order
  mark or surrounding whitespace, refused with a control character in it): re-read whenever a stat
  of it (symlinks followed: the kubelet swaps the ``..data`` link) differs, so a rotated Secret
  takes effect in the controller as the proxies, which read the file for every new stream, start
  sending it. The kubelet updates each pod's copy on its own schedule, so the token a rotation
  replaced stays accepted until ``TOKEN_ROTATION_GRACE`` (5 minutes) after the rotation: after the
  new file's modification time (wall clock; a time ahead of the clock counts as now), however late
  the controller notices it, so a rotation noticed over 5 minutes late accepts the old token not at
  all. Then only the current token is. A proxy whose copy is not updated yet keeps its stream and
  its acks count; a proxy whose copy is updated first keeps acking on its open stream with the token
  the stream was opened with, the controller's current one until the controller's copy rotates too.
  Each stream remembers the token it was opened with and ends at its next line (a table or a
  heartbeat) once that token is no longer accepted (its grace is over, or the file was replaced
  again); the proxy then reconnects with its current file. An operator rotating a leaked token who
  wants the old one refused at once restarts the controller: a controller that starts accepts only
  the token its file holds, and its streams start afresh. While the file is missing, unreadable,
  empty, not UTF-8 or holds a token no proxy can send every request gets 401, logged once per
  problem (never a token); that ends no stream and no grace (the kubelet's swap can make one read
  fail): the replaced token's grace keeps its end time for when the file is readable again.
- ``GET /metrics`` -> 200, Prometheus text format, WITHOUT the token: Prometheus scrapes it, and
  it holds counts, timings and the table version only (no token, proxy or user names, no routes'
  contents). It shares the push port, so the chart's NetworkPolicy opens that port to the
  scrapers (``networkPolicy.adminFrom``); the stream and ack paths still demand the token.
Connections (the port is open to every pod by default): served through a guard (``guards``;
``mailgress controller`` always has one), at most ``MAX_CONNECTIONS`` (1024) are open at once, and
one without a request answered within ``REQUEST_TIMEOUT`` (60 s) of its accept (its TLS handshake
included) or of its last answer is aborted: silent, half-sent and unauthenticated connections
cannot hold the controller's descriptors. A stream has no deadline once its token is accepted and
is never evicted; acks and /metrics are ordinary short requests. Over the cap the connection idle
the longest (no request in progress) is aborted to make room, else one whose client is behind on
its answers (an answer it does not read waits to be written, or requests it pipelined wait behind
one; never an accepted stream), so neither silent connections nor clients that pipeline requests
without the token and never read the answers keep a proxy's stream or ack out; only when every
open connection is busy with a client that keeps up is the new one closed unread (logged at
debug). A stream whose write waits ``STALLED_WRITE_HEARTBEATS`` heartbeat intervals (45 s; the
proxy itself reconnects after three missed heartbeats) ends, its connection aborted (a warning).
A write waits only when the connection takes no more: aiohttp waits for it after every 64 KiB
written, and only while more than the transport's high-water mark (64 KiB) is left unsent beyond
what the kernel took, that is once the proxy's receive buffer and the controller's send buffer
are full (MiBs between pods). So a proxy is cut when it stopped reading while that much was
sent to it. A proxy that stops reading with room left in those buffers (a wedged process with
its socket open, ordinary tables) is not detected: its kernel acknowledges every line (a
heartbeat is a few octets every 15 s), no write waits, and TCP keepalive and TCP_USER_TIMEOUT,
which watch the peer's kernel, cannot tell it from a reading proxy; nothing at this end can without an
answer from the proxy's process. Its stream lasts until its connection ends (its pod restarted
or deleted; its node gone: once the kernel gives up retransmitting, about 15 minutes, the pod not
Ready long before), and its ``acks()`` entry stays the last ack it sent: it counts as
running the version it acked and never a later one, so while its pod is Ready a route changed
since stays Programmed Unknown (Pending, one proxy short), and routes that version holds stay
counted. A proxy whose event loop is wedged also fails its probes (its admin port is served by
that loop): not Ready, it is counted for no route, and the kubelet restarts it.
TLS: given ``certificates`` (the chart's default), the whole port speaks TLS 1.2 or later, /metrics
included (the chart's ServiceMonitor and PodMonitor scrape it over https); without, plain HTTP.
Each handshake first calls ``certificates.refresh()`` and then serves the context in force, so a
renewed certificate (cert-manager, or the chart rewriting the mounted Secret) reaches the very
next connection without a restart, and open streams keep the one they began with. The reload
logic is proxy.server.certificates.CertificateStore's, and the guard proxy.server.connections'
(the proxies' admin port has one too; it runs the handshake itself), both handed in by
mailgress/cli.py: the controller never imports proxy.server.
Push lag: from ``publish`` of a version, or from the proxy's stream opening if that came later
(a proxy that connects late cannot have had it earlier), to that proxy's first ack of it.
Delivery: a stream always ends up with the newest table, in publish order. A version that a
newer one superseded before it could be written to a slow stream is skipped, never reordered
(level-based, as xDS snapshots). Republishing the version already out is a no-op.
Acks: a proxy's entry lives as long as its stream. A new stream under the same name replaces the
old one and forgets its ack; a stream that ends drops the entry; an ack from a proxy without an
open stream is dropped (it acks again on its next stream, whose first line is the current table).
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controller import metrics as controller_metrics
from proxy import push, table

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/tables/stream"
ACK_PATH = "/v1/acks"
METRICS_PATH = "/metrics"
NDJSON = "application/x-ndjson"
# The proxy reconnects after three missed heartbeats (proxy/server/subscriber.py).
HEARTBEAT_INTERVAL = 15.0
# An ack is a few short strings; anything bigger is not one of ours.
MAX_ACK_BODY = 64 * 1024
# What is kept of an ack's version and error: "sha256:" and 64 hex digits fit with room, and an
# error message stays readable in a MailRoute condition.
MAX_VERSION_LENGTH = 128
MAX_ERROR_LENGTH = 1024
# Publish times kept for the push lag: an ack of a version published longer ago than this many
# publications is too stale to say anything about the push channel, and is not observed.
MAX_TIMED_VERSIONS = 64
# How long the token a rotation replaced stays accepted after the rotation (the new file's
# modification time). The kubelet updates each pod's copy of a mounted Secret separately, within
# its sync period plus its Secret cache's TTL (about a minute each by default); until then that
# proxy sends the old token. Five minutes lets every copy catch up with room to spare, and bounds
# how long a leaked token outlives its rotation (a restart ends it at once).
TOKEN_ROTATION_GRACE = 5 * 60.0
# RFC 8996 retired TLS 1.0 and 1.1 (the proxy's listeners take the same floor).
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# Push port connections open at once at most. A proxy pod holds one stream and, while it acks, one
# short request (its ack connection, kept alive between acks), and Prometheus a scrape or two: 1024
# leaves room for a fleet of several hundred proxy pods, far above any real one, and bounds the
# descriptors anyone who reaches the port can hold, so that the kube API watch and the proxies'
# streams keep theirs (the process needs a descriptor limit above this, as container runtimes
# commonly give). Over the cap the connection idle the longest makes room, else one whose client
# is behind on its answers; only when every open one is busy with a client that keeps up (an
# accepted stream always counts as one) is the new one closed unread.
MAX_CONNECTIONS = 1024
# How long a connection may go without a request answered, counted from its accept (its TLS
# handshake included) and again from each answer; a stream, once its token is accepted, has no
# deadline until it ends. As the proxies' admin port (proxy/server/admin.py) and nginx's
# client_header_timeout: 60 s. A proxy's kept-alive ack connection idles 15 s at most (aiohttp's
# client keepalive), Prometheus reconnects when it scrapes less often than this.
REQUEST_TIMEOUT = 60.0
# A write to a stream that waits this many heartbeat intervals for its connection ends the
# stream. The proxy reconnects after three heartbeats without a line (its STREAM_IDLE_TIMEOUT,
# proxy/server/subscriber.py): by then it has given up on the stream, or it stopped reading. A
# write waits only once the socket buffers are full (module docstring): a proxy that stops reading
# with room left there is not detected.
STALLED_WRITE_HEARTBEATS = 3


class ServerCertificates(Protocol):
    """The push channel's certificate and key, reloaded when their files change.

    proxy.server.certificates.CertificateStore is one: mailgress/cli.py, the composition root,
    builds it (controller.operator takes its constructor as a ``CertificateLoader``).
    """

    @property
    def context(self) -> ssl.SSLContext:
        """The server context of the files as last loaded."""
        ...

    def refresh(self) -> bool:
        """Reload if a file changed (a broken renewal keeps the context in force, logged)."""
        ...


class ConnectionGuard(Protocol):
    """Bounds the push port's connections: a cap and a deadline for a request answered (see
    MAX_CONNECTIONS and REQUEST_TIMEOUT), serving them plain or over TLS.

    proxy.server.connections.Guard is one: mailgress/cli.py, the composition root, hands its
    constructor in as the ``ConnectionGuards`` (the controller never imports proxy.server).
    """

    def lasting(self, request: web.BaseRequest) -> None:
        """``request`` (in progress) has no deadline until it ends: an accepted stream."""
        ...

    def site(
        self, runner: web.BaseRunner, address: str, port: int, tls: ssl.SSLContext | None = None
    ) -> web.BaseSite:
        """The site that serves ``runner`` on ``address:port`` through the guard (with ``tls``:
        the guard runs each handshake inside the deadline); it tells the guard which connections
        have a request in progress (those are never evicted), whoever answers it."""
        ...


# Makes a ConnectionGuard from the name its log lines start with, the cap and the deadline.
ConnectionGuards = Callable[[str, int, float], ConnectionGuard]


# The token file's error: it is read as the proxies read it (proxy.push); controller.operator
# catches it under this name.
TokenFileError = push.TokenFileError


# What tells one version of a file from the next: device, inode, modification time, size. The
# kubelet writes a new file in a new directory for each Secret update (a new inode even when the
# content's size and the clock's granularity would not tell).
_Stamp = tuple[int, int, int, int]


def _stamp(status: os.stat_result) -> _Stamp:
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


def _read_token(path: Path) -> tuple[str, _Stamp]:
    """The token ``path`` holds, read as the proxies read it (``push.read_token_file``), and the
    stamp of the very file read.

    Raises:
        TokenFileError: as ``push.read_token_file``.
    """
    token, status = push.read_token_file(path)
    return token, _stamp(status)


def read_token(path: Path) -> str:
    """The token ``path`` holds now (as the proxies read it: ``push.read_token_file``).

    Raises:
        TokenFileError: as ``TokenFile`` would refuse every request for.
    """
    return _read_token(path)[0]


def _digest(token: str) -> bytes:
    # Only a digest is kept: comparing two equal-length digests in constant time reveals neither
    # the token nor its length. surrogateescape: aiohttp decodes header bytes that are not UTF-8
    # so, and a presented token must be compared, never raise.
    return hashlib.sha256(token.encode(errors="surrogateescape")).digest()


class TokenFile:
    """The push tokens accepted now: the one its file holds, and until ``TOKEN_ROTATION_GRACE``
    after a rotation the one it replaced. The current digest is cached until a stat differs."""

    __slots__ = (
        "_clock",
        "_digest",
        "_monotonic",
        "_path",
        "_previous",
        "_previous_until",
        "_problem",
        "_stamp",
    )

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: wall-clock seconds since the epoch, as file modification times are: what is
        left of a grace when a rotation is noticed. ``monotonic`` counts that down, so a step of
        the wall clock (an NTP correction) neither stretches nor cuts it. Tests pass their own."""
        self._path = path
        self._clock = clock
        self._monotonic = monotonic
        self._stamp: _Stamp | None = None  # None: re-read at the next look
        # The token last read, kept while the file cannot be read: a read failing during the
        # kubelet's swap must neither end a grace nor make the next token read look like the first.
        self._digest: bytes | None = None
        # The digest a rotation replaced, and when (on ``monotonic``) the grace for it ends. Never
        # carried over a restart: a new TokenFile accepts only the token its file holds.
        self._previous: bytes | None = None
        self._previous_until = 0.0
        self._problem: str | None = None  # the last one logged, until a token is read again
        # Read now, not at the first request: a rotation before any proxy connected is one too.
        self._read()

    def digests(self) -> tuple[bytes, ...]:
        """The SHA-256 of each token a request is accepted with now, the current one first;
        empty while the file holds none (logged once per problem)."""
        return self._held() if self._read() else ()

    def stream_digests(self) -> tuple[bytes, ...]:
        """The SHA-256 of each token an open stream may go on with: those ``digests`` accepts,
        or while the file cannot be read those read last (with the grace still timed)."""
        self._read()
        return self._held()

    def _held(self) -> tuple[bytes, ...]:
        if self._digest is None:
            return ()
        if self._previous is not None and self._monotonic() >= self._previous_until:
            self._previous = None
            log.info("push channel: the push token replaced in %s is no longer accepted", self._path)
        return (self._digest,) if self._previous is None else (self._digest, self._previous)

    def _read(self) -> bool:
        """Take in the file's token if the file changed; False while it holds none."""
        try:
            # os.stat follows symlinks: after the kubelet's ..data swap it sees the new file.
            stamp = _stamp(os.stat(self._path))
        except OSError as error:
            return self._refuse(f"cannot read the token file {self._path}: {error.strerror}")
        if stamp == self._stamp:
            return True
        try:
            token, stamp = _read_token(self._path)
        except TokenFileError as error:
            return self._refuse(str(error))
        digest = _digest(token)
        if self._digest is not None and digest != self._digest:
            # A rotation (a rewrite with the same token is none): proxies whose copy of the
            # Secret is not updated yet still send the one it replaced.
            self._rotated(self._digest, modified=stamp[2] / 1e9)
        self._stamp, self._digest = stamp, digest
        if self._problem is not None:
            log.info("push channel: the token file %s holds a token again", self._path)
            self._problem = None
        return True

    def _rotated(self, replaced: bytes, *, modified: float) -> None:
        """Accept ``replaced`` until the grace from ``modified`` (the new file's time) ends."""
        now = self._clock()
        # A modification time ahead of the clock (a skewed node) must not stretch the grace.
        left = min(modified, now) + TOKEN_ROTATION_GRACE - now
        self._previous, self._previous_until = replaced, self._monotonic() + left
        if left > 0:
            log.info(
                "push channel: the token file %s holds a new token; the one it replaced stays accepted"
                " for %.0f s (restart the controller to refuse it at once)",
                self._path,
                left,
            )
        else:
            self._previous = None
            log.info(
                "push channel: the token file %s holds a new token, written %.0f s ago; the one it"
                " replaced is no longer accepted",
                self._path,
                now - modified,
            )

    def _refuse(self, problem: str) -> bool:
        """No token now: read the file again at the next look, keep the token read last and the
        grace (they apply again once the file is readable), and log ``problem`` unless it was the
        last one logged. Returns False."""
        self._stamp = None
        if problem != self._problem:
            log.error("push channel: refusing every proxy until the token file is fixed: %s", problem)
            self._problem = problem
        return False


@dataclass(frozen=True, slots=True)
class Ack:
    """What a proxy did with a table: applied it (accepted) or kept its last good one (error)."""

    version: str
    accepted: bool
    error: str


class _Stream:
    """One open table stream: its proxy, the digest of the token it was opened with, and the
    signal that something is waiting to be sent."""

    __slots__ = ("closed", "digest", "opened", "proxy", "wake")

    def __init__(self, proxy: str, digest: bytes) -> None:
        self.proxy = proxy
        self.digest = digest
        self.wake = asyncio.Event()
        self.closed = False
        self.opened = time.monotonic()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class Publisher:
    """Serves the table streams and collects acks; one per controller process."""

    def __init__(
        self,
        token: str | TokenFile,
        *,
        certificates: ServerCertificates | None = None,
        guards: ConnectionGuards | None = None,
        heartbeat: float = HEARTBEAT_INTERVAL,
        registry: CollectorRegistry | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """``token``: the one token (tests, tools), or the file it is read from whenever it
        changed (the controller). ``certificates``: serve TLS with them (None: plain HTTP).
        ``guards``: each ``start`` serves the port through a guard made with ``max_connections``
        and ``request_timeout`` (``mailgress controller`` always passes them); None serves it
        unguarded, as aiohttp does (any number of connections, silent ones kept for an hour):
        only for tests and tools on a port nobody else reaches.
        ``registry`` holds the metrics served on /metrics (a fresh one when None)."""
        # What a request is accepted with, and what an open stream may go on with.
        self._token_digests: Callable[[], tuple[bytes, ...]]
        self._stream_digests: Callable[[], tuple[bytes, ...]]
        if isinstance(token, TokenFile):
            self._token_digests, self._stream_digests = token.digests, token.stream_digests
        elif token:
            fixed = (_digest(token),)
            self._token_digests = self._stream_digests = lambda: fixed
        else:
            raise ValueError("the push channel token must not be empty")
        self._certificates = certificates
        self._guards = guards
        self._guard: ConnectionGuard | None = None  # the one of the running server, if any
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._heartbeat = heartbeat
        self._version: str | None = None
        self._line = b""
        self._streams: dict[str, _Stream] = {}
        self._acks: dict[str, Ack] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._registry = CollectorRegistry() if registry is None else registry
        self.metrics = controller_metrics.create(self._registry)
        self._published_at: dict[str, float] = {}  # version -> monotonic time of its publish

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``start`` was given port 0)."""
        return self._port

    async def start(self, address: str, port: int) -> None:
        """Listen on ``address:port`` until ``stop``."""
        if self._runner is not None:
            raise RuntimeError("the publisher is already started")
        guard = None
        if self._guards is not None:
            guard = self._guards("push channel", self._max_connections, self._request_timeout)
        app = web.Application(client_max_size=MAX_ACK_BODY)
        app.router.add_get(STREAM_PATH, self._serve_stream, allow_head=False)
        app.router.add_post(ACK_PATH, self._receive_ack)
        app.router.add_get(METRICS_PATH, self._serve_metrics)
        # Handler cancellation: a proxy that hangs up ends its stream handler at once, so its
        # ack is dropped and on_change fires without waiting for the next write to fail.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        tls = None if self._certificates is None else _tls_context(self._certificates)
        site = (
            web.TCPSite(runner, address, port, ssl_context=tls)
            if guard is None
            else guard.site(runner, address, port, tls)
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner, self._guard = runner, guard
        log.info(
            "push channel listening on %s:%d (%s, %s)",
            address,
            self._port,
            "TLS" if tls else "plain HTTP",
            "unguarded" if guard is None else f"at most {self._max_connections} connections",
        )

    async def stop(self) -> None:
        """End every stream (proxies keep their table and reconnect) and stop listening."""
        for stream in list(self._streams.values()):
            stream.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def publish(self, new: table.RoutingTable) -> None:
        """Push ``new`` to every connected proxy now, and to every proxy that connects later.

        Args:
            new: the compiled table; its canonical JSON goes out unchanged.
        Returns:
            None. Publishing the version already out does nothing.
        """
        if new.version == self._version:
            return
        self._line = table.to_json(new) + b"\n"
        if self._version is not None:
            self.metrics.table_info.remove(self._version)
        self._version = new.version
        self.metrics.table_info.labels(version=new.version).set(1)
        self.metrics.table_routes.set(len(new.routes))
        # Re-inserted at the end when republished after another version: insertion order is age.
        self._published_at.pop(new.version, None)
        self._published_at[new.version] = time.monotonic()
        while len(self._published_at) > MAX_TIMED_VERSIONS:
            del self._published_at[next(iter(self._published_at))]
        log.info("publishing routing table %s to %d proxies", new.version, len(self._streams))
        for stream in self._streams.values():
            stream.wake.set()

    def acks(self) -> Mapping[str, Ack]:
        """Proxy name -> its latest ack, for every proxy with an open stream that has acked."""
        return dict(self._acks)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a proxy connects, acks something new, or goes away."""
        self._callbacks.append(callback)

    def _changed(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                # A broken listener must not tear down a proxy's stream or lose its ack.
                log.exception("push channel change callback failed")

    def _authorized(
        self, request: web.Request, accepted: Callable[[], tuple[bytes, ...]] | None = None
    ) -> bytes | None:
        """The digest of the request's token if it is one of ``accepted`` (by default the tokens
        a new request is accepted with), else None."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        digest = _digest(presented.strip())
        # The scheme is public; only the token comparison has to be constant-time. Every accepted
        # digest is compared (a list, not a short-circuiting any): the time taken does not tell
        # whether the current token or the replaced one matched. None accepted: none matches.
        matches = [hmac.compare_digest(digest, expected) for expected in (accepted or self._token_digests)()]
        return digest if any(matches) and scheme.lower() == "bearer" else None

    async def _serve_stream(self, request: web.Request) -> web.StreamResponse:
        digest = self._authorized(request)
        if digest is None:
            return _unauthorized()
        if self._guard is not None:
            # A proxy's stream lasts as long as the proxy: no deadline, never evicted. Until its
            # token was accepted it had the deadline of any request.
            self._guard.lasting(request)
        proxy = request.query.get("proxy", "")
        if not push.valid_proxy_name(proxy):
            return web.Response(status=400)
        if self._version is None:
            return web.Response(status=503)
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        stream = _Stream(proxy, digest)
        previous = self._streams.get(proxy)
        if previous is not None:
            previous.close()
        self._acks.pop(proxy, None)
        self._streams[proxy] = stream
        self.metrics.proxies_connected.set(len(self._streams))
        log.info("proxy %s connected", proxy)
        self._changed()
        try:
            await self._feed(stream, response)
        except ConnectionError:
            pass  # the proxy went away mid-write; the finally block forgets it
        except TimeoutError:
            # Half a line may be out: the connection cannot carry another. abort, not close:
            # close would wait to send what a proxy that stopped reading never takes.
            stalled = self._heartbeat * STALLED_WRITE_HEARTBEATS
            log.warning("proxy %s took no line for %gs: stream ended", proxy, stalled)
            if request.transport is not None:
                request.transport.abort()
        finally:
            if self._streams.get(proxy) is stream:
                del self._streams[proxy]
                self._acks.pop(proxy, None)
                self.metrics.proxies_connected.set(len(self._streams))
                log.info("proxy %s disconnected", proxy)
                self._changed()
        return response

    async def _feed(self, stream: _Stream, response: web.StreamResponse) -> None:
        sent: str | None = None
        while not stream.closed:
            # Clear before looking: a publish during the write below sets it again.
            stream.wake.clear()
            if sent != self._version:
                sent, line = self._version, self._line
            else:
                try:
                    async with asyncio.timeout(self._heartbeat):
                        await stream.wake.wait()
                    continue
                except TimeoutError:
                    line = b"\n"
            # A stream lives only while its token does: a rotated-out token must not keep
            # receiving tables (auth_http headers included) past its grace.
            if stream.digest not in self._stream_digests():
                log.info("proxy %s: the token its stream was opened with is no longer accepted", stream.proxy)
                return
            # A proxy that stopped reading fills its socket's buffers, and the write would wait
            # for ever, holding the stream, its connection and the proxy's place in acks(). Until
            # they are full no write waits, whether the proxy reads or not (module docstring).
            async with asyncio.timeout(self._heartbeat * STALLED_WRITE_HEARTBEATS):
                await response.write(line)

    async def _receive_ack(self, request: web.Request) -> web.Response:
        # An ack carries its stream's token and is accepted as the stream is: a moment's
        # unreadable token file (the kubelet's swap) must not refuse it and so end the stream.
        if self._authorized(request, self._stream_digests) is None:
            return _unauthorized()
        try:
            document: Any = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return web.Response(status=400)
        ack = _parse_ack(document)
        if ack is None:
            return web.Response(status=400)
        proxy, received = ack
        stream = self._streams.get(proxy)
        if stream is None:
            log.debug("ack from proxy %s without an open stream dropped", proxy)
            return web.Response(status=204)
        self.metrics.acks.labels(accepted=str(received.accepted).lower()).inc()
        if self._acks.get(proxy) != received:
            self._acks[proxy] = received
            self._observe_push_lag(stream, received.version)
            if received.accepted:
                log.info("proxy %s applied routing table %s", proxy, received.version)
            else:
                log.warning("proxy %s rejected routing table %s: %s", proxy, received.version, received.error)
            self._changed()
        return web.Response(status=204)

    def _observe_push_lag(self, stream: _Stream, version: str) -> None:
        published = self._published_at.get(version)
        if published is not None:  # else a version from before a restart, or long superseded
            self.metrics.push_lag_seconds.observe(time.monotonic() - max(published, stream.opened))

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        # Set as a header: aiohttp's content_type argument refuses the charset parameter in it.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def _tls_context(certificates: ServerCertificates) -> ssl.SSLContext:
    """The listener's context: it holds no certificate itself, but hands every handshake over to
    the context of ``certificates`` as they are at that moment."""
    listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The version is chosen before the callback switches contexts: the floor must be set here.
    listening.minimum_version = MINIMUM_TLS_VERSION

    def current(connection: ssl.SSLObject, _server_name: str | None, _: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, with or without a server name. A few stat
        # calls per connection are nothing next to a handshake, and the controller sees few
        # connections (a stream per proxy, their acks, a scrape): no poll task needed.
        certificates.refresh()
        connection.context = certificates.context

    listening.sni_callback = current
    return listening


def _unauthorized() -> web.Response:
    # RFC 6750 section 3: a 401 names the scheme; the body says nothing.
    return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})


def _parse_ack(document: Any) -> tuple[str, Ack] | None:
    """(proxy, Ack) from an ack body, or None when it is not one."""
    if not isinstance(document, dict):
        return None
    proxy, version = document.get("proxy"), document.get("version")
    accepted, error = document.get("accepted"), document.get("error", "")
    if not isinstance(proxy, str) or not push.valid_proxy_name(proxy):
        return None
    if not isinstance(version, str) or not isinstance(accepted, bool) or not isinstance(error, str):
        return None
    return proxy, Ack(version=version[:MAX_VERSION_LENGTH], accepted=accepted, error=error[:MAX_ERROR_LENGTH])
