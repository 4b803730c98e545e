"""Read raw corpora (JSONL plain/.gz/.zst, Parquet; local or s3://) into Document rows.

Parsing happens inside Ray tasks, one input file per task. A record that cannot become a
Document (not JSON, invalid UTF-8, no text, wrong types) does not stop the job: it becomes a row
with a ``reason`` and its truncated ``raw`` text, and the pipeline writes it to quarantine.
Every row, good or bad, has the same columns, so one Dataset carries both until they are split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from typing import Any, Iterator

import pyarrow.parquet as pq
import zstandard
from zstandard import ZstdError as _ZstdError

from infra.config import InputSpec, StorageConfig
from infra.contracts import QUARANTINE_RAW_CHARS
from infra.storage import Storage

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)

# Columns of a parsed row: the Document fields plus the quarantine verdict.
ROW_COLUMNS = ("id", "domain", "text", "source", "meta", "reason", "raw")


def list_input_files(spec: InputSpec, storage: Storage) -> list[str]:
    suffixes = {"jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}.get(spec.format, JSONL_SUFFIXES + PARQUET_SUFFIXES)
    try:
        files = storage.list_files(spec.path, suffixes)
    except FileNotFoundError:
        raise FileNotFoundError(f"input {spec.path!r} does not exist") from None
    return files


def stable_id(source: str) -> str:
    """An id that depends only on where the record came from, so re-runs give the same ids."""
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def _bad(source: str, reason: str, raw: Any) -> dict:
    if isinstance(raw, bytes):
        raw = raw[: QUARANTINE_RAW_CHARS * 4].decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = repr(raw)
    return {"id": None, "domain": None, "text": None, "source": source, "meta": None,
            "reason": reason, "raw": raw[:QUARANTINE_RAW_CHARS]}


def record_to_row(record: Any, source: str, spec: InputSpec) -> dict:
    """Turn one decoded record into a Document row, or a quarantine row saying why not."""
    if not isinstance(record, dict):
        return _bad(source, "not_an_object", json.dumps(record, default=str))
    text = record.get(spec.text_field)
    if text is None:
        return _bad(source, "missing_text", json.dumps(record, default=str))
    if not isinstance(text, str):
        return _bad(source, "text_not_string", json.dumps(record, default=str))
    if not text.strip():
        return _bad(source, "empty_text", json.dumps(record, default=str))
    if "\x00" in text:
        return _bad(source, "nul_byte", text)
    domain = spec.domain or record.get(spec.domain_field)
    if not isinstance(domain, str) or not domain:
        return _bad(source, "missing_domain", json.dumps(record, default=str))
    raw_id = record.get(spec.id_field)
    doc_id = str(raw_id) if isinstance(raw_id, (str, int)) and str(raw_id) else stable_id(source)
    known = {spec.text_field, spec.domain_field, spec.id_field}
    extra = {k: v for k, v in record.items() if k not in known}
    meta = json.dumps(extra, default=str, sort_keys=True) if extra else None
    return {"id": doc_id, "domain": domain, "text": text, "source": source, "meta": meta,
            "reason": None, "raw": None}


def _open_text_stream(uri: str, storage: Storage) -> io.BufferedIOBase:
    stream = storage.open_input(uri)
    if uri.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)
    if uri.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


def _iter_lines(stream) -> Iterator[bytes]:
    """Lines of a (possibly decompressing) binary stream, read in chunks."""
    pending = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def iter_jsonl_rows(uri: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    line_no = 0
    try:
        with _open_text_stream(uri, storage) as stream:
            for line_no, line in enumerate(_iter_lines(stream), start=1):
                if not line.strip():
                    continue
                source = f"{uri}#L{line_no}"
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _bad(source, "invalid_utf8", line)
                    continue
                try:
                    record = json.loads(decoded)
                except (json.JSONDecodeError, RecursionError):
                    yield _bad(source, "invalid_json", decoded)
                    continue
                yield record_to_row(record, source, spec)
    except (OSError, EOFError, ValueError, _ZstdError) as e:
        # A truncated or corrupt compressed file: keep what was read, quarantine the rest.
        yield _bad(f"{uri}#L{line_no + 1}", "corrupt_file", f"{type(e).__name__}: {e}")


def iter_parquet_rows(uri: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    try:
        parquet = pq.ParquetFile(storage.open_input_file(uri))
    except Exception as e:  # pyarrow raises several types for a broken footer
        yield _bad(uri, "corrupt_file", f"{type(e).__name__}: {e}")
        return
    row_no = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield record_to_row(record, f"{uri}#row{row_no}", spec)
            row_no += 1


def parse_file(item: dict, specs: list[InputSpec], storage_cfg: StorageConfig | None) -> Iterator[dict]:
    """Ray flat_map function: one input file -> its rows (good and quarantined)."""
    storage = Storage(storage_cfg)
    uri, spec = item["path"], specs[item["input_index"]]
    is_parquet = spec.format == "parquet" or (spec.format == "auto" and uri.endswith(PARQUET_SUFFIXES))
    rows = iter_parquet_rows(uri, spec, storage) if is_parquet else iter_jsonl_rows(uri, spec, storage)
    yield from rows
