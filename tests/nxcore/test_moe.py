"""Mixture of experts: block parity with transformers on every dispatch path, capacity drops,
generation at TP=1, TP=2 and EP=2, export."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from nxcore import Engine, RequestRng, RuntimeConfig, SamplingParams, SequenceRequest, StoppingCriteria, generate
from nxcore.model_config import ModelConfig
from nxcore.modules.moe import MoE
from nxcore.parallel.plan import make_plan
from tests.conftest import MOE_VARIANTS, Checkpoint, random_prompt, write_checkpoint

E, K, H, I = 8, 2, 32, 24
CONFIG = RuntimeConfig(batch_size=2, ctx_batch_size=2, seq_len=64, buckets=(32, 64), dtype="float32")
STOP = StoppingCriteria(max_new_tokens=10, ignore_eos=True)


def hf_block(kind: str, normalize: bool = True):
    torch.manual_seed(0)
    if kind == "mixtral":
        block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K))
    else:
        block = Qwen3MoeSparseMoeBlock(
            Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=normalize)
        )
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block.eval()


def ours(block, *, normalize: bool = True, capacity_factor: float | None = None) -> MoE:
    moe = MoE(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K, normalize=normalize, act="silu", capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        moe.gate_up.copy_(block.experts.gate_up_proj.transpose(1, 2))
        moe.down.copy_(block.experts.down_proj.transpose(1, 2))
    return moe.eval()


@pytest.mark.parametrize(("kind", "normalize"), [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
@pytest.mark.parametrize("tokens", [1, 3, 16])  # gather path (T*k < E) and dense path
def test_block_matches_transformers(kind: str, normalize: bool, tokens: int) -> None:
    block = hf_block(kind, normalize)
    moe = ours(block, normalize=normalize)
    x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        expected = block(x)
        got = moe(x)
        chosen = moe.router(x.reshape(-1, H))[1].reshape(-1)
    assert moe.dispatch_for(tokens) == ("gather" if tokens * K < E else "dense")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    counts = torch.bincount(chosen, minlength=E)
    if tokens == 16:
        assert counts.max() >= 3  # several tokens routed to the same expert
    else:
        assert (counts == 0).any()  # experts that receive no token


def test_both_exact_paths_agree_and_capacity_without_overflow_is_exact() -> None:
    block = hf_block("mixtral")
    x = torch.randn(1, 6, H, generator=torch.Generator().manual_seed(1))
    dense, gather, capped = ours(block), ours(block), ours(block, capacity_factor=float(E))
    gather.dispatch_for = lambda tokens: "gather"  # force the other exact path on the same input
    with torch.no_grad():
        torch.testing.assert_close(gather(x), dense(x), atol=1e-5, rtol=1e-5)
        assert capped.capacity(6) == 6  # nothing can overflow
        torch.testing.assert_close(capped(x), dense(x), atol=1e-5, rtol=1e-5)


def test_capacity_overflow_drops_later_tokens_deterministically() -> None:
    block = hf_block("qwen3_moe")
    moe = ours(block, capacity_factor=0.5)
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(-1, H)
    capacity = moe.capacity(12)
    assert capacity == math.ceil(12 * K * 0.5 / E) == 2
    with torch.no_grad():
        got = moe(x).reshape(-1, H)
        again = moe(x).reshape(-1, H)
        weights, experts = moe.router(flat)
        # Reference: admit (token, expert) pairs in token order, then top-k order, up to capacity per expert.
        used = [0] * E
        expected = torch.zeros_like(flat)
        for t in range(12):
            for j in range(K):
                e = int(experts[t, j])
                if used[e] < capacity:
                    used[e] += 1
                    gate, up = (flat[t] @ moe.gate_up[e]).split(I)
                    expected[t] += weights[t, j] * ((torch.nn.functional.silu(gate) * up) @ moe.down[e])
    assert sum(used) < 12 * K  # something overflowed
    assert torch.equal(got, again)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_expert_parallel_degree_errors() -> None:
    cfg = ModelConfig(
        model_type="mixtral",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    with pytest.raises(ValueError, match=r"ep_degree=3 cannot split 4 experts evenly: valid EP degrees are \[1\]"):
        make_plan(cfg, 3, 3)
    with pytest.raises(ValueError, match=r"ep_degree=4 does not divide tp_degree=2"):
        make_plan(cfg, 2, 4)
    with pytest.raises(ValueError, match=r"ep_degree=3 is invalid: allowed a divisor of tp_degree \(2\)"):
        RuntimeConfig(tp_degree=2, ep_degree=3)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("moe")
    return {name: write_checkpoint(root / name, cls, ov) for name, (cls, ov) in MOE_VARIANTS.items()}


@pytest.mark.parametrize("name", sorted(MOE_VARIANTS))
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 1), (2, 2)])
def test_generation_matches_transformers(moe_checkpoints: dict[str, Checkpoint], name: str, tp: int, ep: int) -> None:
    ckpt = moe_checkpoints[name]
    prompts = [random_prompt(n, seed=n) for n in (4, 23)]
    engine = Engine.from_pretrained(ckpt.path, CONFIG.replace(tp_degree=tp, ep_degree=ep))
    try:
        results = generate(engine, prompts, stopping=STOP)
        assert [r.output_ids for r in results] == [ckpt.hf_greedy(p, STOP.max_new_tokens) for p in prompts]
        if tp == 1:
            torch.testing.assert_close(engine.prompt_logits(prompts[1]), ckpt.hf_logits(prompts[1]), atol=2e-5, rtol=1e-4)
    finally:
        engine.close()


@pytest.mark.parametrize("name", sorted(MOE_VARIANTS))
def test_moe_graphs_export(moe_checkpoints: dict[str, Checkpoint], name: str) -> None:
    engine = Engine.from_pretrained(moe_checkpoints[name].path, CONFIG.replace(speculation_length=3))
    runner = engine.executor.runner
    greedy = SamplingParams()
    prompt = SequenceRequest(slot=0, token_ids=[5, 6, 7], sampling=greedy, rng=RequestRng(0))
    torch.export.export(runner.ctx_graph, (engine._inputs([prompt], rows=2, width=32, prefill=True),), strict=True)
    engine.context_encode([prompt])
    for width in (1, 3):  # token generation (gather dispatch) and speculation
        step = SequenceRequest(slot=0, token_ids=[8] * width, sampling=greedy, rng=RequestRng(0))
        torch.export.export(runner.decode_graph, (engine._inputs([step], rows=1, width=width, prefill=False),), strict=True)
    capped = Engine.from_pretrained(moe_checkpoints[name].path, CONFIG.replace(moe_capacity_factor=1.0))
    torch.export.export(capped.executor.runner.ctx_graph, (capped._inputs([prompt], rows=1, width=32, prefill=True),), strict=True)
