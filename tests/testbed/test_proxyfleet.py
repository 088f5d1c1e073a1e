"""The proxy fleet: a real ``mailgress proxy`` in controller mode, fed by the stand-in controller.

No mail server is involved (the table is empty; tests/e2e_push carries logins through such
proxies): the proxy joins the push channel with the mounted token under its own name, acks the
published table, and ``stop_proxies`` leaves no process behind and no token in the log.
"""

import asyncio
from pathlib import Path

from controller import publisher
from proxy import table
from testbed import mailservers, proxyfleet

# Bounds the wait for the ack; it normally comes within a second of the proxy being ready.
ACK_TIMEOUT = 20.0


async def test_a_proxy_acks_the_published_table_under_its_name_and_stops_without_leftovers(
    tmp_path: Path,
) -> None:
    deployment = proxyfleet.Deployment(tmp_path)
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
    assert f"push channel: following http://{mailservers.LOOPBACK}:{deployment.port} as proxy-a" in log
    assert proxyfleet.PUSH_TOKEN not in log
    await deployment.stop_proxies()  # idempotent
