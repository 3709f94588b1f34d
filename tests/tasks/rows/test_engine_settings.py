"""Engine settings chosen per machine (tasks/rows/engine_settings.py): seeded sampling on vLLM's
CPU build, both of its MLA attention backends, and what the manifest records of them.

vLLM's CPU build runs its AMX MLA backend where the CPU has AMX, with chunked prefill on,
and its reference CPU MLA backend elsewhere, with chunked prefill off. A seeded request
prefilled in part kills the engine core there (`CPU Generator does not use offset`). On a
machine without AMX, `VLLM_MLA_DISABLE=1` gives the same situation: the model runs
vLLM's CPU_ATTN backend, which keeps chunked prefill on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from tests.conftest import engine_section, job_dict, prompt_rows, write_prompts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import EngineChoice, Manifest
from thinkbatch.tasks.rows.engine_settings import SEEDED_CPU, may_seed, seeded_sampling_errors


def _amx() -> bool:
    """vLLM's own test for its AMX MLA backend (vllm/platforms/cpu.py)."""
    import torch

    return torch.cpu._is_amx_tile_supported()


def _job(tmp_path: Path, engine: dict[str, Any] | None = None, **sections: Any) -> JobSpec:
    return JobSpec.model_validate(job_dict(tmp_path / "in.parquet", tmp_path / "out",
                                           engine or engine_section("m"), **sections))


def test_a_job_may_seed_when_it_samples_with_a_seed_or_rows_bring_their_sampling(
        tmp_path: Path) -> None:
    assert may_seed(_job(tmp_path))  # job_dict: temperature 0.8, seed 1
    assert not may_seed(_job(tmp_path, sampling={"seed": None}))
    assert not may_seed(_job(tmp_path, sampling={"temperature": 0}))  # greedy: no generator
    assert may_seed(_job(tmp_path, sampling={"temperature": 0},
                         input={"sampling_column": "sampling"}))


def test_settings_that_keep_a_seeded_job_prefilling_in_part_are_refused_on_cpu(
        tmp_path: Path) -> None:
    def engine(**extra: Any) -> dict[str, Any]:
        section = engine_section("m")
        return {**section, **extra}

    [forced] = seeded_sampling_errors(_job(tmp_path, engine(enable_chunked_prefill=True)))
    assert forced.startswith("engine.enable_chunked_prefill: true cannot run with "
                             "sampling seeds on vLLM's CPU build")
    assert "CPU Generator does not use offset" in forced
    [budget] = seeded_sampling_errors(_job(tmp_path, engine(max_num_batched_tokens=512)))
    assert budget.startswith("engine.max_num_batched_tokens: 512 is below "
                             "max_model_len 1024")
    assert seeded_sampling_errors(_job(tmp_path, engine(max_num_batched_tokens=1024))) == []
    assert seeded_sampling_errors(_job(tmp_path, engine(enable_chunked_prefill=True),
                                       sampling={"seed": None})) == []


def _outputs(out: Path) -> dict[str, str]:
    return {r["id"]: r["raw_text"] for r in ds.dataset(out / "data").to_table().to_pylist()}


def _twice(tmp_path: Path, job: dict[str, Any]) -> tuple[Manifest, dict[str, str], dict[str, str]]:
    """The job run twice, into two outputs: its manifest and each run's raw texts."""
    from thinkbatch.flows.job import generate_dataset

    manifest = generate_dataset(job)
    first = _outputs(Path(job["output"]["path"]))
    job["output"]["path"] = str(tmp_path / "again")
    generate_dataset(job)
    return manifest, first, _outputs(tmp_path / "again")


@pytest.mark.engine
def test_a_seeded_job_prefilling_in_part_gives_the_same_rows_twice(
        tiny_model: str, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        own_engines: None) -> None:
    """Today the engine core dies at the first step (`CPU Generator does not use offset`),
    three times, and the job fails. A token budget of 256 splits the prompts of 32 rows
    in flight (~50 tokens each) over steps; thinkbatch turns chunked prefill off for a
    seeded job where vLLM leaves it on, so each prompt is prefilled whole."""
    monkeypatch.setenv("VLLM_MLA_DISABLE", "1")  # CPU_ATTN: chunked prefill on, any CPU
    rows = prompt_rows(64)
    for row in rows:
        row["prompt"] = f"{row['prompt']} And tomorrow, {row['prompt']}"
    write_prompts(tmp_path / "in.parquet", rows)
    engine = engine_section(tiny_model, max_model_len=256, max_in_flight=32)
    engine["max_num_batched_tokens"] = 256
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine,
                   sampling={"max_tokens": 32}, output={"keep_raw_text": True})

    manifest, first, again = _twice(tmp_path, job)

    assert len(first) == 64 and first == again
    assert len(set(first.values())) > 32  # sampled at temperature 0.8, not greedy
    [used] = manifest.engines
    assert (used.attention_backend, used.chunked_prefill, used.shards) == ("CPU_ATTN", False, 2)
    assert used.choices == [EngineChoice(setting="enable_chunked_prefill", value=False,
                                         reason=SEEDED_CPU)]
    assert manifest.this_run.engine.model_dump() == used.model_dump(exclude={"shards", "rows"})


@pytest.mark.engine
@pytest.mark.parametrize("backend", ["CPU_MLA", "AMX_MLA"])
def test_both_cpu_mla_backends_run_a_seeded_job_the_same_twice(
        backend: str, tiny_model: str, prefect_harness, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The suite runs on vLLM's default backend for the machine (AMX MLA where the CPU has
    AMX, else the reference CPU MLA); this test names the other one, so an AMX machine
    runs both. On the default backend it takes the suite's shared engine."""
    amx = _amx()
    if backend == "AMX_MLA" and not amx:
        pytest.skip("this CPU has no AMX: vLLM's AMX MLA backend cannot run here; the "
                    "CPU_MLA case runs its reference backend, as the whole suite does")
    engine = engine_section(tiny_model)
    if backend != ("AMX_MLA" if amx else "CPU_MLA"):
        engine["attention_backend"] = backend
        request.getfixturevalue("own_engines")
    write_prompts(tmp_path / "in.parquet", prompt_rows(24))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine,
                   output={"keep_raw_text": True})

    manifest, first, again = _twice(tmp_path, job)

    assert len(first) == 24 and first == again
    assert manifest.status_counts == {"ok": 24}
    [used] = manifest.engines
    assert used.attention_backend == backend
    assert used.chunked_prefill is False  # vLLM's choice (reference) or thinkbatch's (AMX)
    if backend == "CPU_MLA":
        assert used.block_size == 16 and used.choices == []
    else:
        assert used.block_size % 32 == 0
        assert [c.setting for c in used.choices] == ["enable_chunked_prefill"]
