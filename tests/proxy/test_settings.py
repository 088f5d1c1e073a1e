"""The settings file: a good document parses; each mistake gets a message naming the key."""

from pathlib import Path

import pytest
import yaml

from proxy import settings
from proxy.table import Endpoint
from testbed.volumes import KubeletVolume

GOOD = """
listeners:
  - {name: imap, protocol: imap, address: 127.0.0.1, port: 1143}
  - {name: mx, protocol: smtp, address: "::1", port: 1025}
admin: {address: 127.0.0.1, port: 9901}
serverName: mx.example
timeouts: {preLogin: 30, idle: 600}
routes: [routes/mailroutes.yaml]
services:
  mail/dovecot: {"143": ["127.0.0.1:10143", "[::1]:10143"]}
secrets:
  mail/auth-key: {key: "s3cr3t-Settings-Value", "2": "other"}
"""
SECRET_VALUE = "s3cr3t-Settings-Value"


def test_good_settings_parse(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(GOOD)
    loaded = settings.load(path)
    assert [listener.name for listener in loaded.listeners] == ["imap", "mx"]
    assert loaded.listeners[1].address == "::1"
    assert loaded.admin == settings.AdminSettings("127.0.0.1", 9901)
    assert loaded.timeouts.pre_login == 30.0
    assert loaded.timeouts.backend_connect == settings.DEFAULT_BACKEND_CONNECT_TIMEOUT
    assert loaded.route_files == (tmp_path / "routes" / "mailroutes.yaml",)
    assert loaded.services[("mail", "dovecot", "143")] == (
        Endpoint("127.0.0.1", 10143),
        Endpoint("::1", 10143),
    )
    assert loaded.secrets == {("mail", "auth-key"): {"key": SECRET_VALUE, "2": "other"}}
    assert SECRET_VALUE not in repr(loaded)


def test_files_are_named_through_their_symlinks(tmp_path: Path) -> None:
    """Kubernetes mounts Secrets and ConfigMaps through symlinks and renews them by swapping the
    folder they point into (testbed/volumes.py): every file the proxy reads again keeps the path
    the settings name, so each read after a renewal gets the new version."""
    keys = ("tls.crt", "tls.key", "ca.crt", "mailroutes.yaml", "token", "snapshot")
    volume = KubeletVolume(tmp_path / "mounted", dict.fromkeys(keys, b"first"))
    listener = {
        "name": "imaps", "protocol": "imap", "address": "127.0.0.1", "port": 993, "tls": "implicit",
        "certificates": [{"cert": "mounted/tls.crt", "key": "mounted/tls.key"}],
    }  # fmt: skip
    common = {"listeners": [listener], "backendTls": {"caFile": "mounted/ca.crt"}}
    standalone = settings.parse({**common, "routes": ["mounted/mailroutes.yaml"], "services": {}}, tmp_path)
    controller = {"url": "http://ctl:8080", "tokenFile": "mounted/token", "snapshotFile": "mounted/snapshot"}
    cluster = settings.parse({**common, "controller": controller}, tmp_path)
    assert cluster.controller is not None
    [certificates] = standalone.listeners[0].certificates
    files = [
        certificates.cert,
        certificates.key,
        standalone.backend_tls.ca_file,
        *standalone.route_files,
        cluster.controller.token_file,
        cluster.controller.snapshot_file,
    ]
    assert files == [volume.path(key) for key in keys]
    volume.update(dict.fromkeys(keys, b"second"))
    assert [path.read_bytes() for path in files if path is not None] == [b"second"] * len(keys)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listeners": []}, "listeners: expected a non-empty list"),
        ({"listeners": [{"protocol": "nntp", "address": "127.0.0.1", "port": 1}]}, "'nntp' is not one of"),
        ({"listeners": [{"protocol": "imap", "address": "localhost", "port": 1}]}, "not an IP address"),
        ({"listeners": [{"protocol": "imap", "address": "127.0.0.1", "port": 0}]}, "port must be a number"),
        (
            {
                "listeners": [
                    {"protocol": "imap", "address": "127.0.0.1", "port": 1},
                    {"protocol": "imap", "address": "127.0.0.1", "port": 2},
                ]
            },
            "duplicate names imap",
        ),
        ({"services": {"dovecot": {"143": ["127.0.0.1:1"]}}}, "must be written namespace/name"),
        ({"services": {"mail/d": {"143": ["127.0.0.1"]}}}, "is not host:port"),
        ({"secrets": ["mail/auth-key"]}, "secrets: expected a mapping of 'namespace/name' to"),
        ({"secrets": {"auth-key": {"key": "v"}}}, "secrets: 'auth-key' must be written namespace/name"),
        ({"secrets": {"mail/auth-key": "v"}}, "secrets.mail/auth-key: expected a mapping of key to value"),
        ({"secrets": {"mail/auth-key": {"key": 123456}}}, "secrets.mail/auth-key.key: expected a string"),
        ({"controller": {"url": "http://c:1", "tokenFile": "t"}}, "with routes, services or secrets"),
        ({"timeouts": {"idle": -1}}, "timeouts.idle: expected a positive number"),
        ({"maxErrors": 0}, "maxErrors"),
        ({"serverName": "two words"}, "serverName"),
        ({"colour": "blue"}, "unknown keys colour"),
    ],
)
def test_mistakes_are_named(change: dict[str, object], message: str) -> None:
    document = yaml.safe_load(GOOD)
    document.update(change)
    with pytest.raises(settings.SettingsError, match=message) as raised:
        settings.parse(document, Path("/"))
    assert "123456" not in str(raised.value)  # a secret's value, even a wrong one, is never shown


PLAIN_LISTENER = {"protocol": "imap", "address": "127.0.0.1", "port": 1143}


def test_trusted_networks_ignore_address_bits_past_the_prefix() -> None:
    """As nginx's set_real_ip_from, which warns that they are meaningless and uses the network."""
    cidrs = ["10.0.0.1/8", "192.168.1.77/24", "fd00::1/8", "2001:db8::/32"]
    listener = {**PLAIN_LISTENER, "name": "imap", "proxyProtocol": {"trustedCidrs": cidrs}}
    parsed = settings.parse({**yaml.safe_load(GOOD), "listeners": [listener]}, Path("/"))
    assert [str(network) for network in parsed.listeners[0].proxy_protocol_from] == [
        "10.0.0.0/8",
        "192.168.1.0/24",
        "fd00::/8",
        "2001:db8::/32",
    ]


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "300.1.1.0/24", "fd00::/129", "10.0", "mail/8"])
def test_trusted_networks_must_be_networks(cidr: str) -> None:
    listener = {**PLAIN_LISTENER, "name": "imap", "proxyProtocol": {"trustedCidrs": [cidr]}}
    with pytest.raises(
        settings.SettingsError, match=r"listeners\[0\].proxyProtocol.trustedCidrs: .* is not a network"
    ):
        settings.parse({**yaml.safe_load(GOOD), "listeners": [listener]}, Path("/"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"listeners": [{**PLAIN_LISTENER, "tls": "starttls", "starttsl": "required"}]},
            r"listeners\[0\]: unknown keys starttsl",
            id="listener",
        ),
        pytest.param(
            {"listeners": [{**PLAIN_LISTENER, "proxyProtocol": {"trustedcidrs": ["10.0.0.0/8"]}}]},
            r"listeners\[0\].proxyProtocol: unknown keys trustedcidrs",
            id="proxy-protocol",
        ),
        pytest.param(
            {"listeners": [{**PLAIN_LISTENER, "certificates": [{"cert": "c", "key": "k", "chain": "x"}]}]},
            r"listeners\[0\].certificates\[0\]: unknown keys chain",
            id="certificate-pair",
        ),
        pytest.param(
            {"admin": {"address": "127.0.0.1", "port": 9, "bind": 1}}, "admin: unknown keys bind", id="admin"
        ),
        pytest.param({"timeouts": {"prelogin": 5}}, "timeouts: unknown keys prelogin", id="timeouts"),
        pytest.param(
            {"backendTls": {"cafile": "ca.crt"}}, "backendTls: unknown keys cafile", id="backend-tls"
        ),
        pytest.param(
            {"limits": {"connectionsPerIP": 5}}, "limits: unknown keys connectionsPerIP", id="limits"
        ),
        pytest.param({"drain": {"grace": 5}}, "drain: unknown keys grace", id="drain"),
    ],
)
def test_a_misspelt_key_is_refused_in_every_section(change: dict[str, object], message: str) -> None:
    """A key a section does not define is a mistake, not a default: a misspelt ``starttls:
    required`` would otherwise leave plaintext logins allowed without a word."""
    document = yaml.safe_load(GOOD)
    document.update(change)
    with pytest.raises(settings.SettingsError, match=message):
        settings.parse(document, Path("/"))


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(settings.SettingsError, match="cannot read"):
        settings.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("listeners: [\n")
    with pytest.raises(settings.SettingsError, match="not valid YAML"):
        settings.load(broken)


def test_a_yaml_error_says_where_without_quoting_the_line(tmp_path: Path) -> None:
    """PyYAML's message quotes the broken line; in a settings file that may be a secret."""
    broken = tmp_path / "broken.yaml"
    broken.write_text('listeners: []\nsecrets:\n  mail/auth: {key: "S3cr3t-value-never-shown\n')
    with pytest.raises(settings.SettingsError) as raised:
        settings.load(broken)
    message = str(raised.value)
    assert "S3cr3t" not in message
    assert "while scanning a quoted scalar (line 3, column 20)" in message


CLUSTER_LISTENERS = [PLAIN_LISTENER]


def controller_settings(controller: dict[str, object]) -> settings.ControllerSettings | None:
    document = {"listeners": CLUSTER_LISTENERS, "controller": {"tokenFile": "token", **controller}}
    return settings.parse(document, Path("/")).controller


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:S3cretPw@mailgress-controller.mail.svc:9400",
        "https://admin:S3cretPw@mailgress-controller.mail.svc:9400/",
        "https://:S3cretPw@mailgress-controller.mail.svc",
        "http://S3cretPw@mailgress-controller.mail.svc:9400",
        "http://admin:S3cretPw@mailgress-controller.mail.svc:9400/?q=1",  # two mistakes
        "admin:S3cretPw@mailgress-controller.mail.svc:9400",  # no scheme: urlsplit sees none
        "http:/admin:S3cretPw@mailgress-controller.mail.svc",  # one slash: no authority either
        "http://admin:S3cretPw/x@mailgress-controller.mail.svc:9400",  # '/' in it: urlsplit's path
        "http://admin:S3cretPw?x@mailgress-controller.mail.svc:9400",  # '?': urlsplit's query
        "http://admin:S3cretPw#x@mailgress-controller.mail.svc:9400",  # '#': urlsplit's fragment
        "http://admin:1234/S3cretPw@mailgress-controller.mail.svc:9400",  # reads as host admin:1234
    ],
)
def test_a_controller_url_with_a_user_or_password_is_refused_without_showing_it(url: str) -> None:
    """The channel authenticates with tokenFile: a password in the url would reach the log and
    then make the HTTP client refuse every request (an exception that ended the proxy)."""
    with pytest.raises(
        settings.SettingsError, match=r"controller\.url: must not hold a user name or password"
    ) as raised:
        controller_settings({"url": url})
    assert "S3cretPw" not in str(raised.value)


def test_an_at_sign_anywhere_in_the_controller_url_is_refused_and_percent_encoded_is_taken() -> None:
    """Review P1: where user information ends cannot be told ('/', '?' or '#' in a password puts
    the '@' in urlsplit's path), so any '@' is refused; %40 in a path is taken."""
    with pytest.raises(settings.SettingsError, match=r"write an '@' that belongs in a path as %40"):
        controller_settings({"url": "http://c:9400/base@v1"})
    parsed = controller_settings({"url": "http://c:9400/base%40v1"})
    assert parsed is not None and parsed.url == "http://c:9400/base%40v1"


@pytest.mark.parametrize(
    "url",
    [
        "https://admin:S3cretPw\uff20mailgress-controller.mail.svc:9400",  # full-width '@'
        "https://admin:S3cretPw\ufe6bmailgress-controller.mail.svc:9400",  # small '@'
        "https://admin:S3cretPw\uff0fx.svc:9400",  # full-width '/': urlsplit's ValueError
        "https://S3cretPw.b\u00fccher.example:9400",  # any other non-ASCII
    ],
)
def test_a_controller_url_outside_ascii_is_refused_without_showing_it(url: str) -> None:
    """Review Q1 #3: urlsplit reads characters that NFKC folds to '@', '/', '?', '#' or ':' and
    raised a bare ValueError quoting the whole authority, password included (a traceback at start)."""
    with pytest.raises(settings.SettingsError, match=r"controller\.url: expected an ASCII") as raised:
        controller_settings({"url": url})
    assert "S3cretPw" not in str(raised.value)


@pytest.mark.parametrize("url", ["http://c:99999", "http://c:port", "http://c:-1"])
def test_a_controller_url_with_a_bad_port_is_refused(url: str) -> None:
    with pytest.raises(settings.SettingsError, match=r"controller\.url: expected http"):
        controller_settings({"url": url})


@pytest.mark.parametrize("name", ["proxy-1", "mailgress-proxy-7d9f5c-x2b4q", "proxy-1.zone-a"])
def test_a_pod_name_is_a_proxy_name(name: str) -> None:
    parsed = controller_settings({"url": "http://c:1", "proxyName": name})
    assert parsed is not None and parsed.proxy_name == name


@pytest.mark.parametrize("name", ["Proxy_1", "PROXY-1", "proxy_1", "-proxy", "proxy-", "a..b", "", 7])
def test_a_proxy_name_the_controller_refuses_is_refused(name: object) -> None:
    """The controller answers 400 to every stream under such a name: the proxy would never follow."""
    with pytest.raises(settings.SettingsError, match=r"controller\.proxyName: expected lower-case letters"):
        controller_settings({"url": "http://c:1", "proxyName": name})
