"""The masked-diffusion (MDLM / LLaDA) objective: forward masking, NELBO, ELBO estimator, sampler.

DESIGN.md, "The science, stated once", is the spec. In one place:

* forward process: draw t ~ U(0,1) (stratified over the GLOBAL batch), mask every valid token
  independently with probability p(t) = (1 - eps) t + eps;
* training loss per sequence: (1 / p(t)) * sum over masked tokens of CE(x0), divided by the
  sequence's number of valid tokens L (not by the number of masked tokens). Its expectation is
  an upper bound on -log p(x0) / L;
* evaluation: the lower-variance estimator of the same bound: mask exactly l ~ U{1..L} tokens,
  weight the masked CE sum by L / l, average Monte Carlo samples;
* sampling: start fully masked, unmask a fixed number of tokens per step, keeping the most
  confident predictions (low-confidence remasking), optionally block by block.

The model never predicts the mask token: its logit is set to -inf before every softmax (MDLM's
"zero masking probability" of the SUBS parameterisation). x0 never contains the mask token, so
this can only lower the loss, and the bound stays a bound. The consequence for the sanity check:
a model with uniform logits scores log(V - 1) nats/token, not log V.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-3
NEG_INF = float("-inf")


class MaskingStrategy(str, Enum):
    """How the tokens to mask are chosen given the mask probability p(t).

    Only INDEPENDENT (each token on its own coin) makes the training loss an exact NELBO of the
    absorbing diffusion. Span or document-level strategies may be added, but the loss they give
    is then a heuristic objective, not a likelihood bound; ``is_exact_nelbo`` says which is which.
    """

    INDEPENDENT = "independent"

    @property
    def is_exact_nelbo(self) -> bool:
        return self is MaskingStrategy.INDEPENDENT


def mask_prob(t: torch.Tensor | float, eps: float = DEFAULT_EPS):
    """p(t) = (1 - eps) t + eps: never exactly 0, so the 1/p(t) weight stays finite (<= 1/eps)."""
    return (1.0 - eps) * t + eps


# --------------------------------------------------------------------------- forward process


def stratified_times(n_local: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """t [n_local] for this rank: one sample per stratum [i/N, (i+1)/N) of the GLOBAL batch N.

    Why global: the gradient that updates the weights is the average over all ranks. If every
    rank stratified its own micro-batch, the global batch would hold world_size samples in each
    of n_local strata (MDLM's per-device antithetic sampling) instead of one sample in each of N
    finer strata, which is a worse low-discrepancy design; and with equal seeds the ranks would
    even draw the very same times. So every rank draws the same N uniforms (the generator must be
    seeded identically on all ranks) and keeps its own contiguous slice. A consequence worth
    having: world_size ranks of n_local get exactly the times one rank of n_local * world_size gets.
    """
    n_global = n_local * world_size
    u = torch.rand(n_global, generator=generator, dtype=torch.float64,
                   device=generator.device)
    t = (torch.arange(n_global, dtype=torch.float64, device=u.device) + u) / n_global
    return t[rank * n_local:(rank + 1) * n_local].float()


@dataclass
class NoiseDraw:
    """One draw of the forward process for a batch: the time and the set of masked positions.

    Keeping it as a value lets two models be scored on the very same corruption (DoReMi's
    excess loss compares a proxy and a reference on the same mask and t).
    """

    t: torch.Tensor  # [B] float32 in (0, 1)
    masked: torch.Tensor  # [B, L] bool, only ever True at valid positions
    eps: float = DEFAULT_EPS
    strategy: MaskingStrategy = MaskingStrategy.INDEPENDENT

    @property
    def p(self) -> torch.Tensor:
        """Per-sequence mask probability p(t) [B]."""
        return mask_prob(self.t, self.eps)

    def to(self, device) -> "NoiseDraw":
        return NoiseDraw(self.t.to(device), self.masked.to(device), self.eps, self.strategy)


def draw_noise(valid: torch.Tensor, generator: torch.Generator, eps: float = DEFAULT_EPS,
               rank: int = 0, world_size: int = 1,
               strategy: MaskingStrategy | str = MaskingStrategy.INDEPENDENT) -> NoiseDraw:
    """Stratified t for the global batch, then mask each valid token independently with p(t).

    The per-token uniforms are also drawn for the whole global batch [B * world_size, L] and
    sliced, so every rank's generator stays in lockstep (needed for the shared t above) and a
    multi-rank draw equals the single-rank draw of the concatenated batch.
    """
    strategy = MaskingStrategy(strategy)
    if strategy is not MaskingStrategy.INDEPENDENT:
        raise NotImplementedError(f"masking strategy {strategy.value!r} is not implemented")
    B, L = valid.shape
    t = stratified_times(B, generator, rank, world_size)
    u = torch.rand(B * world_size, L, generator=generator, device=generator.device)[rank * B:(rank + 1) * B]
    t, u = t.to(valid.device), u.to(valid.device)
    masked = (u < mask_prob(t, eps)[:, None]) & valid
    return NoiseDraw(t=t, masked=masked, eps=eps, strategy=strategy)


def apply_mask(x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: x0 with the masked positions replaced by the mask token."""
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


# --------------------------------------------------------------------------- training loss


def masked_cross_entropy(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """CE [B, L] of x0 under logits [B, L, V], with the mask token excluded from the softmax."""
    logits = logits.float()
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_INF)
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")


def token_terms_from_logits(logits: torch.Tensor, x0: torch.Tensor, draw: NoiseDraw, mask_id: int) -> torch.Tensor:
    """Per-token NELBO terms [B, L]: CE(x0) / p(t) at masked positions, 0 everywhere else."""
    ce = masked_cross_entropy(logits, x0, mask_id)
    return torch.where(draw.masked, ce / draw.p[:, None], torch.zeros_like(ce))


def token_terms(model: Callable, x0: torch.Tensor, segment_ids: torch.Tensor | None, draw: NoiseDraw,
                valid: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Score ``model`` on the corruption ``draw`` of x0: per-token NELBO terms [B, L] (0 off the mask).

    This is the per-token API mixing needs: call it with two models and the same draw to get
    their losses on identical masks and times. Summing a row and dividing by its valid count
    gives that sequence's NELBO (see ``per_sequence_nelbo``).
    """
    if (draw.masked & ~valid).any():
        raise ValueError("the noise draw masks positions that are not valid (padding)")
    x_t = apply_mask(x0, draw.masked, mask_id)
    logits = model(x_t, segment_ids)
    return token_terms_from_logits(logits, x0, draw, mask_id)


def per_sequence_nelbo(terms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B]: sum of a sequence's terms divided by its number of valid tokens (nats per token)."""
    return terms.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def nelbo_loss(terms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scalar training loss: per-sequence NELBO per token, averaged over sequences with tokens.

    Dividing by L (valid tokens) and not by the number of masked tokens is what makes this an
    unbiased estimate of the bound: with p(t) small the few masked tokens are weighted up by
    1/p(t) instead of being averaged, and sequences count equally.
    """
    per_seq = per_sequence_nelbo(terms, valid)
    has_tokens = valid.any(dim=1)
    return per_seq[has_tokens].sum() / has_tokens.sum().clamp(min=1)


def t_bucket_edges(n_buckets: int = 5) -> list[float]:
    return [i / n_buckets for i in range(n_buckets + 1)]


def loss_by_t_bucket(per_seq_loss: torch.Tensor, t: torch.Tensor, n_buckets: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-sequence loss, count) per t bucket [n_buckets] for diagnostics.

    Sums and counts, not means, so that buckets can be accumulated over steps and ranks. The
    1/p(t) weight makes low-t buckets noisy but small on average; a model that stops learning
    shows up as a flat high-t bucket (those are the hard, mostly-masked reconstructions).
    """
    index = (t.detach().float() * n_buckets).long().clamp(0, n_buckets - 1)
    sums = torch.zeros(n_buckets, dtype=torch.float64, device=t.device)
    counts = torch.zeros(n_buckets, dtype=torch.float64, device=t.device)
    sums.index_add_(0, index, per_seq_loss.detach().double())
    counts.index_add_(0, index, torch.ones_like(per_seq_loss, dtype=torch.float64))
    return sums, counts


# --------------------------------------------------------------------------- evaluation estimator


@torch.no_grad()
def elbo_per_sequence(model: Callable, x0: torch.Tensor, segment_ids: torch.Tensor | None, valid: torch.Tensor,
                      mc_samples: int, generator: torch.Generator, mask_id: int) -> torch.Tensor:
    """Upper bound on -log p(x0) per sequence [B] (float64 nats, total over the sequence).

    For each of ``mc_samples`` samples: per sequence draw l in {1..L} (L = valid tokens), mask
    exactly l valid tokens uniformly at random, and score (L / l) * sum of CE over the masked
    tokens. Its expectation equals the continuous-time NELBO with eps = 0 (RADD; LLaDA eq. 6),
    with lower variance than drawing t, because the number of masked tokens is fixed.

    l is stratified across the samples (sample k draws from the k-th of mc_samples equal slices
    of U(0,1), as LLaDA's get_log_likelihood does): the average over samples is still unbiased
    (a uniformly chosen slice gives exactly U{1..L}), with less spread. nats/token = result / L.
    """
    B, L = x0.shape
    n_valid = valid.sum(dim=1)
    gen_device = generator.device
    total = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for k in range(mc_samples):
        u = torch.rand(B, generator=generator, dtype=torch.float64, device=gen_device).to(x0.device)
        fraction = (k + u) / mc_samples  # stratum k of U(0,1)
        # l = 1 + floor(fraction * L) is U{1..L}; the clamps guard float rounding and empty rows.
        n_mask = ((fraction * n_valid).floor().long() + 1).clamp(min=1).minimum(n_valid.clamp(min=1))
        # A uniform random subset of exactly n_mask valid positions: rank random keys, padding last.
        keys = torch.rand(B, L, generator=generator, device=gen_device).to(x0.device)
        keys = keys.masked_fill(~valid, 2.0)
        rank = keys.argsort(dim=1).argsort(dim=1)
        masked = (rank < n_mask[:, None]) & valid
        x_t = apply_mask(x0, masked, mask_id)
        ce = masked_cross_entropy(model(x_t, segment_ids), x0, mask_id).double()
        masked_sum = torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=1)
        total += torch.where(n_valid > 0, masked_sum * n_valid / n_mask, torch.zeros_like(masked_sum))
    return total / mc_samples


# --------------------------------------------------------------------------- sampler


def transfer_schedule(n_tokens: int, steps: int) -> list[int]:
    """How many tokens to unmask at each of ``steps`` steps: as even as possible, summing to n_tokens."""
    base, extra = divmod(n_tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@torch.no_grad()
def sample(model: torch.nn.Module, batch: int, length: int, steps: int, mask_id: int, temperature: float = 1.0,
           block_length: int | None = None, generator: torch.Generator | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Generate [batch, length] token ids by iterative unmasking (LLaDA low-confidence remasking).

    Start from all-mask. Each step predicts every masked position (a sample at ``temperature``,
    argmax at 0), then commits only the predictions the model is most confident about (the
    model's probability of the proposed token) and leaves the rest masked. Steps are split
    evenly between blocks of ``block_length`` tokens, generated left to right (semi-
    autoregressive; None = one block); within a block the number committed per step is spread
    evenly. steps is capped at ``length`` (a step must commit at least one token), so the
    model is called exactly min(steps, length) times (at least one step per block).

    Probabilities and Gumbel noise are float64: in low precision the Gumbel-max trick is biased
    towards the top tokens (LLaDA's generate.py notes the same). The mask token's logit is -inf,
    so it is never proposed, and every position is committed by the end.
    """
    block_length = block_length or length
    if length % block_length:
        raise ValueError(f"length ({length}) must be a multiple of block_length ({block_length})")
    n_blocks = length // block_length
    steps = max(min(steps, length), n_blocks)
    steps_per_block = transfer_schedule(steps, n_blocks)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen_device = generator.device if generator is not None else torch.device("cpu")

    was_training = model.training
    model.eval()
    x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    try:
        for b in range(n_blocks):
            start, end = b * block_length, (b + 1) * block_length
            for n_commit in transfer_schedule(block_length, steps_per_block[b]):
                logits = model(x, None).double()
                logits[..., mask_id] = NEG_INF
                if temperature > 0:
                    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=gen_device)
                    gumbel = -torch.log(-torch.log(u.to(device).clamp_min(1e-300)))
                    proposal = (logits / temperature + gumbel).argmax(dim=-1)
                else:
                    proposal = logits.argmax(dim=-1)
                confidence = logits.softmax(dim=-1).gather(-1, proposal[..., None]).squeeze(-1)
                # Only still-masked positions of the current block are candidates.
                candidate = x == mask_id
                candidate[:, :start] = False
                candidate[:, end:] = False
                confidence = confidence.masked_fill(~candidate, -1.0)
                chosen = confidence.topk(n_commit, dim=1).indices
                x.scatter_(1, chosen, proposal.gather(1, chosen))
    finally:
        model.train(was_training)
    return x
