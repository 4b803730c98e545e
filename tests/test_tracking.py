"""infra.tracking: stage runs in MLflow, flattened params, and secrets that never reach the store."""

from __future__ import annotations

import json
import logging
import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from infra import tracking
from infra.config import TrackingConfig

PLANTED = "planted-Secret-9f3a1c"  # registered explicitly, as the CLI does for config secrets
ENV_SECRET = "env-Secret-77c2e0d4"  # only in the environment


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch):
    """Registered secrets are process-wide; each test starts with none."""
    monkeypatch.setattr(tracking, "_extra_secrets", set())


@pytest.fixture
def tracked(mlflow_uri):
    """MLflow configured through infra.tracking on a fresh sqlite store; yields a client for reading back."""
    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="maskmix-test"))
    return MlflowClient(tracking_uri=mlflow_uri)


def artifact_text(client: MlflowClient, run_id: str, path: str, tmp_path) -> str:
    dst = tmp_path / f"download-{run_id}"
    dst.mkdir(exist_ok=True)
    local = client.download_artifacts(run_id, path, str(dst))
    with open(local) as f:
        return f.read()


# --------------------------------------------------------------------------- runs


def test_stage_run_creates_tagged_finished_run(tracked, mlflow_uri, tmp_path):
    assert mlflow.get_tracking_uri() == mlflow_uri
    with tracking.stage_run("pipeline", params={"inputs": 2}, tags={"maskmix.config_hash": "abc"}) as run:
        run_id = run.info.run_id
        assert tracking.active_run_id() == run_id
        tracking.log_metrics({"docs_out": 7, "ratio": 0.25}, step=3)
        tracking.log_metrics({"docs_out": 9}, step=4)
    assert tracking.active_run_id() is None

    exp = tracked.get_experiment_by_name("maskmix-test")
    runs = tracked.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    got = tracked.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "pipeline"
    assert got.data.tags["maskmix.stage"] == "pipeline"
    assert got.data.tags["maskmix.config_hash"] == "abc"
    assert got.data.params == {"inputs": "2"}
    assert [(m.step, m.value) for m in tracked.get_metric_history(run_id, "docs_out")] == [(3, 7.0), (4, 9.0)]
    assert got.data.metrics["ratio"] == 0.25
    # artifacts of this test's store stay in its own folder, never ./mlruns of the repo
    assert str(tmp_path) in got.info.artifact_uri


def test_stage_run_custom_name(tracked):
    with tracking.stage_run("train", run_name="train-small") as run:
        pass
    got = tracked.get_run(run.info.run_id)
    assert got.info.run_name == "train-small" and got.data.tags["maskmix.stage"] == "train"


def test_nested_stage_run_is_a_child(tracked):
    with tracking.stage_run("demo") as parent:
        with tracking.stage_run("pipeline") as child:
            assert tracking.active_run_id() == child.info.run_id
        with tracking.stage_run("train") as child2:
            pass
        assert tracking.active_run_id() == parent.info.run_id
    p, c, c2 = (tracked.get_run(r.info.run_id) for r in (parent, child, child2))
    assert "mlflow.parentRunId" not in p.data.tags
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert c2.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (c.data.tags["maskmix.stage"], c2.data.tags["maskmix.stage"]) == ("pipeline", "train")
    assert {p.info.status, c.info.status, c2.info.status} == {"FINISHED"}
    assert c.info.experiment_id == p.info.experiment_id


def test_failing_stage_run_ends_failed_and_reraises(tracked):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("mix") as run:
            tracking.log_metrics({"before": 1.0})
            raise RuntimeError("boom")
    assert mlflow.active_run() is None
    got = tracked.get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.metrics == {"before": 1.0}


def test_failing_child_fails_only_itself_when_caught(tracked):
    with tracking.stage_run("demo") as parent:
        with pytest.raises(ValueError):
            with tracking.stage_run("train") as child:
                raise ValueError("bad")
        assert tracking.active_run_id() == parent.info.run_id
    assert tracked.get_run(child.info.run_id).info.status == "FAILED"
    assert tracked.get_run(parent.info.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- params


def test_log_params_flattens_nested_dicts(tracked):
    params = {
        "train": {"lr": 0.001, "steps": 200, "model": {"preset": "tiny", "d_model": 64, "tie_embeddings": True}},
        "weights": [0.25, 0.75],
        "deepspeed": {},
        "mixture": None,
        "name": "x",
    }
    with tracking.stage_run("train", params=params) as run:
        pass
    assert tracked.get_run(run.info.run_id).data.params == {
        "train.lr": "0.001",
        "train.steps": "200",
        "train.model.preset": "tiny",
        "train.model.d_model": "64",
        "train.model.tie_embeddings": "True",
        "weights": "[0.25, 0.75]",
        "deepspeed": "{}",
        "mixture": "None",
        "name": "x",
    }


def test_flatten():
    assert tracking.flatten({"a": {"b": {"c": 1}, "d": 2}, "e": {}, 3: "x"}) == {"a.b.c": 1, "a.d": 2, "e": {}, "3": "x"}


def test_long_param_values_are_truncated_not_rejected(tracked):
    long_list = list(range(3000))  # ~16000 chars of JSON, over MLflow's 6000-char limit
    with tracking.stage_run("pipeline", params={"ids": long_list, "text": "y" * 7000}) as run:
        pass
    params = tracked.get_run(run.info.run_id).data.params
    assert len(params["text"]) == 6000
    assert len(params["ids"]) == 6000 and params["ids"].startswith("[0, 1, 2, ")


def test_ordinary_token_keys_are_not_redacted(tracked):
    # "token" is everywhere in an LM config and is not a secret there.
    params = {"pipeline": {"tokenizer": {"path": "tok.json", "vocab_size": 4096}},
              "tokens_seen": 12345, "max_new_tokens": 64, "mask_token_id": 1, "n_tokens": 10}
    with tracking.stage_run("pipeline", params=params) as run:
        pass
    got = tracked.get_run(run.info.run_id).data.params
    assert got == {"pipeline.tokenizer.path": "tok.json", "pipeline.tokenizer.vocab_size": "4096",
                   "tokens_seen": "12345", "max_new_tokens": "64", "mask_token_id": "1", "n_tokens": "10"}


# --------------------------------------------------------------------------- secrets


def test_secret_looking_keys_are_masked(tracked):
    params = {
        "storage": {"endpoint_url": "http://minio:9000", "secret_access_key": "abcdefgh", "access_key_id": "AKIA1234",
                    "session_token": None},
        "storage.secret_access_key": "flat-value-1",
        "api_token": "tok-123456",
        "hf_api_key": "hf_xxxxxxxx",
        "db_password": "pw-000000",
        "aws_credentials": {"k": "v"},
    }
    with tracking.stage_run("pipeline", params=params, tags={"github_token": "ghp_abcdef"}) as run:
        tracking.set_tags({"ray.auth_token": "raytoken-1", "note": "fine"})
    got = tracked.get_run(run.info.run_id).data
    assert got.params == {
        "storage.endpoint_url": "http://minio:9000",
        "storage.secret_access_key": "***",
        "storage.access_key_id": "***",
        "storage.session_token": "None",  # nothing to hide
        "api_token": "***",
        "hf_api_key": "***",
        "db_password": "***",
        "aws_credentials": "***",
    }
    assert got.tags["github_token"] == "***"
    assert got.tags["ray.auth_token"] == "***"
    assert got.tags["note"] == "fine"


def test_planted_secret_values_never_reach_mlflow(tracked, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    tracking.register_secret(PLANTED)
    with tracking.stage_run("pipeline", params={"cmd": f"aws --key {PLANTED} --other {ENV_SECRET}",
                                                "nested": {"list": ["ok", f"x{PLANTED}y"]}},
                            tags={"origin": f"s3://{ENV_SECRET}@host"}) as run:
        tracking.set_tags({"later": PLANTED})
        tracking.log_text(f"line one\nthe key is {PLANTED}\nand {ENV_SECRET}\n", "logs/notes.txt")
        tracking.log_json({"config": {"endpoint": "http://e", "extra": [PLANTED, {"deep": ENV_SECRET}]},
                           "n": 3}, "config.json")
    run_id = run.info.run_id
    got = tracked.get_run(run_id).data
    assert got.params["cmd"] == "aws --key *** --other ***"
    assert got.params["nested.list"] == json.dumps(["ok", "x***y"])
    assert got.tags["origin"] == "s3://***@host"
    assert got.tags["later"] == "***"
    text = artifact_text(tracked, run_id, "logs/notes.txt", tmp_path)
    assert text == "line one\nthe key is ***\nand ***\n"
    doc = json.loads(artifact_text(tracked, run_id, "config.json", tmp_path))
    assert doc == {"config": {"endpoint": "http://e", "extra": ["***", {"deep": "***"}]}, "n": 3}

    # Nothing anywhere in the store or the artifact folder holds either value.
    everything = json.dumps([got.params, got.tags]) + text + json.dumps(doc)
    for root, _, files in os.walk(tmp_path / "mlruns"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                everything += f.read().decode(errors="replace")
    with open(tmp_path / "mlflow.db", "rb") as f:
        db = f.read()
    for secret in (PLANTED, ENV_SECRET):
        assert secret not in everything
        assert secret.encode() not in db


@pytest.mark.parametrize("order", [["abcd1234", "abcd1234-longer-secret"], ["abcd1234-longer-secret", "abcd1234"]])
def test_overlapping_secrets_are_masked_whole(monkeypatch, order):
    # The known secrets are a set: whichever order it yields, a secret containing another is masked whole.
    monkeypatch.setattr(tracking, "_known_secrets", lambda: list(order))
    assert tracking.redact_text("k=abcd1234-longer-secret; j=abcd1234") == "k=***; j=***"


def test_short_values_are_not_treated_as_secrets(monkeypatch):
    tracking.register_secret("abc")
    tracking.register_secret(None)
    tracking.register_secret("")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "x")
    assert tracking.redact_text("abc x abc") == "abc x abc"


def test_redact_keeps_structure_and_non_strings():
    tracking.register_secret(PLANTED)
    value = {"a": (1, PLANTED), "b": {"password": "", "token": None, "n": 2.5}, "c": True}
    assert tracking.redact(value) == {"a": [1, "***"], "b": {"password": "", "token": None, "n": 2.5}, "c": True}


def test_redacting_filter_masks_log_records(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    tracking.register_secret(PLANTED)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(tracking.RedactingFilter())
    logger = logging.getLogger("maskmix.test.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("connecting with key %s and %s", PLANTED, ENV_SECRET)
        logger.info("nothing to hide: %d docs", 12)
        logger.warning(f"inline {PLANTED}")
    finally:
        logger.removeHandler(handler)
    assert records == ["connecting with key *** and ***", "nothing to hide: 12 docs", "inline ***"]


# --------------------------------------------------------------------------- no active run


def test_functions_are_noops_without_an_active_run(mlflow_uri, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert mlflow.active_run() is None
    assert tracking.active_run_id() is None
    some_file = tmp_path / "f.txt"
    some_file.write_text("x")
    tracking.log_params({"a": 1})
    tracking.set_tags({"t": "v"})
    tracking.log_metrics({"m": 1.0}, step=1)
    tracking.log_json({"a": 1}, "a.json")
    tracking.log_text("hello", "a.txt")
    tracking.log_file(str(some_file))
    tracking.log_bytes(b"data", "dir/b.bin")
    assert mlflow.active_run() is None
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
    assert not (tmp_path / "mlruns").exists() or not any(
        files for _, _, files in os.walk(tmp_path / "mlruns"))


def test_log_file_and_bytes_inside_a_run(tracked, tmp_path):
    src = tmp_path / "stats.csv"
    src.write_text("a,b\n1,2\n")
    with tracking.stage_run("pipeline") as run:
        tracking.log_file(str(src), "tables")
        tracking.log_bytes(b'{"schema_version": 1}', "artifacts/manifest.json")
        tracking.log_bytes(b"top", "top.bin")
    run_id = run.info.run_id
    assert artifact_text(tracked, run_id, "tables/stats.csv", tmp_path) == "a,b\n1,2\n"
    assert artifact_text(tracked, run_id, "artifacts/manifest.json", tmp_path) == '{"schema_version": 1}'
    assert artifact_text(tracked, run_id, "top.bin", tmp_path) == "top"
    assert sorted(a.path for a in tracked.list_artifacts(run_id)) == ["artifacts", "tables", "top.bin"]
