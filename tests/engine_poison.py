"""A vLLM logits processor for tests: a request whose sampling `extra_args` holds
`{"poison": true}` raises inside the engine (where vLLM adds it to the batch), which
kills vLLM's engine core, as a request that crashes a kernel does. Named by class path in
`engine.logits_processors`; rows set the flag through their sampling column."""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

PATH = f"{__name__}:PoisonPill"
MESSAGE = "poisoned request: the test's logits processor refuses it"
ROW_SAMPLING = '{"extra": {"extra_args": {"poison": true}}}'  # a row's sampling override


class PoisonPill(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: Any) -> Any:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        for _, params, _, _ in batch_update.added if batch_update else ():
            if (params.extra_args or {}).get("poison"):
                raise RuntimeError(MESSAGE)
