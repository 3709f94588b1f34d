"""The job spec: what a user writes in job.yaml, validated before anything heavy runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo,
                      field_validator, model_validator)


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
    passthrough_columns: list[str] = Field(default_factory=list)

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


class EngineSpec(_Strict):
    kind: Literal["vllm", "replay"] = "vllm"
    model: str | None = Field(default=None, validate_default=True)
    tokenizer: str | None = None
    revision: str | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    decode_context_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, gt=0)
    trust_remote_code: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    load_format: str = "auto"
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    seed: int = 0
    max_in_flight: int = Field(
        default=512, gt=0, description="Requests kept inside the engine at once."
    )
    replay_column: str = Field(
        default="raw_text", description="kind=replay: column holding the completion text."
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm.LLM / EngineArgs argument."
    )

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

    def output_affecting(self) -> dict[str, Any]:
        """Engine settings that change what is generated (not how fast)."""
        keys = ("kind", "model", "tokenizer", "revision", "max_model_len", "dtype",
                "quantization", "load_format", "seed")
        out = {k: getattr(self, k) for k in keys}
        if self.kind == "replay":
            out["replay_column"] = self.replay_column
        return out


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
    prefect-aws AwsCredentials block): never from the job file."""

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
    preset: str | None = Field(default=None, description="Name of a preset merged under this file.")

    @model_validator(mode="after")
    def _coherent(self) -> JobSpec:
        inp = self.input
        if self.engine.kind == "vllm" and not (
                inp.messages_column or inp.prompt_column or inp.prompt_template):
            raise ValueError("input: a vllm job needs messages_column, prompt_column or "
                             "prompt_template")
        if self.engine.kind == "replay" and self.sampling.n > 1:
            raise ValueError("sampling.n: a replay job has one completion per row")
        return self

