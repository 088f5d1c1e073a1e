"""The standalone route source: edits reach the table, broken edits keep the last good one."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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


TYPO_ROUTES = """
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {{name: alpha, namespace: mail}}
spec:
  domains: [alpha.example]
  imap: {{backend: {{service: dovecot, port: 143}}, tls: {tls}}}
---
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {{name: beta, namespace: mail}}
spec:
  domains: [{beta}]
  imap: {{backend: {{service: {service}, port: 143}}}}
"""
TYPO = 'spec.imap.tls: Unsupported value: "startls"'


class CountedReads:
    """``read_manifests`` counting the watcher's polls, so a test waits for polls, not time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._read = standalone.read_manifests
        monkeypatch.setattr(standalone, "read_manifests", self)

    def __call__(self, paths: Sequence[Path]) -> list[tuple[Path, bytes]]:
        self.count += 1
        return self._read(paths)

    async def wait(self, polls: int) -> None:
        target = self.count + polls
        for _ in range(int(WAIT / 0.01)):
            if self.count >= target:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the watcher did not poll {polls} times in time")


@contextlib.asynccontextmanager
async def watching(paths: list[Path], holder: TableHolder) -> AsyncIterator[None]:
    watcher = asyncio.create_task(standalone.watch(paths, SERVICES, holder))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def route_names(current: table.RoutingTable) -> list[str]:
    return [route.name for route in current.routes]


async def test_an_invalid_route_in_an_edit_keeps_its_last_version_and_the_rest_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in one field (review M1, LOW 3): kubectl apply would refuse the object and leave
    the route as it was; the watcher used to install the table without it, so its users got
    "authentication failed" and counted towards the lockout. Then (review N1) the whole edit was
    held back; the API server refuses the one object and stores every other change."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    reads = CountedReads(monkeypatch)
    path = tmp_path / "routes.yaml"
    path.write_text(TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path], holder):
        await wait_for(lambda current: route_names(current) == ["mail/alpha", "mail/beta"], holder)
        alpha = holder.current.routes[0]
        with caplog.at_level(logging.WARNING, logger="mailgress.standalone"):
            # The typo, and beside it a change of another route: that one is applied.
            path.write_text(TYPO_ROUTES.format(tls="startls", beta="other.example", service="dovecot"))
            await wait_for(lambda current: current.routes[-1].domains == ("other.example",), holder)
            await reads.wait(5)  # several polls after the change
        assert holder.current.routes == (alpha, holder.current.routes[1])  # alpha as it was
        assert [record.levelname for record in caplog.records] == ["ERROR"], caplog.text  # once a change
        assert caplog.records[0].getMessage() == (
            f"{path}: MailRoute mail/alpha: Accepted=False (Invalid): {TYPO}: supported values: "
            '"none", "starttls", "tls"; its last applied version stays in use; the other changes are applied'
        )
        path.write_text(TYPO_ROUTES.format(tls="starttls", beta="other.example", service="dovecot"))
        await wait_for(lambda current: current.routes[0] != alpha, holder)
        assert route_names(holder.current) == ["mail/alpha", "mail/beta"]
        upstream = holder.current.routes[0].upstream("imap")
        assert upstream is not None and upstream.tls == "starttls"


METADATA_TYPOS = {
    "uppercase-name": ("name: alpha, namespace", "name: Alpha, namespace"),
    "underscore-name": ("name: alpha, namespace", "name: alpha_1, namespace"),
    "misspelt-name-key": ("{name: alpha, namespace", "{nmae: alpha, namespace"),
    "misspelt-metadata-key": ("metadata: {name: alpha", "metdata: {name: alpha"),
}


@pytest.mark.parametrize("typo", METADATA_TYPOS)
async def test_a_typo_in_a_routes_metadata_keeps_the_route_its_file_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, typo: str
) -> None:
    """Review O4: a typo in the name (or in metadata) makes an Invalid document of another key,
    so the route last applied from the file was dropped (its users got "authentication failed").
    A file holding an Invalid document is mid-edit: what it applied and no longer defines stays."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    reads = CountedReads(monkeypatch)
    path = tmp_path / "routes.yaml"
    text = TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot")
    path.write_text(text)
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path], holder):
        await wait_for(lambda current: route_names(current) == ["mail/alpha", "mail/beta"], holder)
        alpha = holder.current.routes[0]
        old, new = METADATA_TYPOS[typo]
        with caplog.at_level(logging.ERROR, logger="mailgress.standalone"):
            # The typo, and beside it a change of beta: that one is applied, alpha kept.
            path.write_text(text.replace(old, new, 1).replace("beta.example", "other.example"))
            await wait_for(lambda current: current.routes[-1].domains == ("other.example",), holder)
            await reads.wait(5)  # several polls after the change
        assert holder.current.routes[0] == alpha
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 2 and "Accepted=False (Invalid)" in messages[0], messages
        assert messages[1] == (
            f"{path}: holds an Invalid MailRoute; MailRoute mail/alpha, applied from it and no longer"
            " in it, stays in use as last applied until the file is valid"
        )
        # Fixed: alpha as written now; then a valid rename drops the old name.
        path.write_text(text.replace("tls: none", "tls: starttls"))
        await wait_for(lambda current: current.routes[0] != alpha, holder)
        assert route_names(holder.current) == ["mail/alpha", "mail/beta"]
        path.write_text(text.replace("name: alpha, namespace", "name: alpha2, namespace"))
        await wait_for(lambda current: route_names(current) == ["mail/alpha2", "mail/beta"], holder)


async def test_a_valid_rename_drops_the_old_route_though_another_file_is_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the routes of the file mid-edit are kept: an Invalid document elsewhere keeps none."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    path, other = tmp_path / "routes.yaml", tmp_path / "other.yaml"
    text = TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot")
    path.write_text(text)
    other.write_text(ROUTE.format(domain="a.example"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path, other], holder):
        await wait_for(lambda current: len(current.routes) == 3, holder)
        other.write_text(ROUTE.format(domain="a.example").replace("name: r", "name: R"))
        path.write_text(text.replace("name: alpha, namespace", "name: alpha2, namespace"))
        await wait_for(lambda current: "mail/alpha2" in route_names(current), holder)
        assert route_names(holder.current) == ["mail/alpha2", "mail/beta", "mail/r"]


async def test_deleting_a_kept_invalid_route_removes_it_and_a_new_invalid_one_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A route kept at its last version while its document is Invalid goes when the document
    goes (kubectl delete); an Invalid route never applied has no version to keep."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    path, other = tmp_path / "routes.yaml", tmp_path / "other.yaml"
    path.write_text(TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot"))
    other.write_text("")
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path, other], holder):
        await wait_for(lambda current: route_names(current) == ["mail/alpha", "mail/beta"], holder)
        path.write_text(TYPO_ROUTES.format(tls="startls", beta="other.example", service="dovecot"))
        await wait_for(lambda current: current.routes[-1].domains == ("other.example",), holder)
        assert route_names(holder.current) == ["mail/alpha", "mail/beta"]
        # Its document deleted (the Invalid alpha), the route is gone from the table.
        path.write_text(
            TYPO_ROUTES.format(tls="startls", beta="other.example", service="dovecot").split("---")[1]
        )
        await wait_for(lambda current: route_names(current) == ["mail/beta"], holder)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mailgress.standalone"):
            # alpha comes back Invalid: no version to keep, left out; r, beside it, is applied.
            other.write_text(
                TYPO_ROUTES.format(tls="startls", beta="beta.example", service="dovecot").split("---")[0]
                + "---"
                + ROUTE.format(domain="a.example")
            )
            await wait_for(lambda current: route_names(current) == ["mail/beta", "mail/r"], holder)
    assert [record.getMessage() for record in caplog.records] == [
        f"{other}: MailRoute mail/alpha: Accepted=False (Invalid): {TYPO}: supported values: "
        '"none", "starttls", "tls"; left out of the routing table'
    ]


async def test_a_route_copied_into_a_second_file_keeps_the_table_and_names_both_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two copies of one namespace/name (the API server cannot hold both) are Invalid: the
    route in use stays as it was, not dropped for both copies."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    reads = CountedReads(monkeypatch)
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(ROUTE.format(domain="a.example"))
    second.write_text("")
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([first, second], holder):
        await wait_for(lambda current: routes_domain(current) == "a.example", holder)
        good = holder.current
        with caplog.at_level(logging.ERROR, logger="mailgress.standalone"):
            second.write_text(ROUTE.format(domain="b.example"))
            await reads.wait(3)
        assert holder.current is good
    [error] = [record.getMessage() for record in caplog.records]
    assert error.startswith(
        f'{first}, {second}: MailRoute mail/r: Accepted=False (Invalid): metadata.name: Duplicate value: "r"'
    )


async def test_routes_the_api_server_takes_are_applied_with_their_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only an Invalid object holds an edit back: a backend not found (or a conflict) is what
    the cluster would report on a stored object, and the table takes the route as compiled."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    path = tmp_path / "routes.yaml"
    path.write_text(TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path], holder):
        await wait_for(lambda current: len(current.routes) == 2, holder)
        good = holder.current.version
        with caplog.at_level(logging.WARNING, logger="mailgress.standalone"):
            path.write_text(TYPO_ROUTES.format(tls="none", beta="alpha.example", service="nowhere"))
            await wait_for(lambda current: current.version != good, holder)
        assert route_names(holder.current) == ["mail/alpha"]  # beta: Conflicted with the older alpha
        assert "MailRoute mail/beta: Accepted=False (Conflicted)" in caplog.text
        assert not [record for record in caplog.records if record.levelno == logging.ERROR]
        path.write_text(TYPO_ROUTES.format(tls="none", beta="beta.example", service="nowhere"))
        await wait_for(lambda current: len(current.routes) == 2, holder)
        assert "MailRoute mail/beta: ResolvedRefs=False (BackendNotFound)" in caplog.text


async def test_an_invalid_route_at_start_is_left_out_with_an_error_and_later_edits_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No earlier version to keep: the other routes are served (as the cluster would serve them
    without the refused object), one ERROR (no WARNING besides) names the file, the route and
    the field. Review N1: every later edit used to be refused for good while it stayed Invalid."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    good = tmp_path / "good.yaml"
    good.write_text(ROUTE.format(domain="a.example"))
    path = tmp_path / "routes.yaml"
    path.write_text(TYPO_ROUTES.format(tls="startls", beta="beta.example", service="dovecot"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    error = (
        f"{path}: MailRoute mail/alpha: Accepted=False (Invalid): {TYPO}: supported values: "
        '"none", "starttls", "tls"; left out of the routing table'
    )
    with caplog.at_level(logging.WARNING, logger="mailgress.standalone"):
        async with watching([good, path], holder):
            await wait_for(lambda current: holder.ready, holder)
            assert route_names(holder.current) == ["mail/beta", "mail/r"]
            assert [record.getMessage() for record in caplog.records] == [error]
            good.write_text(ROUTE.format(domain="b.example"))  # an edit of another file
            await wait_for(lambda current: current.routes[-1].domains == ("b.example",), holder)
            good.write_text("")  # and a deletion
            await wait_for(lambda current: route_names(current) == ["mail/beta"], holder)
    assert [record.getMessage() for record in caplog.records] == [error] * 3  # once per change


async def test_a_kept_route_lives_in_the_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Files have no stored last-applied version (README): a restart with the file still Invalid
    leaves the route out, with the ERROR."""
    monkeypatch.setattr(standalone, "POLL_INTERVAL", 0.01)
    path = tmp_path / "routes.yaml"
    path.write_text(TYPO_ROUTES.format(tls="none", beta="beta.example", service="dovecot"))
    holder = TableHolder(proxy_metrics.create(CollectorRegistry()))
    async with watching([path], holder):
        await wait_for(lambda current: route_names(current) == ["mail/alpha", "mail/beta"], holder)
        path.write_text(TYPO_ROUTES.format(tls="startls", beta="other.example", service="dovecot"))
        await wait_for(lambda current: current.routes[-1].domains == ("other.example",), holder)
        assert route_names(holder.current) == ["mail/alpha", "mail/beta"]
    restarted = TableHolder(proxy_metrics.create(CollectorRegistry()))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mailgress.standalone"):
        async with watching([path], restarted):
            await wait_for(lambda current: restarted.ready, restarted)
    assert route_names(restarted.current) == ["mail/beta"]
    assert [record.getMessage().rpartition("; ")[2] for record in caplog.records] == [
        "left out of the routing table"
    ]


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
