"""Engines behind one small interface: submit a request, poll finished generations.

`VllmEngine` wraps one offline `vllm.LLM`, loaded once per process and fed request by
request (`llm_engine.add_request` + `llm_engine.step`), so new work enters as old work leaves:
there is no batch barrier. `ReplayEngine` returns stored completion text instead of
generating, for re-parsing outputs and for measuring the host path without a model.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from thinkbatch.schemas.job import EngineSpec
from thinkbatch.schemas.output import Status
from thinkbatch.tasks.render import RowRequest
from thinkbatch.tasks.vllm_env import prepare_vllm_env

prepare_vllm_env()


@dataclass(slots=True)
class Generation:
    key: str  # the caller's request key
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None
    prompt_token_ids: Sequence[int] | None
    ttft_s: float | None
    latency_s: float | None


class RequestRejected(Exception):
    """The engine would not take this one request; the row gets `status`."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


class Engine(Protocol):
    tokenizer: Any

    @property
    def in_flight(self) -> int: ...

    def submit(self, key: str, req: RowRequest, params: Any) -> None: ...

    def poll(self) -> list[Generation]: ...

    def close(self) -> None: ...


def llm_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """vllm.LLM arguments, named as `vllm serve` flags are (`--decode-context-parallel-size`)."""
    kwargs: dict[str, Any] = dict(
        model=spec.model,
        tokenizer=spec.tokenizer,
        revision=spec.revision,
        tensor_parallel_size=spec.tensor_parallel_size,
        decode_context_parallel_size=spec.decode_context_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        max_model_len=spec.max_model_len,
        trust_remote_code=spec.trust_remote_code,
        dtype=spec.dtype,
        quantization=spec.quantization,
        load_format=spec.load_format,
        kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
        seed=spec.seed,
        # Stats on, so RequestOutput.metrics carries first-token times.
        disable_log_stats=False,
    )
    kwargs.update(spec.extra_args)
    return kwargs


def _rejected(err: Exception) -> RequestRejected:
    msg = str(err) or type(err).__name__
    if "maximum context length" in msg:
        return RequestRejected(Status.PROMPT_TOO_LONG, msg)
    return RequestRejected(Status.INVALID_INPUT, f"{type(err).__name__}: {msg}")


class VllmEngine:
    def __init__(self, spec: EngineSpec):
        from vllm import LLM
        from vllm.sampling_params import RequestOutputKind

        self.llm = LLM(**llm_kwargs(spec))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._pending: set[str] = set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        """Render with the model's own chat template and tokenizer, check the length on
        the host (no accelerator time for a prompt that cannot fit), then enqueue."""
        try:
            prompt = self.llm._preprocess_chat_one(
                req.messages, tools=req.tools,
                chat_template_kwargs=req.chat_template_kwargs or None)
        except Exception as e:  # this one row's template rendering failed
            raise _rejected(e) from e
        prompt_len = len(prompt["prompt_token_ids"])
        if prompt_len + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                Status.PROMPT_TOO_LONG,
                f"prompt of {prompt_len} tokens + max_tokens {params.max_tokens} exceeds "
                f"max_model_len {self.max_model_len}")
        params.output_kind = self._final_only
        try:
            self.llm.llm_engine.add_request(key, prompt, params)
        except Exception as e:
            raise _rejected(e) from e
        self._pending.add(key)

    def poll(self) -> list[Generation]:
        if not self._pending:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            self._pending.discard(out.request_id)
            comp = out.outputs[0]
            m = out.metrics
            done.append(Generation(
                key=out.request_id,
                text=comp.text,
                token_ids=comp.token_ids,
                finish_reason=comp.finish_reason,
                prompt_token_ids=out.prompt_token_ids,
                ttft_s=m.first_token_latency if m else None,
                latency_s=(time.time() - m.arrival_time) if m else None,
            ))
        return done

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class ReplayEngine:
    """Completion text comes from an input column; the same path from render to commit."""

    def __init__(self, spec: EngineSpec):
        self.tokenizer = None
        if spec.model or spec.tokenizer:
            from vllm.tokenizers import get_tokenizer

            self.tokenizer = get_tokenizer(spec.tokenizer or spec.model,
                                           trust_remote_code=spec.trust_remote_code,
                                           revision=spec.revision)
        self._done: deque[Generation] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        self._done.append(Generation(
            key=key, text=req.replay_text or "", token_ids=(),
            finish_reason="stop", prompt_token_ids=None, ttft_s=None, latency_s=None,
        ))

    def poll(self) -> list[Generation]:
        done = list(self._done)
        self._done.clear()
        return done

    def close(self) -> None:
        pass


_ENGINES: dict[str, Engine] = {}


def get_engine(spec: EngineSpec) -> Engine:
    """One engine per process and spec: loaded once, reused by every shard and flow run."""
    key = json.dumps(spec.model_dump(exclude={"max_in_flight", "replay_column"}),
                     sort_keys=True, default=str)
    if key not in _ENGINES:
        _ENGINES[key] = VllmEngine(spec) if spec.kind == "vllm" else ReplayEngine(spec)
    return _ENGINES[key]


def close_engines() -> None:
    """Stop engine processes cleanly before the interpreter exits."""
    while _ENGINES:
        _ENGINES.popitem()[1].close()
