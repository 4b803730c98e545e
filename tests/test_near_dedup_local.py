"""The in-process near-dedup engine (pipelines/near_dedup_local.py): the same decisions and
outputs as the Ray phases (clusters row for row, the report, the index files), how ``engine``
"auto" picks it, and that it runs without starting Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.config import NearDedupConfig
from pipelines import near_dedup, near_dedup_local
from pipelines.dedup_index import index_info
from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates

REPO = Path(__file__).resolve().parent.parent


def _records(n_per_domain=60, seed=7, quality=True):
    domains = default_domains(seed=seed, vocab_size=48, doc_length=(80, 140))[:2]
    records = generate_corpus(domains, docs_per_domain=n_per_domain, seed=seed)
    records, _ = plant_near_duplicates(records, fraction=0.4, edit_rate=0.02, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    rows = [{"id": r["id"], "domain": r["domain"], "text": r["text"]} for r in records]
    # Cross-domain copies (scope matters), documents without words, a group big enough to be a giant bucket.
    rows += [{"id": f"x-{r['id']}", "domain": "other", "text": r["text"] + " tail"} for r in rows[:10]]
    rows += [{"id": "empty", "domain": "other", "text": ""}, {"id": "punct", "domain": "other", "text": "?! ..."}]
    giant = " ".join(f"g{int(i)}" for i in rng.integers(0, 5000, 150))
    rows += [{"id": f"giant-{i:02d}", "domain": "other", "text": giant} for i in range(12)]
    if quality:  # ties, missing scores and NaN: the survivor order's edge cases
        choices = [0.1, 0.5, 0.9, None, float("nan")]
        for r in rows:
            r["quality"] = choices[int(rng.integers(0, len(choices)))]
    return rows


def _table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows)


def _dataset(rows, blocks=4):
    import ray.data

    return ray.data.from_arrow(_table(rows)).repartition(blocks).materialize()


def _index_contents(uri: str) -> tuple[dict, dict[str, pa.Table]]:
    root = Path(uri)
    files = {str(f.relative_to(root)): pq.read_table(f) for f in sorted((root / "bands").rglob("*.parquet"))}
    return json.loads((root / "index.json").read_text()), files


def _assert_same(ray_result, local_result):
    assert ray_result.engine == "ray" and local_result.engine == "local"
    assert ray_result.clusters.num_rows > 0
    assert ray_result.clusters.schema == local_result.clusters.schema
    assert ray_result.clusters.to_pylist() == local_result.clusters.to_pylist()  # row for row
    assert ray_result.report == local_result.report


def _assert_same_index(a: str, b: str):
    meta_a, files_a = _index_contents(a)
    meta_b, files_b = _index_contents(b)
    assert meta_a == meta_b and sorted(files_a) == sorted(files_b) and files_a
    for name in files_a:
        assert files_a[name].equals(files_b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("params", [
    {},
    {"scope": "per_domain", "max_bucket_size": 5, "partitions": 3},
    {"verify": True, "bands": 20, "rows": 5, "partitions": 5},
], ids=["default", "per_domain_giants", "verify"])
def test_local_engine_equals_the_ray_engine_row_for_row(ray_session, tmp_path, params):
    rows = _records()
    results = {}
    for engine in ("ray", "local"):
        cfg = NearDedupConfig(**{"partitions": 4, **params, "engine": engine,
                                 "index_uri": str(tmp_path / engine / "index"), "update_index": True})
        docs = _dataset(rows) if engine == "ray" else _table(rows)
        results[engine] = near_dedup.find_clusters(docs, cfg, str(tmp_path / engine / "work"))
    _assert_same(results["ray"], results["local"])
    if params.get("max_bucket_size"):
        assert results["local"].report["giant_buckets"] > 0
    assert results["local"].report["no_shingles"]["other"] == 2
    _assert_same_index(str(tmp_path / "ray" / "index"), str(tmp_path / "local" / "index"))
    # `maskmix dedup index-info` reads the local engine's index like the Ray engine's.
    infos = [index_info(str(tmp_path / engine / "index")) for engine in ("ray", "local")]
    assert [{k: v for k, v in info.items() if k != "uri"} for info in infos] == \
        [{k: v for k, v in infos[0].items() if k != "uri"}] * 2 and infos[0]["documents"] > 0


@pytest.mark.slow
def test_incremental_dedup_against_an_index_is_the_same_on_both_engines(ray_session, tmp_path):
    rows = _records(quality=False)
    old, new = rows[::2], rows[1::2]
    base = NearDedupConfig(partitions=4, index_uri=str(tmp_path / "index"), update_index=True, engine="ray")
    near_dedup.find_clusters(_dataset(old), base, str(tmp_path / "w0"))  # an index built by the Ray engine
    results = {}
    for engine in ("ray", "local"):
        shutil.copytree(tmp_path / "index", tmp_path / f"index-{engine}")
        cfg = base.model_copy(update={"engine": engine, "index_uri": str(tmp_path / f"index-{engine}")})
        results[engine] = near_dedup.find_clusters(_table(new), cfg, str(tmp_path / f"w-{engine}"))
    _assert_same(results["ray"], results["local"])
    assert results["local"].report["matched_index"] > 0
    _assert_same_index(str(tmp_path / "index-ray"), str(tmp_path / "index-local"))
    # And the other way round: an index the local engine appended to serves a Ray run identically.
    again = {}
    for engine in ("ray", "local"):
        cfg = base.model_copy(update={"engine": engine, "index_uri": str(tmp_path / "index-local"),
                                      "update_index": False})
        again[engine] = near_dedup.find_clusters(_table(old[:40] + new[:40]), cfg, str(tmp_path / f"a-{engine}"))
    _assert_same(again["ray"], again["local"])


def test_choose_engine_thresholds():
    cfg = NearDedupConfig(local_max_docs=100, local_max_bytes=1000)
    assert near_dedup_local.choose_engine(cfg, 100, 1000) == "local"
    assert near_dedup_local.choose_engine(cfg, None, None) == "local"
    assert near_dedup_local.choose_engine(cfg, 101, 10) == "ray"
    assert near_dedup_local.choose_engine(cfg, 10, 1001) == "ray"
    assert near_dedup_local.choose_engine(cfg.model_copy(update={"engine": "local"}), 10**9, 10**12) == "local"
    assert near_dedup_local.choose_engine(cfg.model_copy(update={"engine": "ray"}), 1, 1) == "ray"
    assert near_dedup_local.choose_engine(NearDedupConfig(local_max_docs=0), 0, 0) == "ray"
    default = NearDedupConfig()
    assert default.engine == "auto" and default.local_max_docs == 100_000 and default.local_max_bytes == 256 * 2**20
    with pytest.raises(ValueError):
        NearDedupConfig(engine="threads")


def test_local_input_judges_tables_by_rows_and_text_bytes():
    table = _table([{"id": "a", "domain": "d", "text": "x" * 600, "source": "s"},
                    {"id": "b", "domain": "d", "text": "y" * 600, "source": "s"}])
    picked = near_dedup_local.local_input(table, NearDedupConfig())
    assert picked.column_names == ["id", "domain", "text"]  # only what near-dedup reads
    assert near_dedup_local.local_input(table, NearDedupConfig(local_max_docs=1)) is None
    assert near_dedup_local.local_input(table, NearDedupConfig(local_max_bytes=1000)) is None
    assert near_dedup_local.local_input(table, NearDedupConfig(), num_docs=10**6) is None  # the caller's count


@pytest.mark.slow
def test_local_input_reads_a_small_dataset_and_gives_up_on_a_large_one(ray_session):
    rows = [{"id": f"d{i}", "domain": "d", "text": f"words number {i} " * 20} for i in range(40)]
    docs = _dataset(rows, blocks=4)
    got = near_dedup_local.local_input(docs, NearDedupConfig())
    assert sorted(got.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert near_dedup_local.local_input(docs, NearDedupConfig(local_max_docs=15)) is None
    assert near_dedup_local.local_input(docs, NearDedupConfig(local_max_bytes=2000)) is None
    assert near_dedup_local.local_input(docs, NearDedupConfig(engine="ray")) is None
    assert near_dedup_local.local_input(docs, NearDedupConfig(engine="local", local_max_docs=1)).num_rows == 40


@pytest.mark.slow
def test_auto_engine_sends_a_large_table_to_ray(ray_session, tmp_path, monkeypatch):
    rows = _records(n_per_domain=20, quality=False)
    ran = []
    real_bands = near_dedup_local.LocalNearDedup.bands
    monkeypatch.setattr(near_dedup_local.LocalNearDedup, "bands", lambda self: ran.append(1) or real_bands(self))
    small = near_dedup.find_clusters(_table(rows), NearDedupConfig(partitions=4), str(tmp_path / "a"))
    assert small.engine == "local" and ran == [1]
    large = near_dedup.find_clusters(_table(rows), NearDedupConfig(partitions=4, local_max_docs=len(rows) - 1),
                                     str(tmp_path / "b"))
    assert large.engine == "ray" and ran == [1]
    assert large.clusters.equals(small.clusters) and large.report == small.report


def test_read_documents_jsonl_and_parquet(tmp_path):
    rows = [{"id": f"d{i}", "domain": "web", "text": f"some text {i}", "meta": {"k": i}} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "b.parquet")
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    table = near_dedup_local.read_documents(files, NearDedupConfig())
    assert table.column_names == ["id", "domain", "text"]
    assert table.to_pylist() == [{k: r[k] for k in ("id", "domain", "text")} for r in rows]
    assert near_dedup_local.read_documents(files, NearDedupConfig(local_max_bytes=50)) is None  # file bytes
    assert near_dedup_local.read_documents([files[1]], NearDedupConfig(local_max_docs=1)) is None  # Parquet rows
    assert near_dedup_local.read_documents(files, NearDedupConfig(engine="ray")) is None


def test_local_engine_runs_without_starting_ray(tmp_path):
    """A table within the limits is deduplicated in this process: Ray is never initialized."""
    rows = _records(n_per_domain=20, quality=False)
    pq.write_table(_table(rows), tmp_path / "docs.parquet")
    code = (
        "import json, sys, ray, pyarrow.parquet as pq\n"
        "from infra.config import NearDedupConfig\n"
        "from pipelines import near_dedup\n"
        "cfg = NearDedupConfig(index_uri=sys.argv[3], update_index=True)\n"
        "r = near_dedup.find_clusters(pq.read_table(sys.argv[1]), cfg, sys.argv[2])\n"
        "print(json.dumps({'ray': ray.is_initialized(), 'engine': r.engine,\n"
        "                  'removed': r.clusters.num_rows - r.report['clusters']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "docs.parquet"), str(tmp_path / "work"),
                          str(tmp_path / "index")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"ray": False, "engine": "local", "removed": result["removed"]} and result["removed"] > 0
    assert index_info(str(tmp_path / "index"))["runs"] == 1


def test_local_engine_empty_input(tmp_path):
    empty = pa.table({c: pa.array([], pa.string()) for c in ("id", "domain", "text")})
    result = near_dedup.find_clusters(empty, NearDedupConfig(index_uri=str(tmp_path / "i"), update_index=True),
                                      str(tmp_path / "w"))
    assert result.engine == "local" and result.clusters.num_rows == 0
    assert result.report["docs_in"] == {} and result.report["clusters"] == 0
    assert index_info(str(tmp_path / "i"))["documents"] == 0
