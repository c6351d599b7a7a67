"""Tokenizer handling: a checkpoint's own tokenizer when it has one, and incremental decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    """Thin wrapper over a transformers tokenizer loaded from a local directory."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer saved in `path`, or None if the checkpoint has none."""
        path = Path(path)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Turns a growing list of token ids into text chunks, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        new, self.text = full[len(self.text):], full
        return new
