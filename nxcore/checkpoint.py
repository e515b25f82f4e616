"""Reading a checkpoint: a Hugging Face directory (config, tokenizer files, safetensors weights) or a
GGUF file (`nxcore.gguf`: a `.gguf` path, or a folder holding one and no config.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nxcore import gguf

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(model_dir: str | Path) -> Any:
    """The checkpoint's HF config (transformers.AutoConfig, local files only; a GGUF file's from its metadata)."""
    from transformers import AutoConfig

    if file := gguf.find_gguf(model_dir):
        return gguf.read_hf_config(file)
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint ({path / 'config.json'} does not exist) nor a GGUF file")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json (it may list several; a GGUF file's metadata), or ()."""
    if file := gguf.find_gguf(model_dir):
        return gguf.read_eos_token_ids(file)
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards named by the index."""
    path = Path(model_dir)
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_FILE} names shards that do not exist: {missing}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors)")


def load_tensors(model_dir: str | Path, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by its HF name, read once (a GGUF file's dequantized) and cast to `dtype`."""
    if file := gguf.find_gguf(model_dir):
        return gguf.load_tensors(file, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one shard ({file.name})")
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    log.info("read %d tensors from %d file(s) in %s", len(tensors), len(weight_files(model_dir)), model_dir)
    return tensors
