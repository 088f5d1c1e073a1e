"""auth_http ``headersFrom`` with the real kopf operator against the emulator and proxies acking on
the real push channel: a route whose Secret is missing, then unlabelled, is ResolvedRefs=False
and stays in the table without auth_http settings; once the Secret carries the label the header
reaches the proxies; a rotated value becomes a new table version, an unusable one
InvalidSecretValue. The controller selects Secrets server-side, and no value reaches a condition,
an Event or the controller's log."""

import base64
import logging
from collections.abc import Callable
from typing import Any

import kmock
import pytest

from controller import mailroute
from proxy import table
from tests.kube.conftest import (
    NAMESPACE,
    SECRETS,
    Api,
    Controller,
    condition,
    create_backend,
    create_route,
    eventually,
    mailroute_body,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import create_proxy_pods, fake_proxies, is_

SECRET_NAME = "auth-key"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
FIRST_VALUE = "first-K3y-Qv8"
ROTATED_VALUE = "rotated-K3y-Wx5"
LABELS = {mailroute.AUTH_HTTP_LABEL: mailroute.AUTH_HTTP_LABEL_VALUE}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_body(value: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": NAMESPACE, "labels": labels or {}},
        "type": "Opaque",
        "data": {"key": b64(value), "unused": b64("another-value")},
    }


def keyed_route() -> dict[str, Any]:
    return mailroute_body(
        "keyed",
        {
            "domains": ["example.com"],
            "auth": {
                "mode": "http",
                "http": {
                    "url": "http://auth.mail.svc:9000/auth",
                    "headers": {"X-Tenant": "example"},
                    "headersFrom": [
                        {"name": "X-Auth-Key", "secretKeyRef": {"name": SECRET_NAME, "key": "key"}}
                    ],
                },
            },
            "imap": {"backend": {"service": "dovecot", "port": 143}},
        },
    )


def keyed(current: table.RoutingTable | None) -> table.Route | None:
    return None if current is None else table.lookup(current, "imap", "user@example.com")


def every_proxy(proxies: list[Any], check: Callable[[table.Route], bool]) -> Callable[[], bool]:
    def all_hold() -> bool:
        routes = [keyed(proxy.latest) for proxy in proxies]
        return all(route is not None and check(route) for route in routes)

    return all_hold


def carries(value: str) -> Callable[[table.Route], bool]:
    def check(route: table.Route) -> bool:
        return route.http_auth is not None and route.http_auth.headers == (
            ("X-Auth-Key", value),
            ("X-Tenant", "example"),
        )

    return check


def without_auth_http(route: table.Route) -> bool:
    return route.auth == "http" and route.http_auth is None


def texts_of(emulator: Emulator) -> list[str]:
    """Every MailRoute status and Event the emulator holds, as text."""
    return [
        repr(obj.raw)
        for (resource, _, _), obj in emulator.objects.items()
        if resource.plural in ("mailroutes", "events")
    ]


async def test_a_secret_that_appears_later_and_rotates_reaches_the_table(
    emulator: Emulator, api: Api, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await create_proxy_pods(api)
    await create_backend(api, "dovecot", ["10.0.0.1"])
    async with fake_proxies(controller) as proxies:
        await create_route(api, keyed_route())
        await eventually(
            lambda: is_(emulator, "keyed", "ResolvedRefs", "False", "SecretNotFound"), "SecretNotFound"
        )
        assert condition(emulator, "keyed", "ResolvedRefs")["message"] == (
            f"headersFrom X-Auth-Key: Secret {NAMESPACE}/{SECRET_NAME} not found "
            f'(or not labelled {mailroute.AUTH_HTTP_LABEL}: "true")'
        )
        # In the table all the same: its logins fail temporarily, no other route takes them.
        await eventually(every_proxy(proxies, without_auth_http), "the route without auth_http settings")

        # Unlabelled, the Secret is not the controller's to read: still not found.
        await api.create(SECRET_PATH, secret_body(FIRST_VALUE))
        await eventually(lambda: is_(emulator, "keyed", "Programmed", "True", "Programmed"), "Programmed")
        assert is_(emulator, "keyed", "ResolvedRefs", "False", "SecretNotFound")

        await api.patch(f"{SECRET_PATH}/{SECRET_NAME}", {"metadata": {"labels": LABELS}})
        await eventually(every_proxy(proxies, carries(FIRST_VALUE)), "the header on every proxy")
        await eventually(lambda: is_(emulator, "keyed", "ResolvedRefs", "True", "ResolvedRefs"), "resolved")
        first_version = proxies[0].latest.version  # type: ignore[union-attr]

        await api.patch(f"{SECRET_PATH}/{SECRET_NAME}", {"data": {"key": b64(ROTATED_VALUE)}})
        await eventually(every_proxy(proxies, carries(ROTATED_VALUE)), "the rotated value on every proxy")
        assert proxies[0].latest.version != first_version  # type: ignore[union-attr]

        await api.patch(f"{SECRET_PATH}/{SECRET_NAME}", {"data": {"key": b64(ROTATED_VALUE + "\n")}})
        await eventually(
            lambda: is_(emulator, "keyed", "ResolvedRefs", "False", "InvalidSecretValue"), "invalid value"
        )
        await eventually(every_proxy(proxies, without_auth_http), "the route without auth_http settings")
        assert condition(emulator, "keyed", "ResolvedRefs")["message"].startswith(
            f"headersFrom X-Auth-Key: Secret {NAMESPACE}/{SECRET_NAME} key key is not a header value"
        )

    assert {"kopf.objects", "controller.reconciler"} <= {r.name for r in caplog.records}, "log not captured"
    values = (FIRST_VALUE, ROTATED_VALUE, "another-value")
    for value in values:
        assert not [text for text in texts_of(emulator) if value in text], "a value in a status or Event"
        assert not [r.getMessage() for r in caplog.records if value in r.getMessage()], "a value logged"


async def test_secrets_are_selected_by_the_api_server(
    emulator: Emulator, api: Api, controller: Controller
) -> None:
    """Every Secret list and watch of the controller carries the label selector, so the API server
    never sends it another Secret (the snapshot Secret is read by name)."""
    await create_backend(api, "dovecot", ["10.0.0.1"])
    await create_route(api, keyed_route())
    await eventually(
        lambda: is_(emulator, "keyed", "ResolvedRefs", "False", "SecretNotFound"), "SecretNotFound"
    )
    collections = [
        request
        for request in emulator
        if request.resource == SECRETS and request.method == kmock.method.GET and request.name is None
    ]
    assert collections, "the controller never listed Secrets"
    selector = f"{mailroute.AUTH_HTTP_LABEL}={mailroute.AUTH_HTTP_LABEL_VALUE}"
    assert {request.params.get("labelSelector") for request in collections} == {selector}
