"""The job's sampling section as vLLM SamplingParams."""

from __future__ import annotations

from typing import Any

from thinkbatch.schemas.job import JobSpec


def sampling_params(job: JobSpec) -> Any:
    """Special tokens stay in the text whenever a parser needs its markers."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    s = job.sampling
    fields = s.model_dump(exclude={"structured_outputs", "extra", "stop"})
    fields["stop"] = s.stop or None
    fields.update(s.extra)
    if s.structured_outputs is not None:
        so = s.structured_outputs
        fields["structured_outputs"] = StructuredOutputsParams(
            regex=so.regex, json=so.json_schema, choice=so.choice, grammar=so.grammar)
    if job.parsers.reasoning or job.parsers.tool_call:
        fields["skip_special_tokens"] = False
    return SamplingParams(**fields)


def for_row(params: Any, row_index: int) -> Any:
    """A job-level seed becomes `seed + row_index`: every row reproducible, rows not
    identical (one seed for all would make equal prompts give equal samples)."""
    if params is None or params.seed is None:
        return params
    row_params = params.clone()
    row_params.seed = params.seed + row_index
    return row_params
