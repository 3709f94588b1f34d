"""The Kimi preset follows its makers: a reasoning budget of ~128k tokens, room left for the
prompt. The demos take the miniature's CPU settings from presets."""

from __future__ import annotations

from pathlib import Path

from thinkbatch.schemas.job_file import load_job


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
        extra = job.engine.extra_args
        assert extra["block_size"] == 16 and extra["enforce_eager"], name
        assert job.engine.max_model_len == 1024 and job.engine.kv_cache_memory_bytes, name
        assert ("compilation_config" in extra) == trained, name
        assert (job.engine.load_format == "dummy") == (not trained), name
        assert (job.sampling.structured_outputs is None) == trained, name
