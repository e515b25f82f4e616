"""RMSNorm, computed in float32 and cast back, as in Llama."""

from __future__ import annotations

import torch
from torch import nn

from nxcore.modules import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return torch.ops.nxcore.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): the residual add and the norm after it, one pass when fused."""
        if self._fused(x) and residual.dtype == x.dtype and residual.shape == x.shape:
            total, normed = torch.ops.nxcore.add_rms_norm(x, residual, self.weight, self.eps)
            return total, normed
        total = x + residual
        return total, self(total)

    def _fused(self, x: torch.Tensor) -> bool:
        return self.weight.dtype == x.dtype and fused.applies(x)
