"""Scaffolding shared by the IMAP, POP3 and SMTP machine tests: test factories and fuzzing helpers.

test_imap.py, test_pop3.py and test_smtp.py call the ``*_tests`` factories with their own machine,
transcripts and replies, and bind the test functions returned to the same names in their module,
where pytest collects them; what only one protocol does stays in its module. The fuzzing helpers
play the driver's part for both kinds of machine (``drive`` for a front-end, ``fuzz_backend`` for a
backend login). Nothing here opens a socket. pytest does not rewrite the assertions of this
module (it is no test module), so a failure here shows no values: that keeps the test password,
which the redaction and fuzzing checks look for, out of failure reports.
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocols import events
from proxy.protocols.errors import LocalProtocolError
from proxy.protocols.events import BackendMachine, Command, Event, FrontendConfig, FrontendMachine
from tests.proxy.protocols import transcript
from tests.proxy.protocols.transcript import CRLF

# Deterministic runs (no example database, fixed seed) and no timing: the machine is shared.
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The test password: it may appear only in what a backend login sends, never anywhere else.
PASSWORD = "Pa55-unique-W0rd"
# Bytes that mean something to one of the grammars (line ends, literals, quoting, SASL, paths).
INTERESTING = b'\r\n{}+"\\ *()=]-.:<>@%!\x00\x7f\xff0123456789'
FRONTEND_COMMANDS = (events.Send, events.Close, events.StartTls, events.Authenticate, events.Relay)
VERDICTS = (events.LoginSucceeded, events.LoginFailed, events.BackendFailed)
# The STARTTLS policies every front-end is fuzzed under (SMTP adds its inbound mode).
FRONTEND_CONFIGS = (
    FrontendConfig(),
    FrontendConfig(starttls=events.StartTlsPolicy.ON),
    FrontendConfig(starttls=events.StartTlsPolicy.REQUIRED, max_errors=3),
)
# Read sizes: small ones cut a transcript inside every line; a client's reads are larger.
TRANSCRIPT_CHUNKS = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8)
CLIENT_READS = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6)
# Read sizes for a fuzzed backend dialogue, and for a valid one cut anywhere.
BACKEND_READS = st.lists(st.integers(min_value=1, max_value=32), min_size=1, max_size=6)
SPLIT_READS = st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=5)

TestFunction = Callable[..., None]
FrontendFactory = Callable[[FrontendConfig], FrontendMachine]
Frontend = TypeVar("Frontend", bound=FrontendMachine)
Machine = TypeVar("Machine", bound=BackendMachine)


def event_name(event: Event) -> str:
    """A test id for a parametrized event: its type's name."""
    return type(event).__name__


def started(make: Callable[[FrontendConfig], Frontend], config: FrontendConfig | None = None) -> Frontend:
    """A front-end built by ``make`` (default settings unless ``config`` is given), greeting sent."""
    frontend = make(config or FrontendConfig())
    frontend.start()
    return frontend


def crlf_lines(lines: Iterable[bytes]) -> bytes:
    """``lines``, each ended with CRLF, as one byte string."""
    return b"".join(line + CRLF for line in lines)


def feed(machine: BackendMachine, *lines: bytes) -> list[Command]:
    """What ``machine`` does when ``lines`` arrive from the backend in one read."""
    return machine.handle(events.DataReceived(crlf_lines(lines)))


def sent(commands: Sequence[Command]) -> bytes:
    """Everything the ``Send`` commands among ``commands`` write, in order."""
    return b"".join(command.data for command in commands if isinstance(command, events.Send))


def sent_before_tls(commands: Sequence[Command]) -> bytes:
    """What the ``Send`` commands write before the first ``StartTls`` (all of it without one)."""
    starts = [index for index, command in enumerate(commands) if isinstance(command, events.StartTls)]
    return sent(commands[: starts[0]] if starts else commands)


# ---------------------------------------------------------------------------------------------
# Front-end tests every protocol runs: factories that return test functions


def transcript_tests(paths: Sequence[Path], frontend: FrontendFactory) -> tuple[TestFunction, TestFunction]:
    """Every transcript in ``paths`` played against ``frontend``, whole and cut into random chunks.

    Returns ``test_transcript`` and ``test_transcript_split_anywhere_gives_the_same_commands``.
    """
    each = pytest.mark.parametrize("path", paths, ids=lambda path: path.stem)

    @each
    def test_transcript(path: Path) -> None:
        transcript.check(path, frontend)

    @each
    @FUZZ
    @given(chunks=TRANSCRIPT_CHUNKS)
    def test_transcript_split_anywhere_gives_the_same_commands(path: Path, chunks: list[int]) -> None:
        transcript.check_split(path, frontend, chunks)

    return test_transcript, test_transcript_split_anywhere_gives_the_same_commands


def misuse_tests(
    frontend: FrontendFactory, command: bytes, accepted: bytes
) -> tuple[TestFunction, TestFunction, TestFunction]:
    """Driver misuse raises LocalProtocolError: ``handle`` (of ``command``) before ``start``,
    ``start`` twice, and a verdict (``accepted`` is a success reply) or TLS news out of turn.

    Returns ``test_handle_before_start_is_misuse``, ``test_start_twice_is_misuse`` and
    ``test_verdicts_and_tls_news_out_of_turn_are_misuse``.
    """

    def test_handle_before_start_is_misuse() -> None:
        with pytest.raises(LocalProtocolError):
            frontend(FrontendConfig()).handle(events.DataReceived(command))

    def test_start_twice_is_misuse() -> None:
        machine = started(frontend)
        with pytest.raises(LocalProtocolError):
            machine.start()

    @pytest.mark.parametrize(
        "event",
        [
            events.LoginAccepted(accepted),
            events.LoginRejected(),
            events.LoginUnavailable(),
            events.TlsEstablished(),
        ],
        ids=event_name,
    )
    def test_verdicts_and_tls_news_out_of_turn_are_misuse(event: Event) -> None:
        machine = started(frontend)
        with pytest.raises(LocalProtocolError):
            machine.handle(event)

    return (
        test_handle_before_start_is_misuse,
        test_start_twice_is_misuse,
        test_verdicts_and_tls_news_out_of_turn_are_misuse,
    )


def redaction_test(
    frontend: FrontendFactory, logins: Sequence[bytes], accepted: bytes, secrets: Sequence[str] = (PASSWORD,)
) -> TestFunction:
    """Each of ``logins`` (client bytes that end in an Authenticate), then any verdict or the end
    of the session: no command's repr or str, nor the machine's repr, shows any of ``secrets``.

    Returns ``test_frontend_never_shows_the_password``.
    """

    @pytest.mark.parametrize("dialogue", logins)
    @pytest.mark.parametrize(
        "verdict",
        [
            events.LoginAccepted(accepted),
            events.LoginRejected(),
            events.LoginUnavailable(),
            events.TimedOut(),
            events.ConnectionClosed(),
        ],
        ids=event_name,
    )
    def test_frontend_never_shows_the_password(dialogue: bytes, verdict: Event) -> None:
        machine = started(frontend)
        commands = machine.handle(events.DataReceived(dialogue))
        commands += machine.handle(verdict)
        assert any(isinstance(command, events.Authenticate) for command in commands)
        shown = [repr(machine), *(text for command in commands for text in (repr(command), str(command)))]
        for secret in secrets:
            assert all(secret not in text for text in shown)

    return test_frontend_never_shows_the_password


def mutated_input_test(
    frontend: FrontendFactory,
    client_data: Sequence[bytes],
    configs: Sequence[FrontendConfig],
    accepted: bytes,
    check: Callable[[list[Command]], None] | None = None,
) -> TestFunction:
    """Valid client input (``client_data``), mutated and read in random pieces, under each of
    ``configs`` and random verdicts: ``handle`` never raises and ``check_fuzzed_dialogue`` holds;
    ``check``, when given, looks at the commands for what only one protocol promises.

    Returns ``test_frontend_survives_mutated_input``.
    """

    @settings(FUZZ, max_examples=400)
    @given(
        data=st.sampled_from(client_data).flatmap(mutated),
        sizes=CLIENT_READS,
        config=st.sampled_from(configs),
        verdicts=st.lists(
            st.sampled_from(
                [events.LoginAccepted(accepted), events.LoginRejected(), events.LoginUnavailable()]
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def test_frontend_survives_mutated_input(
        data: bytes, sizes: list[int], config: FrontendConfig, verdicts: list[Event]
    ) -> None:
        commands = check_fuzzed_dialogue(drive(frontend(config), data, sizes, verdicts))
        if check is not None:
            check(commands)

    return test_frontend_survives_mutated_input


# ---------------------------------------------------------------------------------------------
# Backend-login tests every protocol runs


def handshake_tests(
    make: Callable[[], BackendMachine], to_starttls: Sequence[bytes], starttls_ok: bytes, closed: str
) -> tuple[TestFunction, TestFunction]:
    """The backend login's TLS handshake: ``make`` builds a login that wants STARTTLS, which it
    asks for after ``to_starttls`` and starts on ``starttls_ok``; ``closed`` is its reason when
    the backend closes.

    Returns ``test_backend_close_or_timeout_during_the_handshake_fails_the_login`` and
    ``test_backend_tls_news_out_of_turn_is_misuse``.
    """

    def in_handshake() -> BackendMachine:
        """A login that has asked for TLS: the driver runs the handshake now."""
        login = make()
        assert feed(login, *to_starttls, starttls_ok)[-1] == events.StartTls()
        return login

    def test_backend_close_or_timeout_during_the_handshake_fails_the_login() -> None:
        assert in_handshake().handle(events.ConnectionClosed()) == [events.BackendFailed(closed)]
        assert in_handshake().handle(events.TimedOut()) == [events.BackendFailed("backend login timed out")]

    def test_backend_tls_news_out_of_turn_is_misuse() -> None:
        login = make()
        feed(login, *to_starttls)
        with pytest.raises(LocalProtocolError):
            login.handle(events.TlsEstablished())  # STARTTLS asked for, but its OK has not come
        login = in_handshake()
        login.handle(events.TlsEstablished())
        with pytest.raises(LocalProtocolError):
            login.handle(events.TlsEstablished())

    return (
        test_backend_close_or_timeout_during_the_handshake_fails_the_login,
        test_backend_tls_news_out_of_turn_is_misuse,
    )


def backend_fuzz_tests(
    make: Callable[..., Machine],
    done: Callable[[Machine], bool],
    replies: st.SearchStrategy[bytes],
    starttls_dialogues: st.SearchStrategy[list[bytes]],
    before_tls: Collection[bytes],
    max_examples: int,
    check: Callable[[list[Command]], None] | None = None,
    **options: st.SearchStrategy[bool],
) -> tuple[TestFunction, TestFunction]:
    """A backend login fuzzed with random ``replies``, and with ``starttls_dialogues`` (valid
    STARTTLS dialogues, mutated) when the route wants STARTTLS, each read in random pieces and
    maybe followed by the backend's close: ``handle`` never raises and ``fuzz_backend``'s checks
    hold; with STARTTLS, all the backend gets before TLS is one of ``before_tls``.

    ``make(starttls=..., **drawn)`` builds a fresh login, with one value drawn from each of
    ``options`` (the protocol's own settings); ``check``, when given, looks at the commands of
    both tests for what only one protocol promises.

    Returns ``test_backend_login_survives_random_replies`` and the STARTTLS test (named after the
    protocol's verb in its module).
    """

    def fuzz(login: Machine, parts: list[bytes], sizes: list[int], closes: bool) -> list[Command]:
        commands = fuzz_backend(login, done, parts, sizes, closes)
        if check is not None:
            check(commands)
        return commands

    @settings(FUZZ, max_examples=max_examples)
    @given(data=replies, sizes=BACKEND_READS, closes=st.booleans(), **options)
    def test_backend_login_survives_random_replies(
        data: bytes, sizes: list[int], closes: bool, **drawn: bool
    ) -> None:
        fuzz(make(starttls=False, **drawn), [data], sizes, closes)

    @settings(FUZZ, max_examples=max_examples)
    @given(parts=starttls_dialogues, sizes=BACKEND_READS, closes=st.booleans(), **options)
    def test_backend_starttls_never_sends_more_than_starttls_in_plaintext(
        parts: list[bytes], sizes: list[int], closes: bool, **drawn: bool
    ) -> None:
        commands = fuzz(make(starttls=True, **drawn), parts, sizes, closes)
        assert sent_before_tls(commands) in before_tls

    return (
        test_backend_login_survives_random_replies,
        test_backend_starttls_never_sends_more_than_starttls_in_plaintext,
    )


# ---------------------------------------------------------------------------------------------
# Fuzzing: hypothesis strategies and a stand-in for the driver, for any machine


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes inserted, deleted or bit-flipped."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(buffer)))
        match draw(st.sampled_from(["insert", "delete", "flip"])):
            case "insert":
                byte = draw(st.sampled_from(INTERESTING) | st.integers(min_value=0, max_value=255))
                buffer.insert(position, byte)
            case "delete" if position < len(buffer):
                del buffer[position]
            case "flip" if position < len(buffer):
                buffer[position] ^= 1 << draw(st.integers(min_value=0, max_value=7))
    return bytes(buffer)


def backend_replies(lines: Sequence[bytes], max_lines: int) -> st.SearchStrategy[bytes]:
    """Up to ``max_lines`` lines, each one of ``lines`` or random bytes, ended with CRLF."""
    return st.lists(st.sampled_from(lines) | st.binary(max_size=40), max_size=max_lines).map(crlf_lines)


@st.composite
def mutated_dialogue(
    draw: st.DrawFn, dialogues: Sequence[Sequence[Sequence[bytes]]], noise: Sequence[bytes]
) -> list[bytes]:
    """One of ``dialogues`` with a few lines dropped or inserted (from ``noise`` or random bytes).

    A dialogue is a list of parts, the peer's lines before and after each TLS handshake; the
    result has one CRLF-terminated byte string per part, for ``fuzz_backend``. Random lines
    alone rarely get a backend login far (through STARTTLS, say); a valid dialogue with a few
    changes reaches every state and then goes wrong there.
    """
    parts = [list(part) for part in draw(st.sampled_from(dialogues))]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        lines = parts[draw(st.integers(min_value=0, max_value=len(parts) - 1))]
        position = draw(st.integers(min_value=0, max_value=len(lines)))
        if draw(st.booleans()):
            lines.insert(position, draw(st.sampled_from(noise) | st.binary(max_size=40)))
        elif position < len(lines):
            del lines[position]
    return [crlf_lines(lines) for lines in parts]


def pieces(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the given sizes (cycled)."""
    offset = 0
    for index in range(len(data)):  # bounded: at least one byte per piece
        if offset >= len(data):
            return
        size = sizes[index % len(sizes)]
        yield data[offset : offset + size]
        offset += size


def drive(
    frontend: FrontendMachine, data: bytes, sizes: Sequence[int], verdicts: Sequence[Event]
) -> list[list[Command]]:
    """Play a driver: feed pieces, answer Authenticate and StartTls, stop at Close or Relay.

    Returns every list of commands the machine returned, in order.
    """
    batches = [frontend.start()]
    verdict_index = 0
    for piece in pieces(data, sizes):
        pending = frontend.handle(events.DataReceived(piece))
        for _ in range(len(data) + 1):  # each answer consumes input or ends the dialogue
            batches.append(pending)
            if any(isinstance(command, events.Close | events.Relay) for command in pending):
                return batches
            if any(isinstance(command, events.StartTls) for command in pending):
                pending = frontend.handle(events.TlsEstablished())
            elif any(isinstance(command, events.Authenticate) for command in pending):
                pending = frontend.handle(verdicts[verdict_index % len(verdicts)])
                verdict_index += 1
            else:
                break
    return [*batches, frontend.handle(events.ConnectionClosed())]


def check_fuzzed_dialogue(batches: Sequence[Sequence[Command]]) -> list[Command]:
    """What must hold for any front-end dialogue: front-end commands only, Authenticate last in
    its batch (the driver acts on it at once) and never acting as another identity than its
    user (sasl refuses such an authzid), Relay last, whole lines, no test password.

    Returns the commands of all batches, in order.
    """
    commands = [command for batch in batches for command in batch]
    assert all(isinstance(command, FRONTEND_COMMANDS) for command in commands)
    assert all(
        not isinstance(command, events.Authenticate) or index == len(batch) - 1
        for batch in batches
        for index, command in enumerate(batch)
    )
    assert all(
        command.request.credentials.authzid in ("", command.request.credentials.username)
        for command in commands
        if isinstance(command, events.Authenticate) and command.request.credentials is not None
    )
    relays = [index for index, command in enumerate(commands) if isinstance(command, events.Relay)]
    assert relays == [] or relays == [len(commands) - 1]
    assert all(not isinstance(command, events.Send) or command.data.endswith(CRLF) for command in commands)
    assert PASSWORD.encode() not in sent(commands)
    return commands


def _feed_backend(machine: BackendMachine, data: bytes) -> list[Command]:
    """Feed ``data`` as a driver does: a ``StartTls`` is answered with ``TlsEstablished``."""
    commands = machine.handle(events.DataReceived(data))
    if any(isinstance(command, events.StartTls) for command in commands):
        commands += machine.handle(events.TlsEstablished())
    return commands


def fuzz_backend(
    machine: Machine,
    done: Callable[[Machine], bool],
    parts: Sequence[bytes],
    sizes: Sequence[int],
    closes: bool,
) -> list[Command]:
    """Feed ``parts`` (what the backend sends before and after each TLS handshake), each in
    pieces, until a verdict; without one, optionally the backend's close.

    Checks what must hold for any backend dialogue: backend commands only, one verdict at most
    and nothing after it, a verdict once the backend has closed, and no test password in a verdict.
    """
    commands: list[Command] = []
    for piece in (piece for part in parts for piece in pieces(part, sizes)):
        commands += _feed_backend(machine, piece)
        if done(machine):
            break
    else:
        if closes:
            commands += machine.handle(events.ConnectionClosed())
    verdicts = [command for command in commands if isinstance(command, VERDICTS)]
    assert all(isinstance(command, (events.Send, events.StartTls, *VERDICTS)) for command in commands)
    assert len(verdicts) <= 1
    assert (verdicts != []) == done(machine)
    assert done(machine) or not closes
    if commands and not isinstance(commands[-1], events.Send | events.StartTls):
        assert commands[-1] is verdicts[0]  # nothing follows the verdict
    for verdict in verdicts:
        assert PASSWORD not in repr(verdict)
    return commands


def split_backend_dialogue(
    make: Callable[[], Machine], done: Callable[[Machine], bool], parts: Sequence[bytes], sizes: Sequence[int]
) -> list[Command]:
    """Feeding a backend dialogue in pieces gives what feeding it whole gives; returns that.

    ``parts`` are what the backend sends before and after each TLS handshake; each but the
    last ends with the reply that makes the machine ask for TLS. Bytes a driver reads after a
    successful verdict it relays itself, so they join the verdict's ``buffered``.
    """
    whole_login = make()
    whole = [command for part in parts for command in _feed_backend(whole_login, part)]
    login = make()
    split: list[Command] = []
    rest = b""
    for part in parts:
        for piece in pieces(part, sizes):
            if done(login):
                rest += piece
            else:
                split += _feed_backend(login, piece)
    if split and isinstance(split[-1], events.LoginSucceeded):
        split[-1] = events.LoginSucceeded(split[-1].reply, split[-1].buffered + rest)
    assert split == whole
    return split
