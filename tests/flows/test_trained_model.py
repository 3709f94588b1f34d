"""The trained miniature Kimi-K2 (real weights) through the in-process flow: checks what
the output says, not only its shape. Greedy decoding on held-out prompts; the bounds sit
below the figures measured on 200 prompts (benchmarks/results/tiny_model_eval.json), so
they fail when the model, the chat template, the engine (e.g. vLLM's CPU rotary kernel,
see deployments/presets/trained-miniature.yaml) or the kimi_k2 parsers break."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from miniature.tiny_tasks import ITEMS, heldout_rows, score, summarize
from tests.conftest import engine_section, job_dict, write_prompts
from thinkbatch.flows.job import generate_dataset

pytestmark = pytest.mark.engine

WORKING = re.compile(r"(?P<a>\d+)[+-](?P<b>\d+)\. .* Answer (?P<result>\d+)\.")
NUMBER = re.compile(r"\d+")
MODEL = Path(__file__).resolve().parents[2] / "assets" / "tiny-kimi-thinking"
ROWS = 40


@pytest.fixture(scope="module")
def rows(prefect_harness, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("trained")
    write_prompts(root / "in.parquet", heldout_rows(ROWS))
    job = job_dict(
        root / "in.parquet", root / "out", engine_section(str(MODEL), "trained-miniature"),
        input={"passthrough_columns": ["kind", "expected"]},
        sampling={"temperature": 0.0, "max_tokens": 160, "structured_outputs": None},
    )
    generate_dataset(job)
    return ds.dataset(root / "out" / "data", format="parquet").to_table().to_pylist()


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


# A JSON schema for the answer that the trained model never saw: its answer is forced.
ANSWER_SCHEMA = {"type": "string", "pattern": "^[0-9]+ [a-z]+[.]$"}


def test_a_structured_answer_leaves_the_thinking_free(rows: list[dict], tmp_path: Path) -> None:
    """The engine knows the reasoning parser (`--reasoning-parser kimi_k2`), so the
    grammar starts after `</think>`: the thinking is the model's own free text, the same
    as without the schema (greedy), and the answer is what the schema allows."""
    math = [r for r in heldout_rows(ROWS) if r["kind"] == "math"]
    write_prompts(tmp_path / "in.parquet", math)
    job = job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(str(MODEL), "trained-miniature"),  # the rows fixture's engine
        input={"passthrough_columns": ["kind", "expected"]},
        sampling={"temperature": 0.0, "max_tokens": 160,
                  "structured_outputs": {"json": ANSWER_SCHEMA}})
    generate_dataset(job)
    constrained = ds.dataset(tmp_path / "out" / "data", format="parquet").to_table().to_pylist()
    assert len(constrained) == len(math)
    assert all(r["status"] == "ok" for r in constrained), constrained  # else schema_error
    assert all(re.fullmatch(r"\d+ [a-z]+\.", json.loads(r["answer"])) for r in constrained)
    assert all(WORKING.search(r["reasoning"] or "") for r in constrained), constrained
    free = {r["id"]: r["reasoning"] for r in rows}
    same = [r["id"] for r in constrained if r["reasoning"] == free[r["id"]]]
    assert len(same) >= 0.9 * len(math), [(r["reasoning"], free[r["id"]]) for r in constrained]
