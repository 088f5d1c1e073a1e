"""The ``mailgress`` console script.

Subcommands:
  mailgress proxy --config FILE      run a proxy (standalone: MailRoute files from the settings;
                                     with a 'controller' key: tables pushed by the controller)
  mailgress routes check FILE... [--settings FILE]
                                     validate MailRoute manifests offline, print the compiled
                                     table (auth_http header values redacted); the settings'
                                     'services' resolve the backends (without them every backend
                                     is BackendNotFound, no endpoints), their 'secrets' the
                                     headersFrom Secrets (without them: SecretNotFound)
  mailgress controller [FLAGS]       run the MailRoute operator (flags: controller/operator.py);
                                     its push channel's TLS files are loaded and reloaded by the
                                     proxy's CertificateStore and its connections bounded by the
                                     admin port's connections.Guard, both wired in here (the
                                     controller may not import proxy.server)
Errors in the user's files end the command with a clear message on stderr, never a traceback.
Exit status 2 (EXIT_USAGE): a settings or route file that cannot be read or is not valid YAML,
bad settings, a listener or the admin endpoint that cannot bind, a listener certificate or a
backend CA file that cannot be loaded. Exit status 1 (EXIT_INVALID_ROUTES, routes check
only): a MailRoute that is not Accepted (Invalid or Conflicted), or no MailRoute in the files;
a backend not found or without endpoints is printed but leaves the status 0. Exit status 1
(operator.EXIT_RESTART, controller only): the operator stopped on an error (a watch ERROR kopf
treats as fatal, or kinds kopf's scan of API discovery missed), said in one error line; the
proxies keep serving their tables while Kubernetes restarts the controller.
"""

import argparse
import gc
import json
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp.http_exceptions import HttpProcessingError

from controller import operator
from mailgress import standalone
from proxy import settings as proxy_settings
from proxy.server import certificates, connections, listeners, process, subscriber
from proxy.server.routes import TableHolder

EXIT_USAGE = 2
EXIT_INVALID_ROUTES = 1
log = logging.getLogger(__name__)
# The collector's first-generation threshold for a proxy (CPython's default is 700). Every
# session allocates many short-lived containers (tasks, futures, frames, dataclasses), so at the
# default the collector runs every few logins; profiles showed it at 2-7% of a login's samples
# (docs/benchmarks.md, proposed change 3). Sessions form few reference cycles, so collecting
# less often keeps little garbage for longer.
GC_GEN0_THRESHOLD = 10_000


def _configure_logging(level: str) -> None:
    # The logging HOWTO's "Optimization" settings: the format below names none of these fields,
    # and every session logs one line, so its record need not look up the thread, the process
    # (a getpid system call) or walk the stack for the caller (docs/benchmarks.md, third series).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_malformed_requests()


def _quiet_malformed_requests() -> None:
    """For the admin port (proxy) and the push port (controller), both served by aiohttp."""
    logging.getLogger("aiohttp.server").addFilter(_malformed_requests_at_debug)


def _malformed_requests_at_debug(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse (a negative Content-Length, an over-long URL or
    header, a bad chunk) at ERROR with its traceback, ten lines for a 400 it has already answered;
    the admin and push ports are reachable from other pods, so anyone could fill the log that way.
    Such a record becomes one DEBUG line, kept only when debug logging is on; a handler's own
    failure (a 500) stays an ERROR with its traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, HttpProcessingError):
        return True
    # Changed in place: Python 3.11's filters cannot hand back a replacement record.
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    record.msg, record.args = "malformed HTTP request answered with %s: %s", (error.code, error.message)
    record.exc_info, record.exc_text = None, None
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _run_proxy(arguments: argparse.Namespace) -> int:
    _configure_logging(arguments.log_level)
    try:
        settings = proxy_settings.load(Path(arguments.config))
        # Fail fast on unreadable or broken route files; later edits are only warned about.
        standalone.mailroute_bodies(standalone.read_manifests(settings.route_files))
        # Made here, not in the loop: a POD_NAME or host name the controller would refuse is a
        # start-up error like a bad setting.
        follower = None if settings.controller is None else subscriber.Subscriber(settings.controller)
    except (proxy_settings.SettingsError, standalone.ManifestError) as error:
        print(f"mailgress: {error}", file=sys.stderr)
        return EXIT_USAGE
    if follower is None and not settings.route_files:
        print(
            "mailgress: the settings name no MailRoute files under 'routes' and no 'controller'",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def source(holder: TableHolder) -> None:
        if follower is not None:
            await follower.run(holder)
        else:
            await standalone.watch(settings.route_files, settings.services, holder, settings.secrets)

    _settle_heap()
    _raise_descriptor_limit()
    sys.unraisablehook = certificates.quiet_undecodable_server_names
    try:
        uvloop.run(process.run(settings, source))
    except listeners.ListenerError as error:
        print(f"mailgress: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except certificates.CertificateError as error:
        print(f"mailgress: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _settle_heap() -> None:
    """Start the proxy with a frozen heap and a higher first-generation threshold.

    What start-up loaded (modules, settings, routes) lives as long as the process: frozen, the
    collector no longer walks it on every full collection.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, second, third)


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors to the hard one, as Go's runtime does at start.

    Every relayed session holds two sockets (and a splice pipe pair while it moves data), and the
    guards bound the push and admin ports by connection counts that mean nothing if the process
    stops at a soft limit of 1024, which some container runtimes still hand out beside a hard
    limit of a million.
    Raising the soft limit up to the hard one needs no privilege. nginx has
    worker_rlimit_nofile for the same reason; here the hard limit is the operator's knob
    (the runtime's or the pod's ulimit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:  # a hard limit above the kernel's nr_open
            log.warning("open descriptors stay limited to %d: raising to %d failed: %s", soft, hard, error)
            return
    log.info("open descriptors limited to %s", "unlimited" if hard == resource.RLIM_INFINITY else hard)


def _check_routes(arguments: argparse.Namespace) -> int:
    services: proxy_settings.ServiceEndpoints = {}
    secrets: proxy_settings.SecretData = {}
    try:
        if arguments.settings:
            loaded = proxy_settings.load(Path(arguments.settings))
            services, secrets = loaded.services, loaded.secrets
        bodies = standalone.mailroute_bodies(standalone.read_manifests([Path(p) for p in arguments.files]))
    except (proxy_settings.SettingsError, standalone.ManifestError) as error:
        print(f"mailgress: {error}", file=sys.stderr)
        return EXIT_USAGE
    compiled, problems = standalone.compile_bodies(bodies, services, secrets)
    print(json.dumps(standalone.printable_table(compiled.table), indent=2, sort_keys=True))
    invalid = False
    for problem in problems:
        print(f"{problem.route}: {problem.message}", file=sys.stderr)
        invalid = invalid or problem.message.startswith("Accepted=")
    if not bodies:
        print("mailgress: no MailRoute objects found", file=sys.stderr)
        return EXIT_INVALID_ROUTES
    return EXIT_INVALID_ROUTES if invalid else 0


def push_certificates(cert: Path, key: Path) -> certificates.CertificateStore:
    """The controller's push channel certificates (an ``operator.CertificateLoader``; tests and
    the testbed start controllers with it too).

    Raises:
        operator.SettingsError: the files cannot be loaded.
    """
    try:
        return certificates.CertificateStore("push channel", (proxy_settings.CertificateFiles(cert, key),))
    except certificates.CertificateError as error:
        raise operator.SettingsError(str(error)) from error


def _run_controller(arguments: argparse.Namespace) -> int:
    _raise_descriptor_limit()
    _quiet_malformed_requests()
    return operator.command(arguments, certificates=push_certificates, guards=connections.Guard)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mailgress", description="Kubernetes-native mail ingress.")
    commands = top.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="run a mail proxy")
    proxy.add_argument("--config", required=True, help="settings file (YAML)")
    proxy.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    proxy.set_defaults(handler=_run_proxy)
    routes = commands.add_parser("routes", help="work with MailRoute manifests offline")
    route_commands = routes.add_subparsers(dest="routes_command", required=True)
    check = route_commands.add_parser("check", help="validate MailRoutes and print the compiled table")
    check.add_argument("files", nargs="+", help="MailRoute YAML files")
    check.add_argument(
        "--settings", help="proxy settings whose 'services' and 'secrets' resolve backends and headersFrom"
    )
    check.set_defaults(handler=_check_routes)
    controller = commands.add_parser("controller", help="run the MailRoute operator (kopf)")
    operator.add_arguments(controller)
    controller.set_defaults(handler=_run_controller)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    handler = arguments.handler
    result: int = handler(arguments)
    return result


if __name__ == "__main__":
    sys.exit(main())
