"""mixing.run: `maskmix mix baseline|doremi|laws` write a valid mixture.json and nest their MLflow runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from infra.config import DoReMiConfig, LawsConfig, MixConfig, ProxyConfig, SweepConfig
from infra.contracts import load_mixture
from mixing.run import doremi_export_path, run_mix
from tests.training_fixtures import write_tiny_corpus

REPO = Path(__file__).resolve().parents[1]
TINY = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8,
            lr=3e-3, warmup_steps=2, eval_docs_per_domain=4, mc_samples=2)


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exp_ids, max_results=1000)


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _mix_run(client, runs, mixture):
    run = client.get_run(mixture.mlflow_run_id)
    assert run.data.tags["maskmix.stage"] == "mix" and run.info.status == "FINISHED"
    assert "mixture.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    for d, w in mixture.weights.items():
        assert run.data.metrics[f"weight/{d}"] == pytest.approx(w)
    return run


def test_baseline_writes_mixture_and_a_mix_run(tmp_path, mlflow_uri):
    corpus = write_tiny_corpus(tmp_path / "corpus", ["alpha", "beta", "gamma"])
    cfg = MixConfig(manifest=corpus.manifest_path, method="uniform", output=str(tmp_path / "out" / "uniform.json"))
    mixture = run_mix(cfg, method="baseline", progress=None)
    loaded = load_mixture(cfg.output)
    assert loaded.method == "uniform" and loaded.weights == pytest.approx({d: 1 / 3 for d in corpus.manifest.domains})
    client, runs = _runs(mlflow_uri)
    run = _mix_run(client, runs, mixture)
    assert run.data.params["method"] == "uniform" and run.data.params["mix_method"] == "baseline"
    assert run.data.tags["maskmix.mix_method"] == "baseline"


def test_unknown_method_is_a_config_error(tmp_path):
    from infra.errors import ConfigError

    corpus = write_tiny_corpus(tmp_path / "corpus")
    with pytest.raises(ConfigError, match="unknown mix method 'dro'"):
        run_mix(MixConfig(manifest=corpus.manifest_path, output=str(tmp_path / "m.json")), method="dro")


def test_doremi_writes_mixture_export_and_nested_runs(tmp_path, mlflow_uri):
    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5})
    cfg = MixConfig(manifest=corpus.manifest_path, output=str(tmp_path / "mixtures" / "doremi.json"),
                    doremi=DoReMiConfig(proxy=ProxyConfig(**TINY, steps=6), rounds=1))
    mixture = run_mix(cfg, method="doremi", progress=None)
    loaded = load_mixture(cfg.output)
    assert loaded.method == "doremi" and loaded.mlflow_run_id == mixture.mlflow_run_id
    assert sum(loaded.weights.values()) == pytest.approx(1.0)
    export_path = doremi_export_path(cfg.output)
    assert export_path == str(tmp_path / "mixtures" / "doremi.doremi.json")
    export = json.loads(Path(export_path).read_text())
    assert set(export) == {"train_domain_weights", "eval_domain_weights"}
    assert export["train_domain_weights"] == pytest.approx(loaded.weights)
    assert sum(export["eval_domain_weights"].values()) == pytest.approx(1.0)

    client, runs = _runs(mlflow_uri)
    mix = _mix_run(client, runs, mixture)
    doremi = _children(runs, mix.info.run_id)
    assert [r.data.tags["maskmix.stage"] for r in doremi] == ["doremi"]
    rounds = _children(runs, doremi[0].info.run_id)
    assert [r.data.tags["maskmix.stage"] for r in rounds] == ["doremi_round"]
    assert sorted(r.data.tags["maskmix.stage"] for r in _children(runs, rounds[0].info.run_id)) == \
        ["doremi_proxy", "doremi_reference"]


@pytest.mark.slow
def test_laws_sweep_fit_and_capped_optimum(tmp_path, mlflow_uri, ray_session):
    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5}, docs_per_shard=6)
    proxy = ProxyConfig(**TINY, steps=4)
    cfg = MixConfig(manifest=corpus.manifest_path, output=str(tmp_path / "mixtures" / "laws.json"),
                    sweep=SweepConfig(output_dir=str(tmp_path / "sweep")),
                    laws=LawsConfig(proxy=proxy, n_mixtures=8, restarts=1, bootstrap_samples=4, max_epochs=1.5,
                                    holdout_fraction=0.25, sampling="dirichlet"))
    unique = np.array([corpus.manifest.domains[d].tokens("train") for d in corpus.manifest.domain_names()])
    budget = proxy.steps * proxy.batch_size * proxy.seq_len
    caps = np.minimum(1.0, 1.5 * unique / budget)
    assert caps.min() < 1.0  # the caps bind for at least one domain at this budget

    mixture = run_mix(cfg, method="laws", progress=None)
    loaded = load_mixture(cfg.output)
    assert loaded.method == "laws"
    w = np.array([loaded.weights[d] for d in corpus.manifest.domain_names()])
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert np.all(w <= caps + 1e-6)
    details = loaded.details
    assert set(details["predicted_losses"]) == set(corpus.manifest.domains)
    assert details["budget_tokens"] == budget and details["fit"]["held_out"] is not None
    assert not any(v["exceeds_cap"] for v in details["repetition"]["domains"].values())
    assert set(details["intervals"]["loss"]) == set(corpus.manifest.domains)
    assert len(list((tmp_path / "sweep" / "runs").glob("*.json"))) == 8

    client, runs = _runs(mlflow_uri)
    mix = _mix_run(client, runs, mixture)
    children = _children(runs, mix.info.run_id)
    stages = sorted(r.data.tags["maskmix.stage"] for r in children)
    assert stages == ["laws_fit"] + ["sweep_run"] * 8
    fit = next(r for r in children if r.data.tags["maskmix.stage"] == "laws_fit")
    assert "fit/held_out/mae" in fit.data.metrics
    artifacts = [a.path for a in client.list_artifacts(fit.info.run_id)]
    assert "laws_params.json" in artifacts and "laws_fit.json" in artifacts

    # Resumable: a rerun trains nothing new and gives the same mixture.
    again = run_mix(cfg, method="laws", progress=None)
    assert again.weights == pytest.approx(mixture.weights)


def test_cli_mix_baseline_and_unknown_method(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus")
    cfg = tmp_path / "mix.yaml"
    out = tmp_path / "mix.json"
    cfg.write_text(f"tracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n"
                   f"mix: {{manifest: {corpus.manifest_path}, output: {out}, method: uniform}}\n")
    cli = [sys.executable, "-m", "infra.cli", "mix"]
    done = subprocess.run(cli + ["baseline", str(cfg), "--set", "mix.method=natural"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_mixture(str(out)).method == "natural"
    assert "alpha" in done.stdout and "weight" in done.stdout
    bad = subprocess.run(cli + ["dro", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "No such command 'dro'" in bad.stderr


@pytest.mark.slow
def test_cli_mix_doremi_and_laws_end_to_end(tmp_path):
    # The two learned methods through the real CLI (a fresh process, embedded Ray for the sweep),
    # with the shipped example configs shrunk by --set: each writes its mixture.json.
    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5}, docs_per_shard=6)
    tiny = [f"{k}={v}" for k, v in {"preset": "test", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                     "seq_len": 32, "batch_size": 8, "warmup_steps": 1,
                                     "eval_docs_per_domain": 4, "mc_samples": 1}.items()]
    common = ["--set", f"tracking.uri=sqlite:///{tmp_path}/m.db", "--set", f"mix.manifest={corpus.manifest_path}"]
    cli = [sys.executable, "-m", "infra.cli", "mix"]
    for verb, extra in (("doremi", ["mix.doremi.proxy.steps=4"]),
                        ("laws", ["mix.laws.proxy.steps=3", "mix.laws.n_mixtures=5", "mix.laws.bootstrap_samples=2",
                                  f"mix.sweep.output_dir={tmp_path}/sweep", "mix.laws.holdout_fraction=0"])):
        out = tmp_path / f"{verb}.json"
        sets = [f"mix.{verb}.proxy.{kv}" for kv in tiny] + extra + [f"mix.output={out}"]
        args = cli + [verb, str(REPO / "configs" / f"mix_{verb}.yaml"), *common]
        for s in sets:
            args += ["--set", s]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        mixture = load_mixture(str(out))
        assert mixture.method == verb and sum(mixture.weights.values()) == pytest.approx(1.0)
        assert set(mixture.weights) == {"alpha", "beta", "gamma"}
        if verb == "doremi":  # the table's third column is the reference DoReMi ran against, and its stability
            header = next(line for line in done.stdout.splitlines() if line.startswith("domain"))
            assert header.split() == ["domain", "weight", "reference"]
            [distance] = mixture.details["round_split_half"]
            stable = "stable" if distance <= mixture.details["split_half_limit"] else "UNSTABLE"
            assert f"round 1: split-half distance {distance:.3f} ({stable}" in done.stdout
            assert ("warning: doremi round 1: unstable weights" in done.stderr) == (stable == "UNSTABLE")
