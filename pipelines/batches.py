"""The pipeline's Ray Data batch functions: what runs on the Ray workers.

A worker imports the module of every function it runs. These import pyarrow and the small
contract, config and storage modules only, never the driver's (pipelines.run: Ray Data plans,
MLflow tracking, the stage store), so a worker starts without loading MLflow. Each function takes
one pyarrow batch (or group) and returns one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import StorageConfig
from infra.contracts import DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, REMOVED_SCHEMA
from infra.storage import Storage, join
from pipelines.filters import FilterReport
from pipelines.readers import ROW_COLUMNS

PARSED_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in ROW_COLUMNS])
MARK_COLUMNS = ("drop_reason", "drop_detail")
MARKED_SCHEMA = pa.schema([*DOCUMENT_SCHEMA, *(pa.field(c, pa.string()) for c in MARK_COLUMNS)])


def cast_parsed(batch: pa.Table) -> pa.Table:
    return pa.table({c: batch.column(c).cast(pa.string()) if c in batch.column_names
                     else pa.nulls(batch.num_rows, pa.string()) for c in ROW_COLUMNS}, schema=PARSED_SCHEMA)


def good_documents(batch: pa.Table) -> pa.Table:
    good = batch.filter(pc.is_null(batch.column("reason")))
    return good.select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA)


def quarantined(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch.column("reason")))
    return bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


def ensure_marks(batch: pa.Table) -> pa.Table:
    for col in MARK_COLUMNS:
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(batch.num_rows, pa.string()))
    return batch


def kept_rows(batch: pa.Table) -> pa.Table:
    """Rows no stage removed, without the mark columns (those present)."""
    kept = batch.filter(pc.is_null(batch.column("drop_reason")))
    return kept.drop_columns([c for c in MARK_COLUMNS if c in kept.column_names])


def removed_records(batch: pa.Table, stage: str) -> pa.Table:
    gone = batch.filter(pc.is_valid(batch.column("drop_reason")))
    return pa.table({
        "doc_id": gone.column("id"), "domain": gone.column("domain"),
        "stage": pa.array([stage] * gone.num_rows, pa.string()),
        "reason": gone.column("drop_reason"), "detail": gone.column("drop_detail"),
    }, schema=REMOVED_SCHEMA)


def mark_ids(batch: pa.Table, ids: pa.Array, reason: str, detail: dict[str, str]) -> pa.Table:
    hit = pc.is_in(batch.column("id"), value_set=ids)
    doc_ids = batch.column("id").to_pylist()
    reasons = pa.array([reason if h else None for h in hit.to_pylist()], pa.string())
    details = pa.array([detail.get(d) if h else None for d, h in zip(doc_ids, hit.to_pylist())], pa.string())
    return batch.append_column("drop_reason", reasons).append_column("drop_detail", details)


def mark_duplicate_ids(group: pa.Table) -> pa.Table:
    """Two records with one id cannot both be kept: the first by source wins, the rest are removed."""
    group = group.sort_by("source")
    first = group.column("source")[0].as_py()
    dup = [i > 0 for i in range(group.num_rows)]
    return group.append_column("drop_reason", pa.array(["duplicate_id" if d else None for d in dup], pa.string())) \
                .append_column("drop_detail", pa.array([first if d else None for d in dup], pa.string()))


def filter_report_json(batch: pa.Table, examples: int) -> str:
    """One block's filter counters as JSON (merged on the driver).

    The examples of a rule are the block's smallest ids (not its first rows), so that the merged
    report does not depend on how the documents were cut into blocks (a resumed run reads them
    back from Parquet in other blocks than the run that wrote them).
    """
    report = FilterReport.from_batch(batch, examples)
    smallest: dict[str, list[str]] = defaultdict(list)
    for r, i in zip(batch.column("drop_reason").to_pylist(), batch.column("id").to_pylist()):
        if r is not None and i is not None:
            smallest[r].append(i)
    report.examples = defaultdict(list, {r: sorted(v)[:examples] for r, v in smallest.items()})
    return report.to_json()


def to_ipc(table: pa.Table | None) -> bytes:
    if table is None:
        return b""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(blobs: list[bytes], schema: pa.Schema) -> pa.Table:
    tables = [pa.ipc.open_stream(b).read_all().cast(schema) for b in blobs if b]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def checkpoint_block(batch: pa.Table, folder: str, storage_cfg: StorageConfig | None, stage: str,
                     examples: int = 0, scores: tuple[str, ...] = ()) -> pa.Table:
    """Ray map_batches function: write one block of a stage's output rows to the stage checkpoint
    and return its summary -- one row: rows, per-domain kept counts, the removed (for ``read``:
    quarantined) records, and for the filter stage its report and annotate-mode scores.

    One streaming pass per stage: the statistics never need a second read of the data. The file
    is named by the block's content (its sources), so a retried task overwrites its own file.
    """
    if batch.num_rows:
        sources = pc.fill_null(batch.column("source"), "").to_pylist()
        name = hashlib.blake2b("\n".join(sources).encode(), digest_size=12).hexdigest()
        sink = pa.BufferOutputStream()
        pq.write_table(batch, sink, compression="zstd")
        Storage(storage_cfg).write_bytes(join(folder, f"part-{name}.parquet"), sink.getvalue().to_pybytes())
    if stage == "read":
        removed, kept = quarantined(batch), batch.filter(pc.is_null(batch.column("reason")))
    else:
        removed, kept = removed_records(batch, stage), batch.filter(pc.is_null(batch.column("drop_reason")))
    report = filter_report_json(batch, examples) if examples else ""
    score_table = None
    if scores:
        score_table = batch.select(["id", "domain", *scores]).rename_columns(["doc_id", "domain", *scores])
    counts = Counter(kept.column("domain").to_pylist())
    return pa.table({"rows": [batch.num_rows], "counts": [json.dumps(counts, sort_keys=True)],
                     "removed": [to_ipc(removed)], "report": [report], "scores": [to_ipc(score_table)]},
                    schema=pa.schema([("rows", pa.int64()), ("counts", pa.string()), ("removed", pa.binary()),
                                      ("report", pa.string()), ("scores", pa.binary())]))


def add_sample_key(batch: pa.Table) -> pa.Table:
    keys = [hashlib.blake2b(i.encode(), digest_size=8).hexdigest() for i in batch.column("id").to_pylist()]
    return batch.append_column("sample_key", pa.array(keys, pa.string()))
