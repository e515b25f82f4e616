"""nxcore's fused bf16 elementwise ops (nxcore/csrc/fused.cpp) against the ATen chains they replace
in eager code: RMSNorm, residual add + RMSNorm, SiLU-and-multiply, rotary embedding; and the greedy
token's reduction (`row_max`) against `torch.max`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional as F

from nxcore import Engine, RuntimeConfig
from nxcore.modules import fused
from nxcore.modules.mlp import GatedMLP
from nxcore.modules.norm import RMSNorm
from nxcore.modules.rotary import apply_rotary
from tests.conftest import Checkpoint

pytestmark = pytest.mark.skipif(not fused.supported(), reason="nxcore's C++ ops are not built or this CPU lacks AVX512-BF16")


@pytest.fixture
def chains() -> Iterator[None]:
    """Inside: the ATen chains (fused ops off)."""
    fused.enabled = False
    try:
        yield
    finally:
        fused.enabled = True


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bf16 bits differ."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


@pytest.mark.parametrize("dim", [64, 100, 768, 2048])
def test_rms_norm_and_add_norm_equal_the_chain(dim: int) -> None:
    torch.manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(dim, dtype=torch.bfloat16)
    x = (torch.randn(3, 37, dim) * 4).to(torch.bfloat16)
    residual = torch.randn(3, 37, dim, dtype=torch.bfloat16)
    assert fused.applies(x)
    out, (total, normed) = norm(x), norm.add_forward(x, residual)
    fused.enabled = False
    try:
        ref, (ref_total, ref_normed) = norm(x), norm.add_forward(x, residual)
    finally:
        fused.enabled = True
    assert _bits_equal(total, ref_total) == 0  # the residual add rounds exactly as torch's bf16 add
    # the sum of squares runs in another order: at most a last-place difference, in few elements
    assert _bits_equal(out, ref) <= out.numel() // 100
    assert _bits_equal(normed, ref_normed) <= out.numel() // 100
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)


@pytest.mark.parametrize("size", [16, 100, 2048])
def test_silu_mul_equals_the_chain(size: int) -> None:
    torch.manual_seed(size)
    mlp = GatedMLP(hidden_size=8, intermediate_size=size, bias=False, act="silu").to(torch.bfloat16)
    gate_up = (torch.randn(5, 9, 2 * size) * 6).to(torch.bfloat16)
    gate, up = gate_up.split(size, dim=-1)
    ref = F.silu(gate) * up
    out = torch.ops.nxcore.silu_mul(gate_up)
    assert out.shape == ref.shape
    assert _bits_equal(out, ref) <= max(1, out.numel() // 1000)
    assert mlp.silu and fused.applies(gate_up)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotary_equals_the_chain_on_transposed_views(head_dim: int, chains: None) -> None:
    torch.manual_seed(head_dim)
    x = torch.randn(2, 11, 6, head_dim, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, D], as attention hands it
    cos, sin = torch.randn(2, 2, 11, head_dim, dtype=torch.bfloat16).unbind(0)
    ref = apply_rotary(x, cos, sin)  # the chain (fused off in this test's fixture)
    fused.enabled = True
    out = apply_rotary(x, cos, sin)
    assert out.is_contiguous() and _bits_equal(out, ref) == 0


@pytest.mark.skipif(not fused.attention_supported(), reason="needs an x86 CPU with AVX512-BF16 (nxcore's C++ ops built)")
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "head_dim"),
    # head_dim 48, 80, 96, 128: one to four vectors of 16 columns in the last tile of each product
    [
        (1, 8, 4, 128, 64),
        (2, 4, 2, 37, 64),
        (1, 8, 4, 300, 64),
        (1, 6, 2, 257, 80),
        (1, 4, 4, 1, 64),
        (1, 2, 1, 700, 128),
        (1, 4, 2, 131, 48),
        (2, 2, 2, 69, 96),
        (1, 4, 2, 160, 64),  # query blocks whose last key ends a group of 32 columns exactly
        (1, 4, 2, 33, 64),  # one key past a group of 32
    ],
)
def test_prefill_attention_is_as_close_to_float32_as_sdpa(batch: int, heads: int, kv_heads: int, length: int, head_dim: int) -> None:
    """Causal GQA attention against a float32 reference: its error is that of SDPA's bf16 kernel
    (both round the probabilities to bf16 before the product with V), over lengths that end inside
    a block and query/key blocks of every position relative to the diagonal."""
    torch.manual_seed(length)
    q = torch.randn(batch, length, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2)  # a view, as attention hands it
    k = torch.randn(batch, kv_heads, length, head_dim, dtype=torch.bfloat16)
    v = torch.randn(batch, length, kv_heads, head_dim, dtype=torch.bfloat16).transpose(1, 2)
    scale = head_dim**-0.5
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    out = torch.ops.nxcore.prefill_attention(q, k, v, scale)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    sdpa_error = (sdpa.float() - exact).abs().max().item()
    assert (out.float() - exact).abs().max().item() <= 1.5 * sdpa_error + 1e-3
    torch.testing.assert_close(out.float(), exact, rtol=0.02, atol=0.02)


def test_prefill_attention_reads_views_in_place_and_writes_rows_for_the_output_projection() -> None:
    """q, k and v as any strided views give what their contiguous copies give (read in place where
    each position's elements are contiguous and the strides even, copied otherwise), and the
    output's memory is [B, T, H, D], so the output projection's reshape needs no copy."""
    torch.manual_seed(0)
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 150, 64
    qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, length, heads, head_dim).transpose(1, 2)
    k = k.view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
    odd = torch.randn(batch, kv_heads, length, head_dim + 1, dtype=torch.bfloat16)[..., :head_dim]  # odd strides: copied
    expected = torch.ops.nxcore.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    for kk, vv in ((k, v), (odd, v), (k, odd)):
        reference = torch.ops.nxcore.prefill_attention(q.contiguous(), kk.contiguous(), vv.contiguous(), 0.125)
        out = torch.ops.nxcore.prefill_attention(q, kk, vv, 0.125)
        assert torch.equal(out, reference)
    out = torch.ops.nxcore.prefill_attention(q, k, v, 0.125)
    assert torch.equal(out, expected) and out.shape == (batch, heads, length, head_dim)
    rows = out.transpose(1, 2)
    assert rows.is_contiguous() and rows.reshape(batch, length, -1).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("rows, vocab", [(32, 32000), (1, 7), (3, 16), (5, 33), (2, 151936)])
def test_row_max_is_torch_max(rows: int, vocab: int) -> None:
    """The greedy token's reduction: the maximum and the index of its first occurrence, as
    `max(dim=-1, keepdim=True)` gives them, for vocabularies inside, at and past a vector of 16."""
    torch.manual_seed(vocab)
    x = torch.randn(rows, vocab)
    x[0, vocab // 3] = x[0, vocab // 2] = x.max() + 1  # a tie: the first wins
    values, indices = torch.ops.nxcore.row_max(x)
    expected_values, expected_indices = x.max(dim=-1, keepdim=True)
    assert indices.dtype == torch.int64 and torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    assert indices[0, 0] == vocab // 3


def test_row_max_keeps_torch_max_on_infinities_and_nan() -> None:
    x = torch.zeros(4, 40)
    x[0] = float("-inf")  # a row of masked logits: index 0, as torch.max
    x[1, 7], x[1, 3] = float("nan"), 9.0  # NaN propagates, at its index
    x[2, 2] = x[2, 20] = float("nan")  # the first NaN
    x[3, 39] = float("inf")
    values, indices = torch.ops.nxcore.row_max(x)
    expected_values, expected_indices = x.max(dim=-1, keepdim=True)
    torch.testing.assert_close(values, expected_values, equal_nan=True)
    assert indices.flatten().tolist() == expected_indices.flatten().tolist() == [0, 7, 2, 39]
    zeros = -torch.ones(2, 40)
    zeros[0, 5], zeros[0, 30] = -0.0, 0.0  # equal maxima of either sign: the first, with its sign
    zeros[1, 5], zeros[1, 30] = 0.0, -0.0
    values, indices = torch.ops.nxcore.row_max(zeros)
    expected_values, expected_indices = zeros.max(dim=-1, keepdim=True)
    assert torch.equal(indices, expected_indices) and torch.equal(values.signbit(), expected_values.signbit())


def test_eager_sampling_uses_row_max_with_the_same_tokens() -> None:
    from nxcore.sampling import sample

    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    logits[2, 10] = logits[2, 500] = 50.0
    params = dict(
        temperature=torch.tensor([0.0, 0.0, 0.0, 0.8, 0.0, 1.2]),
        top_k=torch.tensor([0, 0, 0, 40, 0, 0]),
        top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 1.0]),
        rand=torch.rand(6),
        max_topk=64,
    )
    assert fused.row_max_applies(logits)
    got = sample(logits, **params)
    fused.enabled = False
    try:
        assert not fused.row_max_applies(logits)
        expected = sample(logits, **params)
    finally:
        fused.enabled = True
    assert torch.equal(got, expected) and got[2] == 10


def test_ops_refuse_what_they_do_not_compute() -> None:
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        torch.ops.nxcore.rms_norm(torch.ones(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="does not end in the weight's size"):
        torch.ops.nxcore.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nxcore.row_max(torch.ones(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.nxcore.silu_mul(torch.ones(2, 7, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"must be \[B, T, D\]"):
        torch.ops.nxcore.rotary(
            torch.ones(1, 2, 3, 8, dtype=torch.bfloat16), torch.ones(1, 4, 8, dtype=torch.bfloat16), torch.ones(1, 4, 8, dtype=torch.bfloat16)
        )
    if fused.attention_supported():
        with pytest.raises(RuntimeError, match=r"KV heads \(3\) must divide query heads \(4\)"):
            torch.ops.nxcore.prefill_attention(*(torch.ones(1, h, 5, 8, dtype=torch.bfloat16) for h in (4, 3, 3)), 1.0)
    assert not fused.applies(torch.ones(2, 8))  # float32 keeps the chains
    with torch.device("meta"):
        assert not fused.applies(torch.ones(2, 8, dtype=torch.bfloat16))


def test_a_bf16_engine_computes_the_same_logits_fused_or_not(checkpoint: Checkpoint) -> None:
    """The whole model, eager bf16, every position of several prompts: the logits with the fused ops
    and nxcore's prefill attention agree with those of the ATen chains and SDPA to bf16 noise (the
    elementwise ops round where the chains round; the attention sums its blocks in another order
    than SDPA), and so do the greedy tokens wherever the chains' best two logits are further apart
    than that noise (random tiny models have near ties: one bf16 step flips those)."""
    engine = Engine.from_pretrained(checkpoint.path, RuntimeConfig(batch_size=2, seq_len=160, dtype="bfloat16", on_device_sampling=False))
    prompts = [[5, 9, 33, 2, 77, 100, 4, 8, 21], [7] * 30, [(i * 37) % 250 + 3 for i in range(150)]]
    try:
        ours = [engine.prompt_logits(p) for p in prompts]
        fused.enabled = False
        chains = [engine.prompt_logits(p) for p in prompts]
    finally:
        fused.enabled = True
        engine.close()
    decided = 0
    for got, ref in zip(ours, chains):
        torch.testing.assert_close(got, ref, rtol=0.02, atol=0.05)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
        decided += int(clear.sum())
    assert decided > 100  # the check above compared most positions
