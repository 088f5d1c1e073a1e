"""Proxy settings and MailRoute manifests as the testbed writes them, read back by the proxy's parser."""

from pathlib import Path

import pytest
import yaml

from proxy import settings as proxy_settings
from proxy.table import Endpoint
from testbed import proxysettings

PORTS = proxysettings.ProxyPorts(imap=1143, pop3=1110, submission=1587, smtp=1025, admin=9901)
SERVICES = {"mail/dovecot": {143: ["127.0.0.1:10143", "127.0.0.1:10144"], "pop3": ["127.0.0.1:10110"]}}


def test_mailroute_manifest_has_only_what_is_given() -> None:
    assert proxysettings.mailroute("a", ["a.example"], imap=("dovecot", 143)) == {
        "apiVersion": "mailgress.io/v1alpha1",
        "kind": "MailRoute",
        "metadata": {"name": "a", "namespace": "mail"},
        "spec": {"domains": ["a.example"], "imap": {"backend": {"service": "dovecot", "port": 143}}},
    }
    full = proxysettings.mailroute(
        "b", ["b.example"], namespace="other", users=["ceo@b.example"], pop3=("dovecot", "pop3"),
        submission=("postfix", 587), smtp=("postfix", 25), balance="round-robin",
    )  # fmt: skip
    assert full["metadata"]["namespace"] == "other"
    assert full["spec"]["users"] == ["ceo@b.example"]
    assert full["spec"]["pop3"] == {"backend": {"service": "dovecot", "port": "pop3"}}
    assert set(full["spec"]) == {"domains", "users", "pop3", "submission", "smtp", "balance"}


def test_written_settings_parse_in_the_proxy(tmp_path: Path) -> None:
    routes = [proxysettings.mailroute("a", ["a.example"], imap=("dovecot", 143))]
    other = tmp_path / "more-routes.yaml"
    written = proxysettings.write(
        tmp_path / "proxy",
        ports=PORTS,
        services=SERVICES,
        routes=routes,
        route_files=[other],
        extra={"timeouts": {"preLogin": 5}, "maxErrors": 3},
    )
    loaded = proxy_settings.load(written.path)
    assert [(listener.name, listener.port) for listener in loaded.listeners] == [
        ("imap", 1143),
        ("pop3", 1110),
        ("submission", 1587),
        ("mx", 1025),
    ]
    assert loaded.route_files == (tmp_path / "proxy" / "mailroutes.yaml", other)
    assert loaded.services[("mail", "dovecot", "143")] == (
        Endpoint("127.0.0.1", 10143),
        Endpoint("127.0.0.1", 10144),
    )
    assert loaded.services[("mail", "dovecot", "pop3")] == (Endpoint("127.0.0.1", 10110),)
    assert (loaded.timeouts.pre_login, loaded.max_errors) == (5.0, 3)
    assert list(yaml.safe_load_all(written.routes_path.read_text())) == routes  # type: ignore[union-attr]
    assert written.admin_url == "http://127.0.0.1:9901"


def test_added_listeners_get_free_ports_that_the_file_reports(tmp_path: Path) -> None:
    more = [{"name": "imap-pp", "protocol": "imap", "proxyProtocol": {"trustedCidrs": ["127.0.0.1/32"]}}]
    written = proxysettings.write(
        tmp_path, ports=PORTS, services=SERVICES, extra={"listeners": proxysettings.listeners(PORTS, more)}
    )
    ports = written.listener_ports()
    assert list(ports) == ["imap", "pop3", "submission", "mx", "imap-pp"]
    assert [ports[name] for name in ("imap", "pop3", "submission", "mx")] == [1143, 1110, 1587, 1025]
    assert ports["imap-pp"] not in (1143, 1110, 1587, 1025, 9901)
    loaded = {listener.name: listener for listener in proxy_settings.load(written.path).listeners}
    assert {name: listener.port for name, listener in loaded.items()} == ports
    assert (loaded["imap-pp"].protocol, loaded["imap-pp"].address) == ("imap", "127.0.0.1")
    assert [str(network) for network in loaded["imap-pp"].proxy_protocol_from] == ["127.0.0.1/32"]


def test_plain_settings_report_their_four_listeners(tmp_path: Path) -> None:
    written = proxysettings.write(tmp_path, ports=PORTS, services=SERVICES, routes=[])
    assert written.listener_ports() == {"imap": 1143, "pop3": 1110, "submission": 1587, "mx": 1025}


def test_route_files_are_replaced_whole(tmp_path: Path) -> None:
    written = proxysettings.write(tmp_path, ports=PORTS, services=SERVICES, routes=[])
    replacement = [proxysettings.mailroute("new", ["new.example"], smtp=("postfix", 25))]
    written.write_routes(replacement)
    assert written.routes_path is not None
    assert list(yaml.safe_load_all(written.routes_path.read_text())) == replacement
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mailgress.yaml", "mailroutes.yaml"]


def test_settings_without_own_route_file_refuse_route_edits(tmp_path: Path) -> None:
    written = proxysettings.write(tmp_path, ports=PORTS, services=SERVICES, route_files=[tmp_path / "r.yaml"])
    with pytest.raises(ValueError, match="route files written by someone else"):
        written.write_routes([])


def test_free_ports_are_five_distinct_ones() -> None:
    ports = proxysettings.ProxyPorts.free()
    assert len({ports.imap, ports.pop3, ports.submission, ports.smtp, ports.admin}) == 5
    assert [PORTS.listener_port(p) for p in ("imap", "pop3", "submission", "smtp")] == [
        1143,
        1110,
        1587,
        1025,
    ]
