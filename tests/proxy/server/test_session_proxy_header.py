"""Reading a client's PROXY header (session.py): v1 and v2 told apart by their first bytes, each
read to its end and not one byte further.

Mail is server-speaks-first: a header the proxy has not recognised as complete leaves the client
waiting for a greeting, so even the shortest v1 header (``PROXY UNKNOWN``, 15 bytes) must be
answered. Whatever follows the header in the same segment (the first command, a TLS hello) is the
session's. Malformed and over-long headers are refused as before (test_tls.py has the basic ones).
"""

import asyncio
import ipaddress
import socket
import ssl
from typing import Any

import pytest

from proxy.protocols import proxyheader
from proxy.settings import CertificateFiles
from proxy.table import Endpoint
from testbed.tlscerts import TestAuthority
from tests.proxy.server.conftest import WAIT, ProxyFactory, RunningProxy

TRUSTED = {"proxy_protocol_from": (ipaddress.ip_network("127.0.0.0/8"),)}
# A v2 LOCAL header (a balancer's health check): signature, version 2 LOCAL, no address, length 0.
V2_LOCAL = proxyheader.V2_SIGNATURE + bytes([proxyheader.V2_VERSION_LOCAL, 0, 0, 0])
TRICKLE_GAP = 0.01  # between the bytes of a header sent one at a time: separate segments


async def start(start_proxy: ProxyFactory, **listener: Any) -> RunningProxy:
    return await start_proxy({}, [Endpoint("127.0.0.1", 1)], listener={**TRUSTED, **listener}, pre_login=20.0)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:  # closed with our bytes unread
        return b""


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 143\r\n",
        V2_LOCAL,
        proxyheader.build_v2(("192.0.2.7", 40000), ("198.51.100.1", 143)),
    ],
    ids=["v1-unknown-shortest", "v1-unknown-with-addresses", "v1-tcp4", "v1-tcp6", "v2-local", "v2-tcp4"],
)
async def test_header_then_pipelined_command_in_one_segment(start_proxy: ProxyFactory, header: bytes) -> None:
    proxy = await start(start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(header + b"a1 NOOP\r\n")  # the command must not be taken for part of the header
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"a1 OK")
    writer.close()
    assert proxy.metric("mailgress_proxy_refusals_total", reason="proxy_header") == 0


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n", V2_LOCAL],
    ids=["v1-unknown", "v1-tcp4", "v2-local"],
)
async def test_header_sent_one_byte_at_a_time(start_proxy: ProxyFactory, header: bytes) -> None:
    proxy = await start(start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for byte in header:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(TRICKLE_GAP)
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
    writer.close()


async def test_tls_hello_right_behind_the_shortest_header(
    start_proxy: ProxyFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On an implicit-TLS listener the client's hello follows the header: not a byte of it may go."""
    authority = TestAuthority(tmp_path_factory.mktemp("ca"))
    issued = authority.issue("default", ["mail.alpha.example"])
    proxy = await start(
        start_proxy, tls="implicit", certificates=(CertificateFiles(cert=issued.cert, key=issued.key),)
    )
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    client.sendall(b"PROXY UNKNOWN\r\n")
    client.setblocking(False)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            sock=client,
            ssl=ssl.create_default_context(cafile=str(authority.cert)),
            server_hostname="mail.alpha.example",
        ),
        WAIT,
    )
    assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"* OK")
    writer.close()


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"PROXY TCP4 " + b"1" * proxyheader.MAX_V1_LENGTH,  # no CRLF within the spec's 107 bytes
        b"PROXY TCP4 192.0.2.7",  # then the client leaves
        proxyheader.V2_SIGNATURE[:8],  # the same, in a v2 signature
        proxyheader.V2_SIGNATURE + bytes([0x31, 0, 0, 0]),  # version 3
    ],
    ids=["v1-over-107-bytes", "v1-cut-short", "v2-cut-short", "v2-bad-version"],
)
async def test_bad_or_unfinished_header_is_refused(start_proxy: ProxyFactory, first_bytes: bytes) -> None:
    proxy = await start(start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(first_bytes)
    writer.write_eof()
    assert await read_until_closed(reader) == b""  # no greeting
    writer.close()
    for _ in range(int(WAIT / 0.05)):  # the session counts the refusal as it ends
        if proxy.metric("mailgress_proxy_refusals_total", reason="proxy_header"):
            break
        await asyncio.sleep(0.05)
    assert proxy.metric("mailgress_proxy_refusals_total", reason="proxy_header") == 1
