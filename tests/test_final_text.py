"""The last text of a generation is never lost: with a byte-level BPE tokenizer, generations that
stop in the middle of a UTF-8 character return all their text (streamed chunks add up to
`tokenizer.decode(ids)`, non-streamed text equals it), through the server at tp=1 and tp=2 pp=2."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from runtime.tokenizer import Detokenizer, Tokenizer
from serving.cli import add_llm_model
from tests.checkpoints import reference_generate
from tests.serving_helpers import Server
from tests.test_serving_llm import text_inputs

TEXT = """\
把一个巨大的模型分到多块显卡上运行，每个进程只读取自己的那一部分权重。
大きなモデルを複数のGPUに分割して、各ランクは自分の重みだけを読み込みます。
shardserve serves giant models; rank zero schedules and broadcasts each step. 张量并行，流水线并行。
"""
LAYOUTS = {"llm11": (1, 1), "llm22": (2, 2)}
PROMPTS = ["模型分到", "shardserve 把", "大きな"]
NEW = 40


def build_cjk_model(out: Path) -> Path:
    """A random Llama with a byte-level BPE trained on mixed CJK/English text: most of its
    vocabulary is single bytes and merges that cross character boundaries."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    torch.manual_seed(3)
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                         initializer_range=0.3)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cjk_model(tmp_path_factory.mktemp("cjk") / "model")


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Tokenizer:
    tok = Tokenizer.from_dir(model)
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def cases(model: Path, tokenizer: Tokenizer) -> list[tuple[str, int, list[int]]]:
    """(prompt, max_tokens, expected ids): greedy generations cut where the last token ends
    inside a character, the complete text before the cut not empty."""
    refs, _ = reference_generate(model, [tokenizer.encode(p) for p in PROMPTS], NEW)
    found = []
    for prompt, ids in zip(PROMPTS, refs, strict=True):
        cuts = [k for k in range(2, NEW + 1) if tokenizer.decode(ids[:k]).endswith("\ufffd")
                and tokenizer.decode(ids[:k]).rstrip("\ufffd")]
        found += [(prompt, k, ids[:k]) for k in cuts[:2]]
    assert len(found) >= 3, f"too few generations end mid-character: {refs}"
    return found


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("final-text")
    for name, (tp, pp) in LAYOUTS.items():
        add_llm_model(tmp / "repo", name, model, tp=tp, pp=pp, dtype="fp32")
    srv = Server(tmp / "repo", tmp / "server.log", module="launcher.cli")
    yield srv
    assert srv.stop() == 0, srv.text()


def test_detokenizer_chunks_add_up(tokenizer: Tokenizer, cases) -> None:
    """Unit level: every prefix of every case; chunks never hold a replacement character that
    the full decode does not, and add up to the decode once flushed."""
    for _, _, ids in cases:
        detok = Detokenizer(tokenizer)
        chunks = [detok.add(t) for t in ids]
        assert not "".join(chunks).endswith("\ufffd")
        # the complete characters of the last token are sent before the flush
        assert "".join(chunks) == tokenizer.decode(ids).rstrip("\ufffd")
        assert "".join(chunks) + detok.flush() == tokenizer.decode(ids)


def test_detokenizer_long_sequence_window(tokenizer: Tokenizer) -> None:
    """A sequence many windows long (the window slides) still adds up exactly."""
    ids = tokenizer.encode(TEXT * 3)
    assert len(ids) > 4 * Detokenizer.WINDOW
    detok = Detokenizer(tokenizer)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids) == TEXT * 3


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_final_text_not_lost(server, tokenizer: Tokenizer, cases, name: str) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        for prompt, k, ids in cases:
            expected = tokenizer.decode(ids)
            extra = {"exclude_input_in_output": ([True], "BOOL")}
            result = client.infer(name, text_inputs(prompt, k, **extra), model_version="1")
            assert result.as_numpy("output_ids").tolist() == ids
            assert result.as_numpy("text_output")[0].decode("utf-8") == expected
            full = client.infer(name, text_inputs(prompt, k)).as_numpy("text_output")[0]
            assert full.decode("utf-8") == prompt + expected
            for stop in ([], ["never-in-the-output"]):
                more = dict(extra, stop_words=([w.encode() for w in stop], "BYTES")) if stop \
                    else extra
                chunks = _stream(server.url, name, text_inputs(prompt, k, stream=True, **more))
                assert [t for i, _, _, _ in chunks for t in i] == ids
                assert b"".join(t for _, t, _, _ in chunks).decode("utf-8") == expected
                assert chunks[-1][3]["finish_reason"] == "length"
    finally:
        client.close()


def _stream(url: str, name: str, inputs: list) -> list:
    """One streamed request: per response (output_ids, text bytes, final, parameters)."""
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(lambda result, error: q.put((result, error)))
    c.async_stream_infer(name, inputs, request_id="req")
    got = []
    while not got or not got[-1][2]:
        result, error = q.get(timeout=120)
        assert error is None, error
        params = {k: getattr(v, v.WhichOneof("parameter_choice"))
                  for k, v in result.get_response().parameters.items()}
        text = result.as_numpy("text_output")
        got.append((result.as_numpy("output_ids").tolist(), bytes(text[0]),
                    params["triton_final_response"], params))
    c.stop_stream()
    c.close()
    return got


def test_stop_word_holdback_with_split_character(server, tokenizer: Tokenizer, cases) -> None:
    """A stop word that starts right after a split character: the text before it is sent
    whole, the stop word and what follows are not."""
    prompt, k, ids = max(cases, key=lambda c: c[1])
    full = tokenizer.decode(_reference_more(server, prompt, k + 8))
    head = tokenizer.decode(ids)
    assert full.startswith(head.rstrip("\ufffd"))
    word = full[len(head.rstrip("\ufffd")) + 1:][:3]
    assert len(word) == 3, full
    cut = full[:full.find(word)]
    extra = {"exclude_input_in_output": ([True], "BOOL"), "stop_words": ([word.encode()],
                                                                        "BYTES")}
    chunks = _stream(server.url, "llm11", text_inputs(prompt, k + 8, stream=True, **extra))
    assert b"".join(t for _, t, _, _ in chunks).decode("utf-8") == cut
    assert chunks[-1][3]["finish_reason"] == "stop"


def _reference_more(server, prompt: str, n: int) -> list[int]:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        extra = {"exclude_input_in_output": ([True], "BOOL")}
        return client.infer("llm11", text_inputs(prompt, n, **extra)).as_numpy(
            "output_ids").tolist()
    finally:
        client.close()
