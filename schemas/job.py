"""The job spec: what a user writes in job.yaml, validated before anything heavy runs.

What never changes the rows written (only speed, robustness, or where data lives) is
listed in SPEED_ONLY; the resume fingerprint (tasks/store/fingerprint.py) counts every
other field and engine argument, so a new one counts without anyone listing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo,
                      field_validator, model_validator)

from thinkbatch.schemas.output import Status
from thinkbatch.schemas.rollout import RolloutSpec


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a job file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    path: str = Field(description="A Parquet file, a directory of them, or a glob.")
    id_column: str | None = Field(
        default=None, description="Column holding the row id; else file:row_index."
    )
    messages_column: str | None = Field(
        default=None,
        description="Column of chat messages: list<struct<role, content>> or a JSON string.",
    )
    prompt_column: str | None = Field(
        default="prompt", description="Column holding the user prompt (when no messages column)."
    )
    prompt_template: str | None = Field(
        default=None, description="Jinja over the row's columns: renders the user message.")
    system_prompt: str | None = None
    sampling_column: str | None = Field(
        default=None, description="Per-row SamplingParams overrides: a struct or JSON object.")
    tools_column: str | None = Field(
        default=None, description="Per-row tools: a list of OpenAI function schemas (or JSON).")
    chat_template_kwargs_column: str | None = Field(
        default=None, description="Per-row chat template kwargs, e.g. {\"thinking\": false}.")
    sample_index_column: str | None = Field(
        default=None, description="replay: keep each row's sample_index (re-parsing outputs).")
    status_column: str | None = Field(
        default=None, description="replay: stored statuses; a row stored without a completion "
                                  "(invalid_input, prompt_too_long, engine_error) keeps its "
                                  "status and its error (error_column).")
    error_column: str | None = Field(
        default=None, description="replay: the stored errors kept with status_column.")
    passthrough_columns: list[str] = Field(default_factory=list)
    allow_special_tokens: bool = Field(
        default=False,
        description="Trust the inputs: text in messages, prompts, tools and template values "
                    "(system_prompt and prompt_template included) that spells the model's "
                    "control tokens (<|im_end|>, <think>, tool-call markers) becomes those "
                    "tokens. Off: it is tokenized as plain text, and only the chat "
                    "template's own markers are control tokens.")

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if "prompt_column" not in self.model_fields_set and (
                self.messages_column or self.prompt_template):
            self.prompt_column = None
        sources = [s for s in ("messages_column", "prompt_column", "prompt_template")
                   if getattr(self, s)]
        if len(sources) > 1:
            raise ValueError(f"set one of messages_column, prompt_column, prompt_template; "
                             f"got {sources}")
        return self


class ShardSpec(_Strict):
    rows_per_shard: int = Field(default=1000, gt=0)


# Dotted paths (as a job file names them) of what never changes the rows written: speed,
# robustness, where data lives. The fingerprint counts every other field and every other
# vLLM engine argument. Engine arguments here change speed or memory, never the tokens
# generated (in intent: like batch composition, some change floating-point reduction
# order, which vLLM does not promise to keep bitwise stable anyway); one not listed
# counts, e.g. `engine.compilation_config`, `engine.block_size`, `engine.kv_cache_dtype`.
SPEED_ONLY = frozenset({
    "name", "preset", "storage", "scale", "observability",
    "input.path",  # the input files' stats count (`input.files`)
    "output.path", "output.flush_rows", "output.flush_seconds", "output.compression",
    "engine.tensor_parallel_size", "engine.pipeline_parallel_size", "engine.max_in_flight",
    "engine.expected_tokens_per_row", "engine.max_restarts",
    "engine.enforce_eager", "engine.max_num_seqs", "engine.max_num_batched_tokens",
    "engine.gpu_memory_utilization", "engine.kv_cache_memory_bytes",
    "engine.enable_prefix_caching", "engine.enable_chunked_prefill", "engine.cpu_offload_gb",
    "engine.disable_log_stats", "engine.distributed_executor_backend",
    "rollout.max_tool_error_rate",  # it stops the job; it changes no row
    "rollout.max_concurrent_tools",
    "rollout.checkpoint_seconds",  # where a rerun resumes from; the rows are the same
})

# What came to count later: at its default it adds no fingerprint part, so outputs
# written before it counted still resume; set, it counts like any other field.
COUNTS_WHEN_SET = frozenset({
    "engine.decode_context_parallel_size", "sampling.min_room_tokens", "rollout",
    "rollout.context"})


def flat_engine_args(engine: Any) -> Any:
    """An engine section with `extra_args` (the older spelling of vLLM's engine arguments)
    merged into it. Left as it is where a key is given both ways, for EngineSpec to
    refuse: resolve_raw flattens each file before merging, so a job's `extra_args` still
    overrides its preset's flat argument."""
    if not isinstance(engine, dict) or not isinstance(engine.get("extra_args"), Mapping):
        return engine
    older = engine["extra_args"]
    if older.keys() & engine.keys():
        return engine
    return {**{k: v for k, v in engine.items() if k != "extra_args"}, **older}


class EngineSpec(BaseModel):
    """The fields thinkbatch itself reads; every other key is a vLLM engine argument
    (`dtype`, `quantization`, `load_format`, `enforce_eager`, `compilation_config`, ...),
    passed as it is to `vllm.LLM(**kwargs)` as Ray Data LLM's `engine_kwargs` and vLLM's
    own `LLM` take them: `vllm_args`. Their names are checked against vLLM's EngineArgs
    before any model loads (tasks/jobs/validate.py, check_vllm), where vLLM is imported.

    `tensor_` and `pipeline_parallel_size` are speed-only: they split the same math over
    more devices, changing floating-point reduction order as batch size (`max_in_flight`)
    does, which vLLM promises bitwise stable for neither.

    `decode_context_parallel_size` counts: DCP shards the KV cache and merges partial
    attention from each rank's softmax LSE, another attention computation, and one with
    an open accuracy bug (vLLM issue #41623: Kimi's outputs drift at long context with
    TP8/DCP8). A DCP8 output resumed with DCP1 would mix the two in one dataset. At its
    default (1) it adds no part (COUNTS_WHEN_SET), so outputs written before it counted
    resume."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["vllm", "replay"] = "vllm"
    model: str | None = Field(default=None, validate_default=True)
    tokenizer: str | None = None
    revision: str | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    decode_context_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, gt=0)
    trust_remote_code: bool = False
    seed: int = 0
    max_in_flight: int = Field(
        default=512, gt=0, description="Most requests kept inside the engine at once; fewer "
        "where the KV cache holds fewer (see expected_tokens_per_row).")
    expected_tokens_per_row: int | None = Field(
        default=None, gt=0,
        description="Tokens (prompt + completion) a request is expected to hold in the KV "
                    "cache: in flight are at most the cache's tokens over this. Default: "
                    "sampling.max_tokens, so that nothing is preempted.")
    max_restarts: int = Field(
        default=2, ge=0,
        description="Times a worker loads a new engine when its engine's processes die "
                    "mid-run (its in-flight rows are resubmitted, not failed).")
    replay_column: str = Field(
        default="raw_text", description="kind=replay: column holding the completion text."
    )

    @property
    def vllm_args(self) -> dict[str, Any]:
        """The vLLM engine arguments written beside thinkbatch's fields."""
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _older_spelling(cls, data: Any) -> Any:
        """`extra_args: {...}` is still read: its keys join the flat arguments."""
        if not isinstance(data, dict) or "extra_args" not in data:
            return data
        older = data["extra_args"]
        if not isinstance(older, Mapping):
            raise ValueError("engine.extra_args: a mapping of vLLM engine arguments")
        both = sorted(older.keys() & data.keys())
        if both:
            raise ValueError(f"engine.extra_args.{both[0]} is also given as engine.{both[0]}: "
                             "give it once (vLLM's engine arguments go under engine: as "
                             "they are)")
        return flat_engine_args(data)

    # Field validators (not model validators) so these errors are reported together
    # with every other field error of the file.
    @field_validator("model")
    @classmethod
    def _model_for_vllm(cls, model: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind", "vllm") == "vllm" and not model:
            raise ValueError("required when engine.kind is vllm")
        return model

    @field_validator("decode_context_parallel_size")
    @classmethod
    def _dcp_divides_tp(cls, dcp: int, info: ValidationInfo) -> int:
        tp = info.data.get("tensor_parallel_size")
        if tp is not None and tp % dcp:
            raise ValueError(
                "tensor_parallel_size must be divisible by decode_context_parallel_size "
                f"(vLLM requires it): got TP={tp}, DCP={dcp}")
        return dcp


class StructuredOutputSpec(_Strict):
    """One of vLLM's StructuredOutputsParams constraints."""

    regex: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="json")
    choice: list[str] | None = None
    grammar: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputSpec:
        given = [k for k in ("regex", "json_schema", "choice", "grammar") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of regex, json, choice, grammar; got {given}")
        return self


class SamplingSpec(_Strict):
    """vllm.SamplingParams fields; `extra` passes any other field through."""

    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = 0
    min_p: float = Field(default=0.0, ge=0, le=1)
    max_tokens: int = Field(default=1024, gt=0)
    min_tokens: int = Field(default=0, ge=0)
    min_room_tokens: int = Field(
        default=16, ge=1,
        description="max_tokens is cut to the room a prompt leaves in max_model_len; a "
                    "prompt leaving less than this is prompt_too_long (a rollout: the turn "
                    "named). Not passed to vLLM.")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, validation_alias=AliasChoices("n", "samples_per_prompt"),
                   description="Samples per prompt: one output row each, with sample_index.")
    structured_outputs: StructuredOutputSpec | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ParserSpec(_Strict):
    """Names exactly as `vllm serve --reasoning-parser / --tool-call-parser` takes them."""

    reasoning: str | None = None
    tool_call: str | None = None


class StorageSpec(_Strict):
    """How to reach s3:// paths. Credentials come from boto3's standard chain (or a
    prefect-aws AwsCredentials block): never from the job file. Speed-only as a whole
    (JobSpec.storage): it selects where data lives, not what it is."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, R2...).")
    region: str | None = None
    profile: str | None = Field(default=None, description="A profile of ~/.aws/config.")
    aws_credentials_block: str | None = Field(
        default=None, description="Name of a prefect-aws AwsCredentials block.")
    max_attempts: int = Field(default=10, ge=1, description="botocore standard-mode retries.")


class OutputSpec(_Strict):
    path: str
    flush_rows: int = Field(default=1000, gt=0)
    flush_seconds: float = Field(default=60.0, gt=0)
    keep_raw_text: bool = False
    compression: str = "zstd"


class ScaleSpec(_Strict):
    """How many worker flow runs (one engine each, e.g. one GPU node each) share a job."""

    workers: int = Field(default=1, ge=1, description="1: the engine runs in this process.")
    worker_deployment: str = Field(default="thinkbatch-worker/gpu",
                                   description="Deployment that runs the worker flow.")
    worker_retries: int = Field(default=2, ge=0,
                                description="Rounds of new workers while shards remain.")
    claim_ttl_s: float = Field(default=120.0, gt=0,
                               description="A shard claim not renewed for this long is free.")
    heartbeat_timeout_s: float = Field(
        default=300.0, gt=0,
        description="A worker whose heartbeat (rewritten every fifth of this from its "
                    "start, model load included) is older is presumed dead, its run marked "
                    "Crashed and its shards left to the others and to the next round.")
    shared_filesystem: bool = Field(
        default=False,
        description="A local output.path with workers > 1 is one folder every worker "
                    "sees: one host, or a filesystem every worker host mounts with atomic "
                    "mkdir and rename (NFSv4, Lustre). Say so here; else use s3://.")


class ObservabilitySpec(_Strict):
    """Live metrics for the Prometheus (and Grafana) a GPU team already runs: vLLM's engine
    metrics and thinkbatch's own, served while a worker runs (tasks/report/metrics.py).
    Speed-only as a whole (JobSpec.observability): watching a run changes none of its rows."""

    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve Prometheus metrics on this port while a worker runs; a "
                    "scale-out worker serves on metrics_port + its worker index.")
    metrics_host: str = Field(
        default="0.0.0.0", min_length=1,
        description="Address the metrics port binds: every interface, as `vllm serve` "
                    "does, so a Prometheus on another host can scrape it; 127.0.0.1 keeps "
                    "it to this machine.")


class RetrySpec(_Strict):
    """Set by `thinkbatch retry`: regenerate only the rows of a finished output whose
    status is listed; its other rows are copied as they are. Counts in the fingerprint."""

    source: str = Field(description="A finished output folder (it has a _manifest.json).")
    statuses: list[Status] = Field(min_length=1, description="Statuses of the rows to redo.")


class JobSpec(_Strict):
    name: str = "thinkbatch"
    input: InputSpec
    shards: ShardSpec = Field(default_factory=ShardSpec)
    engine: EngineSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="OpenAI-style function schemas offered to every row.")
    parsers: ParserSpec = Field(default_factory=ParserSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    preset: str | None = Field(  # the merged values count, not the name
        default=None, description="Name of a preset merged under this file.")
    retry: RetrySpec | None = None
    rollout: RolloutSpec | None = Field(
        default=None, description="Run the model's tool calls and continue each "
                                  "conversation until it answers (agentic rollouts).")

    @model_validator(mode="after")
    def _coherent(self) -> JobSpec:
        inp = self.input
        if self.engine.kind == "vllm" and not (
                inp.messages_column or inp.prompt_column or inp.prompt_template):
            raise ValueError("input: a vllm job needs messages_column, prompt_column or "
                             "prompt_template")
        if self.engine.kind == "replay" and self.sampling.n > 1:
            raise ValueError("sampling.n: a replay job has one completion per row")
        port = self.observability.metrics_port
        if port is not None and port + self.scale.workers - 1 > 65535:
            raise ValueError(f"observability.metrics_port: worker {self.scale.workers - 1} "
                             f"would serve on port {port + self.scale.workers - 1} (> 65535)")
        return self

