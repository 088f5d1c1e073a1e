"""``python -m bench`` (``make bench``): mailgress, nginx mail and a direct connection, side by side.

Sets up everything on 127.0.0.1 (Dovecot and Postfix from the testbed, nginx with its mail
module and an auth_http service, mailgress standalone under uvloop), runs every workload against
every target in interleaved rounds, profiles mailgress with py-spy if it is installed, and
writes the table into docs/benchmarks.md (``--quick``: a smaller run, written under run/bench/
so the published table stays). Everything it starts it stops, also on Ctrl-C, SIGTERM or an
error. Exit status 0, or 1 when a mail server or proxy could not be set up.
"""

import argparse
import dataclasses
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import profiling, report, runner, workloads
from testbed import mailservers

REPOSITORY = Path(__file__).resolve().parent.parent
PUBLISHED = REPOSITORY / "docs" / "benchmarks.md"
WORK = REPOSITORY / "run" / "bench"
PREAMBLE = "# Benchmarks\n\nmailgress side by side with nginx's mail module and a direct connection.\n"


def _variant(text: str) -> runner.Variant:
    """``NAME=DIR`` or ``NAME=DIR:LOGLEVEL``."""
    name, equals, rest = text.partition("=")
    tree, _, level = rest.partition(":")
    if not equals or not name or not tree:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIR[:LOGLEVEL]")
    return runner.Variant(name, Path(tree).resolve(), level or "info")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    top.add_argument("--quick", action="store_true", help="a smaller run (a few minutes)")
    top.add_argument("--rounds", type=int, help="interleaved rounds (at least 3 for the report)")
    top.add_argument("--workloads", nargs="+", metavar="NAME", help="only these workloads")
    top.add_argument(
        "--targets", nargs="+", metavar="NAME", help="only these targets (direct, mailgress, ...)"
    )
    top.add_argument(
        "--variant",
        action="append",
        type=_variant,
        default=[],
        metavar="NAME=DIR[:LOGLEVEL]",
        help="also measure the mailgress of another source tree (a patch being tried)",
    )
    top.add_argument("--no-profile", action="store_true", help="skip the py-spy pass")
    top.add_argument("--report", type=Path, help="Markdown file to write (default: by mode)")
    top.add_argument("--results", type=Path, help="JSON results file to write (default: by mode)")
    top.add_argument("--render", type=Path, metavar="RESULTS", help="only render a saved results file")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    mode = "quick" if arguments.quick else "full"
    report_path = arguments.report or (WORK / "benchmarks-quick.md" if arguments.quick else PUBLISHED)
    results_path = arguments.results or WORK / f"results-{mode}.json"
    if arguments.render:
        report.write(runner.load(arguments.render), report_path, PREAMBLE)
        print(f"wrote {report_path}")
        return 0
    scale = workloads.QUICK if arguments.quick else workloads.FULL
    if arguments.rounds:
        scale = dataclasses.replace(scale, rounds=arguments.rounds)
    chosen = [
        w for w in runner.workloads_for(scale) if not arguments.workloads or w.name in arguments.workloads
    ]
    profile = not arguments.no_profile
    if profile:
        try:
            profiling.py_spy()
        except profiling.ProfilerMissingError as error:
            print(f"{error}: the profile is skipped", file=sys.stderr)
            profile = False
    # Whatever ends the run, what it started must stop: the usual termination signals become the
    # KeyboardInterrupt that unwinds every context manager and finally block.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    command = " ".join(
        [".venv/bin/python -m bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    try:
        document = runner.run(
            mode=mode,
            scale=scale,
            chosen=chosen,
            variants=arguments.variant,
            names=arguments.targets,
            profile=profile,
            work_directory=WORK,
            command=command.strip(),
        )
    except mailservers.MailServerError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    runner.save(document, results_path)
    report.write(document, report_path, PREAMBLE)
    print(f"wrote {results_path} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
