"""Telling an eager call from a traced one, for code with a faster eager-only path."""

from __future__ import annotations

import torch


def runs_eagerly(t: torch.Tensor) -> bool:
    """True when `t` is a plain tensor outside torch.compile / torch.export tracing (which hand
    code fake or functional tensors): Python control flow and direct kernel calls are then free
    to replace what a graph must express as ops (custom ops, torch.cond)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()
