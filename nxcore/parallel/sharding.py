"""Slicing a converted (logical) state dict for one TP rank, as the plan says.

Column-parallel weights (fused q/k/v rows, gate/up rows, vocab rows) take the rank's rows;
row-parallel weights (o_proj, down_proj columns) take the rank's columns and keep their bias on
rank 0 only, so the all-reduce adds it once. Padded heads, intermediate units and vocab entries
are zeros.
"""

from __future__ import annotations

import torch

from nxcore.model_config import ModelConfig
from nxcore.parallel.plan import ShardPlan


def _heads(t: torch.Tensor, heads: tuple[int | None, ...], head_dim: int) -> torch.Tensor:
    """Rows of the given heads of t [n_heads * head_dim, ...]; zeros for None."""
    blocks = t.view(-1, head_dim, *t.shape[1:])
    zero = torch.zeros_like(blocks[0])
    return torch.cat([blocks[h] if h is not None else zero for h in heads], dim=0)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _slice_rows(t: torch.Tensor, rank: int, per_rank: int) -> torch.Tensor:
    return _pad_rows(t, per_rank * (rank + 1))[rank * per_rank : (rank + 1) * per_rank].clone()


def shard_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, plan: ShardPlan, rank: int) -> dict[str, torch.Tensor]:
    if plan.tp == 1:
        return state
    d, inter = cfg.head_dim, plan.intermediate_per_rank
    q_heads, kv_heads = plan.q_heads[rank], plan.kv_heads[rank]
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            out[name] = _slice_rows(t, rank, plan.vocab_per_rank)
        elif name.endswith("attn.qkv_proj.weight") or name.endswith("attn.qkv_proj.bias"):
            q, k, v = t.split([cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d], dim=0)
            out[name] = torch.cat([_heads(q, q_heads, d), _heads(k, kv_heads, d), _heads(v, kv_heads, d)], dim=0)
        elif name.endswith("attn.o_proj.weight"):
            out[name] = _heads(t.t(), q_heads, d).t().contiguous()
        elif name.endswith("mlp.gate_up_proj.weight") or name.endswith("mlp.gate_up_proj.bias"):
            gate, up = t.chunk(2, dim=0)
            out[name] = torch.cat([_slice_rows(gate, rank, inter), _slice_rows(up, rank, inter)], dim=0)
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = _slice_rows(t.t(), rank, inter).t().contiguous()
        elif name.endswith("mlp.gate_up"):  # [E, H, 2I]: this rank's experts, its slice of I
            experts, part = plan.experts_of(rank), plan.moe_slice_of(rank)
            gate, up = t[experts.start : experts.stop].chunk(2, dim=-1)
            moe = plan.moe_intermediate_per_rank
            out[name] = torch.cat([_slice_rows(g.transpose(0, 2), part, moe).transpose(0, 2) for g in (gate, up)], dim=-1).contiguous()
        elif name.endswith("mlp.down"):  # [E, I, H]
            experts, part = plan.experts_of(rank), plan.moe_slice_of(rank)
            out[name] = (
                _slice_rows(t[experts.start : experts.stop].transpose(0, 1), part, plan.moe_intermediate_per_rank).transpose(0, 1).contiguous()
            )
        elif name.endswith("attn.o_proj.bias") or name.endswith("mlp.down_proj.bias"):
            out[name] = t.clone() if rank == 0 else torch.zeros_like(t)
        else:  # norms: replicated
            out[name] = t
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
