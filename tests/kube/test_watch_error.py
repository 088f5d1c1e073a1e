"""A watch ended by an ERROR event other than 410 Gone (an API server's 500 while etcd times out),
with the real operator against the emulator: kopf ends its run on it (fatal by design), and
controller.operator.run must run kopf again, with a log line, instead of exiting (repeated, a
CrashLoopBackOff); later changes of that kind then reach the statuses, and a stop still stops
(the fixture's teardown)."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller import operator
from tests.kube.conftest import (
    NAMESPACE,
    Api,
    Controller,
    create_backend,
    create_route,
    eventually,
    imap_route,
    serving,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_

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


async def test_a_watch_error_reruns_the_operator_and_changes_reach_the_status(
    emulator: FailingWatchEmulator, api: Api, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    # The proxies leave before the failure: kopf's end cuts the push streams open then (a real
    # proxy reconnects; the test's fake ones do not), and new ones follow the next run.
    async with fake_proxies(controller):
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "programmed")
    emulator.fail()
    await eventually(lambda: emulator.failed, "the watch ended with a 500 ERROR event")
    await api.patch(SLICE, {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": False}}]})
    async with fake_proxies(controller):
        await eventually(
            lambda: is_(emulator, "example", "ResolvedRefs", "False", "NoReadyEndpoints"),
            "the slice changed after the error reaches the status",
        )
    reruns = [
        record
        for record in caplog.records
        if record.name == operator.__name__ and record.levelno == logging.ERROR
        if "running it again" in record.getMessage()
    ]
    assert reruns, "the rerun was not logged"
    assert "InternalError" in reruns[0].getMessage()
