"""Mixing laws end to end: sample mixtures -> proxy sweep -> fit the law -> capped optimum.

Called by ``mixing.run.run_mix(method="laws")`` inside its "mix" MLflow run:

1. Repetition caps. Each domain's cap is min(1, max_epochs · U_i / D) (mixing.repetition), with
   U_i the manifest's training tokens of domain i and D the token budget. D is what one proxy run
   reads, ``proxy.steps × proxy.batch_size × proxy.seq_len``: the law is fitted at that scale,
   so the caps keep both the sampled mixtures and the optimum within max_epochs there. (For a
   larger target run, rerun with its budget in mind: the caps only loosen as U_i / D grows.)
2. ``laws.n_mixtures`` mixtures (double-diminishing or Dirichlet, ``laws.seed``) under the caps.
3. One proxy training per mixture through ``mixing.sweep.run_sweep`` into ``sweep.output_dir``
   (resumable: finished runs are skipped on a rerun), each a "sweep_run" child run.
4. ``MixingLaw.fit`` on the per-domain validation losses, then ``optimize`` for
   ``laws.target_weights`` under the caps and ``bootstrap`` intervals; logged in a "laws_fit"
   child run (held-out error metrics, the t_ij matrix, predicted losses with intervals).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from infra import tracking
from infra.config import MixConfig, RayConfig, StorageConfig
from infra.contracts import Manifest, Mixture, artifact_sha256
from infra.errors import ConfigError
from mixing.baselines import natural_weights
from mixing.laws import MixingLaw
from mixing.repetition import max_proportions, repetition_report
from mixing.sampling import sample_mixtures
from mixing.sweep import SweepRun, proxy_run_fn, results_table, run_sweep


def token_budget(cfg: MixConfig) -> int:
    """Tokens one proxy run reads: steps × batch × seq_len (the scale the law is fitted at)."""
    p = cfg.laws.proxy
    return p.steps * p.batch_size * p.seq_len


def _flat_errors(prefix: str, errors: dict | None, domains: list[str]) -> dict[str, float]:
    if not errors:
        return {}
    out = {f"{prefix}/{k}": float(v) for k, v in errors.items() if isinstance(v, (int, float))}
    out |= {f"{prefix}/mae/{d}": float(v) for d, v in zip(domains, errors.get("per_domain_mae", []))}
    return out


def run_laws(manifest: Manifest, cfg: MixConfig, storage_cfg: StorageConfig | None = None,
             ray_cfg: RayConfig | None = None, progress: Callable[[str], None] = print) -> Mixture:
    laws = cfg.laws
    domains = manifest.domain_names()
    if len(domains) < 2:
        raise ConfigError(f"mixing laws need at least 2 domains, {cfg.manifest} has {len(domains)}")
    unique = np.array([manifest.domains[d].tokens("train") for d in domains], dtype=float)
    if np.any(unique <= 0):
        empty = [d for d, u in zip(domains, unique) if u <= 0]
        raise ConfigError(f"domains without training tokens in {cfg.manifest}: {empty}")
    budget = token_budget(cfg)
    try:
        caps = max_proportions(unique, budget, laws.max_epochs) if laws.max_epochs else None
    except ValueError as e:
        raise ConfigError(f"mix.laws.max_epochs: {e}") from None
    if laws.target_weights is not None:
        unknown = sorted(set(laws.target_weights) - set(domains))
        if unknown:
            raise ConfigError(f"mix.laws.target_weights names domains not in the manifest: {unknown}")
    if laws.n_mixtures < len(domains) + 1:
        raise ConfigError(f"mix.laws.n_mixtures={laws.n_mixtures}: the law has {len(domains) + 1} parameters "
                          f"per domain, sample at least that many mixtures")

    mixtures = sample_mixtures(laws.sampling, len(domains), laws.n_mixtures, caps=caps, seed=laws.seed,
                               concentration=laws.dirichlet_concentration, include_vertices=laws.include_vertices)
    proxy = laws.proxy.model_dump()
    runs = [SweepRun(weights={d: float(w) for d, w in zip(domains, row)}, config=proxy, seed=laws.seed)
            for row in mixtures]
    progress(f"laws: {len(runs)} mixtures ({laws.sampling}), {laws.proxy.steps} proxy steps each, "
             f"budget {budget} tokens, caps {None if caps is None else np.round(caps, 4).tolist()}")
    results = run_sweep(runs, proxy_run_fn(cfg.manifest, proxy, storage_cfg), cfg.sweep.output_dir, ray_cfg,
                        max_parallel=cfg.sweep.max_parallel, cpus_per_run=cfg.sweep.cpus_per_run,
                        progress=progress, storage=storage_cfg)  # sweep.output_dir may be s3://
    x, y, _ = results_table(results, domains=domains)

    with tracking.stage_run("laws_fit", params={"n_runs": len(x), "budget_tokens": budget}):
        law = MixingLaw(domains, domains).fit(x, y, restarts=laws.restarts, huber_delta=laws.huber_delta,
                                              holdout_fraction=laws.holdout_fraction, seed=laws.seed)
        report = law.report
        if laws.bootstrap_samples >= 2:
            boot = law.bootstrap(x, y, n_boot=laws.bootstrap_samples, seed=laws.seed,
                                 target_weights=laws.target_weights, caps=caps, huber_delta=laws.huber_delta)
            opt = boot.optimum
            intervals = {"level": boot.level, "n_failed": boot.n_failed,
                         "loss": {d: boot.loss_interval[i].tolist() for i, d in enumerate(domains)},
                         "overall": boot.overall_interval.tolist(),
                         "weights": {d: boot.weight_interval[j].tolist() for j, d in enumerate(domains)}}
        else:
            opt = law.optimize(laws.target_weights, caps, seed=laws.seed)
            intervals = None
        predicted = {d: float(opt.predicted_losses[i]) for i, d in enumerate(domains)}
        fit = {"in_sample": report.in_sample, "held_out": report.held_out, "n_train": report.n_train,
               "n_holdout": report.n_holdout, "cost": list(report.cost), "restarts": report.restarts}
        params = {"domains": domains, "val_domains": domains, "c": law.c.tolist(), "k": law.k.tolist(),
                  "t": law.t.tolist()}
        tracking.log_metrics(_flat_errors("fit/in_sample", report.in_sample, domains)
                             | _flat_errors("fit/held_out", report.held_out, domains)
                             | {f"predicted/{d}": v for d, v in predicted.items()}
                             | {"predicted/overall": opt.predicted_overall})
        if intervals:
            tracking.log_metrics({f"predicted/{d}/{side}": intervals["loss"][d][i]
                                  for d in domains for i, side in enumerate(("lo", "hi"))})
        tracking.log_json(params, "laws_params.json")
        tracking.log_json({"fit": fit, "predicted_losses": predicted, "predicted_overall": opt.predicted_overall,
                           "intervals": intervals}, "laws_fit.json")

    weights = np.clip(opt.weights, 0.0, None)
    weights = weights / weights.sum()
    repetition = repetition_report(weights, unique, budget, laws.max_epochs, laws.r_star, domains).to_dict()
    return Mixture(
        weights={d: float(w) for d, w in zip(domains, weights)}, method="laws",
        reference_weights=natural_weights(manifest), manifest_sha256=artifact_sha256(manifest),
        tokenizer_sha256=manifest.tokenizer.sha256,
        details={
            "fit": fit, "law": params, "predicted_losses": predicted, "predicted_overall": opt.predicted_overall,
            "intervals": intervals, "target_weights": dict(zip(domains, opt.target_weights.tolist())),
            "caps": None if caps is None else dict(zip(domains, caps.tolist())), "optimizer_success": opt.success,
            "budget_tokens": budget, "budget_rule": "proxy.steps * proxy.batch_size * proxy.seq_len",
            "repetition": repetition, "n_runs": int(len(x)), "sampling": laws.sampling,
            "sweep_output_dir": cfg.sweep.output_dir, "proxy": proxy,
        },
    )
