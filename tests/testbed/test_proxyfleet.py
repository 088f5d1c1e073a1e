"""The proxy fleet: a real ``mailgress proxy`` in controller mode, fed by the stand-in controller.

No mail server is involved (the table is empty; tests/e2e_push carries logins through such
proxies): the proxy joins the push channel with the mounted token under its own name, acks the
published table, and ``stop_proxies`` leaves no process behind and no token in the log; over
plain HTTP (with the proxy's warning) and over TLS verified with a test CA.
"""

import asyncio
from pathlib import Path

import pytest

from controller import publisher
from proxy import table
from testbed import mailservers, proxyfleet, tlscerts

# Bounds the wait for the ack; it normally comes within a second of the proxy being ready.
ACK_TIMEOUT = 20.0


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
async def test_a_proxy_acks_the_published_table_under_its_name_and_stops_without_leftovers(
    tmp_path: Path, tls: bool
) -> None:
    authority = tlscerts.TestAuthority(tmp_path / "push-ca") if tls else None
    deployment = proxyfleet.Deployment(tmp_path, authority=authority)
    scheme = "https" if tls else "http"
    assert deployment.url == f"{scheme}://{mailservers.LOOPBACK}:{deployment.port}"
    assert deployment.token_file.read_text() == proxyfleet.PUSH_TOKEN
    controller = await deployment.start_controller(table.EMPTY_TABLE)
    expected = {"proxy-a": publisher.Ack(table.EMPTY_TABLE.version, True, "")}
    acked = asyncio.Event()
    controller.on_change(lambda: acked.set() if controller.acks() == expected else None)
    try:
        proxy = await deployment.start_proxy("proxy-a")  # ready: it holds the table
        session = proxy.pid
        assert f'version="{table.EMPTY_TABLE.version}"' in proxy.metrics()
        await asyncio.wait_for(acked.wait(), ACK_TIMEOUT)
    finally:
        await deployment.stop_proxies()
        await controller.stop()
    assert deployment.proxies == [proxy]
    assert mailservers.session_processes(session) == []
    log = proxy.log_text()  # the proxy's own words, in the proxy's folder
    assert f"push channel: following {deployment.url} as proxy-a" in log
    assert ("is plain HTTP" in log) is not tls
    assert proxyfleet.PUSH_TOKEN not in log
    await deployment.stop_proxies()  # idempotent
