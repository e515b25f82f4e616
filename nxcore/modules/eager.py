"""Telling an eager call from a traced one, for code with a faster eager-only path."""

from __future__ import annotations

import torch


def runs_eagerly(t: torch.Tensor) -> bool:
    """True when `t` is a plain tensor outside torch.compile / torch.export tracing (which hand
    code fake or functional tensors): Python control flow and direct kernel calls are then free
    to replace what a graph must express as ops (custom ops, torch.cond)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and not on_xla(t)


def on_xla(t: torch.Tensor) -> bool:
    """True for a tensor on an XLA device (torch-xla, torch-neuronx; traced or lazy): its ops are
    recorded into a program that runs at the next sync, so reading a value on the host (`bool(t)`,
    `.item()`, a storage address) cuts the program in two. torch-xla then runs the op on the host
    and counts an `aten::` fallback: what `nxcore.xla.metrics` reports and `make xla-check` forbids."""
    return t.device.type == "xla"
