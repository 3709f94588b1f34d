from __future__ import annotations

from pathlib import Path

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.checkpoint import OutputLayout
from thinkbatch.tasks.commit import Committer
from thinkbatch.tasks.report import sample_rows
from thinkbatch.tasks.storage import Storage


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
