"""Full-model parity with transformers for every architecture and checkpoint option."""

from __future__ import annotations

import pytest
import torch

from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate
from tests.conftest import Checkpoint, random_prompt

BUCKETS = (16, 32, 64)
CONFIG = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=64, buckets=BUCKETS, dtype="float32")
NEW_TOKENS = 12


@pytest.fixture
def engine(checkpoint: Checkpoint) -> Engine:
    return Engine.from_pretrained(checkpoint.path, CONFIG)


def test_context_encoding_logits_match_transformers(checkpoint: Checkpoint, engine: Engine) -> None:
    prompt = random_prompt(40, seed=1)
    ours = engine.prompt_logits(prompt)
    ref = checkpoint.hf_logits(prompt)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [5, 15, 16, 17, 32, 33])
def test_greedy_matches_transformers_around_bucket_edges(checkpoint: Checkpoint, engine: Engine, length: int) -> None:
    prompt = random_prompt(length, seed=length)
    [result] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert result.output_ids == checkpoint.hf_greedy(prompt, NEW_TOKENS)
    assert result.finish_reason == "length"


def test_batch_of_different_lengths_matches_transformers(checkpoint: Checkpoint, engine: Engine) -> None:
    # Six prompts over four slots and two-prompt context batches: queueing, mixed buckets, slot reuse.
    prompts = [random_prompt(n, seed=100 + n) for n in (3, 16, 9, 30, 17, 24)]
    results = generate(engine, prompts, stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.output_ids == checkpoint.hf_greedy(prompt, NEW_TOKENS)
    assert engine.free_slots() == [0, 1, 2, 3]


def test_generation_fills_seq_len_and_stops_with_length(checkpoint: Checkpoint, engine: Engine) -> None:
    prompt = random_prompt(50, seed=7)
    [result] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=100, ignore_eos=True))
    assert len(prompt) + len(result.output_ids) == CONFIG.seq_len
    assert result.finish_reason == "length"
    assert result.output_ids == checkpoint.hf_greedy(prompt, CONFIG.seq_len - len(prompt))


def test_bfloat16_engine_runs_in_bfloat16_close_to_float32(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["qwen3"]
    engine = Engine.from_pretrained(ckpt.path, CONFIG.replace(dtype="bfloat16"))
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.model.kv_cache.k0.dtype == torch.bfloat16
    prompt = random_prompt(20, seed=4)
    ours = engine.prompt_logits(prompt)
    ref = ckpt.hf_logits(prompt)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    [result] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=8, ignore_eos=True))
    assert len(result.output_ids) == 8
