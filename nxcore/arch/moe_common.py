"""What Mixtral and Qwen3-MoE share: stacking per-expert HF tensors into `gate_up [E, H, 2I]` and `down [E, I, H]`."""

from __future__ import annotations

import torch

from nxcore.arch.llama import Taker, Tensors
from nxcore.model_config import ModelConfig


def stack_experts(take: Taker, cfg: ModelConfig, *, router: str, experts: str, names: tuple[str, str, str]) -> Tensors:
    """`names` are the per-expert (gate, up, down) tensor names under `experts.{j}.`."""
    gate_name, up_name, down_name = names
    gate_up, down = [], []
    for j in range(cfg.num_experts):
        e = f"{experts}{j}."
        gate, up, dn = take(e + gate_name), take(e + up_name), take(e + down_name)
        if gate is None or up is None or dn is None:
            continue
        gate_up.append(torch.cat([gate, up], dim=0).t())  # [H, 2I]
        down.append(dn.t())  # [I, H]
    out: Tensors = {"mlp.router.weight": take(router)}
    if len(gate_up) == cfg.num_experts:
        out["mlp.gate_up"] = torch.stack(gate_up).contiguous()
        out["mlp.down"] = torch.stack(down).contiguous()
    return out
