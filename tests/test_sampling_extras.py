"""Presence/frequency penalties, min_tokens and logprobs on real engines (fp32, gloo) against
transformers: penalties against a reference applied to transformers' own logits step by step,
min_tokens against `generate(min_new_tokens=...)`, logprobs against the log-softmax of
transformers' logits; at tp=1 in this process and at tp=2 pp=2 in an engine process (logprobs
through the pipeline and the Token tuples, penalties across preemption)."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.engine_process import EngineProcessClient
from launcher.local import start_local_engine
from runtime.engine_client import EngineClient
from runtime.runner import pack_logprobs, unpack_logprobs
from runtime.sampler import Sampler
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec

PROMPTS = [[3, 5, 7, 9, 11, 13, 2, 8, 40], [11, 12], [100, 4, 6, 8, 10], [20, 21, 22]]
# The llama test checkpoint greedily emits 23 first after PROMPTS[0] and often later: as its EOS,
# min_tokens changes where generation stops.
EOS = 23
LP_ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir) -> Path:
    """The session's llama checkpoint with EOS set to EOS (config and generation config)."""
    path = tmp_path_factory.mktemp("extras") / "llama"
    shutil.copytree(checkpoint_dir("llama"), path)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = EOS
        (path / name).write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    """A tp=1 engine in this process."""
    local = start_local_engine(EngineSpec(str(model_dir), 1, 1, "fp32",
                                          EngineConfig(num_blocks=64)))
    yield local.engine
    local.close()


# --- references -------------------------------------------------------------------------------
@torch.no_grad()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits at every position of `ids`: (len(ids), vocab)."""
    return hf(torch.tensor([ids])).logits[0].float()


def reference_penalized(hf: Any, prompt: list[int], n: int, presence: float = 0.0,
                        frequency: float = 0.0, repetition: float = 1.0) -> list[int]:
    """Greedy on transformers' logits, step by step: transformers' repetition penalty (prompt
    and output), then logit -= presence * (count > 0) + frequency * count over the output."""
    from transformers import RepetitionPenaltyLogitsProcessor

    ids, out = list(prompt), []
    for _ in range(n):
        row = hf_logits(hf, ids)[-1]
        if repetition != 1.0:
            row = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([ids]), row[None])[0]
        for tok, count in Counter(out).items():
            row[tok] -= presence + frequency * count
        out.append(int(row.argmax()))
        ids.append(out[-1])
    return out


@torch.no_grad()
def reference_min_tokens(hf: Any, prompt: list[int], n: int, min_new: int,
                         eos: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=min_new,
                      do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_logprobs(hf: Any, prompt: list[int], tokens: list[int], got: list[Any],
                   k: int) -> None:
    """Every token's logprob and top k (ids and values) against the log-softmax of
    transformers' logits for the same prefix."""
    assert len(got) == len(tokens)
    ref = torch.log_softmax(hf_logits(hf, prompt + tokens), dim=-1)[len(prompt) - 1:-1]
    for t, (tok, (lp, top)) in enumerate(zip(tokens, got, strict=True)):
        assert abs(lp - float(ref[t, tok])) <= LP_ATOL, (t, lp, float(ref[t, tok]))
        best = ref[t].topk(k)
        assert [i for i, _ in top] == best.indices.tolist(), t
        torch.testing.assert_close(torch.tensor([v for _, v in top]), best.values,
                                   atol=LP_ATOL, rtol=0)


# --- tp=1 -------------------------------------------------------------------------------------
PENALTIES = [dict(presence=1.5), dict(frequency=0.7), dict(presence=-1.5, frequency=0.2),
             dict(presence=0.4, frequency=0.3, repetition=1.3)]


def _params(n: int, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
            **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, presence_penalty=presence,
                          frequency_penalty=frequency, repetition_penalty=repetition, **kw)


def test_penalties_match_the_reference(engine, hf) -> None:
    """One batch: a plain greedy request next to four penalised ones (greedy, 16 tokens)."""
    n = 16
    prompts = [PROMPTS[1]] + [PROMPTS[i % len(PROMPTS)] for i in range(len(PENALTIES))]
    params = [_params(n)] + [_params(n, **pen) for pen in PENALTIES]
    got = [r.token_ids for r in engine.generate(prompts, params)]
    plain = [reference_penalized(hf, p, n) for p in prompts]
    ref = [plain[0]] + [reference_penalized(hf, p, n, **pen)
                        for p, pen in zip(prompts[1:], PENALTIES, strict=True)]
    assert got == ref
    assert all(r != g for r, g in zip(ref[1:], plain[1:], strict=True))  # penalties matter


def test_min_tokens_matches_transformers(engine, hf) -> None:
    """EOS (or a stop id) cannot be chosen before min_tokens tokens; the boundary both ways:
    min_tokens=6 ends with EOS as token 7 and min_tokens=14 goes past the EOS that token 14
    would be with min_tokens=13."""
    n = 30
    eos_first = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=n))[0]
    assert (eos_first.token_ids, eos_first.finish_reason) == ([EOS], "stop")
    cases = [  # (prompt, params, transformers' eos ids)
        (PROMPTS[0], SamplingParams(max_tokens=n, min_tokens=4), [EOS]),
        (PROMPTS[0], SamplingParams(max_tokens=n, min_tokens=6), [EOS]),
        (PROMPTS[2], SamplingParams(max_tokens=n, min_tokens=14), [EOS]),
        (PROMPTS[0], SamplingParams(max_tokens=5, min_tokens=5), [EOS]),
        (PROMPTS[2], SamplingParams(max_tokens=n, min_tokens=4, ignore_eos=True,
                                    stop_token_ids=[65]), [65]),
    ]
    got = engine.generate([c[0] for c in cases], [c[1] for c in cases])
    for (prompt, p, eos), r in zip(cases, got, strict=True):
        ref = reference_min_tokens(hf, prompt, p.max_tokens, p.min_tokens, eos)
        assert r.token_ids == ref
        assert not set(eos) & set(ref[:p.min_tokens])
    assert [r.finish_reason for r in got] == ["stop", "stop", "stop", "length", "stop"]
    assert [len(r.token_ids) for r in got[:3]] == [7, 7, 23]
    assert len(reference_min_tokens(hf, PROMPTS[2], n, 13, [EOS])) == 14
    assert len(got[4].token_ids) > 4 + 1


def test_logprobs_match_transformers(engine, hf) -> None:
    """Greedy with k = 5, 0 and 20, seeded sampling and a penalised request: each token's
    logprob is the raw log-softmax (before penalties and temperature)."""
    cases = [
        (PROMPTS[0], _params(8, logprobs=5)),
        (PROMPTS[1], _params(8, logprobs=0)),
        (PROMPTS[2], _params(8, logprobs=20)),
        (PROMPTS[3], _params(8, logprobs=3, temperature=0.8, seed=5)),
        (PROMPTS[1], _params(8, presence=2.0, frequency=1.0, logprobs=2)),
        (PROMPTS[0], _params(8)),
    ]
    got = engine.generate([c[0] for c in cases], [c[1] for c in cases])
    for (prompt, p), r in zip(cases[:-1], got[:-1], strict=True):
        check_logprobs(hf, prompt, r.token_ids, r.logprobs, p.logprobs)
    assert got[0].token_ids == reference_penalized(hf, PROMPTS[0], 8)
    assert got[-1].logprobs == [] and got[-1].token_ids == got[0].token_ids
    assert all(top == [] for _, top in got[1].logprobs)


@pytest.mark.parametrize(("params", "name"), [
    (SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(presence_penalty=-2.01), "presence_penalty"),
    (SamplingParams(frequency_penalty=3.0), "frequency_penalty"),
    (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    (SamplingParams(min_tokens=-1), "min_tokens"),
    (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    (SamplingParams(logprobs=-1), "logprobs"),
    (SamplingParams(logprobs=21), "logprobs"),
])
def test_bad_settings_are_refused_by_name(engine, params: SamplingParams, name: str) -> None:
    try:
        with pytest.raises(ValueError, match=name):
            engine.add_request("bad", [1, 2], params)
    finally:
        engine.abort_request("bad")  # accepted by mistake: must not leak into other tests


def test_boundary_settings_are_accepted(engine) -> None:
    p = SamplingParams(max_tokens=3, min_tokens=3, presence_penalty=-2.0, frequency_penalty=2.0,
                       logprobs=20, ignore_eos=True)
    r = engine.generate([PROMPTS[1]], p)[0]
    assert len(r.token_ids) == len(r.logprobs) == 3 and r.finish_reason == "length"
    assert all(len(top) == 20 for _, top in r.logprobs)


def test_greedy_batches_keep_the_fast_path() -> None:
    """A batch of plain greedy requests is one argmax (no per-row sampling); a min_tokens
    request takes the per-row path only until it has min_tokens tokens."""
    sampler, rows = Sampler(), []
    slow = sampler._sample_one
    sampler._sample_one = lambda *a: rows.append(a[1]) or slow(*a)  # type: ignore[method-assign]
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    plain = [SamplingParams(), SamplingParams(logprobs=5)]
    assert sampler.sample(logits, ["a", "b"], plain) == logits.argmax(-1).tolist()
    assert rows == []
    mixed = [SamplingParams(), SamplingParams(min_tokens=2)]
    for _ in range(4):
        sampler.sample(logits, ["a", "b"], mixed)
    assert rows == ["a", "b", "a", "b"]


def test_packed_logprobs_round_trip() -> None:
    """The last stage's packed rows unpack to the log-softmax's chosen value and top k, also
    for a micro-batch asking only k = 0 and for k beyond a small vocabulary."""
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    lp = torch.log_softmax(logits, dim=-1)
    only_zero = pack_logprobs(logits, [4, 1, 7], [None, 0, None])
    assert only_zero[0] is None and only_zero[2] is None
    assert unpack_logprobs(only_zero[1]) == (float(lp[1, 1]), [])
    rows = pack_logprobs(logits, [4, 1, 7], [20, None, 3])
    chosen, top = unpack_logprobs(rows[0])
    assert chosen == float(lp[0, 4])
    assert top == list(zip(lp[0].topk(8).indices.tolist(), lp[0].topk(8).values.tolist(),
                           strict=True))
    assert [t for t, _ in unpack_logprobs(rows[2])[1]] == lp[2].topk(3).indices.tolist()


# --- tp=2 pp=2 in an engine process -----------------------------------------------------------
@pytest.fixture(scope="module")
def client_2x2(model_dir: Path) -> EngineClient:
    """tp=2 pp=2, micro-batches even for one token, 24 KV blocks of 4 (preemption)."""
    cfg = EngineConfig(block_size=4, num_blocks=24, min_microbatch_tokens=1)
    client = EngineProcessClient.start(EngineSpec(str(model_dir), 2, 2, "fp32", cfg), "x2x2")
    yield client
    client.shutdown()
    client.close()


def _drive(client: EngineClient, requests: dict[str, tuple[list[int], SamplingParams]],
           timeout_s: float = 120.0) -> tuple[dict[str, list[tuple]], dict]:
    """Send every request, then collect each one's Token tuples until all finished; the last
    stats too. A generous deadline only catches a hang."""
    for rid, (prompt, p) in requests.items():
        client.add(rid, prompt, p)
    got: dict[str, list[tuple]] = {rid: [] for rid in requests}
    done: set[str] = set()
    stats: dict = {}
    deadline = time.monotonic() + timeout_s
    while done != set(requests):
        assert time.monotonic() < deadline, got
        for batch in client.recv(0.5):
            assert not batch.rejects, batch.rejects
            stats = batch.stats or stats
            for tok in batch.tokens:
                got[tok[0]].append(tok)
                if tok[2]:
                    done.add(tok[0])
    return got, stats


def test_2x2_penalties_and_min_tokens_across_preemption(client_2x2, hf) -> None:
    """Four penalised 30-token requests and a min_tokens one do not fit 24 blocks of 4 at once:
    requests are preempted and recomputed, and each still matches its reference."""
    n = 30
    requests = {f"pen{i}": (PROMPTS[i], _params(n, **pen)) for i, pen in enumerate(PENALTIES)}
    requests["min"] = (PROMPTS[2], SamplingParams(max_tokens=n, min_tokens=20))
    got, stats = _drive(client_2x2, requests)
    assert stats["preemptions"] > 0
    for i, pen in enumerate(PENALTIES):
        assert [t[1] for t in got[f"pen{i}"]] == reference_penalized(hf, PROMPTS[i], n, **pen)
    ref = reference_min_tokens(hf, PROMPTS[2], n, 20, [EOS])
    assert [t[1] for t in got["min"]] == ref and ref[-1] == EOS and len(ref) > 20
    assert got["min"][-1][2:4] == (True, "stop")


def test_2x2_logprobs_travel_in_token_tuples(client_2x2, hf) -> None:
    """Logprobs computed on the last stage (rank 2) reach the front as the Token tuple's fifth
    field: None for requests that did not ask."""
    requests = {"k4": (PROMPTS[0], _params(8, logprobs=4)),
                "k0": (PROMPTS[1], _params(8, logprobs=0)),
                "none": (PROMPTS[2], _params(8)),
                "k20": (PROMPTS[3], _params(8, logprobs=20, temperature=1.0, seed=3))}
    got, _ = _drive(client_2x2, requests)
    for rid, (prompt, p) in requests.items():
        tokens = [t[1] for t in got[rid]]
        assert all(len(t) == 5 for t in got[rid])
        if p.logprobs is None:
            assert all(t[4] is None for t in got[rid])
            assert tokens == reference_penalized(hf, prompt, 8)
        else:
            check_logprobs(hf, prompt, tokens, [t[4] for t in got[rid]], p.logprobs)
    assert [t[1] for t in got["k4"]] == reference_penalized(hf, PROMPTS[0], 8)
