"""`nxcore.sampling`: greedy, temperature, top-k, top-p, inverse-CDF sampling and the per-request RNG.

The reference sets (top-k candidates, nucleus) and distributions are computed independently here,
in float64, from the raw logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from nxcore.sampling import RequestRng, SamplingParams, sample

# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRITICAL_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}

LAST_UNIFORM = 1.0 - 2.0**-24  # largest float32 below 1: the top of torch.rand's range


def run(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    rand: float | torch.Tensor,
    max_topk: int,
) -> torch.Tensor:
    """Call `sample` with scalars broadcast to per-row tensors of the engine's dtypes."""
    n = logits.shape[0]

    def rows(value: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        return torch.full((n,), value, dtype=dtype)

    return sample(
        logits.to(torch.float32),
        temperature=rows(temperature, torch.float32),
        top_k=rows(top_k, torch.int64),
        top_p=rows(top_p, torch.float32),
        rand=rows(rand, torch.float32),
        max_topk=max_topk,
    )


def seeded_rand(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def seeded_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def nucleus(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, slack: float = 1e-5) -> set[int]:
    """Tokens allowed after temperature, top-k (k tokens; 0 = all) and top-p, in float64.

    A token is in the nucleus iff the probability of the tokens ranked before it is < top_p, i.e.
    the nucleus is the smallest set of most likely tokens whose probability reaches top_p. `slack`
    widens the boundary by float32 rounding only.
    """
    scaled = logits_row.to(torch.float64) / temperature
    order = torch.argsort(scaled, descending=True)
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(scaled[order], dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before < top_p + slack) | (torch.arange(len(order)) == 0)
    return set(order[keep].tolist())


def chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the support of expected_probs, and its degrees of freedom."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=expected_probs.numel()).to(torch.float64)
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"tokens outside the support were sampled: {counts[~support]}"
    expected = n * expected_probs[support]
    assert expected.min() >= 5, "test set-up: expected counts too small for a chi-square test"
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, int(support.sum()) - 1


FIXED_LOGITS = torch.tensor([2.0, 1.4, 1.1, 0.5, 0.0, -0.3, -0.9, -1.5])


# ------------------------------------------------------------------------------------------- Greedy


def test_temperature_zero_is_argmax_whatever_the_rand_and_filters() -> None:
    logits = seeded_logits(300, 50, seed=0)
    expected = logits.argmax(dim=-1)
    gen = torch.Generator().manual_seed(1)
    top_k = torch.randint(0, 9, (300,), generator=gen)
    top_p = torch.rand(300, generator=gen).clamp(min=0.05)
    for rand in (0.0, 0.5, LAST_UNIFORM, seeded_rand(300, seed=2)):
        tokens = run(logits, temperature=0.0, top_k=top_k, top_p=top_p, rand=rand, max_topk=8)
        assert torch.equal(tokens, expected)


def test_greedy_rows_mixed_with_sampled_rows() -> None:
    logits = seeded_logits(64, 32, seed=3)
    temperature = torch.tensor([0.0, 1.0] * 32)
    tokens = run(logits, temperature=temperature, rand=seeded_rand(64, seed=4), max_topk=32)
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))


def test_tiny_temperature_equals_greedy() -> None:
    logits = seeded_logits(1000, 64, seed=5)
    best = logits.argmax(dim=-1)
    logits[torch.arange(1000), best] += 0.01  # a top-1 margin of at least 0.01 = 100 temperatures
    rand = torch.cat([seeded_rand(997, seed=6), torch.tensor([0.0, 0.999, LAST_UNIFORM])])
    for top_k, top_p, max_topk in ((0, 1.0, 64), (0, 1.0, 16), (5, 0.9, 16)):
        tokens = run(logits, temperature=1e-4, top_k=top_k, top_p=top_p, rand=rand, max_topk=max_topk)
        assert torch.equal(tokens, best)


def test_top_k_one_is_greedy() -> None:
    logits = seeded_logits(500, 40, seed=7)
    tokens = run(logits, temperature=1.5, top_k=1, rand=seeded_rand(500, seed=8), max_topk=16)
    assert torch.equal(tokens, logits.argmax(dim=-1))


# -------------------------------------------------------------------------------------------- Top-k


def test_top_k_samples_only_among_the_k_best() -> None:
    rows, vocab, max_topk = 2000, 64, 16
    logits = seeded_logits(rows, vocab, seed=9, scale=0.5)
    top_k = torch.randint(1, max_topk + 1, (rows,), generator=torch.Generator().manual_seed(10))
    temperature = 0.5 + 1.5 * torch.rand(rows, generator=torch.Generator().manual_seed(11))
    tokens = run(logits, temperature=temperature, top_k=top_k, rand=seeded_rand(rows, seed=12), max_topk=max_topk)
    ranks = (logits > logits.gather(-1, tokens[:, None])).sum(dim=-1)  # 0 = the best token
    assert bool((ranks < top_k).all()), f"rows sampled outside their top-k: {torch.nonzero(ranks >= top_k).flatten()}"
    # Not over-restrictive: with flat-ish logits the k-th best token does get sampled sometimes.
    assert bool(((ranks == top_k - 1) & (top_k > 1)).any())


def test_top_k_zero_means_the_max_topk_candidates() -> None:
    rows, vocab, max_topk = 2000, 64, 5
    logits = seeded_logits(1, vocab, seed=13, scale=0.3).expand(rows, vocab)
    tokens = run(logits, temperature=1.0, top_k=0, rand=seeded_rand(rows, seed=14), max_topk=max_topk)
    top = set(torch.topk(logits[0], max_topk).indices.tolist())
    assert set(tokens.tolist()) == top


def test_top_k_above_the_vocab_uses_the_whole_vocab() -> None:
    rows, vocab = 2000, 6
    logits = seeded_logits(1, vocab, seed=15, scale=0.3).expand(rows, vocab)
    for top_k in (0, 6, 7):
        tokens = run(logits, temperature=1.0, top_k=top_k, rand=seeded_rand(rows, seed=16), max_topk=16)
        assert set(tokens.tolist()) == set(range(vocab))


def test_top_k_above_max_topk_is_rejected() -> None:
    SamplingParams(temperature=1.0, top_k=16).validate(max_topk=16)
    SamplingParams(temperature=1.0, top_k=0).validate(max_topk=16)
    with pytest.raises(ValueError, match=r"top_k=17.*0\.\.16"):
        SamplingParams(temperature=1.0, top_k=17).validate(max_topk=16)
    with pytest.raises(ValueError, match=r"top_k=-1"):
        SamplingParams(temperature=1.0, top_k=-1).validate(max_topk=16)


# -------------------------------------------------------------------------------------------- Top-p


@pytest.mark.parametrize("top_k", [0, 6])
def test_top_p_samples_only_inside_the_nucleus(top_k: int) -> None:
    rows, vocab = 2000, 32
    logits = seeded_logits(rows, vocab, seed=17, scale=1.5)
    gen = torch.Generator().manual_seed(18)
    top_p = torch.rand(rows, generator=gen).clamp(min=0.02)
    temperature = 0.5 + torch.rand(rows, generator=gen)
    tokens = run(logits, temperature=temperature, top_k=top_k, top_p=top_p, rand=seeded_rand(rows, seed=19), max_topk=vocab)
    outside = [i for i in range(rows) if tokens[i].item() not in nucleus(logits[i], temperature[i].item(), top_k, top_p[i].item())]
    assert not outside, f"rows sampled outside their nucleus: {outside[:10]}"
    # Not over-restrictive: some rows sample a token other than their best one.
    assert bool((tokens != logits.argmax(dim=-1)).sum() > rows // 4)


def test_top_p_always_keeps_the_top_token() -> None:
    rows, vocab = 500, 32
    logits = seeded_logits(rows, vocab, seed=20, scale=0.1)  # flat: the top token has far less than top_p
    rand = torch.cat([seeded_rand(rows - 2, seed=21), torch.tensor([0.0, LAST_UNIFORM])])
    tokens = run(logits, temperature=1.0, top_p=1e-6, rand=rand, max_topk=vocab)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    # With any top_p, the best token is drawn for the smallest uniforms.
    tokens = run(logits, temperature=1.0, top_p=0.5, rand=0.0, max_topk=vocab)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_p_one_keeps_every_candidate() -> None:
    rows, vocab = 4000, 8
    logits = FIXED_LOGITS[None].expand(rows, vocab)
    tokens = run(logits, temperature=1.0, top_p=1.0, rand=seeded_rand(rows, seed=22), max_topk=vocab)
    assert set(tokens.tolist()) == set(range(vocab))


# ------------------------------------------------------------------------------------- Distributions


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_frequencies_follow_softmax_of_scaled_logits(temperature: float) -> None:
    n = 20000
    logits = FIXED_LOGITS[None].expand(n, 8)
    tokens = run(logits, temperature=temperature, rand=seeded_rand(n, seed=23), max_topk=8)
    expected = torch.softmax(FIXED_LOGITS.to(torch.float64) / temperature, dim=-1)
    stat, df = chi_square(tokens, expected)
    assert df == 7
    assert stat < CHI2_CRITICAL_001[df], f"chi-square {stat:.2f} >= {CHI2_CRITICAL_001[df]} (df={df})"


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_frequencies_with_top_k_follow_the_renormalized_top_k(temperature: float) -> None:
    n = 20000
    logits = FIXED_LOGITS[None].expand(n, 8)
    tokens = run(logits, temperature=temperature, top_k=3, rand=seeded_rand(n, seed=24), max_topk=8)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[:3] = torch.softmax(FIXED_LOGITS[:3].to(torch.float64) / temperature, dim=-1)
    stat, df = chi_square(tokens, expected)
    assert df == 2
    assert stat < CHI2_CRITICAL_001[df], f"chi-square {stat:.2f} >= {CHI2_CRITICAL_001[df]} (df={df})"


def test_frequencies_with_top_p_follow_the_renormalized_nucleus() -> None:
    n, temperature, top_p = 20000, 1.0, 0.8
    logits = FIXED_LOGITS[None].expand(n, 8)
    tokens = run(logits, temperature=temperature, top_p=top_p, rand=seeded_rand(n, seed=25), max_topk=8)
    kept = sorted(nucleus(FIXED_LOGITS, temperature, 0, top_p, slack=0.0))
    assert kept == [0, 1, 2, 3]  # test set-up: cumulative probs 0.40, 0.62, 0.78, 0.87, ...
    expected = torch.zeros(8, dtype=torch.float64)
    expected[kept] = torch.softmax(FIXED_LOGITS[kept].to(torch.float64) / temperature, dim=-1)
    stat, df = chi_square(tokens, expected)
    assert stat < CHI2_CRITICAL_001[df], f"chi-square {stat:.2f} >= {CHI2_CRITICAL_001[df]} (df={df})"


def test_inverse_cdf_maps_uniforms_onto_cumulative_probabilities() -> None:
    # Deterministic: rand just below / above each CDF step picks the token on that side.
    probs = torch.softmax(FIXED_LOGITS.to(torch.float64), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    below = (cdf[:-1] - 1e-4).to(torch.float32)
    above = (cdf[:-1] + 1e-4).to(torch.float32)
    logits = FIXED_LOGITS[None].expand(7, 8)
    assert run(logits, temperature=1.0, rand=below, max_topk=8).tolist() == list(range(7))
    assert run(logits, temperature=1.0, rand=above, max_topk=8).tolist() == list(range(1, 8))


# ------------------------------------------------------------------------------- Batch independence


def test_a_row_depends_only_on_its_own_inputs() -> None:
    rows, vocab = 48, 40
    gen = torch.Generator().manual_seed(26)
    logits = 2 * torch.randn(rows, vocab, generator=gen)
    temperature = torch.where(torch.rand(rows, generator=gen) < 0.2, 0.0, 0.3 + 1.5 * torch.rand(rows, generator=gen))
    top_k = torch.randint(0, 12, (rows,), generator=gen)
    top_p = torch.where(torch.rand(rows, generator=gen) < 0.3, 1.0, 0.1 + 0.9 * torch.rand(rows, generator=gen))
    rand = torch.rand(rows, generator=gen)

    def call(idx: torch.Tensor | slice) -> torch.Tensor:
        return run(logits[idx], temperature=temperature[idx], top_k=top_k[idx], top_p=top_p[idx], rand=rand[idx], max_topk=12)

    batch = call(slice(None))
    alone = torch.cat([call(slice(i, i + 1)) for i in range(rows)])
    assert torch.equal(batch, alone)
    perm = torch.randperm(rows, generator=gen)
    assert torch.equal(call(perm), batch[perm])
    assert len(set(batch.tolist())) > 1


# --------------------------------------------------------------------------------------------- RNG


def test_same_seed_same_stream() -> None:
    a, b = RequestRng(1234), RequestRng(1234)
    first = a.draw(40)
    assert torch.equal(first, b.draw(40))
    assert first.dtype == torch.float32 and bool(((first >= 0) & (first < 1)).all())
    assert not torch.equal(first, RequestRng(1235).draw(40))
    assert not torch.equal(a.draw(40), first)  # the stream moves on


@pytest.mark.parametrize("sizes", [[1] * 5, [3, 17, 1], [40], [1, 31, 2, 64]])
def test_offset_resumes_the_stream_exactly(sizes: list[int]) -> None:
    ref = RequestRng(99)
    full = ref.draw(sum(sizes) + 50)
    rng = RequestRng(99)
    drawn = torch.cat([rng.draw(n) for n in sizes])
    assert torch.equal(drawn, full[: sum(sizes)])
    assert rng.offset == sum(sizes)
    resumed = RequestRng(99, offset=rng.offset)
    assert resumed.offset == rng.offset
    nxt = rng.draw(50)
    assert torch.equal(resumed.draw(25), nxt[:25])
    assert torch.equal(resumed.draw(1), nxt[25:26])
    assert torch.equal(resumed.draw(24), nxt[26:])
    assert torch.equal(nxt, full[sum(sizes) :])


def test_unseeded_rng_is_reproducible_from_its_seed() -> None:
    rng = RequestRng(None)
    assert isinstance(rng.seed, int)
    values = rng.draw(10)
    assert torch.equal(RequestRng(rng.seed).draw(10), values)
    assert RequestRng(None).seed != rng.seed


# ---------------------------------------------------------------------------------------- Validation


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        (SamplingParams(temperature=-0.5), r"temperature=-0\.5.*>= 0"),
        (SamplingParams(temperature=math.nan), r"temperature=nan"),
        (SamplingParams(temperature=1.0, top_p=0.0), r"top_p=0\.0.*\(0, 1\]"),
        (SamplingParams(temperature=1.0, top_p=1.5), r"top_p=1\.5.*\(0, 1\]"),
        (SamplingParams(temperature=1.0, top_p=-0.1), r"top_p=-0\.1.*\(0, 1\]"),
        (SamplingParams(temperature=1.0, top_k=65), r"top_k=65.*0\.\.64"),
    ],
)
def test_validate_names_the_field_and_allowed_range(params: SamplingParams, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        params.validate(max_topk=64)


def test_valid_params_pass_validation() -> None:
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=64, top_p=1.0),
        SamplingParams(temperature=2.0, top_k=1, top_p=1e-3, seed=0),
    ):
        params.validate(max_topk=64)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.1).greedy
