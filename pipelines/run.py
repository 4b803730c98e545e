"""The corpus pipeline on Ray Data: read -> normalize -> filter -> exact dedup -> near dedup ->
tokenize -> shard, writing shards + manifest.json (+ quarantine, removed records, clusters).

Each stage annotates rows with ``drop_reason``/``drop_detail`` instead of dropping them; the
pipeline then splits kept rows from removed ones, counts removals per reason and per domain, and
writes every removed document's id and reason under ``removed/<stage>/``. Nothing is lost
silently. Output layout (all relative to ``output_dir``, local or s3://):

    manifest.json  tokenizer.json  shards/<domain>/{part,validation}-NNNNN.parquet
    quarantine/    removed/<stage>/    dedup/clusters.parquet
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from infra import tracking
from infra.cluster import ensure_ray
from infra.config import PipelineConfig, RayConfig, StorageConfig, config_hash
from infra.contracts import (
    DOCUMENT_SCHEMA, MANIFEST_FILE, QUARANTINE_SCHEMA, REMOVED_SCHEMA, DomainShards, Manifest, ShardInfo,
    StageStats, TokenizerInfo, write_artifact,
)
from infra.errors import MaskmixError
from infra.storage import Storage, join
from pipelines import exact_dedup, near_dedup
from pipelines.filters import FilterReport, build_chain
from pipelines.normalize import normalize_batch
from pipelines.readers import ROW_COLUMNS, input_items, parse_file
from pipelines.shard import write_domain_shards
from pipelines.tokenize import special_ids, tokenize_batch, tokenizer_sha256, train_tokenizer

log = logging.getLogger(__name__)

PARSED_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in ROW_COLUMNS])
MARK_COLUMNS = ("drop_reason", "drop_detail")
MAX_READ_BLOCKS = 1024


class PipelineError(MaskmixError):
    pass


# --------------------------------------------------------------------------- batch helpers


def _cast_parsed(batch: pa.Table) -> pa.Table:
    return pa.table({c: batch.column(c).cast(pa.string()) if c in batch.column_names
                     else pa.nulls(batch.num_rows, pa.string()) for c in ROW_COLUMNS}, schema=PARSED_SCHEMA)


def _good_documents(batch: pa.Table) -> pa.Table:
    good = batch.filter(pc.is_null(batch.column("reason")))
    return good.select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA)


def _quarantined(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch.column("reason")))
    return bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


def _ensure_marks(batch: pa.Table) -> pa.Table:
    for col in MARK_COLUMNS:
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(batch.num_rows, pa.string()))
    return batch


def _kept(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("drop_reason"))).drop_columns(list(MARK_COLUMNS))


def _removed_records(batch: pa.Table, stage: str) -> pa.Table:
    gone = batch.filter(pc.is_valid(batch.column("drop_reason")))
    return pa.table({
        "doc_id": gone.column("id"), "domain": gone.column("domain"),
        "stage": pa.array([stage] * gone.num_rows, pa.string()),
        "reason": gone.column("drop_reason"), "detail": gone.column("drop_detail"),
    }, schema=REMOVED_SCHEMA)


def _mark_ids(batch: pa.Table, ids: pa.Array, reason: str, detail: dict[str, str]) -> pa.Table:
    hit = pc.is_in(batch.column("id"), value_set=ids)
    doc_ids = batch.column("id").to_pylist()
    reasons = pa.array([reason if h else None for h in hit.to_pylist()], pa.string())
    details = pa.array([detail.get(d) if h else None for d, h in zip(doc_ids, hit.to_pylist())], pa.string())
    return batch.append_column("drop_reason", reasons).append_column("drop_detail", details)


def _mark_duplicate_ids(group: pa.Table) -> pa.Table:
    """Two records with one id cannot both be kept: the first by source wins, the rest are removed."""
    group = group.sort_by("source")
    first = group.column("source")[0].as_py()
    dup = [i > 0 for i in range(group.num_rows)]
    return group.append_column("drop_reason", pa.array(["duplicate_id" if d else None for d in dup], pa.string())) \
                .append_column("drop_detail", pa.array([first if d else None for d in dup], pa.string()))


def _count_by_domain(batch: pa.Table) -> pa.Table:
    counts = batch.group_by("domain").aggregate([("domain", "count")])
    return counts.rename_columns(["domain", "n"])


def _domain_counts(ds: ray.data.Dataset) -> dict[str, int]:
    """Documents per domain: counted per block and summed here (no shuffle needed)."""
    totals: Counter = Counter()
    for row in ds.map_batches(_count_by_domain, batch_format="pyarrow").take_all():
        totals[row["domain"]] += row["n"]
    return dict(sorted(totals.items()))


def _filter_report_rows(batch: pa.Table, examples: int) -> pa.Table:
    """One row per block: that block's filter counters as JSON (summed on the driver)."""
    return pa.table({"report": [FilterReport.from_batch(batch, examples).to_json()]})


# --------------------------------------------------------------------------- the pipeline


class CorpusPipeline:
    """One run of the pipeline; each ``_stage`` method takes the documents and returns the kept ones."""

    def __init__(self, cfg: PipelineConfig, storage_cfg: StorageConfig | None = None,
                 progress: Callable[[str], None] = print):
        self.cfg = cfg
        self.storage_cfg = storage_cfg
        self.storage = Storage(storage_cfg)
        self.out = cfg.output_dir
        self.progress = progress
        self.stages: list[StageStats] = []

    def _uri(self, *parts: str) -> str:
        return join(self.out, *parts)

    def _write_table(self, table: pa.Table, *parts: str) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.storage.write_bytes(self._uri(*parts), sink.getvalue().to_pybytes())

    def _write_dataset(self, ds: ray.data.Dataset, schema: pa.Schema, *parts: str) -> int:
        """Write a (small) record dataset as one Parquet file; returns the number of rows."""
        batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=65536) if b.num_rows]
        table = pa.concat_tables([b.cast(schema) for b in batches]) if batches else schema.empty_table()
        self._write_table(table, *parts)
        return table.num_rows

    def _record(self, name: str, before: dict[str, int], marked: ray.data.Dataset, started: float,
                extra: dict | None = None) -> ray.data.Dataset:
        """Split a marked dataset into kept rows, write the removed ones, record the stage's stats."""
        marked = marked.map_batches(_ensure_marks, batch_format="pyarrow").materialize()
        removed = marked.map_batches(_removed_records, batch_format="pyarrow", fn_kwargs={"stage": name})
        n_removed = self._write_dataset(removed, REMOVED_SCHEMA, "removed", f"{name}.parquet")
        by_reason: Counter = Counter()
        for batch in marked.select_columns(["drop_reason"]).iter_batches(batch_format="pyarrow"):
            by_reason.update(r for r in batch.column("drop_reason").to_pylist() if r is not None)
        kept = marked.map_batches(_kept, batch_format="pyarrow").materialize()
        after = _domain_counts(kept) if n_removed else dict(before)
        stats = StageStats(
            name=name, docs_in=sum(before.values()), docs_out=sum(after.values()), removed=dict(by_reason),
            extra={"per_domain_in": before, "per_domain_out": after,
                   "seconds": round(time.perf_counter() - started, 3), **(extra or {})},
        )
        self._add_stage(stats)
        return kept

    def _add_stage(self, stats: StageStats) -> None:
        self.stages.append(stats)
        removed = ", ".join(f"{k}={v}" for k, v in sorted(stats.removed.items())) or "none removed"
        self.progress(f"[pipeline] {stats.name:<18} {stats.docs_in:>7} -> {stats.docs_out:>7} docs  ({removed})")
        tracking.log_metrics({f"{stats.name}/docs_in": stats.docs_in, f"{stats.name}/docs_out": stats.docs_out,
                              **{f"{stats.name}/removed/{k}": v for k, v in stats.removed.items()}})

    # ------------------------------------------------------------------ stages

    def read(self) -> ray.data.Dataset:
        started = time.perf_counter()
        items = input_items(self.cfg.inputs, self.storage)
        present = {item["input_index"] for item in items}
        for index, spec in enumerate(self.cfg.inputs):
            if index not in present:
                raise PipelineError(f"input {spec.path!r} holds no files to read as format {spec.format!r} "
                                    "(.jsonl/.json(.gz/.zst), .parquet, an HF save_to_disk folder, or text)")
        self.progress(f"[pipeline] reading {len(items)} file(s)")
        # One file per block up to a cap: a folder of 100k small text files must not make 100k blocks.
        parsed = (ray.data.from_items(items, override_num_blocks=min(len(items), MAX_READ_BLOCKS))
                  .flat_map(parse_file, fn_kwargs={"specs": self.cfg.inputs, "storage_cfg": self.storage_cfg})
                  .map_batches(_cast_parsed, batch_format="pyarrow")
                  .materialize())
        n_quarantined = self._write_dataset(parsed.map_batches(_quarantined, batch_format="pyarrow"),
                                            QUARANTINE_SCHEMA, "quarantine", "quarantine.parquet")
        by_reason: Counter = Counter()
        for batch in parsed.select_columns(["reason"]).iter_batches(batch_format="pyarrow"):
            by_reason.update(r for r in batch.column("reason").to_pylist() if r is not None)
        docs = parsed.map_batches(_good_documents, batch_format="pyarrow").materialize()
        counts = _domain_counts(docs)
        self._add_stage(StageStats(
            name="read", docs_in=parsed.count(), docs_out=sum(counts.values()), removed=dict(by_reason),
            extra={"files": len(items), "quarantined": n_quarantined, "per_domain_out": counts,
                   "seconds": round(time.perf_counter() - started, 3)},
        ))
        # Ids must be unique from here on (dedup and shards key on them).
        started = time.perf_counter()
        marked = docs.groupby("id").map_groups(_mark_duplicate_ids, batch_format="pyarrow")
        return self._record("unique_ids", counts, marked, started)

    def normalize(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        return docs.map_batches(normalize_batch, batch_format="pyarrow", fn_kwargs={"cfg": self.cfg.normalize})

    def quality_filter(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        """The filter chain (pipelines/filters) in one ``map_batches`` pass.

        The stage is named ``quality_filter`` when a published filter is on, and keeps its old
        name ``word_count_filter`` when only the legacy word count runs. Its stats carry the
        filter report (removals per rule and domain, example ids, C4 lines removed, what
        annotate-mode filters would remove), also logged to MLflow as filters/report.json;
        annotate-mode scores go to ``filters/scores.parquet`` (doc id, domain, one column each).
        """
        started, before = time.perf_counter(), _domain_counts(docs)
        chain = build_chain(self.cfg.filters, self.cfg.word_count_filter)
        chain.track_report = False
        name = "quality_filter" if any(f.name != "word_count" for f in chain.filters) else "word_count_filter"
        marked = docs.map_batches(chain, batch_format="pyarrow").materialize()
        report = FilterReport(examples_per_rule=chain.examples_per_rule)
        for row in marked.map_batches(_filter_report_rows, batch_format="pyarrow",
                                      fn_kwargs={"examples": chain.examples_per_rule}).take_all():
            report.merge(FilterReport.from_dict(json.loads(row["report"])))
        added = chain.added_columns()
        scores = {c: t for c, t in added.items() if ".lines." not in c}
        if scores:
            schema = pa.schema([pa.field("doc_id", pa.string()), pa.field("domain", pa.string()),
                                *(pa.field(c, t) for c, t in scores.items())])
            table = marked.select_columns(["id", "domain", *scores]).map_batches(
                lambda b: b.rename_columns(["doc_id", *b.column_names[1:]]), batch_format="pyarrow")
            self._write_dataset(table, schema, "filters", "scores.parquet")
        if added:
            marked = marked.drop_columns(list(added))
        summary = report.to_dict()
        tracking.log_json(summary, "filters/report.json")
        tracking.log_metrics({f"{name}/removed/{r}": n for r, n in summary["removed_total"].items()})
        extra = {"filters": chain.names, "word_tokenizer": chain.word_tokenizer, "filter_report": summary}
        return self._record(name, before, marked, started, extra)

    def exact_dedup(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        started, before = time.perf_counter(), _domain_counts(docs)
        return self._record("exact_dedup", before, exact_dedup.mark_exact_duplicates(docs), started)

    def near_dedup(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        started, before = time.perf_counter(), _domain_counts(docs)
        # The work dir holds resumable per-phase state (see pipelines/near_dedup.py); documents
        # carrying a float `quality` column get the best-quality survivor.
        result = near_dedup.find_clusters(docs, self.cfg.near_dedup, self._uri("dedup", "work"), self.storage_cfg)
        clusters, report = result.clusters, result.report
        self._write_table(clusters, "dedup", "clusters.parquet")
        dropped = clusters.filter(pc.invert(clusters.column("kept")))
        kept_of = dict(zip(dropped.column("doc_id").to_pylist(), dropped.column("kept_doc_id").to_pylist()))
        marked = docs.map_batches(_mark_ids, batch_format="pyarrow", fn_kwargs={
            "ids": dropped.column("doc_id").combine_chunks(), "reason": "near_duplicate", "detail": kept_of})
        tracking.log_json(report, "near_dedup/report.json")
        precision = report["precision"]["estimate"]
        tracking.log_metrics({"near_dedup/clusters": report["clusters"],
                              "near_dedup/giant_buckets": report["giant_buckets"],
                              "near_dedup/matched_index": report["matched_index"],
                              **({"near_dedup/precision_estimate": precision} if precision is not None else {})})
        extra = {"clusters": report["clusters"], "cluster_sizes": report["cluster_sizes"],
                 "bands": self.cfg.near_dedup.bands, "rows": self.cfg.near_dedup.rows, "report": report}
        return self._record("near_dedup", before, marked, started, extra)

    def tokenizer(self, docs: ray.data.Dataset) -> tuple[str, TokenizerInfo]:
        """Train (or load) the tokenizer; returns its JSON and its manifest entry."""
        from tokenizers import Tokenizer

        tcfg = self.cfg.tokenizer
        if tcfg.path:
            tok_json = self.storage.read_bytes(tcfg.path).decode()
            where = tcfg.path
        else:
            # A deterministic sample across domains: the documents with the smallest id hashes.
            sample = (docs.map_batches(_add_sample_key, batch_format="pyarrow")
                      .sort("sample_key").limit(tcfg.train_docs)
                      .select_columns(["text"]).take_all())
            self.progress(f"[pipeline] training BPE tokenizer (vocab {tcfg.vocab_size}) on {len(sample)} docs")
            tok_json = train_tokenizer([r["text"] for r in sample], tcfg).to_str()
            where = "trained tokenizer"
        tok = Tokenizer.from_str(tok_json)
        self.storage.write_bytes(self._uri("tokenizer.json"), tok_json.encode())
        info = TokenizerInfo(path="tokenizer.json", sha256=tokenizer_sha256(tok_json),
                             vocab_size=tok.get_vocab_size(), special_ids=special_ids(tok, where))
        return tok_json, info

    def tokenize_and_shard(self, docs: ray.data.Dataset, tok_json: str) -> dict[str, DomainShards]:
        started, before = time.perf_counter(), _domain_counts(docs)
        for domain in before:
            self.storage.delete_dir(self._uri("shards", domain))  # a re-run must not leave stale parts
        infos = (docs.map_batches(tokenize_batch, batch_format="pyarrow", fn_kwargs={"tokenizer_json": tok_json})
                 .groupby("domain")
                 .map_groups(write_domain_shards, batch_format="pyarrow",
                             fn_kwargs={"output_dir": self.out, "cfg": self.cfg.shards,
                                        "storage_cfg": self.storage_cfg})
                 .take_all())
        domains: dict[str, list[ShardInfo]] = defaultdict(list)
        for row in sorted(infos, key=lambda r: (r["domain"], r["path"])):
            domains[row.pop("domain")].append(ShardInfo(**row))
        tokens = {d: sum(s.tokens for s in shards) for d, shards in domains.items()}
        self._add_stage(StageStats(
            name="tokenize_shard", docs_in=sum(before.values()),
            docs_out=sum(s.rows for shards in domains.values() for s in shards), removed={},
            extra={"per_domain_in": before, "tokens": tokens, "shards": sum(len(s) for s in domains.values()),
                   "seconds": round(time.perf_counter() - started, 3)},
        ))
        return {d: DomainShards(shards=s) for d, s in domains.items()}

    # ------------------------------------------------------------------ all together

    def run(self) -> tuple[Manifest, str]:
        docs = self.read()
        docs = self.normalize(docs)
        docs = self.quality_filter(docs)
        if self.cfg.exact_dedup:
            docs = self.exact_dedup(docs)
        if self.cfg.near_dedup.enabled:
            docs = self.near_dedup(docs)
        if docs.count() == 0:
            raise PipelineError("no documents survived the filters; see removed/ and quarantine/ for why")
        tok_json, tok_info = self.tokenizer(docs)
        domains = self.tokenize_and_shard(docs, tok_json)
        manifest = Manifest(config_hash=config_hash(self.cfg), mlflow_run_id=tracking.active_run_id(),
                            tokenizer=tok_info, domains=domains, stages=self.stages)
        uri = self._uri(MANIFEST_FILE)
        write_artifact(manifest, uri, self.storage)
        return manifest, uri


def _add_sample_key(batch: pa.Table) -> pa.Table:
    keys = [hashlib.blake2b(i.encode(), digest_size=8).hexdigest() for i in batch.column("id").to_pylist()]
    return batch.append_column("sample_key", pa.array(keys, pa.string()))


def run_pipeline(cfg: PipelineConfig, storage_cfg: StorageConfig | None = None, ray_cfg: RayConfig | None = None,
                 progress: Callable[[str], None] = print) -> tuple[Manifest, str]:
    """Run the whole pipeline as one MLflow run; returns the manifest and where it was written."""
    ensure_ray(ray_cfg)
    params = cfg.model_dump(mode="json")
    with tracking.stage_run("pipeline", params=params, tags={"maskmix.config_hash": config_hash(cfg)}):
        manifest, uri = CorpusPipeline(cfg, storage_cfg, progress).run()
        tracking.log_bytes(Storage(storage_cfg).read_bytes(uri), "manifest.json")
        totals = {f"tokens/{d}": s.tokens("train") for d, s in manifest.domains.items()}
        tracking.log_metrics(totals)
        tracking.set_tags({"maskmix.manifest": uri})
    return manifest, uri
