"""One training function, three ways to run it: in this process, as local ranks, on a Ray cluster.

    result = launch(train_cfg, storage_cfg, ray_cfg, progress=print)

``train_cfg.launch`` (infra.config.LaunchConfig) picks the way:

  local     ``training.trainer.train`` in this process, one rank.
  torchrun  ``python -m torch.distributed.run --nproc_per_node N ... -m training.launch worker
            --config <run>/launch.json``: N ranks on this machine. torchrun sets RANK / WORLD_SIZE /
            MASTER_*, and train() builds its process group from them. Each rank's output is kept in
            <output_dir>/launch/<run>/logs; rank 0's progress lines are streamed to ``progress``.
  ray       Ray Train's TorchTrainer: N workers on embedded Ray (infra.cluster.ensure_ray) or on the
            cluster of ray.address. Ray sets up the process group (gloo on CPU, NCCL on GPU) and
            every worker calls train(), with DeepSpeed inside, the way a team scales to many GPUs.

In every mode the DeepSpeed checkpoint lands in train.output_dir, as with a plain train() call.

Tracking: the caller owns the MLflow run (infra.stages opens it). The workers get its tracking
URI and run id; rank 0 attaches to that same run (``mlflow.start_run(run_id=...)``) and logs what
train() logs; the other ranks log nothing. With no active run nothing is logged, as with train().

The result is the world's: ``TrainResult.losses`` are global-batch losses (the mean of the ranks'
losses; ranks hold equally many fully packed rows), i.e. what a single process of the whole batch
reports, and ``tokens_seen`` counts all ranks (train() already does).

A failing rank raises ``LaunchError`` naming the rank and ending with the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

from infra.config import LaunchConfig, RayConfig, StorageConfig, TrainConfig
from infra.errors import ConfigError, MaskmixError
from infra.storage import Storage, is_s3

if TYPE_CHECKING:  # imported lazily at run time: `maskmix --help` must not import torch
    from training.trainer import TrainResult

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Marks rank 0's progress lines in the torchrun output stream (everything else is log noise).
PROGRESS_MARK = "[maskmix-progress] "
RESULT_FILE = "result.json"  # rank 0 hands its TrainResult to the launcher through this
LOG_TAIL_LINES = 40
# What a launcher sets for its children; inherited stale values (e.g. from an in-process train()
# in the parent, which fills in a world of one) must not reach torchrun's workers.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
# StorageConfig secrets travel to torchrun workers in the environment, never in launch.json.
_SECRET_ENV = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
               "session_token": "AWS_SESSION_TOKEN"}
# Environment a Ray worker must share with the driver (the DeepSpeed JIT build cache above all:
# without it every worker recompiles DeepSpeed's ops, minutes on a small machine).
_FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "DEEPSPEED_TIMEOUT")


class LaunchError(MaskmixError):
    """A rank of a multi-process run failed; ``ranks`` lists the failed ranks, the first to fail first."""

    def __init__(self, message: str, ranks: list[int] | None = None):
        super().__init__(message)
        self.ranks = list(ranks or [])


# --------------------------------------------------------------------------- the public call


def launch(cfg: TrainConfig, storage: StorageConfig | None = None, ray: RayConfig | None = None, *,
           stop_after_step: int | None = None, progress: Progress | None = print):
    """Run ``train(cfg)`` the way ``cfg.launch`` says; returns the world's ``TrainResult``.

    ``storage`` configures s3:// access (the manifest, shards and mixture may live there), ``ray``
    the Ray cluster for mode ray (None: embedded Ray, or RAY_ADDRESS). ``stop_after_step`` and
    ``progress`` mean what they mean for ``training.trainer.train``.
    """
    mode = cfg.launch.mode
    if mode == "local":
        return _launch_local(cfg, storage, stop_after_step, progress)
    if mode == "torchrun" and cfg.launch.use_gpu:
        _check_local_gpus(cfg.launch)
    tracking_uri, run_id = _active_tracking()
    if mode == "torchrun":
        return _launch_torchrun(cfg, storage, tracking_uri, run_id, stop_after_step, progress)
    if mode == "ray":
        return _launch_ray(cfg, storage, ray, tracking_uri, run_id, stop_after_step, progress)
    raise ConfigError(f"train.launch.mode={mode!r}: expected local, torchrun or ray")  # pragma: no cover


def _launch_local(cfg, storage, stop_after_step, progress):
    from training.trainer import train

    result = train(cfg, Storage(storage), stop_after_step=stop_after_step, progress=progress)
    return world_result(result)


# --------------------------------------------------------------------------- what every rank runs


def run_rank(cfg: TrainConfig, storage: StorageConfig | None, tracking_uri: str | None, run_id: str | None,
             stop_after_step: int | None, progress: Progress | None):
    """train() on this rank of a launched world, inside the caller's MLflow run on rank 0."""
    from training.trainer import train

    rank = int(os.environ.get("RANK", "0"))
    with _attached_run(tracking_uri, run_id if rank == 0 else None):
        result = train(cfg, Storage(storage), stop_after_step=stop_after_step, progress=progress)
    return world_result(result)


def world_result(result):
    """The rank's TrainResult with the losses of the global batch (collective: every rank calls it)."""
    from training.distributed import all_gather_objects

    per_rank = all_gather_objects(list(result.losses))
    losses = [math.fsum(step) / len(step) for step in zip(*per_rank)]
    return dataclasses.replace(result, losses=losses, final_loss=losses[-1] if losses else float("nan"))


@contextlib.contextmanager
def _attached_run(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """Make the launcher's MLflow run the active run of this process (rank 0 only).

    Ending it here (FINISHED, or FAILED on an exception) is harmless: the caller ends the same
    run again when its stage ends, with the final status.
    """
    if run_id is None:
        yield
        return
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        yield


def _active_tracking() -> tuple[str | None, str | None]:
    """(tracking URI usable from another process, id of the active run) or (None, None)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None, None
    return absolute_tracking_uri(mlflow.get_tracking_uri()), run.info.run_id


def absolute_tracking_uri(uri: str) -> str:
    """A relative sqlite/file store resolved against this process's directory (workers run elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return os.path.abspath(uri)
    return uri


def _repo_root() -> str:
    """The folder holding the ``training`` package (put on workers' PYTHONPATH if maskmix is not installed)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_local_gpus(launch_cfg: LaunchConfig) -> None:
    import torch

    found = torch.cuda.device_count()
    if found < launch_cfg.num_workers:
        raise ConfigError(f"train.launch: use_gpu with {launch_cfg.num_workers} torchrun ranks needs as many GPUs, "
                          f"this machine has {found}")


# --------------------------------------------------------------------------- torchrun


@dataclasses.dataclass
class WorkerSpec:
    """What a torchrun worker needs, as launch.json (secrets excluded: they come in the environment)."""

    train: dict
    storage: dict | None
    tracking_uri: str | None
    run_id: str | None
    stop_after_step: int | None
    run_dir: str

    def write(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def read(cls, path: str) -> "WorkerSpec":
        with open(path) as f:
            return cls(**json.load(f))

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    def storage_config(self) -> StorageConfig | None:
        if self.storage is None:
            return None
        secrets = {field: os.environ[name] for field, name in _SECRET_ENV.items() if os.environ.get(name)}
        return StorageConfig(**self.storage, **secrets)


def _new_run_dir(cfg: TrainConfig, mode: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(os.path.abspath(cfg.output_dir), "launch", f"{mode}-{stamp}-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def torchrun_command(n_ranks: int, port: int, spec_path: str, log_dir: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n_ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--max-restarts", "0",
            # --tee: each rank's stdout/stderr to <log_dir>/.../attempt_0/<rank>/ AND to our pipe.
            "--log-dir", log_dir, "--tee", "3",
            "-m", "training.launch", "worker", "--config", spec_path]


def _torchrun_env(cfg: TrainConfig, storage: StorageConfig | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must not wait in a pipe buffer
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_repo_root(), env.get("PYTHONPATH")) if p)
    # torchrun would set 1 thread per rank (with a warning); the config says how many.
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.launch.cpus_per_worker))))
    if not cfg.launch.use_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks over gloo, as a Ray worker without GPUs gets
    if storage is not None:
        for field, name in _SECRET_ENV.items():
            secret = getattr(storage, field)
            if secret is not None:
                env[name] = secret.get_secret_value()
    return env


def _launch_torchrun(cfg: TrainConfig, storage: StorageConfig | None, tracking_uri: str | None,
                     run_id: str | None, stop_after_step: int | None, progress: Progress | None):
    n = cfg.launch.num_workers
    run_dir = _new_run_dir(cfg, "torchrun")
    spec_path = os.path.join(run_dir, "launch.json")
    storage_dict = storage.model_dump(mode="json", exclude=set(_SECRET_ENV)) if storage is not None else None
    WorkerSpec(train=cfg.model_dump(mode="json"), storage=storage_dict, tracking_uri=tracking_uri, run_id=run_id,
               stop_after_step=stop_after_step, run_dir=run_dir).write(spec_path)
    cmd = torchrun_command(n, _free_port(), spec_path, os.path.join(run_dir, "logs"))
    log.info("launching %d ranks: %s", n, " ".join(cmd))
    if progress is not None:
        progress(f"torchrun: {n} ranks, logs in {os.path.join(run_dir, 'logs')}")
    output_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    proc = subprocess.Popen(cmd, env=_torchrun_env(cfg, storage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if PROGRESS_MARK in line:
                if progress is not None:
                    progress(line.split(PROGRESS_MARK, 1)[1])
            else:
                output_tail.append(line)
                log.debug("%s", line)
        code = proc.wait()
    except BaseException:
        _stop_process_group(proc)
        raise
    finally:
        proc.stdout.close()
    if code != 0:
        raise torchrun_failure(run_dir, n, code, list(output_tail))
    return _read_result(os.path.join(run_dir, RESULT_FILE))


def _stop_process_group(proc: subprocess.Popen) -> None:
    """Stop torchrun (it stops its ranks on SIGTERM); kill its process group if it does not."""
    import signal

    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group start_new_session gave torchrun and its ranks
        proc.wait()


def _write_result(result: TrainResult, path: str) -> None:
    """JSON, not pickle: reading a file back must never run code (a run folder may be shared)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(result), f)
    os.replace(tmp, path)


def _read_result(path: str) -> TrainResult:
    from training.evaluate import DomainEval
    from training.trainer import TrainResult

    with open(path) as f:
        data = json.load(f)
    os.remove(path)
    data["eval"] = {domain: DomainEval(**values) for domain, values in data.get("eval", {}).items()}
    return TrainResult(**data)


def _error_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank-{rank}.error.json")


def rank_log_files(run_dir: str, rank: int) -> list[str]:
    """stderr.log and stdout.log of a (local) rank in torchrun's --log-dir layout."""
    pattern = os.path.join(run_dir, "logs", "*", "attempt_*", str(rank), "std*.log")
    return sorted(glob.glob(pattern))  # stderr.log first: that is where tracebacks and logging go


def _tail(path: str, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n)]
    except OSError:
        return []


def torchrun_failure(run_dir: str, world_size: int, code: int, output_tail: list[str]) -> LaunchError:
    """A LaunchError naming the first rank that failed and the tail of its log."""
    failures = []
    for rank in range(world_size):
        path = _error_path(run_dir, rank)
        if os.path.exists(path):
            with open(path) as f:
                failures.append(json.load(f))
    failures.sort(key=lambda e: e["time"])  # the first to fail is the cause; the others followed it
    if not failures:
        lines = [f"torchrun exited with code {code} and no rank reported an error (a rank killed by a signal or "
                 f"out of memory?); logs: {os.path.join(run_dir, 'logs')}",
                 "--- last lines of torchrun's output ---", *output_tail]
        return LaunchError("\n".join(lines))
    first = failures[0]
    rank = first["rank"]
    lines = [f"rank {rank} of {world_size} failed: {first['error']}"]
    if len(failures) > 1:
        later = ", ".join(str(e["rank"]) for e in failures[1:])
        lines.append(f"(rank(s) {later} failed after it, most likely because rank {rank} stopped)")
    for path in rank_log_files(run_dir, rank):
        tail = _tail(path)
        if tail:
            lines += [f"--- last {len(tail)} lines of rank {rank}'s {os.path.basename(path)} ({path}) ---", *tail]
    return LaunchError("\n".join(lines), ranks=[e["rank"] for e in failures])


def worker_main(spec_path: str) -> None:
    """Entry point of one torchrun rank: read launch.json, train, report (rank 0) or record the failure."""
    spec = WorkerSpec.read(spec_path)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(levelname)s %(name)s: %(message)s")
    try:
        result = run_rank(spec.train_config(), spec.storage_config(), spec.tracking_uri, spec.run_id,
                          spec.stop_after_step, lambda message: print(PROGRESS_MARK + message, flush=True))
    except BaseException as e:
        record = {"rank": rank, "time": time.time(), "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
        with open(_error_path(spec.run_dir, rank), "w") as f:
            json.dump(record, f)
        raise
    if rank == 0:
        _write_result(result, os.path.join(spec.run_dir, RESULT_FILE))
    from training.distributed import shutdown_distributed

    shutdown_distributed()


# --------------------------------------------------------------------------- Ray Train


def _ray_storage(cfg: TrainConfig, storage: StorageConfig | None) -> tuple[str, object | None]:
    """RunConfig (storage_path, storage_filesystem): local folder, or s3:// through infra.storage."""
    path = cfg.launch.storage_path or os.path.join(os.path.abspath(cfg.output_dir), "ray")
    if is_s3(path):
        return path[len("s3://"):], Storage(storage).s3_filesystem()
    return os.path.abspath(path), None


def _check_ray_resources(launch_cfg: LaunchConfig, embedded: bool) -> None:
    """Fail fast where Ray Train would wait forever for workers that cannot be placed."""
    import ray

    need = {"CPU": launch_cfg.num_workers * launch_cfg.cpus_per_worker}
    if launch_cfg.use_gpu:
        need["GPU"] = launch_cfg.num_workers
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if not short:
        free = ray.available_resources()
        busy = ", ".join(f"{v:g} {k} needed, {free.get(k, 0):g} free now" for k, v in need.items()
                         if free.get(k, 0) < v)
        if busy:
            log.warning("Ray Train waits until other tasks/actors release resources (%s)", busy)
        return
    detail = ", ".join(f"{v:g} {k} needed, {h:g} in the cluster" for k, (v, h) in short.items())
    if embedded:
        raise ConfigError(f"train.launch: {launch_cfg.num_workers} Ray workers do not fit in embedded Ray ({detail}); "
                          "lower num_workers / cpus_per_worker or raise ray.num_cpus")
    log.warning("Ray cluster is short of resources for %d workers (%s); waiting for the autoscaler",
                launch_cfg.num_workers, detail)


def _launch_ray(cfg: TrainConfig, storage: StorageConfig | None, ray_cfg: RayConfig | None,
                tracking_uri: str | None, run_id: str | None, stop_after_step: int | None,
                progress: Progress | None):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from infra.cluster import ensure_ray, shutdown_ray

    ray_cfg = ray_cfg or RayConfig()
    started = not ray.is_initialized()
    embedded = not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(ray_cfg)
    messages = None
    try:
        _check_ray_resources(cfg.launch, embedded and started)
        if tracking_uri and not embedded and tracking_uri.startswith(("sqlite:", "file:", "/")):
            log.warning("MLflow store %s is a local file: Ray workers on other nodes cannot log to it "
                        "(use an MLflow server URI)", tracking_uri)
        messages = Queue(actor_options={"num_cpus": 0})  # rank 0's progress lines, back to the driver
        n, use_gpu = cfg.launch.num_workers, cfg.launch.use_gpu
        resources = {"CPU": cfg.launch.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        storage_path, filesystem = _ray_storage(cfg, storage)
        loop_config = {"train": cfg, "storage": storage, "tracking_uri": tracking_uri, "run_id": run_id,
                       "stop_after_step": stop_after_step, "cwd": os.getcwd(), "progress": messages,
                       "env": {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}
        trainer = TorchTrainer(
            ray_train_loop, train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=f"maskmix-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 storage_path=storage_path, storage_filesystem=filesystem),
        )
        if progress is not None:
            where = cfg.launch.storage_path or storage_path
            progress(f"ray: {n} Ray Train workers ({resources}), run state in {where}")
        with _forwarding(messages, progress):
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                raise ray_failure(e, n) from None
        return result.return_value
    finally:
        if messages is not None:
            with contextlib.suppress(Exception):
                messages.shutdown()
        if started:
            shutdown_ray()  # embedded Ray that this call started; a caller's Ray is left running


def ray_train_loop(config: dict):
    """Ray Train's train_loop_per_worker: one rank of the world, train() inside."""
    import ray.train

    os.environ.update(config["env"])  # before anything builds a DeepSpeed op
    # Ray Train runs workers in a per-run artifacts folder; relative paths in the config mean the driver's.
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    messages = config["progress"]
    try:
        result = run_rank(config["train"], config["storage"], config["tracking_uri"], config["run_id"],
                          config["stop_after_step"], messages.put if rank == 0 else None)
    except Exception as e:
        raise RankFailed(rank, f"{type(e).__name__}: {e}", traceback.format_exc()) from None
    # Every worker reports (it is a barrier); Ray keeps rank 0's metrics.
    ray.train.report({"steps": result.steps, "tokens_seen": result.tokens_seen, "final_loss": result.final_loss})
    return result if rank == 0 else None  # Result.return_value is rank 0's


class RankFailed(Exception):
    """Raised in a Ray worker: which rank failed, when, and its traceback (picklable)."""

    def __init__(self, rank: int, error: str, trace: str, at: float | None = None):
        super().__init__(rank, error, trace, at)
        self.rank, self.error, self.trace = rank, error, trace
        self.at = time.time() if at is None else at

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.error}"


def _find_rank_failure(exc: BaseException) -> RankFailed | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RankFailed):
            return exc
        for attr in ("cause", "as_instanceof_cause"):
            inner = getattr(exc, attr, None)
            inner = inner() if callable(inner) else inner
            if isinstance(inner, RankFailed):
                return inner
        exc = exc.__cause__ or exc.__context__
    return None


def ray_failure(err: BaseException, world_size: int) -> LaunchError:
    """A LaunchError naming the first Ray worker that failed and the tail of its traceback."""
    per_rank = getattr(err, "worker_failures", None) or {}
    found = []
    for rank, exc in per_rank.items():
        failure = _find_rank_failure(exc)
        found.append((failure.at if failure else math.inf, rank, failure, exc))
    found.sort(key=lambda item: (item[0], item[1]))
    if not found:
        return LaunchError(f"Ray Train failed: {err}")
    _, rank, failure, exc = found[0]
    error = failure.error if failure else f"{type(exc).__name__}"
    trace = (failure.trace if failure else str(exc)).rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
    lines = [f"Ray Train worker rank {rank} of {world_size} failed: {error}"]
    if len(found) > 1:
        later = ", ".join(str(item[1]) for item in found[1:])
        lines.append(f"(rank(s) {later} failed too, most likely because rank {rank} stopped)")
    lines += [f"--- last {len(trace)} lines of rank {rank}'s traceback ---", *trace]
    return LaunchError("\n".join(lines), ranks=[item[1] for item in found])


@contextlib.contextmanager
def _forwarding(messages, progress: Progress | None) -> Iterator[None]:
    """Hand rank 0's progress lines from the Ray queue to ``progress`` while the body runs."""
    stop = threading.Event()

    def pump(block: bool) -> None:
        while True:
            try:
                message = messages.get(timeout=0.5) if block else messages.get_nowait()
            except Exception:  # ray.util.queue.Empty (nothing yet), or the queue is gone
                return
            if progress is not None:
                progress(message)

    def run() -> None:
        while not stop.is_set():
            pump(block=True)

    thread = threading.Thread(target=run, name="maskmix-ray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        pump(block=False)  # what arrived after the last poll


# --------------------------------------------------------------------------- python -m training.launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.launch",
                                     description="maskmix launcher internals (torchrun's per-rank entry point)")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one rank of a torchrun launch")
    worker.add_argument("--config", required=True, help="launch.json written by training.launch")
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker_main(args.config)


if __name__ == "__main__":
    main()
