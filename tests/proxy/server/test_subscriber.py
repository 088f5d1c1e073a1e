"""The proxy's end of the push channel, against the real controller Publisher over loopback.

Each test runs real Subscribers (fast backoff) against a real ``controller.publisher.Publisher``
on 127.0.0.1 and watches what a proxy would serve (``TableHolder.current``) and what the
controller learns (``Publisher.acks``). A small fake controller covers lines the real one never
sends (not JSON, nested too deep, numbers no table holds). The snapshot file is written as the
mounted Secret holds it: plain JSON, or gzip in the sibling the controller uses for tables too
large to store plainly; corrupted gzip is fuzzed with hypothesis.
Over TLS the controller serves a certificate of a test CA (loaded by the proxy's own
CertificateStore, as mailgress/cli.py has it); the proxy verifies it against its caFile and the
url's host name, and a wrong CA, a wrong name or an unloadable CA file is logged and retried.
Waits poll a condition a bounded number of times; no assertion is about time. Also covers the
settings' ``controller`` key, which only this uses.
"""

import asyncio
import gzip
import logging
import random
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from aiohttp import web
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from controller import publisher
from proxy import metrics as proxy_metrics
from proxy import settings, table
from proxy.server import subscriber
from proxy.server.certificates import CertificateStore
from proxy.server.routes import TableHolder
from testbed.tlscerts import IssuedCertificate, TestAuthority

TOKEN = "push-token-that-must-never-be-logged"
FAST = subscriber.Backoff(base=0.005, cap=0.05)
POLL = 0.01
POLLS = 1000  # POLL * POLLS = 10 s: the most any single wait may take before the test fails


def sample_table(port: int) -> table.RoutingTable:
    upstream = table.Upstream(service="mail/dovecot", endpoints=(table.Endpoint("127.0.0.1", port),))
    route = table.Route(
        name="mail/example", generation=1, users=(), domains=("example.com",), upstreams=(("imap", upstream),)
    )
    return table.make_table([route])


FIRST = sample_table(10143)
SECOND = sample_table(20143)
THIRD = sample_table(30143)
AUTH_TABLE = table.make_table(
    [
        table.Route(
            name="mail/example",
            generation=1,
            users=(),
            domains=("example.com",),
            upstreams=FIRST.routes[0].upstreams,
            auth="http",
            http_auth=table.HttpAuth(url="http://127.0.0.1:9000/auth"),
        )
    ]
)


def with_raw(document: bytes, old: bytes, new: bytes) -> bytes:
    """``document`` with one piece of its text replaced: numbers json.dumps would not write."""
    assert document.count(old) == 1
    return document.replace(old, new)


# Numbers that once stopped the table source: a ValueError from the JSON parser (Python converts
# at most 4300 digits), an OverflowError from float(); and NaN, which uvloop's timers refuse.
HUGE_GENERATION = with_raw(table.to_json(FIRST), b'"generation":1,', b'"generation":1' + b"0" * 5000 + b",")
TIMEOUT_BEYOND_FLOAT = with_raw(
    table.to_json(AUTH_TABLE), b'"timeoutSeconds":5.0', b'"timeoutSeconds":1' + b"0" * 400
)
NAN_TIMEOUT = with_raw(table.to_json(AUTH_TABLE), b'"timeoutSeconds":5.0', b'"timeoutSeconds":NaN')


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"never happened: {what}")


def accepted(version: str) -> publisher.Ack:
    return publisher.Ack(version=version, accepted=True, error="")


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Proxy:
    """One subscribed proxy: its holder and the task running its subscriber."""

    name: str
    holder: TableHolder
    task: "asyncio.Task[None]"


class Cluster:
    """Token and snapshot files, and the proxies started against one controller port."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.token_file = directory / "token"
        self.token_file.write_text(TOKEN + "\n")  # as a Secret volume may hold it
        self.snapshot_file = directory / "snapshot.json"
        # Where the compressed form is mounted: the Secret's second key, beside the first.
        self.compressed_file = directory / ("snapshot.json" + subscriber.SNAPSHOT_GZIP_SUFFIX)
        self.proxies: list[Proxy] = []

    def settings(
        self, name: str, *, snapshot: bool = True, ca_file: Path | None = None, host: str = "127.0.0.1"
    ) -> settings.ControllerSettings:
        """The proxy's settings: https with ``ca_file`` (or to ``host``) when either is given."""
        tls = ca_file is not None or host != "127.0.0.1"
        return settings.ControllerSettings(
            url=f"{'https' if tls else 'http'}://{host}:{self.port}",
            token_file=self.token_file,
            proxy_name=name,
            snapshot_file=self.snapshot_file if snapshot else None,
            ca_file=ca_file,
        )

    def start_proxy(
        self, name: str, *, snapshot: bool = True, ca_file: Path | None = None, host: str = "127.0.0.1"
    ) -> Proxy:
        holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
        chosen = self.settings(name, snapshot=snapshot, ca_file=ca_file, host=host)
        follower = subscriber.Subscriber(chosen, backoff=FAST)
        proxy = Proxy(name, holder, asyncio.create_task(follower.run(holder)))
        self.proxies.append(proxy)
        return proxy

    async def stop_proxy(self, proxy: Proxy) -> None:
        proxy.task.cancel()
        await asyncio.gather(proxy.task, return_exceptions=True)

    async def controller(self, served: IssuedCertificate | None = None) -> publisher.Publisher:
        """A controller on the cluster's port; over TLS with ``served`` (reloaded as it changes)."""
        files = () if served is None else (settings.CertificateFiles(served.cert, served.key),)
        store = CertificateStore("push", files) if files else None
        started = publisher.Publisher(TOKEN, certificates=store)
        await started.start("127.0.0.1", self.port)
        return started


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    made = Cluster(tmp_path, unused_port())
    yield made
    for proxy in made.proxies:
        await made.stop_proxy(proxy)


@pytest.fixture
async def controller(cluster: Cluster) -> AsyncIterator[publisher.Publisher]:
    started = await cluster.controller()
    yield started
    await started.stop()


def serving(proxy: Proxy, version: str) -> Callable[[], bool]:
    return lambda: proxy.holder.ready and proxy.holder.current.version == version


async def test_initial_table_then_each_update_is_applied_and_acked(
    cluster: Cluster, controller: publisher.Publisher
) -> None:
    controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    assert serving(proxy, FIRST.version)()
    controller.publish(SECOND)
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(SECOND.version), "second ack")
    assert serving(proxy, SECOND.version)()


async def test_a_tampered_table_is_rejected_reported_and_the_last_good_one_kept(
    cluster: Cluster, controller: publisher.Publisher
) -> None:
    controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    # SECOND's routes under a version that does not match them: what an altered document looks like.
    tampered = table.RoutingTable(routes=SECOND.routes, version="sha256:" + "0" * 64)
    controller.publish(tampered)
    await eventually(lambda: controller.acks()["proxy-a"].version == tampered.version, "the rejection")
    ack = controller.acks()["proxy-a"]
    assert not ack.accepted
    assert "does not match its content" in ack.error
    assert serving(proxy, FIRST.version)()
    controller.publish(THIRD)  # the channel still works after a rejection
    await eventually(lambda: controller.acks()["proxy-a"] == accepted(THIRD.version), "third ack")
    assert serving(proxy, THIRD.version)()


async def test_without_the_right_token_the_proxy_gets_nothing_and_says_why(
    cluster: Cluster, controller: publisher.Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cluster.token_file.write_text("not-the-token")
    controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a", snapshot=False)
    await eventually(lambda: "answered 401" in caplog.text, "the 401 logged")
    assert not proxy.holder.ready
    assert controller.acks() == {}
    cluster.token_file.write_text(TOKEN)  # the Secret is fixed: the next attempt reads it again
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    assert TOKEN not in caplog.text


async def test_the_proxy_keeps_serving_through_a_controller_restart(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    first_controller = await cluster.controller()
    first_controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: first_controller.acks().get("proxy-a") == accepted(FIRST.version), "ack")
    await first_controller.stop()
    await eventually(lambda: "ended the table stream" in caplog.text, "the outage noticed")
    assert serving(proxy, FIRST.version)()
    second_controller = await cluster.controller()
    try:
        # The restarted controller learns what the proxy serves: it acks the same table again.
        second_controller.publish(FIRST)
        await eventually(lambda: second_controller.acks().get("proxy-a") == accepted(FIRST.version), "re-ack")
        second_controller.publish(SECOND)
        await eventually(lambda: second_controller.acks().get("proxy-a") == accepted(SECOND.version), "ack")
        assert serving(proxy, SECOND.version)()
    finally:
        await second_controller.stop()


def compressed(document: bytes) -> bytes:
    """As the controller stores a table too large to store plainly."""
    return gzip.compress(document, mtime=0)


@pytest.mark.parametrize("form", ["plain", "compressed", "compressed-under-the-plain-name"])
async def test_a_proxy_that_starts_while_the_controller_is_away_serves_the_snapshot(
    cluster: Cluster, form: str
) -> None:
    """Plain JSON, or gzip in the compressed key's file; gzip is told by its content, so a
    snapshotFile that names the compressed file directly works too."""
    if form == "plain":
        cluster.snapshot_file.write_bytes(table.to_json(FIRST))
    elif form == "compressed":
        cluster.compressed_file.write_bytes(compressed(table.to_json(FIRST)))
    else:
        cluster.snapshot_file.write_bytes(compressed(table.to_json(FIRST)))
    proxy = cluster.start_proxy("proxy-a")
    await eventually(serving(proxy, FIRST.version), "the snapshot served")
    controller = await cluster.controller()
    try:
        controller.publish(SECOND)
        await eventually(lambda: controller.acks().get("proxy-a") == accepted(SECOND.version), "ack")
        assert serving(proxy, SECOND.version)()
    finally:
        await controller.stop()


async def test_before_the_first_publish_the_proxy_serves_the_snapshot(
    cluster: Cluster, controller: publisher.Publisher
) -> None:
    cluster.snapshot_file.write_bytes(table.to_json(FIRST))
    proxy = cluster.start_proxy("proxy-a")  # the controller answers 503: no table yet
    await eventually(serving(proxy, FIRST.version), "the snapshot served")
    controller.publish(SECOND)
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(SECOND.version), "ack")
    assert serving(proxy, SECOND.version)()


GOOD_GZIP = compressed(table.to_json(FIRST))


def count_snapshot_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path the subscriber reads a snapshot from, from now on."""
    reads: list[Path] = []
    real = subscriber.read_snapshot

    def counting(path: Path) -> tuple[Path, table.RoutingTable]:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(subscriber, "read_snapshot", counting)
    return reads


@pytest.mark.parametrize(
    ("plain", "gzipped", "message"),
    [
        (None, None, "neither it nor snapshot.json.gz exists"),
        (b"{}", None, "is not a valid table"),
        (b"\x00not json", None, "is not a valid table"),
        (None, compressed(b"{}"), "is not a valid table"),
        (None, GOOD_GZIP[: len(GOOD_GZIP) // 2], "is not valid gzip: Compressed file ended"),
        (None, GOOD_GZIP[:-8] + bytes(4) + GOOD_GZIP[-4:], "is not valid gzip: CRC check failed"),
        (None, GOOD_GZIP[:20] + bytes([GOOD_GZIP[20] ^ 0xFF]) + GOOD_GZIP[21:], "is not valid gzip"),
        (None, GOOD_GZIP + b"trailing", "is not valid gzip: Not a gzipped file"),
        (HUGE_GENERATION, None, "is not a valid table (JSON, or gzip-compressed JSON): not JSON: Exceeds"),
        (None, compressed(TIMEOUT_BEYOND_FLOAT), "'timeoutSeconds' is too large"),
        (NAN_TIMEOUT, None, "not JSON: NaN is not a JSON value"),
    ],
    ids=[
        "missing",
        "invalid",
        "neither-json-nor-gzip",
        "compressed-invalid",
        "compressed-truncated",
        "compressed-crc",
        "compressed-corrupt",
        "compressed-trailing-garbage",
        "5000-digit-integer",
        "compressed-timeout-beyond-float",
        "nan-timeout",
    ],
)
async def test_an_unusable_snapshot_is_reported_and_the_proxy_stays_not_ready(
    cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    plain: bytes | None,
    gzipped: bytes | None,
    message: str,
) -> None:
    if plain is not None:
        cluster.snapshot_file.write_bytes(plain)
    if gzipped is not None:
        cluster.compressed_file.write_bytes(gzipped)
    reads = count_snapshot_reads(monkeypatch)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: len(reads) >= 3, "three attempts")
    assert not proxy.task.done(), "the table source goes on"
    assert not proxy.holder.ready
    assert caplog.text.count(message) == 1, "logged once per distinct problem, not per attempt"


def test_a_compressed_snapshot_is_bounded_like_a_streamed_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip bomb stops at MAX_TABLE_BYTES, as a table line on the stream does."""
    document = table.to_json(FIRST)
    monkeypatch.setattr(subscriber, "MAX_TABLE_BYTES", len(document) - 1)
    (tmp_path / "table.json.gz").write_bytes(compressed(document))
    with pytest.raises(subscriber.SnapshotError, match=f"decompresses to more than {len(document) - 1}"):
        subscriber.read_snapshot(tmp_path / "table.json")
    monkeypatch.setattr(subscriber, "MAX_TABLE_BYTES", len(document))
    assert subscriber.read_snapshot(tmp_path / "table.json") == (tmp_path / "table.json.gz", FIRST)


@hypothesis.settings(derandomize=True, database=None, deadline=None, max_examples=200)
@hypothesis.given(
    st.lists(st.tuples(st.integers(0, len(GOOD_GZIP) - 1), st.integers(0, 255)), max_size=4),
    st.integers(0, len(GOOD_GZIP)),
)
def test_a_corrupted_compressed_snapshot_is_a_snapshot_error(
    changes: list[tuple[int, int]], length: int
) -> None:
    """Bytes overwritten, then cut short: the table itself, or a SnapshotError, nothing else."""
    data = bytearray(GOOD_GZIP)
    for position, value in changes:
        data[position] = value
    with tempfile.TemporaryDirectory() as directory:  # hypothesis runs many examples per test
        path = Path(directory) / "table.json.gz"
        path.write_bytes(data[:length])
        try:
            found = subscriber.read_snapshot(path)
        except subscriber.SnapshotError as error:
            assert str(error)
        else:  # only what gzip does not check changed (the header's time, flags for the OS)
            assert found == (path, FIRST)


def test_the_plain_file_wins_over_the_compressed_one(tmp_path: Path) -> None:
    """The controller never leaves both; should both be there, the configured file is read."""
    (tmp_path / "table.json").write_bytes(table.to_json(FIRST))
    (tmp_path / "table.json.gz").write_bytes(compressed(table.to_json(SECOND)))
    assert subscriber.read_snapshot(tmp_path / "table.json") == (tmp_path / "table.json", FIRST)


async def test_a_corrupt_snapshot_never_replaces_the_table_in_use(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not ready on a corrupt snapshot; ready with the controller's table; and through the
    controller's next outage that table stays, whatever the snapshot holds."""
    cluster.compressed_file.write_bytes(GOOD_GZIP[: len(GOOD_GZIP) // 2])
    reads = count_snapshot_reads(monkeypatch)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: "is not valid gzip" in caplog.text, "the snapshot problem logged")
    assert not proxy.holder.ready
    controller = await cluster.controller()
    try:
        controller.publish(SECOND)
        await eventually(lambda: controller.acks().get("proxy-a") == accepted(SECOND.version), "ack")
    finally:
        await controller.stop()
    cluster.compressed_file.unlink()
    cluster.snapshot_file.write_bytes(table.to_json(FIRST))  # readable, and older
    read_before_the_outage = len(reads)
    # The controller's port answers 503 to every stream request now: each one is an attempt.
    attempts: list[web.Request] = []

    async def refuse(request: web.Request) -> web.Response:
        attempts.append(request)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get(subscriber.STREAM_PATH, refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", cluster.port).start()
        await eventually(lambda: len(attempts) >= 3, "three attempts during the outage")
    finally:
        await runner.cleanup()
    assert serving(proxy, SECOND.version)()
    assert len(reads) == read_before_the_outage, "no snapshot is read while a table is in use"


async def test_several_proxies_follow_one_controller(
    cluster: Cluster, controller: publisher.Publisher
) -> None:
    names = [f"proxy-{number}" for number in range(3)]
    controller.publish(FIRST)
    proxies = [cluster.start_proxy(name) for name in names]
    await eventually(lambda: controller.acks() == {n: accepted(FIRST.version) for n in names}, "all acks")
    controller.publish(SECOND)
    await eventually(lambda: controller.acks() == {n: accepted(SECOND.version) for n in names}, "all acks")
    assert all(serving(proxy, SECOND.version)() for proxy in proxies)
    await cluster.stop_proxy(proxies[0])  # one pod goes away: the controller forgets its ack
    await eventually(lambda: set(controller.acks()) == set(names[1:]), "the departed proxy dropped")


# A fake controller for lines the real one never sends.


FakeController = Callable[[bytes], Awaitable[list[dict[str, Any]]]]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServeFake = Callable[[Handler, Handler], Awaitable[None]]


@pytest.fixture
async def serve_fake(cluster: Cluster) -> AsyncIterator[ServeFake]:
    """Serves the given stream and ack handlers on the cluster's controller port."""
    runners: list[web.AppRunner] = []

    async def serve(stream: Handler, ack: Handler) -> None:
        app = web.Application()
        app.router.add_get(subscriber.STREAM_PATH, stream)
        app.router.add_post(subscriber.ACK_PATH, ack)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", cluster.port).start()

    yield serve
    # The proxies hang up first: a stream held open would keep the runner's cleanup waiting.
    for proxy in cluster.proxies:
        await cluster.stop_proxy(proxy)
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def fake_controller(serve_fake: ServeFake) -> FakeController:
    """Starts a controller that streams FIRST then the given line; returns the acks it records."""

    async def start(broken: bytes) -> list[dict[str, Any]]:
        acks: list[dict[str, Any]] = []

        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(table.to_json(FIRST) + b"\n" + broken + b"\n")
            await asyncio.Event().wait()  # held open until the proxy hangs up
            return response

        async def ack(request: web.Request) -> web.Response:
            acks.append(await request.json())
            return web.Response(status=204)

        await serve_fake(stream, ack)
        return acks

    return start


@pytest.mark.parametrize(
    ("line", "version", "error"),
    [
        (b"not json", "", "not JSON"),
        (b"[" * 100_000, "", "nested too deeply"),
        (b'{"version": 5}', "", "apiVersion must be"),
        (b'{"apiVersion": "mailgress.io/table/v1", "version": "sha256:forged"}', "sha256:forged", "missing"),
        (HUGE_GENERATION, "", "not JSON: Exceeds the limit (4300 digits)"),
        (TIMEOUT_BEYOND_FLOAT, AUTH_TABLE.version, "'timeoutSeconds' is too large"),
        (NAN_TIMEOUT, AUTH_TABLE.version, "NaN is not a JSON value"),
        (b'{"apiVersion": "mailgress.io/table/v1", "routes": [], "version": "\\ud800"}', "\ud800", "match"),
    ],
    ids=[
        "not-json",
        "nested-too-deep",
        "version-not-a-string",
        "missing-routes",
        "5000-digit-integer",
        "timeout-beyond-float",
        "nan-timeout",
        "version-a-lone-surrogate",
    ],
)
async def test_a_broken_line_is_acked_as_rejected(
    cluster: Cluster, fake_controller: FakeController, line: bytes, version: str, error: str
) -> None:
    acks = await fake_controller(line)
    proxy = cluster.start_proxy("proxy-a")
    await eventually(lambda: len(acks) == 2, "two acks")
    good, bad = acks
    assert good == {"proxy": "proxy-a", "version": FIRST.version, "accepted": True, "error": ""}
    assert (bad["version"], bad["accepted"]) == (version, False)
    assert error in bad["error"]
    assert not proxy.task.done(), "the table source goes on"
    assert len(bad["error"]) <= subscriber.MAX_ACK_TEXT
    assert serving(proxy, FIRST.version)()


# The token: the file as it is at each stream's start, on that stream's acks too.

NEW_TOKEN = "new-push-token-that-must-never-be-logged"


async def test_each_ack_carries_the_token_its_stream_was_opened_with(
    cluster: Cluster, serve_fake: ServeFake
) -> None:
    """The proxy's copy of the Secret rotates while its stream is open: the stream's acks keep
    the token it was opened with (the controller knows the stream by it, and its own copy may not
    have rotated yet); the next stream, and its acks, carry the new one."""
    # What each request presented, by name: a failing check must not print a token.
    names = {f"Bearer {TOKEN}": "old", f"Bearer {NEW_TOKEN}": "new"}
    requests: list[tuple[str, str]] = []
    second, end = asyncio.Event(), asyncio.Event()

    def record(request: web.Request) -> None:
        requests.append((request.path, names.get(request.headers.get("Authorization", ""), "other")))

    async def stream(request: web.Request) -> web.StreamResponse:
        record(request)
        first_stream = len(requests) == 1
        response = web.StreamResponse()
        await response.prepare(request)
        if first_stream:
            await response.write(table.to_json(FIRST) + b"\n")
            await second.wait()
        await response.write(table.to_json(SECOND) + b"\n")
        # The first stream ends when the test says (as the controller ends one whose token's
        # grace is over); the next is held open until the proxy hangs up.
        await (end.wait() if first_stream else asyncio.Event().wait())
        return response

    async def ack(request: web.Request) -> web.Response:
        record(request)
        return web.Response(status=204)

    await serve_fake(stream, ack)
    proxy = cluster.start_proxy("proxy-a", snapshot=False)
    await eventually(lambda: len(requests) == 2, "the stream and the first ack")
    cluster.token_file.write_text(NEW_TOKEN + "\n")
    second.set()
    await eventually(lambda: len(requests) == 3, "the second ack")
    assert serving(proxy, SECOND.version)()
    end.set()
    await eventually(lambda: len(requests) == 5, "the next stream and its ack")
    stream_path, ack_path = subscriber.STREAM_PATH, subscriber.ACK_PATH
    assert requests == [
        (stream_path, "old"),
        (ack_path, "old"),
        (ack_path, "old"),
        (stream_path, "new"),
        (ack_path, "new"),
    ]


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda path: path.write_text("\n"), "is empty"),
        (lambda path: path.write_bytes(b"\xfftoken\n"), "is not UTF-8 text"),
        (lambda path: path.write_bytes(b"first-line\nsecond-line\n"), "holds a control character"),
        (lambda path: path.write_bytes(b"tok\x00en\n"), "holds a control character"),
        (Path.unlink, "No such file or directory"),
    ],
    ids=["empty", "not-utf-8", "two-lines", "nul", "missing"],
)
async def test_a_token_file_without_a_token_is_reported_and_retried(
    cluster: Cluster,
    controller: publisher.Publisher,
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[Path], None],
    problem: str,
) -> None:
    """No request goes out without a token; the proxy keeps its table source running, logs the
    problem once, and follows once the file holds a token."""
    caplog.set_level(logging.WARNING, logger="proxy.server.subscriber")
    spoil(cluster.token_file)
    controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a", snapshot=False)
    await eventually(lambda: problem in caplog.text, "the problem logged")
    assert str(cluster.token_file) in caplog.text
    assert not proxy.task.done()
    assert controller.acks() == {}
    cluster.token_file.write_text(TOKEN)
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    assert sum(problem in record.getMessage() for record in caplog.records) == 1
    leaked = TOKEN in caplog.text  # not asserted as such: a failure would print the token
    assert not leaked


async def test_a_token_file_with_a_byte_order_mark_is_read_alike_by_the_controller_and_the_proxy(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An editor on Windows saved the Secret's file: both ends take the token without the mark."""
    cluster.token_file.write_text(f"\ufeff{TOKEN}\r\n", encoding="utf-8")
    channel = publisher.Publisher(publisher.TokenFile(cluster.token_file))
    await channel.start("127.0.0.1", cluster.port)
    try:
        channel.publish(FIRST)
        cluster.start_proxy("proxy-a", snapshot=False)
        await eventually(lambda: channel.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    finally:
        await channel.stop()
    leaked = TOKEN in caplog.text  # not asserted as such: a failure would print the token
    assert not leaked


# TLS.


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("push-ca"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("stranger-ca"), name="not the push CA")


@pytest.fixture
async def tls_controller(
    cluster: Cluster, authority: TestAuthority, tmp_path: Path
) -> AsyncIterator[publisher.Publisher]:
    """The controller's certificate names 127.0.0.1 only (the url's host here), not localhost."""
    served = authority.issue("push", ["127.0.0.1"], tmp_path / "tls.crt", tmp_path / "tls.key")
    started = await cluster.controller(served)
    yield started
    await started.stop()


def mounted_ca(directory: Path, source: TestAuthority) -> Path:
    """The CA file as the proxy mounts it (ca.crt of the push TLS Secret)."""
    path = directory / "ca.crt"
    path.write_bytes(source.cert.read_bytes())
    return path


async def test_over_tls_the_proxy_verifies_the_controller_with_its_ca_and_follows(
    cluster: Cluster,
    tls_controller: publisher.Publisher,
    authority: TestAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls_controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a", ca_file=mounted_ca(tmp_path, authority))
    await eventually(lambda: tls_controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    tls_controller.publish(SECOND)
    await eventually(lambda: tls_controller.acks().get("proxy-a") == accepted(SECOND.version), "second ack")
    assert serving(proxy, SECOND.version)()
    assert "plain HTTP" not in caplog.text


@pytest.mark.parametrize("wrong", ["ca", "host"])
async def test_a_wrong_ca_or_host_name_is_logged_once_retried_and_fixed_by_the_next_connect(
    cluster: Cluster,
    tls_controller: publisher.Publisher,
    authority: TestAuthority,
    stranger: TestAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No table from a controller the proxy cannot verify; the table source keeps running, says
    why once, and the CA file is read again at every connect (a rotated CA Secret)."""
    caplog.set_level(logging.WARNING, logger="proxy.server.subscriber")
    contexts: list[Path | None] = []  # one per connect: the CA file is loaded for each
    load = subscriber.certificates.client_context

    def counted(ca_file: Path | None, setting: str) -> ssl.SSLContext:
        contexts.append(ca_file)
        return load(ca_file, setting)

    monkeypatch.setattr(subscriber.certificates, "client_context", counted)
    tls_controller.publish(FIRST)
    ca_file = mounted_ca(tmp_path, stranger if wrong == "ca" else authority)
    # localhost reaches the controller on 127.0.0.1, whose certificate does not carry that name.
    host = "127.0.0.1" if wrong == "ca" else "localhost"
    problem = "unable to get local issuer certificate" if wrong == "ca" else "Hostname mismatch"
    proxy = cluster.start_proxy("proxy-a", snapshot=False, ca_file=ca_file, host=host)
    await eventually(lambda: len(contexts) >= 5, "several connects")
    verify_failures = [record for record in caplog.records if "did not verify" in record.getMessage()]
    assert len(verify_failures) == 1, "logged once, not at every retry"
    assert problem in verify_failures[0].getMessage()
    assert not proxy.task.done()
    assert not proxy.holder.ready
    assert tls_controller.acks() == {}
    if wrong == "ca":
        mounted_ca(tmp_path, authority)  # the CA Secret is fixed: the next connect reads it
        await eventually(lambda: tls_controller.acks().get("proxy-a") == accepted(FIRST.version), "ack")


async def test_an_unloadable_ca_file_is_logged_and_retried(
    cluster: Cluster,
    tls_controller: publisher.Publisher,
    authority: TestAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.server.subscriber")
    tls_controller.publish(FIRST)
    ca_file = tmp_path / "ca.crt"
    proxy = cluster.start_proxy("proxy-a", snapshot=False, ca_file=ca_file)
    await eventually(lambda: f"controller.caFile {ca_file}: cannot load" in caplog.text, "missing CA logged")
    ca_file.write_text("not a certificate\n")
    await eventually(lambda: caplog.text.count("controller.caFile") >= 2, "broken CA logged")
    assert not proxy.task.done()
    mounted_ca(tmp_path, authority)
    await eventually(lambda: tls_controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")


async def test_without_a_ca_file_https_uses_the_system_cas(
    cluster: Cluster, tls_controller: publisher.Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """The test CA is no system CA: the certificate is refused, which shows the system CAs are
    what an https url without caFile trusts."""
    caplog.set_level(logging.WARNING, logger="proxy.server.subscriber")
    tls_controller.publish(FIRST)
    proxy = cluster.start_proxy("proxy-a", snapshot=False, host="localhost")
    await eventually(lambda: "unable to get local issuer certificate" in caplog.text, "refusal logged")
    assert not proxy.task.done()
    assert tls_controller.acks() == {}


async def test_plain_http_works_and_warns_once_at_start(
    cluster: Cluster, controller: publisher.Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    controller.publish(FIRST)
    cluster.start_proxy("proxy-a")
    await eventually(lambda: controller.acks().get("proxy-a") == accepted(FIRST.version), "first ack")
    warned = [record for record in caplog.records if "plain HTTP" in record.getMessage()]
    assert [record.levelname for record in warned] == ["WARNING"]
    assert f"http://127.0.0.1:{cluster.port}" in warned[0].getMessage()


# Backoff and naming.


def test_backoff_is_full_jitter_under_an_exponential_bound() -> None:
    backoff = subscriber.Backoff(base=0.25, cap=5.0)
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(5.0, 0.25 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(50)]
        assert all(0.0 <= delay <= bound for delay in delays)
        assert max(delays) > bound / 2  # spread over the whole range, not pinned near zero
    assert 0.0 <= backoff.delay(100_000, rng) <= 5.0  # a long outage stays capped


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("POD_NAME", raising=False)
    yield monkeypatch


def test_the_proxy_name_comes_from_settings_then_pod_name_then_host_name(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    assert subscriber.resolve_proxy_name(None) == socket.gethostname()
    clean_environment.setenv("POD_NAME", "mailgress-proxy-7d9f")
    assert subscriber.resolve_proxy_name(None) == "mailgress-proxy-7d9f"
    assert subscriber.resolve_proxy_name("proxy-a") == "proxy-a"


def test_the_host_name_stands_in_for_the_proxy_name_in_lower_case(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setattr(socket, "gethostname", lambda: "Mail-Host.Example")
    assert subscriber.resolve_proxy_name(None) == "mail-host.example"


@pytest.mark.parametrize(
    ("variable", "host", "source"),
    [(None, "mail_host", "the host name 'mail_host'"), ("Proxy_1", "mail-host", "POD_NAME 'Proxy_1'")],
    ids=["host-name", "pod-name"],
)
def test_a_stand_in_that_is_no_pod_name_says_why_it_cannot_serve(
    clean_environment: pytest.MonkeyPatch, variable: str | None, host: str, source: str
) -> None:
    """The controller would answer 400 to every stream: the proxy must not start as if it followed."""
    clean_environment.setattr(socket, "gethostname", lambda: host)
    if variable is not None:
        clean_environment.setenv("POD_NAME", variable)
    with pytest.raises(settings.SettingsError) as raised:
        subscriber.resolve_proxy_name(None)
    assert str(raised.value).startswith(
        f"controller.proxyName is not set, and {source} cannot stand in for it: the controller takes"
        " lower-case letters"
    )
    assert str(raised.value).endswith("; set controller.proxyName")


# The settings' controller key.

LISTENERS = [{"protocol": "imap", "address": "127.0.0.1", "port": 1143}]


def test_the_controller_key_parses(tmp_path: Path) -> None:
    document = {
        "listeners": LISTENERS,
        "controller": {
            "url": "http://mailgress-controller.mail.svc:8080/",
            "tokenFile": "token/token",
            "snapshotFile": "snapshot/table.json",
        },
    }
    parsed = settings.parse(document, tmp_path)
    assert parsed.controller == settings.ControllerSettings(
        url="http://mailgress-controller.mail.svc:8080",
        token_file=(tmp_path / "token/token").resolve(),
        proxy_name=None,
        snapshot_file=(tmp_path / "snapshot/table.json").resolve(),
    )
    assert parsed.route_files == ()


def test_the_controller_ca_file_is_taken_from_the_settings_folder(tmp_path: Path) -> None:
    controller = {
        "url": "https://mailgress-controller.mail.svc:9400",
        "tokenFile": "t",
        "caFile": "ca/ca.crt",
    }
    parsed = settings.parse({"listeners": LISTENERS, "controller": controller}, tmp_path)
    assert parsed.controller is not None
    assert parsed.controller.ca_file == (tmp_path / "ca/ca.crt").resolve()
    del controller["caFile"]
    parsed = settings.parse({"listeners": LISTENERS, "controller": controller}, tmp_path)
    assert parsed.controller is not None
    assert parsed.controller.ca_file is None  # the system CAs


def test_an_upper_case_scheme_is_stored_in_lower_case(tmp_path: Path) -> None:
    """The subscriber tells TLS by the url's scheme: HTTPS:// must not be taken for plain HTTP
    (which would skip caFile and warn of a plaintext channel)."""
    controller = {"url": "HTTPS://mailgress-controller.mail.svc:9400/", "tokenFile": "t", "caFile": "ca.crt"}
    parsed = settings.parse({"listeners": LISTENERS, "controller": controller}, tmp_path)
    assert parsed.controller is not None
    assert parsed.controller.url == "https://mailgress-controller.mail.svc:9400"


@pytest.mark.parametrize(
    ("extra", "controller", "message"),
    [
        ({"routes": ["r.yaml"]}, {"url": "http://c:1", "tokenFile": "t"}, "cannot be combined"),
        ({"services": {}}, {"url": "http://c:1", "tokenFile": "t"}, "cannot be combined"),
        ({}, {"url": "http://c:1"}, "controller: missing 'tokenFile'"),
        ({}, {"tokenFile": "t"}, "controller: missing 'url'"),
        ({}, {"url": "ftp://c:1", "tokenFile": "t"}, "controller.url"),
        ({}, {"url": "http://c:1/?a=b", "tokenFile": "t"}, "controller.url"),
        ({}, {"url": "http://c:1", "tokenFile": "t", "proxyName": ""}, "controller.proxyName"),
        ({}, {"url": "http://c:1", "tokenFile": "t", "snapshotFile": 3}, "controller.snapshotFile"),
        ({}, {"url": "http://c:1", "tokenFile": "t", "token": "x"}, "unknown keys token"),
        ({}, {"url": "https://c:1", "tokenFile": "t", "cafile": "ca.crt"}, "unknown keys cafile"),
        ({}, {"url": "https://c:1", "tokenFile": "t", "caFile": 3}, "controller.caFile: expected a file"),
        ({}, {"url": "https://c:1", "tokenFile": "t", "caFile": ""}, "controller.caFile: expected a file"),
        ({}, {"url": "http://c:1", "tokenFile": "t", "caFile": "ca.crt"}, "caFile: needs an https"),
        ({}, "http://c:1", "controller: expected"),
    ],
)
def test_controller_key_mistakes_name_the_key(
    tmp_path: Path, extra: dict[str, Any], controller: Any, message: str
) -> None:
    document = {"listeners": LISTENERS, "controller": controller, **extra}
    with pytest.raises(settings.SettingsError, match=message):
        settings.parse(document, tmp_path)
