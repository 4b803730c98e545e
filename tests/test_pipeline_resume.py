"""Resume and re-run of the corpus pipeline (stage checkpoints), and what a run reports.

One uninterrupted reference run; every other scenario runs in its own output folder over the same
inputs and must reproduce the reference's shards and manifest byte for byte where the config is
the same: a run killed mid-way and resumed, a copy of a finished folder re-run with --force.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from infra.config import InputSpec, NearDedupConfig, PipelineConfig, ShardConfig, TokenizerConfig
from infra.config import WordCountFilterConfig
from infra.contracts import Manifest, load_manifest, parse_artifact
from pipelines import run as pipeline_run
from pipelines.run import CorpusPipeline, run_pipeline
from pipelines.stage_store import MARKER, STAGES, StageStore, resolve_force
from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates, write_jsonl

EARLY = ["read", "unique_ids", "quality_filter", "exact_dedup", "near_dedup"]


def _config(root: Path, out: str, **changes) -> PipelineConfig:
    values = dict(
        inputs=[InputSpec(path=str(root / "in"), domain=None)],
        output_dir=str(root / out),
        word_count_filter=WordCountFilterConfig(min_words=10),
        near_dedup=NearDedupConfig(bands=20, rows=5),
        tokenizer=TokenizerConfig(vocab_size=300),
        shards=ShardConfig(max_rows=15, validation_fraction=0.1),
    )
    values.update(changes)
    return PipelineConfig(**values)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path (the outputs compared between runs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs(out: Path) -> dict[str, bytes]:
    found = {"manifest.json": (out / "manifest.json").read_bytes(),
             "tokenizer.json": (out / "tokenizer.json").read_bytes()}
    for sub in ("shards", "removed", "quarantine"):
        found.update({f"{sub}/{k}": v for k, v in _files(out / sub).items()})
    return found


class StageSpy:
    """Which stages actually ran (not loaded from a checkpoint) in a run."""

    def __init__(self, monkeypatch):
        self.ran: list[str] = []
        original = CorpusPipeline._stage

        def spy(pipeline, key, run, valid=None):
            def counted():
                self.ran.append(key)
                return run()
            return original(pipeline, key, counted, valid)

        monkeypatch.setattr(CorpusPipeline, "_stage", spy)


def _run_killed_in_near_dedup(cfg: PipelineConfig, monkeypatch, storage_cfg=None) -> None:
    """A run that dies after near_dedup wrote its rows but before its marker (stage unfinished)."""
    original = CorpusPipeline._marked_stats

    def killed(self, key, *args, **kwargs):
        if key == "near_dedup":
            raise RuntimeError("killed before near_dedup committed")
        return original(self, key, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(CorpusPipeline, "_marked_stats", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_pipeline(cfg, storage_cfg, progress=lambda msg: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_session, module_mlflow):
    root = tmp_path_factory.mktemp("resume")
    domains = default_domains(seed=5, vocab_size=48, doc_length=(40, 90))[:2]
    records = generate_corpus(domains, docs_per_domain=30, seed=5)
    records, _ = plant_near_duplicates(records, fraction=0.15, edit_rate=0.02, rng=np.random.default_rng(1))
    records.append(dict(records[0], id="exact-copy"))
    write_jsonl(records[: len(records) // 2], root / "in" / "a.jsonl")
    write_jsonl(records[len(records) // 2:], root / "in" / "b.jsonl")
    with open(root / "in" / "b.jsonl", "a") as f:
        f.write("{not json\n")
    lines: list[str] = []
    cfg = _config(root, "ref")
    manifest, uri = run_pipeline(cfg, progress=lines.append)
    return {"root": root, "cfg": cfg, "manifest": manifest, "uri": uri, "progress": lines,
            "outputs": _outputs(root / "ref"), "mlflow": module_mlflow}


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_killed_run_resumes_to_byte_identical_shards_and_manifest(corpus, monkeypatch):
    root = corpus["root"]
    cfg = _config(root, "killed")

    _run_killed_in_near_dedup(cfg, monkeypatch)
    out = root / "killed"
    store = StageStore(str(out), pipeline_run.Storage())
    assert all(store.marker(s) is not None for s in EARLY[:-1])
    assert store.marker("near_dedup") is None and store.files("near_dedup")  # written, not committed
    assert not (out / "manifest.json").exists()
    failed = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [r["status"] for r in failed] == ["failed"]

    spy, lines = StageSpy(monkeypatch), []
    manifest, uri = run_pipeline(cfg, progress=lines.append)
    assert spy.ran == ["near_dedup", "tokenizer", "tokenize_shard"]  # finished stages loaded, not re-run
    assert not any(line.startswith("[pipeline] reading") for line in lines)
    assert all(any(line.startswith(f"[pipeline] {s}") and "resumed" in line for line in lines) for s in EARLY[:-1])

    assert _outputs(out) == corpus["outputs"]  # manifest, tokenizer, shards, removed, quarantine
    assert manifest.mlflow_run_id and manifest.mlflow_run_id != corpus["manifest"].mlflow_run_id
    assert load_manifest(uri) == manifest.model_copy(update={"mlflow_run_id": None})
    records = sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda r: r["started_at"])
    assert [r["status"] for r in records] == ["failed", "finished"]
    assert [r["stage"] for r in records[1]["stages"] if r["resumed"]] == \
           ["read", "unique_ids", "word_count_filter", "exact_dedup"]
    assert records[1]["manifest_sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.slow
def test_finished_pipeline_does_nothing(corpus, monkeypatch):
    out = Path(corpus["cfg"].output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    spy, lines = StageSpy(monkeypatch), []
    monkeypatch.setattr(pipeline_run, "ensure_ray", lambda *a: pytest.fail("an up-to-date run must not start Ray"))
    manifest, uri = run_pipeline(corpus["cfg"], progress=lines.append)
    assert spy.ran == []
    assert any("up to date" in line for line in lines)
    assert manifest == corpus["manifest"]  # the same manifest, with the run that wrote it
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing written


@pytest.mark.slow
def test_force_redoes_the_stage_and_all_after_it(corpus, monkeypatch):
    root = corpus["root"]
    shutil.copytree(root / "ref", root / "forced")  # a moved output folder resumes as well
    spy, lines = StageSpy(monkeypatch), []
    run_pipeline(_config(root, "forced"), progress=lines.append, force=["exact_dedup"])
    assert spy.ran == ["exact_dedup", "near_dedup", "tokenizer", "tokenize_shard"]
    assert _outputs(root / "forced") == corpus["outputs"]
    assert any(line.startswith("[pipeline] quality_filter") and "resumed" in line for line in lines)


@pytest.mark.slow
def test_config_change_reruns_from_the_changed_stage(corpus, monkeypatch):
    root = corpus["root"]
    shutil.copytree(root / "ref", root / "changed")
    spy = StageSpy(monkeypatch)
    cfg = _config(root, "changed", word_count_filter=WordCountFilterConfig(min_words=60))
    manifest, _ = run_pipeline(cfg, progress=lambda msg: None)
    assert spy.ran == ["quality_filter", "exact_dedup", "near_dedup", "tokenizer", "tokenize_shard"]
    ref = corpus["manifest"]
    assert manifest.config_hash != ref.config_hash
    stage = next(s for s in manifest.stages if s.name == "word_count_filter")
    assert stage.removed.get("word_count_below_min", 0) > 0
    assert stage.docs_out < next(s for s in ref.stages if s.name == "word_count_filter").docs_out


def test_force_names_and_aliases():
    assert resolve_force(None) is None and resolve_force([]) is None
    assert resolve_force(["near_dedup", "exact_dedup"]) == "exact_dedup"  # the earliest named
    assert resolve_force(["word_count_filter"]) == "quality_filter"
    assert resolve_force(["shards", "all"]) == STAGES[0]
    with pytest.raises(ValueError, match="unknown stage 'dedup'"):
        resolve_force(["dedup"])


def test_cli_rejects_an_unknown_force_stage(tmp_path):
    from typer.testing import CliRunner

    from infra.cli import app

    result = CliRunner().invoke(app, ["pipeline", "run", str(tmp_path / "none.yaml"), "--force", "bogus"])
    assert result.exit_code == 2 and "unknown stage 'bogus'" in result.output


def test_manifest_without_timings_and_older_manifests_load():
    older = {"schema_version": 1, "created_at": 1700000000.5, "config_hash": "0123456789abcdef",
             "mlflow_run_id": "run123", "tokenizer": {"path": "tokenizer.json", "sha256": "ab" * 32,
                                                       "vocab_size": 300, "special_ids": {"pad": 0, "mask": 1}},
             "domains": {"web": {"shards": []}},
             "stages": [{"name": "read", "docs_in": 3, "docs_out": 2, "extra": {"seconds": 0.5}}]}
    m = parse_artifact(Manifest, older, "older manifest")
    assert m.created_at == 1700000000.5 and m.mlflow_run_id == "run123"
    newer = {k: v for k, v in older.items() if k not in ("created_at", "mlflow_run_id")}
    m = parse_artifact(Manifest, newer, "newer manifest")
    assert m.created_at is None and m.mlflow_run_id is None  # no wall-clock time unless one is given


# --------------------------------------------------------------------------- observability


@pytest.mark.slow
def test_summary_table_and_stage_markers(corpus):
    lines = corpus["progress"]
    table = next(line for line in lines if line.startswith("stage "))
    assert all(w in table for w in ("docs in", "docs out", "seconds", "resumed", "removed"))
    rows = {line.split()[0]: line for line in "\n".join(lines).splitlines()[1:] if line.split()}
    for stage in ("read", "unique_ids", "word_count_filter", "exact_dedup", "near_dedup", "tokenizer",
                  "tokenize_shard"):
        assert stage in rows
    assert "exact_duplicate=" in rows["exact_dedup"] and "invalid_json=1" in rows["read"]
    out = Path(corpus["cfg"].output_dir)
    for stage in STAGES:
        marker = json.loads((out / "_stages" / StageStore.folder_name(stage) / MARKER).read_text())
        assert marker["stage"] == stage and len(marker["fingerprint"]) == 32 and marker["seconds"] >= 0


@pytest.mark.slow
def test_mlflow_run_has_inputs_counters_reports_and_manifest_lineage(corpus):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=corpus["mlflow"])
    run = client.get_run(corpus["manifest"].mlflow_run_id)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "input-0" and str(corpus["root"] / "in") in dataset.source and dataset.digest
    assert {t.key: t.value for t in inputs[0].tags}["files"] == "2"
    metrics = run.data.metrics
    for domain, n in corpus["manifest"].stages[-1].extra["per_domain_in"].items():
        assert metrics[f"tokenize_shard/docs_in/{domain}"] == n
    assert metrics["exact_dedup/removed/exact_duplicate"] >= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for d in ("filters", "pipeline", "near_dedup") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"manifest.json", "filters/report.json", "near_dedup/report.json", "pipeline/run.json",
            "pipeline/summary.txt"} <= artifacts
    sha = hashlib.sha256(Path(corpus["uri"]).read_bytes()).hexdigest()
    assert run.data.tags["maskmix.manifest_sha256"] == sha
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "filters/report.json")).read_text())
    assert "removed_total" in report and "examples" in report


@pytest.mark.slow
@pytest.mark.s3
def test_s3_in_and_out_and_a_killed_run_resumes_on_s3(corpus, s3_bucket, monkeypatch):
    # The whole pipeline against the S3-compatible server: inputs read from s3://, shards,
    # manifest, tokenizer and stage checkpoints written there; a run killed before near_dedup
    # committed resumes from the S3 checkpoints to the same shards and manifest as the local run.
    from infra.storage import Storage, join

    base, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    for f in sorted((corpus["root"] / "in").iterdir()):
        storage.write_bytes(join(base, "in", f.name), f.read_bytes())
    cfg = _config(corpus["root"], "unused", inputs=[InputSpec(path=join(base, "in"), domain=None)],
                  output_dir=join(base, "out"))
    _run_killed_in_near_dedup(cfg, monkeypatch, storage_cfg)
    spy = StageSpy(monkeypatch)
    manifest, uri = run_pipeline(cfg, storage_cfg, progress=lambda msg: None)
    assert spy.ran == ["near_dedup", "tokenizer", "tokenize_shard"]
    assert uri == join(base, "out", "manifest.json")
    reference = corpus["outputs"]
    shards = {k: v for k, v in reference.items() if k.startswith("shards/")}
    assert shards and all(storage.read_bytes(join(base, "out", k)) == v for k, v in shards.items())
    # Same corpus and config (sources differ only by where they live): same shards and tokenizer.
    assert storage.read_bytes(join(base, "out", "tokenizer.json")) == reference["tokenizer.json"]
    assert load_manifest(uri, storage).domains == corpus["manifest"].domains
