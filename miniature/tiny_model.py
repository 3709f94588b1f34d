"""Write a miniature of Kimi-K2-Thinking as a local Hugging Face model folder.

The folder lets vLLM (CPU, ``load_format="dummy"``) run the real
DeepseekV3 / MLA / MoE code paths, the Kimi chat template and the
``kimi_k2`` reasoning and tool parsers without downloading anything:
the config is written by hand and the tokenizer is trained here.

    python -m miniature.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

MARKER = ".tiny_model.json"

# Kimi-K2's control tokens, in the order Kimi numbers them; they sit at the end
# of the vocabulary, after the trained byte-level BPE tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
    "[PAD]",
)

# Modelled on Kimi-K2-Thinking's template. Differences: a `thinking` kwarg
# (false pre-fills an empty `<think></think>` so the model answers directly,
# true leaves the model to open `<think>` itself, as Kimi-K2-Thinking does),
# and tool calls without an id get a Kimi-style `functions.NAME:INDEX` id.
CHAT_TEMPLATE = r"""
{%- macro content_text(message) -%}
  {%- if message.content is string -%}
    {{- message.content -}}
  {%- elif message.content is not none -%}
    {%- for part in message.content -%}
      {%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro header(message) -%}
  {%- set name = message.name or message.role -%}
  {%- if message.role == 'user' -%}
    {{- '<|im_user|>' + name + '<|im_middle|>' -}}
  {%- elif message.role == 'assistant' -%}
    {{- '<|im_assistant|>' + name + '<|im_middle|>' -}}
  {%- else -%}
    {{- '<|im_system|>' + name + '<|im_middle|>' -}}
  {%- endif -%}
{%- endmacro -%}
{%- macro tool_calls(message) -%}
  {{- '<|tool_calls_section_begin|>' -}}
  {%- for call in message.tool_calls -%}
    {%- set fn = call.function or call -%}
    {{- '<|tool_call_begin|>' + (call.id or 'functions.' + fn.name + ':' + loop.index0|string) -}}
    {{- '<|tool_call_argument_begin|>' -}}
    {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
    {{- '<|tool_call_end|>' -}}
  {%- endfor -%}
  {{- '<|tool_calls_section_end|>' -}}
{%- endmacro -%}
{#- Reasoning is kept only after the last assistant turn without tool calls. -#}
{%- set ns = namespace(last_answer=-1) -%}
{%- for message in messages -%}
  {%- if message.role == 'assistant' and not message.tool_calls -%}
    {%- set ns.last_answer = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {{- '<|im_system|>tool_declare<|im_middle|>' + tools | tojson(separators=(',', ':')) + '<|im_end|>' -}}
{%- endif -%}
{%- if not messages or messages[0].role != 'system' -%}
  {{- '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>' -}}
{%- endif -%}
{%- for message in messages -%}
  {{- header(message) -}}
  {%- if message.role == 'assistant' -%}
    {%- if loop.index0 > ns.last_answer -%}
      {{- '<think>' + (message.reasoning_content or message.reasoning or '') + '</think>' -}}
    {%- else -%}
      {{- '<think></think>' -}}
    {%- endif -%}
    {{- content_text(message) -}}
    {%- if message.tool_calls -%}{{- tool_calls(message) -}}{%- endif -%}
  {%- elif message.role == 'tool' -%}
    {{- '## Return of ' + (message.tool_call_id or '') + '\n' + content_text(message) -}}
  {%- else -%}
    {{- content_text(message) -}}
  {%- endif -%}
  {{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_assistant|>assistant<|im_middle|>' -}}
  {%- if thinking is defined and not thinking -%}{{- '<think></think>' -}}{%- endif -%}
{%- endif -%}
""".strip()

# Training text for the BPE merges: enough English, JSON and tool-call shapes
# that prompts tokenize into a few characters per token.
_WORDS = (
    "the be to of and a in that have it for not on with he as you do at this but "
    "his by from they we say her she or an will my one all would there their what "
    "so up out if about who get which go me when make can like time no just him "
    "know take people into year your good some could them see other than then now "
    "look only come its over think also back after use two how our work first well "
    "way even new want because any these give day most us is are was were answer "
    "question weather city temperature today tomorrow rain sunny cloudy hello hi "
    "please thank thanks help assistant user system tool function call arguments "
    "result return name value true false null number string object array type "
    "properties required description reasoning think step let me check get search "
    "Paris London Tokyo Berlin Rome Madrid degrees celsius fahrenheit json output "
    # The synthetic tasks of miniature/tiny_tasks.py, which the trained miniature learns.
    "Sam Ana Li Omar Mia Ravi Zoe Ken Ada Tom apples books coins pens cards eggs shells "
    "stamps has had buys found more many now does box adds gets Monday Tuesday total "
    "gives away left sold remain takes still write carry borrow Answer "
    "Lima Oslo Cairo Delhi Quito Perth Seoul Dublin Vienna Nairobi Boston Sydney Toronto "
    "Lisbon Prague Athens Dakar Hanoi Denver Havana Riga Manila Cusco Zurich rain warm "
    "night local Tell Could Convert Check convert units km miles kg pounds meters feet "
    "liters gallons wants asks I call get_weather get_time convert_units value from"
)
_SNIPPETS = (
    '{"city": "Paris"}',
    '{"type": "object", "properties": {"city": {"type": "string"}}}',
    "functions.get_weather:0",
    "## Return of functions.search:1\n",
    "1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
    "The answer is 42. Let me think step by step.",
)


def _corpus() -> list[str]:
    """Word lines in a few casings plus the snippets, so merges cover common shapes."""
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    cased = [line.capitalize() for line in lines] + [line.upper() for line in lines]
    return lines + cased + list(_SNIPPETS)


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (like Kimi's tiktoken BPE) and append Kimi's control tokens.

    The control tokens are special added tokens, so each is one id whatever
    text surrounds it; vLLM's kimi_k2 parsers find them by vocabulary lookup.
    """
    tokenizer = Tokenizer(models.BPE())
    # Digits split one by one (as in LLaMA), so numbers tokenize the same way everywhere
    # and the trained miniature can do column arithmetic digit by digit.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def model_config(
    *,
    vocab_size: int,
    token_ids: dict[str, int],
    layers: int,
    dense_layers: int,
    hidden_size: int,
    heads: int,
    routed_experts: int,
    max_position_embeddings: int,
    dtype: str,
) -> dict[str, Any]:
    """Kimi-K2-Thinking's config shrunk; MLA ranks stay at 512 + 64 because
    vLLM's CPU MLA decode kernel only supports a 576-wide latent cache."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "moe_intermediate_size": hidden_size // 2,
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": hidden_size // 4,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": routed_experts,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": dense_layers,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 50000.0,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": token_ids["[BOS]"],
        "eos_token_id": token_ids["[EOS]"],
        "pad_token_id": token_ids["[PAD]"],
        "torch_dtype": dtype,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    dense_layers: int = 1,
    hidden_size: int = 256,
    heads: int = 4,
    routed_experts: int = 8,
    vocab_size: int = 1024,
    max_position_embeddings: int = 4096,
    dtype: str = "bfloat16",
) -> Path:
    """Write config, generation config and tokenizer to `out_dir`.

    No weights are written: vLLM loads the folder with ``load_format="dummy"``.
    A marker holding a hash of the settings and of this file makes a second
    call with the same settings a no-op.
    """
    out = Path(out_dir)
    settings = {
        "layers": layers,
        "dense_layers": dense_layers,
        "hidden_size": hidden_size,
        "heads": heads,
        "routed_experts": routed_experts,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "dtype": dtype,
    }
    # Hashing this file too means any edit to the template, corpus or config
    # rebuilds folders written by an older version.
    key = json.dumps(settings, sort_keys=True).encode() + Path(__file__).read_bytes()
    digest = hashlib.sha256(key).hexdigest()
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return out

    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = model_config(
        vocab_size=tokenizer.get_vocab_size(),
        token_ids=token_ids,
        layers=layers,
        dense_layers=dense_layers,
        hidden_size=hidden_size,
        heads=heads,
        routed_experts=routed_experts,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
    )
    # Kimi ends a turn with <|im_end|>, so that is the tokenizer's EOS and
    # the first stop id; [EOS] stays a stop id as in Kimi's configs.
    generation_config = {
        "bos_token_id": token_ids["[BOS]"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["[EOS]"]],
        "pad_token_id": token_ids["[PAD]"],
    }
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "<|im_end|>",
        "pad_token": "[PAD]",
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config)
    _write_json(marker, {"sha256": digest})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--routed-experts", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--max-position-embeddings", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    print(write_tiny_model(**vars(parser.parse_args())))


if __name__ == "__main__":
    main()
