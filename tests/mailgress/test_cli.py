"""The ``mailgress`` console script: ``routes check``, the proxy's start-up errors and the
controller's push channel certificates and connection guard (wired in here, from the proxy)."""

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from controller import operator, publisher
from mailgress import cli
from proxy.server import certificates, connections
from testbed import mailservers, tlscerts
from tests.kube.conftest import kubeconfig_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "mailroutes.yaml"

ROUTE = """
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {{name: {name}, namespace: mail, creationTimestamp: "{created}"}}
spec:
  domains: ["{domain}"]
  imap: {{backend: {{service: dovecot, port: {port}}}}}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def start_proxy(config: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """``mailgress proxy --config CONFIG`` in a process of its own, for what ends its start."""
    return subprocess.run(
        [sys.executable, "-m", "mailgress.cli", "proxy", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **environment},
    )


def test_check_prints_the_compiled_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["routes", "check", str(EXAMPLES)]) == 0
    out, err = capsys.readouterr()
    table = json.loads(out)
    assert [route["name"] for route in table["routes"]] == ["mail/alpha", "mail/beta"]
    assert table["version"].startswith("sha256:")
    # Without --settings no Service is known: said per route, but the routes themselves are valid.
    assert "mail/alpha: ResolvedRefs=False (BackendNotFound)" in err


def test_check_resolves_services_from_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = write(
        tmp_path,
        "routes.yaml",
        ROUTE.format(name="a", created="2026-01-01T00:00:00Z", domain="a.example", port=143),
    )
    settings = write(
        tmp_path,
        "proxy.yaml",
        "listeners: [{protocol: imap, address: 127.0.0.1, port: 1143}]\n"
        "routes: [routes.yaml]\n"
        'services: {mail/dovecot: {"143": ["127.0.0.1:10143"]}}\n',
    )
    assert cli.main(["routes", "check", str(routes), "--settings", str(settings)]) == 0
    out, err = capsys.readouterr()
    endpoints = json.loads(out)["routes"][0]["upstreams"]["imap"]["endpoints"]
    assert endpoints == [{"host": "127.0.0.1", "port": 10143}]
    assert err == ""


KEYED_ROUTE = """
apiVersion: mailgress.io/v1alpha1
kind: MailRoute
metadata: {name: keyed, namespace: mail}
spec:
  domains: [a.example]
  auth:
    mode: http
    http:
      url: http://127.0.0.1:9000/auth
      headers: {X-Tenant: literal-Header-Value}
      headersFrom: [{name: X-Auth-Key, secretKeyRef: {name: auth-key, key: key}}]
  imap: {backend: {service: dovecot, port: 143}}
"""
SECRET_VALUE = "from-Secret-Value-7q"


def test_check_resolves_secrets_from_settings_and_prints_no_header_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both kinds of header are in the table the proxy runs; what check prints redacts their
    values alike (a literal header may be a shared secret too)."""
    routes = write(tmp_path, "routes.yaml", KEYED_ROUTE)
    settings = write(
        tmp_path,
        "proxy.yaml",
        "listeners: [{protocol: imap, address: 127.0.0.1, port: 1143}]\n"
        'services: {mail/dovecot: {"143": ["127.0.0.1:10143"]}}\n'
        f"secrets: {{mail/auth-key: {{key: {SECRET_VALUE}}}}}\n",
    )
    assert cli.main(["routes", "check", str(routes), "--settings", str(settings)]) == 0
    out, err = capsys.readouterr()
    [route] = json.loads(out)["routes"]
    assert route["httpAuth"]["headers"] == [["X-Auth-Key", "<redacted>"], ["X-Tenant", "<redacted>"]]
    assert err == ""
    assert SECRET_VALUE not in out + err and "literal-Header-Value" not in out + err


def test_the_headers_from_example_resolves_with_the_settings_its_comment_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = write(
        tmp_path,
        "proxy.yaml",
        "listeners: [{protocol: imap, address: 127.0.0.1, port: 1143}]\n"
        'services: {mail/dovecot-alpha: {"143": ["127.0.0.1:10143"], "110": ["127.0.0.1:10110"]}}\n'
        'secrets:\n  mail/auth-key: {key: "the shared key"}\n',
    )
    example = ROOT / "examples" / "auth-http-secret.yaml"
    assert cli.main(["routes", "check", str(example), "--settings", str(settings)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    [route] = json.loads(out)["routes"]
    assert [name for name, _ in route["httpAuth"]["headers"]] == ["X-Auth-Key", "X-Tenant"]


def test_check_without_the_secret_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Secret the settings do not hold is SecretNotFound, like a missing Service: printed, but
    the route is valid (status 0) and stays in the table, without auth_http settings."""
    routes = write(tmp_path, "routes.yaml", KEYED_ROUTE)
    assert cli.main(["routes", "check", str(routes)]) == 0
    out, err = capsys.readouterr()
    [route] = json.loads(out)["routes"]
    assert (route["auth"], "httpAuth" in route) == ("http", False)
    assert "mail/keyed: ResolvedRefs=False (BackendNotFound)" in err
    assert "headersFrom X-Auth-Key: Secret mail/auth-key not found" in err


def test_check_fails_on_an_invalid_route_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = write(
        tmp_path, "routes.yaml", ROUTE.format(name="a", created="x", domain="a.example", port=70000)
    )
    assert cli.main(["routes", "check", str(routes)]) == 1
    _, err = capsys.readouterr()
    assert "mail/a: Accepted=False (Invalid)" in err and "port" in err


def test_check_reports_the_loser_of_a_conflict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    older = ROUTE.format(name="older", created="2026-01-01T00:00:00Z", domain="a.example", port=143)
    newer = ROUTE.format(name="newer", created="2026-02-01T00:00:00Z", domain="a.example", port=143)
    routes = write(tmp_path, "routes.yaml", older + "---" + newer)
    assert cli.main(["routes", "check", str(routes)]) == 1
    out, err = capsys.readouterr()
    assert [route["name"] for route in json.loads(out)["routes"]] == ["mail/older"]
    assert "mail/newer: Accepted=False (Conflicted)" in err and "mail/older" in err


def test_check_fails_on_a_mistyped_kind_or_api_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kubectl apply refuses both: the file must not pass with exit status 0 as if they were absent."""
    good = ROUTE.format(name="a", created="2026-01-01T00:00:00Z", domain="a.example", port=143)
    kind = ROUTE.format(name="b", created="x", domain="b.example", port=143).replace(
        "kind: MailRoute", "kind: Mailroute"
    )
    version = ROUTE.format(name="c", created="x", domain="c.example", port=143).replace(
        "v1alpha1", "v1alpha2"
    )
    routes = write(tmp_path, "routes.yaml", "---".join((good, kind, version)))
    assert cli.main(["routes", "check", str(routes)]) == 1
    out, err = capsys.readouterr()
    assert [route["name"] for route in json.loads(out)["routes"]] == ["mail/a"]
    assert 'mail/b: Accepted=False (Invalid): kind: Unsupported value: "Mailroute"' in err
    assert 'mail/c: Accepted=False (Invalid): apiVersion: Unsupported value: "mailgress.io/v1alpha2"' in err


def test_check_reads_the_list_kubectl_get_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    item = ROUTE.format(name="a", created="2026-01-01T00:00:00Z", domain="a.example", port=143)
    indented = "".join(f"  {line}\n" if line else "" for line in item.strip().splitlines())
    routes = write(tmp_path, "list.yaml", "apiVersion: v1\nkind: List\nitems:\n-" + indented[1:])
    assert cli.main(["routes", "check", str(routes)]) == 0
    assert [route["name"] for route in json.loads(capsys.readouterr().out)["routes"]] == ["mail/a"]


def _hijack(created: str) -> str:
    """team-x's route for the user ceo@alpha.example, created at ``created``."""
    route = ROUTE.format(name="hijack", created=created, domain="", port=143)
    route = route.replace("namespace: mail", "namespace: team-x")
    return route.replace('domains: [""]', "users: [ceo@alpha.example]")


def test_check_refuses_a_later_user_of_another_namespaces_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same tenancy rule as the controller's (one compiler): team-x cannot take a user of
    the domain namespace mail already routes."""
    owner = ROUTE.format(name="alpha", created="2026-02-01T00:00:00Z", domain="alpha.example", port=143)
    routes = write(tmp_path, "routes.yaml", owner + "---" + _hijack("2026-03-01T00:00:00Z"))
    assert cli.main(["routes", "check", str(routes)]) == 1
    out, err = capsys.readouterr()
    assert [route["name"] for route in json.loads(out)["routes"]] == ["mail/alpha"]
    assert "team-x/hijack: Accepted=False (Conflicted)" in err
    assert (
        'user "ceo@alpha.example" is within the domain "alpha.example", which mail/alpha routes '
        "(created earlier) in another namespace" in err
    )


def test_check_names_the_older_claim_that_blocks_a_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Age decides: a claim made first keeps its user, and the domain's route is refused at
    once, naming it (before any mail flows), rather than evicting it later."""
    owner = ROUTE.format(name="alpha", created="2026-02-01T00:00:00Z", domain="alpha.example", port=143)
    routes = write(tmp_path, "routes.yaml", owner + "---" + _hijack("2026-01-01T00:00:00Z"))
    assert cli.main(["routes", "check", str(routes)]) == 1
    out, err = capsys.readouterr()
    assert [route["name"] for route in json.loads(out)["routes"]] == ["team-x/hijack"]
    assert "mail/alpha: Accepted=False (Conflicted)" in err
    assert (
        'domain "alpha.example" covers the user "ceo@alpha.example", which team-x/hijack routes '
        "(created earlier) in another namespace" in err
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [("kind: [unclosed\n", "not valid YAML"), ("- just\n- a list\n", "must be a mapping")],
)
def test_check_refuses_broken_files_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    assert cli.main(["routes", "check", str(write(tmp_path, "bad.yaml", text))]) == 2
    _, err = capsys.readouterr()
    assert message in err and "Traceback" not in err


def test_check_never_quotes_a_broken_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A route file's auth_http headers may hold a shared secret: a YAML error names the place only."""
    text = 'kind: MailRoute\nspec: {auth: {http: {headers: {X-Key: "S3cr3t-value-never-shown}}}}\n'
    assert cli.main(["routes", "check", str(write(tmp_path, "bad.yaml", text))]) == 2
    out, err = capsys.readouterr()
    assert "S3cr3t" not in out + err and "(line 2, column" in err


def test_check_without_mailroutes_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "other.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert cli.main(["routes", "check", str(path)]) == 1
    assert "no MailRoute objects found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("listeners: []\n", "listeners: expected a non-empty list"),
        (
            "listeners: [{protocol: imap, address: 127.0.0.1, port: 1}]\nroutes: [missing.yaml]\n",
            "cannot read",
        ),
        ("listeners: [{protocol: imap, address: 127.0.0.1, port: 1}]\n", "name no MailRoute files"),
    ],
)
def test_proxy_start_up_errors_are_one_clear_line(tmp_path: Path, settings: str, message: str) -> None:
    path = write(tmp_path, "proxy.yaml", settings)
    result = start_proxy(path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_pod_name_the_controller_would_refuse_is_a_start_up_error(tmp_path: Path) -> None:
    """Without controller.proxyName the proxy acks under POD_NAME; one the controller refuses
    ends the start with one line naming it, not a traceback from inside the loop."""
    (tmp_path / "token").write_text("secret-token\n")
    listener = f"{{protocol: imap, address: 127.0.0.1, port: {mailservers.free_port()}}}"
    settings = f"listeners: [{listener}]\ncontroller: {{url: 'http://127.0.0.1:1', tokenFile: token}}\n"
    result = start_proxy(write(tmp_path, "proxy.yaml", settings), POD_NAME="Proxy_1")
    assert result.returncode == cli.EXIT_USAGE
    assert "POD_NAME 'Proxy_1'" in result.stderr and "Traceback" not in result.stderr
    assert "secret-token" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "listener", "message"),
    [
        ("", "port: {taken}", "listener imap: cannot bind"),
        ("admin: {{address: 127.0.0.1, port: {taken}}}\n", "port: {free}", "admin endpoint: cannot bind"),
        ("", "port: {free}, tls: implicit, certificates: [{{cert: bad.crt, key: bad.key}}]", "bad.crt / "),
        ("backendTls: {{caFile: bad.crt}}\n", "port: {free}", "backendTls.caFile"),
    ],
    ids=["listener-port-in-use", "admin-port-in-use", "unloadable-certificate", "unloadable-backend-ca"],
)
def test_proxy_start_up_failures_are_one_clear_line(
    tmp_path: Path, extra: str, listener: str, message: str
) -> None:
    """What the proxy cannot start with (a port, a certificate, a CA file) ends it with one line
    naming it and the usage status, before any client is accepted: never a traceback."""
    (tmp_path / "bad.crt").write_text("not a certificate\n")
    (tmp_path / "bad.key").write_text("not a key\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        routes = write(
            tmp_path, "routes.yaml", ROUTE.format(name="a", created="", domain="a.example", port=143)
        )
        where = listener.format(taken=port, free=mailservers.free_port())
        imap = f"{{name: imap, protocol: imap, address: 127.0.0.1, {where}}}"
        settings = f"listeners: [{imap}]\nroutes: [{routes.name}]\n{extra.format(taken=port)}"
        result = start_proxy(write(tmp_path, "proxy.yaml", settings))
    assert result.returncode == cli.EXIT_USAGE
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("mailgress: ")]) == 1


def test_controller_certificates_come_from_the_proxys_reloading_store(tmp_path: Path) -> None:
    """The composition root hands the controller the proxy's CertificateStore."""
    authority = tlscerts.TestAuthority(tmp_path / "ca")
    served = authority.issue("push", ["mailgress-controller.mailgress.svc"])
    loaded = cli.push_certificates(served.cert, served.key)
    assert isinstance(loaded, certificates.CertificateStore)
    assert loaded.refresh() is False  # nothing changed since loading
    with pytest.raises(operator.SettingsError, match="push channel"):
        cli.push_certificates(tmp_path / "missing.crt", served.key)


def test_the_controller_always_runs_its_push_port_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """mailgress controller hands the operator the admin port's guard for its push port."""
    handed: dict[str, object] = {}

    def command(arguments: object, **wiring: object) -> int:
        handed.update(wiring)
        return 0

    monkeypatch.setattr(operator, "command", command)
    assert cli.main(["controller", "--token-file=token"]) == 0
    assert handed == {"certificates": cli.push_certificates, "guards": connections.Guard}


def test_controller_with_unloadable_tls_files_exits_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = write(tmp_path, "token", "the-token\n")
    # Never contacted: the settings fail before the operator starts.
    kubeconfig = write(tmp_path, "kubeconfig", kubeconfig_text("http://127.0.0.1:1", "api-token"))
    bad = write(tmp_path, "tls.crt", "not a certificate\n")
    argv = ["controller", f"--token-file={token}", f"--kubeconfig={kubeconfig}"]
    argv += [f"--tls-cert-file={bad}", f"--tls-key-file={bad}", "--health="]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("mailgress controller: ")
    assert str(bad) in err
    assert "Traceback" not in err


def test_the_descriptor_limit_is_raised_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    """A runtime's soft limit of 1024 beside a large hard one must not cap the proxy's sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with caplog.at_level("INFO", logger="mailgress.cli"):
            cli._raise_descriptor_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert "open descriptors limited to" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["negative-content-length", "long-url", "bad-chunk"],
)
async def test_a_malformed_request_to_the_push_port_is_one_debug_line(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Review J7: each one logged an ERROR with a ten-line traceback (aiohttp's), so anyone who
    reaches the admin or push port could fill the log."""
    cli._quiet_malformed_requests()
    channel = publisher.Publisher(token="push-token", certificates=None, guards=connections.Guard)
    await channel.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel.port)
        writer.write(request_bytes)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.0 400")
        writer.close()
    finally:
        await channel.stop()
    server = [record for record in caplog.records if record.name == "aiohttp.server"]
    assert not [record for record in server if record.levelno > logging.DEBUG]
    assert not any(record.exc_info for record in server)


def test_a_failing_handler_stays_an_error_with_its_traceback() -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), sys.exc_info()
        )
    assert cli._malformed_requests_at_debug(record) is True
    assert record.levelno == logging.ERROR and record.exc_info is not None
