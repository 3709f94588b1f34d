"""The row's path in-process: read -> render -> replay engine -> parse -> commit, without
Prefect or vLLM (tasks/rows/pipeline.py), on a local Parquet input and output.

The replay engine finishes a request the moment it is submitted; `ScriptedReplay` adds
the two things a real engine does that replay cannot: steps that take time, and requests
finished with "abort" or "error".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import ROW_TIME_NAMES
from thinkbatch.schemas.plan import Plan
from thinkbatch.schemas.record import Generation, RowRequest
from thinkbatch.tasks import runner
from thinkbatch.tasks.report import trace
from thinkbatch.tasks.rows import pipeline as pipeline_module
from thinkbatch.tasks.rows.engine import EngineDied, ReplayEngine
from thinkbatch.tasks.rows.in_flight import Backlog
from thinkbatch.tasks.rows.pipeline import Pipeline
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.commit import FencedOut
from thinkbatch.tasks.store.layout import OutputLayout

WAIT_S = 10  # a bound on waiting for a future, never reached when the pipeline works


class ScriptedReplay(ReplayEngine):
    """Replay with what a real engine adds: each step takes `step_s`, and the rows in
    `finish` end as vLLM ends a request it gave up on."""

    def __init__(self, job: JobSpec, step_s: float = 0.0, finish: dict[int, str] | None = None):
        super().__init__(job.engine)
        self.step_s = step_s
        self.finish = finish or {}
        self._rows: dict[str, int] = {}

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        super().submit(key, req, params)
        self._rows[key] = req.row_index

    def poll(self) -> list[Generation]:
        if self.in_flight and self.step_s:
            time.sleep(self.step_s)
        done = super().poll()
        for gen in done:
            gen.finish_reason = self.finish.get(self._rows.pop(gen.key), gen.finish_reason)
        return done


class LastingReplay(ReplayEngine):
    """Replay whose requests stay in the engine for `polls` steps of 5 ms, as a real
    engine's do for many steps; `held` is how many it held at each step."""

    def __init__(self, job: JobSpec, polls: int):
        super().__init__(job.engine)
        self.polls = polls
        self.held: list[int] = []
        self._age: dict[str, int] = {}
        self._waiting: list[Generation] = []

    @property
    def in_flight(self) -> int:
        return super().in_flight + len(self._waiting)

    def abort(self, keys: Any) -> None:
        drop = set(keys)
        super().abort(drop)
        self._waiting = [g for g in self._waiting if g.key not in drop]

    def poll(self) -> list[Generation]:
        time.sleep(0.005)
        self._waiting += super().poll()
        self.held.append(len(self._waiting))
        for gen in self._waiting:
            self._age[gen.key] = self._age.get(gen.key, 0) + 1
        done = [g for g in self._waiting if self._age[g.key] >= self.polls]
        self._waiting = [g for g in self._waiting if self._age[g.key] < self.polls]
        return done

    @property
    def waiting(self) -> list[Generation]:
        return list(self._waiting)


def _rows(n: int) -> list[dict[str, Any]]:
    """Prompts whose stored completion (the replay column) is `answer <i>`."""
    return [{**r, "raw_text": f"answer {i}"} for i, r in enumerate(prompt_rows(n))]


def _job(tmp_path: Path, rows: list[dict[str, Any]], **output: Any) -> JobSpec:
    """A replay job over `rows`; `rows_per_shard` and `max_in_flight` in `output` go to
    their sections."""
    write_prompts(tmp_path / "in.parquet", rows)
    return load_job(inline={
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id",
                  "passthrough_columns": ["topic"]},
        "shards": {"rows_per_shard": output.pop("rows_per_shard", 50)},
        "engine": {"kind": "replay", "max_in_flight": output.pop("max_in_flight", 512)},
        "output": {"path": str(tmp_path / "out"), "flush_seconds": 60, **output},
    })


def _plan(job: JobSpec) -> tuple[OutputLayout, Plan]:
    """Planned and opened by the runner, as a run's are."""
    layout = runner.output(job)
    plan, _ = runner.plan(job, layout)
    return layout, plan


def _pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, engine: ReplayEngine | None = None,
              may_commit: Callable[[int], bool] = lambda shard_id: True,
              restart_engine: Callable[[Any], Any] | None = None, **kw: Any) -> Pipeline:
    """The runner's pipeline; the engine, its restart and the claim check are the test's."""
    return _opened(job, layout, plan, engine, may_commit, restart_engine, **kw).pipeline


def _opened(job: JobSpec, layout: OutputLayout, plan: Plan, engine: ReplayEngine | None = None,
            may_commit: Callable[[int], bool] = lambda shard_id: True,
            restart_engine: Callable[[Any], Any] | None = None, **kw: Any) -> runner.Opened:
    return runner.open_pipeline(job, layout, plan, may_commit=may_commit,
                                engine=engine or ReplayEngine(job.engine),
                                restart=restart_engine, **kw)


def _run(pipe: Pipeline, *shard_ids: int) -> list[ShardStats]:
    futures = [pipe.submit_shard(s) for s in shard_ids]
    stats = [f.result(timeout=WAIT_S) for f in futures]
    pipe.close()
    return stats


def _parts(layout: OutputLayout, shard_id: int) -> dict[str, list[dict[str, Any]]]:
    """The shard's committed parts: name -> rows."""
    return {p.rsplit("/", 1)[-1]: layout.store.open_parquet(p).read().to_pylist()
            for p in layout.parts_of(shard_id)}


def _indices(parts: dict[str, list[dict[str, Any]]]) -> list[list[int]]:
    """Each part's row indices, parts in row order."""
    return sorted([r["row_index"] for r in rows] for rows in parts.values())


class ClaimLost:
    """A claim check that holds for the first `keep` commits of this run, then fails: the
    run lost its claim (a pause past claim_ttl_s) and another worker took the shard."""

    def __init__(self, keep: int):
        self.keep = keep
        self.asked: list[int] = []

    def __call__(self, shard_id: int) -> bool:
        self.asked.append(shard_id)
        return len(self.asked) <= self.keep


@pytest.fixture
def quick_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed commit waits STOP_GRACE_S for a stop signal before failing the shards."""
    monkeypatch.setattr(pipeline_module, "STOP_GRACE_S", 0.05)


def test_shards_complete_with_every_row_its_status_and_a_marker_of_their_parts(
        tmp_path: Path) -> None:
    rows = _rows(8)
    rows[2]["raw_text"] = ""  # a completion with nothing in it
    rows[6]["prompt"] = None  # never becomes a request
    job = _job(tmp_path, rows, rows_per_shard=5)
    layout, plan = _plan(job)
    opened = _opened(job, layout, plan)
    pipe = opened.pipeline

    stats = _run(pipe, 0, 1)

    assert [s.rows for s in stats] == [5, 3]
    assert stats[0].status == {"ok": 4, "no_answer": 1}
    assert stats[1].status == {"ok": 2, "invalid_input": 1}
    assert pipe.submitted == 7 and pipe.committed == 8 and opened.progress.rows == 8
    for shard_id, shard_stats in enumerate(stats):
        marker = json.loads(layout.store.read_bytes(layout.done_marker(shard_id)))
        committed_at = marker.pop("committed_at")
        assert marker == {"rows": shard_stats.rows, "status": shard_stats.status,
                          "prompt_tokens": 0, "completion_tokens": 0,
                          "parts": sorted(_parts(layout, shard_id))}
        assert sorted(committed_at) == marker["parts"]
        assert all(time.time() - 60 < t <= time.time() for t in committed_at.values())
    assert checkpoint.done_shards(layout) == {0, 1}
    out = {r["row_index"]: r for s in (0, 1) for part in _parts(layout, s).values() for r in part}
    assert sorted(out) == list(range(8))
    assert out[0] | {"ttft_s": None} == {
        "id": "q00000", "row_index": 0, "sample_index": 0, "topic": "math",
        "reasoning": None, "answer": "answer 0", "tool_calls": None, "finish_reason": "stop",
        "status": "ok", "error": None, "prompt_tokens": None, "completion_tokens": None,
        "reasoning_tokens": None, "ttft_s": None, "latency_s": None, "started_at": None,
        "finished_at": None, "worker": None, "chat_template_kwargs": None, "raw_text": None}
    assert (out[2]["status"], out[2]["answer"]) == ("no_answer", None)
    assert (out[6]["status"], out[6]["error"], out[6]["finish_reason"]) == (
        "invalid_input", "prompt is null or empty", None)
    assert out[7]["id"] == "q00007" and out[7]["topic"] == "weather"


def test_an_output_planned_before_rows_kept_their_times_resumes_without_them(
        tmp_path: Path) -> None:
    """Its parts lack started_at, finished_at and worker: a resumed run's parts must too,
    so every part of it has one schema (and a shard's parts can be compacted)."""
    job = _job(tmp_path, _rows(6), rows_per_shard=3)
    layout, plan = _plan(job)
    assert plan.row_times
    layout.store.write_atomic(layout.plan, plan.model_dump_json(exclude={"row_times"}).encode())
    _, older = _plan(job)  # resumed from the stored plan
    _run(_pipeline(job, layout, older), 0)
    _run(_pipeline(job, layout, plan), 1)

    def columns(shard_id: int) -> set[str]:
        (part,) = layout.parts_of(shard_id)
        return set(layout.store.open_parquet(part).schema_arrow.names)

    assert not older.row_times and columns(1) - columns(0) == ROW_TIME_NAMES


def test_flush_rows_cuts_parts_of_that_many_rows(tmp_path: Path) -> None:
    """One request at a time: a part every 3 rows, the shard's last row in a part of its
    own when the shard completes; no part waits for flush_seconds (60 s)."""
    job = _job(tmp_path, _rows(10), flush_rows=3, max_in_flight=1)
    layout, plan = _plan(job)

    (stats,) = _run(_pipeline(job, layout, plan), 0)

    parts = _parts(layout, 0)
    assert _indices(parts) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert stats.parts == sorted(parts)


def test_flush_seconds_commits_rows_that_trickle_in_before_flush_rows(tmp_path: Path) -> None:
    """A row every 30 ms, flush_seconds 50 ms, flush_rows 1000: parts of one or two rows,
    each committed while the shard still generates; without the time flush the shard
    would be one part of 6."""
    job = _job(tmp_path, _rows(6), flush_rows=1000, flush_seconds=0.05, max_in_flight=1)
    layout, plan = _plan(job)
    commits: list[int] = []
    pipe = _pipeline(job, layout, plan, ScriptedReplay(job, step_s=0.03))
    pipe.committer.on_commit = lambda shard_id, rows: commits.append(rows)

    _run(pipe, 0)

    parts = _parts(layout, 0)
    assert len(parts) >= 3 and all(1 <= len(rows) <= 2 for rows in parts.values()), parts
    assert sorted(i for part in _indices(parts) for i in part) == list(range(6))
    assert sum(commits) == 6 and len(commits) == len(parts)


def test_a_request_the_engine_gives_up_on_is_an_engine_error_row(tmp_path: Path) -> None:
    job = _job(tmp_path, _rows(5))
    layout, plan = _plan(job)
    engine = ScriptedReplay(job, finish={1: "abort", 3: "error"})

    (stats,) = _run(_pipeline(job, layout, plan, engine), 0)

    assert stats.status == {"ok": 3, "engine_error": 2}
    rows = {r["row_index"]: r for part in _parts(layout, 0).values() for r in part}
    for i, reason in ((1, "abort"), (3, "error")):
        assert {k: rows[i][k] for k in ("status", "finish_reason", "error", "answer")} == {
            "status": "engine_error", "finish_reason": reason, "answer": None,
            "error": f"engine finished the request with {reason}"}
    assert [rows[i]["answer"] for i in (0, 2, 4)] == ["answer 0", "answer 2", "answer 4"]


def test_a_fenced_out_run_commits_nothing_and_fails_its_shard(tmp_path: Path) -> None:
    job = _job(tmp_path, _rows(5))
    layout, plan = _plan(job)
    claim = ClaimLost(keep=0)
    pipe = _pipeline(job, layout, plan, may_commit=claim)

    done = pipe.submit_shard(0)

    with pytest.raises(FencedOut, match="lost the claim on shard 0; not committing"):
        done.result(timeout=WAIT_S)
    pipe.close()  # that shard only is given up: the pipeline itself has not failed
    assert claim.asked == [0]  # asked once, before the part; never for the marker
    assert _parts(layout, 0) == {} and checkpoint.done_shards(layout) == set()


def test_a_shard_taken_over_is_dropped_and_the_workers_other_shards_go_on(
        tmp_path: Path) -> None:
    """A worker paused past its claim TTL loses one shard: that shard's requests leave
    the engine and nothing more of it is written; its other shards finish as if nothing
    happened (the whole pipeline failed before, and every shard's rows in flight with it).
    Shard 1's claim is found lost at its first commit, while its last 5 rows generate."""
    job = _job(tmp_path, _rows(30), rows_per_shard=10, max_in_flight=15, flush_rows=1)
    layout, plan = _plan(job)
    engine = LastingReplay(job, polls=100)
    aborted: list[str] = []
    abort = engine.abort
    engine.abort = lambda keys: (aborted.extend(keys), abort(keys))[1]  # type: ignore[method-assign]
    checked = threading.Event()

    def may_commit(shard_id: int) -> bool:
        return shard_id != 1 or not checked.wait(WAIT_S)

    pipe = _pipeline(job, layout, plan, engine, may_commit=may_commit)
    futures = [pipe.submit_shard(s) for s in range(3)]
    deadline = time.monotonic() + WAIT_S
    while not {15, 19} <= {int(g.key.split(":")[0]) for g in engine.waiting}:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    checked.set()

    with pytest.raises(FencedOut, match="lost the claim on shard 1"):
        futures[1].result(timeout=WAIT_S)
    assert [f.result(timeout=WAIT_S).rows for f in (futures[0], futures[2])] == [10, 10]
    pipe.close()
    assert checkpoint.done_shards(layout) == {0, 2} and _parts(layout, 1) == {}
    assert sorted(int(k.split(":")[0]) for k in aborted) == [15, 16, 17, 18, 19]


def test_a_rerun_skips_committed_rows_and_a_done_shard_gets_its_marker(
        tmp_path: Path, quick_failure: None) -> None:
    """The first run loses its claim after its first part; the next run generates only
    the other rows. A run that finds every row committed but no marker only marks it."""
    job = _job(tmp_path, _rows(6), flush_rows=2, max_in_flight=2)
    layout, plan = _plan(job)
    first = _pipeline(job, layout, plan, may_commit=ClaimLost(keep=1))
    with pytest.raises(FencedOut, match="lost the claim on shard 0"):
        first.submit_shard(0).result(timeout=WAIT_S)
    first.close()
    (kept,) = _parts(layout, 0)
    assert _indices(_parts(layout, 0)) == [[0, 1]]
    assert checkpoint.done_shards(layout) == set()

    second = _pipeline(job, layout, plan)
    (stats,) = _run(second, 0)

    assert second.submitted == 4 and second.committed == 4
    parts = _parts(layout, 0)
    assert kept in parts and stats.parts == sorted(parts) and stats.rows == 6
    assert _indices(parts) == [[0, 1], [2, 3], [4, 5]]

    layout.store.delete(layout.done_marker(0))  # a crash between the last part and the marker
    third = _pipeline(job, layout, plan)
    unknown = stats.model_copy(update={"committed_at": None})  # times died with the crash
    assert _run(third, 0) == [unknown]
    assert third.submitted == 0 and checkpoint.done_stats(layout, 0) == unknown


def test_a_zombies_part_that_slipped_in_is_compacted_away_when_the_shard_is_done(
        tmp_path: Path, quick_failure: None) -> None:
    """The owner generates the shard; a zombie (a worker that lost its claim but had
    checked it just before) commits the same rows before the owner's first commit. The
    owner's marker lists one part holding each row once; the other parts are gone."""
    job = _job(tmp_path, _rows(6))
    layout, plan = _plan(job)
    owner_committing, zombie_done = threading.Event(), threading.Event()

    def owner_claim(shard_id: int) -> bool:
        owner_committing.set()
        return zombie_done.wait(WAIT_S)

    owner = _pipeline(job, layout, plan, may_commit=owner_claim)
    owned = owner.submit_shard(0)
    assert owner_committing.wait(WAIT_S)  # the owner's rows are generated, not yet written
    zombie = _pipeline(job, layout, plan, may_commit=ClaimLost(keep=1))
    with pytest.raises(FencedOut, match="not marking it done"):
        zombie.submit_shard(0).result(timeout=WAIT_S)
    zombie.close()
    zombies = set(_parts(layout, 0))
    assert len(zombies) == 1
    zombie_done.set()

    stats = owned.result(timeout=WAIT_S)
    owner.close()

    parts = _parts(layout, 0)
    assert list(parts) == stats.parts and not zombies & set(parts)
    assert _indices(parts) == [list(range(6))] and stats.rows == 6
    assert checkpoint.done_stats(layout, 0) == stats


def test_the_trace_tells_when_each_request_enters_and_leaves_the_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/rollouts.py counts the requests in the engine from these events."""
    monkeypatch.setenv(trace.ENV, str(tmp_path / "t.jsonl"))
    job = _job(tmp_path, _rows(8), max_in_flight=3, flush_rows=4)
    layout, plan = _plan(job)
    _run(_pipeline(job, layout, plan, ScriptedReplay(job, step_s=0.01)), 0)

    events = trace.read(tmp_path / "t.jsonl")
    steps = [(e["event"], e["row"]) for e in events if e["event"] != trace.COMMITTED]
    assert sorted(steps) == sorted([(trace.SUBMITTED, r) for r in range(8)]
                                   + [(trace.FINISHED, r) for r in range(8)])
    in_flight = 0
    for event, row in steps:
        in_flight += 1 if event == trace.SUBMITTED else -1
        assert 0 <= in_flight <= 3, (event, row)
        if event == trace.FINISHED:
            assert steps.index((trace.SUBMITTED, row)) < steps.index((event, row))
    assert events[-1]["event"] == trace.COMMITTED


class Poisoned(ScriptedReplay):
    """An engine that dies at a step while a row of `poison` is in it, as a request that
    crashes vLLM's engine core kills it; `batches` records the rows of each step."""

    def __init__(self, job: JobSpec, poison: set[int], batches: list[list[int]]):
        super().__init__(job)
        self.poison, self.batches = poison, batches

    def poll(self) -> list[Generation]:
        if self.in_flight:
            self.batches.append(sorted(self._rows.values()))
            if self.poison & set(self._rows.values()):
                raise EngineDied("RuntimeError: poisoned")
        return super().poll()


def test_a_row_that_kills_the_engine_each_time_is_found_and_the_job_finishes(
        tmp_path: Path, quick_failure: None) -> None:
    job = _job(tmp_path, _rows(10), max_in_flight=4)
    layout, plan = _plan(job)
    batches: list[list[int]] = []
    pipe = _pipeline(job, layout, plan, Poisoned(job, {5}, batches),
                     restart_engine=lambda dead: Poisoned(job, {5}, batches))

    (stats,) = _run(pipe, 0)

    assert stats.status == {"ok": 9, "engine_error": 1}
    rows = {r["row_index"]: r for part in _parts(layout, 0).values() for r in part}
    assert sorted(rows) == list(range(10))
    assert rows[5]["status"] == "engine_error"
    assert rows[5]["error"] == ("the engine died each time it ran this request, alone too: "
                                "RuntimeError: poisoned")
    # Resubmitted once as they were, then halves of them alone until row 5 is alone.
    assert batches[:6] == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [4, 5], [4], [5]]
    assert pipe.restarts == 4


def test_an_engine_that_every_request_kills_stops_the_job_early(
        tmp_path: Path, quick_failure: None) -> None:
    job = _job(tmp_path, _rows(40), max_in_flight=2)
    layout, plan = _plan(job)
    batches: list[list[int]] = []
    every = set(range(40))
    pipe = _pipeline(job, layout, plan, Poisoned(job, every, batches),
                     restart_engine=lambda dead: Poisoned(job, every, batches))

    done = pipe.submit_shard(0)

    with pytest.raises(EngineDied, match="every request seems to kill it") as died:
        done.result(timeout=WAIT_S)
    assert str(died.value).startswith("the engine died 4 times (RuntimeError: poisoned): ")
    assert "a rerun dies the same way until the cause is fixed" in str(died.value)
    assert batches == [[0, 1], [0, 1], [0], [1, 2]]  # stopped after 3 restarts of 40 rows
    pipe.close()


def test_a_worker_takes_another_shard_while_fewer_rows_wait_than_the_engine_holds(
        tmp_path: Path) -> None:
    """The worker's loop claims while `wants_shard` (flows/worker.py): with shards of 2 rows
    and 16 requests in flight the engine fills to 16, where a fixed 4 open shards held it
    to 8 and drained it to each shard's stragglers. The count of waiting rows ends at 0,
    rows a resumed shard already committed taken off."""
    job = _job(tmp_path, _rows(40), rows_per_shard=2, max_in_flight=16, flush_rows=1)
    layout, plan = _plan(job)
    _run(_pipeline(job, layout, plan), 0)  # shard 0 committed: a resume skips its rows
    engine = LastingReplay(job, polls=20)
    pipe = _pipeline(job, layout, plan, engine)
    futures = []
    for shard_id in range(len(plan.shards)):
        deadline = time.monotonic() + 6 * WAIT_S  # slow steps under a loaded machine
        while not pipe.wants_shard():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        futures.append(pipe.submit_shard(shard_id))
    assert [f.result(timeout=WAIT_S).rows for f in futures][1:] == [2] * 19
    pipe.close()
    assert max(engine.held) == 16
    assert pipe.backlog.rows == 0


class HourLongRows(Backlog):
    """The pipeline's backlog on a clock where rows end 44 s apart, however fast the
    replay runs: a Kimi-K2-Thinking node's 228 slots with rows of ~2.8 hours."""

    def __init__(self) -> None:
        self.t = 0.0
        self.ended = 0
        super().__init__(lambda: self.t)

    def row_done(self) -> None:
        self.t += 44.0
        self.ended += 1
        super().row_done()


def test_a_worker_whose_rows_take_hours_claims_when_its_waiting_rows_run_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once rows end slowly, a worker claims a shard only when the engine would otherwise
    wait for it: a limit's worth of waiting rows is hours of one engine's work, which
    the engines that run dry at the end of a job cannot have."""
    monkeypatch.setattr(pipeline_module, "Backlog", HourLongRows)
    job = _job(tmp_path, _rows(40), rows_per_shard=2, max_in_flight=16, flush_rows=1)
    layout, plan = _plan(job)
    pipe = _pipeline(job, layout, plan, LastingReplay(job, polls=20))
    backlog = pipe.backlog
    assert isinstance(backlog, HourLongRows)
    waiting_at_claims, futures = [], []
    for shard_id in range(len(plan.shards)):
        deadline = time.monotonic() + 6 * WAIT_S
        while not pipe.wants_shard():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if backlog.ended >= 2:  # the rate is known
            waiting_at_claims.append(backlog.rows)
        futures.append(pipe.submit_shard(shard_id, asked_at=time.monotonic()))
    assert [f.result(timeout=WAIT_S).rows for f in futures] == [2] * 20
    pipe.close()
    assert waiting_at_claims and set(waiting_at_claims) == {0}
