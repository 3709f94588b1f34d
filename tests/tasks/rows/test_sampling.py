"""Sampling sections as vLLM SamplingParams: whatever vLLM refuses is named, per row
(cached per distinct override) and per job (refused before any model loads)."""

from __future__ import annotations

import pytest

from tests.conftest import KIMI_REGEX
from thinkbatch.schemas.job import SamplingSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.jobs.validate import check_vllm
from thinkbatch.tasks.rows.sampling import SamplingBuilder, SamplingRejected, to_params


def _job(**sampling):
    return load_job(inline={"input": {"path": "x"}, "engine": {"model": "m"},
                            "sampling": sampling, "output": {"path": "o"},
                            "parsers": {"reasoning": "kimi_k2"}})


@pytest.mark.parametrize(("section", "error"), [
    ({"extra": {"bogus_field": 1}}, "sampling.extra.bogus_field: not a vLLM SamplingParams field"),
    ({"top_k": -5}, "sampling.top_k: top_k must be 0 (disable), or at least 1, got -5."),
    ({"temperature": 3}, "sampling.temperature: temperature must be in [0, 2], got 3.0."),
    ({"extra": {"logprobs": "many"}}, "sampling.extra.logprobs: '<' not supported"),
    ({"extra": {"stop_token_ids": ["a"]}}, "sampling.extra.stop_token_ids: stop_token_ids must "
                                           "contain only integers"),
    ({"min_tokens": 9, "max_tokens": 4}, "sampling: min_tokens must be less than or equal to "
                                         "max_tokens=4, got 9."),
    ({"structured_outputs": {"regex": "(unclosed"}},
     "sampling.structured_outputs.regex: Failed to transform regex into a grammar"),
    ({"structured_outputs": {"json": {"type": "bogus"}}},
     "sampling.structured_outputs.json: Failed to transform json schema into a grammar"),
    ({"structured_outputs": {"grammar": "nonsense ::="}},
     "sampling.structured_outputs.grammar: Invalid grammar specification."),
])
def test_what_vllm_refuses_is_named(section: dict, error: str) -> None:
    with pytest.raises(SamplingRejected) as e:
        to_params(SamplingSpec.model_validate(section), keep_special_tokens=True)
    assert str(e.value).startswith(error)


@pytest.mark.parametrize("structured", [{"regex": KIMI_REGEX}, {"choice": ["yes", "no"]},
                                        {"json": {"type": "object"}},
                                        {"grammar": 'root ::= "a" | "b"'}])
def test_valid_constraints_pass(structured: dict) -> None:
    params = to_params(SamplingSpec(structured_outputs=structured), keep_special_tokens=False)
    assert params.structured_outputs is not None and params.skip_special_tokens


def test_a_refused_override_fails_its_rows_once_and_the_job_default_still_builds() -> None:
    builder = SamplingBuilder(_job(seed=5, max_tokens=8))
    bad = SamplingSpec(top_k=-5)
    for row in range(3):
        with pytest.raises(SamplingRejected, match=r"^sampling\.top_k: "):
            builder.for_sample(bad, row, 0)
    assert builder.for_sample(None, 2, 0).seed == 7
    assert len(builder._built) == 2  # one verdict per distinct section


def test_validate_refuses_job_sampling_vllm_would_refuse() -> None:
    errors = check_vllm(_job(top_k=-5, extra={"bogus": 1}))
    assert errors == ["sampling.extra.bogus: not a vLLM SamplingParams field"]
    assert check_vllm(_job(top_k=-5)) == [
        "sampling.top_k: top_k must be 0 (disable), or at least 1, got -5."]
    (bad_regex,) = check_vllm(_job(structured_outputs={"regex": "a(b"}))
    assert bad_regex.startswith("sampling.structured_outputs.regex: ")
    assert check_vllm(_job(top_k=-1, structured_outputs={"regex": KIMI_REGEX})) == []
