"""Transcript format and runner for the sans-IO front-end machine tests.

Called by dialogues.transcript_tests for the IMAP, POP3 and SMTP machine tests (which also load
a transcript's client bytes as fuzzing input); it knows no protocol (the caller passes a factory
that builds the machine from a ``FrontendConfig``). It never opens a socket and never prints a
password: an expected password is compared, and only "matches"/"differs" is shown.

File format, one directive per line (UTF-8):

    # comment (the first one says what the transcript proves)
    ! config starttls=required max_errors=3     FrontendConfig fields (header, before anything else)
    C: a1 LOGIN alice secret      client bytes; CRLF is appended
    CB: b'a1 NOOP\\n'             client bytes as a Python bytes literal, nothing appended
    S: a1 OK LOGIN completed      bytes the machine must send (one Send each); CRLF is appended
    SB: b'+ \\r\\n'                 an expected Send as a Python bytes literal
    E: LoginAccepted a1 OK done   inject a driver event (see EVENTS below)
    X: Relay b'a2 NOOP\\r\\n'      expect a command other than Send (see EXPECTED COMMANDS)

Consecutive client lines form one ``DataReceived`` (a pipelining client). After each
``DataReceived`` or event, the machine must have emitted exactly the S/SB/X lines that follow it,
in order. ``start()`` is called first and is checked against the lines before any C/E line.

EVENTS: ``LoginAccepted <reply>``, ``LoginRejected``, ``LoginRejected <reply>``,
``LoginUnavailable``, ``TimedOut``, ``TlsEstablished``, ``ConnectionClosed``. A reply is text
(CRLF appended) or a Python bytes literal (taken as is, for multi-line replies).

EXPECTED COMMANDS: ``Close``, ``StartTls``, ``Relay <python-bytes-literal>`` and
``Authenticate key=value ...`` with keys user (required), tag, protocol, mechanism, authzid,
password, helo (text) and envelope (a Python tuple-of-bytes literal); a password is text (its
UTF-8 octets) or a Python bytes literal (octets that are no UTF-8, e.g. Latin-1); only the keys
given are compared. Values may be shell-quoted.

``run(t, factory, chunks=[3, 1, 7])`` replays the same dialogue with the client's bytes cut into
chunks of those sizes (cycled), everything between two events merged; the commands must then
still match, checked once per event. Like a driver, the runner stops feeding bytes after
``Close`` or ``Relay``; it keeps feeding after ``StartTls``, which the machine must discard.
"""

import ast
import dataclasses
import enum
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.protocols import events
from proxy.protocols.events import Command, Event, FrontendConfig, FrontendMachine

CRLF = b"\r\n"
TRANSCRIPTS = Path(__file__).parent / "transcripts"
AUTHENTICATE_KEYS = frozenset(
    {"user", "tag", "protocol", "mechanism", "authzid", "password", "helo", "envelope"}
)


@dataclass(frozen=True, slots=True)
class Expected:
    """One expected command: a Send's bytes, or the text of an X: line."""

    line_no: int
    send: bytes | None = None
    command: str = ""


@dataclass(frozen=True, slots=True)
class Feed:
    """Client bytes (one or more consecutive C/CB lines) fed as one ``DataReceived``."""

    line_no: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Inject:
    """A driver event injected at this point of the dialogue."""

    line_no: int
    event: Event


Action = Feed | Inject


@dataclass(frozen=True, slots=True)
class Step:
    """An action (None for ``start()``) and the commands it must produce."""

    action: Action | None
    expected: tuple[Expected, ...]


@dataclass(frozen=True, slots=True)
class Transcript:
    """A parsed transcript file."""

    name: str
    description: str
    config: FrontendConfig
    steps: tuple[Step, ...]

    @property
    def client_data(self) -> bytes:
        """Every byte the client sends, in order (input for fuzzing)."""
        return b"".join(step.action.data for step in self.steps if isinstance(step.action, Feed))


class TranscriptError(ValueError):
    """The transcript file itself is malformed."""


def _bytes_literal(text: str, where: str) -> bytes:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise TranscriptError(f"{where}: not a Python literal: {text}") from error
    if not isinstance(value, bytes):
        raise TranscriptError(f"{where}: expected a bytes literal: {text}")
    return value


def _reply(text: str, where: str) -> bytes:
    if text.startswith(("b'", 'b"')):
        return _bytes_literal(text, where)
    return text.encode() + CRLF


def _event(text: str, where: str) -> Event:
    name, _, argument = text.partition(" ")
    reply = _reply(argument, where) if argument else None
    match name:
        case "LoginAccepted" if reply is not None:
            return events.LoginAccepted(reply)
        case "LoginRejected":
            return events.LoginRejected(reply)
        case "LoginUnavailable" if reply is None:
            return events.LoginUnavailable()
        case "TimedOut" if reply is None:
            return events.TimedOut()
        case "TlsEstablished" if reply is None:
            return events.TlsEstablished()
        case "ConnectionClosed" if reply is None:
            return events.ConnectionClosed()
    raise TranscriptError(f"{where}: unknown event or bad argument: {text}")


def _config(text: str, where: str) -> FrontendConfig:
    """Build a FrontendConfig from ``key=value`` words, converting by each field's default type."""
    defaults = FrontendConfig()
    changes: dict[str, object] = {}
    names = {field.name for field in dataclasses.fields(FrontendConfig)}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep or key not in names:
            raise TranscriptError(f"{where}: unknown config setting: {word}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            if value not in ("true", "false"):
                raise TranscriptError(f"{where}: {key} must be true or false")
            changes[key] = value == "true"
        elif isinstance(default, enum.Enum):
            changes[key] = type(default)(value)
        elif isinstance(default, int):
            changes[key] = int(value)
        else:
            changes[key] = value
    return dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]


def _fields(argument: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in shlex.split(argument))


def _check_expected_command(text: str, where: str) -> None:
    name, _, argument = text.partition(" ")
    match name:
        case "Close" | "StartTls" if not argument:
            return
        case "Relay":
            _bytes_literal(argument, where)
            return
        case "Authenticate":
            fields = _fields(argument)
            if "user" not in fields or not fields.keys() <= AUTHENTICATE_KEYS:
                keys = ", ".join(sorted(AUTHENTICATE_KEYS))
                raise TranscriptError(f"{where}: Authenticate needs user= and only keys among {keys}")
            return
    raise TranscriptError(f"{where}: unknown expected command: {text}")


def load(path: Path | str) -> Transcript:
    """Parse a transcript file.

    Raises:
        TranscriptError: a line is not one of the documented directives.
    """
    path = Path(path)
    config = FrontendConfig()
    description = ""
    steps: list[Step] = []
    action: Action | None = None
    expected: list[Expected] = []
    pending_data = b""
    pending_line = 0

    def flush() -> None:
        nonlocal action, expected, pending_data
        if pending_data:
            # Client lines end the previous step's expectations and start a new step.
            steps.append(Step(action, tuple(expected)))
            action, expected, pending_data = Feed(pending_line, pending_data), [], b""

    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path.name}:{line_no}"
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("#"):
            description = description or line.lstrip("# ").strip()
            continue
        directive, _, rest = line.partition(" ")
        if directive in ("C:", "CB:"):
            if not pending_data:
                pending_line = line_no
            pending_data += rest.encode() + CRLF if directive == "C:" else _bytes_literal(rest, where)
            continue
        flush()
        match directive:
            case "!" if rest.startswith("config ") and not steps and not expected:
                config = _config(rest.removeprefix("config "), where)
            case "S:":
                expected.append(Expected(line_no, send=rest.encode() + CRLF))
            case "SB:":
                expected.append(Expected(line_no, send=_bytes_literal(rest, where)))
            case "X:":
                _check_expected_command(rest, where)
                expected.append(Expected(line_no, command=rest))
            case "E:":
                steps.append(Step(action, tuple(expected)))
                action, expected = Inject(line_no, _event(rest, where)), []
            case _:
                raise TranscriptError(f"{where}: unknown directive: {line}")
    flush()
    steps.append(Step(action, tuple(expected)))
    return Transcript(path.name, description, config, tuple(steps))


def _describe(command: Command, expected: Expected | None) -> str:
    """Render a command the way ``_expected_text`` renders its expectation.

    An Authenticate shows the keys its expectation names (user and tag when there is none);
    the password shows only as ``<given>`` (it matches) or ``<differs>``, never its value.
    """
    match command:
        case events.Send(data):
            return f"Send {data!r}"
        case events.Close():
            return "Close"
        case events.StartTls():
            return "StartTls"
        case events.Relay(buffered):
            return f"Relay {buffered!r}"
        case events.Authenticate(request):
            wanted = {"user": "", "tag": ""}
            if expected is not None and expected.command.startswith("Authenticate "):
                wanted = _fields(expected.command.removeprefix("Authenticate "))
            credentials = request.credentials
            actual = {
                "user": request.routing_key,
                "tag": request.tag.decode(errors="backslashreplace"),
                "protocol": request.protocol,
                "mechanism": credentials.mechanism.value if credentials else "",
                "authzid": credentials.authzid if credentials else "",
                "helo": request.helo.decode(errors="backslashreplace"),
                "envelope": repr(request.envelope),
            }
            if "password" in wanted:
                password = wanted["password"]
                octets = _bytes_literal(password, "password") if password.startswith(("b'", 'b"')) else None
                matches = credentials is not None and credentials.password == (octets or password.encode())
                actual["password"] = "<given>" if matches else "<differs>"
            return "Authenticate " + " ".join(f"{key}={shlex.quote(actual[key])}" for key in wanted)
    # Anything else (a backend-login verdict from a front-end) never matches an expectation.
    return repr(command)


def _expected_text(item: Expected) -> str:
    if item.send is not None:
        return f"Send {item.send!r}"
    name, _, argument = item.command.partition(" ")
    if name == "Relay":
        return f"Relay {_bytes_literal(argument, str(item.line_no))!r}"
    if name == "Authenticate":
        fields = _fields(argument)
        if "password" in fields:
            fields["password"] = "<given>"
        return "Authenticate " + " ".join(f"{key}={shlex.quote(value)}" for key, value in fields.items())
    return item.command


def _compare(name: str, where: str, expected: Sequence[Expected], actual: Sequence[Command]) -> None:
    want = [_expected_text(item) for item in expected]
    got = [
        _describe(command, expected[index] if index < len(expected) else None)
        for index, command in enumerate(actual)
    ]
    if want != got:
        lines = [f"{name}: after {where}:", "  expected:"]
        lines += [f"    {text}" for text in want] or ["    (nothing)"]
        lines += ["  actual:"] + ([f"    {text}" for text in got] or ["    (nothing)"])
        raise AssertionError("\n".join(lines))


def _chunked(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    pieces, offset, index = [], 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        pieces.append(data[offset : offset + size])
        offset += size
        index += 1
    return pieces


def _merged(steps: Sequence[Step]) -> list[Step]:
    """Merge every run of client-data steps into one step (the chunks then cut across lines)."""
    merged: list[Step] = []
    for step in steps:
        previous = merged[-1].action if merged else None
        if isinstance(step.action, Feed) and isinstance(previous, Feed):
            data = previous.data + step.action.data
            merged[-1] = Step(Feed(previous.line_no, data), merged[-1].expected + step.expected)
        else:
            merged.append(step)
    return merged


def _stops_reading(commands: Sequence[Command]) -> bool:
    """Close and Relay end the pre-login dialogue: a driver feeds the machine nothing more."""
    return any(isinstance(command, events.Close | events.Relay) for command in commands)


def run(
    transcript: Transcript,
    machine_factory: Callable[[FrontendConfig], FrontendMachine],
    chunks: Sequence[int] | None = None,
) -> list[Command]:
    """Play ``transcript`` against a fresh machine; return every command it emitted.

    Args:
        transcript: from ``load``.
        machine_factory: builds the front-end machine under test from the transcript's config.
        chunks: optional chunk sizes (each >= 1, cycled) to cut the client's bytes with.

    Raises:
        AssertionError: the machine's commands differ from the transcript's expectations.
    """
    if chunks is not None and (not chunks or min(chunks) < 1):
        raise ValueError("chunk sizes must be positive")
    machine = machine_factory(transcript.config)
    steps = transcript.steps if chunks is None else _merged(transcript.steps)
    emitted: list[Command] = []
    for step in steps:
        where = "start()"
        produced: list[Command] = []
        if step.action is not None and _stops_reading(emitted):
            where = f"{transcript.name}: line {step.action.line_no}"
            raise AssertionError(f"{where}: the dialogue continues after Close or Relay")
        match step.action:
            case None:
                produced = machine.start()
            case Inject(line_no, event):
                where = f"line {line_no} ({type(event).__name__})"
                produced = machine.handle(event)
            case Feed(line_no, data):
                where = f"line {line_no} (client data)"
                # Bytes still unsent when the machine stops reading are what a driver never reads.
                for piece in [data] if chunks is None else _chunked(data, chunks):
                    produced += machine.handle(events.DataReceived(piece))
                    if _stops_reading(produced):
                        break
        _compare(transcript.name, where, step.expected, produced)
        emitted += produced
    return emitted


def paths(protocol: str) -> list[Path]:
    """The transcript files of ``protocol`` (a folder under transcripts/), sorted."""
    return sorted((TRANSCRIPTS / protocol).glob("*.txt"))


def check(path: Path, machine_factory: Callable[[FrontendConfig], FrontendMachine]) -> None:
    """Load and play one transcript file, which must open with a comment saying what it proves."""
    loaded = load(path)
    assert loaded.description, "every transcript opens with a comment saying what it proves"
    run(loaded, machine_factory)


def check_split(
    path: Path, machine_factory: Callable[[FrontendConfig], FrontendMachine], chunks: Sequence[int]
) -> None:
    """The transcript cut into ``chunks`` gives the very commands it gives whole."""
    loaded = load(path)
    assert run(loaded, machine_factory, chunks=chunks) == run(loaded, machine_factory)
