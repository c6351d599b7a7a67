"""The built-in demo model: a small random-weight Llama with a byte-level BPE tokenizer trained
offline on a built-in text, so text goes in and text comes out with no download.

    python -m configs.demo OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEXT = """\
shardserve serves giant models next to ordinary ones from one server. A sharding tool splits a
checkpoint into per-rank tensor and pipeline parallel shards. A launcher starts the ranks with
torchrun, mpirun or Slurm. Every rank runs its slice of the layers; rank zero schedules requests,
batches them continuously, keeps the key value cache in blocks and broadcasts each step. The
front speaks the KServe v2 and Triton protocol over gRPC, streams tokens back to the client and
loads, unloads and reloads models without downtime. The quick brown fox jumps over the lazy dog.
"""


def build_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on TEXT and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def build_demo_model(out: Path, *, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """Write the demo checkpoint (config, safetensors, tokenizer) to `out`; reuse it if present."""
    import torch
    import transformers as tf

    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, 512)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
    )
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(build_demo_model(args.out))


if __name__ == "__main__":
    main()
