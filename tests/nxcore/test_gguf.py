"""GGUF checkpoints (nxcore/gguf.py) on tiny files written here with the `gguf` library (llama.cpp's
own writer, names and quantizers): read back, they serve the same tokens as the HF checkpoint they
came from. The real-model checks (SmolLM2-135M-Instruct against transformers) are in test_smollm2.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf  # a test dependency (pyproject's test extra): writes the tiny GGUF files
import numpy as np
import pytest
import torch

from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate
from nxcore.checkpoint import load_tensors, read_eos_token_ids, read_hf_config
from nxcore.gguf import find_gguf
from nxcore.loader import read_model_config
from tests.conftest import Checkpoint, random_prompt

CONFIG = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=64, buckets=(16, 32, 64), dtype="float32")
EOT = 3
"""An end-of-turn id written next to eos (llama.cpp stops at both)."""


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows as llama.cpp stores them."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(ckpt: Checkpoint, path: Path, *, arch: str = "llama", qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """`ckpt` as llama.cpp's converter writes it: llama.cpp names, permuted q/k rows, 2-D weights in `qtype`."""
    cfg = ckpt.hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_eot_token_id(EOT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in ckpt.hf_model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if base.endswith("q_proj"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if qtype is not None and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_serves_the_tokens_of_its_hf_checkpoint(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    ckpt = checkpoints["llama"]
    file = write_gguf(ckpt, tmp_path / "tiny.gguf")
    ours, theirs = read_model_config(file), read_model_config(ckpt.path)
    assert ours.fingerprint_fields() == theirs.fingerprint_fields()
    assert read_eos_token_ids(file) == (2, EOT)
    engine = Engine.from_pretrained(file, CONFIG)
    prompts = [random_prompt(n, seed=n) for n in (5, 17, 30)]
    results = generate(engine, prompts, stopping=StoppingCriteria(max_new_tokens=10, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.output_ids == ckpt.hf_greedy(prompt, 10)


def test_quantized_weights_dequantize_as_the_gguf_library_does(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    ckpt = checkpoints["llama"]
    file = write_gguf(ckpt, tmp_path / "tiny-q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = load_tensors(file, dtype=torch.float32)
    reader = gguf.GGUFReader(file)
    reference = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    heads = ckpt.hf_model.config.num_attention_heads
    q = torch.from_numpy(llama_cpp_permute(ours["model.layers.1.self_attn.q_proj.weight"].numpy(), heads))
    assert torch.equal(q, reference["blk.1.attn_q.weight"])  # bit-identical, once llama.cpp's row order is restored
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"], reference["blk.0.ffn_down.weight"])
    hf = ckpt.hf_model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(ours["model.layers.1.self_attn.q_proj.weight"], hf, atol=hf.abs().max().item() / 100, rtol=0)
    bf16 = load_tensors(file, dtype=torch.bfloat16)
    assert bf16["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_unsupported_architecture_and_tensor_type_are_named(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    gemma = write_gguf(checkpoints["llama"], tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(ValueError, match=r"GGUF architecture 'gemma' is not supported: supported are \['llama', 'qwen2', 'qwen3'\]"):
        read_hf_config(gemma)
    q5 = write_gguf(checkpoints["llama"], tmp_path / "q5.gguf", qtype=gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(ValueError, match=r"GGUF tensor type Q5_0 \(ggml type 6\) is not supported"):
        Engine.from_pretrained(q5, CONFIG)


def test_a_folder_holding_one_gguf_file_is_that_file(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    file = write_gguf(checkpoints["llama"], tmp_path / "a.gguf")
    assert find_gguf(tmp_path) == file
    assert read_hf_config(tmp_path).num_hidden_layers == 2
    assert find_gguf(checkpoints["llama"].path) is None  # config.json: an HF checkpoint
    shutil.copy(file, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\): pass one of them"):
        read_hf_config(tmp_path)
