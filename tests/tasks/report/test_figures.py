"""This run's figures, tallied row by row: the seed's table from bins, merged across workers."""

from __future__ import annotations

import math
import random

from thinkbatch.schemas.manifest import RunFigures, TallyState, WorkerFigures
from thinkbatch.tasks.report.figures import FLUSH_VALUES, RunTally, merge_workers


def _rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        engine = i % 10 != 0  # every tenth row never reached the engine
        completion = rnd.randint(5, 400)
        rows.append({
            "status": "ok" if engine else "invalid_input",
            "prompt_tokens": rnd.randint(10, 90) if engine else None,
            "completion_tokens": completion if engine else None,
            "reasoning_tokens": rnd.randint(0, completion + 5) if engine else None,
            "finish_reason": "stop" if engine else None,
            "ttft_s": rnd.lognormvariate(-2, 1) if engine else None,
            "latency_s": rnd.lognormvariate(1, 0.7) if engine else None,
        })
    return rows


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def test_the_seed_table_from_bins_matches_the_rows() -> None:
    rows = _rows(3 * FLUSH_VALUES + 17, seed=1)  # more than one flush of the buffers
    tally = RunTally()
    for row in rows:
        tally.add(row)
    metrics = tally.metrics(generation_s=4.0)
    engine = [r for r in rows if r["finish_reason"]]
    assert metrics.status == {"invalid_input": len(rows) - len(engine), "ok": len(engine)}
    assert metrics.requests == len(engine) and metrics.requests_per_s == len(engine) / 4.0
    for name in ("ttft_s", "latency_s"):
        values = [r[name] for r in engine]
        spread = getattr(metrics, name)
        assert math.isclose(spread.mean, sum(values) / len(values), rel_tol=1e-9)
        for q in (50, 90, 99):  # 200 bins a decade: a bin's middle is within 0.58%
            assert math.isclose(getattr(spread, f"p{q}"), _nearest_rank(values, q),
                                rel_tol=0.006), (name, q)
    completion = sum(r["completion_tokens"] for r in engine)
    reasoning = sum(min(r["reasoning_tokens"], r["completion_tokens"]) for r in engine)
    assert metrics.completion_tokens.total == completion
    assert metrics.reasoning_tokens.total == reasoning
    assert metrics.answer_tokens.total == completion - reasoning
    assert metrics.prompt_tokens.mean == sum(r["prompt_tokens"] for r in engine) / len(engine)


def test_a_rollout_row_counts_each_turn_as_a_request() -> None:
    tally = RunTally()
    tally.add({"status": "ok", "prompt_tokens": 30, "completion_tokens": 20,
               "reasoning_tokens": 8, "finish_reason": "stop", "ttft_s": 0.1,
               "latency_s": 2.0, "num_turns": 3})
    assert tally.metrics(1.0).requests == 3


def test_workers_tallies_merge_into_the_whole_runs() -> None:
    rows = _rows(900, seed=2)
    whole, parts = RunTally(), [RunTally(), RunTally()]
    for i, row in enumerate(rows):
        whole.add(row)
        parts[i % 2].add(row)
    reports = [WorkerFigures(name=f"w{i}", figures=RunFigures(rows_generated=t.rows,
                                                              output_tokens=t.completion_tokens,
                                                              shards=[i]),
                             tally=TallyState.model_validate_json(t.state().model_dump_json()))
               for i, t in enumerate(parts)]
    run = merge_workers(reports, generation_s=3.0)
    assert run.metrics == whole.metrics(3.0)
    assert run.rows_generated == len(rows) and run.shards == [0, 1]
    assert set(run.workers) == {"w0", "w1"}
