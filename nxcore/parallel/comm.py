"""Collectives a graph may contain, as traceable functional collectives (torch.export keeps them).

`TPComm` for one rank of a tensor-parallel group; at TP=1 every collective is the identity, so
the same model code runs unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol

from nxcore.parallel.plan import ShardPlan


@dataclass(frozen=True)
class TPComm:
    plan: ShardPlan
    rank: int = 0
    group: Any = None
    """The torch.distributed process group (None at TP=1)."""

    @property
    def world(self) -> int:
        return self.plan.tp

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        return funcol.all_reduce(t, "sum", self.group)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim`, in rank order."""
        if self.world == 1:
            return t
        gathered = funcol.all_gather_single(t.unsqueeze(0).contiguous(), 0, self.group)
        return torch.cat(gathered.unbind(0), dim=dim)

    @property
    def vocab_offset(self) -> int:
        return self.rank * self.plan.vocab_per_rank


def single_rank(plan: ShardPlan) -> TPComm:
    return TPComm(plan=plan)
