"""When a sequence stops: its criteria and the reason it ended."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    """max_new_tokens reached, or the slot's seq_len is full."""
    EOS = "eos"
    STOP = "stop"
    """A stop token id was generated, or a stop string matched."""


@dataclass(frozen=True)
class StoppingCriteria:
    max_new_tokens: int = 16
    """Upper bound on generated tokens (>= 1)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (included in the output), besides eos."""
    ignore_eos: bool = False
    """Keep generating past eos tokens."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is invalid: allowed >= 1")


def finish_reason(
    output_ids: Sequence[int], *, prompt_len: int, stopping: StoppingCriteria, eos_token_ids: Sequence[int], seq_len: int
) -> FinishReason | None:
    """Why a sequence should stop after its latest token, or None to continue."""
    last = output_ids[-1]
    if not stopping.ignore_eos and last in eos_token_ids:
        return FinishReason.EOS
    if last in stopping.stop_token_ids:
        return FinishReason.STOP
    if len(output_ids) >= stopping.max_new_tokens:
        return FinishReason.LENGTH
    if prompt_len + len(output_ids) >= seq_len:
        return FinishReason.LENGTH
    return None
