"""Submit maskmix stages to a Ray cluster through Ray's Jobs API, and follow, list and stop them.

``maskmix submit pipeline|mix|train CONFIG --address http://HEAD:8265`` validates the config
HERE (a bad config fails before anything reaches the cluster), then submits

    python -m infra.cli <stage command> _job/config.yaml

with a runtime environment whose working_dir is a staging copy of the maskmix packages plus the
resolved config (``_job/config.yaml``). What changes between a laptop and a cluster is only the
address and the storage URIs: relative local paths in the config are made absolute at submission
(right for a head on this machine or a shared file system; on a remote cluster use s3:// URIs),
``ray.address`` is dropped (the job's driver joins the cluster it runs on), and secrets are never
shipped: storage credentials come from the cluster's environment (a Kubernetes Secret, or the
environment ``maskmix stack up`` was started in).

Ray token authentication stays on. The token is read, in order, from ``--token``/RAY_AUTH_TOKEN,
the file named by RAY_AUTH_TOKEN_PATH, and ~/.ray/auth_token (Ray's own order), and is sent as an
``Authorization: Bearer`` header. A missing or refused token is one clear error saying what to do.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from infra.config import RESOLVED_ENV, MaskmixConfig, load_config
from infra.errors import MaskmixError

# stage -> (the config section it needs, the CLI words that run it); mix adds its method.
STAGES: dict[str, tuple[str, list[str]]] = {
    "pipeline": ("pipeline", ["pipeline", "run"]),
    "mix": ("mix", ["mix"]),
    "train": ("train", ["train"]),
    "eval": ("eval", ["eval"]),
}
MIX_METHODS = ("baseline", "doremi", "laws")
# What the job's working_dir carries: the packages `python -m infra.cli` imports, nothing else
# (no .venv, data, checkpoints or MLflow stores).
PACKAGES = ("infra", "pipelines", "mixing", "training")
CONFIG_IN_JOB = "_job/config.yaml"
METADATA_MARK = "maskmix"
# Keys whose string values are file-system locations (local or URI) in any config section.
PATH_KEYS = {"path", "output_dir", "output", "manifest", "mixture", "storage_path", "checkpoint_uri",
             "checkpoint", "index", "index_uri", "work_dir", "work_uri", "tokenizer_path"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, or put it in the file named by RAY_AUTH_TOKEN_PATH "
              "or in ~/.ray/auth_token (on the head, `ray get-auth-token` prints it; with `maskmix stack up` "
              "it is the stack's token file, see `maskmix stack status`)")


class JobError(MaskmixError):
    """A submission or job command failed; the message says why and what to do."""


# --------------------------------------------------------------------------- the token


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages (never the value itself)


def resolve_token(explicit: str | None = None) -> Token | None:
    """The Ray auth token, in Ray's own order of lookup; None when there is none."""
    if explicit:
        return Token(explicit.strip(), "--token")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    for name, path in (("RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_AUTH_TOKEN_PATH")),
                       ("~/.ray/auth_token", str(Path.home() / ".ray" / "auth_token"))):
        if path and os.path.isfile(path):
            value = Path(path).read_text().strip()
            if value:
                return Token(value, f"{name} ({path})")
    return None


# --------------------------------------------------------------------------- the client


def _normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if not re.match(r"^https?://", address):
        address = "http://" + address
    return address


class JobsClient:
    """Ray's JobSubmissionClient with our token handling and errors."""

    def __init__(self, address: str, token: str | None = None):
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = _normalize_address(address)
        self.token = resolve_token(token)
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else {}
        try:
            self._client = JobSubmissionClient(self.address, headers=headers)
        except AuthenticationError as e:
            raise JobError(self._auth_message(str(e))) from None
        except ConnectionError as e:
            raise JobError(f"cannot reach the Ray Jobs API at {self.address}: {e}. Is the head up "
                           "(`maskmix stack status`, `ray status`) and is this its dashboard address "
                           "(http://HEAD:8265)?") from None

    def _auth_message(self, detail: str) -> str:
        if self.token is None:
            return f"the Ray cluster at {self.address} requires an auth token and none was found: {TOKEN_HELP}."
        if "403" in detail or "invalid" in detail.lower() or "Forbidden" in detail:
            return (f"the Ray cluster at {self.address} refused the token from {self.token.source}: it is not "
                    f"this cluster's token. {TOKEN_HELP[0].upper() + TOKEN_HELP[1:]}.")
        return f"the Ray cluster at {self.address} refused the request ({detail.splitlines()[0]}): {TOKEN_HELP}."

    def _call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            raise JobError(self._auth_message(str(e))) from None
        except RuntimeError as e:  # the SDK's "Request failed with status code 404: ..."
            raise JobError(str(e)) from None

    def submit(self, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict,
               entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
               retry_s: float = 60.0) -> str:
        # A head that just started answers HTTP before its job agent is up ("No available agent
        # to submit job"): retry that one error for a while.
        deadline = time.monotonic() + retry_s
        while True:
            try:
                return self._call(self._client.submit_job, entrypoint=entrypoint, submission_id=submission_id,
                                  runtime_env=runtime_env, metadata=metadata,
                                  entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
            except JobError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def list(self, all_jobs: bool = False) -> list:
        jobs = self._call(self._client.list_jobs)
        if not all_jobs:
            jobs = [j for j in jobs if (j.metadata or {}).get(METADATA_MARK) == "1"]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def info(self, job_id: str):
        return self._call(self._client.get_job_info, job_id)

    def status(self, job_id: str) -> str:
        return str(self._call(self._client.get_job_status, job_id).value)

    def logs(self, job_id: str) -> str:
        return self._call(self._client.get_job_logs, job_id)

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """New log text as it arrives, until the job is terminal (then its last lines)."""
        seen = 0
        while True:
            terminal = self.status(job_id) in TERMINAL
            text = self.logs(job_id)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if terminal:
                return
            time.sleep(poll_s)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status(job_id)) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id} still {status} after {timeout_s:g} s")
            time.sleep(poll_s)
        return status

    def stop(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Ask Ray to stop the job and wait until it is terminal; its final status."""
        if self.status(job_id) in TERMINAL:
            return self.status(job_id)
        self._call(self._client.stop_job, job_id)
        return self.wait(job_id, timeout_s)


# --------------------------------------------------------------------------- what is submitted


def _absolutize(node, base: str):
    """Relative local paths under PATH_KEYS made absolute against ``base`` (URIs left alone)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in PATH_KEYS and isinstance(value, str) and value and "://" not in value \
                    and not os.path.isabs(value):
                value = os.path.normpath(os.path.join(base, value))
            elif key == "inputs" and isinstance(value, list):
                value = [_absolutize(v, base) for v in value]
            else:
                value = _absolutize(value, base)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_absolutize(v, base) for v in node]
    return node


def _tracking_uri_for_job(uri: str, base: str) -> str:
    # sqlite:///./mlflow.db is relative to the process's cwd; the job's cwd is its working_dir.
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.normpath(os.path.join(base, uri[len(prefix):]))
    return uri


def job_config(cfg: MaskmixConfig, base: str) -> dict:
    """The config the job runs: paths absolute, no Ray address, no secrets."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    data = _absolutize(data, base)
    data.get("ray", {}).pop("address", None)
    for key in ("access_key_id", "secret_access_key", "session_token"):
        data.get("storage", {}).pop(key, None)
    tracking = data.setdefault("tracking", {})
    tracking["uri"] = _tracking_uri_for_job(cfg.tracking.uri, base)
    return data


def config_digest(data: dict) -> str:
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()[:12]


def submission_id(stage: str, config_path: str, digest: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config_path).stem.lower()).strip("-") or "config"
    return f"maskmix-{stage}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{digest[:6]}"


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


# Numba keeps the kernels it compiled (pipelines' MinHash and LSH, ``cache=True``) in each package's
# __pycache__, and a job's working_dir is a fresh copy of the sources without it: every job's driver,
# and every Ray worker of it that computes signatures, compiled them again, 3-4.5 CPU s each (a small
# pipeline job took 15.6 CPU s embedded with a cold cache, 11.0 warm). The job carries the submitter's
# compiled kernels here, one folder per source folder, and its driver puts them back into
# __pycache__ before anything compiles (``install_compile_cache``). Numba checks each entry against
# the source file's content hash and the CPU it was compiled for, so a stale or foreign entry is
# recompiled, never used.
COMPILE_CACHE_IN_JOB = "_job/numba_cache"
COMPILE_CACHE_SUFFIXES = (".nbi", ".nbc")


def stage_working_dir(data: dict, dest: str) -> str:
    """A folder holding the maskmix packages (sources only), ``_job/config.yaml`` and the numba cache."""
    root = project_root()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "deploy")
    for package in PACKAGES:
        shutil.copytree(root / package, Path(dest) / package, ignore=ignore)
        for cache in (root / package).rglob("__pycache__"):
            for entry in cache.iterdir():
                if entry.suffix in COMPILE_CACHE_SUFFIXES and entry.is_file():
                    target = Path(dest) / COMPILE_CACHE_IN_JOB / cache.parent.relative_to(root) / entry.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(entry, target)
    config = Path(dest) / CONFIG_IN_JOB
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def install_compile_cache(working_dir: str | os.PathLike = ".") -> int:
    """In a submitted job (cwd = its working_dir): the numba cache it carries, put where numba looks
    (``<folder>/__pycache__``); entries already there are kept. Returns how many were put."""
    shipped = Path(working_dir) / COMPILE_CACHE_IN_JOB
    if not shipped.is_dir():
        return 0
    placed = 0
    for entry in shipped.rglob("*"):
        if entry.suffix not in COMPILE_CACHE_SUFFIXES or not entry.is_file():
            continue
        target = Path(working_dir) / entry.parent.relative_to(shipped) / "__pycache__" / entry.name
        if target.exists() or not target.parent.parent.is_dir():
            continue
        target.parent.mkdir(exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(entry, partial)
        os.replace(partial, target)  # a reader never sees half a file
        placed += 1
    return placed


@dataclass
class Submitted:
    job_id: str
    address: str
    entrypoint: str
    metadata: dict


def submit(stage: str, config_path: str, address: str, overrides: list[str] | None = None,
           token: str | None = None, cpus: float | None = None, gpus: float | None = None,
           workers: int | None = None, job_id: str | None = None, pip: list[str] | None = None,
           method: str = "doremi") -> Submitted:
    """Validate the config here, then submit the stage to the cluster at ``address``.

    ``method`` picks the mix verb (baseline | doremi | laws) when ``stage`` is "mix".
    """
    if stage not in STAGES:
        raise JobError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    section, words = STAGES[stage]
    if stage == "mix":
        if method not in MIX_METHODS:
            raise JobError(f"unknown mix method {method!r}; choose one of {', '.join(MIX_METHODS)}")
        words = [*words, method]
    overrides = list(overrides or [])
    if workers is not None:
        if stage != "train":
            raise JobError("--workers applies to `train` (Ray Train workers); pipelines use the cluster's CPUs")
        overrides += ["train.launch.mode=ray", f"train.launch.num_workers={workers}"]
        if gpus:
            overrides += ["train.launch.use_gpu=true"]
    cfg = load_config(config_path, overrides)
    cfg.require(section, config_path)
    data = job_config(cfg, os.getcwd())
    digest = config_digest(data)
    label = f"{stage}-{method}" if stage == "mix" else stage
    sid = job_id or submission_id(label, config_path, digest)
    metadata = {METADATA_MARK: "1", "user": getpass.getuser(), "stage": label, "config": os.path.basename(config_path),
                "config_hash": digest}
    entrypoint = " ".join(["python", "-m", "infra.cli", *words, CONFIG_IN_JOB])
    client = JobsClient(address, token)
    with tempfile.TemporaryDirectory(prefix="maskmix-job-") as staging:
        runtime_env: dict = {"working_dir": stage_working_dir(data, staging),
                             # the cluster's environment adds credentials only (infra.config.RESOLVED_ENV)
                             "env_vars": {RESOLVED_ENV: "1"}}
        if pip:
            runtime_env["pip"] = list(pip)
        # Train workers of a GPU job ask for their GPUs through Ray Train; the driver itself needs
        # none, so the entrypoint's own request is CPUs (and GPUs only when asked for without workers).
        client.submit(entrypoint, sid, runtime_env, metadata, entrypoint_num_cpus=cpus,
                      entrypoint_num_gpus=gpus if workers is None else None)
    return Submitted(job_id=sid, address=client.address, entrypoint=entrypoint, metadata=metadata)
