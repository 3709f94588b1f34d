"""Synthetic tasks that the trained miniature Kimi-K2 learns, and a scorer for its output rows.

Two kinds of prompt, each with the completion Kimi-K2-Thinking would give:

- ``math``: a word problem on two 2-digit numbers (add or take away); the thinking
  names what is counted and works the sum column by column, so a 2-layer model can
  learn it, then the answer states the number and the item;
- ``tool``: a weather, local-time or unit-conversion question; the thinking names the
  tool, then one Kimi tool call carries the arguments copied from the question.

Every task has a key: for math the operation and the two numbers, for tools the tool, its
arguments and the question's template. A stable hash of the key puts it in the train or
held-out split, so no held-out sum and no held-out question is ever trained on.

    python -m miniature.tiny_tasks OUT_DIR [N]   # held-out prompts as Parquet
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
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
        args: dict[str, Any] = {"value": value, "from": src, "to": dst}
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


def summarize(scores: list[tuple[str, dict[str, bool]]]) -> dict[str, Any]:
    """The evaluation's figures from (kind, score) pairs."""
    def rate(kind: str | None, field: str) -> float:
        picked = [s[field] for k, s in scores if kind is None or k == kind]
        return round(sum(picked) / len(picked), 4) if picked else 0.0

    return {
        "rows": len(scores),
        "math_rows": sum(k == "math" for k, _ in scores),
        "tool_rows": sum(k == "tool" for k, _ in scores),
        "formatted_rate": rate(None, "formatted"),
        "tool_call_accuracy": rate("tool", "correct"),
        "math_accuracy": rate("math", "correct"),
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
