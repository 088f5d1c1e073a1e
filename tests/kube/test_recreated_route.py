"""A MailRoute deleted and created again under the same name, with the real kopf operator against
the emulator and proxies acking on the real push channel: the new object starts at generation 1
again, and proxies that still run the old object's table must not make it Programmed."""

from tests.kube.conftest import (
    MAILROUTES,
    NAMESPACE,
    Api,
    Controller,
    condition,
    create_backend,
    create_route,
    eventually,
    imap_route,
    route_path,
    status_of,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_, route_names


def uid_of(emulator: Emulator, name: str) -> str | None:
    key = (MAILROUTES, NAMESPACE, name)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return None
    uid: str = emulator.objects[key].raw["metadata"]["uid"]
    return uid


async def test_a_route_created_again_is_pending_while_every_proxy_rejects_its_table(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, imap_route("example", "example.com"))
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        old_uid = uid_of(emulator, "example")
        old_table = proxies[0].latest
        assert old_table is not None and old_table.routes[0].generation == 1

        # From now on both proxies refuse every table: they keep running old_table.
        for proxy in proxies:
            proxy.reject = True
        await api.delete(route_path("example"))
        await eventually(lambda: uid_of(emulator, "example") is None, "the route deleted")
        await create_route(api, imap_route("example", "new.example"))
        await eventually(
            lambda: uid_of(emulator, "example") not in (None, old_uid), "the route created again"
        )
        await eventually(
            lambda: "proxy-b rejected" in condition(emulator, "example", "Programmed").get("message", ""),
            "both rejections reported",
        )
        status = status_of(emulator, "example")
        assert status["observedGeneration"] == 1
        programmed = condition(emulator, "example", "Programmed")
        assert (programmed["status"], programmed["reason"]) == ("Unknown", "Pending")
        assert programmed["message"].startswith("0 of 2 proxies; proxy-a rejected table sha256:")
        assert status["proxies"]["programmed"] == 0
        assert all(proxy.latest == old_table for proxy in proxies)

        # They take tables again; the next one (another route) carries the new object to both.
        for proxy in proxies:
            proxy.reject = False
        await create_route(api, imap_route("other", "example.org"))
        await eventually(
            lambda: all(route_names(proxy.latest) == ["mail/example", "mail/other"] for proxy in proxies),
            "both routes on every proxy",
        )
        await eventually(lambda: is_(emulator, "example", "Programmed", "True", "Programmed"), "Programmed")
        assert condition(emulator, "example", "Programmed")["message"] == "2 of 2 proxies"
        await eventually(
            lambda: status_of(emulator, "example").get("proxies", {}).get("programmed") == 2,
            "status.proxies counts both",
        )
