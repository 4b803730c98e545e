"""Per-domain zstd Parquet shards with checksums: ``shards/<domain>/{part,validation}-NNNNN.parquet``.

Each domain's documents are sorted by id and split deterministically into train and validation
(by a hash of the id, so adding documents does not reshuffle the others). Every file is written
whole to memory then put atomically, and its sha256 goes into the manifest.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import ShardConfig, StorageConfig
from infra.contracts import SHARD_SCHEMA
from infra.storage import Storage, join
from pipelines.readers import domain_problem

SHARD_INFO_COLUMNS = ("domain", "path", "split", "rows", "tokens", "bytes", "text_bytes", "sha256")


def _split_key(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")


def split_validation(table: pa.Table, cfg: ShardConfig) -> tuple[pa.Table, pa.Table]:
    """(train, validation): validation = the documents with the smallest id hashes."""
    n = table.num_rows
    n_val = max(cfg.min_validation_docs, round(cfg.validation_fraction * n))
    n_val = min(n_val, n - 1) if n > 1 else 0  # always leave training data
    keys = pa.array([_split_key(d) for d in table.column("doc_id").to_pylist()], pa.uint64())
    order = pc.sort_indices(keys)
    val_idx, train_idx = order[:n_val], order[n_val:]
    by_id = lambda t: t.sort_by("doc_id")  # noqa: E731
    return by_id(table.take(train_idx)), by_id(table.take(val_idx))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_domain_shards(group: pa.Table, output_dir: str, cfg: ShardConfig,
                        storage_cfg: StorageConfig | None) -> pa.Table:
    """Ray map_groups function: one domain's tokenized docs -> one row of ShardInfo per file."""
    storage = Storage(storage_cfg)
    domain = group.column("domain")[0].as_py()
    # The reader quarantines such domains (invalid_domain); this is the last line before a path is
    # built from one: "shards/../../x" must never be written outside output_dir.
    problem = domain_problem(domain)
    if problem:
        raise ValueError(f"refusing to write shards: {problem}")
    docs = group.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    train, validation = split_validation(docs, cfg)
    infos = []
    for split, table, prefix in (("train", train, "part"), ("validation", validation, "validation")):
        for index, start in enumerate(range(0, table.num_rows, cfg.max_rows)):
            chunk = table.slice(start, cfg.max_rows)
            data = _parquet_bytes(chunk)
            rel = f"shards/{domain}/{prefix}-{index:05d}.parquet"
            storage.write_bytes(join(output_dir, rel), data)
            infos.append({
                "domain": domain, "path": rel, "split": split, "rows": chunk.num_rows,
                "tokens": int(pc.sum(chunk.column("n_tokens")).as_py() or 0),
                "bytes": len(data),
                "text_bytes": int(pc.sum(chunk.column("n_bytes")).as_py() or 0),
                "sha256": hashlib.sha256(data).hexdigest(),
            })
    return pa.Table.from_pylist(infos)
