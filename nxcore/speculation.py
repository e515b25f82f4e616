"""Speculative decoding: proposers and the acceptance rule.

Each round a proposer suggests k tokens for a sequence; the target scores the last token plus the
k proposals in one speculation-graph pass; the accepted prefix plus one more token is emitted.
Acceptance is the standard rule: proposal d with target probability p(d) and proposer
probability q(d) is accepted with probability min(1, p(d) / q(d)); at the first rejection the
emitted token is drawn from max(0, p - q) renormalized; when all k are accepted a bonus token is
drawn from the target's next distribution. The output distribution equals the target's; for
greedy requests (p one-hot) the output is exactly the non-speculative greedy output.

Where every proposal is a point mass (n-gram proposals, and a draft's proposals for greedy
requests, q one-hot), the rule needs no probabilities on the host: the speculation graph samples
x_i ~ p_i at each position in-graph, and d_i is accepted iff x_i == d_i, else x_i is emitted.
P(x_i == d_i) = p_i(d_i) = min(1, p_i(d_i) / 1), and x_i given x_i != d_i follows p_i with d_i
removed, renormalized: the residual max(0, p_i - onehot(d_i)). So the host only compares k + 1
token ids per sequence. Only sampled requests with a draft (q a full distribution) take the
scoring graph's logits to the host, where the work grows with the vocabulary.

Proposers:
- `NgramProposer` (prompt lookup): the continuation of the longest recent n-gram of the sequence
  that occurred before; q is a point mass on each proposal.
- `DraftProposer`: a smaller draft model (same tokenizer) with its own engine and KV cache,
  sampling k tokens autoregressively with the request's settings; q is its distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nxcore.engine import Engine, SequenceRequest
from nxcore.errors import EngineError
from nxcore.sampling import RequestRng, SamplingParams, distribution, draw


@dataclass
class SpecStats:
    """Counts over speculation rounds: proposals made and accepted, tokens emitted, rounds run."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclass
class Proposal:
    tokens: list[int]
    """k proposed tokens."""
    q: torch.Tensor | None
    """[k, V] proposer probabilities, or None for point masses (n-gram)."""


@dataclass
class SpecSequence:
    """What a proposer needs to know about one running sequence."""

    slot: int
    tokens: list[int]
    """Prompt and output so far; the target's cache holds all but the last."""
    sampling: SamplingParams
    rng: RequestRng


class NgramProposer:
    def __init__(self, k: int, *, max_n: int = 4, min_n: int = 1) -> None:
        self.k, self.max_n, self.min_n = k, max_n, min_n
        self.stats = SpecStats()

    def propose(self, sequences: Sequence[SpecSequence]) -> list[Proposal]:
        return [Proposal(tokens=self.lookup(s.tokens), q=None) for s in sequences]

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The k tokens after the latest earlier occurrence of the longest matching suffix n-gram
        (repeating the last token where there is no match or too little continuation)."""
        n_tokens = len(tokens)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            suffix = list(tokens[n_tokens - n :])
            for start in range(n_tokens - n - 1, -1, -1):
                if list(tokens[start : start + n]) == suffix:
                    follow = list(tokens[start + n : start + n + self.k])
                    return follow + [follow[-1] if follow else tokens[-1]] * (self.k - len(follow))
        return [tokens[-1]] * self.k

    def prefill(self, slot: int, prompt: Sequence[int], sampling: SamplingParams, rng: RequestRng) -> None:
        pass

    def accepted(self, slot: int, n_tokens: int) -> None:
        pass

    def free(self, slot: int) -> None:
        pass


class DraftProposer:
    """Proposals from a draft engine whose slots mirror the target's."""

    def __init__(self, draft: Engine, k: int, *, target_vocab: int) -> None:
        if draft.model_config.vocab_size != target_vocab:
            raise EngineError(
                f"draft vocabulary ({draft.model_config.vocab_size}) differs from the target's ({target_vocab}): "
                "use a draft model with the same tokenizer"
            )
        self.draft, self.k = draft, k
        self.stats = SpecStats()

    def prefill(self, slot: int, prompt: Sequence[int], sampling: SamplingParams, rng: RequestRng) -> None:
        # The draft's first token is not used: the target's context encoding gave it.
        self.draft.context_encode([SequenceRequest(slot=slot, token_ids=list(prompt), sampling=SamplingParams(), rng=RequestRng(0))])

    def propose(self, sequences: Sequence[SpecSequence]) -> list[Proposal]:
        """Catch the draft cache up (at most one token behind after full acceptance), then sample k
        tokens. Greedy requests only get point masses (the draft's argmax, picked in-graph); when
        every request is greedy no logits leave the draft's graph."""
        greedy = all(s.sampling.temperature == 0 for s in sequences)
        pending = {s.slot: list(s.tokens[self.draft.length(s.slot) :]) for s in sequences}
        proposals = {s.slot: Proposal(tokens=[], q=None) for s in sequences}
        qs: dict[int, list[torch.Tensor]] = {s.slot: [] for s in sequences}
        by_slot = {s.slot: s for s in sequences}
        while any(len(proposals[slot].tokens) < self.k for slot in by_slot):
            active = [slot for slot in by_slot if len(proposals[slot].tokens) < self.k]
            requests = []
            for slot in active:
                feed = pending[slot].pop(0) if pending[slot] else proposals[slot].tokens[-1]
                requests.append(SequenceRequest(slot=slot, token_ids=[feed], sampling=by_slot[slot].sampling, rng=by_slot[slot].rng))
            outputs = self.draft.token_generate(requests) if greedy else self.draft.token_generate_logits(requests)
            for slot, out in zip(active, outputs):
                if pending[slot]:
                    continue  # still catching up: this output predicts a token we already have
                s = by_slot[slot]
                if greedy:
                    proposals[slot].tokens.append(out)
                    continue
                q = _distribution(out[None], s.sampling, self.draft.config.max_topk)[0]
                qs[slot].append(q)
                proposals[slot].tokens.append(draw(q, float(s.rng.draw(1))))
        for slot, proposal in proposals.items():
            if qs[slot] and by_slot[slot].sampling.temperature != 0:
                proposal.q = torch.stack(qs[slot])  # greedy rows keep q = None: q is one-hot at the proposal
        return [proposals[s.slot] for s in sequences]

    def accepted(self, slot: int, n_tokens: int) -> None:
        """The target now holds n_tokens; keep only what the draft computed for accepted tokens."""
        self.draft.truncate(slot, min(self.draft.length(slot), n_tokens))

    def free(self, slot: int) -> None:
        self.draft.free(slot)


def _distribution(logits: torch.Tensor, sampling: SamplingParams, max_topk: int) -> torch.Tensor:
    n = logits.shape[0]
    return distribution(
        logits.to(torch.float32),
        temperature=torch.full((n,), sampling.temperature),
        top_k=torch.full((n,), sampling.top_k, dtype=torch.int64),
        top_p=torch.full((n,), sampling.top_p),
        max_topk=max_topk,
    )


def accept(p: torch.Tensor, proposal: Proposal, rng: RequestRng) -> list[int]:
    """Tokens to emit given target probabilities p [k + 1, V] at the k + 1 scored positions."""
    k = len(proposal.tokens)
    u = rng.draw(k + 1).tolist()
    out: list[int] = []
    for i, d in enumerate(proposal.tokens):
        q_d = 1.0 if proposal.q is None else float(proposal.q[i, d])
        if float(p[i, d]) > 0 and u[i] * q_d <= float(p[i, d]):
            out.append(d)
            continue
        q = torch.nn.functional.one_hot(torch.tensor(d), p.shape[-1]).to(p.dtype) if proposal.q is None else proposal.q[i]
        residual = torch.clamp(p[i] - q, min=0)
        out.append(draw(residual if float(residual.sum()) > 0 else p[i], u[k]))
        return out
    out.append(draw(p[k], u[k]))
    return out


def accept_sampled(proposed: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """Tokens to emit for point-mass proposals, given the token the target sampled in-graph after
    each of the k + 1 scored inputs: the proposals while they match, then the target's own token."""
    out: list[int] = []
    for d, x in zip(proposed, sampled):
        out.append(x)
        if x != d:
            return out
    out.append(sampled[len(proposed)])
    return out


def can_speculate(engine: Engine, slot: int) -> bool:
    """Whether the slot has room for a round: k + 1 scored positions plus the token emitted after them."""
    return engine.length(slot) + engine.config.speculation_length + 2 <= engine.config.seq_len


def speculative_step(target: Engine, proposer: NgramProposer | DraftProposer, sequences: Sequence[SpecSequence]) -> list[list[int]]:
    """One round for each sequence: propose, score in one target pass, accept; returns the emitted
    tokens (1 to k + 1 each) and leaves both caches holding exactly the accepted sequence."""
    proposals = proposer.propose(sequences)
    requests = [
        SequenceRequest(slot=s.slot, token_ids=[s.tokens[-1], *pr.tokens], sampling=s.sampling, rng=s.rng) for s, pr in zip(sequences, proposals)
    ]
    lengths = [target.length(s.slot) for s in sequences]
    if all(pr.q is None for pr in proposals):
        results = [accept_sampled(pr.tokens, row) for pr, row in zip(proposals, target.speculate(requests))]
    else:
        logits = target.speculate_logits(requests)
        results = [accept(_distribution(row, s.sampling, target.config.max_topk), pr, s.rng) for s, pr, row in zip(sequences, proposals, logits)]
    emitted = []
    for s, pr, tokens, length in zip(sequences, proposals, results, lengths):
        emitted.append(tokens)
        stats = proposer.stats
        stats.rounds, stats.proposed, stats.emitted = stats.rounds + 1, stats.proposed + len(pr.tokens), stats.emitted + len(tokens)
        stats.accepted += len(tokens) - 1
        # The target holds the last token and the accepted proposals; the final token is not fed yet.
        target.truncate(s.slot, length + len(tokens))
        proposer.accepted(s.slot, length + len(tokens))
    return emitted


Proposer = NgramProposer | DraftProposer


def build_proposer(spec: str | None, engine: Engine, *, draft_only: bool = False, **load_kwargs: Any) -> Proposer | None:
    """The proposer `spec` names for `engine`: "ngram" (prompt lookup), "draft:DIR" (a draft model
    checkpoint, loaded here with `load_kwargs` for its `Engine.from_pretrained`), None when off.
    `draft_only` (a prefill service, which only ships the draft's prompt KV) skips n-gram and loads
    only the draft's context-encoding graphs."""
    if not spec:
        return None
    k = engine.config.speculation_length
    if spec == "ngram":
        return None if draft_only else NgramProposer(k)
    if spec.startswith("draft:"):
        # Off prefill the draft encodes prompts itself when prefill sent no draft KV: all its graphs.
        draft = Engine.from_pretrained(
            spec.removeprefix("draft:"), engine.config.replace(tp_degree=1, ep_degree=1), graphs="context" if draft_only else "all", **load_kwargs
        )
        return DraftProposer(draft, k, target_vocab=engine.model_config.vocab_size)
    raise ValueError(f"--speculation {spec!r} is invalid: use ngram or draft:DIR")
