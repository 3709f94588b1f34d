from __future__ import annotations

from pathlib import Path

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import Manifest, RunFigures
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.report.figures import RunTally
from thinkbatch.tasks.report.progress import Progress
from thinkbatch.tasks.report.summary import figure_rows, sample_rows, summary
from thinkbatch.tasks.store.commit import Committer
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


def _row(i: int, status: str = "ok", answer: str | None = None, tool: str | None = None) -> dict:
    calls = [{"id": f"functions.{tool}:0", "name": tool, "arguments": "{}"}] if tool else []
    return {"id": f"r{i}", "row_index": i, "sample_index": 0, "status": status,
            "reasoning": "why " * 40, "answer": answer, "tool_calls": calls}


def test_sample_rows_show_each_output_shape_before_repeats(tmp_path: Path) -> None:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(5))
    job = load_job(inline={"input": {"path": str(inputs)}, "engine": {"model": "m"},
                           "output": {"path": str(tmp_path / "out")}})
    layout = OutputLayout(job.output.path, Storage())
    committer = Committer(layout, output_schema(), flush_rows=100, flush_seconds=60,
                          compression="zstd", on_shard_done=lambda s, stats: None,
                          may_commit=lambda shard_id: True)
    # Finished in this order: tool calls first, a bad row, then the answers.
    for row in (_row(0, tool="get_weather"), _row(1, tool="get_time"),
                _row(2, "invalid_input"), _row(3, answer="93 pens."), _row(4, answer="7.")):
        committer.add(0, row)
    committer.finish_shard(0)
    committer.close()

    shown = sample_rows(job, 4, width=20)
    assert [r["id"] for r in shown] == ["r0", "r3", "r2", "r1"]
    assert shown[0]["reasoning"] == "why " * 5 + "…"
    assert shown[0]["tool_calls"][0]["name"] == "get_weather" and shown[1]["answer"] == "93 pens."
    assert sample_rows(job, 0) == []


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _done_row(tokens: int = 10) -> dict:
    return {"status": "ok", "prompt_tokens": 5, "completion_tokens": tokens,
            "reasoning_tokens": 4, "finish_reason": "stop", "ttft_s": 0.1, "latency_s": 1.0}


def test_the_time_left_of_a_resumed_run_counts_only_its_own_work() -> None:
    """1,000 rows: 600 in shards done before, 100 an earlier run committed in the shards
    this run resumes, 50 a retry copies. This run does 100 rows in 10 s: 150 are left,
    15 s at its 10 rows/s. tqdm's own figures (rows since the bar began / elapsed, and
    total minus the bar's count) took in the copied rows' jump and never the committed
    rows, which the feeder skips: the bar stopped short of 100% and its time left ran
    on."""
    clock = _Clock()
    progress = Progress(total=1000, already_done=600, enabled=True, clock=clock)
    assert progress.eta_s() is None
    progress.done_before(100)
    progress.done_before(50)
    clock.now += 10
    for _ in range(100):
        progress.row_done(_done_row())
    assert progress.remaining() == 150
    assert progress.eta_s() == 15.0
    assert progress.percent() == 85.0
    assert progress.rates() == "00:15 left, 10.0 rows/s, 100 out tok/s"
    bar = str(progress._bar)  # tqdm's own time left ("<00:30") is not shown
    assert "850/1000" in bar and " left, " in bar and "<" not in bar, bar
    progress.close()


def test_the_summary_ends_with_the_seed_table() -> None:
    tally = RunTally()
    for i in range(4):
        tally.add(_done_row(10 * (i + 1)))
    run = RunFigures(rows_generated=4, output_tokens=100, generation_s=2.0, wall_s=3.0,
                     rows_per_s=2.0, output_tokens_per_s=50.0, engine_load_s=1.0,
                     resumed=False, metrics=tally.metrics(2.0))
    manifest = Manifest(job="j", rows=4, input_rows=4, status_counts={"ok": 4},
                        prompt_tokens=20, completion_tokens=100, shards=1, fingerprint="f",
                        this_run=run, config={}, versions={}, data="out/data")
    text = summary(manifest)
    lines = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
             for line in text.splitlines()[5:]}
    assert lines["requests/s"] == "2" and lines["output tok/s"] == "50.0"
    assert lines["TTFT median (s)"] == "0.1" and lines["latency p99 (s)"] == "1"
    assert lines["reasoning tokens mean"] == "4" and lines["answer tokens mean"] == "21.0"
    rows = {r["figure"]: r for r in figure_rows(manifest)}
    assert rows["rows ok"] == {"figure": "rows ok", "output": 4, "this run": 4}
    assert rows["answer tokens total"]["this run"] == 84
