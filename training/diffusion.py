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

Masking strategies beyond independent tokens (whole words, geometric spans) and other
distributions of t (beta, truncated uniform) are available for experiments (``Masking``). Only
independent tokens with t ~ U(0,1) make the training loss the NELBO; every other combination
gives a heuristic objective, flagged by ``Masking.is_exact_nelbo``. Evaluation always uses the
exact estimator of the independent process, whatever the run trained with.

The model never predicts the mask token: its logit is set to -inf before every softmax (MDLM's
"zero masking probability" of the SUBS parameterisation). x0 never contains the mask token, so
this can only lower the loss, and the bound stays a bound. The consequence for the sanity check:
a model with uniform logits scores log(V - 1) nats/token, not log V.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-3
NEG_INF = float("-inf")


class MaskingStrategy(str, Enum):
    """How the tokens to mask are chosen given the mask probability p(t).

    Every strategy masks each valid token with marginal probability exactly p(t), so the
    expected masked fraction is the same; they differ in which tokens are masked together:

    * INDEPENDENT: each token on its own coin. The only one for which the training loss is an
      exact NELBO of the absorbing diffusion (the process the evaluation estimator scores);
    * WHOLE_WORD: one coin per word, all tokens of a word share it (word starts from the
      tokenizer, see ``word_start_table``);
    * SPAN: contiguous spans with geometric lengths of mean ``mean_span_length`` (a stationary
      two-state Markov chain along the row, see ``span_mask``).

    ``is_exact_nelbo`` here is the strategy's part of the condition; ``Masking.is_exact_nelbo``
    also requires t ~ U(0, 1).
    """

    INDEPENDENT = "independent"
    WHOLE_WORD = "whole_word"
    SPAN = "span"

    @property
    def is_exact_nelbo(self) -> bool:
        return self is MaskingStrategy.INDEPENDENT


class TimeDistribution(str, Enum):
    """The distribution of t (the mask ratio is p(t) = (1 - eps) t + eps).

    UNIFORM is the NELBO's. BETA(a, b) and TRUNCATED (uniform on [t_min, t_max]) move training
    effort between easy (low t) and hard (high t) reconstructions. Every distribution is drawn
    by stratifying u over the global batch and mapping it through the inverse CDF, so the
    low-discrepancy property of the uniform case carries over.
    """

    UNIFORM = "uniform"
    BETA = "beta"
    TRUNCATED = "truncated"


@dataclass(frozen=True, eq=False)
class Masking:
    """A masking process: the strategy, its span length, and the distribution of t.

    ``word_start`` [V] bool is required by WHOLE_WORD: True for the vocabulary ids that begin a
    word (``word_start_table``). The default instance is the exact MDLM/LLaDA process.
    """

    strategy: MaskingStrategy = MaskingStrategy.INDEPENDENT
    t_distribution: TimeDistribution = TimeDistribution.UNIFORM
    mean_span_length: float = 3.0
    beta_a: float = 1.0
    beta_b: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    word_start: torch.Tensor | None = field(default=None, repr=False)
    _word_start_by_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", MaskingStrategy(self.strategy))
        object.__setattr__(self, "t_distribution", TimeDistribution(self.t_distribution))
        if not self.mean_span_length >= 1:
            raise ValueError(f"mean_span_length must be >= 1 (spans have at least one token), got {self.mean_span_length}")
        if not (self.beta_a > 0 and self.beta_b > 0):
            raise ValueError(f"beta parameters must be > 0, got a={self.beta_a}, b={self.beta_b}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got [{self.t_min}, {self.t_max}]")
        if self.strategy is MaskingStrategy.WHOLE_WORD:
            if self.word_start is None:
                raise ValueError("whole_word masking needs the word_start table of the tokenizer (word_start_table)")
            if self.word_start.dtype != torch.bool or self.word_start.dim() != 1:
                raise ValueError("word_start must be a 1-D bool tensor indexed by token id")

    @classmethod
    def from_config(cls, cfg, word_start: torch.Tensor | None = None) -> "Masking":
        """From an ``infra.config.MaskingConfig`` (or anything with its attributes); None fields keep defaults."""
        values = {}
        for name in ("strategy", "t_distribution", "mean_span_length", "beta_a", "beta_b", "t_min", "t_max"):
            value = getattr(cfg, name, None)
            if value is not None:
                values[name] = value
        return cls(**values, word_start=word_start)

    @property
    def is_exact_nelbo(self) -> bool:
        """True only for independent tokens with t ~ U(0, 1): then E[loss] is the NELBO."""
        return self.strategy.is_exact_nelbo and self.t_distribution is TimeDistribution.UNIFORM

    def describe(self) -> str:
        """A short label for logs and MLflow tags, e.g. 'span(mean=3)/beta(2,5)'."""
        strategy = self.strategy.value
        if self.strategy is MaskingStrategy.SPAN:
            strategy += f"(mean={self.mean_span_length:g})"
        t = self.t_distribution.value
        if self.t_distribution is TimeDistribution.BETA:
            t += f"({self.beta_a:g},{self.beta_b:g})"
        elif self.t_distribution is TimeDistribution.TRUNCATED:
            t += f"[{self.t_min:g},{self.t_max:g}]"
        return f"{strategy}/{t}"

    def word_start_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._word_start_by_device:
            self._word_start_by_device[device] = self.word_start.to(device)
        return self._word_start_by_device[device]


def mask_prob(t: torch.Tensor | float, eps: float = DEFAULT_EPS):
    """p(t) = (1 - eps) t + eps: never exactly 0, so the 1/p(t) weight stays finite (<= 1/eps)."""
    return (1.0 - eps) * t + eps


# --------------------------------------------------------------------------- forward process


def stratified_uniforms(n_local: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """u [n_local] float64 for this rank: one sample per stratum [i/N, (i+1)/N) of the GLOBAL batch N.

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
    u = (torch.arange(n_global, dtype=torch.float64, device=u.device) + u) / n_global
    return u[rank * n_local:(rank + 1) * n_local]


def stratified_times(n_local: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """t ~ U(0, 1) [n_local] float32, stratified over the global batch (see ``stratified_uniforms``)."""
    return stratified_uniforms(n_local, generator, rank, world_size).float()


def times_from_uniforms(u: torch.Tensor, masking: Masking) -> torch.Tensor:
    """Map stratified uniforms u [n] to t [n] float32 through the inverse CDF of masking.t_distribution.

    The inverse CDF is monotone, so one u per stratum of U(0,1) is one t per quantile stratum of
    the target distribution: the stratification survives the change of distribution.
    """
    dist = masking.t_distribution
    if dist is TimeDistribution.UNIFORM:
        return u.float()
    if dist is TimeDistribution.TRUNCATED:
        return (masking.t_min + (masking.t_max - masking.t_min) * u).float()
    from scipy.special import betaincinv  # the regularized incomplete beta's inverse = Beta(a, b)'s quantile

    t = betaincinv(masking.beta_a, masking.beta_b, u.detach().cpu().numpy())
    return torch.from_numpy(np.asarray(t, dtype=np.float64)).to(u.device).float()


def sample_times(n_local: int, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                 masking: Masking | None = None) -> torch.Tensor:
    """t [n_local] float32 from masking.t_distribution (default U(0,1)), stratified over the global batch."""
    u = stratified_uniforms(n_local, generator, rank, world_size)
    return times_from_uniforms(u, masking or Masking())


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
    t_distribution: TimeDistribution = TimeDistribution.UNIFORM

    @property
    def p(self) -> torch.Tensor:
        """Per-sequence mask probability p(t) [B]."""
        return mask_prob(self.t, self.eps)

    @property
    def is_exact_nelbo(self) -> bool:
        """Whether the loss on this draw estimates the NELBO (independent tokens, t ~ U(0,1))."""
        return self.strategy.is_exact_nelbo and self.t_distribution is TimeDistribution.UNIFORM

    def to(self, device) -> "NoiseDraw":
        return NoiseDraw(self.t.to(device), self.masked.to(device), self.eps, self.strategy, self.t_distribution)


# ---- which tokens: one function per strategy. Each takes per-row p [B] and uniforms, and
# masks every position with marginal probability exactly p (validity is applied by the caller).


def independent_mask(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: position j masked iff u[:, j] < p (one coin per token)."""
    return u < p[:, None]


def word_starts(input_ids: torch.Tensor, segment_ids: torch.Tensor | None, word_start: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a new word begins.

    A word begins at a token the tokenizer marks (``word_start``), at the first position of a
    row, and at the first token of every packed document (a document's first token carries no
    leading space but is never the continuation of the previous document's last word).
    """
    starts = word_start[input_ids]
    starts[:, 0] = True
    if segment_ids is not None:
        starts[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def whole_word_mask(u: torch.Tensor, p: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: every token of a word takes the coin (uniform) of the word's first token.

    Each word is masked with probability p, so each token is too: the expected masked fraction
    is p(t) whatever the word lengths, and a word is never split.
    """
    L = u.shape[1]
    positions = torch.arange(L, device=u.device).expand_as(u)
    first_of_word = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return u.gather(1, first_of_word) < p[:, None]


def span_mask(u_state: torch.Tensor, u_length: torch.Tensor, p: torch.Tensor, mean_span_length: float) -> torch.Tensor:
    """[B, L] bool: alternating unmasked gaps and masked spans with geometric lengths.

    A two-state Markov chain along the row: a masked span ends with probability b = 1/m per
    token (so span lengths are Geometric with mean m = ``mean_span_length``), a gap ends with
    probability a = p b / (1 - p) (mean gap m (1 - p) / p). Its stationary masked probability
    is a / (a + b) = p, and the first state is drawn from it, so EVERY position is masked with
    probability exactly p (the expected masked fraction is p(t), as for independent masking).
    A gap cannot be shorter than one token: above p = m / (m + 1) the gaps are single tokens
    and spans lengthen to mean p / (1 - p) instead (b = (1 - p) / p), keeping the fraction p.

    Vectorised (no loop over positions): geometric memorylessness lets the chain be drawn as
    alternating segment lengths, length = 1 + floor(log(v) / log(1 - q)) for v ~ U(0, 1];
    L segments always cover L positions, and each position finds its segment by searchsorted.
    ``u_state`` [B] picks the first state, ``u_length`` [B, L] the segment lengths.
    """
    B, L = u_length.shape
    p = p.double().clamp(0.0, 1.0)
    b = torch.minimum(torch.full_like(p, 1.0 / mean_span_length), (1.0 - p) / p.clamp_min(1e-300))
    a = torch.where(p < 1.0, p * b / (1.0 - p).clamp_min(1e-300), torch.ones_like(p)).clamp(0.0, 1.0)
    first_masked = u_state.double() < p  # [B]
    k = torch.arange(L, device=u_length.device)
    segment_masked = first_masked[:, None] ^ (k % 2 == 1)[None, :]  # [B, L]: type of segment k
    q = torch.where(segment_masked, b[:, None], a[:, None]).clamp(1e-12, 1.0)  # end probability per token
    v = 1.0 - u_length.double()  # (0, 1]
    lengths = 1.0 + torch.floor(torch.log(v) / torch.log1p(-q).clamp(max=-1e-300))
    lengths = torch.nan_to_num(lengths, nan=1.0, posinf=float(L)).clamp(1.0, float(L)).long()
    ends = lengths.cumsum(dim=1)  # segment k covers positions [ends[k-1], ends[k])
    segment = torch.searchsorted(ends, k.expand(B, L).contiguous(), right=True)
    return first_masked[:, None] ^ (segment % 2 == 1)


def draw_noise(valid: torch.Tensor, generator: torch.Generator, eps: float = DEFAULT_EPS,
               rank: int = 0, world_size: int = 1,
               strategy: MaskingStrategy | str | None = None, *, masking: Masking | None = None,
               input_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> NoiseDraw:
    """Stratified t for the global batch, then mask valid tokens with probability p(t).

    ``masking`` chooses the strategy and the distribution of t (default: independent tokens,
    t ~ U(0,1), the exact NELBO; ``strategy`` alone is a shorthand for Masking(strategy)).
    WHOLE_WORD needs ``input_ids`` (x0) and uses ``segment_ids`` to start a word at every packed
    document. All uniforms are drawn for the whole global batch [B * world_size, ...] and
    sliced, so every rank's generator stays in lockstep (needed for the shared t) and a
    multi-rank draw equals the single-rank draw of the concatenated batch. The independent draw
    consumes the generator exactly as it always has (resumed runs stay bit-identical).
    """
    if masking is None:  # (whole_word raises here: it needs Masking(word_start=...))
        masking = Masking(strategy=MaskingStrategy(strategy or MaskingStrategy.INDEPENDENT))
    elif strategy is not None and MaskingStrategy(strategy) is not masking.strategy:
        raise ValueError(f"strategy={strategy!r} disagrees with masking.strategy={masking.strategy.value!r}")
    B, L = valid.shape
    rows = slice(rank * B, (rank + 1) * B)
    n_global = B * world_size
    gen_device = generator.device
    t = sample_times(B, generator, rank, world_size, masking).to(valid.device)
    p = mask_prob(t, eps)
    if masking.strategy is MaskingStrategy.SPAN:
        u_state = torch.rand(n_global, generator=generator, dtype=torch.float64, device=gen_device)[rows]
        u_length = torch.rand(n_global, L, generator=generator, dtype=torch.float64, device=gen_device)[rows]
        masked = span_mask(u_state.to(valid.device), u_length.to(valid.device), p, masking.mean_span_length)
    else:
        u = torch.rand(n_global, L, generator=generator, device=gen_device)[rows].to(valid.device)
        if masking.strategy is MaskingStrategy.WHOLE_WORD:
            if input_ids is None:
                raise ValueError("whole_word masking needs input_ids (x0) to find the words")
            starts = word_starts(input_ids, segment_ids, masking.word_start_on(input_ids.device))
            masked = whole_word_mask(u, p, starts.to(valid.device))
        else:
            masked = independent_mask(u, p)
    return NoiseDraw(t=t, masked=masked & valid, eps=eps, strategy=masking.strategy,
                     t_distribution=masking.t_distribution)


# --------------------------------------------------------------------------- word starts


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character ByteLevel uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def word_start_table(tokenizer_json: str, vocab_size: int | None = None) -> torch.Tensor:
    """[V] bool from a tokenizer.json: True for the token ids that begin a word.

    With the ByteLevel BPE of pipelines.tokenize a word starts at a token whose text begins with
    whitespace (the "Ġ" of a leading space, or a tab / carriage return) or contains a newline
    ("Ċ"), and at every special token; everything else continues the word before it. (A
    SentencePiece-style "▁" prefix counts as a leading space too.) Ids past the tokenizer's
    vocabulary (e.g. an appended mask token) count as word starts. Computed once per run.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    size = max(vocab_size or 0, max(vocab.values()) + 1)
    table = torch.ones(size, dtype=torch.bool)
    decoder = _byte_level_decoder()
    for token, token_id in vocab.items():
        if token in special or not token:
            continue
        raw = bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode()
        text = raw.decode("utf-8", errors="replace")
        table[token_id] = text[0].isspace() or "\n" in text or token.startswith("▁")
    return table


def apply_mask(x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: x0 with the masked positions replaced by the mask token."""
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


# --------------------------------------------------------------------------- training loss


def masked_cross_entropy(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """CE [...] of x0 [...] under logits [..., V], with the mask token excluded from the softmax."""
    logits = logits.float()
    V = logits.shape[-1]
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_INF)
    # Rows of V contiguous logits. (The [B, V, L] layout F.cross_entropy takes for sequences
    # makes the log-softmax a strided reduction: 3x slower on CPU for the same numbers.)
    return F.cross_entropy(logits.reshape(-1, V), x0.reshape(-1), reduction="none").view(x0.shape)


def token_terms_from_logits(logits: torch.Tensor, x0: torch.Tensor, draw: NoiseDraw, mask_id: int) -> torch.Tensor:
    """Per-token NELBO terms [B, L]: CE(x0) / p(t) at masked positions, 0 everywhere else.

    Only the masked rows go through the log-softmax over the vocabulary (on average half of
    them, E[p(t)] ~ 1/2); unmasked positions contribute exactly 0 and need no CE at all.
    """
    return _terms_from_rows(logits[draw.masked], x0, draw, mask_id, own=True)


def token_terms_from_masked_logits(picked: torch.Tensor, x0: torch.Tensor, draw: NoiseDraw, mask_id: int) -> torch.Tensor:
    """Per-token NELBO terms [B, L] from the logits of the masked positions only ([M, V], row-major order)."""
    return _terms_from_rows(picked, x0, draw, mask_id, own=False)


def _terms_from_rows(picked: torch.Tensor, x0: torch.Tensor, draw: NoiseDraw, mask_id: int, own: bool) -> torch.Tensor:
    """``own``: ``picked`` is a temporary of ours and may be written in place (saves a copy of [M, V])."""
    rows = draw.masked
    picked = picked.float()
    if own:
        # Safe for autograd: neither the row selection nor the vocabulary projection that
        # produced ``picked`` needs its output for the backward pass.
        picked[:, mask_id] = NEG_INF
    else:
        picked = picked.index_fill(-1, torch.tensor([mask_id], device=picked.device), NEG_INF)
    ce = F.cross_entropy(picked, x0[rows], reduction="none")
    weighted = ce / draw.p[:, None].expand_as(rows)[rows]
    return torch.zeros(rows.shape, dtype=weighted.dtype, device=weighted.device).masked_scatter(rows, weighted)


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
    if getattr(model, "supports_output_mask", False):  # MaskedDiffusionTransformer (also inside a DeepSpeed engine)
        return _terms_from_rows(model(x_t, segment_ids, output_mask=draw.masked), x0, draw, mask_id, own=True)
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
           device: torch.device | str | None = None, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Generate [batch, length] token ids by iterative unmasking (LLaDA low-confidence remasking).

    With a ``prompt`` ([P] or [batch, P] token ids) the result is [batch, P + length]: the prompt
    fixed at the start (never masked, never changed) and ``length`` generated tokens after it;
    blocks and steps then apply to the generated part only.

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

    n_prompt = 0 if prompt is None else prompt.shape[-1]
    was_training = model.training
    model.eval()
    x = torch.full((batch, n_prompt + length), mask_id, dtype=torch.long, device=device)
    if prompt is not None:
        if (prompt == mask_id).any():
            raise ValueError("the prompt contains the mask token")
        x[:, :n_prompt] = prompt.to(device).long().expand(batch, n_prompt)
    try:
        for b in range(n_blocks):
            start, end = n_prompt + b * block_length, n_prompt + (b + 1) * block_length
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
