"""The trained miniature Kimi-K2 (real weights) through the in-process flow: checks what
the output says, not only its shape. Greedy decoding on held-out prompts; the bounds sit
below the figures measured on 200 prompts (benchmarks/results/tiny_model_eval.json), so
they fail when the model, the chat template, the engine (e.g. vLLM's CPU rotary kernel,
see deployments/presets/trained-miniature.yaml) or the kimi_k2 parsers break.

Each check runs with both of the miniature's tokenizers (its Hugging Face one, and one of
Kimi-K2-Thinking's class: slow, over tiktoken, loaded with trust_remote_code), an engine
each, loaded once; the two write the same rows, from the same token ids, as vLLM's own
`LLM.chat` path gives."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from miniature.tiny_tasks import ITEMS, heldout_rows, score, summarize
from tests.conftest import (PER_RUN_COLUMNS, TOKENIZERS, engine_section, job_dict,
                            tokenizer_engine, write_prompts)
from thinkbatch.flows.job import generate_dataset
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.record import Generation

pytestmark = pytest.mark.engine

WORKING = re.compile(r"(?P<a>\d+)[+-](?P<b>\d+)\. .* Answer (?P<result>\d+)\.")
NUMBER = re.compile(r"\d+")
ROWS = 40
CHAT_ROWS = 4  # through vLLM's own LLM.chat too: two arithmetic, two tool prompts


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("trained")
    write_prompts(root / "in.parquet", heldout_rows(ROWS))
    return {name: job_dict(
        root / "in.parquet", root / f"out-{name}",
        engine_section(preset="trained-miniature", **tokenizer_engine(name)),
        input={"passthrough_columns": ["kind", "expected"]},
        sampling={"temperature": 0.0, "max_tokens": 160, "structured_outputs": None},
        output={"keep_raw_text": True},
    ) for name in TOKENIZERS}


@pytest.fixture(scope="module")
def runs(prefect_harness, jobs: dict[str, dict[str, Any]]) -> dict[str, list[dict]]:
    out = {}
    for name, job in jobs.items():
        generate_dataset(job)
        table = ds.dataset(job["output"]["path"] + "/data", format="parquet").to_table()
        out[name] = sorted(table.to_pylist(), key=lambda r: r["id"])
    return out


@pytest.fixture(params=TOKENIZERS)
def rows(request, runs: dict[str, list[dict]]) -> list[dict]:
    return runs[request.param]


def test_every_row_is_well_formed_kimi_output(rows: list[dict]) -> None:
    assert len(rows) == ROWS
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    figures = summarize([(r["kind"], score(r, r["kind"], r["expected"])) for r in rows])
    assert figures["formatted_rate"] >= 0.95, figures
    # The model emits the think markers as special tokens: vLLM's parser counts the
    # reasoning's tokens, fewer than the completion's.
    assert all(0 < r["reasoning_tokens"] < r["completion_tokens"] for r in rows), rows
    for r in rows:
        if r["kind"] == "tool" and r["tool_calls"]:
            assert r["answer"] is None, r
            (call,) = r["tool_calls"]
            assert call["id"] == f"functions.{call['name']}:0", r
        # The columns are the raw text, marker for marker, and nothing else: no space
        # before `<think>` (vLLM's slow-tokenizer detokenizer adds one unless told not to).
        assert r["raw_text"] == _kimi_text(r), r


def _kimi_text(row: dict) -> str:
    """The completion Kimi-K2-Thinking writes for the row's columns."""
    calls = "".join(f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>{c['arguments']}"
                    "<|tool_call_end|>" for c in row["tool_calls"] or ())
    section = f"<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>" if calls else ""
    return f"<think>{row['reasoning']}</think>{row['answer'] or ''}{section}"


def test_tool_calls_name_the_right_function_with_the_arguments(rows: list[dict]) -> None:
    tools = [r for r in rows if r["kind"] == "tool"]
    figures = summarize([("tool", score(r, "tool", r["expected"])) for r in tools])
    assert figures["tool_call_accuracy"] >= 0.85, [
        (r["id"], r["expected"], r["tool_calls"]) for r in tools
        if not score(r, "tool", r["expected"])["correct"]]
    assert all(json.loads(r["expected"])["name"] in r["reasoning"] for r in tools
               if score(r, "tool", r["expected"])["correct"])


def test_arithmetic_is_worked_from_the_question_and_answered_right(rows: list[dict]) -> None:
    """The working restates the question's numbers, the answer states the working's
    result and the question's item, and most results are right (the eval measures the
    rate on 200 prompts)."""
    prompts = {r["id"]: r["prompt"] for r in heldout_rows(ROWS)}
    math = [r for r in rows if r["kind"] == "math"]
    worked = answered = named = 0
    for r in math:
        a, b = NUMBER.findall(prompts[r["id"]])
        (item,) = [w for w in ITEMS if f" {w} " in prompts[r["id"]]]
        found = WORKING.search(r["reasoning"] or "")
        worked += bool(found) and (found["a"], found["b"]) == (a, b)
        answered += bool(found) and NUMBER.findall(r["answer"] or "")[-1:] == [found["result"]]
        named += (r["answer"] or "").endswith(f" {item}.")
    assert min(worked, answered, named) >= 0.9 * len(math), (worked, answered, named, math)
    figures = summarize([("math", score(r, "math", r["expected"])) for r in math])
    assert figures["math_accuracy"] >= 0.7, [
        (r["id"], r["expected"], r["reasoning"], r["answer"]) for r in math
        if not score(r, "math", r["expected"])["correct"]]


def test_both_tokenizers_write_the_same_rows(runs: dict[str, list[dict]]) -> None:
    """Raw text and every column but the timings; no space after a kept special token
    (vLLM's slow-tokenizer detokenizer writes one unless told not to)."""
    hf, tiktoken = ([{k: v for k, v in r.items() if k not in PER_RUN_COLUMNS} for r in runs[name]]
                    for name in TOKENIZERS)
    assert all(r["raw_text"].startswith("<think>") for r in tiktoken), tiktoken[:2]
    assert tiktoken == hf


def test_vllms_own_chat_path_gives_our_ids_and_columns(jobs, runs) -> None:
    """`LLM.chat` (vLLM's own render and detokenizer) with the SamplingParams the job
    sends: the prompt ids thinkbatch handed the engine and the completion it wrote, parsed
    into the same columns; the same ids with both tokenizers."""
    from thinkbatch.tasks.rows.engine import get_engine
    from thinkbatch.tasks.rows.parse import OutputParser
    from thinkbatch.tasks.rows.prompt_tokens import chat_prompt
    from thinkbatch.tasks.rows.sampling import SamplingBuilder

    prompts = heldout_rows(CHAT_ROWS)
    ids, columns = {}, {}
    for name in TOKENIZERS:
        job = load_job(inline=jobs[name])
        engine = get_engine(job.engine, job.parsers)
        messages = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
        outs = engine.llm.chat(messages, SamplingBuilder(job).for_sample(None, 0, 0),
                               use_tqdm=False)
        ours = [chat_prompt(engine._render, engine._control, m, None, {},
                            allow_special_tokens=False)["prompt_token_ids"] for m in messages]
        assert [list(o.prompt_token_ids) for o in outs] == ours, name
        parser = OutputParser(job.parsers, engine.tokenizer, job.engine.model)
        written = {r["id"]: r for r in runs[name]}
        columns[name] = []
        for p, out in zip(prompts, outs):
            row, comp = written[p["id"]], out.outputs[0]
            assert (comp.text, len(comp.token_ids)) == (row["raw_text"], row["completion_tokens"])
            parsed = parser.parse(Generation(p["id"], comp.text, comp.token_ids,
                                             comp.finish_reason, out.prompt_token_ids,
                                             None, None), None, {})
            columns[name].append((parsed.status.value, parsed.reasoning, parsed.answer,
                                  parsed.tool_calls, parsed.reasoning_tokens))
            assert columns[name][-1] == (row["status"], row["reasoning"], row["answer"],
                                         row["tool_calls"], row["reasoning_tokens"])
        ids[name] = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    assert ids["tiktoken"] == ids["hf"]
    assert columns["tiktoken"] == columns["hf"]


# A JSON schema for the answer that the trained model never saw: its answer is forced.
ANSWER_SCHEMA = {"type": "string", "pattern": "^[0-9]+ [a-z]+[.]$"}


def test_a_structured_answer_leaves_the_thinking_free(jobs: dict[str, dict[str, Any]],
                                                      runs: dict[str, list[dict]],
                                                      tmp_path: Path) -> None:
    """The engine knows the reasoning parser (`--reasoning-parser kimi_k2`), so the
    grammar starts after `</think>`: the thinking is the model's own free text, the same
    as without the schema (greedy), and the answer is what the schema allows."""
    math = [r for r in heldout_rows(ROWS) if r["kind"] == "math"]
    write_prompts(tmp_path / "in.parquet", math)
    job = job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        jobs["hf"]["engine"],  # the runs' engine, loaded once
        input={"passthrough_columns": ["kind", "expected"]},
        sampling={"temperature": 0.0, "max_tokens": 160,
                  "structured_outputs": {"json": ANSWER_SCHEMA}})
    generate_dataset(job)
    constrained = ds.dataset(tmp_path / "out" / "data", format="parquet").to_table().to_pylist()
    assert len(constrained) == len(math)
    assert all(r["status"] == "ok" for r in constrained), constrained  # else schema_error
    assert all(re.fullmatch(r"\d+ [a-z]+\.", json.loads(r["answer"])) for r in constrained)
    assert all(WORKING.search(r["reasoning"] or "") for r in constrained), constrained
    free = {r["id"]: r["reasoning"] for r in runs["hf"]}
    same = [r["id"] for r in constrained if r["reasoning"] == free[r["id"]]]
    assert len(same) >= 0.9 * len(math), [(r["reasoning"], free[r["id"]]) for r in constrained]
