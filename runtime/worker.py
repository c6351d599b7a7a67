"""Build one rank of a giant model: its stage, weights and KV cache; then drive or follow."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parallel import ParallelContext
from parallel.collectives import all_gather_object
from parallel.kernels import move_to_huge_pages
from parallel.layers import prepack_linears
from parallel.native import NativeBuildError, attach_native, load_cpu_ops, native_wanted
from runtime.engine import LLMEngine, ModelInfo, worker_loop
from runtime.kv_cache import allocate_caches, bytes_per_block
from runtime.loader import LoadReport, load_stage
from runtime.models.registry import model_class
from runtime.runner import ModelRunner
from runtime.tokenizer import Tokenizer
from runtime.types import EngineConfig
from sharding.checkpoint import HFCheckpoint, read_config
from sharding.rules import ArchRules, rules_for
from sharding.shards import ShardFolder, is_shard_folder

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class EngineSpec:
    """Everything a rank needs to build its part of a model; picklable, same on every rank."""

    model: str  # HF checkpoint directory or shard folder
    tp: int = 1
    pp: int = 1
    dtype: str | None = None  # None: the checkpoint's own
    engine: EngineConfig = field(default_factory=EngineConfig)
    stage_layers: list[int] | None = None
    backend: str = "auto"  # "auto" | "gloo" | "nccl"
    timeout_s: float = 60.0


def resolve_dtype(name: str | None, hf_config: dict[str, Any]) -> torch.dtype:
    name = name or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of fp32, bf16, fp16")
    return DTYPES[name]


def open_weights(spec: EngineSpec, ctx: ParallelContext) -> tuple[dict[str, Any], ArchRules, Any]:
    """The HF config, the layout rules and this rank's weight source for `spec.model`."""
    path = Path(spec.model)
    if is_shard_folder(path):
        folder = ShardFolder(path)
        if (folder.tp, folder.pp) != (spec.tp, spec.pp):
            raise ValueError(f"{path} is sharded for tp={folder.tp}, pp={folder.pp}; asked for "
                             f"tp={spec.tp}, pp={spec.pp} (use `shardserve reshard`)")
        # the shards' own dtype is the default, not the source config's
        cfg = dict(folder.config)
        if folder.dtype != "mixed":
            cfg["dtype"] = folder.dtype
        rules = rules_for(cfg, folder.tp, folder.pp, folder.stage_layers)
        return cfg, rules, folder.open_rank(ctx.pp_rank, ctx.tp_rank)
    ckpt = HFCheckpoint(path)
    rules = rules_for(ckpt.config, spec.tp, spec.pp, spec.stage_layers)
    return ckpt.config, rules, ckpt


def default_layout(model: str) -> tuple[int, int]:
    """(tp, pp) a model runs at when none is asked for: a shard folder's own, else (1, 1)."""
    path = Path(model)
    if is_shard_folder(path):
        folder = ShardFolder(path)
        return folder.tp, folder.pp
    return 1, 1


def check_layout(spec: EngineSpec) -> None:
    """Raise ValueError/CheckpointError if `spec` cannot work, without loading any weights."""
    path = Path(spec.model)
    if is_shard_folder(path):
        return  # checked against the manifest when each rank opens its shard
    cfg = read_config(path) if path.is_dir() else HFCheckpoint(path).config
    rules_for(cfg, spec.tp, spec.pp, spec.stage_layers)
    resolve_dtype(spec.dtype, cfg)


def kv_blocks(spec: EngineSpec, rules: ArchRules, dtype: torch.dtype) -> int:
    """Number of KV blocks: the same on every rank, sized for the rank that needs most."""
    cfg = spec.engine
    if cfg.num_blocks:
        return cfg.num_blocks
    d = rules.dims
    kv_local = max(rules.heads(r).num_kv for r in range(rules.tp))
    per_block = bytes_per_block(max(rules.stage_layers), kv_local, d.head_dim, cfg.block_size,
                                dtype)
    return max(1, cfg.kv_cache_bytes // per_block)


def _eos_ids(path: Path, cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def use_native_kernels(model: torch.nn.Module) -> bool:
    """Attach the fused CPU kernels to `model`; where they cannot be built, log why and
    keep the torch ops (same results up to fp32 summation order)."""
    try:
        ops = load_cpu_ops()
    except NativeBuildError as e:
        log.warning("fused CPU kernels unavailable, using torch ops: %s", e)
        return False
    return attach_native(model, ops) > 0


def build_rank(spec: EngineSpec, ctx: ParallelContext) -> tuple[ModelRunner, ModelInfo,
                                                                   LoadReport]:
    """Construct this rank's stage, load its weights and allocate its KV cache."""
    cfg, rules, source = open_weights(spec, ctx)
    dtype = resolve_dtype(spec.dtype, cfg)
    cls = model_class(cfg)
    model_cfg = cls.config_class.from_hf(cfg)
    layers = rules.layers_of_stage(ctx.pp_rank)
    model = cls(model_cfg, ctx, layers, dtype).to(ctx.device).eval()
    report = load_stage(model, source, rules, ctx.tp_rank, ctx.pp_rank)
    if spec.engine.prepack_weights:
        move_to_huge_pages(prepack_linears(model))
    if spec.engine.native_kernels and native_wanted(dtype, ctx.device):
        use_native_kernels(model)
    num_blocks = kv_blocks(spec, rules, dtype)
    hl = rules.heads(ctx.tp_rank)
    caches = allocate_caches(list(layers), num_blocks, spec.engine.block_size, hl.num_kv,
                             rules.dims.head_dim, dtype, ctx.device)
    runner = ModelRunner(ctx, model, caches, spec.engine.block_size, rules.dims.hidden,
                         rules.dims.vocab)
    max_len = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    if spec.engine.max_model_len:
        max_len = min(max_len, spec.engine.max_model_len)
    path = Path(spec.model)
    info = ModelInfo(vocab_size=rules.dims.vocab, max_model_len=max_len,
                     eos_token_ids=_eos_ids(path, cfg), num_blocks=num_blocks, pp=rules.pp,
                     dtype=str(dtype).removeprefix("torch."),
                     tokenizer=Tokenizer.from_dir(path) if ctx.is_driver else None)
    return runner, info, report


class RankStartupError(RuntimeError):
    """One or more ranks failed to build; the message names each rank and its error."""


def run_rank(spec: EngineSpec, ctx: ParallelContext) -> LLMEngine | None:
    """Rank 0 gets the engine; every other rank follows step plans until shutdown.

    Every rank reports whether it built, so a failure anywhere (a missing shard, memory) is
    raised on every rank with the failing rank's number instead of a hang.
    """
    error = None
    try:
        runner, info, _ = build_rank(spec, ctx)
    except Exception as e:  # reported below, on every rank
        error = f"{type(e).__name__}: {e}"
    errors = all_gather_object(error, ctx.control_group)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RankStartupError("; ".join(failed))
    if ctx.is_driver:
        return LLMEngine(ctx, runner, info, spec.engine)
    worker_loop(ctx, runner)
    return None
