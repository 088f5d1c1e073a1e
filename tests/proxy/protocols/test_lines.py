"""Tests for proxy/protocols/lines.py: CRLF and LF lines, literals, limits, chunk independence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols.errors import LineTooLongError, RemoteProtocolError
from proxy.protocols.lines import LineBuffer

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None)


def test_lines_end_with_crlf_or_bare_lf() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"one\r\ntwo\nthree\r\n")
    assert [buffer.pop_line(), buffer.pop_line(), buffer.pop_line()] == [b"one", b"two", b"three"]
    assert buffer.pop_line() is None
    assert len(buffer) == 0


def test_only_the_cr_right_before_lf_is_stripped() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"a\rb\r\r\n\r\n")
    assert buffer.pop_line() == b"a\rb\r"
    assert buffer.pop_line() == b""


def test_incomplete_line_waits_for_more_bytes() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"a1 NO")
    assert buffer.pop_line() is None
    buffer.feed(b"OP\r")
    assert buffer.pop_line() is None
    buffer.feed(b"\nrest")
    assert buffer.pop_line() == b"a1 NOOP"
    assert len(buffer) == 4


def test_line_of_exactly_max_line_is_accepted() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"12345678\r\n")
    assert buffer.pop_line() == b"12345678"


def test_longer_line_raises_a_remote_error() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"123456789\r\n")
    with pytest.raises(LineTooLongError) as raised:
        buffer.pop_line()
    assert isinstance(raised.value, RemoteProtocolError)


def test_unterminated_line_raises_as_soon_as_it_passes_the_limit() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"12345678")
    assert buffer.pop_line() is None
    buffer.feed(b"9")
    with pytest.raises(LineTooLongError):
        buffer.pop_line()


def test_max_line_holds_when_the_crlf_is_split() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"12345678\r")
    assert buffer.pop_line() is None
    buffer.feed(b"\n")
    assert buffer.pop_line() == b"12345678"


def test_max_line_is_the_same_for_lf_and_crlf() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"123456789\n")
    with pytest.raises(LineTooLongError):
        buffer.pop_line()


def test_pop_exact_returns_literal_data_only_once_complete() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"ab")
    assert buffer.pop_exact(5) is None
    # Literal data is not a line: it may hold CR, LF and exceed max_line.
    buffer.feed(b"\r\ncd" + b"x" * 20 + b"\r\n")
    assert buffer.pop_exact(6) == b"ab\r\ncd"
    assert buffer.pop_exact(0) == b""
    assert buffer.pop_exact(20) == b"x" * 20
    assert buffer.pop_line() == b""


def test_scan_restarts_after_pop_exact() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"abc")
    assert buffer.pop_line() is None  # remembers that "abc" holds no LF
    assert buffer.pop_exact(2) == b"ab"
    buffer.feed(b"\n")
    assert buffer.pop_line() == b"c"


def test_take_all_hands_over_everything() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"a2 SELECT INBOX\r\na3 FE")
    assert buffer.take_all() == b"a2 SELECT INBOX\r\na3 FE"
    assert len(buffer) == 0
    assert buffer.pop_line() is None


def test_clear_drops_everything() -> None:
    buffer = LineBuffer(100)
    buffer.feed(b"a3 LOGIN injected\r\n")
    buffer.clear()
    assert len(buffer) == 0
    assert buffer.pop_line() is None
    buffer.feed(b"x\r\n")
    assert buffer.pop_line() == b"x"


@DETERMINISTIC
@given(
    lines=st.lists(st.binary(max_size=20).map(lambda line: line.replace(b"\n", b"")), max_size=10),
    sizes=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=5),
    bare_lf=st.booleans(),
)
def test_chunking_never_changes_the_lines(lines: list[bytes], sizes: list[int], bare_lf: bool) -> None:
    # A line ending in CR is left out: its CR and the LF after it read as one CRLF.
    ending = b"\n" if bare_lf else b"\r\n"
    lines = [line for line in lines if not line.endswith(b"\r")]
    data = b"".join(line + ending for line in lines)
    buffer = LineBuffer(32)
    popped = []
    offset, index = 0, 0
    while offset < len(data):
        buffer.feed(data[offset : offset + sizes[index % len(sizes)]])
        offset += sizes[index % len(sizes)]
        index += 1
        while (line := buffer.pop_line()) is not None:
            popped.append(line)
    assert popped == lines
