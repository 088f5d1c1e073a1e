"""deploy/ is the chart rendered with its default values: a test fails when it is stale.

deploy.render is what `make render` runs; rendering again must give exactly the files in deploy/,
with no leftover numbered file. The deliberate differences from the chart's defaults (the token
and push TLS Secrets the user creates) must be what deploy/README.md tells the user to create; the
only other Secret mounted is the snapshot, which the chart creates empty and the controller fills.
"""

import yaml

from deploy import render


def test_deploy_matches_the_chart() -> None:
    expected = render.files()
    for name, content in expected.items():
        path = render.DEPLOY / name
        assert path.exists(), f"deploy/{name} is missing: run `make render`"
        assert path.read_text() == content, f"deploy/{name} is stale: run `make render`"
    on_disk = {path.name for path in render.DEPLOY.glob("*.yaml")}
    assert on_disk == set(expected), (
        f"deploy/ has files the chart no longer renders: {on_disk - set(expected)}"
    )


def test_numbered_files_are_in_apply_order_and_the_bundle_holds_them_all() -> None:
    files = render.files()
    numbered = sorted(name for name in files if render.GENERATED.fullmatch(name))
    assert numbered[:2] == [render.NAMESPACE_FILE, render.CRDS_FILE]
    kinds = [
        document["kind"] for name in numbered for document in yaml.safe_load_all(files[name]) if document
    ]
    bundle = [document["kind"] for document in yaml.safe_load_all(files[render.BUNDLE]) if document]
    assert bundle == kinds
    # Identities and roles exist before the workloads that run as them.
    assert kinds.index("Namespace") < kinds.index("CustomResourceDefinition") < kinds.index("ClusterRole")
    assert max(i for i, kind in enumerate(kinds) if kind == "ServiceAccount") < kinds.index("Deployment")


def test_deploy_brings_no_token_and_says_how_to_create_it() -> None:
    documents = [d for d in yaml.safe_load_all(render.files()[render.BUNDLE]) if d]
    # The one Secret is the routing table snapshot, rendered empty (the controller fills it): a
    # committed token would be everyone's.
    [snapshot_secret] = [d for d in documents if d["kind"] == "Secret"]
    assert "data" not in snapshot_secret and "stringData" not in snapshot_secret
    deployments = [d for d in documents if d["kind"] == "Deployment"]
    secrets = [
        volume["secret"]
        for d in deployments
        for volume in d["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    ]
    required = [secret["secretName"] for secret in secrets if not secret.get("optional")]
    # The controller's (token, certificate and key), then the proxy's (token, CA).
    assert required == [render.PUSH_TOKEN_SECRET, render.PUSH_TLS_SECRET] * 2
    [controller] = [d for d in deployments if d["metadata"]["name"].endswith("-controller")]
    arguments = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    snapshot = arguments[arguments.index("--snapshot-secret") + 1]
    assert [secret["secretName"] for secret in secrets if secret.get("optional")] == [snapshot]
    assert snapshot_secret["metadata"]["name"] == snapshot
    readme = (render.DEPLOY / "README.md").read_text()
    assert f"create secret generic {render.PUSH_TOKEN_SECRET}" in readme
    assert f"create secret generic {render.PUSH_TLS_SECRET}" in readme
    assert "--from-file=tls.crt --from-file=tls.key --from-file=ca.crt" in readme
    assert f"--namespace {render.NAMESPACE}" in readme


def test_every_template_has_a_place_in_deploy() -> None:
    placed = {template for _, templates in render.LAYOUT for template in templates}
    templates = {path.name for path in (render.CHART / "templates").glob("*.yaml")}
    assert templates == placed
