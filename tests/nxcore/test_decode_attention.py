"""`nxcore::decode_attention` (C++) against the Python decode path it replaces: K and V gathered
out of the cache, then `Attention._attend` (grouped matmul, masked, float32 softmax)."""

from __future__ import annotations

import pytest
import torch

from nxcore import native
from nxcore.kv_cache import KVCache
from nxcore.modules.attention import Attention, build_mask

pytestmark = pytest.mark.skipif(not native.available(), reason="nxcore's C++ ops are not built here (see nxcore.native)")


def _layer(heads: int, kv_heads: int, head_dim: int) -> Attention:
    return Attention(
        layer_idx=0,
        hidden_size=heads * head_dim,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qkv_bias=False,
        o_bias=False,
        qk_norm_eps=None,
        sliding_window=None,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "heads, kv_heads, width, head_dim, window",
    [
        (8, 4, 1, 64, None),  # token generation, GQA 2
        (6, 2, 5, 32, None),  # speculation: 5 new positions, GQA 3
        (4, 4, 1, 128, None),  # MHA, wide heads
        (8, 2, 1, 128, None),  # GQA 4 on wide heads: bf16 sums values in two groups of 2 queries
        (6, 2, 1, 96, None),  # a width the register-accumulator path does not take
        (4, 1, 3, 16, 6),  # MQA with a sliding window
    ],
)
def test_op_equals_gather_then_attend(
    dtype: torch.dtype, tol: float, heads: int, kv_heads: int, width: int, head_dim: int, window: int | None
) -> None:
    torch.manual_seed(0)
    rows, slots, seq_len, kv_len = 4, 6, 48, 40
    cache = KVCache(num_layers=1, slots=slots, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim, dtype=dtype)
    for buf in cache.buffers():
        buf.normal_()
    layer = _layer(heads, kv_heads, head_dim)
    slot_ids = torch.tensor([5, 0, 3, cache.scratch_slot])  # out of order, and a padding row on the scratch slot
    positions = torch.stack([torch.randint(width, kv_len, (1,)) - width + torch.arange(width) for _ in range(rows)])
    mask = build_mask(q_pos=positions, k_pos=torch.arange(kv_len)[None], window=window)
    mask[-1] = False  # the padding row attends to nothing: a uniform average, never NaN
    q = torch.randn(rows, heads, width, head_dim, dtype=dtype)
    k_buf, v_buf = cache.buffers_of(0)
    got = torch.ops.nxcore.decode_attention(q, k_buf, v_buf, slot_ids, mask, layer.scaling)
    keys, values = cache.gather(0, slot_ids, kv_len)
    expected = layer._attend(q, keys, values, mask)
    assert got.shape == expected.shape and got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_op_rejects_shapes_that_do_not_fit() -> None:
    q = torch.randn(2, 4, 1, 16)
    cache = torch.randn(3, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"mask .* does not fit"):
        torch.ops.nxcore.decode_attention(q, cache, cache, torch.tensor([0, 1]), torch.ones(2, 1, 1, 9, dtype=torch.bool), 0.25)
    with pytest.raises(RuntimeError, match="slot_ids"):
        torch.ops.nxcore.decode_attention(q, cache, cache, torch.tensor([0]), torch.ones(2, 1, 1, 8, dtype=torch.bool), 0.25)
