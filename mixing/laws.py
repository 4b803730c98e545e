"""Data mixing laws (Ye et al., ICLR 2025) with nested step and model-size laws.

Per validation domain i (K of them) over M training-domain proportions r (a row of the simplex):

    L_i(r) = c_i + k_i · exp(Σ_j t_ij r_j),        overall L(r) = Σ_i s_i L_i(r)

Gauge: on the simplex Σ_j r_j = 1, so adding a to every t_ij and dividing k_i by e^a leaves
L_i unchanged — (k_i, t_i·) are only identifiable up to that shift. Fitted parameters are
reported in the *centered gauge* Σ_j t_ij = 0; use :func:`canonical` to put any (k, t) into it
before comparing.

Fitting: scipy ``least_squares`` (Huber loss by default, ``f_scale = huber_delta``) on
(log c_i, log k_i, centered t_i) — c, k > 0 — from deterministic log-linear initialisations plus
random restarts, keeping the lowest robust cost. Held-out error comes from a fit on the
training split; the final parameters are refit on all runs.

Nested laws: ``StepLaw`` L(S) = E + B/S^β per run, ``SizeLaw`` L(N) = E + A/N^α across proxy
sizes, fitted in log space (residual log L̂ − log L, Huber) with E, B, β > 0 via logs;
``nested_prediction`` chains step → size → mixing law → optimum. All inputs are plain arrays,
so studies run elsewhere can be used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, minimize

from mixing.sampling import project_capped_simplex

SIMPLEX_TOL = 1e-6


# --------------------------------------------------------------------------- validation


def _check_mixtures(mixtures, m: int | None = None) -> np.ndarray:
    x = np.asarray(mixtures, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"mixtures must be an (n × M) array, got shape {np.shape(mixtures)}")
    if m is not None and x.shape[1] != m:
        raise ValueError(f"mixtures have {x.shape[1]} domains, the law was fitted on {m}")
    if not np.all(np.isfinite(x)):
        raise ValueError("mixtures contain NaN or inf")
    if np.any(x < 0):
        raise ValueError("mixtures contain negative proportions")
    bad = np.abs(x.sum(axis=1) - 1.0) > SIMPLEX_TOL
    if np.any(bad):
        raise ValueError(f"mixture rows {np.flatnonzero(bad)[:5].tolist()} do not sum to 1")
    return x


def _check_losses(losses, n: int, allow_nan: bool = False) -> np.ndarray:
    y = np.asarray(losses, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"losses must be (n,) or (n × K) with n = {n}, got shape {np.shape(losses)}")
    if not allow_nan and not np.all(np.isfinite(y)):
        raise ValueError("losses contain NaN or inf")
    if np.any(y[np.isfinite(y)] <= 0):
        raise ValueError("losses must be > 0")
    return y


def canonical(k, t) -> tuple[np.ndarray, np.ndarray]:
    """(k, t) in the centered gauge Σ_j t_ij = 0 (same law on the simplex)."""
    k = np.asarray(k, dtype=float)
    t = np.atleast_2d(np.asarray(t, dtype=float))
    mu = t.mean(axis=1)
    return k * np.exp(mu), t - mu[:, None]


def law_value(mixtures, c, k, t) -> np.ndarray:
    """L_i(r) = c_i + k_i exp(t_i · r) for every row: (n × K)."""
    x = np.atleast_2d(np.asarray(mixtures, dtype=float))
    t = np.atleast_2d(np.asarray(t, dtype=float))
    return np.asarray(c, dtype=float)[None, :] + np.asarray(k, dtype=float)[None, :] * np.exp(x @ t.T)


def _errors(pred: np.ndarray, y: np.ndarray) -> dict:
    e = pred - y
    return {
        "mae": float(np.mean(np.abs(e))),
        "rmse": float(np.sqrt(np.mean(e ** 2))),
        "rel_mae": float(np.mean(np.abs(e) / np.abs(y))),
        "max_abs": float(np.max(np.abs(e))),
        "per_domain_mae": np.mean(np.abs(e), axis=0).tolist(),
        "n": int(y.shape[0]),
    }


# --------------------------------------------------------------------------- mixing law


@dataclass
class FitReport:
    in_sample: dict
    held_out: dict | None
    n_train: int
    n_holdout: int
    cost: list[float]          # best robust cost per validation domain (final fit)
    restarts: int


@dataclass
class OptimizeResult:
    weights: np.ndarray                 # (M,) on the simplex, within [min, caps]
    predicted_losses: np.ndarray        # (K,) per validation domain at weights
    predicted_overall: float            # Σ s_i L_i(weights)
    target_weights: np.ndarray
    caps: np.ndarray
    min_props: np.ndarray
    success: bool
    domains: list[str] | None = None

    def weights_dict(self) -> dict[str, float]:
        names = self.domains or [f"d{j}" for j in range(len(self.weights))]
        return {d: float(w) for d, w in zip(names, self.weights)}


@dataclass
class BootstrapResult:
    optimum: OptimizeResult
    level: float
    loss_samples: np.ndarray     # (B × K) per-domain losses at optimum.weights under each refit
    overall_samples: np.ndarray  # (B,)
    weight_samples: np.ndarray   # (B × M) optimum of each refit
    loss_interval: np.ndarray    # (K × 2)
    overall_interval: np.ndarray  # (2,)
    weight_interval: np.ndarray  # (M × 2)
    n_failed: int = 0


class MixingLaw:
    """L_i(r) = c_i + k_i·exp(Σ_j t_ij r_j) per validation domain; see the module docstring."""

    def __init__(self, domains: list[str] | None = None, val_domains: list[str] | None = None):
        self.domains = list(domains) if domains is not None else None
        self.val_domains = list(val_domains) if val_domains is not None else None
        self.c: np.ndarray | None = None
        self.k: np.ndarray | None = None
        self.t: np.ndarray | None = None
        self.report: FitReport | None = None

    # ----- parameters
    @classmethod
    def from_params(cls, c, k, t, **kw) -> "MixingLaw":
        law = cls(**kw)
        t = np.atleast_2d(np.asarray(t, dtype=float))
        law.k, law.t = canonical(np.atleast_1d(np.asarray(k, dtype=float)), t)
        law.c = np.atleast_1d(np.asarray(c, dtype=float)).copy()
        if not (law.c.shape == law.k.shape == (t.shape[0],)):
            raise ValueError("c and k need one entry per row of t")
        return law

    @property
    def n_domains(self) -> int:
        self._need_fit()
        return self.t.shape[1]

    @property
    def n_val(self) -> int:
        self._need_fit()
        return self.t.shape[0]

    def _need_fit(self):
        if self.t is None:
            raise RuntimeError("MixingLaw is not fitted")

    # ----- fitting one validation domain
    @staticmethod
    def _fit_one(z: np.ndarray, y: np.ndarray, restarts: int, loss: str, delta: float,
                 rng: np.random.Generator, warm: np.ndarray | None = None):
        n, p = z.shape  # z = centered-gauge design: r_j − r_M for j < M
        ymin, yrange = float(y.min()), float(np.ptp(y))

        def unpack(th):
            return th[0], th[1], th[2:]

        def resid(th):
            a, b, u = unpack(th)
            return np.exp(min(a, 50.0)) + np.exp(np.clip(b + z @ u, -50, 50)) - y

        def jac(th):
            a, b, u = unpack(th)
            e = np.exp(np.clip(b + z @ u, -50, 50))
            return np.column_stack([np.full(n, np.exp(min(a, 50.0))), e, e[:, None] * z])

        inits = []
        if warm is not None:
            inits.append(warm)
        for frac in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99):  # log-linear fits of log(y − c0)
            c0 = frac * ymin
            A = np.column_stack([np.ones(n), z])
            coef, *_ = np.linalg.lstsq(A, np.log(np.maximum(y - c0, 1e-12)), rcond=None)
            inits.append(np.r_[np.log(max(c0, 1e-6 * max(ymin, 1e-12))), coef])
        for _ in range(restarts):
            c0 = rng.uniform(0.0, 0.99) * ymin
            inits.append(np.r_[np.log(max(c0, 1e-6 * ymin)), np.log(max(yrange, 1e-3) * rng.uniform(0.2, 5)),
                               rng.normal(0.0, 2.0, size=p)])
        best = None
        for th0 in inits:
            try:
                sol = least_squares(resid, th0, jac=jac, loss=loss, f_scale=delta, method="trf",
                                    x_scale="jac", max_nfev=400 * (p + 2))
            except (ValueError, FloatingPointError):
                continue
            if not np.all(np.isfinite(sol.x)):
                continue
            if best is None or sol.cost < best.cost:
                best = sol
        if best is None:
            raise RuntimeError("mixing-law fit failed from every start")
        return best.x, float(best.cost)

    @staticmethod
    def _design(x: np.ndarray) -> np.ndarray:
        return x[:, :-1] - x[:, -1:]

    @staticmethod
    def _theta_to_params(th: np.ndarray) -> tuple[float, float, np.ndarray]:
        u = th[2:]
        return float(np.exp(th[0])), float(np.exp(th[1])), np.r_[u, -u.sum()]

    def _fit_all(self, x, y, restarts, loss, delta, rng, warm=None):
        z = self._design(x)
        thetas, costs = [], []
        for i in range(y.shape[1]):
            th, cost = self._fit_one(z, y[:, i], restarts, loss, delta, rng,
                                     None if warm is None else warm[i])
            thetas.append(th)
            costs.append(cost)
        return thetas, costs

    def _set(self, thetas):
        ps = [self._theta_to_params(th) for th in thetas]
        self.c = np.array([p[0] for p in ps])
        self.k = np.array([p[1] for p in ps])
        self.t = np.array([p[2] for p in ps])
        self._thetas = [np.asarray(th).copy() for th in thetas]

    def fit(self, mixtures, losses, restarts: int = 8, loss: str = "huber", huber_delta: float = 0.01,
            holdout_fraction: float = 0.2, seed: int = 0) -> "MixingLaw":
        """Fit on (n × M) mixtures and (n,) / (n × K) losses; ``self.report`` holds the errors."""
        x = _check_mixtures(mixtures)
        y = _check_losses(losses, x.shape[0])
        n, m = x.shape
        if m < 2:
            raise ValueError("need at least 2 training domains")
        if not 0 <= holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if huber_delta <= 0 or restarts < 0:
            raise ValueError("huber_delta must be > 0 and restarts >= 0")
        if loss not in ("huber", "linear", "soft_l1", "cauchy", "arctan"):
            raise ValueError(f"unknown loss {loss!r}")
        n_par = m + 1
        if n < n_par:
            raise ValueError(f"need at least {n_par} runs to fit {n_par} parameters per validation domain, got {n}")
        rng = np.random.default_rng(seed)
        n_hold = int(round(holdout_fraction * n))
        held = None
        if n_hold > 0 and n - n_hold < n_par:
            warnings.warn(f"too few runs ({n}) for a {holdout_fraction:.0%} holdout; held-out error not reported")
            n_hold = 0
        if n_hold > 0:
            perm = rng.permutation(n)
            te, tr = perm[:n_hold], perm[n_hold:]
            thetas, _ = self._fit_all(x[tr], y[tr], restarts, loss, huber_delta, rng)
            self._set(thetas)
            held = _errors(self.predict(x[te]), y[te])
            warm = thetas
        else:
            warm = None
        thetas, costs = self._fit_all(x, y, restarts, loss, huber_delta, rng, warm=warm)
        self._set(thetas)
        self.report = FitReport(_errors(self.predict(x), y), held, n - n_hold, n_hold, costs, restarts)
        return self

    # ----- prediction
    def predict(self, mixtures) -> np.ndarray:
        self._need_fit()
        x = _check_mixtures(mixtures, self.n_domains)
        return law_value(x, self.c, self.k, self.t)

    def _target(self, target_weights) -> np.ndarray:
        kk = self.n_val
        if target_weights is None:
            return np.full(kk, 1.0 / kk)
        if isinstance(target_weights, dict):
            if self.val_domains is None:
                raise ValueError("target weights given by name need val_domains")
            unknown = set(target_weights) - set(self.val_domains)
            if unknown:
                raise ValueError(f"unknown validation domains in target weights: {sorted(unknown)}")
            s = np.array([float(target_weights.get(d, 0.0)) for d in self.val_domains])
        else:
            s = np.asarray(target_weights, dtype=float).reshape(-1)
        if s.shape != (kk,) or not np.all(np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
            raise ValueError(f"target weights must be {kk} non-negative numbers with a positive sum")
        return s / s.sum()

    def predict_overall(self, mixtures, target_weights=None) -> np.ndarray:
        return self.predict(mixtures) @ self._target(target_weights)

    # ----- optimisation
    def _bounds(self, caps, min_props) -> tuple[np.ndarray, np.ndarray]:
        m = self.n_domains

        def vec(v, default, name):
            if v is None:
                return np.full(m, default)
            if isinstance(v, dict):
                if self.domains is None:
                    raise ValueError(f"{name} given by name need domains")
                unknown = set(v) - set(self.domains)
                if unknown:
                    raise ValueError(f"unknown domains in {name}: {sorted(unknown)}")
                return np.array([float(v.get(d, default)) for d in self.domains])
            a = np.asarray(v, dtype=float).reshape(-1)
            if a.shape != (m,):
                raise ValueError(f"{name} must have {m} entries")
            return a

        hi, lo = vec(caps, 1.0, "caps"), vec(min_props, 0.0, "min proportions")
        if not (np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))):
            raise ValueError("caps/min proportions contain NaN")
        if np.any(lo < 0) or np.any(hi > 1) or np.any(lo > hi):
            raise ValueError("need 0 <= min proportion <= cap <= 1 for every domain")
        if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12:
            raise ValueError(f"infeasible: sum(min)={lo.sum():.4f} must be <= 1 <= sum(caps)={hi.sum():.4f}")
        return lo, hi

    def optimize(self, target_weights=None, caps=None, min_props=None, n_starts: int = 8,
                 seed: int = 0) -> OptimizeResult:
        """Minimise Σ_i s_i L_i(r) over {r ≥ 0, Σr = 1, min ≤ r ≤ caps} (SLSQP, multi-start)."""
        self._need_fit()
        s = self._target(target_weights)
        lo, hi = self._bounds(caps, min_props)
        m = self.n_domains
        # Σ_i s_i L_i(r) = Σ_i s_i c_i + Σ_i w_i exp(t_i·r) with w_i = s_i k_i ≥ 0, so the optimum
        # minimises log Σ_i w_i exp(t_i·r): the same minimiser (log is increasing), convex
        # (log-sum-exp of affine functions) and well scaled. Minimising the sum itself stalled: a
        # fit with tiny k_i and large t_ij (a loss flat over most of the simplex that drops at a
        # vertex) gives gradients ~1e-10, and SLSQP stopped anywhere on the plateau (measured on the
        # known-optimum bench: 0.74 of the best domain instead of its vertex).
        log_w = np.log(np.maximum(s * self.k, 1e-300))
        active = s > 0

        def f(r):
            z = (log_w + self.t @ r)[active]
            top = z.max()
            return float(top + np.log(np.exp(z - top).sum()))

        def g(r):
            z = (log_w + self.t @ r)[active]
            p = np.exp(z - z.max())
            return (p / p.sum()) @ self.t[active]

        rng = np.random.default_rng(seed)
        starts = [project_capped_simplex(np.full(m, 1.0 / m), lo, hi)]
        starts += list(project_capped_simplex(rng.dirichlet(np.ones(m), size=max(n_starts - 1, 0)), lo, hi))
        best_r, best_f, ok = None, np.inf, False
        for r0 in starts:
            sol = minimize(f, r0, jac=g, method="SLSQP", bounds=list(zip(lo, hi)),
                           constraints=[{"type": "eq", "fun": lambda r: r.sum() - 1.0,
                                         "jac": lambda r: np.ones_like(r)}],
                           options={"ftol": 1e-12, "maxiter": 500})
            r = project_capped_simplex(sol.x, lo, hi)  # exact feasibility
            val = f(r)
            if val < best_f:
                best_r, best_f, ok = r, val, bool(sol.success)
        assert np.all(best_r <= hi + 1e-12) and np.all(best_r >= lo - 1e-12)
        assert abs(best_r.sum() - 1) < 1e-9
        pl = self.predict(best_r)[0]
        return OptimizeResult(best_r, pl, float(pl @ s), s, hi, lo, ok, self.domains)

    # ----- bootstrap
    def bootstrap(self, mixtures, losses, n_boot: int = 100, seed: int = 0, level: float = 0.9,
                  target_weights=None, caps=None, min_props=None, restarts: int = 2,
                  loss: str = "huber", huber_delta: float = 0.01, n_starts: int = 4) -> BootstrapResult:
        """Refit on runs resampled with replacement; percentile intervals for the per-domain
        losses predicted at this law's optimum and for the optimal weights.

        Fits the law on all runs first if it is not fitted yet."""
        x = _check_mixtures(mixtures)
        y = _check_losses(losses, x.shape[0])
        if n_boot < 2 or not 0 < level < 1:
            raise ValueError("need n_boot >= 2 and 0 < level < 1")
        if self.t is None:
            self.fit(x, y, restarts=max(restarts, 4), loss=loss, huber_delta=huber_delta,
                     holdout_fraction=0.0, seed=seed)
        if self.t.shape != (y.shape[1], x.shape[1]):
            raise ValueError("law was fitted on data of another shape")
        opt = self.optimize(target_weights, caps, min_props, n_starts=n_starts, seed=seed)
        rng = np.random.default_rng(seed)
        warm = self._thetas
        z = self._design(x)
        L, W, O, failed = [], [], [], 0
        for _ in range(n_boot):
            idx = rng.integers(0, x.shape[0], size=x.shape[0])
            if np.unique(idx).size < x.shape[1] + 1:
                failed += 1
                continue
            try:
                thetas = [self._fit_one(z[idx], y[idx, i], restarts, loss, huber_delta, rng, warm[i])[0]
                          for i in range(y.shape[1])]
            except RuntimeError:
                failed += 1
                continue
            b = MixingLaw(self.domains, self.val_domains)
            b._set(thetas)
            li = b.predict(opt.weights)[0]
            L.append(li)
            O.append(float(li @ opt.target_weights))
            W.append(b.optimize(opt.target_weights, opt.caps, opt.min_props, n_starts=n_starts,
                                seed=seed).weights)
        if not L:
            raise RuntimeError("every bootstrap refit failed")
        L, W, O = np.array(L), np.array(W), np.array(O)
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        return BootstrapResult(opt, level, L, O, W, np.percentile(L, q, axis=0).T,
                               np.percentile(O, q), np.percentile(W, q, axis=0).T, failed)


# --------------------------------------------------------------------------- power laws


class PowerLaw:
    """L(x) = E + A / x^α, all positive; fitted on log L (Huber) from a grid of starts.

    x is rescaled by its largest value internally for conditioning."""

    def __init__(self):
        self.E = self.A = self.alpha = None
        self.cost = None

    def fit(self, x, y, loss: str = "huber", huber_delta: float = 1e-3, log_space: bool = True,
            restarts: int = 0, seed: int = 0) -> "PowerLaw":
        x = np.asarray(x, dtype=float).reshape(-1)
        y = np.asarray(y, dtype=float).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"x and y lengths differ ({x.size} vs {y.size})")
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size < 3:
            raise ValueError(f"need at least 3 finite points to fit 3 parameters, got {x.size}")
        if np.any(x <= 0) or np.any(y <= 0):
            raise ValueError("x and y must be > 0")
        if np.unique(x).size < 3:
            raise ValueError("need at least 3 distinct x values")
        xs = x.max()
        u = x / xs
        ly = np.log(y)

        def pred(th):
            return np.exp(th[0]) + np.exp(th[1]) * np.exp(np.clip(-np.exp(th[2]) * np.log(u), -50, 50))

        def resid(th):
            p = pred(th)
            return (np.log(p) - ly) if log_space else (p - y)

        rng = np.random.default_rng(seed)
        # variable projection for the starts: for each α on a grid, E and A are a linear fit
        alphas = np.geomspace(0.02, 3.0, 150)
        basis = u[:, None] ** (-alphas[None, :])                     # (T × G)
        bm, ym = basis.mean(axis=0), y.mean()
        var = ((basis - bm) ** 2).sum(axis=0)
        a_lin = np.maximum(((basis - bm) * (y - ym)[:, None]).sum(axis=0) / np.maximum(var, 1e-300), 1e-8)
        e_lin = np.maximum(ym - a_lin * bm, 1e-6 * y.min())
        sse = ((e_lin + a_lin * basis - y[:, None]) ** 2).sum(axis=0)
        inits = [np.log([e_lin[g], a_lin[g], alphas[g]]) for g in np.argsort(sse)[:1]]
        for fe, al in ((0.5, 0.3), (0.9, 1.0)):
            e0 = fe * y.min()
            b = u ** (-al)
            inits.append(np.log([e0, max(float(np.dot(b, y - e0) / np.dot(b, b)), 1e-8), al]))
        for _ in range(restarts):
            inits.append(np.log([rng.uniform(0.01, 0.99) * y.min(), rng.uniform(0.01, 2) * np.ptp(y) + 1e-8,
                                 rng.uniform(0.05, 2.0)]))
        best = None
        for th0 in inits:
            try:
                sol = least_squares(resid, th0, loss=loss, f_scale=huber_delta, x_scale=1.0, max_nfev=300)
            except (ValueError, FloatingPointError):
                continue
            if np.all(np.isfinite(sol.x)) and (best is None or sol.cost < best.cost):
                best = sol
        if best is None:
            raise RuntimeError("power-law fit failed from every start")
        self.E, a_scaled, self.alpha = (float(v) for v in np.exp(best.x))
        self.A = a_scaled * xs ** self.alpha  # A/x^α = a_scaled·(x/xs)^-α
        self.cost = float(best.cost)
        return self

    def predict(self, x) -> np.ndarray:
        if self.E is None:
            raise RuntimeError("power law is not fitted")
        x = np.asarray(x, dtype=float)
        if np.any(x <= 0):
            raise ValueError("x must be > 0")
        return self.E + self.A * x ** (-self.alpha)


class StepLaw(PowerLaw):
    """L(S) = E + B / S^β over training steps (one loss curve)."""

    @property
    def B(self):
        return self.A

    @property
    def beta(self):
        return self.alpha


class SizeLaw(PowerLaw):
    """L(N) = E + A / N^α over model sizes (non-embedding parameters)."""


@dataclass
class NestedResult:
    predicted_losses: np.ndarray        # (n × K) at (target_size, target_steps)
    step_predictions: np.ndarray        # (P × n × K) at target_steps, per proxy size
    law: MixingLaw
    optimum: OptimizeResult
    step_laws: list = field(default_factory=list)   # [P][n][K] StepLaw
    size_laws: list = field(default_factory=list)   # [n][K] SizeLaw (empty when P == 1)


def nested_prediction(mixtures, steps, losses, target_steps: float, sizes=None, target_size: float | None = None,
                      target_weights=None, caps=None, min_props=None, restarts: int = 8,
                      huber_delta: float = 0.01, holdout_fraction: float = 0.2, n_starts: int = 8,
                      seed: int = 0, domains=None, val_domains=None) -> NestedResult:
    """Step law per run → size law across proxy sizes → mixing law → optimum.

    mixtures: (n × M); steps: (T,) step counts of the logged losses; losses: (P × n × T × K),
    (P × n × T), or (n × T [× K]) for a single size (NaN marks a missing point); sizes: (P,)
    model sizes (needed, with target_size, when P > 1; at least 3 sizes)."""
    x = _check_mixtures(mixtures)
    n = x.shape[0]
    st = np.asarray(steps, dtype=float).reshape(-1)
    y = np.asarray(losses, dtype=float)
    if sizes is None:
        if y.ndim == 2:
            y = y[None, :, :, None]
        elif y.ndim == 3:
            y = y[None]
        else:
            raise ValueError("without sizes, losses must be (n × T) or (n × T × K)")
    else:
        if y.ndim == 3:
            y = y[..., None]
        if y.ndim != 4:
            raise ValueError("with sizes, losses must be (P × n × T) or (P × n × T × K)")
    P, n2, T, K = y.shape
    if n2 != n or T != st.size:
        raise ValueError(f"losses shape {y.shape} does not match {n} mixtures and {st.size} steps")
    step_laws, sp = [], np.empty((P, n, K))
    for p in range(P):
        row = []
        for r in range(n):
            laws_k = []
            for kk in range(K):
                sl = StepLaw().fit(st, y[p, r, :, kk], seed=seed)
                sp[p, r, kk] = sl.predict(target_steps)
                laws_k.append(sl)
            row.append(laws_k)
        step_laws.append(row)
    size_laws = []
    if P == 1:
        pred = sp[0]
    else:
        if target_size is None:
            raise ValueError("target_size is needed with several model sizes")
        nv = np.asarray(sizes, dtype=float).reshape(-1)
        if nv.size != P:
            raise ValueError(f"{nv.size} sizes for {P} loss blocks")
        if P < 3:
            raise ValueError("the size law needs at least 3 proxy sizes")
        pred = np.empty((n, K))
        for r in range(n):
            row = []
            for kk in range(K):
                zl = SizeLaw().fit(nv, sp[:, r, kk], seed=seed)
                pred[r, kk] = zl.predict(target_size)
                row.append(zl)
            size_laws.append(row)
    law = MixingLaw(domains, val_domains).fit(x, pred, restarts=restarts, huber_delta=huber_delta,
                                              holdout_fraction=holdout_fraction, seed=seed)
    opt = law.optimize(target_weights, caps, min_props, n_starts=n_starts, seed=seed)
    return NestedResult(pred, sp, law, opt, step_laws, size_laws)
