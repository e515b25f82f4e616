"""Linear layers whose bf16 weights run prepacked for oneDNN on CPU.

Decode is a chain of matrix-vector products, so its speed is the speed at which each linear
streams its weight. On CPU, `F.linear` in bfloat16 reorders the weight into oneDNN's blocked
layout on every call; measured on this project's machine (AMD EPYC, avx512_bf16), it streams
~30 GB/s where the same product on a weight packed once reaches ~60-73 GB/s, with bit-identical
results. Inductor only packs weights under freezing, which bakes a copy of them into every
compiled graph, so the packing is done here instead, once per weight at load:

- `prepack(model)` packs every `Linear`'s weight and keeps the packed copy in a registry keyed by
  the dense weight's storage; the registry entry dies with the model;
- `Linear.forward` calls the custom op `nxcore::linear(x, weight, bias)`. Graphs (eager, exported,
  AOTInductor) see the dense weight as an ordinary input, so the compiled artifacts stay
  weight-free and shape-static; the op finds the packed copy by the weight's storage and falls
  back to `F.linear` when there is none (float32, an unpacked model, no oneDNN).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

from nxcore.modules.eager import runs_eagerly

_PACKED: dict[tuple[int, int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
"""(storage address, storage offset, shape, dtype) of a dense weight -> its oneDNN-packed copy."""

PACKABLE = (torch.bfloat16,)
"""Dtypes packed when oneDNN supports them here (float32 measured no faster packed)."""


def _key(weight: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    return weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.dtype


@torch.library.custom_op("nxcore::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, on the packed copy of `weight` when `prepack` made one."""
    packed = _PACKED.get(_key(weight))
    if packed is None:
        return F.linear(x, weight, bias)
    return _packed_linear(x, packed, bias, weight.shape[0])


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear routed through `nxcore::linear` (same parameters, same state-dict names).

    Run eagerly on plain tensors, it calls oneDNN on the packed weight itself: the custom op's
    Python dispatch costs ~30-40 us a call (measured here), a few ms per decode step. Traced
    (torch.export, torch.compile: fake or functional tensors), it stays the custom op, so graphs
    keep the dense weight as their input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_eagerly(x):
            packed = _PACKED.get(_key(self.weight))
            if packed is not None:
                return _packed_linear(x, packed, self.bias, self.weight.shape[0])
        return torch.ops.nxcore.linear(x, self.weight, self.bias)


def can_pack(dtype: torch.dtype) -> bool:
    if dtype not in PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(model: nn.Module) -> int:
    """Pack the weight of every `Linear` in `model` (CPU, packable dtype); returns how many.
    The packed copies are dropped when `model` is garbage-collected."""
    keys = []
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type == "cpu" and can_pack(module.weight.dtype):
            key = _key(module.weight)
            if key not in _PACKED:
                _PACKED[key] = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
                keys.append(key)
    if keys:
        weakref.finalize(model, _drop, keys)
    return len(keys)


def _drop(keys: list[tuple[int, int, tuple[int, ...], torch.dtype]]) -> None:
    for key in keys:
        _PACKED.pop(key, None)
