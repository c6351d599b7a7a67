"""shard -> verify -> generate from the shard folder, token-identical to transformers, for each
architecture at two layouts (the second one made by resharding the first, without the source)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.local import start_local_engine
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec, RankStartupError
from sharding.manifest import rank_file_name
from sharding.reshard import reshard
from sharding.sources import HFSource
from sharding.verify import verify_shards
from sharding.writer import write_shards
from tests.checkpoints import reference_generate

PROMPTS = [[3, 5, 7, 9, 11, 13, 2, 8, 40], [100, 4, 6]]
NEW_TOKENS = 10
# first layout is sharded from the HF checkpoint, second resharded from the first;
# uneven tp=3 over 4 heads, tp=4 replicating mistral's 2 kv heads, tied embeddings with pp > 1
LAYOUTS = {
    "llama": ((2, 2), (3, 1)),
    "mistral": ((4, 1), (1, 2)),
    "qwen2": ((2, 2), (3, 1)),
    "gpt2": ((1, 3), (2, 2)),
}


def generate(folder: Path, tp: int, pp: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    local = start_local_engine(EngineSpec(str(folder), tp, pp, "fp32",
                                          EngineConfig(num_blocks=32)))
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
        results = local.engine.generate(PROMPTS, params)
    finally:
        local.close()
    return [r.token_ids for r in results], [torch.stack(r.logits) for r in results]


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_generate_from_shards_matches_transformers(checkpoint_dir, tmp_path: Path,
                                                   arch: str) -> None:
    src = checkpoint_dir(arch)
    ref_ids, ref_logits = reference_generate(src, PROMPTS, NEW_TOKENS)
    assert all(len(set(ids)) >= 4 for ids in ref_ids), ref_ids  # varied, so parity means much
    (tp1, pp1), (tp2, pp2) = LAYOUTS[arch]
    first, second = tmp_path / "first", tmp_path / "second"
    source = HFSource(src)
    write_shards(source, first, tp1, pp1)
    source.close()
    reshard(first, second, tp2, pp2)
    for folder, tp, pp in ((first, tp1, pp1), (second, tp2, pp2)):
        report = verify_shards(folder, src)
        assert report.ok, report.problems
        ids, logits = generate(folder, tp, pp)
        assert ids == ref_ids, (tp, pp)
        for got, want in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_generate_refuses_corrupt_shard(checkpoint_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = HFSource(checkpoint_dir("gpt2"))
    write_shards(source, out, 1, 1)
    source.close()
    victim = out / rank_file_name(0, 0)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(RankStartupError, match=f"{victim.name}.*checksum mismatch"):
        start_local_engine(EngineSpec(str(out), 1, 1, "fp32", EngineConfig(num_blocks=8)))
