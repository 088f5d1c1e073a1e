"""MailRoute status fields as the emulator's API server keeps them after the controller's merge
patches (RFC 7386 merges maps): what goes away from a route goes away from its status, and once
the status is right the controller stops writing it."""

from typing import Any

from tests.kube.conftest import (
    MAILROUTES,
    NAMESPACE,
    Api,
    Controller,
    create_backend,
    create_route,
    eventually,
    imap_route,
    mailroute_body,
    route_path,
    status_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_


def resource_version(emulator: Emulator, name: str) -> str:
    """The object's resourceVersion: every status write the API server takes moves it."""
    version: str = emulator.objects[(MAILROUTES, NAMESPACE, name)].raw["metadata"]["resourceVersion"]
    return version


def settled(emulator: Emulator, name: str, generation: int, endpoints: dict[str, Any]) -> bool:
    status = status_of(emulator, name)
    return (
        status.get("observedGeneration") == generation
        and is_(emulator, name, "Programmed", "True", "Programmed")
        and status.get("proxies", {}).get("programmed") == 2
        and status.get("endpoints") == endpoints
    )


async def test_a_protocol_removed_leaves_the_status_and_the_writes_stop(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    backend = {"backend": {"service": "dovecot", "port": 143}}
    async with fake_proxies(controller):
        await create_route(
            api, mailroute_body("both", {"domains": ["example.com"], "imap": backend, "pop3": backend})
        )
        await eventually(lambda: settled(emulator, "both", 1, {"imap": 1, "pop3": 1}), "both programmed")
        await api.patch(route_path("both"), {"spec": {"pop3": None}})
        await eventually(lambda: settled(emulator, "both", 2, {"imap": 1}), "pop3 gone from the status")
        assert status_of(emulator, "both")["protocols"] == "imap"
        # Passes go on (another route, its table, the proxies' acks, its status writes), and each
        # sweeps "both" again: none of them writes its status, which is as it should be.
        written = resource_version(emulator, "both")
        await create_route(api, imap_route("other", "example.net"))
        await eventually(lambda: settled(emulator, "other", 1, {"imap": 1}), "other programmed")
        assert resource_version(emulator, "both") == written
