"""Shared fixtures for the whole suite: an isolated environment, MLflow on a fresh sqlite file,
one embedded Ray per session, and an S3 server (moto) on loopback.

The environment is fixed when this module is imported, i.e. before any test module imports
ray or mlflow, so nothing a developer has exported (credentials, a cluster address, a tracking
server) can leak into a test or be written to by one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- environment

# Variables that point a test at something real (a cluster, a tracking server, an AWS account).
_LEAKY_PREFIXES = ("AWS_",)
_LEAKY_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS",
                "MLFLOW_ENABLE_ASYNC_LOGGING")
# MLflow exports these itself (set_tracking_uri, set_experiment) "for subprocesses"; a test that
# leaves them behind points every later test at its deleted store or at an experiment id that
# does not exist there.
_MLFLOW_EXPORTED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")

_ISOLATED_ENV = {
    "RAY_AUTH_MODE": "disabled",  # tests only talk to loopback; no test here exercises Ray auth
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # With the real AWS_* variables gone, botocore and pyarrow would otherwise probe the EC2
    # metadata endpoint for credentials (a timeout per client without explicit keys).
    "AWS_EC2_METADATA_DISABLED": "true",
    # Ray Train's controller polls its workers every 2 s by default, so fit() idled up to two polls
    # (~4-5 s) after the last rank had reported; a shorter poll only notices the end (or a failure) sooner.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def _isolate_environment() -> None:
    for name in list(os.environ):
        if name.startswith(_LEAKY_PREFIXES) or name in _LEAKY_NAMES:
            del os.environ[name]
    os.environ.update(_ISOLATED_ENV)
    # The DeepSpeed JIT build (cpu_adam ...) is cached across runs, inside the repo's ignored .cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))


_isolate_environment()


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, each worker (and every process it starts) gets its share of the cores.

    torch's OpenMP threads spin while they wait for work, so two workers that each run torch on
    every core run far slower than their share: the HMM test (tests/test_training_hmm.py, 2 cores)
    takes 53 s alone, 207 s beside a copy of itself with 2 threads each, 76 s with 1 thread each.
    Set before torch is imported (here, at conftest import); children inherit the variables.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, share)


_share_cores_between_workers()


@pytest.fixture(scope="session", autouse=True)
def isolated_environment():
    """Session-wide: the isolation above is in place for every test (re-applied if a plugin undid it)."""
    _isolate_environment()
    yield


# --------------------------------------------------------------------------- markers


# The files that take longest (pytest --durations on clean-clone CI runs, 2 cores), longest first.
# `make test` runs files on two workers in collection order (--no-loadscope-reorder); xdist's
# default order, most tests first, left single-test files to the end (the 5-minute HMM test
# among them), where the last 3% of the tests took ~8 of 32 minutes. Longest first evens out the
# workers' ends, at a price: the Ray-heavy load and kill tests now overlap and slow each other
# (pytest 29-31 min with the per-worker thread share above, against 32 min before; a loaded machine).
LONG_POLES = (
    "tests/reliability/test_load.py",
    "tests/reliability/test_ray_worker_killed.py",
    "tests/test_training_hmm.py",
    "tests/reliability/test_pipeline_killed.py",
    "tests/reliability/test_mlflow_outage.py",
    "tests/test_s3_everywhere.py",
    "tests/reliability/test_hostile_corpus.py",
    "tests/test_mixing_run.py",
    "tests/test_training_launch.py",
    "tests/test_service.py",
    "tests/test_dashboard_browser.py",
)


def _long_poles_first(items) -> None:
    rank = {path: i for i, path in enumerate(LONG_POLES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_POLES)))  # stable: files keep their order


def pytest_collection_modifyitems(config, items):
    _long_poles_first(items)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either way
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """One sqlite DB with MLflow's Alembic migrations applied (several seconds), copied per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates
    return path


@contextlib.contextmanager
def _fresh_mlflow_store(directory: Path, template: Path):
    """A copy of the migrated template DB at ``directory`` as MLflow's tracking URI; artifacts stay there."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    db = directory / "mlflow.db"
    shutil.copyfile(template, db)
    artifact_root = directory / "mlruns"
    # The template's Default experiment points at the template's folder; new experiments use the
    # store's default root, which is ./mlruns of the working directory unless this is set.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                     (str(artifact_root / "0"),))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", str(artifact_root))
        for name in _MLFLOW_EXPORTED:  # recorded as absent, so monkeypatch removes what MLflow sets
            mp.delenv(name, raising=False)
        uri = f"sqlite:///{db}"
        mlflow.set_tracking_uri(uri)
        fluent._active_experiment_id = None  # an experiment id from another test's DB means nothing here
        try:
            yield uri
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            fluent._active_experiment_id = None
            mlflow.set_tracking_uri(None)  # later tests without this fixture do not write to a dead store
            for name in _MLFLOW_EXPORTED:
                os.environ.pop(name, None)


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_template_db):
    """A fresh ``sqlite:///<tmp>/mlflow.db`` set as MLflow's tracking URI; artifacts stay in <tmp>."""
    with _fresh_mlflow_store(tmp_path, _mlflow_template_db) as uri:
        yield uri


@pytest.fixture(scope="module")
def module_mlflow(tmp_path_factory, _mlflow_template_db):
    """Like ``mlflow_uri``, shared by the tests of one module (for module-scoped pipeline runs)."""
    with _fresh_mlflow_store(tmp_path_factory.mktemp("mlflow"), _mlflow_template_db) as uri:
        yield uri


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_session():
    """Embedded Ray with 2 CPUs and a 512 MB object store, shared by every test that needs it."""
    from infra.cluster import ensure_ray, shutdown_ray
    from infra.config import RayConfig

    resources = ensure_ray(RayConfig(num_cpus=2, object_store_memory=512 * 1024**2))
    try:
        yield resources
    finally:
        shutdown_ray()


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket; returns ("s3://<bucket>", StorageConfig for the server)."""
    import boto3

    from infra.config import StorageConfig

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    cfg = StorageConfig(endpoint_url=s3_server, region="us-east-1",
                        access_key_id="testing", secret_access_key="testing")
    return f"s3://{bucket}", cfg
