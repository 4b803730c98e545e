"""mixing.baselines: uniform, natural and temperature-scaled weights, checked by hand."""

from __future__ import annotations

import json

import mlflow
import pytest

from infra.config import MixConfig
from infra.contracts import DomainShards, Manifest, ShardInfo, TokenizerInfo, write_artifact
from mixing.baselines import (BASELINES, baseline_mixture, natural_weights, run_mix, temperature_weights,
                              uniform_weights)


def manifest_with_tokens(tokens: dict[str, int]) -> Manifest:
    def shard(n: int, split: str = "train") -> ShardInfo:
        return ShardInfo(path=f"{split}.parquet", split=split, rows=1, tokens=n, bytes=1, text_bytes=1, sha256="0")

    return Manifest(
        config_hash="test",
        tokenizer=TokenizerInfo(path="tokenizer.json", sha256="0" * 64, vocab_size=32,
                                special_ids={"pad": 0, "mask": 1}),
        # Validation tokens do not count: the weights are over training tokens.
        domains={d: DomainShards(shards=[shard(n), shard(10_000, "validation")]) for d, n in tokens.items()},
    )


M = manifest_with_tokens({"a": 100, "b": 400})


def test_uniform_and_natural():
    assert uniform_weights(M) == {"a": 0.5, "b": 0.5}
    assert natural_weights(M) == pytest.approx({"a": 0.2, "b": 0.8})


@pytest.mark.parametrize("tau, expected", [
    (1.0, {"a": 0.2, "b": 0.8}),  # natural
    (2.0, {"a": 10 / 30, "b": 20 / 30}),  # sqrt(100), sqrt(400)
    (0.5, {"a": 1 / 17, "b": 16 / 17}),  # 100², 400²
    (1e9, {"a": 0.5, "b": 0.5}),  # τ → ∞: uniform
])
def test_temperature_by_hand(tau, expected):
    assert temperature_weights(M, tau) == pytest.approx(expected, rel=1e-7)


def test_temperature_edge_cases():
    big = manifest_with_tokens({"a": 10**12, "b": 1, "c": 0})
    w = temperature_weights(big, 0.01)  # n^(1/τ) would overflow a float; the log-space form does not
    assert w["a"] == pytest.approx(1.0) and w["c"] == 0.0 and sum(w.values()) == pytest.approx(1.0)
    w = temperature_weights(big, 3.0)
    assert w["c"] == 0.0 and w["b"] == pytest.approx(1 / (1 + 10**4))  # an empty domain stays empty
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_weights(M, 0.0)


def test_temperature_mixture_and_run_mix(tmp_path, mlflow_uri):
    assert "temperature" in BASELINES
    mixture = baseline_mixture(M, "temperature", temperature=2.0)
    assert mixture.method == "temperature" and mixture.details["temperature"] == 2.0
    assert sum(mixture.weights.values()) == 1.0
    assert mixture.reference_weights == pytest.approx({"a": 0.2, "b": 0.8})

    write_artifact(M, str(tmp_path / "manifest.json"))
    cfg = MixConfig(manifest=str(tmp_path / "manifest.json"), method="temperature", temperature=2.0,
                    output=str(tmp_path / "mixture.json"))
    mixture = run_mix(cfg)
    assert json.load(open(tmp_path / "mixture.json"))["weights"] == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    run = mlflow.MlflowClient(mlflow_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(mlflow_uri).search_experiments()])[0]
    assert run.data.params["method"] == "temperature" and run.data.params["temperature"] == "2.0"
    assert run.data.metrics["weight/a"] == pytest.approx(1 / 3)


def test_mix_config_accepts_temperature_and_sweep():
    cfg = MixConfig(manifest="m.json", output="o.json", method="temperature", temperature=3.0,
                    sweep={"output_dir": "s", "max_parallel": 2, "cpus_per_run": 0.5})
    assert cfg.sweep.max_parallel == 2 and cfg.temperature == 3.0
    with pytest.raises(ValueError, match="n_mixtures"):  # what to sample is mix.laws', not the sweep's
        MixConfig(manifest="m", output="o", sweep={"n_mixtures": 8})
    with pytest.raises(ValueError):
        MixConfig(manifest="m", output="o", temperature=0)
    with pytest.raises(ValueError):
        MixConfig(manifest="m", output="o", sweep={"nope": 1})
