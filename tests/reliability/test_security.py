"""Issue 9, security: secrets never reach MLflow or the logs; checkpoints and artifacts load without
running code; outputs cannot escape their root; the deploy manifests and local services are locked
down by default.

(a) planted secrets, real runs: `maskmix mix baseline` on a tiny manifest and `maskmix pipeline run`
    on a tiny corpus (the cheapest stages that log their config), as subprocesses at INFO level.
    Afterwards neither the MLflow store (the sqlite file itself: params, tags, metric names,
    dataset inputs, run names), nor any logged artifact (downloaded through the MLflow client),
    nor the process's stdout/stderr, nor the files the stage wrote contain any planted secret.
(b) loading without code execution: every torch.load in the code passes weights_only=True, every
    YAML load is safe_load, nothing unpickles artifact data; a checkpoint crafted with a pickle
    payload (it creates a marker file when unpickled -- shown by a control that unpickles it
    unsafely in a subprocess) is refused by every loader, and the marker never appears. That
    includes the training resume, where DeepSpeed itself loads its files with weights_only=False.
(c) paths: a domain or a checkpoint pointer that is a path ("../../x") cannot make anything be
    written or read outside the configured root.
(d) deploy manifests: Ray token auth and MLflow basic auth on; local services bind 127.0.0.1 by
    default and the commands the stack builds use the host they are given (no service started).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

try:
    from training_fixtures import write_tiny_corpus
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import write_tiny_corpus

from infra.errors import ContractError

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("infra", "pipelines", "training", "mixing", "dashboards", "bench")


# =========================================================================== (a) planted secrets


def _secret(name: str) -> str:
    return f"planted-{name}-{uuid.uuid4().hex}"


def _grep_tree(root: Path, secrets: dict[str, str]) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{name} in {path}" for name, value in secrets.items() if value.encode() in data]
    return hits


def _mlflow_contents(db: Path, artifact_dir: Path) -> tuple[list, Path]:
    """Every run of the store, and every artifact of every run downloaded under ``artifact_dir``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    for run in runs:
        target = artifact_dir / run.info.run_id
        target.mkdir(parents=True)
        if client.list_artifacts(run.info.run_id):
            client.download_artifacts(run.info.run_id, "", str(target))
    return runs, artifact_dir


def _run_cli(args: list[str], cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(env_extra, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _assert_no_secret_anywhere(result, secrets: dict[str, str], db: Path, tmp: Path, outputs: list[Path],
                               expect_visible: str) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    logs = result.stdout + result.stderr
    assert expect_visible in logs or expect_visible in db.read_bytes().decode("latin-1"), \
        "control: the run did log its (non-secret) config"
    assert [n for n, v in secrets.items() if v in logs] == [], "a secret is in the process's output"
    runs, artifacts = _mlflow_contents(db, tmp / "downloaded")
    assert runs, "the stage opened no MLflow run"
    for run in runs:
        fields = [*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values(),
                  *run.data.metrics, run.info.run_name or ""]
        fields += [json.dumps(str(i)) for i in (run.inputs.dataset_inputs if run.inputs else [])]
        assert [n for n, v in secrets.items() if any(v in f for f in fields)] == [], run.info.run_id
    assert any(artifacts.rglob("*.json")), "control: artifacts were downloaded"
    assert _grep_tree(artifacts, secrets) == []
    # the store itself (whatever the API shows or not), and what the stage wrote
    data = db.read_bytes()
    assert [n for n, v in secrets.items() if v.encode() in data] == []
    for out in outputs:
        assert _grep_tree(out, secrets) == []


@pytest.fixture
def planted(tmp_path, _mlflow_template_db):
    secrets = {name: _secret(name) for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "yaml_secret_access_key",
                                                "yaml_access_key_id", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                                                "set_session_token")}
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    env = {"RAY_AUTH_TOKEN": secrets["RAY_AUTH_TOKEN"], "MLFLOW_TRACKING_USERNAME": "maskmix",
           "MLFLOW_TRACKING_PASSWORD": secrets["MLFLOW_TRACKING_PASSWORD"]}
    storage = {"access_key_id": secrets["yaml_access_key_id"], "secret_access_key": secrets["yaml_secret_access_key"]}
    return {"secrets": secrets, "db": db, "env": env, "storage": storage}


@pytest.mark.slow
def test_planted_secrets_never_reach_mlflow_or_logs_mix_baseline(tmp_path, planted):
    tiny = write_tiny_corpus(tmp_path / "corpus", ("alpha", "beta"), vocab_size=32)
    out = tmp_path / "mix"
    config = {"tracking": {"uri": f"sqlite:///{planted['db']}"}, "storage": planted["storage"],
              "mix": {"manifest": tiny.manifest_path, "output": str(out / "mixture.json"), "method": "temperature",
                      "temperature": 2.0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    secrets = planted["secrets"]
    # YAML storage secrets, RAY_AUTH_TOKEN and MLFLOW_TRACKING_PASSWORD in the environment, and a
    # secret given on the command line with --set
    result = _run_cli(["mix", "baseline", str(tmp_path / "config.yaml"), "-v",
                       "--set", f"storage.session_token={secrets['set_session_token']}"], tmp_path, planted["env"])
    in_play = {k: v for k, v in secrets.items() if not k.startswith("AWS_")}
    _assert_no_secret_anywhere(result, in_play, planted["db"], tmp_path, [out], expect_visible="temperature")
    # the config really carried them: `config show` resolves the same config, masked
    shown = _run_cli(["config", "show", str(tmp_path / "config.yaml"),
                      "--set", f"storage.session_token={secrets['set_session_token']}"], tmp_path, planted["env"])
    assert shown.returncode == 0, shown.stderr
    assert "session_token: '**********'" in shown.stdout and "secret_access_key: '**********'" in shown.stdout
    assert [n for n, v in in_play.items() if v in shown.stdout + shown.stderr] == []


@pytest.mark.slow
def test_planted_secrets_never_reach_mlflow_or_logs_pipeline(tmp_path, planted):
    corpus = tmp_path / "raw"
    corpus.mkdir()
    words = "river stone light market garden window letter morning paper signal".split()
    with open(corpus / "docs.jsonl", "w") as f:
        for i in range(40):
            text = " ".join(words[(i + k) % len(words)] for k in range(30 + i))
            f.write(json.dumps({"id": f"d{i}", "domain": ("web", "code")[i % 2], "text": text}) + "\n")
    out = tmp_path / "out"
    config = {"tracking": {"uri": f"sqlite:///{planted['db']}"}, "ray": {"num_cpus": 2},
              "pipeline": {"inputs": [{"path": str(corpus)}], "output_dir": str(out),
                           "word_count_filter": {"enabled": False}, "near_dedup": {"enabled": False},
                           "tokenizer": {"vocab_size": 300}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    secrets = planted["secrets"]
    # AWS_* from the environment this time (they override the YAML storage keys), plus the rest
    env = {**planted["env"], "AWS_SECRET_ACCESS_KEY": secrets["AWS_SECRET_ACCESS_KEY"],
           "AWS_ACCESS_KEY_ID": secrets["AWS_ACCESS_KEY_ID"]}
    result = _run_cli(["pipeline", "run", str(tmp_path / "config.yaml"), "-v", "--no-progress-bars",
                       "--set", f"storage.session_token={secrets['set_session_token']}"], tmp_path, env)
    in_play = {k: v for k, v in secrets.items() if not k.startswith("yaml_")}
    _assert_no_secret_anywhere(result, in_play, planted["db"], tmp_path, [out], expect_visible="vocab_size")


# =========================================================================== (b) no code execution on load


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO_ROOT / d).rglob("*.py") if "schemas" not in p.parts)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else \
                (f.id if isinstance(f, ast.Name) else "")
            yield name, node


def test_code_loads_checkpoints_and_yaml_safely():
    torch_loads, yaml_loads, unsafe = [], [], []
    for path in _code_files():
        tree = ast.parse(path.read_text(), str(path))
        where = lambda n: f"{path.relative_to(REPO_ROOT)}:{n.lineno}"  # noqa: E731
        for name, node in _calls(tree):
            kwargs = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                torch_loads.append(where(node))
                ok = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
                if not ok:
                    unsafe.append(f"{where(node)}: torch.load without weights_only=True")
            elif name.startswith("yaml.") and "load" in name:
                yaml_loads.append(where(node))
                if name not in ("yaml.safe_load", "yaml.safe_load_all"):
                    unsafe.append(f"{where(node)}: {name} (use yaml.safe_load)")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load",
                          "dill.loads", "joblib.load", "marshal.loads", "shelve.open", "pickle.Unpickler"):
                unsafe.append(f"{where(node)}: {name}")
            elif name in ("np.load", "numpy.load") and not (
                    isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is False):
                if "allow_pickle" in kwargs:
                    unsafe.append(f"{where(node)}: {name} with allow_pickle")
    assert unsafe == []
    assert torch_loads and yaml_loads, "control: the scan sees the loads that exist"


TINY_ARGS = {"vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "max_seq_len": 8}


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _crafted(path: Path, marker: Path, legacy: bool) -> Path:
    payload = {"model.weight": torch.zeros(2), "trap": _Payload(str(marker))}
    if legacy:  # a raw pickle named .pt (torch.load reads those too)
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save-zip", "raw-pickle"])
def test_the_crafted_payload_is_real(tmp_path, legacy):
    """Control: the file does run code when unpickled the unsafe way (in a subprocess)."""
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "x.pt", marker, legacy)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save-zip", "raw-pickle"])
def test_crafted_weights_are_refused_by_the_eval_loader(tmp_path, legacy):
    from training import checkpoint as ckpt
    from training.evaluate import load_model

    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _crafted(folder / ckpt.TORCH_WEIGHTS_FILE, marker, legacy)
    (folder / ckpt.MODEL_ARGS_FILE).write_text(json.dumps(TINY_ARGS))
    with pytest.raises(ContractError, match="refused to load"):
        ckpt.load_weights(str(folder))
    with pytest.raises(ContractError, match="refused to load"):  # what `maskmix eval` / `sample` call
        load_model(str(folder))
    assert not marker.exists()


def _fake_resume_folder(output_dir: Path, marker: Path, legacy: bool) -> Path:
    """A checkpoint that looks complete (latest + trainer_state.json) whose DeepSpeed file is a trap."""
    from infra.contracts import TRAINER_STATE_FILE
    from training import checkpoint as ckpt

    folder = output_dir / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    _crafted(folder / "mp_rank_00_model_states.pt", marker, legacy)
    (folder / TRAINER_STATE_FILE).write_text("{}")
    ckpt.write_latest(str(output_dir), "step-00000002")
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save-zip", "raw-pickle"])
def test_crafted_deepspeed_file_is_refused_before_resume(tmp_path, legacy):
    from training import checkpoint as ckpt

    marker = tmp_path / "marker"
    folder = _fake_resume_folder(tmp_path / "run", marker, legacy)
    with pytest.raises(ContractError, match="refused to load") as err:
        ckpt.latest_checkpoint(str(tmp_path / "run"))
    assert str(folder / "mp_rank_00_model_states.pt") in str(err.value)
    if not legacy:
        assert "builtins.exec" in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_training_refuses_to_resume_from_a_crafted_checkpoint(tmp_path):
    """The real trainer: it would hand the folder to DeepSpeed's load_checkpoint (weights_only=False)."""
    from infra.config import ModelConfig, TrainConfig
    from training.trainer import train

    tiny = write_tiny_corpus(tmp_path / "corpus", ("alpha", "beta"), vocab_size=32)
    marker = tmp_path / "marker"
    _fake_resume_folder(tmp_path / "run", marker, legacy=False)
    cfg = TrainConfig(manifest=tiny.manifest_path, output_dir=str(tmp_path / "run"), model=ModelConfig(preset="test"),
                      seq_len=16, micro_batch_size=2, steps=4, warmup_steps=0, zero_stage=0, export=False)
    with pytest.raises(ContractError, match="refused to load"):
        train(cfg)
    assert not marker.exists()


def test_real_deepspeed_checkpoint_globals_are_the_allowed_ones():
    """The allowlist is what DeepSpeed 0.19 writes (measured on ZeRO 0-3, fp32 and bf16) and nothing
    that can run code: classes of DeepSpeed's own state, no callables."""
    from training.checkpoint import DEEPSPEED_PICKLED_GLOBALS

    assert DEEPSPEED_PICKLED_GLOBALS == {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"}
    import importlib

    for name in DEEPSPEED_PICKLED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), attr), type), name


def test_an_export_loads_no_pickle(tmp_path):
    from training.export import CONFIG_FILE, MODEL_ARGS_FILE, WEIGHTS_FILE, load_exported

    marker = tmp_path / "marker"
    folder = tmp_path / "export"
    folder.mkdir()
    _crafted(folder / WEIGHTS_FILE, marker, legacy=False)  # a pickle where safetensors should be
    (folder / MODEL_ARGS_FILE).write_text(json.dumps(TINY_ARGS))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "maskmix.export", "format_version": 1}))
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError):  # safetensors reads a header + raw tensors, never a pickle
        load_exported(str(folder))
    assert not marker.exists()


# =========================================================================== (c) paths stay under their root


def test_shard_writer_refuses_a_domain_that_is_a_path(tmp_path):
    import pyarrow as pa

    from infra.config import ShardConfig
    from infra.contracts import SHARD_SCHEMA
    from pipelines.shard import write_domain_shards

    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    for domain in ("../../escaped", "..", "sub/dir", "/abs"):
        group = pa.table({"domain": [domain] * 3, **{f.name: pa.array(
            [[1, 2]] * 3 if f.name == "input_ids" else ([f"d{i}" for i in range(3)] if f.type == pa.string() else
                                                        [1] * 3), f.type) for f in SHARD_SCHEMA}})
        with pytest.raises(ValueError, match="not a plain folder name"):
            write_domain_shards(group, str(out), ShardConfig(max_rows=2), None)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("tag", ["../../outside", "/etc", "..", "step-1/../../x"])
def test_a_checkpoint_pointer_cannot_leave_the_checkpoints_folder(tmp_path, tag):
    from infra.contracts import TRAINER_STATE_FILE
    from training import checkpoint as ckpt

    # a complete-looking checkpoint outside the run, which the pointer tries to reach
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / TRAINER_STATE_FILE).write_text("{}")
    (outside / ckpt.MODEL_ARGS_FILE).write_text("{}")
    run = tmp_path / "deep" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ckpt.LATEST_FILE).write_text(tag)
    with pytest.raises(ContractError, match="not a checkpoint folder next to it"):
        ckpt.latest_checkpoint(str(run))
    with pytest.raises(ContractError, match="not a checkpoint folder next to it"):
        ckpt.resolve_checkpoint_dir(str(run))


# =========================================================================== (d) auth on, loopback by default


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_deploy_manifests_turn_auth_on():
    deploy = REPO_ROOT / "infra" / "deploy"
    ray_kinds = []
    for path in sorted(deploy.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "RayCluster":
                ray_kinds.append(path.name)
                assert doc["spec"]["authOptions"]["mode"] == "token", path.name
            if doc.get("kind") == "RayJob":
                ray_kinds.append(path.name)
                assert doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token", path.name
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']['name']}"
    assert {"raycluster.yaml", "rayjob-pipeline.yaml", "rayjob-pretrain.yaml"} <= set(ray_kinds)
    mlflow = [d for d in _docs(deploy / "mlflow.yaml") if d.get("kind") == "Deployment"]
    assert len(mlflow) == 1
    container = mlflow[0]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "mlflow server" in command and "--app-name basic-auth" in command


def test_local_services_bind_loopback_by_default(tmp_path, monkeypatch):
    import inspect

    import typer

    from dashboards.serve import command as dashboard_command
    from infra import stack as stack_mod
    from infra.cli import app

    assert inspect.signature(stack_mod.Stack.up).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(dashboard_command).parameters["host"].default == "127.0.0.1"
    cli = typer.main.get_command(app)
    stack_up = cli.commands["stack"].commands["up"]
    assert {p.name: p.default for p in stack_up.params}["host"] == "127.0.0.1"
    assert {p.name: p.default for p in cli.commands["dashboard"].params}["host"] == "127.0.0.1"
    argv, _ = dashboard_command(f"sqlite:///{tmp_path}/m.db")
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"

    # The commands the stack would run use the host they are given: record them instead of spawning.
    spawned = {}

    def record(self, name, cmd, env, port, url, ready, **extra):
        spawned[name] = {"cmd": cmd, "env": env, "url": url}
        return stack_mod.Service(name=name, pid=0, create_time=0.0, url=url, log="", port=port, extra=extra)

    monkeypatch.setattr(stack_mod.Stack, "_spawn", record)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    stack = stack_mod.Stack(tmp_path / "stack")
    stack.dir.mkdir(parents=True)
    for host in ("127.0.0.1", "10.1.2.3"):
        ray_svc = stack._start_ray(host, 1, 64 * 2**20)
        shutil.rmtree(ray_svc.extra["temp_dir"], ignore_errors=True)
        stack._start_mlflow(host, None, stack_mod.StorageConfig())
        ray_cmd, mlflow_cmd = spawned["ray"]["cmd"], spawned["mlflow"]["cmd"]
        assert f"--node-ip-address={host}" in ray_cmd and f"--dashboard-host={host}" in ray_cmd
        assert spawned["ray"]["env"]["RAY_AUTH_MODE"] == "token" and spawned["ray"]["env"]["RAY_AUTH_TOKEN"]
        assert mlflow_cmd[mlflow_cmd.index("--host") + 1] == host
        assert all(host in s["url"] for s in spawned.values())
        assert "0.0.0.0" not in " ".join(ray_cmd + mlflow_cmd)
    assert oct((stack.dir / stack_mod.TOKEN_FILE).stat().st_mode & 0o777) == "0o600"
