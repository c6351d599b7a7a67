"""Engine behaviour beyond greedy parity: sampling, batching independence, preemption, errors."""

from __future__ import annotations

import pytest

from launcher.local import start_local_engine
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec

PROMPTS = [[3, 5, 7, 9, 11], [11, 12], [100, 4, 6, 8, 10, 12, 14], [20, 21, 22]]


@pytest.fixture(scope="module")
def engine_2x2(checkpoint_dir):
    """A tp=2, pp=2 llama engine shared by this module's tests (small KV cache: 24 blocks of 4)."""
    cfg = EngineConfig(block_size=4, num_blocks=24, min_microbatch_tokens=1)
    local = start_local_engine(EngineSpec(str(checkpoint_dir("llama")), 2, 2, "fp32", cfg))
    yield local.engine
    local.close()


def test_seeded_sampling_does_not_depend_on_the_batch(engine_2x2) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=1234,
                            ignore_eos=True)
    solo = engine_2x2.generate([PROMPTS[0]], params)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.3, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    batched = engine_2x2.generate(PROMPTS, [params, *others])
    assert batched[0].token_ids == solo
    again = engine_2x2.generate([PROMPTS[0]], params)[0].token_ids
    assert again == solo
    other_seed = SamplingParams(**{**params.__dict__, "seed": 99})
    assert engine_2x2.generate([PROMPTS[0]], other_seed)[0].token_ids != solo


def test_top_k_one_is_greedy(engine_2x2) -> None:
    greedy = engine_2x2.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    topk1 = engine_2x2.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, top_k=1,
                                                        seed=7, ignore_eos=True))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk1]


def test_kv_exhaustion_preempts_and_still_matches(engine_2x2) -> None:
    """24 blocks of 4 tokens cannot hold 4 sequences of up to 7 + 30 tokens: the scheduler
    preempts and recomputes, and every output equals its solo greedy run."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    solo = [engine_2x2.generate([p], params)[0].token_ids for p in PROMPTS]
    before = engine_2x2.stats()["preemptions"]
    together = engine_2x2.generate(PROMPTS, params)
    assert [r.token_ids for r in together] == solo
    assert engine_2x2.stats()["preemptions"] > before
    assert engine_2x2.stats()["free_blocks"] == 24


def test_abort_frees_blocks(engine_2x2) -> None:
    engine_2x2.add_request("a", PROMPTS[2], SamplingParams(max_tokens=20, ignore_eos=True))
    engine_2x2.step()
    engine_2x2.step()
    assert engine_2x2.stats()["free_blocks"] < 24
    engine_2x2.abort_request("a")
    outs = engine_2x2.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    assert engine_2x2.stats() | {"preemptions": 0} == {
        "running": 0, "waiting": 0, "free_blocks": 24, "total_blocks": 24, "preemptions": 0}


def test_eos_stops_generation(engine_2x2) -> None:
    greedy = engine_2x2.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))
    first = greedy[0].token_ids[0]
    stopped = engine_2x2.generate([PROMPTS[0]], SamplingParams(max_tokens=8,
                                                               stop_token_ids=[first]))
    assert stopped[0].token_ids == [first] and stopped[0].finish_reason == "stop"


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], SamplingParams(), "empty"),
    ([500], SamplingParams(), "outside the vocabulary"),
    ([1] * 300, SamplingParams(), "context"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2], SamplingParams(max_tokens=200), "KV cache"),
])
def test_bad_requests_are_refused(engine_2x2, prompt, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine_2x2.add_request("bad", prompt, params)
    assert not engine_2x2.has_unfinished()
