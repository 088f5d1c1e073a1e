"""PROXY protocol v1/v2: parsing in every chunking, building, and refusing malformed headers."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols import proxyheader
from proxy.protocols.proxyheader import ProxyHeader, ProxyHeaderError

V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 993\r\n"
V2 = proxyheader.build_v2(("192.0.2.7", 40000), ("198.51.100.1", 993))
V2_6 = proxyheader.build_v2(("2001:db8::7", 40000), ("2001:db8::1", 993))


@pytest.mark.parametrize(
    ("header", "source", "destination"),
    [
        (V1, ("192.0.2.7", 40000), ("198.51.100.1", 993)),
        (V2, ("192.0.2.7", 40000), ("198.51.100.1", 993)),
        (V2_6, ("2001:db8::7", 40000), ("2001:db8::1", 993)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n", ("2001:db8::7", 1), ("2001:db8::1", 2)),
    ],
)
def test_headers_parse_and_report_their_length(header: bytes, source: object, destination: object) -> None:
    parsed = proxyheader.parse(header + b"a1 CAPABILITY\r\n")
    assert parsed == ProxyHeader(source, destination, len(header))  # type: ignore[arg-type]


def test_unknown_and_local_keep_the_real_peer() -> None:
    assert proxyheader.parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(None, None, 15)
    local = proxyheader.V2_SIGNATURE + bytes([proxyheader.V2_VERSION_LOCAL, 0, 0, 0])
    assert proxyheader.parse(local) == ProxyHeader(None, None, 16)


def test_mixed_families_are_mapped_into_ipv6() -> None:
    parsed = proxyheader.parse(proxyheader.build_v2(("192.0.2.7", 1), ("2001:db8::1", 2)))
    assert parsed is not None and parsed.source == ("::ffff:c000:207", 1)


@given(st.sampled_from([V1, V2, V2_6]), st.data())
def test_incomplete_headers_wait_for_more(header: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    assert proxyheader.parse(header[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"a1 LOGIN user pass\r\n",  # a client that speaks first without a header
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
        b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 70000\r\n",
        b"PROXY " + b"x" * 120,
        proxyheader.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),
        proxyheader.V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4),
        proxyheader.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxyheader.parse(data)


@given(st.binary(max_size=120))
def test_garbage_raises_only_the_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        proxyheader.parse(data)
