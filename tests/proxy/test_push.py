"""The push channel's shared rules: which proxy names both ends take, and how both read a token file."""

import os
from pathlib import Path

import pytest

from proxy import push

TOKEN = "push-token-that-must-never-be-logged"


@pytest.mark.parametrize(
    "name",
    ["proxy-1", "mailgress-proxy-7d9f5c-x2b4q", "a", "0", "node.example.com", "p" * push.MAX_PROXY_NAME],
)
def test_pod_names_are_proxy_names(name: str) -> None:
    assert push.valid_proxy_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Proxy_1",
        "PROXY-1",
        "proxy_1",
        "-proxy",
        "proxy-",
        "a..b",
        ".a",
        "a.",
        "a b",
        "pröxy",
        "p" * (push.MAX_PROXY_NAME + 1),
    ],
)
def test_other_names_are_not(name: str) -> None:
    assert not push.valid_proxy_name(name)


@pytest.mark.parametrize(
    "content",
    [
        TOKEN.encode(),
        f"{TOKEN}\n".encode(),  # as echo writes it
        f"  {TOKEN}\r\n\t".encode(),
        f"\ufeff{TOKEN}\r\n".encode(),  # as an editor on Windows saves it
    ],
    ids=["bare", "line-break", "whitespace", "byte-order-mark"],
)
def test_the_token_is_the_text_without_a_byte_order_mark_and_surrounding_whitespace(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    token, status = push.read_token_file(path)
    assert token == TOKEN
    assert (status.st_ino, status.st_size) == (os.stat(path).st_ino, len(content))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b" \n\t", "is empty"),
        ("\ufeff\n".encode(), "is empty"),
        (b"\xfftoken\n", "is not UTF-8 text"),
        (b"first-line\nsecond-line\n", "holds a control character"),
        (b"tok\x00en", "holds a control character"),
        (b"tok\ten", "holds a control character"),
        ("tok\u2028en".encode(), "holds a control character or another non-printing one"),
        (b"a" * (push.MAX_TOKEN_FILE_BYTES + 1), f"is larger than {push.MAX_TOKEN_FILE_BYTES} bytes"),
    ],
    ids=[
        "empty",
        "blank",
        "only-a-byte-order-mark",
        "not-utf-8",
        "two-lines",
        "nul",
        "tab",
        "line-separator",
        "too-large",
    ],
)
def test_a_file_without_a_token_both_ends_can_use_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(push.TokenFileError) as raised:
        push.read_token_file(path)
    message = str(raised.value)
    assert problem in message and str(path) in message


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(push.TokenFileError, match=r"cannot read the token file .*: No such file"):
        push.read_token_file(tmp_path / "missing")
    with pytest.raises(push.TokenFileError, match=r"cannot read the token file .*: Is a directory"):
        push.read_token_file(tmp_path)
