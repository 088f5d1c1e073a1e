"""The push channel's shared rules: which proxy names both ends take, and how both read a token file."""

import os
import threading
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
    with pytest.raises(push.TokenFileError, match=r"token file .* is not a regular file but a directory"):
        push.read_token_file(tmp_path)
    with pytest.raises(push.TokenFileError, match=r"token file .* is not a regular file but a character"):
        push.read_token_file(Path(os.devnull))


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Both ends read on their event loop: an open or a read that waits would stop the process."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            push.read_token_file(fifo)
        except push.TokenFileError as error:
            outcome.append(error)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():
        # Blocked in open: a writer that comes and goes ends it, so the test ends too.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert not reader.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], push.TokenFileError)
    assert "is not a regular file but a named pipe" in str(outcome[0])


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    """A mounted Secret is token -> ..data/token, ..data -> a timestamped directory."""
    (tmp_path / "..2026_11_27").mkdir()
    (tmp_path / "..2026_11_27" / "token").write_text(TOKEN + "\n")
    (tmp_path / "..data").symlink_to("..2026_11_27")
    (tmp_path / "token").symlink_to("..data/token")
    token, status = push.read_token_file(tmp_path / "token")
    assert token == TOKEN
    assert status.st_ino == (tmp_path / "..2026_11_27" / "token").stat().st_ino
