"""The Kimi preset follows its makers: a reasoning budget of ~128k tokens, room left for the
prompt. The demos take the miniature's CPU settings from presets."""

from __future__ import annotations

from pathlib import Path

from thinkbatch.schemas.job_file import load_job, resolve_raw


def test_kimi_preset_leaves_reasoning_its_budget_and_the_prompt_room() -> None:
    for preset in ("kimi-k2-thinking", "kimi-k2-thinking-tp8"):
        job = load_job(inline={"input": {"path": "a"}, "output": {"path": "o"}}, preset=preset)
        assert job.sampling.temperature == 1.0
        assert job.sampling.max_tokens >= 96 * 1024
        assert job.engine.max_model_len - job.sampling.max_tokens >= 32 * 1024


def test_demo_jobs_take_the_miniature_settings_from_presets() -> None:
    """The demos name a miniature preset: CPU settings from cpu-miniature, vLLM's CPU rotary
    kernel off for trained weights only, the Kimi-format regex for random weights only."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    for name, trained in (("demo", True), ("demo-random", False), ("features", False)):
        job = load_job(examples / f"{name}.yaml")
        extra = job.engine.vllm_args
        assert extra["enforce_eager"], name
        assert job.engine.max_model_len == 1024 and extra["kv_cache_memory_bytes"], name
        assert ("compilation_config" in extra) == trained, name
        assert (extra.get("load_format") == "dummy") == (not trained), name
        assert (job.sampling.structured_outputs is None) == trained, name


# Engine arguments that one CPU's (or GPU's) attention backend accepts and another refuses
# (vLLM's AMX MLA backend: block size a multiple of 32; its reference CPU MLA: 16 only):
# vLLM picks them per backend, thinkbatch at run time (tasks/rows/engine_settings.py).
MACHINE_BOUND = ("block_size", "enable_chunked_prefill", "enable_prefix_caching",
                 "attention_backend", "attention_config", "max_num_batched_tokens")


def test_no_preset_or_example_pins_what_only_some_machines_accept() -> None:
    """`make demo` on a CPU with AMX failed with `No common block size for 16 (AMX_MLA:
    [MultipleOf(32)])`: the miniature preset pinned the reference backend's block size."""
    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("deployments/presets/*.yaml"), *root.glob("examples/*.yaml")]
    assert len(files) >= 8
    for path in files:
        engine = (load_job(path).engine.vllm_args if path.parent.name == "examples"
                  else resolve_raw({}, preset=path.stem)["engine"])
        pinned = set(engine) & set(MACHINE_BOUND)
        assert not pinned, f"{path.name} pins {sorted(pinned)}"
