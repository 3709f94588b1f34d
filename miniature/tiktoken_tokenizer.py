"""The miniature with a second tokenizer, of the class Kimi-K2-Thinking ships: a model
folder like the real one (config, weights, `tiktoken.model`, the tokenizer's Python file,
a tokenizer_config.json whose `auto_map` names it), loaded with `trust_remote_code`.

The rank file is the miniature's Hugging Face BPE (`tokenizer.json`) in tiktoken's format:
each token's bytes with its id as rank. Every merged token's id is its merge's place in
the merge list (+ 256), so tiktoken's lowest-rank-first merging makes the same tokens and
the ids stay the same (tests/miniature/test_tiktoken_tokenizer.py checks thousands of
strings); the control tokens go to tiktoken's special table through `added_tokens_decoder`.
The weights are a relative link to the source folder's, not a copy.

    python -m miniature.tiktoken_tokenizer SRC_MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

CLASS_FILE = Path(__file__).with_name("tokenization_tiny_kimi.py")
WEIGHTS = "model.safetensors"
COPIED = ("config.json", "generation_config.json")


def _byte_of() -> dict[str, int]:
    from miniature.tokenization_tiny_kimi import _byte_chars

    return {c: b for b, c in _byte_chars().items()}


def rank_lines(tokenizer_json: dict[str, Any]) -> list[str]:
    """tiktoken's `base64(token bytes) rank` lines, rank = the Hugging Face id."""
    byte_of = _byte_of()
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    return [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {i}"
            for token, i in sorted(vocab.items(), key=lambda item: item[1])]


def tokenizer_config(tokenizer_json: dict[str, Any], hf_config: dict[str, Any]) -> dict[str, Any]:
    """Kimi's layout: every control token in `added_tokens_decoder` (the class reads it
    itself), the class named in `auto_map`; the rest as the Hugging Face tokenizer has it."""
    added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                               "single_word", "special")}
             for t in tokenizer_json["added_tokens"]}
    return {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": [f"{CLASS_FILE.stem}.TikTokenTokenizer", None]},
        "added_tokens_decoder": added,
        **{k: hf_config[k] for k in ("bos_token", "eos_token", "pad_token", "model_max_length",
                                     "clean_up_tokenization_spaces", "chat_template")},
    }


def write_tiktoken_model(src: str | Path, out: str | Path) -> Path:
    """The model folder `src` (the miniature's, with its Hugging Face tokenizer) as `out`
    with the tiktoken tokenizer in its place."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = json.loads((src / "tokenizer.json").read_text())
    hf_config = json.loads((src / "tokenizer_config.json").read_text())
    (out / "tiktoken.model").write_text("\n".join(rank_lines(tokenizer_json)) + "\n")
    shutil.copyfile(CLASS_FILE, out / CLASS_FILE.name)
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tokenizer_json, hf_config), indent=2) + "\n")
    for name in COPIED:
        shutil.copyfile(src / name, out / name)
    if (src / WEIGHTS).exists():
        link = out / WEIGHTS
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath((src / WEIGHTS).resolve(), out.resolve()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(write_tiktoken_model(args.src, args.out))


if __name__ == "__main__":
    main()
