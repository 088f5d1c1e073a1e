"""Turn a benchmark's results document into the Markdown of docs/benchmarks.md.

``bench.__main__`` calls ``write`` after a run (or on a saved results file). The generated part
(header, tables, where we stand against each target of the issue, the profile) sits between two
marker lines; whatever the file holds outside them (the analysis people write) is kept as it is.
Every figure is a median with its min and max over the rounds. Pure formatting: no I/O but the
one file it is asked to write.
"""

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import measure, targets

BEGIN = "<!-- bench: generated from here; `python -m bench` rewrites up to the end marker -->"
END = "<!-- bench: end of generated part; text below is kept across runs -->"
MB = 1e6  # decimal units throughout: MB/s and GB as the issue writes them
GB = 1e9
NGINX = "nginx"  # the reference: nginx with its default proxy_buffer
MAILGRESS = "mailgress"  # as deployed with the testbed's routes: "auth: backend", no auth request
# Like for like with nginx at a login: the same routes asking nginx's auth_http service.
MAILGRESS_AUTH_HTTP = targets.MAILGRESS_AUTH_HTTP
RELAY_CPU_RATIO = 0.5  # "CPU seconds per GB at most half of nginx's with default buffers"
SMTP_RATE_RATIO = 0.9  # "messages per second within 10% of direct"

Row = dict[str, Any]  # one measurement as the results document stores it


def _figure(value: float) -> str:
    """Three significant digits, no exponent for the sizes that occur here."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    decimals = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:,.{decimals}f}"


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    spread = measure.Spread.of(values)
    if spread.count == 1:
        return _figure(spread.median)
    return f"{_figure(spread.median)} ({_figure(spread.low)}-{_figure(spread.high)})"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True, slots=True)
class _Runs:
    """The rounds of one workload against one target."""

    rows: list[Row]

    def values(self, figure: Callable[[Row], float | None]) -> list[float]:
        return [value for row in self.rows if (value := figure(row)) is not None]

    @property
    def failures(self) -> int:
        return sum(int(row["failures"]) for row in self.rows)

    @property
    def operations(self) -> int:
        return sum(int(row["operations"]) for row in self.rows)


def _per_thousand(key: str) -> Callable[[Row], float | None]:
    def figure(row: Row) -> float | None:
        return row["cpu"][key] / row["operations"] * 1000 if row["operations"] else None

    return figure


def _rate(row: Row) -> float | None:
    return row["operations"] / row["seconds"] if row["seconds"] else None


def _latency(fraction: float) -> Callable[[Row], float | None]:
    def figure(row: Row) -> float | None:
        latencies = row["latencies"]
        return measure.percentile(latencies, fraction) * 1000 if latencies else None

    return figure


def _mb_per_second(row: Row) -> float | None:
    return row["relayed_bytes"] / MB / row["seconds"] if row["seconds"] else None


def _cpu_per_gb(row: Row) -> float | None:
    return row["cpu"]["proxy"] / (row["relayed_bytes"] / GB) if row["relayed_bytes"] else None


def _rss_kib(row: Row) -> float | None:
    value = row["rss_per_connection"]
    return None if value is None else value / 1024


def _user_share(row: Row) -> float | None:
    cpu = row["cpu"]
    return cpu["proxy_user"] / cpu["proxy"] * 100 if cpu["proxy"] else None


def _other(row: Row) -> float:
    return float(row["cpu"]["other"])


class Results:
    """The results document, indexed by workload and target."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.targets: list[str] = document["targets"]
        self.workloads: list[dict[str, Any]] = document["workloads"]
        self._runs: dict[tuple[str, str], list[Row]] = {}
        for row in document["measurements"]:
            self._runs.setdefault((row["workload"], row["target"]), []).append(row)

    def runs(self, workload: str, target: str) -> _Runs | None:
        rows = self._runs.get((workload, target))
        return _Runs(rows) if rows else None

    def median(self, workload: str, target: str, figure: Callable[[Row], float | None]) -> float | None:
        runs = self.runs(workload, target)
        return None if runs is None else _median(runs.values(figure))

    def names(self, workload: str) -> list[str]:
        return [t for t in self.targets if (workload, t) in self._runs]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _is_proxy(name: str) -> bool:
    return name != "direct"


def _percent(runs: _Runs, name: str) -> str:
    """The median share of the proxy's CPU spent in user space, as a whole percentage."""
    share = _median(runs.values(_user_share)) if _is_proxy(name) else None
    return "-" if share is None else f"{share:.0f}"


def _sessions_table(results: Results, workload: str) -> list[str]:
    reference = results.median(workload, NGINX, _per_thousand("proxy"))
    rows = []
    for name in results.names(workload):
        runs = results.runs(workload, name)
        assert runs is not None
        cpu = runs.values(_per_thousand("proxy")) if _is_proxy(name) else []
        auth = [value for value in runs.values(_per_thousand("auth")) if value > 0]
        rows.append(
            [
                name,
                _spread(runs.values(_rate)),
                _spread(cpu),
                _percent(runs, name),
                _ratio(_median(cpu), reference),
                _spread(auth),
                _spread(runs.values(_latency(0.5))),
                _spread(runs.values(_latency(0.99))),
                f"{runs.failures} of {runs.operations + runs.failures}",
                _spread(runs.values(_other)),
            ]
        )
    header = [
        "target",
        "sessions/s",
        "proxy CPU s per 1,000 sessions",
        "user %",
        "vs nginx",
        "auth service CPU s per 1,000",
        "login p50 ms",
        "login p99 ms",
        "failed",
        "other CPU s",
    ]
    return _table(header, rows)


def _fetch_table(results: Results, workload: str) -> list[str]:
    reference = results.median(workload, NGINX, _cpu_per_gb)
    rows = []
    for name in results.names(workload):
        runs = results.runs(workload, name)
        assert runs is not None
        cpu = runs.values(_cpu_per_gb) if _is_proxy(name) else []
        rows.append(
            [
                name,
                _spread(runs.values(_mb_per_second)),
                _spread(cpu),
                _percent(runs, name),
                _ratio(_median(cpu), reference),
                f"{runs.failures} of {runs.operations + runs.failures}",
                _spread(runs.values(_other)),
            ]
        )
    header = ["target", "MB/s", "proxy CPU s per GB", "user %", "vs nginx", "failed", "other CPU s"]
    return _table(header, rows)


def _smtp_table(results: Results, workload: str) -> list[str]:
    direct = results.median(workload, "direct", _rate)
    rows = []
    for name in results.names(workload):
        runs = results.runs(workload, name)
        assert runs is not None
        rates = runs.values(_rate)
        intact = sum(int(row["intact"] or 0) for row in runs.rows)
        sent = runs.operations + runs.failures
        rows.append(
            [
                name,
                _spread(rates),
                _ratio(_median(rates), direct),
                f"{intact} of {sent}",
                _spread(runs.values(_per_thousand("proxy")) if _is_proxy(name) else []),
                _spread(runs.values(_latency(0.5))),
                _spread(runs.values(_latency(0.99))),
                _spread(runs.values(_other)),
            ]
        )
    header = [
        "target",
        "messages/s",
        "vs direct",
        "delivered intact",
        "proxy CPU s per 1,000 messages",
        "login p50 ms",
        "login p99 ms",
        "other CPU s",
    ]
    return _table(header, rows)


def _idle_table(results: Results, workload: str) -> list[str]:
    reference = results.median(workload, NGINX, _rss_kib)
    rows = []
    for name in results.names(workload):
        runs = results.runs(workload, name)
        assert runs is not None
        rss = runs.values(_rss_kib)
        rows.append(
            [
                name,
                _spread(rss),
                _ratio(_median(rss), reference),
                _spread(runs.values(_per_thousand("proxy")) if _is_proxy(name) else []),
                _spread(runs.values(_latency(0.5))),
                _spread(runs.values(_latency(0.99))),
                f"{runs.failures} of {runs.operations + runs.failures}",
                _spread(runs.values(_other)),
            ]
        )
    header = [
        "target",
        "resident KiB per connection",
        "vs nginx",
        "proxy CPU s per 1,000 logins",
        "login p50 ms",
        "login p99 ms",
        "failed",
        "other CPU s",
    ]
    return _table(header, rows)


TABLES = {
    "saturated": _sessions_table,
    "paced": _sessions_table,
    "fetch": _fetch_table,
    "fetch-small": _fetch_table,
    "smtp": _smtp_table,
    "idle": _idle_table,
}


def _verdict(met: bool | None) -> str:
    return "**not measured**" if met is None else "**met**" if met else "**not met**"


def _at_most(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit


def _targets_section(results: Results) -> list[str]:
    """Where mailgress stands against each target of the issue (medians over the rounds)."""
    lines = ["### Where we stand against the targets", ""]
    kinds = {w["name"]: w["kind"] for w in results.workloads}

    def of(kind: str) -> list[str]:
        return [name for name, k in kinds.items() if k == kind]

    for workload in of("fetch"):
        ours = results.median(workload, "mailgress", _cpu_per_gb)
        theirs = results.median(workload, NGINX, _cpu_per_gb)
        our_rate = results.median(workload, "mailgress", _mb_per_second)
        their_rate = results.median(workload, NGINX, _mb_per_second)
        limit = None if theirs is None else theirs * RELAY_CPU_RATIO
        cpu_met = _at_most(ours, limit)
        rate_met = None if our_rate is None or their_rate is None else our_rate >= their_rate
        both = None if cpu_met is None or rate_met is None else cpu_met and rate_met
        lines.append(
            f"- Relay ({workload}): CPU per GB at most half of nginx's with default buffers, and "
            f"throughput at least nginx's: {_verdict(both)}. mailgress {_opt(ours)} CPU s/GB against "
            f"a limit of {_opt(limit)} (nginx {_opt(theirs)}); {_opt(our_rate)} MB/s against nginx's "
            f"{_opt(their_rate)}. With proxy_buffer 64k nginx uses "
            f"{_opt(results.median(workload, 'nginx-64k', _cpu_per_gb))} CPU s/GB at "
            f"{_opt(results.median(workload, 'nginx-64k', _mb_per_second))} MB/s."
        )
    for workload in of("fetch-small"):
        ours = results.median(workload, "mailgress", _cpu_per_gb)
        theirs = results.median(workload, NGINX, _cpu_per_gb)
        lines.append(
            f"- Relay, many small messages ({workload}): not a target (the issue states the relay "
            f"target on the 20 MB FETCH); for reference. mailgress {_opt(ours)} CPU s/GB, "
            f"{_ratio(ours, theirs)} nginx's {_opt(theirs)}; "
            f"{_opt(results.median(workload, 'mailgress', _mb_per_second))} MB/s against nginx's "
            f"{_opt(results.median(workload, NGINX, _mb_per_second))}. With proxy_buffer 64k nginx uses "
            f"{_opt(results.median(workload, 'nginx-64k', _cpu_per_gb))} CPU s/GB at "
            f"{_opt(results.median(workload, 'nginx-64k', _mb_per_second))} MB/s."
        )
    for workload in of("paced"):
        theirs = results.median(workload, NGINX, _per_thousand("proxy"))
        auth = results.median(workload, NGINX, _per_thousand("auth"))
        deployed = _login_stand(results, workload, MAILGRESS, theirs, "as deployed: `auth: backend`")
        like = _login_stand(
            results, workload, MAILGRESS_AUTH_HTTP, theirs, "like for like: asks nginx's auth_http service"
        )
        lines.append(
            f"- Login ({workload}): proxy CPU per session no more than nginx's at the same paced rate. "
            f"nginx {_opt(theirs)} CPU s per 1,000 sessions (its side of the auth_http exchange "
            f"included; plus {_opt(auth)} in the auth_http service); {deployed}; {like}."
        )
    for workload in of("idle"):
        ours = results.median(workload, MAILGRESS, _rss_kib)
        asking = results.median(workload, MAILGRESS_AUTH_HTTP, _rss_kib)
        theirs = results.median(workload, NGINX, _rss_kib)
        larger = results.median(workload, "nginx-64k", _rss_kib)
        lines.append(
            f"- Idle ({workload}): resident memory per logged-in idle IMAP connection no more than "
            f"nginx's: {_verdict(_at_most(ours, theirs))}. mailgress {_opt(ours)} KiB (asking auth_http "
            f"{_opt(asking)} KiB), nginx {_opt(theirs)} KiB (with proxy_buffer 64k {_opt(larger)} KiB)."
        )
    for workload in of("smtp"):
        ours = results.median(workload, "mailgress", _rate)
        direct = results.median(workload, "direct", _rate)
        runs = results.runs(workload, "mailgress")
        lost = None
        if runs is not None:
            lost = runs.operations + runs.failures - sum(int(row["intact"] or 0) for row in runs.rows)
        rate_met = None if ours is None or direct is None else ours >= direct * SMTP_RATE_RATIO
        met = None if rate_met is None or lost is None else rate_met and lost == 0
        lines.append(
            f"- SMTP ({workload}): messages per second within 10% of direct, none lost: {_verdict(met)}. "
            f"mailgress {_opt(ours)} messages/s, direct {_opt(direct)} ({_ratio(ours, direct)}); "
            f"{'-' if lost is None else lost} messages not delivered intact."
        )
    return lines


def _opt(value: float | None) -> str:
    return "-" if value is None else _figure(value)


def _login_stand(results: Results, workload: str, target: str, nginx: float | None, how: str) -> str:
    """One mailgress target's login CPU against nginx's: figure, ratio and verdict."""
    ours = results.median(workload, target, _per_thousand("proxy"))
    auth = results.median(workload, target, _per_thousand("auth"))
    besides = f" (plus {_opt(auth)} in the auth_http service)" if auth else ""
    return (
        f"{target} ({how}) {_opt(ours)}{besides}, {_ratio(ours, nginx)} nginx's: "
        f"{_verdict(_at_most(ours, nginx))}"
    )


def _other_load(results: Results) -> str:
    rows = results.document["measurements"]
    seconds = sum(row["seconds"] for row in rows)
    other = sum(row["cpu"]["other"] for row in rows)
    worst = max((row["cpu"]["other"] / row["seconds"] for row in rows if row["seconds"]), default=0.0)
    return (
        f"Other work on the machine used {other:.0f} CPU s during {seconds:.0f} s of measured runs "
        f"(on average {other / seconds if seconds else 0:.2f} of the 2 cores; {worst:.2f} in the "
        "busiest run): the 'other CPU s' columns give it per run."
    )


def _failures_section(results: Results) -> list[str]:
    failed = [row for row in results.document["measurements"] if row["failures"]]
    if not failed:
        return ["No client operation failed in any run."]
    lines = ["Runs with failures (the first failure of each):", ""]
    lines += [
        f"- round {row['round'] + 1}, {row['workload']}, {row['target']}: {row['failures']} failed; "
        f"{row['first_failure']}"
        for row in failed
    ]
    return lines


def _profile_section(results: Results) -> list[str]:
    profiles: dict[str, Any] = results.document.get("profiles") or {}
    if not profiles:
        return []
    lines = [
        "### Profile of mailgress (py-spy)",
        "",
        "One extra pass of each CPU-bound workload against mailgress with `py-spy record "
        "--nonblocking` attached (not a measured run), and one with `--native` (C frames too; "
        "it pauses the proxy at each sample, which slows it and inflates the share of system calls). "
        "Kind of work: the package of the innermost Python function of each sample, with what it "
        "calls in C and in the kernel (an `os.splice` or a `sock_sendall` counts for its caller; "
        "'event loop' is time with no Python frame above the loop's run call: `perf` finds it mostly "
        "the kernel's going to sleep and waking up and C work done for Python callbacks, uvloop's own "
        "C a few percent); with native frames a system call or "
        "the garbage collector is named as such. Own: share of samples with the function "
        "innermost; total: with it anywhere on the stack.",
    ]

    def rows(spots: list[dict[str, Any]], *, both: bool = True) -> list[list[str]]:
        return [
            [f"`{spot['function']}`", f"{spot['own']:.1%}", *([f"{spot['total']:.1%}"] if both else [])]
            for spot in spots
        ]

    for workload, profile in profiles.items():
        lines += ["", f"**{workload}** ({profile['samples']} samples)", ""]
        lines += _table(["kind of work", "share"], rows(profile["kinds"], both=False))
        lines.append("")
        lines += _table(["function (most own time)", "own", "total"], rows(profile["by_own"]))
        lines.append("")
        lines += _table(["mailgress function (most total time)", "own", "total"], rows(profile["project"]))
    return lines


def render(document: dict[str, Any]) -> str:
    """The generated part of docs/benchmarks.md, markers included."""
    results = Results(document)
    environment = document["environment"]
    scale = document["scale"]
    lines = [
        BEGIN,
        "",
        f"## Latest run: {document['started']} ({document['mode']}, {document['minutes']} minutes)",
        "",
        f"Reproduce: `{document['command']}`",
        "",
        *_table(["", "version"], [[name, str(value)] for name, value in environment.items()]),
        "",
        f"Each figure is the median over {scale['rounds']} interleaved rounds, with min-max in "
        "brackets. Targets run one after the other, each started fresh for each run; the order "
        "rotates from round to round. CPU figures are the proxy's own user+system seconds from "
        "/proc/PID/stat (every process of the proxy), per operation. The auth_http service that nginx "
        f"and {MAILGRESS_AUTH_HTTP} ask at every login is counted apart (its own column); the proxy's "
        "own side of that HTTP exchange is in the proxy's figure; mailgress's routes use "
        "`auth: backend` (no auth request). On these shared 2-core machines CPU per operation is "
        "the figure to trust: rates and latencies move with whatever else runs. " + _other_load(results),
        "",
    ]
    for workload in results.workloads:
        lines += [f"### {workload['title']}", ""]
        lines += TABLES[workload["kind"]](results, workload["name"])
        lines.append("")
    lines += _targets_section(results)
    lines.append("")
    lines += _failures_section(results)
    lines.append("")
    lines += _profile_section(results)
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write(document: dict[str, Any], path: Path, preamble: str) -> None:
    """Replace the generated part of ``path``, keeping the rest; a new file starts with ``preamble``."""
    generated = render(document)
    text = path.read_text() if path.exists() else preamble + "\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + generated.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + generated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
