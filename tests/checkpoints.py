"""Tiny random Hugging Face checkpoints for tests, saved with `save_pretrained` (never downloaded).

`initializer_range` is raised so that random models produce varied tokens instead of repeating
one token forever (which would make parity checks meaningless).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def hf_config(arch: str, **overrides: Any) -> Any:
    """A small config of `arch`; overrides go straight to the transformers config class."""
    import transformers as tf

    common = dict(vocab_size=128, initializer_range=0.25)
    if arch == "gpt2":
        kw = dict(n_layer=4, n_embd=64, n_head=4, n_positions=256, bos_token_id=127,
                  eos_token_id=127, **common)
        return tf.GPT2Config(**{**kw, **overrides})
    llama_like = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, **common)
    if arch == "llama":
        kw = dict(llama_like, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return tf.LlamaConfig(**{**kw, **overrides})
    if arch == "mistral":
        kw = dict(llama_like, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=True, sliding_window=None)
        return tf.MistralConfig(**{**kw, **overrides})
    if arch == "qwen2":
        kw = dict(llama_like, num_key_value_heads=1, tie_word_embeddings=True)
        return tf.Qwen2Config(**{**kw, **overrides})
    raise ValueError(f"unknown test architecture {arch!r}; have {ARCHS}")


def make_checkpoint(path: Path, arch: str = "llama", seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Save a random `arch` model to `path` and return it."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def reference_generate(path: Path, prompts: list[list[int]], max_new_tokens: int
                       ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation with `transformers`, one prompt at a time: generated ids per prompt
    and the logits of each step (steps, vocab)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, logits = [], []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                pad_token_id=0,
            )
        ids.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits, dim=0))
    return ids, logits
