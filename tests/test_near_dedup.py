"""Distributed MinHash LSH: the S-curve, planted duplicates, survivors, giant buckets, the
persistent index (local and S3), parameter checks, resume after a kill, odd documents.

The behaviour tests run on both engines (``engine`` "ray": the distributed phases; "local": the
in-process path, pipelines/near_dedup_local.py, fed from the same Ray Dataset);
tests/test_near_dedup_local.py compares the two engines' outputs row for row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.config import NearDedupConfig
from pipelines import components, lsh, near_dedup
from pipelines.dedup_index import DedupIndexError, index_info
from pipelines.minhash import shingles
from pipelines.synthetic import default_domains, generate_corpus, plant_near_duplicates

# --------------------------------------------------------------------------- helpers


def _corpus(n_per_domain=60, fraction=0.3, edit_rate=0.015, seed=7):
    domains = default_domains(seed=seed, vocab_size=48, doc_length=(80, 140))[:2]
    records = generate_corpus(domains, docs_per_domain=n_per_domain, seed=seed)
    return plant_near_duplicates(records, fraction=fraction, edit_rate=edit_rate, rng=np.random.default_rng(seed))


def _dataset(records, blocks=4):
    import ray.data

    table = pa.Table.from_pylist([{k: r[k] for k in ("id", "domain", "text", *(["quality"] if "quality" in r else []))}
                                  for r in records])
    return ray.data.from_arrow(table).repartition(blocks).materialize()


ENGINES = pytest.mark.parametrize("engine", ["ray", "local"])


def _run(records, work, blocks=4, **cfg):
    return near_dedup.find_clusters(_dataset(records, blocks), NearDedupConfig(**{"partitions": 4, **cfg}), str(work))


def _removed(result) -> dict[str, str]:
    return {r["doc_id"]: r["kept_doc_id"] for r in result.clusters.to_pylist() if not r["kept"]}


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _doc(id_, text, domain="web", **extra):
    return {"id": id_, "domain": domain, "text": text, **extra}


def _words(n, seed):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{int(i)}" for i in rng.integers(0, 5000, size=n))


# --------------------------------------------------------------------------- banding (no Ray)


def test_detection_rate_follows_the_s_curve():
    """Pairs whose signatures agree at each position with probability s (what MinHash gives for
    Jaccard s) share a bucket with probability 1-(1-s^r)^b, within binomial error."""
    bands, rows, n_pairs = 14, 8, 3000
    rng = np.random.default_rng(0)
    for s in (0.5, 0.65, 0.72, 0.8, 0.9):
        a = rng.integers(0, 2**61, size=(n_pairs, bands * rows), dtype=np.uint64)
        b = np.where(rng.random(a.shape) < s, a, rng.integers(0, 2**61, size=a.shape, dtype=np.uint64))
        salt = np.zeros(n_pairs, dtype=np.uint64)
        found = (lsh.band_keys(a, bands, rows, salt) == lsh.band_keys(b, bands, rows, salt)).any(axis=1).mean()
        expected = 1 - (1 - s**rows) ** bands
        sigma = np.sqrt(expected * (1 - expected) / n_pairs)
        assert abs(found - expected) <= 4 * sigma + 1e-3, (s, found, expected)


def test_bucket_edges_star_verify_and_cap():
    sig = np.arange(16, dtype=np.uint64).reshape(2, 8)
    near = sig[0].copy()
    near[:2] += 100  # agrees with a on 6 of 8 values
    far = sig[0] + 1000  # agrees on none
    nodes = lsh.node_keys(["a", "b", "c", "d"], None, lsh.NEW)
    signatures = np.stack([sig[0], near, far, sig[0]])
    rows = pa.table({"band": pa.array([0] * 4, pa.int16()), "key": pa.array([7] * 4, pa.uint64()), "node": nodes,
                     "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.reshape(-1)), 8)})
    edges, giants = lsh.bucket_edges(rows, 10, None, 8)
    assert edges == [(nodes[1], nodes[0]), (nodes[2], nodes[0]), (nodes[3], nodes[0])] and giants == []
    edges, _ = lsh.bucket_edges(rows, 10, 0.7, 8)  # verification drops the far member only
    assert edges == [(nodes[1], nodes[0]), (nodes[3], nodes[0])]
    edges, giants = lsh.bucket_edges(rows, 2, None, 8)
    assert edges == [(nodes[1], nodes[0])] and giants == [{"band": 0, "key": f"{7:016x}", "size": 4}]


def test_node_keys_sort_by_quality_then_id():
    nodes = lsh.node_keys(["b", "a", "c", "d", "e"], np.array([0.5, 0.5, 2.0, np.nan, -1.0]), lsh.NEW)
    assert [lsh.doc_id(n) for n in sorted(nodes)] == ["c", "a", "b", "e", "d"]
    assert min(nodes + lsh.node_keys(["z"], np.array([-5.0]), lsh.INDEXED)).endswith("z")  # indexed wins


# --------------------------------------------------------------------------- runs on Ray


@pytest.mark.slow
@ENGINES
def test_planted_near_duplicates_found_and_dissimilar_not(ray_session, tmp_path, engine):
    records, truth = _corpus(n_per_domain=100, fraction=0.4, edit_rate=0.015)
    far_records, far_truth = _corpus(n_per_domain=30, fraction=0.5, edit_rate=0.45, seed=11)
    far_records = [dict(r, id=f"far-{r['id']}") for r in far_records]
    result = _run(records + far_records, tmp_path / "work", engine=engine)
    removed = _removed(result)

    def found(t, prefix=""):
        a, b = prefix + t.dup_id, prefix + t.original_id
        return removed.get(a) == b or removed.get(b) == a

    high = [t for t in truth if t.jaccard >= 0.8]
    assert len(high) >= 60
    assert sum(map(found, high)) >= 0.95 * len(high)
    low = [t for t in far_truth if t.jaccard < 0.5]
    assert low and not any(found(t, "far-") for t in low)
    texts = {r["id"]: r["text"] for r in records + far_records}
    for doc, kept in removed.items():  # no clustered pair is dissimilar
        a, b = shingles(texts[doc], 5), shingles(texts[kept], 5)
        assert len(a & b) / len(a | b) >= 0.5
    report = result.report
    assert report["docs_in"] == {d: report["docs_out"][d] + report["removed"][d] for d in report["docs_in"]}
    assert sum(report["removed"].values()) == len(removed)
    assert report["precision"]["pairs"] > 0 and report["precision"]["estimate"] >= 0.9


@pytest.mark.slow
@ENGINES
def test_survivor_is_deterministic_across_blocks_partitions_and_order(ray_session, tmp_path, engine):
    records, _ = _corpus(n_per_domain=40)
    first = _run(records, tmp_path / "a", blocks=1, partitions=3, engine=engine)
    second = _run(list(reversed(records)), tmp_path / "b", blocks=7, partitions=5, engine=engine)
    assert first.clusters.num_rows > 0
    assert first.clusters.equals(second.clusters)
    for cluster_id, kept in zip(first.clusters.column("cluster_id").to_pylist(),
                                first.clusters.column("kept_doc_id").to_pylist()):
        assert cluster_id == kept
    by_cluster: dict[str, list[str]] = {}
    for row in first.clusters.to_pylist():
        by_cluster.setdefault(row["cluster_id"], []).append(row["doc_id"])
    assert all(cid == min(members) for cid, members in by_cluster.items())  # no quality: smallest id


@pytest.mark.slow
@ENGINES
def test_quality_beats_smallest_id_and_giant_buckets_are_capped(ray_session, tmp_path, engine):
    text = _words(200, 1)
    docs = [_doc("a", text, quality=0.1), _doc("b", text + " extra", quality=0.9), _doc("c", text, quality=None)]
    docs += [_doc(f"g{i:02d}", _words(120, 2), quality=0.0) for i in range(30)]  # one giant bucket per band
    result = _run(docs, tmp_path / "w", max_bucket_size=10, engine=engine)
    removed = _removed(result)
    assert removed["a"] == "b" and removed["c"] == "b"
    giants = [r for r in removed if r.startswith("g")]
    assert len(giants) == 9 and all(removed[g] == "g00" for g in giants)  # only the first 10 are linked
    assert result.report["giant_buckets"] == 14
    assert result.report["largest_giant_buckets"][0]["size"] == 30


@pytest.mark.slow
@ENGINES
def test_incremental_dedup_against_an_index_old_wins(ray_session, tmp_path, engine):
    index = str(tmp_path / "index")
    old = [_doc(f"z-old-{i}", _words(150, 100 + i)) for i in range(6)]
    first = _run(old + [_doc("z-old-copy", old[0]["text"])], tmp_path / "w1", index_uri=index, update_index=True,
                 engine=engine)
    assert _removed(first) == {"z-old-copy": "z-old-0"}
    info = index_info(index)
    assert info["runs"] == 1 and info["documents"] == 6
    # New documents with smaller ids: without the index "a-..." would win; with it, old wins.
    new = [_doc("a-dup-of-old-1", old[1]["text"] + " tail"), _doc("a-dup-of-old-2", old[2]["text"]),
           _doc("b-fresh", _words(150, 999)), _doc("c-fresh-copy", _words(150, 999) + " more")]
    second = _run(new, tmp_path / "w2", index_uri=index, update_index=True, engine=engine)
    assert _removed(second) == {"a-dup-of-old-1": "z-old-1", "a-dup-of-old-2": "z-old-2", "c-fresh-copy": "b-fresh"}
    assert second.report["matched_index"] == 2
    assert index_info(index)["runs"] == 2 and index_info(index)["documents"] == 7
    # Re-running the same data does not match it against its own (already appended) rows.
    again = _run(new, tmp_path / "w3", index_uri=index, update_index=True, engine=engine)
    assert again.clusters.equals(second.clusters) and index_info(index)["runs"] == 2


@pytest.mark.slow
@ENGINES
def test_scope_per_domain_vs_global(ray_session, tmp_path, engine):
    text = _words(150, 5)
    docs = [_doc("a", text, domain="web"), _doc("b", text, domain="code"), _doc("c", text + " x", domain="web")]
    assert _removed(_run(docs, tmp_path / "g", engine=engine)) == {"b": "a", "c": "a"}
    assert _removed(_run(docs, tmp_path / "d", scope="per_domain", engine=engine)) == {"c": "a"}


@pytest.mark.slow
def test_index_parameter_mismatch_and_missing_index_are_refused(ray_session, tmp_path):
    index = str(tmp_path / "index")
    docs = [_doc("a", _words(100, 1)), _doc("b", _words(100, 2))]
    with pytest.raises(DedupIndexError, match="update_index"):
        _run(docs, tmp_path / "w0", index_uri=index)
    _run(docs, tmp_path / "w1", index_uri=index, update_index=True)
    with pytest.raises(DedupIndexError, match="bands: index 14, run 16"):
        _run(docs, tmp_path / "w2", index_uri=index, bands=16, rows=7)
    with pytest.raises(DedupIndexError, match="scope"):
        _run(docs, tmp_path / "w3", index_uri=index, scope="per_domain")
    # The CLI shows what an index holds, and refuses a folder that is none.
    import json

    from typer.testing import CliRunner

    from infra.cli import app

    shown = CliRunner().invoke(app, ["dedup", "index-info", index])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == index_info(index)
    assert json.loads(shown.output)["params"]["bands"] == 14
    missing = CliRunner().invoke(app, ["dedup", "index-info", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "error" in missing.output


@pytest.mark.slow
@pytest.mark.s3
@ENGINES
def test_index_and_work_dir_on_s3(ray_session, s3_bucket, tmp_path, engine):
    bucket, storage = s3_bucket
    bucket = f"{bucket}/{engine}"
    cfg = dict(partitions=4, index_uri=f"{bucket}/index", update_index=True, engine=engine)
    old = [_doc(f"old-{i}", _words(120, 300 + i)) for i in range(4)]
    near_dedup.find_clusters(_dataset(old), NearDedupConfig(**cfg), f"{bucket}/work1", storage)
    new = [_doc("new-0", old[3]["text"]), _doc("new-1", _words(120, 77))]
    result = near_dedup.find_clusters(_dataset(new), NearDedupConfig(**cfg), f"{bucket}/work2", storage)
    assert _removed(result) == {"new-0": "old-3"}
    assert index_info(f"{bucket}/index", storage)["documents"] == 5


@pytest.mark.slow
def test_killed_run_resumes_with_identical_clusters(ray_session, tmp_path, monkeypatch):
    records, _ = _corpus(n_per_domain=40)
    # Resume is the distributed engine's (the local one writes no work dir).
    cfg = NearDedupConfig(partitions=4, engine="ray")
    monkeypatch.setattr(components, "LOCAL_MAX_ROWS", 0)  # the distributed rounds (a small graph runs in one task)
    reference = _parquet_bytes(near_dedup.find_clusters(_dataset(records), cfg, str(tmp_path / "ref")).clusters)
    work = tmp_path / "killed"
    # Killed during the band phase: some files written, no _DONE marker.
    run = near_dedup.NearDedup(_dataset(records, blocks=3), cfg, str(work))
    run.bands()
    (work / "bands" / "_DONE.json").unlink()
    for f in sorted((work / "bands").rglob("*.parquet"))[::2]:
        f.unlink()
    # Then during the edges phase: two tasks did not finish (one even wrote part of its output).
    run = near_dedup.NearDedup(_dataset(records, blocks=5), cfg, str(work))
    run.bands()
    run.edges()
    for p in (1, 2):
        (work / "edges" / f"done-{p:05d}.json").unlink()
    for f in sorted((work / "cc" / "graph").rglob("from-00002.parquet"))[:1]:
        f.unlink()
    # Then during round 1 of the components: half of its tasks ran, then the driver died.
    real_round = components.run_round

    def dying_round(cc, k, partitions):
        if k == 1:
            import ray
            ray.get([components._round_task.remote(cc, k, q, partitions) for q in range(partitions // 2)])
            raise RuntimeError("killed")
        return real_round(cc, k, partitions)

    monkeypatch.setattr(components, "run_round", dying_round)
    with pytest.raises(RuntimeError, match="killed"):
        near_dedup.find_clusters(_dataset(records), cfg, str(work))
    monkeypatch.setattr(components, "run_round", real_round)
    assert (work / "cc" / "r001" / "done-00000.json").exists()
    resumed = near_dedup.find_clusters(_dataset(records, blocks=2), cfg, str(work))
    assert _parquet_bytes(resumed.clusters) == reference


def test_partitioned_band_rows_equal_band_rows_split_by_partition():
    from pipelines.workdir import split_rows

    rng = np.random.default_rng(3)
    sig = rng.integers(0, 2**61, size=(50, 112), dtype=np.uint64)
    nodes = lsh.node_keys([f"d{i}" for i in range(50)], rng.random(50), lsh.NEW)
    salt = rng.integers(0, 2**63, size=50, dtype=np.uint64)
    for with_signature in (False, True):
        rows = lsh.band_rows(nodes, sig, 14, 8, salt, with_signature)
        expected = split_rows(rows, lsh.partition_of(rows.column("band").to_numpy(), rows.column("key").to_numpy(), 5))
        got = lsh.partitioned_band_rows(pa.array(nodes), sig, 14, 8, salt, 5, with_signature)
        assert sorted(got) == sorted(expected)
        assert all(got[p].equals(expected[p]) for p in got)
    assert lsh.node_keys_array(pa.array(["b", "a"]), np.array([0.5, np.nan]), lsh.NEW).to_pylist() == \
        lsh.node_keys(["b", "a"], np.array([0.5, np.nan]), lsh.NEW)
    assert lsh.node_keys_array(pa.array(["b", "a"]), None, lsh.INDEXED).to_pylist() == \
        lsh.node_keys(["b", "a"], None, lsh.INDEXED)


def test_min_components_roots_are_the_smallest_node():
    nodes, roots = lsh.min_components(pa.array(["d", "b", "x", "é", "y"]), pa.array(["c", "d", "y", "a", "z"]))
    assert dict(zip(nodes.to_pylist(), roots.to_pylist())) == {
        "a": "a", "é": "a", "b": "b", "c": "b", "d": "b", "x": "x", "y": "x", "z": "x"}
    assert lsh.min_components(pa.array([], pa.string()), pa.array([], pa.string()))[0].to_pylist() == []


@pytest.mark.slow
def test_local_and_distributed_components_agree(ray_session, tmp_path):
    """A small graph is finished in one task (components.LOCAL_MAX_ROWS), a large one by rounds of
    label propagation; both give the same clusters."""
    records, _ = _corpus(n_per_domain=60, fraction=0.5)
    runs = {}
    for name, local_max in (("local", components.LOCAL_MAX_ROWS), ("rounds", 0)):
        run = near_dedup.NearDedup(_dataset(records), NearDedupConfig(partitions=4), str(tmp_path / name))
        run.local_components_max_rows = local_max
        runs[name] = run.run()
    assert runs["local"].report["components_rounds"] == 1 < runs["rounds"].report["components_rounds"]
    assert runs["local"].clusters.num_rows > 0 and runs["local"].clusters.equals(runs["rounds"].clusters)


@pytest.mark.slow
@ENGINES
def test_empty_one_word_and_multi_megabyte_documents(ray_session, tmp_path, engine):
    big = _words(600_000, 42)  # ~4 MB
    assert len(big) > 3_000_000
    docs = [_doc("empty-1", ""), _doc("empty-2", ""), _doc("blank", " \n\t "), _doc("punct", "!!! ...")]
    docs += [_doc("one-1", "hello"), _doc("one-2", "Hello!"), _doc("big-1", big), _doc("big-2", big + " end")]
    result = _run(docs, tmp_path / "w", engine=engine)
    removed = _removed(result)
    assert not any(d.startswith(("empty", "blank", "punct")) for d in removed)
    assert removed["big-2"] == "big-1" and removed["one-2"] == "one-1"
    assert result.report["no_shingles"] == {"web": 4}


@pytest.mark.slow
@ENGINES
def test_verified_index_keeps_signatures_for_later_runs(ray_session, tmp_path, engine):
    index = str(tmp_path / "index")
    old = [_doc(f"old-{i}", _words(150, 500 + i)) for i in range(3)]
    _run(old, tmp_path / "w1", index_uri=index, update_index=True, verify=True, engine=engine)
    assert index_info(index)["params"]["with_signatures"] is True
    new = [_doc("new-0", old[0]["text"] + " tail"), _doc("new-1", _words(150, 12345))]
    assert _removed(_run(new, tmp_path / "w2", index_uri=index, verify=True, engine=engine)) == {"new-0": "old-0"}
    with pytest.raises(DedupIndexError, match="with_signatures"):
        _run(new, tmp_path / "w3", index_uri=index, engine=engine)


def test_report_pair_jaccards_equal_the_shingle_set_jaccard():
    """The report's precision sample uses compiled shingle hashes: the same numbers as Python sets."""
    texts = {"a": _words(300, 1), "b": _words(300, 1) + " and a tail of words", "c": _words(80, 2),
             "d": "Déjà vu, DÉJÀ vu! Ça va? ça va. straße STRASSE",
             "e": "déjà vu déjà vu ça va ça va straße",
             "f": "", "g": "!!! ...", "h": "one", "i": "One!"}
    pairs = [("a", "b"), ("a", "c"), ("d", "e"), ("f", "g"), ("f", "h"), ("h", "i"), ("b", "b")]
    expected = []
    for x, y in pairs:
        sx, sy = shingles(texts[x], 5), shingles(texts[y], 5)
        expected.append(len(sx & sy) / len(sx | sy) if sx or sy else 1.0)
    assert near_dedup.pair_jaccards(texts, pairs, 5) == expected
    assert 0 < expected[0] < 1 and expected[4] == 0.0 and expected[3] == expected[5] == 1.0
    assert near_dedup.pair_jaccards(texts, [], 5) == []
