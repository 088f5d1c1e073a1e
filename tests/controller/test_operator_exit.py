"""What lets controller.operator.run run kopf again after a run that ended on an error, or that
the handlers ended for a fresh scan of API discovery: the pause between runs ends early when the
controller is told to stop (its stop flag, or SIGTERM in the main thread, where kopf's own
handlers point at the run that ended), the controller's stop flag and a rescan request both stop
the current run, and the push channel calls the reconciler of the current run only."""

import asyncio
import os
import signal
import threading

from controller import operator
from tests.controller.test_reconciler import FakePublisher

# A pause no test waits out: each ends it early, or fails within WAIT_SECONDS.
LONG_PAUSE_SECONDS = 3600.0
WAIT_SECONDS = 30.0


async def test_a_pause_ends_when_the_threading_stop_flag_is_set() -> None:
    flag = threading.Event()
    flag.set()
    async with asyncio.timeout(WAIT_SECONDS):
        assert await operator._pause(LONG_PAUSE_SECONDS, flag)


async def test_a_pause_ends_when_the_asyncio_stop_flag_is_set() -> None:
    flag = asyncio.Event()
    asyncio.get_running_loop().call_soon(flag.set)
    async with asyncio.timeout(WAIT_SECONDS):
        assert await operator._pause(LONG_PAUSE_SECONDS, flag)


async def test_a_pause_not_told_to_stop_runs_out() -> None:
    assert not await operator._pause(0, threading.Event())
    assert not await operator._pause(0, None)


async def test_sigterm_during_a_pause_stops_and_the_handlers_go_with_it() -> None:
    assert threading.current_thread() is threading.main_thread()
    loop = asyncio.get_running_loop()
    loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(WAIT_SECONDS):
        assert await operator._pause(LONG_PAUSE_SECONDS, None)
    # Removed again: kopf's next run installs its own.
    assert not loop.remove_signal_handler(signal.SIGTERM)


async def test_the_controllers_stop_flag_stops_the_current_run() -> None:
    flag = threading.Event()
    run_stop = asyncio.Event()
    forwarding = asyncio.create_task(operator._forward_stop(flag, run_stop))
    flag.set()
    async with asyncio.timeout(WAIT_SECONDS):
        await run_stop.wait()
    await forwarding


async def test_a_rescan_stops_the_current_run_and_says_why_once() -> None:
    run_stop = operator._RunStop()
    run_stop.request_rescan("first")
    run_stop.request_rescan("second")
    assert (run_stop.flag.is_set(), run_stop.rescan) == (True, "first")


def test_the_channel_calls_the_callbacks_of_the_current_run_only() -> None:
    channel = FakePublisher()
    relay = operator.RunPublisher(channel)
    calls: list[str] = []
    relay.on_change(lambda: calls.append("first run"))
    relay.next_run()
    relay.on_change(lambda: calls.append("second run"))
    channel.ack("proxy-a", version="sha256:" + "0" * 64)
    assert calls == ["second run"]
    assert relay.acks() == channel.acks()
