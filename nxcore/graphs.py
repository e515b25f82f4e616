"""The three static-shape graphs over one `CausalLM`.

- context encoding: `[ctx_batch, bucket]` prompt tokens -> prefix KV write, first token sampled at
  each row's last real position;
- token generation: `[batch, 1]` -> KV scatter at each row's position, next token per row;
- speculation: `[batch, k]` -> KV scatter at k positions per row, the token the model samples
  after each of the k inputs.

Every input is a tensor (positions, slot ids, sampling parameters, random numbers), so one graph
serves every value: the property torch.export and a Neuron trace need.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from nxcore.modules.decoder import CausalLM
from nxcore.sampling import sample


@dataclass
class GraphInputs:
    """One graph call. B rows, T tokens per row."""

    input_ids: torch.Tensor
    """[B, T] int64 token ids (padding rows and positions hold any valid id)."""
    position_ids: torch.Tensor
    """[B, T] int64 absolute positions of input_ids."""
    slot_ids: torch.Tensor
    """[B] int64 KV cache rows; padding rows use the scratch slot."""
    last_index: torch.Tensor
    """[B] int64 index along T of each row's last real token (context encoding only reads it)."""
    temperature: torch.Tensor
    """[B] float32, 0 = greedy."""
    top_k: torch.Tensor
    """[B] int64, 0 = the whole candidate set."""
    top_p: torch.Tensor
    """[B] float32 in (0, 1]."""
    rand: torch.Tensor
    """[B, R] float32 uniforms: R = 1 for context encoding and token generation, k for speculation."""
    key_positions: torch.Tensor
    """[L] int64 0..L-1: the cache positions attended to; its static length L picks the graph's
    KV-length bucket (decode), or equals the bucket (context encoding)."""


torch.export.register_dataclass(GraphInputs, serialized_type_name="nxcore.GraphInputs")


class GraphKind(enum.StrEnum):
    """The engine's graphs (the third of NxD's, speculation, comes with a logits-returning twin)."""

    CONTEXT = "context"
    """Context encoding: [rows, bucket] prompt tokens into a slot's KV, first token sampled."""
    TOKEN_GENERATION = "token_generation"
    """One token per row, appended to its slot's KV."""
    SPECULATION = "speculation"
    """The last token plus k proposals per row, scored in one pass."""
    SCORING = "scoring"
    """Speculation (or token generation) returning full logits, for host-side acceptance."""


@dataclass(frozen=True, order=True)
class GraphKey:
    """One static shape of one graph: the unit that is exported, compiled and cached."""

    kind: GraphKind
    rows: int
    width: int
    """Tokens per row."""
    kv_len: int
    """Cache positions attended to (the KV bucket; a context graph's is its width)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", GraphKind(self.kind))  # a ValueError names a kind that does not exist

    @property
    def file_name(self) -> str:
        return f"{self.kind}-r{self.rows}-w{self.width}-kv{self.kv_len}.pt2"

    def to_list(self) -> list[str | int]:
        """As the manifest records it."""
        return [str(self.kind), self.rows, self.width, self.kv_len]

    def __str__(self) -> str:
        return f"{self.kind} rows={self.rows} width={self.width} kv={self.kv_len}"


def example_inputs(key: GraphKey, scratch_slot: int) -> GraphInputs:
    """Valid inputs of the graph `key`, every row on the scratch slot: what export and compilation
    trace with (only shapes and dtypes matter)."""
    rows, width, kv_len = key.rows, key.width, key.kv_len
    context = key.kind == GraphKind.CONTEXT
    start = 0 if context else kv_len - width
    return GraphInputs(
        input_ids=torch.zeros(rows, width, dtype=torch.int64),
        position_ids=torch.arange(start, start + width, dtype=torch.int64).repeat(rows, 1),
        slot_ids=torch.full((rows,), scratch_slot, dtype=torch.int64),
        last_index=torch.full((rows,), width - 1, dtype=torch.int64),
        temperature=torch.zeros(rows, dtype=torch.float32),
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=torch.ones(rows, dtype=torch.float32),
        rand=torch.zeros(rows, 1 if context else width, dtype=torch.float32),
        key_positions=torch.arange(kv_len, dtype=torch.int64),
    )


class ContextEncodingGraph(nn.Module):
    def __init__(self, model: CausalLM, *, max_topk: int, output_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.max_topk = max_topk
        self.output_logits = output_logits

    def forward(self, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        ctx = self.model.context(prefill=True, slot_ids=inputs.slot_ids, positions=inputs.position_ids)
        hidden = self.model.hidden_states(inputs.input_ids, ctx, keep=inputs.last_index)  # [B, 1, hidden]
        logits = self.model.logits(hidden.squeeze(1))
        tokens = sample(
            logits,
            temperature=inputs.temperature,
            top_k=inputs.top_k,
            top_p=inputs.top_p,
            rand=inputs.rand[:, 0],
            max_topk=self.max_topk,
            comm=self.model.comm,
        )
        return (tokens, full_logits(self.model, logits)) if self.output_logits else (tokens,)


class DecodeGraph(nn.Module):
    """Token generation (T = 1) and speculation (T = k): T tokens per row appended at their positions."""

    def __init__(self, model: CausalLM, *, max_topk: int, output_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.max_topk = max_topk
        self.output_logits = output_logits

    def forward(self, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        ctx = self.model.context(prefill=False, slot_ids=inputs.slot_ids, positions=inputs.position_ids, key_positions=inputs.key_positions)
        hidden = self.model.hidden_states(inputs.input_ids, ctx)
        batch, length, _ = hidden.shape
        logits = self.model.logits(hidden).reshape(batch * length, -1)
        tokens = sample(
            logits,
            temperature=inputs.temperature.repeat_interleave(length),
            top_k=inputs.top_k.repeat_interleave(length),
            top_p=inputs.top_p.repeat_interleave(length),
            rand=inputs.rand.reshape(-1),
            max_topk=self.max_topk,
            comm=self.model.comm,
        ).view(batch, length)
        if self.output_logits:
            return tokens, full_logits(self.model, logits).view(batch, length, -1)
        return (tokens,)


def full_logits(model: CausalLM, logits: torch.Tensor) -> torch.Tensor:
    """The whole vocabulary's logits [N, vocab_size], gathered from the shards under TP."""
    return model.comm.all_gather(logits, dim=-1)[:, : model.cfg.vocab_size]
