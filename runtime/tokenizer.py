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
    """Turns a growing list of token ids into text chunks.

    While generating, only an incomplete trailing character (a token that ends inside a UTF-8
    sequence decodes to U+FFFD) is held back; `flush` at the end returns the rest, so the chunks
    always add up to `tokenizer.decode(ids)`. Each step decodes a short window of recent tokens
    (the tokens before it give the decoder its context), not the whole sequence.
    """

    WINDOW = 32  # slide the decoded window once it holds this many tokens
    CONTEXT = 6  # tokens kept before the newest ones when it slides

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""  # everything returned so far
        self._start = 0  # the window is ids[_start:]
        self._done = 0  # characters of the window's text already returned (or context)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self._start:])
        stable = text.rstrip("\ufffd")
        chunk = stable[self._done:] if len(stable) > self._done else ""
        self._done = max(self._done, len(stable))
        self.sent += chunk
        if len(stable) == len(text) and len(self.ids) - self._start >= self.WINDOW:
            self._start = len(self.ids) - self.CONTEXT
            self._done = len(self.tokenizer.decode(self.ids[self._start:]))
        return chunk

    def flush(self) -> str:
        """The text not returned yet, held-back partial characters included (call once, at
        the end): what makes the chunks add up to the decode of all ids."""
        full = self.tokenizer.decode(self.ids)
        if full.startswith(self.sent):
            rest = full[len(self.sent):]
        else:  # a decoder whose output is not prefix-stable: send what the window has left
            rest = self.tokenizer.decode(self.ids[self._start:])[self._done:]
        self.sent += rest
        self._done += len(rest)
        return rest
