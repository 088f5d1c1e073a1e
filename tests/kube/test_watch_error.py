"""A watch ended by an ERROR event other than 410 Gone (an API server's 500 while etcd times out),
with ``mailgress controller`` itself, in a process of its own, against the emulator: kopf ends its
run on it (fatal by design), and the controller must exit with EXIT_RESTART and one clear error
line, no traceback, to be restarted by Kubernetes; what the proxies and the snapshot hold stays
as it was (nothing emptier is published on the way out)."""

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller import operator
from testbed import mailservers
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    CONTROLLER_TOKEN,
    NAMESPACE,
    PUSH_TOKEN,
    WAIT_SECONDS,
    Api,
    FakeProxy,
    create_backend,
    create_crd,
    create_route,
    create_snapshot_secret,
    eventually,
    imap_route,
    kubeconfig_text,
    serving,
    snapshot_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import PROXIES, create_proxy_pods, is_, route_names

# The metav1.Status an API server ends a watch with when etcd does not answer in time.
INTERNAL_ERROR = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "code": 500,
    "reason": "InternalError",
    "message": "Internal error occurred: etcdserver: request timed out",
}
SLICE = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/dovecot-abc"


class FailingWatchEmulator(Emulator):
    """``fail`` ends every EndpointSlice watch of NAMESPACE open at that moment with an
    INTERNAL_ERROR event (``failed`` counts them); watches opened later are served as usual."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed = 0
        self._failure: asyncio.Future[None] | None = None

    def fail(self) -> None:
        if self._failure is not None and not self._failure.done():
            self._failure.set_result(None)

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        if request.resource.plural != "endpointslices" or request.namespace != NAMESPACE:
            async for item in super()._serve_watch(request):
                yield item
            return
        if self._failure is None or self._failure.done():
            self._failure = asyncio.get_running_loop().create_future()
        failure = self._failure
        events = super()._serve_watch(request).__aiter__()
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(events.__anext__())
                await asyncio.wait({step, failure}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    self.failed += 1
                    yield {"type": "ERROR", "object": INTERNAL_ERROR}
                    return
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            await events.aclose()


@pytest.fixture
async def emulator() -> AsyncIterator[FailingWatchEmulator]:
    async with serving(FailingWatchEmulator()) as emu:
        yield emu


async def test_a_watch_error_exits_the_controller_to_be_restarted(
    emulator: FailingWatchEmulator, api: Api, tmp_path: Path
) -> None:
    await create_crd(api)
    await create_snapshot_secret(api)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await create_route(api, imap_route("example", "example.com"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(str(emulator.url), CONTROLLER_TOKEN))
    token = tmp_path / "push-token"
    token.write_text(PUSH_TOKEN + "\n")
    port = mailservers.free_port()
    argv = ["controller", f"--kubeconfig={kubeconfig}", f"--token-file={token}", "--health="]
    argv += [f"--namespace={CONTROLLER_NAMESPACE}", f"--watch-namespace={NAMESPACE}"]
    argv += ["--listen-address=127.0.0.1", f"--listen-port={port}"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailgress.cli", *argv, stderr=asyncio.subprocess.PIPE
    )
    try:
        # Accepted is written after the first compilation, long after the push port is bound.
        await eventually(lambda: is_(emulator, "example", "Accepted", "True", "Accepted"), "compiled")
        async with contextlib.AsyncExitStack() as stack:
            proxies = [await stack.enter_async_context(FakeProxy(name, port)) for name in PROXIES]
            await eventually(
                lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "programmed"
            )
            stored = snapshot_of(emulator)
            emulator.fail()
            async with asyncio.timeout(WAIT_SECONDS):
                _, err = await process.communicate()
        assert emulator.failed, "the watch ended with a 500 ERROR event"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == operator.EXIT_RESTART
    log = err.decode()
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if " ERROR " in line]
    assert f"ERROR {operator.__name__}: the operator stopped on an error: " in line
    assert "InternalError" in line
    assert line.endswith("the proxies keep serving their tables; the controller exits to be restarted")
    for proxy in proxies:
        assert proxy.tables and all(route_names(table) == ["mail/example"] for table in proxy.tables)
    assert snapshot_of(emulator) == stored and stored is not None and "mail/example" in stored
