"""MinHash LSH as table operations: signatures -> band rows -> buckets -> star edges.

Nothing here holds more than one batch of documents or one partition of the band table:
``band_rows`` maps a batch of signatures to rows (band, key, node), and ``bucket_edges`` turns
one partition of those rows (every row of a bucket lands in the same partition) into edges.

A document is a *node*: a string whose order is the survivor order, so "the best member" of any
group is simply its smallest node, with no lookup of quality scores:

    node = <"0" indexed | "1" new> <16 hex: -quality, order-preserving> <doc id>

Indexed documents (from a persistent index) sort first (old always wins), then higher quality,
then the smaller id.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INDEXED, NEW = "0", "1"
RANK_CHARS = 17  # prefix + 16 hex digits before the doc id
BAND_SCHEMA = pa.schema([("band", pa.int16()), ("key", pa.uint64()), ("node", pa.string())])
_WORD = re.compile(r"\w")


def band_schema(num_perm: int, with_signature: bool) -> pa.Schema:
    return BAND_SCHEMA.append(pa.field("signature", pa.list_(pa.uint64(), num_perm))) if with_signature else BAND_SCHEMA

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that spreads every input bit (wraps on purpose)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def signature_matrix(column: pa.Array | pa.ChunkedArray, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """A list column of uint32 or uint64 hashes as an (n, num_perm) uint64 matrix, plus a mask of
    the rows without shingles (all values at the dtype's maximum): those are never bucketed."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.uint64()))
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.dtype.kind != "u":
        raise TypeError(f"signature values must be unsigned integers, got {values.dtype}")
    values = values.reshape(-1, num_perm)
    empty = (values == np.iinfo(values.dtype).max).all(axis=1)
    return values.astype(np.uint64), empty


def has_words(text: str) -> bool:
    """A text without any word character has no shingles (the signature of nothing)."""
    return _WORD.search(text) is not None


def node_keys(ids: list[str], quality: np.ndarray | None, prefix: str) -> list[str]:
    if quality is None:
        quality = np.zeros(len(ids))
    # -quality so that higher quality sorts first; a missing score (NaN) sorts last; +0.0 folds -0.0.
    x = -np.nan_to_num(np.asarray(quality, dtype=np.float64), nan=-np.inf) + 0.0
    bits = x.view(np.uint64)
    negative = (bits >> np.uint64(63)) == 1
    ordered = np.where(negative, ~bits, bits | np.uint64(1 << 63))
    return [f"{prefix}{o:016x}{i}" for o, i in zip(ordered.tolist(), ids)]


def doc_id(node: str) -> str:
    return node[RANK_CHARS:]


def doc_ids(nodes: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pc.utf8_slice_codeunits(nodes, RANK_CHARS)  # the prefix is ASCII: code units = characters


def is_new(node: str) -> bool:
    return node[0] == NEW


def domain_salts(domains: list[str] | None, n: int) -> np.ndarray:
    """Per-domain scope folds the domain into every bucket key; global scope uses no salt."""
    if domains is None:
        return np.zeros(n, dtype=np.uint64)
    cache = {d: int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little") for d in set(domains)}
    return np.array([cache[d] for d in domains], dtype=np.uint64)


def band_keys(sig: np.ndarray, bands: int, rows: int, salt: np.ndarray) -> np.ndarray:
    """(n, bands) 64-bit keys: a hash of each band's ``rows`` values (and the salt)."""
    n = sig.shape[0]
    values = sig[:, : bands * rows].reshape(n, bands, rows)
    h = np.repeat(salt[:, None], bands, axis=1) ^ _GOLDEN
    for j in range(rows):
        h = _mix64(h ^ _mix64(values[:, :, j] + np.uint64(j + 1)))
    return h


def partition_of(band: np.ndarray, key: np.ndarray, partitions: int) -> np.ndarray:
    """Which band-table partition holds a bucket (band and key together, so bands spread out)."""
    return (_mix64(key ^ (band.astype(np.uint64) * _GOLDEN)) % np.uint64(partitions)).astype(np.int64)


def band_rows(nodes: list[str], sig: np.ndarray, bands: int, rows: int, salt: np.ndarray,
              with_signature: bool) -> pa.Table:
    """One row per (document, band): band, key, node (and the signature, to verify pairs later)."""
    n = len(nodes)
    keys = band_keys(sig, bands, rows, salt).reshape(-1)
    band = np.tile(np.arange(bands, dtype=np.int16), n)
    doc_index = np.repeat(np.arange(n), bands)
    columns = {"band": pa.array(band), "key": pa.array(keys),
               "node": pa.array(nodes, pa.string()).take(pa.array(doc_index))}
    if with_signature:
        flat = pa.array(sig.reshape(-1))
        columns["signature"] = pa.FixedSizeListArray.from_arrays(flat, sig.shape[1]).take(pa.array(doc_index))
    return pa.table(columns)


def _distinct_sorted(rows: pa.Table) -> pa.Table:
    """Sort by bucket then node, dropping repeated (band, key, node) rows: a re-run of a killed
    signature phase may have written a document's rows twice, under another batch's file."""
    rows = rows.sort_by([("band", "ascending"), ("key", "ascending"), ("node", "ascending")])
    if rows.num_rows < 2:
        return rows
    band, key = rows.column("band").to_numpy(), rows.column("key").to_numpy()
    node = rows.column("node")
    same = ((band[1:] == band[:-1]) & (key[1:] == key[:-1])
            & pc.equal(node.slice(1), node.slice(0, rows.num_rows - 1)).to_numpy(zero_copy_only=False))
    return rows.filter(pa.array(np.concatenate([[True], ~same])))


def bucket_edges(rows: pa.Table, max_bucket_size: int, verify_threshold: float | None,
                 num_perm: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """Star edges (member -> the bucket's best member) of one band-table partition.

    Only buckets holding a new document give edges, and only new members get one: indexed
    documents were deduplicated when they were indexed. A bucket larger than ``max_bucket_size``
    links only its best ``max_bucket_size`` members and is returned in the giant-bucket list.
    With ``verify_threshold`` an edge survives only if the two signatures agree on at least
    that fraction of their values (a signature Jaccard estimate, drops LSH false positives).
    """
    rows = _distinct_sorted(rows)
    n = rows.num_rows
    if n < 2:
        return [], []
    band, key = rows.column("band").to_numpy(), rows.column("key").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (key[1:] != key[:-1])]))
    sizes = np.diff(np.append(starts, n))
    shared = np.repeat(sizes >= 2, sizes)
    rows, sizes = rows.filter(pa.array(shared)), sizes[sizes >= 2]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    band, key = rows.column("band").to_numpy(), rows.column("key").to_numpy()
    nodes = rows.column("node").to_pylist()
    sig = signature_matrix(rows.column("signature"), num_perm)[0] if verify_threshold is not None else None
    edges, giants = [], []
    for start, size in zip(starts.tolist(), sizes.tolist()):
        if not any(is_new(nodes[i]) for i in range(start, start + size)):
            continue
        if size > max_bucket_size:
            giants.append({"band": int(band[start]), "key": f"{int(key[start]):016x}", "size": size})
        members = range(start, start + min(size, max_bucket_size))
        center = start
        for i in members[1:]:
            if not is_new(nodes[i]):
                continue
            if sig is not None and np.mean(sig[i] == sig[center]) < verify_threshold:
                continue
            edges.append((nodes[i], nodes[center]))
    return edges, giants


class UnionFind:
    """Union-find over string keys; the smaller key becomes the root (so a root is its set's best node)."""

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
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo
