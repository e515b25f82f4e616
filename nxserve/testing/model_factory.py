"""Build small, real Hugging Face checkpoints locally: seeded random weights plus a trained tokenizer.

Tests and benchmarks need checkpoints that load with the stock ``transformers`` Auto classes but
must not depend on the hub. :func:`make_model` writes one to a directory::

    config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json (with a chat template)

The weights are random (``torch.manual_seed(seed)`` then ``AutoModelForCausalLM.from_config``, fp32),
so outputs are meaningless but deterministic: the same ``(arch, preset, seed, overrides)`` gives
byte-identical files.

Presets:

* ``tiny``: a few hundred KB, loads in milliseconds; for unit tests. Vocab 512, hidden 64, 2 layers,
  4 heads, 2 KV heads. ``initializer_range`` is 0.08 so greedy decoding of random weights varies
  instead of repeating one token. ``qwen3`` uses an explicit ``head_dim`` of 32 (not hidden/heads).
* ``small``: ~125M parameters (~500 MB fp32), for benchmarks. Vocab 32000, hidden 768, 12 layers,
  12 heads, 4 KV heads. Llama-shaped for every arch, each keeping its own config class (so qwen2
  keeps its qkv bias, qwen3 its q/k norms; qwen3's head_dim is set to 64 = hidden/heads).

Mixture-of-Experts archs (``mixtral``, ``qwen3_moe``), top-2 routing, no sliding window:

* ``tiny``: the tiny trunk with 4 experts. ``mixtral``: expert intermediate 96. ``qwen3_moe``:
  expert (``moe_intermediate_size``) 48, head_dim 32, ``norm_topk_prob``, and ``mlp_only_layers=[1]``
  so layer 0 is sparse and layer 1 a dense MLP (intermediate 128).
* ``small``: ~140M parameters (~560 MB fp32): vocab 32000, hidden 512, 8 layers, 8 heads, 4 KV
  heads, 8 experts of intermediate 1024 in every layer (``qwen3_moe``: head_dim 64, dense
  intermediate 2048 unused since ``mlp_only_layers`` is empty).

transformers 5 holds the experts fused in memory (``experts.gate_up_proj``, ``experts.down_proj``)
but ``save_pretrained`` writes the standard per-expert tensors (Mixtral
``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight``, Qwen3-MoE
``model.layers.{i}.mlp.experts.{j}.gate_proj/up_proj/down_proj.weight``, routers ``...gate.weight``).
Qwen3MoeConfig maps ``num_experts`` to ``num_local_experts``, so that is the key in its config.json.

Every preset uses rope_theta 10000, rms_norm_eps 1e-6, untied embeddings, and the tokenizer's
bos/eos/pad ids (0/1/2); mistral gets sliding_window 4096.

:func:`build_tokenizer` trains a byte-level BPE tokenizer on a synthetic English-like corpus that is
generated deterministically from the seed. Its pipeline is NFC, then Qwen2's split regex, then
ByteLevel (no prefix space), which is exactly what transformers' ``Qwen2Tokenizer`` rebuilds, so
``AutoTokenizer`` and ``tokenizers.Tokenizer.from_file`` give the same ids for every arch. Its special
tokens have fixed ids::

    0 "<s>" (bos)   1 "</s>" (eos)   2 "<pad>" (pad)   3 "<unk>" (unk)

followed by the 256 byte-level symbols (so any text encodes) and the learned merges. When the
corpus yields fewer tokens than ``vocab_size``, the tail is filled with ``<|reserved_{i}|>`` special
tokens so that ``len(tokenizer) == vocab_size`` exactly. Encoding prepends bos, as Llama does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe")
PRESETS = ("tiny", "small")

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)
"""Special tokens in id order: they take ids 0..3."""
BOS_ID, EOS_ID, PAD_ID, UNK_ID = range(len(SPECIAL_TOKENS))
RESERVED_TOKEN = "<|reserved_{}|>"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + the byte-level alphabet
# A Zephyr-style chat template over the tokenizer's own specials, saved in tokenizer_config.json so
# that chat requests (the OpenAI gateway, `apply_chat_template`) have one. It reads bos_token and
# eos_token as transformers passes them, and takes content as a string.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The pre-tokenizer split regex of transformers' Qwen2Tokenizer. AutoTokenizer always loads a
# model_type "qwen2" checkpoint with that class, which rebuilds normalizer and pre-tokenizer itself
# (NFC + this split + ByteLevel without its own regex). Every arch uses the same pipeline so that
# AutoTokenizer and a plain `tokenizers.Tokenizer.from_file("tokenizer.json")` agree on ids.
_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
}

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
        "initializer_range": 0.08,
    },
    "small": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2048,
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
    },
}

# The small preset's trunk for the MoE archs (vocab, max positions and init stay the small preset's).
_SMALL_MOE_TRUNK: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}

# Per-(preset, arch) tweaks. Qwen3Config defaults head_dim to 128, so it is always set explicitly:
# tiny tests a head_dim that differs from hidden/heads (16), small stays Llama-shaped (64).
_ARCH_PRESET_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "qwen3"): {"head_dim": 32},
    ("small", "qwen3"): {"head_dim": 64},
    ("tiny", "mistral"): {"sliding_window": 4096},
    ("small", "mistral"): {"sliding_window": 4096},
    # Mixture-of-Experts. tiny keeps the tiny trunk; qwen3_moe's layer 1 is a dense MLP (mlp_only_layers)
    # so tests cover both layer kinds. small uses its own, narrower trunk (hidden 512, 8 layers) so
    # that 8 experts per layer stay benchmark-sized.
    ("tiny", "mixtral"): {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 96,
        "sliding_window": None,
    },
    ("tiny", "qwen3_moe"): {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "intermediate_size": 128,
        "head_dim": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    ("small", "mixtral"): {
        **_SMALL_MOE_TRUNK,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 1024,
        "sliding_window": None,
    },
    ("small", "qwen3_moe"): {
        **_SMALL_MOE_TRUNK,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 1024,
        "intermediate_size": 2048,
        "head_dim": 64,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}

# Synthetic corpus: common English words, a few non-ASCII words (multi-byte UTF-8), and
# pronounceable pseudo-words built from syllables so larger vocabularies have enough to learn.
_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "hot",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "any",
    "new",
    "work",
    "part",
    "take",
    "get",
    "place",
    "made",
    "live",
    "where",
    "after",
    "back",
    "little",
    "only",
    "round",
    "man",
    "year",
    "came",
    "show",
    "every",
    "good",
    "me",
    "give",
    "our",
    "under",
    "name",
    "very",
    "through",
    "just",
    "form",
    "sentence",
    "great",
    "think",
    "say",
    "help",
    "low",
    "line",
    "differ",
    "turn",
    "cause",
    "much",
    "mean",
    "before",
    "move",
    "right",
    "boy",
    "old",
    "too",
    "same",
    "tell",
    "does",
    "set",
    "three",
    "want",
    "air",
    "well",
    "also",
    "play",
    "small",
    "end",
    "put",
    "home",
    "read",
    "hand",
    "port",
    "large",
    "spell",
    "add",
    "even",
    "land",
    "here",
    "must",
    "big",
    "high",
    "such",
    "follow",
    "act",
    "why",
    "ask",
    "men",
    "change",
    "went",
    "light",
    "kind",
    "off",
    "need",
    "house",
    "picture",
    "try",
    "us",
    "again",
    "animal",
    "point",
    "mother",
    "world",
    "near",
    "build",
    "self",
    "earth",
    "father",
    "head",
    "stand",
    "own",
    "page",
    "should",
    "country",
    "found",
    "answer",
    "school",
    "grow",
    "study",
    "still",
    "learn",
    "plant",
    "cover",
    "food",
    "sun",
    "four",
    "between",
    "state",
    "keep",
    "eye",
    "never",
    "last",
    "let",
    "thought",
    "city",
    "tree",
    "cross",
    "farm",
    "hard",
    "start",
    "might",
    "story",
    "saw",
    "far",
    "sea",
    "draw",
    "left",
    "late",
    "run",
    "while",
    "press",
    "close",
    "night",
    "real",
    "life",
    "few",
    "north",
    "open",
    "seem",
    "together",
    "next",
    "white",
    "children",
    "begin",
    "got",
    "walk",
    "example",
    "ease",
    "paper",
    "group",
    "always",
    "music",
    "those",
    "both",
    "mark",
    "often",
    "letter",
    "until",
    "mile",
    "river",
    "car",
    "feet",
    "care",
    "second",
    "book",
    "carry",
    "took",
    "science",
    "eat",
    "room",
    "friend",
    "began",
    "idea",
    "fish",
    "mountain",
    "stop",
    "once",
    "base",
    "hear",
    "horse",
    "cut",
    "sure",
    "watch",
    "color",
    "face",
    "wood",
    "main",
    "enough",
    "plain",
    "girl",
    "usual",
    "young",
    "ready",
    "above",
    "ever",
    "red",
    "list",
    "though",
    "feel",
    "talk",
    "bird",
    "soon",
    "body",
    "dog",
    "family",
    "direct",
    "pose",
    "leave",
    "song",
    "measure",
    "door",
    "product",
    "black",
    "short",
    "numeral",
    "class",
    "wind",
    "question",
    "happen",
    "complete",
    "ship",
    "area",
    "half",
    "rock",
    "order",
    "fire",
    "south",
    "problem",
    "piece",
    "told",
    "knew",
    "pass",
    "since",
    "top",
    "whole",
    "king",
    "space",
    "heard",
    "best",
    "hour",
    "better",
    "true",
    "during",
    "hundred",
    "five",
    "remember",
    "step",
    "early",
    "hold",
    "west",
    "ground",
    "interest",
    "reach",
    "fast",
    "verb",
    "sing",
    "listen",
    "six",
    "table",
    "travel",
    "less",
    "morning",
    "ten",
    "simple",
    "several",
    "vowel",
    "toward",
    "war",
    "lay",
    "against",
    "pattern",
    "slow",
    "center",
    "love",
    "person",
    "money",
    "serve",
    "appear",
    "road",
    "map",
    "rain",
    "rule",
    "govern",
    "pull",
    "cold",
    "notice",
    "voice",
    "unit",
    "power",
    "town",
    "fine",
    "certain",
    "fly",
    "fall",
    "lead",
    "cry",
    "dark",
    "machine",
    "note",
    "wait",
    "plan",
    "figure",
    "star",
    "box",
    "noun",
    "field",
    "rest",
    "correct",
    "able",
    "pound",
    "done",
    "beauty",
    "drive",
    "stood",
    "contain",
    "front",
    "teach",
    "week",
    "final",
    "gave",
    "green",
    "quick",
    "develop",
    "ocean",
    "warm",
    "free",
    "minute",
    "strong",
    "special",
    "mind",
    "behind",
    "clear",
    "tail",
    "produce",
    "fact",
    "street",
    "inch",
    "multiply",
    "nothing",
    "course",
    "stay",
    "wheel",
    "full",
    "force",
    "blue",
    "object",
    "decide",
    "surface",
    "deep",
    "moon",
    "island",
    "foot",
    "system",
    "busy",
    "test",
    "record",
    "boat",
    "common",
    "gold",
    "possible",
    "plane",
    "instead",
    "dry",
    "wonder",
    "laugh",
    "thousand",
    "ago",
    "ran",
    "check",
    "game",
    "shape",
    "equate",
    "miss",
    "brought",
    "heat",
    "snow",
    "tire",
    "bring",
    "yes",
    "distant",
    "fill",
    "east",
    "paint",
    "language",
    "among",
    "it's",
    "don't",
    "I'm",
    "can't",
    "we'll",
    "you've",
)
_NON_ASCII_WORDS = (
    "café",
    "naïve",
    "résumé",
    "über",
    "façade",
    "jalapeño",
    "Ångström",
    "São",
    "Привет",
    "мир",
    "日本語",
    "東京",
    "こんにちは",
    "中文",
    "한국어",
    "Ελληνικά",
    "العربية",
    "🙂",
    "🚀",
    "👍🏽",
    "€",
    "—",
)
_ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "y",
    "z",
    "bl",
    "br",
    "ch",
    "cl",
    "cr",
    "dr",
    "fl",
    "fr",
    "gl",
    "gr",
    "pl",
    "pr",
    "sh",
    "sk",
    "sl",
    "sp",
    "st",
    "str",
    "th",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie"]
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck", "sh")
_SUFFIXES = ("", "", "", "s", "ed", "ing", "er", "ly", "tion", "ness", "ment", "able")
_END_PUNCT = (".", ".", ".", "!", "?", "...", ";", ":")
_MIN_SENTENCES = 2000


def make_model(
    *,
    arch: str,
    preset: str,
    out: str | os.PathLike[str],
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint (config, fp32 random weights, tokenizer) to ``out``.

    ``overrides`` are config kwargs merged over the preset (e.g. ``tie_word_embeddings``,
    ``num_key_value_heads``, ``head_dim``, ``rope_scaling``); the tokenizer is built for the
    resulting ``vocab_size``. Existing files in ``out`` are overwritten. Returns ``out`` as a Path.
    """
    cfg = build_config(arch=arch, preset=preset, overrides=overrides)
    tokenizer = build_tokenizer(vocab_size=cfg.vocab_size, seed=seed)
    tokenizer.model_max_length = cfg.max_position_embeddings
    model = _random_model(cfg, seed=seed)
    out_dir = Path(out)
    _save(model, tokenizer, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote %s/%s checkpoint (seed %d, %d params) to %s", arch, preset, seed, n_params, out_dir)
    return out_dir


def build_config(*, arch: str, preset: str, overrides: dict[str, Any] | None = None) -> PreTrainedConfig:
    """The transformers config for ``arch`` at ``preset``, with ``overrides`` applied last."""
    config_cls = _CONFIG_CLASSES.get(arch)
    if config_cls is None:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    tweaks = _ARCH_PRESET_OVERRIDES.get((preset, arch), {})
    return config_cls(**{**_COMMON, **_PRESETS[preset], **tweaks, **(overrides or {})})


def build_tokenizer(*, vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens; deterministic given ``seed``.

    Ids 0..3 are ``<s>``, ``</s>``, ``<pad>``, ``<unk>``; encoding prepends ``<s>``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (specials + 256 bytes), got {vocab_size}")
    tok = _train_bpe(vocab_size=vocab_size, seed=seed)
    _pad_with_reserved(tok, vocab_size=vocab_size)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _train_bpe(*, vocab_size: int, seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus grows with the vocabulary: for 32000 it yields all 32000 tokens in about a second.
    n = max(_MIN_SENTENCES, vocab_size * 2 // 3)
    tok.train_from_iterator(_corpus(seed=seed, n_sentences=n, n_pseudo_words=n), trainer=trainer)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("BPE trainer did not place the special tokens at ids 0..3")
    return tok


def _pad_with_reserved(tok: Tokenizer, *, vocab_size: int) -> None:
    """Add ``<|reserved_{i}|>`` special tokens until the tokenizer has ``vocab_size`` tokens."""
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([RESERVED_TOKEN.format(i) for i in range(missing)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")


def _corpus(*, seed: int, n_sentences: int, n_pseudo_words: int) -> Iterator[str]:
    """Deterministic English-like sentences; word frequencies follow Zipf's law."""
    rng = random.Random(seed)
    pseudo = sorted({_pseudo_word(rng) for _ in range(n_pseudo_words)} - set(_WORDS))
    lexicon = [*_WORDS, *_NON_ASCII_WORDS, *pseudo]
    cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, len(lexicon) + 1)))
    for _ in range(n_sentences):
        words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randint(3, 16))
        if rng.random() < 0.3:
            words.insert(rng.randrange(1, len(words)), str(rng.randint(0, 2100)))
        if rng.random() < 0.3:
            i = rng.randrange(1, len(words))
            words[i - 1] += ","
        yield words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(_END_PUNCT)


def _pseudo_word(rng: random.Random) -> str:
    syllables = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))
    return "".join(syllables) + rng.choice(_SUFFIXES)


def _random_model(cfg: PreTrainedConfig, *, seed: int) -> PreTrainedModel:
    """Seeded fp32 random init, without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write everything to a staging dir inside ``out_dir``, then move each file into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging, _no_progress_bars():
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging, save_jinja_files=False)  # the chat template inside tokenizer_config.json
        # safetensors writes model.safetensors as 0600; give every file the umask-default mode
        # that plain open() gave config.json, so other users/containers can read the checkpoint.
        mode = stat.S_IMODE((Path(staging) / "config.json").stat().st_mode)
        for path in sorted(Path(staging).iterdir()):
            path.chmod(mode)
            os.replace(path, out_dir / path.name)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (e.g. "Writing model shards"); restore the setting after.

    The switch is process-global, so a concurrent load in another thread is silenced too.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
