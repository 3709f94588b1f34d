"""The checks the flows add to tasks/jobs/validate.py's: the Prefect server's, in the same round."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.flows.checks import check_scale, checked_job
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError, load_job


def _job(tmp_path: Path, **scale: object) -> JobSpec:
    write_prompts(tmp_path / "in.parquet", prompt_rows(4))
    return load_job(inline={
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
        "engine": {"kind": "replay", "replay_column": "prompt"},
        "output": {"path": str(tmp_path / "out")}, "scale": scale})


@pytest.fixture(autouse=True)
def _no_server():
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_one_worker_needs_no_server(tmp_path: Path) -> None:
    assert check_scale(_job(tmp_path)) == []


def test_server_check_comes_in_the_same_round_as_the_others(tmp_path: Path) -> None:
    job = _job(tmp_path, workers=2, shared_filesystem=True)
    bad = job.model_copy(update={"output": job.output.model_copy(update={"compression": "nope"})})
    with pytest.raises(JobFileError) as e:
        checked_job(lambda: bad)
    assert [m.split(":")[0] for m in e.value.errors] == ["output.compression", "scale.workers"]
    assert "need a Prefect server" in e.value.errors[1]


def test_a_failed_scale_section_is_not_checked_against_the_server(tmp_path: Path) -> None:
    """Its pydantic error only: the check sees the section's defaults (one worker)."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(4))
    with pytest.raises(JobFileError) as e:
        checked_job(lambda: load_job(inline={
            "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
            "engine": {"kind": "replay", "replay_column": "prompt"},
            "output": {"path": str(tmp_path / "out")},
            "scale": {"workers": 2, "claim_ttl_s": -1}}))
    assert [m.split(":")[0] for m in e.value.errors] == ["scale.claim_ttl_s"]
