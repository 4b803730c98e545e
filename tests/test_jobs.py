"""What `maskmix submit` sends (no cluster needed): the job's config, its id, the token lookup."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from infra.config import load_config
from infra.jobs import COMPILE_CACHE_IN_JOB, CONFIG_IN_JOB, PACKAGES, JobError, install_compile_cache, job_config, \
    project_root, resolve_token, stage_working_dir, submission_id, submit


def _config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_job_config_absolutizes_local_paths_and_keeps_uris(tmp_path):
    path = _config(tmp_path, """
ray: {address: "10.0.0.1:6379", num_cpus: 2}
tracking: {uri: "sqlite:///./mlflow.db"}
pipeline:
  inputs: [{path: corpora/raw}, {path: "s3://bucket/raw"}, {path: /abs/raw}]
  output_dir: data/run1
train: {manifest: data/run1/manifest.json, output_dir: runs/x, checkpoint_uri: "s3://ckpt/x"}
""")
    data = job_config(load_config(path, use_env=False), "/home/u/proj")
    assert [i["path"] for i in data["pipeline"]["inputs"]] == ["/home/u/proj/corpora/raw", "s3://bucket/raw", "/abs/raw"]
    assert data["pipeline"]["output_dir"] == "/home/u/proj/data/run1"
    assert data["train"]["manifest"] == "/home/u/proj/data/run1/manifest.json"
    assert data["train"]["checkpoint_uri"] == "s3://ckpt/x"
    assert data["tracking"]["uri"] == "sqlite:////home/u/proj/mlflow.db"
    assert "address" not in data["ray"] and data["ray"]["num_cpus"] == 2  # the job joins the cluster it runs on
    load_config(_config(tmp_path, yaml.safe_dump(data)), use_env=False)  # still a valid config


def test_job_config_never_carries_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    path = _config(tmp_path, "storage: {endpoint_url: 'http://127.0.0.1:9000', session_token: tok-123456}\n"
                             "train: {manifest: m.json, output_dir: out}\n")
    data = job_config(load_config(path), "/w")
    text = yaml.safe_dump(data)
    assert "s3cr3t-value-123" not in text and "AKIAEXAMPLE" not in text and "tok-123456" not in text
    assert data["storage"] == {"endpoint_url": "http://127.0.0.1:9000"}


def test_working_dir_holds_the_packages_and_the_config(tmp_path):
    dest = stage_working_dir({"train": {"manifest": "/m.json", "output_dir": "/o"}}, str(tmp_path / "wd"))
    names = sorted(p.name for p in (tmp_path / "wd").iterdir())
    assert names == sorted([*PACKAGES, "_job"])
    assert yaml.safe_load((tmp_path / "wd" / CONFIG_IN_JOB).read_text())["train"]["manifest"] == "/m.json"
    assert not list((tmp_path / "wd").rglob("__pycache__")) and not list((tmp_path / "wd").rglob("*.so"))
    assert (tmp_path / "wd" / "infra" / "cli.py").exists() and dest == str(tmp_path / "wd")


def test_a_job_carries_the_numba_cache_and_its_driver_puts_it_back(tmp_path):
    # What the submitter compiled rides along outside any __pycache__ (see the test above): numba
    # files only, one folder per source folder.
    stage_working_dir({"train": {}}, str(tmp_path / "wd"))
    shipped = tmp_path / "wd" / COMPILE_CACHE_IN_JOB
    carried = [p for p in shipped.rglob("*") if p.is_file()] if shipped.exists() else []
    assert all(p.suffix in (".nbi", ".nbc") for p in carried)
    for p in carried:
        assert (project_root() / p.parent.relative_to(shipped) / "__pycache__" / p.name).is_file()

    # On the cluster: each file goes to <folder>/__pycache__ of the job's copy; one already there is kept.
    wd = tmp_path / "job"
    (wd / COMPILE_CACHE_IN_JOB / "pipelines" / "filters").mkdir(parents=True)
    (wd / COMPILE_CACHE_IN_JOB / "elsewhere").mkdir(parents=True)
    (wd / "pipelines" / "filters").mkdir(parents=True)
    (wd / "pipelines" / "__pycache__").mkdir()
    (wd / COMPILE_CACHE_IN_JOB / "pipelines" / "minhash.f-1.py311.nbi").write_bytes(b"index")
    (wd / COMPILE_CACHE_IN_JOB / "pipelines" / "minhash.f-1.py311.1.nbc").write_bytes(b"code")
    (wd / COMPILE_CACHE_IN_JOB / "pipelines" / "filters" / "c4.g-2.py311.nbi").write_bytes(b"index2")
    (wd / COMPILE_CACHE_IN_JOB / "elsewhere" / "x.h-3.py311.nbi").write_bytes(b"no such source folder")
    (wd / "pipelines" / "__pycache__" / "minhash.f-1.py311.1.nbc").write_bytes(b"fresher")
    assert install_compile_cache(wd) == 2
    assert (wd / "pipelines" / "__pycache__" / "minhash.f-1.py311.nbi").read_bytes() == b"index"
    assert (wd / "pipelines" / "__pycache__" / "minhash.f-1.py311.1.nbc").read_bytes() == b"fresher"
    assert (wd / "pipelines" / "filters" / "__pycache__" / "c4.g-2.py311.nbi").read_bytes() == b"index2"
    assert not (wd / "elsewhere").exists()
    assert install_compile_cache(wd) == 0 and install_compile_cache(tmp_path / "not-a-job") == 0


def test_submission_id_is_readable_and_unique_per_config():
    sid = submission_id("mix-doremi", "configs/My Mix_v2.yaml", "abcdef123456")
    assert re.fullmatch(r"maskmix-mix-doremi-my-mix-v2-\d{8}-\d{6}-abcdef", sid), sid


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert resolve_token().value == "home-token"
    file = tmp_path / "tok"
    file.write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(file))
    assert resolve_token().value == "file-token" and "RAY_AUTH_TOKEN_PATH" in resolve_token().source
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert (resolve_token().value, resolve_token().source) == ("env-token", "RAY_AUTH_TOKEN")
    assert resolve_token("given").value == "given"


def test_bad_submissions_fail_before_contacting_any_cluster(tmp_path):
    # An address nothing listens on: each error must come from validation, not from a connection.
    address = "http://127.0.0.1:9"
    with pytest.raises(JobError, match="unknown stage"):
        submit("deploy", "x.yaml", address)
    with pytest.raises(JobError, match="unknown mix method"):
        submit("mix", "x.yaml", address, method="regmix")
    with pytest.raises(JobError, match="--workers applies to `train`"):
        submit("pipeline", "x.yaml", address, workers=2)
    path = _config(tmp_path, "train: {manifest: m.json, output_dir: out}\n")
    with pytest.raises(Exception, match="needs a 'pipeline:' section"):
        submit("pipeline", str(path), address)
    with pytest.raises(JobError, match="cannot reach the Ray Jobs API at http://127.0.0.1:9"):
        submit("train", str(path), address)
    assert os.path.exists(path)


def test_a_submitted_config_takes_only_credentials_from_the_cluster_environment(tmp_path, monkeypatch):
    path = _config(tmp_path, yaml.safe_dump(job_config(load_config(_config(tmp_path, """
tracking: {uri: "http://mlflow.submitted:5000"}
storage: {endpoint_url: "http://s3.submitted:9000"}
train: {manifest: m.json, output_dir: out}
"""), use_env=False), "/w")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.of-the-head:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.of-the-head:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cluster-secret")
    assert load_config(path).tracking.uri == "http://mlflow.of-the-head:5000"  # a plain run: env wins
    monkeypatch.setenv("MASKMIX_CONFIG_RESOLVED", "1")  # what `maskmix submit` sets for the job
    cfg = load_config(path)
    assert cfg.tracking.uri == "http://mlflow.submitted:5000"
    assert cfg.storage.endpoint_url == "http://s3.submitted:9000"
    assert cfg.storage.secret_access_key.get_secret_value() == "cluster-secret"
