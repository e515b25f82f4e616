"""Sampling inside the graph, per row, with static shapes.

Greedy when temperature is 0; otherwise temperature, then top-k over a fixed-width candidate set
(`max_topk`, like NxD's global top-k), then top-p (nucleus), then inverse-CDF sampling with a
uniform random number that comes in as an input tensor. Because the random number is drawn by
the host from the request's own seeded generator, a request's tokens never depend on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nxcore.modules import fused
from nxcore.modules.eager import on_xla, runs_eagerly
from nxcore.parallel.comm import TPComm


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings."""

    temperature: float = 0.0
    """0 is greedy; otherwise logits are divided by it (> 0)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 means the graph's whole candidate set (max_topk)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    seed: int | None = None
    """Seed of the request's random generator; None picks one at random."""

    def validate(self, *, max_topk: int) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature={self.temperature} is invalid: allowed a finite number >= 0 (0 is greedy)")
        if not 0 <= self.top_k <= max_topk:
            raise ValueError(f"top_k={self.top_k} is invalid: allowed 0..{max_topk} (max_topk; 0 means max_topk)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is invalid: allowed (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestRng:
    """A request's stream of uniform random numbers, one per sampled token.

    `offset` counts the numbers drawn so far, so the stream can be resumed elsewhere (another
    engine after a KV hand-off) as `RequestRng(seed, offset=n)`.
    """

    def __init__(self, seed: int | None, *, offset: int = 0) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = seed
        self.offset = 0
        self._gen = torch.Generator().manual_seed(seed)
        if offset:
            self.draw(offset)

    def draw(self, n: int = 1) -> torch.Tensor:
        self.offset += n
        return torch.rand(n, generator=self._gen, dtype=torch.float32)

    def rewind(self, offset: int) -> None:
        """Back to the state after `offset` numbers (a step that failed drew some it never used)."""
        if offset != self.offset:
            self._gen.manual_seed(self.seed)
            self.offset = 0
            if offset:
                self.draw(offset)


def sample(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    rand: torch.Tensor,
    max_topk: int,
    comm: TPComm | None = None,
) -> torch.Tensor:
    """Tokens [N] from float32 logits [N, V] with per-row parameters [N] and uniforms rand [N].

    Under TP, `logits` is this rank's vocabulary slice: the greedy token is a global argmax over
    the shards' maxima and the candidates a global top-k over the shards' top-k, so no rank ever
    holds the full logits.
    """
    offset = comm.vocab_offset if comm is not None else 0
    sharded = comm is not None and comm.world > 1
    # max(dim) returns argmax's index (the first of equal maxima) with the value, and ran 2.8x faster
    # than argmax on [32, 32000] float32 here (0.51 against 1.42 ms, one thread); run eagerly,
    # nxcore::row_max gives the same (NaN and ties included) in 0.10 ms where ATen took 0.92 (AMD
    # EPYC, one thread): ~4% of an eager batch-32 decode step of the llama 512x8
    if fused.row_max_applies(logits):
        best_value, local_best = torch.ops.nxcore.row_max(logits)
    else:
        best_value, local_best = logits.max(dim=-1, keepdim=True)
    best_index = local_best + offset
    if comm is not None and sharded:
        best_value, best_index = comm.all_gather(best_value, dim=1), comm.all_gather(best_index, dim=1)
    greedy_tokens = best_index.gather(-1, torch.argmax(best_value, dim=-1, keepdim=True)).squeeze(-1)

    def sampled_rows(
        logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, rand: torch.Tensor, greedy_tokens: torch.Tensor
    ) -> torch.Tensor:
        return _sample_candidates(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            rand=rand,
            greedy_tokens=greedy_tokens,
            max_topk=max_topk,
            offset=offset,
            comm=comm if sharded else None,
        )

    def greedy_rows(
        logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, rand: torch.Tensor, greedy_tokens: torch.Tensor
    ) -> torch.Tensor:
        return greedy_tokens.clone()

    # The top-k over the vocabulary costs ~70 us per row on CPU (2.3 ms for 32 rows of 32000, 10% of
    # a batch-32 step here); a batch of greedy rows skips it. In a graph that is a data-dependent
    # branch (torch.cond); run eagerly, a Python one (an eager torch.cond costs ~0.4 ms of guards).
    # On XLA, torch.cond evaluates its predicate on the host (an `aten::_local_scalar_dense`
    # fallback and a program cut in two, seen with torch-xla 2.9): there every row takes the sampled
    # path, which keeps greedy rows' tokens (`torch.where` on temperature), as NxD's sampler does.
    operands = (logits, temperature, top_k, top_p, rand, greedy_tokens)
    if on_xla(logits):
        return sampled_rows(*operands)
    if runs_eagerly(logits):
        return sampled_rows(*operands) if bool((temperature > 0).any()) else greedy_tokens
    return torch.cond((temperature > 0).any(), sampled_rows, greedy_rows, operands)


def truncated_probs(values: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The candidates' probabilities [N, W] after top-k then top-p, not renormalized, from their
    temperature-scaled logits `values` [N, W] in descending order. In-graph sampling and the
    distribution speculative acceptance compares against both use it: they must agree exactly."""
    width = values.shape[-1]
    rank = torch.arange(width, device=values.device)[None, :]
    k = torch.where((top_k > 0) & (top_k < width), top_k, torch.full_like(top_k, width))
    probs = torch.softmax(values.masked_fill(rank >= k[:, None], float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    return probs.masked_fill((before >= top_p[:, None]) & (rank > 0), 0.0)


def _sample_candidates(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    rand: torch.Tensor,
    greedy_tokens: torch.Tensor,
    max_topk: int,
    offset: int,
    comm: TPComm | None,
) -> torch.Tensor:
    """Top-k candidates (global under TP), then top-p and inverse-CDF sampling; greedy rows keep `greedy_tokens`."""
    safe_temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    values, indices = torch.topk(logits / safe_temp[:, None], min(max_topk, logits.shape[-1]), dim=-1)
    indices = indices + offset
    if comm is not None:
        values, indices = comm.all_gather(values, dim=1), comm.all_gather(indices, dim=1)
        values, order = torch.topk(values, min(max_topk, values.shape[-1]), dim=-1)
        indices = indices.gather(-1, order)
    width = values.shape[-1]
    probs = truncated_probs(values, top_k=top_k, top_p=top_p)
    cdf = torch.cumsum(probs, dim=-1)
    threshold = rand[:, None] * cdf[:, -1:]
    choice = (cdf <= threshold).sum(dim=-1).clamp(max=width - 1)
    sampled = indices.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy_tokens)


def distribution(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_topk: int) -> torch.Tensor:
    """The probabilities [N, V] that `sample` draws from: one-hot argmax at temperature 0, else the
    top-k / top-p candidates' renormalized softmax (zeros elsewhere)."""
    vocab = logits.shape[-1]
    greedy = torch.nn.functional.one_hot(torch.argmax(logits, dim=-1), vocab).to(torch.float32)
    safe_temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    values, indices = torch.topk(logits / safe_temp[:, None], min(max_topk, vocab), dim=-1)
    probs = truncated_probs(values, top_k=top_k, top_p=top_p)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(logits).scatter(-1, indices, probs)
    return torch.where((temperature > 0)[:, None], dense, greedy)


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from a probability vector [V] (need not be normalized) with a uniform u."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=0)
    return int(min((cdf <= u * cdf[-1]).sum().item(), probs.shape[0] - 1))
