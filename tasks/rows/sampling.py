"""Sampling sections (the job's, or a row's override) as vLLM SamplingParams.

vLLM checks a SamplingParams when it is built, and its structured-output constraint and
what depends on the model (vocabulary, max_model_len) when its request is added. The first
two run here, once per distinct section: a value our schema accepts and vLLM refuses then
fails only the rows that carry it (`invalid_input`, the field named), and a job-level one
refuses the job before any model loads (tasks/jobs/validate.py). The model-dependent checks fail
their row in the engine (`RequestRejected`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from thinkbatch.schemas.job import JobSpec, SamplingSpec

_UNEXPECTED = re.compile(r"Unexpected keyword argument '(\w+)'")


class SamplingRejected(ValueError):
    """vLLM refuses this sampling section; the message names the field where it can."""


def sampling_kwargs(s: SamplingSpec, keep_special_tokens: bool) -> dict[str, Any]:
    """A sampling section as the keyword arguments of vllm.SamplingParams, plain data
    (structured outputs as StructuredOutputsParams' own keywords): what Ray Data LLM's
    `sampling_params` column holds too (benchmarks/ray_llm.py)."""
    fields = s.model_dump(exclude={"structured_outputs", "extra", "stop", "n",
                                    "min_room_tokens"})
    fields["stop"] = s.stop or None
    fields.update(s.extra)
    if s.structured_outputs is not None:
        so = s.structured_outputs
        given = {"regex": so.regex, "json": so.json_schema, "choice": so.choice,
                 "grammar": so.grammar}
        fields["structured_outputs"] = {k: v for k, v in given.items() if v is not None}
    if keep_special_tokens:
        # vLLM's detokenizer for slow tokenizers (Kimi-K2-Thinking's) otherwise writes a
        # space after each added token it keeps: ` <think>`, a reasoning with a leading space.
        fields["skip_special_tokens"] = False
        fields["spaces_between_special_tokens"] = False
    return fields


def _fields(s: SamplingSpec, keep_special_tokens: bool) -> dict[str, Any]:
    from vllm.sampling_params import StructuredOutputsParams

    fields = sampling_kwargs(s, keep_special_tokens)
    if "structured_outputs" in fields:
        fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
    return fields


def _culprit(fields: dict[str, Any], err: Exception) -> str | None:
    """The field vLLM refused: named by the error, else the first that fails on its own
    (None when only a combination fails, e.g. min_tokens > max_tokens)."""
    from vllm import SamplingParams

    if m := _UNEXPECTED.search(str(err)):
        return m.group(1)
    if name := getattr(err, "parameter", None):
        return name
    for name, value in fields.items():
        try:
            SamplingParams(**{name: value})
        except Exception:
            return name
    return None


def _check_grammar(s: SamplingSpec, params: Any) -> None:
    """The constraint check of vLLM's default (`auto`) structured-output backend, as
    `SamplingParams._validate_structured_outputs` runs it at add_request: xgrammar; if it
    refuses, outlines for a JSON schema guidance cannot take, else guidance. Run without
    the model's tokenizer; the engine's own check at add_request still guards each row."""
    if s.structured_outputs is None:
        return
    from vllm.v1.structured_output.backend_guidance import (
        has_guidance_unsupported_json_features, validate_guidance_grammar)
    from vllm.v1.structured_output.backend_outlines import (
        validate_structured_output_request_outlines)
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    so = s.structured_outputs
    try:
        validate_xgrammar_grammar(params.clone())  # clones: it rewrites `choice` in place
        return
    except Exception as e:
        first = e
    fallback = (validate_structured_output_request_outlines
                if so.json_schema is not None
                and has_guidance_unsupported_json_features(so.json_schema)
                else validate_guidance_grammar)
    try:
        fallback(params.clone())
    except Exception:
        key = next(k for k in ("regex", "json_schema", "choice", "grammar") if getattr(so, k))
        raise SamplingRejected(f"sampling.structured_outputs.{key.removesuffix('_schema')}: "
                               f"{first}") from None


def to_params(s: SamplingSpec, keep_special_tokens: bool) -> Any:
    """Special tokens stay in the text whenever a parser needs its markers. `n` is not
    passed: each sample is its own request, so each has its own seed and its own
    exactly-once key. Raises SamplingRejected for anything vLLM refuses."""
    from vllm import SamplingParams

    fields = _fields(s, keep_special_tokens)
    try:
        params = SamplingParams(**fields)
    except Exception as e:
        name = _culprit(fields, e)
        where = "sampling" if name is None else (
            f"sampling.extra.{name}" if name in s.extra else f"sampling.{name}")
        reason = ("not a vLLM SamplingParams field" if _UNEXPECTED.search(str(e))
                  else str(e) or type(e).__name__)
        raise SamplingRejected(f"{where}: {reason}") from None
    _check_grammar(s, params)
    return params


def job_sampling_errors(job: JobSpec) -> list[str]:
    """The job's own sampling section as vLLM would take it: refused before any model
    loads, instead of failing every row."""
    try:
        to_params(job.sampling, keep_special(job))
    except SamplingRejected as e:
        return [str(e)]
    return []


def keep_special(job: JobSpec) -> bool:
    return bool(job.parsers.reasoning or job.parsers.tool_call)


class SamplingBuilder:
    """SamplingParams per (row, sample): the job's, or a row override's (built once per
    distinct override), with a seed derived per sample."""

    def __init__(self, job: JobSpec):
        self.keep_special = keep_special(job)
        self.job_spec = job.sampling
        self._built: dict[str, Any] = {}  # SamplingParams, or the SamplingRejected

    def base(self, spec: SamplingSpec | None) -> Any:
        """Raises SamplingRejected (kept, so a refused override is checked once)."""
        spec = spec or self.job_spec
        key = spec.model_dump_json()
        if key not in self._built:
            try:
                self._built[key] = to_params(spec, self.keep_special)
            except SamplingRejected as e:
                self._built[key] = e
        built = self._built[key]
        if isinstance(built, SamplingRejected):
            raise SamplingRejected(str(built))
        return built

    def for_sample(self, spec: SamplingSpec | None, row_index: int, sample_index: int,
                   turn: int = 0) -> Any:
        """A seed becomes `seed + row_index * n + sample_index`: every sample reproducible
        (a resumed run regenerates it the same way), no two samples alike. A rollout's
        later turns (`turn` > 0) get `turn_seed` of it."""
        params = self.base(spec)
        if params.seed is None:
            return params.clone()
        n = (spec or self.job_spec).n
        one = params.clone()
        one.seed = turn_seed(params.seed + row_index * n + sample_index, turn)
        return one


def turn_seed(seed: int, turn: int) -> int:
    """The seed of a rollout's turn `turn` (0-based) of a sample seeded `seed`: turn 0 keeps
    it; a later turn draws from a stream of its own (one seed for every turn would replay
    turn 0's random draws), derived from (seed, turn) alone, so a rerun or a resumed
    conversation draws the same. A hash, not `seed + turn`, which is another sample's."""
    if turn == 0:
        return seed
    digest = hashlib.sha256(f"thinkbatch-turn:{seed}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # [0, 2**63): a torch generator seed
