"""py-spy on the mailgress proxy while a workload runs, and what the samples say.

``bench.runner`` attaches ``py-spy record`` (the ``bench`` extra) to a running proxy for the
length of one workload, writing collapsed stacks, and ``summarise`` turns that file into where
the time went: by kind of work (Python code by package; with native frames also system calls
by name and the garbage collector), by function (own and total time), and for the project's own
functions. Plain sampling never stops the proxy; native sampling (C frames too) pauses it for
each sample, which slows it and inflates the share of system calls, so it is a second opinion.
Profiled runs are never the measured ones. Never touches a process other than the proxy it is
given, and stops the py-spy it started (SIGINT, then SIGKILL after a bound).
"""

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Samples per second. Plain sampling reads the proxy's memory without stopping it, so it can
# sample often (a few thousand samples per run); native sampling stops the proxy for each
# sample, so it samples less often.
SAMPLE_RATE = 1000
NATIVE_SAMPLE_RATE = 250
# py-spy writes its output when interrupted; it gets this long to do so.
STOP_TIMEOUT = 30.0
# Frames of the interpreter's start-up that sit at the bottom of every stack.
_ROOT_FRAMES = ("<module>", "main", "run", "_run_proxy", "Runner.run", "run_until_complete", "run_forever")
PROJECT_PREFIXES = ("proxy/", "mailgress/")
# Where a Python function's file lives -> the name the breakdown gives its time. Samples with no
# Python frame above Runner.run (uvloop's run loop) are not mostly uvloop's own C: `perf` of a paced
# run (docs/benchmarks.md, sixth series) found them mostly the kernel's going to sleep and waking
# up, and C work done for Python callbacks; uvloop's own C was about 3% of the proxy's time.
EVENT_LOOP = "event loop, no Python frame (kernel sleep/wake, C under callbacks)"
_PACKAGES = (
    ("proxy/", "mailgress code (proxy/, mailgress/)"),
    ("mailgress/", "mailgress code (proxy/, mailgress/)"),
    ("asyncio/runners.py", EVENT_LOOP),
    ("uvloop/", EVENT_LOOP),
    ("asyncio/", "asyncio library code"),
    ("logging/", "logging"),
    ("prometheus_client/", "prometheus_client"),
)
_LIBC = "(libc.so.6)"
# Path prefixes cut from file names: installed packages, the standard library, this checkout.
_PATH_ROOTS = (
    "/site-packages/",
    sysconfig.get_paths()["stdlib"] + "/",
    f"{Path(__file__).resolve().parent.parent}/",
)
_GC = "gc_collect"


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
    """Sample ``pid`` into ``output`` (collapsed stacks) during the block; ``native``: C frames too."""
    command = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(NATIVE_SAMPLE_RATE if native else SAMPLE_RATE),
        "--format",
        "raw",
        "--native" if native else "--nonblocking",
        "--output",
        str(output),
    ]
    with output.with_suffix(".log").open("wb") as messages:
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
    """A function, or a kind of work, and its share of the samples."""

    function: str  # "name (path)" with the path shortened, or a kind of work
    own: float  # fraction of samples with this function innermost
    total: float  # fraction of samples with this function anywhere on the stack


@dataclass(frozen=True, slots=True)
class Profile:
    """What one recording shows."""

    samples: int
    kinds: tuple[Hotspot, ...]  # kinds of work by own samples (own == total here)
    by_own: tuple[Hotspot, ...]  # the functions with the most own samples
    project: tuple[Hotspot, ...]  # the project's own functions by total samples


def _short(frame: str) -> str:
    """``name (/long/path/to/proxy/server/relay.py:123)`` -> ``name (proxy/server/relay.py:123)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in _PATH_ROOTS:
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def _function(frame: str) -> str:
    """A frame without its line number: samples anywhere in a function count for the function."""
    short = _short(frame)
    head, colon, tail = short.rpartition(":")
    return head + ")" if colon and tail.rstrip(")").isdigit() else short


def kind_of_work(frames: Sequence[str]) -> str:
    """What a sampled stack (outermost first, as ``_function`` names them) was doing."""
    innermost = frames[-1]
    if innermost.endswith(_LIBC) and not innermost.startswith("0x"):
        return f"system call or libc: {innermost.partition(' (')[0]}"
    if any(frame.startswith(_GC) for frame in frames):
        return "garbage collector"
    for frame in reversed(frames):
        if ".py)" in frame:
            return next((kind for marker, kind in _PACKAGES if f"({marker}" in frame), "other Python code")
    return "other"


def summarise(collapsed: Path, top: int = 12) -> Profile:
    """Rank kinds of work and functions in a py-spy raw (collapsed stacks) file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        kinds[kind_of_work(frames)] += count
        for function in set(frames):
            if function.partition(" (")[0] not in _ROOT_FRAMES:
                total[function] += count
    if not samples:
        return Profile(0, (), (), ())

    def spot(name: str) -> Hotspot:
        return Hotspot(name, own[name] / samples, total[name] / samples)

    project = [name for name, _ in total.most_common() if any(f"({p}" in name for p in PROJECT_PREFIXES)]
    return Profile(
        samples,
        tuple(Hotspot(kind, count / samples, count / samples) for kind, count in kinds.most_common(top)),
        tuple(spot(name) for name, _ in own.most_common(top)),
        tuple(spot(name) for name in project[:top]),
    )
