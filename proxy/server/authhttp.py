"""Ask a route's auth_http service about one login attempt, as nginx's mail module does.

Called by ``backends.login`` for routes with auth mode ``http``. One fresh connection per
request, ``GET`` over HTTP/1.0, everything (resolving the name, connecting, sending, reading
the reply's header) under the route's timeout; ``Auth-Status: WAIT`` repeats the request after
``Auth-Wait`` seconds, a refusal with ``Auth-Wait`` is held back that long. An auth service that
is down, slow or answers garbage is ``Unavailable``, never a login. Never logs and never puts
into an exception or a result any request or reply header: the request carries the password.

Why raw asyncio streams and not aiohttp: aiohttp can send nginx's request byte for byte (with
``skip_auto_headers``, a Host override, HTTP/1.0 and a closing connector), but it cannot read a
reply as nginx does. It refuses a reply without a status line, which nginx accepts; it accepts
header names nginx refuses (``Auth_Status``), so a reply nginx rejects would log a user in here;
and it has no bound on the whole header (nginx: 1024 bytes), only per line. The grammar lives
in ``proxy.protocols.authhttp``; this module only moves its bytes.
"""

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.protocols import authhttp

# Auth-Status: WAIT asks for the same request again; nginx repeats it for ever. nginx's docs ask
# auth services to stop after 10-20 attempts (each costs memory until the session ends), so a
# service that keeps answering WAIT past this is treated as out of order.
MAX_WAIT_ROUNDS = 20

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The auth service could not give a verdict; ``reason`` is for the log (no header values)."""

    reason: str


Outcome = authhttp.Granted | authhttp.Refused | Unavailable


def tls_facts(connection: ssl.SSLObject | None) -> authhttp.TlsFacts | None:
    """What Auth-SSL-Protocol and Auth-SSL-Cipher say about a client connection (None: no TLS)."""
    if connection is None:
        return None
    cipher = connection.cipher()
    version = connection.version()
    if cipher is None or version is None:  # no handshake yet: the session never asks then
        return None
    return authhttp.TlsFacts(protocol=version, cipher=cipher[0])


async def authorize(
    target: authhttp.Service,
    attempt: authhttp.Attempt,
    *,
    timeout: float,
    tls: ssl.SSLContext,
    max_wait: float,
    sleep: Sleep = asyncio.sleep,
) -> Outcome:
    """Ask ``target`` about ``attempt`` until it grants or refuses the login.

    Args:
        timeout: for each request, from resolving the service's name to the end of its reply.
        tls: verifies an ``https://`` service (mailgress extension; nginx speaks plain HTTP).
        max_wait: the most this login may spend waiting on ``Auth-Wait`` in total; a service
            asking for more is cut short, and a WAIT beyond it makes the service Unavailable.
        sleep: how to wait (tests pass a recorder).

    Returns:
        Granted, Refused (after its ``Auth-Wait``), or Unavailable. Never raises for network
        trouble or a bad reply.
    """
    request = authhttp.build_request(target, attempt)
    budget = max_wait
    for _ in range(MAX_WAIT_ROUNDS + 1):
        try:
            async with asyncio.timeout(timeout):
                verdict = await _exchange(target, request, attempt, tls)
        except TimeoutError:
            return Unavailable(f"no reply within {timeout:g} s")
        except (OSError, ssl.SSLError) as error:
            return Unavailable(f"unreachable ({error.strerror or type(error).__name__})")
        except UnicodeError:  # a host name the resolver cannot encode (IDNA: a label over 63)
            return Unavailable("unreachable (invalid host name)")
        match verdict:
            case authhttp.Granted():
                return verdict
            case authhttp.Refused(wait=wait):
                if wait:
                    await sleep(min(wait, budget))
                return verdict
            case authhttp.TryAgain(wait=wait):
                if wait > budget:
                    return Unavailable(f"the service asks to wait past the {max_wait:g} s a login may wait")
                budget -= wait
                if wait:
                    await sleep(wait)
            case authhttp.Invalid(reason=reason):
                return Unavailable(reason)
    return Unavailable("the service kept answering Auth-Status: WAIT")


async def _exchange(
    target: authhttp.Service, request: authhttp.Request, attempt: authhttp.Attempt, tls: ssl.SSLContext
) -> authhttp.Verdict:
    """Send one request on a fresh connection and read the reply up to the end of its header."""
    secure = target.scheme == "https"
    reader, writer = await asyncio.open_connection(
        target.host,
        target.port,
        ssl=tls if secure else None,
        server_hostname=target.host if secure else None,
    )
    try:
        writer.write(request.data)
        await writer.drain()
        head = b""
        # Each round adds at least one byte, and parse_response gives a verdict (Invalid at
        # worst) once MAX_RESPONSE_HEAD bytes are in: at most that many rounds.
        while (verdict := authhttp.parse_response(head, attempt.request)) is None:
            chunk = await reader.read(authhttp.MAX_RESPONSE_HEAD - len(head))
            if not chunk:
                return authhttp.Invalid("the service closed the connection before the end of its header")
            head += chunk
        return verdict
    finally:
        writer.close()  # HTTP/1.0 without keep-alive: one request per connection, as nginx
