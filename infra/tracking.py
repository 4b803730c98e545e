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
import posixpath
import re
import tempfile
import threading
import time
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
    run = mlflow.start_run(run_name=run_name or stage, nested=parent is not None, tags=redact(all_tags),
                           log_system_metrics=system_metrics)
    status = "FAILED"
    try:
        if params:
            log_params(params)
        yield run
        status = "FINISHED"
    finally:
        # Not mlflow's own ``with``: its end_run would retry a dead server for minutes and then
        # raise, turning a finished stage into a crash. Buffered metrics first, then the status.
        if active_run_id() == run.info.run_id:  # (unless the stage ended it itself)
            end_run(status)


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
    """Log to the active run through its ``MetricSink``: delivered now, or buffered (each value keeps
    its step and timestamp) while the tracking server is unreachable and delivered once it is back."""
    run = mlflow.active_run()
    if run is None:
        return
    metric_sink(run.info.run_id).log(metrics, step)


# --------------------------------------------------------------------------- metrics through an outage

# One delivery attempt against a dead or hung tracking server costs at most SINK_HTTP_TIMEOUT_S:
# MLflow's own client retries a failed request 7 times with exponential back-off (minutes, by
# MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT), which would stall every training
# step of an outage. The sink's requests pass their own limits to MLflow's http_request, so the
# process-wide MLflow settings (used by artifact uploads, the registry ...) are left alone.
SINK_HTTP_TIMEOUT_S = 5
SINK_MAX_RETRIES = 0
SINK_RETRY_INTERVAL_S = 5.0  # while values wait, a new delivery is tried at most this often (from log())
FLUSH_WAIT_ENV = "MASKMIX_MLFLOW_FLUSH_WAIT_S"  # how long the end of a run waits for the server (s)
DEFAULT_FLUSH_WAIT_S = 60.0
UNDELIVERED_FILE = "mlflow-undelivered-{run_id}.jsonl"
MAX_BATCH_METRICS = 1000  # MLflow refuses a log-batch request with more metrics than this
_LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
_UPDATE_RUN = "/api/2.0/mlflow/runs/update"


def flush_wait_s() -> float:
    return float(os.environ.get(FLUSH_WAIT_ENV, DEFAULT_FLUSH_WAIT_S))


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _transient(e: Exception) -> bool:
    """Worth retrying later: no answer (connection refused, timeout) or a server-side error. A 4xx
    (an invalid metric, an unknown run) would fail the same way forever and is raised instead."""
    from mlflow.exceptions import MlflowException

    return not isinstance(e, MlflowException) or e.get_http_status_code() >= 500


def _outage(e: Exception) -> bool:
    """The tracking server did not answer or failed (connection refused, timeout, 5xx; MLflow's
    client reports a refused connection as a 500). A local error (a missing file, a bug) is not."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500
    return isinstance(e, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


def _rest_post(tracking_uri: str, endpoint: str, body: dict) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = http_request(get_default_host_creds(tracking_uri), endpoint, "POST", max_retries=SINK_MAX_RETRIES,
                            backoff_factor=0, timeout=SINK_HTTP_TIMEOUT_S, json=body)
    verify_rest_response(response, endpoint)


def _record_undelivered(run_id: str, lost_dir: str | None, rows: list[dict]) -> str:
    """Append ``rows`` (JSON lines) to ``<lost_dir>/mlflow-undelivered-<run>.jsonl`` (default dir: tmp); its path.

    A row is a metric value (run_id, key, value, step, timestamp) or an undelivered artifact folder
    or tag set (run_id, undelivered, local_path, error, and artifact_path or tags): what
    ``redeliver`` replays."""
    path = os.path.join(os.path.abspath(lost_dir or tempfile.gettempdir()), UNDELIVERED_FILE.format(run_id=run_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


class MetricSink:
    """One run's metrics on their way to the tracking server, surviving an outage of the server.

    ``log`` appends the values (each with its step and the time it was logged) and delivers
    everything pending in one log-batch request per MAX_BATCH_METRICS values. If the server does not answer,
    the values stay pending, one warning says so, and later ``log`` calls retry (at most every
    SINK_RETRY_INTERVAL_S, each attempt bounded by SINK_HTTP_TIMEOUT_S), so training goes on.
    ``flush`` (end of a run) waits for the server up to a deadline; what is still undelivered
    then is written to a local JSONL file and reported lost in a warning with its count.

    Delivery is at least once: a batch whose answer was lost (the server stored it, then died) is
    kept and sent again, or written to the file. MLflow ignores a value it already has.
    """

    def __init__(self, run_id: str, tracking_uri: str):
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.pending: list = []  # mlflow.entities.Metric
        self.delivered = 0  # values delivered so far
        self.lost = 0  # values given up on (written to the undelivered file)
        self.outages: list[float] = []  # seconds from the first failed delivery to the next good one
        self._outage_started: float | None = None
        self._next_try = 0.0
        self._lock = threading.RLock()
        self._client = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
            if time.monotonic() >= self._next_try:
                self._deliver()

    def _send(self, metrics: list) -> None:
        if _is_http(self.tracking_uri):
            from google.protobuf.json_format import MessageToDict
            from mlflow.protos.service_pb2 import LogBatch

            # The proto's JSON form, as MLflow's own client sends it (NaN/inf become strings).
            body = MessageToDict(LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics]),
                                 preserving_proto_field_name=True)
            _rest_post(self.tracking_uri, _LOG_BATCH, body)
        else:  # a local store (sqlite, files): no network to lose
            if self._client is None:
                self._client = mlflow.MlflowClient(self.tracking_uri)
            self._client.log_batch(self.run_id, metrics=metrics)

    def _deliver(self) -> bool:
        """Send everything pending; False (values kept) if the server is unreachable."""
        backlog = len(self.pending)
        try:
            while self.pending:
                chunk = self.pending[:MAX_BATCH_METRICS]
                try:
                    self._send(chunk)
                except Exception as e:
                    if _transient(e):
                        raise
                    del self.pending[:len(chunk)]  # would be refused forever
                    raise
                del self.pending[:len(chunk)]
                self.delivered += len(chunk)
        except Exception as e:
            if not _transient(e):
                raise
            if self._outage_started is None:
                self._outage_started = time.monotonic()
                log.warning("MLflow tracking at %s is unreachable (%s): buffering the metrics of run %s and "
                            "retrying", self.tracking_uri, str(e).splitlines()[0][:300], self.run_id)
            self._next_try = time.monotonic() + SINK_RETRY_INTERVAL_S
            return False
        if self._outage_started is not None:
            self.outages.append(time.monotonic() - self._outage_started)
            self._outage_started = None
            log.warning("MLflow tracking at %s is reachable again after %.1f s: delivered %d buffered metric "
                        "values of run %s", self.tracking_uri, self.outages[-1], backlog, self.run_id)
        self._next_try = 0.0
        return True

    def flush(self, wait_s: float | None = None, lost_dir: str | None = None) -> int:
        """Deliver what is pending, waiting up to ``wait_s`` for the server; returns the number of
        values lost (0 when all were delivered). Lost values go to ``lost_dir`` (default: tmp)."""
        deadline = time.monotonic() + (flush_wait_s() if wait_s is None else wait_s)
        with self._lock:
            while not self._deliver():
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if not self.pending:
                return 0
            lost = self.pending
            self.pending = []
            self.lost += len(lost)
            path = _record_undelivered(self.run_id, lost_dir, [
                {"run_id": self.run_id, "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                for m in lost])
            steps = sorted({m.step for m in lost})
            log.warning("LOST %d metric values of run %s (steps %d..%d): MLflow tracking at %s stayed unreachable; "
                        "they are written to %s (`maskmix tracking redeliver` delivers them once it is back)",
                        len(lost), self.run_id, steps[0], steps[-1], self.tracking_uri, path)
            return len(lost)

    def set_terminated(self, status: str, wait_s: float) -> bool:
        """Record the run's end status, retrying an unreachable server up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if _is_http(self.tracking_uri):
                    _rest_post(self.tracking_uri, _UPDATE_RUN, {"run_id": self.run_id, "run_uuid": self.run_id,
                                                                "status": status,
                                                                "end_time": int(time.time() * 1000)})
                else:
                    mlflow.MlflowClient(self.tracking_uri).set_terminated(self.run_id, status)
                return True
            except Exception as e:
                if not _transient(e) or time.monotonic() >= deadline:
                    log.warning("could not mark MLflow run %s %s at %s (%s)", self.run_id, status, self.tracking_uri,
                                str(e).splitlines()[0][:300])
                    return False
                time.sleep(1.0)


_sinks: dict[str, MetricSink] = {}
_sinks_lock = threading.Lock()


def metric_sink(run_id: str | None = None) -> MetricSink | None:
    """The sink of ``run_id`` (default: the active run), created on first use; None without a run."""
    run_id = run_id or active_run_id()
    if run_id is None:
        return None
    with _sinks_lock:
        sink = _sinks.get(run_id)
        if sink is None:
            sink = _sinks[run_id] = MetricSink(run_id, mlflow.get_tracking_uri())
        return sink


def flush_metrics(run_id: str | None = None, wait_s: float | None = None, lost_dir: str | None = None) -> int:
    """Deliver the (active) run's buffered metrics; the number lost (see ``MetricSink.flush``)."""
    sink = _sinks.get(run_id or active_run_id() or "")
    return sink.flush(wait_s, lost_dir) if sink is not None else 0


def end_run(status: str = "FINISHED") -> None:
    """End the active run: flush its metrics, record ``status`` (retried while the server is
    unreachable, up to the flush wait), then pop it from MLflow's run stack. Never raises for an
    unreachable server: the run then stays RUNNING on the server (never FAILED for it)."""
    run = mlflow.active_run()
    if run is None:
        return
    run_id = run.info.run_id
    sink = metric_sink(run_id)
    try:
        sink.flush()
    except Exception as e:  # a refused (4xx) batch must not keep the run from ending
        log.warning("metrics of run %s not delivered: %s", run_id, e)
    recorded = sink.set_terminated(status, flush_wait_s())
    with _sinks_lock:
        _sinks.pop(run_id, None)
    # The server is gone: mlflow.end_run pops the run, then sets the status once more; that last
    # call must fail fast instead of retrying for minutes.
    with (contextlib.nullcontext() if recorded else _fail_fast_http()):
        try:
            mlflow.end_run(status)
        except Exception as e:
            if recorded:
                log.debug("mlflow.end_run after the status was recorded: %s", e)


@contextlib.contextmanager
def _fail_fast_http() -> Iterator[None]:
    """MLflow's own client calls inside give up after one SINK_HTTP_TIMEOUT_S attempt (process-wide
    settings, restored on exit), instead of MLflow's 7 retries with back-off."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(SINK_MAX_RETRIES),
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": str(SINK_HTTP_TIMEOUT_S)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload_or_report(local_dir: str, artifact_path: str, lost_dir: str, wait_s: float | None = None,
                     register: dict | None = None) -> bool:
    """``log_artifacts(local_dir, artifact_path)`` through an outage (see ``deliver_or_report``).

    ``register`` ({"name", "description", "tags"}): the caller registers the folder as a model version
    once it is uploaded; if the upload is given up, the undelivered-file keeps this too, so
    ``redeliver`` registers the version after it has delivered the folder."""
    replay = {"artifact_path": artifact_path}
    if register:
        replay["register"] = {**register, "tags": redact(register.get("tags") or {})}
    return deliver_or_report(f"artifacts {artifact_path}/", lambda: log_artifacts(local_dir, artifact_path),
                             local_dir, lost_dir, wait_s, replay=replay)


def tag_or_report(tags: dict[str, str], local_path: str, lost_dir: str, wait_s: float | None = None) -> bool:
    """``set_tags(tags)`` through an outage (see ``deliver_or_report``); ``local_path``: what they name."""
    return deliver_or_report("tag " + ",".join(tags), lambda: set_tags(tags), local_path, lost_dir, wait_s,
                             replay={"tags": redact(tags)})


def deliver_or_report(what: str, deliver, local_path: str, lost_dir: str, wait_s: float | None = None,
                      replay: dict | None = None) -> bool:
    """Run ``deliver`` (an artifact upload or a tag of the active run, at the end of a stage) through
    an outage of the tracking server: each attempt fails fast, attempts are repeated up to the flush
    wait, and if the server stays unreachable the delivery is given up with a warning that names
    the local copy (``local_path``), and a line in ``<lost_dir>/mlflow-undelivered-<run>.jsonl``
    (with ``replay``, what ``redeliver`` needs to deliver it later). False only when given up.

    Anything that is not an outage (a 4xx refusal, a missing local file) is raised at once: it
    would fail the same way every time.
    """
    run_id = active_run_id()
    if run_id is None:
        return True  # no run: nothing to deliver, nothing lost
    deadline = time.monotonic() + (flush_wait_s() if wait_s is None else wait_s)
    while True:
        try:
            with _fail_fast_http():
                deliver()
            return True
        except Exception as e:
            if not _outage(e):
                raise
            if time.monotonic() >= deadline:
                error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                break
            time.sleep(1.0)
    path = _record_undelivered(run_id, lost_dir, [{"run_id": run_id, "undelivered": what,
                                                   "local_path": os.path.abspath(local_path), "error": error,
                                                   **(replay or {})}])
    log.warning("NOT DELIVERED %s of run %s: MLflow tracking at %s stayed unreachable (%s); the local copy is %s "
                "(recorded in %s)", what, run_id, mlflow.get_tracking_uri(), error, local_path, path)
    return False


def redeliver(path: str, tracking_uri: str) -> dict[str, int]:
    """Deliver what an undelivered-file (``mlflow-undelivered-<run>.jsonl``) holds, once the server
    is back: metric values, artifact folders (from their local copy) and tags, to their run, and
    the model version an undelivered export would have been registered as.

    Sending a metric value twice is harmless: a value can be in the file and on the server (the
    server stored a batch but its answer was lost), and MLflow ignores a value it already has
    (same key, step, timestamp and value). What still fails stays in the file (which is removed
    once empty); returns the counts delivered and left. Each request fails fast: a server still
    down leaves the file as it was in seconds, not after MLflow's minutes of retries.
    """
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with _fail_fast_http():
        left, delivered = _redeliver_rows(rows, mlflow.MlflowClient(tracking_uri))
    if left:  # only what still failed stays; replaced whole, so a crash here leaves the old file
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in left)
        os.replace(tmp, path)
    else:
        os.remove(path)
    return {**delivered, "left": len(left)}


def _redeliver_rows(rows: list[dict], client) -> tuple[list[dict], dict[str, int]]:
    """Deliver the rows of an undelivered-file; (the rows that failed, the counts delivered)."""
    from mlflow.entities import Metric

    left: list[dict] = []
    delivered = {"metric_values": 0, "artifacts": 0, "tags": 0, "model_versions": 0}
    metric_rows = [r for r in rows if "key" in r]
    for run_id in sorted({r["run_id"] for r in metric_rows}):
        of_run = [r for r in metric_rows if r["run_id"] == run_id]
        for i in range(0, len(of_run), MAX_BATCH_METRICS):
            chunk = of_run[i:i + MAX_BATCH_METRICS]
            try:
                client.log_batch(run_id, metrics=[Metric(r["key"], r["value"], r["timestamp"], r["step"])
                                                  for r in chunk])
                delivered["metric_values"] += len(chunk)
            except Exception as e:
                log.warning("%d metric values of run %s not delivered: %s", len(chunk), run_id, e)
                left.extend(chunk)
    for row in (r for r in rows if "key" not in r):
        try:
            if "artifact_path" in row:
                # Uploading again after a failed registration is harmless: the same files, overwritten.
                client.log_artifacts(row["run_id"], row["local_path"], row["artifact_path"])
                if row.get("register"):
                    source = posixpath.join(client.get_run(row["run_id"]).info.artifact_uri, row["artifact_path"])
                    version = _create_model_version(client, row["run_id"], source, **row["register"])
                    log.info("registered %s version %s", row["register"]["name"], version)
                    delivered["model_versions"] += 1
                delivered["artifacts"] += 1
            elif "tags" in row:
                for key, value in row["tags"].items():
                    client.set_tag(row["run_id"], key, value)
                delivered["tags"] += 1
            else:
                raise ValueError(f"no way to deliver {row.get('undelivered')!r} recorded")
        except Exception as e:
            log.warning("%s of run %s not delivered: %s", row.get("undelivered"), row["run_id"], e)
            left.append(row)
    return left, delivered


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
    run = mlflow.active_run()
    if run is None:
        return None
    return _create_model_version(mlflow.MlflowClient(), run.info.run_id, mlflow.get_artifact_uri(artifact_path),
                                 name, description, tags)


def _create_model_version(client, run_id: str, source: str, name: str, description: str | None = None,
                          tags: dict[str, str] | None = None) -> str:
    """A new version of registered model ``name`` (created if missing) with ``source``, from ``run_id``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(name, description=description)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=redact(tags or {}),
                                          description=description)
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
