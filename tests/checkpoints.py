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
                # an explicit mask: without one generate masks every prompt token equal to
                # pad_token_id (a BOS of id 0 would silently vanish from the reference)
                pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )
        ids.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits, dim=0))
    return ids, logits


def hf_generate(path: Path, prompts: list[list[int]], max_new_tokens: int,
                dtype: torch.dtype = torch.float32, model_eos: bool = False,
                **generate_kwargs: Any) -> tuple[list[list[int]], list[torch.Tensor]]:
    """`transformers` generation in `dtype`, one prompt at a time (greedy unless
    `generate_kwargs` say otherwise): generated ids per prompt and the raw (unprocessed) fp32
    logits of each step (steps, vocab). EOS stops generation only with `model_eos` (the
    model's own, from generation_config.json or config.json)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kwargs: dict[str, Any] = dict(do_sample=False, pad_token_id=0)
    if not model_eos:
        kwargs["eos_token_id"] = None
    kwargs.update(generate_kwargs)
    ids, logits = [], []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 output_logits=True, return_dict_in_generate=True, **kwargs)
        ids.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits, dim=0).float())
    return ids, logits


def copy_checkpoint(src: Path, dst: Path, config: dict[str, Any] | None = None,
                    drop: tuple[str, ...] = ()) -> Path:
    """Copy checkpoint `src` to `dst` (same weights), setting the `config` keys and removing
    the `drop` keys of its config.json; returns `dst`."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config or {})
    for key in drop:
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst
