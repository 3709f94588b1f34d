"""Stop signals (tasks/process/stop.py), delivered for real to this process's main thread."""

from __future__ import annotations

import os
import signal

import pytest

from thinkbatch.tasks.process.stop import Stopped, StopSignals


def test_a_signal_is_recorded_while_work_goes_on_then_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stopping:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopping.signum == signal.SIGTERM and stopping.requested
        with pytest.raises(Stopped) as second:  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert second.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interruptible_stretch_raises_at_once() -> None:
    with StopSignals() as stopping:
        with pytest.raises(Stopped) as stopped, stopping.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
    assert str(stopped.value) == "stopped by SIGINT; 0 rows committed"
    with StopSignals() as stopping:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stopped), stopping.interruptible():  # already asked to stop
            pass
