"""Smoke test of bench/mixing_known_optimum.py: --quick --tiny runs and ends with the JSON it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("optimum", "uniform", "natural", "doremi", "doremi_uniform_ref", "mixing_law", "mixing_law_avg")


@pytest.mark.slow
def test_mixing_known_optimum_tiny_prints_its_json():
    result = subprocess.run([sys.executable, "bench/mixing_known_optimum.py", "--quick", "--tiny"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bench"] == "mixing_known_optimum"
    for key in ("regret", "gap_uniform_to_optimum", "budget", "optimum_weights", "weights"):
        assert key in out, key
    assert set(out["regret"]) == set(METHODS) and set(out["budget"]) == set(METHODS)
    assert all(math.isfinite(v) for v in out["regret"].values())
    assert out["regret"]["optimum"] == 0.0
    assert out["gap_uniform_to_optimum"] == out["regret"]["uniform"]
    assert out["budget"]["uniform"] == out["budget"]["natural"] == 0
    assert out["budget"]["doremi"] > 0 and out["budget"]["mixing_law"] > 0
    for m in METHODS:  # every training domain counts in the _all_domains figures, the learnable ones in the others
        assert out["worst_loss_all_domains"][m] >= out["worst_loss"][m]
        assert out["worst_loss_all_domains"][m] >= out["average_loss_all_domains"][m] > 0
    for weights in [out["optimum_weights"], *out["weights"].values()]:
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
        assert min(weights.values()) >= -1e-9
