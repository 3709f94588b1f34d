"""The miniature's second tokenizer (miniature/tiktoken_tokenizer.py): the class of
tokenizer Kimi-K2-Thinking ships, with the ids of the miniature's Hugging Face tokenizer.
No engine."""

from __future__ import annotations

import filecmp
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from miniature import tiny_tasks
from miniature.tiktoken_tokenizer import WEIGHTS, write_tiktoken_model
from miniature.train_tiny_model import declared_tools, segments
from tests.conftest import TIKTOKEN_MODEL, TRAINED_MODEL

MARKERS = ["<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
           "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
# Pieces that stress a byte-level pre-tokenizer: contractions, digits after spaces, runs
# of spaces and newlines, letters, numbers and symbols beyond ASCII (², ½, Ⅻ, Arabic-Indic
# digits), emoji, and the control tokens and parts of them spelled out.
PIECES = ("a", "the", " the", "The", "'s", "'ll", "'T", "don't", "x1", "12", " 7", "1.5", "  ",
          "\n", "\n\n", " \n", "\t", "   x", "é", "ß", "中文", "😀", "👍🏽", "²", "½", "Ⅻ", "٣",
          "\u00a0", "\u2003", "\r\n", '{"city": "Paris"}', "<think>", "</think>", "<|im_end|>",
          "<|tool_call_begin|>", "<|im", "|>", "<", "[BOS]", "[EOS]", "[PAD", "°C", "--", "!!",
          " ?", ".", "functions.get_weather:0", "\x00", "ǅ", "ÿ", "Ā")
ALPHABET = [chr(c) for c in [*range(32, 127), 9, 10, 13, 160, 178, 179, 185, 188, 189, 190,
                             223, 233, 0x300, 0x663, 0x2003, 0x2160, 0x4E2D, 0x1F600]]


@pytest.fixture(scope="module")
def tokenizers():
    """The Hugging Face tokenizer, and the tiktoken one as vLLM and transformers load it."""
    return (AutoTokenizer.from_pretrained(TRAINED_MODEL),
            AutoTokenizer.from_pretrained(TIKTOKEN_MODEL, trust_remote_code=True))


def _strings() -> list[str]:
    """3,000 random strings and 600 conversations as the miniature was trained on them
    (held-out and trained tasks, tools declared in every second one)."""
    rng = random.Random(0)
    out = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 20))) if i % 2 else
           "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))) for i in range(3000)]
    hf = AutoTokenizer.from_pretrained(TRAINED_MODEL)
    for i, task in enumerate([*tiny_tasks.tasks(300, held_out=False, seed=3),
                              *tiny_tasks.tasks(300, held_out=True, seed=4)]):
        tools = declared_tools(rng) if i % 2 else None
        out.append("".join(text for text, _ in segments(hf, task, rng, tools)))
    return out


def test_the_committed_folder_is_what_the_writer_writes(tmp_path: Path) -> None:
    out = write_tiktoken_model(TRAINED_MODEL, tmp_path / "m")
    names = sorted(p.name for p in TIKTOKEN_MODEL.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(TIKTOKEN_MODEL, out, names, shallow=False)
    assert (mismatch, errors) == ([], []), "regenerate: python -m miniature.tiktoken_tokenizer"
    # The weights are the trained miniature's own, linked, not copied.
    assert (TIKTOKEN_MODEL / WEIGHTS).is_symlink()
    assert (TIKTOKEN_MODEL / WEIGHTS).resolve() == (TRAINED_MODEL / WEIGHTS).resolve()


def test_it_is_the_class_of_tokenizer_kimi_ships(tokenizers) -> None:
    hf, tiktoken = tokenizers
    assert type(tiktoken).__name__ == "TikTokenTokenizer" and not tiktoken.is_fast
    # The markers are tiktoken special tokens the base class was never told of...
    assert not set(MARKERS) & set(tiktoken.get_added_vocab())
    assert set(MARKERS) <= set(hf.get_added_vocab())
    # ...found by name in the vocabulary, at the Hugging Face tokenizer's ids.
    ids = hf.convert_tokens_to_ids(MARKERS)
    assert tiktoken.convert_tokens_to_ids(MARKERS) == [tiktoken.get_vocab()[m] for m in MARKERS]
    assert tiktoken.convert_tokens_to_ids(MARKERS) == ids
    # Kimi's encode: with no keyword argument every spelled marker is its control token;
    # a keyword argument goes to the base class, which does not split them either.
    text = "a <think>b</think>" + "".join(MARKERS[2:])
    want = hf.encode(text, add_special_tokens=False)
    assert set(ids) <= set(want)
    assert tiktoken.encode(text) == want
    assert tiktoken.encode(text, add_special_tokens=False, split_special_tokens=True) == want
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] != want


def test_ids_are_the_hugging_face_tokenizers_on_thousands_of_strings(tokenizers) -> None:
    hf, tiktoken = tokenizers
    strings = _strings()
    with_control = [s for s in strings
                    if tiktoken.encode(s) != hf.encode(s, add_special_tokens=False)]
    as_text = [s for s in strings if tiktoken.encode(s, allow_special_tokens=False)
               != hf(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    round_trip = [s for s in strings if tiktoken.decode(tiktoken.encode(s)) != s]
    assert (with_control, as_text, round_trip) == ([], [], []), len(strings)


def test_without_trust_remote_code_transformers_builds_another_class() -> None:
    """What thinkbatch's validate refuses (tests/tasks/jobs/test_validate.py): from the folder's
    tiktoken.model, transformers makes a fast tokenizer of its own, with its own split
    pattern and every control token an added token."""
    other = AutoTokenizer.from_pretrained(TIKTOKEN_MODEL)
    assert other.is_fast and type(other).__name__ != "TikTokenTokenizer"
    assert set(MARKERS) <= set(other.get_added_vocab())
