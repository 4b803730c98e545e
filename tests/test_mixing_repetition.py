"""Repetition awareness: epochs, data-constrained effective tokens, caps, report, config."""

import math

import numpy as np
import pytest

from mixing.laws import MixingLaw
from mixing.repetition import (DEFAULT_R_STAR, effective_tokens, epochs, max_proportions,
                               repetition_report)

U = np.array([1e9, 1e8, 5e7])
D = 1e9


def test_epochs_by_hand():
    r = np.array([0.5, 0.3, 0.2])
    assert np.allclose(epochs(r, U, D), [0.5e9 / 1e9, 0.3e9 / 1e8, 0.2e9 / 5e7])  # 0.5, 3, 4


def test_effective_tokens_by_hand():
    # 3 epochs -> R = 2: D' = U + U·R*·(1 - e^(-2/R*))
    want = 1e8 + 1e8 * 15.4 * (1 - math.exp(-2 / 15.4))
    assert effective_tokens([1e8], [3.0], r_star=15.4)[0] == pytest.approx(want, rel=1e-12)
    # below one epoch nothing repeats: D' = tokens seen
    assert effective_tokens([1e9], [0.5])[0] == pytest.approx(0.5e9)
    # the table in seed_003 §4.1 (R* = 15.39): 16 epochs -> D'/U = 10.58, 100 -> 16.36
    assert effective_tokens([1.0], [16.0], 15.387756)[0] == pytest.approx(10.58, abs=0.01)
    assert effective_tokens([1.0], [100.0], 15.387756)[0] == pytest.approx(16.36, abs=0.01)
    # a larger R* (diffusion) keeps more value from repeats
    assert effective_tokens([1.0], [32.0], 500.0)[0] > effective_tokens([1.0], [32.0], 15.4)[0]
    assert DEFAULT_R_STAR == 15.4


def test_max_proportions_and_report():
    caps = max_proportions(U, D, max_epochs=4)
    assert np.allclose(caps, [1.0, 0.4, 0.2])
    rep = repetition_report([0.5, 0.3, 0.2], U, D, max_epochs=2, domains=["web", "code", "books"])
    assert np.allclose(rep.epochs, [0.5, 3.0, 4.0])
    assert rep.exceeds_cap.tolist() == [False, True, True] and rep.any_exceeded
    d = rep.to_dict()["domains"]
    assert d["code"]["effective_tokens"] == pytest.approx(1e8 + 1e8 * 15.4 * (1 - math.exp(-2 / 15.4)))
    assert d["web"]["efficiency"] == pytest.approx(1.0) and d["books"]["efficiency"] < 1
    with pytest.raises(ValueError, match="epochs of all data"):
        max_proportions(U, 1e11, max_epochs=1)


def test_caps_feed_the_optimizer():
    # a law that wants all of the small domain: the cap from repetition binds exactly
    law = MixingLaw.from_params([2.0], [1.0], [[0.0, 0.0, -3.0]])
    caps = max_proportions(U, D, max_epochs=4)
    opt = law.optimize(caps=caps)
    assert opt.weights[2] == pytest.approx(0.2, abs=1e-9)
    assert not repetition_report(opt.weights, U, D, max_epochs=4).any_exceeded


def test_validation_errors():
    with pytest.raises(ValueError):
        epochs([0.5, 0.5], [1e9, 0], D)
    with pytest.raises(ValueError):
        epochs([0.5, np.nan], [1e9, 1e9], D)


def test_laws_config():
    from infra.config import LawsConfig, MixConfig
    cfg = MixConfig(manifest="m.json", output="o.json")
    assert cfg.laws.r_star == 15.4 and cfg.laws.sampling == "double_diminishing"
    with pytest.raises(Exception):
        LawsConfig(unknown=1)
    with pytest.raises(Exception):
        LawsConfig(sampling="grid")
