"""Data mixing laws: fitter recovery, power laws, capped optimizer, bootstrap, sampling."""

import numpy as np
import pytest

from mixing.laws import MixingLaw, SizeLaw, StepLaw, canonical, law_value, nested_prediction
from mixing.sampling import dirichlet, double_diminishing, project_capped_simplex

# Known law: M = 3 training domains, K = 2 validation domains (gauge-free values chosen so
# the reducible loss varies by ~0.1-1.5 nats over the simplex, as in real mixing studies).
C = np.array([2.0, 1.5])
K_ = np.array([1.0, 0.6])
T = np.array([[-2.5, 0.5, 1.0], [0.8, -3.0, 0.2]])


def _data(n=40, noise=0.003, seed=0, m=3):
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.ones(m), size=n)
    y = law_value(x, C, K_, T)
    return x, y * (1 + noise * rng.standard_normal(y.shape))


def test_fitter_recovers_known_parameters_m3_k2():
    x, y = _data()
    law = MixingLaw().fit(x, y, restarts=4, holdout_fraction=0.2, seed=1)
    k_true, t_true = canonical(K_, T)
    # 0.3% multiplicative noise (~0.006 nats) on 40 runs: c to 0.05 nats, k to 10%, t to 0.15
    assert np.allclose(law.c, C, atol=0.05)
    assert np.allclose(law.k, k_true, rtol=0.10)
    assert np.allclose(law.t, t_true, atol=0.15)
    assert np.allclose(law.t.sum(axis=1), 0, atol=1e-12)  # centered gauge
    rep = law.report
    assert rep.n_holdout == 8 and rep.held_out is not None
    # held-out error close to the noise level (σ ≈ 0.006 nats → MAE ≈ 0.005)
    assert rep.held_out["mae"] < 0.012 and rep.held_out["rel_mae"] < 0.005
    assert rep.in_sample["rmse"] < 0.01


def test_fitter_recovers_m4_and_is_robust_to_an_outlier():
    rng = np.random.default_rng(3)
    c, k = np.array([1.8, 2.4]), np.array([0.7, 1.1])
    t = np.array([[-2.0, 0.3, 0.6, 1.0], [0.5, 0.4, -2.5, -0.5]])
    x = rng.dirichlet(np.ones(4), size=60)
    y = law_value(x, c, k, t) + 0.003 * rng.standard_normal((60, 2))
    y[5, 0] += 0.5  # one crashed run: Huber keeps it from dragging the fit
    law = MixingLaw().fit(x, y, restarts=4, seed=0)
    kc, tc = canonical(k, t)
    assert np.allclose(law.c, c, atol=0.06)
    assert np.allclose(law.k, kc, rtol=0.12)
    assert np.allclose(law.t, tc, atol=0.2)


def test_optimizer_respects_caps_and_matches_grid_search():
    law = MixingLaw.from_params(C, K_, T)
    s = np.array([0.5, 0.5])
    caps = np.array([0.3, 1.0, 0.5])
    opt = law.optimize(s, caps=caps, n_starts=6)
    assert np.all(opt.weights <= caps + 1e-12) and np.all(opt.weights >= 0)
    assert abs(opt.weights.sum() - 1) < 1e-12
    assert opt.weights[0] == pytest.approx(0.3, abs=1e-9)  # the cap binds for this law
    g = np.linspace(0, 1, 401)
    a, b = np.meshgrid(g, g, indexing="ij")
    grid = np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], axis=1)
    grid = grid[(grid[:, 2] >= -1e-12) & np.all(grid <= caps + 1e-12, axis=1)]
    grid = np.clip(grid, 0, None)
    vals = law_value(grid, C, K_, T) @ s
    best = grid[np.argmin(vals)]
    assert opt.predicted_overall <= vals.min() + 1e-9
    assert np.allclose(opt.weights, best, atol=0.005)  # grid step 0.0025
    assert np.allclose(opt.predicted_losses, law_value(opt.weights, C, K_, T)[0])
    # min proportions honoured too
    opt2 = law.optimize(s, caps=caps, min_props=[0.0, 0.0, 0.45])
    assert opt2.weights[2] >= 0.45 - 1e-12 and np.all(opt2.weights <= caps + 1e-12)


def test_optimizer_rejects_infeasible_caps():
    law = MixingLaw.from_params(C, K_, T)
    with pytest.raises(ValueError, match="infeasible"):
        law.optimize(caps=[0.2, 0.2, 0.2])


def test_bootstrap_intervals_contain_truth():
    x, y = _data(n=30, noise=0.004, seed=5)
    law = MixingLaw().fit(x, y, restarts=2, holdout_fraction=0.0, seed=0)
    bs = law.bootstrap(x, y, n_boot=40, seed=1, level=0.95, caps=[0.3, 1.0, 0.5])
    truth = law_value(bs.optimum.weights, C, K_, T)[0]
    lo, hi = bs.loss_interval[:, 0], bs.loss_interval[:, 1]
    assert np.all(lo <= truth) and np.all(truth <= hi)
    assert np.all(hi - lo < 0.05)
    true_opt = MixingLaw.from_params(C, K_, T).optimize(caps=[0.3, 1.0, 0.5]).weights
    wl, wh = bs.weight_interval[:, 0] - 1e-6, bs.weight_interval[:, 1] + 1e-6
    assert np.all(wl <= true_opt) and np.all(true_opt <= wh)
    assert np.all(bs.weight_samples <= np.array([0.3, 1.0, 0.5]) + 1e-12)


@pytest.mark.parametrize("bad,msg", [
    (np.array([[0.5, 0.6, 0.0]] * 5), "sum to 1"),
    (np.array([[1.2, -0.2, 0.0]] * 5), "negative"),
    (np.array([[np.nan, 0.5, 0.5]] * 5), "NaN"),
    (np.ones(3) / 3 * np.ones((5, 1, 1)), "n × M"),
])
def test_fit_validates_inputs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        MixingLaw().fit(bad, np.ones(5))


def test_fit_validates_losses():
    x, y = _data(n=10)
    with pytest.raises(ValueError, match="losses"):
        MixingLaw().fit(x, y[:7])
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MixingLaw().fit(x, y)


def test_step_law_recovers_parameters():
    rng = np.random.default_rng(0)
    E, B, beta = 2.1, 30.0, 0.45
    s = np.geomspace(200, 30000, 25)
    y = (E + B / s ** beta) * (1 + 0.002 * rng.standard_normal(s.size))
    sl = StepLaw().fit(s, y)
    # 0.2% noise over a 150x step range: E within 0.05, B within 20%, β within 0.05
    assert sl.E == pytest.approx(E, abs=0.05)
    assert sl.B == pytest.approx(B, rel=0.2)
    assert sl.beta == pytest.approx(beta, abs=0.05)
    assert sl.predict(100_000) == pytest.approx(E + B / 100_000 ** beta, abs=0.01)


def test_size_law_recovers_parameters():
    rng = np.random.default_rng(1)
    E, A, alpha = 1.7, 400.0, 0.34
    n = np.array([1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9])
    y = (E + A / n ** alpha) * (1 + 0.001 * rng.standard_normal(n.size))
    zl = SizeLaw().fit(n, y)
    assert zl.E == pytest.approx(E, abs=0.06)
    assert zl.A == pytest.approx(A, rel=0.25)
    assert zl.alpha == pytest.approx(alpha, abs=0.03)


def test_power_law_validation():
    with pytest.raises(ValueError, match="at least 3"):
        StepLaw().fit([1, 2], [3, 2])
    with pytest.raises(ValueError, match="> 0"):
        StepLaw().fit([1, 2, 3], [3, -2, 1])


def test_nested_prediction_recovers_target_optimum():
    # Ground truth: loss(r, N, S) = L_mix(r) + A/N^α + B/S^β; the mixing part is the known law.
    rng = np.random.default_rng(2)
    x = rng.dirichlet(np.ones(3), size=20)
    steps = np.geomspace(500, 20000, 12)
    sizes = np.array([1e6, 4e6, 1.6e7, 6.4e7])
    base = law_value(x, C, K_, T)                                   # (n × K)
    y = (base[None, :, None, :] + 300 / sizes[:, None, None, None] ** 0.4
         + 20 / steps[None, None, :, None] ** 0.5)
    y = y * (1 + 0.0005 * rng.standard_normal(y.shape))
    res = nested_prediction(x, steps, y, target_steps=1e5, sizes=sizes, target_size=1e9,
                            caps=[0.3, 1.0, 0.5], restarts=2, seed=0)
    want = base + 300 / 1e9 ** 0.4 + 20 / 1e5 ** 0.5
    assert np.allclose(res.predicted_losses, want, atol=0.03)
    true_opt = MixingLaw.from_params(C, K_, T).optimize(caps=[0.3, 1.0, 0.5]).weights
    assert np.allclose(res.optimum.weights, true_opt, atol=0.03)
    assert np.all(res.optimum.weights <= np.array([0.3, 1.0, 0.5]) + 1e-12)


# --------------------------------------------------------------------------- sampling


def test_double_diminishing_on_simplex_and_capped():
    caps = np.array([1.0, 0.25, 0.5, 1.0])
    x = double_diminishing(4, 30, caps=caps, seed=0)
    assert x.shape == (30, 4)
    assert np.allclose(x.sum(axis=1), 1, atol=1e-12) and np.all(x >= 0)
    assert np.all(x <= caps + 1e-12)
    assert len(np.unique(np.round(x, 8), axis=0)) == 30
    assert np.array_equal(x, double_diminishing(4, 30, caps=caps, seed=0))  # deterministic
    # without caps the candidate values are halvings: every row is a renormalised subset of
    # {0, 1/16, 1/8, 1/4, 1/2, 1}, so each ratio of non-zero entries is a power of two
    x2 = double_diminishing(3, 20, seed=1)
    for row in x2:
        nz = row[row > 0]
        ratios = np.log2(nz / nz.min())
        assert np.allclose(ratios, np.round(ratios), atol=1e-9)


def test_dirichlet_on_simplex_and_capped():
    caps = np.array([0.2, 0.6, 0.6])
    x = dirichlet(3, 200, base=[0.2, 0.4, 0.4], concentration=2.0, caps=caps, seed=0)
    assert x.shape == (200, 3)
    assert np.allclose(x.sum(axis=1), 1, atol=1e-12) and np.all(x >= 0)
    assert np.all(x <= caps + 1e-12)
    # tight caps that rejection alone would rarely meet still come back capped
    y = dirichlet(3, 50, concentration=0.3, caps=[0.34, 0.34, 0.34], seed=1)
    assert np.all(y <= 0.34 + 1e-12) and np.allclose(y.sum(axis=1), 1)


def test_projection_onto_capped_simplex():
    r = project_capped_simplex(np.array([0.9, 0.5, -0.2]), hi=np.array([0.5, 1, 1]))
    assert np.allclose(r.sum(), 1) and r[0] <= 0.5 + 1e-12 and np.all(r >= 0)


def test_optimizer_reaches_the_vertex_of_a_plateau_law():
    # A fit seen on the known-optimum bench: k tiny, t large -> the loss is flat (1e-10 slopes)
    # over most of the simplex and lowest at the last domain's vertex. The optimum must be there.
    law = MixingLaw.from_params([1.85], [1e-9], [[13.0, 11.4, 1.9, -26.4]])
    res = law.optimize(caps=[1, 1, 0.32, 1])
    assert res.weights == pytest.approx([0, 0, 0, 1], abs=1e-6)
    # Two targets: the optimum is interior and equals a brute-force search over a fine grid.
    law2 = MixingLaw.from_params([1.0, 2.0], [0.5, 0.8], [[-2.0, 1.0, 0.5], [1.5, -1.0, 0.0]])
    res2 = law2.optimize()
    grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 201) for b in np.linspace(0, 1, 201)
                     if a + b <= 1 + 1e-12])
    grid = np.clip(grid, 0, 1) / np.clip(grid, 0, 1).sum(axis=1, keepdims=True)
    best = grid[np.argmin(law2.predict_overall(grid))]
    assert res2.predicted_overall <= float(law2.predict_overall(best[None])[0]) + 1e-9
    assert res2.weights == pytest.approx(best, abs=0.01)


def test_double_diminishing_keeps_the_feasible_vertices():
    caps = np.array([1.0, 0.3, 1.0, 1.0])
    x = double_diminishing(4, 8, caps=caps, levels=2, seed=0, include_vertices=True)
    vertices = {tuple(v) for v in np.eye(4)[[0, 2, 3]]}  # domain 1 capped at 0.3: no pure run
    assert vertices <= {tuple(r) for r in x}
    assert len(x) == 8 and np.all(x <= caps + 1e-12) and np.allclose(x.sum(axis=1), 1)
    assert len(double_diminishing(4, 2, caps=caps, levels=2, include_vertices=True)) == 2  # never more than n
