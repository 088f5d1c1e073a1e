"""The controller's end of the push channel, spoken to over loopback HTTP as a proxy would.

A real Publisher listens on 127.0.0.1; a plain aiohttp client opens streams and posts acks, so
every status code, header and body is the one a proxy sees. The token file is a Secret volume
as the kubelet writes and rotates it (``MountedSecret``), and the proxy's own subscriber follows
a rotation end to end. Over TLS the certificate comes from a test CA and is renewed as cert-manager
would. Waits are bounded: a stream read or an on_change wait that takes longer
than ``BOUND`` fails the test; no assertion is about time.
"""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from controller import publisher
from proxy import metrics as proxy_metrics
from proxy import push, table
from proxy.server import subscriber
from proxy.server.certificates import CertificateStore
from proxy.server.connections import Guard
from proxy.server.routes import TableHolder
from proxy.settings import CertificateFiles, ControllerSettings
from testbed.tlscerts import IssuedCertificate, TestAuthority
from testbed.volumes import KubeletVolume

TOKEN = "push-token-that-must-never-be-logged"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUND = 10.0  # seconds any single wait may take before the test fails
MAX_CHANGES = 100  # on_change notifications one wait may see before it gives up


def sample_table(port: int) -> table.RoutingTable:
    upstream = table.Upstream(service="mail/dovecot", endpoints=(table.Endpoint("127.0.0.1", port),))
    route = table.Route(
        name="mail/example", generation=1, users=(), domains=("example.com",), upstreams=(("imap", upstream),)
    )
    return table.make_table([route])


FIRST = sample_table(10143)
SECOND = sample_table(20143)
THIRD = sample_table(30143)
FOURTH = sample_table(40143)


class Changes:
    """Counts on_change calls and waits, bounded, until a condition on the publisher holds."""

    def __init__(self, channel: publisher.Publisher) -> None:
        self.count = 0
        self._event = asyncio.Event()
        channel.on_change(self._changed)

    def _changed(self) -> None:
        self.count += 1
        self._event.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(BOUND):
            for _ in range(MAX_CHANGES):
                if condition():
                    return
                self._event.clear()
                await self._event.wait()
        raise AssertionError("the condition never held")


# The two ways a Publisher serves: unguarded (tests, tools) and through the connection guard
# mailgress/cli.py hands ``mailgress controller``. The shared fixtures run each test both ways.
GUARDS: dict[str, publisher.ConnectionGuards | None] = {"unguarded": None, "guarded": Guard}


@pytest.fixture(params=list(GUARDS))
def guards(request: pytest.FixtureRequest) -> publisher.ConnectionGuards | None:
    return GUARDS[request.param]


@pytest.fixture
async def channel(guards: publisher.ConnectionGuards | None) -> AsyncIterator[publisher.Publisher]:
    started = publisher.Publisher(TOKEN, guards=guards)
    await started.start("127.0.0.1", 0)
    yield started
    await started.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as session:
        yield session


def base(channel: publisher.Publisher) -> str:
    return f"http://127.0.0.1:{channel.port}"


async def open_stream(
    client: aiohttp.ClientSession, channel: publisher.Publisher, proxy: str = "proxy-a"
) -> aiohttp.ClientResponse:
    # No total timeout: the stream outlives it; every read below is bounded instead.
    response = await client.get(
        base(channel) + publisher.STREAM_PATH,
        params={"proxy": proxy},
        headers=AUTH,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    assert response.status == 200
    return response


async def next_line(response: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(BOUND):
        return await response.content.readline()


async def next_table(response: aiohttp.ClientResponse) -> table.RoutingTable:
    return table.from_json(await next_line(response))


async def post_ack(client: aiohttp.ClientSession, channel: publisher.Publisher, body: Any) -> int:
    async with client.post(base(channel) + publisher.ACK_PATH, json=body, headers=AUTH) as response:
        return response.status


def ack_body(proxy: str, version: str, accepted: bool = True, error: str = "") -> dict[str, Any]:
    return {"proxy": proxy, "version": version, "accepted": accepted, "error": error}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["none", "wrong", "wrong-scheme", "empty", "longer"],
)
async def test_without_the_token_a_request_gets_401_and_learns_nothing(
    channel: publisher.Publisher, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    channel.publish(FIRST)
    url = base(channel)
    async with client.get(
        url + publisher.STREAM_PATH, params={"proxy": "proxy-a"}, headers=headers
    ) as response:
        assert (response.status, await response.read()) == (401, b"")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    body = ack_body("proxy-a", FIRST.version)
    async with client.post(url + publisher.ACK_PATH, json=body, headers=headers) as response:
        assert (response.status, await response.read()) == (401, b"")
    # Even a malformed request is refused for the token first: no hint about what is valid.
    async with client.post(url + publisher.ACK_PATH, data=b"[", headers=headers) as response:
        assert (response.status, await response.read()) == (401, b"")
    assert channel.acks() == {}


async def test_no_stream_before_the_first_table(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    url = base(channel) + publisher.STREAM_PATH
    async with client.get(url, params={"proxy": "proxy-a"}, headers=AUTH) as response:
        assert (response.status, await response.read()) == (503, b"")


@pytest.mark.parametrize("proxy", ["", "Proxy-A", "proxy_a", "-proxy", "a" * 254, "proxy a"])
async def test_a_stream_needs_a_pod_name(
    channel: publisher.Publisher, client: aiohttp.ClientSession, proxy: str
) -> None:
    channel.publish(FIRST)
    url = base(channel) + publisher.STREAM_PATH
    async with client.get(url, params={"proxy": proxy}, headers=AUTH) as response:
        assert (response.status, await response.read()) == (400, b"")


async def test_the_stream_starts_with_the_current_table_and_carries_each_new_one(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    assert response.headers["Content-Type"] == publisher.NDJSON
    first = await next_line(response)
    assert first == table.to_json(FIRST) + b"\n"
    channel.publish(FIRST)  # the same version again: nothing goes out
    channel.publish(SECOND)
    assert (await next_table(response)).version == SECOND.version
    channel.publish(FIRST)  # going back is a new push, too
    assert (await next_table(response)).version == FIRST.version
    response.close()


async def test_superseded_versions_are_skipped_never_reordered(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    assert (await next_table(response)).version == FIRST.version
    third = sample_table(30143)
    # Published back to back, before the stream's writer runs: only the newest goes out.
    channel.publish(SECOND)
    channel.publish(third)
    assert (await next_table(response)).version == third.version
    channel.publish(FIRST)
    assert (await next_table(response)).version == FIRST.version
    response.close()


async def test_acks_are_recorded_per_open_stream_and_dropped_when_it_ends(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    changes = Changes(channel)
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    await next_table(response)
    await changes.wait_until(lambda: changes.count == 1)  # connected
    assert channel.acks() == {}
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    assert channel.acks() == {"proxy-a": publisher.Ack(FIRST.version, accepted=True, error="")}
    assert changes.count == 2
    # The same ack again changes nothing and notifies nobody.
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    assert changes.count == 2
    rejected = ack_body("proxy-a", "sha256:bad", accepted=False, error="version does not match")
    assert await post_ack(client, channel, rejected) == 204
    assert channel.acks()["proxy-a"] == publisher.Ack("sha256:bad", False, "version does not match")
    assert changes.count == 3
    response.close()  # the proxy goes away
    await changes.wait_until(lambda: "proxy-a" not in channel.acks())
    assert changes.count == 4


async def test_an_ack_from_a_proxy_without_a_stream_is_dropped(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    channel.publish(FIRST)
    assert await post_ack(client, channel, ack_body("proxy-z", FIRST.version)) == 204
    assert channel.acks() == {}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[" * 50_000,
        b"[]",
        json.dumps({"version": "v", "accepted": True}).encode(),
        json.dumps(ack_body("Not A Pod", "v")).encode(),
        json.dumps({"proxy": "proxy-a", "version": 1, "accepted": True}).encode(),
        json.dumps({"proxy": "proxy-a", "version": "v", "accepted": "yes"}).encode(),
        json.dumps({"proxy": "proxy-a", "version": "v", "accepted": False, "error": 3}).encode(),
    ],
    ids=["not-json", "deep", "list", "no-proxy", "bad-name", "version-type", "accepted-type", "error-type"],
)
async def test_a_malformed_ack_gets_400(
    channel: publisher.Publisher, client: aiohttp.ClientSession, body: bytes
) -> None:
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    async with client.post(base(channel) + publisher.ACK_PATH, data=body, headers=AUTH) as reply:
        assert (reply.status, await reply.read()) == (400, b"")
    assert channel.acks() == {}
    response.close()


async def test_an_oversized_ack_gets_413_and_long_fields_are_cut(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    huge = b'{"proxy": "proxy-a", "pad": "' + b"x" * publisher.MAX_ACK_BODY + b'"}'
    async with client.post(base(channel) + publisher.ACK_PATH, data=huge, headers=AUTH) as reply:
        assert (reply.status, await reply.read()) == (413, b"")
    long_ack = ack_body("proxy-a", "v" * 5000, accepted=False, error="e" * 5000)
    assert await post_ack(client, channel, long_ack) == 204
    recorded = channel.acks()["proxy-a"]
    assert len(recorded.version) == publisher.MAX_VERSION_LENGTH
    assert len(recorded.error) == publisher.MAX_ERROR_LENGTH
    response.close()


async def test_a_new_stream_under_the_same_name_replaces_the_old_one(
    channel: publisher.Publisher, client: aiohttp.ClientSession
) -> None:
    channel.publish(FIRST)
    old = await open_stream(client, channel)
    await next_table(old)
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    new = await open_stream(client, channel)  # the pod restarted under the same name
    assert (await next_table(new)).version == FIRST.version
    assert await next_line(old) == b""  # the old stream was ended
    assert channel.acks() == {}  # the restarted proxy has not acked yet
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    assert channel.acks()["proxy-a"].version == FIRST.version
    new.close()


async def test_an_idle_stream_carries_heartbeats(client: aiohttp.ClientSession) -> None:
    channel = publisher.Publisher(TOKEN, heartbeat=0.01)
    await channel.start("127.0.0.1", 0)
    try:
        channel.publish(FIRST)
        response = await open_stream(client, channel)
        await next_table(response)
        assert await next_line(response) == b"\n"
        channel.publish(SECOND)  # a table still goes out between heartbeats
        lines = [await next_line(response) for _ in range(5)]
        assert table.to_json(SECOND) + b"\n" in lines
        assert set(lines) <= {b"\n", table.to_json(SECOND) + b"\n"}
        response.close()
    finally:
        await channel.stop()


async def test_stop_ends_every_stream(client: aiohttp.ClientSession) -> None:
    channel = publisher.Publisher(TOKEN)
    await channel.start("127.0.0.1", 0)
    channel.publish(FIRST)
    streams = [await open_stream(client, channel, f"proxy-{n}") for n in range(3)]
    for stream in streams:
        await next_table(stream)
    await channel.stop()
    for stream in streams:
        assert await next_line(stream) == b""
    assert channel.acks() == {}


async def test_a_failing_change_callback_does_not_break_the_channel(
    channel: publisher.Publisher, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("listener bug")

    channel.on_change(broken)
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    await next_table(response)
    assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
    assert channel.acks()["proxy-a"].accepted
    assert "change callback failed" in caplog.text
    response.close()


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        publisher.Publisher("")


async def test_the_token_never_reaches_the_log(
    channel: publisher.Publisher, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    channel.publish(FIRST)
    response = await open_stream(client, channel)
    await next_table(response)
    await post_ack(client, channel, ack_body("proxy-a", FIRST.version))
    await post_ack(client, channel, ack_body("proxy-b", FIRST.version))
    async with client.get(base(channel) + publisher.STREAM_PATH, headers={"Authorization": "Bearer x"}):
        pass
    response.close()
    assert "proxy-a" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(channel)


# The token file: a Secret mounted as the kubelet writes it (AtomicWriter): the files live in a
# timestamped directory, "..data" links to it, and "token" links to "..data/token". An update
# writes a new directory and renames a new "..data" link over the old one.

OLD_TOKEN = "old-push-token-that-must-never-be-logged"
NEW_TOKEN = "new-push-token-that-must-never-be-logged"
NEWER_TOKEN = "newer-push-token-that-must-never-be-logged"


class Clock:
    """The wall clock, moved by the test: the rotation grace without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MountedSecret:
    """A Secret volume holding one key, ``token``, updated the kubelet's way at ``clock``'s time
    (each version's file is modified then, as when the kubelet writes it)."""

    def __init__(self, directory: Path, token: str, clock: Clock) -> None:
        self.clock = clock
        self.volume = KubeletVolume(directory, {"token": token.encode()}, clock.now)
        self.directory = directory

    @property
    def path(self) -> Path:
        return self.volume.path("token")

    def update(self, content: str) -> None:
        self.volume.update({"token": content.encode()}, self.clock.now)


def tokens_in(text: str) -> list[str]:
    """Which test tokens ``text`` holds, by name: a failing check must not print a token."""
    return [
        name
        for name, token in (("old", OLD_TOKEN), ("new", NEW_TOKEN), ("newer", NEWER_TOKEN))
        if token in text
    ]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def secret(tmp_path: Path, clock: Clock) -> MountedSecret:
    return MountedSecret(tmp_path / "push-token", OLD_TOKEN + "\n", clock)


@pytest.fixture
async def file_channel(secret: MountedSecret, clock: Clock) -> AsyncIterator[publisher.Publisher]:
    started = publisher.Publisher(publisher.TokenFile(secret.path, clock=clock, monotonic=clock))
    await started.start("127.0.0.1", 0)
    started.publish(FIRST)
    yield started
    await started.stop()


async def status_of_stream(client: aiohttp.ClientSession, channel: publisher.Publisher, token: str) -> int:
    """The status of a stream request with ``token`` (the stream, if any, is closed at once)."""
    headers = {"Authorization": f"Bearer {token}"}
    url = base(channel) + publisher.STREAM_PATH
    async with client.get(url, params={"proxy": "proxy-a"}, headers=headers) as response:
        return response.status


async def status_of_ack(client: aiohttp.ClientSession, channel: publisher.Publisher, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    body = ack_body("proxy-a", FIRST.version)
    async with client.post(base(channel) + publisher.ACK_PATH, json=body, headers=headers) as response:
        return response.status


async def test_after_a_rotation_the_replaced_token_is_accepted_for_the_grace_only(
    file_channel: publisher.Publisher,
    client: aiohttp.ClientSession,
    secret: MountedSecret,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.publisher")
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 401
    secret.update(NEW_TOKEN + "\n")
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200  # the rotation is seen here
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    assert await status_of_ack(client, file_channel, OLD_TOKEN) == 204
    assert await status_of_stream(client, file_channel, "another-token") == 401
    clock.now += 1
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_ack(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    assert await status_of_ack(client, file_channel, NEW_TOKEN) == 204
    messages = [record.getMessage() for record in caplog.records]
    rotated = [message for message in messages if "holds a new token" in message]
    assert len(rotated) == 1
    assert "accepted for 300 s (restart the controller to refuse it at once)" in rotated[0]
    assert sum("is no longer accepted" in message for message in messages) == 1
    assert tokens_in(caplog.text) == []


async def test_a_following_proxy_keeps_its_stream_and_acks_while_its_copy_lags(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    """The controller's copy of the Secret is updated first: the proxy, still on the old token,
    keeps its stream and its acks count for the grace; then its stream ends at the next table,
    which it does not get, and only the new token acks."""
    response = await client.get(
        base(file_channel) + publisher.STREAM_PATH,
        params={"proxy": "proxy-a"},
        headers={"Authorization": f"Bearer {OLD_TOKEN}"},
        timeout=aiohttp.ClientTimeout(total=None),
    )
    assert response.status == 200
    assert await next_table(response) == FIRST
    secret.update(NEW_TOKEN)
    file_channel.publish(SECOND)
    assert await next_table(response) == SECOND
    assert await ack_with(client, file_channel, OLD_TOKEN, SECOND) == 204
    assert file_channel.acks()["proxy-a"].version == SECOND.version
    clock.now += publisher.TOKEN_ROTATION_GRACE
    changes = Changes(file_channel)
    file_channel.publish(THIRD)
    assert await next_line(response) == b""  # ended, THIRD not sent
    await changes.wait_until(lambda: "proxy-a" not in file_channel.acks())
    assert await ack_with(client, file_channel, OLD_TOKEN, THIRD) == 401
    response.close()


async def ack_with(
    client: aiohttp.ClientSession, channel: publisher.Publisher, token: str, acked: table.RoutingTable
) -> int:
    body = ack_body("proxy-a", acked.version)
    headers = {"Authorization": f"Bearer {token}"}
    async with client.post(base(channel) + publisher.ACK_PATH, json=body, headers=headers) as response:
        return response.status


async def test_a_restarted_controller_accepts_only_the_current_token(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    """How an operator who rotated a leaked token refuses the old one at once."""
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200  # the token it started with
    secret.update(NEW_TOKEN)
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200  # in its grace
    restarted = publisher.Publisher(publisher.TokenFile(secret.path, clock=clock, monotonic=clock))
    await restarted.start("127.0.0.1", 0)
    try:
        restarted.publish(FIRST)
        assert await status_of_stream(client, restarted, OLD_TOKEN) == 401
        assert await status_of_ack(client, restarted, OLD_TOKEN) == 401
        assert await status_of_stream(client, restarted, NEW_TOKEN) == 200
    finally:
        await restarted.stop()


async def test_a_second_rotation_in_the_grace_replaces_the_accepted_old_token(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    """Only the token the current one replaced is accepted, for the grace from that rotation."""
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200  # the token it started with
    secret.update(NEW_TOKEN)
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    secret.update(NEWER_TOKEN)
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    clock.now += 1
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEWER_TOKEN) == 200


async def test_the_same_token_written_again_neither_rotates_nor_extends_the_grace(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    secret.update(OLD_TOKEN)
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 401
    secret.update(NEW_TOKEN)
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    secret.update(NEW_TOKEN + "\n")
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    clock.now += 1
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401


async def test_a_file_without_a_token_refuses_everything_but_keeps_the_grace(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    """A broken file accepts nothing; once fixed, the replaced token's grace ends when it would
    have (a read failing during the kubelet's swap must not cut the proxies still on it)."""
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200  # the token it started with
    secret.update(NEW_TOKEN)
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200  # in its grace
    secret.update("")
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 401
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    secret.update(NEW_TOKEN)
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    clock.now += 1
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200


def test_a_read_failing_during_the_kubelets_swap_keeps_the_rotations_grace(
    secret: MountedSecret, clock: Clock
) -> None:
    """The swap removes the old payload directory after renaming ..data: a read that walked the
    old link in between finds nothing. The next read is the rotation, with its grace."""
    tokens = publisher.TokenFile(secret.path, clock=clock, monotonic=clock)
    (old,) = tokens.digests()
    secret.path.unlink()  # what that read sees
    assert tokens.digests() == ()
    assert tokens.stream_digests() == (old,)  # an open stream goes on
    secret.path.symlink_to("..data/token")
    secret.update(NEW_TOKEN)
    clock.now += publisher.TOKEN_ROTATION_GRACE - 1
    assert tokens.digests() == (publisher._digest(NEW_TOKEN), old)
    clock.now += 1
    assert tokens.digests() == (publisher._digest(NEW_TOKEN),)


async def test_the_grace_runs_from_the_rotation_however_late_it_is_noticed(
    file_channel: publisher.Publisher,
    client: aiohttp.ClientSession,
    secret: MountedSecret,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No request between the rotation and the grace's end: the first one after it, with the
    replaced (maybe leaked) token, is refused."""
    caplog.set_level(logging.INFO, logger="controller.publisher")
    secret.update(NEW_TOKEN)
    clock.now += publisher.TOKEN_ROTATION_GRACE
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_ack(client, file_channel, OLD_TOKEN) == 401
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    assert "written 300 s ago; the one it replaced is no longer accepted" in caplog.text
    assert "stays accepted" not in caplog.text


def test_a_rotation_noticed_late_leaves_the_rest_of_its_grace(secret: MountedSecret, clock: Clock) -> None:
    tokens = publisher.TokenFile(secret.path, clock=clock, monotonic=clock)
    secret.update(NEW_TOKEN)
    clock.now += publisher.TOKEN_ROTATION_GRACE - 100
    assert len(tokens.digests()) == 2  # noticed now: 100 s left
    clock.now += 99
    assert len(tokens.digests()) == 2
    clock.now += 1
    assert len(tokens.digests()) == 1


def test_a_step_of_the_wall_clock_neither_stretches_nor_cuts_the_grace(
    secret: MountedSecret, clock: Clock
) -> None:
    """What is left of the grace is taken from the wall clock when the rotation is noticed, then
    counted down on the monotonic clock: an NTP correction afterwards changes nothing."""
    elapsed = Clock()
    tokens = publisher.TokenFile(secret.path, clock=clock, monotonic=elapsed)
    secret.update(NEW_TOKEN)
    assert len(tokens.digests()) == 2  # noticed at once: the whole grace left
    clock.now += 7200  # the wall clock is set forward two hours: the grace is not cut
    elapsed.now += 1
    assert len(tokens.digests()) == 2
    clock.now -= 10800  # then back three: the grace is not stretched
    elapsed.now += publisher.TOKEN_ROTATION_GRACE - 1
    assert len(tokens.digests()) == 1


def test_a_modification_time_ahead_of_the_clock_does_not_stretch_the_grace(
    secret: MountedSecret, clock: Clock
) -> None:
    tokens = publisher.TokenFile(secret.path, clock=clock, monotonic=clock)
    secret.clock = Clock()
    secret.clock.now = clock.now + 3600  # a node whose clock runs an hour ahead wrote it
    secret.update(NEW_TOKEN)
    assert len(tokens.digests()) == 2
    clock.now += publisher.TOKEN_ROTATION_GRACE
    assert len(tokens.digests()) == 1


async def test_a_file_rewritten_in_place_is_read_again(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret, clock: Clock
) -> None:
    """Not the kubelet's way, but a stat tells it too (here by its size), and it is a rotation."""
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    (secret.directory / "..data" / "token").write_text(NEW_TOKEN + "-longer")
    assert await status_of_stream(client, file_channel, NEW_TOKEN + "-longer") == 200
    clock.now += publisher.TOKEN_ROTATION_GRACE
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401


def test_an_unchanged_file_is_read_once(secret: MountedSecret, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    read = publisher._read_token

    def counting(path: Path) -> tuple[str, Any]:
        reads.append(path)
        return read(path)

    monkeypatch.setattr(publisher, "_read_token", counting)
    tokens = publisher.TokenFile(secret.path, clock=secret.clock, monotonic=secret.clock)
    first = tokens.digests()
    assert len(first) == 1
    assert all(tokens.digests() == first for _ in range(10))
    assert len(reads) == 1
    secret.update(NEW_TOKEN)
    second = tokens.digests()
    assert len(second) == 2 and second[0] not in first and second[1:] == first  # the new, then the old
    assert tokens.digests() == second
    assert len(reads) == 2


def test_a_rotation_before_the_first_request_has_its_grace_too(secret: MountedSecret, clock: Clock) -> None:
    """The file is read when the controller starts: proxies that connect after a rotation with a
    lagging copy still get in."""
    tokens = publisher.TokenFile(secret.path, clock=clock, monotonic=clock)
    secret.update(NEW_TOKEN)
    assert len(tokens.digests()) == 2
    clock.now += publisher.TOKEN_ROTATION_GRACE
    assert len(tokens.digests()) == 1


def swap_for_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def swap_for_a_named_pipe(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda secret: secret.update(""), "is empty"),
        (lambda secret: secret.update(" \n\t"), "is empty"),
        (lambda secret: shutil.rmtree((secret.directory / "..data").resolve()), "No such file or directory"),
        (lambda secret: swap_for_a_directory(secret.directory / "..data" / "token"), "but a directory"),
        # Its open would wait for a writer on the event loop (the review's O1 #2): refused at once.
        (lambda secret: swap_for_a_named_pipe(secret.directory / "..data" / "token"), "but a named pipe"),
        (lambda secret: (secret.directory / "..data" / "token").write_bytes(b"\xff\xfe"), "not UTF-8"),
        # No proxy could send it (proxy.push reads the file for both ends).
        (lambda secret: secret.update("first-line\nsecond-line"), "holds a control character"),
    ],
    ids=["empty", "blank", "missing", "directory", "named-pipe", "not-utf-8", "two-lines"],
)
async def test_without_a_token_in_the_file_every_request_is_refused_and_logged_once(
    file_channel: publisher.Publisher,
    client: aiohttp.ClientSession,
    secret: MountedSecret,
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[MountedSecret], None],
    problem: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.publisher")
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 200
    spoil(secret)
    for _ in range(3):
        assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
        # An ack is accepted as its stream is: with the token read last, so that a moment's
        # unreadable file (the kubelet's swap) does not make a following proxy drop its stream.
        assert await status_of_ack(client, file_channel, OLD_TOKEN) == 204
    refusals = [record for record in caplog.records if "refusing every proxy" in record.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.ERROR
    assert problem in refusals[0].getMessage()
    assert str(secret.path) in refusals[0].getMessage()

    secret.update(NEW_TOKEN)  # the Secret is fixed
    assert await status_of_stream(client, file_channel, NEW_TOKEN) == 200
    assert "holds a token again" in caplog.text
    assert OLD_TOKEN not in caplog.text and NEW_TOKEN not in caplog.text


async def test_a_token_file_larger_than_a_secret_is_refused(
    tmp_path: Path, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"a" * (push.MAX_TOKEN_FILE_BYTES + 1))
    channel = publisher.Publisher(publisher.TokenFile(path))
    await channel.start("127.0.0.1", 0)
    try:
        channel.publish(FIRST)
        assert await status_of_stream(client, channel, "a") == 401
    finally:
        await channel.stop()
    assert f"larger than {push.MAX_TOKEN_FILE_BYTES} bytes" in caplog.text


async def test_a_presented_token_that_is_not_utf_8_is_refused(channel: publisher.Publisher) -> None:
    """aiohttp hands such header bytes over as surrogates; comparing them must not fail (500)."""
    channel.publish(FIRST)
    reader, writer = await asyncio.open_connection("127.0.0.1", channel.port)
    try:
        writer.write(
            b"GET /v1/tables/stream?proxy=proxy-a HTTP/1.1\r\nHost: controller\r\n"
            b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(BOUND):
            assert await reader.readline() == b"HTTP/1.1 401 Unauthorized\r\n"
    finally:
        writer.close()


class FollowingProxy:
    """A proxy's own subscriber following a controller whose token file has its own clock; each
    side mounts its own copy of the Secret, as each pod does."""

    def __init__(self, directory: Path) -> None:
        self.clock = Clock()
        self.controller_secret = MountedSecret(directory / "controller", OLD_TOKEN, self.clock)
        self.proxy_secret = MountedSecret(directory / "proxy", OLD_TOKEN, self.clock)
        self.channel = publisher.Publisher(
            publisher.TokenFile(self.controller_secret.path, clock=self.clock, monotonic=self.clock)
        )
        self.changes = Changes(self.channel)
        self.holder = TableHolder(proxy_metrics.create(CollectorRegistry()))

    async def start(self) -> "asyncio.Task[None]":
        await self.channel.start("127.0.0.1", 0)
        self.channel.publish(FIRST)
        settings = ControllerSettings(
            url=base(self.channel),
            token_file=self.proxy_secret.path,
            proxy_name="proxy-a",
            snapshot_file=None,
        )
        follower = subscriber.Subscriber(settings, backoff=subscriber.Backoff(0.01, 0.05))
        return asyncio.create_task(follower.run(self.holder))

    async def acked(self, version: str) -> None:
        def has_acked() -> bool:
            ack = self.channel.acks().get("proxy-a")
            return ack is not None and ack.version == version

        await self.changes.wait_until(has_acked)


@pytest.fixture
async def following(tmp_path: Path) -> AsyncIterator[FollowingProxy]:
    made = FollowingProxy(tmp_path)
    task = await made.start()
    yield made
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await made.channel.stop()


def connections(caplog: pytest.LogCaptureFixture) -> int:
    return sum(record.getMessage() == "proxy proxy-a connected" for record in caplog.records)


async def test_a_following_proxy_rides_out_a_rotation_its_copy_of_the_secret_gets_last(
    following: FollowingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's scenario with the proxy's own subscriber: its stream and acks go on while
    its copy lags; its copy rotated, the stream still acks with the token it was opened with;
    past the grace the controller ends it and the proxy follows again with the new token."""
    caplog.set_level(logging.INFO)
    await following.acked(FIRST.version)
    following.controller_secret.update(NEW_TOKEN)  # the kubelet updates the controller's copy first
    following.channel.publish(SECOND)
    await following.acked(SECOND.version)
    following.proxy_secret.update(NEW_TOKEN)  # then the proxy's
    following.channel.publish(THIRD)
    await following.acked(THIRD.version)
    assert connections(caplog) == 1
    following.clock.now += publisher.TOKEN_ROTATION_GRACE
    following.channel.publish(FOURTH)
    await following.acked(FOURTH.version)
    assert following.holder.current == FOURTH
    assert connections(caplog) == 2
    assert "the token its stream was opened with is no longer accepted" in caplog.text
    assert "answered 401" not in caplog.text
    assert tokens_in(caplog.text) == []


async def test_a_following_proxy_whose_copy_rotates_first_keeps_its_stream(
    following: FollowingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The other order: the proxy's copy is updated before the controller's. Its open stream
    acks with the token it was opened with, which the controller still holds; once the
    controller's copy rotates, that token's grace ends the stream and the proxy reconnects with
    the new one."""
    caplog.set_level(logging.INFO)
    await following.acked(FIRST.version)
    following.proxy_secret.update(NEW_TOKEN)
    following.channel.publish(SECOND)
    await following.acked(SECOND.version)
    assert following.holder.current == SECOND
    following.controller_secret.update(NEW_TOKEN)
    following.channel.publish(THIRD)
    await following.acked(THIRD.version)
    assert connections(caplog) == 1
    following.clock.now += publisher.TOKEN_ROTATION_GRACE
    following.channel.publish(FOURTH)
    await following.acked(FOURTH.version)
    assert following.holder.current == FOURTH
    assert connections(caplog) == 2
    assert "answered 401" not in caplog.text
    assert tokens_in(caplog.text) == []


async def test_after_the_grace_a_proxy_on_the_old_token_gets_back_in_once_its_copy_is_rotated(
    following: FollowingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy whose copy lags past the grace loses its stream, is refused, keeps serving its
    table, and follows again as soon as its own copy has the new token."""
    caplog.set_level(logging.INFO)
    await following.acked(FIRST.version)
    following.controller_secret.update(NEW_TOKEN)
    following.channel.publish(SECOND)
    await following.acked(SECOND.version)
    following.clock.now += publisher.TOKEN_ROTATION_GRACE
    following.channel.publish(THIRD)
    await following.changes.wait_until(lambda: "proxy-a" not in following.channel.acks())
    async with asyncio.timeout(BOUND):
        for _ in range(MAX_CHANGES):
            if "answered 401 to the stream request" in caplog.text:
                break
            await asyncio.sleep(0.01)
    assert "answered 401 to the stream request" in caplog.text
    assert following.holder.current == SECOND  # THIRD never reached the old token

    following.proxy_secret.update(NEW_TOKEN)
    await following.acked(THIRD.version)
    assert following.holder.current == THIRD
    assert connections(caplog) == 2
    assert tokens_in(caplog.text) == []


async def old_token_stream(
    client: aiohttp.ClientSession, channel: publisher.Publisher
) -> aiohttp.ClientResponse:
    response = await client.get(
        base(channel) + publisher.STREAM_PATH,
        params={"proxy": "proxy-a"},
        headers={"Authorization": f"Bearer {OLD_TOKEN}"},
        timeout=aiohttp.ClientTimeout(total=None),
    )
    assert response.status == 200
    return response


async def test_a_stream_on_the_replaced_token_ends_at_the_first_heartbeat_past_its_grace(
    secret: MountedSecret, clock: Clock, client: aiohttp.ClientSession
) -> None:
    """No table published: the heartbeat is when the stream is looked at again."""
    channel = publisher.Publisher(
        publisher.TokenFile(secret.path, clock=clock, monotonic=clock), heartbeat=0.01
    )
    await channel.start("127.0.0.1", 0)
    try:
        channel.publish(FIRST)
        response = await old_token_stream(client, channel)
        assert await next_table(response) == FIRST
        secret.update(NEW_TOKEN)
        assert await next_line(response) == b"\n"  # in its grace
        clock.now += publisher.TOKEN_ROTATION_GRACE
        async with asyncio.timeout(BOUND):
            for _ in range(MAX_CHANGES):  # heartbeats already on their way, then the end
                if await response.content.readline() == b"":
                    break
            else:
                raise AssertionError("the stream outlived its token's grace")
        response.close()
    finally:
        await channel.stop()


async def test_a_second_rotation_ends_the_streams_on_the_token_it_drops(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret
) -> None:
    response = await old_token_stream(client, file_channel)
    assert await next_table(response) == FIRST
    secret.update(NEW_TOKEN)
    file_channel.publish(SECOND)
    assert await next_table(response) == SECOND  # in its grace
    secret.update(NEWER_TOKEN)  # the old token is no longer the replaced one
    file_channel.publish(THIRD)
    assert await next_line(response) == b""
    response.close()


async def test_an_unreadable_token_file_ends_no_stream(
    file_channel: publisher.Publisher, client: aiohttp.ClientSession, secret: MountedSecret
) -> None:
    """New requests are refused; a stream opened with the token read last goes on."""
    response = await old_token_stream(client, file_channel)
    assert await next_table(response) == FIRST
    secret.path.unlink()
    assert await status_of_stream(client, file_channel, OLD_TOKEN) == 401
    file_channel.publish(SECOND)
    assert await next_table(response) == SECOND
    response.close()


# TLS: the push port serves a certificate of a test CA, loaded and reloaded by the proxy's
# CertificateStore (what mailgress/cli.py hands the controller). Renewals replace the files as
# the kubelet updates a mounted Secret.


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("push-ca"))


@pytest.fixture
def served(authority: TestAuthority, tmp_path: Path) -> IssuedCertificate:
    return authority.issue("push", ["127.0.0.1"], cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")


@pytest.fixture
async def tls_channel(
    served: IssuedCertificate, guards: publisher.ConnectionGuards | None
) -> AsyncIterator[publisher.Publisher]:
    store = CertificateStore("push channel", (CertificateFiles(served.cert, served.key),))
    started = publisher.Publisher(TOKEN, certificates=store, guards=guards)
    await started.start("127.0.0.1", 0)
    yield started
    await started.stop()


def verifying(authority: TestAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(authority.cert))


async def served_serial(channel: publisher.Publisher, authority: TestAuthority) -> int:
    """The serial of the certificate a new connection to ``channel`` is shown."""
    async with asyncio.timeout(BOUND):
        _, writer = await asyncio.open_connection("127.0.0.1", channel.port, ssl=verifying(authority))
    certificate = writer.get_extra_info("ssl_object").getpeercert()
    writer.close()
    return int(certificate["serialNumber"], 16)


async def test_over_tls_streams_acks_and_metrics_work_verified_by_the_ca(
    tls_channel: publisher.Publisher, authority: TestAuthority, client: aiohttp.ClientSession
) -> None:
    tls_channel.publish(FIRST)
    url = f"https://127.0.0.1:{tls_channel.port}"
    context = verifying(authority)
    response = await client.get(
        url + publisher.STREAM_PATH,
        params={"proxy": "proxy-a"},
        headers=AUTH,
        ssl=context,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    assert response.status == 200
    assert (await next_table(response)).version == FIRST.version
    tls = response.connection.transport.get_extra_info("ssl_object") if response.connection else None
    assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
    body = ack_body("proxy-a", FIRST.version)
    async with client.post(url + publisher.ACK_PATH, json=body, headers=AUTH, ssl=context) as acked:
        assert acked.status == 204
    assert tls_channel.acks()["proxy-a"].version == FIRST.version
    async with client.get(url + publisher.METRICS_PATH, ssl=context) as metrics:
        assert metrics.status == 200
        assert "mailgress_controller_proxies_connected 1.0" in await metrics.text()
    response.close()


async def test_over_tls_plain_http_and_an_unknown_ca_get_nothing(
    tls_channel: publisher.Publisher, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tls_channel.publish(FIRST)
    with pytest.raises(aiohttp.ClientError):
        async with client.get(base(tls_channel) + publisher.METRICS_PATH):
            pass
    stranger = TestAuthority(tmp_path / "stranger", name="not the push CA")
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with client.get(
            f"https://127.0.0.1:{tls_channel.port}{publisher.METRICS_PATH}", ssl=verifying(stranger)
        ):
            pass


async def test_a_renewed_certificate_reaches_the_next_connection_and_open_streams_go_on(
    tls_channel: publisher.Publisher,
    authority: TestAuthority,
    served: IssuedCertificate,
    client: aiohttp.ClientSession,
) -> None:
    tls_channel.publish(FIRST)
    assert await served_serial(tls_channel, authority) == served.serial
    response = await client.get(
        f"https://127.0.0.1:{tls_channel.port}{publisher.STREAM_PATH}",
        params={"proxy": "proxy-a"},
        headers=AUTH,
        ssl=verifying(authority),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    assert (await next_table(response)).version == FIRST.version
    renewed = authority.issue("push", ["127.0.0.1"], cert=served.cert, key=served.key)
    assert await served_serial(tls_channel, authority) == renewed.serial
    # The stream opened before the renewal still carries every new table.
    tls_channel.publish(SECOND)
    assert (await next_table(response)).version == SECOND.version
    response.close()


async def test_a_broken_renewal_keeps_the_certificate_in_force(
    tls_channel: publisher.Publisher,
    authority: TestAuthority,
    served: IssuedCertificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served.cert.write_text("not a certificate\n")
    assert await served_serial(tls_channel, authority) == served.serial
    assert await served_serial(tls_channel, authority) == served.serial
    kept = [record for record in caplog.records if "keeping the certificates in use" in record.getMessage()]
    assert len(kept) == 1, "a broken renewal is logged once, not at every connection"
    renewed = authority.issue("push", ["127.0.0.1"], cert=served.cert, key=served.key)
    assert await served_serial(tls_channel, authority) == renewed.serial


# The push port's guard (what mailgress controller runs with): a cap, a deadline for a request
# answered, eviction of the connection idle the longest. Deadlines are two seconds; nothing is
# timed: a test waits, bounded, for a connection to be closed and reads what closed it from the
# guard's debug log.

DEADLINE = 2.0


def stream_head(proxy: str, token: str | None = TOKEN) -> bytes:
    """A stream request's head without the blank line that ends it."""
    authorization = "" if token is None else f"Authorization: Bearer {token}\r\n"
    return f"GET {publisher.STREAM_PATH}?proxy={proxy} HTTP/1.1\r\nHost: c\r\n{authorization}".encode()


HALF_SENT = stream_head("proxy-a")  # the blank line that ends it never comes
# Scrapes a flooding client pipelines: their answers are more than the socket buffers take.
PIPELINED = 4000
# A table line larger than what the controller's socket (at most 4 MiB here: net.ipv4.tcp_wmem)
# and a non-reading proxy's small receive buffer take: its writing waits for the proxy to read.
LARGE_TABLE_USERS = 600_000  # about 16 MB of canonical JSON


def guard_lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """The guard's debug lines about the push port that start with ``start``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == Guard.__module__ and r.getMessage().startswith(f"push channel connection {start}")
    ]


EVICTED = "closed to make room"
EXPIRED = "closed: no request answered"
REFUSED = "refused"


async def slow_reader(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the port with a 4 KiB receive buffer: what it does not read soon fills it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def guarded(
    caplog: pytest.LogCaptureFixture,
    *,
    limit: int = publisher.MAX_CONNECTIONS,
    timeout: float = publisher.REQUEST_TIMEOUT,
    certificates: CertificateStore | None = None,
    heartbeat: float = publisher.HEARTBEAT_INTERVAL,
) -> AsyncIterator[publisher.Publisher]:
    """A Publisher guarded as mailgress controller's is, with FIRST published."""
    caplog.set_level(logging.DEBUG, logger=Guard.__module__)
    started = publisher.Publisher(
        TOKEN,
        certificates=certificates,
        guards=Guard,
        heartbeat=heartbeat,
        max_connections=limit,
        request_timeout=timeout,
    )
    await started.start("127.0.0.1", 0)
    started.publish(FIRST)
    try:
        yield started
    finally:
        await started.stop()


async def raw_connection(channel: publisher.Publisher) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(BOUND):
        return await asyncio.open_connection("127.0.0.1", channel.port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the controller sent before closing the connection (a reset ends it too)."""
    try:
        async with asyncio.timeout(BOUND):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def test_silent_connections_filling_the_cap_do_not_keep_a_proxys_stream_out(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession
) -> None:
    async with guarded(caplog, limit=4) as channel:  # the default deadline: 60 s
        silent = [await raw_connection(channel) for _ in range(4)]
        response = await open_stream(client, channel)
        assert (await next_table(response)).version == FIRST.version
        assert await until_closed(silent[0][0]) == b""  # the oldest idle one made room
        # The ack takes another connection: the next oldest makes room.
        assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
        assert channel.acks()["proxy-a"].version == FIRST.version
        assert await until_closed(silent[1][0]) == b""
        assert len(guard_lines(caplog, EVICTED)) == 2
        channel.publish(SECOND)
        assert (await next_table(response)).version == SECOND.version
        response.close()
        for _, writer in silent:
            writer.close()


async def test_clients_without_the_token_that_pipeline_and_never_read_do_not_keep_a_proxy_out(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession
) -> None:
    # The review's scenario (M3): /metrics needs no token; one connection per slot pipelines
    # scrapes, reads the first answer's head and then nothing, so each has a request in progress
    # (its answer unwritten, or more waiting behind it) until its deadline (the default, 60 s).
    async with guarded(caplog, limit=4) as channel:
        flooding = []
        for _ in range(4):
            async with asyncio.timeout(BOUND):
                reader, writer = await slow_reader(channel.port)
                writer.write(f"GET {publisher.METRICS_PATH} HTTP/1.1\r\nHost: c\r\n\r\n".encode() * PIPELINED)
                await reader.readuntil(b"\r\n\r\n")
            flooding.append(writer)
        response = await open_stream(client, channel)
        assert (await next_table(response)).version == FIRST.version
        # The ack takes a connection of its own: another flooding one makes room.
        assert await post_ack(client, channel, ack_body("proxy-a", FIRST.version)) == 204
        assert channel.acks()["proxy-a"].version == FIRST.version
        evicted = guard_lines(caplog, EVICTED)
        assert len(evicted) == 2
        assert all("its client is behind on its answers" in line for line in evicted)
        assert not guard_lines(caplog, REFUSED)
        response.close()
        for writer in flooding:
            # abort: close would wait to send requests the controller no longer reads.
            writer.transport.abort()


async def test_clients_without_the_token_sending_an_unmet_expectation_do_not_keep_a_proxy_out(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession
) -> None:
    # The review's scenario (O1): aiohttp answers 417 to 'Expect: x' before any middleware runs;
    # each client reads that answer and sends nothing more, so its connection is idle.
    async with guarded(caplog, limit=4) as channel:  # the default deadline: 60 s
        expecting = []
        for _ in range(4):
            reader, writer = await raw_connection(channel)
            writer.write(f"GET {publisher.METRICS_PATH} HTTP/1.1\r\nHost: c\r\nExpect: x\r\n\r\n".encode())
            async with asyncio.timeout(BOUND):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 417 "), head
                await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            expecting.append((reader, writer))
        response = await open_stream(client, channel)
        assert (await next_table(response)).version == FIRST.version
        assert await until_closed(expecting[0][0]) == b""
        evicted = guard_lines(caplog, EVICTED)
        assert len(evicted) == 1 and "idle the longest" in evicted[0]
        assert not guard_lines(caplog, REFUSED)
        response.close()
        for _, writer in expecting:
            writer.close()


async def test_an_accepted_stream_outlives_the_deadline_and_is_never_evicted(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession
) -> None:
    async with guarded(caplog, limit=2, timeout=DEADLINE) as channel:
        first = await open_stream(client, channel, "proxy-a")
        assert (await next_table(first)).version == FIRST.version
        # A silent connection accepted after the stream: its deadline passes after the stream's
        # would have.
        reader, writer = await raw_connection(channel)
        assert await until_closed(reader) == b""
        writer.close()
        assert guard_lines(caplog, EXPIRED) == [
            "push channel connection closed: no request answered within 2s (0 answered before)"
        ]
        channel.publish(SECOND)
        assert (await next_table(first)).version == SECOND.version
        # Two streams fill the cap: a third connection is closed unread, no stream is evicted.
        second = await open_stream(client, channel, "proxy-b")
        assert (await next_table(second)).version == SECOND.version
        reader, writer = await raw_connection(channel)
        writer.write(HALF_SENT + b"\r\n")
        assert await until_closed(reader) == b""
        writer.close()
        assert guard_lines(caplog, REFUSED) == [
            "push channel connection refused: all 2 connections open are busy"
        ]
        assert not guard_lines(caplog, EVICTED)
        channel.publish(THIRD)
        assert (await next_table(first)).version == THIRD.version
        assert (await next_table(second)).version == THIRD.version
        first.close()
        second.close()


@pytest.mark.parametrize(
    ("sent", "answers"),
    [
        (HALF_SENT, 0),
        (stream_head("proxy-a", token=None) + b"\r\n", 1),
        (stream_head("Not-A-Pod") + b"\r\n", 1),
    ],
    ids=["half-sent", "no-token", "refused-stream"],
)
async def test_a_connection_without_an_accepted_stream_is_closed_at_its_deadline(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession, sent: bytes, answers: int
) -> None:
    # One connection at most: the stream afterwards shows that the closed one gave its place back.
    async with guarded(caplog, limit=1, timeout=DEADLINE) as channel:
        reader, writer = await raw_connection(channel)
        writer.write(sent)
        received = await until_closed(reader)
        writer.close()
        assert received.count(b"HTTP/1.1 ") == answers
        assert guard_lines(caplog, EXPIRED) == [
            f"push channel connection closed: no request answered within 2s ({answers} answered before)"
        ]
        response = await open_stream(client, channel)
        assert (await next_table(response)).version == FIRST.version
        response.close()


async def test_over_tls_connections_silent_in_their_handshake_do_not_keep_a_proxys_stream_out(
    caplog: pytest.LogCaptureFixture,
    authority: TestAuthority,
    served: IssuedCertificate,
    client: aiohttp.ClientSession,
) -> None:
    store = CertificateStore("push channel", (CertificateFiles(served.cert, served.key),))
    async with guarded(caplog, limit=3, timeout=DEADLINE, certificates=store) as channel:
        silent = [await raw_connection(channel) for _ in range(3)]  # no ClientHello ever
        response = await client.get(
            f"https://127.0.0.1:{channel.port}{publisher.STREAM_PATH}",
            params={"proxy": "proxy-a"},
            headers=AUTH,
            ssl=verifying(authority),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        assert response.status == 200
        assert (await next_table(response)).version == FIRST.version
        assert await until_closed(silent[0][0]) == b""
        assert guard_lines(caplog, EVICTED) == [
            "push channel connection closed to make room: idle the longest (0 answered before)"
        ]
        # The others are closed at their deadline, handshake never begun; the stream goes on.
        for reader, writer in silent[1:]:
            assert await until_closed(reader) == b""
            writer.close()
        assert len(guard_lines(caplog, EXPIRED)) == 2
        channel.publish(SECOND)
        assert (await next_table(response)).version == SECOND.version
        response.close()


async def test_a_stream_whose_proxy_stops_reading_ends_after_three_heartbeats(
    caplog: pytest.LogCaptureFixture, client: aiohttp.ClientSession
) -> None:
    upstream = table.Upstream(service="mail/dovecot", endpoints=(table.Endpoint("127.0.0.1", 10143),))
    users = tuple(f"user{n:07d}@example.com" for n in range(LARGE_TABLE_USERS))
    route = table.Route(
        name="mail/big", generation=1, users=users, domains=(), upstreams=(("imap", upstream),)
    )
    large = table.make_table([route])
    caplog.set_level(logging.INFO, logger=publisher.__name__)
    async with guarded(caplog, heartbeat=0.2) as channel:
        changes = Changes(channel)
        channel.publish(large)
        # A proxy with a small receive buffer that reads the answer's head and then nothing.
        async with asyncio.timeout(BOUND):
            reader, writer = await slow_reader(channel.port)
            writer.write(HALF_SENT + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        await changes.wait_until(lambda: changes.count == 2)  # connected, then gone
        assert "proxy proxy-a took no line for 0.6s: stream ended" in caplog.messages
        assert "proxy proxy-a disconnected" in caplog.messages
        writer.close()
        # A proxy that reads gets a stream again (the table, longer than the client's line limit,
        # is read in part).
        response = await open_stream(client, channel)
        await changes.wait_until(lambda: changes.count == 3)
        async with asyncio.timeout(BOUND):
            assert (await response.content.readexactly(14)) == b'{"apiVersion":'
        response.close()
