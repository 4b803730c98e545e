"""Baseline mixtures: uniform over domains, natural proportions (by training tokens), and
temperature-scaled proportions between the two (w_i ∝ n_i^(1/τ), as in multilingual pretraining).

These are the references that learned mixtures (DoReMi, mixing laws) are compared against, and
DoReMi's default reference weights.
"""

from __future__ import annotations

import math

from infra import tracking
from infra.config import MixConfig, StorageConfig
from infra.contracts import Manifest, Mixture, artifact_sha256


def uniform_weights(manifest: Manifest) -> dict[str, float]:
    names = manifest.domain_names()
    return {d: 1.0 / len(names) for d in names}


def natural_weights(manifest: Manifest) -> dict[str, float]:
    tokens = {d: manifest.domains[d].tokens("train") for d in manifest.domain_names()}
    total = sum(tokens.values())
    if total == 0:
        raise ValueError("manifest has no training tokens; natural proportions are undefined")
    return {d: n / total for d, n in tokens.items()}


def temperature_weights(manifest: Manifest, temperature: float = 1.0) -> dict[str, float]:
    """w_i ∝ n_i^(1/τ) over training tokens n_i: τ = 1 is natural, τ → ∞ uniform, τ < 1 sharpens."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    natural = natural_weights(manifest)
    # Scale from the proportions, in log space: n_i^(1/τ) overflows for large n and small τ.
    logs = {d: math.log(p) / temperature for d, p in natural.items() if p > 0}
    top = max(logs.values())
    scaled = {d: (math.exp(logs[d] - top) if d in logs else 0.0) for d in natural}
    total = sum(scaled.values())
    return {d: v / total for d, v in scaled.items()}


BASELINES = {"uniform": uniform_weights, "natural": natural_weights, "temperature": temperature_weights}


def baseline_mixture(manifest: Manifest, method: str, temperature: float = 1.0) -> Mixture:
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {sorted(BASELINES)}")
    options = {"temperature": temperature} if method == "temperature" else {}
    weights = BASELINES[method](manifest, **options)
    # Round-off can leave the sum a hair away from 1; renormalize the last domain.
    last = sorted(weights)[-1]
    weights[last] = 1.0 - sum(w for d, w in weights.items() if d != last)
    return Mixture(
        weights=weights, method=method, reference_weights=natural_weights(manifest),
        manifest_sha256=artifact_sha256(manifest), tokenizer_sha256=manifest.tokenizer.sha256,
        mlflow_run_id=tracking.active_run_id(),
        details={"train_tokens": {d: manifest.domains[d].tokens("train") for d in manifest.domain_names()},
                 **options},
    )


def run_mix(cfg: MixConfig, storage_cfg: StorageConfig | None = None) -> Mixture:
    """`maskmix mix baseline`: compute the configured baseline, write mixture.json, log a "mix" run."""
    from mixing.run import run_mix as run

    return run(cfg, storage_cfg, method="baseline", progress=None)
