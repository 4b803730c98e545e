"""Masking strategies and mask-ratio distributions of training.diffusion, with numbers.

Every strategy must mask each valid token with marginal probability p(t) (so the expected
masked fraction is p(t)); whole-word masking must never split a word; spans must have the
configured mean length; each t distribution must have its mean and variance; and only
independent tokens with t ~ U(0,1) may claim to train on the exact NELBO.
"""

from __future__ import annotations

import math

import pytest
import torch

from infra.config import MaskingConfig
from infra.errors import ContractError
from training.diffusion import (Masking, MaskingStrategy, TimeDistribution, draw_noise, independent_mask, mask_prob,
                                sample_times, span_mask, whole_word_mask, word_start_table, word_starts)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


V = 40
WORD_START = torch.arange(V) < 12  # ids 0..11 begin a word, 12..39 continue one (mean word ~3.3 tokens)


def word_masking(**kw) -> Masking:
    return Masking(strategy="whole_word", word_start=WORD_START, **kw)


def runs(masked: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of True in each row that touch neither end of the row."""
    x = masked.int()
    edges = torch.diff(torch.nn.functional.pad(x, (1, 1)), dim=1)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    lengths = ends[:, 1] - starts[:, 1]
    interior = (starts[:, 1] > 0) & (ends[:, 1] < masked.shape[1])
    return lengths[interior].double()


# --------------------------------------------------------------------------- masked fraction = p


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("strategy", ["independent", "whole_word", "span"])
def test_every_strategy_masks_each_token_with_probability_p(strategy, p):
    B, L = 400, 256
    g = gen(1)
    pv = torch.full((B,), p)
    if strategy == "independent":
        masked = independent_mask(torch.rand(B, L, generator=g), pv)
    elif strategy == "whole_word":
        x0 = torch.randint(0, V, (B, L), generator=g)
        masked = whole_word_mask(torch.rand(B, L, generator=g), pv, word_starts(x0, None, WORD_START))
    else:
        masked = span_mask(torch.rand(B, generator=g, dtype=torch.float64),
                           torch.rand(B, L, generator=g, dtype=torch.float64), pv, 3.0)
    per_row = masked.double().mean(dim=1)
    stderr = per_row.std().item() / math.sqrt(B)
    assert abs(per_row.mean().item() - p) < 4 * stderr + 1e-9
    assert stderr < 0.01  # sharp enough to catch a 4% error in the fraction
    # Marginal per POSITION too (stationarity of the span chain, no edge effects): first and last columns.
    for column in (masked[:, :8], masked[:, -8:]):
        assert abs(column.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / column.numel()) * 3


@pytest.mark.parametrize("masking", [Masking(), word_masking(), Masking(strategy="span", mean_span_length=4.0),
                                     Masking(t_distribution="beta", beta_a=2.0, beta_b=5.0),
                                     Masking(strategy="span", t_distribution="truncated", t_min=0.2, t_max=0.6)],
                         ids=lambda m: m.describe())
def test_draw_noise_masked_fraction_tracks_p_of_t(masking):
    B, L = 1024, 128
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, 100:] = False
    x0 = torch.randint(0, V, (B, L), generator=gen(2))
    draw = draw_noise(valid, gen(3), masking=masking, input_ids=x0)
    assert not (draw.masked & ~valid).any()
    assert draw.strategy is masking.strategy and draw.t_distribution is masking.t_distribution
    fraction = draw.masked[:, :100].double().mean(dim=1)
    residual = fraction - draw.p.double()
    stderr = residual.std().item() / math.sqrt(B)
    assert abs(residual.mean().item()) < 4 * stderr
    # Rows follow their own p(t): the fraction regresses on p with slope 1.
    pc = draw.p.double() - draw.p.double().mean()
    slope = ((fraction - fraction.mean()) * pc).sum() / (pc ** 2).sum()
    slope_se = (fraction - fraction.mean() - slope * pc).std() / ((pc ** 2).sum().sqrt())
    assert abs(slope.item() - 1.0) < 4 * slope_se.item()
    assert slope_se < 0.05


# --------------------------------------------------------------------------- whole words


def test_whole_word_never_splits_a_word_and_documents_start_words():
    B, L = 256, 64
    x0 = torch.randint(0, V, (B, L), generator=gen(4))
    segment_ids = (torch.arange(L) // 20).expand(B, L).clone()  # documents at 0, 20, 40, 60
    valid = torch.ones(B, L, dtype=torch.bool)
    draw = draw_noise(valid, gen(5), masking=word_masking(), input_ids=x0, segment_ids=segment_ids)
    starts = word_starts(x0, segment_ids, WORD_START)
    assert starts[:, [0, 20, 40, 60]].all()  # a packed document's first token starts a word
    continuation = ~starts[:, 1:]
    # Inside a word every token shares the word's fate.
    assert torch.equal(draw.masked[:, 1:][continuation], draw.masked[:, :-1][continuation])
    assert 0.3 < draw.masked.float().mean() < 0.7  # and the check is not vacuous
    # Independent masking does split words (the check above has teeth).
    indep = draw_noise(valid, gen(5))
    assert not torch.equal(indep.masked[:, 1:][continuation], indep.masked[:, :-1][continuation])


def test_word_start_table_from_a_byte_level_bpe():
    from infra.config import TokenizerConfig
    from pipelines.tokenize import SPECIAL_TOKENS, train_tokenizer

    text = "def main(argv):\n    return run(argv)\n\nThe quick brown fox jumps over the lazy dog.\tTabbed words here"
    tok = train_tokenizer([text] * 30, TokenizerConfig(vocab_size=320, min_frequency=2))
    table = word_start_table(tok.to_str())
    assert len(table) == tok.get_vocab_size()
    for special in SPECIAL_TOKENS.values():
        assert table[tok.token_to_id(special)]
    enc = tok.encode(text)
    for token, token_id in zip(enc.tokens, enc.ids):
        expected = token.startswith(("Ġ", "ĉ")) or "Ċ" in token  # leading space / tab, or a newline
        assert bool(table[token_id]) == expected, token
    # Words decode back to whitespace-separated text: split the ids at word starts.
    words, current = [], []
    for token_id in enc.ids:
        if table[token_id] and current:
            words.append(current)
            current = []
        current.append(token_id)
    words.append(current)
    assert [tok.decode(w).strip() for w in words if tok.decode(w).strip()] == text.split()
    # A table wider than the tokenizer (an appended mask id) marks the extra ids as word starts.
    assert word_start_table(tok.to_str(), vocab_size=400)[320:].all()


# --------------------------------------------------------------------------- spans


@pytest.mark.parametrize("mean", [1.0, 3.0, 6.0])
def test_span_lengths_are_geometric_with_the_configured_mean(mean):
    B, L = 200, 2000
    p = torch.full((B,), 0.25)  # below m / (m + 1) for every m here: spans keep mean m
    masked = span_mask(torch.rand(B, generator=gen(6), dtype=torch.float64),
                       torch.rand(B, L, generator=gen(7), dtype=torch.float64), p, mean)
    lengths = runs(masked)
    stderr = lengths.std().item() / math.sqrt(len(lengths)) if mean > 1 else 1e-9
    assert abs(lengths.mean().item() - mean) < 4 * stderr + 1e-9
    # Geometric: P(length = 1) = 1/m, P(length = 2) = (1/m)(1 - 1/m).
    assert (lengths == 1).double().mean().item() == pytest.approx(1 / mean, abs=0.02)
    assert (lengths == 2).double().mean().item() == pytest.approx((1 / mean) * (1 - 1 / mean), abs=0.02)
    assert masked.double().mean().item() == pytest.approx(0.25, abs=0.01)


def test_span_masking_above_m_over_m_plus_1_keeps_the_fraction_and_lengthens_spans():
    B, L, m, p = 200, 2000, 3.0, 0.9  # 0.9 > 3/4: gaps are single tokens, spans mean p/(1-p) = 9
    masked = span_mask(torch.rand(B, generator=gen(8), dtype=torch.float64),
                       torch.rand(B, L, generator=gen(9), dtype=torch.float64), torch.full((B,), p), m)
    assert masked.double().mean().item() == pytest.approx(p, abs=0.005)
    assert runs(masked).mean().item() == pytest.approx(p / (1 - p), rel=0.05)
    gaps = runs(~masked)
    assert (gaps == 1).all()
    # p = 1 masks everything, p = 0 nothing.
    ones = span_mask(torch.rand(3, dtype=torch.float64), torch.rand(3, 50, dtype=torch.float64), torch.ones(3), m)
    zeros = span_mask(torch.rand(3, dtype=torch.float64), torch.rand(3, 50, dtype=torch.float64), torch.zeros(3), m)
    assert ones.all() and not zeros.any()


# --------------------------------------------------------------------------- t distributions


@pytest.mark.parametrize("masking, mean, var", [
    (Masking(), 0.5, 1 / 12),
    (Masking(t_distribution="beta", beta_a=2.0, beta_b=5.0), 2 / 7, 10 / (49 * 8)),
    (Masking(t_distribution="beta", beta_a=0.5, beta_b=0.5), 0.5, 0.125),
    (Masking(t_distribution="truncated", t_min=0.2, t_max=0.6), 0.4, 0.4**2 / 12),
], ids=lambda x: x.describe() if isinstance(x, Masking) else "")
def test_t_distributions_have_their_mean_and_variance(masking, mean, var):
    n = 8192
    t = sample_times(n, gen(10), masking=masking).double()
    # Stratified: the mean is far more precise than an i.i.d. sample's (1/sqrt(n) * sd).
    assert t.mean().item() == pytest.approx(mean, abs=0.2 * math.sqrt(var / n))
    assert t.var().item() == pytest.approx(var, rel=0.01)
    if masking.t_distribution is TimeDistribution.TRUNCATED:
        assert t.min() >= 0.2 and t.max() <= 0.6


def test_t_stratification_holds_for_beta_across_ranks():
    from scipy.special import betainc

    masking = Masking(t_distribution="beta", beta_a=2.0, beta_b=3.0)
    n_local, world = 8, 4
    t = torch.cat([sample_times(n_local, gen(11), r, world, masking) for r in range(world)]).double()
    u = torch.from_numpy(betainc(2.0, 3.0, t.numpy()))  # back through the CDF: one per stratum of U(0,1)
    strata = (u * n_local * world).floor().long().sort().values
    assert torch.equal(strata, torch.arange(n_local * world))
    torch.testing.assert_close(t.float(), sample_times(n_local * world, gen(11), masking=masking), rtol=0, atol=0)


@pytest.mark.parametrize("masking", [Masking(strategy="span"), word_masking()], ids=lambda m: m.describe())
def test_ranks_slice_the_global_draw_for_every_strategy(masking):
    x0 = torch.randint(0, V, (8, 30), generator=gen(12))
    valid = torch.ones(8, 30, dtype=torch.bool)
    whole = draw_noise(valid, gen(13), masking=masking, input_ids=x0)
    parts = [draw_noise(valid[4 * r:4 * (r + 1)], gen(13), rank=r, world_size=2, masking=masking,
                        input_ids=x0[4 * r:4 * (r + 1)]) for r in range(2)]
    assert torch.equal(torch.cat([p.masked for p in parts]), whole.masked)
    torch.testing.assert_close(torch.cat([p.t for p in parts]), whole.t, rtol=0, atol=0)


def test_default_draw_is_unchanged_independent_masking():
    """The independent draw consumes the generator as it always did (resumed runs stay bit-identical)."""
    valid = torch.ones(6, 20, dtype=torch.bool)
    valid[2, 15:] = False
    draw = draw_noise(valid, gen(14), eps=1e-3, masking=Masking())
    g = gen(14)  # the original recipe, spelled out
    t = ((torch.arange(6, dtype=torch.float64) + torch.rand(6, generator=g, dtype=torch.float64)) / 6).float()
    u = torch.rand(6, 20, generator=g)
    assert torch.equal(draw.t, t)
    assert torch.equal(draw.masked, (u < mask_prob(t, 1e-3)[:, None]) & valid)
    assert torch.equal(draw_noise(valid, gen(14)).masked, draw.masked)


# --------------------------------------------------------------------------- exactness and config


def test_only_independent_uniform_is_an_exact_nelbo():
    assert Masking().is_exact_nelbo
    assert not Masking(strategy="span").is_exact_nelbo
    assert not word_masking().is_exact_nelbo
    assert not Masking(t_distribution="beta", beta_a=1.0, beta_b=1.0).is_exact_nelbo  # flagged by name, not value
    assert not Masking(t_distribution="truncated", t_min=0.0, t_max=0.5).is_exact_nelbo
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert draw_noise(valid, gen()).is_exact_nelbo
    assert not draw_noise(valid, gen(), masking=Masking(strategy="span")).is_exact_nelbo
    assert not draw_noise(valid, gen(), masking=Masking(t_distribution="truncated", t_min=0.1, t_max=0.9)).is_exact_nelbo
    assert Masking(strategy="span", mean_span_length=2.5, t_distribution="beta", beta_a=2.0,
                   beta_b=5.0).describe() == "span(mean=2.5)/beta(2,5)"


def test_masking_validation():
    with pytest.raises(ValueError, match="word_start"):
        Masking(strategy="whole_word")
    with pytest.raises(ValueError, match="word_start"):
        draw_noise(torch.ones(2, 3, dtype=torch.bool), gen(), strategy="whole_word")
    with pytest.raises(ValueError, match="input_ids"):
        draw_noise(torch.ones(2, 3, dtype=torch.bool), gen(), masking=word_masking())
    with pytest.raises(ValueError, match="mean_span_length"):
        Masking(strategy="span", mean_span_length=0.5)
    with pytest.raises(ValueError, match="t_min"):
        Masking(t_distribution="truncated", t_min=0.5, t_max=0.5)


@pytest.mark.parametrize("values, message", [
    ({"t_distribution": "beta"}, "needs beta_a and beta_b"),
    ({"t_distribution": "truncated", "t_min": 0.1}, "needs t_min and t_max"),
    ({"t_distribution": "truncated", "t_min": 0.6, "t_max": 0.4}, "must be < t_max"),
    ({"beta_a": 2.0}, "beta_a set but t_distribution is 'uniform'"),
    ({"t_distribution": "beta", "beta_a": 1.0, "beta_b": 1.0, "t_max": 0.5}, "t_max set"),
    ({"mean_span_length": 0.5}, "greater than or equal to 1"),
    ({"beta_a": -1.0, "t_distribution": "beta", "beta_b": 1.0}, "greater than 0"),
    ({"strategy": "sentence"}, "independent"),
])
def test_masking_config_rejects_inconsistent_values(values, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        MaskingConfig(**values)


def test_masking_config_round_trip_to_masking(tmp_path):
    from training.data import masking_for_run
    try:
        from training_fixtures import write_tiny_corpus
    except ImportError:
        from tests.training_fixtures import write_tiny_corpus

    corpus = write_tiny_corpus(tmp_path, ["alpha"], vocab_size=32)
    cfg = MaskingConfig(strategy="span", mean_span_length=5.0, t_distribution="beta", beta_a=2.0, beta_b=3.0)
    m = masking_for_run(cfg, corpus.manifest, corpus.root)
    assert (m.strategy, m.mean_span_length, m.beta_a, m.beta_b) == (MaskingStrategy.SPAN, 5.0, 2.0, 3.0)
    assert masking_for_run(MaskingConfig(), corpus.manifest, corpus.root).is_exact_nelbo
    # Whole-word masking reads the manifest's tokenizer.json, which this fixture does not write.
    with pytest.raises(ContractError, match="tokenizer"):
        masking_for_run(MaskingConfig(strategy="whole_word"), corpus.manifest, corpus.root)
