"""Graph backends: how a graph module becomes the callable the engine runs.

- `eager`: the module itself (the reference).
- `compile`: torch.compile with fullgraph=True, dynamic=False: one static graph per input shape,
  i.e. per context bucket and per decode width, compiled on first use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Graph = Callable[..., tuple[torch.Tensor, ...]]


def build_graph(module: nn.Module, *, backend: str) -> Graph:
    if backend == "eager":
        return module
    if backend == "compile":
        return torch.compile(module, fullgraph=True, dynamic=False)
    raise ValueError(f"backend={backend!r} is not supported: use 'eager' or 'compile'")
