"""The standard backends: users and passwords, what they report, and the proxy settings they write.

The written settings are read back with the proxy's own parser and the routes compiled with the
controller's own compiler, so a format drift between the testbed and the proxy fails here first.
"""

import subprocess
from pathlib import Path

import pytest
import yaml

from mailgress import standalone
from proxy import settings as proxy_settings
from proxy import table
from proxy.table import Endpoint
from testbed import backends as testbed_backends
from testbed import mailservers
from testbed.backends import UNROUTED_DOMAIN, Backends

EXAMPLE_ROUTES = Path(__file__).resolve().parents[2] / "examples" / "mailroutes.yaml"


def test_standard_users_have_distinct_marked_passwords() -> None:
    addresses = testbed_backends.standard_addresses()
    assert {"alice@alpha.example", "al@alpha.example", "bob@beta.example"} <= set(addresses)
    passwords = [testbed_backends.default_password(address) for address in addresses]
    assert len(set(passwords)) == len(passwords)
    assert all(testbed_backends.PASSWORD_MARKER in password for password in passwords)
    stable = [testbed_backends.default_password(a) for a in addresses] == passwords
    assert stable, "passwords must not change between runs"


def test_every_user_lives_on_the_dovecot_of_its_domain(backends: Backends) -> None:
    for address, user in backends.users.items():
        owner = backends.dovecot_for(address)
        assert owner is backends.dovecots[user.domain]
        assert user in owner.users
        assert user in backends.auth.users
        assert backends.postfix.maildir(address) == owner.maildir(address)
    with pytest.raises(mailservers.MailServerError, match=UNROUTED_DOMAIN):
        backends.dovecot_for(f"x@{UNROUTED_DOMAIN}")
    with pytest.raises(ValueError, match="testbed users live in"):
        backends.add_user(f"x@{UNROUTED_DOMAIN}")


def test_services_point_at_the_running_servers(backends: Backends) -> None:
    services = backends.services()
    assert services["mail/dovecot-alpha"] == {
        "143": [f"127.0.0.1:{backends.alpha.imap_port}"],
        "110": [f"127.0.0.1:{backends.alpha.pop3_port}"],
    }
    assert services["mail/dovecot-beta"]["143"] == [f"127.0.0.1:{backends.beta.imap_port}"]
    assert services["mail/postfix"] == {
        "25": [f"127.0.0.1:{backends.postfix.smtp_port}"],
        "587": [f"127.0.0.1:{backends.postfix.submission_port}"],
    }
    services["mail/postfix"]["25"].append("127.0.0.1:1")
    assert len(backends.services()["mail/postfix"]["25"]) == 1  # a fresh copy each time


def test_generated_mailroutes_are_the_example_file(backends: Backends) -> None:
    """The demo serves examples/mailroutes.yaml, the tests the generated routes: they must agree."""
    assert backends.mailroutes() == list(yaml.safe_load_all(EXAMPLE_ROUTES.read_text()))


def test_written_settings_load_in_the_proxy_and_route_each_domain(backends: Backends, tmp_path: Path) -> None:
    written = backends.write_proxy_settings(tmp_path / "proxy", extra={"serverName": "mx.test"})
    loaded = proxy_settings.load(written.path)
    assert {(listener.protocol, listener.port) for listener in loaded.listeners} == {
        ("imap", written.ports.imap),
        ("pop3", written.ports.pop3),
        ("submission", written.ports.submission),
        ("smtp", written.ports.smtp),
    }
    assert loaded.admin == proxy_settings.AdminSettings("127.0.0.1", written.ports.admin)
    assert loaded.server_name == "mx.test"
    assert loaded.route_files == (written.routes_path,)
    compiled, problems = standalone.compile_bodies(
        standalone.mailroute_bodies(standalone.read_manifests(loaded.route_files)), loaded.services
    )
    assert problems == []
    expected = {
        ("imap", "anyone@alpha.example"): backends.alpha.imap_port,
        ("pop3", "anyone@beta.example"): backends.beta.pop3_port,
        ("submission", "anyone@beta.example"): backends.postfix.submission_port,
        ("smtp", "anyone@alpha.example"): backends.postfix.smtp_port,
    }
    for (protocol, login), port in expected.items():
        route = table.lookup(compiled.table, protocol, login)
        assert route is not None
        upstream = dict(route.upstreams)[protocol]
        assert upstream.endpoints == (Endpoint("127.0.0.1", port),)
    assert table.lookup(compiled.table, "imap", f"anyone@{UNROUTED_DOMAIN}") is None


def test_settings_can_name_route_files_instead(backends: Backends, tmp_path: Path) -> None:
    written = backends.write_proxy_settings(tmp_path, route_files=[EXAMPLE_ROUTES])
    assert written.routes_path is None
    assert proxy_settings.load(written.path).route_files == (EXAMPLE_ROUTES,)


def test_describe_reports_ports_and_every_password(backends: Backends) -> None:
    text = backends.describe()
    for port in (backends.alpha.imap_port, backends.beta.pop3_port, backends.postfix.submission_port):
        assert f"127.0.0.1:{port}" in text
    missing = [address for address, user in backends.users.items() if user.password not in text]
    assert missing == []


def test_a_whole_set_starts_and_stops_without_leftovers(scratch_directory: Path) -> None:
    bed = Backends(scratch_directory / "set", extra_addresses=["zed@beta.example"])
    with bed:
        sessions = [daemon.session for daemon in bed.daemons]
        assert "zed@beta.example" in {user.address for user in bed.beta.users}
        assert bed.postfix.accepts_recipient("zed@beta.example")
    leftovers = [
        subprocess.run(
            ["pgrep", "-s", str(session), "-r", "R,S,D,T,t"], capture_output=True, check=False
        ).stdout
        for session in sessions
    ]
    assert leftovers == [b""] * 4
    assert not any(daemon.running for daemon in bed.daemons)
