"""Incremental detokenization and stop strings.

Text is released only once it is stable: a token sequence that ends inside a multi-byte character
decodes to U+FFFD, so that text is held back until the following tokens complete it. Each step
decodes only a short window (from `prefix_offset`), as TGI and vLLM do, so the cost per token does
not grow with the output. Stop strings are searched in the newly released text plus the tail
that could start one; the text stops before the match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Feed token ids, get text deltas that never split a character, and stop-string detection."""

    def __init__(self, tokenizer: Decoder, *, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.tokens: list[int] = []
        self.text = ""
        """All text decoded so far (cut before a stop string once one matched)."""
        self.stopped = False
        """A stop string matched; no more text is released."""
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._emitted = 0
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly released text."""
        if self.stopped:
            return ""
        self.tokens.extend(token_ids)
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset : self._read_offset])
        window = self.tokenizer.decode(self.tokens[self._prefix_offset :])
        if window.endswith("\ufffd") or len(window) <= len(prefix):
            return ""  # an incomplete character, or nothing new yet
        searched_from = max(0, len(self.text) - self._hold)
        self.text += window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        for stop in self.stop_strings:
            at = self.text.find(stop, searched_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        # Hold back a tail that could still become the start of a stop string.
        end = len(self.text) if self.stopped else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def flush(self) -> str:
        """Release held-back text at the end of the request (including an incomplete character)."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.tokens[self._prefix_offset : self._read_offset])
            window = self.tokenizer.decode(self.tokens[self._prefix_offset :])
            self.text += window[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self.tokens)
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta
