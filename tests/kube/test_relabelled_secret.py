"""A labelled Secret whose label goes and comes back while a resync LIST is in flight, with the real
kopf operator against the emulator (review K2): the label's removal reaches the controller as no
event at all (as a DELETED lost in a watch gap), the LIST's snapshot is taken without the Secret,
and the label comes back (with a rotated value, which kopf indexes) before the LIST answers. The
Secret's uid was last indexed after that LIST started, so the LIST must not drop its header.
controller.handlers' Sightings and Resync are tested alone in tests/controller/test_handlers_resync.py.
"""

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller import operator
from tests.kube.conftest import (
    WAIT_SECONDS,
    AccessLog,
    Api,
    create_route,
    eventually,
    imap_route,
    serving,
)
from tests.kube.emulator import Emulator
from tests.kube.test_headers_from import (
    FIRST_VALUE,
    LABELS,
    ROTATED_VALUE,
    SECRET_NAME,
    SECRET_PATH,
    b64,
    carries,
    every_proxy,
    keyed_route,
    secret_body,
)
from tests.kube.test_operator import resyncing_proxies, route_names


class GatedEmulator(Emulator):
    """When ``armed``, the next resync LIST of Secrets (a LIST with ``limit``) takes its snapshot,
    says so, and answers only once ``release`` is set; ``later_lists`` counts the resync LISTs
    that start after that (the controller's resync runs one LIST at a time, so one of them
    starting means the gated LIST's answer was applied)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.snapshotted = asyncio.Event()
        self.release = asyncio.Event()
        self.later_lists = 0

    async def _serve_list(self, request: Any) -> Any:
        resync = "limit" in request.params
        if resync and self.release.is_set():
            self.later_lists += 1
        if not (self.armed and resync and request.resource.plural == "secrets"):
            return await super()._serve_list(request)
        self.armed = False
        answer = copy.deepcopy(await super()._serve_list(request))
        self.snapshotted.set()
        await self.release.wait()
        return answer


@pytest.fixture
async def emulator() -> AsyncIterator[GatedEmulator]:
    async with serving(GatedEmulator()) as emu:
        yield emu


async def test_a_secret_labelled_again_while_a_resync_list_runs_keeps_its_header(
    emulator: GatedEmulator,
    api: Api,
    controller_settings: operator.Settings,
    controller_accesses: AccessLog,
) -> None:
    async with resyncing_proxies(
        emulator, api, controller_settings, controller_accesses, resync=1.0
    ) as proxies:
        try:
            await api.create(SECRET_PATH, secret_body(FIRST_VALUE, labels=LABELS))
            await create_route(api, keyed_route())
            await eventually(every_proxy(proxies, carries(FIRST_VALUE)), "the header on every proxy")
            # The label goes (the emulator sends the Secrets' watch nothing for it), and the next
            # resync LIST of Secrets takes its snapshot without the Secret.
            await api.call(
                "PATCH",
                f"{SECRET_PATH}/{SECRET_NAME}",
                {"metadata": {"labels": {"mailgress.io/auth-http": None}}},
                content_type="application/merge-patch+json",
            )
            emulator.armed = True
            await asyncio.wait_for(emulator.snapshotted.wait(), WAIT_SECONDS)
            # The label is back with a rotated value before that LIST answers: kopf indexes it.
            await api.call(
                "PATCH",
                f"{SECRET_PATH}/{SECRET_NAME}",
                {"metadata": {"labels": LABELS}, "data": {"key": b64(ROTATED_VALUE)}},
                content_type="application/merge-patch+json",
            )
            await eventually(every_proxy(proxies, carries(ROTATED_VALUE)), "the rotated value on every proxy")
            emulator.release.set()
            await eventually(lambda: emulator.later_lists > 0, "a resync LIST after the gated one's answer")
            # A change after that answer was applied: the table that holds it was compiled from
            # the indexes as the LIST left them.
            await create_route(api, imap_route("marker", "marker.example"))

            def marked() -> bool:
                return all("mail/marker" in route_names(proxy.latest) for proxy in proxies)

            await eventually(marked, "the marker route on every proxy")
            assert every_proxy(proxies, carries(ROTATED_VALUE))(), "the LIST dropped the labelled Secret"
        finally:
            emulator.release.set()  # a gated LIST never holds the controller's stop
