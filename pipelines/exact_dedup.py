"""Exact dedup: documents with identical (normalized) text; the smallest id survives.

Runs as a Ray groupby on a content hash, so no stage ever holds all hashes in one place.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import ray.data


def _add_content_hash(batch: pa.Table) -> pa.Table:
    hashes = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in batch.column("text").to_pylist()]
    return batch.append_column("content_hash", pa.array(hashes, pa.string()))


def _mark_group(group: pa.Table) -> pa.Table:
    """All rows share one content hash: keep the smallest id, mark the rest."""
    ids = group.column("id")
    keeper = pc.min(ids).as_py()
    is_dup = pc.not_equal(ids, pa.scalar(keeper))
    reason = pc.if_else(is_dup, pa.scalar("exact_duplicate"), pa.scalar(None, pa.string()))
    detail = pc.if_else(is_dup, pa.scalar(keeper), pa.scalar(None, pa.string()))
    return (group.drop_columns(["content_hash"])
            .append_column("drop_reason", reason)
            .append_column("drop_detail", detail))


def mark_exact_duplicates(docs: ray.data.Dataset) -> ray.data.Dataset:
    """Add ``drop_reason``/``drop_detail`` (the kept id) to every row; nothing is dropped here."""
    return (docs.map_batches(_add_content_hash, batch_format="pyarrow")
            .groupby("content_hash")
            .map_groups(_mark_group, batch_format="pyarrow"))
