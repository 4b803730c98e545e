"""The corpus pipeline's near-dedup stage as the rest of the system sees it: MLflow and the manifest.

(Documents carry no `quality` column through the pipeline yet -- DOCUMENT_SCHEMA has none -- so the
best-quality survivor is covered by tests/test_near_dedup.py on find_clusters directly.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from infra.config import InputSpec, NearDedupConfig, PipelineConfig, ShardConfig, TokenizerConfig
from infra.config import WordCountFilterConfig
from infra.contracts import load_manifest
from pipelines.run import run_pipeline
from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates, write_jsonl


def _config(root: Path, **near_dedup) -> PipelineConfig:
    return PipelineConfig(
        inputs=[InputSpec(path=str(root / "in"))],
        output_dir=str(root / "out"),
        word_count_filter=WordCountFilterConfig(min_words=10),
        near_dedup=NearDedupConfig(bands=20, rows=5, partitions=4, **near_dedup),
        tokenizer=TokenizerConfig(vocab_size=300),
        shards=ShardConfig(max_rows=50, validation_fraction=0.1),
    )


@pytest.fixture(scope="module")
def near_dedup_run(tmp_path_factory, ray_session, module_mlflow):
    root = tmp_path_factory.mktemp("pipeline_near_dedup")
    domains = default_domains(seed=11, vocab_size=48, doc_length=(60, 120))[:2]
    records = generate_corpus(domains, docs_per_domain=30, seed=11)
    records, truth = plant_near_duplicates(records, fraction=0.2, edit_rate=0.01, rng=np.random.default_rng(5))
    write_jsonl(records, root / "in" / "docs.jsonl")
    cfg = _config(root)  # engine "auto": this small input runs in the driver (pipelines/near_dedup_local.py)
    manifest, uri = run_pipeline(cfg, progress=lambda m: None)
    return {"cfg": cfg, "manifest": manifest, "uri": uri, "truth": truth, "mlflow": module_mlflow, "root": root}


def _stage(manifest, name):
    return next(s for s in manifest.stages if s.name == name)


@pytest.mark.slow
def test_mlflow_run_has_the_near_dedup_report_and_metrics(near_dedup_run):
    from mlflow.tracking import MlflowClient

    manifest = near_dedup_run["manifest"]
    client = MlflowClient(tracking_uri=near_dedup_run["mlflow"])
    run = client.get_run(manifest.mlflow_run_id)
    assert run.data.metrics["near_dedup/clusters"] >= 1
    assert "near_dedup/giant_buckets" in run.data.metrics and "near_dedup/matched_index" in run.data.metrics
    assert run.data.metrics["near_dedup/docs_in"] - run.data.metrics["near_dedup/docs_out"] == \
        run.data.metrics["near_dedup/removed/near_duplicate"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "near_dedup")]
    assert "near_dedup/report.json" in artifacts
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "near_dedup/report.json")).read_text())
    assert report["clusters"] == run.data.metrics["near_dedup/clusters"]
    assert sum(report["removed"].values()) == run.data.metrics["near_dedup/removed/near_duplicate"]


@pytest.mark.slow
def test_manifest_near_dedup_stage_carries_the_report(near_dedup_run):
    manifest = load_manifest(near_dedup_run["uri"])
    stage = _stage(manifest, "near_dedup")
    report = stage.extra["report"]
    assert stage.extra["clusters"] == report["clusters"] >= 1
    assert (stage.extra["bands"], stage.extra["rows"]) == (20, 5)
    assert stage.docs_in - stage.docs_out == stage.removed["near_duplicate"] == sum(report["removed"].values())
    assert report["docs_in"] == {d: report["docs_out"][d] + report["removed"][d] for d in report["docs_in"]}
    assert report["partitions"] == 4 and report["precision"]["pairs"] >= 1
    # The planted copies (1% word edits, Jaccard ~0.8-1) are removed: an unedited copy by exact
    # dedup, the others by near dedup, each naming its kept document.
    out = Path(near_dedup_run["cfg"].output_dir)
    removed = {r["doc_id"]: r for r in pq.read_table(out / "removed" / "near_dedup.parquet").to_pylist()}
    exact = {r["doc_id"] for r in pq.read_table(out / "removed" / "exact_dedup.parquet").to_pylist()}
    truth = [t for t in near_dedup_run["truth"] if t.dup_id not in exact and t.original_id not in exact]
    caught = [t for t in truth if t.dup_id in removed or t.original_id in removed]
    assert truth and len(caught) >= 0.9 * len(truth), [(t.dup_id, t.jaccard) for t in truth if t not in caught]
    clusters = pq.read_table(out / "dedup" / "clusters.parquet").to_pylist()
    kept_of = {c["doc_id"]: c["kept_doc_id"] for c in clusters}
    assert all(r["detail"] == kept_of[d] for d, r in removed.items())


@pytest.mark.slow
def test_pipeline_near_dedup_stage_is_the_same_on_the_ray_engine(near_dedup_run, tmp_path):
    """The default run's near-dedup stage ran in the driver; the same pipeline with engine "ray"
    writes the same clusters.parquet, removals and report, and a re-run resumes from its stage
    checkpoints."""
    import shutil

    stage = _stage(near_dedup_run["manifest"], "near_dedup")
    assert stage.extra["engine"] == "local"
    shutil.copytree(near_dedup_run["root"] / "in", tmp_path / "in")
    cfg = _config(tmp_path, engine="ray")
    manifest, _ = run_pipeline(cfg, progress=lambda m: None)
    ray_stage = _stage(manifest, "near_dedup")
    assert ray_stage.extra["engine"] == "ray"
    assert ray_stage.extra["report"] == stage.extra["report"]
    assert (ray_stage.docs_in, ray_stage.docs_out, ray_stage.removed) == (stage.docs_in, stage.docs_out, stage.removed)
    local_out, ray_out = Path(near_dedup_run["cfg"].output_dir), Path(cfg.output_dir)
    for name in ("dedup/clusters.parquet", "removed/near_dedup.parquet"):
        assert pq.read_table(ray_out / name).to_pylist() == pq.read_table(local_out / name).to_pylist(), name
    # Resumed: every stage loads from its checkpoint, nothing is redone.
    lines = []
    run_pipeline(cfg, progress=lines.append)
    assert any("near_dedup" in line and "resumed" in line for line in lines), lines
