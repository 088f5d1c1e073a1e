"""Tests for proxy/protocols/imap_stream.py: where a relayed IMAP direction is, chunk by chunk.

Transcripts (chunks fed in turn, each followed by the position it must leave) pin the grammar:
the three literal markers, empty literals, markers and CRLFs split across chunks, literal bodies
that look like lines, the number64 limit, COMPRESS. Hypothesis builds valid streams whose every
octet's position is known by construction, cuts them anywhere, and sometimes skips literal
octets as the splice path does: the positions must not depend on the cuts.
"""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocols.imap_stream import (
    COMMAND_HEAD_KEPT,
    MAX_LITERAL,
    TAIL_KEPT,
    ImapStream,
    Position,
)

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=300)

LINE = Position(boundary=True, literal=0, opaque=False)  # at a line boundary
INSIDE = Position(boundary=False, literal=0, opaque=False)  # inside a line, outside a literal
OPAQUE = Position(boundary=False, literal=0, opaque=True)


def literal(octets: int) -> Position:
    return Position(boundary=False, literal=octets, opaque=False)


def replay(stream: ImapStream, steps: list[tuple[bytes, Position]]) -> None:
    for number, (chunk, expected) in enumerate(steps):
        stream.feed(chunk)
        assert stream.position() == expected, f"after chunk {number}: {chunk!r}"


# ---------------------------------------------------------------------------------------------
# Transcripts


def test_a_fetch_literal_is_skipped_and_the_response_ends_at_its_last_line() -> None:
    replay(
        ImapStream(client=False),
        [
            (b"* 1 FETCH (BODY[] {12}\r\n", literal(12)),
            (b"Subject: ", literal(3)),
            (b"a\r\n)\r", INSIDE),  # the body's last octets, then the line goes on
            (b"\nb OK Fetch completed\r\n", LINE),
        ],
    )


def test_a_literal_body_that_looks_like_lines_and_markers_is_not_read() -> None:
    body = b"x\r\n* BYE {5}\r\n{7}\r\n"
    replay(
        ImapStream(client=False),
        [
            (b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body, INSIDE),
            (b")\r\n", LINE),
        ],
    )


@pytest.mark.parametrize("marker", [b"{5}", b"{5+}", b"~{5}", b"~{5+}"])
def test_every_marker_form_starts_a_literal(marker: bytes) -> None:
    replay(
        ImapStream(client=True),
        [
            (b"a APPEND INBOX " + marker + b"\r\n", literal(5)),
            (b"hello", INSIDE),
            (b"\r\n", LINE),
        ],
    )


def test_an_empty_literal_leaves_the_line_open() -> None:
    replay(ImapStream(client=False), [(b"* 2 FETCH (BODY[] {0}\r\n", INSIDE), (b")\r\n", LINE)])


def test_a_marker_and_its_line_end_cut_anywhere() -> None:
    replay(
        ImapStream(client=False),
        [
            (b"* 3 FETCH (BODY[] {", INSIDE),
            (b"1", INSIDE),
            (b"0}", INSIDE),
            (b"\r", INSIDE),
            (b"\n", literal(10)),
            (b"0123456789)\r", INSIDE),
            (b"\n", LINE),
        ],
    )


def test_a_bare_lf_ends_lines_and_markers() -> None:
    replay(ImapStream(client=False), [(b"* OK\n* 1 FETCH (BODY[] {2}\nab)\n", LINE)])


def test_braces_that_are_no_marker_end_a_line() -> None:
    replay(
        ImapStream(client=False),
        [
            (b"* OK {}\r\n", LINE),
            (b"* OK {x}\r\n", LINE),
            (b"* OK 42}\r\n", LINE),
            (b"* OK {3}.\r\n", LINE),
            (b"* 1 FETCH (X {12{3}\r\n", literal(3)),
        ],
    )


def test_several_literals_in_one_command_then_the_next_command() -> None:
    replay(
        ImapStream(client=True),
        [
            (b"a LOGIN {4+}\r\nanna {6+}\r\n", literal(6)),
            (b"secret\r\n", LINE),
            (b"b NOOP\r\n", LINE),
        ],
    )


def test_the_largest_number64_is_a_literal_and_anything_longer_is_opaque() -> None:
    biggest = ImapStream(client=False)
    biggest.feed(b"* 1 FETCH (BINARY[] ~{%d}\r\n" % MAX_LITERAL)
    assert biggest.position() == literal(MAX_LITERAL)
    for marker in (b"{%d}" % (MAX_LITERAL + 1), b"{%s}" % (b"1" * 30), b"{%s}" % (b"0" * 20)):
        absurd = ImapStream(client=False)
        replay(absurd, [(b"* 1 FETCH (BODY[] " + marker + b"\r\n", OPAQUE), (b"* OK\r\n", OPAQUE)])


def test_a_digit_run_longer_than_what_is_kept_is_opaque() -> None:
    # Its "{" fell out of the kept octets: it cannot be a number64 either way.
    replay(ImapStream(client=False), [(b"* OK " + b"7" * TAIL_KEPT + b"}\r\n", OPAQUE)])


@pytest.mark.parametrize("command", [b"a COMPRESS DEFLATE", b"A7 compress deflate", b"x Compress"])
def test_compress_from_the_client_makes_the_stream_opaque_for_good(command: bytes) -> None:
    replay(
        ImapStream(client=True),
        [
            (command[:5], INSIDE),
            (command[5:] + b"\r\n", OPAQUE),
            (b"b NOOP\r\n", OPAQUE),
        ],
    )


def test_compress_is_only_a_command_name_in_the_client_direction() -> None:
    replay(
        ImapStream(client=False),
        [(b"* OK COMPRESS DEFLATE\r\n", LINE), (b"a COMPRESS DEFLATE\r\n", LINE)],
    )
    replay(
        ImapStream(client=True),
        [
            (b"a APPEND INBOX {12+}\r\nx COMPRESS y", INSIDE),  # a literal body
            (b" COMPRESS\r\n", LINE),  # the rest of the APPEND after the literal
            (b"b SEARCH TEXT COMPRESS\r\n", LINE),
        ],
    )


def test_a_command_whose_name_cannot_be_read_is_taken_for_compress() -> None:
    tag = b"t" * COMMAND_HEAD_KEPT
    replay(ImapStream(client=True), [(tag + b" NOOP\r\n", OPAQUE)])
    long_line = b"a UID FETCH " + b"1," * COMMAND_HEAD_KEPT + b"2 FLAGS\r\n"
    replay(ImapStream(client=True), [(long_line, LINE)])


def test_skipped_literal_octets_count_like_fed_ones() -> None:
    stream = ImapStream(client=False)
    stream.feed(b"* 1 FETCH (BODY[] {100000}\r\nabc")
    stream.skip(99_990)
    assert stream.position() == literal(7)
    replay(stream, [(b"defghij)\r\n", LINE)])


def test_the_other_direction_can_make_a_stream_opaque() -> None:
    stream = ImapStream(client=False)
    stream.feed(b"* 1 FETCH (BODY[] {10}\r\nab")
    stream.go_opaque()
    replay(stream, [(b"cdefghij)\r\n", OPAQUE)])


# ---------------------------------------------------------------------------------------------
# Fuzzing: valid streams cut anywhere


@dataclass(frozen=True, slots=True)
class Built:
    data: bytes
    positions: list[Position]  # positions[n]: where the stream is after its first n octets


# Text around markers: anything but LF, including braces, digits, CR and "~".
_TEXT = st.binary(max_size=12).map(lambda octets: octets.replace(b"\n", b"_"))
_EOL = st.sampled_from([b"\r\n", b"\n"])
_MARKERS = st.sampled_from([b"{%d}", b"{%d+}", b"~{%d}"])


@st.composite
def streams(draw: st.DrawFn, *, client: bool) -> Built:
    data = bytearray()
    positions = [LINE]

    def add(octets: bytes, after: list[Position]) -> None:
        data.extend(octets)
        positions.extend(after)

    for _ in range(draw(st.integers(0, 6))):
        # A client line starts with a tag and a command name that is no COMPRESS.
        add(b"t NOOP " if client else b"* ", [INSIDE] * (7 if client else 2))
        for _ in range(draw(st.integers(0, 3))):
            text = draw(_TEXT)
            size = draw(st.integers(0, 40))
            marker = draw(_MARKERS) % size + draw(_EOL)
            add(text + marker, [INSIDE] * (len(text) + len(marker) - 1))
            add(b"", [literal(size) if size else INSIDE])  # after its LF
            body = draw(st.binary(min_size=size, max_size=size))
            add(body, [literal(size - seen) for seen in range(1, size)] + ([INSIDE] if size else []))
        # The last segment ends in a "." so that no text can look like a marker.
        text, eol = draw(_TEXT) + b".", draw(_EOL)
        add(text + eol, [INSIDE] * (len(text) + len(eol) - 1) + [LINE])
    assert len(positions) == len(data) + 1
    return Built(bytes(data), positions)


@DETERMINISTIC
@given(st.data(), st.booleans())
def test_positions_do_not_depend_on_where_the_stream_is_cut(data: st.DataObject, client: bool) -> None:
    built = data.draw(streams(client=client))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(built.data)), max_size=12)))
    stream = ImapStream(client=client)
    done = 0
    for cut in [*cuts, len(built.data)]:
        chunk = built.data[done:cut]
        # As the splice path does: literal octets moved unseen, then the rest read.
        if stream.literal and data.draw(st.booleans()):
            skipped = min(stream.literal, len(chunk))
            stream.skip(skipped)
            chunk = chunk[skipped:]
        stream.feed(chunk)
        done = cut
        assert stream.position() == built.positions[done], f"after {done} octets"


@DETERMINISTIC
@given(streams(client=False))
def test_a_whole_stream_fed_octet_by_octet_passes_every_position(built: Built) -> None:
    stream = ImapStream(client=False)
    for offset in range(len(built.data)):
        stream.feed(built.data[offset : offset + 1])
        assert stream.position() == built.positions[offset + 1], f"after {offset + 1} octets"
