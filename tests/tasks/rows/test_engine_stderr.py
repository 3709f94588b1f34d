"""The engine processes' stderr (tasks/rows/engine_stderr.py): what the engine's
processes print reaches our stderr through a pipe, and the cause of a death is read from
it, the worker's own exception rather than the engine core's wrapping of it."""

from __future__ import annotations

import os
import time

from thinkbatch.tasks.rows.engine_stderr import EngineStderr, first_exception

OWN = "RuntimeError: poisoned request: refused"
WRAPPED = ("RuntimeError: Worker failed with error 'poisoned request: refused', please check "
           "the stack trace above for the root cause")


def _traceback(last: str, tag: str = "") -> str:
    return (f"{tag}Traceback (most recent call last):\n{tag}  File \"x.py\", line 1, in f\n"
            f"{tag}    raise\n{tag}{last}\n")


def test_the_first_exception_of_a_traceback_is_the_cause_and_a_process_tag_is_dropped() -> None:
    lines = ["INFO starting", *_traceback("ValueError: bad", "(EngineCore pid=7) ").splitlines(),
             *_traceback(WRAPPED).splitlines()]
    assert first_exception(lines) == "ValueError: bad"
    assert first_exception(["ERROR no traceback here"]) is None


def test_a_workers_exception_printed_before_the_last_step_came_back_is_still_the_cause(
        capfd) -> None:
    """The engine core runs a step ahead of its client: a step done before the worker
    failed can come back after the worker printed its traceback. Only the engine core's
    wrapping of it follows; the cause is the worker's own exception all the same."""
    stderr = EngineStderr()
    with stderr.inherited():
        os.write(2, _traceback(OWN).encode())  # the worker
        time.sleep(0.2)  # the copy thread reads it before the step below comes back
        since = time.monotonic()  # that step
        os.write(2, _traceback(WRAPPED).encode())  # the engine core, then it dies
    assert stderr.cause(since) == OWN
    assert OWN in capfd.readouterr().err  # passed through


def test_a_wrapped_exception_without_its_workers_traceback_is_kept_as_it_is() -> None:
    stderr = EngineStderr()
    with stderr.inherited():
        since = time.monotonic()
        os.write(2, _traceback(WRAPPED).encode())
    assert stderr.cause(since) == WRAPPED
