"""Tests for nxserve.testing.model_factory: local, seeded, real Hugging Face checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nxserve.testing import model_factory
from nxserve.testing.model_factory import ARCHS, PRESETS, build_config, build_tokenizer, make_model

TEXT = "Hello, café 日本語 🙂"
SAMPLES = (TEXT, "In 2024, the price was 12345.", "It's  two\n\nlines", "cafe\u0301 naïve", "👍🏽 €5 — ok")
EXPECTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MAX_TINY_BYTES = 4 * 1024 * 1024
MOE_ARCHS = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_model(arch=arch, preset="tiny", out=root / arch) for arch in ARCHS}


def _bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_loads_with_auto_classes(arch: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[arch]
    for name in EXPECTED_FILES:
        assert (path / name).is_file(), name
    assert not list(path.glob(".staging-*"))
    assert (path / "model.safetensors").stat().st_size <= MAX_TINY_BYTES

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch
    assert config.vocab_size == 512 and config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert config.rope_parameters["rope_theta"] == 10000.0

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 1, 2)

    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == config.architectures[0]
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_tokenizer_matches_tokenizer_json(arch: str, tiny_dirs: dict[str, Path]) -> None:
    # AutoTokenizer picks Qwen2Tokenizer for qwen2, which rebuilds the pipeline; ids must not change.
    auto = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    raw = Tokenizer.from_file(str(tiny_dirs[arch] / "tokenizer.json"))
    for text in SAMPLES:
        assert auto(text)["input_ids"] == raw.encode(text).ids, text


def test_arch_specific_config(tiny_dirs: dict[str, Path]) -> None:
    qwen3 = AutoConfig.from_pretrained(tiny_dirs["qwen3"])
    assert qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_attention_heads
    assert AutoConfig.from_pretrained(tiny_dirs["mistral"]).sliding_window == 4096
    with safe_open(tiny_dirs["qwen2"] / "model.safetensors", "pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in f.keys()  # noqa: SIM118 (safe_open has keys(), no __iter__)


def test_moe_tiny_config(tiny_dirs: dict[str, Path]) -> None:
    mixtral = AutoConfig.from_pretrained(tiny_dirs["mixtral"])
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok, mixtral.intermediate_size) == (4, 2, 96)
    assert mixtral.sliding_window is None
    assert mixtral.initializer_range == 0.08 and mixtral.max_position_embeddings == 2048

    qwen = AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"])
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (4, 2, 48)
    assert qwen.intermediate_size == 128 and qwen.head_dim == 32
    assert qwen.norm_topk_prob is True and qwen.decoder_sparse_step == 1 and qwen.mlp_only_layers == [1]
    assert qwen.sliding_window is None
    assert qwen.initializer_range == 0.08 and qwen.max_position_embeddings == 2048


# Per-expert on-disk names (what the hub checkpoints use), not transformers 5's fused in-memory ones.
_EXPERT_KEYS = {
    "mixtral": ["model.layers.0.block_sparse_moe.gate.weight"]
    + [f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight" for i in (0, 1) for j in range(4) for w in ("w1", "w2", "w3")],
    "qwen3_moe": ["model.layers.0.mlp.gate.weight"]
    + [f"model.layers.0.mlp.experts.{j}.{w}.weight" for j in range(4) for w in ("gate_proj", "up_proj", "down_proj")],
}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_safetensors_use_per_expert_names_and_reload_identically(arch: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[arch]
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert set(_EXPERT_KEYS[arch]) <= keys
    assert not [k for k in keys if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    if arch == "mixtral":
        assert shapes["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == (96, 64)
        assert shapes["model.layers.0.block_sparse_moe.experts.0.w2.weight"] == (64, 96)
        assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (4, 64)
    else:
        assert shapes["model.layers.0.mlp.experts.0.gate_proj.weight"] == (48, 64)
        assert shapes["model.layers.0.mlp.experts.0.down_proj.weight"] == (64, 48)
        assert shapes["model.layers.0.mlp.gate.weight"] == (4, 64)
        # Layer 1 is in mlp_only_layers: a plain dense MLP, no router, no experts.
        assert shapes["model.layers.1.mlp.gate_proj.weight"] == (128, 64)
        layer1_mlp = [k for k in keys if k.startswith("model.layers.1.mlp.")]
        assert sorted(layer1_mlp) == [f"model.layers.1.mlp.{w}.weight" for w in ("down_proj", "gate_proj", "up_proj")]
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)

    # Loading converts back to the fused layout; every tensor must equal the seeded in-memory model's.
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    expected = model_factory._random_model(build_config(arch=arch, preset="tiny"), seed=0).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_same_seed_is_byte_identical(arch: str, tmp_path: Path) -> None:
    first = make_model(arch=arch, preset="tiny", out=tmp_path / "a", seed=5)
    assert _bytes(first) == _bytes(make_model(arch=arch, preset="tiny", out=tmp_path / "b", seed=5))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_small_preset(arch: str) -> None:
    cfg = build_config(arch=arch, preset="small")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (32000, 512, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    assert cfg.max_position_embeddings == 4096 and cfg.initializer_range == 0.02
    assert cfg.num_experts_per_tok == 2 and cfg.sliding_window is None
    if arch == "mixtral":
        assert (cfg.num_local_experts, cfg.intermediate_size) == (8, 1024)
    else:
        assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.head_dim) == (8, 1024, 2048, 64)
        assert cfg.norm_topk_prob is True and cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == []

    # Parameter count without allocating the ~560 MB: every one of the 8 layers is sparse.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    h, hd, experts, inter = 512, 64, 8, 1024
    attn = h * 8 * hd + 2 * h * 4 * hd + 8 * hd * h + (2 * hd if arch == "qwen3_moe" else 0)  # + q/k norms
    layer = attn + experts * 3 * h * inter + experts * h + 2 * h
    expected = 2 * 32000 * h + 8 * layer + h
    assert sum(p.numel() for p in model.parameters()) == expected  # ~139.8M


def test_same_seed_is_byte_identical_and_seed_changes_weights(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    first = make_model(arch="llama", preset="tiny", out=tmp_path / "a", seed=7)
    assert torch.equal(torch.rand(4), expected_draw), "make_model must not disturb the global RNG"

    second = make_model(arch="llama", preset="tiny", out=tmp_path / "b", seed=7)
    assert _bytes(first) == _bytes(second)

    other = make_model(arch="llama", preset="tiny", out=tmp_path / "c", seed=8)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_overwrites_existing_dir_and_keeps_files_readable(tmp_path: Path) -> None:
    make_model(arch="qwen3", preset="tiny", out=tmp_path, seed=1)
    (tmp_path / "unrelated.txt").write_text("keep me")
    make_model(arch="qwen3", preset="tiny", out=tmp_path, seed=2)
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".staging-*"))
    modes = {(tmp_path / name).stat().st_mode & 0o777 for name in EXPECTED_FILES}
    assert len(modes) == 1  # safetensors' 0600 is widened to what config.json got


def test_overrides_are_applied(tmp_path: Path) -> None:
    overrides = {
        "tie_word_embeddings": True,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    path = make_model(arch="llama", preset="tiny", out=tmp_path, overrides=overrides)
    config = AutoConfig.from_pretrained(path)
    assert config.tie_word_embeddings is True
    assert config.num_key_value_heads == 1
    assert config.head_dim == 32
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)


def test_vocab_size_override_resizes_tokenizer(tmp_path: Path) -> None:
    path = make_model(arch="mistral", preset="tiny", out=tmp_path, overrides={"vocab_size": 700})
    assert len(AutoTokenizer.from_pretrained(path)) == AutoConfig.from_pretrained(path).vocab_size == 700


@pytest.mark.parametrize(
    ("kwargs", "bad", "allowed"),
    [
        ({"arch": "gpt2", "preset": "tiny"}, "gpt2", ", ".join(ARCHS)),
        ({"arch": "llama", "preset": "huge"}, "huge", ", ".join(PRESETS)),
    ],
)
def test_unknown_arch_or_preset_raises(tmp_path: Path, kwargs: dict[str, str], bad: str, allowed: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        make_model(out=tmp_path / "x", **kwargs)
    assert bad in str(excinfo.value) and allowed in str(excinfo.value)
    assert not (tmp_path / "x").exists()


def test_small_tokenizer_has_exact_vocab() -> None:
    tokenizer = build_tokenizer(vocab_size=32000)
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "</s>", "<pad>", "<unk>"]
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_tokenizer_is_deterministic() -> None:
    first = build_tokenizer(vocab_size=512, seed=3).backend_tokenizer.to_str()
    assert build_tokenizer(vocab_size=512, seed=3).backend_tokenizer.to_str() == first
    assert build_tokenizer(vocab_size=512, seed=4).backend_tokenizer.to_str() != first


def test_tokenizer_fills_with_reserved_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    def tiny_corpus(**_: int) -> list[str]:
        return ["the cat sat on the mat"] * 4

    monkeypatch.setattr(model_factory, "_corpus", tiny_corpus)
    tokenizer = build_tokenizer(vocab_size=600)
    assert len(tokenizer) == 600
    reserved = tokenizer.added_tokens_decoder[599]
    assert reserved.content.startswith("<|reserved_") and reserved.special
    assert tokenizer.decode([0, 599, *tokenizer("ok")["input_ids"][1:]], skip_special_tokens=True) == "ok"


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="at least 260"):
        build_tokenizer(vocab_size=100)
