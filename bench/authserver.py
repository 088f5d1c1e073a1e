"""The auth_http service behind the benchmark's nginx, in a process of its own.

``AuthProcess`` forks the benchmark process once the round's mail servers run, and the child
serves ``testbed.authservice.AuthService`` with the testbed's own decisions
(``authservice.for_backends``: the right password gets ``Auth-Status: OK`` with the user's backend
and ``Auth-Pass``, as mailgress's routes decide) until it is told to stop. A process of its own,
in a session of its own, so its CPU is counted apart from the load generator's and its threads
never compete with the clients for one GIL. Binds 127.0.0.1 only and never logs a request.
"""

import multiprocessing
import os
import signal
from multiprocessing.connection import Connection

from testbed import authservice, backends, mailservers

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _serve(bed: backends.Backends, ready: Connection) -> None:
    """The child: serve until SIGTERM; the port goes to the parent through ``ready``."""
    os.setsid()
    decide = authservice.for_backends(bed)
    service = authservice.AuthService()

    def answer(received: authservice.Received) -> authservice.Reply:
        # The service keeps every request for tests to inspect; a benchmark's hundreds of
        # thousands would only grow this process.
        service.clear()
        return decide(received)

    service.answer = answer
    # Blocked before the service's threads exist, so they inherit the mask and sigwait gets it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    service.start()
    try:
        ready.send(service.port)
        signal.sigwait(_STOP_SIGNALS)
    finally:
        service.stop()


class AuthProcess:
    """The service as a forked child; ``start`` once the mail servers run (it serves their ports)."""

    def __init__(self, bed: backends.Backends) -> None:
        self._bed = bed
        self._process: multiprocessing.process.BaseProcess | None = None
        self.port = 0

    def start(self) -> None:
        # fork: the child gets the running Backends (ports, users, passwords) as they are, with
        # nothing pickled and no password on a command line or in a file.
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve, args=(self._bed, sender), name="bench-auth", daemon=True
        )
        self._process.start()
        sender.close()
        try:
            if not receiver.poll(START_TIMEOUT):
                raise mailservers.MailServerError("the benchmark's auth service did not start")
            self.port = int(receiver.recv())
        except BaseException:
            self.stop()
            raise
        finally:
            receiver.close()

    @property
    def url(self) -> str:
        return f"http://{mailservers.LOOPBACK}:{self.port}/auth"

    @property
    def session(self) -> int:
        """The child's pid, which is also its session id (it called setsid)."""
        if self._process is None or self._process.pid is None:
            raise mailservers.MailServerError("the auth service is not running")
        return self._process.pid

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.pid is not None and self._process.is_alive():
            os.kill(self._process.pid, signal.SIGTERM)
        self._process.join(STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(STOP_TIMEOUT)
        self._process = None
