"""Incremental detokenization: deltas add up to the full decode, never split a character, and
stop strings cut the text exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nxcore.detokenizer import IncrementalDetokenizer
from nxcore.tokenizer import Tokenizer, load_tokenizer
from nxserve.testing.model_factory import make_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = make_model(arch="llama", preset="tiny", out=tmp_path_factory.mktemp("detok") / "m")
    return load_tokenizer(path)


def _stream(detok: IncrementalDetokenizer, tokens: list[int]) -> list[str]:
    deltas = [detok.add([t]) for t in tokens]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("seed", range(5))
def test_deltas_add_up_to_the_full_decode(tokenizer: Tokenizer, seed: int) -> None:
    tokens = torch.randint(4, 512, (80,), generator=torch.Generator().manual_seed(seed)).tolist()
    deltas = _stream(IncrementalDetokenizer(tokenizer), tokens)
    assert "".join(deltas) == tokenizer.decode(tokens)


def test_multibyte_characters_are_never_split(tokenizer: Tokenizer) -> None:
    text = "naïve café 日本語 🙂 and more 🙂🙂 text"
    tokens = tokenizer.hf(text, add_special_tokens=False)["input_ids"]
    deltas = _stream(IncrementalDetokenizer(tokenizer), tokens)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_cuts_the_text_before_it(tokenizer: Tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    tokens = tokenizer.hf(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop_strings=["over", "zzz"])
    released = []
    for t in tokens:
        released.append(detok.add([t]))
        if detok.stopped:
            break
    released.append(detok.flush())
    assert detok.stopped and "".join(released) == "the quick brown fox jumps "
