"""Tracking stores for the dashboard tests.

``build_real_store(root)`` fills a fresh sqlite MLflow store with REAL maskmix runs, the tiny demo
path plus the learned mixtures, all through the stage functions the CLI uses:

    harvest (demo corpus, 4 domains, ~100 kB each) -> pipeline (Ray Data) -> mix natural, uniform,
    doremi (tiny proxies), laws (a 5-run proxy sweep + fit) -> train (DeepSpeed, on the DoReMi
    mixture, with peak_flops so that train/mfu is logged) -> eval

``build_synthetic_store(uri, n_domains)`` logs runs with the real MLflow client in the shapes
the stages log (names from mixing/doremi.py, mixing/run.py, mixing/laws_run.py, pipelines/run.py,
training/trainer.py), for domain counts the tiny demo cannot reach (30).

Both leave MLflow's global state (tracking URI, active experiment, exported env vars) as found.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXPERIMENT = "dashboard-test"
_MLFLOW_EXPORTED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def mlflow_pointed_at(uri: str, experiment: str, artifact_root: Path):
    """MLflow's fluent API on ``uri`` / ``experiment`` (artifacts under ``artifact_root``), restored after."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    saved = {n: os.environ.get(n) for n in _MLFLOW_EXPORTED}
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=str(artifact_root / experiment))
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    mlflow.set_experiment(experiment)
    try:
        yield client
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        fluent._active_experiment_id = None
        mlflow.set_tracking_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class RealStore:
    uri: str
    experiment: str
    root: Path
    manifest: object
    mixtures: dict = field(default_factory=dict)  # method -> Mixture (as written to mixture.json)
    mixture_paths: dict = field(default_factory=dict)
    train_run_id: str = ""
    seconds: float = 0.0


def build_real_store(root: Path) -> RealStore:
    """Run the tiny demo path + DoReMi + mixing laws into ``sqlite:///<root>/mlflow.db``."""
    from infra.config import parse_config
    from infra.demo import demo_stage_configs
    from infra.stages import run_eval_stage, run_mix_stage, run_pipeline_stage, run_train_stage
    from pipelines.demo_corpus import harvest

    started = time.perf_counter()
    root = Path(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny_proxy = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8,
                      lr=3e-3, warmup_steps=1, eval_docs_per_domain=4, mc_samples=1)
    cfg = parse_config({
        "ray": {"num_cpus": 2},
        "tracking": {"uri": uri, "experiment": EXPERIMENT},
        "demo": {"output_dir": str(root / "demo"), "corpus": {"max_bytes_per_domain": 100_000},
                 "vocab_size": 400, "model_preset": "test", "train_steps": 6, "micro_batch_size": 4,
                 "seq_len": 64, "eval_docs_per_domain": 4},
    })
    cfg = demo_stage_configs(cfg)
    out = root / "demo"
    store = RealStore(uri=uri, experiment=EXPERIMENT, root=root, manifest=None)
    with mlflow_pointed_at(uri, EXPERIMENT, root / "mlruns"):
        harvest(str(out / "corpus"), domains=cfg.demo.corpus.domains,
                max_bytes_per_domain=cfg.demo.corpus.max_bytes_per_domain)
        # Two records the reader must quarantine (one per reason): the Data page counts them.
        with open(out / "corpus" / "code.jsonl", "a", encoding="utf-8") as f:
            f.write("this line is not JSON\n[1, 2, 3]\n")
        quiet = lambda _msg: None  # noqa: E731
        store.manifest, _ = run_pipeline_stage(cfg, progress=quiet)
        mix = type(cfg.mix).model_validate({
            **cfg.mix.model_dump(),
            "doremi": {"proxy": {**tiny_proxy, "steps": 5}, "rounds": 1, "max_epochs": 50.0},
            "laws": {"proxy": {**tiny_proxy, "steps": 3}, "n_mixtures": 6, "restarts": 1, "bootstrap_samples": 0,
                     "holdout_fraction": 0.0, "sampling": "dirichlet", "max_epochs": 50.0},
            "sweep": {"output_dir": str(out / "sweep")},
        })
        for method, kind in (("natural", "baseline"), ("uniform", "baseline"), ("doremi", "doremi"),
                             ("laws", "laws")):
            path = str(out / "mixtures" / f"{method}.json")
            mcfg = mix.model_copy(update={"output": path, **({"method": method} if kind == "baseline" else {})})
            store.mixtures[method] = run_mix_stage(cfg.model_copy(update={"mix": mcfg}), kind, progress=None)
            store.mixture_paths[method] = path
        train = cfg.train.model_copy(update={"mixture": store.mixture_paths["doremi"], "peak_flops": 1e12,
                                             "log_every": 2, "eval_every": 3, "export": False})
        tcfg = cfg.model_copy(update={"train": train})
        run_train_stage(tcfg, progress=quiet)
        run_eval_stage(tcfg)
        import mlflow

        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], "tags.`maskmix.stage` = 'train'")
        store.train_run_id = runs[0].info.run_id
    store.seconds = time.perf_counter() - started
    return store


_REAL: RealStore | None = None


def real_store(tmp_path_factory) -> RealStore:
    """``build_real_store`` once per test session, shared by every dashboard test module."""
    global _REAL
    if _REAL is None:
        _REAL = build_real_store(tmp_path_factory.mktemp("dashboard-store"))
    return _REAL


# --------------------------------------------------------------------------- synthetic shapes


def domain_names(n: int) -> list[str]:
    return [f"domain_{i:02d}" for i in range(n)]


def build_synthetic_store(uri: str, artifact_root: Path, n_domains: int, experiment: str = "synthetic",
                          steps: int = 4, seed: int = 0) -> dict:
    """Runs shaped like maskmix's, logged with MLflow's client; returns what was logged."""
    import mlflow

    rng = np.random.default_rng(seed)
    domains = domain_names(n_domains)
    natural = rng.dirichlet(np.ones(n_domains))
    final = rng.dirichlet(np.ones(n_domains))
    logged: dict = {"domains": domains, "natural": dict(zip(domains, natural.tolist())),
                    "final": dict(zip(domains, final.tolist()))}
    with mlflow_pointed_at(uri, experiment, artifact_root):
        with mlflow.start_run(run_name="mix", tags={"maskmix.stage": "mix", "maskmix.mix_method": "doremi"}) as mix:
            mixture = {"weights": logged["final"], "method": "doremi", "reference_weights": logged["natural"],
                       "manifest_sha256": "0" * 64, "tokenizer_sha256": "0" * 64, "mlflow_run_id": mix.info.run_id,
                       "details": {"caps": {d: 0.5 for d in domains},
                                   "round_split_half": [0.42], "split_half_limit": 0.1,
                                   "stability_warnings": ["doremi round 1: unstable weights (synthetic)"],
                                   "repetition": {"max_epochs": 4.0, "r_star": 15.4, "domains": {
                                       d: {"proportion": float(w), "epochs": float(8 * w), "tokens": 1.0,
                                           "effective_tokens": 1.0, "efficiency": 1.0, "exceeds_cap": bool(8 * w > 4),
                                           "cap": 0.5} for d, w in zip(domains, final)}}}}
            mlflow.log_dict(mixture, "mixture.json")
            mlflow.log_metrics({f"weight/{d}": w for d, w in logged["final"].items()})
            with mlflow.start_run(run_name="doremi", nested=True, tags={"maskmix.stage": "doremi"}):
                with mlflow.start_run(run_name="doremi_round", nested=True,
                                      tags={"maskmix.stage": "doremi_round"}) as rnd:
                    trajectory = [dict(zip(domains, rng.dirichlet(np.ones(n_domains)).tolist()))
                                  for _ in range(steps)]
                    excess = [dict(zip(domains, rng.random(n_domains).tolist())) for _ in range(steps)]
                    for s in range(steps):
                        mlflow.log_metrics({**{f"doremi/weight/{d}": w for d, w in trajectory[s].items()},
                                            **{f"doremi/excess/{d}": e for d, e in excess[s].items()}}, step=s)
                    logged["trajectory"], logged["excess"], logged["round_run_id"] = trajectory, excess, rnd.info.run_id
        logged["mix_run_id"] = mix.info.run_id
        with mlflow.start_run(run_name="laws_fit", tags={"maskmix.stage": "laws_fit"}):
            t = rng.normal(size=(n_domains, n_domains))
            mlflow.log_dict({"domains": domains, "val_domains": domains, "c": [1.0] * n_domains,
                             "k": [1.0] * n_domains, "t": t.tolist()}, "laws_params.json")
            logged["t"] = t
        with mlflow.start_run(run_name="pipeline", tags={"maskmix.stage": "pipeline"}) as pipe:
            before = rng.integers(50, 100, n_domains)
            after = before - rng.integers(0, 50, n_domains)
            mlflow.log_metrics({**{f"read/docs_out/{d}": int(b) for d, b in zip(domains, before)},
                                **{f"exact_dedup/docs_in/{d}": int(b) for d, b in zip(domains, before)},
                                **{f"exact_dedup/docs_out/{d}": int(a) for d, a in zip(domains, after)}})
            logged["before"], logged["after"], logged["pipeline_run_id"] = before, after, pipe.info.run_id
        with mlflow.start_run(run_name="train", tags={"maskmix.stage": "train"}) as train:
            for s in range(1, steps + 1):
                mlflow.log_metrics({"train/loss": 5.0 / s, "train/tokens_per_s": 1000.0 + s,
                                    **{f"train/loss/{d}": 5.0 / s + i for i, d in enumerate(domains)}}, step=s)
            logged["train_run_id"] = train.info.run_id
    return logged


def json_artifact(client, run_id: str, path: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
