"""The rules for engine deaths (tasks/rows/triage.py), on row keys alone: the pipeline's use of
them, on an engine that dies, is in tests/tasks/rows/test_pipeline.py and
tests/flows/test_engine_death.py."""

from __future__ import annotations

from thinkbatch.tasks.rows.triage import Triage, Verdict

CAUSE = "RuntimeError: poisoned"


def test_deaths_of_other_rows_resubmit_them_up_to_max_restarts_then_stop() -> None:
    triage = Triage(max_restarts=2)
    assert triage.died(["a", "b"], CAUSE) == Verdict()  # every row again
    triage.finished()
    assert triage.died(["c", "d"], CAUSE) == Verdict()  # not the same rows: no suspects
    stop = triage.died(["e"], CAUSE, waiting=2).stop
    assert stop == (f"the engine died 3 times ({CAUSE}); 3 rows in flight were not written, "
                    "a rerun of the same job resumes them")


def test_no_restarts_stops_at_the_first_death() -> None:
    stop = Triage(max_restarts=0).died(["a", "b"], CAUSE).stop
    assert stop is not None and stop.startswith(f"the engine died once ({CAUSE}); 2 rows")


def test_the_row_that_kills_the_engine_each_time_is_found_by_halves() -> None:
    """A second death with rows that were in flight at the first: halves of them run
    alone; a death keeps the half, a clean finish the other half."""
    rows = [f"r{i}" for i in range(8)]
    triage = Triage(max_restarts=2)
    assert triage.died(rows, CAUSE) == Verdict()
    assert triage.died(rows, CAUSE) == Verdict(run=rows[:4])  # r5 is in the other half
    triage.finished()
    assert triage.trial_passed() == rows[4:6]
    assert triage.died(rows[4:6], CAUSE) == Verdict(run=["r4"])
    assert triage.trial_passed() == ["r5"]
    assert triage.died(["r5"], CAUSE) == Verdict(blame="r5")
    assert not triage.searching and triage.blamed == ["r5"]
    assert triage.deaths == 4 and triage.unblamed == 1  # the search's deaths are free
    triage.finished()  # the other rows run again and finish: the job goes on
    assert triage.died(["x"], CAUSE) == Verdict()  # a new death, with the budget left


def test_a_row_alone_in_the_engine_twice_is_blamed_at_once() -> None:
    triage = Triage(max_restarts=2)
    assert triage.died(["a"], CAUSE) == Verdict()
    assert triage.died(["a"], CAUSE) == Verdict(blame="a")


def test_a_search_that_blames_no_row_counts_as_one_death() -> None:
    triage = Triage(max_restarts=1)
    triage.died(["a", "b"], CAUSE)
    assert triage.died(["a", "b"], CAUSE) == Verdict(run=["a"])
    assert triage.trial_passed() == ["b"]
    assert triage.trial_passed() is None  # each ran alone and finished: a combination
    assert not triage.searching and triage.unblamed == 2
    assert triage.died(["c"], CAUSE).stop is not None  # over the budget of 1


def test_a_death_after_a_blame_before_any_row_finished_stops_the_job() -> None:
    """Every request kills the engine: one row alone did, and the next ones do too."""
    triage = Triage(max_restarts=2)
    triage.died(["a"], CAUSE)
    assert triage.died(["a"], CAUSE) == Verdict(blame="a")
    stop = triage.died(["b", "c"], CAUSE).stop
    assert stop is not None and "every request seems to kill it" in stop
    assert "a rerun dies the same way until the cause is fixed" in stop
    assert "resumes them" not in stop  # no promise that a rerun helps
    assert stop.count(CAUSE) == 1
