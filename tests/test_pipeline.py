"""The corpus pipeline end to end on Ray, with planted duplicates and hostile records."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from infra.config import InputSpec, NearDedupConfig, NormalizeConfig, PipelineConfig, ShardConfig, TokenizerConfig
from infra.config import WordCountFilterConfig
from infra.contracts import SHARD_SCHEMA, check_table_schema, load_manifest
from pipelines.filters import WordCountFilter, count_words
from pipelines.near_dedup import shingles
from pipelines.normalize import normalize_text
from pipelines.run import run_pipeline
from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates, write_jsonl


# --------------------------------------------------------------------------- unit behaviour


def test_normalize_text_nfc_controls_and_trailing_space():
    cfg = NormalizeConfig()
    decomposed = "cafe\u0301"  # e + combining accent -> é in NFC
    assert normalize_text(f"  {decomposed}\x07 \r\nline two\t \r\n", cfg) == "café\nline two"
    assert normalize_text("    indented code", cfg) == "indented code"  # only the document edges are stripped
    assert normalize_text("a\n    b", cfg) == "a\n    b"


def test_word_count_filter_bounds_and_skip_domains():
    f = WordCountFilter(WordCountFilterConfig(min_words=3, max_words=5, skip_domains=["code"]))
    assert f.verdict("one two", "web") == "word_count_below_min"
    assert f.verdict("one two three", "web") is None
    assert f.verdict("a b c d e f", "web") == "word_count_above_max"
    assert f.verdict("x", "code") is None
    assert count_words(" a\tb\nc  ") == 3


def test_shingles_are_normalized_word_ngrams():
    assert shingles("The cat, the CAT!", 2) == {b"the cat", b"cat the"}
    assert shingles("too short", 5) == {b"too short"}


# --------------------------------------------------------------------------- end to end


def _write_hostile_inputs(folder: Path) -> dict:
    """Synthetic documents with planted near/exact duplicates plus one of each bad record."""
    domains = default_domains(seed=7, vocab_size=48, doc_length=(60, 120))[:2]
    records = generate_corpus(domains, docs_per_domain=40, seed=7)
    records, truth = plant_near_duplicates(records, fraction=0.15, edit_rate=0.02, rng=np.random.default_rng(3))
    exact_copy = dict(records[0], id="exact-copy-of-first")
    good = records + [exact_copy]
    half = len(good) // 2
    write_jsonl(good[:half], folder / "part-a.jsonl")
    # The second half arrives compressed as zstd, with the hostile lines in the middle.
    lines = [json.dumps(r).encode() for r in good[half:]]
    lines.insert(3, b"{this is not json")
    lines.insert(5, json.dumps({"id": "no-text", "domain": "x"}).encode())
    lines.insert(7, b'{"id": "bad-utf8", "domain": "x", "text": "caf\xe9 \xff"}')
    lines.insert(9, json.dumps({"id": "wrong-type", "domain": "x", "text": 42}).encode())
    (folder / "part-b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return {"good": good, "truth": truth, "exact_copy": exact_copy}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, ray_session, module_mlflow):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "in").mkdir()
    planted = _write_hostile_inputs(root / "in")
    cfg = PipelineConfig(
        inputs=[InputSpec(path=str(root / "in"))],
        output_dir=str(root / "out"),
        word_count_filter=WordCountFilterConfig(min_words=10),
        near_dedup=NearDedupConfig(bands=20, rows=5),  # lower threshold: edits at 2% must be caught
        tokenizer=TokenizerConfig(vocab_size=300),
        shards=ShardConfig(max_rows=15, validation_fraction=0.1),
    )
    lines: list[str] = []
    manifest, uri = run_pipeline(cfg, progress=lines.append)
    return {"cfg": cfg, "root": root, "manifest": manifest, "uri": uri, "progress": lines, **planted}


@pytest.mark.slow
def test_bad_records_are_quarantined_with_reasons(pipeline_run):
    q = pq.read_table(Path(pipeline_run["cfg"].output_dir) / "quarantine" / "quarantine.parquet").to_pylist()
    reasons = sorted(r["reason"] for r in q)
    assert reasons == ["invalid_json", "invalid_utf8", "missing_text", "text_not_string"]
    assert all(r["source"].endswith(tuple(f"#L{i}" for i in range(1, 200))) for r in q)
    read = next(s for s in pipeline_run["manifest"].stages if s.name == "read")
    assert read.removed == {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1, "text_not_string": 1}
    assert read.docs_out == len(pipeline_run["good"])


@pytest.mark.slow
def test_every_good_record_is_either_sharded_or_recorded_as_removed(pipeline_run):
    out = Path(pipeline_run["cfg"].output_dir)
    manifest = pipeline_run["manifest"]
    sharded = set()
    for name, domain in manifest.domains.items():
        for shard in domain.shards:
            table = pq.read_table(out / shard.path)
            check_table_schema(table, SHARD_SCHEMA, shard.path)
            assert hashlib.sha256((out / shard.path).read_bytes()).hexdigest() == shard.sha256
            assert table.num_rows == shard.rows <= 15
            sharded.update(table.column("doc_id").to_pylist())
    removed = {}
    for f in (out / "removed").glob("*.parquet"):
        for r in pq.read_table(f).to_pylist():
            removed[r["doc_id"]] = r
    good_ids = {r["id"] for r in pipeline_run["good"]}
    assert sharded | set(removed) == good_ids
    assert not sharded & set(removed)


@pytest.mark.slow
def test_exact_and_planted_near_duplicates_removed(pipeline_run):
    out = Path(pipeline_run["cfg"].output_dir)
    removed = {r["doc_id"]: r for f in (out / "removed").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    pair = sorted([pipeline_run["exact_copy"]["id"], pipeline_run["good"][0]["id"]])
    # of two identical texts the smaller id is kept, and the removal names it
    assert pair[0] not in removed
    assert removed[pair[1]]["reason"] == "exact_duplicate"
    assert removed[pair[1]]["detail"] == pair[0]
    truth = pipeline_run["truth"]
    found = [t for t in truth if removed.get(t.dup_id, {}).get("reason") == "near_duplicate"
             or removed.get(t.original_id, {}).get("reason") == "near_duplicate"]
    assert len(found) >= 0.9 * len(truth), f"near-dup recall {len(found)}/{len(truth)}"
    clusters = pq.read_table(out / "dedup" / "clusters.parquet").to_pylist()
    kept = [c for c in clusters if c["kept"]]
    assert all(c["kept_doc_id"] == c["cluster_id"] for c in clusters)
    assert all(c["doc_id"] == c["kept_doc_id"] for c in kept)
    # the kept document is the smallest id of its cluster
    by_cluster: dict[str, list[str]] = {}
    for c in clusters:
        by_cluster.setdefault(c["cluster_id"], []).append(c["doc_id"])
    assert all(cid == min(members) for cid, members in by_cluster.items())


@pytest.mark.slow
def test_manifest_is_valid_and_records_stage_counts(pipeline_run):
    manifest = load_manifest(pipeline_run["uri"])
    # The file carries no run id (it is the same for every run of this config); the returned object does.
    assert manifest == pipeline_run["manifest"].model_copy(update={"mlflow_run_id": None})
    assert set(manifest.domains) == {"sharp", "medium"}
    assert {"pad", "mask", "bos", "eos"} <= set(manifest.tokenizer.special_ids)
    names = [s.name for s in manifest.stages]
    assert names == ["read", "unique_ids", "word_count_filter", "exact_dedup", "near_dedup", "tokenize_shard"]
    for before, after in zip(manifest.stages[1:], manifest.stages[2:]):
        assert after.docs_in == before.docs_out
        assert before.docs_in - before.docs_out == sum(before.removed.values())
    for domain in manifest.domains.values():
        assert domain.rows("validation") >= 2 and domain.rows("train") > 0
    assert any("near_dedup" in line for line in pipeline_run["progress"])


@pytest.mark.slow
def test_rerun_is_deterministic(pipeline_run):
    before = Path(pipeline_run["uri"]).read_bytes()
    # force: a plain re-run of a finished pipeline loads every stage (tests/test_pipeline_resume.py)
    second, _ = run_pipeline(pipeline_run["cfg"], progress=lambda m: None, force="all")
    first = pipeline_run["manifest"]
    assert Path(pipeline_run["uri"]).read_bytes() == before
    assert second.mlflow_run_id != first.mlflow_run_id
    assert second.tokenizer.sha256 == first.tokenizer.sha256
    assert {d: [s.sha256 for s in v.shards] for d, v in second.domains.items()} == \
           {d: [s.sha256 for s in v.shards] for d, v in first.domains.items()}


@pytest.mark.slow
def test_gzip_and_parquet_inputs_and_fixed_domain(tmp_path, ray_session, mlflow_uri):
    import pyarrow as pa

    text = " ".join(f"word{i}" for i in range(30))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"{text} gz{i}"}) + "\n")
    pq.write_table(pa.table({"text": [f"{text} pq{i}" for i in range(6)], "id": [f"p{i}" for i in range(6)]}),
                   tmp_path / "b.parquet")
    cfg = PipelineConfig(
        inputs=[InputSpec(path=str(tmp_path / "a.jsonl.gz"), domain="gz"),
                InputSpec(path=str(tmp_path / "b.parquet"), domain="pq")],
        output_dir=str(tmp_path / "out"), word_count_filter=WordCountFilterConfig(min_words=5),
        near_dedup=NearDedupConfig(enabled=False), tokenizer=TokenizerConfig(vocab_size=300),
    )
    manifest, _ = run_pipeline(cfg, progress=lambda m: None)
    assert {d: v.rows("train") + v.rows("validation") for d, v in manifest.domains.items()} == {"gz": 6, "pq": 6}
    ids = {i for s in manifest.domains["pq"].shards
           for i in pq.read_table(tmp_path / "out" / s.path).column("doc_id").to_pylist()}
    assert ids == {f"p{i}" for i in range(6)}
