"""Smoke test of bench/pipeline_throughput.py: the full pipeline, our filter chain and datatrove's
filters run on a tiny demo corpus, and the last line is the JSON the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("ours_docs_per_s", "datatrove_docs_per_s", "ratio", "decision_agreement", "filter_ratio",
        "ours_filter_docs_per_s", "ours_docs_per_s_without_startup", "ours_mb_per_s_per_core",
        "ours_mb_per_s_per_core_without_startup", "datatrove_mb_per_s_per_core", "text_agreement")


@pytest.mark.slow
def test_pipeline_throughput_bench_tiny_prints_its_json(tmp_path):
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    result = subprocess.run([sys.executable, "bench/pipeline_throughput.py", "--tiny", "--work", str(tmp_path / "w")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bench"] == "pipeline_throughput" and out["cores"] == 2 and out["docs"] > 0 and out["mb"] > 0
    for key in KEYS:
        assert key in out, key
        assert out[key] > 0, (key, out[key])
    assert out["ratio"] == pytest.approx(out["ours_docs_per_s"] / out["datatrove_docs_per_s"], rel=0.01)
    assert out["decision_agreement"] >= 0.99, out["disagreements"]
    assert out["full_pipeline_decision_agreement"] >= 0.99
    assert out["full"]["startup_s"] > 0  # Ray's start-up is inside the full pipeline's seconds, and apart
    assert [s["name"] for s in out["full"]["stages"]][:1] == ["read"]
    assert "quality_filter" in [s["name"] for s in out["full"]["stages"]]
    assert out["kept"]["ours_filters"] == out["kept"]["datatrove"] > 0
