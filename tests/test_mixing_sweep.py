"""mixing.sweep: parallel proxy runs on Ray, MLflow child runs, resume without repeating finished runs."""

from __future__ import annotations

import json
import os

import sys

import mlflow
import numpy as np
import pytest
import ray.cloudpickle

from mixing.sweep import (SweepError, SweepRun, proxy_run_fn, result_path, results_table, run_sweep,
                          sweep_run_id)

# Ray workers cannot import this test module: its functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DOMAINS = ("a", "b", "c")
CONFIG = {"steps": 10, "preset": "test"}


def known_losses(weights: dict[str, float]) -> dict[str, float]:
    """A known function of the weights: loss_i = 1 + exp(-3 w_i)."""
    return {d: 1.0 + float(np.exp(-3.0 * w)) for d, w in weights.items()}


class CountingFn:
    """run_fn writing one file per execution into ``log_dir``; raises for the weights in ``fail_on``."""

    def __init__(self, log_dir: str, fail_on: list[dict] | None = None):
        self.log_dir = str(log_dir)
        self.fail_on = fail_on or []

    def __call__(self, weights: dict[str, float], run_id: str) -> dict:
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"{run_id}.{os.getpid()}.{os.urandom(4).hex()}"), "w") as f:
            json.dump(weights, f)
        if weights in self.fail_on:
            raise RuntimeError("proxy diverged (on purpose)")
        losses = known_losses(weights)
        return {"eval": losses, "losses": [3.0, 2.0, 1.5], "mean": float(np.mean(list(losses.values())))}


def executed(log_dir) -> list[str]:
    """run ids executed so far, one entry per execution."""
    if not os.path.isdir(log_dir):
        return []
    return sorted(name.split(".")[0] for name in os.listdir(log_dir))


def mixtures(n: int, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [dict(zip(DOMAINS, map(float, w))) for w in rng.dirichlet(np.ones(len(DOMAINS)), size=n)]


def sweep_runs(n: int, seed: int = 0) -> list[SweepRun]:
    return [SweepRun(weights=w, config=CONFIG) for w in mixtures(n, seed)]


def test_run_ids_are_stable_and_depend_on_weights_config_and_seed():
    w = {"a": 0.25, "b": 0.75}
    run = SweepRun(weights=w, config={"steps": 10, "lr": 1e-3}, seed=1)
    assert run.run_id == SweepRun(weights={"b": 0.75, "a": 0.25}, config={"lr": 1e-3, "steps": 10}, seed=1).run_id
    assert run.run_id == sweep_run_id(w, {"steps": 10, "lr": 1e-3}, 1)
    assert run.run_id == SweepRun(weights={"a": 0.1 + 0.15, "b": 0.75}, config=run.config, seed=1).run_id  # round-off
    others = {SweepRun(weights={"a": 0.3, "b": 0.7}, config=run.config, seed=1).run_id,
              SweepRun(weights=w, config={"steps": 11, "lr": 1e-3}, seed=1).run_id,
              SweepRun(weights=w, config=run.config, seed=2).run_id}
    assert run.run_id not in others and len(others) == 3
    # A fixed id, so ids also match across processes and Python versions (no hash() salt).
    assert sweep_run_id({"a": 1.0}) == sweep_run_id({"a": 1.0}, {}, 0)
    assert len(run.run_id) == 16 and int(run.run_id, 16) >= 0


def test_sweep_returns_results_in_input_order(ray_session, tmp_path):
    runs = sweep_runs(5)
    messages: list[str] = []
    results = run_sweep(runs, CountingFn(tmp_path / "calls"), str(tmp_path / "sweep"), progress=messages.append)
    assert [r.run_id for r in results] == [r.run_id for r in runs]
    for run, result in zip(runs, results):
        assert result.ok and not result.resumed and result.error is None
        assert result.weights == run.weights
        assert result.results["eval"] == pytest.approx(known_losses(run.weights))
        stored = json.load(open(result_path(str(tmp_path / "sweep"), run.run_id)))
        assert stored["status"] == "finished" and stored["results"] == result.results
    assert executed(tmp_path / "calls") == sorted(r.run_id for r in runs)
    assert any("5 runs, 0 already finished, 5 to run" in m for m in messages)
    # No temp file is left beside the results.
    assert sorted(os.listdir(tmp_path / "sweep" / "runs")) == sorted(f"{r.run_id}.json" for r in runs)

    mix, losses, domains = results_table(results)
    assert domains == list(DOMAINS) and mix.shape == (5, 3) and losses.shape == (5, 3)
    assert np.allclose(mix.sum(axis=1), 1.0)
    assert np.allclose(losses, 1.0 + np.exp(-3.0 * mix))


def test_duplicate_runs_execute_once_and_max_parallel(ray_session, tmp_path):
    runs = sweep_runs(3)
    results = run_sweep(runs + [runs[0]], CountingFn(tmp_path / "calls"), str(tmp_path / "sweep"),
                        max_parallel=1, progress=None)
    assert [r.run_id for r in results] == [r.run_id for r in runs + [runs[0]]]
    assert executed(tmp_path / "calls") == sorted(r.run_id for r in runs)


def test_resume_skips_finished_runs(ray_session, tmp_path):
    calls, out = tmp_path / "calls", str(tmp_path / "sweep")
    first = sweep_runs(3)
    run_sweep(first, CountingFn(calls), out, progress=None)
    assert executed(calls) == sorted(r.run_id for r in first)

    extra = sweep_runs(2, seed=1)
    messages: list[str] = []
    results = run_sweep(first + extra, CountingFn(calls), out, progress=messages.append)
    # The finished runs were not executed again; the new ones were, once each.
    assert executed(calls) == sorted(r.run_id for r in first + extra)
    assert [r.resumed for r in results] == [True, True, True, False, False]
    assert [r.run_id for r in results] == [r.run_id for r in first + extra]
    for run, result in zip(first + extra, results):
        assert result.results["eval"] == pytest.approx(known_losses(run.weights))
    assert any("5 runs, 3 already finished, 2 to run" in m for m in messages)
    assert sum("already finished, skipped" in m for m in messages) == 3

    # Same weights with another proxy config is another run.
    other = [SweepRun(weights=first[0].weights, config={**CONFIG, "steps": 20})]
    run_sweep(other, CountingFn(calls), out, progress=None)
    assert executed(calls) == sorted([r.run_id for r in first + extra] + [other[0].run_id])


def test_a_failing_run_keeps_the_others_and_a_rerun_executes_only_it(ray_session, tmp_path):
    calls, out = tmp_path / "calls", str(tmp_path / "sweep")
    runs = sweep_runs(4)
    bad = runs[1]
    with pytest.raises(SweepError) as info:
        run_sweep(runs, CountingFn(calls, fail_on=[bad.weights]), out, progress=None)
    err = info.value
    assert "3/4 runs finished" in str(err) and "1 failed" in str(err) and bad.run_id in str(err)
    assert "proxy diverged" in str(err)
    assert [r.status for r in err.results] == ["finished", "failed", "finished", "finished"]
    assert "RuntimeError: proxy diverged (on purpose)" in err.results[1].error
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(f"{r.run_id}.json" for r in runs if r is not bad)

    # raise_on_failure=False returns the same picture (and runs the failed one again, failing again).
    results = run_sweep(runs, CountingFn(calls, fail_on=[bad.weights]), out, progress=None, raise_on_failure=False)
    assert [r.ok for r in results] == [True, False, True, True]
    with pytest.raises(ValueError, match="no 'nope' dict"):
        results_table(results, key="nope")
    mix, losses, _ = results_table(results)  # failed runs are left out
    assert mix.shape == (3, 3)

    before = executed(calls)
    results = run_sweep(runs, CountingFn(calls), out, progress=None)  # the fixed run_fn
    after = executed(calls)
    new = list(after)
    for run_id in before:
        new.remove(run_id)
    assert new == [bad.run_id]
    assert all(r.ok for r in results) and [r.resumed for r in results] == [True, False, True, True]


def test_each_run_is_an_mlflow_child_run(ray_session, mlflow_uri, tmp_path):
    runs = sweep_runs(3)
    bad = runs[2]
    with mlflow.start_run(run_name="sweep-parent") as parent:
        results = run_sweep(runs, CountingFn(tmp_path / "calls", fail_on=[bad.weights]), str(tmp_path / "sweep"),
                            progress=None, raise_on_failure=False)
    client = mlflow.MlflowClient(mlflow_uri)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    by_run_id = {c.data.tags["maskmix.sweep_run_id"]: c for c in children}
    assert set(by_run_id) == {r.run_id for r in runs}
    for run, result in zip(runs, results):
        child = by_run_id[run.run_id]
        assert child.info.run_id == result.mlflow_run_id
        assert child.data.tags["maskmix.stage"] == "sweep_run"
        for d, w in run.weights.items():
            assert float(child.data.params[f"weights.{d}"]) == pytest.approx(w)
        assert child.data.params["config.steps"] == "10" and child.data.params["seed"] == "0"
        if run is bad:
            assert child.info.status == "FAILED"
            assert "proxy diverged" in child.data.tags["maskmix.error"]
            continue
        assert child.info.status == "FINISHED"
        for d, loss in known_losses(run.weights).items():
            assert child.data.metrics[f"eval.{d}"] == pytest.approx(loss)
        curve = client.get_metric_history(child.info.run_id, "losses")
        assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    parent_metrics = client.get_run(parent.info.run_id).data.metrics
    assert parent_metrics["sweep.runs"] == 3 and parent_metrics["sweep.failed"] == 1


def test_real_proxy_sweep(ray_session, tmp_path):
    """Two real tiny proxy trainings through proxy_run_fn, then a resume that trains nothing."""
    pytest.importorskip("mixing.proxy")
    from tests.training_fixtures import write_tiny_corpus

    corpus = write_tiny_corpus(tmp_path / "corpus", ["alpha", "beta"])
    proxy_cfg = {"steps": 3, "warmup_steps": 1, "batch_size": 4, "seq_len": 32, "eval_docs_per_domain": 2,
                 "mc_samples": 1}
    runs = [SweepRun(weights={"alpha": 0.8, "beta": 0.2}, config=proxy_cfg),
            SweepRun(weights={"alpha": 0.2, "beta": 0.8}, config=proxy_cfg)]
    fn = proxy_run_fn(corpus.manifest_path, proxy_cfg)
    results = run_sweep(runs, fn, str(tmp_path / "sweep"), progress=None)
    assert all(r.ok for r in results), [r.error for r in results]
    mix, losses, domains = results_table(results)
    assert domains == ["alpha", "beta"] and losses.shape == (2, 2) and np.isfinite(losses).all()
    assert len(results[0].results["losses"]) > 0
    again = run_sweep(runs, fn, str(tmp_path / "sweep"), progress=None)
    assert all(r.resumed for r in again)
