"""The benchmark run: rounds of every workload against every target, then a profile of mailgress.

``bench.__main__`` calls ``run``. Each round starts fresh mail servers (a long-lived Dovecot
slows down), then for each workload starts each target fresh, measures, and stops it, with the
targets' order rotated from round to round so a slow spell on the shared machine does not
always hit the same one. After the rounds, when py-spy is installed, one more round records
where mailgress spends its time under each kind of load (never in a measured run). Everything
it starts it stops, also on errors and Ctrl-C. The results go to a JSON file that
``bench.report`` renders.
"""

import dataclasses
import datetime
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import environment, measure, profiling, targets, workloads

Kind = Literal["saturated", "paced", "fetch", "fetch-small", "smtp", "idle"]


@dataclass(frozen=True, slots=True)
class Workload:
    """One row group of the report: what the clients do."""

    name: str
    title: str
    kind: Kind
    protocol: Literal["imap", "pop3", "submission"] = "imap"
    connections: int = 0  # idle runs
    # nginx's proxy_buffer only matters where bytes are relayed or buffers sit allocated: these
    # also run against nginx with proxy_buffer 64k.
    buffer_sensitive: bool = False
    # Where logins are the work, mailgress is also measured asking nginx's auth_http service at
    # every login, as nginx does (targets.AUTH_VARIANTS).
    login_bound: bool = False


def workloads_for(scale: workloads.Scale) -> list[Workload]:
    c, rate, paced = scale.concurrency, f"{scale.paced_rate:g}", scale.paced_sessions
    return [
        Workload(
            "imap-saturated",
            f"IMAP LOGIN/SELECT/LOGOUT, {c} clients, {scale.sessions} sessions",
            "saturated",
            login_bound=True,
        ),
        Workload(
            "imap-paced",
            f"IMAP LOGIN/SELECT/LOGOUT, {rate} sessions/s, {paced} sessions",
            "paced",
            login_bound=True,
        ),
        Workload(
            "pop3-saturated",
            f"POP3 USER/PASS/STAT/RETR/QUIT, {c} clients, {scale.sessions} sessions",
            "saturated",
            "pop3",
            login_bound=True,
        ),
        Workload(
            "pop3-paced",
            f"POP3 USER/PASS/STAT/RETR/QUIT, {rate} sessions/s, {paced} sessions",
            "paced",
            "pop3",
            login_bound=True,
        ),
        Workload(
            "imap-fetch-20mb",
            f"IMAP FETCH of a 20 MB message, {scale.fetches} times in one session",
            "fetch",
            buffer_sensitive=True,
        ),
        Workload(
            "imap-fetch-small",
            f"IMAP FETCH 1:{targets.SMALL_MESSAGES} BODY.PEEK[] of {targets.SMALL_MESSAGES:,} messages of "
            f"{targets.SMALL_MESSAGE_SIZE // 1024} KiB, {scale.small_fetches} times in one session",
            "fetch-small",
            buffer_sensitive=True,
        ),
        Workload(
            "smtp-submission",
            f"SMTP submission of {scale.smtp_messages} messages of 100 KiB, {c} clients, one session each",
            "smtp",
            "submission",
        ),
        *(
            Workload(
                f"idle-{count}",
                f"{count:,} logged-in idle IMAP connections",
                "idle",
                connections=count,
                buffer_sensitive=True,
                login_bound=True,
            )
            for count in scale.idle
        ),
    ]


def measure_one(runner: workloads.Runner, workload: Workload) -> workloads.Measurement:
    """One measured run; a target that fails its warm-up gets a failed measurement instead."""
    try:
        match workload.kind:
            case "saturated" | "paced":
                return runner.sessions(workload.name, workload.protocol, paced=workload.kind == "paced")
            case "fetch":
                return runner.fetch(workload.name)
            case "fetch-small":
                return runner.fetch_small(workload.name)
            case "smtp":
                return runner.smtp(workload.name)
            case "idle":
                return runner.idle(workload.name, workload.connections)
    except workloads.WarmUpError as error:
        return workloads.Measurement.failed(workload.name, runner.target.name, runner.round, str(error))


@dataclass(frozen=True, slots=True)
class Variant:
    """Another mailgress build to measure beside the checkout's: a name and a source tree."""

    name: str
    tree: Path
    log_level: str = "info"


TargetFactory = Callable[[targets.Bed, Path], list[targets.Target]]


def target_factory(variants: Sequence[Variant], names: Sequence[str] | None) -> TargetFactory:
    """Builds a round's targets (all of them, or those in ``names``)."""

    def make(bed: targets.Bed, directory: Path) -> list[targets.Target]:
        made: list[targets.Target] = [
            targets.Direct(bed),
            targets.Mailgress(bed, directory / "mailgress"),
            targets.Mailgress(
                bed,
                directory / targets.MAILGRESS_AUTH_HTTP,
                name=targets.MAILGRESS_AUTH_HTTP,
                auth_http=True,
            ),
        ]
        made += [
            targets.Mailgress(
                bed,
                directory / variant.name,
                name=variant.name,
                command=targets.variant_command(variant.tree),
                log_level=variant.log_level,
            )
            for variant in variants
        ]
        made += targets.nginx_targets(bed, directory)
        return [target for target in made if names is None or target.name in names]

    return make


def target_names(variants: Sequence[Variant], names: Sequence[str] | None) -> list[str]:
    every = [
        "direct",
        "mailgress",
        *targets.AUTH_VARIANTS,
        *(v.name for v in variants),
        *targets.NGINX_BUFFERS,
    ]
    return [name for name in every if names is None or name in names]


def runs_against(workload: Workload, target: str) -> bool:
    """Whether ``workload`` is measured against the target named ``target``: a variant that differs
    only in relay buffers or in asking an auth service runs only where that matters."""
    if target in targets.BUFFER_VARIANTS:
        return workload.buffer_sensitive
    if target in targets.AUTH_VARIANTS:
        return workload.login_bound
    return True


def _rotated(items: Sequence[targets.Target], by: int) -> list[targets.Target]:
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def _progress(measurement: workloads.Measurement) -> None:
    m = measurement
    rate = m.operations / m.seconds if m.seconds else 0.0
    cpu = m.cpu
    print(
        f"  round {m.round + 1} {m.workload:<16} {m.target:<18} ops {m.operations:>6} "
        f"failures {m.failures:>4} "
        f"{m.seconds:7.2f} s {rate:8.1f}/s  CPU s: proxy {cpu.proxy:.2f} mail servers {cpu.backends:.2f} "
        f"bench {cpu.bench:.2f} other {cpu.other:.2f}"
        + (f"  first failure: {m.first_failure}" if m.first_failure else ""),
        flush=True,
    )


def _bed_directory(base: Path, label: str) -> Path:
    directory = base / label
    directory.mkdir()
    directory.chmod(0o755)  # Dovecot's and Postfix's unprivileged processes must reach it
    return directory


def run_rounds(
    base: Path,
    scale: workloads.Scale,
    chosen: Sequence[Workload],
    make_targets: TargetFactory,
    names: Sequence[str],
) -> list[workloads.Measurement]:
    results: list[workloads.Measurement] = []
    for number in range(scale.rounds):
        print(f"round {number + 1} of {scale.rounds}", flush=True)
        directory = _bed_directory(base, f"round{number + 1}")
        with targets.Bed(directory, load_users=scale.load_users, target_names=names) as bed:
            round_targets = make_targets(bed, directory)
            for workload in chosen:
                eligible = [t for t in round_targets if runs_against(workload, t.name)]
                for target in _rotated(eligible, number):
                    target.start()
                    try:
                        measurement = measure_one(workloads.Runner(bed, target, scale, number), workload)
                    finally:
                        target.stop()
                    _progress(measurement)
                    results.append(measurement)
        shutil.rmtree(directory, ignore_errors=True)
    return results


def run_profiles(
    base: Path, scale: workloads.Scale, chosen: Sequence[Workload], output: Path
) -> dict[str, profiling.Profile]:
    """One pass of each CPU-bound workload against mailgress under py-spy (idle runs are skipped),
    and one more of the first saturated workload with native frames."""
    passes = [(w, False) for w in chosen if w.kind != "idle"]
    passes += [(w, True) for w in chosen if w.kind == "saturated"][:1]
    profiles: dict[str, profiling.Profile] = {}
    directory = _bed_directory(base, "profile")
    output.mkdir(parents=True, exist_ok=True)
    with targets.Bed(directory, load_users=scale.load_users, target_names=["mailgress"]) as bed:
        target = targets.Mailgress(bed, directory / "mailgress")
        for workload, native in passes:
            name = f"{workload.name} (native)" if native else workload.name
            collapsed = output / f"{workload.name}{'-native' if native else ''}.txt"
            target.start()
            try:
                session = target.session
                assert session is not None
                with profiling.recording(session, collapsed, native=native):
                    measure_one(workloads.Runner(bed, target, scale, 0), workload)
            finally:
                target.stop()
            profiles[name] = profiling.summarise(collapsed)
            print(f"  profiled {name}: {profiles[name].samples} samples", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    return profiles


def run(
    *,
    mode: str,
    scale: workloads.Scale,
    chosen: Sequence[Workload],
    variants: Sequence[Variant],
    names: Sequence[str] | None,
    profile: bool,
    work_directory: Path,
    command: str,
) -> dict[str, Any]:
    """Run everything and return the results document (see ``bench.report``)."""
    limit = measure.raise_descriptor_limit()
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    every_name = target_names(variants, names)
    print(f"targets: {', '.join(every_name)}; descriptor limit {limit}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="mgbench-"))  # short: Dovecot's socket paths live below it
    base.chmod(0o755)
    try:
        results = run_rounds(base, scale, chosen, target_factory(variants, names), every_name)
        profiles = run_profiles(base, scale, chosen, work_directory / "profiles") if profile else {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "mode": mode,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "minutes": round((time.monotonic() - clock) / 60, 1),
        "environment": environment.describe(),
        "scale": dataclasses.asdict(scale),
        "workloads": [dataclasses.asdict(w) for w in chosen],
        "targets": every_name,
        "measurements": [dataclasses.asdict(m) for m in results],
        "profiles": {name: dataclasses.asdict(p) for name, p in profiles.items()},
    }


def save(document: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document
