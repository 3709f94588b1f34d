"""A scale-out worker's heartbeat and what the parent does with it (store/heartbeat.py):
a worker still loading its model is left alone, one whose heartbeat stopped is presumed
dead, one that never claimed a shard is cancelled once none is left."""

from __future__ import annotations

import time
from pathlib import Path

from thinkbatch.tasks.store import heartbeat
from thinkbatch.tasks.store.heartbeat import Heartbeat
from thinkbatch.tasks.store.storage import Storage

TIMEOUT_S = 300.0


def test_a_worker_beats_while_it_runs_then_its_record_ages(tmp_path: Path) -> None:
    store, path = Storage(), str(tmp_path / "_workers" / "run.alive.json")
    with Heartbeat(store, path, timeout_s=0.5) as beat:  # a beat every 0.1 s
        record, _ = heartbeat.read(store, path)
        assert record["claimed"] == 0
        beat.claimed = 2
        time.sleep(0.5)
        record, age_s = heartbeat.read(store, path)
        assert record["claimed"] == 2 and age_s < 0.5
    time.sleep(0.6)
    record, age_s = heartbeat.read(store, path)
    assert record["claimed"] == 2 and age_s > 0.5  # no beat once it left


def test_a_worker_loading_for_minutes_is_waited_for_and_a_silent_one_is_presumed_dead() -> None:
    loading = ({"claimed": 1}, 10.0)  # beats while its engine loads
    assert heartbeat.verdict(loading, running_s=900, all_done=False, timeout_s=TIMEOUT_S) is None
    assert heartbeat.verdict(loading, running_s=900, all_done=True, timeout_s=TIMEOUT_S) is None
    action, why = heartbeat.verdict(({"claimed": 1}, 301.0), running_s=900, all_done=False,
                                    timeout_s=TIMEOUT_S)
    assert action == "crash" and "no heartbeat for 301 s" in why
    action, why = heartbeat.verdict(None, running_s=301, all_done=False, timeout_s=TIMEOUT_S)
    assert action == "crash" and "without a heartbeat" in why
    # Its infrastructure starting (an image pull): no sign of death while shards remain.
    assert heartbeat.verdict(None, running_s=None, all_done=False, timeout_s=TIMEOUT_S) is None


def test_a_worker_that_never_claimed_is_cancelled_once_every_shard_is_done() -> None:
    for beat in (None, ({"claimed": 0}, 5.0)):
        action, why = heartbeat.verdict(beat, running_s=None, all_done=True,
                                        timeout_s=TIMEOUT_S)
        assert action == "cancel" and "never claimed" in why
    assert heartbeat.verdict(({"claimed": 0}, 5.0), running_s=60, all_done=False,
                             timeout_s=TIMEOUT_S) is None
