"""Near-duplicate removal with MinHash LSH (thin path: datasketch signatures, driver-side LSH).

Signatures are computed in parallel with Ray; banding and clustering run on the driver with
datasketch's MinHashLSH and a union-find. The distributed LSH replaces the driver part later
(issue 5); the contract stays: ``dedup/clusters.parquet`` with doc_id, cluster_id, kept,
kept_doc_id, and the kept document of a cluster is chosen deterministically (smallest id).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa
import ray.data
from datasketch import MinHash, MinHashLSH

from infra.config import NearDedupConfig
from infra.contracts import CLUSTERS_SCHEMA

SCHEME = "affine32"  # datasketch 2.x default; stored with signatures so they can be rebuilt
_NON_WORD = re.compile(r"[^\w\s]+")


def shingles(text: str, n: int) -> set[bytes]:
    """Normalized word n-grams: lowercase, punctuation removed, whitespace collapsed."""
    words = _NON_WORD.sub(" ", text.lower()).split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def signature_batch(batch: pa.Table, cfg: NearDedupConfig) -> pa.Table:
    sigs = []
    for text in batch.column("text").to_pylist():
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
        m.update_batch(list(shingles(text, cfg.ngram)))
        sigs.append(m.hashvalues.astype(np.uint32))
    return pa.table({"id": batch.column("id"),
                     "signature": pa.array(sigs, pa.list_(pa.uint32()))})


class UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller id becomes the root, so a cluster's root is its kept document.
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def find_clusters(docs: ray.data.Dataset, cfg: NearDedupConfig) -> pa.Table:
    """Clusters of near-duplicates (size >= 2) as a CLUSTERS_SCHEMA table."""
    sigs = docs.map_batches(signature_batch, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    uf = UnionFind()
    for batch in sigs.iter_batches(batch_format="pyarrow", batch_size=4096):
        ids = batch.column("id").to_pylist()
        values = batch.column("signature").to_numpy(zero_copy_only=False)
        for doc_id, hv in zip(ids, values):
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashvalues=hv, scheme=SCHEME)
            for other in lsh.query(m):
                uf.union(doc_id, other)
            lsh.insert(doc_id, m)
    members: dict[str, list[str]] = {}
    for doc_id in list(uf.parent):
        members.setdefault(uf.find(doc_id), []).append(doc_id)
    rows = [(d, root, d == root, root) for root, ids in members.items() if len(ids) > 1 for d in sorted(ids)]
    rows.sort()
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table({name: pa.array(list(col), CLUSTERS_SCHEMA.field(name).type)
                     for name, col in zip(CLUSTERS_SCHEMA.names, cols)}, schema=CLUSTERS_SCHEMA)


def cluster_size_histogram(clusters: pa.Table) -> dict[str, int]:
    sizes = Counter(clusters.column("cluster_id").to_pylist())
    return {str(size): count for size, count in sorted(Counter(sizes.values()).items())}
