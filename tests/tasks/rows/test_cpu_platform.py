"""What the CPU build of vLLM can run: TP ranks get CPU groups of their own; decode context
parallel is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import engine_section, job_dict, prompt_rows, write_prompts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.jobs.validate import check_job, check_platform
from thinkbatch.tasks.rows.engine import cpu_groups


def test_cpus_are_split_into_one_contiguous_group_per_rank() -> None:
    assert cpu_groups([0, 1], 2) == "0|1"
    assert cpu_groups([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert cpu_groups([4, 5, 6, 7], 4) == "4|5|6|7"
    assert cpu_groups([3], 2) == "3|3"  # fewer CPUs than ranks: they share


def test_dcp_is_refused_on_the_cpu_build_with_the_reason(tmp_path: Path) -> None:
    def job(**engine: int) -> JobSpec:
        return JobSpec.model_validate(job_dict(
            tmp_path / "in.parquet", tmp_path / "out",
            engine_section("m", tensor_parallel_size=2, **engine)))

    [error] = check_platform(job(decode_context_parallel_size=2))
    assert error.startswith("engine.decode_context_parallel_size: 2 needs a GPU build")
    assert "softmax LSE" in error
    assert check_platform(job()) == []


def test_a_cpu_parent_leaves_the_platform_check_to_the_workers(tmp_path: Path) -> None:
    """The parent flows run on a CPU node (deployments/prefect.yaml): there, the Kimi
    preset's DCP8 is refused only for a job whose engine loads in this process; with
    workers each GPU node checks its own platform (tests/flows/test_scale_out.py)."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(2))

    def errors(workers: int) -> list[str]:
        return check_job(load_job(inline={
            "input": {"path": str(tmp_path / "in.parquet")}, "engine": {"model": "m"},
            "output": {"path": str(tmp_path / "out")},
            "scale": {"workers": workers, "shared_filesystem": True}},
            preset="kimi-k2-thinking"))

    assert [e.split(":")[0] for e in errors(1)] == ["engine.decode_context_parallel_size"]
    assert errors(2) == []
