"""MLflow for every stage: one run per stage invocation, children under a parent for multi-stage jobs.

Stages call the module functions below (``log_params``, ``log_metrics``, ``log_json`` ...). They act
on the active run and do nothing when there is none, so library code (a trainer used inside a
mixing sweep, a test) never needs to know whether tracking is on.

Secrets never reach MLflow: parameter and tag values whose key looks like a secret are masked,
and any value equal to a known secret (taken from the environment and the config) is masked too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from typing import Any, Iterator

import mlflow

from infra.config import TrackingConfig

log = logging.getLogger(__name__)

REDACTED = "***"
# "token" alone is a secret (api_token, RAY_AUTH_TOKEN), but an LM config is full of tokens that are
# not: tokenizer, n_tokens, tokens_seen, mask_token_id.
_SECRET_KEY = re.compile(r"(secret|password|passwd|token(?!s|i[sz]|_?ids?(?![a-z]))|api[_-]?key|access[_-]?key"
                         r"|credential|private[_-]?key)", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN")
_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it would be logged."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def _known_secrets() -> set[str]:
    found = {os.environ[n] for n in _SECRET_ENV if len(os.environ.get(n, "")) >= 4}
    return found | _extra_secrets


def redact_text(text: str) -> str:
    # Longest first: a secret that contains another must not be left half-masked.
    for secret in sorted(_known_secrets(), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, key: str = "") -> Any:
    """Mask secrets in a nested structure of dicts/lists/scalars."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """Masks known secret values in every log record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- runs


def configure(cfg: TrackingConfig) -> None:
    """Point MLflow at the configured store and experiment (creating the experiment if needed)."""
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_experiment(cfg.experiment)


@contextlib.contextmanager
def stage_run(stage: str, params: dict | None = None, tags: dict | None = None,
              run_name: str | None = None, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage invocation; nested under the active run if there is one.

    The run ends FINISHED on success and FAILED on an exception (which propagates).
    ``system_metrics`` samples CPU/memory/disk (and GPU where pynvml is present) into the run.
    """
    parent = mlflow.active_run()
    all_tags = {"maskmix.stage": stage, **(tags or {})}
    with mlflow.start_run(run_name=run_name or stage, nested=parent is not None, tags=redact(all_tags),
                          log_system_metrics=system_metrics) as run:
        if params:
            log_params(params)
        yield run


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_params(params: dict) -> None:
    if mlflow.active_run() is None:
        return
    flat = flatten(redact(params))
    # MLflow caps a param value at 6000 chars; a long list is still useful truncated.
    mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) if not isinstance(v, str) else v[:6000]
                       for k, v in flat.items()})


def set_tags(tags: dict) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags(redact(tags))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_json(obj: Any, artifact_file: str) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_dict(redact(obj), artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_text(redact_text(text), artifact_file)


def log_file(local_path: str, artifact_path: str | None = None) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_artifact(local_path, artifact_path)


def log_artifacts(local_dir: str, artifact_path: str | None = None) -> None:
    """Log every file of a local folder under ``artifact_path``."""
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(local_dir, artifact_path)


def register_artifacts(name: str, artifact_path: str, description: str | None = None,
                       tags: dict[str, str] | None = None) -> str | None:
    """Register the active run's ``artifact_path`` folder as a new version of registered model ``name``.

    The version's source is the run's artifact URI of that folder, so the registry points at
    plain files (safetensors + JSON): no MLflow flavor, no pickled Python object, nothing the
    reader has to execute. Returns the version number (as MLflow's string), None without a run.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    run = mlflow.active_run()
    if run is None:
        return None
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(name, description=description)
    version = client.create_model_version(name, source=mlflow.get_artifact_uri(artifact_path),
                                          run_id=run.info.run_id, tags=redact(tags or {}), description=description)
    return version.version


def log_bytes(data: bytes, artifact_file: str) -> None:
    """Log bytes (e.g. an artifact that lives on S3) under ``artifact_file``."""
    if mlflow.active_run() is None:
        return
    directory, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        mlflow.log_artifact(path, directory or None)
