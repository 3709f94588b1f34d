"""Synthetic tasks that the trained miniature Kimi-K2 learns, the tools it calls, and
scorers for its output rows and conversations.

Two kinds of prompt, each with the completion Kimi-K2-Thinking would give:

- ``math``: a word problem on two 2-digit numbers (add or take away); the thinking
  names what is counted and works the sum column by column, so a 2-layer model can
  learn it, then the answer states the number and the item;
- ``tool``: a weather, local-time or unit-conversion question; the thinking names the
  tool, then one Kimi tool call carries the arguments copied from the question. Given
  the tool's result (a ``tool`` message), the second turn thinks once more and answers
  with the returned value ("It is 21 °C and sunny in Vienna."), or says the tool failed.

The tools (`get_weather`, `get_time`, `convert_units`) are examples/tools.py's, which the
rollout demo serves: plain, deterministic functions of their arguments, so a rollout's
expected answer is known (`tool_result`).

Every task has a key: for math the operation and the two numbers, for tools the tool, its
arguments and the question's template. A stable hash of the key puts it in the train or
held-out split, so no held-out sum and no held-out question is ever trained on.

    python -m miniature.tiny_tasks OUT_DIR [N]   # held-out prompts as Parquet
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

NAMES = ("Sam", "Ana", "Li", "Omar", "Mia", "Ravi", "Zoe", "Ken", "Ada", "Tom")
ITEMS = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps")
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Perth", "London",
          "Berlin", "Rome", "Madrid", "Seoul", "Dublin", "Vienna", "Nairobi", "Boston", "Sydney",
          "Toronto", "Lisbon", "Prague", "Athens", "Dakar", "Hanoi", "Denver", "Havana", "Riga",
          "Manila", "Cusco", "Zurich")
UNITS = (("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"),
         ("meters", "feet"), ("feet", "meters"), ("celsius", "fahrenheit"),
         ("fahrenheit", "celsius"), ("liters", "gallons"), ("gallons", "liters"))

ADD_TEMPLATES = (
    "{name} has {a} {item} and buys {b} more. How many now?",
    "{name} had {a} {item} and found {b} more. How many {item} does {name} have?",
    "There are {a} {item} in a box and {name} adds {b}. How many are in the box?",
    "{name} gets {a} {item} on Monday and {b} on Tuesday. How many in total?",
)
SUB_TEMPLATES = (
    "{name} has {a} {item} and gives away {b}. How many are left?",
    "{name} had {a} {item} and sold {b}. How many remain?",
    "There are {a} {item} in a box and {name} takes {b}. How many are still in the box?",
)
WEATHER_TEMPLATES = (
    "What is the weather in {city} right now?",
    "Will it rain in {city} today?",
    "How warm is it in {city}?",
    "Is it sunny in {city}?",
    "Check the weather for {city}, please.",
)
TIME_TEMPLATES = (
    "What time is it in {city}?",
    "Tell me the local time in {city}.",
    "Is it night in {city} now?",
    "What is the local time in {city}?",
    "Could you check the time in {city}?",
)
CONVERT_TEMPLATES = (
    "Convert {value} {src} to {dst}.",
    "How many {dst} is {value} {src}?",
    "What is {value} {src} in {dst}?",
)

SYSTEM_PROMPTS = (None, "You are a careful assistant. Think, then answer or call a tool.",
                  "You are a helpful assistant.")
HELD_OUT_PERCENT = 20
_NUMBER = re.compile(r"-?\d+")

Kind = Literal["math", "tool"]


def _example_tools() -> ModuleType:
    """examples/tools.py, the rollout demo's tools (examples/ is not a package): the one
    definition of what the tools return, for the trainer, the scorer and the jobs."""
    spec = importlib.util.spec_from_file_location(
        "example_tools", Path(__file__).resolve().parent.parent / "examples" / "tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE_TOOLS = _example_tools()
SKIES: tuple[str, ...] = EXAMPLE_TOOLS.SKIES
get_weather, get_time, convert_units = (EXAMPLE_TOOLS.get_weather, EXAMPLE_TOOLS.get_time,
                                        EXAMPLE_TOOLS.convert_units)


def _num(value: float) -> str:
    """A number as people write it: 843, 2.5 (no trailing .0)."""
    return f"{value:g}" if float(value).is_integer() else f"{value}"


TOOLS = {f.__name__: f for f in (get_weather, get_time, convert_units)}


def _schema(fn: Any, params: dict[str, str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": fn.__name__, "description": " ".join(fn.__doc__.split()),
        "parameters": {"additionalProperties": False,
                       "properties": {k: {"type": t} for k, t in params.items()},
                       "required": list(params), "type": "object"}}}


# The tools as a rollout job declares them to the model: the schemas thinkbatch's Python
# toolbox derives from examples/tools.py. The trainer also varies their wording.
TOOL_SCHEMAS: list[dict[str, Any]] = [
    _schema(get_weather, {"city": "string"}), _schema(get_time, {"city": "string"}),
    _schema(convert_units, {"value": "number", "from_unit": "string", "to_unit": "string"}),
]


def tool_result(name: str, args: dict[str, Any]) -> str:
    """What tool `name` returns for `args`: the one source of the tools' results."""
    return TOOLS[name](**args)


@dataclass(frozen=True, slots=True)
class Task:
    """One prompt with the completion to learn and what a correct output contains."""

    key: str
    kind: Kind
    prompt: str
    reasoning: str
    answer: str | None = None
    tool_name: str | None = None
    tool_args: dict[str, Any] | None = None

    @property
    def completion(self) -> str:
        """The assistant text after the generation prompt, in Kimi-K2-Thinking's format."""
        head = f"<think>{self.reasoning}</think>"
        if self.tool_name is None:
            return f"{head}{self.answer}<|im_end|>"
        call = (f"<|tool_call_begin|>functions.{self.tool_name}:0<|tool_call_argument_begin|>"
                f"{json.dumps(self.tool_args)}<|tool_call_end|>")
        return f"{head}<|tool_calls_section_begin|>{call}<|tool_calls_section_end|><|im_end|>"

    @property
    def call_id(self) -> str:
        return f"functions.{self.tool_name}:0"

    def call_message(self, *, keep_reasoning: bool = True) -> dict[str, Any]:
        """The first turn as the rollout loop records it (OpenAI format, Kimi's call id)."""
        return {"role": "assistant", "content": "",
                "reasoning_content": self.reasoning if keep_reasoning else "",
                "tool_calls": [{"id": self.call_id, "type": "function", "function": {
                    "name": self.tool_name, "arguments": json.dumps(self.tool_args)}}]}

    def result_message(self, content: str, *, named: bool = True) -> dict[str, Any]:
        """The tool's result (or error text) as the `tool` message that answers the call."""
        name = {"name": self.tool_name} if named else {}
        return {"role": "tool", "tool_call_id": self.call_id, **name, "content": content}

    def final(self, content: str, *, failed: bool) -> tuple[str, str]:
        """The second turn's reasoning and answer: the returned value restated, or that
        the tool failed. The thinking copies the value from the tool's message into the
        answer's own sentence, which the answer then repeats word for word: a small
        model copies a token by matching the tokens before it, so the same words before
        each digit make the second copy safe ("it is -2" thought, "It is 2" answered)."""
        args = self.tool_args or {}
        if self.tool_name == "convert_units":
            fact = f"{_num(args['value'])} {args['from_unit']} is {content}"
            miss = f"convert {_num(args['value'])} {args['from_unit']} to {args['to_unit']}"
        else:
            what = "weather" if self.tool_name == "get_weather" else "local time"
            fact = f"It is {content} in {args['city']}"
            miss = f"get the {what} in {args['city']}"
        if failed:
            return (f"{self.tool_name} failed, so I cannot {miss}.",
                    f"Sorry, I could not {miss}.")
        return f"{self.tool_name} says: {fact}.", f"{fact}."

    def final_completion(self, content: str, *, failed: bool) -> str:
        reasoning, answer = self.final(content, failed=failed)
        return f"<think>{reasoning}</think>{answer}<|im_end|>"

    @property
    def expected(self) -> str:
        """The expected answer number or tool call, as text (a Parquet-friendly column)."""
        if self.tool_name is None:
            return _NUMBER.findall(self.answer or "")[-1]
        return json.dumps({"name": self.tool_name, "arguments": self.tool_args})


def _digits(n: int) -> tuple[int, int]:
    return n // 10, n % 10


def _add_working(a: int, b: int) -> str:
    """Column addition, ones first. Both numbers have two digits, so every digit of the
    working sits at a fixed distance from ``<think>``: each step is a one-digit sum of
    the two digits just written, which a 2-layer model learns as a table."""
    (a10, a1), (b10, b1) = _digits(a), _digits(b)
    ones = a1 + b1
    carry = ones // 10
    tens = a10 + b10 + carry
    return (f"{a}+{b}. {a1}+{b1}={ones}, write {ones % 10} carry {carry}. "
            f"{a10}+{b10}+{carry}={tens}. Answer {a + b}.")


def _sub_working(a: int, b: int) -> str:
    """Column subtraction, ones first, borrowing ten when the top digit is smaller."""
    (a10, a1), (b10, b1) = _digits(a), _digits(b)
    borrow = int(a1 < b1)
    top = 10 * borrow + a1
    tens = a10 - b10 - borrow
    return (f"{a}-{b}. {top}-{b1}={top - b1}, borrow {borrow}. "
            f"{a10}-{b10}-{borrow}={tens}. Answer {a - b}.")


def _math_task(rng: random.Random) -> Task:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        t = rng.randrange(len(ADD_TEMPLATES))
        prompt = ADD_TEMPLATES[t].format(name=name, item=item, a=a, b=b)
        reasoning, result, op = _add_working(a, b), a + b, "add"
    else:
        a, b = max(a, b), min(a, b)
        t = rng.randrange(len(SUB_TEMPLATES))
        prompt = SUB_TEMPLATES[t].format(name=name, item=item, a=a, b=b)
        reasoning, result, op = _sub_working(a, b), a - b, "sub"
    # Naming the item first, where the query is always the same, teaches the model to
    # find it in the question; asked only after the digits, a 2-layer model guesses it.
    return Task(key=f"math:{op}:{a}:{b}", kind="math", prompt=prompt,
                reasoning=f"Count {item}: {reasoning}",
                answer=f"{result} {item}.")


def _tool_task(rng: random.Random) -> Task:
    tool = rng.choice(("get_weather", "get_time", "convert_units"))
    if tool == "convert_units":
        (src, dst), value = rng.choice(UNITS), rng.randint(1, 999)
        t = rng.randrange(len(CONVERT_TEMPLATES))
        prompt = CONVERT_TEMPLATES[t].format(value=value, src=src, dst=dst)
        args: dict[str, Any] = {"value": value, "from_unit": src, "to_unit": dst}
        reasoning = f"The user wants {value} {src} in {dst}. I will call convert_units."
        key = f"tool:{tool}:{value}:{src}:{dst}"
    else:
        city = rng.choice(CITIES)
        templates = WEATHER_TEMPLATES if tool == "get_weather" else TIME_TEMPLATES
        t = rng.randrange(len(templates))
        prompt = templates[t].format(city=city)
        args = {"city": city}
        what = "weather" if tool == "get_weather" else "local time"
        reasoning = f"The user asks about the {what} in {city}. I will call {tool}."
        key = f"tool:{tool}:{city}:{t}"
    return Task(key=key, kind="tool", prompt=prompt, reasoning=reasoning, tool_name=tool,
                tool_args=args)


def is_held_out(key: str) -> bool:
    """A stable split: the same key is held out on every machine and every run."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def tasks(n: int, *, held_out: bool, seed: int) -> list[Task]:
    """`n` tasks of the chosen split, half math and half tool, deterministic for a seed."""
    rng = random.Random(seed)
    out: list[Task] = []
    while len(out) < n:
        task = _math_task(rng) if len(out) % 2 == 0 else _tool_task(rng)
        if is_held_out(task.key) == held_out:
            out.append(task)
    return out


def heldout_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    """Held-out prompts as input rows; `expected` is the answer number or the tool call."""
    return [{"id": f"heldout-{i:04d}", "kind": t.kind, "prompt": t.prompt, "expected": t.expected}
            for i, t in enumerate(tasks(n, held_out=True, seed=seed))]


def score(row: dict[str, Any], kind: str, expected: str) -> dict[str, bool]:
    """Check an output row (reasoning / answer / tool_calls) against the expected result.

    `formatted`: reasoning plus an answer or a tool call; `correct`: for math the last
    number of the answer is the result, for tools exactly one call with the right name and
    arguments (compared as JSON values, so spacing and key order do not matter).
    """
    calls = row.get("tool_calls") or []
    formatted = bool((row.get("reasoning") or "").strip()) and bool(
        (row.get("answer") or "").strip() or calls)
    if kind == "math":
        numbers = _NUMBER.findall(row.get("answer") or "")
        correct = not calls and bool(numbers) and int(numbers[-1]) == int(expected)
    else:
        want = json.loads(expected)
        correct = len(calls) == 1 and calls[0]["name"] == want["name"] and _json(
            calls[0]["arguments"]) == want["arguments"]
    return {"formatted": formatted, "correct": correct}


def _json(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except json.JSONDecodeError:
        return None


def _rate(scores: list[tuple[str, dict[str, bool]]], kind: str | None, field: str) -> float:
    """The share of scores (of `kind`, or all) whose `field` holds, to 4 places."""
    picked = [s[field] for k, s in scores if kind is None or k == kind]
    return round(sum(picked) / len(picked), 4) if picked else 0.0


def summarize(scores: list[tuple[str, dict[str, bool]]]) -> dict[str, Any]:
    """The evaluation's figures from (kind, score) pairs."""
    return {
        "rows": len(scores),
        "math_rows": sum(k == "math" for k, _ in scores),
        "tool_rows": sum(k == "tool" for k, _ in scores),
        "formatted_rate": _rate(scores, None, "formatted"),
        "tool_call_accuracy": _rate(scores, "tool", "correct"),
        "math_accuracy": _rate(scores, "math", "correct"),
    }


def score_rollout(row: dict[str, Any], kind: str, expected: str) -> dict[str, bool]:
    """Check a rollout's output row (one conversation: `turns`, final `answer`, `status`).

    `answered`: status ok and the last turn answers (text, no tool call pending);
    `called_right`: for tools the first turn makes exactly the expected call, for math it
    makes none; `states_value`: for tools the final answer contains the text a tool call
    of the conversation returned (not an error), for math its last number is the result;
    `correct`: all three. A row without `turns` counts as one turn.
    """
    turns = row.get("turns") or [{"tool_calls": row.get("tool_calls"), "tool_results": []}]
    answer = (row.get("answer") or "").strip()
    answered = row.get("status") == "ok" and bool(answer) and not turns[-1].get("tool_calls")
    first = score({"reasoning": "-", "answer": answer if len(turns) == 1 else "",
                   "tool_calls": turns[0].get("tool_calls")}, kind, expected)
    if kind == "math":
        called_right = not turns[0].get("tool_calls")
        states_value = first["correct"]
    else:
        called_right = first["correct"]
        returned = [r["content"] for t in turns for r in t.get("tool_results") or []
                    if not r.get("error") and (r.get("content") or "").strip()]
        states_value = any(value.strip() in answer for value in returned)
    return {"answered": answered, "called_right": called_right, "states_value": states_value,
            "correct": answered and called_right and states_value}


def summarize_rollouts(scores: list[tuple[str, dict[str, bool]]]) -> dict[str, Any]:
    """The rollout evaluation's figures from (kind, score_rollout) pairs."""
    return {
        "conversations": len(scores),
        "tool_conversations": sum(k == "tool" for k, _ in scores),
        "answered_rate": _rate(scores, None, "answered"),
        "tool_answered_rate": _rate(scores, "tool", "answered"),
        "tool_call_accuracy": _rate(scores, "tool", "called_right"),
        "states_value_rate": _rate(scores, "tool", "states_value"),
        "math_accuracy": _rate(scores, "math", "correct"),
        "correct_rate": _rate(scores, None, "correct"),
    }


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(sys.argv[1]) / "heldout.parquet"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(heldout_rows(n)), out)
    print(out)


if __name__ == "__main__":
    main()
