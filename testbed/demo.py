"""``python -m testbed.demo`` (``make demo``): the testbed's mail servers with mailgress in front.

Starts the standard backends under run/demo/, puts a welcome message into every user's empty INBOX,
writes run/demo/proxy/mailgress.yaml (routes: examples/mailroutes.yaml; listeners on the README's
ports, or free ones with --free-ports), starts ``mailgress proxy`` and prints the users and
``curl``/``swaks`` lines to try. Ctrl-C, SIGTERM, SIGHUP or the proxy exiting stop everything it
started. Demo passwords are printed on purpose; they exist only on this loopback testbed.
"""

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed import backends, mailservers, messages, proxyprocess, proxysettings

REPOSITORY = Path(__file__).resolve().parent.parent
DEMO_DIRECTORY = REPOSITORY / "run" / "demo"
EXAMPLE_ROUTES = REPOSITORY / "examples" / "mailroutes.yaml"
# The ports of the README's settings example, so its commands work as written.
DEMO_PORTS = proxysettings.ProxyPorts(imap=1143, pop3=1110, submission=1587, smtp=1025, admin=9901)
# The last line the demo prints once everything runs (tests wait for it).
READY_LINE = "Ctrl-C stops everything."
# How often the demo checks that the proxy is still alive while waiting for Ctrl-C.
WATCH_INTERVAL = 0.5


def welcome_message(address: str) -> bytes:
    body = f"Hello {address},\n\nthis message was fetched through mailgress.\n"
    return messages.compose("postmaster@alpha.example", address, "Welcome to the mailgress demo", body)


def try_lines(bed: backends.Backends, ports: proxysettings.ProxyPorts) -> str:
    alice = bed.user("alice@alpha.example")
    bob = bed.user("bob@beta.example")
    login = shlex.quote(f"{alice.address}:{alice.password}")
    host = mailservers.LOOPBACK
    return "\n".join(
        [
            "Try (the proxy routes alice to Dovecot alpha, bob to Dovecot beta):",
            f"  curl --user {login} 'imap://{host}:{ports.imap}/INBOX' --request 'EXAMINE INBOX'",
            f"  curl --user {login} 'imap://{host}:{ports.imap}/INBOX;UID=1'",
            f"  curl --user {login} 'pop3://{host}:{ports.pop3}/1'",
            f"  swaks --server {host}:{ports.submission} --auth PLAIN --auth-user {alice.address} "
            f"--auth-password {shlex.quote(alice.password)} --from {alice.address} --to {bob.address}",
            f"  swaks --server {host}:{ports.smtp} --from someone@example.net --to {bob.address}",
            f"  curl http://{host}:{ports.admin}/metrics",
        ]
    )


def run(directory: Path, ports: proxysettings.ProxyPorts) -> int:
    bed = backends.Backends(directory / "backends")
    with bed:
        for address in backends.standard_addresses():
            if not bed.maildir(address).messages():
                bed.deliver(address, welcome_message(address))
        settings = bed.write_proxy_settings(directory / "proxy", ports=ports, route_files=[EXAMPLE_ROUTES])
        proxy = proxyprocess.ProxyProcess(settings, directory / "proxy" / "mailgress.log")
        with proxy:
            print(bed.describe())
            print(f"mailgress proxy: settings {settings.path}, log {proxy.log_path}")
            print(
                f"  IMAP {ports.imap}, POP3 {ports.pop3}, submission {ports.submission}, "
                f"MX {ports.smtp}, admin http://{mailservers.LOOPBACK}:{ports.admin}/"
            )
            print(try_lines(bed, ports))
            print(READY_LINE, flush=True)
            try:
                while proxy.returncode is None:
                    time.sleep(WATCH_INTERVAL)
            except KeyboardInterrupt:
                print("\nstopping...", flush=True)
                return 0
            print(
                f"mailgress proxy exited with status {proxy.returncode}:\n{proxy.log_tail()}", file=sys.stderr
            )
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, default=DEMO_DIRECTORY, help="where everything lives")
    parser.add_argument("--free-ports", action="store_true", help="not the README's ports, free ones")
    arguments = parser.parse_args(argv)
    # Whatever ends the demo, the servers it started must be stopped: turn the usual termination
    # signals into the KeyboardInterrupt that unwinds the context managers.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    ports = proxysettings.ProxyPorts.free() if arguments.free_ports else DEMO_PORTS
    try:
        return run(arguments.directory.resolve(), ports)
    except mailservers.MailServerError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
