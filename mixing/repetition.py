"""Repetition awareness for mixtures under a token budget.

Given unique tokens per domain U_i, a training token budget D and a mixture r:

* epochs_i = r_i · D / U_i   (how many passes over domain i the mixture implies)
* effective tokens (Muennighoff et al. 2023, data-constrained scaling law)
      D'_i = U_i + U_i · R* · (1 − exp(−R_i / R*)),   R_i = epochs_i − 1 repeated passes
  for epochs_i ≥ 1, and D'_i = r_i·D (no repetition) below one epoch; D' saturates at U·(1 + R*).
* caps for the optimizer: max proportion_i = min(1, max_epochs · U_i / D).

R* default: 15.4 (the published autoregressive fit R*_D = 15.387756). Masked-diffusion models
tolerate far more repetition (Prabhudesai et al. 2025 report R*_D ≈ 500), so R* is configurable;
refit it for your own objective before trusting absolute D' values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

R_STAR_AR = 15.387756
DEFAULT_R_STAR = 15.4


def _vec(x, name: str, positive: bool = False) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x, dtype=float))
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if positive and np.any(a <= 0):
        raise ValueError(f"{name} must be > 0")
    if np.any(a < 0):
        raise ValueError(f"{name} must be >= 0")
    return a


def epochs(mixture, unique_tokens, budget: float) -> np.ndarray:
    """epochs_i = r_i · D / U_i."""
    r = _vec(mixture, "mixture")
    u = _vec(unique_tokens, "unique_tokens", positive=True)
    if r.shape != u.shape:
        raise ValueError(f"mixture has {r.size} domains, unique_tokens {u.size}")
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError("budget must be > 0")
    return r * float(budget) / u


def effective_tokens(unique_tokens, n_epochs, r_star: float = DEFAULT_R_STAR) -> np.ndarray:
    """D' = U + U·R*·(1 − e^(−R/R*)) with R = epochs − 1; D' = epochs·U below one epoch."""
    u = _vec(unique_tokens, "unique_tokens", positive=True)
    e = _vec(n_epochs, "epochs")
    if r_star <= 0:
        raise ValueError("r_star must be > 0")
    rep = np.maximum(e - 1.0, 0.0)
    repeated = u + u * r_star * (1.0 - np.exp(-rep / r_star))
    return np.where(e <= 1.0, e * u, repeated)


def max_proportions(unique_tokens, budget: float, max_epochs: float) -> np.ndarray:
    """Per-domain caps min(1, max_epochs·U_i/D) so that no domain exceeds max_epochs."""
    u = _vec(unique_tokens, "unique_tokens", positive=True)
    if budget <= 0 or max_epochs <= 0:
        raise ValueError("budget and max_epochs must be > 0")
    caps = np.minimum(1.0, max_epochs * u / float(budget))
    if caps.sum() < 1.0 - 1e-12:
        raise ValueError(
            f"budget {budget:g} needs more than {max_epochs:g} epochs of all data combined "
            f"(sum of caps {caps.sum():.4f} < 1); raise max_epochs or lower the budget")
    return caps


@dataclass
class RepetitionReport:
    domains: list[str]
    mixture: np.ndarray
    tokens: np.ndarray          # r_i · D
    epochs: np.ndarray
    effective_tokens: np.ndarray
    efficiency: np.ndarray      # D'_i / tokens_i (1 when nothing repeats)
    max_epochs: float | None
    exceeds_cap: np.ndarray     # bool per domain
    r_star: float
    caps: np.ndarray | None = field(default=None)

    @property
    def any_exceeded(self) -> bool:
        return bool(np.any(self.exceeds_cap))

    def to_dict(self) -> dict:
        return {
            "r_star": self.r_star,
            "max_epochs": self.max_epochs,
            "domains": {
                d: {
                    "proportion": float(self.mixture[i]),
                    "tokens": float(self.tokens[i]),
                    "epochs": float(self.epochs[i]),
                    "effective_tokens": float(self.effective_tokens[i]),
                    "efficiency": float(self.efficiency[i]),
                    "exceeds_cap": bool(self.exceeds_cap[i]),
                    **({"cap": float(self.caps[i])} if self.caps is not None else {}),
                }
                for i, d in enumerate(self.domains)
            },
        }


def repetition_report(mixture, unique_tokens, budget: float, max_epochs: float | None = None,
                      r_star: float = DEFAULT_R_STAR,
                      domains: Sequence[str] | None = None) -> RepetitionReport:
    """Per-domain epochs, effective tokens and whether the epoch cap is exceeded."""
    r = _vec(mixture, "mixture")
    u = _vec(unique_tokens, "unique_tokens", positive=True)
    ep = epochs(r, u, budget)
    eff = effective_tokens(u, ep, r_star)
    tok = r * float(budget)
    with np.errstate(divide="ignore", invalid="ignore"):
        efficiency = np.where(tok > 0, eff / np.where(tok > 0, tok, 1.0), 1.0)
    names = list(domains) if domains is not None else [f"d{i}" for i in range(r.size)]
    if len(names) != r.size:
        raise ValueError("domains and mixture lengths differ")
    if max_epochs is None:
        exceeds = np.zeros(r.size, dtype=bool)
        caps = None
    else:
        exceeds = ep > max_epochs * (1 + 1e-9)
        caps = np.minimum(1.0, max_epochs * u / float(budget))
    return RepetitionReport(names, r, tok, ep, eff, efficiency, max_epochs, exceeds, float(r_star), caps)
