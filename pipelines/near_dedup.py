"""Near-duplicate removal: MinHash signatures -> distributed LSH -> connected components.

The contract: ``find_clusters`` returns the clusters (size >= 2) as a CLUSTERS_SCHEMA table
(doc_id, cluster_id, kept, kept_doc_id; cluster_id is the kept document's id) and a quality
report. The kept document of a cluster is the best by ``quality`` (an optional float column,
higher is better), then the smallest id; with a persistent index, indexed documents always win.

Phases, each leaving files under the work dir, so that a killed run restarts where it stopped:

  bands       ONE Ray Data map over the documents: the input fingerprint (the run's identity,
              ``work.json``), signatures (pipelines.minhash), then one row per (document, band)
              -- band, 64-bit bucket key, node -- written to the bucket's partition:
              ``bands/part-<p>/<batch hash>.parquet``. ``bands/_DONE.json`` ends it; an
              unfinished phase is redone from its start (input blocks differ between runs). A
              finished one is kept after a fingerprint-only pass shows the same input.
  edges       one Ray task per bucket partition: its band rows (and the index's rows of that
              partition) -> buckets -> star edges -> local components (compiled union-find)
              -> the reduced edges, scattered to the node partitions of the next phase.
              ``edges/done-<p>.json``.
  components  one task with a compiled union-find when the reduced graph is small
              (components.LOCAL_MAX_ROWS), else distributed min-label propagation
              (pipelines.components); ``cc/state.json``.
  index       (update_index) the survivors' band rows appended to the index, then index.json.

Engines (``NearDedupConfig.engine``): the phases above are the "ray" engine. "auto" (the default)
runs an input of at most ``local_max_docs`` documents and ``local_max_bytes`` of text on the
"local" engine instead (pipelines/near_dedup_local.py): the same functions (``band_batch``,
``partition_edges``, ``indexed_rows``, ``clusters``, ``report``) in one process, no Ray Data,
and for an Arrow table input no Ray start; identical clusters, report and index rows, no resume.

Memory: a map task holds one batch; an edges task one band-table partition (documents x bands
/ P rows); a components task one node partition of the reduced edges. The driver never holds
signatures or band rows: it holds the result (documents in clusters), the ids of removed
documents (to append survivors to the index and count removals per domain) and counters.
The work dir is named by the input (ids, domains, text lengths, quality) and every parameter,
so a changed input or config starts over instead of resuming stale work.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from infra.config import NearDedupConfig, StorageConfig
from infra.contracts import CLUSTERS_SCHEMA
from pipelines import components, lsh, minhash
from pipelines.components import connected_components, write_graph_arrays
from pipelines.dedup_index import BandIndex, index_params
from pipelines.lsh_params import approx_threshold
from pipelines.workdir import WorkDir

# Documents per signature batch: one band file per partition per batch. 4096 gave 16 files of
# ~3.5k rows per batch, and per-file costs (Parquet footers, task hand-offs) dominated the bands
# and edges phases; a batch is also capped by Ray Data's block (<= 128 MB of input), so long
# documents give smaller batches. Memory: ~14 band rows (~50 bytes) per document of the batch.
_BATCH_SIZE = 65536
_REPORTED_GIANTS = 10


# Shingling and signatures live in pipelines/minhash.py (fast numba kernel or bit-exact datasketch
# mode, cfg.hash_mode): signature is fixed_size_list<uint64>[num_perm]; rows equal to minhash.EMPTY
# (documents without words) must be skipped by the LSH (minhash.is_empty).
shingles = minhash.shingles
signature_batch = minhash.signature_batch


# --------------------------------------------------------------------------- Ray functions


def _per_domain(batch: pa.Table, keep: np.ndarray | None) -> pa.Table:
    """Per domain of the batch: documents, documents without shingles (``~keep``), and the sum
    (mod 2^64) of the documents' fingerprints (lsh.row_fingerprints): the input's identity.
    (Compiled since this change; it was a blake2b per document in Python, 15% of the bands
    phase's CPU. Run tags differ from the earlier ones, so an index appended to by an earlier
    version does not recognize a re-run of the same input as its own run.)"""
    quality = "quality" if "quality" in batch.column_names else None
    hashes = lsh.row_fingerprints(batch.column("id"), batch.column("domain"), batch.column("text"),
                                  batch.column(quality) if quality else None)
    codes = pc.dictionary_encode(batch.column("domain").combine_chunks())
    names, index = codes.dictionary, codes.indices.to_numpy(zero_copy_only=False)
    docs = np.bincount(index, minlength=len(names))
    no_shingles = np.bincount(index[~keep], minlength=len(names)) if keep is not None else np.zeros(len(names), int)
    total = np.zeros(len(names), np.uint64)
    np.add.at(total, index, hashes)  # uint64: wraps mod 2^64
    order = pc.sort_indices(names).to_numpy()
    return pa.table({"domain": names.take(pa.array(order)), "docs": pa.array(docs[order], pa.int64()),
                     "no_shingles": pa.array(no_shingles[order], pa.int64()),
                     "hash": pa.array([str(h) for h in total[order].tolist()], pa.string()),
                     "quality": pa.array([quality is not None] * len(names), pa.bool_())})


def band_batch(batch: pa.Table, cfg: NearDedupConfig, partitions: int) -> tuple[dict[int, pa.Table], pa.Table]:
    """Signatures -> band rows of one batch, split by bucket partition ({partition: rows}), and the
    batch's per-domain document counts and input fingerprint (``_per_domain``). Both engines call
    it: the Ray one writes the rows to files (``_write_band_batch``), the local one keeps them.

    The quality column is optional, looked up in the batch itself (no ``docs.schema()`` pass).
    A document without words has an EMPTY signature (pipelines.minhash): that alone marks it."""
    quality = "quality" if "quality" in batch.column_names else None
    sig = minhash.compute_signatures(batch.column("text"), num_perm=cfg.num_perm, ngram=cfg.ngram,
                                     seed=cfg.seed, mode=cfg.hash_mode)
    keep = ~minhash.is_empty(sig)
    idx = np.flatnonzero(keep)
    take = pa.array(idx)
    q = batch.column(quality).to_numpy(zero_copy_only=False).astype(np.float64)[idx] if quality else None
    nodes = lsh.node_keys_array(batch.column("id").combine_chunks().take(take), q, lsh.NEW)
    salt = lsh.domain_salts(batch.column("domain").take(take).to_pylist() if cfg.scope == "per_domain" else None,
                            len(idx))
    parts = lsh.partitioned_band_rows(nodes, sig[idx], cfg.bands, cfg.rows, salt, partitions, cfg.verify)
    return parts, _per_domain(batch, keep)


def _write_band_batch(batch: pa.Table, cfg: NearDedupConfig, work: WorkDir, partitions: int) -> pa.Table:
    """``band_batch``, its rows written per bucket partition; returns the per-domain rows: one pass
    over the input does both."""
    parts, per_domain = band_batch(batch, cfg, partitions)
    # Named by content: a retried or re-run batch overwrites its own files with the same rows.
    name = hashlib.blake2b("\n".join(batch.column("id").to_pylist()).encode(), digest_size=12).hexdigest()
    for p, part in parts.items():
        work.write_table(part, "bands", f"part-{p:05d}", f"{name}.parquet")
    return per_domain


def _fingerprint_batch(batch: pa.Table) -> pa.Table:
    """The fingerprint alone (a resumed run checks that its input is the one its bands came from)."""
    return _per_domain(batch, None)


def _fold(rows: list[dict]) -> tuple[dict, list[int], str | None]:
    """Per-batch rows of _write_band_batch/_fingerprint_batch -> (summary, input fingerprint, quality)."""
    docs, no_shingles, total = Counter(), Counter(), 0
    for r in rows:
        docs[r["domain"]] += r["docs"]
        no_shingles[r["domain"]] += r["no_shingles"]
        total += int(r["hash"])
    summary = {"docs": dict(sorted(docs.items())), "no_shingles": dict(sorted(no_shingles.items()))}
    return summary, [sum(docs.values()), total % 2**64], "quality" if any(r["quality"] for r in rows) else None


def partition_edges(rows: pa.Table, cfg: NearDedupConfig, threshold: float) -> tuple[list[tuple[str, str]], list[dict]]:
    """Star edges and giant buckets of one bucket partition's band rows (this run's and the index's)."""
    return lsh.bucket_edges(rows, cfg.max_bucket_size, threshold if cfg.verify else None, cfg.num_perm)


def indexed_rows(rows: pa.Table, removed: pa.Array) -> pa.Table:
    """A partition's band rows as the index stores them: without the removed documents, nodes
    marked INDEXED, sorted by (band, key, node)."""
    rows = rows.filter(pc.invert(pc.is_in(rows.column("node"), value_set=removed)))
    if rows.num_rows == 0:
        return rows
    as_indexed = pc.binary_join_element_wise(lsh.INDEXED, pc.utf8_slice_codeunits(rows.column("node"), 1), "")
    rows = rows.set_column(rows.schema.get_field_index("node"), "node", as_indexed)
    return rows.sort_by([("band", "ascending"), ("key", "ascending"), ("node", "ascending")])


@ray.remote
def _edges_task(work: WorkDir, cc: WorkDir, p: int, index_files: list[str], cfg: NearDedupConfig,
                partitions: int, threshold: float) -> None:
    schema = lsh.band_schema(cfg.num_perm, cfg.verify)
    rows = work.read_files(work.files("bands", f"part-{p:05d}") + index_files, schema)
    edges, giants = partition_edges(rows, cfg, threshold)
    # A star per local component: the edge set shrinks before it crosses partitions.
    nodes, roots = lsh.min_components([a for a, _ in edges], [b for _, b in edges])
    star = pc.not_equal(nodes, roots)
    nodes, roots = nodes.filter(star), roots.filter(star)
    write_graph_arrays(cc, nodes, roots, p, partitions)
    work.write_json({"edges": len(edges), "reduced": len(nodes), "giants": giants}, "edges", f"done-{p:05d}.json")


@ray.remote
def _index_task(work: WorkDir, index: WorkDir, p: int, tag: str, removed: pa.Array, schema: pa.Schema) -> int:
    rows = indexed_rows(work.read_files(work.files("bands", f"part-{p:05d}"), schema), removed)
    if rows.num_rows:
        index.write_table(rows, "bands", f"part-{p:05d}", f"{tag}.parquet")
    return rows.num_rows


def _removed_and_sampled(batch: pa.Table, removed: pa.Array, wanted: pa.Array) -> pa.Table:
    """Rows of removed or sampled documents: id, domain, and the text of the sampled ones only."""
    ids = batch.column("id")
    hit = batch.filter(pc.or_(pc.is_in(ids, value_set=removed), pc.is_in(ids, value_set=wanted)))
    text = pc.if_else(pc.is_in(hit.column("id"), value_set=wanted), hit.column("text"), pa.scalar(None, pa.string()))
    return pa.table({"id": hit.column("id"), "domain": hit.column("domain"), "text": text})


# --------------------------------------------------------------------------- the run


def edges_summary(done: list[dict]) -> dict:
    """The report's edges part from each partition's {"edges": count, "giants": [...]}."""
    giants = sorted((g for d in done for g in d["giants"]), key=lambda g: (-g["size"], g["band"], g["key"]))
    return {"candidate_edges": sum(d["edges"] for d in done), "giant_buckets": len(giants),
            "largest_giant_buckets": giants[:_REPORTED_GIANTS]}


@dataclass
class NearDedupResult:
    clusters: pa.Table  # CLUSTERS_SCHEMA
    report: dict
    engine: str = "ray"  # which engine ran it: "ray" or "local" (same decisions either way)


def similarity_threshold(cfg: NearDedupConfig) -> float:
    """The configured threshold, else the LSH curve's midpoint (1/b)^(1/r)."""
    return cfg.threshold if cfg.threshold is not None else approx_threshold(cfg.bands, cfg.rows)


class NearDedup:
    """One near-dedup run over ``docs`` with its work dir; ``run`` does every phase that is not done yet."""

    engine = "ray"

    def __init__(self, docs: ray.data.Dataset, cfg: NearDedupConfig, work_uri: str,
                 storage_cfg: StorageConfig | None = None):
        self.docs, self.cfg = docs, cfg
        self.work = WorkDir(work_uri, storage_cfg)
        self.cc = WorkDir(self.work.path("cc"), storage_cfg)
        self.index = BandIndex(cfg.index_uri, storage_cfg) if cfg.index_uri else None
        self.index_meta = None
        if self.index and (self.index.exists() or not cfg.update_index):
            self.index_meta = self.index.checked_meta(cfg)
        self.partitions = self.index_meta["partitions"] if self.index_meta else cfg.partitions
        self.local_components_max_rows = components.LOCAL_MAX_ROWS  # 0 forces the distributed rounds
        self.tag: str | None = None  # the run's identity, known once the bands phase has read the input

    def _identity(self, input_fp: list[int], quality: str | None) -> tuple[str, dict]:
        """The run's tag (its input and parameters) and the work dir identity (tag + index runs)."""
        run = {"input": input_fp, "params": index_params(self.cfg), "partitions": self.partitions,
               "max_bucket_size": self.cfg.max_bucket_size, "quality": quality,
               "threshold": similarity_threshold(self.cfg)}
        tag = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
        indexed = [r["tag"] for r in self.index_meta["runs"] if r["tag"] != tag] if self.index_meta else []
        return tag, {"tag": tag, "index": self.cfg.index_uri, "index_runs": indexed}

    # ------------------------------------------------------------------ phases

    def bands(self) -> dict:
        """Signatures and band rows, in ONE pass over the input that also fingerprints it.

        A finished bands phase (``bands/_DONE.json``) is kept only if a fingerprint pass shows the
        same input and parameters (``work.json``); anything else wipes the work dir and does the
        fused pass. Before, a fingerprint pass always ran first, then the bands pass, plus a
        ``docs.schema()`` execution: three executions of the read instead of one (measured in
        bench/near_dedup.py: 1M short documents, fingerprint phase 33.7 s -> 0).
        """
        if self.work.exists("bands", "_DONE.json") and self.work.exists("work.json"):
            rows = self.docs.map_batches(_fingerprint_batch, batch_format="pyarrow", batch_size=_BATCH_SIZE).take_all()
            _, input_fp, quality = _fold(rows)
            tag, identity = self._identity(input_fp, quality)
            if self.work.read_json("work.json") == identity:
                self.tag = tag
                return self.work.read_json("bands", "_DONE.json")
        self.work.delete()  # another input or config, or an unfinished bands phase: start over
        rows = self.docs.map_batches(
            _write_band_batch, batch_format="pyarrow", batch_size=_BATCH_SIZE,
            fn_kwargs={"cfg": self.cfg, "work": self.work, "partitions": self.partitions},
        ).take_all()
        summary, input_fp, quality = _fold(rows)
        self.tag, identity = self._identity(input_fp, quality)
        self.work.write_json(identity, "work.json")
        self.work.write_json(summary, "bands", "_DONE.json")
        return summary

    def edges(self) -> dict:
        pending = [p for p in range(self.partitions) if not self.work.exists("edges", f"done-{p:05d}.json")]
        ray.get([_edges_task.remote(
            self.work, self.cc, p, self.index.partition_files(self.index_meta, p, self.tag) if self.index_meta else [],
            self.cfg, self.partitions, similarity_threshold(self.cfg)) for p in pending])
        done = [self.work.read_json("edges", f"done-{p:05d}.json") for p in range(self.partitions)]
        self._graph_rows = 2 * sum(d.get("reduced", 0) for d in done) if all("reduced" in d for d in done) else None
        return edges_summary(done)

    def components(self) -> tuple[pa.Table, int]:
        labels, rounds = connected_components(self.cc, self.partitions, getattr(self, "_graph_rows", None),
                                              self.local_components_max_rows)
        return labels.sort_by("node"), rounds

    def update_index(self, labels: pa.Table, summary: dict) -> None:
        meta = self.index.meta() if self.index.exists() else None
        if meta and any(r["tag"] == self.tag for r in meta["runs"]):
            return  # appended before this run was resumed
        removed = labels.filter(pc.not_equal(labels.column("node"), labels.column("label"))).column("node")
        written = self._write_index_rows(removed.combine_chunks())
        documents = sum(summary["docs"].values()) - sum(summary["no_shingles"].values()) - len(removed)
        self.index.commit(meta, self.cfg, self.partitions, {
            "tag": self.tag, "documents": documents, "rows": sum(written),
            "partitions": [p for p, n in enumerate(written) if n]})

    def _write_index_rows(self, removed: pa.Array) -> list[int]:
        """Each partition's survivor rows (``indexed_rows``) written to the index; rows per partition."""
        removed_ref = ray.put(removed)
        schema = lsh.band_schema(self.cfg.num_perm, self.cfg.verify)
        return ray.get([_index_task.remote(self.work, self.index.files, p, self.tag, removed_ref, schema)
                        for p in range(self.partitions)])

    # ------------------------------------------------------------------ results

    @staticmethod
    def clusters(labels: pa.Table) -> tuple[pa.Table, int]:
        """The CLUSTERS_SCHEMA table of this run's documents, and how many matched an indexed one."""
        new = labels.filter(pc.starts_with(labels.column("node"), lsh.NEW))
        node, label = new.column("node"), new.column("label")
        table = pa.table({
            "doc_id": lsh.doc_ids(node),
            "cluster_id": lsh.doc_ids(label),
            "kept": pc.equal(node, label),
            "kept_doc_id": lsh.doc_ids(label),
        }, schema=CLUSTERS_SCHEMA).sort_by("doc_id")
        return table, pc.sum(pc.starts_with(label, lsh.INDEXED).cast(pa.int64())).as_py() or 0

    def report(self, clusters: pa.Table, summary: dict, edges: dict, rounds: int, matched_index: int) -> dict:
        removed = clusters.filter(pc.invert(clusters.column("kept")))
        kept_here = set(clusters.filter(clusters.column("kept")).column("doc_id").to_pylist())
        pairs = sorted(((r, k) for r, k in zip(removed.column("doc_id").to_pylist(),
                                               removed.column("kept_doc_id").to_pylist()) if k in kept_here),
                       key=lambda rk: hashlib.blake2b(rk[0].encode(), digest_size=8).digest())
        pairs = pairs[: self.cfg.precision_sample]
        wanted = pa.array(sorted({i for pair in pairs for i in pair}), pa.string())
        removed_ids, removed_by_domain, texts = set(removed.column("doc_id").to_pylist()), Counter(), {}
        for batch in self._lookup(removed.column("doc_id").combine_chunks(), wanted):
            for i, d, t in zip(*(batch.column(c).to_pylist() for c in ("id", "domain", "text"))):
                removed_by_domain[d] += i in removed_ids
                if t is not None:
                    texts[i] = t
        threshold = similarity_threshold(self.cfg)
        sims = pair_jaccards(texts, pairs, self.cfg.ngram)
        docs_in = summary["docs"]
        return {
            "docs_in": docs_in,
            "docs_out": {d: n - removed_by_domain[d] for d, n in docs_in.items()},
            "removed": {d: removed_by_domain[d] for d in docs_in},
            "no_shingles": summary["no_shingles"],
            "clusters": len(set(clusters.column("cluster_id").to_pylist())), "matched_index": matched_index,
            "cluster_sizes": cluster_size_histogram(clusters),
            **edges, "components_rounds": rounds, "partitions": self.partitions,
            "precision": {"threshold": round(threshold, 4), "pairs": len(sims),
                          "above_threshold": sum(s >= threshold for s in sims),
                          "estimate": round(sum(s >= threshold for s in sims) / len(sims), 4) if sims else None,
                          "mean_jaccard": round(float(np.mean(sims)), 4) if sims else None},
        }

    def _lookup(self, removed: pa.Array, wanted: pa.Array):
        """Tables of (id, domain, text) of the removed and the sampled documents (``_removed_and_sampled``)."""
        found = self.docs.map_batches(_removed_and_sampled, batch_format="pyarrow",
                                      fn_kwargs={"removed": removed, "wanted": wanted})
        return found.iter_batches(batch_format="pyarrow", batch_size=65536)

    def run(self) -> NearDedupResult:
        summary = self.bands()
        edges = self.edges()
        labels, rounds = self.components()
        if self.index and self.cfg.update_index:
            self.update_index(labels, summary)
        clusters, matched_index = self.clusters(labels)
        return NearDedupResult(clusters, self.report(clusters, summary, edges, rounds, matched_index), self.engine)


def pair_jaccards(texts: dict[str, str], pairs: list[tuple[str, str]], ngram: int) -> list[float]:
    """Jaccard of the shingle sets (``minhash.shingles``) of each pair (ids into ``texts``), from the
    compiled kernel's distinct 64-bit shingle hashes (``minhash.shingle_hashes``, the same word
    n-grams): exact unless two of a pair's shingles collide in 64 bits. (It was Python shingle
    sets: 0.4 s of a 1.7 s run on the --quick bench corpus; checked equal on 1,341 pairs there.)
    Two documents without shingles have Jaccard 1."""
    ids = sorted({i for pair in pairs for i in pair})
    if not ids:
        return []
    row = {d: k for k, d in enumerate(ids)}
    values, offsets = minhash.shingle_hashes(pa.array([texts[d] for d in ids], pa.string()), ngram)
    out = []
    for a, b in pairs:
        x, y = values[offsets[row[a]]:offsets[row[a] + 1]], values[offsets[row[b]]:offsets[row[b] + 1]]
        both = np.intersect1d(x, y, assume_unique=True).size  # a document's hashes are distinct
        out.append(both / (x.size + y.size - both) if x.size or y.size else 1.0)
    return out


def find_clusters(docs: ray.data.Dataset | pa.Table, cfg: NearDedupConfig, work_uri: str,
                  storage_cfg: StorageConfig | None = None, num_docs: int | None = None) -> NearDedupResult:
    """Clusters of near-duplicates (size >= 2) and the run's quality report; see the module docstring.

    ``docs``: a Ray Dataset or an Arrow table (id, domain, text, optional quality). ``cfg.engine``
    picks where it runs (pipelines.near_dedup_local.local_input): in-process for a small input
    (no Ray Data, and for a table no Ray start), else the Ray phases above; the decisions and
    outputs are the same. ``num_docs``: the input's document count when the caller knows it (a
    larger one than ``cfg.local_max_docs`` goes to Ray without looking at the data)."""
    from pipelines import near_dedup_local

    table = near_dedup_local.local_input(docs, cfg, num_docs)
    if table is not None:
        return near_dedup_local.LocalNearDedup(table, cfg, work_uri, storage_cfg).run()
    if isinstance(docs, pa.Table):
        docs = ray.data.from_arrow(docs)
    return NearDedup(docs, cfg, work_uri, storage_cfg).run()


def cluster_size_histogram(clusters: pa.Table) -> dict[str, int]:
    sizes = Counter(clusters.column("cluster_id").to_pylist())
    return {str(size): count for size, count in sorted(Counter(sizes.values()).items())}
