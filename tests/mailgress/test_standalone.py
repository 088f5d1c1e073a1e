"""The standalone route source: edits reach the table, broken edits keep the last good one."""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

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
