"""The command line and the demo, end to end, as a user runs them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
MASKMIX = [sys.executable, "-m", "infra.cli"]


def _run(args, cwd, **kw):
    return subprocess.run(MASKMIX + args, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_packages_import_together():
    out = subprocess.run([sys.executable, "-c", "import infra, pipelines, training, mixing; print('ok')"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_help_lists_every_verb(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for verb in ("pipeline", "mix", "train", "eval", "demo"):
        assert verb in out.stdout
    sub = _run(["train", "--help"], tmp_path)
    assert "--set" in sub.stdout and "resumes" in sub.stdout
    mix = _run(["mix", "--help"], tmp_path)
    assert mix.returncode == 0, mix.stderr
    for verb in ("baseline", "doremi", "laws"):
        assert verb in mix.stdout
    assert "--set" in _run(["mix", "laws", "--help"], tmp_path).stdout


def test_unknown_key_is_one_clear_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  manifest: m.json\n  output_dir: out\n  lr_rate: 0.1\n")
    out = _run(["train", str(cfg)], tmp_path)
    assert out.returncode == 2
    assert "train.lr_rate: unknown key" in out.stderr and str(cfg) in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_manifest_is_a_clear_error(tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"tracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n"
                   f"mix: {{manifest: {tmp_path}/nope.json, output: {tmp_path}/mix.json}}\n")
    out = _run(["mix", "baseline", str(cfg)], tmp_path)
    assert out.returncode == 2
    assert "nope.json: no such Manifest file" in out.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_end_to_end_logs_parent_and_child_runs(tmp_path, mlflow_uri, ray_session):
    from infra.config import parse_config
    from infra.demo import run_demo
    from infra import tracking

    cfg = parse_config({
        "tracking": {"uri": mlflow_uri, "experiment": "demo-test"},
        "demo": {"output_dir": str(tmp_path / "demo"), "corpus": {"max_bytes_per_domain": 120_000},
                 "vocab_size": 400, "model_preset": "test", "train_steps": 12, "micro_batch_size": 4,
                 "seq_len": 64, "eval_docs_per_domain": 4},
    })
    tracking.configure(cfg.tracking)
    lines: list[str] = []
    result = run_demo(cfg, progress=lines.append)

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("demo-test")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["maskmix.stage"] == "demo"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags["maskmix.stage"] for r in children)
    assert stages == ["eval", "mix", "mix", "pipeline", "train"]
    by_stage = {r.data.tags["maskmix.stage"]: r for r in children}
    assert "manifest.json" in [a.path for a in client.list_artifacts(by_stage["pipeline"].info.run_id)]
    assert "mixture.json" in [a.path for a in client.list_artifacts(by_stage["mix"].info.run_id)]
    # The published filters annotate (scores per document, what they would remove), skip code, and
    # remove only where the demo filters: Gopher repetition on license files.
    pipeline_run = by_stage["pipeline"].info.run_id
    assert "filters/report.json" in [a.path for a in client.list_artifacts(pipeline_run, "filters")]
    scores = pq.read_table(Path(tmp_path) / "demo" / "data" / "filters" / "scores.parquet")
    for col in ("doc_id", "domain", "gopher_repetition.reason", "gopher_quality.n_words", "c4_quality.sentences",
                "fineweb_quality.line_punct_ratio"):
        assert col in scores.column_names, col
    rows = scores.to_pylist()
    assert {r["domain"] for r in rows} == {"code", "reference", "readme", "license"}
    assert all(r["gopher_quality.n_words"] is None for r in rows if r["domain"] == "code")
    assert all(r["gopher_quality.n_words"] is not None for r in rows if r["domain"] != "code")
    stage = next(s for s in result["manifest"].stages if s.name == "quality_filter")
    report = stage.extra["filter_report"]
    assert any(rule.startswith("gopher_quality.") for rule in report["would_remove"])
    for rule, per_domain in report["removed"].items():
        assert rule.startswith("word_count") or (rule.startswith("gopher_repetition.") and set(per_domain) == {"license"})
    assert any("gopher_quality" in line and "would remove" in line for line in lines)
    domains = set(result["manifest"].domains)
    assert len(domains) == 4
    eval_metrics = by_stage["eval"].data.metrics
    for d in domains:
        logged = eval_metrics[f"eval/{d}/nats_per_token"]
        assert math.isfinite(logged) and logged > 0
        assert logged == pytest.approx(result["eval"][d].nats_per_token)
    assert os.path.exists(Path(tmp_path) / "demo" / "mixtures" / "uniform.json")
    assert any("pipeline" in line for line in lines) and any("train" in line for line in lines)
