"""The checkpoint's tokenizer (transformers AutoTokenizer, local files only) behind a small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer adds (e.g. bos), as transformers does."""
        return list(self.hf(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)


class MissingTokenizer:
    """For checkpoints without tokenizer files: token ids work, text does not."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir

    def encode(self, text: str) -> list[int]:
        raise FileNotFoundError(f"{self.model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass token ids instead of text")

    def decode(self, token_ids: list[int]) -> str:
        return ""


def load_tokenizer(model_dir: str | Path, *, required: bool = True) -> Tokenizer | MissingTokenizer:
    path = Path(model_dir)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if required:
            raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass token ids instead of text")
        return MissingTokenizer(path)
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
