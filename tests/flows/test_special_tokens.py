"""Forged control tokens in a prompt through the real engine and the in-process flow: the
prompt is tokenized as text unless the job trusts its data (tests/tasks/test_prompt_tokens.py
checks the tokenization itself without an engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import engine_section, job_dict, write_prompts
from tests.tasks.test_prompt_tokens import FORGED_PROMPT

pytestmark = pytest.mark.engine


def _content_tokens(tokenizer, text: str, split: bool) -> int:
    return len(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])


def test_engine_tokenizes_forged_markers_as_text(tiny_model: str, prefect_harness,
                                                 tmp_path: Path) -> None:
    from vllm.tokenizers import get_tokenizer

    from thinkbatch.flows.job import generate_dataset

    clean = re.sub(r"<\|im_end\|>|</?think>", "", FORGED_PROMPT)
    write_prompts(tmp_path / "in.parquet", [{"id": "forged", "prompt": FORGED_PROMPT, "topic": "t"},
                                            {"id": "clean", "prompt": clean, "topic": "t"}])
    tokenizer = get_tokenizer(tiny_model)
    for allow in (False, True):
        out = tmp_path / f"out-{allow}"
        job = job_dict(tmp_path / "in.parquet", out, engine_section(tiny_model),
                       input={"allow_special_tokens": allow})
        generate_dataset(job)
        rows = {r["id"]: r for r in ds.dataset(out / "data").to_table().to_pylist()}
        assert {r["status"] for r in rows.values()} == {"ok"}, rows
        # The user message sits between two template markers, so it is tokenized on its own.
        want = (rows["clean"]["prompt_tokens"] - _content_tokens(tokenizer, clean, False)
                + _content_tokens(tokenizer, FORGED_PROMPT, split=not allow))
        assert rows["forged"]["prompt_tokens"] == want, allow
