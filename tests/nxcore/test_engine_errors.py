"""Requests that do not fit the compiled shapes or the slot state fail with a message naming value and limit."""

from __future__ import annotations

import pytest

from nxcore import Engine, EngineError, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from tests.conftest import Checkpoint

CONFIG = RuntimeConfig(batch_size=2, ctx_batch_size=1, seq_len=32, buckets=(16, 32))


@pytest.fixture(scope="module")
def engine(checkpoints: dict[str, Checkpoint]) -> Engine:
    return Engine.from_pretrained(checkpoints["llama"].path, CONFIG)


@pytest.fixture(autouse=True)
def _free_all(engine: Engine):
    yield
    for slot in range(CONFIG.batch_size):
        engine.free(slot)


def req(slot: int, ids: list[int], sampling: SamplingParams = SamplingParams()) -> SequenceRequest:
    return SequenceRequest(slot=slot, token_ids=ids, sampling=sampling, rng=RequestRng(0))


def test_prompt_longer_than_largest_bucket(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"prompt of 33 tokens .* largest context bucket \(32\)"):
        engine.context_encode([req(0, [5] * 33)])
    assert engine.free_slots() == [0, 1]


def test_more_prompts_than_ctx_batch_size(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"2 prompts .* allowed 1..ctx_batch_size \(1\)"):
        engine.context_encode([req(0, [5]), req(1, [6])])


def test_slot_out_of_range_and_repeated(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"slot ids \[2\] out of range: allowed 0..1"):
        engine.context_encode([req(2, [5])])
    engine.context_encode([req(0, [5])])
    engine.context_encode([req(1, [5])])
    with pytest.raises(EngineError, match="repeat a slot"):
        engine.token_generate([req(0, [5]), req(0, [6])])


def test_token_generation_without_context_encoding(engine: Engine) -> None:
    with pytest.raises(EngineError, match="slot 1, which had no context encoding"):
        engine.token_generate([req(1, [5])])


def test_encoding_into_a_busy_slot(engine: Engine) -> None:
    engine.context_encode([req(0, [5, 6])])
    with pytest.raises(EngineError, match="slot 0 already holds a sequence of 2 tokens"):
        engine.context_encode([req(0, [7])])


def test_seq_len_exhausted(engine: Engine) -> None:
    engine.context_encode([req(0, [5] * 32)])
    with pytest.raises(EngineError, match=r"slot 0 holds 32 tokens; 1 more exceed seq_len \(32\)"):
        engine.token_generate([req(0, [5])])


def test_seq_len_exhausted_finishes_with_length(engine: Engine) -> None:
    [result] = generate(engine, [[5] * 30], stopping=StoppingCriteria(max_new_tokens=50, ignore_eos=True))
    assert result.finish_reason == "length" and len(result.output_ids) == 2
    assert engine.free_slots() == [0, 1]


def test_token_ids_outside_vocab(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"token ids \[512\] out of range: allowed 0..511"):
        engine.context_encode([req(0, [5, 512])])


def test_bad_sampling_parameters(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"top_k=300 .* allowed 0..256"):
        engine.context_encode([req(0, [5], SamplingParams(temperature=1.0, top_k=300))])
    with pytest.raises(EngineError, match=r"temperature=-1"):
        engine.context_encode([req(0, [5], SamplingParams(temperature=-1.0))])


def test_speculation_needs_a_speculation_length(engine: Engine) -> None:
    engine.context_encode([req(0, [5])])
    with pytest.raises(EngineError, match="speculation_length is 0"):
        engine.speculate([req(0, [5, 6])])


def test_import_of_mismatched_snapshot(checkpoints: dict[str, Checkpoint], engine: Engine) -> None:
    other = Engine.from_pretrained(checkpoints["llama-headdim-linear"].path, CONFIG)
    other.context_encode([req(0, [5, 6, 7])])
    with pytest.raises(EngineError, match=r"does not match this model: expected \(2, 2, 3, 16\)"):
        engine.import_kv(0, other.export_kv(0, 3))
    with pytest.raises(EngineError, match="cannot export 4 tokens from slot 0, which holds 3"):
        other.export_kv(0, 4)


def test_seq_len_beyond_model_positions(checkpoints: dict[str, Checkpoint]) -> None:
    with pytest.raises(ValueError, match=r"seq_len=2048 exceeds the model's max_position_embeddings \(1024\)"):
        Engine.from_pretrained(checkpoints["llama"].path, RuntimeConfig(seq_len=2048))


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported: supported architectures are \["):
        Engine.from_pretrained(tmp_path)
