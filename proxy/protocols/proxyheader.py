"""PROXY protocol headers (HAProxy's spec, versions 1 and 2): parse from clients, build for backends.

A load balancer in front of the proxy may prepend a PROXY header naming the real client; the
listener parses it (only from trusted peers: that decision is the driver's). Towards backends
the proxy prepends a v2 header so Dovecot and Postfix see the client's address. Pure: bytes in,
a parsed header or bytes out; no sockets.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (sections 2.1 and 2.2).
"""

import ipaddress
import struct
from dataclasses import dataclass

from proxy.protocols.errors import RemoteProtocolError

# Section 2.1: a v1 header is at most 107 bytes including CRLF.
MAX_V1_LENGTH = 107
# Section 2.2: the 12-byte v2 signature, then version/command, family, and a 16-bit length.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# nginx reads at most 4096 bytes of PROXY header; TLVs beyond that are not worth buffering.
MAX_V2_LENGTH = 4096
V2_VERSION_PROXY = 0x21  # version 2, command PROXY
V2_VERSION_LOCAL = 0x20  # version 2, command LOCAL (health checks: keep the real peer)
V2_TCP4 = 0x11
V2_TCP6 = 0x21


class ProxyHeaderError(RemoteProtocolError):
    """The bytes are not a well-formed PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header says; ``source`` is None for LOCAL/UNKNOWN (use the real peer)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took, so the driver can hand on what followed it


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(None, None, end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        destination = ipaddress.ip_address(fields[3].decode("ascii"))
        ports = int(fields[4]), int(fields[5])
    except (UnicodeDecodeError, ValueError) as error:
        raise ProxyHeaderError("malformed PROXY v1 address or port") from error
    if (source.version == 4) != (fields[1] == b"TCP4") or not all(0 <= port < 65536 for port in ports):
        raise ProxyHeaderError("PROXY v1 address family or port out of range")
    return ProxyHeader((str(source), ports[0]), (str(destination), ports[1]), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    total = V2_FIXED_LENGTH + length
    if total > MAX_V2_LENGTH:
        raise ProxyHeaderError("PROXY v2 header too long")
    if version_command not in (V2_VERSION_PROXY, V2_VERSION_LOCAL):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if len(data) < total:
        return None
    body = data[V2_FIXED_LENGTH:total]
    if version_command == V2_VERSION_LOCAL or family not in (V2_TCP4, V2_TCP6):
        return ProxyHeader(None, None, total)
    size = 4 if family == V2_TCP4 else 16
    if length < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address block too short")
    source = ipaddress.ip_address(body[:size])
    destination = ipaddress.ip_address(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader((str(source), source_port), (str(destination), destination_port), total)


def parse(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of ``data``; None until it is complete.

    Raises:
        ProxyHeaderError: the bytes cannot be the start of a PROXY header.
    """
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < len(V2_SIGNATURE):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[: len(data)] == data[:6]:
        return _parse_v1(data) if len(data) >= 6 else None
    raise ProxyHeaderError("no PROXY header where one is required")


def build_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection from ``source`` to ``destination``."""
    source_ip = ipaddress.ip_address(source[0])
    destination_ip = ipaddress.ip_address(destination[0])
    if source_ip.version != destination_ip.version:
        # Mixed families (an IPv4 client reaching an IPv6 backend): map v4 into v6 (RFC 4291 2.5.5.2).
        source_ip = ipaddress.IPv6Address(f"::ffff:{source_ip}") if source_ip.version == 4 else source_ip
        destination_ip = (
            ipaddress.IPv6Address(f"::ffff:{destination_ip}")
            if destination_ip.version == 4
            else destination_ip
        )
    family = V2_TCP4 if source_ip.version == 4 else V2_TCP6
    addresses = source_ip.packed + destination_ip.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION_PROXY, family, len(addresses)) + addresses
