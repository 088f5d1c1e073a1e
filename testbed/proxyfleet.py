"""Real ``mailgress proxy`` processes in controller mode, as the pods of one proxy Deployment.

``Deployment`` holds what a cluster mounts into every proxy pod (the push token and the snapshot
file the snapshot Secret would hold) and the port of the controller's push channel. Given a test
CA, the push channel speaks TLS as the chart has it by default: a certificate for the loopback
address for the controller (``controller_tls``), the CA file and an https url for the proxies.
It starts proxies whose settings have a ``controller`` key and the four plain listeners, each in a
folder of its own; ``start_proxy`` returns once the proxy holds a table (its /readyz), or for a
proxy meant to have none (no controller running, no snapshot written) once it listens.
``start_controller`` stands in for the controller with a loopback ``controller.publisher.Publisher``,
its connections guarded as ``mailgress controller``'s are; tests/kube and bench/convergence.py run
the real operator on ``port`` instead. Used by tests/e2e_push, tests/kube and bench/convergence.py.
Never starts mail servers, never writes the token anywhere but its file, binds only 127.0.0.1.
"""

import asyncio
from pathlib import Path

import yaml

from controller import publisher
from mailgress import cli
from proxy import table
from proxy.server import connections
from testbed import mailservers, proxyprocess, proxysettings, tlscerts

# The push channel's bearer token (a Secret in a cluster); tests check no log ever holds it.
PUSH_TOKEN = "e2e-push-token-never-logged"


class Deployment:
    """What a cluster would mount into proxy pods (token, snapshot) and the controller's port."""

    def __init__(self, directory: Path, *, authority: tlscerts.TestAuthority | None = None) -> None:
        """
        Args:
            directory: existing folder for the token, the snapshot and one folder per proxy.
            authority: the CA of the push channel's TLS; None: plain HTTP.
        """
        self.directory = directory
        self.port = mailservers.free_port()
        self.token_file = directory / "token"
        self.token_file.write_text(PUSH_TOKEN)
        self.snapshot_file = directory / "snapshot.json"
        self.proxies: list[proxyprocess.ProxyProcess] = []
        self.ca_file = None if authority is None else authority.cert
        # The controller's certificate and key files (its --tls-cert-file and --tls-key-file).
        self.controller_tls: tuple[Path, Path] | None = None
        if authority is not None:
            issued = authority.issue("push-channel", [mailservers.LOOPBACK])
            self.controller_tls = (issued.cert, issued.key)

    @property
    def url(self) -> str:
        """The push channel's url, as the proxies' settings name it."""
        return f"{'http' if self.ca_file is None else 'https'}://{mailservers.LOOPBACK}:{self.port}"

    async def start_controller(self, first: table.RoutingTable) -> publisher.Publisher:
        """A push channel on ``port`` publishing ``first``; the caller stops it."""
        served = None if self.controller_tls is None else cli.push_certificates(*self.controller_tls)
        channel = publisher.Publisher(PUSH_TOKEN, certificates=served, guards=connections.Guard)
        channel.publish(first)
        await channel.start(mailservers.LOOPBACK, self.port)
        return channel

    async def start_proxy(self, name: str, *, ready: bool = True) -> proxyprocess.ProxyProcess:
        """Start the proxy ``name`` (its proxyName, its folder) and return once it holds a table,
        or with ``ready`` False once it listens (``proxyprocess.ProxyProcess.start``).

        Raises:
            proxyprocess.ProxyError: it exited, or had no table in proxyprocess.READY_TIMEOUT.
        """
        ports = proxysettings.ProxyPorts.free()
        directory = self.directory / name
        directory.mkdir()
        controller = {
            "url": self.url,
            "tokenFile": str(self.token_file),
            "proxyName": name,
            "snapshotFile": str(self.snapshot_file),
        }
        if self.ca_file is not None:
            controller["caFile"] = str(self.ca_file)
        document = {
            "listeners": proxysettings.listeners(ports),
            "admin": {"address": mailservers.LOOPBACK, "port": ports.admin},
            "controller": controller,
        }
        path = directory / proxysettings.SETTINGS_NAME
        path.write_text(yaml.safe_dump(document))
        settings = proxysettings.SettingsFile(path=path, routes_path=None, ports=ports)
        proxy = proxyprocess.ProxyProcess(settings, directory / "mailgress.log", log_level="debug")
        self.proxies.append(proxy)
        # Blocking until /readyz answers 200; in a thread, so a controller on this loop serves it.
        await asyncio.to_thread(proxy.start, ready=ready)
        return proxy

    async def stop_proxies(self) -> None:
        """Stop every proxy started so far, leaving no process behind; their logs stay. Idempotent."""
        for proxy in self.proxies:
            await asyncio.to_thread(proxy.stop)
