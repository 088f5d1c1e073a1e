"""How ``mailgress controller`` ends when the operator stopped on an error (controller.operator's
OperatorError): exit status EXIT_RESTART and one error line that says what failed, that the
proxies keep serving their tables and that the controller exits to be restarted, never a
traceback (kopf's own records of the failed tasks become debug lines); the handlers' giving up
ends kopf's run as such an error. The operator exits so against the emulator in
tests/kube/test_watch_error.py and tests/kube/test_discovery_gap.py."""

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from controller import operator
from proxy.server.connections import Guard
from tests.controller.test_operator import arguments, load_certificates

FAILURE = "Error in the watch-stream: {'code': 500, 'reason': 'InternalError'}"


async def failing_run(settings: operator.Settings, **_: object) -> None:
    raise operator.OperatorError(f"the operator stopped on an error: {FAILURE}")


def test_an_operator_error_exits_for_a_restart_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("the-token\n")
    monkeypatch.setattr(operator, "run", failing_run)
    # ``command`` filters the root logger's handlers, here pytest's: theirs again after the test.
    for handler in logging.getLogger().handlers:
        monkeypatch.setattr(handler, "filters", list(handler.filters))
    flags = arguments(f"--token-file={token}")
    assert operator.command(flags, certificates=load_certificates, guards=Guard) == operator.EXIT_RESTART
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert (record.name, record.levelno, record.exc_info) == (operator.__name__, logging.ERROR, None)
    assert record.getMessage() == (
        f"the operator stopped on an error: {FAILURE}; the proxies keep serving their tables; "
        "the controller exits to be restarted"
    )


def failed_task_record(name: str, message: str, error: Exception) -> logging.LogRecord:
    try:
        raise error
    except Exception:
        exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, (), exc_info)


def test_kopfs_records_of_the_failed_tasks_become_debug_lines() -> None:
    error = RuntimeError(FAILURE)
    failed = failed_task_record(
        "kopf._core.reactor.running", f"Multidimensional multitasker has failed: {error}", error
    )
    kept = operator._fatal_failures_at_debug(failed)
    assert (failed.levelno, failed.levelname, failed.exc_info, failed.exc_text) == (
        logging.DEBUG,
        "DEBUG",
        None,
        None,
    )
    assert kept == logging.getLogger(failed.name).isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("kopf.objects", "Handler 'mailroute_changed' failed with an exception. Will retry."),
        ("controller.reconciler", f"publishing has failed: {FAILURE}"),
    ],
    ids=["a-handler-error-of-kopfs", "not-kopfs"],
)
def test_any_other_error_record_keeps_its_level_and_traceback(name: str, message: str) -> None:
    record = failed_task_record(name, message, RuntimeError(FAILURE))
    assert operator._fatal_failures_at_debug(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_the_handlers_giving_up_fails_a_root_task_with_the_reason() -> None:
    reason: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    given_up = asyncio.create_task(operator._given_up(reason))
    await asyncio.sleep(0)
    assert not given_up.done(), "it waits for the handlers"
    reason.set_result("objects are missing")
    with pytest.raises(operator.OperatorError) as raised:
        await given_up
    assert str(raised.value) == "the handlers gave up: objects are missing"
