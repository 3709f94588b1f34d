"""Engines behind one small interface: submit a request, poll finished generations.

`VllmEngine` wraps one offline `vllm.LLM`, loaded once per process and fed request by
request (`llm_engine.add_request` + `llm_engine.step`), so new work enters as old work leaves:
there is no batch barrier. `ReplayEngine` returns stored completion text instead of
generating, for re-parsing outputs and for measuring the host path without a model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from multiprocessing import connection, resource_tracker
from typing import Any, Protocol

from thinkbatch.schemas.job import EngineSpec, ParserSpec
from thinkbatch.schemas.manifest import EngineChoice, EngineLayout
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import Generation, RowRequest
from thinkbatch.tasks.process.vllm_env import engine_logging
from thinkbatch.tasks.rows import engine_settings
from thinkbatch.tasks.rows.engine_stderr import EngineStderr
from thinkbatch.tasks.rows.history import Histories, PromptHistory, RenderText
from thinkbatch.tasks.rows.prompt_tokens import ControlTokens, chat_prompt

log = logging.getLogger("thinkbatch.engine")

EXIT_WAIT_S = 5.0  # how long a dead engine's core process is waited for, for its exit status
# How long a closing engine's core process is given to end before vLLM kills its process
# tree, on vLLM's CPU build. There its worker process outlasts vLLM's own 5 s grace (the
# executor waits VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS, 5 s, before it signals the worker),
# so every close ended in that kill after 5 s (measured: 5.0 s; 5.8 s with no kill); 1 s
# ends the same way, 4 s sooner, at the end of every run. Elsewhere vLLM's grace stands.
CPU_CLOSE_GRACE_S = 1.0


class EngineDied(RuntimeError):
    """The engine's processes are gone (the OOM killer, a GPU fault, a kernel assertion):
    no request in it will finish. The message is the root cause: the exception its
    processes died of, else how the engine core process ended."""


class RequestRejected(Exception):
    """The engine would not take this one request; the row gets `status`."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


class Engine(Protocol):
    tokenizer: Any
    layout: EngineLayout | None  # a vLLM engine's, as loaded
    max_model_len: int | None  # the window its prompts are checked against, where known

    @property
    def in_flight(self) -> int: ...

    def submit(self, key: str, req: RowRequest, params: Any) -> None: ...

    def render(self, req: RowRequest, prev: PromptHistory | None) -> PromptHistory | None: ...

    def poll(self) -> list[Generation]: ...

    def abort(self, keys: Iterable[str]) -> None: ...

    def guard(self, markers: Iterable[str]) -> None: ...

    def close(self) -> None: ...


def llm_kwargs(spec: EngineSpec, parsers: ParserSpec) -> dict[str, Any]:
    """vllm.LLM arguments, named as `vllm serve` flags are (`--decode-context-parallel-size`):
    the engine fields thinkbatch reads, then the job's vLLM engine arguments as they are.
    The reasoning parser too, as `--reasoning-parser` gives it: vLLM's structured-output
    manager then starts a row's grammar where its reasoning ends, so a constrained answer
    leaves the thinking free (without it the grammar forces the thinking as well)."""
    kwargs: dict[str, Any] = dict(
        model=spec.model,
        tokenizer=spec.tokenizer,
        revision=spec.revision,
        tensor_parallel_size=spec.tensor_parallel_size,
        decode_context_parallel_size=spec.decode_context_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        max_model_len=spec.max_model_len,
        trust_remote_code=spec.trust_remote_code,
        seed=spec.seed,
        # Stats on, so RequestOutput.metrics carries first-token times.
        disable_log_stats=False,
    )
    if parsers.reasoning:
        kwargs["reasoning_parser"] = parsers.reasoning
    kwargs.update(spec.vllm_args)
    return kwargs


def machine_kwargs(spec: EngineSpec, parsers: ParserSpec,
                   seeded: bool) -> tuple[dict[str, Any], list[EngineChoice]]:
    """The vllm.LLM arguments for this machine: the job's (`llm_kwargs`) and the settings
    this platform needs that vLLM does not choose itself (tasks/rows/engine_settings.py; a
    `seeded` job's needs differ). Benchmarks give bare vLLM the same."""
    kwargs = llm_kwargs(spec, parsers)
    choices = engine_settings.choose(kwargs, seeded)
    kwargs.update({c.setting: c.value for c in choices})
    return kwargs, choices


def _rejected(err: Exception) -> RequestRejected:
    msg = str(err) or type(err).__name__
    if "maximum context length" in msg:
        return RequestRejected(Status.PROMPT_TOO_LONG, msg)
    return RequestRejected(Status.INVALID_INPUT, f"{type(err).__name__}: {msg}")


def as_served(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as `vllm serve` hands them to the chat template: its request model
    renames an assistant message's `reasoning_content` (OpenAI's name, the one outputs
    use) to `reasoning`, which vLLM's chat parsing reads; `LLM.chat` takes messages as
    they are and would drop that reasoning. Interleaved thinking (a rollout's earlier
    turns) needs it in the prompt. Tool calls are copied: vLLM's chat parsing decodes
    their arguments in place, and a conversation's history keeps them as JSON text."""
    out = []
    for m in messages:
        if "reasoning_content" in m or "tool_calls" in m:
            m = dict(m)
        if "reasoning_content" in m:
            reasoning = m.pop("reasoning_content")
            if reasoning is not None and m.get("reasoning") is None:
                m["reasoning"] = reasoning
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [{**c, "function": dict(c["function"])}
                               if isinstance(c, dict) and isinstance(c.get("function"), dict)
                               else c for c in m["tool_calls"]]
        out.append(m)
    return out


def text_renderer(offline: Any) -> RenderText:
    """The chat template's text as `LLM.chat` renders it (vLLM's `_preprocess_chat`: the
    same chat parameters, messages as served), before it is tokenized. None where vLLM's
    own render gives no text alone: a template that tokenizes (Mistral's), multimodal
    data, prompt embeddings. Without `generation` the text stops before the generation
    prompt (the history's own, tasks/rows/history.py)."""
    from vllm.renderers import ChatParams, merge_kwargs
    from vllm.utils.mistral import is_mistral_tokenizer

    tokenizes = (is_mistral_tokenizer(offline.renderer.tokenizer)
                 or offline.model_config.enable_prompt_embeds)

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               kwargs: dict[str, Any], generation: bool = True) -> str | None:
        if tokenizes:
            return None
        params = ChatParams(
            chat_template=offline.chat_template, chat_template_content_format="auto",
            chat_template_kwargs=merge_kwargs(kwargs or None, dict(
                add_generation_prompt=generation, continue_final_message=False, tools=tools,
                tokenize=False)))
        _, prompt = offline.renderer.render_messages(as_served(messages), params)
        text = prompt.get("prompt")
        return text if isinstance(text, str) and prompt.keys() == {"prompt"} else None

    return render


def cpu_groups(cpus: list[int], groups: int) -> str:
    """`cpus` split into `groups` contiguous shares in VLLM_CPU_OMP_THREADS_BIND's syntax
    ("0|1", "0,1|2,3"); with fewer CPUs than groups, groups share CPUs in turn."""
    if len(cpus) < groups:
        return "|".join(str(cpus[i % len(cpus)]) for i in range(groups))
    size, extra = divmod(len(cpus), groups)
    shares, at = [], 0
    for i in range(groups):
        shares.append(cpus[at:at + size + (i < extra)])
        at += len(shares[-1])
    return "|".join(",".join(map(str, share)) for share in shares)


def bind_cpu_threads(spec: EngineSpec) -> None:
    """vLLM's CPU build binds each rank's OpenMP threads to a NUMA node of its own and
    refuses to start TP/PP ranks beyond the NUMA nodes it may use ("Not enough allowed
    NUMA nodes"). Then, unless VLLM_CPU_OMP_THREADS_BIND is set, the CPUs this process
    may run on are split into one group per rank, so TP=2 runs on a 2-core machine."""
    ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
    if ranks == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if len(get_visible_memory_node()) < ranks:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_groups(sorted(os.sched_getaffinity(0)),
                                                              ranks)


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Ctrl-C signals the whole process group, and vLLM's processes exit on SIGINT: the
    engine would die under a clean stop and its last rows fail as engine errors. Processes
    started while this thread blocks SIGINT inherit the blocked mask, so SIGINT reaches
    thinkbatch alone (its handler runs whichever thread the signal lands on), which then
    shuts the engine down itself (`close_engines`; the guardian covers a SIGKILL).
    multiprocessing's resource tracker is started first: starting it unblocks SIGINT."""
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class VllmEngine:
    def __init__(self, spec: EngineSpec, kwargs: dict[str, Any], choices: list[EngineChoice]):
        from vllm import LLM
        from vllm.sampling_params import RequestOutputKind

        bind_cpu_threads(spec)
        self._stderr = EngineStderr()
        with sigint_blocked(), self._stderr.inherited(), engine_logging() as logging_config:
            self.llm = LLM(**kwargs, logging_config=logging_config)
        self.layout = engine_settings.layout(self.llm, choices)
        self._alive_at = time.monotonic()  # the last step that came back: a cause is after it
        self.tokenizer = self.llm.get_tokenizer()
        self._control = ControlTokens(self.tokenizer)
        # The rollout's render thread tokenizes with a tokenizer of its own: a fast
        # tokenizer's settings (truncation, split_special_tokens) are state that a call
        # on the driver thread changes under it.
        self._render_tokenizer = _own_copy(self.tokenizer)
        self._text = text_renderer(self.llm)
        self._histories = Histories(self._text, ControlTokens(self._render_tokenizer))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._final_only = RequestOutputKind.FINAL_ONLY
        from vllm.v1.engine.exceptions import EngineDeadError

        self._dead = EngineDeadError
        self._closing = False
        threading.Thread(target=self._wake_on_death, name="thinkbatch-engine-watch",
                         daemon=True).start()
        self._pending: set[str] = set()
        self._capped: set[str] = set()  # requests whose max_tokens is the room left

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def guard(self, markers: Iterable[str]) -> None:
        """Data that spells `markers` (the parsers', tasks/rows/parse.py) is tokenized as text
        too: a tokenizer may know them only by name (Kimi-K2-Thinking's keeps `<think>`
        and its tool-call markers out of its added tokens)."""
        self._control = ControlTokens(self.tokenizer, markers)
        self._histories = Histories(self._text, ControlTokens(self._render_tokenizer, markers))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.llm._preprocess_chat_one(as_served(messages), tools=tools,
                                             chat_template_kwargs=kwargs or None)

    def render(self, req: RowRequest, prev: PromptHistory | None) -> PromptHistory | None:
        """A rollout turn's prompt from the previous turn's (tasks/rows/history.py), on the
        render thread. Raises what rendering the row raises."""
        history = self._histories.next(prev, req.messages or [], req.tools,
                                       req.chat_template_kwargs,
                                       allow_special_tokens=req.allow_special_tokens)
        if history is not None:
            history.ready = history.ids.tolist()
        return history

    def _prompt(self, req: RowRequest) -> dict[str, Any]:
        """The request's prompt: the one rendered ahead for its messages (a rollout turn),
        else rendered here. One past the window goes to vLLM's own render, which refuses it
        in its own words."""
        ahead = req.prompt
        if (isinstance(ahead, PromptHistory) and ahead.messages == len(req.messages or ())
                and len(ahead) <= self.max_model_len):
            ids = ahead.ready if ahead.ready is not None else ahead.ids.tolist()
            return self.llm.renderer.process_for_engine({"prompt_token_ids": ids}, time.time())
        return chat_prompt(self._render, self._control, req.messages, req.tools,
                           req.chat_template_kwargs,
                           allow_special_tokens=req.allow_special_tokens)

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        """Render with the model's own chat template and tokenizer (data that spells control
        tokens tokenized as text, tasks/rows/prompt_tokens.py), unless the prompt was
        rendered ahead; check the length on the host (no accelerator time for a prompt
        that cannot fit), then enqueue. A prompt that leaves less room than max_tokens
        gets the room (a long conversation goes on to the end of the window, as vLLM's
        `LLM` would let it); one that leaves less than the job's `sampling.min_room_tokens`
        is refused: a few tokens could hold no answer."""
        try:
            prompt = self._prompt(req)
        except Exception as e:  # this one row's template rendering failed
            raise _rejected(e) from e
        prompt_len = len(prompt["prompt_token_ids"])
        room = self.max_model_len - prompt_len
        floor = (req.sampling.min_room_tokens if req.sampling is not None
                 else req.min_room_tokens)
        capped = params.max_tokens > room
        if capped:
            if room < floor:
                raise RequestRejected(
                    Status.PROMPT_TOO_LONG,
                    f"prompt of {prompt_len} tokens leaves {max(room, 0)} of max_model_len "
                    f"{self.max_model_len}, under sampling.min_room_tokens {floor}")
            params = params.clone()  # shared by the rows of one sampling section
            params.max_tokens = room
        params.output_kind = self._final_only
        try:
            self.llm.llm_engine.add_request(key, prompt, params)
        except self._dead as e:
            raise self._died(e) from e
        except Exception as e:
            raise _rejected(e) from e
        self._pending.add(key)
        if capped:
            self._capped.add(key)
        if isinstance(req.prompt, PromptHistory):
            req.prompt.ready = None  # the engine holds its own while it runs

    def poll(self) -> list[Generation]:
        if not self._pending:
            return []
        try:
            outputs = self.llm.llm_engine.step()
        except self._dead as e:
            raise self._died(e) from e
        self._alive_at = time.monotonic()
        now = time.time()
        done = []
        for out in outputs:
            if not out.finished:
                continue
            self._pending.discard(out.request_id)
            capped = out.request_id in self._capped
            self._capped.discard(out.request_id)
            comp = out.outputs[0]
            m = out.metrics
            done.append(Generation(
                key=out.request_id,
                text=comp.text,
                token_ids=comp.token_ids,
                finish_reason=comp.finish_reason,
                prompt_token_ids=out.prompt_token_ids,
                ttft_s=m.first_token_latency if m else None,
                latency_s=(now - m.arrival_time) if m else None,
                capped=capped,
                started_at=m.arrival_time if m else None,  # vLLM's, Unix time
                finished_at=now,
            ))
        return done

    def abort(self, keys: Iterable[str]) -> None:
        """Take requests out of the engine (a shard whose claim was lost): their KV cache
        is freed for the shards the worker still holds."""
        keys = [k for k in keys if k in self._pending]
        if keys:
            self._pending.difference_update(keys)
            self._capped.difference_update(keys)
            try:
                self.llm.llm_engine.abort_request(keys)
            except self._dead as e:
                raise self._died(e) from e

    def _died(self, err: Exception) -> EngineDied:
        """vLLM's error says only that the engine core died. The cause is the signal that
        killed its process (what its workers print as they lose it comes after), else the
        first exception its processes printed since the last step that came back, else
        its exit code."""
        printed = self._stderr.cause(self._alive_at)  # waits for their last lines
        procs = list(getattr(self._manager(), "processes", ()))
        codes = _exit_codes(procs)
        killed = [c for c in codes if c is not None and c < 0]
        if killed:
            return EngineDied(f"the engine core process was killed by "
                              f"{signal.Signals(-killed[0]).name}")
        exited = [c for c in codes if c]
        return EngineDied(printed or (f"the engine core process exited with code {exited[0]}"
                                      if exited else str(err)))

    def _manager(self) -> Any:
        core = self.llm.llm_engine.engine_core
        return getattr(getattr(core, "resources", None), "engine_manager", None)

    def _wake_on_death(self) -> None:
        """vLLM notices that its engine core died and shuts its client down, but a step()
        already waiting for outputs is never woken (0.32's SyncMPClient): hand it the
        error it should have seen, so the pipeline can replace the engine."""
        manager = self._manager()
        outputs = getattr(self.llm.llm_engine.engine_core, "outputs_queue", None)
        if manager is None or outputs is None:  # the engine core runs in this process
            return
        connection.wait(manager.sentinels())
        if not self._closing:
            outputs.put_nowait(self._dead())

    def close(self) -> None:
        from vllm.platforms import current_platform

        self._closing = True
        grace = CPU_CLOSE_GRACE_S if current_platform.is_cpu() else None
        self.llm.llm_engine.engine_core.shutdown(timeout=grace)


def _own_copy(tokenizer: Any) -> Any:
    """A fast tokenizer copied (its settings are its own); a slow one is shared: its state
    is read only."""
    import copy

    return copy.deepcopy(tokenizer) if getattr(tokenizer, "is_fast", False) else tokenizer


def _exit_codes(procs: list[Any]) -> list[int | None]:
    """The processes' exit codes, waited for up to EXIT_WAIT_S: a pipe can close before its
    process is reaped, and vLLM's liveness monitor reaps it from another thread, so a
    `join` here can find it gone and read no code before that thread records one."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p.exitcode for p in procs]


class ReplayEngine:
    """Completion text comes from an input column; the same path from render to commit."""

    def __init__(self, spec: EngineSpec):
        self.tokenizer = None
        self.layout = None
        self.max_model_len = spec.max_model_len
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
            finish_reason=req.replay_finish_reason, prompt_token_ids=None, ttft_s=None,
            latency_s=None,
        ))

    def render(self, req: RowRequest, prev: PromptHistory | None) -> PromptHistory | None:
        """Nothing to render: no prompt is tokenized."""
        return None

    def poll(self) -> list[Generation]:
        done = list(self._done)
        self._done.clear()
        return done

    def abort(self, keys: Iterable[str]) -> None:
        drop = set(keys)
        self._done = deque(g for g in self._done if g.key not in drop)

    def guard(self, markers: Iterable[str]) -> None:
        """Nothing to guard: no prompt is tokenized."""

    def close(self) -> None:
        pass


_ENGINES: dict[str, Engine] = {}


def get_engine(spec: EngineSpec, parsers: ParserSpec, seeded: bool = False) -> Engine:
    """One engine per process and spec: loaded once, reused by every shard and flow run.
    `seeded`: requests may sample with a seed (engine_settings.may_seed), which some
    platforms need settings for.

    Keyed by what the engine is built from (the `vllm.LLM` arguments), not by the
    fingerprint's SPEED_ONLY list: that answers another question (`replay_column`
    changes rows but not the engine; `gpu_memory_utilization` the engine but not rows)."""
    kwargs, choices = machine_kwargs(spec, parsers, seeded) if spec.kind == "vllm" else (
        llm_kwargs(spec, parsers), [])
    if spec.kind == "vllm":  # asks the workers their attention backend (engine_settings)
        kwargs.setdefault("worker_extension_cls", engine_settings.PROBE)
    key = json.dumps({"kind": spec.kind, **kwargs}, sort_keys=True, default=str)
    if key not in _ENGINES:
        _ENGINES[key] = (VllmEngine(spec, kwargs, choices) if spec.kind == "vllm"
                         else ReplayEngine(spec))
    return _ENGINES[key]


def drop_engine(engine: Engine) -> None:
    """Shut an engine down and forget it (what is left of a dead one too), so the next
    get_engine of its spec loads a fresh one."""
    for key in [k for k, e in _ENGINES.items() if e is engine]:
        del _ENGINES[key]
    try:
        engine.close()
    except Exception as e:  # its processes are gone already: nothing left to stop
        log.info("closing the dead engine: %s: %s", type(e).__name__, e)


def restart_engine(spec: EngineSpec, parsers: ParserSpec, dead: Engine,
                   seeded: bool = False) -> Engine:
    """A fresh engine in place of one whose processes died (what is left of it is shut
    down first, so two engines never hold the accelerators at once)."""
    drop_engine(dead)
    return get_engine(spec, parsers, seeded)


def close_engines() -> None:
    """Stop engine processes cleanly before the interpreter exits."""
    while _ENGINES:
        _ENGINES.popitem()[1].close()
