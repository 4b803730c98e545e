"""S3 end to end (issue 7, point 5): ONE config with one `storage:` block drives the whole chain
through the real CLI with every location on an S3-compatible server (moto, on loopback).

    pipeline run   inputs s3://, output_dir s3://, near-dedup index s3://
    mix baseline | doremi | laws   manifest s3://, mixture.json s3://, the laws sweep's resume state s3://
    train          manifest + mixture s3://, Ray Train (embedded, 1 worker) with storage_path s3://,
                   checkpoints mirrored to checkpoint_uri s3://
    eval           the checkpoint read back from s3:// (the local training folder is deleted first)

The endpoint, region and credentials come from the environment only (never the YAML). Locally there
is only the MLflow sqlite store, the config file and train.output_dir (DeepSpeed checkpoints need a
local folder; the S3 mirror is what outlives it).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["code", "license"]
# Proxy sizes of tests/test_mixing_run.py (the `test` preset shrunk further).
PROXY = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, lr=3e-3,
             warmup_steps=1, eval_docs_per_domain=4, mc_samples=1)
TRAIN_STEPS = 4

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def _cli(args: list[str], cwd: Path) -> tuple[str, str]:
    """(stdout, stderr) of `python -m infra.cli ARGS`, which must succeed."""
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"maskmix {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    print(f"maskmix {args[0]} {args[1]}: {time.time() - start:.1f}s")
    return done.stdout, done.stderr


@pytest.fixture(scope="module")
def chain(s3_server, tmp_path_factory, _mlflow_template_db):
    """Upload a small real corpus, then run every stage through `python -m infra.cli` on one config."""
    import boto3

    from pipelines.demo_corpus import harvest

    tmp = tmp_path_factory.mktemp("s3-everywhere")
    # The MLflow store starts as a copy of the suite's migrated sqlite DB (tests/conftest.py) instead of
    # an empty file the first CLI process would migrate (seconds; far more on a loaded CI machine).
    # The Default experiment of the copy is pointed here, as conftest's stores are.
    shutil.copyfile(_mlflow_template_db, tmp / "mlflow.db")
    with contextlib.closing(sqlite3.connect(tmp / "mlflow.db")) as conn, conn:
        conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                     (str(tmp / "mlruns" / "0"),))
    bucket = f"maskmix-{uuid.uuid4().hex[:10]}"
    secret = f"secret-{uuid.uuid4().hex}"
    key_id = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="eu-west-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret)
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})

    # The corpus goes in through the bucket only; the local harvest folder is removed.
    corpus = tmp / "harvest"
    stats = harvest(corpus, DOMAINS, max_bytes_per_domain=40_000)
    for domain in DOMAINS:
        client.upload_file(str(corpus / f"{domain}.jsonl"), bucket, f"corpus/{domain}.jsonl")
    shutil.rmtree(corpus)

    s3 = f"s3://{bucket}"
    train_out = tmp / "train-out"  # the one local folder DeepSpeed needs
    config = {
        "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "s3-everywhere"},
        # One storage block; endpoint, region and credentials come from the environment.
        "storage": {},
        "pipeline": {
            "inputs": [{"path": f"{s3}/corpus"}],
            "output_dir": f"{s3}/data",
            "word_count_filter": {"min_words": 20},
            "near_dedup": {"index_uri": f"{s3}/dedup-index", "update_index": True, "partitions": 2},
            "tokenizer": {"vocab_size": 300, "train_docs": 200},
            "shards": {"max_rows": 40, "validation_fraction": 0.15, "min_validation_docs": 3},
        },
        "mix": {
            "manifest": f"{s3}/data/manifest.json",
            "method": "natural",
            "output": f"{s3}/mixtures/natural.json",
            "sweep": {"output_dir": f"{s3}/sweep", "cpus_per_run": 1},
            "doremi": {"proxy": {**PROXY, "steps": 3}, "rounds": 1},
            "laws": {"proxy": {**PROXY, "steps": 2}, "n_mixtures": 3, "restarts": 1, "bootstrap_samples": 0,
                     "holdout_fraction": 0, "max_epochs": None},
        },
        "train": {
            "manifest": f"{s3}/data/manifest.json",
            "mixture": f"{s3}/mixtures/laws.json",
            "output_dir": str(train_out),
            "model": {"preset": "test"},
            "seq_len": 32, "micro_batch_size": 2, "steps": TRAIN_STEPS, "warmup_steps": 1, "lr": 1e-2,
            "log_every": 2, "checkpoint_every": 2, "export": False,
            "checkpoint_uri": f"{s3}/checkpoints",
            "eval": {"mc_samples": 1, "max_docs_per_domain": 4, "batch_size": 4},
            "launch": {"mode": "ray", "num_workers": 1, "cpus_per_worker": 1, "storage_path": f"{s3}/ray"},
        },
        "eval": {"mc_samples": 1, "max_docs_per_domain": 4, "batch_size": 4},
    }
    config_path = tmp / "maskmix.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    outputs: dict[str, tuple[str, str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        # The environment of every CLI process below (and of the Ray workers they start).
        mp.setenv("AWS_ENDPOINT_URL_S3", s3_server)
        mp.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        mp.setenv("AWS_ACCESS_KEY_ID", key_id)
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
        cfg = str(config_path)
        outputs["pipeline"] = _cli(["pipeline", "run", cfg], tmp)
        outputs["baseline"] = _cli(["mix", "baseline", cfg], tmp)
        outputs["doremi"] = _cli(["mix", "doremi", cfg, "--set", f"mix.output={s3}/mixtures/doremi.json"], tmp)
        outputs["laws"] = _cli(["mix", "laws", cfg, "--set", f"mix.output={s3}/mixtures/laws.json"], tmp)
        outputs["train"] = _cli(["train", cfg], tmp)
        train_local = sorted(p.name for p in train_out.iterdir())
        shutil.rmtree(train_out)  # the training machine is gone: eval of the same config reads the S3 mirror
        outputs["eval"] = _cli(["eval", cfg], tmp)
    local = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir())

    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    yield {"client": client, "bucket": bucket, "keys": keys, "secret": secret, "key_id": key_id, "tmp": tmp,
           "tracking_uri": config["tracking"]["uri"], "outputs": outputs, "harvest": stats, "config": config_path,
           "local": local, "train_local": train_local}


def _json(chain, key: str) -> dict:
    return json.loads(chain["client"].get_object(Bucket=chain["bucket"], Key=key)["Body"].read())


def _under(chain, prefix: str) -> list[str]:
    return [k for k in chain["keys"] if k.startswith(prefix)]


def test_pipeline_reads_and_writes_s3_with_the_dedup_index_there(chain):
    from infra.contracts import Manifest

    manifest = Manifest.model_validate(_json(chain, "data/manifest.json"))
    assert set(manifest.domain_names()) == set(DOMAINS)
    shards = [k for k in _under(chain, "data/") if k.endswith(".parquet") and "/shards/" in f"/{k}"]
    assert shards, _under(chain, "data/")
    for domain in DOMAINS:
        info = manifest.domains[domain]
        assert info.tokens("train") > 0 and info.tokens("validation") > 0
    assert "data/tokenizer.json" in chain["keys"]
    assert _under(chain, "dedup-index/"), "the near-dedup index was not written to S3"
    assert "manifest.json" in chain["outputs"]["pipeline"][0] or "data/manifest.json" in chain["outputs"]["pipeline"][0]


def test_mixtures_and_sweep_state_on_s3(chain):
    for method in ("natural", "doremi", "laws"):
        mixture = _json(chain, f"mixtures/{method}.json")
        assert mixture["method"] == method
        assert set(mixture["weights"]) == set(DOMAINS)
        assert math.isclose(sum(mixture["weights"].values()), 1.0, abs_tol=1e-9)
        assert all(w >= 0 for w in mixture["weights"].values())
    assert "mixtures/doremi.doremi.json" in chain["keys"]
    runs = [k for k in _under(chain, "sweep/runs/") if k.endswith(".json")]
    assert len(runs) == 3  # one resume record per proxy run of the laws sweep
    record = _json(chain, runs[0])
    assert record["status"] == "finished" and set(record["results"]["eval"]) == set(DOMAINS)
    assert _json(chain, "mixtures/laws.json")["details"]["n_runs"] == 3


def test_laws_sweep_resumes_from_its_s3_state(chain, s3_server):
    # What a rerun of `mix laws` does first: every run of the sweep is found finished in the S3
    # records, so nothing is trained (the run function would fail) and no Ray is needed.
    from infra.config import StorageConfig
    from mixing.sweep import SweepRun, run_sweep

    def must_not_run(weights, run_id):
        raise AssertionError(f"run {run_id} was trained again")

    records = [_json(chain, k) for k in _under(chain, "sweep/runs/") if k.endswith(".json")]
    runs = [SweepRun(weights=r["weights"], config=r["config"], seed=r["seed"]) for r in records]
    assert [r.run_id for r in runs] == [r["run_id"] for r in records]
    storage = StorageConfig(endpoint_url=s3_server, region="eu-west-1", access_key_id=chain["key_id"],
                            secret_access_key=chain["secret"])
    results = run_sweep(runs, must_not_run, f"s3://{chain['bucket']}/sweep", progress=None, storage=storage)
    assert all(r.ok and r.resumed for r in results)
    assert [r.results for r in results] == [r["results"] for r in records]


def test_nothing_local_but_the_tracking_store_and_deepspeeds_folder(chain):
    # No "s3:" folder (an s3:// URI taken for a local path), no local sweep/ray/dedup state.
    assert set(chain["local"]) <= {"maskmix.yaml", "mlflow.db", "mlruns"}, chain["local"]
    # train.output_dir: the checkpoints (mirrored) and the output lock, no Ray Train state (that is on S3).
    assert "ray" not in chain["train_local"] and "checkpoints" in chain["train_local"], chain["train_local"]


def test_train_state_and_checkpoints_on_s3(chain):
    ray_state = _under(chain, "ray/")
    assert ray_state, "Ray Train wrote no run state under launch.storage_path"
    assert any(k.split("/")[1].startswith("maskmix-train-") for k in ray_state)
    tag = chain["client"].get_object(Bucket=chain["bucket"], Key="checkpoints/latest")["Body"].read().decode()
    assert tag == f"step-{TRAIN_STEPS:08d}"
    steps = {k.split("/")[1] for k in _under(chain, "checkpoints/step-")}
    assert steps == {f"step-{s:08d}" for s in range(2, TRAIN_STEPS + 1, 2)}
    assert f"checkpoints/{tag}/model_args.json" in chain["keys"]
    line = next(l for l in chain["outputs"]["train"][0].splitlines() if l.startswith("checkpoint:"))
    assert f"steps: {TRAIN_STEPS}" in line
    assert math.isfinite(float(line.rsplit("final loss:", 1)[1]))


def test_eval_of_the_s3_checkpoint_and_mlflow_runs(chain):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(chain["tracking_uri"])
    exp = client.get_experiment_by_name("s3-everywhere")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("maskmix.stage"), []).append(run)
    assert {"pipeline", "mix", "sweep_run", "train", "eval"} <= set(by_stage)
    assert all(r.info.status == "FINISHED" for r in runs)
    train = by_stage["train"][0]
    assert train.data.params["train.launch.storage_path"] == "s3://" + chain["bucket"] + "/ray"
    assert math.isfinite(train.data.metrics["train/loss"])
    (evaluation,) = by_stage["eval"]
    assert evaluation.data.params["checkpoint"] == f"s3://{chain['bucket']}/checkpoints"
    assert evaluation.data.params["manifest"] == f"s3://{chain['bucket']}/data/manifest.json"
    for domain in DOMAINS:
        nats = evaluation.data.metrics[f"eval/{domain}/nats_per_token"]
        assert math.isfinite(nats) and nats > 0
        assert domain in chain["outputs"]["eval"][0]


def test_no_secret_is_written_anywhere_we_can_read(chain):
    from mlflow.tracking import MlflowClient

    secret = chain["secret"]
    assert secret not in chain["config"].read_text()
    client = MlflowClient(chain["tracking_uri"])
    exp = client.get_experiment_by_name("s3-everywhere")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert runs
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert secret not in value, f"run {run.info.run_id} ({run.data.tags.get('maskmix.stage')}): {key}"
    for stage, (stdout, stderr) in chain["outputs"].items():
        assert secret not in stdout and secret not in stderr, stage
    # Every object in the bucket: state files of Ray Train, sweep records, manifests, checkpoints.
    for key in chain["keys"]:
        body = chain["client"].get_object(Bucket=chain["bucket"], Key=key)["Body"].read()
        assert secret.encode() not in body, key


def test_eval_of_a_train_config_falls_back_to_the_mirror_only_without_a_local_checkpoint(tmp_path):
    from infra.config import TrainConfig
    from infra.stages import _train_checkpoint

    out = tmp_path / "out"
    cfg = TrainConfig(manifest="s3://b/data/manifest.json", output_dir=str(out), checkpoint_uri="s3://b/ckpt")
    assert _train_checkpoint(cfg) == "s3://b/ckpt"  # nothing local (another machine, or cleaned up)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-00000004")
    assert _train_checkpoint(cfg) == str(out)  # a local checkpoint is used as before
    assert _train_checkpoint(cfg.model_copy(update={"checkpoint_uri": None, "output_dir": str(tmp_path / "x")})) \
        == str(tmp_path / "x")
