"""Attention with GQA/MQA over the static KV cache.

Two modes, one per graph family:
- `prefill` (context encoding): attends over the bucket's own keys with a causal mask and writes
  them as a prefix into the slots' cache rows.
- `decode` (token generation, speculation): scatters the T new keys at their positions, then
  attends over the slot's whole cache row with a mask `key_pos <= query_pos` (and the sliding
  window, where the layer has one). Stale entries past a slot's length are always masked.

Grouped-query attention runs as a grouped matmul (queries of one KV group share its keys) instead
of repeating K and V per query head. On CPU with nxcore's C++ ops, decode attention is
`nxcore::decode_attention` (`nxcore/csrc/attention.cpp`), which reads each row's slot in place
instead of gathering the rows' K and V out of the cache first; same semantics as `_attend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from nxcore import native
from nxcore.kv_cache import KVCache
from nxcore.modules import fused
from nxcore.modules.linear import Linear
from nxcore.modules.norm import RMSNorm
from nxcore.modules.rotary import apply_rotary

"""True when `nxcore::decode_attention` (C++) is loaded (see `nxcore.native`)."""


@dataclass
class AttentionContext:
    """Per-call state shared by every layer of one graph call."""

    prefill: bool
    slot_ids: torch.Tensor
    """[B] cache rows."""
    positions: torch.Tensor
    """[B, T] absolute positions of the T input tokens."""
    cos: torch.Tensor
    sin: torch.Tensor
    """[B, T, head_dim] rotary tables at `positions`, in the model dtype."""
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    """Boolean masks (True = attend) by sliding window: [B, 1, T, T] prefill (windowed layers only:
    unwindowed prefill is causal by index), [B, 1, T, L] decode."""
    kv_len: int | None = None
    """Decode: cache positions 0..kv_len-1 are read (a static size: the KV-length bucket); None reads all."""


def build_mask(*, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] boolean mask for queries at q_pos [B, T] over keys at k_pos [B or 1, S]."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(
        self,
        *,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
        sliding_window: int | None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.scaling = head_dim**-0.5
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(hidden_size, q_size + 2 * kv_size, bias=qkv_bias)
        self.o_proj = Linear(q_size, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else None

    invariant: bool = False
    """Batch-invariant mode: context encoding attends through `nxcore::decode_attention` too (see forward)."""

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden]; with `keep` (prefill only: [B] query indices), every
        key and value still goes to the cache but only query `keep[b]` of each row attends and is
        projected: [B, 1, hidden] (see `CausalLM.hidden_states`)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), ctx.cos, ctx.sin)
        k = apply_rotary(k.transpose(1, 2), ctx.cos, ctx.sin)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if keep is not None:
            if not ctx.prefill:
                raise ValueError("Attention: `keep` selects queries of a context encoding only")
            return self._attend_kept(q, k, v, ctx, cache, keep)
        if not ctx.prefill:
            cache.scatter(self.layer_idx, ctx.slot_ids, ctx.positions, k, v)
            mask = ctx.masks[self.sliding_window]
            if native.available() and q.device.type == "cpu":
                k_buf, v_buf = cache.buffers_of(self.layer_idx)
                out = torch.ops.nxcore.decode_attention(q, k_buf, v_buf, ctx.slot_ids, mask, self.scaling)
            else:
                keys, values = cache.gather(self.layer_idx, ctx.slot_ids, ctx.kv_len)
                out = self._attend(q, keys, values, mask)
        elif self.invariant:
            # Batch-invariant mode: the prompt's keys go to the cache first and are attended there by
            # the decode kernel, whose sums over keys run in one order for any number of queries and
            # any KV length (masked keys add exact zeros), so re-encoding a sequence gives the bits
            # token generation gave it. Each query reads keys up to its last allowed one, but in
            # one pass without SDPA's blocking: prefill costs more (bench.invariance measures it).
            cache.write_prefix(self.layer_idx, ctx.slot_ids, k, v)
            k_buf, v_buf = cache.buffers_of(self.layer_idx)
            out = torch.ops.nxcore.decode_attention(q, k_buf, v_buf, ctx.slot_ids, ctx.masks[self.sliding_window], self.scaling)
        else:
            cache.write_prefix(self.layer_idx, ctx.slot_ids, k, v)
            keys, values = k, v
            # Measured on this CPU (small llama, bf16, 2048 tokens): fused SDPA 2.0 s vs 5.3 s for
            # the grouped matmul (`_attend`), which stays the decode path (one query per row, where
            # SDPA is the slower one). Prefill positions are the bucket's indices 0..T-1 (padding
            # after the prompt), so without a sliding window the mask is plain causal: `is_causal`
            # lets the kernel skip the blocks above the diagonal instead of reading a [T, T] mask.
            if self.sliding_window is None and fused.attention_applies(q):
                # nxcore/csrc/prefill_attention.cpp: the same causal attention on AMX or AVX512-BF16;
                # measured 1.3x SDPA's CPU kernel at 512 tokens, level at 128 and 2048 on Intel Xeon
                # with AMX, 2.4-3.5x on AMD EPYC (eager bf16 context encoding only).
                out = torch.ops.nxcore.prefill_attention(q, keys, values, self.scaling)
            elif self.sliding_window is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.masks[self.sliding_window], scale=self.scaling, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _attend_kept(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, cache: KVCache, keep: torch.Tensor
    ) -> torch.Tensor:
        """Prefill where one query per row is needed: all keys written, query keep[b] attends."""
        batch, _, length, dim = q.shape
        cache.write_prefix(self.layer_idx, ctx.slot_ids, k, v)
        q = q.gather(2, keep[:, None, None, None].expand(-1, self.num_heads, 1, dim))  # [B, H, 1, D]
        mask = ctx.masks.get(self.sliding_window)
        if mask is None:  # unwindowed prefill is causal by index: query keep[b] sees keys 0..keep[b]
            mask = (torch.arange(length, device=q.device)[None, :] <= keep[:, None])[:, None, None, :]
        else:
            mask = mask.gather(2, keep[:, None, None, None].expand(-1, 1, 1, mask.shape[-1]))
        if native.available() and q.device.type == "cpu":
            # one query per row is what the decode kernel is for (and in batch-invariant mode the
            # kernel every query of a context encoding runs: the kept query gets the same bits)
            k_buf, v_buf = cache.buffers_of(self.layer_idx)
            out = torch.ops.nxcore.decode_attention(q, k_buf, v_buf, ctx.slot_ids, mask, self.scaling)
        else:
            out = self._attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, KV, S, D], mask [B, 1, T, S] -> [B, H, T, D]."""
        batch, _, length, dim = q.shape
        groups = self.num_heads // self.num_kv_heads
        qg = q.reshape(batch, self.num_kv_heads, groups * length, dim)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling
        scores = scores.view(batch, self.num_kv_heads, groups, length, -1)
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(batch, self.num_kv_heads, groups * length, -1)
        out = torch.matmul(probs, v)
        return out.view(batch, self.num_heads, length, dim)


def _fake_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@native.on_load
def _define_shape(loaded: bool) -> None:
    """The shape function of the C++ op `nxcore::decode_attention` (there is no Python op: without
    the C++ ops decode attention gathers, then runs `_attend`)."""
    if loaded:
        torch.library.register_fake("nxcore::decode_attention")(_fake_decode_attention)
