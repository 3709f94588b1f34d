"""Forged control tokens in a prompt through the real engine and the in-process flow, with
both of the miniature's tokenizers (its Hugging Face one, and one of Kimi-K2-Thinking's
class, which ignores split_special_tokens and lists `<think>` and the tool-call markers
only in tiktoken's special table): the prompt is tokenized as text unless the job trusts
its data, to the same token count either way, and the rows come out the same
(tests/tasks/rows/test_prompt_tokens.py checks the token ids themselves without an engine)."""

from __future__ import annotations

import re

import pyarrow.dataset as ds
import pytest

from tests.conftest import (PER_RUN_COLUMNS, TOKENIZERS, engine_section, job_dict,
                            write_prompts)
from tests.tasks.rows.test_prompt_tokens import FORGED_PROMPT

pytestmark = pytest.mark.engine

CLEAN = re.sub(r"<\|im_end\|>|</?think>", "", FORGED_PROMPT)


@pytest.fixture(scope="module")
def runs(tiny_model: str, tiny_tiktoken_model: str, prefect_harness,
         tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], dict[str, dict]]:
    """Rows by id, per (tokenizer, allow_special_tokens); an engine per tokenizer, the
    same random weights (load_format dummy)."""
    from thinkbatch.flows.job import generate_dataset

    root = tmp_path_factory.mktemp("forged")
    write_prompts(root / "in.parquet", [{"id": "forged", "prompt": FORGED_PROMPT, "topic": "t"},
                                        {"id": "clean", "prompt": CLEAN, "topic": "t"}])
    engines = {"hf": engine_section(tiny_model),
               "tiktoken": engine_section(tiny_tiktoken_model, trust_remote_code=True)}
    out = {}
    for name in TOKENIZERS:
        for allow in (False, True):
            path = root / f"out-{name}-{allow}"
            generate_dataset(job_dict(root / "in.parquet", path, engines[name],
                                      input={"allow_special_tokens": allow},
                                      output={"keep_raw_text": True}))
            rows = ds.dataset(path / "data").to_table().to_pylist()
            out[name, allow] = {r["id"]: r for r in rows}
    return out


def _content_tokens(tokenizer, text: str, split: bool) -> int:
    return len(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_engine_tokenizes_forged_markers_as_text(runs, tiny_model: str, tokenizer: str) -> None:
    """Counted with the Hugging Face tokenizer, which honours split_special_tokens: the
    tiktoken one must give the same ids without it."""
    from vllm.tokenizers import get_tokenizer

    hf = get_tokenizer(tiny_model)
    for allow in (False, True):
        rows = runs[tokenizer, allow]
        assert {r["status"] for r in rows.values()} == {"ok"}, rows
        # The user message sits between two template markers, so it is tokenized on its own.
        want = (rows["clean"]["prompt_tokens"] - _content_tokens(hf, CLEAN, False)
                + _content_tokens(hf, FORGED_PROMPT, split=not allow))
        assert rows["forged"]["prompt_tokens"] == want, allow


def test_both_tokenizers_write_the_same_rows(runs) -> None:
    """The same prompt, the same weights and seed: the same rows, raw text first, with no
    space after a kept special token."""
    for allow in (False, True):
        hf, tiktoken = ({k: {c: v for c, v in r.items() if c not in PER_RUN_COLUMNS} for k, r in
                         runs[name, allow].items()} for name in TOKENIZERS)
        assert all(r["raw_text"].startswith("<think>") for r in tiktoken.values()), tiktoken
        assert tiktoken == hf, allow
