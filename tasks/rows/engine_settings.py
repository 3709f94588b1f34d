"""Engine settings that depend on the machine: chosen when the engine loads, from what
vLLM reports for this machine, and recorded with the rows they generated.

Presets, examples and tests pin nothing that only some machines accept: vLLM's CPU build
runs its AMX MLA backend where the CPU has AMX (block size a multiple of 32, chunked
prefill and prefix caching on) and its reference CPU MLA elsewhere (block size 16, both
off), and a pin one of them needs, the other refuses. Where a platform needs a setting
that vLLM does not choose itself, it is chosen here, and `EngineLayout.choices` (the
shards' markers, the manifest) says which, and why.
"""

from __future__ import annotations

import copy
from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import EngineChoice, EngineLayout

# vLLM 0.32's model runner rewinds a seeded request's generator (`set_offset`) when it
# discards the token sampled for it, which it does for a prompt prefilled in part this
# step; a CPU torch.Generator has no offset, and the engine core dies. With chunked
# prefill off, vLLM schedules every prompt whole (a preempted request too) and no sampled
# token is discarded.
SEEDED_CPU = ("a seeded request whose sampled token vLLM discards (a prompt prefilled in "
              "part, with chunked prefill) kills the engine core on vLLM's CPU build "
              "(`CPU Generator does not use offset`); with chunked prefill off every "
              "prompt is prefilled whole")


def may_seed(job: JobSpec) -> bool:
    """Whether a request of the job can sample with a seed: a seeded job sampling at a
    temperature (greedy requests have no generator), or rows that carry their own
    sampling (a row's override may set a seed)."""
    s = job.sampling
    return (s.seed is not None and s.temperature > 0) or job.input.sampling_column is not None


def seeded_sampling_errors(job: JobSpec) -> list[str]:
    """A seeded job with chunked prefill forced on cannot run on vLLM's CPU build (the
    engine core dies on the first prompt prefilled in part), and one whose
    `max_num_batched_tokens` is below `max_model_len` cannot turn it off (vLLM refuses a
    token budget that a whole prompt may not fit). Refused before any model loads."""
    extra = job.engine.vllm_args
    if job.engine.kind != "vllm" or not may_seed(job):
        return []
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    if extra.get("enable_chunked_prefill"):
        return [f"engine.enable_chunked_prefill: true cannot run with sampling "
                f"seeds on vLLM's CPU build: {SEEDED_CPU}. Leave it unset (thinkbatch turns "
                "it off for seeded jobs on CPU) or drop the seed"]
    budget, longest = extra.get("max_num_batched_tokens"), job.engine.max_model_len
    if "enable_chunked_prefill" not in extra and budget is not None and longest is not None \
            and budget < longest:
        return [f"engine.max_num_batched_tokens: {budget} is below max_model_len "
                f"{longest}, so chunked prefill must stay on, which cannot run with sampling "
                f"seeds on vLLM's CPU build: {SEEDED_CPU}. Raise it to max_model_len or "
                "leave it unset"]
    return []


def choose(kwargs: dict[str, Any], seeded: bool) -> list[EngineChoice]:
    """The settings this machine needs beside `kwargs` (vllm.LLM arguments), from the
    configuration vLLM builds for them here (no model loads: ~10 ms once vLLM is
    imported). A setting the job names is the job's: validation refused the ones that
    cannot work (seeded_sampling_errors)."""
    if not seeded or "enable_chunked_prefill" in kwargs:
        return []
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    from vllm.usage.usage_lib import UsageContext

    config = _engine_args(kwargs).create_engine_config(UsageContext.LLM_CLASS)
    if not config.scheduler_config.enable_chunked_prefill:
        return []  # vLLM turned it off itself (its reference CPU MLA backend does)
    return [EngineChoice(setting="enable_chunked_prefill", value=False, reason=SEEDED_CPU)]


def engine_args_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` (vllm.LLM arguments) as EngineArgs takes them: `vllm.LLM` turns a config
    given as a mapping (`compilation_config`, `structured_outputs_config`, ...) into its
    config class; EngineArgs itself, which Ray Data LLM builds from `engine_kwargs`, takes
    only the class."""
    from vllm.config import (AttentionConfig, CompilationConfig, ProfilerConfig,
                             StructuredOutputsConfig)
    from vllm.config.kv_transfer import KVTransferConfig

    classes = {"compilation_config": CompilationConfig, "attention_config": AttentionConfig,
               "structured_outputs_config": StructuredOutputsConfig,
               "profiler_config": ProfilerConfig, "kv_transfer_config": KVTransferConfig}
    args = copy.deepcopy(kwargs)
    for name, cls in classes.items():
        if isinstance(args.get(name), dict):
            args[name] = cls(**args[name])
    return args


def _engine_args(kwargs: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**engine_args_kwargs(kwargs))


class WorkerProbe:
    """Mixed into vLLM's worker class (`worker_extension_cls`), so the client can ask the
    workers which attention backends they built: vLLM picks them in the worker process,
    per machine, and tells the client nothing of it."""

    def thinkbatch_attention_backends(self) -> list[str]:
        runner = getattr(self, "model_runner", None)
        groups = getattr(runner, "attn_groups", None) or []
        return sorted({g.backend.get_name() for group in groups for g in group})


PROBE = f"{WorkerProbe.__module__}.{WorkerProbe.__qualname__}"


def layout(llm: Any, choices: list[EngineChoice]) -> EngineLayout:
    """What vLLM reports for a loaded `vllm.LLM`: its configuration as the engine core
    finished it (block size, KV cache size) and its workers' attention backends."""
    from vllm import __version__
    from vllm.platforms import current_platform

    config = llm.llm_engine.vllm_config
    par, cache = config.parallel_config, config.cache_config
    tokens = cache.kv_cache_size_tokens
    if tokens is None and cache.num_gpu_blocks:
        tokens = cache.num_gpu_blocks * cache.block_size
    return EngineLayout(
        vllm=__version__,
        device=current_platform.device_type,
        tensor_parallel_size=par.tensor_parallel_size,
        decode_context_parallel_size=par.decode_context_parallel_size,
        pipeline_parallel_size=par.pipeline_parallel_size,
        attention_backend=_attention_backend(llm, config),
        dtype=str(config.model_config.dtype).removeprefix("torch."),
        kv_cache_dtype=str(cache.cache_dtype),
        block_size=cache.block_size,
        kv_cache_tokens=tokens,
        chunked_prefill=bool(config.scheduler_config.enable_chunked_prefill),
        prefix_caching=bool(cache.enable_prefix_caching),
        choices=choices,
    )


def _attention_backend(llm: Any, config: Any) -> str | None:
    if config.parallel_config.worker_extension_cls != PROBE:
        return None  # the job brought its own worker extension
    names = {n for rank in llm.collective_rpc("thinkbatch_attention_backends") for n in rank}
    return "+".join(sorted(names)) or None
