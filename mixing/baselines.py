"""Baseline mixtures: uniform over domains, and natural proportions (by training tokens).

These are the references that learned mixtures (DoReMi, mixing laws) are compared against, and
DoReMi's default reference weights.
"""

from __future__ import annotations

from infra import tracking
from infra.config import MixConfig, StorageConfig
from infra.contracts import Manifest, Mixture, artifact_sha256, load_manifest, write_artifact
from infra.storage import Storage


def uniform_weights(manifest: Manifest) -> dict[str, float]:
    names = manifest.domain_names()
    return {d: 1.0 / len(names) for d in names}


def natural_weights(manifest: Manifest) -> dict[str, float]:
    tokens = {d: manifest.domains[d].tokens("train") for d in manifest.domain_names()}
    total = sum(tokens.values())
    if total == 0:
        raise ValueError("manifest has no training tokens; natural proportions are undefined")
    return {d: n / total for d, n in tokens.items()}


BASELINES = {"uniform": uniform_weights, "natural": natural_weights}


def baseline_mixture(manifest: Manifest, method: str) -> Mixture:
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {sorted(BASELINES)}")
    weights = BASELINES[method](manifest)
    # Round-off can leave the sum a hair away from 1; renormalize the last domain.
    last = sorted(weights)[-1]
    weights[last] = 1.0 - sum(w for d, w in weights.items() if d != last)
    return Mixture(
        weights=weights, method=method, reference_weights=natural_weights(manifest),
        manifest_sha256=artifact_sha256(manifest), tokenizer_sha256=manifest.tokenizer.sha256,
        mlflow_run_id=tracking.active_run_id(),
        details={"train_tokens": {d: manifest.domains[d].tokens("train") for d in manifest.domain_names()}},
    )


def run_mix(cfg: MixConfig, storage_cfg: StorageConfig | None = None) -> Mixture:
    """`maskmix mix`: compute the configured mixture, write mixture.json, log it as an MLflow run."""
    storage = Storage(storage_cfg)
    manifest = load_manifest(cfg.manifest, storage)
    with tracking.stage_run("mix", params={"method": cfg.method, "manifest": cfg.manifest, "output": cfg.output}):
        mixture = baseline_mixture(manifest, cfg.method)
        write_artifact(mixture, cfg.output, storage)
        tracking.log_json(mixture.model_dump(mode="json"), "mixture.json")
        tracking.log_metrics({f"weight/{d}": w for d, w in mixture.weights.items()})
    return mixture
