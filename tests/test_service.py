"""The service end to end: a real Ray head with token auth and an MLflow server (artifacts on a
local S3 server) started by `maskmix stack up`, jobs submitted with `maskmix submit`, followed,
listed and stopped with `maskmix jobs`, everything stopped by its pids at the end.

One stack serves the module (starting a Ray head costs ~10-30 s on 2 cores). Every command runs
as a user runs it: `python -m infra.cli ...` in a subprocess, with the token only where the test
says so.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.stack_fixtures import local_stack, maskmix_env, run_maskmix

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server):
    """`maskmix stack up` with MLflow artifacts on the moto S3 server; `stack down` at the end."""
    root = tmp_path_factory.mktemp("service")
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    storage = root / "storage.yaml"
    storage.write_text(yaml.safe_dump({"storage": {"endpoint_url": s3_server, "region": "us-east-1",
                                                   "access_key_id": "testing", "secret_access_key": "testing"}}))
    with local_stack(root, ["--cpus", 2, "--artifacts", f"s3://{bucket}/mlflow", "--config", storage]) as st:
        yield {**st, "bucket": bucket, "s3": s3}


def test_stack_status_reports_every_service_up(stack):
    status = run_maskmix(["stack", "status", "--dir", stack["dir"]], stack["root"], maskmix_env(home=stack["home"]))
    assert status.returncode == 0, status.stdout + status.stderr
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines() if not line.startswith(" ")}
    assert states == {"ray": "up", "mlflow": "up", "dashboard": "up"}
    # Every service, and every process it started, listens on loopback only.
    for svc in stack["services"].values():
        assert svc["url"].startswith("http://127.0.0.1:")
    procs = [psutil.Process(s["pid"]) for s in stack["services"].values()]
    procs += [c for p in procs for c in p.children(recursive=True)]
    listening = {(p.pid, " ".join(p.cmdline()[:3])[:80], c.laddr.ip, c.laddr.port)
                 for p in procs if p.is_running() for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening, "no listening sockets found"
    exposed = {entry for entry in listening if entry[2] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not exposed, exposed
    dashboard = urllib.request.urlopen(stack["services"]["dashboard"]["url"] + "/_stcore/health", timeout=10)
    assert dashboard.read().decode().strip() == "ok"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pipelines.demo_corpus import harvest

    out = tmp_path_factory.mktemp("corpus")
    harvest(out, domains=("code", "reference"), max_bytes_per_domain=150_000)
    return out


def _pipeline_config(stack, corpus, out: Path) -> Path:
    cfg = {"ray": {"num_cpus": 2}, "tracking": {"uri": stack["mlflow"], "experiment": "service-pipeline"},
           "pipeline": {"inputs": [{"path": str(corpus), "domain_field": "domain"}], "output_dir": str(out),
                        "word_count_filter": {"min_words": 5}, "tokenizer": {"vocab_size": 512},
                        "shards": {"validation_fraction": 0.1}}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_config(stack, manifest: Path, out: Path, steps: int, experiment: str) -> Path:
    cfg = {"tracking": {"uri": stack["mlflow"], "experiment": experiment},
           "train": {"manifest": str(manifest), "output_dir": str(out), "model": {"preset": "test"}, "seq_len": 64,
                     "micro_batch_size": 4, "steps": steps, "warmup_steps": 1, "lr": 1e-3, "log_every": 1,
                     "zero_stage": 1, "checkpoint_every": max(2, steps // 2),
                     "eval": {"mc_samples": 1, "max_docs_per_domain": 4}}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pipeline_job(stack, corpus):
    """A pipeline job on the demo corpus, submitted and followed to its end with `--wait`."""
    out = stack["root"] / "pipeline-out"
    config = _pipeline_config(stack, corpus, out)
    result = run_maskmix(["submit", "pipeline", config, "--address", stack["address"], "--wait"], stack["root"],
                      maskmix_env(stack["token_path"], stack["home"]))
    return {"result": result, "out": out, "config": config}


def test_pipeline_job_succeeds_and_writes_its_manifest(stack, pipeline_job):
    result = pipeline_job["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.split()[1]
    assert job_id.startswith("maskmix-pipeline-pipeline-out-")
    assert f"job {job_id}: SUCCEEDED" in result.stdout
    manifest = json.loads((pipeline_job["out"] / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"code", "reference"}
    assert all(s["rows"] > 0 for d in manifest["domains"].values() for s in d["shards"])

    env = maskmix_env(stack["token_path"], stack["home"], RAY_API_SERVER_ADDRESS=stack["address"])
    status = run_maskmix(["jobs", "status", job_id], stack["root"], env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    listed = run_maskmix(["jobs", "list"], stack["root"], env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:3] == ["SUCCEEDED", "pipeline"]
    logs = run_maskmix(["jobs", "logs", job_id], stack["root"], env)
    assert "manifest:" in logs.stdout  # the pipeline command's own last lines, from the cluster


def test_submission_without_the_token_is_refused_with_a_clear_message(stack, pipeline_job, tmp_path):
    config = pipeline_job["config"]
    missing = run_maskmix(["submit", "pipeline", config, "--address", stack["address"]], tmp_path,
                       maskmix_env(home=tmp_path))
    assert missing.returncode == 2
    assert "requires an auth token and none was found" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "Traceback" not in missing.stderr

    wrong = run_maskmix(["jobs", "list", "--address", stack["address"]], tmp_path,
                     maskmix_env(home=tmp_path, RAY_AUTH_TOKEN="not-the-token-0123456789"))
    assert wrong.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert "not-the-token" not in wrong.stderr  # the message names the source, never the value


def test_a_bad_config_fails_before_anything_is_submitted(stack, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  manifest: m.json\n  output_dir: out\n  lr_rate: 0.1\n")
    out = run_maskmix(["submit", "train", bad, "--address", stack["address"]], tmp_path,
                   maskmix_env(stack["token_path"], tmp_path))
    assert out.returncode == 2 and "train.lr_rate: unknown key" in out.stderr
    env = maskmix_env(stack["token_path"], tmp_path, RAY_API_SERVER_ADDRESS=stack["address"])
    assert "-bad-" not in run_maskmix(["jobs", "list"], tmp_path, env).stdout


def test_training_job_logs_to_the_mlflow_server_with_artifacts_on_s3(stack, pipeline_job):
    assert pipeline_job["result"].returncode == 0
    experiment = f"service-train-{uuid.uuid4().hex[:6]}"
    out = stack["root"] / "train-out"
    config = _train_config(stack, pipeline_job["out"] / "manifest.json", out, steps=4, experiment=experiment)
    result = run_maskmix(["submit", "train", config, "--address", stack["address"], "--wait"], stack["root"],
                      maskmix_env(stack["token_path"], stack["home"]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = MlflowClient(tracking_uri=stack["mlflow"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    train_run = next(r for r in runs if r.data.tags.get("maskmix.stage") == "train")
    assert train_run.info.status == "FINISHED"
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert [m.step for m in history][-1] >= 3
    # Artifacts went through the server's proxy into the bucket.
    assert train_run.info.artifact_uri.startswith("mlflow-artifacts:")
    logged = [a.path for a in client.list_artifacts(train_run.info.run_id)]
    assert logged
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket=stack["bucket"], Prefix="mlflow/").get("Contents", [])]
    run_keys = [k for k in keys if f"/{train_run.info.run_id}/artifacts/" in k]
    assert run_keys, keys[:20]
    assert {k.split("/artifacts/", 1)[1].split("/")[0] for k in run_keys} >= {p.split("/")[0] for p in logged}


def test_jobs_stop_stops_a_running_job(stack, pipeline_job):
    assert pipeline_job["result"].returncode == 0
    out = stack["root"] / "long-train"
    config = _train_config(stack, pipeline_job["out"] / "manifest.json", out, steps=100_000,
                           experiment="service-stop")
    env = maskmix_env(stack["token_path"], stack["home"], RAY_API_SERVER_ADDRESS=stack["address"])
    submitted = run_maskmix(["submit", "train", config, "--job-id", f"maskmix-stop-{uuid.uuid4().hex[:6]}"],
                         stack["root"], env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[1]
    deadline = time.monotonic() + 300
    while "RUNNING" not in (status := run_maskmix(["jobs", "status", job_id], stack["root"], env)).stdout:
        assert "SUCCEEDED" not in status.stdout and "FAILED" not in status.stdout, status.stdout
        assert time.monotonic() < deadline, status.stdout
        time.sleep(1)
    # A second job is left running on purpose: `stack down` (this module's teardown) must stop its
    # driver too, though Ray runs it in a session of its own (stack_fixtures checks every descendant).
    left_config = _train_config(stack, pipeline_job["out"] / "manifest.json", stack["root"] / "left-train",
                                steps=100_000, experiment="service-stop")
    left = run_maskmix(["submit", "train", left_config, "--job-id", f"maskmix-left-{uuid.uuid4().hex[:6]}"],
                       stack["root"], env)
    assert left.returncode == 0, left.stderr
    stopped = run_maskmix(["jobs", "stop", job_id], stack["root"], env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout
    assert f"{job_id}: STOPPED" in run_maskmix(["jobs", "status", job_id], stack["root"], env).stdout


def test_stack_ports_are_distinct_and_never_given_twice(tmp_path):
    """Every port of a stack is distinct: Ray refuses to start when two of its components share one."""
    from infra.stack import Stack, free_ports

    ports = free_ports(200)
    assert len(set(ports)) == 200
    stack = Stack(tmp_path / "stack")
    ray_ports, mlflow_port, dashboard_port = stack._free_ports(9), stack._free_ports(1), stack._free_ports(1)
    assert len(set(ray_ports + mlflow_port + dashboard_port)) == 11
    assert set(free_ports(20, exclude=set(ports[:100]))).isdisjoint(ports[:100])
