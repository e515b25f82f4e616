"""Eager bf16 CPU paths through nxcore's fused elementwise ops (`nxcore/csrc/fused.cpp`).

RMSNorm, the residual add before it, SiLU-and-multiply and rotary embedding are each a chain of
ATen ops in the model code; run eagerly on bf16, each op of a chain is one more pass over memory
(measured: more time than the linears in a 2048-token context encoding on one core). `applies(x)`
says when the fused op may replace the chain: an eager call (traced graphs keep the ATen ops,
which Inductor and XLA fuse themselves), bf16 on the CPU, nxcore's C++ ops loaded, and a CPU with
AVX512-BF16. The ops round where the chains round (see fused.cpp), so results are the chains'.
"""

from __future__ import annotations

import functools

import torch

from nxcore import native
from nxcore.modules.eager import runs_eagerly

enabled = True
"""Switch for comparisons (tests, benchmarks): False keeps every chain of ATen ops."""


@functools.cache
def supported() -> bool:
    """nxcore's C++ ops are loaded and this CPU runs their fused kernels."""
    return native.available() and bool(torch.ops.nxcore._fused_supported())


def applies(x: torch.Tensor) -> bool:
    return enabled and x.dtype == torch.bfloat16 and runs_eagerly(x) and x.device.type == "cpu" and supported()


@functools.cache
def attention_supported() -> bool:
    """nxcore's prefill attention runs here (AVX512-BF16; AMX through ATen's brgemm where the CPU has it)."""
    return supported() and bool(torch.ops.nxcore._prefill_attention_supported())


def row_max_applies(logits: torch.Tensor) -> bool:
    """`nxcore::row_max` may replace `logits.max(dim=-1, keepdim=True)` (float32 [N, V]) in an eager
    call: the greedy token's reduction, which ATen computes ~10x slower than the maximum alone."""
    return enabled and logits.dtype == torch.float32 and logits.dim() == 2 and runs_eagerly(logits) and logits.device.type == "cpu" and supported()


def attention_applies(q: torch.Tensor) -> bool:
    """`nxcore::prefill_attention` may replace causal SDPA in an eager context encoding."""
    return applies(q) and attention_supported()
