"""The standalone route source: edits reach the table, broken edits keep the last good one."""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailgress import standalone
from proxy import metrics as proxy_metrics
from proxy import table
from proxy.server.routes import TableHolder
from proxy.table import Endpoint

ROUTE = """
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {{name: r, namespace: mail}}
spec:
  domains: ["{domain}"]
  imap: {{backend: {{service: dovecot, port: 143}}}}
"""
SERVICES = {("mail", "dovecot", "143"): (Endpoint("127.0.0.1", 10143),)}
WAIT = 10.0


async def wait_for(condition: Callable[[table.RoutingTable], bool], holder: TableHolder) -> None:
    for _ in range(int(WAIT / 0.01)):
        if condition(holder.current):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the table did not change in time")


def routes_domain(current: table.RoutingTable) -> str:
    return current.routes[0].domains[0] if current.routes else ""


async def test_edits_apply_and_broken_files_keep_the_last_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE.format(domain="a.example"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    watcher = asyncio.create_task(standalone.watch([path], SERVICES, holder))
    try:
        await wait_for(lambda current: routes_domain(current) == "a.example", holder)
        path.write_text(ROUTE.format(domain="b.example"))
        await wait_for(lambda current: routes_domain(current) == "b.example", holder)
        good = holder.current.version
        with caplog.at_level(logging.ERROR):
            path.write_text("kind: [unclosed\n")
            for _ in range(int(WAIT / 0.01)):
                if "not valid YAML" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # several polls: reported once, table kept
        assert holder.current.version == good
        assert caplog.text.count("not valid YAML") == 1
        path.write_text(ROUTE.format(domain="c.example"))
        await wait_for(lambda current: routes_domain(current) == "c.example", holder)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def bodies_of(tmp_path: Path, text: str) -> list[Mapping[str, Any]]:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return standalone.mailroute_bodies(standalone.read_manifests([path]))


def names(bodies: list[Mapping[str, Any]]) -> list[str]:
    return [body["metadata"]["name"] for body in bodies]


OTHER_KINDS = """
apiVersion: v1
kind: Service
metadata: {name: dovecot, namespace: mail}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dovecot, namespace: mail}
"""


@pytest.mark.parametrize(
    ("api_version", "kind", "field"),
    [
        pytest.param("mailgress.io/v1alpha2", "MailRoute", "apiVersion", id="another-version"),
        pytest.param("mailgres.io/v1alpha1", "MailRoute", "apiVersion", id="another-group"),
        pytest.param("mailgress.io/v1alpha1", "Mailroute", "kind", id="kind-in-other-letters"),
        pytest.param("mailgress.io/v1alpha1", "MailRoutes", "kind", id="kind-of-the-group-misspelt"),
        pytest.param(None, "MailRoute", "apiVersion", id="no-api-version"),
        pytest.param("mailgress.io/v1alpha1", None, "kind", id="no-kind"),
    ],
)
def test_a_mistyped_mailroute_becomes_invalid_naming_the_field_and_other_kinds_are_skipped(
    tmp_path: Path, api_version: str | None, kind: str | None, field: str
) -> None:
    """kubectl apply refuses such a document: the file must not pass as if it were not there."""
    envelope = {"apiVersion": api_version, "kind": kind}
    head = "".join(f"{key}: {value}\n" for key, value in envelope.items() if value is not None)
    typo = ROUTE.format(domain="a.example").replace(
        "apiVersion: mailgress.io/v1alpha1\nkind: MailRoute\n", head
    )
    bodies = bodies_of(tmp_path, OTHER_KINDS + "---" + typo)
    assert names(bodies) == ["r"]
    compiled, problems = standalone.compile_bodies(bodies, SERVICES)
    assert compiled.table.routes == ()
    accepted = [problem for problem in problems if problem.message.startswith("Accepted=")]
    assert [problem.route for problem in accepted] == ["mail/r"]
    assert accepted[0].message.startswith(f"Accepted=False (Invalid): {field}: Unsupported value")


KUBECTL_LIST = """
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: mailgress.io/v1alpha1
  kind: MailRoute
  metadata: {name: alpha, namespace: mail, creationTimestamp: "2026-01-01T00:00:00Z", generation: 3}
  spec:
    domains: ["alpha.example"]
    imap: {backend: {service: dovecot, port: 143}}
- apiVersion: v1
  kind: Service
  metadata: {name: dovecot, namespace: mail}
- apiVersion: mailgress.io/v1alpha2
  kind: MailRoute
  metadata: {name: beta, namespace: mail}
"""


def test_the_items_of_a_list_are_the_documents(tmp_path: Path) -> None:
    """What ``kubectl get mr -A -o yaml`` writes (and a MailRouteList from the API): its items,
    each as a document of its own."""
    assert names(bodies_of(tmp_path, KUBECTL_LIST)) == ["alpha", "beta"]
    typed = KUBECTL_LIST.replace(
        "apiVersion: v1\nkind: List", "apiVersion: mailgress.io/v1alpha1\nkind: MailRouteList"
    )
    assert names(bodies_of(tmp_path, typed)) == ["alpha", "beta"]
    compiled, _ = standalone.compile_bodies(bodies_of(tmp_path, KUBECTL_LIST), SERVICES)
    assert [route.name for route in compiled.table.routes] == ["mail/alpha"]
    assert bodies_of(tmp_path, "apiVersion: v1\nkind: List\nitems: []\n") == []


@pytest.mark.parametrize("items", ["{}", "[just, words]", "[null]"])
def test_a_list_whose_items_are_no_objects_is_refused(tmp_path: Path, items: str) -> None:
    with pytest.raises(standalone.ManifestError, match="the items of a List must be a list of mappings"):
        bodies_of(tmp_path, f"apiVersion: v1\nkind: List\nitems: {items}\n")
