"""py-spy on the mailgress proxy while a workload runs, and what the samples say.

``bench.runner`` attaches ``py-spy record`` (the ``bench`` extra) to a running proxy for the
length of one workload, with the raw (collapsed stacks) output, and ``summarise`` turns that
file into the functions that hold the most samples: by own time (the innermost frame) and by
total time (anywhere on the stack). Sampling is ``--nonblocking`` so the proxy is never paused;
profiled runs are never the measured ones. Never touches a process other than the proxy it is
given, and stops py-spy it started (SIGINT, then SIGKILL after a bound).
"""

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Samples per second: enough for a few thousand samples in a run of ten seconds.
SAMPLE_RATE = 250
# py-spy writes its output when interrupted; it gets this long to do so.
STOP_TIMEOUT = 30.0
# Frames of the interpreter's own start-up that sit at the bottom of every stack.
_ROOT_FRAMES = ("<module>", "main", "run", "_run_proxy")


class ProfilerMissingError(RuntimeError):
    """py-spy is not installed (``pip install -e '.[bench]'``)."""


def py_spy() -> str:
    """The py-spy executable of the running virtualenv, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfilerMissingError("py-spy is not installed: pip install -e '.[bench]'")
    return found


@contextlib.contextmanager
def recording(pid: int, output: Path, *, native: bool = False) -> Iterator[None]:
    """Sample ``pid`` into ``output`` (collapsed stacks) for the duration of the block."""
    command = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--output",
        str(output),
        "--nonblocking",
        *(["--native"] if native else []),
    ]
    log = output.with_suffix(".log")
    with log.open("wb") as messages:
        recorder = subprocess.Popen(command, stdout=messages, stderr=messages, stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(timeout=STOP_TIMEOUT)


@dataclass(frozen=True, slots=True)
class Hotspot:
    """One function and its share of the samples."""

    function: str  # "name (path:line)" as py-spy prints it, with the path shortened
    own: float  # fraction of samples with this function innermost
    total: float  # fraction of samples with this function anywhere on the stack


def _short(frame: str) -> str:
    """``name (/long/path/to/proxy/server/relay.py:123)`` -> ``name (proxy/server/relay.py:123)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def _function(frame: str) -> str:
    """A frame without its line number: samples anywhere in a function count for the function."""
    short = _short(frame)
    head, colon, tail = short.rpartition(":")
    return head + ")" if colon and tail.rstrip(")").isdigit() else short


@dataclass(frozen=True, slots=True)
class Profile:
    """What one recording shows."""

    samples: int
    by_own: tuple[Hotspot, ...]  # the functions with the most own samples
    project: tuple[Hotspot, ...]  # the project's own functions (proxy/, mailgress/) by total samples


PROJECT_PREFIXES = ("proxy/", "mailgress/")


def summarise(collapsed: Path, top: int = 12) -> Profile:
    """Rank the functions of a py-spy raw (collapsed stacks) file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for function in set(frames):
            if function.partition(" (")[0] not in _ROOT_FRAMES:
                total[function] += count
    if not samples:
        return Profile(0, (), ())

    def spot(name: str) -> Hotspot:
        return Hotspot(name, own[name] / samples, total[name] / samples)

    project = [name for name, _ in total.most_common() if any(f"({p}" in name for p in PROJECT_PREFIXES)]
    return Profile(
        samples,
        tuple(spot(name) for name, _ in own.most_common(top)),
        tuple(spot(name) for name in project[:top]),
    )
