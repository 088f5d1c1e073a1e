"""The controller's RBAC is exactly enough: every (verb, resource) it asked the API for in the
operator's end-to-end tests is granted by the chart, and nothing else is.

The record comes from tests/kube: its emulator notes each request per bearer token, and the
``controller_accesses`` fixture (re-exported by this folder's conftest.py) keeps the union of
every controller run of the session in one JSON file. conftest.py runs this file last, so in a
full run the operator tests have recorded by then; when they were not part of this session
(``pytest tests/charts``), this test runs them in a child pytest to get the record.

Discovery requests (/api, /apis/GROUP/VERSION) need no rule here: Kubernetes grants them to every
authenticated user through its default system:discovery ClusterRole.
"""

import argparse
import fnmatch
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from controller import operator
from deploy import render
from tests.charts.conftest import container, objects, one, rendered
from tests.kube.conftest import AccessLog

# The nonResourceURLs of Kubernetes' default system:discovery ClusterRole (bound to
# system:authenticated): what every identity may GET without a rule of its own.
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi", "/openapi/*")
# A child run of the operator tests: bounded well within the per-test timeout below.
CHILD_TIMEOUT_SECONDS = 840

Access = tuple[str, str, str]  # (verb, API group, resource or resource/subresource)


def granted_rules(
    documents: Sequence[Mapping[str, Any]], account: str, namespace: str
) -> list[Mapping[str, Any]]:
    """Every rule of every Role and ClusterRole bound to the ServiceAccount ``namespace/account``."""
    by_name = {
        (doc["kind"], doc["metadata"]["name"]): doc for doc in documents if doc["kind"].endswith("Role")
    }
    rules: list[Mapping[str, Any]] = []
    for binding in documents:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        if subject not in binding["subjects"]:
            continue
        reference = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert reference in by_name, f"{binding['metadata']['name']} binds a role the chart does not ship"
        rules += by_name[reference]["rules"]
    assert rules, f"no role is bound to {namespace}/{account}"
    return rules


def expand(rules: Sequence[Mapping[str, Any]]) -> set[Access]:
    grants = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule, "the controller needs no non-resource URL of its own"
        for verb in rule["verbs"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (verb, group, resource), f"wildcard in {rule}"
                    grants.add((verb, group, resource))
    return grants


def recorded_resource_accesses(recorded: Sequence[Mapping[str, str]]) -> set[Access]:
    accesses = set()
    for entry in recorded:
        if "non_resource_url" in entry:
            url = entry["non_resource_url"]
            assert any(fnmatch.fnmatchcase(url, pattern) for pattern in DISCOVERY_URLS), (
                f"the controller asked for {url}, which no default role grants"
            )
            continue
        resource = entry["resource"] + (f"/{entry['subresource']}" if entry.get("subresource") else "")
        accesses.add((entry["verb"], entry.get("group", ""), resource))
    return accesses


def operator_record(log: AccessLog, scratch: Path) -> list[dict[str, str]]:
    """The session's record, or a child run's when the operator tests did not run in this one."""
    if log.path.exists():
        return log.load()
    basetemp = scratch / "operator-tests"
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/kube",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={basetemp}",
        ],
        cwd=render.ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    assert child.returncode == 0, (
        f"the operator tests that record the accesses failed:\n{child.stdout[-4000:]}"
    )
    return AccessLog(basetemp / log.path.name).load()


@pytest.mark.timeout(CHILD_TIMEOUT_SECONDS + 60)
def test_controller_rbac_is_exactly_what_the_controller_uses(
    controller_accesses: AccessLog, tmp_path: Path
) -> None:
    used = recorded_resource_accesses(operator_record(controller_accesses, tmp_path))
    assert used, "the record is empty"
    # The operator tests run both modes; only kopf's namespaced mode lists Namespaces.
    for scenario, needed in (("default", used), ("all-namespaces", used - LIST_NAMESPACES)):
        documents = [document.body for document in rendered(scenario)]
        account = one(scenario, "ServiceAccount", "controller")["metadata"]
        grants = expand(granted_rules(documents, account["name"], account["namespace"]))
        missing = sorted(needed - grants)
        assert not missing, (
            f"{scenario}: the controller needs these and the chart does not grant them: {missing}"
        )
        unused = sorted(grants - needed)
        assert not unused, (
            f"{scenario}: the chart grants these and the controller never used them "
            f"(did every tests/kube test run?): {unused}"
        )


def grants_by_namespace(scenario: str) -> dict[str | None, set[Access]]:
    """What the controller's ServiceAccount may do, per namespace of the Roles bound to it (None:
    the ClusterRoles', in every namespace and on cluster-scoped kinds)."""
    documents = [document.body for document in rendered(scenario)]
    account = one(scenario, "ServiceAccount", "controller")["metadata"]
    subject = {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc
        for doc in documents
        if doc["kind"] in ("Role", "ClusterRole")
    }
    found: dict[str | None, set[Access]] = {}
    for binding in documents:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding") or subject not in binding["subjects"]:
            continue
        namespace = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        kind = binding["roleRef"]["kind"]
        role = roles[kind, namespace if kind == "Role" else None, binding["roleRef"]["name"]]
        found.setdefault(namespace, set()).update(expand(role["rules"]))
    return found


def _list_watch(group: str, resource: str) -> set[Access]:
    return {("list", group, resource), ("watch", group, resource)}


LIST_NAMESPACES = _list_watch("", "namespaces")
CRDS = _list_watch("apiextensions.k8s.io", "customresourcedefinitions")
# What kopf lists and watches wherever it watches (the proxy pods' namespace included).
READS = (
    _list_watch("mailgress.io", "mailroutes")
    | _list_watch("", "services")
    | _list_watch("discovery.k8s.io", "endpointslices")
    | _list_watch("", "secrets")
    | _list_watch("", "pods")
)
# What the controller writes where it serves MailRoutes.
WRITES = {("patch", "mailgress.io", "mailroutes/status"), ("create", "", "events"), ("patch", "", "events")}
SNAPSHOT = {("get", "", "secrets"), ("patch", "", "secrets")}  # by name, see the test below


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        pytest.param(
            "default",
            {None: LIST_NAMESPACES | CRDS, render.NAMESPACE: READS | WRITES | SNAPSHOT},
            id="its-own-namespace",
        ),
        pytest.param(
            "watch-namespaces",
            {
                None: LIST_NAMESPACES | CRDS,
                "mail": READS | WRITES,
                "team-a": READS | WRITES,
                render.NAMESPACE: READS | SNAPSHOT,
            },
            id="listed-namespaces",
        ),
        pytest.param(
            "all-namespaces", {None: CRDS | READS | WRITES, render.NAMESPACE: SNAPSHOT}, id="every-namespace"
        ),
    ],
)
def test_the_controller_has_rights_where_it_serves_mailroutes(
    scenario: str, expected: dict[str | None, set[Access]]
) -> None:
    """Roles in the served namespaces (writes there only), read rules where kopf also watches (the
    release's namespace, for the proxy pods); a ClusterRole for cluster-scoped kinds, and for the
    rest only when every namespace is served. The Deployment's flags name the same namespaces:
    parsed as ``mailgress controller`` parses them."""
    assert grants_by_namespace(scenario) == expected
    flags = argparse.ArgumentParser()
    operator.add_arguments(flags)
    arguments = flags.parse_args(container(one(scenario, "Deployment", "controller"))["args"][1:])
    environ = {"POD_NAMESPACE": render.NAMESPACE}
    served = operator.settings_from(arguments, environ).watch_namespaces
    written = {namespace for namespace, grants in expected.items() if grants >= WRITES}
    assert served == (None if written == {None} else written)


@pytest.mark.parametrize("scenario", ["default", "watch-namespaces", "all-namespaces"])
def test_only_the_snapshot_secret_is_read_and_patched_by_name(scenario: str) -> None:
    """The controller writes one Secret, in its own namespace, and may get or patch no other;
    it may create none (with create and get on Secrets it could mint and read a token of any
    ServiceAccount of the namespace: the chart creates the snapshot Secret instead); elsewhere
    it may only list and watch Secrets (auth_http headersFrom, selected by label); it has no
    rights on ConfigMaps at all (the snapshot of an earlier release is left alone)."""
    documents = [document.body for document in rendered(scenario)]
    controller_roles = [
        doc
        for doc in documents
        if doc["kind"] in ("Role", "ClusterRole")
        and doc["metadata"]["labels"].get("app.kubernetes.io/component") == "controller"
    ]
    arguments = container(one(scenario, "Deployment", "controller"))["args"]
    snapshot = arguments[arguments.index("--snapshot-secret") + 1]
    by_name = [rule for role in controller_roles for rule in role["rules"] if "resourceNames" in rule]
    assert by_name == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [snapshot], "verbs": ["get", "patch"]}
    ]
    [holder] = [role for role in controller_roles if by_name[0] in role["rules"]]
    assert (holder["kind"], holder["metadata"]["namespace"]) == ("Role", render.NAMESPACE)
    assert [secret["metadata"]["name"] for secret in objects(scenario, "Secret")].count(snapshot) == 1
    for role in controller_roles:
        assert all("configmaps" not in rule["resources"] for rule in role["rules"])
        on_secrets = [
            rule for rule in role["rules"] if "secrets" in rule["resources"] and rule not in by_name
        ]
        assert all(rule["verbs"] == ["list", "watch"] for rule in on_secrets)
