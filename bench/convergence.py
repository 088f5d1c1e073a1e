"""``python -m bench.convergence``: how long a MailRoute takes to reach every proxy, and what the
compiler costs (issue 4's convergence benchmark; results and analysis in docs/convergence.md).

The set-up is the end-to-end test's, with production timings: the project's Kubernetes emulator
(tests/kube/emulator.py) serves the API from a child process of its own, so its work is not
counted against the controller; the real operator (controller.operator.run, default holdoff)
runs in a thread of this process; three real ``mailgress proxy`` processes subscribe to its push
channel on 127.0.0.1 (testbed.proxyfleet starts them). Measured, per number of routes:
- one more route: N - 1 routes are programmed; from the request creating one more until every
  proxy has acknowledged a table holding it, and until its status says Programmed 3 of 3;
- a burst: N routes created one request after the other (as ``kubectl apply -f``) into an empty
  table; from the first request until every proxy has acknowledged a table holding all of them,
  and until every one is Programmed 3 of 3.
Acknowledgements are observed where the controller sees them (the publisher's ``on_change``),
statuses through a watch. Also, for 10,000 routes and in this process: ``mailroute.parse``,
``controller.compiler.compile_table`` (pure) and the table's JSON both ways. Prints Markdown.
Not a test: nothing asserts.
Binds and connects to 127.0.0.1 only; stops everything it started, also on errors.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
from kmock._internal import rendering

from bench import measure
from controller import compiler, mailroute, operator, publisher
from proxy import table
from testbed import mailservers, proxyfleet
from tests.kube.conftest import (
    CONTROLLER_NAMESPACE,
    CONTROLLER_TOKEN,
    NAMESPACE,
    PROXY_LABELS,
    TEST_TOKEN,
    Api,
    crd_body,
    imap_route,
    kubeconfig_text,
    proxy_pod,
    route_path,
    service_body,
    slice_body,
)
from tests.kube.emulator import Emulator

ROUTE_COUNTS = (1, 10, 1000)
PROXIES = ("proxy-0", "proxy-1", "proxy-2")
RUNS = 5
COMPILE_ROUTES = 10_000
GOAL_SECONDS = 1.0  # issue 4: under one second for 1,000 routes
SERVICE = "dovecot"
# No login goes through the proxies here: the endpoint only has to be a valid address.
BACKEND_ADDRESS = "10.0.0.1"
# Bounds on every wait; a state reached sooner ends it. Large tables make many status writes.
API_START_SECONDS = 30.0
WAIT_SECONDS = 600.0
POLL_SECONDS = 0.005
ROUTES_PATH = f"/apis/mailgress.io/v1alpha1/namespaces/{NAMESPACE}/mailroutes"


# ---------------------------------------------------------------------------------------------
# The API server, in a process of its own


class LeanEmulator(Emulator):
    """The project's emulator with kmock's two linear scans per request taken out.

    kmock keeps every request for tests to assert on and matches each new one against that
    whole log (``request in reaction._source``), and finds the object a request names by
    comparing every stored object: O(requests so far) and O(objects) per request. After the
    tens of thousands of requests of a large run (status writes, Events) that costs more than
    everything the controller does. Here the log holds only the requests still being served
    (watches stay open), and a request naming one object finds it by its key.
    """

    def __init__(self) -> None:
        super().__init__()
        self._serving: list[rendering.Request] = []

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._serving.append(request)
        self._requests[:] = self._serving
        for reaction in self._payloads:
            reaction._requests.clear()
        try:
            return await super()._handle(request)
        finally:
            self._serving.remove(request)

    # kmock's private ``__get_objs``, overridden under its mangled name: every lookup goes through it.
    def _KubernetesEmulator__get_objs(self, request: rendering.Request, strict: bool) -> list[Any]:
        if strict and request.resource is not None and request.name is not None:
            found = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [] if found is None else [found]
        scan: Callable[[rendering.Request, bool], list[Any]]
        scan = super()._KubernetesEmulator__get_objs  # type: ignore[misc]
        return scan(request, strict)


def _serve_api(port: int) -> None:
    """The child process: the emulator on 127.0.0.1:``port`` until terminated."""

    async def serve() -> None:
        emulator = LeanEmulator()
        emulator.resources.load_bundled()
        async with emulator, kmock.Server(emulator, port=port):
            await asyncio.Event().wait()

    asyncio.run(serve())


def _listening(port: int) -> bool:
    try:
        socket.create_connection((mailservers.LOOPBACK, port), timeout=API_START_SECONDS).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def api_server() -> Iterator[str]:
    """The emulator's URL while the block runs; the child process is gone afterwards."""
    port = mailservers.free_port()
    child = multiprocessing.get_context("spawn").Process(target=_serve_api, args=(port,), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + API_START_SECONDS
        while not _listening(port):
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API emulator did not start (exit status {child.exitcode})")
            time.sleep(POLL_SECONDS * 10)
        yield f"http://{mailservers.LOOPBACK}:{port}"
    finally:
        child.terminate()
        child.join(API_START_SECONDS)
        if child.is_alive():
            child.kill()
            child.join()


# ---------------------------------------------------------------------------------------------
# The controller, and when the proxies acknowledged what


@dataclass
class _Target:
    wanted: Callable[[frozenset[str]], bool]
    done: threading.Event = field(default_factory=threading.Event)
    at: float = 0.0


class RecordingPublisher(publisher.Publisher):
    """The real publisher; also notes which routes each published version holds, so that the
    moment every proxy runs a table with the wanted routes is known as its ack arrives."""

    def __init__(self, token: str, proxies: Sequence[str]) -> None:
        super().__init__(token)
        self._proxies = tuple(proxies)
        self._contents: dict[str, frozenset[str]] = {}
        self._targets: list[_Target] = []
        self._lock = threading.Lock()
        self.on_change(self._check)

    def publish(self, new: table.RoutingTable) -> None:
        with self._lock:
            self._contents[new.version] = frozenset(route.name for route in new.routes)
        super().publish(new)

    def expect(self, wanted: Callable[[frozenset[str]], bool]) -> _Target:
        """A target met once every proxy has acked a table whose route names satisfy ``wanted``."""
        target = _Target(wanted)
        with self._lock:
            self._targets.append(target)
        self._check()
        return target

    def _check(self) -> None:
        now = time.perf_counter()
        acks = self.acks()
        with self._lock:
            if any(name not in acks or not acks[name].accepted for name in self._proxies):
                return
            running = [self._contents.get(acks[name].version) for name in self._proxies]
            for target in list(self._targets):
                if all(names is not None and target.wanted(names) for names in running):
                    target.at = now
                    target.done.set()
                    self._targets.remove(target)


@contextlib.contextmanager
def running_operator(settings: operator.Settings, channel: RecordingPublisher) -> Iterator[None]:
    """controller.operator.run with its default holdoff, in a thread, until the block ends."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(operator.run(settings, channel=channel, stop_flag=stop, ready_flag=ready))
        except BaseException as error:  # reported below, not lost in the thread
            failures.append(error)
            ready.set()

    thread = threading.Thread(target=main, name="controller", daemon=True)
    thread.start()
    try:
        if not ready.wait(API_START_SECONDS) or failures:
            raise RuntimeError(f"the operator did not start: {failures[:1]!r}")
        yield
    finally:
        stop.set()
        thread.join(API_START_SECONDS)


# ---------------------------------------------------------------------------------------------
# Statuses, as a watch sees them


class StatusWatch:
    """Follows every MailRoute's status; notes when each first said Programmed on all proxies."""

    def __init__(self, api: Api, proxies: int) -> None:
        self._api = api
        self._message = f"{proxies} of {proxies} proxies"
        self._proxies = proxies
        self.statuses: dict[str, dict[str, Any]] = {}
        self.programmed_at: dict[str, float] = {}

    async def run(self) -> None:
        endless = aiohttp.ClientTimeout(total=None)
        async with self._api.session.get(ROUTES_PATH, params={"watch": "true"}, timeout=endless) as response:
            async for line in response.content:
                if line.strip():
                    self._seen(json.loads(line))

    def _seen(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        body = event["object"]
        name = body["metadata"]["name"]
        if event["type"] == "DELETED":
            self.statuses.pop(name, None)
            self.programmed_at.pop(name, None)
            return
        status = body.get("status") or {}
        self.statuses[name] = status
        programmed = [c for c in status.get("conditions", []) if c.get("type") == "Programmed"]
        if name not in self.programmed_at and programmed:
            condition = programmed[0]
            if (condition["status"], condition["message"]) == ("True", self._message) and condition[
                "observedGeneration"
            ] == body["metadata"]["generation"]:
                self.programmed_at[name] = now

    def settled(self, names: frozenset[str]) -> bool:
        """Every one of ``names`` (and no other route) is programmed on every proxy.

        ``status.proxies.version`` names the first table holding a route as it is now, not the
        latest (a table that leaves a route unchanged writes no status for it), so only the
        counts are compared: ``programmed`` and ``total`` both the number of proxies.
        """
        if set(self.statuses) != names:
            return False
        everywhere = (self._proxies, self._proxies)
        for name, status in self.statuses.items():
            proxies = status.get("proxies") or {}
            counts = (proxies.get("programmed"), proxies.get("total"))
            if name not in self.programmed_at or counts != everywhere:
                return False
        return True


# ---------------------------------------------------------------------------------------------
# The measurements


@dataclass(frozen=True, slots=True)
class Run:
    """One measured convergence: seconds from the first create request."""

    created: float  # until the last create request was answered
    acked: float  # until every proxy had acknowledged a table holding the routes
    programmed: float  # until every route said Programmed on every proxy


def _key(name: str) -> str:
    """A route's name in the table: namespace/name."""
    return f"{NAMESPACE}/{name}"


@dataclass
class Bench:
    """The running cluster: the test's API client, the publisher, the status watch."""

    api: Api
    channel: RecordingPublisher
    watch: StatusWatch
    watching: "asyncio.Task[None]"
    routes: set[str] = field(default_factory=set)

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if check():
                return
            if self.watching.done():
                raise RuntimeError(f"the status watch ended while waiting for {what}")
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        raise RuntimeError(f"not reached within {WAIT_SECONDS:.0f} s: {what}")

    async def wait_target(self, target: _Target, what: str) -> float:
        await self.wait(target.done.is_set, what)
        return target.at

    async def settle(self) -> None:
        """Until the proxies run exactly ``routes`` and every status says so."""
        names = frozenset(self.routes)
        keys = frozenset(map(_key, names))
        target = self.channel.expect(lambda running: running == keys)
        await self.wait_target(target, f"the proxies run {len(names)} routes")
        await self.wait(lambda: self.watch.settled(names), f"{len(names)} statuses settled")

    async def create(self, names: Sequence[str]) -> Run:
        """Create ``names`` one request after the other; time the convergence."""
        wanted = frozenset(names)
        keys = frozenset(map(_key, names))
        target = self.channel.expect(lambda running: keys <= running)
        start = time.perf_counter()
        for name in names:
            await self.api.create(ROUTES_PATH, imap_route(name, f"{name}.example", service=SERVICE))
        created = time.perf_counter()
        self.routes.update(names)
        acked = await self.wait_target(target, f"the proxies run {len(names)} new routes")
        await self.wait(lambda: wanted <= set(self.watch.programmed_at), f"{len(names)} routes Programmed")
        programmed = max(self.watch.programmed_at[name] for name in names)
        return Run(created - start, acked - start, programmed - start)

    async def delete(self, names: Sequence[str]) -> None:
        for name in names:
            await self.api.delete(route_path(name))
        self.routes.difference_update(names)
        await self.settle()


def _progress(what: str, run: Run) -> None:
    # A large run takes minutes: say how far it got (stdout is kept for the report).
    print(
        f"{what}: created {run.created:.3f} s, acked {run.acked:.3f} s, Programmed {run.programmed:.3f} s",
        file=sys.stderr,
        flush=True,
    )


async def one_more(bench: Bench, count: int, runs: int) -> list[Run]:
    """``runs`` times: with ``count - 1`` routes programmed, create one more, then delete it."""
    base = [f"base-{index:05d}" for index in range(count - 1)]
    if base:
        await bench.create(base)
    await bench.settle()
    measured = []
    for run in range(runs):
        probe = f"probe-{count}-{run}"
        measured.append(await bench.create([probe]))
        _progress(f"{count} routes, one more, run {run + 1}", measured[-1])
        await bench.delete([probe])
    await bench.delete(base)
    return measured


async def burst(bench: Bench, count: int, runs: int) -> list[Run]:
    """``runs`` times: create ``count`` routes into an empty table, then delete them all."""
    measured = []
    for run in range(runs):
        names = [f"burst-{run}-{index:05d}" for index in range(count)]
        measured.append(await bench.create(names))
        _progress(f"{count} routes, burst, run {run + 1}", measured[-1])
        await bench.delete(names)
    return measured


async def convergence(counts: Sequence[int], runs: int) -> dict[tuple[str, int], list[Run]]:
    """Set everything up, measure both ways for each count, tear everything down."""
    results: dict[tuple[str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="mailgress-convergence-") as scratch, api_server() as url:
        directory = Path(scratch)
        deployment = proxyfleet.Deployment(directory)
        kubeconfig = directory / "kubeconfig"
        kubeconfig.write_text(kubeconfig_text(url, CONTROLLER_TOKEN))
        settings = operator.Settings(
            namespace=CONTROLLER_NAMESPACE,
            proxy_selector=PROXY_LABELS,
            listen_address=mailservers.LOOPBACK,
            listen_port=deployment.port,
            token_file=deployment.token_file,
            snapshot_secret=operator.DEFAULT_SNAPSHOT_NAME,
            kubeconfig=kubeconfig,
            health="",
            # Cluster-wide, as measured before served namespaces existed (this emulator holds no
            # Namespace objects for kopf to find).
            watch_namespaces=None,
            log_level="warning",
        )
        channel = RecordingPublisher(operator.read_token(deployment.token_file), PROXIES)
        headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
        async with aiohttp.ClientSession(base_url=url, headers=headers) as session:
            api = Api(session)
            await api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd_body())
            await api.create(f"/api/v1/namespaces/{NAMESPACE}/services", service_body(SERVICE))
            await api.create(
                f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices",
                slice_body(SERVICE, [BACKEND_ADDRESS]),
            )
            for name in PROXIES:
                await api.create(f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods", proxy_pod(name))
            # The API server is another process: blocking this loop while the operator starts
            # or stops holds nobody up.
            with running_operator(settings, channel):
                watch = StatusWatch(api, len(PROXIES))
                watching = asyncio.create_task(watch.run())
                try:
                    await asyncio.gather(*(deployment.start_proxy(name) for name in PROXIES))
                    bench = Bench(api, channel, watch, watching)
                    await bench.settle()
                    for count in counts:
                        results["one more", count] = await one_more(bench, count, runs)
                        results["burst", count] = await burst(bench, count, runs)
                finally:
                    watching.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watching
                    await deployment.stop_proxies()
    return results


@dataclass(frozen=True, slots=True)
class CompileCost:
    """Seconds per step for one table of ``routes`` routes, over several runs."""

    routes: int
    json_bytes: int
    parse: measure.Spread  # all of them; the operator's index parses each object as it changes
    compile: measure.Spread
    to_json: measure.Spread
    from_json: measure.Spread


def _timed(step: Callable[[], object], runs: int) -> measure.Spread:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return measure.Spread.of(seconds)


def compile_cost(count: int, runs: int) -> CompileCost:
    """mailroute.parse of ``count`` MailRoutes, compile_table over them, and the JSON a proxy
    receives, both ways."""
    bodies = [
        imap_route(f"route-{index:05d}", f"d{index}.example", service=SERVICE) for index in range(count)
    ]
    for body in bodies:
        body["metadata"].update(generation=1, creationTimestamp="2026-01-01T00:00:00Z")
    routes = [mailroute.parse(body) for body in bodies]
    endpoints = {key: (table.Endpoint(BACKEND_ADDRESS, 10143),) for key in compiler.service_keys(routes)}
    compiled = compiler.compile_table(routes, endpoints)
    document = table.to_json(compiled.table)
    return CompileCost(
        routes=count,
        json_bytes=len(document),
        parse=_timed(lambda: [mailroute.parse(body) for body in bodies], runs),
        compile=_timed(lambda: compiler.compile_table(routes, endpoints), runs),
        to_json=_timed(lambda: table.to_json(compiled.table), runs),
        from_json=_timed(lambda: table.from_json(document), runs),
    )


# ---------------------------------------------------------------------------------------------
# The report


def _figure(spread: measure.Spread) -> str:
    return f"{spread.median:.3f} ({spread.low:.3f}-{spread.high:.3f})"


def _spread(runs: Sequence[Run], step: Callable[[Run], float]) -> str:
    return _figure(measure.Spread.of([step(run) for run in runs]))


def report(results: dict[tuple[str, int], list[Run]], cost: CompileCost, runs: int) -> str:
    """The Markdown tables: convergence per route count and change, then the compile cost."""
    lines = [
        f"Seconds, median (min-max) of {runs} runs, {len(PROXIES)} proxies, counted from the first "
        "create request. The goal (issue 4) is every proxy acked within "
        f"{GOAL_SECONDS:g} s of the change: the median after the last request.",
        "",
        "| routes | change | creating (requests answered) | all proxies acked | acked after the last "
        "request | all Programmed | goal |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for (mode, count), measured in results.items():
        change = "1 route added to N - 1" if mode == "one more" else "N routes created at once"
        after = measure.Spread.of([run.acked - run.created for run in measured])
        lines.append(
            f"| {count:,} | {change} | {_spread(measured, lambda run: run.created)} | "
            f"{_spread(measured, lambda run: run.acked)} | {_figure(after)} | "
            f"{_spread(measured, lambda run: run.programmed)} | "
            f"{'met' if after.median < GOAL_SECONDS else 'missed'} |"
        )
    lines += [
        "",
        f"Compiling {cost.routes:,} routes (pure, one process; table JSON {cost.json_bytes / 1e6:.1f} MB), "
        f"seconds, median (min-max) of {cost.compile.count} runs:",
        "",
        "| step | seconds |",
        "| --- | ---: |",
        f"| mailroute.parse, every route | {_figure(cost.parse)} |",
        f"| compiler.compile_table | {_figure(cost.compile)} |",
        f"| table.to_json | {_figure(cost.to_json)} |",
        f"| table.from_json | {_figure(cost.from_json)} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    flags = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.splitlines()[0])
    flags.add_argument("--runs", type=int, default=RUNS, help=f"runs per figure ({RUNS})")
    flags.add_argument(
        "--routes", type=int, nargs="+", default=list(ROUTE_COUNTS), help="route counts (1 10 1000)"
    )
    flags.add_argument("--compile-routes", type=int, default=COMPILE_ROUTES, help="routes to compile (10000)")
    arguments = flags.parse_args(argv)
    cost = compile_cost(arguments.compile_routes, arguments.runs)
    results = asyncio.run(convergence(arguments.routes, arguments.runs))
    sys.stdout.write(report(results, cost, arguments.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
