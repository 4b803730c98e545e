"""Mixtures for the small proxy runs of a data-mixing-law study.

* ``double_diminishing``: as in Ye et al. (data mixing laws): for each domain the candidate
  proportions halve from that domain's maximum (its cap, 1 by default):
  {0, max/2^levels, …, max/4, max/2, max}; candidate combinations are renormalized to the
  simplex, the ones breaking caps/minimums are dropped, duplicates removed, and ``n`` are drawn
  with the seed.
* ``dirichlet``: Dirichlet(concentration · M · base) around a base mixture (uniform by default;
  concentration 1 with a uniform base is the flat Dirichlet); rows over a cap are rejected and
  re-drawn, and the few left after many rounds are projected onto the capped simplex.

Every returned row lies on the simplex and respects ``lo ≤ r ≤ caps``.
"""

from __future__ import annotations

import itertools

import numpy as np

_ENUMERATE_LIMIT = 200_000


def _bounds(m: int, caps, min_props) -> tuple[np.ndarray, np.ndarray]:
    hi = np.ones(m) if caps is None else np.asarray(caps, dtype=float).reshape(-1)
    lo = np.zeros(m) if min_props is None else np.asarray(min_props, dtype=float).reshape(-1)
    if hi.shape != (m,) or lo.shape != (m,):
        raise ValueError(f"caps and min proportions must have {m} entries")
    if not (np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))):
        raise ValueError("caps/min proportions contain NaN or inf")
    if np.any(lo < 0) or np.any(hi > 1 + 1e-12) or np.any(lo > hi):
        raise ValueError("need 0 <= min proportion <= cap <= 1 for every domain")
    if lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9:
        raise ValueError(f"infeasible: sum(min)={lo.sum():.4f} must be <= 1 <= sum(caps)={hi.sum():.4f}")
    return lo, np.minimum(hi, 1.0)


def project_capped_simplex(v, lo=None, hi=None, iters: int = 100) -> np.ndarray:
    """Euclidean projection of v (…×M) onto {lo ≤ r ≤ hi, Σr = 1} (bisection on the shift)."""
    v = np.asarray(v, dtype=float)
    m = v.shape[-1]
    lo, hi = _bounds(m, hi, lo)
    flat = v.reshape(-1, m)
    out = np.empty_like(flat)
    for n, row in enumerate(flat):
        a, b = np.min(row - hi) - 1.0, np.max(row - lo) + 1.0   # sum(clip(row-a)) >= 1 >= sum(clip(row-b))
        for _ in range(iters):
            mid = 0.5 * (a + b)
            if np.clip(row - mid, lo, hi).sum() > 1.0:
                a = mid
            else:
                b = mid
        r = np.clip(row - 0.5 * (a + b), lo, hi)
        # put the tiny remaining mass on coordinates with slack so Σr = 1 to machine precision
        gap = 1.0 - r.sum()
        slack = (hi - r) if gap > 0 else (r - lo)
        if slack.sum() > 0:
            r = r + gap * slack / slack.sum()
        out[n] = np.clip(r, lo, hi)
    return out.reshape(v.shape)


def kl_project_capped(alpha, caps) -> np.ndarray:
    """KL projection of a positive distribution ``alpha`` onto {Σr = 1, 0 ≤ r ≤ caps}.

    argmin_r KL(r ‖ α) under those constraints is r_i = min(cap_i, λ·α_i) with λ ≥ 1 chosen so
    Σr = 1: capped domains sit at their cap and the mass they give up is shared in PROPORTION to
    α (a rescale), not equally (a shift, as the Euclidean projection does). That is the geometry
    of multiplicative-weights updates (DoReMi's exponentiated gradient), and it keeps a domain the
    weights had all but dropped near zero instead of lifting it by the shared excess.
    Exact: at most len(alpha) rounds of "cap the violators, rescale the rest".
    """
    a = np.asarray(alpha, dtype=float).reshape(-1)
    hi = np.minimum(np.asarray(caps, dtype=float).reshape(-1), 1.0)
    if a.shape != hi.shape or np.any(~np.isfinite(a)) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError("alpha must be non-negative, finite, with a positive sum, one entry per cap")
    if np.any(hi < 0) or hi.sum() < 1 - 1e-12:
        raise ValueError(f"infeasible caps: sum(caps)={hi.sum():.4f} < 1")
    capped = np.zeros(a.shape, dtype=bool)
    for _ in range(a.size):
        free = ~capped
        r = np.where(capped, hi, 0.0)
        mass, base = 1.0 - r.sum(), a[free].sum()
        if base <= 0:  # every domain with weight is capped: fill the rest up to their caps evenly
            return project_capped_simplex(r, hi=hi)
        r[free] = a[free] * mass / base
        over = free & (r > hi)
        if not over.any():
            return r
        capped |= over
    return np.where(capped, hi, r)


def _feasible(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    return np.all((x <= hi + tol) & (x >= lo - tol), axis=1)


def double_diminishing(n_domains: int, n: int, caps=None, min_props=None, levels: int = 4,
                       seed: int = 0, decimals: int = 10, include_vertices: bool = False) -> np.ndarray:
    """``n`` mixtures (n × M) from double-diminishing candidate proportions.

    ``include_vertices``: the feasible pure mixtures (one domain at 1: those the caps and minimums
    allow) are always among the ``n``, the rest drawn as usual. A simplex design needs its
    vertices (Scheffé's lattice and centroid designs have them): the exponential law puts a single
    target's optimum on a vertex, and without runs there the fit extrapolates to it — on the
    known-optimum benchmark the loss drops sharply only AT the best vertex (a model trained on one
    domain does not pay to tell domains apart), which interior runs cannot reveal.
    If fewer than ``n`` distinct feasible combinations exist, all of them are returned."""
    m = int(n_domains)
    if m < 1 or n < 1 or levels < 0:
        raise ValueError("need n_domains >= 1, n >= 1, levels >= 0")
    lo, hi = _bounds(m, caps, min_props)
    cands = [np.unique(np.r_[0.0, hi[j] * 0.5 ** np.arange(levels + 1)]) for j in range(m)]
    rng = np.random.default_rng(seed)
    total = int(np.prod([len(c) for c in cands], dtype=float))
    if total <= _ENUMERATE_LIMIT:
        grid = np.array(list(itertools.product(*cands)), dtype=float)
    else:  # too many to enumerate: draw combinations at random
        idx = np.stack([rng.integers(0, len(c), size=_ENUMERATE_LIMIT) for c in cands], axis=1)
        grid = np.stack([cands[j][idx[:, j]] for j in range(m)], axis=1)
    s = grid.sum(axis=1)
    grid = grid[s > 0] / s[s > 0, None]
    grid = grid[_feasible(grid, lo, hi)]
    if len(grid) == 0:
        raise ValueError("no double-diminishing combination satisfies the caps/minimums")
    grid = np.unique(np.round(grid, decimals), axis=0)
    grid = grid / grid.sum(axis=1, keepdims=True)
    grid = grid[_feasible(grid, lo, hi, tol=1e-9)]
    forced = np.zeros(len(grid), dtype=bool)
    if include_vertices:
        forced = np.isclose(grid.max(axis=1), 1.0, rtol=0, atol=1e-12)
        forced &= np.cumsum(forced) <= n  # never more than n
    rest = np.flatnonzero(~forced)
    pick = np.r_[np.flatnonzero(forced), rng.permutation(rest)[: max(0, min(n, len(grid)) - forced.sum())]]
    return grid[np.sort(pick)]


def dirichlet(n_domains: int, n: int, base=None, concentration: float = 1.0, caps=None,
              min_props=None, seed: int = 0, max_rounds: int = 50) -> np.ndarray:
    """``n`` Dirichlet mixtures around ``base`` (α = concentration · M · base) within caps."""
    m = int(n_domains)
    if m < 1 or n < 1:
        raise ValueError("need n_domains >= 1 and n >= 1")
    if not np.isfinite(concentration) or concentration <= 0:
        raise ValueError("concentration must be > 0")
    lo, hi = _bounds(m, caps, min_props)
    b = np.full(m, 1.0 / m) if base is None else np.asarray(base, dtype=float).reshape(-1)
    if b.shape != (m,) or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError(f"base must have {m} positive entries")
    alpha = concentration * m * b / b.sum()
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(max_rounds):
        x = rng.dirichlet(alpha, size=max(2 * (n - have), 16))
        x = x[_feasible(x, lo, hi)]
        kept.append(x)
        have += len(x)
        if have >= n:
            break
    out = np.concatenate(kept)[:n] if kept else np.empty((0, m))
    if len(out) < n:  # caps too tight for rejection: project the rest
        extra = project_capped_simplex(rng.dirichlet(alpha, size=n - len(out)), lo, hi)
        out = np.concatenate([out, extra])
    return project_capped_simplex(out, lo, hi)


def sample_mixtures(method: str, n_domains: int, n: int, *, caps=None, min_props=None,
                    seed: int = 0, concentration: float = 1.0, base=None, levels: int = 4,
                    include_vertices: bool = False) -> np.ndarray:
    if method == "double_diminishing":
        return double_diminishing(n_domains, n, caps=caps, min_props=min_props, levels=levels, seed=seed,
                                  include_vertices=include_vertices)
    if method == "dirichlet":
        return dirichlet(n_domains, n, base=base, concentration=concentration, caps=caps,
                         min_props=min_props, seed=seed)
    raise ValueError(f"unknown sampling method {method!r} (double_diminishing | dirichlet)")
