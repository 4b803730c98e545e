"""Stage checkpoints of the corpus pipeline: what lets a killed run continue and a finished one do nothing.

Each stage of ``CorpusPipeline`` owns a folder ``<out>/_stages/<NN>-<stage>/``:

    data/        its output rows as Parquet, one file per Ray Data block, written by the stage's
                 last streaming map (pipelines.run._checkpoint_block, which also returns the
                 block's counters); the next stage reads them back lazily (``ray.data.read_parquet``)
    _DONE.json   written LAST, once everything else the stage writes (data/, removed/,
                 quarantine/, dedup/, tokenizer.json, shards/, manifest.json) is in place

The marker is the commit point: S3 has no rename, so a stage folder without ``_DONE.json`` is
unfinished and is deleted before the stage runs again; a marker never points at partial data.

A marker holds the stage's *fingerprint*: a hash of the upstream stage's fingerprint and the
config section(s) the stage reads; for ``read``, of the input listing (every file's uri, size and
modification time) and the input specs. ``output_dir`` is in none of them, so the same inputs and
config give the same fingerprints wherever the output goes. A re-run loads a stage whose marker
matches and runs the first one that does not (or is forced) and every stage after it; running a
stage first deletes its own folder and those of all later stages, so a stale later marker can
never be trusted after an earlier stage was redone.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from infra.config import InputSpec, StorageConfig
from infra.storage import Storage, join

STAGES_DIR = "_stages"
MARKER = "_DONE.json"
MARKER_VERSION = 1

# The stages in order; a folder is "<NN>-<key>" with NN its 1-based position here. The filter
# stage's *stats* name is word_count_filter or quality_filter (see CorpusPipeline.quality_filter).
STAGES = ("read", "unique_ids", "quality_filter", "exact_dedup", "near_dedup", "tokenizer", "tokenize_shard")
STAGE_ALIASES = {"normalize": "quality_filter", "word_count_filter": "quality_filter", "filter": "quality_filter",
                 "shard": "tokenize_shard", "shards": "tokenize_shard", "tokenize": "tokenize_shard"}


def resolve_force(names: list[str] | tuple[str, ...] | None) -> str | None:
    """The earliest stage named by ``--force`` (names, aliases or "all"); None when nothing is forced."""
    if not names:
        return None
    keys = []
    for name in names:
        key = name.strip().lower()
        if key == "all":
            return STAGES[0]
        key = STAGE_ALIASES.get(key, key)
        if key not in STAGES:
            raise ValueError(f"unknown stage {name!r} for --force; stages: {', '.join(STAGES)} (or 'all')")
        keys.append(key)
    return min(keys, key=STAGES.index)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def input_listing(items: list[dict], storage: Storage) -> list[dict]:
    """Every input file's uri, size and modification time (ns): what ``read``'s fingerprint covers.

    ``items`` are ``pipelines.readers.input_items``. On S3 the mtime is the object's LastModified, so
    an overwritten object (same size or not) changes the listing.
    """
    out = []
    for item in items:
        entry = {"path": item["path"], "input": item["input_index"], "format": item["format"]}
        if item.get("error"):
            entry["error"] = item["error"]
        else:
            fs, path = storage.filesystem(item["path"])
            info = fs.get_file_info(path)
            entry["size"] = info.size if info.type == pafs.FileType.File else None
            entry["mtime_ns"] = info.mtime_ns
        out.append(entry)
    return out


def spec_digest(spec: InputSpec, listing: list[dict], index: int) -> str:
    """The digest of one input (its spec and its files), logged with ``mlflow.log_input``."""
    return fingerprint(spec.model_dump(mode="json"), [e for e in listing if e["input"] == index])[:16]


@dataclass
class StageMarker:
    """The content of ``_DONE.json``: the stage, its fingerprint and what a resumed run needs."""

    stage: str
    fingerprint: str
    stats: list[dict] = field(default_factory=list)  # StageStats dumps (read writes two: read, unique_ids)
    meta: dict[str, Any] = field(default_factory=dict)  # stage outputs: columns, tokenizer, shards, manifest...
    seconds: float = 0.0
    finished_at: float = 0.0
    mlflow_run_id: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"marker_version": MARKER_VERSION, **self.__dict__}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "StageMarker | None":
        try:
            raw = json.loads(data)
            if raw.pop("marker_version", None) != MARKER_VERSION:
                return None
            return cls(**raw)
        except (ValueError, TypeError):
            return None  # unreadable or from another version: the stage is simply redone


class StageStore:
    """The ``_stages`` folder of one output dir (local or s3://)."""

    def __init__(self, output_dir: str, storage: Storage, storage_cfg: StorageConfig | None = None):
        self.root = join(output_dir, STAGES_DIR)
        self.storage = storage
        self.storage_cfg = storage_cfg

    @staticmethod
    def folder_name(stage: str) -> str:
        return f"{STAGES.index(stage) + 1:02d}-{stage}"

    def folder(self, stage: str) -> str:
        return join(self.root, self.folder_name(stage))

    def data_uri(self, stage: str) -> str:
        return join(self.folder(stage), "data")

    # ------------------------------------------------------------------ markers

    def marker(self, stage: str) -> StageMarker | None:
        uri = join(self.folder(stage), MARKER)
        try:
            return StageMarker.from_json(self.storage.read_bytes(uri))
        except FileNotFoundError:
            return None

    def finished(self, stage: str, fp: str) -> StageMarker | None:
        """The stage's marker if it finished with this fingerprint."""
        marker = self.marker(stage)
        return marker if marker is not None and marker.fingerprint == fp else None

    def commit(self, marker: StageMarker) -> None:
        marker.finished_at = round(time.time(), 3)
        self.storage.write_bytes(join(self.folder(marker.stage), MARKER), marker.to_json())

    def invalidate_from(self, stage: str) -> None:
        """Delete this stage's folder and every later stage's, markers first (the commit points)."""
        later = STAGES[STAGES.index(stage):]
        for name in later:
            uri = join(self.folder(name), MARKER)
            if self.storage.exists(uri):
                fs, path = self.storage.filesystem(uri)
                fs.delete_file(path)
        for name in later:
            self.storage.delete_dir(self.folder(name))

    # ------------------------------------------------------------------ data

    def files(self, stage: str) -> list[str]:
        uri = self.data_uri(stage)
        return self.storage.list_files(uri, (".parquet",)) if self.storage.exists(uri) else []

    def schema(self, stage: str) -> pa.Schema | None:
        """The schema of the stage's data (from one file's footer), None when it wrote no rows."""
        files = self.files(stage)
        if not files:
            return None
        with self.storage.open_input_file(files[0]) as f:
            return pq.read_schema(f)

    def read(self, stage: str, columns: list[str] | None = None,
             empty_schema: pa.Schema | None = None) -> ray.data.Dataset:
        """The stage's rows as a lazy dataset: one read task per file, run when a consumer pulls.

        Not ``ray.data.read_parquet``: on Ray 2.60 its file-listing operator costs seconds per
        execution, which a pipeline of small embedded runs pays at every stage; the file list is
        known here anyway.
        """
        files = self.files(stage)
        if not files:
            schema = empty_schema if columns is None else pa.schema([empty_schema.field(c) for c in columns])
            return ray.data.from_arrow(schema.empty_table())
        return ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), MAX_READ_TASKS)) \
                       .map_batches(_read_files, batch_format="pyarrow", batch_size=None,
                                    fn_kwargs={"columns": columns, "storage_cfg": self.storage_cfg})


MAX_READ_TASKS = 1024


def _read_files(batch: pa.Table, columns: list[str] | None, storage_cfg: StorageConfig | None) -> pa.Table:
    storage = Storage(storage_cfg)
    tables = []
    for path in batch.column("path").to_pylist():
        with storage.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")
