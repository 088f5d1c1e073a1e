"""Relay throughput and CPU per GB: mailgress's two relay paths against nginx mail and a direct link.

Not a test. Run it by hand: ``.venv/bin/python bench/relay_throughput.py [--mb 1024] [--rounds 3]``
(``--pipe-kib`` tries another splice pipe size, ``--targets`` a subset). It prints a table.
Each round moves ``--mb`` MiB from a backend to a client over loopback, once through each target:

  direct      the client connected straight to the backend: the throughput ceiling, no proxy
  splice      a proxy process running ``relay.relay(splice=True)`` under uvloop (plaintext sessions)
  transports  the same with ``splice=False``: the transport path, which TLS sessions take
  nginx-4k    nginx's mail proxy after an IMAP LOGIN, default ``proxy_buffer`` (one page)
  nginx-64k   the same with ``proxy_buffer 64k``

Proxy CPU is the user+system time of the proxy process during the transfer: ``time.process_time``
inside the mailgress proxy process, ``/proc/PID/stat`` for nginx (one process, master_process off).
"Other CPU" is what the rest of the machine used meanwhile, minus the proxy and this script (the
source and sink), so a noisy neighbour shows. Bounded: sockets time out and every transfer has a
deadline. Only loopback addresses are used.
"""

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import uvloop

from proxy.server import relay

HOST = "127.0.0.1"
CHUNK = 1024 * 1024  # source and sink move 1 MiB per call, so they cost little CPU themselves
SOCKET_TIMEOUT = 30.0  # seconds any one socket operation may wait before the run is abandoned
TRANSFER_DEADLINE = 300.0  # seconds one transfer may take in all
NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float  # wall time of the transfer, first byte sent to last byte received
    proxy_cpu: float | None  # proxy process CPU seconds during the transfer (None: no proxy)
    other_cpu: float  # CPU seconds everything else on the machine used meanwhile


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS


def _process_seconds(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _send(sock: socket.socket, total: int) -> None:
    """The backend: ``total`` bytes, then EOF."""
    block = memoryview(os.urandom(CHUNK))
    sent = 0
    while sent < total:
        size = min(CHUNK, total - sent)
        sock.sendall(block[:size])
        sent += size
    sock.shutdown(socket.SHUT_WR)


def _receive(sock: socket.socket, total: int, deadline: float) -> None:
    """The client: read until EOF, which must come after exactly ``total`` bytes."""
    buffer = bytearray(CHUNK)
    received = 0
    while time.monotonic() < deadline:
        size = sock.recv_into(buffer)
        if not size:
            if received != total:
                raise RuntimeError(f"received {received} bytes, expected {total}")
            return
        received += size
    raise TimeoutError("transfer deadline passed")


def _transfer(
    backend: socket.socket, client: socket.socket, total: int, proxy_cpu: Callable[[], float]
) -> Sample:
    """Move ``total`` bytes backend -> client; measure wall time, proxy CPU and everyone else's."""
    busy, own, proxy = _busy_seconds(), time.process_time(), proxy_cpu()
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(_send, backend, total)
        _receive(client, total, started + TRANSFER_DEADLINE)
        sending.result(timeout=SOCKET_TIMEOUT)
    seconds = time.monotonic() - started
    proxy = proxy_cpu() - proxy
    other = _busy_seconds() - busy - (time.process_time() - own) - proxy
    return Sample(seconds, proxy, max(other, 0.0))


def _listener() -> socket.socket:
    listener = socket.create_server((HOST, 0))
    listener.settimeout(SOCKET_TIMEOUT)
    return listener


def _accept(listener: socket.socket) -> socket.socket:
    sock, _ = listener.accept()
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def _connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)


def run_direct(total: int) -> Sample:
    with _listener() as listener, _connect(listener.getsockname()[1]) as client, _accept(listener) as backend:
        sample = _transfer(backend, client, total, lambda: 0.0)
    return Sample(sample.seconds, None, sample.other_cpu)


# ---------------------------------------------------------------------------------------------
# mailgress: a child process that accepts one client, connects the backend and runs the relay


def proxy_child(path: str, backend_port: int, pipe_kib: int) -> None:
    """The proxy process: print the listening port, relay one session, print its CPU seconds."""
    relay.PIPE_SIZE = pipe_kib * 1024  # a bench knob: compare pipe sizes without editing relay.py
    with _listener() as listener:
        print(listener.getsockname()[1], flush=True)
        client, _ = listener.accept()
    backend = socket.create_connection((HOST, backend_port), timeout=SOCKET_TIMEOUT)

    async def session() -> tuple[relay.RelayResult, float]:
        started = time.process_time()
        result = await relay.relay(client, backend, idle_timeout=SOCKET_TIMEOUT, splice=path == "splice")
        return result, time.process_time() - started

    result, cpu = uvloop.run(session())
    print(
        json.dumps({"cpu": cpu, "downstream": result.downstream_bytes, "ended_by": result.ended_by}),
        flush=True,
    )


def run_mailgress(path: str, pipe_kib: int, total: int) -> Sample:
    with _listener() as backend_listener:
        command = [
            sys.executable,
            __file__,
            "--child",
            path,
            "--backend-port",
            str(backend_listener.getsockname()[1]),
            "--pipe-kib",
            str(pipe_kib),
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            try:
                port = int(child.stdout.readline())
                with _connect(port) as client, _accept(backend_listener) as backend:
                    # /proc for "other CPU"; the figure reported is the child's own process_time.
                    sample = _transfer(backend, client, total, lambda: _process_seconds(child.pid))
                    client.shutdown(socket.SHUT_WR)  # both sides done: the relay ends
                report = json.loads(child.stdout.readline())
                child.wait(timeout=SOCKET_TIMEOUT)
            finally:
                if child.poll() is None:
                    child.kill()
    if report["downstream"] != total or report["ended_by"] != relay.BACKEND:
        raise RuntimeError(f"the relay reported {report}")
    return Sample(sample.seconds, report["cpu"], sample.other_cpu)


# ---------------------------------------------------------------------------------------------
# nginx mail: auth_http answers OK for every login and points at the backend; the backend plays
# just enough IMAP for nginx's login ("* OK", then "+" for each literal, then "<tag> OK")


def _auth_server(backend_port: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            for name, value in (
                ("Auth-Status", "OK"),
                ("Auth-Server", HOST),
                ("Auth-Port", str(backend_port)),
            ):
                self.send_header(name, value)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: one line per login would only add noise to the table."""

    return http.server.ThreadingHTTPServer((HOST, 0), Handler)


def _read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """One CRLF line, byte by byte so no relayed byte after it is consumed."""
    line = bytearray()
    while len(line) < limit and not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"EOF after {bytes(line)!r}")
        line += byte
    return bytes(line)


def _imap_backend_login(sock: socket.socket) -> None:
    sock.sendall(b"* OK bench backend ready\r\n")
    tag = b""
    for _ in range(8):  # LOGIN {n}, user {n}, password: three lines
        line = _read_line(sock)
        tag = tag or line.split(b" ", 1)[0]
        if line.rstrip().endswith(b"}"):
            sock.sendall(b"+ go ahead\r\n")
        else:
            sock.sendall(tag + b" OK LOGIN completed\r\n")
            return
    raise RuntimeError("nginx never finished its LOGIN")


@contextlib.contextmanager
def _nginx(proxy_buffer: str, auth_port: int) -> Iterator[tuple[int, int]]:
    """nginx's mail proxy as one process; yields (its IMAP port, its pid)."""
    folder = Path(tempfile.mkdtemp(prefix="relay-bench-nginx-"))
    with _listener() as probe:
        port = probe.getsockname()[1]
    (folder / "nginx.conf").write_text(
        f"load_module {NGINX_MAIL_MODULE};\n"
        f"daemon off; master_process off; worker_processes 1; pid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log warn;\n"
        "events { worker_connections 64; }\n"
        f"mail {{ server_name bench; auth_http {HOST}:{auth_port}/auth; proxy_buffer {proxy_buffer};\n"
        f"  server {{ listen {HOST}:{port}; protocol imap; }} }}\n"
    )
    command = ["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
    with subprocess.Popen(command) as nginx:
        try:
            for _ in range(300):  # up to 3 s for nginx to listen
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                    break
                if nginx.poll() is not None:
                    raise RuntimeError((folder / "error.log").read_text())
                time.sleep(0.01)
            yield port, nginx.pid
        finally:
            nginx.terminate()
            nginx.wait(timeout=SOCKET_TIMEOUT)
            shutil.rmtree(folder, ignore_errors=True)


def run_nginx(proxy_buffer: str, total: int) -> Sample:
    with _listener() as backend_listener:
        auth = _auth_server(backend_listener.getsockname()[1])
        threading.Thread(target=auth.serve_forever, daemon=True).start()
        try:
            with _nginx(proxy_buffer, auth.server_address[1]) as (port, pid), _connect(port) as client:
                _read_line(client)  # nginx's greeting (the one nginx's readiness probe got too)
                with ThreadPoolExecutor(1) as pool:
                    accepted = pool.submit(_accept, backend_listener)
                    client.sendall(b"a1 LOGIN bench secret\r\n")
                    backend = accepted.result(timeout=SOCKET_TIMEOUT)
                    _imap_backend_login(backend)
                if not _read_line(client).startswith(b"a1 OK"):
                    raise RuntimeError("nginx did not log in")
                with backend:
                    sample = _transfer(backend, client, total, lambda: _process_seconds(pid))
        finally:
            auth.shutdown()
            auth.server_close()
    return sample


# ---------------------------------------------------------------------------------------------


def _targets(pipe_kib: int) -> dict[str, Callable[[int], Sample]]:
    return {
        "direct": run_direct,
        "splice": functools.partial(run_mailgress, "splice", pipe_kib),
        "transports": functools.partial(run_mailgress, "transports", pipe_kib),
        "nginx-4k": functools.partial(run_nginx, "4k"),
        "nginx-64k": functools.partial(run_nginx, "64k"),
    }


def _report(total: int, samples: dict[str, list[Sample]]) -> None:
    """Print medians per target, with ratios against the direct link and against nginx."""
    rates = {name: total / MIB / statistics.median(s.seconds for s in runs) for name, runs in samples.items()}
    cpus = {
        name: statistics.median(s.proxy_cpu for s in runs if s.proxy_cpu is not None) * GIB / total
        for name, runs in samples.items()
        if name != "direct"
    }
    nginxes = [name for name in ("nginx-4k", "nginx-64k") if name in cpus]
    rounds = len(samples["direct"])
    print(f"{total // MIB} MiB backend -> client over loopback; median of {rounds} round(s)")
    header = ["target", "MiB/s", "vs direct", "CPU s/GiB", *(f"vs {name}" for name in nginxes), "other CPU s"]
    print(" ".join(f"{column:>12}" for column in header))
    for name, runs in samples.items():
        cpu = cpus.get(name)
        row = [
            name,
            f"{rates[name]:.0f}",
            f"{rates[name] / rates['direct']:.2f}",
            "-" if cpu is None else f"{cpu:.3f}",
            *("-" if cpu is None else f"{cpu / cpus[nginx]:.2f}" for nginx in nginxes),
            f"{statistics.median(s.other_cpu for s in runs):.2f}",
        ]
        print(" ".join(f"{column:>12}" for column in row))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=1024, help="MiB per transfer (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per target; the median is shown")
    parser.add_argument("--targets", nargs="+", choices=sorted(_targets(0)), default=list(_targets(0)))
    parser.add_argument(
        "--pipe-kib", type=int, default=relay.PIPE_SIZE // 1024, help="splice pipe size (default: relay's)"
    )
    parser.add_argument("--child", choices=["splice", "transports"], help=argparse.SUPPRESS)
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        proxy_child(args.child, args.backend_port, args.pipe_kib)
        return
    targets = ["direct", *(name for name in args.targets if name != "direct")]
    if not (NGINX_MAIL_MODULE.exists() and shutil.which("nginx")):
        targets = [name for name in targets if not name.startswith("nginx")]
        print("nginx or its mail module is missing: nginx targets skipped")
    total = args.mb * MIB
    runners = _targets(args.pipe_kib)
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name in targets:  # interleaved, so a slow spell on the machine hits every target alike
            samples[name].append(runners[name](total))
    _report(total, samples)


if __name__ == "__main__":
    main()
