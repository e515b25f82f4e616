"""The checkpoint's tokenizer (transformers AutoTokenizer, local files only; a GGUF file's from its
metadata) behind a small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nxcore import gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    has_text = True

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        template = getattr(hf_tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: transformers uses "default"
            template = template.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        """The checkpoint's chat template (Jinja source), as transformers reads it; None without one."""
        self.special_tokens: dict[str, str] = {k: v for k, v in hf_tokenizer.special_tokens_map.items() if isinstance(v, str)}
        """bos_token, eos_token, ... by name: the variables a chat template reads next to the messages."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer adds (e.g. bos) unless told not
        to, as transformers does."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def tokens_of(self, token_ids: list[int]) -> list[str]:
        """Each id's token string (the vocabulary's spelling)."""
        return list(self.hf.convert_ids_to_tokens(token_ids))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """`messages` ({"role", "content"} dicts) rendered by the checkpoint's chat template, ready
        for the assistant's turn, as transformers' apply_chat_template renders them."""
        if not self.hf.chat_template:
            raise ValueError("the checkpoint has no chat template")
        return str(self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


class MissingTokenizer:
    """For checkpoints without tokenizer files: token ids work, text does not."""

    has_text = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}

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
