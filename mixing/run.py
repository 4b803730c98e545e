"""`maskmix mix baseline|doremi|laws`: one MLflow "mix" run per invocation, mixture.json out.

    mixture = run_mix(cfg.mix, cfg.storage, cfg.ray, method="laws")

Every method writes ``cfg.output`` (a ``Mixture``, DESIGN.md), logs it as the run's
``mixture.json`` artifact and one ``weight/<domain>`` metric per domain. The learned methods nest
their work under the "mix" run: DoReMi a "doremi" run with its rounds, mixing laws the sweep's
"sweep_run" children and a "laws_fit" child (mixing/laws_run.py). DoReMi also writes
``<output stem>.doremi.json`` in DoReMi's own JSON shape (train/eval domain weights).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Callable

from infra import tracking
from infra.config import MixConfig, RayConfig, StorageConfig
from infra.contracts import Mixture, distribution_problem, load_manifest, write_artifact
from infra.errors import ConfigError
from infra.storage import Storage

METHODS = ("baseline", "doremi", "laws")


def manifest_dir(manifest_uri: str) -> str:
    """The folder shard paths of a manifest are relative to (local or s3://)."""
    if "://" in manifest_uri:
        return posixpath.dirname(manifest_uri)
    return os.path.dirname(os.path.abspath(manifest_uri))


def doremi_export_path(output: str) -> str:
    """mixtures/doremi.json -> mixtures/doremi.doremi.json (same folder, DoReMi's JSON shape)."""
    stem, ext = (posixpath if "://" in output else os.path).splitext(output)
    return f"{stem}.doremi{ext or '.json'}"


def _params(cfg: MixConfig, method: str) -> dict:
    # "method" is what the mixture's method will be (natural | uniform | temperature | doremi | laws).
    params = {"method": cfg.method if method == "baseline" else method, "mix_method": method,
              "manifest": cfg.manifest, "output": cfg.output}
    if method == "baseline":
        if cfg.method == "temperature":
            params["temperature"] = cfg.temperature
    elif method == "doremi":
        params["doremi"] = cfg.doremi.model_dump()
    else:
        params["laws"] = cfg.laws.model_dump()
        params["sweep"] = cfg.sweep.model_dump()
    return params


def check_weights(given: dict[str, float] | None, key: str, manifest) -> None:
    """A mixture given in the config must be a distribution over the manifest's domains.

    Checked before the "mix" run opens: a misspelled domain or weights that do not sum to 1 used to
    surface minutes later, as a ValueError traceback from inside the proxy runs, with a FAILED run.
    """
    if not isinstance(given, dict):
        return  # "natural" / "uniform" / None
    unknown = sorted(set(given) - set(manifest.domain_names()))
    if unknown:
        raise ConfigError(f"{key} names domains that are not in the manifest: {unknown} "
                          f"(its domains: {sorted(manifest.domain_names())})")
    problem = distribution_problem(given)
    if problem:
        raise ConfigError(f"{key}: {problem}")


def run_mix(cfg: MixConfig, storage_cfg: StorageConfig | None = None, ray_cfg: RayConfig | None = None,
            method: str = "baseline", progress: Callable[[str], None] | None = print) -> Mixture:
    """Compute a mixture with ``method`` (baseline: ``cfg.method``), write it, log it as a "mix" run."""
    if method not in METHODS:
        raise ConfigError(f"unknown mix method {method!r}; choose from {', '.join(METHODS)}")
    say = progress or (lambda _msg: None)
    storage = Storage(storage_cfg)
    manifest = load_manifest(cfg.manifest, storage)
    if method == "doremi":
        check_weights(cfg.doremi.reference_weights, "mix.doremi.reference_weights", manifest)
    elif method == "laws":
        check_weights(cfg.laws.target_weights, "mix.laws.target_weights", manifest)
    export = None
    with tracking.stage_run("mix", params=_params(cfg, method), tags={"maskmix.mix_method": method}):
        run_id = tracking.active_run_id()
        if method == "baseline":
            from mixing.baselines import baseline_mixture

            mixture = baseline_mixture(manifest, cfg.method, temperature=cfg.temperature)
        elif method == "doremi":
            from mixing.doremi import run_doremi

            say(f"doremi: up to {cfg.doremi.rounds} round(s) of {cfg.doremi.proxy.steps} proxy steps")
            result = run_doremi(manifest, manifest_dir(cfg.manifest), cfg.doremi, storage)
            for warning in result.stability_warnings():
                say("warning: " + warning)
            mixture = result.to_mixture(manifest)
            export = result.to_doremi_json()
        else:
            from mixing.laws_run import run_laws

            mixture = run_laws(manifest, cfg, storage_cfg, ray_cfg, say)
        mixture = mixture.model_copy(update={"mlflow_run_id": run_id})
        write_artifact(mixture, cfg.output, storage)
        tracking.log_json(mixture.model_dump(mode="json"), "mixture.json")
        tracking.log_metrics({f"weight/{d}": w for d, w in mixture.weights.items()})
        if export is not None:
            path = doremi_export_path(cfg.output)
            storage.write_bytes(path, (json.dumps(export, indent=2, sort_keys=True) + "\n").encode())
            tracking.log_json(export, "doremi_weights.json")
            tracking.set_tags({"maskmix.doremi_export": path})
    return mixture
