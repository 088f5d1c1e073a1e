"""The chart: helm lint in strict mode, every value set rendered, the values schema refusing bad
values with a message that names the key, and what the rendered objects promise each other.

The proxy's settings ConfigMap is parsed with proxy.settings.parse and the controller's arguments
with controller.operator's own parser, so the chart, the proxy and the controller cannot disagree
on a format, a file path, a port or a label without a test failing here.
"""

import asyncio
import base64
import ipaddress
import json
import random
import re
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml

from controller import mailroute, operator, publisher, reconciler
from deploy import render
from mailgress import cli
from proxy import settings as proxy_settings
from proxy.server import certificates, subscriber
from tests.charts.conftest import (
    EDGE_LISTENER_NAMES,
    EDGE_NAMES_VALUES,
    SCENARIOS,
    container,
    objects,
    one,
    rendered,
    rendered_edge_names,
    values,
)

RELEASE_NAMESPACE = render.NAMESPACE
# The well-known mail ports (IANA): IMAP, IMAPS, POP3, POP3S, submission, submissions, SMTP.
MAIL_PORTS = {143, 993, 110, 995, 587, 465, 25}
# Helm's only remark about this chart: it ships no icon (an INFO, which strict mode allows).
ACCEPTED_LINT_MESSAGES = [{"severity": 1, "path": "Chart.yaml", "error": "icon is recommended"}]
# Kinds that live in a namespace (everything the chart renders but RBAC's cluster objects).
CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding"}
# Kubernetes object names: RFC 1123 DNS labels for Services, at most 63 characters everywhere here
# but for RBAC's objects, whose names are path segments (ValidateRBACName; Helm's lint applies the
# same rule): any length, only not "." or "..", and neither '/' nor '%' in them.
MAX_NAME = 63
RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
NOT_IN_PATH_SEGMENTS = ("/", "%")
# The suffixes of the cluster-scoped objects' names: the controller's ClusterRole and binding, the
# MailRoute roles aggregated into admin, edit and view.
CLUSTER_SUFFIXES = ("controller", "mailroutes-edit", "mailroutes-view")
ALL = list(SCENARIOS)
# The push TLS Secret of a release named mailgress, and the name proxies reach the controller by.
PUSH_TLS_SECRET = "mailgress-push-tls"
CONTROLLER_HOST = f"mailgress-controller.{RELEASE_NAMESPACE}.svc"
SCRAPED_OVER_TLS = {
    "scheme": "https",
    "tlsConfig": {
        "ca": {"secret": {"name": PUSH_TLS_SECRET, "key": "ca.crt"}},
        "serverName": CONTROLLER_HOST,
    },
}
BOUND = 10.0  # seconds a TLS connection to a local controller may take before a test fails


def settings_of(scenario: str) -> tuple[Mapping[str, Any], proxy_settings.ProxySettings]:
    """The proxy settings document the chart renders, and what proxy.settings.parse makes of it."""
    configmap = one(scenario, "ConfigMap", "proxy")
    document = yaml.safe_load(configmap["data"]["settings.yaml"])
    command = cli.parser().parse_args(container(one(scenario, "Deployment", "proxy"))["args"])
    assert command.command == "proxy"
    return document, proxy_settings.parse(document, Path(command.config).parent)


def mounted_files(deployment: Mapping[str, Any]) -> dict[PurePosixPath, tuple[str, str, str]]:
    """Every file the pod's volumes put in the container: path -> (volume kind, source name, key)."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files = {}
    for mount in container(deployment)["volumeMounts"]:
        assert "subPath" not in mount, "subPath mounts never see updates of their Secret or ConfigMap"
        volume = volumes[mount["name"]]
        for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
            if kind in volume:
                source = volume[kind]
                for item in source.get("items", []):
                    path = PurePosixPath(mount["mountPath"]) / item["path"]
                    files[path] = (kind, source[name_key], item["key"])
    return files


def pod_labels(scenario: str, component: str) -> Mapping[str, str]:
    labels: Mapping[str, str] = one(scenario, "Deployment", component)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# ---------------------------------------------------------------------------------------------
# Lint, render, schema


@pytest.mark.parametrize("kube_version", ["v1.30.0", "v1.37.0"])
@pytest.mark.parametrize("scenario", ALL)
def test_lint_strict_is_clean(scenario: str, kube_version: str) -> None:
    report = helm.lint(
        render.CHART,
        dict(SCENARIOS[scenario]),
        strict=True,
        namespace=RELEASE_NAMESPACE,
        kube_version=kube_version,
    )
    assert report["errors"] == []
    assert report["messages"] == ACCEPTED_LINT_MESSAGES


@pytest.mark.parametrize("scenario", ALL)
def test_every_value_set_renders_named_namespaced_objects(scenario: str) -> None:
    documents = rendered(scenario)
    assert {"Deployment", "Service", "ConfigMap", "ClusterRole", "Role"} <= {
        document.body["kind"] for document in documents
    }
    for document in documents:
        metadata = document.body["metadata"]
        if document.body["kind"] not in RBAC_KINDS:
            assert len(metadata["name"]) <= MAX_NAME, metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/instance"] == render.RELEASE
        if document.body["kind"] in CLUSTER_KINDS:
            continue
        # The controller's Roles go where it serves MailRoutes (controller.watchNamespaces).
        served = SCENARIOS[scenario].get("controller", {}).get("watchNamespaces", [])
        if document.template == "controller-rbac.yaml" and metadata["namespace"] in served:
            assert document.body["kind"] in ("Role", "RoleBinding"), metadata["name"]
        else:
            assert metadata["namespace"] == RELEASE_NAMESPACE, (document.template, metadata["name"])


# Helm's longest release name, and Kubernetes' longest namespace name (a DNS-1123 label).
LONGEST_RELEASE = "r" * 53
LONGEST_NAMESPACE = "n" * 63


def cluster_name(namespace: str, fullname: str, suffix: str) -> str:
    """A cluster-scoped object's name: no namespace name holds a ':', so none is another's."""
    return f"{namespace}:{fullname}-{suffix}"


@pytest.mark.parametrize("release", ["x" * 42, LONGEST_RELEASE])
def test_every_name_fits_its_kinds_rule_with_the_longest_names(release: str) -> None:
    """Every object of the monitoring set (the one that renders the most), the proxies' admin
    Service included, fits 63 characters; the cluster-scoped objects, whose names carry the
    namespace, are path segments of any length and are never cut."""
    documents = render.documents(SCENARIOS["monitoring"], release=release, namespace=LONGEST_NAMESPACE)
    names = {(document.body["kind"], document.body["metadata"]["name"]) for document in documents}
    assert ("Service", f"{release}-mailgress"[:51] + "-proxy-admin") in names
    assert len(names) == len(documents), "two objects of one kind share a name"
    namespaced = [name for kind, name in names if kind not in CLUSTER_KINDS]
    assert max(len(name) for name in namespaced) <= MAX_NAME, max(namespaced, key=len)
    fullname = f"{release}-mailgress"
    assert {(kind, name) for kind, name in names if kind in CLUSTER_KINDS} == {
        ("ClusterRole", cluster_name(LONGEST_NAMESPACE, fullname, suffix)) for suffix in CLUSTER_SUFFIXES
    } | {("ClusterRoleBinding", cluster_name(LONGEST_NAMESPACE, fullname, "controller"))}
    for kind, name in names:
        if kind in RBAC_KINDS:
            assert name not in (".", "..") and not any(c in name for c in NOT_IN_PATH_SEGMENTS), name


def cluster_objects(release: str, namespace: str) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(kind, name) -> the release's cluster-scoped objects."""
    return {
        (document.body["kind"], document.body["metadata"]["name"]): document.body
        for document in render.documents({}, release=release, namespace=namespace)
        if document.body["kind"] in CLUSTER_KINDS
    }


@pytest.mark.parametrize(
    "releases",
    [
        # Helm lets a release name be used once per namespace.
        (("mailgress", "mail-a"), ("mailgress", "mail-b")),
        # Alike once namespace and name are joined by '-': "mail-prod" + "eu", "mail" + "prod-eu".
        (("eu", "mail-prod"), ("prod-eu", "mail")),
        (("mailgress", "mx-a"), ("a-mailgress", "mx")),
        # The longest names, alike but for their last character.
        ((LONGEST_RELEASE, LONGEST_NAMESPACE[:-1] + "a"), (LONGEST_RELEASE, LONGEST_NAMESPACE[:-1] + "b")),
    ],
)
def test_releases_in_two_namespaces_own_distinct_cluster_objects(
    releases: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    """The ClusterRoles and the binding of each release are its own, binding its own controller:
    shared ones would be another release's to Helm, which refuses to install the second."""
    first, second = (cluster_objects(release, namespace) for release, namespace in releases)
    assert sorted(kind for kind, _ in first) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    assert set(first).isdisjoint(second)
    for (_, namespace), found in zip(releases, (first, second), strict=True):
        [binding] = [body for (kind, _), body in found.items() if kind == "ClusterRoleBinding"]
        assert ("ClusterRole", binding["roleRef"]["name"]) in found
        assert [subject["namespace"] for subject in binding["subjects"]] == [namespace]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"proxy": {"replicas": 0}}, "at '/proxy/replicas': minimum: got 0, want 1"),
        ({"proxy": {"replica": 3}}, "at '/proxy': additional properties 'replica' not allowed"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        (
            {
                "proxy": {
                    "listeners": [{"name": "imap", "protocol": "imap", "port": 70000, "containerPort": 1143}]
                }
            },
            "at '/proxy/listeners/0/port': maximum: got 70,000, want 65,535",
        ),
        (
            {
                "proxy": {
                    "listeners": [{"name": "imap", "protocol": "imap", "port": 143, "containerPort": 143}]
                }
            },
            "at '/proxy/listeners/0/containerPort': minimum: got 143, want 1,024",
        ),
        (
            {
                "proxy": {
                    "listeners": [{"name": "news", "protocol": "nntp", "port": 119, "containerPort": 1119}]
                }
            },
            "at '/proxy/listeners/0/protocol': value must be one of 'imap', 'pop3', 'submission', 'smtp'",
        ),
        (
            {
                "proxy": {
                    "listeners": [
                        {
                            "name": "imaps",
                            "protocol": "imap",
                            "port": 993,
                            "containerPort": 1993,
                            "tls": "implicit",
                        }
                    ]
                }
            },
            "at '/proxy/listeners/0': missing property 'certificates'",
        ),
        (
            {
                "proxy": {
                    "listeners": [
                        {
                            "name": "mx",
                            "protocol": "smtp",
                            "port": 25,
                            "containerPort": 1025,
                            "tls": "starttls",
                            "starttls": "required",
                            "certificates": ["mail"],
                        }
                    ]
                }
            },
            "at '/proxy/listeners/0/starttls': value must be 'optional'",
        ),
        (
            {
                "proxy": {
                    "listeners": [
                        {
                            "name": "pop3",
                            "protocol": "pop3",
                            "port": 110,
                            "containerPort": 1110,
                            "starttls": "required",
                        }
                    ]
                }
            },
            "at '/proxy/listeners/0': missing property 'tls'",
        ),
        (
            {
                "proxy": {
                    "listeners": [
                        {
                            "name": "imap",
                            "protocol": "imap",
                            "port": 143,
                            "containerPort": 1143,
                            "proxyProtocol": {"trustedCidrs": ["10.0.0.1"]},
                        }
                    ]
                }
            },
            "at '/proxy/listeners/0/proxyProtocol/trustedCidrs/0': '10.0.0.1' does not match pattern",
        ),
        ({"proxy": {"listeners": []}}, "at '/proxy/listeners': minItems: got 0, want 1"),
        ({"proxy": {"timeouts": {"idle": 0}}}, "at '/proxy/timeouts/idle': exclusiveMinimum"),
        (
            {"proxy": {"limits": {"failedLogins": {"firstDelay": -1}}}},
            "at '/proxy/limits/failedLogins/firstDelay': minimum",
        ),
        (
            {"proxy": {"service": {"externalTrafficPolicy": "local"}}},
            "at '/proxy/service/externalTrafficPolicy': value must be one of 'Cluster', 'Local'",
        ),
        (
            {"controller": {"watchNamespaces": ["mail", "*"]}},
            "at '/controller/watchNamespaces': maxItems: got 2, want 1",
        ),
        (
            {"controller": {"watchNamespaces": ["Mail"]}},
            "at '/controller/watchNamespaces/0': 'Mail' does not match pattern",
        ),
        (
            {"controller": {"watchNamespaces": ["mail", "mail"]}},
            "at '/controller/watchNamespaces': items at 0 and 1 are equal",
        ),
        (
            {"monitoring": {"serviceMonitor": {"interval": "30 seconds"}}},
            "at '/monitoring/serviceMonitor/interval': '30 seconds' does not match pattern",
        ),
    ],
)
def test_schema_refuses_bad_values_naming_the_key(bad: dict[str, Any], message: str) -> None:
    with helm.Chart.load(render.CHART) as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(bad)
    assert message in str(refused.value)


def schema_property(*path: str) -> Mapping[str, Any]:
    """The schema of one value, by its keys from the top (items: "[]")."""
    schema: Mapping[str, Any] = json.loads((render.CHART / "values.schema.json").read_text())
    found = schema
    for key in path:
        found = found["items"] if key == "[]" else found["properties"][key]
    return found


def network_candidates() -> list[str]:
    """Networks written right and wrong, built from pieces (a seeded choice: the same every run)."""
    # Mostly good pieces, so that about a third of the candidates are networks.
    octets = ("0", "7", "10", "99", "100", "199", "249", "250", "255") * 4 + ("256", "300", "01", "")
    choose = random.Random(20261127)
    candidates = {
        ".".join(choose.choice(octets) for _ in range(4)) + f"/{prefix}"
        for prefix in ("0", "8", "24", "32", "33", "99", "")
        for _ in range(100)
    }
    groups = ("0", "1", "db8", "ffff", "FFFF") * 4 + ("", "", "12345", "g", "10.0.0.1", "300.0.0.1")
    for count in range(1, 10):
        for _ in range(150):
            address = ":".join(choose.choice(groups) for _ in range(count))
            for head, tail in (("", ""), ("::", ""), ("", "::"), ("::", "::")):
                candidates.update(f"{head}{address}{tail}/{prefix}" for prefix in ("0", "64", "128", "129"))
    return sorted(candidates)


def is_network(text: str) -> bool:
    """Whether the proxy takes ``text`` as a trusted network (proxy.settings, nginx's rule)."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def test_the_network_pattern_takes_the_networks_the_proxy_takes() -> None:
    """One pattern for trustedCidrs and loadBalancerSourceRanges: what it takes the proxy takes
    (a value it took and the proxy refused would crash-loop every pod), address bits past the
    prefix included; and it takes every network the proxy does but those with a prefix length
    written with a leading zero ("/08"). Python's re and Helm's RE2 read this pattern alike;
    test_the_schema_refuses_what_is_no_network checks a set of them through Helm."""
    [pattern] = {
        json.dumps(schema_property("proxy", "listeners", "[]", "proxyProtocol", "trustedCidrs", "[]")),
        json.dumps(schema_property("proxy", "service", "loadBalancerSourceRanges", "[]")),
    }
    cidr = json.loads((render.CHART / "values.schema.json").read_text())["definitions"]["cidr"]
    assert json.loads(pattern) == {"$ref": "#/definitions/cidr"}
    candidates = network_candidates()
    taken = {candidate for candidate in candidates if re.search(cidr["pattern"], candidate)}
    networks = {candidate for candidate in candidates if is_network(candidate)}
    assert len(taken) > 500
    assert taken <= networks
    assert {network for network in networks if not re.search(r"/0[0-9]", network)} <= taken


# Value -> whether the schema takes it.
NETWORKS_AND_NOT = {
    "10.0.0.0/8": True,
    "10.0.0.1/8": True,  # bits past the prefix: ignored, as nginx does
    "0.0.0.0/0": True,
    "fd00::/8": True,
    "::ffff:10.0.0.0/104": True,
    "2001:db8:0:0:0:0:0:1/128": True,
    "::/0": True,
    "10.0.0.0/99": False,
    "10.0.0.0/33": False,
    "300.1.1.0/24": False,
    "999.0.0.0/8": False,
    "10.0.0/8": False,
    "10.0.0.0": False,  # the proxy would read /32; the schema asks for the prefix length
    "fd00::/129": False,
    "1:::2/64": False,
    "1:2:3:4:5:6:7:8:9/64": False,
    " 10.0.0.0/8": False,
    "10.0.0.0/8\n": False,
}


def refused_items(values: dict[str, Any], key: str) -> set[int]:
    """The indexes of the list ``key`` the schema refuses in ``values``."""
    with helm.Chart.load(render.CHART) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as refused:
            return {int(index) for index in re.findall(rf"at '[^']*/{key}/([0-9]+)'", str(refused))}
    return set()


def test_the_schema_refuses_what_is_no_network() -> None:
    candidates = list(NETWORKS_AND_NOT)
    expected = {index for index, candidate in enumerate(candidates) if not NETWORKS_AND_NOT[candidate]}
    ranges = {"proxy": {"service": {"loadBalancerSourceRanges": candidates}}}
    assert refused_items(ranges, "loadBalancerSourceRanges") == expected

    def trusting(cidrs: list[str]) -> dict[str, Any]:
        listener = {"name": "imap", "protocol": "imap", "port": 143, "containerPort": 1143}
        return {"proxy": {"listeners": [{**listener, "proxyProtocol": {"trustedCidrs": cidrs}}]}}

    assert refused_items(trusting(candidates), "trustedCidrs") == expected
    # What it takes reaches a proxy that starts with it.
    taken = [candidate for candidate in candidates if NETWORKS_AND_NOT[candidate]]
    configmap = yaml.safe_load(render.render(trusting(taken))["proxy-configmap.yaml"])
    parsed = proxy_settings.parse(yaml.safe_load(configmap["data"]["settings.yaml"]), Path("/"))
    assert len(parsed.listeners[0].proxy_protocol_from) == len(taken)


# Every character Python calls white space (str.isspace, which proxy.settings uses for serverName).
WHITE_SPACE = [chr(code) for code in range(sys.maxunicode + 1) if chr(code).isspace()]


def test_the_schema_takes_a_server_name_the_proxy_takes() -> None:
    """No white space, as the proxy reads it; Go's \\s alone misses \\v and Unicode's spaces."""
    with helm.Chart.load(render.CHART) as chart:
        for space in WHITE_SPACE:
            with pytest.raises(helm.HelmValuesError, match="at '/proxy/serverName'"):
                chart.validate_schema({"proxy": {"serverName": f"mail{space}example"}})
        # Everything else, up to the surrogates, in one name: taken, and the proxy takes it too.
        name = "".join(chr(code) for code in range(0xD800) if not chr(code).isspace())
        chart.validate_schema({"proxy": {"serverName": name}})
    document, _ = settings_of("default")
    assert proxy_settings.parse({**document, "serverName": name}, Path("/")).server_name == name


@pytest.mark.parametrize("key", [".", "..", "..data", "...", "", "ca/crt"])
def test_schema_refuses_a_ca_key_kubernetes_cannot_mount(key: str) -> None:
    """A key-to-path item's path may not be "." or ".." nor start with ".." (nor hold a "/" here)."""
    with helm.Chart.load(render.CHART) as chart, pytest.raises(helm.HelmValuesError, match="/caKey'"):
        chart.validate_schema({"proxy": {"backendTls": {"caSecret": "ca", "caKey": key}}})


@pytest.mark.parametrize("key", ["ca.crt", ".ca", "a..b", "CA_bundle-2.pem"])
def test_schema_takes_ca_keys_kubernetes_mounts(key: str) -> None:
    with helm.Chart.load(render.CHART) as chart:
        chart.validate_schema({"proxy": {"backendTls": {"caSecret": "ca", "caKey": key}}})


@pytest.mark.parametrize(
    "values",
    [
        {"fullnameOverride": "Mail_Gress"},
        {"fullnameOverride": "1mail"},  # Services need a letter first (DNS-1035)
        {"fullnameOverride": "mail-"},
        {"nameOverride": "Mail.Gress"},
        {"nameOverride": "mail_gress"},
        {"nameOverride": "-mail"},
    ],
)
def test_schema_refuses_overrides_that_are_no_object_names(values: dict[str, Any]) -> None:
    [key] = values
    with helm.Chart.load(render.CHART) as chart, pytest.raises(helm.HelmValuesError, match=f"at '/{key}'"):
        chart.validate_schema(values)


def test_names_yaml_could_misread_stay_strings_in_labels() -> None:
    """A DNS-1123 label may be "123", and Helm takes a release named "null" or "on"."""
    documents = render.documents({"nameOverride": "123"}, release="on")
    for document in documents:
        labels = document.body["metadata"]["labels"]
        assert (labels["app.kubernetes.io/name"], labels["app.kubernetes.io/instance"]) == ("123", "on")
    for document in documents:
        if document.body["kind"] == "Deployment":
            selector = document.body["spec"]["selector"]["matchLabels"]
            assert all(isinstance(value, str) for value in selector.values())


# DNS-1123 labels, which namespaces and the names of Secrets and PriorityClasses may be, that YAML
# reads as a boolean, a null or a number unless the chart quotes them ("1e5" only to YAML 1.2 and
# to the Go parser Helm and kubectl use, not to PyYAML).
MISREAD_NAMES = ("on", "no", "null", "123", "0x1a", "1e5")


@pytest.mark.parametrize("namespace", MISREAD_NAMES)
def test_a_release_namespace_yaml_could_misread_stays_a_string(namespace: str) -> None:
    """In every object's namespace, the controller's bindings and arguments and what the
    monitors select: the API server refuses a boolean or a number where a name goes."""
    documents = render.documents(SCENARIOS["monitoring"], namespace=namespace)
    for document in documents:
        if document.body["kind"] not in CLUSTER_KINDS:
            assert document.body["metadata"]["namespace"] == namespace, document.body["metadata"]
    bindings = [d.body for d in documents if d.body["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert [subject["namespace"] for binding in bindings for subject in binding["subjects"]] == [
        namespace
    ] * len(bindings)
    monitors = [d.body for d in documents if d.body["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert len(monitors) == 4
    for monitor in monitors:
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    [controller] = [d.body for d in documents if d.template == "controller-deployment.yaml"]
    arguments = container(controller)["args"]
    assert arguments[arguments.index("--watch-namespace") + 1] == namespace


def named(names: Mapping[str, str]) -> dict[str, Any]:
    """A value set that writes ``names`` wherever the values take a name (keys: see ORDINARY)."""
    return {
        "image": {"repository": names["repository"], "tag": names["tag"]},
        "controller": {
            "watchNamespaces": [names["served"], names["other"]],
            "pushToken": {"existingSecret": names["token"]},
            "pushTls": {"existingSecret": names["tls"]},
            "priorityClassName": names["priority"],
        },
        "proxy": {
            "priorityClassName": names["priority"],
            "listeners": [
                {
                    "name": "imaps",
                    "protocol": "imap",
                    "port": 993,
                    "containerPort": 1993,
                    "tls": "implicit",
                    "certificates": [names["certificate"]],
                }
            ],
            "backendTls": {"caSecret": names["certificate"], "caKey": names["key"]},
            "service": {"loadBalancerClass": names["class"]},
        },
        "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    }


ORDINARY = {
    "namespace": "mail-system",
    "served": "mail",
    "other": "team-a",
    "token": "push-token",
    "tls": "push-tls",
    "priority": "mail-high",
    "certificate": "mail-cert",
    "key": "ca.crt",
    "class": "example.net/lb",
    "repository": "mailgress",
    "tag": "v1",
}
# The same places, with names YAML misreads; the image becomes "123:45", which YAML 1.1 reads as a
# number in base 60.
MISREAD = {
    "namespace": "off",
    "served": "123",
    "other": "null",
    "token": "on",
    "tls": "no",
    "priority": "0x1a",
    "certificate": "1e5",
    "key": "1",
    "class": "true",
    "repository": "123",
    "tag": "45",
}


def scalar_types(node: object, path: str = "") -> set[tuple[str, str]]:
    """(path, type name) of every scalar in a parsed document; list positions are written []."""
    if isinstance(node, Mapping):
        return {found for key, value in node.items() for found in scalar_types(value, f"{path}.{key}")}
    if isinstance(node, list):
        return {found for item in node for found in scalar_types(item, f"{path}[]")}
    return {(path, type(node).__name__)}


def test_names_yaml_could_misread_stay_strings_in_every_field() -> None:
    """Every field the chart renders has the same YAML type whether the names in the values (and
    the release's namespace) read as YAML values or not: the templates quote every one."""
    found = {}
    for names in (ORDINARY, MISREAD):
        with helm.Chart.load(render.CHART) as chart:
            chart.validate_schema(named(names))
        documents = render.documents(named(names), namespace=names["namespace"])
        found[names["namespace"]] = (
            len(documents),
            {(d.body["kind"], *typed) for d in documents for typed in scalar_types(d.body)},
        )
    (count, types), (misread_count, misread_types) = found[ORDINARY["namespace"]], found[MISREAD["namespace"]]
    assert misread_count == count
    misread_only = "\n".join(f"{kind} {path}: {name}" for kind, path, name in sorted(misread_types - types))
    assert misread_types == types, f"typed otherwise with misread names:\n{misread_only}"


def test_listener_names_follow_the_crds_port_name_rule() -> None:
    """One rule for port names, the one Kubernetes applies (IsValidPortName)."""
    schema = json.loads((render.CHART / "values.schema.json").read_text())
    name = schema["properties"]["proxy"]["properties"]["listeners"]["items"]["properties"]["name"]
    assert (name["pattern"], name["maxLength"]) == (mailroute.PORT_NAME_PATTERN, mailroute.MAX_PORT_NAME)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("imap--a", "does not match pattern"),  # consecutive hyphens
        ("-imap", "does not match pattern"),
        ("imap-", "does not match pattern"),
        ("993", "does not match pattern"),  # no letter
        ("IMAP", "does not match pattern"),
        ("imap_a", "does not match pattern"),
        ("", "does not match pattern"),
        ("submissions12345", "maxLength: got 16, want 15"),
    ],
)
def test_schema_refuses_listener_names_kubernetes_refuses(name: str, message: str) -> None:
    listeners = [{"name": name, "protocol": "imap", "port": 143, "containerPort": 1143}]
    with helm.Chart.load(render.CHART) as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema({"proxy": {"listeners": listeners}})
    assert "at '/proxy/listeners/0/name'" in str(refused.value)
    assert message in str(refused.value)


def test_listener_names_kubernetes_takes_reach_every_object_as_written() -> None:
    """Quoted where the templates write them, so "on", "null" or "0x1a" stay names, not YAML values."""
    with helm.Chart.load(render.CHART) as chart:
        chart.validate_schema(dict(EDGE_NAMES_VALUES))
    bodies = [document.body for document in rendered_edge_names()]

    def component(kind: str, name: str) -> Mapping[str, Any]:
        [found] = [body for body in bodies if body["kind"] == kind and body["metadata"]["name"] == name]
        return found

    names = list(EDGE_LISTENER_NAMES)
    ports = container(component("Deployment", "mailgress-proxy"))["ports"]
    assert [port["name"] for port in ports] == [*names, "admin"]
    service = component("Service", "mailgress-proxy")["spec"]["ports"]
    assert [(port["name"], port["targetPort"]) for port in service] == [(name, name) for name in names]
    mail = component("NetworkPolicy", "mailgress-proxy")["spec"]["ingress"][0]["ports"]
    assert [port["port"] for port in mail] == names
    settings = yaml.safe_load(component("ConfigMap", "mailgress-proxy")["data"]["settings.yaml"])
    assert [listener["name"] for listener in settings["listeners"]] == names


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        (
            [
                {"name": "imap", "protocol": "imap", "port": 143, "containerPort": 1143},
                {"name": "imap", "protocol": "imap", "port": 144, "containerPort": 1144},
            ],
            'the name "imap" is used twice',
        ),
        (
            [
                {"name": "imap", "protocol": "imap", "port": 143, "containerPort": 1143},
                {"name": "pop3", "protocol": "pop3", "port": 110, "containerPort": 1143},
            ],
            "proxy.listeners[pop3]: containerPort 1143 is already taken",
        ),
        (
            [{"name": "imap", "protocol": "imap", "port": 143, "containerPort": 9901}],
            "proxy.listeners[imap]: containerPort 9901 is already taken",
        ),
        (
            [
                {"name": "imap", "protocol": "imap", "port": 143, "containerPort": 1143},
                {"name": "imap2", "protocol": "imap", "port": 143, "containerPort": 1144},
            ],
            "proxy.listeners[imap2]: Service port 143 is used twice",
        ),
        (
            [{"name": "admin", "protocol": "imap", "port": 143, "containerPort": 1143}],
            "the name admin is taken by the admin port",
        ),
    ],
)
def test_render_refuses_clashing_listeners(listeners: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as refused:
        render.render({"proxy": {"listeners": listeners}})
    assert message in str(refused.value)


def test_render_refuses_one_port_for_two_controller_listeners() -> None:
    """The schema cannot compare two values and kubernetes-validate takes a Deployment whose two
    containerPorts are alike, but the controller cannot bind the second (operator.check_ports
    says so at start, for a controller run without the chart)."""
    with pytest.raises(helm.HelmRenderError) as refused:
        render.render({"controller": {"pushPort": 9400, "healthPort": 9400}})
    assert "controller.pushPort and controller.healthPort are both 9400" in str(refused.value)


def test_render_refuses_more_minimum_than_maximum_replicas() -> None:
    autoscaling = {"enabled": True, "minReplicas": 5, "maxReplicas": 2}
    with pytest.raises(helm.HelmRenderError) as refused:
        render.render({"proxy": {"autoscaling": autoscaling}})
    assert "minReplicas must not exceed maxReplicas" in str(refused.value)


@pytest.mark.parametrize(("sleep", "grace"), [(120, 30), (30, 30)])
def test_render_refuses_a_pre_stop_sleep_the_grace_period_cannot_hold(sleep: int, grace: int) -> None:
    """The grace period counts from the start of the preStop sleep: the kubelet would kill the
    pod during or right at the end of it, before the proxy drained anything."""
    values = {"proxy": {"preStopSleepSeconds": sleep, "terminationGracePeriodSeconds": grace}}
    with pytest.raises(helm.HelmRenderError) as refused:
        render.render(values)
    refusal = f"proxy.preStopSleepSeconds ({sleep}) must be shorter than proxy.terminationGracePeriodSeconds"
    assert f"{refusal} ({grace})" in str(refused.value)
    values["proxy"]["preStopSleepSeconds"] = grace - 1
    drain = yaml.safe_load(
        yaml.safe_load(render.render(values)["proxy-configmap.yaml"])["data"]["settings.yaml"]
    )
    assert drain["drain"]["gracePeriod"] == 0


def _properties(schema: Mapping[str, Any], path: str) -> list[tuple[str, Mapping[str, Any]]]:
    found = []
    for key, child in schema.get("properties", {}).items():
        found.append((f"{path}.{key}".lstrip("."), child))
        found += _properties(child, f"{path}.{key}")
        found += _properties(child.get("items", {}), f"{path}.{key}[]")
    return found


def test_schema_describes_and_closes_every_value() -> None:
    schema = json.loads((render.CHART / "values.schema.json").read_text())
    properties = _properties(schema, "")
    assert len(properties) > 50
    for path, child in properties:
        assert child.get("description"), f"{path} has no description"
        if child.get("type") == "object" and "properties" in child:
            assert child.get("additionalProperties") is False, f"{path} accepts unknown keys"
    # The defaults themselves pass, so every key of values.yaml is a key the schema knows.
    with helm.Chart.load(render.CHART) as chart:
        chart.validate_schema(None)


def test_readme_values_table_is_current() -> None:
    text = render.CHART_README.read_text()
    assert render.readme(text) == text, "charts/mailgress/README.md is stale: run `make render`"


def test_chart_readme_states_the_supported_kubernetes_versions() -> None:
    chart = yaml.safe_load((render.CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"
    assert "**Kubernetes:** 1.30 to 1.37." in render.CHART_README.read_text()


# ---------------------------------------------------------------------------------------------
# The proxy: settings, mounts, ports, hardening


@pytest.mark.parametrize("scenario", ALL)
def test_proxy_settings_parse_and_match_the_values(scenario: str) -> None:
    _, parsed = settings_of(scenario)
    proxy = values(scenario)["proxy"]
    assert [listener.name for listener in parsed.listeners] == [item["name"] for item in proxy["listeners"]]
    for listener, item in zip(parsed.listeners, proxy["listeners"], strict=True):
        assert listener.protocol == item["protocol"]
        assert listener.address == str(ipaddress.ip_address(proxy["listenAddress"]))
        assert listener.port == item["containerPort"]
        assert listener.tls == item.get("tls", "none")
        assert listener.starttls_required == (item.get("starttls") == "required")
        assert [certificate.cert.parent.name for certificate in listener.certificates] == item.get(
            "certificates", []
        )
        trusted = item.get("proxyProtocol", {}).get("trustedCidrs", [])
        assert [str(network) for network in listener.proxy_protocol_from] == trusted
    assert parsed.admin is not None
    assert parsed.admin.port == proxy["adminPort"]
    assert parsed.server_name == proxy["serverName"]
    assert parsed.route_files == ()
    assert parsed.services == {}
    assert parsed.controller is not None


def test_default_settings_are_the_proxy_defaults() -> None:
    """values.yaml repeats the proxy's defaults for the values table; they must stay the same."""
    _, parsed = settings_of("default")
    assert parsed.timeouts == proxy_settings.Timeouts()
    assert parsed.max_errors == proxy_settings.DEFAULT_MAX_ERRORS
    assert parsed.backend_tls == proxy_settings.BackendTlsSettings()
    assert parsed.limits == proxy_settings.LimitSettings()


def test_limits_reach_the_proxy_settings() -> None:
    _, parsed = settings_of("hpa")
    failed = SCENARIOS["hpa"]["proxy"]["limits"]["failedLogins"]
    assert parsed.limits.connections_per_ip == SCENARIOS["hpa"]["proxy"]["limits"]["connectionsPerIp"]
    assert parsed.limits.failed_logins == proxy_settings.FailedLoginSettings(
        per_user=failed["perUser"],
        per_ip=failed["perIp"],
        first_delay=failed["firstDelay"],
        max_delay=failed["maxDelay"],
        lockout=failed["lockout"],
    )


def test_first_delay_zero_turns_the_login_delay_off_and_keeps_the_other_limits() -> None:
    """README: loopback test setups want firstDelay 0; the proxy takes it, so the chart must too."""
    configmap = next(
        document.body
        for document in render.documents({"proxy": {"limits": {"failedLogins": {"firstDelay": 0}}}})
        if document.body["kind"] == "ConfigMap" and document.template == "proxy-configmap.yaml"
    )
    parsed = proxy_settings.parse(yaml.safe_load(configmap["data"]["settings.yaml"]), Path("/"))
    assert parsed.limits == proxy_settings.LimitSettings(
        failed_logins=proxy_settings.FailedLoginSettings(first_delay=0.0)
    )


@pytest.mark.parametrize("scenario", ALL)
def test_every_file_the_settings_name_is_mounted(scenario: str) -> None:
    """Certificates, keys, the CA, the token and the snapshot are where the settings say."""
    _, parsed = settings_of(scenario)
    proxy = one(scenario, "Deployment", "proxy")
    files = mounted_files(proxy)
    for listener in parsed.listeners:
        for certificate in listener.certificates:
            secret = certificate.cert.parent.name
            assert files[PurePosixPath(certificate.cert)] == ("secret", secret, "tls.crt")
            assert files[PurePosixPath(certificate.key)] == ("secret", secret, "tls.key")
    backend_tls = values(scenario)["proxy"]["backendTls"]
    if backend_tls["caSecret"]:
        assert parsed.backend_tls.ca_file is not None
        assert files[PurePosixPath(parsed.backend_tls.ca_file)] == (
            "secret",
            backend_tls["caSecret"],
            backend_tls["caKey"],
        )
    else:
        assert parsed.backend_tls.ca_file is None
    assert parsed.controller is not None
    token = files[PurePosixPath(parsed.controller.token_file)]
    controller_files = mounted_files(one(scenario, "Deployment", "controller"))
    controller_args = container(one(scenario, "Deployment", "controller"))["args"]
    controller_token = PurePosixPath(controller_args[controller_args.index("--token-file") + 1])
    assert token == controller_files[controller_token], "proxies and controller share one token"
    assert parsed.controller.snapshot_file is not None
    snapshot = PurePosixPath(parsed.controller.snapshot_file)
    snapshot_secret = controller_args[controller_args.index("--snapshot-secret") + 1]
    assert files[snapshot] == ("secret", snapshot_secret, reconciler.SNAPSHOT_KEY)
    # A table too large to store plainly: the compressed key, where the proxy's reader looks.
    compressed = snapshot.with_name(snapshot.name + subscriber.SNAPSHOT_GZIP_SUFFIX)
    assert files[compressed] == ("secret", snapshot_secret, reconciler.SNAPSHOT_GZIP_KEY)
    # The since map is the controller's alone: only the two table keys reach the proxy.
    assert [path for path, source in files.items() if source[1] == snapshot_secret] == [snapshot, compressed]


def test_snapshot_volume_is_optional_and_tls_secrets_are_whole_directories() -> None:
    pod = one("tls", "Deployment", "proxy")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    # The chart's Secret holds no key until the controller's first table.
    assert volumes["snapshot"]["secret"]["optional"] is True
    assert volumes["snapshot"]["secret"]["defaultMode"] == 0o440  # auth_http headers: the pod's group
    mounts = container(one("tls", "Deployment", "proxy"))["volumeMounts"]
    tls_mounts = sorted(mount["mountPath"] for mount in mounts if mount["name"].startswith("tls-"))
    assert tls_mounts == ["/etc/mailgress/tls/mail-example-net", "/etc/mailgress/tls/mail-example-org"]


@pytest.mark.parametrize("scenario", ALL)
def test_the_snapshot_secret_is_rendered_without_data_and_kept(scenario: str) -> None:
    """The chart creates the Secret the controller writes and the proxies mount (the controller
    may not create it): no data, so Helm's three-way merge and kubectl apply leave the
    controller's keys alone, and kept on uninstall (by Helm and by Argo CD)."""
    arguments = container(one(scenario, "Deployment", "controller"))["args"]
    name = arguments[arguments.index("--snapshot-secret") + 1]
    [secret] = [body for body in objects(scenario, "Secret") if body["metadata"]["name"] == name]
    assert secret.keys() == {"apiVersion", "kind", "metadata", "type"}  # no data nor stringData
    assert secret["type"] == operator.SNAPSHOT_TYPE
    assert secret["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert secret["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Delete=false",  # Argo CD before 2.8 reads only this
    }
    pod = one(scenario, "Deployment", "proxy")["spec"]["template"]["spec"]
    assert [volume["secret"]["secretName"] for volume in pod["volumes"] if volume["name"] == "snapshot"] == [
        name
    ]


@pytest.mark.parametrize("scenario", ALL)
def test_proxy_service_maps_mail_ports_to_high_container_ports(scenario: str) -> None:
    service = one(scenario, "Service", "proxy")
    ports = {
        port["name"]: port["containerPort"]
        for port in container(one(scenario, "Deployment", "proxy"))["ports"]
    }
    listeners = values(scenario)["proxy"]["listeners"]
    assert [port["name"] for port in service["spec"]["ports"]] == [item["name"] for item in listeners]
    for port in service["spec"]["ports"]:
        assert port["port"] in MAIL_PORTS
        assert ports[port["targetPort"]] >= 1024
    assert "admin" not in {port["name"] for port in service["spec"]["ports"]}, "metrics stay in-cluster"


def test_service_ports_of_the_tls_set_are_all_seven_mail_ports() -> None:
    assert {port["port"] for port in one("tls", "Service", "proxy")["spec"]["ports"]} == MAIL_PORTS


def test_proxy_service_defaults_to_a_load_balancer_and_can_keep_client_addresses() -> None:
    default = one("default", "Service", "proxy")["spec"]
    assert (default["type"], default["externalTrafficPolicy"]) == ("LoadBalancer", "Cluster")
    local = one("proxy-protocol", "Service", "proxy")
    assert local["spec"]["externalTrafficPolicy"] == "Local"
    assert local["spec"]["loadBalancerClass"] == "service.k8s.aws/nlb"
    assert local["metadata"]["annotations"] == SCENARIOS["proxy-protocol"]["proxy"]["service"]["annotations"]
    cluster_ip = one("minimal", "Service", "proxy")["spec"]
    assert cluster_ip["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in cluster_ip


@pytest.mark.parametrize("component", ["proxy", "controller"])
@pytest.mark.parametrize("scenario", ALL)
def test_pods_run_unprivileged(scenario: str, component: str) -> None:
    deployment = one(scenario, "Deployment", component)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(deployment)["securityContext"]
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    secrets = [volume["secret"] for volume in pod["volumes"] if "secret" in volume]
    assert secrets
    assert all(secret["defaultMode"] == 0o440 for secret in secrets), "keys and tokens: owner and group only"
    assert all(port["containerPort"] >= 1024 for port in container(deployment)["ports"])
    assert container(deployment)["resources"]["requests"]
    assert pod.get("automountServiceAccountToken", True) is (component == "controller")


def test_proxy_probes_drain_and_spread() -> None:
    deployment = one("default", "Deployment", "proxy")
    pod = deployment["spec"]["template"]["spec"]
    proxy = container(deployment)
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    # Long enough for IMAP sessions to be closed gradually and SMTP transactions to finish.
    assert pod["terminationGracePeriodSeconds"] == 600
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spread = pod["topologySpreadConstraints"]
    assert [item["topologyKey"] for item in spread] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for item in spread:
        assert selects(item["labelSelector"]["matchLabels"], pod_labels("default", "proxy"))
    minimal = one("minimal", "Deployment", "proxy")
    assert "lifecycle" not in container(minimal)
    assert "topologySpreadConstraints" not in minimal["spec"]["template"]["spec"]


def test_settings_change_rolls_the_proxy_pods() -> None:
    def checksum(scenario: str) -> str:
        annotations = one(scenario, "Deployment", "proxy")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/settings"]
        return value

    assert re.fullmatch(r"[0-9a-f]{64}", checksum("default"))
    assert checksum("default") != checksum("tls")


def test_image_by_tag_or_digest() -> None:
    assert container(one("default", "Deployment", "proxy"))["image"] == "mailgress:0.1.0"
    minimal = SCENARIOS["minimal"]["image"]
    for component in ("proxy", "controller"):
        deployment = one("minimal", "Deployment", component)
        assert container(deployment)["image"] == f"{minimal['repository']}@{minimal['digest']}"
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [
            {"name": "registry-credentials"}
        ]


# ---------------------------------------------------------------------------------------------
# The controller and the push channel


@pytest.mark.parametrize("scenario", ALL)
def test_controller_arguments_are_what_the_controller_accepts(scenario: str) -> None:
    deployment = one(scenario, "Deployment", "controller")
    arguments = container(deployment)["args"]
    # The image's entry point is the mailgress console script: these are its arguments.
    command = cli.parser().parse_args(arguments)
    assert command.handler is cli._run_controller
    parsed = operator.settings_from(command, {"POD_NAMESPACE": RELEASE_NAMESPACE})
    operator.check_ports(parsed)  # what the controller checks before it binds anything
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container(deployment)["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace"}
    assert parsed.namespace == RELEASE_NAMESPACE
    # The controller counts exactly this release's proxy pods.
    assert selects(parsed.proxy_selector, pod_labels(scenario, "proxy"))
    assert not selects(parsed.proxy_selector, pod_labels(scenario, "controller"))
    ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    assert parsed.listen_port == ports["push"]
    service = one(scenario, "Service", "controller")["spec"]
    assert service["type"] == "ClusterIP"
    assert [(port["port"], port["targetPort"]) for port in service["ports"]] == [(ports["push"], "push")]
    _, proxy = settings_of(scenario)
    assert proxy.controller is not None
    name = one(scenario, "Service", "controller")["metadata"]["name"]
    scheme = "https" if values(scenario)["controller"]["pushTls"]["enabled"] else "http"
    assert proxy.controller.url == f"{scheme}://{name}.{RELEASE_NAMESPACE}.svc:{ports['push']}"
    # Both listeners bind the chart's address; kopf takes its bind host from the URL as
    # urlsplit reads it (an IPv6 literal in brackets).
    address = values(scenario)["controller"]["listenAddress"]
    assert parsed.listen_address == address
    health = urlsplit(parsed.health)
    assert (health.scheme, health.hostname, health.port, health.path) == (
        "http",
        address,
        ports["health"],
        "/healthz",
    )
    # The probes name no host: the kubelet connects to the pod's IP, never to a bind-all address.
    assert container(deployment)["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container(deployment)["readinessProbe"]["tcpSocket"] == {"port": "push"}
    # One writer of MailRoute status: never two controllers, not even during a rollout.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("scenario", ALL)
def test_controller_listens_in_the_proxys_address_family(scenario: str) -> None:
    """A value set for an IPv6 cluster puts both on IPv6: the proxies reach the push channel, and
    the kubelet both components' probes, at pod IPs of the cluster's one family."""
    chart = values(scenario)
    controller = ipaddress.ip_address(chart["controller"]["listenAddress"])
    assert controller.version == ipaddress.ip_address(chart["proxy"]["listenAddress"]).version


def push_token_secrets(scenario: str) -> list[Mapping[str, Any]]:
    return [document.body for document in rendered(scenario) if document.template == "controller-secret.yaml"]


def test_push_token_is_generated_shared_and_random() -> None:
    secrets = push_token_secrets("default")
    assert len(secrets) == 1
    token = base64.b64decode(secrets[0]["data"]["token"])
    assert len(token) == 48
    assert token.isalnum()
    again = yaml.safe_load(render.render()["controller-secret.yaml"])
    assert base64.b64decode(again["data"]["token"]) != token, "an offline render draws a new token"
    for component in ("proxy", "controller"):
        files = mounted_files(one("default", "Deployment", component))
        assert ("secret", secrets[0]["metadata"]["name"], "token") in files.values()


def test_existing_push_token_secret_is_used_and_not_rendered() -> None:
    assert push_token_secrets("minimal") == []
    for component in ("proxy", "controller"):
        files = mounted_files(one("minimal", "Deployment", component))
        assert ("secret", "mail-push-token", "token") in files.values()


def push_tls_secrets(scenario: str) -> list[Mapping[str, Any]]:
    return [
        document.body for document in rendered(scenario) if document.template == "controller-tls-secret.yaml"
    ]


@pytest.mark.parametrize("scenario", ALL)
def test_push_tls_files_are_where_the_controller_and_the_proxies_read_them(scenario: str) -> None:
    """The controller mounts the certificate and key its flags name, the proxies only the CA
    their caFile names, from one Secret; the proxies connect to the name the certificate holds."""
    push_tls = values(scenario)["controller"]["pushTls"]
    deployment = one(scenario, "Deployment", "controller")
    command = cli.parser().parse_args(container(deployment)["args"])
    controller = operator.settings_from(command, {"POD_NAMESPACE": RELEASE_NAMESPACE})
    _, proxy = settings_of(scenario)
    assert proxy.controller is not None
    proxy_files = mounted_files(one(scenario, "Deployment", "proxy"))
    if not push_tls["enabled"]:
        assert controller.tls_files is None
        assert proxy.controller.ca_file is None
        assert urlsplit(proxy.controller.url).scheme == "http"
        assert push_tls_secrets(scenario) == []
        return
    secret = push_tls["existingSecret"] or PUSH_TLS_SECRET
    assert controller.tls_files is not None
    cert, key = (PurePosixPath(path) for path in controller.tls_files)
    controller_files = mounted_files(deployment)
    assert controller_files[cert] == ("secret", secret, "tls.crt")
    assert controller_files[key] == ("secret", secret, "tls.key")
    assert "ca.crt" not in {source[2] for source in controller_files.values() if source[1] == secret}
    assert proxy.controller.ca_file is not None
    assert proxy_files[PurePosixPath(proxy.controller.ca_file)] == ("secret", secret, "ca.crt")
    # The proxies never hold the controller's key.
    assert [source[2] for source in proxy_files.values() if source[1] == secret] == ["ca.crt"]
    url = urlsplit(proxy.controller.url)
    assert (url.scheme, url.hostname) == ("https", CONTROLLER_HOST)
    assert len(push_tls_secrets(scenario)) == (0 if push_tls["existingSecret"] else 1)


def written(directory: Path, secret: Mapping[str, Any]) -> dict[str, Path]:
    """The Secret's keys as the kubelet mounts them: one file each."""
    directory.mkdir()
    files = {}
    for key, value in secret["data"].items():
        files[key] = directory / key
        files[key].write_bytes(base64.b64decode(value))
    return files


async def handshake(port: int, context: ssl.SSLContext, name: str) -> str:
    """The TLS version of a verified connection to 127.0.0.1:``port`` under ``name``."""
    async with asyncio.timeout(BOUND):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name)
    version: str = writer.get_extra_info("ssl_object").version()
    writer.close()
    return version


async def test_the_generated_push_tls_serves_the_controller_under_every_service_name(tmp_path: Path) -> None:
    """What the chart generates works end to end: the controller's own TLS serves the certificate,
    and the proxies' verification (their CA file, the Service's names) accepts it, also under
    Python's strict X.509 checks (the default from Python 3.13 on)."""
    [secret] = push_tls_secrets("default")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == PUSH_TLS_SECRET
    files = written(tmp_path / "push-tls", secret)
    store = certificates.CertificateStore(
        "push channel", (proxy_settings.CertificateFiles(files["tls.crt"], files["tls.key"]),)
    )
    assert set(certificates.dns_names(files["tls.crt"])) == {
        "mailgress-controller",
        f"mailgress-controller.{RELEASE_NAMESPACE}",
        CONTROLLER_HOST,
        f"{CONTROLLER_HOST}.cluster.local",
    }
    channel = publisher.Publisher("token", certificates=store)
    await channel.start("127.0.0.1", 0)
    try:
        context = certificates.client_context(files["ca.crt"], "controller.caFile")
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        for name in certificates.dns_names(files["tls.crt"]):
            assert await handshake(channel.port, context, name) in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(channel.port, context, "mailgress-controller.other.svc")
    finally:
        await channel.stop()


def test_an_offline_render_draws_a_new_push_ca() -> None:
    """Installs keep theirs (the template looks the Secret up); helm template cannot, and shows a
    new one, as it does a new token."""
    [first] = push_tls_secrets("default")
    again = yaml.safe_load(render.render()["controller-tls-secret.yaml"])
    assert again["data"]["ca.crt"] != first["data"]["ca.crt"]
    assert again["data"]["tls.key"] != first["data"]["tls.key"]


def test_the_push_channel_notes_name_an_existing_secret_and_warn_about_plain_http() -> None:
    minimal = render.render(SCENARIOS["minimal"])["NOTES.txt"]
    assert 'serves TLS with the Secret "mail-push-tls"' in minimal
    assert CONTROLLER_HOST in minimal
    plain = render.render(SCENARIOS["plain-push"])["NOTES.txt"]
    assert "WARNING: controller.pushTls.enabled is false" in plain
    default = render.render()["NOTES.txt"]
    assert "pushTls" not in default
    assert "serves TLS with the Secret" not in default


def test_a_plain_push_channel_is_scraped_over_http() -> None:
    endpoints = one("plain-push", "ServiceMonitor", "controller")["spec"]["endpoints"]
    assert [(endpoint["port"], endpoint.get("scheme")) for endpoint in endpoints] == [("push", None)]
    pods = one("plain-push", "PodMonitor", "controller")["spec"]["podMetricsEndpoints"]
    assert [(endpoint["port"], endpoint.get("scheme")) for endpoint in pods] == [("push", None)]


# ---------------------------------------------------------------------------------------------
# Scaling, disruption, network, monitoring


def test_autoscaling_owns_the_replica_count() -> None:
    assert one("default", "Deployment", "proxy")["spec"]["replicas"] == 2
    assert objects("default", "HorizontalPodAutoscaler") == []
    deployment = one("hpa", "Deployment", "proxy")
    assert "replicas" not in deployment["spec"]
    hpa = one("hpa", "HorizontalPodAutoscaler", "proxy")["spec"]
    wanted = SCENARIOS["hpa"]["proxy"]["autoscaling"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (wanted["minReplicas"], wanted["maxReplicas"])
    assert (
        hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
        == wanted["targetCPUUtilizationPercentage"]
    )
    scale_down = hpa["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == wanted["scaleDownStabilizationSeconds"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]


@pytest.mark.parametrize("scenario", ALL)
def test_selectors_select_the_pods_they_mean(scenario: str) -> None:
    for component in ("proxy", "controller"):
        deployment = one(scenario, "Deployment", component)
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(scenario, component))
        service = one(scenario, "Service", component)
        assert selects(service["spec"]["selector"], pod_labels(scenario, component))
    for budget in objects(scenario, "PodDisruptionBudget"):
        assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(scenario, "proxy"))
    for policy in objects(scenario, "NetworkPolicy"):
        component = policy["metadata"]["labels"]["app.kubernetes.io/component"]
        assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(scenario, component))


def test_network_policies_open_mail_ports_to_all_and_the_push_channel_to_proxies_and_scrapers() -> None:
    proxy_ports = {port["name"] for port in container(one("default", "Deployment", "proxy"))["ports"]}
    proxy_rules = one("default", "NetworkPolicy", "proxy")["spec"]["ingress"]
    mail = proxy_rules[0]
    assert "from" not in mail
    assert {port["port"] for port in mail["ports"]} == proxy_ports - {"admin"}
    assert proxy_rules[1]["ports"] == [{"port": "admin", "protocol": "TCP"}]
    assert proxy_rules[1]["from"] == [{"namespaceSelector": {}}]  # every pod in the cluster
    monitoring = one("monitoring", "NetworkPolicy", "proxy")["spec"]["ingress"][1]["from"]
    assert monitoring == SCENARIOS["monitoring"]["networkPolicy"]["adminFrom"]
    controller_rules = one("default", "NetworkPolicy", "controller")["spec"]["ingress"]
    assert len(controller_rules) == 2
    assert selects(
        controller_rules[0]["from"][0]["podSelector"]["matchLabels"], pod_labels("default", "proxy")
    )
    # The controller's /metrics shares the push port: the scrapers reach it, nobody else.
    assert controller_rules[1]["from"] == [{"namespaceSelector": {}}]
    assert all(rule["ports"] == [{"port": "push", "protocol": "TCP"}] for rule in controller_rules)
    scrapers = one("monitoring", "NetworkPolicy", "controller")["spec"]["ingress"][1]["from"]
    assert scrapers == SCENARIOS["monitoring"]["networkPolicy"]["adminFrom"]
    assert objects("minimal", "NetworkPolicy") == []


def test_monitoring_objects_are_off_by_default_and_scrape_the_admin_port() -> None:
    assert objects("default", "ServiceMonitor") == objects("default", "PodMonitor") == []
    admin = [
        service
        for service in objects("monitoring", "Service")
        if service["metadata"]["labels"]["app.kubernetes.io/component"] == "proxy-admin"
    ]
    assert len(admin) == 1
    assert selects(admin[0]["spec"]["selector"], pod_labels("monitoring", "proxy"))
    assert admin[0]["spec"]["ports"][0]["targetPort"] == "admin"
    monitor = one("monitoring", "ServiceMonitor", "proxy")
    assert selects(monitor["spec"]["selector"]["matchLabels"], admin[0]["metadata"]["labels"])
    assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pods = one("monitoring", "PodMonitor", "proxy")
    assert selects(pods["spec"]["selector"]["matchLabels"], pod_labels("monitoring", "proxy"))
    assert pods["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "1m"}]
    for found in (monitor, pods):
        assert found["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}


def test_controller_monitoring_is_off_by_default_and_scrapes_its_push_port() -> None:
    service = one("monitoring", "Service", "controller")
    monitor = one("monitoring", "ServiceMonitor", "controller")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [port["name"] for port in service["spec"]["ports"]] == ["push"]
    # The push port speaks TLS (the chart's default): scraped over https, verified with its CA.
    assert monitor["spec"]["endpoints"] == [
        {"port": "push", "path": "/metrics", "interval": "15s", **SCRAPED_OVER_TLS}
    ]
    pods = one("monitoring", "PodMonitor", "controller")
    assert selects(pods["spec"]["selector"]["matchLabels"], pod_labels("monitoring", "controller"))
    assert pods["spec"]["podMetricsEndpoints"] == [
        {"port": "push", "path": "/metrics", "interval": "1m", **SCRAPED_OVER_TLS}
    ]
    for found in (monitor, pods):
        assert found["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert found["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}


def test_mailroute_roles_aggregate_into_the_default_roles() -> None:
    roles = {role["metadata"]["name"]: role for role in objects("default", "ClusterRole")}
    edit = roles[cluster_name(RELEASE_NAMESPACE, "mailgress", "mailroutes-edit")]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert edit["rules"][0]["resources"] == ["mailroutes"], "status stays the controller's"
    view = roles[cluster_name(RELEASE_NAMESPACE, "mailgress", "mailroutes-view")]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert {role["metadata"]["name"] for role in objects("minimal", "ClusterRole")} == {
        cluster_name(RELEASE_NAMESPACE, "mailgress", "controller")
    }


# ---------------------------------------------------------------------------------------------
# NOTES.txt


@pytest.mark.parametrize(
    ("scenario", "served", "example"),
    [
        ("default", render.NAMESPACE, render.NAMESPACE),
        ("watch-namespaces", "mail, team-a", "mail"),
        ("all-namespaces", "every namespace", "mail"),
    ],
)
def test_notes_put_the_example_route_where_the_release_serves_it(
    scenario: str, served: str, example: str
) -> None:
    notes = render.render(SCENARIOS[scenario])["NOTES.txt"]
    assert f"in a namespace this release serves\n   ({served}: controller.watchNamespaces" in notes
    assert f"metadata: {{name: example-com, namespace: {example}}}" in notes
    assert f"kubectl --namespace {example} describe mailroute example-com" in notes


def test_notes_name_the_ports_and_warn_about_plaintext_logins() -> None:
    notes = render.render()["NOTES.txt"]
    assert "kubectl --namespace mailgress get service mailgress-proxy" in notes
    assert "143/tcp  imap (imap, TLS: none)" in notes
    assert "WARNING: the listeners imap, pop3, submission take passwords without TLS" in notes
    tls = render.render(SCENARIOS["tls"])["NOTES.txt"]
    assert "993/tcp  imaps (imap, TLS: implicit)" in tls
    assert "WARNING" not in tls
    proxied = render.render(SCENARIOS["proxy-protocol"])["NOTES.txt"]
    assert "PROXY protocol from 10.0.0.0/8, fd00::/8" in proxied


def test_notes_tell_how_to_create_an_existing_token_secret() -> None:
    notes = render.render(SCENARIOS["minimal"])["NOTES.txt"]
    assert "create secret generic mail-push-token" in notes
    assert "create secret generic" not in render.render()["NOTES.txt"]
