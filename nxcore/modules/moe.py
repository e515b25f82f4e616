"""Mixture of experts with statically shaped dispatch.

Router: linear gate, softmax in float32, top-k, affinities renormalized over the chosen k when
the architecture says so. Experts are stacked weights, `gate_up [E, H, 2I]` and `down [E, I, H]`
(this rank's experts and intermediate slice under TP/EP; the decoder layer all-reduces the
partial sums).

Dispatch, chosen per graph from its static token count T (= rows x width):
- `dense`: every expert runs on every token and the outputs are combined with the routing
  weights (zero for experts a token did not choose). Exact, and the fastest when T*k >= E, as in
  context encoding: E large batched matmuls and no gathers.
- `gather`: each token gathers its k experts' weights and runs only them. Exact, and reads k
  experts per token instead of E: the fastest for token generation, where T*k < E.
- `capacity` (when a capacity factor is set): each expert takes at most
  C = min(T, ceil(T * k * capacity_factor / E)) tokens; routed (token, expert) pairs are admitted
  in token order (then in top-k order) and the ones past an expert's capacity are dropped: they
  add nothing, and the token's remaining experts keep their weights (no renormalization).
  With no overflow the result equals the exact paths. It runs on the dense path with the dropped
  pairs' weights zeroed, so its shapes stay static.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nxcore.modules.mlp import ACTIVATIONS


class Router(nn.Module):
    def __init__(self, *, hidden_size: int, num_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.normalize = normalize

    invariant: bool = False
    """Batch-invariant mode: the router's logits through `nxcore::linear_invariant` (see MoE)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k])."""
        if self.invariant:
            scores = torch.ops.nxcore.linear_invariant(x, self.weight, None)
        else:
            scores = nn.functional.linear(x, self.weight)
        probs = torch.softmax(scores.to(torch.float32), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


class MoE(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        normalize: bool,
        act: str,
        local_experts: range | None = None,
        capacity_factor: float | None = None,
    ) -> None:
        """`intermediate_size` is this rank's slice; `local_experts` the experts this rank holds (EP)."""
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.local = local_experts if local_experts is not None else range(num_experts)
        self.capacity_factor = capacity_factor
        self.intermediate_size = intermediate_size
        self.router = Router(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k, normalize=normalize)
        self.gate_up = nn.Parameter(torch.empty(len(self.local), hidden_size, 2 * intermediate_size))
        self.down = nn.Parameter(torch.empty(len(self.local), intermediate_size, hidden_size))
        self.act = ACTIVATIONS[act]

    def dispatch_for(self, tokens: int) -> str:
        if self.capacity_factor is not None:
            return "capacity"
        return "gather" if tokens * self.top_k < self.num_experts else "dense"

    def capacity(self, tokens: int) -> int:
        assert self.capacity_factor is not None, "capacity dispatch needs a capacity factor"
        return min(tokens, math.ceil(tokens * self.top_k * self.capacity_factor / self.num_experts))

    invariant: bool = False
    """Batch-invariant mode (`RuntimeConfig.batch_invariant`): every token runs the same arithmetic
    whatever else is in the call. The gather and dense dispatches (chosen by token count) compute a
    token differently, and capacity drops depend on the other tokens, so this mode runs every local
    expert over every token through `nxcore::linear_invariant` and adds the routed experts' outputs
    in expert order (`_invariant`): exact, at the dense dispatch's cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.router(flat)
        if self.invariant:
            return self._invariant(flat, self._dense_weights(weights, experts)).reshape(shape)
        method = self.dispatch_for(flat.shape[0])
        if method == "gather":
            out = self._gather(flat, weights, experts)
        else:
            if method == "capacity":
                weights = weights * self._admitted(experts, self.capacity(flat.shape[0]))
            out = self._dense(flat, self._dense_weights(weights, experts))
        return out.reshape(shape)

    def _expert_mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = torch.matmul(x, gate_up).split(self.intermediate_size, dim=-1)
        return torch.matmul(self.act(gate) * up, down)

    def lay_out_for_invariance(self) -> None:
        """Store each expert's weights transposed in memory (same shapes): `_invariant` reads
        `gate_up[e].t()` and `down[e].t()` as `[out, in]` rows, which are then contiguous views
        instead of a copy of every expert per call."""
        with torch.no_grad():
            for p in (self.gate_up, self.down):
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)

    def _invariant(self, x: torch.Tensor, dense_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(len(self.local)):  # a fixed order of additions for every token
            gate, up = torch.ops.nxcore.linear_invariant(x, self.gate_up[e].t(), None).split(self.intermediate_size, dim=-1)
            y = torch.ops.nxcore.linear_invariant(self.act(gate) * up, self.down[e].t(), None)
            out = out + dense_weights[:, e : e + 1].to(y.dtype) * y
        return out

    def _dense_weights(self, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """[T, local experts] routing weight of each local expert for each token (0 if not chosen)."""
        dense = torch.zeros(weights.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device)
        dense = dense.scatter_add(1, experts, weights)
        return dense[:, self.local.start : self.local.stop]

    def _dense(self, x: torch.Tensor, dense_weights: torch.Tensor) -> torch.Tensor:
        y = self._expert_mlp(x.unsqueeze(0), self.gate_up, self.down)  # [E_local, T, H]
        return torch.einsum("te,eth->th", dense_weights.to(y.dtype), y)

    def _gather(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        local = experts - self.local.start
        mine = (local >= 0) & (local < len(self.local))
        index = torch.where(mine, local, torch.zeros_like(local))
        y = self._expert_mlp(x[:, None, None, :], self.gate_up[index], self.down[index]).squeeze(2)  # [T, k, H]
        w = torch.where(mine, weights, torch.zeros_like(weights)).to(y.dtype)
        return (y * w.unsqueeze(-1)).sum(dim=1)

    def _admitted(self, experts: torch.Tensor, capacity: int) -> torch.Tensor:
        """[T, k] 1.0 where the (token, expert) pair fits the expert's capacity, in token-then-k order."""
        onehot = nn.functional.one_hot(experts.reshape(-1), self.num_experts)  # [T*k, E]
        position = (torch.cumsum(onehot, dim=0) - 1) * onehot
        return ((position.sum(dim=-1) < capacity).to(torch.float32)).view(experts.shape)
