"""The miniature's tokenizer in the shape of Kimi-K2-Thinking's own (`tokenization_kimi.py`,
class `TikTokenTokenizer`): a slow transformers tokenizer over `tiktoken`, loaded with
`trust_remote_code` through the `auto_map` of its tokenizer_config.json.

What makes it another class of tokenizer than the miniature's Hugging Face one (same ids):
- the BPE ranks live in a `tiktoken.model` file and every control token lives in
  tiktoken's special-token table, read from `added_tokens_decoder`, which the base class
  never sees: it is told only about a few control tokens (`additional_special_tokens`)
  and bos/eos/pad, so `<think>` and the tool-call markers are not in `get_added_vocab()`;
- `encode(text)` with no keyword argument encodes every control token spelled in the text
  as that token; any keyword argument defers to the base class, whose `_tokenize` calls
  that same `encode`, so `split_special_tokens` is not honoured.

This file is copied into the tokenizer folder by `miniature.tiktoken_tokenizer`, which
is where transformers imports it from; it must not import anything from this repo.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer

# The miniature's Hugging Face pre-tokenizer in one pattern: GPT-2's byte-level split,
# then each digit on its own (its `Digits(individual_digits=True)` step), so a space
# before a number stands alone.
PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| (?=\p{N})|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

RESERVED_SPECIAL_TOKENS = 15
# Kimi's eight additional special tokens, less the three this vocabulary lacks
# (`<|start_header_id|>`, `<|end_header_id|>`, `[EOT]`).
ADDITIONAL_SPECIAL_TOKENS = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                             "<|im_middle|>"]


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, bos_token: str = "[BOS]", eos_token: str = "[EOS]",
                 unk_token: str | None = None, pad_token: str | None = None,
                 additional_special_tokens: list[str] | None = None,
                 added_tokens_decoder: dict[int, Any] | None = None, **kwargs: Any):
        self.vocab_file = vocab_file
        ranks = load_tiktoken_bpe(vocab_file)
        # Every id after the BPE ranks is a special token: named by added_tokens_decoder,
        # else reserved (Kimi reserves 258; the miniature's vocabulary has room for 15).
        names = {int(i): token.content for i, token in (added_tokens_decoder or {}).items()}
        specials = {names.get(i, f"<|reserved_token_{i}|>"): i
                    for i in range(len(ranks), len(ranks) + RESERVED_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(vocab_file).name, pat_str=PATTERN,
                                       mergeable_ranks=ranks, special_tokens=specials)
        chars = _byte_chars()
        self.byte_of = {c: b for b, c in chars.items()}
        self.decoder = {i: "".join(chars[b] for b in self.model.decode_single_token_bytes(i))
                        for i in range(self.model.n_vocab)}
        self.encoder = {token: i for i, token in self.decoder.items()}
        self.unk_id = specials.get(str(unk_token)) if unk_token else None
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token,
                         additional_special_tokens=(ADDITIONAL_SPECIAL_TOKENS
                                                    if additional_special_tokens is None
                                                    else additional_special_tokens),
                         **kwargs)

    def encode(self, text: str, allow_special_tokens: bool = True,  # type: ignore[override]
               **kwargs: Any) -> list[int]:
        """Kimi's: no keyword argument, and tiktoken encodes every special token spelled in
        the text as that token (unless `allow_special_tokens` is false); any other keyword
        argument goes to the base class."""
        if kwargs:
            return super().encode(text, **kwargs)
        if allow_special_tokens:
            return self.model.encode(text, allowed_special="all")
        return self.model.encode(text, disallowed_special=())

    def decode(self, token_ids: int | list[int], **kwargs: Any) -> str:  # type: ignore[override]
        if kwargs:
            return super().decode(token_ids, **kwargs)
        return self.model.decode([token_ids] if isinstance(token_ids, int) else list(token_ids))

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return self.encoder

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self.decoder[i] for i in self.encode(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self.encoder.get(token, self.unk_id)

    def _convert_id_to_token(self, index: int) -> str | None:
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(self.byte_of[c] for c in "".join(tokens)).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory: str,
                        filename_prefix: str | None = None) -> tuple[str]:
        out = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "")
                                      + self.vocab_files_names["vocab_file"])
        if out.resolve() != Path(self.vocab_file).resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
