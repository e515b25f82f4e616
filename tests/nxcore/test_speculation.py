"""Speculative decoding: greedy output unchanged, draft == target accepts everything, the
acceptance rule preserves the target distribution, caches stay consistent after rejections."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nxcore import Engine, EngineError, RequestRng, RuntimeConfig, SamplingParams, StoppingCriteria, generate
from nxcore.speculation import DraftProposer, NgramProposer, Proposal, accept, accept_sampled
from tests.conftest import Checkpoint, random_prompt

K = 4
CONFIG = RuntimeConfig(batch_size=3, ctx_batch_size=3, seq_len=96, buckets=(32, 96), dtype="float32", speculation_length=K)
STOP = StoppingCriteria(max_new_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def target(checkpoints: dict[str, Checkpoint]) -> Engine:
    return Engine.from_pretrained(checkpoints["llama"].path, CONFIG)


@pytest.fixture(scope="module")
def near_draft(checkpoints: dict[str, Checkpoint], tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The target with noisy weights: it agrees with the target often, not always."""
    path = tmp_path_factory.mktemp("draft") / "noisy"
    shutil.copytree(checkpoints["llama"].path, path)
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    tensors = {k: v + 0.03 * torch.randn(v.shape, generator=gen) if v.ndim == 2 else v for k, v in tensors.items()}
    save_file(tensors, path / "model.safetensors")
    return Engine.from_pretrained(path, CONFIG)


def _prompts() -> list[list[int]]:
    repetitive = [7, 8, 9, 10, 11] * 4
    return [random_prompt(9, seed=1), repetitive, random_prompt(25, seed=2)]


def test_ngram_lookup_proposes_the_continuation_of_the_longest_match() -> None:
    proposer = NgramProposer(3, max_n=3)
    assert proposer.lookup([1, 2, 3, 4, 9, 1, 2, 3]) == [4, 9, 1]
    assert proposer.lookup([5, 6, 5]) == [6, 5, 5]  # too little continuation: repeat the last token
    assert proposer.lookup([1, 2, 3]) == [3, 3, 3]  # no match


@pytest.mark.parametrize("method", ["ngram", "draft-same", "draft-other"])
def test_greedy_output_equals_non_speculative(target: Engine, near_draft: Engine, checkpoints: dict[str, Checkpoint], method: str) -> None:
    plain = generate(target, _prompts(), stopping=STOP)
    if method == "ngram":
        proposer = NgramProposer(K)
    elif method == "draft-same":
        proposer = DraftProposer(Engine.from_pretrained(checkpoints["llama"].path, CONFIG), K, target_vocab=512)
    else:
        proposer = DraftProposer(near_draft, K, target_vocab=512)
    batched = generate(target, _prompts(), stopping=STOP, proposer=proposer)
    single = [generate(target, [p], stopping=STOP, proposer=proposer)[0] for p in _prompts()]
    assert [r.output_ids for r in batched] == [r.output_ids for r in plain] == [r.output_ids for r in single]
    stats = proposer.stats
    if method == "draft-same":  # the draft is the target: every proposal accepted, k + 1 tokens a round
        assert stats.accepted == stats.proposed and stats.tokens_per_round > K
    if method == "draft-other":  # rejections happened, and continuing after them stayed exact
        assert 0 < stats.accepted < stats.proposed
    assert target.free_slots() == [0, 1, 2]


def test_repetitive_prompt_gets_ngram_hits(target: Engine) -> None:
    proposer = NgramProposer(K)
    generate(target, [[7, 8, 9, 10, 11] * 4], stopping=STOP, proposer=proposer)
    assert proposer.stats.accepted > 0


def _chi_square(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=probs.shape[0]).to(torch.float64)
    expected = probs.to(torch.float64) * len(samples)
    mask = expected > 0
    assert counts[~mask].sum() == 0  # never a token the target gives probability 0
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("point_mass", [False, True])
def test_acceptance_rule_samples_the_target_distribution(point_mass: bool) -> None:
    vocab, n = 6, 20000
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(K + 1, vocab, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(K, vocab, generator=gen) * 1.5, dim=-1)
    rng = RequestRng(123)
    firsts, seconds = [], []
    for _ in range(n):
        if point_mass:  # n-gram: fixed proposals
            proposal = Proposal(tokens=[2, 4, 1, 0], q=None)
        else:  # draft: proposals sampled from q
            proposal = Proposal(tokens=[int(torch.multinomial(q[i], 1, generator=gen)) for i in range(K)], q=q)
        out = accept(p, proposal, rng)
        firsts.append(out[0])
        if len(out) > 1:  # conditioned on the first token being the proposal, the second follows p[1]
            seconds.append(out[1])
    # df = 5; p-value 0.001 critical value 20.52
    assert _chi_square(firsts, p[0]) < 20.52
    if seconds and point_mass:
        assert _chi_square(seconds, p[1]) < 20.52


def test_point_mass_acceptance_on_in_graph_samples_follows_the_target_distribution() -> None:
    """accept_sampled on x_i ~ p_i (what the speculation graph samples) equals the full rule."""
    vocab, n = 6, 20000
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(K + 1, vocab, generator=gen) * 1.5, dim=-1)
    proposed = [2, 4, 1, 0]
    firsts, seconds = [], []
    for _ in range(n):
        sampled = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(K + 1)]
        out = accept_sampled(proposed, sampled)
        assert 1 <= len(out) <= K + 1 and out[:-1] == proposed[: len(out) - 1]
        firsts.append(out[0])
        if len(out) > 1:
            seconds.append(out[1])
    assert _chi_square(firsts, p[0]) < 20.52
    assert _chi_square(seconds, p[1]) < 20.52


def test_point_mass_rounds_move_no_logits_to_the_host(target: Engine, near_draft: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """n-gram rounds (greedy or sampled) and greedy draft rounds compare token ids only."""

    def no_logits(*args, **kwargs):
        raise AssertionError("full-vocabulary logits went to the host")

    expected = generate(target, _prompts(), stopping=STOP)
    monkeypatch.setattr(target, "speculate_logits", no_logits)
    monkeypatch.setattr(near_draft, "token_generate_logits", no_logits)
    draft = generate(target, _prompts(), stopping=STOP, proposer=DraftProposer(near_draft, K, target_vocab=512))
    ngram = generate(target, _prompts(), stopping=STOP, proposer=NgramProposer(K))
    assert [r.output_ids for r in draft] == [r.output_ids for r in ngram] == [r.output_ids for r in expected]
    sampled = generate(target, _prompts(), sampling=SamplingParams(temperature=0.8, seed=3), stopping=STOP, proposer=NgramProposer(K))
    assert all(len(r.output_ids) == STOP.max_new_tokens for r in sampled)


def test_draft_with_another_vocabulary_is_refused(target: Engine, checkpoints: dict[str, Checkpoint]) -> None:
    draft = Engine.from_pretrained(checkpoints["llama"].path, CONFIG)
    with pytest.raises(EngineError, match=r"draft vocabulary \(512\) differs from the target's \(1000\)"):
        DraftProposer(draft, K, target_vocab=1000)


def test_sampled_speculation_is_reproducible_by_seed(target: Engine, near_draft: Engine) -> None:
    sampling = SamplingParams(temperature=0.8, top_k=50, seed=9)
    runs = [generate(target, _prompts(), sampling=sampling, stopping=STOP, proposer=DraftProposer(near_draft, K, target_vocab=512)) for _ in range(2)]
    assert [r.output_ids for r in runs[0]] == [r.output_ids for r in runs[1]]
    assert all(len(r.output_ids) == STOP.max_new_tokens for r in runs[0])
