"""Read raw corpora into Document rows: JSONL (plain/.gz/.zst), Parquet, plain-text folders (one file =
one document) and HF ``datasets`` folders written by ``save_to_disk``; local paths or ``s3://``.

Every format streams: parsing happens inside Ray tasks, one input file per item, and no reader holds
more than one record batch (Parquet, Arrow), one 1 MiB chunk plus one line (JSONL) or one document
(text) in memory. All bytes go through ``infra.storage.Storage`` (pyarrow.fs), so each format reads
from S3 the same way it reads from disk.

HF datasets are read without ``datasets``: ``save_to_disk`` writes Arrow IPC *stream* files and lists
them in ``state.json`` (one folder per split under ``dataset_dict.json``), with any ``select``/
``shuffle`` indices already flattened. Reading those files with pyarrow gives the rows
``load_from_disk`` would give, in the same order, batch by batch, from S3 as well (``load_from_disk``
memory-maps local files and would have to copy an S3 folder to disk first).

A record that cannot become a Document (not JSON, invalid UTF-8 or a lone surrogate, no text, wrong
types -- an id that is not a string/integer is ``invalid_id`` --, nested too deep to parse (``too_deep``),
a domain that is not a plain folder name (``invalid_domain``), over ``max_doc_bytes``) and a file that
cannot be read (missing, permission, corrupt, truncated or zero-byte compressed stream, broken Parquet
footer) do not stop the job: each becomes a row with a ``reason``, its source location and its
truncated ``raw`` text, and the pipeline writes it to quarantine. Every row, good or bad, has the same
columns, so one Dataset carries both until they are split.

Ids: a record's ``id_field`` when present, else a hash of its source (uri + line/row), the same on
every re-run over the same input. A text file's id is ``<domain>/<path relative to the input>``:
stable, readable and unchanged when the folder moves (e.g. to S3).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import posixpath
import re
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from zstandard import ZstdError as _ZstdError

from infra.config import InputSpec, StorageConfig
from infra.contracts import QUARANTINE_RAW_CHARS
from infra.storage import Storage, is_s3, join, relative_to

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
HF_STATE_FILE = "state.json"  # a Dataset folder (save_to_disk)
HF_DICT_FILE = "dataset_dict.json"  # a DatasetDict folder: one Dataset folder per split

# Columns of a parsed row: the Document fields plus the quarantine verdict.
ROW_COLUMNS = ("id", "domain", "text", "source", "meta", "reason", "raw")

_RAW_BYTES = QUARANTINE_RAW_CHARS * 4  # enough bytes for QUARANTINE_RAW_CHARS characters
_CHUNK = 1 << 20
# A lone surrogate (JSON "\ud800") decodes to a Python str that UTF-8 (hence Arrow) cannot encode: one
# such record in a block used to fail the whole Ray read task (UnicodeEncodeError), i.e. the job.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A domain becomes a folder (shards/<domain>/): it must be one plain path segment, or a record with
# domain "../../x" would write its shards outside output_dir.
_UNSAFE_DOMAIN = re.compile(r"[/\\\x00-\x1f\x7f]|^\.{1,2}$")


def domain_problem(domain: str) -> str | None:
    """Why ``domain`` cannot name a shard folder, or None (it is one plain path segment)."""
    if _UNSAFE_DOMAIN.search(domain) or _SURROGATE.search(domain):
        return (f"domain {domain!r} is not a plain folder name (no '/', '\\', control characters, "
                "'.' or '..'): it names the shard folder shards/<domain>/")
    return None


# --------------------------------------------------------------------------- listing


def _is_hf_folder(path: str, storage: Storage) -> bool:
    return any(storage.exists(join(path, name)) for name in (HF_STATE_FILE, HF_DICT_FILE))


def _hf_data_files(path: str, storage: Storage, unreadable: list[tuple[str, str]]) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder, in dataset order (splits in their saved order).

    A description file that cannot be read or parsed goes to ``unreadable`` (it is quarantined), and the
    folder's .arrow files are read in name order instead: they describe themselves.
    """
    described = join(path, HF_DICT_FILE if storage.exists(join(path, HF_DICT_FILE)) else HF_STATE_FILE)
    try:
        meta = json.loads(storage.read_bytes(described))
        if described.endswith(HF_DICT_FILE):
            return [f for split in meta["splits"] for f in _hf_data_files(join(path, split), storage, unreadable)]
        return [join(path, entry["filename"]) for entry in meta["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        unreadable.append((described, _error(e)))
        return storage.list_files(path, ARROW_SUFFIXES) if storage.exists(path) else []


def resolve_format(spec: InputSpec, storage: Storage) -> str:
    """The format of an input: its configured one, or for ``auto`` hf when it is a save_to_disk folder."""
    if spec.format != "auto":
        return spec.format
    return "hf" if _is_hf_folder(spec.path, storage) else "auto"


def list_input_files(spec: InputSpec, storage: Storage, unreadable: list[tuple[str, str]] | None = None) -> list[str]:
    """The files of one input, sorted (HF: in dataset order). Description files that could not be read are
    appended to ``unreadable`` as (uri, error)."""
    if not storage.exists(spec.path):
        raise FileNotFoundError(f"input {spec.path!r} does not exist")
    fmt = resolve_format(spec, storage)
    if fmt == "hf":
        files = _hf_data_files(spec.path, storage, [] if unreadable is None else unreadable)
        return [f for f in files if f.endswith(tuple(spec.suffixes))] if spec.suffixes else files
    default = {"jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES, "text": ()}.get(
        fmt, JSONL_SUFFIXES + PARQUET_SUFFIXES)
    files = storage.list_files(spec.path, tuple(spec.suffixes) or default)
    if fmt == "text" and not spec.suffixes:  # every file, except hidden ones (.DS_Store, .gitignore)
        files = [f for f in files if not posixpath.basename(f).startswith(".")]
    return files


def input_items(specs: list[InputSpec], storage: Storage) -> list[dict]:
    """One work item per input file: its uri, its input's index and format, and its path relative to the
    input (computed here, on the driver, where relative local paths mean what the user meant)."""
    items = []
    for index, spec in enumerate(specs):
        fmt = resolve_format(spec, storage)
        root = storage.filesystem(spec.path)[1] if not is_s3(spec.path) else spec.path
        unreadable: list[tuple[str, str]] = []
        for uri in list_input_files(spec, storage, unreadable):
            rel = relative_to(uri, root)
            if rel == ".":  # the input is this file
                rel = posixpath.basename(uri.replace("\\", "/"))
            items.append({"path": uri, "input_index": index, "format": fmt, "relpath": rel.replace("\\", "/")})
        items += [{"path": uri, "input_index": index, "format": fmt, "relpath": "", "error": error}
                  for uri, error in unreadable]
    return items


# --------------------------------------------------------------------------- records


def stable_id(source: str) -> str:
    """An id that depends only on where the record came from, so re-runs give the same ids."""
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def _bad(source: str, reason: str, raw: Any) -> dict:
    if isinstance(raw, bytes):
        raw = raw[:_RAW_BYTES].decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = repr(raw)
    raw = raw[:QUARANTINE_RAW_CHARS]
    if _SURROGATE.search(raw):  # kept readable, and encodable (see _SURROGATE)
        raw = raw.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return {"id": None, "domain": None, "text": None, "source": source, "meta": None,
            "reason": reason, "raw": raw}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _utf8_size_over(text: str, limit: int) -> bool:
    if len(text) > limit:  # a character is at least one byte
        return True
    return len(text) * 4 > limit and len(text.encode("utf-8", errors="surrogatepass")) > limit


def _text_problem(text: Any, spec: InputSpec) -> str | None:
    """Why ``text`` (already decoded) cannot be a document's text, or None."""
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "text_not_string"
    if _utf8_size_over(text, spec.max_doc_bytes):
        return "too_large"
    if not text.strip():
        return "empty_text"
    if "\x00" in text:
        return "nul_byte"
    if _SURROGATE.search(text):
        return "invalid_utf8"
    return None


def _dump(record: Any) -> str:
    return json.dumps(record, default=str)[: QUARANTINE_RAW_CHARS]


def record_to_row(record: Any, source: str, spec: InputSpec) -> dict:
    """Turn one decoded record into a Document row, or a quarantine row saying why not."""
    if not isinstance(record, dict):
        return _bad(source, "not_an_object", _dump(record))
    text = record.get(spec.text_field)
    if isinstance(text, bytes):  # a binary column (Parquet, Arrow): text only if it is UTF-8
        if len(text) > spec.max_doc_bytes:
            return _bad(source, "too_large", text)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return _bad(source, "invalid_utf8", text)
    problem = _text_problem(text, spec)
    if problem in ("too_large", "nul_byte", "invalid_utf8"):
        return _bad(source, problem, text)
    if problem:
        return _bad(source, problem, _dump(record))
    domain = spec.domain or record.get(spec.domain_field)
    if not isinstance(domain, str) or not domain:
        return _bad(source, "missing_domain", _dump(record))
    if domain_problem(domain):
        return _bad(source, "invalid_domain", _dump(record))
    raw_id = record.get(spec.id_field)
    # An id of the wrong type (object, list, bool, float) or not encodable is a broken record, not a
    # missing id: deriving one silently would hide the breakage (and "True"/"1.0" would collide).
    if raw_id is not None and raw_id != "" and (
            isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))
            or (isinstance(raw_id, str) and _SURROGATE.search(raw_id))):
        return _bad(source, "invalid_id", _dump(record))
    doc_id = str(raw_id) if isinstance(raw_id, (str, int)) and str(raw_id) else stable_id(source)
    known = {spec.text_field, spec.domain_field, spec.id_field}
    extra = {k: v for k, v in record.items() if k not in known}
    meta = json.dumps(extra, default=str, sort_keys=True) if extra else None
    return {"id": doc_id, "domain": domain, "text": text, "source": source, "meta": meta,
            "reason": None, "raw": None}


# --------------------------------------------------------------------------- JSONL


class _NotEmpty:
    """A raw stream that raises EOFError when it has no bytes at all: a zero-byte .gz is not a gzip file
    (even an empty one has a header), it is one cut at 0 -- quarantined, not read as "no records"."""

    def __init__(self, raw):
        self.raw, self.seen = raw, False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not self.seen and not data:
            raise EOFError("empty compressed file (no header): truncated at 0 bytes")
        self.seen = True
        return data


class _ZstdFrames:
    """The decompressed bytes of a (multi-frame) zstd stream; raises EOFError when it ends inside a frame.

    ``ZstdDecompressor().stream_reader`` returns b"" at the end of a truncated file as if it were
    complete, so a .zst cut short lost its last block's records without a trace. Here each frame is
    a ``decompressobj`` whose ``eof`` says whether it finished. Input is fed in small pieces so one
    call's output stays bounded (a block of a few bytes can expand to 128 KiB).
    """

    _PIECE = 4096

    def __init__(self, raw):
        self.raw, self.dctx = raw, zstandard.ZstdDecompressor()
        self.frame = None
        self.buf, self.pos, self.seen = b"", 0, False

    def read1(self, n: int = -1) -> bytes:
        while True:
            if self.pos >= len(self.buf):
                self.buf, self.pos = self.raw.read(_CHUNK), 0
                if not self.buf:
                    if not self.seen:
                        raise EOFError("empty zstd file (no frame header): truncated at 0 bytes")
                    if self.frame is not None:
                        raise EOFError("zstd stream ends inside a frame: the file is truncated")
                    return b""
                self.seen = True
            if self.frame is None:
                self.frame = self.dctx.decompressobj()
            piece = self.buf[self.pos:self.pos + self._PIECE]
            self.pos += len(piece)
            out = self.frame.decompress(piece)
            if self.frame.eof:  # the frame is complete; what follows it starts the next frame
                self.pos -= len(self.frame.unused_data)
                self.frame = None
            if out:
                return out

    read = read1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _decompressed(raw, uri: str):
    """A context manager giving the decompressed bytes of ``raw`` (by the suffix of ``uri``)."""
    if uri.endswith(".gz"):
        return gzip.GzipFile(fileobj=_NotEmpty(raw))
    if uri.endswith(".zst"):
        return _ZstdFrames(raw)
    return contextlib.nullcontext(raw)


def _iter_lines(stream, limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, over_limit) for each line of a (possibly decompressing) binary stream, read in chunks.

    A line over ``limit`` bytes is never held whole: only its first bytes are kept (for quarantine)
    and the rest is skipped up to the next newline, so one endless line cannot exhaust memory.
    """
    # read1: what one underlying read gives, so a stream that breaks later still yields what came before
    # (GzipFile.read(n) drops everything it decompressed in a call that ends in EOFError).
    read = getattr(stream, "read1", stream.read)
    pending, head, over = b"", b"", False
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if over:  # this line ends the oversized one
                yield head, True
                head, over = b"", False
            else:
                yield line, len(line) > limit
        if len(pending) > limit:
            if not over:
                head, over = pending[:_RAW_BYTES], True
            pending = b""
    if over:
        yield head, True
    elif pending:
        yield pending, len(pending) > limit


def iter_jsonl_rows(uri: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    try:
        raw = storage.open_input(uri)
    except OSError as e:
        yield _bad(uri, "unreadable_file", _error(e))
        return
    line_no = 0
    try:
        with raw, _decompressed(raw, uri) as stream:
            for line_no, (line, too_large) in enumerate(_iter_lines(stream, spec.max_doc_bytes), start=1):
                source = f"{uri}#L{line_no}"
                if too_large:
                    yield _bad(source, "too_large", line)
                    continue
                if line_no == 1:  # a UTF-8 byte-order mark is an encoding artifact, not part of the record
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if not line.strip():
                    continue
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield _bad(source, "invalid_utf8", line)
                    continue
                try:
                    record = json.loads(decoded)
                    row = record_to_row(record, source, spec)
                except RecursionError:  # nested deeper than the interpreter's stack: valid JSON, unreadable
                    yield _bad(source, "too_deep", decoded)
                    continue
                except ValueError:
                    # JSONDecodeError, and also ValueError for an integer of > 4300 digits: it used to
                    # escape to the file-level handler and drop every later record of the file.
                    yield _bad(source, "invalid_json", decoded)
                    continue
                yield row
    except (OSError, EOFError, ValueError, _ZstdError) as e:
        # A truncated or corrupt compressed file: keep what was read, quarantine the rest.
        yield _bad(f"{uri}#L{line_no + 1}", "corrupt_file", _error(e))


# --------------------------------------------------------------------------- Parquet and Arrow


def _iter_batch_rows(batches: Iterator[pa.RecordBatch], uri: str, spec: InputSpec) -> Iterator[dict]:
    row_no = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                yield record_to_row(record, f"{uri}#row{row_no}", spec)
                row_no += 1
    except (OSError, pa.ArrowException, ValueError, EOFError) as e:  # a corrupt page or truncated stream
        yield _bad(f"{uri}#row{row_no}", "corrupt_file", _error(e))


def iter_parquet_rows(uri: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    try:
        handle = storage.open_input_file(uri)
    except OSError as e:
        yield _bad(uri, "unreadable_file", _error(e))
        return
    try:
        parquet = pq.ParquetFile(handle)
    except Exception as e:  # pyarrow raises several types for a broken footer
        yield _bad(uri, "corrupt_file", _error(e))
        return
    yield from _iter_batch_rows(parquet.iter_batches(batch_size=4096), uri, spec)


def iter_arrow_rows(uri: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    """An Arrow IPC stream file (what HF ``save_to_disk`` writes), one record batch at a time."""
    try:
        stream = storage.open_input(uri)
    except OSError as e:
        yield _bad(uri, "unreadable_file", _error(e))
        return
    with stream:
        try:
            reader = pa.ipc.open_stream(stream)
        except (OSError, pa.ArrowException, ValueError) as e:
            yield _bad(uri, "corrupt_file", _error(e))
            return
        yield from _iter_batch_rows(iter(reader), uri, spec)


# --------------------------------------------------------------------------- plain text


def iter_text_file_rows(uri: str, relpath: str, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    """One file = one document. Reads at most ``max_doc_bytes + 1`` bytes, so a huge file costs nothing."""
    try:
        with storage.open_input(uri) as stream:
            data = stream.read(spec.max_doc_bytes + 1)
    except OSError as e:
        yield _bad(uri, "unreadable_file", _error(e))
        return
    if len(data) > spec.max_doc_bytes:
        yield _bad(uri, "too_large", data)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield _bad(uri, "invalid_utf8", f"{_error(e)}\n{data[:_RAW_BYTES].decode('utf-8', errors='replace')}")
        return
    text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding artifact, not text
    problem = _text_problem(text, spec)
    if problem:
        yield _bad(uri, problem, text)
        return
    yield {"id": f"{spec.domain}/{relpath}", "domain": spec.domain, "text": text, "source": uri, "meta": None,
           "reason": None, "raw": None}


# --------------------------------------------------------------------------- dispatch


def iter_file_rows(item: dict, spec: InputSpec, storage: Storage) -> Iterator[dict]:
    uri, fmt = item["path"], item.get("format", spec.format)
    if fmt == "text":
        return iter_text_file_rows(uri, item.get("relpath") or posixpath.basename(uri), spec, storage)
    if fmt == "hf" or (fmt == "auto" and uri.endswith(ARROW_SUFFIXES)):
        return iter_arrow_rows(uri, spec, storage)
    if fmt == "parquet" or (fmt == "auto" and uri.endswith(PARQUET_SUFFIXES)):
        return iter_parquet_rows(uri, spec, storage)
    return iter_jsonl_rows(uri, spec, storage)


def parse_file(item: dict, specs: list[InputSpec], storage_cfg: StorageConfig | None) -> Iterator[dict]:
    """Ray flat_map function: one input file -> its rows (good and quarantined).

    The readers turn every expected failure into a quarantine row; anything else a file throws is
    caught here too, so one bad file can never fail the job (the rows before it are kept).
    """
    uri, spec = item["path"], specs[item["input_index"]]
    if item.get("error"):  # found unreadable while listing (an HF folder's state.json)
        yield _bad(uri, "unreadable_file", item["error"])
        return
    try:
        yield from iter_file_rows(item, spec, Storage(storage_cfg))
    except Exception as e:
        yield _bad(uri, "read_error", _error(e))
