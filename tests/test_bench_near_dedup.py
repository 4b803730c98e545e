"""Smoke test of bench/near_dedup.py: all three systems run on a tiny corpus and the last line is its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("seconds", "mb_per_s_per_core", "peak_rss_mb", "precision", "recall", "f1")


@pytest.mark.slow
def test_near_dedup_bench_tiny_prints_its_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/near_dedup.py", "--tiny", "--mb", "0.6", "--demo-bytes", "60000",
         "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bench"] == "near_dedup" and out["cores"] == 2 and out["threshold"] == 0.75
    assert out["docs"] > 0 and out["mb"] > 0 and out["truth_pairs"] > 0 and out["planted_above_threshold"] > 0
    for system in ("maskmix", "datatrove", "datasketch"):
        s = out[system]
        for key in METRICS:
            assert key in s, (system, key)
        assert s["seconds"] > 0 and s["mb_per_s_per_core"] > 0 and s["peak_rss_mb"] > 0
        for key in ("precision", "recall", "f1", "planted_recall"):
            assert 0.0 <= s[key] <= 1.0, (system, key, s[key])
        assert 0.0 <= s["closure"]["precision"] <= 1.0 and 0.0 <= s["closure"]["recall"] <= 1.0
    # The planted copies above the threshold are what near-dedup exists for: maskmix finds them.
    assert out["maskmix"]["planted_recall"] >= 0.8
    assert out["maskmix"]["recall"] >= 0.8
    # The default engine ("auto") runs a corpus this small in-process: no Ray start-up to report.
    assert out["maskmix"]["engine"] == "local" and out["maskmix"]["startup_s"] == 0
    assert set(out["maskmix"]["phases"]) >= {"read", "bands", "edges", "components", "write_survivors"}
    assert out["maskmix"]["cpu_s"] > 0  # CPU seconds of the process tree: comparable on a loaded machine


@pytest.mark.slow
def test_near_dedup_bench_scale_mode_compares_systems(tmp_path):
    """--scale: short synthetic documents from the same Parquet shards for every system; quality is
    exact-Jaccard precision of the predicted pairs and recall on the planted pairs."""
    result = subprocess.run(
        [sys.executable, "bench/near_dedup.py", "--scale", "3000", "--systems", "maskmix,datasketch",
         "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bench"] == "near_dedup_scale" and out["docs"] == 3000 and out["planted_above_threshold"] > 0
    assert out["maskmix"]["engine"] == "local"
    for system in ("maskmix", "datasketch"):
        s = out[system]
        assert s["seconds"] > 0 and s["peak_rss_mb"] > 0 and s["predicted_pairs"] > 0
        assert s["precision"] >= 0.8 and s["planted_recall"] >= 0.9 and 0 < s["f1"] <= 1


@pytest.mark.slow
def test_near_dedup_bench_ray_engine_still_runs(tmp_path):
    """--maskmix-cfg '{"engine": "ray"}': the distributed engine in the same bench, Ray start-up reported."""
    result = subprocess.run(
        [sys.executable, "bench/near_dedup.py", "--tiny", "--mb", "0.6", "--demo-bytes", "60000",
         "--systems", "maskmix", "--maskmix-cfg", '{"engine": "ray", "partitions": 4}', "--work", str(tmp_path / "w")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    s = json.loads(result.stdout.strip().splitlines()[-1])["maskmix"]
    assert s["engine"] == "ray" and s["startup_s"] > 0 and s["recall"] >= 0.8
    assert set(s["phases"]) >= {"bands", "edges", "components", "write_survivors"}
