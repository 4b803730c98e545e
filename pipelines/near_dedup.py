"""Near-duplicate removal: MinHash signatures -> distributed LSH -> connected components.

The contract: ``find_clusters`` returns the clusters (size >= 2) as a CLUSTERS_SCHEMA table
(doc_id, cluster_id, kept, kept_doc_id; cluster_id is the kept document's id) and a quality
report. The kept document of a cluster is the best by ``quality`` (an optional float column,
higher is better), then the smallest id; with a persistent index, indexed documents always win.

Phases, each leaving files under the work dir, so that a killed run restarts where it stopped:

  bands       Ray Data map over the documents: signatures (pipelines.minhash), then one row per
              (document, band) -- band, 64-bit bucket key, node -- written to the bucket's
              partition: ``bands/part-<p>/<batch hash>.parquet``. ``bands/_DONE.json`` ends it;
              an unfinished phase is redone from its start (input blocks differ between runs).
  edges       one Ray task per bucket partition: its band rows (and the index's rows of that
              partition) -> buckets -> star edges -> local union-find -> the reduced edges,
              scattered to the node partitions of the next phase. ``edges/done-<p>.json``.
  components  distributed min-label propagation (pipelines.components); ``cc/state.json``.
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
from pipelines import lsh, minhash
from pipelines.components import connected_components, write_graph
from pipelines.dedup_index import BandIndex, index_params
from pipelines.lsh import UnionFind
from pipelines.lsh_params import approx_threshold
from pipelines.workdir import WorkDir, split_rows

_BATCH_SIZE = 4096  # documents per signature batch (one band file per partition per batch)
_REPORTED_GIANTS = 10


# Shingling and signatures live in pipelines/minhash.py (fast numba kernel or bit-exact datasketch
# mode, cfg.hash_mode): signature is fixed_size_list<uint64>[num_perm]; rows equal to minhash.EMPTY
# (documents without words) must be skipped by the LSH (minhash.is_empty).
shingles = minhash.shingles
signature_batch = minhash.signature_batch


# --------------------------------------------------------------------------- Ray functions


def _write_band_batch(batch: pa.Table, cfg: NearDedupConfig, work: WorkDir, partitions: int,
                      quality: str | None) -> pa.Table:
    """Signatures -> band rows, written per bucket partition; returns per-domain document counts."""
    texts, ids = batch.column("text").to_pylist(), batch.column("id").to_pylist()
    domains = batch.column("domain").to_pylist()
    sig, empty = lsh.signature_matrix(minhash.signature_batch(batch, cfg).column("signature"), cfg.num_perm)
    keep = ~empty & np.array([lsh.has_words(t) for t in texts], dtype=bool)
    idx = np.flatnonzero(keep)
    q = batch.column(quality).to_numpy(zero_copy_only=False).astype(np.float64)[idx] if quality else None
    nodes = lsh.node_keys([ids[i] for i in idx], q, lsh.NEW)
    salt = lsh.domain_salts([domains[i] for i in idx] if cfg.scope == "per_domain" else None, len(idx))
    rows = lsh.band_rows(nodes, sig[idx], cfg.bands, cfg.rows, salt, with_signature=cfg.verify)
    parts = lsh.partition_of(rows.column("band").to_numpy(), rows.column("key").to_numpy(), partitions)
    # Named by content: a retried or re-run batch overwrites its own files with the same rows.
    name = hashlib.blake2b("\n".join(ids).encode(), digest_size=12).hexdigest()
    for p, part in split_rows(rows, parts).items():
        work.write_table(part, "bands", f"part-{p:05d}", f"{name}.parquet")
    counts = Counter(domains)
    skipped = Counter(d for d, k in zip(domains, keep) if not k)
    names = sorted(counts)
    return pa.table({"domain": names, "docs": [counts[d] for d in names], "no_shingles": [skipped[d] for d in names]})


def _fingerprint_batch(batch: pa.Table, quality: str | None) -> pa.Table:
    lengths = pc.utf8_length(batch.column("text")).to_pylist()
    qualities = batch.column(quality).to_pylist() if quality else [None] * batch.num_rows
    total = 0
    for i, d, n, q in zip(batch.column("id").to_pylist(), batch.column("domain").to_pylist(), lengths, qualities):
        total += int.from_bytes(hashlib.blake2b(f"{i}\0{d}\0{n}\0{q}".encode(), digest_size=8).digest(), "little")
    return pa.table({"docs": [batch.num_rows], "hash": [str(total % 2**64)]})


@ray.remote
def _edges_task(work: WorkDir, cc: WorkDir, p: int, index_files: list[str], cfg: NearDedupConfig,
                partitions: int, threshold: float) -> None:
    schema = lsh.band_schema(cfg.num_perm, cfg.verify)
    rows = work.read_files(work.files("bands", f"part-{p:05d}") + index_files, schema)
    edges, giants = lsh.bucket_edges(rows, cfg.max_bucket_size, threshold if cfg.verify else None, cfg.num_perm)
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    # A star per local component: the edge set shrinks before it crosses partitions.
    reduced = [(n, uf.find(n)) for n in sorted(uf.parent) if uf.find(n) != n]
    write_graph(cc, reduced, p, partitions)
    work.write_json({"edges": len(edges), "giants": giants}, "edges", f"done-{p:05d}.json")


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
        self.quality = "quality" if "quality" in docs.schema().names else None
        self.index = BandIndex(cfg.index_uri, storage_cfg) if cfg.index_uri else None
        self.index_meta = None
        if self.index and (self.index.exists() or not cfg.update_index):
            self.index_meta = self.index.checked_meta(cfg)
        self.partitions = self.index_meta["partitions"] if self.index_meta else cfg.partitions
        self.tag = self._open_work_dir()

    def _open_work_dir(self) -> str:
        """The run's tag (its input and parameters); work of another input or config is wiped."""
        fp = self.docs.map_batches(_fingerprint_batch, batch_format="pyarrow",
                                   fn_kwargs={"quality": self.quality}).take_all()
        input_fp = [sum(r["docs"] for r in fp), sum(int(r["hash"]) for r in fp) % 2**64]
        run = {"input": input_fp, "params": index_params(self.cfg), "partitions": self.partitions,
               "max_bucket_size": self.cfg.max_bucket_size, "quality": self.quality,
               "threshold": similarity_threshold(self.cfg)}
        tag = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
        indexed = [r["tag"] for r in self.index_meta["runs"] if r["tag"] != tag] if self.index_meta else []
        identity = {"tag": tag, "index": self.cfg.index_uri, "index_runs": indexed}
        if not self.work.exists("work.json") or self.work.read_json("work.json") != identity:
            self.work.delete()
            self.work.write_json(identity, "work.json")
        return tag

    # ------------------------------------------------------------------ phases

    def bands(self) -> dict:
        if self.work.exists("bands", "_DONE.json"):
            return self.work.read_json("bands", "_DONE.json")
        self.work.delete("bands")
        counts = self.docs.map_batches(
            _write_band_batch, batch_format="pyarrow", batch_size=_BATCH_SIZE,
            fn_kwargs={"cfg": self.cfg, "work": self.work, "partitions": self.partitions, "quality": self.quality},
        ).take_all()
        docs, no_shingles = Counter(), Counter()
        for r in counts:
            docs[r["domain"]] += r["docs"]
            no_shingles[r["domain"]] += r["no_shingles"]
        summary = {"docs": dict(sorted(docs.items())), "no_shingles": dict(sorted(no_shingles.items()))}
        self.work.write_json(summary, "bands", "_DONE.json")
        return summary

    def edges(self) -> dict:
        pending = [p for p in range(self.partitions) if not self.work.exists("edges", f"done-{p:05d}.json")]
        ray.get([_edges_task.remote(
            self.work, self.cc, p, self.index.partition_files(self.index_meta, p, self.tag) if self.index_meta else [],
            self.cfg, self.partitions, similarity_threshold(self.cfg)) for p in pending])
        done = [self.work.read_json("edges", f"done-{p:05d}.json") for p in range(self.partitions)]
        giants = sorted((g for d in done for g in d["giants"]), key=lambda g: (-g["size"], g["band"], g["key"]))
        return {"candidate_edges": sum(d["edges"] for d in done), "giant_buckets": len(giants),
                "largest_giant_buckets": giants[:_REPORTED_GIANTS]}

    def components(self) -> tuple[pa.Table, int]:
        labels, rounds = connected_components(self.cc, self.partitions)
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
