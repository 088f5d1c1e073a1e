"""The controller process: settings from flags and environment, credentials, the push channel it
starts on the token file (over TLS when given a certificate, through the guard it is given), and
the API client (``KubeApi``) against the emulator, the snapshot Secret in both its forms included,
written and read back."""

import argparse
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kubernetes.client
import pytest
import yaml
from aiohttp import web

from controller import operator, publisher, reconciler
from proxy import table
from proxy.server import subscriber
from proxy.server.certificates import CertificateStore
from proxy.server.connections import Guard
from proxy.settings import CertificateFiles
from testbed.tlscerts import TestAuthority
from tests.controller.test_reconciler import entry, route_body, since_of, table_over_the_plain_limit
from tests.kube.conftest import CRD_FILE, kubeconfig_text
from tests.kube.emulator import Access, Emulator

REQUEST_BOUND = 10.0  # seconds one request to the push channel may take before the test fails


def arguments(*argv: str) -> argparse.Namespace:
    flags = argparse.ArgumentParser()
    operator.add_arguments(flags)
    return flags.parse_args(list(argv))


def test_defaults_and_the_environment() -> None:
    settings = operator.settings_from(
        arguments(), {"MAILGRESS_TOKEN_FILE": "/run/token", "POD_NAMESPACE": "mailgress-system"}
    )
    assert settings.namespace == "mailgress-system"
    assert settings.proxy_selector == {"app.kubernetes.io/component": "proxy"}
    assert (settings.listen_address, settings.listen_port) == ("0.0.0.0", operator.DEFAULT_LISTEN_PORT)
    assert settings.token_file == Path("/run/token")
    assert settings.snapshot_secret == operator.DEFAULT_SNAPSHOT_NAME
    assert settings.kubeconfig is None
    assert settings.health == operator.DEFAULT_HEALTH
    assert settings.tls_files is None  # plain HTTP unless given a certificate
    # The MailRoutes of the controller's own namespace only, never every namespace unasked.
    assert settings.watch_namespaces == frozenset({"mailgress-system"})


@pytest.mark.parametrize(
    ("argv", "environ", "served"),
    [
        pytest.param(("--watch-namespace=mail",), {}, {"mail"}, id="one"),
        pytest.param(
            ("--watch-namespace=mail", "--watch-namespace=team-a"), {}, {"mail", "team-a"}, id="repeated"
        ),
        pytest.param(("--all-namespaces",), {}, None, id="all"),
        pytest.param((), {"MAILGRESS_WATCH_NAMESPACES": "mail, team-a,"}, {"mail", "team-a"}, id="env"),
        pytest.param((), {"MAILGRESS_WATCH_NAMESPACES": "*"}, None, id="env-all"),
        pytest.param((), {"MAILGRESS_WATCH_NAMESPACES": " "}, {"ops"}, id="env-empty"),
        pytest.param(
            ("--watch-namespace=mail",), {"MAILGRESS_WATCH_NAMESPACES": "*"}, {"mail"}, id="flag-wins"
        ),
        pytest.param(("--all-namespaces",), {"MAILGRESS_WATCH_NAMESPACES": "x"}, None, id="all-flag-wins"),
    ],
)
def test_the_served_namespaces(
    argv: tuple[str, ...], environ: dict[str, str], served: set[str] | None
) -> None:
    environ = {"MAILGRESS_TOKEN_FILE": "t", "MAILGRESS_NAMESPACE": "ops", **environ}
    settings = operator.settings_from(arguments(*argv), environ)
    assert settings.watch_namespaces == (None if served is None else frozenset(served))


def test_the_push_channels_tls_files_from_flags_or_the_environment() -> None:
    environ = {"MAILGRESS_TOKEN_FILE": "t"}
    flags = arguments("--tls-cert-file=/tls/tls.crt", "--tls-key-file=/tls/tls.key")
    assert operator.settings_from(flags, environ).tls_files == (Path("/tls/tls.crt"), Path("/tls/tls.key"))
    environ |= {"MAILGRESS_TLS_CERT_FILE": "/env/tls.crt", "MAILGRESS_TLS_KEY_FILE": "/env/tls.key"}
    assert operator.settings_from(arguments(), environ).tls_files == (
        Path("/env/tls.crt"),
        Path("/env/tls.key"),
    )


def test_flags_win_over_the_environment() -> None:
    settings = operator.settings_from(
        arguments(
            "--namespace=ops",
            "--proxy-selector=app=mailgress, tier=edge",
            "--listen-port=9500",
            "--token-file=/flag/token",
            "--kubeconfig=/k/config",
            "--health=",
        ),
        {"MAILGRESS_NAMESPACE": "env", "MAILGRESS_LISTEN_PORT": "1", "MAILGRESS_TOKEN_FILE": "/env/token"},
    )
    assert (settings.namespace, settings.listen_port, settings.token_file) == (
        "ops",
        9500,
        Path("/flag/token"),
    )
    assert settings.proxy_selector == {"app": "mailgress", "tier": "edge"}
    assert (settings.kubeconfig, settings.health) == (Path("/k/config"), "")


@pytest.mark.parametrize(
    ("argv", "environ", "name", "deprecated"),
    [
        pytest.param(("--snapshot-secret=s",), {}, "s", [], id="flag"),
        pytest.param((), {"MAILGRESS_SNAPSHOT_SECRET": "s"}, "s", [], id="environment"),
        pytest.param(("--snapshot-configmap=c",), {}, "c", ["--snapshot-configmap"], id="deprecated-flag"),
        pytest.param(
            (),
            {"MAILGRESS_SNAPSHOT_CONFIGMAP": "c"},
            "c",
            ["MAILGRESS_SNAPSHOT_CONFIGMAP"],
            id="deprecated-env",
        ),
        pytest.param(
            ("--snapshot-secret=s", "--snapshot-configmap=c"),
            {},
            "s",
            ["--snapshot-configmap"],
            id="new-flag-wins-over-its-alias",
        ),
        pytest.param(
            ("--snapshot-configmap=c",),
            {"MAILGRESS_SNAPSHOT_SECRET": "s"},
            "c",
            ["--snapshot-configmap"],
            id="a-flag-wins-over-the-environment",
        ),
        pytest.param(
            (),
            {"MAILGRESS_SNAPSHOT_SECRET": "s", "MAILGRESS_SNAPSHOT_CONFIGMAP": "c"},
            "s",
            ["MAILGRESS_SNAPSHOT_CONFIGMAP"],
            id="new-env-wins-over-its-alias",
        ),
    ],
)
def test_the_snapshot_secret_and_its_deprecated_configmap_aliases(
    argv: tuple[str, ...],
    environ: dict[str, str],
    name: str,
    deprecated: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--snapshot-secret names the Secret; the ConfigMap flag and variable of the previous release
    still work for this one, each after its new form, with a warning naming the alias."""
    settings = operator.settings_from(arguments(*argv), {"MAILGRESS_TOKEN_FILE": "t", **environ})
    assert settings.snapshot_secret == name
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [message.split(" ", 1)[0] for message in warned] == deprecated
    assert all("deprecated" in message and "--snapshot-secret" in message for message in warned)


@pytest.mark.parametrize(
    ("argv", "environ", "problem"),
    [
        pytest.param((), {}, "--token-file", id="no-token-file"),
        pytest.param(
            ("--listen-port=http",), {"MAILGRESS_TOKEN_FILE": "t"}, "--listen-port", id="port-not-a-number"
        ),
        pytest.param(
            ("--listen-port=70000",), {"MAILGRESS_TOKEN_FILE": "t"}, "--listen-port", id="port-too-big"
        ),
        pytest.param(
            ("--proxy-selector=app",), {"MAILGRESS_TOKEN_FILE": "t"}, "key=value", id="selector-no-value"
        ),
        pytest.param(
            ("--proxy-selector=,",), {"MAILGRESS_TOKEN_FILE": "t"}, "at least one", id="selector-empty"
        ),
        pytest.param(
            ("--tls-cert-file=c",), {"MAILGRESS_TOKEN_FILE": "t"}, "go together", id="certificate-without-key"
        ),
        pytest.param(
            (),
            {"MAILGRESS_TOKEN_FILE": "t", "MAILGRESS_TLS_KEY_FILE": "k"},
            "go together",
            id="key-without-certificate",
        ),
        pytest.param(
            ("--all-namespaces", "--watch-namespace=mail"),
            {"MAILGRESS_TOKEN_FILE": "t"},
            "exclude each other",
            id="all-and-some-namespaces",
        ),
        pytest.param(
            ("--watch-namespace=Mail",), {"MAILGRESS_TOKEN_FILE": "t"}, "not a namespace", id="upper-case"
        ),
        pytest.param(
            ("--watch-namespace=team-*",), {"MAILGRESS_TOKEN_FILE": "t"}, "not a namespace", id="pattern"
        ),
        pytest.param(
            ("--watch-namespace=" + "a" * 64,), {"MAILGRESS_TOKEN_FILE": "t"}, "not a namespace", id="long"
        ),
        pytest.param(
            (),
            {"MAILGRESS_TOKEN_FILE": "t", "MAILGRESS_WATCH_NAMESPACES": "mail,-x"},
            "MAILGRESS_WATCH_NAMESPACES",
            id="env-bad-name",
        ),
        pytest.param(
            (),
            {"MAILGRESS_TOKEN_FILE": "t", "MAILGRESS_WATCH_NAMESPACES": "mail,*"},
            "not a namespace",
            id="env-all-among-names",
        ),
    ],
)
def test_bad_settings(argv: tuple[str, ...], environ: dict[str, str], problem: str) -> None:
    with pytest.raises(operator.SettingsError, match=problem):
        operator.settings_from(arguments(*argv), environ)


@pytest.mark.parametrize(
    ("address", "port", "health"),
    [
        pytest.param("0.0.0.0", "9400", "http://0.0.0.0:9400/healthz", id="the-charts-form"),
        pytest.param("0.0.0.0", "9400", "http://127.0.0.1:9400/healthz", id="a-wildcard-covers-loopback"),
        pytest.param("::1", "9400", "http://[::]:9400/healthz", id="ipv6"),
        pytest.param("0.0.0.0", "9400", "http://:9400/healthz", id="kopfs-default-host-a-name"),
        pytest.param("127.0.0.1", "80", "http://127.0.0.1/healthz", id="kopfs-default-port"),
    ],
)
def test_the_liveness_endpoint_on_the_push_port_is_refused_naming_both(
    address: str, port: str, health: str
) -> None:
    flags = arguments(
        "--token-file=t", f"--listen-address={address}", f"--listen-port={port}", f"--health={health}"
    )
    settings = operator.settings_from(flags, {})
    with pytest.raises(operator.SettingsError) as refused:
        operator.check_ports(settings)
    assert f"--listen-port (MAILGRESS_LISTEN_PORT) {port} and --health (MAILGRESS_HEALTH) {health}" in str(
        refused.value
    )
    assert "controller.pushPort and controller.healthPort" in str(refused.value)


@pytest.mark.parametrize(
    ("address", "port", "health"),
    [
        pytest.param("0.0.0.0", "9400", "http://0.0.0.0:8081/healthz", id="the-charts-defaults"),
        pytest.param("127.0.0.1", "9400", "http://127.0.0.2:9400/healthz", id="two-addresses"),
        pytest.param("0.0.0.0", "9400", "http://[::]:9400/healthz", id="two-families"),
        pytest.param("0.0.0.0", "9400", "", id="no-liveness-endpoint"),
        pytest.param("127.0.0.1", "0", "http://127.0.0.1:0/healthz", id="an-ephemeral-push-port"),
    ],
)
def test_listeners_that_can_bind_side_by_side_pass(address: str, port: str, health: str) -> None:
    flags = arguments(
        "--token-file=t", f"--listen-address={address}", f"--listen-port={port}", f"--health={health}"
    )
    operator.check_ports(operator.settings_from(flags, {}))


def test_a_liveness_url_with_a_bad_port_is_refused() -> None:
    settings = operator.settings_from(arguments("--token-file=t", "--health=http://0.0.0.0:99999/"), {})
    with pytest.raises(operator.SettingsError) as refused:
        operator.check_ports(settings)
    assert "--health: 'http://0.0.0.0:99999/' has no valid port" in str(refused.value)


def test_the_controller_started_on_one_port_twice_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before anything binds or the API is asked: exit status 2, both settings named, no traceback."""
    token = tmp_path / "token"
    token.write_text("the-token\n")
    flags = arguments(f"--token-file={token}", "--listen-port=9400", "--health=http://0.0.0.0:9400/healthz")
    assert operator.command(flags, certificates=load_certificates, guards=Guard) == operator.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("mailgress controller: --listen-port (MAILGRESS_LISTEN_PORT) 9400 and --health")
    assert "Traceback" not in err


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  secret-value\n")
    assert operator.read_token(token) == "secret-value"
    token.write_text("\n")
    with pytest.raises(operator.SettingsError, match="empty") as empty:
        operator.read_token(token)
    assert "secret" not in str(empty.value)
    with pytest.raises(operator.SettingsError, match="cannot read"):
        operator.read_token(tmp_path / "missing")


async def stream_status(channel: publisher.Publisher, token: str) -> int:
    url = f"http://127.0.0.1:{channel.port}{publisher.STREAM_PATH}"
    timeout = aiohttp.ClientTimeout(total=REQUEST_BOUND)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.get(
            url, params={"proxy": "proxy-a"}, headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        return response.status


async def test_the_push_channel_checks_the_token_file_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``run`` starts: a rotated token is accepted without a restart, and once the grace for
    the replaced one is over (none here; tests/controller/test_publisher.py times it), it is the
    only one."""
    monkeypatch.setattr(publisher, "TOKEN_ROTATION_GRACE", 0.0)
    token = tmp_path / "token"
    token.write_text("first-token\n")
    channel = operator.push_channel(operator.settings_from(arguments(f"--token-file={token}"), {}))
    await channel.start("127.0.0.1", 0)
    try:
        channel.publish(table.make_table([]))
        assert await stream_status(channel, "first-token") == 200
        token.write_text("second-token\n\n")  # another size: a stat tells even within one mtime tick
        assert await stream_status(channel, "first-token") == 401
        assert await stream_status(channel, "second-token") == 200
    finally:
        await channel.stop()


def test_the_push_channel_needs_a_token_at_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    with pytest.raises(operator.SettingsError, match="cannot read"):
        operator.push_channel(operator.settings_from(arguments(f"--token-file={token}"), {}))
    token.write_text(" \n")
    with pytest.raises(operator.SettingsError, match="empty"):
        operator.push_channel(operator.settings_from(arguments(f"--token-file={token}"), {}))


def load_certificates(cert: Path, key: Path) -> CertificateStore:
    """What mailgress/cli.py hands the controller: the proxy's reloading certificate store."""
    return CertificateStore("push channel", (CertificateFiles(cert, key),))


async def test_the_push_channel_serves_tls_with_the_loaded_certificates_through_the_guard(
    tmp_path: Path,
) -> None:
    authority = TestAuthority(tmp_path / "ca")
    served = authority.issue("push", ["127.0.0.1"])
    token = tmp_path / "token"
    token.write_text("the-token\n")
    flags = arguments(
        f"--token-file={token}", f"--tls-cert-file={served.cert}", f"--tls-key-file={served.key}"
    )
    made: list[tuple[str, int, float]] = []

    def guards(name: str, limit: int, timeout: float) -> Guard:
        """What mailgress/cli.py hands the controller (connections.Guard), made as it is asked."""
        made.append((name, limit, timeout))
        return Guard(name, limit, timeout)

    channel = operator.push_channel(operator.settings_from(flags, {}), load_certificates, guards)
    await channel.start("127.0.0.1", 0)
    try:
        assert made == [("push channel", publisher.MAX_CONNECTIONS, publisher.REQUEST_TIMEOUT)]
        url = f"https://127.0.0.1:{channel.port}{publisher.METRICS_PATH}"
        context = ssl.create_default_context(cafile=str(authority.cert))
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_BOUND)) as client,
            client.get(url, ssl=context) as response,
        ):
            assert response.status == 200
    finally:
        await channel.stop()


def test_tls_files_need_a_loader(tmp_path: Path) -> None:
    """An entry point that hands in no loader cannot serve the TLS the settings ask for."""
    token = tmp_path / "token"
    token.write_text("the-token\n")
    flags = arguments(f"--token-file={token}", "--tls-cert-file=c", "--tls-key-file=k")
    with pytest.raises(operator.SettingsError, match="cannot load certificates"):
        operator.push_channel(operator.settings_from(flags, {}))


def test_credentials_from_a_kubeconfig(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(kubeconfig_text("http://127.0.0.1:6443", "abc123"))
    info = operator.connection_info(operator.kube_configuration(config))
    assert (info.server, info.scheme, info.token) == ("http://127.0.0.1:6443", "Bearer", "abc123")
    with pytest.raises(operator.SettingsError, match="cannot load Kubernetes credentials"):
        operator.kube_configuration(tmp_path / "missing")


@pytest.fixture
async def kube_api(tmp_path: Path) -> AsyncIterator[tuple[Emulator, operator.KubeApi]]:
    emulator = Emulator()
    emulator.resources.load_bundled()
    async with emulator, kmock.Server(emulator):
        config = tmp_path / "config"
        config.write_text(kubeconfig_text(str(emulator.url), "writer-token"))
        api = operator.KubeApi(operator.kube_configuration(config), "mailgress-system", "snapshot")
        await api.start()
        try:
            yield emulator, api
        finally:
            await api.stop()


async def post(emulator: Emulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with emulator.post(path, json=body) as response:
        assert response.status == 200
        created: dict[str, Any] = await response.json()
        return created


async def test_status_patch_needs_the_resource_version(kube_api: tuple[Emulator, operator.KubeApi]) -> None:
    emulator, api = kube_api
    await post(
        emulator,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        yaml.safe_load(CRD_FILE.read_text()),
    )
    route = await post(
        emulator,
        "/apis/mailgress.io/v1alpha1/namespaces/mail/mailroutes",
        {"metadata": {"name": "r"}, "spec": {"domains": ["example.com"]}},
    )
    version = route["metadata"]["resourceVersion"]
    assert await api.patch_status("mail", "r", version, {"observedGeneration": 1})
    assert not await api.patch_status("mail", "r", version, {"observedGeneration": 2}), "stale: 409"
    assert not await api.patch_status("mail", "gone", version, {"observedGeneration": 1}), "absent: 404"
    stored = emulator.objects[kmock.resource("mailgress.io", "v1alpha1", "mailroutes"), "mail", "r"].raw
    assert stored["status"] == {"observedGeneration": 1}
    assert emulator.accesses("writer-token")[0].subresource == "status"


def stored_secret(emulator: Emulator) -> dict[str, Any]:
    """The snapshot Secret as the emulator holds it; no ConfigMap was written beside it."""
    assert not any(resource.plural == "configmaps" for resource, _, _ in emulator.objects)
    stored: dict[str, Any] = emulator.objects[
        kmock.resource("", "v1", "secrets"), "mailgress-system", "snapshot"
    ].raw
    return stored


def decoded(stored: dict[str, Any]) -> dict[str, bytes]:
    """The Secret's data as the kubelet writes its files: every value base64-decoded."""
    return {key: base64.b64decode(value, validate=True) for key, value in stored["data"].items()}


async def test_snapshot_is_created_then_patched(kube_api: tuple[Emulator, operator.KubeApi]) -> None:
    """An Opaque Secret, created once, then patched by name; the table in data, base64."""
    emulator, api = kube_api
    await api.save_snapshot(reconciler.Snapshot("v1", compressed=False, content=b'{"first":1}'))
    await api.save_snapshot(reconciler.Snapshot("v2", compressed=False, content=b'{"second":2}'))
    stored = stored_secret(emulator)
    assert (stored["kind"], stored["type"]) == ("Secret", operator.SNAPSHOT_TYPE)
    assert decoded(stored) == {reconciler.SNAPSHOT_KEY: b'{"second":2}'}
    assert not stored.get("binaryData") and not stored.get("stringData")
    assert emulator.accesses("writer-token") == [
        Access(verb="create", resource="secrets"),
        Access(verb="patch", resource="secrets"),
    ]


async def test_a_table_too_large_to_store_plainly_goes_gzipped_and_back(
    kube_api: tuple[Emulator, operator.KubeApi], tmp_path: Path
) -> None:
    """Over 1 MiB of JSON: gzip under the compressed keys, the plain keys removed (a proxy must
    not read the older table beside it, a restart not the older since map); the proxy's reader,
    given the files the kubelet would write, gets the table back, and so does the controller's.
    Small again: plain, the compressed keys removed."""
    emulator, api = kube_api
    big = table_over_the_plain_limit()
    small = table.make_table(big.routes[:1])
    await api.save_snapshot(reconciler.encode_snapshot(small, since_of(small)))
    await api.save_snapshot(reconciler.encode_snapshot(big, since_of(big)))
    files = decoded(stored_secret(emulator))
    assert files.keys() == {reconciler.SNAPSHOT_GZIP_KEY, reconciler.SINCE_GZIP_KEY}
    content, since = files[reconciler.SNAPSHOT_GZIP_KEY], files[reconciler.SINCE_GZIP_KEY]
    assert len(content) + len(since) <= reconciler.MAX_SECRET_BYTES
    (tmp_path / reconciler.SNAPSHOT_GZIP_KEY).write_bytes(content)
    assert subscriber.read_snapshot(tmp_path / reconciler.SNAPSHOT_KEY)[1] == big
    loaded = await api.load_snapshot()
    assert loaded is not None
    assert reconciler.decode_snapshot(loaded) == reconciler.Restored(big, since_of(big))

    await api.save_snapshot(reconciler.encode_snapshot(small, since_of(small)))
    assert decoded(stored_secret(emulator)) == {
        reconciler.SNAPSHOT_KEY: table.to_json(small),
        reconciler.SINCE_KEY: reconciler.encode_since(small, since_of(small)),
    }
    loaded = await api.load_snapshot()
    assert loaded is not None
    assert reconciler.decode_snapshot(loaded) == reconciler.Restored(small, since_of(small))


async def test_no_snapshot_yet_is_none_and_a_refused_read_a_cluster_error(
    kube_api: tuple[Emulator, operator.KubeApi],
) -> None:
    emulator, api = kube_api
    assert await api.load_snapshot() is None
    emulator.forbidden["writer-token"] = {Access(verb="get", resource="secrets")}
    with pytest.raises(reconciler.ClusterError, match="HTTP 403"):
        await api.load_snapshot()


async def test_a_new_secret_holds_only_the_form_written(
    kube_api: tuple[Emulator, operator.KubeApi],
) -> None:
    """Created compressed: the gzip key alone, no null left over from the merge patch's removals."""
    emulator, api = kube_api
    await api.save_snapshot(reconciler.Snapshot("v1", compressed=True, content=b"\x1f\x8bdata"))
    stored = stored_secret(emulator)
    assert stored["data"] == {reconciler.SNAPSHOT_GZIP_KEY: base64.b64encode(b"\x1f\x8bdata").decode()}


async def test_api_trouble_is_a_cluster_error(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(kubeconfig_text("http://127.0.0.1:9", "t"))  # discard port: nothing listens
    api = operator.KubeApi(operator.kube_configuration(config), "ns", "snapshot")
    await api.start()
    try:
        with pytest.raises(reconciler.ClusterUnavailableError):
            await api.save_snapshot(reconciler.Snapshot("v1", compressed=False, content=b"{}"))
        with pytest.raises(reconciler.ClusterUnavailableError):
            await api.load_snapshot()
        with pytest.raises(reconciler.ClusterUnavailableError):
            await api.patch_status("mail", "r", "1", {"observedGeneration": 1})
    finally:
        await api.stop()


async def test_a_refused_event_is_logged_and_raises_nothing(
    kube_api: tuple[Emulator, operator.KubeApi], caplog: pytest.LogCaptureFixture
) -> None:
    """An Event is a courtesy: a 403 (any create in a terminating namespace) must not end the
    status sweep that posts it."""
    emulator, api = kube_api
    emulator.forbidden["writer-token"] = {Access(verb="create", resource="events")}
    caplog.set_level(logging.WARNING, logger=operator.__name__)
    await api.post_event(entry(route_body("alpha", "a.example")), "Normal", "Accepted", "valid")
    refused = "Event Accepted for mail/alpha was refused: POST /api/v1/namespaces/mail/events: HTTP 403"
    assert refused in caplog.text
    assert "events is forbidden: cannot create" in caplog.text, "the API server's reason"


async def test_a_refused_status_patch_is_a_refusal_not_an_outage(
    kube_api: tuple[Emulator, operator.KubeApi],
) -> None:
    """403 (RBAC, an admission policy) is this write's refusal: the sweep goes on with the other
    routes (ClusterError, not ClusterUnavailableError), and the error says why."""
    emulator, api = kube_api
    emulator.forbidden["writer-token"] = {
        Access(verb="patch", group="mailgress.io", resource="mailroutes", subresource="status")
    }
    with pytest.raises(reconciler.ClusterError) as refused:
        await api.patch_status("mail", "r", "1", {"observedGeneration": 1})
    assert not isinstance(refused.value, reconciler.ClusterUnavailableError)
    assert str(refused.value).endswith("HTTP 403: mailroutes is forbidden: cannot patch")


Scripted = tuple[list[tuple[int, Any]], list[web.Request], operator.KubeApi]


@contextlib.asynccontextmanager
async def scripted_kube_api() -> AsyncIterator[Scripted]:
    """A KubeApi against a server that gives every request the next (status, body) of a list the
    test fills (bytes and text as they are, anything else as JSON), and keeps the requests."""
    answers: list[tuple[int, Any]] = []
    requests: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        requests.append(request)
        status, body = answers.pop(0)
        text = body if isinstance(body, str | bytes) else json.dumps(body)
        raw = text if isinstance(text, bytes) else text.encode()
        return web.Response(status=status, body=raw, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{runner.addresses[0][1]}"
    api = operator.KubeApi(configuration, "mailgress-system", "snapshot")
    await api.start()
    try:
        yield answers, requests, api
    finally:
        await api.stop()
        await runner.cleanup()


@pytest.fixture
async def answering() -> AsyncIterator[tuple[list[tuple[int, Any]], operator.KubeApi]]:
    """``scripted_kube_api``'s answers and KubeApi."""
    async with scripted_kube_api() as (answers, _, api):
        yield answers, api


INVALID = (
    b'{"kind":"Status","status":"Failure","reason":"Invalid","code":422,"message":"MailRoute.mailgress.io '
    b'\\"r\\" is invalid: status.conditions: Too many: 9: must have at most 8 items"}'
)


async def test_status_patch_answers_tell_a_refusal_from_an_outage(
    answering: tuple[list[tuple[int, bytes]], operator.KubeApi],
) -> None:
    answers, api = answering
    answers.append((422, INVALID))
    with pytest.raises(reconciler.ClusterError) as refused:
        await api.patch_status("mail", "r", "1", {"observedGeneration": 1})
    assert not isinstance(refused.value, reconciler.ClusterUnavailableError)
    assert "HTTP 422: MailRoute.mailgress.io" in str(refused.value)
    assert str(refused.value).endswith("must have at most 8 items")
    answers.append((422, b"not json"))
    with pytest.raises(reconciler.ClusterError, match=r"HTTP 422$"):
        await api.patch_status("mail", "r", "1", {"observedGeneration": 1})
    for code in (401, 429, 500, 503):
        answers.append((code, b"{}"))
        with pytest.raises(reconciler.ClusterUnavailableError, match=rf"HTTP {code}$"):
            await api.patch_status("mail", "r", "1", {"observedGeneration": 1})


async def test_a_refused_event_of_another_kind_is_logged_too(
    answering: tuple[list[tuple[int, bytes]], operator.KubeApi], caplog: pytest.LogCaptureFixture
) -> None:
    """422 (an Event the API server finds invalid) is logged with its reason; an unavailable API
    still raises, so the sweep stops as for a status write."""
    answers, api = answering
    caplog.set_level(logging.WARNING, logger=operator.__name__)
    answers.append((422, b'{"message":"Event.core \\"r.x\\" is invalid: reason: Required value"}'))
    await api.post_event(entry(route_body("r", "a.example")), "Normal", "Accepted", "valid")
    assert 'HTTP 422: Event.core "r.x" is invalid: reason: Required value' in caplog.text
    answers.append((503, b"{}"))
    with pytest.raises(reconciler.ClusterUnavailableError):
        await api.post_event(entry(route_body("r", "a.example")), "Normal", "Accepted", "valid")
