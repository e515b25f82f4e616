"""Tensor parallelism: shard plans, TP=2 against TP=1 and transformers, KV across TP degrees, errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from nxcore import Engine, RuntimeConfig, SamplingParams, StoppingCriteria, generate
from nxcore.kv_cache import KVSnapshot
from nxcore.model_config import ModelConfig
from nxcore.parallel.executor import TPRankError
from nxcore.parallel.plan import GQAStrategy, make_plan
from tests.conftest import Checkpoint, random_prompt, write_checkpoint

CONFIG = RuntimeConfig(batch_size=2, ctx_batch_size=2, seq_len=64, buckets=(32, 64), dtype="float32")
STOP = StoppingCriteria(max_new_tokens=10, ignore_eos=True)

# 4 KV heads (plain sharding), 1 KV head (replicated), 3 KV / 6 query heads (MHA), 3 query heads (padding),
# with an intermediate size and a vocabulary that do not split evenly either.
TP_VARIANTS = {
    "kv4": dict(num_key_value_heads=4),
    "kv1": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "q6-kv3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=130, vocab_size=511),
    "q3-pad": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3),
}
STRATEGY = {
    "kv4": GQAStrategy.SHARD,
    "kv1": GQAStrategy.REPLICATE_TO_TP_DEGREE,
    "q6-kv3": GQAStrategy.CONVERT_TO_MHA,
    "q3-pad": GQAStrategy.CONVERT_TO_MHA,
}


def _cfg(heads: int, kv: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=100,
        hidden_size=heads * 8,
        intermediate_size=30,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
    )


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "strategy", "q_heads", "kv_heads"),
    [
        (4, 4, 2, GQAStrategy.SHARD, ((0, 1), (2, 3)), ((0, 1), (2, 3))),
        (8, 2, 4, GQAStrategy.REPLICATE_TO_TP_DEGREE, ((0, 1), (2, 3), (4, 5), (6, 7)), ((0,), (0,), (1,), (1,))),
        (6, 1, 4, GQAStrategy.REPLICATE_TO_TP_DEGREE, ((0, 1), (2, 3), (4, 5), (None, None)), ((0,), (0,), (0,), (0,))),
        (6, 3, 2, GQAStrategy.CONVERT_TO_MHA, ((0, 1, 2), (3, 4, 5)), ((0, 0, 1), (1, 2, 2))),
        (3, 3, 2, GQAStrategy.CONVERT_TO_MHA, ((0, 1), (2, None)), ((0, 1), (2, 2))),
    ],
)
def test_shard_plans_follow_nxd(heads, kv, tp, strategy, q_heads, kv_heads) -> None:
    plan = make_plan(_cfg(heads, kv), tp)
    assert (plan.strategy, plan.q_heads, plan.kv_heads) == (strategy, q_heads, kv_heads)
    assert [head for head, _ in enumerate(plan.logical_kv_positions())] == list(range(kv))
    assert plan.intermediate_per_rank * tp >= 30 and plan.vocab_per_rank * tp >= 100


def test_unshardable_tp_degree_names_the_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"tp_degree=8 cannot shard 6 query heads and 2 KV heads: valid TP degrees are 1..6 \(without padded heads: \[1, 2, 3, 6\]\)"
    ):
        make_plan(_cfg(6, 2), 8)


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("tp")
    return {name: write_checkpoint(root / name, LlamaConfig, overrides) for name, overrides in TP_VARIANTS.items()}


@pytest.mark.parametrize("name", sorted(TP_VARIANTS))
def test_tp2_equals_tp1_and_transformers(tp_checkpoints: dict[str, Checkpoint], name: str, caplog) -> None:
    ckpt = tp_checkpoints[name]
    prompts = [random_prompt(n, seed=n, vocab=ckpt.hf_model.config.vocab_size) for n in (5, 21)]
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=4)
    tp1 = Engine.from_pretrained(ckpt.path, CONFIG)
    with caplog.at_level("INFO", logger="nxcore.parallel.executor"):
        tp2 = Engine.from_pretrained(ckpt.path, CONFIG.replace(tp_degree=2))
    try:
        assert str(STRATEGY[name]) in caplog.text  # the choice is logged with its numbers
        greedy1, greedy2 = (generate(e, prompts, stopping=STOP) for e in (tp1, tp2))
        for prompt, a, b in zip(prompts, greedy1, greedy2):
            assert a.output_ids == b.output_ids == ckpt.hf_greedy(prompt, STOP.max_new_tokens)
        sampled1, sampled2 = (generate(e, prompts, sampling=sampling, stopping=STOP) for e in (tp1, tp2))
        assert [r.output_ids for r in sampled1] == [r.output_ids for r in sampled2]
        torch.testing.assert_close(tp2.prompt_logits(prompts[1]), tp1.prompt_logits(prompts[1]), atol=1e-5, rtol=1e-5)
        assert tp1.fingerprint == tp2.fingerprint
    finally:
        tp2.close()


def test_kv_moves_between_tp_degrees(tp_checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = tp_checkpoints["q6-kv3"]
    prompt = random_prompt(12, seed=9, vocab=511)
    tp1 = Engine.from_pretrained(ckpt.path, CONFIG)
    tp2 = Engine.from_pretrained(ckpt.path, CONFIG.replace(tp_degree=2))
    try:
        [whole] = generate(tp1, [prompt], stopping=STOP)
        for source, target in ((tp2, tp1), (tp1, tp2)):
            from nxcore import RequestRng, SequenceRequest

            greedy = SamplingParams()
            [first] = source.context_encode([SequenceRequest(slot=0, token_ids=prompt, sampling=greedy, rng=RequestRng(0))])
            kv = source.export_kv(0, len(prompt))
            into = KVSnapshot(keys=torch.empty_like(kv.keys), values=torch.empty_like(kv.values))  # as into an arena region
            source.export_kv(0, len(prompt), out=into)
            assert torch.equal(into.keys, kv.keys) and torch.equal(into.values, kv.values)
            source.free(0)
            assert kv.keys.shape == (2, 3, 12, 16)  # logical: the model's 3 KV heads, no replicas
            target.import_kv(1, kv)
            tokens = [first]
            while len(tokens) < STOP.max_new_tokens:
                [nxt] = target.token_generate([SequenceRequest(slot=1, token_ids=[tokens[-1]], sampling=greedy, rng=RequestRng(0))])
                tokens.append(nxt)
            target.free(1)
            assert tokens == whole.output_ids
    finally:
        tp2.close()


def test_dead_rank_fails_fast(tp_checkpoints: dict[str, Checkpoint]) -> None:
    engine = Engine.from_pretrained(tp_checkpoints["kv4"].path, CONFIG.replace(tp_degree=2))
    try:
        os.kill(engine.executor._procs[1].pid, signal.SIGKILL)
        with pytest.raises(TPRankError, match=r"TP rank 1 exited with code -9"):
            generate(engine, [[5, 6, 7]], stopping=STOP)
        with pytest.raises(TPRankError, match="closed"):
            generate(engine, [[5, 6, 7]], stopping=STOP)
        assert not any(p.is_alive() for p in engine.executor._procs)
    finally:
        engine.close()


def test_tp_degree_must_match_the_saved_config(tp_checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    CONFIG.replace(tp_degree=2).save(tmp_path / "runtime_config.json")
    with pytest.raises(ValueError, match=r"tp_degree=1 \(saved: 2\)"):
        Engine.from_pretrained(tp_checkpoints["kv4"].path, CONFIG, saved_config=tmp_path / "runtime_config.json")
    with pytest.raises(ValueError, match=r"tp_degree=5 cannot shard 4 query heads"):
        Engine.from_pretrained(tp_checkpoints["kv4"].path, CONFIG.replace(tp_degree=5))
