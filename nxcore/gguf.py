"""GGUF checkpoints (llama.cpp's one-file format): config, tokenizer and weights read from the file.

A model path that is a `.gguf` file, or a folder holding exactly one and no `config.json`, is read
here instead of as an HF checkpoint folder (`nxcore.checkpoint` dispatches), so everything that
takes a model path takes a GGUF file too:

- config: an HF config built from the metadata's llama.cpp keys (`llama.block_count`, ...), the way
  `transformers` builds one for the same file;
- weights: every tensor dequantized to float32 at load (then cast to the engine's dtype), renamed to
  its HF name, with llama.cpp's row permutation of Llama's q/k projections undone;
- tokenizer and chat template: transformers' GGUF tokenizer conversion.

Reader and dequantizers are transformers' own (`transformers.integrations.gguf`, pinned with
transformers), measured against the `gguf` library's on SmolLM2-135M-Instruct Q4_1 (98 MB, 2 shared
cores; best of 3): reading the metadata and tensor table 0.012 s against 2.09 s (`GGUFReader` turns
the 49k-token vocabulary and 49k merges into Python objects up front), dequantizing every tensor to
float32 0.27 s (torch) against 0.92 s (numpy), values bit-identical. So neither the `gguf` library
nor `accelerate` is needed to serve a GGUF file; the parity tests install them for transformers'
own `from_pretrained(..., gguf_file=...)`, the reference.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SUFFIX = ".gguf"

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""GGUF `general.architecture` -> HF model_type, for the dense architectures read here."""

PERMUTED_QK = {"llama"}
"""Architectures whose q/k rows llama.cpp's converter permuted (LlamaModel.permute): reversed at load."""

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

UNSUPPORTED_TYPES = {
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    15: "Q8_K",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}
"""ggml tensor types transformers 5.24 cannot dequantize, by name (its reader names only the id)."""


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file `model` names: itself, or the one `.gguf` in a folder without `config.json`; else None."""
    path = Path(model)
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): pass one of them as the model")
    return files[0] if files else None


@functools.lru_cache(maxsize=8)
def _metadata(file: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The file's metadata (string arrays as their length) and tensor names; read once per process."""
    from transformers.integrations.gguf import read_gguf_metadata

    return read_gguf_metadata(str(file))


def _architecture(file: Path, metadata: dict[str, Any]) -> str:
    arch = metadata["general.architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{file}: GGUF architecture {arch!r} is not supported: supported are {sorted(ARCHITECTURES)}")
    if metadata.get(f"{arch}.expert_count"):
        raise ValueError(f"{file}: GGUF {arch!r} with {metadata[f'{arch}.expert_count']} experts (a mixture of experts) is not supported")
    return arch


def config_dict(file: Path) -> dict[str, Any]:
    """The HF config (as `config.json` would hold it) that the file's metadata describes."""
    metadata, tensor_names = _metadata(file)
    arch = _architecture(file, metadata)

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{file}: GGUF metadata lacks {arch}.{name}")
        return value

    heads, kv_heads = key("attention.head_count"), key("attention.head_count_kv", key("attention.head_count"))
    if isinstance(kv_heads, list):  # per-layer counts; uniform ones are the same model
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{file}: per-layer KV head counts {sorted(set(kv_heads))} are not supported")
        kv_heads = kv_heads[0]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"{file}: GGUF rope scaling {scaling!r} is not supported: only linear")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{file}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 rope scaling) are not supported in GGUF files")
    bias = "blk.0.attn_q.bias" in tensor_names
    hidden = key("embedding_length")
    return dict(
        model_type=ARCHITECTURES[arch],
        vocab_size=metadata.get(f"{arch}.vocab_size") or metadata["tokenizer.ggml.tokens"],  # the reader gives a string array's length
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=key("attention.key_length", hidden // heads),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=key("context_length"),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=bias,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        # Quantized blocks are dequantized to float32 (what transformers does); `--dtype` picks another.
        dtype="float32",
    )


@functools.lru_cache(maxsize=8)
def read_hf_config(file: Path) -> Any:
    """The file's config as a transformers PretrainedConfig of its model_type."""
    from transformers import AutoConfig

    fields = config_dict(file)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def read_eos_token_ids(file: Path) -> tuple[int, ...]:
    """Every id that ends generation: eos, and the end-of-turn / end-of-message ids llama.cpp also stops at."""
    metadata, _ = _metadata(file)
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [metadata[f"tokenizer.ggml.{k}"] for k in keys if f"tokenizer.ggml.{k}" in metadata]
    return tuple(dict.fromkeys(int(i) for i in ids))


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    names with no HF counterpart come back unchanged, for the architecture's converter to refuse."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    return gguf_name


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows: each head's rows, stored as (half, 2) (the two rotary
    halves interleaved, for GGML's adjacent-pair rope), go back to (2, half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def load_tensors(file: Path, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the file by its HF name, dequantized to float32 and cast to `dtype`."""
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

    start = time.perf_counter()
    config = config_dict(file)  # raises first for an unsupported architecture
    try:
        header = GgufHeader.from_file(str(file))
    except ValueError as exc:
        found = re.search(r"ggml type (\d+)", str(exc))
        if found is None:
            raise
        ggml_type = int(found[1])
        raise ValueError(
            f"{file}: GGUF tensor type {UNSUPPORTED_TYPES.get(ggml_type, '?')} (ggml type {ggml_type}) is not supported: "
            "supported are F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants (Q2_K to Q6_K) and the IQ types"
        ) from None
    raw = load_gguf_state_dict(header)
    tensors: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        value = raw[info.name][()]  # the bytes, copied out of the memory map
        if info.ggml_type in GGML_BLOCK:
            value = dequantize(value.reshape(-1), info.ggml_type, torch.float32).reshape(info.shape)
        name = hf_name(info.name)
        if header.architecture in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute_rows(value, config["num_attention_heads"])
        elif header.architecture in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute_rows(value, config["num_key_value_heads"])
        tensors[name] = value.to(dtype)
    log.info("dequantized %d tensors of %s to %s in %.2fs", len(tensors), file, dtype, time.perf_counter() - start)
    return tensors


def load_hf_tokenizer(file: Path) -> Any:
    """transformers' tokenizer for the file (vocabulary, merges, special tokens and chat template from its metadata)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
