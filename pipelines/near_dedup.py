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


def _write_band_batch(batch: pa.Table, cfg: NearDedupConfig, work: WorkDir, partitions: int) -> pa.Table:
    """Signatures -> band rows, written per bucket partition; returns per-domain document counts
    and the input fingerprint (``_per_domain``) of the batch: one pass over the input does both.

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
    # Named by content: a retried or re-run batch overwrites its own files with the same rows.
    name = hashlib.blake2b("\n".join(batch.column("id").to_pylist()).encode(), digest_size=12).hexdigest()
    for p, part in parts.items():
        work.write_table(part, "bands", f"part-{p:05d}", f"{name}.parquet")
    return _per_domain(batch, keep)


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


@ray.remote
def _edges_task(work: WorkDir, cc: WorkDir, p: int, index_files: list[str], cfg: NearDedupConfig,
                partitions: int, threshold: float) -> None:
    schema = lsh.band_schema(cfg.num_perm, cfg.verify)
    rows = work.read_files(work.files("bands", f"part-{p:05d}") + index_files, schema)
    edges, giants = lsh.bucket_edges(rows, cfg.max_bucket_size, threshold if cfg.verify else None, cfg.num_perm)
    # A star per local component: the edge set shrinks before it crosses partitions.
    nodes, roots = lsh.min_components([a for a, _ in edges], [b for _, b in edges])
    star = pc.not_equal(nodes, roots)
    nodes, roots = nodes.filter(star), roots.filter(star)
    write_graph_arrays(cc, nodes, roots, p, partitions)
    work.write_json({"edges": len(edges), "reduced": len(nodes), "giants": giants}, "edges", f"done-{p:05d}.json")


@ray.remote
def _index_task(work: WorkDir, index: WorkDir, p: int, tag: str, removed: pa.Array, schema: pa.Schema) -> int:
    rows = work.read_files(work.files("bands", f"part-{p:05d}"), schema)
    rows = rows.filter(pc.invert(pc.is_in(rows.column("node"), value_set=removed)))
    if rows.num_rows == 0:
        return 0
    as_indexed = pc.binary_join_element_wise(lsh.INDEXED, pc.utf8_slice_codeunits(rows.column("node"), 1), "")
    rows = rows.set_column(rows.schema.get_field_index("node"), "node", as_indexed)
    index.write_table(rows.sort_by([("band", "ascending"), ("key", "ascending"), ("node", "ascending")]),
                      "bands", f"part-{p:05d}", f"{tag}.parquet")
    return rows.num_rows


def _removed_and_sampled(batch: pa.Table, removed: pa.Array, wanted: pa.Array) -> pa.Table:
    """Rows of removed or sampled documents: id, domain, and the text of the sampled ones only."""
    ids = batch.column("id")
    hit = batch.filter(pc.or_(pc.is_in(ids, value_set=removed), pc.is_in(ids, value_set=wanted)))
    text = pc.if_else(pc.is_in(hit.column("id"), value_set=wanted), hit.column("text"), pa.scalar(None, pa.string()))
    return pa.table({"id": hit.column("id"), "domain": hit.column("domain"), "text": text})


# --------------------------------------------------------------------------- the run


@dataclass
class NearDedupResult:
    clusters: pa.Table  # CLUSTERS_SCHEMA
    report: dict


def similarity_threshold(cfg: NearDedupConfig) -> float:
    """The configured threshold, else the LSH curve's midpoint (1/b)^(1/r)."""
    return cfg.threshold if cfg.threshold is not None else approx_threshold(cfg.bands, cfg.rows)


class NearDedup:
    """One near-dedup run over ``docs`` with its work dir; ``run`` does every phase that is not done yet."""

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
        giants = sorted((g for d in done for g in d["giants"]), key=lambda g: (-g["size"], g["band"], g["key"]))
        self._graph_rows = 2 * sum(d.get("reduced", 0) for d in done) if all("reduced" in d for d in done) else None
        return {"candidate_edges": sum(d["edges"] for d in done), "giant_buckets": len(giants),
                "largest_giant_buckets": giants[:_REPORTED_GIANTS]}

    def components(self) -> tuple[pa.Table, int]:
        labels, rounds = connected_components(self.cc, self.partitions, getattr(self, "_graph_rows", None),
                                              self.local_components_max_rows)
        return labels.sort_by("node"), rounds

    def update_index(self, labels: pa.Table, summary: dict) -> None:
        meta = self.index.meta() if self.index.exists() else None
        if meta and any(r["tag"] == self.tag for r in meta["runs"]):
            return  # appended before this run was resumed
        removed = labels.filter(pc.not_equal(labels.column("node"), labels.column("label"))).column("node")
        removed_ref = ray.put(removed.combine_chunks())
        schema = lsh.band_schema(self.cfg.num_perm, self.cfg.verify)
        written = ray.get([_index_task.remote(self.work, self.index.files, p, self.tag, removed_ref, schema)
                           for p in range(self.partitions)])
        documents = sum(summary["docs"].values()) - sum(summary["no_shingles"].values()) - len(removed)
        self.index.commit(meta, self.cfg, self.partitions, {
            "tag": self.tag, "documents": documents, "rows": sum(written),
            "partitions": [p for p, n in enumerate(written) if n]})

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
        found = self.docs.map_batches(_removed_and_sampled, batch_format="pyarrow", fn_kwargs={
            "removed": removed.column("doc_id").combine_chunks(), "wanted": wanted})
        removed_ids, removed_by_domain, texts = set(removed.column("doc_id").to_pylist()), Counter(), {}
        for batch in found.iter_batches(batch_format="pyarrow", batch_size=65536):
            for i, d, t in zip(*(batch.column(c).to_pylist() for c in ("id", "domain", "text"))):
                removed_by_domain[d] += i in removed_ids
                if t is not None:
                    texts[i] = t
        threshold = similarity_threshold(self.cfg)
        sims = [_jaccard(minhash.shingles(texts[r], self.cfg.ngram), minhash.shingles(texts[k], self.cfg.ngram))
                for r, k in pairs]
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

    def run(self) -> NearDedupResult:
        summary = self.bands()
        edges = self.edges()
        labels, rounds = self.components()
        if self.index and self.cfg.update_index:
            self.update_index(labels, summary)
        clusters, matched_index = self.clusters(labels)
        return NearDedupResult(clusters, self.report(clusters, summary, edges, rounds, matched_index))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def find_clusters(docs: ray.data.Dataset, cfg: NearDedupConfig, work_uri: str,
                  storage_cfg: StorageConfig | None = None) -> NearDedupResult:
    """Clusters of near-duplicates (size >= 2) and the run's quality report; see the module docstring."""
    return NearDedup(docs, cfg, work_uri, storage_cfg).run()


def cluster_size_histogram(clusters: pa.Table) -> dict[str, int]:
    sizes = Counter(clusters.column("cluster_id").to_pylist())
    return {str(size): count for size, count in sorted(Counter(sizes.values()).items())}
