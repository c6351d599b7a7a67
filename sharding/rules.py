"""Per-architecture sharding rules: the one source of truth for which pipeline stage holds a
tensor and which slice of it each tp rank holds. Used by the shard writer and by the runtime's
load-from-checkpoint path alike.

Tensors keep their Hugging Face names and layout; a `Cut` says which ranges of which dimension a
rank takes (several ranges are concatenated, e.g. the q, k and v parts of GPT-2's fused c_attn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from parallel.partition import HeadLayout, head_layout, split_range, split_sizes

_LAYER_RE = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture has no rules (and no model) here."""


@dataclass(frozen=True)
class Cut:
    """This rank's slice of a tensor: `pieces` ranges of dimension `dim`, concatenated.

    `dim is None` means the whole tensor (replicated). `transpose` is set for HF Conv1D weights
    (stored as (in, out)); the runtime transposes after cutting, shard files keep HF layout.
    """

    dim: int | None
    pieces: tuple[tuple[int, int], ...] = ()
    transpose: bool = False


REPLICATED = Cut(None)


@dataclass(frozen=True)
class Dims:
    """The sizes that decide a layout."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool


def default_stage_layers(dims: Dims, pp: int) -> list[int]:
    """Layers per stage, balanced by parameter count: the embedding weighs on the first stage
    and the head on the last (the head counts unless it is tied and pp == 1)."""
    if pp > dims.num_layers:
        raise ValueError(f"pp={pp} exceeds the {dims.num_layers} layers")
    h, kv = dims.hidden, dims.num_kv_heads * dims.head_dim
    layer = h * (dims.num_heads * dims.head_dim) * 2 + 2 * h * kv + 3 * h * dims.intermediate
    extra = [0.0] * pp
    extra[0] += dims.vocab * h / layer
    extra[-1] += dims.vocab * h / layer
    best: tuple[float, list[int]] = (float("inf"), split_sizes(dims.num_layers, pp))

    def search(stage: int, left: int, acc: list[int], worst: float) -> None:
        nonlocal best
        if worst >= best[0]:
            return
        if stage == pp - 1:
            cost = max(worst, left + extra[stage])
            if cost < best[0]:
                best = (cost, acc + [left])
            return
        for n in range(1, left - (pp - stage - 1) + 1):
            search(stage + 1, left - n, acc + [n], max(worst, n + extra[stage]))

    if dims.num_layers * pp <= 4096:  # tiny search space: exact
        search(0, dims.num_layers, [], 0.0)
    return best[1]


def check_stage_layers(stage_layers: list[int], num_layers: int) -> list[int]:
    if any(n < 1 for n in stage_layers) or sum(stage_layers) != num_layers:
        raise ValueError(
            f"stage layers {stage_layers} must be positive and sum to the {num_layers} layers"
        )
    return list(stage_layers)


class ArchRules:
    """Placement and cutting rules of one architecture for one (tp, stage_layers) layout."""

    architecture = ""

    def __init__(self, hf_config: dict[str, Any], tp: int, stage_layers: list[int] | None = None,
                 pp: int = 1) -> None:
        self.dims = self.dims_from_hf(hf_config)
        if tp < 1 or tp > self.dims.num_heads:
            raise ValueError(f"tp={tp} must be between 1 and the {self.dims.num_heads} heads")
        self.tp = tp
        if stage_layers is None:
            stage_layers = default_stage_layers(self.dims, pp)
        self.stage_layers = check_stage_layers(stage_layers, self.dims.num_layers)
        self.pp = len(self.stage_layers)
        self.layer_stage: list[int] = []
        for stage, n in enumerate(self.stage_layers):
            self.layer_stage += [stage] * n

    @staticmethod
    def dims_from_hf(cfg: dict[str, Any]) -> Dims:
        raise NotImplementedError

    # Names the architecture uses; subclasses fill these in.
    embed_name = ""
    head_name = ""
    first_stage_names: tuple[str, ...] = ()
    last_stage_names: tuple[str, ...] = ()
    ignored_suffixes: tuple[str, ...] = ()

    def layers_of_stage(self, stage: int) -> range:
        start = sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    def heads(self, tp_rank: int) -> HeadLayout:
        d = self.dims
        return head_layout(d.num_heads, d.num_kv_heads, self.tp, tp_rank)

    def is_ignored(self, name: str) -> bool:
        """Buffers some checkpoints carry that no rank needs (rotary caches, causal masks)."""
        return name.endswith(self.ignored_suffixes)

    def stages_of(self, name: str) -> tuple[int, ...] | None:
        """Pipeline stages that hold `name`, or None when the name is not part of the model."""
        m = _LAYER_RE.match(name)
        if m:
            layer = int(m.group(1))
            if layer >= self.dims.num_layers or self.layer_cut(name, 0) is None:
                return None
            return (self.layer_stage[layer],)
        last = self.pp - 1
        if name == self.embed_name:
            return (0, last) if self.dims.tied and last != 0 else (0,)
        if name == self.head_name:
            return (last,)
        if name in self.first_stage_names:
            return (0,)
        if name in self.last_stage_names:
            return (last,)
        return None

    def cut(self, name: str, tp_rank: int) -> Cut:
        """This tp rank's slice of tensor `name` (which must be part of the model)."""
        if name in (self.embed_name, self.head_name):
            return Cut(0, (split_range(self.dims.vocab, self.tp, tp_rank),))
        if _LAYER_RE.match(name):
            cut = self.layer_cut(name, tp_rank)
            if cut is None:
                raise KeyError(name)
            return cut
        return REPLICATED

    def layer_cut(self, name: str, tp_rank: int) -> Cut | None:
        """Cut of a per-layer tensor, None if the name is not one of the layer's tensors."""
        raise NotImplementedError

    def head_source(self, names: set[str]) -> str:
        """Tensor the LM head is read from: its own, or the embedding when tied."""
        return self.head_name if self.head_name in names else self.embed_name


def _rope_dims(cfg: dict[str, Any]) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return heads, kv, head_dim


class LlamaRules(ArchRules):
    """Llama, Mistral and Qwen2: separate q/k/v/o and gate/up/down projections."""

    architecture = "LlamaForCausalLM"
    embed_name = "model.embed_tokens.weight"
    head_name = "lm_head.weight"
    last_stage_names = ("model.norm.weight",)
    ignored_suffixes = ("rotary_emb.inv_freq",)

    @staticmethod
    def dims_from_hf(cfg: dict[str, Any]) -> Dims:
        heads, kv, head_dim = _rope_dims(cfg)
        return Dims(
            num_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], num_heads=heads,
            num_kv_heads=kv, head_dim=head_dim, intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    def layer_cut(self, name: str, tp_rank: int) -> Cut | None:
        part = name.split(".", 3)[3]  # after "model.layers.N."
        hl = self.heads(tp_rank)
        hd = self.dims.head_dim
        q = (hl.q_start * hd, hl.q_stop * hd)
        kv = (hl.kv_start * hd, hl.kv_stop * hd)
        inter = split_range(self.dims.intermediate, self.tp, tp_rank)
        table = {
            "self_attn.q_proj": Cut(0, (q,)),
            "self_attn.k_proj": Cut(0, (kv,)),
            "self_attn.v_proj": Cut(0, (kv,)),
            "mlp.gate_proj": Cut(0, (inter,)),
            "mlp.up_proj": Cut(0, (inter,)),
        }
        module, _, kind = part.rpartition(".")
        if module in table and kind in ("weight", "bias"):
            return table[module]
        if module == "self_attn.o_proj" or module == "mlp.down_proj":
            rng = q if module == "self_attn.o_proj" else inter
            return Cut(1, (rng,)) if kind == "weight" else REPLICATED
        if module in ("input_layernorm", "post_attention_layernorm") and kind == "weight":
            return REPLICATED
        return None


class GPT2Rules(ArchRules):
    """GPT-2: fused c_attn, Conv1D weights stored as (in, out), learned positions, tied head."""

    architecture = "GPT2LMHeadModel"
    embed_name = "transformer.wte.weight"
    head_name = "lm_head.weight"
    first_stage_names = ("transformer.wpe.weight",)
    last_stage_names = ("transformer.ln_f.weight", "transformer.ln_f.bias")
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    @staticmethod
    def dims_from_hf(cfg: dict[str, Any]) -> Dims:
        hidden, heads = cfg["n_embd"], cfg["n_head"]
        return Dims(
            num_layers=cfg["n_layer"], hidden=hidden, num_heads=heads, num_kv_heads=heads,
            head_dim=hidden // heads, intermediate=cfg.get("n_inner") or 4 * hidden,
            vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", True)),
        )

    def layer_cut(self, name: str, tp_rank: int) -> Cut | None:
        part = name.split(".", 3)[3]  # after "transformer.h.N."
        hl = self.heads(tp_rank)
        h, hd = self.dims.hidden, self.dims.head_dim
        q = (hl.q_start * hd, hl.q_stop * hd)
        qkv = (q, (h + q[0], h + q[1]), (2 * h + q[0], 2 * h + q[1]))
        inter = (split_range(self.dims.intermediate, self.tp, tp_rank),)
        table = {
            "attn.c_attn.weight": Cut(1, qkv, transpose=True),
            "attn.c_attn.bias": Cut(0, qkv),
            "attn.c_proj.weight": Cut(0, (q,), transpose=True),
            "attn.c_proj.bias": REPLICATED,
            "mlp.c_fc.weight": Cut(1, inter, transpose=True),
            "mlp.c_fc.bias": Cut(0, inter),
            "mlp.c_proj.weight": Cut(0, inter, transpose=True),
            "mlp.c_proj.bias": REPLICATED,
        }
        if part in table:
            return table[part]
        if part.split(".")[0] in ("ln_1", "ln_2"):
            return REPLICATED
        return None


RULES: dict[str, type[ArchRules]] = {
    "LlamaForCausalLM": LlamaRules,
    "MistralForCausalLM": LlamaRules,
    "Qwen2ForCausalLM": LlamaRules,
    "GPT2LMHeadModel": GPT2Rules,
}


def architecture_of(hf_config: dict[str, Any]) -> str:
    """The HF architecture name, checked against the supported ones."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in RULES:
            return arch
    raise UnsupportedArchitecture(
        f"unsupported architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(sorted(RULES))}"
    )


def rules_for(
    hf_config: dict[str, Any], tp: int, pp: int = 1, stage_layers: list[int] | None = None
) -> ArchRules:
    """Rules of the checkpoint's architecture for a tp x pp layout."""
    rules = RULES[architecture_of(hf_config)](hf_config, tp, stage_layers, pp)
    if stage_layers is None and rules.pp != pp:
        raise ValueError(f"pp={pp} does not fit the layout")
    return rules
