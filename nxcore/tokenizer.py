"""The checkpoint's tokenizer (transformers AutoTokenizer, local files only; a GGUF file's from its
metadata) behind a small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nxcore import gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer adds (e.g. bos), as transformers does."""
        return list(self.hf(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """`messages` ({"role", "content"} dicts) rendered by the checkpoint's chat template, ready
        for the assistant's turn, as transformers' apply_chat_template renders them."""
        if not self.hf.chat_template:
            raise ValueError("the checkpoint has no chat template")
        return str(self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


class MissingTokenizer:
    """For checkpoints without tokenizer files: token ids work, text does not."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir

    def encode(self, text: str) -> list[int]:
        raise FileNotFoundError(f"{self.model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass token ids instead of text")

    def decode(self, token_ids: list[int]) -> str:
        return ""


def load_tokenizer(model_dir: str | Path, *, required: bool = True) -> Tokenizer | MissingTokenizer:
    if file := gguf.find_gguf(model_dir):
        return Tokenizer(gguf.load_hf_tokenizer(file))
    path = Path(model_dir)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if required:
            raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass token ids instead of text")
        return MissingTokenizer(path)
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
