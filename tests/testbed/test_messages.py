"""Test messages: well-formed, CRLF, unique, and large ones of the exact size asked for."""

import email
import email.policy

import pytest

from testbed import mailservers, messages


def test_composed_messages_are_crlf_unique_and_parse() -> None:
    first = messages.compose("a@alpha.example", "b@beta.example", "hello", "line one\nline two")
    second = messages.compose("a@alpha.example", "b@beta.example", "hello", "line one\nline two")
    assert first != second  # Message-IDs differ
    assert b"\n" not in first.replace(b"\r\n", b"")
    assert first.startswith(b"Message-ID: <")
    parsed = email.message_from_bytes(first, policy=email.policy.default)
    assert (parsed["From"], parsed["To"], parsed["Subject"]) == (
        "a@alpha.example",
        "b@beta.example",
        "hello",
    )
    assert parsed.get_content() == "line one\r\nline two\r\n"
    # No trace header on top: what Postfix strips leaves the message whole.
    assert mailservers.strip_delivery_headers(mailservers.as_stored(first)) == mailservers.as_stored(first)


@pytest.mark.parametrize("size", [400, 401, 477, 478, 479, 100_000, 20 * 1024 * 1024])
def test_large_messages_have_the_exact_size_and_short_lines(size: int) -> None:
    message = messages.large("a@alpha.example", "b@beta.example", size)
    assert len(message) == size
    body = message.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert max(len(line) for line in lines) <= messages.LINE_LENGTH
    assert lines[0].startswith(b".000000000 ")  # dot-stuffing gets exercised


def test_too_small_a_large_message_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the headers"):
        messages.large("a@alpha.example", "b@beta.example", 10)
