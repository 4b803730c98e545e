"""Issue 9, bad configs: every CLI verb, run as a user runs it (a `maskmix` subprocess), on configs
with unknown keys, wrong types, negative sizes, weights that do not sum to 1, domains the manifest
does not have, and files that are not there.

Each must end in ONE clear error before any work starts:
  * exit status 2, exactly one ``error:`` line, no traceback;
  * the message names the offending key (or file);
  * no file was created where the stage writes (output_dir / mix.output), and no MLflow run exists
    in the tracking store the config points at.

Unit-level validation (each pydantic rule, --set syntax) is tests/test_config.py; this is the
verbs end to end, so a check that happens only after a run is opened, or that raises a plain
Python exception, shows up here.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    from training_fixtures import write_tiny_corpus
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import write_tiny_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A valid manifest (domains alpha, beta) and a mixture file for it, shared by every case."""
    root = tmp_path_factory.mktemp("bad-configs-corpus")
    tiny = write_tiny_corpus(root, ("alpha", "beta"), vocab_size=32)
    from infra.contracts import artifact_sha256

    mixture = {"schema_version": 1, "created_at": 0.0, "weights": {"alpha": 0.5, "beta": 0.5}, "method": "test",
               "manifest_sha256": artifact_sha256(tiny.manifest), "tokenizer_sha256": tiny.manifest.tokenizer.sha256}
    (root / "not_one.json").write_text(json.dumps({**mixture, "weights": {"alpha": 0.9, "beta": 0.4}}))
    (root / "foreign.json").write_text(json.dumps({**mixture, "weights": {"alpha": 0.5, "gamma": 0.5}}))
    return {"root": root, "manifest": tiny.manifest_path}


def _sections(corpus, tmp: Path) -> dict:
    """A valid section for every verb; the cases break one thing each."""
    inputs = tmp / "raw"
    inputs.mkdir(exist_ok=True)
    (inputs / "a.jsonl").write_text('{"id": "1", "domain": "web", "text": "hello there"}\n')
    return {
        "pipeline": {"inputs": [{"path": str(inputs)}], "output_dir": str(tmp / "out")},
        "mix": {"manifest": corpus["manifest"], "output": str(tmp / "out" / "mixture.json")},
        "train": {"manifest": corpus["manifest"], "output_dir": str(tmp / "out"), "steps": 2,
                  "model": {"preset": "test"}, "seq_len": 16, "micro_batch_size": 2},
        "eval": {"checkpoint": str(tmp / "out" / "checkpoints"), "manifest": corpus["manifest"]},
    }


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = tree
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

# (id, argv after `maskmix` (CONFIG is the config file), section -> {dotted key: value}, fragments of the error)
CASES = [
    # ---------------------------------------------------------------- pipeline run
    ("pipeline-unknown-key", ["pipeline", "run", "CONFIG"], {"pipeline.shard": {"max_rows": 5}},
     ["pipeline.shard: unknown key"]),
    ("pipeline-wrong-type", ["pipeline", "run", "CONFIG"], {"pipeline.shards.max_rows": "many"},
     ["pipeline.shards.max_rows"]),
    ("pipeline-negative-size", ["pipeline", "run", "CONFIG"], {"pipeline.inputs.0.max_doc_bytes": -5},
     ["pipeline.inputs.0.max_doc_bytes", "greater than 0"]),
    ("pipeline-missing-input", ["pipeline", "run", "CONFIG"], {"pipeline.inputs.0.path": "TMP/no-such-corpus"},
     ["no-such-corpus", "does not exist"]),
    ("pipeline-domain-is-a-path", ["pipeline", "run", "CONFIG"], {"pipeline.inputs.0.domain": "../../etc"},
     ["pipeline.inputs.0.domain", "'../../etc'"]),
    # ---------------------------------------------------------------- mix
    ("mix-unknown-key", ["mix", "baseline", "CONFIG"], {"mix.methd": "uniform"}, ["mix.methd: unknown key"]),
    ("mix-wrong-type", ["mix", "baseline", "CONFIG"], {"mix.temperature": "hot"}, ["mix.temperature"]),
    ("mix-negative", ["mix", "baseline", "CONFIG"], {"mix.temperature": -1}, ["mix.temperature", "greater than 0"]),
    ("mix-missing-manifest", ["mix", "baseline", "CONFIG"], {"mix.manifest": "TMP/nope/manifest.json"},
     ["nope/manifest.json"]),
    ("doremi-unknown-domain", ["mix", "doremi", "CONFIG"],
     {"mix.doremi.reference_weights": {"alpha": 0.5, "gamma": 0.5}},
     ["mix.doremi.reference_weights", "gamma", "not in the manifest"]),
    ("doremi-weights-not-one", ["mix", "doremi", "CONFIG"],
     {"mix.doremi.reference_weights": {"alpha": 0.5, "beta": 0.3}}, ["mix.doremi.reference_weights", "sum to 1"]),
    ("doremi-negative-steps", ["mix", "doremi", "CONFIG"], {"mix.doremi.proxy.steps": -10},
     ["mix.doremi.proxy.steps"]),
    ("laws-unknown-domain", ["mix", "laws", "CONFIG"], {"mix.laws.target_weights": {"alpha": 1.0, "zeta": 0.0}},
     ["mix.laws.target_weights", "zeta"]),
    ("laws-zero-mixtures", ["mix", "laws", "CONFIG"], {"mix.laws.n_mixtures": 0}, ["mix.laws.n_mixtures"]),
    # ---------------------------------------------------------------- train
    ("train-unknown-key", ["train", "CONFIG"], {"train.lr_rate": 0.1}, ["train.lr_rate: unknown key"]),
    ("train-wrong-type", ["train", "CONFIG"], {"train.steps": "ten"}, ["train.steps"]),
    ("train-negative-size", ["train", "CONFIG"], {"train.micro_batch_size": -8}, ["train.micro_batch_size"]),
    ("train-missing-manifest", ["train", "CONFIG"], {"train.manifest": "TMP/gone/manifest.json"},
     ["gone/manifest.json"]),
    ("train-mixture-not-one", ["train", "CONFIG"], {"train.mixture": "CORPUS/not_one.json"},
     ["not_one.json", "sum to 1"]),
    ("train-mixture-unknown-domain", ["train", "CONFIG"], {"train.mixture": "CORPUS/foreign.json"},
     ["foreign.json", "gamma"]),
    # ---------------------------------------------------------------- eval
    ("eval-unknown-key", ["eval", "CONFIG"], {"eval.mc_sample": 4}, ["eval.mc_sample: unknown key"]),
    ("eval-negative", ["eval", "CONFIG"], {"eval.batch_size": -1}, ["eval.batch_size"]),
    ("eval-missing-checkpoint", ["eval", "CONFIG"], {}, ["checkpoints"]),
    # ---------------------------------------------------------------- submit (here, and to a cluster)
    ("submit-local-unknown-key", ["submit", "pipeline", "CONFIG"], {"pipeline.inptus": []},
     ["pipeline.inptus: unknown key"]),
    ("submit-local-mix-not-one", ["submit", "mix", "CONFIG", "--method", "doremi"],
     {"mix.doremi.reference_weights": {"alpha": 0.2, "beta": 0.2}}, ["mix.doremi.reference_weights", "sum to 1"]),
    # the address answers nothing: validation must happen before it is contacted
    ("submit-cluster-wrong-type", ["submit", "train", "CONFIG", "--address", "http://127.0.0.1:9"],
     {"train.steps": "ten"}, ["train.steps"]),
]

# Failures whose fix belongs to files this suite may not change (see the final report of issue 9):
# infra/stages.py opens the "train"/"eval" MLflow run before the manifest, the mixture and the
# checkpoint are loaded (inside training.launch / training.evaluate), so the error comes after a
# (FAILED) run was opened.
def _mlflow_runs(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def _prepare(case_id, argv, changes, corpus, tmp_path: Path, template_db: Path) -> tuple[list[str], Path]:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_db, db)
    config = {"tracking": {"uri": f"sqlite:///{db}"}, "ray": {"num_cpus": 1}, **_sections(corpus, tmp_path)}
    for key, value in changes.items():
        if isinstance(value, str):
            value = value.replace("TMP", str(tmp_path)).replace("CORPUS", str(corpus["root"]))
        _set(config, key, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return [str(path) if a == "CONFIG" else a for a in argv], db


def _check(code: int, err: str, fragments: list[str], tmp_path: Path, db: Path) -> None:
    assert code == 2, f"exit {code}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    assert err.count("error:") == 1, err[-4000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err[-2000:]}"
    # nothing was started: no file under output_dir (the stage's output lock may leave the empty
    # folder it locked), no MLflow run
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()) if out.exists() else []
    assert written == []
    assert _mlflow_runs(db) == 0


@pytest.fixture
def cli(monkeypatch):
    """Invoke the real typer app in this process (CliRunner); undo what the CLI sets globally."""
    import logging

    import mlflow
    from typer.testing import CliRunner

    from infra.cli import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)  # restored (absent) afterwards: MLflow exports them
    try:
        yield lambda args: CliRunner().invoke(app, args)
    finally:
        root.handlers[:], root.level = handlers, level
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("case_id, argv, changes, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_clear_error_before_any_work(case_id, argv, changes, fragments, corpus, tmp_path,
                                                       _mlflow_template_db, cli):
    args, db = _prepare(case_id, argv, changes, corpus, tmp_path, _mlflow_template_db)
    result = cli(args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("the CLI raised instead of reporting an error:\n" + "".join(
            traceback.format_exception(result.exception)))
    _check(result.exit_code, result.stderr, fragments, tmp_path, db)


@pytest.mark.parametrize("case_id", ["pipeline-missing-input", "doremi-unknown-domain"])
def test_bad_config_as_a_real_process(case_id, corpus, tmp_path, _mlflow_template_db):
    """The same contract from a real `maskmix` process: exit status 2 and stderr as a user sees them
    (two cases that used to end in a Python traceback)."""
    _, argv, changes, fragments = next(c for c in CASES if c[0] == case_id)
    args, db = _prepare(case_id, argv, changes, corpus, tmp_path, _mlflow_template_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    _check(out.returncode, out.stderr, fragments, tmp_path, db)
