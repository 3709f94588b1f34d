"""`reparse` of a rollout output is refused: its turns' parses chose the tools that ran,
so re-parsing one turn would leave a row its own trajectory contradicts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI, job_dict, prompt_rows, write_prompts
from thinkbatch.schemas.job_file import JobFileError, load_job
from thinkbatch.schemas.manifest import Manifest, RunFigures
from thinkbatch.tasks.jobs.reparse import reparse_job
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


def _finished_rollout_output(tmp_path: Path) -> Path:
    """A finished output's manifest, as finalize writes it, of a rollout job that kept its
    raw text (so only its being a rollout stands in the way)."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    job = load_job(inline=job_dict(
        tmp_path / "in.parquet", tmp_path / "out", {"model": "assets/tiny-kimi-thinking"},
        output={"keep_raw_text": True},
        rollout={"tools": [{"python": "tests.rollout_tools"}]}))
    layout = OutputLayout(job.output.path, Storage())
    checkpoint.write_manifest(layout, Manifest(
        job=job.name, rows=2, input_rows=2, status_counts={"ok": 2}, prompt_tokens=0,
        completion_tokens=0, turns=4, tool_calls_total=2, tool_errors=0, shards=1,
        fingerprint="f", this_run=RunFigures(), config=json.loads(job.model_dump_json()),
        versions={}, data=layout.data))
    return tmp_path / "out"


def test_a_rollout_output_is_not_reparsed(tmp_path: Path) -> None:
    out = _finished_rollout_output(tmp_path)
    with pytest.raises(JobFileError, match="is a rollout output: each turn's parse chose "
                                           "the tools that ran"):
        reparse_job(str(out), str(tmp_path / "re"), "kimi_k2", None)

    r = subprocess.run([*CLI, "reparse", str(out), "--to", str(tmp_path / "re"),
                        "--tool-call-parser", "kimi_k2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "run the job again with the other parsers" in r.stderr
    assert not (tmp_path / "re").exists()
