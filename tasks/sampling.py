"""Sampling sections (the job's, or a row's override) as vLLM SamplingParams."""

from __future__ import annotations

from typing import Any

from thinkbatch.schemas.job import JobSpec, SamplingSpec


def to_params(s: SamplingSpec, keep_special_tokens: bool) -> Any:
    """Special tokens stay in the text whenever a parser needs its markers. `n` is not
    passed: each sample is its own request, so each has its own seed and its own
    exactly-once key."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    fields = s.model_dump(exclude={"structured_outputs", "extra", "stop", "n"})
    fields["stop"] = s.stop or None
    fields.update(s.extra)
    if s.structured_outputs is not None:
        so = s.structured_outputs
        fields["structured_outputs"] = StructuredOutputsParams(
            regex=so.regex, json=so.json_schema, choice=so.choice, grammar=so.grammar)
    if keep_special_tokens:
        fields["skip_special_tokens"] = False
    return SamplingParams(**fields)


class SamplingBuilder:
    """SamplingParams per (row, sample): the job's, or a row override's (built once per
    distinct override), with a seed derived per sample."""

    def __init__(self, job: JobSpec):
        self.keep_special = bool(job.parsers.reasoning or job.parsers.tool_call)
        self.job_spec = job.sampling
        self._built: dict[str, Any] = {}

    def base(self, spec: SamplingSpec | None) -> Any:
        spec = spec or self.job_spec
        key = spec.model_dump_json()
        if key not in self._built:
            self._built[key] = to_params(spec, self.keep_special)
        return self._built[key]

    def for_sample(self, spec: SamplingSpec | None, row_index: int, sample_index: int) -> Any:
        """A seed becomes `seed + row_index * n + sample_index`: every sample reproducible
        (a resumed run regenerates it the same way), no two samples alike."""
        params = self.base(spec)
        if params.seed is None:
            return params.clone()
        n = (spec or self.job_spec).n
        one = params.clone()
        one.seed = params.seed + row_index * n + sample_index
        return one
