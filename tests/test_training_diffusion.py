"""training.diffusion against the formulas of DESIGN.md, with numbers.

The strongest checks: both likelihood estimators agree with the exact NELBO obtained by
enumerating every mask of a 3-token sequence, and a model with uniform logits scores exactly
log(V - 1) nats/token (the mask token is excluded from the softmax).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.diffusion import (MaskingStrategy, NoiseDraw, apply_mask, draw_noise, elbo_per_sequence,
                                loss_by_t_bucket, mask_prob, nelbo_loss, per_sequence_nelbo, sample,
                                stratified_times, token_terms, transfer_schedule)
from training.model import MaskedDiffusionTransformer, ModelArgs

MASK = 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class UniformModel(nn.Module):
    """Logits all equal: p = 1/(V-1) for every token once the mask token is excluded."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, segment_ids=None):
        return torch.zeros(*input_ids.shape, self.vocab_size) + 0 * self.dummy


def tiny_model(vocab_size=6, seed=0) -> MaskedDiffusionTransformer:
    torch.manual_seed(seed)
    model = MaskedDiffusionTransformer(ModelArgs(vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2,
                                                 d_ff=32, max_seq_len=8))
    with torch.no_grad():  # bigger weights than the init so that predictions depend on context
        for p in model.parameters():
            p.mul_(20 if p.dim() > 1 else 1)
    return model.eval()


# --------------------------------------------------------------------------- forward process


def test_mask_prob_formula():
    eps = 1e-3
    assert mask_prob(0.0, eps) == pytest.approx(eps)
    assert mask_prob(1.0, eps) == pytest.approx(1.0)
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(mask_prob(t, 0.1), 0.9 * t + 0.1)


def test_stratified_times_cover_each_global_stratum_once_across_ranks():
    n_local, world = 8, 4
    per_rank = [stratified_times(n_local, gen(7), rank, world) for rank in range(world)]
    t = torch.cat(per_rank)
    strata = (t.double() * n_local * world).floor().long().sort().values
    assert torch.equal(strata, torch.arange(n_local * world))
    # The ranks' slices together are exactly the single-rank draw of the global batch.
    torch.testing.assert_close(t, stratified_times(n_local * world, gen(7)), rtol=0, atol=0)
    # Within one rank the times are NOT one per local stratum (they are a contiguous slice).
    assert per_rank[0].max() < 0.25 + 1e-6


def test_draw_noise_masks_valid_tokens_at_rate_p():
    B, L = 512, 64
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, 50:] = False
    draw = draw_noise(valid, gen(1), eps=1e-3)
    assert not (draw.masked & ~valid).any()
    rate = draw.masked[:, :50].float().mean(dim=1)
    # Per row, the masked fraction tracks p(t): residuals are binomial noise of 50 coins.
    assert torch.corrcoef(torch.stack([rate, draw.p]))[0, 1] > 0.95
    assert abs(rate.mean().item() - draw.p.mean().item()) < 0.01


def test_draw_noise_ranks_slice_the_global_draw():
    valid = torch.ones(8, 10, dtype=torch.bool)
    whole = draw_noise(valid, gen(3), rank=0, world_size=1)
    parts = [draw_noise(valid[:4], gen(3), rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p.masked for p in parts]), whole.masked)
    torch.testing.assert_close(torch.cat([p.t for p in parts]), whole.t, rtol=0, atol=0)


def test_only_independent_masking_is_exact():
    # The other strategies and t distributions are tested in test_training_masking.py.
    assert MaskingStrategy.INDEPENDENT.is_exact_nelbo
    assert not MaskingStrategy.SPAN.is_exact_nelbo and not MaskingStrategy.WHOLE_WORD.is_exact_nelbo
    draw = draw_noise(torch.ones(2, 3, dtype=torch.bool), gen(), strategy="independent")
    assert draw.strategy is MaskingStrategy.INDEPENDENT and draw.is_exact_nelbo
    with pytest.raises(ValueError):
        draw_noise(torch.ones(2, 3, dtype=torch.bool), gen(), strategy="no-such-strategy")


# --------------------------------------------------------------------------- loss


def test_token_terms_are_ce_over_p_on_the_mask_and_zero_elsewhere():
    model = tiny_model(vocab_size=9)
    x0 = torch.randint(2, 9, (4, 6))
    valid = torch.ones_like(x0, dtype=torch.bool)
    draw = draw_noise(valid, gen(5))
    terms = token_terms(model, x0, None, draw, valid, MASK)
    logits = model(apply_mask(x0, draw.masked, MASK), None)
    logits[..., MASK] = float("-inf")
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    expected = torch.where(draw.masked, ce / draw.p[:, None], torch.zeros_like(ce))
    torch.testing.assert_close(terms, expected)
    assert (terms[~draw.masked] == 0).all()


def test_token_terms_same_draw_is_reproducible_across_models():
    a, b = tiny_model(9, seed=0), tiny_model(9, seed=1)
    x0 = torch.randint(2, 9, (3, 7))
    valid = torch.ones_like(x0, dtype=torch.bool)
    draw = draw_noise(valid, gen(11))
    ta1, ta2 = token_terms(a, x0, None, draw, valid, MASK), token_terms(a, x0, None, draw, valid, MASK)
    tb = token_terms(b, x0, None, draw, valid, MASK)
    assert torch.equal(ta1, ta2)
    assert torch.equal(ta1 != 0, tb != 0)  # the same positions are scored...
    assert not torch.equal(ta1, tb)  # ...by two different models
    with pytest.raises(ValueError, match="padding"):
        bad = NoiseDraw(draw.t, draw.masked.clone())
        bad.masked[0, 0] = True
        token_terms(a, x0, None, bad, valid & ~bad.masked, MASK)


def test_nelbo_divides_by_valid_tokens_not_by_masked_tokens():
    terms = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    torch.testing.assert_close(per_sequence_nelbo(terms, valid), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(nelbo_loss(terms, valid), torch.tensor(0.75))
    # A row without any valid token does not dilute the mean.
    torch.testing.assert_close(nelbo_loss(torch.cat([terms, torch.zeros(1, 4)]),
                                          torch.cat([valid, torch.zeros(1, 4, dtype=torch.bool)])),
                               torch.tensor(0.75))


def test_loss_by_t_bucket_sums_and_counts():
    sums, counts = loss_by_t_bucket(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.05, 0.1, 0.5, 0.999]), 5)
    torch.testing.assert_close(sums, torch.tensor([3.0, 0.0, 3.0, 0.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------------- estimators vs analytic values


def test_uniform_logits_eval_estimator_is_exactly_log_v_minus_1():
    V = 17
    x0 = torch.randint(2, V, (5, 12))
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[1, 7:] = False
    valid[3, 2:] = False
    nats = elbo_per_sequence(UniformModel(V), x0, None, valid, mc_samples=3, generator=gen(), mask_id=MASK)
    # Each sample: (L/l) * l * log(V-1) = L log(V-1), whatever l and the mask are.
    # Exact up to the float32 cross-entropy.
    torch.testing.assert_close(nats, valid.sum(1).double() * math.log(V - 1), rtol=1e-6, atol=0)


def test_uniform_logits_training_estimator_has_mean_log_v_minus_1():
    V, B, L = 17, 4096, 16
    x0 = torch.randint(2, V, (B, L))
    valid = torch.ones_like(x0, dtype=torch.bool)
    draw = draw_noise(valid, gen(2))
    per_seq = per_sequence_nelbo(token_terms(UniformModel(V), x0, None, draw, valid, MASK), valid).double()
    stderr = per_seq.std().item() / math.sqrt(B)
    assert abs(per_seq.mean().item() - math.log(V - 1)) < 4 * stderr
    assert stderr < 0.05 * math.log(V - 1)  # and the check is not vacuous


def exact_nelbo(model, x0: torch.Tensor, eps: float) -> tuple[float, float]:
    """Enumerate every mask of a short sequence x0 [L].

    Returns (eps = 0 continuous-time NELBO, expectation of the training loss with this eps), in
    nats for the whole sequence. With S_M = sum over i in M of CE_i(x0 masked at M), m = |M|:
      training:  E_t[(1/p) sum_M p^m (1-p)^(L-m) S_M],  p = (1-eps)t + eps, t ~ U(0,1)
      eps = 0:   sum_M S_M * (m-1)! (L-m)! / L!    (= the l-masking estimator's expectation)
    """
    L = x0.shape[0]
    rows = []
    for m in range(1, L + 1):
        for subset in itertools.combinations(range(L), m):
            masked = torch.zeros(1, L, dtype=torch.bool)
            masked[0, list(subset)] = True
            logits = model(apply_mask(x0[None], masked, MASK), None)
            logits[..., MASK] = float("-inf")
            ce = F.cross_entropy(logits.transpose(1, 2), x0[None], reduction="none")
            rows.append((m, ce[masked].sum().item()))
    exact0 = sum(s * math.factorial(m - 1) * math.factorial(L - m) / math.factorial(L) for m, s in rows)
    p = np.linspace(eps, 1.0, 200_001)
    integrand = sum(s * p ** (m - 1) * (1 - p) ** (L - m) for m, s in rows)
    exact_eps = np.trapezoid(integrand, p) / (1 - eps)  # dt = dp / (1 - eps)
    return exact0, float(exact_eps)


def test_both_estimators_match_exact_enumeration_on_a_3_token_sequence():
    model = tiny_model(vocab_size=6)
    x0 = torch.tensor([2, 5, 3])
    L = 3
    exact0, exact_default_eps = exact_nelbo(model, x0, 1e-3)
    assert abs(exact0 - exact_default_eps) < 0.001 * exact0  # eps = 1e-3 only trims a sliver of the integral
    assert exact0 > 3 * 0.5  # a non-trivial model (the comparison below would be vacuous at ~0)
    # The training check uses a larger eps: the 1/p weight (up to 1/eps) makes the estimator
    # heavy-tailed, and a sharper test at the same cost beats the default value here.
    eps = 0.05
    _, exact_eps = exact_nelbo(model, x0, eps)

    # Evaluation estimator (exactly l tokens masked, weight L/l): mean over many MC samples.
    n = 20_000
    xb = x0.repeat(n, 1)
    valid = torch.ones_like(xb, dtype=torch.bool)
    with torch.no_grad():
        eval_nats = elbo_per_sequence(model, xb, None, valid, mc_samples=1, generator=gen(3), mask_id=MASK)
        se = eval_nats.std().item() / math.sqrt(n)
        assert abs(eval_nats.mean().item() - exact0) < 4 * se + 1e-9

        # Training estimator (t stratified over the batch, independent masking, 1/p weight).
        n = 200_000
        xb = x0.repeat(n, 1)
        valid = torch.ones_like(xb, dtype=torch.bool)
        draw = draw_noise(valid, gen(4), eps=eps)
        train_nats = per_sequence_nelbo(token_terms(model, xb, None, draw, valid, MASK), valid).double() * L
        se = train_nats.std().item() / math.sqrt(n)
        assert abs(train_nats.mean().item() - exact_eps) < 4 * se
        assert 4 * se < 0.01 * exact_eps  # sharp enough to catch a 1% bias


def test_eval_estimator_masks_exactly_l_valid_tokens_and_is_seeded():
    calls = []

    class Recorder(UniformModel):
        def forward(self, input_ids, segment_ids=None):
            calls.append(input_ids.clone())
            return super().forward(input_ids, segment_ids)

    x0 = torch.randint(2, 9, (6, 10))
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[:, 8:] = False
    a = elbo_per_sequence(Recorder(9), x0, None, valid, mc_samples=4, generator=gen(9), mask_id=MASK)
    assert len(calls) == 4
    for x_t in calls:
        n_masked = (x_t == MASK).sum(1)
        assert ((n_masked >= 1) & (n_masked <= 8)).all()
        assert not (x_t[:, 8:] == MASK).any()  # padding never masked
    b = elbo_per_sequence(Recorder(9), x0, None, valid, mc_samples=4, generator=gen(9), mask_id=MASK)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- sampler


class CountingModel(nn.Module):
    """Strongly prefers the mask token (which must still never be emitted); records inputs."""

    def __init__(self, vocab_size=12):
        super().__init__()
        self.vocab_size = vocab_size
        self.inputs = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, segment_ids=None):
        self.inputs.append(input_ids.clone())
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab_size)
        logits[..., MASK] = 100.0
        # Token 5 everywhere, more confident further right: commits should go right to left.
        logits[..., 5] = torch.arange(L, dtype=torch.float32)
        return logits


def test_transfer_schedule_is_even():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(transfer_schedule(7, 7)) == 7


def test_sampler_never_emits_mask_and_uses_exactly_steps_forward_passes():
    model = CountingModel()
    out = sample(model, batch=3, length=8, steps=4, mask_id=MASK, temperature=1.0, generator=gen())
    assert out.shape == (3, 8)
    assert not (out == MASK).any()
    assert len(model.inputs) == 4
    n_masked = [int((x == MASK).sum(1)[0]) for x in model.inputs]
    assert n_masked == [8, 6, 4, 2]  # two tokens committed per step


def test_sampler_commits_most_confident_positions_first():
    model = CountingModel()
    sample(model, batch=1, length=6, steps=6, mask_id=MASK, temperature=0.0)
    committed = [int((model.inputs[i] != MASK).sum()) for i in range(6)]
    assert committed == [0, 1, 2, 3, 4, 5]
    # Right-most (most confident) first: after step 1 only the last position is filled.
    assert (model.inputs[1][0] != MASK).tolist() == [False] * 5 + [True]


def test_sampler_blocks_are_semi_autoregressive():
    model = CountingModel()
    out = sample(model, batch=2, length=8, steps=4, mask_id=MASK, block_length=4, generator=gen(1))
    assert not (out == MASK).any() and len(model.inputs) == 4
    # Two steps per block: the second block stays fully masked until the first is complete.
    after_first_block = model.inputs[2]
    assert (after_first_block[:, :4] != MASK).all() and (after_first_block[:, 4:] == MASK).all()
    with pytest.raises(ValueError, match="multiple"):
        sample(model, batch=1, length=8, steps=4, mask_id=MASK, block_length=3)


def test_sampler_steps_capped_at_length_and_seeded():
    model = tiny_model(vocab_size=10)
    a = sample(model, batch=2, length=5, steps=50, mask_id=MASK, generator=gen(4))
    b = sample(model, batch=2, length=5, steps=50, mask_id=MASK, generator=gen(4))
    assert torch.equal(a, b) and not (a == MASK).any()


def test_sparse_head_path_gives_the_dense_terms_and_gradients():
    """token_terms asks MaskedDiffusionTransformer for the masked rows' logits only (output_mask);
    the terms and the gradients must be those of the full [B, L, V] logits."""
    from training.diffusion import token_terms_from_logits, token_terms_from_masked_logits

    model = tiny_model(vocab_size=11).train()
    x0 = torch.randint(2, 11, (5, 8))
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[4, 5:] = False
    draw = draw_noise(valid, gen(21))
    sparse = token_terms(model, x0, None, draw, valid, MASK)
    nelbo_loss(sparse, valid).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense = token_terms_from_logits(model(apply_mask(x0, draw.masked, MASK), None), x0, draw, MASK)
    nelbo_loss(dense, valid).backward()
    torch.testing.assert_close(sparse, dense)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    # The public masked-rows entry point never writes into the caller's tensor.
    logits = model(apply_mask(x0, draw.masked, MASK), None).detach()
    picked = logits[draw.masked]
    before = picked.clone()
    torch.testing.assert_close(token_terms_from_masked_logits(picked, x0, draw, MASK), dense.detach())
    assert torch.equal(picked, before)
