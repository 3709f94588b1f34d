"""Train the miniature Kimi-K2 on the synthetic tasks, so its greedy output makes sense.

The random-weight miniature of `miniature/tiny_model.py` exercises the code paths but
emits noise. This script trains the same architecture (transformers'
``DeepseekV3ForCausalLM``: MLA with kv_lora_rank 512 and rope dim 64, dense layers
then one MoE layer of 8 routed experts + 1 shared) on `miniature/tiny_tasks.py`, so that
it thinks in ``<think>`` tags, then answers arithmetic word problems or calls a tool
in Kimi-K2-Thinking's tool-call format, and, given the tool's result, thinks once more
and answers with the returned value. vLLM's CPU build loads the result with real
weights, given the engine settings of the `trained-miniature` preset;
``assets/tiny-kimi-thinking/`` is its output.

Settings: hidden 256, 4 heads, 3 layers (two dense, one MoE), vocab 1024 (3.8 M
parameters, 7.6 MB in bfloat16); float32 on CPU with one thread, loss on the assistant
turns only; AdamW with linear warm-up and cosine decay, in two stages (see SINGLE_LR and
LR below):
1. 1000 steps of 32 single turns (half math, half tool calls), lr 2e-3, on two layers
   (the first dense one and the MoE one);
2. the middle dense layer inserted (`grown`), then 1400 steps of conversations, lr 5e-4:
   whole tool conversations (call, result, answer; results drawn at random so the model
   copies them), math, and every fifth step a smaller batch with the tools declared.
Seeded: the data, the initialisation and the order are the same on every run.

    python -m miniature.train_tiny_model OUT_DIR [--single-steps N] [--steps N] [--stage1 DIR]

`--stage1 DIR` saves stage 1 there (weights and data rng), or, when it is already
there, starts from it: stage 2 can then be tried again without stage 1's time. The
committed weights: stage 1 took 38.5 min and stage 2 48.4 min, on a 2-core machine
shared with other work. Their stage 1 was saved by an earlier revision of this file,
before the conversion tool's arguments were renamed (from/to -> from_unit/to_unit);
stage 2 taught the new names. A fresh run of this file therefore writes weights that
differ from the committed ones: measure them with `miniature.eval_tiny_model`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
)

from miniature.tiny_model import MARKER, write_tiny_model
from miniature.tiny_tasks import (
    SKIES,
    SYSTEM_PROMPTS,
    TOOL_SCHEMAS,
    Task,
    tasks,
    tool_result,
)

SEED = 0
SETTINGS: dict[str, Any] = {"layers": 3, "dense_layers": 2, "hidden_size": 256, "heads": 4,
                            "routed_experts": 8, "vocab_size": 1024,
                            "max_position_embeddings": 1024, "dtype": "bfloat16"}
# Stage 1 trains two of the three layers (the first dense, the MoE one); stage 2 starts by
# inserting the middle dense layer between them (see `grown`).
STAGE1_LAYERS, INSERTED = 2, 1
BATCH = 32
# Two stages, each with its own AdamW and schedule (linear warm-up, cosine decay):
# 1. single turns, the earlier recipe: math and tool first turns mixed, no tools declared.
#    Short sequences, so cheap; here the 2-layer model learns to copy and to add (a run of
#    the conversation mix alone from scratch had not, after 700 steps);
# 2. conversations: math, and tool tasks as whole conversations, from stage 1's weights.
#    Every fifth step the prompts declare tools (Kimi's tool_declare block,
#    ~300 tokens): a rollout job declares its tools, and a model never shown the block
#    loses its skills behind it. Fewer sequences in those steps keep them as cheap.
SINGLE_LR, SINGLE_WARMUP = 2e-3, 50
LR, WARMUP = 5e-4, 30
CYCLE = ("tool", "math", "tool", "tool", "declared")  # stage 2's batches, in turn
DECLARED_BATCH = 8
IGNORE = -100
# Shares of tool conversations whose tool failed (error text), whose first turn's
# reasoning is missing from the history, and whose tool message has no name.
FAILED, NO_REASONING, UNNAMED = 0.08, 0.15, 0.1
ERRORS = ("error: tool {name!r} failed: ValueError: cannot do that",
          "error: tool {name!r} failed: RuntimeError: service unavailable",
          "error: tool {name!r} timed out after 30 s", "error: unknown tool {name!r}",
          "error: invalid arguments for {name!r}: city: Field required",
          "error: no recorded result for call 'functions.{name}:0' of tool {name!r}",
          "Error executing tool {name}: connection closed")
OTHER_TOOLS = (("search_web", "Search the web; the top results as text.", {"query": "string"}),
               ("get_stock_price", "The last price of a stock.", {"symbol": "string"}),
               ("slow_echo", "Echo the text after a delay.", {"text": "string",
                                                              "seconds": "number"}),
               ("flaky", "A tool that sometimes fails.", {}))


def messages(task: Task, rng: random.Random) -> list[dict[str, Any]]:
    """The request, with the default or one of a few system prompts, as jobs send it."""
    system = rng.choice(SYSTEM_PROMPTS)
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": task.prompt}]


def declared_tools(rng: random.Random) -> list[dict[str, Any]]:
    """The three tools in varied wording (toolboxes derive schemas their own way: titles,
    key order, no description), sometimes beside other tools, in varied order."""
    out = []
    for schema in TOOL_SCHEMAS:
        fn = json.loads(json.dumps(schema["function"]))
        params = fn["parameters"]
        if rng.random() < 0.15:
            fn.pop("description")
        elif rng.random() < 0.2:
            fn["description"] = fn["description"].split(":")[0].split(",")[0].rstrip(".") + "."
        if rng.random() < 0.4:
            params.pop("additionalProperties")
        if rng.random() < 0.3:  # pydantic's style, as MCP servers declare tools
            for key, prop in params["properties"].items():
                prop["title"] = key.replace("_", " ").title()
            params["title"] = f"{fn['name']}Arguments"
        if rng.random() < 0.1:
            params.pop("required")
        if rng.random() < 0.3:  # written by hand: type first
            fn["parameters"] = {"type": "object", **{k: v for k, v in params.items()
                                                     if k != "type"}}
        out.append({"type": "function", "function": fn})
    for name, doc, props in rng.sample(OTHER_TOOLS, rng.choice((0, 0, 0, 1, 2))):
        out.append({"type": "function", "function": {
            "name": name, "description": doc, "parameters": {
                "type": "object", "properties": {k: {"type": t} for k, t in props.items()},
                "required": list(props)}}})
    rng.shuffle(out)
    return out


def sampled_result(task: Task, rng: random.Random) -> tuple[str, bool]:
    """A tool result, or an error text. Weather and time are drawn at random in the
    tools' format, so the model copies them instead of remembering a city's weather; a
    conversion is the tool's own: a run on drawn conversions (which only copying gets
    right) stated fewer held-out ones right, as the model also learns roughly what
    716 kg is in pounds, which helps it copy the digits."""
    if rng.random() < FAILED:
        return rng.choice(ERRORS).format(name=task.tool_name), True
    if task.tool_name == "get_weather":
        return f"{rng.randint(-15, 40)} °C and {rng.choice(SKIES)}", False
    if task.tool_name == "get_time":
        return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}", False
    return tool_result(task.tool_name, task.tool_args or {}), False


def segments(tokenizer: PreTrainedTokenizerFast, task: Task, rng: random.Random,
             tools: list[dict[str, Any]] | None, single: bool = False) -> list[tuple[str, bool]]:
    """The sequence as (text, learned) pieces. A tool task is the whole conversation
    (unless `single`): request, the call (learned), the tool's result, the answer
    (learned), as the chat template renders the history of a rollout's second turn."""
    def render(msgs: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False,
                                             add_generation_prompt=True)

    head = messages(task, rng)
    prompt = render(head)
    if task.tool_name is None or single:
        return [(prompt, False), (task.completion, True)]
    keep = rng.random() >= NO_REASONING
    content, failed = sampled_result(task, rng)
    history = render([*head, task.call_message(keep_reasoning=keep),
                      task.result_message(content, named=rng.random() >= UNNAMED)])
    first = task.completion if keep else task.completion.replace(
        f"<think>{task.reasoning}</think>", "<think></think>")
    assert history.startswith(prompt + first), (prompt + first, history)
    return [(prompt, False), (first, keep), (history[len(prompt + first):], False),
            (task.final_completion(content, failed=failed), True)]


def encode(tokenizer: PreTrainedTokenizerFast, batch: list[Task], rng: random.Random,
           declared: bool, single: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels, right-padded; only the assistant turns are learned. Every
    piece boundary is a control token, so encoding the pieces apart gives the ids of
    the whole text."""
    ids, labels = [], []
    for task in batch:
        tools = declared_tools(rng) if declared else None
        seq, lab = [], []
        for text, learned in segments(tokenizer, task, rng, tools, single):
            piece = tokenizer.encode(text, add_special_tokens=False)
            seq += piece
            lab += piece if learned else [IGNORE] * len(piece)
        ids.append(seq)
        labels.append(lab)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            torch.tensor([y + [IGNORE] * (width - len(y)) for y in labels]))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


Plan = list[tuple[list[Task], bool, bool]]  # per step: tasks, tools declared, single turns


def single_turns(steps: int) -> Plan:
    """Stage 1: `BATCH` first turns a step, math and tool in turn."""
    data = tasks(steps * BATCH, held_out=False, seed=SEED)
    return [(data[step * BATCH:(step + 1) * BATCH], False, True) for step in range(steps)]


def conversations(steps: int) -> Plan:
    """Stage 2: tool-conversation and math batches (alike lengths pad little) and a
    smaller mixed batch with declared tools, in the turn of CYCLE."""
    data = tasks(2 * steps * BATCH, held_out=False, seed=SEED + 1)  # 3/5 of steps are tool
    math = iter([t for t in data if t.kind == "math"])
    tool = iter([t for t in data if t.kind == "tool"])
    out: Plan = []
    for step in range(steps):
        kind = CYCLE[step % len(CYCLE)]
        if kind == "declared":
            out.append(([next(math if i % 2 else tool) for i in range(DECLARED_BATCH)],
                        True, False))
        else:
            out.append(([next(math if kind == "math" else tool) for _ in range(BATCH)],
                        False, False))
    return out


def train(model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast, plan: Plan,
          peak: float, warmup: int, rng: random.Random) -> None:
    """One stage: a fresh AdamW over the plan's steps."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=peak, betas=(0.9, 0.98))
    model.train()
    start = time.monotonic()
    for step, (batch, declared, single) in enumerate(plan):
        ids, labels = encode(tokenizer, batch, rng, declared, single)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(plan), peak, warmup)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == len(plan) - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.monotonic() - start:6.0f}s",
                  flush=True)


def unfused_state_dict(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """bfloat16 weights named as DeepSeek-V3 checkpoints are, one tensor per expert
    projection, which is what vLLM's deepseek_v2 loader reads."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"] = gate
                out[f"{base}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                out[f"{base}{e}.down_proj.weight"] = down
        else:
            out[name] = tensor
    return {k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous()
            for k, v in out.items()}


def greedy_check(model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                 n: int = 16) -> dict[str, float]:
    """Shares of `n` held-out tasks whose greedy completion is exactly the target: first
    turns without and with declared tools, and the tool tasks' second turns given the
    tools' own results."""
    model.eval()
    rng = random.Random(SEED)

    def complete(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        prompt = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False,
                                               add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        out = model.generate(ids, max_new_tokens=96, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)

    hits = {"first": 0, "first_declared": 0, "second": 0}
    held_out = tasks(n, held_out=True, seed=SEED + 1)
    with torch.no_grad():
        for task in held_out:
            head = messages(task, rng)
            hits["first"] += complete(head, None) == task.completion
            hits["first_declared"] += complete(head, TOOL_SCHEMAS) == task.completion
            if task.tool_name is not None:
                value = tool_result(task.tool_name, task.tool_args or {})
                history = [*head, task.call_message(), task.result_message(value)]
                hits["second"] += complete(history, TOOL_SCHEMAS) == task.final_completion(
                    value, failed=False)
    tool_tasks = sum(t.tool_name is not None for t in held_out)
    return {"first": hits["first"] / n, "first_declared": hits["first_declared"] / n,
            "second": hits["second"] / tool_tasks}


def stage1_config(config: DeepseekV3Config) -> DeepseekV3Config:
    """The model's config without the layer that stage 2 inserts: what stage 1 trains."""
    return DeepseekV3Config.from_dict({**config.to_dict(), "num_hidden_layers": STAGE1_LAYERS,
                                       "first_k_dense_replace": INSERTED})


def grown(model: DeepseekV3ForCausalLM, config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    """Stage 1's model with a dense layer inserted at INSERTED that passes its input
    through (its output projections zero), so the grown model computes what stage 1's
    did. Copying a tool's value digit by digit ("22:49", "-2 °C") needs a match on the
    two tokens before each digit; the third layer gives stage 2 room for that, and
    growing keeps stage 1's 38 minutes (2-layer stage 2 runs stated 80-87% of
    the held-out values, 3 layers after 1400 steps 96%)."""
    big = DeepseekV3ForCausalLM(config).float()
    prefix = f"model.layers.{INSERTED}."
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            name = f"model.layers.{int(index) + (int(index) >= INSERTED)}.{rest}"
        state[name] = tensor
    fresh = {k: v for k, v in big.state_dict().items() if k.startswith(prefix)}
    for name, tensor in fresh.items():
        zero = name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
        state[name] = torch.zeros_like(tensor) if zero else tensor
    big.load_state_dict(state)
    return big


def single_stage(model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                 steps: int, saved: Path | None) -> random.Random:
    """Stage 1, or its result as saved in `saved` by an earlier run (float32 weights and
    the data rng, so stage 2 continues as if in one run); the rng for stage 2."""
    if saved is not None and (saved / "stage1.pt").exists():
        model.load_state_dict(torch.load(saved / "stage1.pt"))
        rng = random.Random()
        rng.setstate(pickle.loads((saved / "rng.pkl").read_bytes()))
        print(f"stage 1: loaded from {saved}", flush=True)
        return rng
    rng = random.Random(SEED)
    print("stage 1: single turns", flush=True)
    train(model, tokenizer, single_turns(steps), SINGLE_LR, SINGLE_WARMUP, rng)
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), saved / "stage1.pt")
        (saved / "rng.pkl").write_bytes(pickle.dumps(rng.getstate()))
    return rng


def build(out_dir: Path, single_steps: int, steps: int, stage1: Path | None = None) -> Path:
    """Write config and tokenizer, train, and write the weights beside them."""
    torch.manual_seed(SEED)
    # One thread: the weights do not depend on the core count, and a busy machine does
    # not stall the step (two threads on two shared cores ran 4x slower than one).
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # tiny values as denormals slow CPU steps several-fold
    out = write_tiny_model(out_dir, **SETTINGS)
    (out / MARKER).unlink()  # the marker means "config only"; this folder has weights
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    config = DeepseekV3Config.from_dict(json.loads((out / "config.json").read_text()))
    model = DeepseekV3ForCausalLM(stage1_config(config)).float()
    start = time.monotonic()
    rng = single_stage(model, tokenizer, single_steps, stage1)
    model = grown(model, config)
    print(f"stage 2: conversations ({(time.monotonic() - start) / 60:.1f} min so far)",
          flush=True)
    train(model, tokenizer, conversations(steps), LR, WARMUP, rng)
    minutes = (time.monotonic() - start) / 60
    from safetensors.torch import save_file

    save_file(unfused_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"trained {single_steps} + {steps} steps in {minutes:.1f} min; "
          f"held-out greedy exact match {greedy_check(model, tokenizer)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--single-steps", type=int, default=1000, help="stage 1's steps")
    parser.add_argument("--steps", type=int, default=1400, help="stage 2's steps")
    parser.add_argument("--stage1", type=Path, default=None,
                        help="folder to save stage 1 in, or to load it from if saved there")
    args = parser.parse_args()
    print(build(args.out_dir, args.single_steps, args.steps, args.stage1))


if __name__ == "__main__":
    main()
