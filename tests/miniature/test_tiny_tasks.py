"""The trained miniature's kit: its tools' results, the second turn it learns, the scorer
of rollout rows, and the conversations the trainer learns from, rendered by the chat
template as Kimi-K2-Thinking's own template renders them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from miniature import tiny_tasks as tt
from miniature.train_tiny_model import segments

MODEL = Path(__file__).resolve().parents[2] / "assets" / "tiny-kimi-thinking"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(MODEL)


def first(tool: str) -> tt.Task:
    return next(t for t in tt.tasks(60, held_out=True, seed=1) if t.tool_name == tool)


def test_tools_are_deterministic_text_of_their_arguments():
    # Fixed by a SHA-256 of the argument, so the same in every process and on every run.
    assert tt.tool_result("get_weather", {"city": "Vienna"}) == "20 °C and stormy"
    assert tt.tool_result("get_weather", {"city": "Dakar"}) == "9 °C and sunny"
    assert tt.tool_result("get_time", {"city": "Oslo"}) == "21:44"
    assert tt.tool_result("convert_units", {"value": 100, "from_unit": "km",
                                            "to_unit": "miles"}) == "62.1 miles"
    assert tt.convert_units(100, "celsius", "fahrenheit") == "212 fahrenheit"
    assert tt.convert_units(5, "fahrenheit", "celsius") == "-15.0 celsius"
    with pytest.raises(ValueError, match="cannot convert km to kg"):
        tt.convert_units(1, "km", "kg")


def test_the_second_turn_states_the_returned_value():
    weather, convert = first("get_weather"), first("convert_units")
    value = tt.tool_result("get_weather", weather.tool_args)
    reasoning, answer = weather.final(value, failed=False)
    assert answer == f"It is {value} in {weather.tool_args['city']}."
    assert reasoning == f"get_weather says: {answer}"
    args = convert.tool_args
    value = tt.tool_result("convert_units", args)
    assert convert.final(value, failed=False)[1] == f"{args['value']} {args['from_unit']} is {value}."
    assert convert.final("error: boom", failed=True)[1].startswith("Sorry, I could not convert")


def conversation(task: tt.Task, answer: str, content: str, error: str | None = None,
                 pending: bool = False) -> dict:
    call = {"id": task.call_id, "name": task.tool_name, "arguments": json.dumps(task.tool_args)}
    return {"status": "max_turns" if pending else "ok", "answer": None if pending else answer,
            "turns": [{"tool_calls": [call], "tool_results": [
                {"call_id": task.call_id, "name": task.tool_name, "content": content,
                 "error": error}]},
                      {"tool_calls": [call] if pending else None, "tool_results": []}]}


def test_score_rollout_needs_an_answer_the_right_call_and_the_value():
    task = first("get_weather")
    value = tt.tool_result("get_weather", task.tool_args)
    good = tt.score_rollout(conversation(task, task.final(value, failed=False)[1], value),
                            "tool", task.expected)
    assert good == {"answered": True, "called_right": True, "states_value": True,
                    "correct": True}
    wrong = tt.score_rollout(conversation(task, "It is 99 °C and sunny.", value), "tool",
                             task.expected)
    assert wrong["answered"] and not wrong["states_value"] and not wrong["correct"]
    failed = tt.score_rollout(conversation(task, "Sorry, error: x", "error: x", error="error: x"),
                              "tool", task.expected)
    assert not failed["states_value"]
    pending = tt.score_rollout(conversation(task, "", value, pending=True), "tool",
                               task.expected)
    assert not pending["answered"] and pending["called_right"]
    math = next(t for t in tt.tasks(4, held_out=True, seed=1) if t.kind == "math")
    row = {"status": "ok", "answer": math.answer, "turns": [{"tool_calls": None}]}
    assert tt.score_rollout(row, "math", math.expected)["correct"]
    summary = tt.summarize_rollouts([("tool", good), ("tool", wrong), ("math", good)])
    assert summary["states_value_rate"] == 0.5 and summary["answered_rate"] == 1.0


def test_a_tool_turn_renders_as_kimi_k2_thinking_renders_it(tokenizer):
    """Interleaved thinking: the reasoning of the turns after the last answer stays in
    <think>, the call in Kimi's section markers, the result as a tool message under the
    tool's name with `## Return of` its call id; once a later turn answers, earlier
    reasoning renders as an empty <think></think> (as in Kimi-K2-Thinking's template)."""
    task = first("get_weather")
    value = tt.tool_result("get_weather", task.tool_args)
    history = [{"role": "user", "content": task.prompt}, task.call_message(),
               task.result_message(value)]
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot "
        f"AI.<|im_end|><|im_user|>user<|im_middle|>{task.prompt}<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|><think>{task.reasoning}</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        f"<|tool_call_argument_begin|>{json.dumps(task.tool_args)}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
        f"<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{value}"
        "<|im_end|><|im_assistant|>assistant<|im_middle|>")
    reasoning, answer = task.final(value, failed=False)
    later = [*history, {"role": "assistant", "content": answer, "reasoning_content": reasoning},
             {"role": "user", "content": "Thanks!"}]
    text = tokenizer.apply_chat_template(later, tokenize=False, add_generation_prompt=True)
    assert task.reasoning not in text and reasoning not in text
    assert text.count("<think></think>") == 2


def test_the_trainer_learns_both_turns_of_the_rendered_conversation(tokenizer):
    """The trained sequence is the second turn's prompt as the template renders it, then
    the answer; its pieces encode to the ids of the whole text."""
    rng = random.Random(0)
    for task in tt.tasks(24, held_out=False, seed=0)[1::2]:
        pieces = segments(tokenizer, task, rng, tt.TOOL_SCHEMAS)
        whole = "".join(text for text, _ in pieces)
        assert pieces[-1][1] and pieces[-1][0].startswith("<think>")
        prompt = whole[: -len(pieces[-1][0])]
        assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>")
        assert prompt.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
        assert f"## Return of {task.call_id}\n" in prompt
        ids = [i for text, _ in pieces for i in tokenizer.encode(text, add_special_tokens=False)]
        assert ids == tokenizer.encode(whole, add_special_tokens=False)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    """The trainer's model settings, narrower: a config that trains in a blink."""
    from transformers import DeepseekV3Config

    from miniature.tiny_model import write_tiny_model
    from miniature.train_tiny_model import SETTINGS

    small = {**SETTINGS, "hidden_size": 64, "routed_experts": 2}
    folder = write_tiny_model(tmp_path_factory.mktemp("small") / "m", **small)
    return DeepseekV3Config.from_dict(json.loads((folder / "config.json").read_text()))


def test_stage1_saved_then_loaded_continues_alike(tokenizer, small_config, tmp_path):
    """`--stage1 DIR`: a second run starts stage 2 from the same weights and data rng."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from miniature.train_tiny_model import single_stage

    config = small_config
    torch.manual_seed(0)
    trained = DeepseekV3ForCausalLM(config).float()
    rng = single_stage(trained, tokenizer, 1, tmp_path / "s1")
    loaded = DeepseekV3ForCausalLM(config).float()
    again = single_stage(loaded, tokenizer, 1, tmp_path / "s1")
    assert again.random() == rng.random()
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_growing_inserts_a_dense_layer_that_changes_nothing_yet(small_config):
    """Stage 2 starts from stage 1's two layers with the middle dense layer inserted: the
    grown model's logits are stage 1's, and stage 1's layers keep their weights."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from miniature.train_tiny_model import INSERTED, STAGE1_LAYERS, grown, stage1_config

    config = small_config
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(stage1_config(config)).float()
    for p in model.parameters():  # trained-looking weights, not the initial ones
        p.data += 0.05 * torch.randn_like(p)
    big = grown(model, config)
    assert len(big.model.layers) == config.num_hidden_layers == STAGE1_LAYERS + 1
    assert type(big.model.layers[INSERTED].mlp) is type(model.model.layers[0].mlp)
    assert torch.equal(big.model.layers[-1].mlp.gate.weight, model.model.layers[-1].mlp.gate.weight)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    model.eval(), big.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, big(ids).logits, atol=1e-5)
