"""What the benchmark reads from the kernel, and how it condenses samples into figures.

Called by ``bench.workloads`` around every measured run: CPU seconds of process groups (a proxy,
the mail servers, this process) from ``/proc/PID/stat``, the machine's busy time from
``/proc/stat``, resident memory from ``/proc/PID/status``, and the descriptor limit. Also the
statistics the report prints (median with min and max over rounds, latency percentiles). Reads
only; never signals or changes a process, and never raises for a process that exits while read.
"""

import contextlib
import math
import os
import resource
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat fields after the ")" that ends the command name (proc(5), 1-based field numbers
# minus 3): utime (14), stime (15), cutime (16), cstime (17).
_UTIME, _STIME, _CUTIME, _CSTIME = 11, 12, 13, 14
_SESSION = 3  # field 6, the session id


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone while we looked
        return None
    # The command name may contain spaces and parentheses; everything after the last ")" is fixed.
    return text[text.rindex(")") + 2 :].split()


def process_times(pid: int, *, reaped_children: bool = False) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (all its threads); zeros if it is gone.

    With ``reaped_children``, also the CPU of its children that exited and were waited for
    (cutime, cstime): how a daemon's master accounts for workers that came and went.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    user, system = int(fields[_UTIME]), int(fields[_STIME])
    if reaped_children:
        user, system = user + int(fields[_CUTIME]), system + int(fields[_CSTIME])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def session_pids(session: int) -> list[int]:
    """Every live process of a session (a daemon started with ``start_new_session``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[_SESSION]) == session and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def group_times(session: int) -> tuple[float, float]:
    """User and system CPU seconds of a daemon's whole session: live processes, plus the workers
    its leader reaped.

    A worker that exits between two readings moves from the live sum into the leader's reaped
    total with all of its CPU, so the difference of two readings stays right as workers come
    and go (grandchildren reaped by someone other than the leader are the blind spot).
    """
    user = system = 0.0
    for pid in session_pids(session):
        process_user, process_system = process_times(pid, reaped_children=pid == session)
        user, system = user + process_user, system + process_system
    return user, system


def resident_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle since boot, all cores (/proc/stat)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    # user nice system idle iowait irq softirq steal; guest time is already inside user.
    values = [int(value) for value in first[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def own_cpu() -> float:
    """This process's user+system CPU seconds, all threads."""
    times = os.times()
    return times.user + times.system


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the new limit.

    5,000 proxied idle connections need about 10,000 descriptors in the proxy and 5,000 here.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True, slots=True)
class CpuReading:
    """One snapshot of the CPU counters a run is measured with."""

    proxy_user: float
    proxy_system: float
    auth: float
    backends: float
    bench: float
    machine: float


def _sessions_cpu(sessions: Iterable[int]) -> tuple[float, float]:
    user = system = 0.0
    for session in sessions:
        session_user, session_system = group_times(session)
        user, system = user + session_user, system + session_system
    return user, system


class CpuMeter:
    """Reads the CPU of the proxy, of its auth service (nginx's auth_http), of the mail servers
    and of this process, and the machine's busy time. Each party is a set of process sessions."""

    def __init__(self, proxy: Sequence[int], auth: Sequence[int], backends: Sequence[int]) -> None:
        self._proxy = tuple(proxy)
        self._auth = tuple(auth)
        self._backends = tuple(backends)

    def read(self) -> CpuReading:
        proxy_user, proxy_system = _sessions_cpu(self._proxy)
        return CpuReading(
            proxy_user=proxy_user,
            proxy_system=proxy_system,
            auth=sum(_sessions_cpu(self._auth)),
            backends=sum(_sessions_cpu(self._backends)),
            bench=own_cpu(),
            machine=machine_busy(),
        )


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU seconds spent during one run, by whom."""

    proxy: float  # user + system
    proxy_user: float  # of which in user space (for mailgress: mostly the Python interpreter)
    auth: float  # the auth_http service nginx asks at every login (mailgress asks none here)
    backends: float  # Dovecot and Postfix
    bench: float  # the load generator: this process
    other: float  # everything else on the machine (never below zero: the counters tick apart)

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading) -> "CpuUse":
        proxy_user = after.proxy_user - before.proxy_user
        proxy = proxy_user + after.proxy_system - before.proxy_system
        auth = after.auth - before.auth
        backends = after.backends - before.backends
        bench = after.bench - before.bench
        other = after.machine - before.machine - proxy - auth - backends - bench
        return cls(
            proxy=proxy,
            proxy_user=proxy_user,
            auth=auth,
            backends=backends,
            bench=bench,
            other=max(other, 0.0),
        )

    @classmethod
    def sum(cls, parts: Iterable["CpuUse"]) -> "CpuUse":
        """The CPU of several stretches of one run (a run that pauses between them)."""
        listed = list(parts)
        return cls(**{f.name: math.fsum(getattr(part, f.name) for part in listed) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Spread:
    """A figure over several rounds: its median, min and max."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in (0, 1]) of ``values``."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
