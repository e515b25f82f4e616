"""Loading one rank of a model from an HF checkpoint: config, converted weights, TP slice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from nxcore.arch import get_architecture
from nxcore.checkpoint import load_tensors, read_eos_token_ids, read_hf_config
from nxcore.config import DTYPES, RuntimeConfig
from nxcore.malloc import retain_freed_memory
from nxcore.model_config import ModelConfig
from nxcore.modules.decoder import CausalLM
from nxcore.modules.linear import prepack
from nxcore.modules.moe import MoE
from nxcore.parallel.comm import TPComm
from nxcore.parallel.plan import make_plan
from nxcore.parallel.sharding import shard_state_dict

log = logging.getLogger(__name__)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """The checkpoint's architecture facts, with eos ids from generation_config.json merged in."""
    hf_config = read_hf_config(model_dir)
    model_config = get_architecture(hf_config.model_type).read_config(hf_config)
    extra_eos = [t for t in read_eos_token_ids(model_dir) if t not in model_config.eos_token_ids]
    if extra_eos:
        model_config = dataclasses.replace(model_config, eos_token_ids=model_config.eos_token_ids + tuple(extra_eos))
    return model_config


def resolve_config(model_config: ModelConfig, config: RuntimeConfig) -> RuntimeConfig:
    """`config` with dtype `auto` resolved, checked against what the checkpoint can serve."""
    if config.dtype == "auto":
        config = config.replace(dtype=model_config.dtype if model_config.dtype in DTYPES else "float32")
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's max_position_embeddings ({model_config.max_position_embeddings})")
    make_plan(model_config, config.tp_degree, config.ep_degree)  # raises for TP/EP degrees the model cannot take
    return config


def load_rank(model_dir: str | Path, model_config: ModelConfig, config: RuntimeConfig, *, rank: int = 0, group: Any = None) -> tuple[CausalLM, str]:
    """This rank's model (weights sliced for `config.tp_degree`) and the fingerprint of the whole model."""
    arch = get_architecture(model_config.model_type)
    plan = make_plan(model_config, config.tp_degree, config.ep_degree)
    dtype = config.torch_dtype
    state = arch.convert_state_dict(load_tensors(model_dir, dtype=dtype), model_config)
    # Batch-invariant mode is part of the model's identity for pairing: a prefill and a decode in
    # different modes would not continue each other's bits, so they refuse each other as they would
    # another dtype.
    fingerprint = fingerprint_of(model_config, state, config.dtype, batch_invariant=config.batch_invariant)
    state = shard_state_dict(state, model_config, plan, rank)
    comm = TPComm(plan=plan, rank=rank, group=group)
    with torch.device("meta"):
        model = CausalLM(
            model_config, slots=config.batch_size, seq_len=config.seq_len, dtype=dtype, comm=comm, capacity_factor=config.moe_capacity_factor
        )
    if config.batch_invariant:
        model.set_batch_invariant()
    model.to_empty(device="cpu")
    model.init_buffers()
    # assign: parameters take the converted tensors as they are (their dtype, no second copy).
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    if config.batch_invariant:
        for module in model.modules():
            if isinstance(module, MoE):
                module.lay_out_for_invariance()
    model.eval().requires_grad_(False)
    prepack(model)  # bf16 linear weights in oneDNN's layout, once (see nxcore/modules/linear.py)
    retain_freed_memory()  # large activations reuse freed memory instead of faulting in fresh pages (nxcore/malloc.py)
    return model, fingerprint


def fingerprint_of(model_config: ModelConfig, state: dict[str, torch.Tensor], dtype: str, *, batch_invariant: bool = False) -> str:
    """A short hash of the architecture facts, the dtype (and batch-invariant mode, when on) and a
    sample of every (unsharded) weight."""
    fields = {**model_config.fingerprint_fields(), "dtype": dtype} | ({"batch_invariant": True} if batch_invariant else {})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(state[name].shape)).encode())
        digest.update(tensor[:: max(1, tensor.numel() // 64)].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
