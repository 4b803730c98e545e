"""Near-dedup in one process, for inputs small enough that Ray costs more than the work.

On the demo corpus (~8k documents, 26 MB) the whole computation takes ~2 CPU-seconds while
starting Ray takes 5-7 s and every Ray Data pass and file hand-off adds more (bench/near_dedup.py).
Below ``NearDedupConfig.local_max_docs`` documents and ``local_max_bytes`` of text (engine
"auto", the default; "local" / "ray" force one engine), ``find_clusters`` runs the SAME steps
in memory, with the same functions as the Ray phases:

  bands       ``near_dedup.band_batch`` (compiled signatures and band rows) over byte-balanced
              slices of the input on a thread pool (the kernels release the GIL), rows kept in
              memory per bucket partition instead of written to the work dir
  edges       ``near_dedup.partition_edges`` per partition, over this run's rows and the index's
  components  one compiled union-find over all edges (``lsh.min_components``): each node's label
              is its component's smallest node, exactly what the Ray path's components converge to
  index       ``near_dedup.indexed_rows`` per partition, written in the index format
              (pipelines/dedup_index.py) under the same run tag as the Ray path would use

Same input and config, same decisions: buckets do not depend on how rows are split into
partitions or batches, and the survivor of a component is its smallest node either way
(tests/test_near_dedup_local.py compares clusters, report and index row for row). What the
local engine does not do is resume: it writes nothing to the work dir (a killed small run is
simply run again). Memory: the input table, plus ~14 band rows (~50 bytes each) per document,
plus with ``verify`` the signature in every band row (num_perm * 8 bytes, 14 times).

The default limits (100k documents, 256 MiB of text) keep that well under a GB: measured with
bench/near_dedup.py --scale 100000 (short documents, 29 MB, 2 loaded cores): local 3.1 s, peak
RSS 0.66 GB; Ray engine 48.6 s, 3.4 GB; datasketch 22 s. Larger inputs go to Ray, whose memory
per task is bounded by its partitions.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.config import NearDedupConfig, StorageConfig
from infra.storage import Storage
from pipelines import lsh, minhash
from pipelines.components import LABEL_SCHEMA
from pipelines.near_dedup import (
    _BATCH_SIZE, NearDedup, _fold, _removed_and_sampled, band_batch, edges_summary, indexed_rows, partition_edges,
    similarity_threshold,
)

COLUMNS = ("id", "domain", "text", "quality")
_CHUNK_BYTES = 1 << 20  # slices of at least ~1 MB of text: per-slice costs stay small


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def text_bytes(table: pa.Table) -> int:
    return int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0) if table.num_rows else 0


def choose_engine(cfg: NearDedupConfig, docs: int | None, nbytes: int | None) -> str:
    """"local" or "ray" for an input of ``docs`` documents and ``nbytes`` bytes of text (None: not
    known yet, not a reason for Ray). engine "auto": local when both are within the limits."""
    if cfg.engine != "auto":
        return cfg.engine
    if cfg.local_max_docs == 0 or cfg.local_max_bytes == 0:
        return "ray"
    if (docs is not None and docs > cfg.local_max_docs) or (nbytes is not None and nbytes > cfg.local_max_bytes):
        return "ray"
    return "local"


def _select(table: pa.Table) -> pa.Table:
    return table.select([c for c in COLUMNS if c in table.column_names])


def local_input(docs, cfg: NearDedupConfig, num_docs: int | None = None) -> pa.Table | None:
    """The input as one Arrow table when the local engine runs it, else None (the Ray path).

    A table is judged by its rows and text bytes. A Ray Dataset is judged by ``num_docs`` when
    given, else by reading it into the driver block by block, giving up (None) as soon as it
    exceeds a limit: at most the limits' worth of reading is then done twice."""
    if choose_engine(cfg, num_docs, None) == "ray":
        return None
    if isinstance(docs, pa.Table):
        return _select(docs) if choose_engine(cfg, docs.num_rows, text_bytes(docs)) == "local" else None
    tables, rows, nbytes = [], 0, 0
    for batch in docs.iter_batches(batch_format="pyarrow", batch_size=None):
        batch = _select(batch)
        rows, nbytes = rows + batch.num_rows, nbytes + text_bytes(batch)
        if choose_engine(cfg, rows, nbytes) == "ray":
            return None
        tables.append(batch)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in COLUMNS[:3]})
    return pa.concat_tables(tables, promote_options="default")


def read_documents(uris: list[str], cfg: NearDedupConfig, storage_cfg: StorageConfig | None = None
                   ) -> pa.Table | None:
    """JSONL (.jsonl/.json) or Parquet files' id, domain, text as one table read in-process, when
    the local engine would run them; None when ``cfg`` sends them to Ray (read them with Ray Data
    then). Judged before reading by the files' size on disk (JSONL: an upper bound of the text
    bytes) or, for Parquet, by their metadata (rows, uncompressed text column); a table read
    here is judged again exactly by ``local_input``."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    storage = Storage(storage_cfg)
    rows, nbytes = 0, 0
    for uri in uris:
        if uri.endswith(".parquet"):
            with storage.open_input_file(uri) as f:
                meta = pq.ParquetFile(f).metadata
            rows += meta.num_rows
            text = [j for j in range(meta.num_columns) if meta.schema.column(j).path == "text"]
            nbytes += sum(meta.row_group(g).column(j).total_uncompressed_size
                          for g in range(meta.num_row_groups) for j in text)
        else:  # rows unknown without reading: the bytes decide
            nbytes += storage.size(uri)
        if choose_engine(cfg, None, nbytes) == "ray" or choose_engine(cfg, rows, None) == "ray":
            return None
    schema = pa.schema([(c, pa.string()) for c in COLUMNS[:3]])
    tables = []
    for uri in uris:
        with storage.open_input_file(uri) as f:
            if uri.endswith(".parquet"):
                tables.append(pq.read_table(f, columns=list(COLUMNS[:3])).cast(schema))
            else:
                tables.append(pj.read_json(f, parse_options=pj.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="ignore")).select(list(COLUMNS[:3])))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _slices(table: pa.Table, threads: int) -> list[pa.Table]:
    """Contiguous slices of about equal text bytes: ~4 per thread (long documents do not leave a
    thread idle), each >= ~1 MB and <= _BATCH_SIZE documents."""
    n = table.num_rows
    if n == 0:
        return []
    size = pc.fill_null(pc.binary_length(table.column("text")), 0).to_numpy(zero_copy_only=False)
    cum = np.cumsum(size.astype(np.int64) + 64)  # + a per-document cost
    k = max(-(-n // _BATCH_SIZE), min(4 * threads, -(-int(cum[-1]) // _CHUNK_BYTES)), 1)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [n]]))
    edges = [0]
    for b in bounds[1:].tolist():  # and no slice over _BATCH_SIZE documents
        while b - edges[-1] > _BATCH_SIZE:
            edges.append(edges[-1] + _BATCH_SIZE)
        edges.append(b)
    return [table.slice(s, e - s) for s, e in zip(edges[:-1], edges[1:]) if e > s]


class LocalNearDedup(NearDedup):
    """``NearDedup`` with every phase in this process (see the module docstring). ``docs``: a table."""

    engine = "local"

    def __init__(self, docs: pa.Table, cfg: NearDedupConfig, work_uri: str,
                 storage_cfg: StorageConfig | None = None, threads: int | None = None):
        super().__init__(docs, cfg, work_uri, storage_cfg)
        self.threads = threads or available_cpus()
        self.schema = lsh.band_schema(cfg.num_perm, cfg.verify)
        self._rows: dict[int, list[pa.Table]] = {}
        self._edges: list[tuple[str, str]] = []

    def _pool_map(self, fn, items: list) -> list:
        if self.threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.threads, len(items))) as pool:
            return list(pool.map(fn, items))

    def _partition(self, p: int) -> pa.Table:
        parts = self._rows.get(p, [])
        return pa.concat_tables([t.cast(self.schema) for t in parts]) if parts else self.schema.empty_table()

    def _first_calls(self) -> None:
        """One signature in this thread before the pool starts: numba's lazy start (its registries
        and their imports, ~0.4 s) and, for non-ASCII text, minhash's Unicode word table (~0.2 s,
        an unlocked cache that every thread would otherwise build at once) happen once."""
        if self.cfg.hash_mode != "fast" or self.docs.num_rows == 0:
            return
        text = self.docs.column("text")
        ascii_only = text.null_count == 0 and pc.all(pc.string_is_ascii(text)).as_py()
        minhash.compute_signatures(pa.array(["a" if ascii_only else "\u00e9"]), num_perm=self.cfg.num_perm,
                                   ngram=self.cfg.ngram, seed=self.cfg.seed)

    def bands(self) -> dict:
        self._first_calls()
        results = self._pool_map(lambda batch: band_batch(batch, self.cfg, self.partitions),
                                 _slices(self.docs, self.threads))
        per_domain = []
        for parts, domains in results:
            for p, rows in parts.items():
                self._rows.setdefault(p, []).append(rows)
            per_domain += domains.to_pylist()
        summary, input_fp, quality = _fold(per_domain)
        self.tag, _ = self._identity(input_fp, quality)
        return summary

    def edges(self) -> dict:
        threshold = similarity_threshold(self.cfg)

        def one(p: int) -> tuple[list, list]:
            rows = self._partition(p)
            if self.index_meta:
                indexed = self.work.read_files(self.index.partition_files(self.index_meta, p, self.tag), self.schema)
                rows = pa.concat_tables([rows, indexed])
            return partition_edges(rows, self.cfg, threshold)

        done = []
        for edges, giants in self._pool_map(one, list(range(self.partitions))):
            self._edges += edges
            done.append({"edges": len(edges), "giants": giants})
        return edges_summary(done)

    def components(self) -> tuple[pa.Table, int]:
        nodes, roots = lsh.min_components(pa.array([a for a, _ in self._edges], pa.string()),
                                          pa.array([b for _, b in self._edges], pa.string()))
        return pa.table({"node": nodes, "label": roots}, schema=LABEL_SCHEMA).sort_by("node"), 1

    def _write_index_rows(self, removed: pa.Array) -> list[int]:
        def one(p: int) -> int:
            rows = indexed_rows(self._partition(p), removed)
            if rows.num_rows:
                self.index.files.write_table(rows, "bands", f"part-{p:05d}", f"{self.tag}.parquet")
            return rows.num_rows

        return self._pool_map(one, list(range(self.partitions)))

    def _lookup(self, removed: pa.Array, wanted: pa.Array):
        return [_removed_and_sampled(self.docs, removed, wanted)]
