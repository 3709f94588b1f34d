"""What every benchmark shares: the model, the engine section, sizes, scratch space.

The engine section is one dict, used both as the job's `engine:` and (through
thinkbatch's own `machine_kwargs`) as bare vLLM's `LLM(...)` arguments, so the two sides
of a comparison can never run different engine settings.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"

# The miniature for CPU runs: 4 layers, hidden 512 makes one decode step at batch 64
# cost ~50 ms on 2 cores, the order of an accelerator step for a large MoE, so host
# work has to overlap generation as it must on a GPU node.
MINI = dict(layers=4, hidden_size=512, heads=4, routed_experts=8, vocab_size=1024,
            max_position_embeddings=4096)
# On top of the random-weight miniature's CPU settings (the random-miniature preset's
# engine section, which the demos and tests name): longer sequences, more KV cache, and
# a larger batch to keep 2 cores busy.
MINI_OVER: dict[str, Any] = {
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 1 << 30,
    "max_in_flight": 128,
    "max_num_seqs": 64,
}


@dataclass
class Context:
    model: str
    engine: dict[str, Any]  # the job's engine section, without `kind`
    mini: bool  # the generated miniature: sizes are picked for a 2-core CPU
    quick: bool
    work: Path  # scratch: inputs, outputs, job files
    python: str = sys.executable
    notes: list[str] = field(default_factory=list)

    def engine_section(self, **over: Any) -> dict[str, Any]:
        return {**self.engine, **over}

    @property
    def tokenizer_dir(self) -> str:
        return self.engine.get("tokenizer") or self.model

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "miniature": self.mini, "quick": self.quick,
                "engine": self.engine}


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """`k=v` (YAML values) into an engine section, as thinkbatch's job file takes them:
    EngineSpec fields and vLLM engine arguments side by side."""
    section: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants k=v, got {pair!r}")
        section[key] = yaml.safe_load(raw)
    return section


def make_context(model: str | None, engine_args: list[str], quick: bool,
                 work: Path) -> Context:
    given = parse_engine_args(engine_args)
    if model:
        return Context(model=model, engine={**given, "model": model}, mini=False,
                       quick=quick, work=work)
    from thinkbatch.schemas.job_file import deep_merge, resolve_raw

    sys.path.append(str(HERE.parent))  # miniature/: the checkout's kit, not installed
    from miniature.tiny_model import write_tiny_model

    mini = str(write_tiny_model(CACHE / "bench-kimi", **MINI))
    preset = resolve_raw({}, preset="random-miniature")["engine"]
    engine = {**deep_merge(deep_merge(preset, MINI_OVER), given), "model": mini}
    return Context(model=mini, engine=engine, mini=True, quick=quick, work=work,
                   notes=[f"miniature DeepseekV3/Kimi-K2 {json.dumps(MINI)}, random weights"])
