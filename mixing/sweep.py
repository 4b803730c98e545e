"""Sweeps: many small proxy trainings in parallel on Ray, one MLflow child run each, resumable.

    runs = [SweepRun(weights=w, config=proxy_cfg, seed=0) for w in mixtures]
    results = run_sweep(runs, proxy_run_fn(manifest_uri, proxy_cfg), "out/sweep")
    mixtures, losses, domains = results_table(results)      # plain arrays for mixing.laws

Each run is a Ray task calling ``run_fn(weights, run_id) -> dict`` (JSON-able). A run is known by
its ``run_id``, a hash of its weights, its proxy config and its seed, so the same run is recognized
across invocations. When it finishes, its result is written to ``<output_dir>/runs/<run_id>.json``
(temp file + rename locally, one PUT on s3://, so the file exists only for a finished run;
``output_dir`` may be local or s3://, through infra.storage); a later invocation skips every
run whose file exists. A crash therefore loses only the runs that were in flight. A run that
raises is recorded as failed (with its error) and does not stop the others; it has no result
file, so the next invocation runs it again.

With an active MLflow run (the parent), each run is a child run (tag ``maskmix.stage=sweep_run``,
params = weights, config and seed, metrics = the numbers of its result). The Ray worker logs it
itself, to the tracking URI and parent run id the driver passes in, so whatever ``run_fn`` logs
through ``infra.tracking`` lands in that child run too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import mlflow
import numpy as np
import ray

from infra import tracking
from infra.cluster import ensure_ray
from infra.config import RayConfig, StorageConfig
from infra.errors import MaskmixError
from infra.storage import Storage, is_s3, join

RunFn = Callable[[dict[str, float], str], dict[str, Any]]

STAGE_TAG = "sweep_run"
RUN_ID_TAG = "maskmix.sweep_run_id"
# Weights are hashed rounded: 0.1 + 0.2 and 0.3 are the same mixture.
_WEIGHT_DECIMALS = 10


def sweep_run_id(weights: dict[str, float], config: dict | None = None, seed: int = 0) -> str:
    """Stable id of a run: sha256 of its (rounded) weights, its proxy config and its seed."""
    key = {
        "weights": {d: round(float(w), _WEIGHT_DECIMALS) + 0.0 for d, w in sorted(weights.items())},
        "config": config or {},
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepRun:
    """One proxy training: mixture weights, the proxy config (JSON-able dict) and a seed."""

    weights: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def run_id(self) -> str:
        return sweep_run_id(self.weights, self.config, self.seed)


@dataclass
class SweepResult:
    run_id: str
    weights: dict[str, float]
    status: str  # "finished" | "failed"
    results: dict[str, Any] | None = None
    error: str | None = None
    resumed: bool = False  # finished by an earlier invocation (read from its result file)
    wall_s: float = 0.0
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished"


class SweepError(MaskmixError):
    """Some runs failed; ``results`` holds every run's SweepResult (in input order) all the same."""

    def __init__(self, message: str, results: list[SweepResult]):
        super().__init__(message)
        self.results = results


def result_path(output_dir: str, run_id: str) -> str:
    return join(output_dir, "runs", f"{run_id}.json")


def _write_atomic(path: str, obj: dict, storage: Storage | None = None) -> None:
    if is_s3(path):
        # The resume state on S3 (mix.sweep.output_dir: s3://...): os.* would create a local
        # "s3:" folder. One PUT is atomic: the object exists only once the run has finished.
        (storage or Storage()).write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _numeric_metrics(results: dict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scalars of a (nested) result as MLflow metrics; lists of numbers as step series (loss curves)."""
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    for key, value in tracking.flatten(results).items():
        key = key.replace("/", ".")  # domain names may hold characters MLflow metric keys forbid
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            scalars[key] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            series[key] = [float(v) for v in value]
    return scalars, series


def _log_child_metrics(client: mlflow.MlflowClient, child_id: str, results: dict) -> None:
    from mlflow.entities import Metric

    scalars, series = _numeric_metrics(results)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in scalars.items()]
    metrics += [Metric(k, v, now, step) for k, values in series.items()
                for step, v in enumerate(values) if math.isfinite(v)]
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(child_id, metrics=metrics[start:start + 1000])


def execute_run(run_fn: RunFn, run: SweepRun, run_id: str, tracking_ctx: dict | None) -> dict:
    """Run one sweep run (inside a Ray task); never raises: a failure comes back as a record.

    With ``tracking_ctx`` ({"uri", "experiment_id", "parent_run_id"}) the run is an MLflow child
    run of the parent, active while ``run_fn`` executes.
    """
    start = time.time()
    record: dict[str, Any] = {"run_id": run_id, "weights": dict(run.weights), "config": run.config,
                              "seed": run.seed, "mlflow_run_id": None}
    active = None
    try:
        if tracking_ctx:
            mlflow.set_tracking_uri(tracking_ctx["uri"])
            tags = {"mlflow.parentRunId": tracking_ctx["parent_run_id"], "maskmix.stage": STAGE_TAG,
                    RUN_ID_TAG: run_id}
            active = mlflow.start_run(experiment_id=tracking_ctx["experiment_id"], run_name=f"sweep-{run_id}",
                                      tags=tags)
            record["mlflow_run_id"] = active.info.run_id
            tracking.log_params({"weights": dict(run.weights), "config": run.config, "seed": run.seed,
                                 "sweep_run_id": run_id})
        results = run_fn(dict(run.weights), run_id)
        if not isinstance(results, dict):
            raise TypeError(f"run_fn must return a dict, got {type(results).__name__}")
        json.dumps(results)  # a result that cannot be stored is a failure of this run, not of the sweep
        record.update(status="finished", results=results, error=None)
        if active is not None:
            _log_child_metrics(mlflow.MlflowClient(), active.info.run_id, results)
            tracking.log_metrics({"wall_s": time.time() - start})
    except Exception as e:  # noqa: BLE001 - a failing run is recorded, the sweep goes on
        record.update(status="failed", results=None,
                      error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
        if active is not None:
            tracking.set_tags({"maskmix.error": f"{type(e).__name__}: {e}"[:5000]})
    finally:
        if active is not None:
            mlflow.end_run("FINISHED" if record.get("status") == "finished" else "FAILED")
    record["wall_s"] = time.time() - start
    return record


@ray.remote
def _execute_remote(run_fn: RunFn, run: SweepRun, run_id: str, tracking_ctx: dict | None) -> dict:
    return execute_run(run_fn, run, run_id, tracking_ctx)


def _tracking_context() -> dict | None:
    parent = mlflow.active_run()
    if parent is None:
        return None
    return {"uri": mlflow.get_tracking_uri(), "experiment_id": parent.info.experiment_id,
            "parent_run_id": parent.info.run_id}


def _from_record(record: dict, resumed: bool = False) -> SweepResult:
    return SweepResult(run_id=record["run_id"], weights=record["weights"], status=record["status"],
                       results=record.get("results"), error=record.get("error"), resumed=resumed,
                       wall_s=float(record.get("wall_s", 0.0)), mlflow_run_id=record.get("mlflow_run_id"))


def load_finished(output_dir: str, run_id: str, storage: Storage | None = None) -> SweepResult | None:
    path = result_path(output_dir, run_id)
    if is_s3(path):
        try:
            return _from_record(json.loads((storage or Storage()).read_bytes(path)), resumed=True)
        except FileNotFoundError:
            return None
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return _from_record(json.load(f), resumed=True)


def run_sweep(runs: list[SweepRun], run_fn: RunFn, output_dir: str, ray_cfg: RayConfig | None = None,
              max_parallel: int | None = None, cpus_per_run: float = 1, progress: Callable[[str], None] | None = print,
              raise_on_failure: bool = True, storage: StorageConfig | None = None) -> list[SweepResult]:
    """Run every run not finished yet as a Ray task; return a SweepResult per run, in input order.

    ``output_dir`` is a local (or shared) folder or an s3:// URI (reached with ``storage``):
    ``runs/<run_id>.json`` per finished run is the resume state. Runs with the same id execute
    once. With failures, raises SweepError (holding all results) unless ``raise_on_failure`` is False.
    """
    say = progress or (lambda _msg: None)
    store = Storage(storage)
    if not is_s3(output_dir):  # S3 has no folders to create
        os.makedirs(os.path.join(output_dir, "runs"), exist_ok=True)
    ids = [r.run_id for r in runs]
    by_id: dict[str, SweepResult] = {}
    todo: dict[str, SweepRun] = {}
    for run, run_id in zip(runs, ids):
        if run_id in by_id or run_id in todo:
            continue
        done = load_finished(output_dir, run_id, store)
        if done is not None:
            by_id[run_id] = done
            say(f"sweep: run {run_id} already finished, skipped ({result_path(output_dir, run_id)})")
        else:
            todo[run_id] = run
    say(f"sweep: {len(by_id) + len(todo)} runs, {len(by_id)} already finished, {len(todo)} to run")

    if todo:
        ensure_ray(ray_cfg)
        ctx = _tracking_context()
        remote = _execute_remote.options(num_cpus=cpus_per_run, max_retries=0)
        fn_ref = ray.put(run_fn)  # shipped once, not once per task
        pending = list(todo.items())
        in_flight: dict[ray.ObjectRef, str] = {}
        limit = max_parallel or len(pending)
        finished = 0
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                run_id, run = pending.pop(0)
                in_flight[remote.remote(fn_ref, run, run_id, ctx)] = run_id
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                run_id = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died (OOM, killed node ...)
                    run = todo[run_id]
                    record = {"run_id": run_id, "weights": dict(run.weights), "status": "failed",
                              "error": f"{type(e).__name__}: {e}"}
                if record["status"] == "finished":
                    _write_atomic(result_path(output_dir, run_id), record, store)
                finished += 1
                result = _from_record(record)
                by_id[run_id] = result
                if result.ok:
                    say(f"sweep: [{finished}/{len(todo)}] run {run_id} finished in {result.wall_s:.1f}s")
                else:
                    say(f"sweep: [{finished}/{len(todo)}] run {run_id} FAILED: {result.error.splitlines()[0]}")

    results = [by_id[run_id] for run_id in ids]
    failed = [r for r in {r.run_id: r for r in results}.values() if not r.ok]
    n_unique = len(set(ids))
    summary = (f"sweep: {n_unique - len(failed)}/{n_unique} runs finished "
               f"({sum(r.resumed for r in by_id.values())} from earlier invocations), {len(failed)} failed")
    say(summary)
    tracking.log_metrics({"sweep.runs": n_unique, "sweep.failed": len(failed)})
    if failed:
        lines = "\n".join(f"  {r.run_id}: {r.error.splitlines()[0] if r.error else '?'}" for r in failed)
        message = f"{summary}; re-run to retry them (finished runs are kept in {join(output_dir, 'runs')}):\n{lines}"
        if raise_on_failure:
            raise SweepError(message, results)
    return results


# --------------------------------------------------------------------------- for the mixing laws


def results_table(results: list[SweepResult], key: str = "eval", domains: list[str] | None = None,
                  eval_domains: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Finished results as arrays for ``mixing.laws``: (mixtures n×M, losses n×K, domain names).

    ``results[i].results[key]`` is a dict {validation domain: loss} (a number, or a dict with
    ``nats_per_token``). Failed runs are left out. Columns of both arrays follow ``domains``
    (default: the sorted mixture domains); ``eval_domains`` picks other loss columns.
    """
    done = [r for r in results if r.ok]
    if not done:
        raise ValueError("no finished runs to tabulate")
    domains = list(domains or sorted(done[0].weights))
    eval_domains = list(eval_domains or domains)
    mixtures = np.array([[float(r.weights.get(d, 0.0)) for d in domains] for r in done])
    rows = []
    for r in done:
        per_domain = r.results.get(key) if r.results else None
        if not isinstance(per_domain, dict):
            raise ValueError(f"run {r.run_id} has no {key!r} dict in its results")
        missing = [d for d in eval_domains if d not in per_domain]
        if missing:
            raise ValueError(f"run {r.run_id} has no {key!r} value for {missing}")
        rows.append([float(v["nats_per_token"] if isinstance(v, dict) else v)
                     for v in (per_domain[d] for d in eval_domains)])
    return mixtures, np.array(rows), domains


# --------------------------------------------------------------------------- real proxy runs


class ProxyRunFn:
    """``run_fn`` for real sweeps: trains one proxy (mixing.proxy.train_proxy) on the weights.

    Picklable (Ray ships it to the workers); mixing.proxy is imported in the worker, when a run
    starts. Returns per-domain eval (nats/token and the rest of DomainEval), the loss curve, the
    per-domain loss curves and the wall time.
    """

    def __init__(self, manifest_uri: str, proxy_cfg: dict, storage_cfg: StorageConfig | dict | None = None):
        self.manifest_uri = manifest_uri
        self.proxy_cfg = dict(proxy_cfg)
        self.storage_cfg = storage_cfg.model_dump() if isinstance(storage_cfg, StorageConfig) else storage_cfg

    def __call__(self, weights: dict[str, float], run_id: str) -> dict[str, Any]:
        from infra.config import ProxyConfig
        from infra.contracts import load_manifest
        from infra.storage import Storage
        from mixing.proxy import train_proxy

        storage_cfg = StorageConfig(**self.storage_cfg) if self.storage_cfg else None
        storage = Storage(storage_cfg)
        manifest = load_manifest(self.manifest_uri, storage)
        manifest_dir = posixpath.dirname(self.manifest_uri) if "://" in self.manifest_uri \
            else os.path.dirname(os.path.abspath(self.manifest_uri))
        result = train_proxy(manifest, manifest_dir, weights, ProxyConfig(**self.proxy_cfg), storage=storage)
        return {
            "eval": {d: _to_jsonable(e) for d, e in result.eval.items()},
            "losses": _to_jsonable(result.losses),
            "per_domain_curve": _to_jsonable(result.per_domain_curve),
            "proxy_wall_s": float(result.wall_s),
        }


def proxy_run_fn(manifest_uri: str, proxy_cfg_dict: dict, storage_cfg: StorageConfig | dict | None = None) -> ProxyRunFn:
    return ProxyRunFn(manifest_uri, proxy_cfg_dict, storage_cfg)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return _to_jsonable(value.to_dict())
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
