"""The toolbox the job's checks open is the run's (tasks/tools/kept.py): each MCP server
starts once per run."""

from __future__ import annotations

from pathlib import Path

from tests.tasks.tools.test_toolbox import _counting, _starts
from thinkbatch.tasks.tools import kept


def test_the_checks_toolbox_is_the_runs_so_each_server_starts_once(tmp_path: Path):
    """The CLI checks the job, the flow checks it again, the run opens its tools: one
    server start. A toolbox kept for another job is closed when a new one is kept."""
    starts = tmp_path / "starts"
    rollout = _counting(starts, "k")
    checked = kept.keep(rollout, tmp_path)
    assert kept.keep(rollout, tmp_path) is checked
    run_box = kept.take(rollout, tmp_path)
    try:
        assert run_box is checked and len(_starts(starts)) == 1
        assert run_box.names == ["get_weather", "check_key"]
    finally:
        run_box.close()
    fresh = kept.take(rollout, tmp_path)  # nothing kept any more: opened anew
    fresh.close()
    assert len(_starts(starts)) == 2

    first = kept.keep(rollout, tmp_path)
    other = kept.keep(_counting(starts, "k", max_turns=3), tmp_path)
    assert first.closed and not other.closed
    other.close()
