"""How a model's heads, MLP and vocabulary are split over TP ranks, chosen as NxD chooses.

GQA sharding strategies:
- `SHARD`: TP divides the KV head count: each rank holds KV/TP KV heads and their query heads.
- `REPLICATE_TO_TP_DEGREE`: TP is a multiple of the KV head count: each rank holds one KV head
  (each real KV head replicated TP/KV times) and its share of that head's query group, query
  heads padded per group where the group does not split evenly.
- `CONVERT_TO_MHA`: otherwise: KV heads are repeated to the query head count (multi-head
  attention), query heads padded to a multiple of TP.
Padded query heads have zero q and o_proj weights, so they contribute nothing. The intermediate
size and the vocabulary are padded to a multiple of TP the same way (zero weights, padded vocab
entries masked out of sampling).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from nxcore.model_config import ModelConfig

log = logging.getLogger(__name__)


class GQAStrategy(enum.StrEnum):
    SHARD = "SHARD"
    REPLICATE_TO_TP_DEGREE = "REPLICATE_TO_TP_DEGREE"
    CONVERT_TO_MHA = "CONVERT_TO_MHA"


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ShardPlan:
    tp: int
    strategy: GQAStrategy
    q_heads: tuple[tuple[int | None, ...], ...]
    """Per rank: the checkpoint query head behind each local query head (None = padding)."""
    kv_heads: tuple[tuple[int, ...], ...]
    """Per rank: the checkpoint KV head behind each local KV head."""
    intermediate_per_rank: int
    vocab_per_rank: int
    vocab_size: int
    ep: int = 1
    num_experts: int = 0
    moe_intermediate_per_rank: int = 0

    def experts_of(self, rank: int) -> range:
        """The MoE experts rank `rank` holds: its expert-parallel group's share."""
        per_group = self.num_experts // self.ep
        group = rank // (self.tp // self.ep)
        return range(group * per_group, (group + 1) * per_group)

    def moe_slice_of(self, rank: int) -> int:
        """Index of this rank's intermediate slice within its expert group."""
        return rank % (self.tp // self.ep)

    @property
    def q_per_rank(self) -> int:
        return len(self.q_heads[0])

    @property
    def kv_per_rank(self) -> int:
        return len(self.kv_heads[0])

    def logical_kv_positions(self) -> list[tuple[int, int]]:
        """For each checkpoint KV head in order, one (rank, local head) holding it."""
        where: dict[int, tuple[int, int]] = {}
        for rank, heads in enumerate(self.kv_heads):
            for local, head in enumerate(heads):
                where.setdefault(head, (rank, local))
        return [where[h] for h in sorted(where)]


def unpadded_tp_degrees(cfg: ModelConfig) -> list[int]:
    """TP degrees that need no padded query heads."""
    return [tp for tp in range(1, cfg.num_heads + 1) if cfg.num_heads % tp == 0]


def make_plan(cfg: ModelConfig, tp: int, ep: int = 1) -> ShardPlan:
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    group = heads // kv
    if tp % ep:
        raise ValueError(f"ep_degree={ep} does not divide tp_degree={tp}: valid EP degrees are {[d for d in range(1, tp + 1) if tp % d == 0]}")
    if ep > 1 and (not cfg.num_experts or cfg.num_experts % ep):
        raise ValueError(
            f"ep_degree={ep} cannot split {cfg.num_experts} experts evenly: valid EP degrees are "
            f"{[d for d in range(1, tp + 1) if tp % d == 0 and cfg.num_experts and cfg.num_experts % d == 0]}"
        )
    if not 1 <= tp <= heads:
        raise ValueError(
            f"tp_degree={tp} cannot shard {heads} query heads and {kv} KV heads: valid TP degrees are 1..{heads} "
            f"(without padded heads: {unpadded_tp_degrees(cfg)})"
        )
    q_heads: list[tuple[int | None, ...]]  # each rank's query heads; None for a padded (zero) head
    kv_heads: list[tuple[int, ...]]
    if kv % tp == 0:
        strategy = GQAStrategy.SHARD
        kv_pr = kv // tp
        q_heads = [tuple(range(r * kv_pr * group, (r + 1) * kv_pr * group)) for r in range(tp)]
        kv_heads = [tuple(range(r * kv_pr, (r + 1) * kv_pr)) for r in range(tp)]
    elif tp % kv == 0:
        strategy = GQAStrategy.REPLICATE_TO_TP_DEGREE
        ranks_per_kv = tp // kv
        per_rank = -(-group // ranks_per_kv)
        q_heads, kv_heads = [], []
        for r in range(tp):
            head, part = divmod(r, ranks_per_kv)
            local = [head * group + part * per_rank + i for i in range(per_rank)]
            q_heads.append(tuple(h if part * per_rank + i < group else None for i, h in enumerate(local)))
            kv_heads.append((head,))
    else:
        strategy = GQAStrategy.CONVERT_TO_MHA
        per_rank = _ceil_to(heads, tp) // tp
        q_heads, kv_heads = [], []
        for r in range(tp):
            local = [r * per_rank + i for i in range(per_rank)]
            q_heads.append(tuple(h if h < heads else None for h in local))
            kv_heads.append(tuple(min(h, heads - 1) // group for h in local))
    plan = ShardPlan(
        tp=tp,
        strategy=strategy,
        q_heads=tuple(q_heads),
        kv_heads=tuple(kv_heads),
        intermediate_per_rank=_ceil_to(cfg.intermediate_size, tp) // tp,
        vocab_per_rank=_ceil_to(cfg.vocab_size, tp) // tp,
        vocab_size=cfg.vocab_size,
        ep=ep,
        num_experts=cfg.num_experts,
        moe_intermediate_per_rank=_ceil_to(cfg.moe_intermediate_size, tp // ep) // (tp // ep) if cfg.num_experts else 0,
    )
    return plan


def describe(plan: ShardPlan, cfg: ModelConfig) -> str:
    padded = sum(h is None for heads in plan.q_heads for h in heads)
    return (
        f"TP={plan.tp}: {plan.strategy} (query heads {cfg.num_heads}, KV heads {cfg.num_kv_heads}); per rank "
        f"{plan.q_per_rank} query heads ({padded} padded in all), {plan.kv_per_rank} KV heads, "
        f"intermediate {plan.intermediate_per_rank}, vocab {plan.vocab_per_rank}"
        + (
            f", experts {len(plan.experts_of(0))} of {plan.num_experts} (EP={plan.ep}) x intermediate {plan.moe_intermediate_per_rank}"
            if plan.num_experts
            else ""
        )
    )
