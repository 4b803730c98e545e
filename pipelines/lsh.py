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

import numba
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


def node_keys_array(ids: pa.Array, quality: np.ndarray | None, prefix: str) -> pa.Array:
    """``node_keys`` as an Arrow string array, without a Python string per document: the rank
    prefix is formatted once per distinct quality value, then joined to the ids by Arrow."""
    q = np.zeros(1) if quality is None else np.asarray(quality, dtype=np.float64)
    bits = np.where(np.isnan(q), np.nan, q + 0.0).view(np.uint64)  # one NaN, one zero: distinct keys
    distinct, inverse = np.unique(bits, return_inverse=True)
    distinct = distinct.view(np.float64)
    prefixes = pa.array([k[:RANK_CHARS] for k in node_keys([""] * len(distinct), distinct, prefix)], pa.string())
    heads = prefixes.take(pa.array(np.zeros(len(ids), np.int64) if quality is None else inverse.reshape(-1)))
    return pc.binary_join_element_wise(heads, ids.cast(pa.string()), "")


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


@numba.njit(cache=True, nogil=True, inline="always")
def _mix64_scalar(x):
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _band_cells(sig, bands, rows, salt, partitions):
    """band_keys + partition_of for every (document, band) cell in one compiled loop, then a
    stable counting sort of the cells by partition: (band, key, document, partition) in that order."""
    n = sig.shape[0]
    cells = n * bands
    keys = np.empty(cells, np.uint64)
    parts = np.empty(cells, np.int64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    for d in range(n):
        for b in range(bands):
            h = salt[d] ^ golden
            for j in range(rows):
                h = _mix64_scalar(h ^ _mix64_scalar(sig[d, b * rows + j] + np.uint64(j + 1)))
            keys[d * bands + b] = h
            parts[d * bands + b] = np.int64(_mix64_scalar(h ^ (np.uint64(b) * golden)) % np.uint64(partitions))
    starts = np.zeros(partitions + 1, np.int64)
    for c in range(cells):
        starts[parts[c] + 1] += 1
    for p in range(partitions):
        starts[p + 1] += starts[p]
    fill = starts[:-1].copy()
    out_band = np.empty(cells, np.int16)
    out_key = np.empty(cells, np.uint64)
    out_doc = np.empty(cells, np.int64)
    out_part = np.empty(cells, np.int64)
    for c in range(cells):
        p = parts[c]
        i = fill[p]
        fill[p] += 1
        out_band[i] = c % bands
        out_key[i] = keys[c]
        out_doc[i] = c // bands
        out_part[i] = p
    return out_band, out_key, out_doc, out_part


@numba.njit(cache=True, nogil=True)
def _row_hashes(id_buf, id_off, dom_buf, dom_off, lengths, qbits, qvalid):
    n = lengths.size
    out = np.empty(n, np.uint64)
    prime = np.uint64(0x100000001B3)
    for i in range(n):
        h = np.uint64(0xCBF29CE484222325)
        for j in range(id_off[i], id_off[i + 1]):
            h = (h ^ np.uint64(id_buf[j])) * prime
        h = (h ^ np.uint64(0xFF)) * prime  # a separator no UTF-8 string contains
        for j in range(dom_off[i], dom_off[i + 1]):
            h = (h ^ np.uint64(dom_buf[j])) * prime
        h = _mix64_scalar(h ^ np.uint64(lengths[i]))
        h = _mix64_scalar(h ^ qbits[i])
        out[i] = _mix64_scalar(h + np.uint64(qvalid[i]))
    return out


def _utf8_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    column = column.cast(pa.large_string())
    _, offsets, data = column.buffers()
    off = np.frombuffer(offsets, np.int64, count=len(column) + 1, offset=column.offset * 8)
    return (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)), off


def row_fingerprints(ids: pa.Array, domains: pa.Array, texts: pa.Array, quality: pa.Array | None) -> np.ndarray:
    """A 64-bit hash per document of (id, domain, text length in characters, quality or none),
    compiled over the Arrow buffers: the near-dedup run's input identity is the sum of these
    (mod 2^64), independent of how the input is split into blocks. Replaces a blake2b per
    document in Python (measured: 65,536 short documents, 120 ms -> ~5 ms CPU)."""
    id_buf, id_off = _utf8_buffers(ids)
    dom_buf, dom_off = _utf8_buffers(domains)
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    if quality is None:
        qbits, qvalid = np.zeros(len(lengths), np.uint64), np.zeros(len(lengths), np.uint8)
    else:
        qvalid = pc.is_valid(quality).to_numpy(zero_copy_only=False).astype(np.uint8)
        q = pc.fill_null(quality.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        qbits = np.where(np.isnan(q), np.nan, q + 0.0).view(np.uint64).copy()
    return _row_hashes(id_buf, id_off, dom_buf, dom_off, lengths, qbits, qvalid)


def partitioned_band_rows(nodes: pa.Array, sig: np.ndarray, bands: int, rows: int, salt: np.ndarray,
                          partitions: int, with_signature: bool) -> dict[int, pa.Table]:
    """``band_rows`` already split by ``partition_of``: {partition: rows}, rows in document order
    within a partition. Keys, partitions and the grouping in one compiled pass (``_band_cells``,
    the same values as band_keys/partition_of) and a single ``take`` of the node strings, instead
    of numpy passes, a whole table and a reordering ``take`` (measured on 65,536 short documents:
    band_rows + partition_of + split_rows 0.58 s CPU -> 0.17 s with a numpy argsort -> 0.055 s)."""
    n = len(nodes)
    sig = np.ascontiguousarray(sig, dtype=np.uint64)
    band, keys, doc_index, parts = _band_cells(sig, bands, rows, np.ascontiguousarray(salt, dtype=np.uint64),
                                               partitions)
    columns = {"band": pa.array(band), "key": pa.array(keys), "node": nodes.take(pa.array(doc_index))}
    if with_signature:
        flat = pa.array(sig.reshape(-1))
        columns["signature"] = pa.FixedSizeListArray.from_arrays(flat, sig.shape[1]).take(pa.array(doc_index))
    table = pa.table(columns)
    if n == 0:
        return {}
    bounds = np.flatnonzero(np.diff(parts)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(parts)]])
    return {int(parts[s]): table.slice(s, e - s) for s, e in zip(starts, ends)}


@numba.njit(cache=True, nogil=True)
def _min_roots(a, b, n):
    """Union-find over 0..n-1 where the smaller root always wins: every root is its set's minimum."""
    parent = np.arange(n)
    for i in range(a.size):
        x = a[i]
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        y = b[i]
        while parent[y] != y:
            parent[y] = parent[parent[y]]
            y = parent[y]
        if x < y:
            parent[y] = x
        elif y < x:
            parent[x] = y
    for x in range(n):  # increasing order: a parent is smaller, so it is already final
        parent[x] = parent[parent[x]]
    return parent


def min_components(a: pa.Array, b: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Connected components of the edges (a[i], b[i]) (node strings): (node, root) for every node,
    root = the component's smallest node. Nodes are numbered in sorted order (Arrow sorts strings
    by UTF-8 bytes, which is code point order, as Python compares them), then a compiled
    union-find; replaces a Python dict union-find per edge."""
    a, b = pa.array(a, pa.string()) if not isinstance(a, pa.Array) else a, \
        pa.array(b, pa.string()) if not isinstance(b, pa.Array) else b
    if len(a) == 0:
        return pa.array([], pa.string()), pa.array([], pa.string())
    nodes = pc.unique(pa.concat_arrays([a.cast(pa.string()), b.cast(pa.string())]))
    nodes = nodes.take(pc.sort_indices(nodes))
    ia = pc.index_in(a, value_set=nodes).to_numpy().astype(np.int64)
    ib = pc.index_in(b, value_set=nodes).to_numpy().astype(np.int64)
    roots = _min_roots(ia, ib, len(nodes))
    return nodes, nodes.take(pa.array(roots))


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
    if rows.num_rows < 2:
        return [], []
    # Only rows of buckets with >= 2 rows can give edges: find them with a numeric sort of
    # (band, key) first, and sort just those by node (the string sort of the whole partition was
    # most of this function's time: 875k rows, 0.35 s -> see bench/near_dedup.py, edges phase).
    band, key = rows.column("band").to_numpy(), rows.column("key").to_numpy()
    order = np.lexsort((key, band))
    band, key = band[order], key[order]
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (key[1:] != key[:-1])]))
    sizes = np.diff(np.append(starts, rows.num_rows))
    rows = rows.take(pa.array(order[np.repeat(sizes >= 2, sizes)]))
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
