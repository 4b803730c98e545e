"""Smoke test of bench/train_throughput.py: it runs, and its last line is the JSON it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_throughput_quick_prints_its_json():
    result = subprocess.run([sys.executable, "bench/train_throughput.py", "--quick", "--steps", "2", "--warmup", "1",
                             "--no-gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("maskmix ") for line in lines) and any(line.startswith("modernbert ") for line in lines)
    out = json.loads(lines[-1])
    assert out["bench"] == "train_throughput"
    for key in ("ours_tokens_per_s", "modernbert_tokens_per_s", "ratio", "ours_params", "modernbert_params"):
        assert out[key] > 0, key
    assert out["ratio"] == pytest.approx(out["ours_tokens_per_s"] / out["modernbert_tokens_per_s"], rel=1e-3)
    # Matched sizes: the two parameter counts differ only by ModernBERT's extra head and norms (a few %).
    assert abs(out["ours_params"] - out["modernbert_params"]) < 0.05 * out["ours_params"]
    assert out["timed_steps"] == 2
    assert "gpu_tokens_per_s" not in out  # --no-gpu
