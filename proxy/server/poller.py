"""One epoll of the process's own per event loop, for sockets that must not be watched through
the loop's ``add_reader``: the spliced relays' sockets (relay.py) and the login dialogues'
(channel.py, backends.py).

Why not the loop's readers: uvloop (libuv) stops watching a socket for good once it has
reported an error condition on it, with the callback run once, so a peer whose last bytes and
reset arrive together would leave a relay or a waiting read hanging until a timeout; and uvloop
builds and tears down a poll handle for every socket it starts and stops watching (several
system calls and about 600 bytes each). Here readiness and errors are reported level-triggered
for as long as they last, a change is one ``epoll_ctl``, and a watched socket costs a dict entry.
The loop watches only the epoll descriptor. Nothing here reads, writes or closes a socket.
"""

import asyncio
import contextlib
import select
from collections.abc import Callable

# Readiness events the poller takes from its epoll per wakeup of the loop; more wait for the next
# iteration (the epoll descriptor stays readable), so one busy moment cannot hold up the loop.
EVENTS_PER_WAKEUP = 64


class Poller:
    """The epoll of one event loop (module docstring), shared by whoever holds it.

    Relays and login dialogues hold it while they watch sockets, and the listeners while they
    accept (listeners.py): at a low session rate sessions rarely overlap, and a poller made and
    closed per session would cost more system calls than it saves.
    """

    __slots__ = ("epoll", "loop", "users", "watchers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.users = 0  # holders: relays, login dialogues, listeners
        self.watchers: dict[int, list[Callable[[], None] | None]] = {}  # fd -> [reader, writer]
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    @staticmethod
    def acquire(loop: asyncio.AbstractEventLoop) -> "Poller":
        poller = _pollers.get(loop)
        if poller is None:
            poller = _pollers[loop] = Poller(loop)
        poller.users += 1
        return poller

    def release(self) -> None:
        """A holder is done with the poller (none of its sockets is watched any more): the last
        one closes it, so a loop without listeners or relays keeps no epoll and no registration."""
        self.users -= 1
        if not self.users:
            del _pollers[self.loop]
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._watch(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._watch(fd, 1, None)

    def _watch(self, fd: int, which: int, callback: Callable[[], None] | None) -> None:
        entry = self.watchers.get(fd)
        if entry is None:
            if callback is not None:
                entry = self.watchers[fd] = [None, None]
                entry[which] = callback
                self.epoll.register(fd, _event_mask(entry))
            return
        entry[which] = callback
        mask = _event_mask(entry)
        if mask:
            self.epoll.modify(fd, mask)
        else:
            del self.watchers[fd]
            # A descriptor closed behind its holder's back has left the epoll with the close.
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)

    def _dispatch(self) -> None:
        for fd, events in self.epoll.poll(0, EVENTS_PER_WAKEUP):
            # Each lookup is fresh: an earlier callback may have changed or ended any watch.
            entry = self.watchers.get(fd)
            if entry is not None and entry[0] is not None and events & _READ_EVENTS:
                self._run(entry[0])
            entry = self.watchers.get(fd)
            if entry is not None and entry[1] is not None and events & _WRITE_EVENTS:
                self._run(entry[1])

    def _run(self, callback: Callable[[], None]) -> None:
        # As the loop isolates its own callbacks: a bug in one relay leaves the others running.
        try:
            callback()
        except Exception as error:
            self.loop.call_exception_handler({"message": "spliced relay callback failed", "exception": error})


# Errors and hang-ups wake whichever callbacks are registered: their next system call meets them.
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_pollers: dict[asyncio.AbstractEventLoop, Poller] = {}


def _event_mask(entry: list[Callable[[], None] | None]) -> int:
    return (select.EPOLLIN if entry[0] is not None else 0) | (select.EPOLLOUT if entry[1] is not None else 0)
