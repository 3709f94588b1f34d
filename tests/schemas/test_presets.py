"""The Kimi preset follows its makers: a reasoning budget of ~128k tokens, room left for the prompt."""

from __future__ import annotations

from thinkbatch.schemas.job_file import load_job


def test_kimi_preset_leaves_reasoning_its_budget_and_the_prompt_room() -> None:
    for preset in ("kimi-k2-thinking", "kimi-k2-thinking-tp8"):
        job = load_job(inline={"input": {"path": "a"}, "output": {"path": "o"}}, preset=preset)
        assert job.sampling.temperature == 1.0
        assert job.sampling.max_tokens >= 96 * 1024
        assert job.engine.max_model_len - job.sampling.max_tokens >= 32 * 1024
