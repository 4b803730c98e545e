"""The corpus pipeline on Ray Data: read -> normalize -> filter -> exact dedup -> near dedup ->
tokenize -> shard, writing shards + manifest.json (+ quarantine, removed records, clusters).

Each stage annotates rows with ``drop_reason``/``drop_detail`` instead of dropping them; the
pipeline then splits kept rows from removed ones, counts removals per reason and per domain, and
writes every removed document's id and reason under ``removed/<stage>``. Nothing is lost
silently. Output layout (all relative to ``output_dir``, local or s3://):

    manifest.json  tokenizer.json  shards/<domain>/{part,validation}-NNNNN.parquet
    quarantine/    removed/<stage>.parquet    dedup/clusters.parquet    filters/
    _stages/<NN>-<stage>/{data/,_DONE.json}   the stage checkpoints (pipelines/stage_store.py)
    runs/<time>-<mlflow run id>.json          one record per invocation: timings, resumed stages

Streaming: every stage reads the previous stage's checkpoint lazily (``ray.data.read_parquet``)
and streams its marked rows into its own checkpoint (``write_parquet``); nothing holds the corpus
in the object store between stages. The statistics are then read back from the checkpoint's
small columns (id, domain, drop_reason). Exact dedup (a groupby) and near dedup (disk-based
phases, pipelines/near_dedup.py) keep their algorithms.

Resume: a stage whose ``_DONE.json`` fingerprint matches is loaded, not re-run; the first stage
that does not match (or is forced) runs, and so does every stage after it. A run that finds the
final stage done and manifest.json unchanged does nothing.

Determinism: manifest.json is a function of the inputs and the config only -- no wall-clock
time, no MLflow run id, no output_dir (its ``config_hash`` leaves output_dir out) -- so a
resumed run and an uninterrupted one write the same bytes. Timings and the MLflow run id go to
``runs/*.json`` and MLflow (tag ``maskmix.manifest_sha256`` links a run to the manifest it wrote).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
from infra.config import PipelineConfig, RayConfig, StorageConfig
from infra.contracts import (
    DOCUMENT_SCHEMA, MANIFEST_FILE, QUARANTINE_SCHEMA, REMOVED_SCHEMA, DomainShards, Manifest, ShardInfo,
    StageStats, TokenizerInfo, parse_artifact, sha256_bytes, write_artifact,
)
from infra.errors import MaskmixError
from infra.storage import Storage, is_s3, join
from pipelines import exact_dedup, near_dedup
from pipelines.batches import (
    MARK_COLUMNS, MARKED_SCHEMA, PARSED_SCHEMA, add_sample_key, cast_parsed, checkpoint_block, ensure_marks,
    from_ipc, good_documents, kept_rows, mark_duplicate_ids, mark_ids,
)
from pipelines.filters import FilterReport, build_chain
from pipelines.normalize import normalize_batch
from pipelines.readers import domain_problem, input_items, parse_file
from pipelines.shard import write_domain_shards
from pipelines.stage_store import STAGES, StageMarker, StageStore, fingerprint, input_listing, resolve_force, \
    spec_digest
from pipelines.tokenize import special_ids, tokenize_batch, tokenizer_sha256, train_tokenizer

log = logging.getLogger(__name__)

MAX_READ_BLOCKS = 1024


class PipelineError(MaskmixError):
    pass


def content_config_hash(cfg: PipelineConfig) -> str:
    """The manifest's config hash: every pipeline setting except ``output_dir`` (where the output
    goes is not what it is; two folders built from one config carry the same manifest)."""
    values = cfg.model_dump(mode="json")
    values.pop("output_dir", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- driver helpers


def _merge_filter_reports(rows: list[str], examples: int) -> dict:
    report = FilterReport(examples_per_rule=examples)
    pooled: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        part = FilterReport.from_dict(json.loads(row))
        for r, ex in part.examples.items():
            pooled[r].extend(ex)
        part.examples = defaultdict(list)
        report.merge(part)
    report.examples = defaultdict(list, {r: sorted(v)[:examples] for r, v in pooled.items()})
    return report.to_dict()


def _metric_key(name: str) -> str:
    """MLflow metric keys allow alphanumerics, _ - . / and space; a domain name may hold more."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def summary_table(rows: list[dict]) -> str:
    """The end-of-run table: one line per stage (docs in/out, removed by reason, seconds, resumed)."""
    lines = [f"{'stage':<18} {'docs in':>9} {'docs out':>9} {'seconds':>8} {'resumed':>8}  removed"]
    for r in rows:
        removed = ", ".join(f"{k}={v}" for k, v in sorted(r["removed"].items())) or "-"
        seconds = "-" if r["resumed"] else f"{r['seconds']:.2f}"
        out = "-" if r["docs_out"] is None else str(r["docs_out"])
        lines.append(f"{r['stage']:<18} {r['docs_in']:>9} {out:>9} {seconds:>8} "
                     f"{'yes' if r['resumed'] else 'no':>8}  {removed}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pipeline


class CorpusPipeline:
    """One run of the pipeline over its stage checkpoints.

    Each stage method takes the documents (a lazy dataset) and returns the kept ones, read back
    lazily from the stage's checkpoint. ``_stage`` decides per stage whether to load a finished
    checkpoint or to run it; ``force`` (a stage name) re-does that stage and all after it.
    """

    def __init__(self, cfg: PipelineConfig, storage_cfg: StorageConfig | None = None,
                 progress: Callable[[str], None] = print, force: str | list[str] | None = None):
        self.cfg = cfg
        self.storage_cfg = storage_cfg
        self.storage = Storage(storage_cfg)
        self.out = cfg.output_dir
        self.progress = progress
        self.force = resolve_force([force] if isinstance(force, str) else force)
        self.store = StageStore(self.out, self.storage, storage_cfg)
        self.stages: list[StageStats] = []
        self.summary: list[dict] = []
        self.executing = False  # once one stage runs, every later stage runs too
        self._items: list[dict] | None = None
        self._listing: list[dict] | None = None
        self._fps: dict[str, str] | None = None
        self._started = 0.0  # perf_counter when the running stage began
        self.counts: dict[str, int] = {}  # documents per domain after the last stage
        self.manifest: Manifest | None = None

    def _uri(self, *parts: str) -> str:
        return join(self.out, *parts)

    def _write_table(self, table: pa.Table, *parts: str) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.storage.write_bytes(self._uri(*parts), sink.getvalue().to_pybytes())

    def _write_sorted(self, table: pa.Table, sort: list[str], *parts: str) -> pa.Table:
        """Write a (small) record table as one Parquet file, sorted so that re-runs write the same bytes."""
        table = table.sort_by([(c, "ascending") for c in sort]) if table.num_rows else table
        self._write_table(table, *parts)
        return table

    def _checkpoint(self, ds: ray.data.Dataset, key: str, stage: str, **kwargs) -> dict:
        """Stream ``ds`` into the stage's checkpoint (one file per block); returns the merged block summaries."""
        rows = ds.map_batches(checkpoint_block, batch_format="pyarrow", batch_size=None, fn_kwargs={
            "folder": self.store.data_uri(key), "storage_cfg": self.storage_cfg, "stage": stage, **kwargs}).take_all()
        counts: Counter = Counter()
        for r in rows:
            counts.update(json.loads(r["counts"]))
        return {"rows": sum(r["rows"] for r in rows), "counts": dict(sorted(counts.items())),
                "removed": [r["removed"] for r in rows], "reports": [r["report"] for r in rows if r["report"]],
                "scores": [r["scores"] for r in rows]}

    # ------------------------------------------------------------------ fingerprints

    def input_items(self) -> list[dict]:
        if self._items is None:
            for index, spec in enumerate(self.cfg.inputs):
                # A configured domain names the shard folder of every record of its input: refuse an
                # unsafe one before any work starts (one clear error, not thousands of quarantined rows).
                problem = domain_problem(spec.domain) if spec.domain else None
                if problem:
                    raise PipelineError(f"pipeline.inputs.{index}.domain: {problem}")
            try:
                items = input_items(self.cfg.inputs, self.storage)
            except FileNotFoundError as e:  # a configured input that is not there: one clear error, exit 2
                raise PipelineError(f"pipeline.inputs: {e}") from None
            present = {item["input_index"] for item in items}
            for index, spec in enumerate(self.cfg.inputs):
                if index not in present:
                    raise PipelineError(f"input {spec.path!r} holds no files to read as format {spec.format!r} "
                                        "(.jsonl/.json(.gz/.zst), .parquet, an HF save_to_disk folder, or text)")
            self._items = items
            self._listing = input_listing(items, self.storage)
        return self._items

    def fingerprints(self) -> dict[str, str]:
        """Each stage's fingerprint: its upstream's, the config it reads, for ``read`` the input files."""
        if self._fps is None:
            self.input_items()
            c = self.cfg.model_dump(mode="json")
            tok = dict(c["tokenizer"])
            if self.cfg.tokenizer.path:  # a given tokenizer file is an input: its bytes count
                tok["file_sha256"] = sha256_bytes(self.storage.read_bytes(self.cfg.tokenizer.path))
            fps: dict[str, str] = {}
            fps["read"] = fingerprint("read", c["inputs"], self._listing)
            fps["unique_ids"] = fingerprint("unique_ids", fps["read"])
            fps["quality_filter"] = fingerprint("quality_filter", fps["unique_ids"], c["normalize"], c["filters"],
                                                c["word_count_filter"])
            fps["exact_dedup"] = fingerprint("exact_dedup", fps["quality_filter"], c["exact_dedup"])
            # Where near-dedup runs (in-process or on Ray) does not change its output (tested row for
            # row), so switching engines or their size limits must not redo the stage and all after it.
            near = {k: v for k, v in c["near_dedup"].items() if k not in ("engine", "local_max_docs", "local_max_bytes")}
            fps["near_dedup"] = fingerprint("near_dedup", fps["exact_dedup"], near)
            fps["tokenizer"] = fingerprint("tokenizer", fps["near_dedup"], tok)
            fps["tokenize_shard"] = fingerprint("tokenize_shard", fps["tokenizer"], c["shards"])
            self._fps = fps
        return self._fps

    # ------------------------------------------------------------------ stage bookkeeping

    def _stage(self, key: str, run: Callable[[], StageMarker], valid: Callable[[StageMarker], bool] | None = None
               ) -> StageMarker:
        """Load the stage's finished checkpoint, or run it; returns its marker. ``self.counts`` becomes
        the stage's documents per domain."""
        fp = self.fingerprints()[key]
        forced = self.force is not None and STAGES.index(key) >= STAGES.index(self.force)
        if not (self.executing or forced):
            marker = self.store.finished(key, fp)
            if marker is not None and (valid is None or valid(marker)):
                self.progress(f"[pipeline] {key:<18} resumed (finished stage {self.store.folder_name(key)}, "
                              f"fingerprint {fp[:12]})")
                for stats in marker.stats:
                    self._add_stage(StageStats(**stats), resumed=True)
                if not marker.stats:  # the tokenizer: a summary line without stats
                    self.summary.append({"stage": key, "docs_in": marker.meta.get("docs", 0), "docs_out": None,
                                         "removed": {}, "seconds": 0.0, "resumed": True})
                self._set_counts(marker)
                return marker
        if not self.executing:
            self.store.invalidate_from(key)  # this stage and every later one start from scratch
            self.executing = True
        self._started = time.perf_counter()
        marker = run()
        marker.fingerprint = fp
        marker.seconds = self._elapsed()
        marker.mlflow_run_id = tracking.active_run_id()
        self.store.commit(marker)
        self._set_counts(marker)
        return marker

    def _skip(self, key: str) -> None:
        """A disabled stage: no checkpoint (a stale one from an earlier config is removed)."""
        self.storage.delete_dir(self.store.folder(key))

    def _add_stage(self, stats: StageStats, resumed: bool = False, seconds: float = 0.0) -> None:
        self.stages.append(stats)
        self.summary.append({"stage": stats.name, "docs_in": stats.docs_in, "docs_out": stats.docs_out,
                             "removed": dict(stats.removed), "seconds": seconds, "resumed": resumed})
        if not resumed:
            removed = ", ".join(f"{k}={v}" for k, v in sorted(stats.removed.items())) or "none removed"
            self.progress(f"[pipeline] {stats.name:<18} {stats.docs_in:>7} -> {stats.docs_out:>7} docs  ({removed})")
        name = stats.name
        per_domain = {f"{name}/docs_out/{_metric_key(d)}": n
                      for d, n in stats.extra.get("per_domain_out", {}).items()}
        per_domain.update({f"{name}/docs_in/{_metric_key(d)}": n
                           for d, n in stats.extra.get("per_domain_in", {}).items()})
        tracking.log_metrics({f"{name}/docs_in": stats.docs_in, f"{name}/docs_out": stats.docs_out,
                              **{f"{name}/removed/{_metric_key(k)}": v for k, v in stats.removed.items()},
                              **per_domain})
        self._log_stage_reports(stats)

    @staticmethod
    def _log_stage_reports(stats: StageStats) -> None:
        """The stage's reports as MLflow artifacts/metrics (also for a resumed stage: every run is complete)."""
        if "filter_report" in stats.extra:
            summary = stats.extra["filter_report"]
            tracking.log_json(summary, "filters/report.json")
            tracking.log_metrics({f"{stats.name}/removed/{_metric_key(r)}": n
                                  for r, n in summary["removed_total"].items()})
        if stats.name == "near_dedup" and "report" in stats.extra:
            report = stats.extra["report"]
            tracking.log_json(report, "near_dedup/report.json")
            precision = report["precision"]["estimate"]
            tracking.log_metrics({"near_dedup/clusters": report["clusters"],
                                  "near_dedup/giant_buckets": report["giant_buckets"],
                                  "near_dedup/matched_index": report["matched_index"],
                                  **({"near_dedup/precision_estimate": precision} if precision is not None else {})})

    def _elapsed(self) -> float:
        return round(time.perf_counter() - self._started, 3)

    def _docs(self, key: str, marker: StageMarker) -> ray.data.Dataset:
        """The kept documents of a finished stage, read lazily from its checkpoint."""
        columns = marker.meta["columns"]
        if key == "read":
            return self.store.read(key, empty_schema=PARSED_SCHEMA).map_batches(good_documents,
                                                                                batch_format="pyarrow")
        schema = pa.schema([*(MARKED_SCHEMA.field(c) if c in MARKED_SCHEMA.names else pa.field(c, pa.string())
                              for c in columns), MARKED_SCHEMA.field("drop_reason")])
        return self.store.read(key, columns=[*columns, "drop_reason"], empty_schema=schema) \
                   .map_batches(kept_rows, batch_format="pyarrow")

    def _finish_marked(self, key: str, name: str, marked: ray.data.Dataset, before: dict[str, int],
                       extra: dict | None = None) -> StageMarker:
        """Stream the marked rows into the stage checkpoint, then record the removed rows and the stats."""
        summary = self._checkpoint(marked.map_batches(ensure_marks, batch_format="pyarrow"), key, name)
        return self._marked_stats(key, name, summary, before, extra)

    def _marked_stats(self, key: str, name: str, summary: dict, before: dict[str, int], extra: dict | None = None,
                      drop: tuple[str, ...] = ()) -> StageMarker:
        """Write ``removed/<name>.parquet`` and record the stage's stats; ``drop``: checkpoint columns the
        next stage does not get (annotate-mode scores)."""
        removed = self._write_sorted(from_ipc(summary["removed"], REMOVED_SCHEMA), ["doc_id"],
                                     "removed", f"{name}.parquet")
        schema = self.store.schema(key)
        columns = [c for c in (schema.names if schema else DOCUMENT_SCHEMA.names)
                   if c not in MARK_COLUMNS and c not in drop]
        after = summary["counts"]
        stats = StageStats(
            name=name, docs_in=sum(before.values()), docs_out=sum(after.values()),
            removed=dict(sorted(Counter(removed.column("reason").to_pylist()).items())),
            extra={"per_domain_in": dict(before), "per_domain_out": after, **(extra or {})},
        )
        self._add_stage(stats, seconds=self._elapsed())
        return StageMarker(stage=key, fingerprint="", stats=[stats.model_dump(mode="json")], meta={"columns": columns})

    def _set_counts(self, marker: StageMarker) -> None:
        if marker.stats and "per_domain_out" in marker.stats[-1]["extra"]:
            self.counts = dict(marker.stats[-1]["extra"]["per_domain_out"])

    # ------------------------------------------------------------------ stages

    def read(self) -> ray.data.Dataset:
        """Parse every input file (quarantining bad records), then make ids unique."""
        docs = self._docs("read", self._stage("read", self._run_read))
        # Ids must be unique from here on (dedup and shards key on them).
        marked = docs.groupby("id").map_groups(mark_duplicate_ids, batch_format="pyarrow")
        return self._docs("unique_ids", self._stage("unique_ids", lambda: self._finish_marked(
            "unique_ids", "unique_ids", marked, self.counts)))

    def _run_read(self) -> StageMarker:
        items = self.input_items()
        self.progress(f"[pipeline] reading {len(items)} file(s)")
        # One file per block up to a cap: a folder of 100k small text files must not make 100k blocks.
        parsed = (ray.data.from_items(items, override_num_blocks=min(len(items), MAX_READ_BLOCKS))
                  .flat_map(parse_file, fn_kwargs={"specs": self.cfg.inputs, "storage_cfg": self.storage_cfg})
                  .map_batches(cast_parsed, batch_format="pyarrow"))
        summary = self._checkpoint(parsed, "read", "read")
        quarantine = self._write_sorted(from_ipc(summary["removed"], QUARANTINE_SCHEMA), ["source", "reason"],
                                        "quarantine", "quarantine.parquet")
        counts = summary["counts"]
        by_reason = Counter(quarantine.column("reason").to_pylist())
        stats = StageStats(
            name="read", docs_in=sum(counts.values()) + quarantine.num_rows, docs_out=sum(counts.values()),
            removed=dict(sorted(by_reason.items())),
            extra={"files": len(items), "quarantined": quarantine.num_rows, "per_domain_out": counts},
        )
        self._add_stage(stats, seconds=self._elapsed())
        return StageMarker(stage="read", fingerprint="", stats=[stats.model_dump(mode="json")],
                           meta={"columns": DOCUMENT_SCHEMA.names})

    def quality_filter(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        """Normalization, then the filter chain (pipelines/filters) in one streaming ``map_batches`` pass.

        The stage is named ``quality_filter`` when a published filter is on, and keeps its old
        name ``word_count_filter`` when only the legacy word count runs. Its stats carry the
        filter report (removals per rule and domain, example ids, C4 lines removed, what
        annotate-mode filters would remove), also logged to MLflow as filters/report.json;
        annotate-mode scores go to ``filters/scores.parquet`` (doc id, domain, one column each).
        """
        return self._docs("quality_filter", self._stage("quality_filter",
                                                        lambda: self._run_quality_filter(docs, self.counts)))

    def normalize(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        return docs.map_batches(normalize_batch, batch_format="pyarrow", fn_kwargs={"cfg": self.cfg.normalize})

    def _run_quality_filter(self, docs: ray.data.Dataset, before: dict[str, int]) -> StageMarker:
        chain = build_chain(self.cfg.filters, self.cfg.word_count_filter)
        chain.track_report = False
        name = "quality_filter" if any(f.name != "word_count" for f in chain.filters) else "word_count_filter"
        added = chain.added_columns()
        scores = tuple(c for c in added if ".lines." not in c)
        marked = self.normalize(docs).map_batches(chain, batch_format="pyarrow") \
                     .map_batches(ensure_marks, batch_format="pyarrow")
        summary = self._checkpoint(marked, "quality_filter", name, examples=chain.examples_per_rule, scores=scores)
        if scores:
            score_schema = pa.schema([pa.field("doc_id", pa.string()), pa.field("domain", pa.string()),
                                      *(pa.field(c, added[c]) for c in scores)])
            self._write_sorted(from_ipc(summary["scores"], score_schema), ["doc_id"], "filters", "scores.parquet")
        extra = {"filters": chain.names, "word_tokenizer": chain.word_tokenizer,
                 "filter_report": _merge_filter_reports(summary["reports"], chain.examples_per_rule)}
        return self._marked_stats("quality_filter", name, summary, before, extra, drop=tuple(added))

    def exact_dedup(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        return self._docs("exact_dedup", self._stage("exact_dedup", lambda: self._finish_marked(
            "exact_dedup", "exact_dedup", exact_dedup.mark_exact_duplicates(docs), self.counts)))

    def near_dedup(self, docs: ray.data.Dataset) -> ray.data.Dataset:
        return self._docs("near_dedup", self._stage("near_dedup", lambda: self._run_near_dedup(docs, self.counts)))

    def _run_near_dedup(self, docs: ray.data.Dataset, before: dict[str, int]) -> StageMarker:
        # The work dir holds resumable per-phase state (see pipelines/near_dedup.py); documents
        # carrying a float `quality` column get the best-quality survivor. A small input (the
        # stage's document count against near_dedup.local_max_docs, then its text bytes) is
        # read into the driver and deduplicated there (pipelines/near_dedup_local.py): same decisions.
        result = near_dedup.find_clusters(docs, self.cfg.near_dedup, self._uri("dedup", "work"), self.storage_cfg,
                                          num_docs=sum(before.values()))
        clusters, report = result.clusters, result.report
        self._write_table(clusters, "dedup", "clusters.parquet")
        dropped = clusters.filter(pc.invert(clusters.column("kept")))
        kept_of = dict(zip(dropped.column("doc_id").to_pylist(), dropped.column("kept_doc_id").to_pylist()))
        marked = docs.map_batches(mark_ids, batch_format="pyarrow", fn_kwargs={
            "ids": dropped.column("doc_id").combine_chunks(), "reason": "near_duplicate", "detail": kept_of})
        extra = {"clusters": report["clusters"], "cluster_sizes": report["cluster_sizes"],
                 "bands": self.cfg.near_dedup.bands, "rows": self.cfg.near_dedup.rows, "report": report,
                 "engine": result.engine}
        return self._finish_marked("near_dedup", "near_dedup", marked, before, extra)

    def tokenizer(self, docs: ray.data.Dataset) -> tuple[str, TokenizerInfo]:
        """Train (or load) the tokenizer; returns its JSON and its manifest entry."""
        def valid(marker: StageMarker) -> bool:
            uri = self._uri("tokenizer.json")
            return self.storage.exists(uri) and \
                tokenizer_sha256(self.storage.read_bytes(uri).decode()) == marker.meta["tokenizer"]["sha256"]

        marker = self._stage("tokenizer", lambda: self._run_tokenizer(docs), valid)
        return self.storage.read_bytes(self._uri("tokenizer.json")).decode(), TokenizerInfo(**marker.meta["tokenizer"])

    def _run_tokenizer(self, docs: ray.data.Dataset) -> StageMarker:
        from tokenizers import Tokenizer

        tcfg = self.cfg.tokenizer
        if tcfg.path:
            tok_json = self.storage.read_bytes(tcfg.path).decode()
            where, n_docs = tcfg.path, 0
        else:
            # A deterministic sample across domains: the documents with the smallest id hashes.
            sample = (docs.map_batches(add_sample_key, batch_format="pyarrow")
                      .sort("sample_key").limit(tcfg.train_docs)
                      .select_columns(["text"]).take_all())
            self.progress(f"[pipeline] training BPE tokenizer (vocab {tcfg.vocab_size}) on {len(sample)} docs")
            tok_json = train_tokenizer([r["text"] for r in sample], tcfg).to_str()
            where, n_docs = "trained tokenizer", len(sample)
        tok = Tokenizer.from_str(tok_json)
        self.storage.write_bytes(self._uri("tokenizer.json"), tok_json.encode())
        info = TokenizerInfo(path="tokenizer.json", sha256=tokenizer_sha256(tok_json),
                             vocab_size=tok.get_vocab_size(), special_ids=special_ids(tok, where))
        self.summary.append({"stage": "tokenizer", "docs_in": n_docs, "docs_out": None, "removed": {},
                             "seconds": self._elapsed(), "resumed": False})
        return StageMarker(stage="tokenizer", fingerprint="", meta={"tokenizer": info.model_dump(mode="json"), "docs": n_docs})

    def tokenize_and_shard(self, docs: ray.data.Dataset, tok_json: str, tok_info: TokenizerInfo
                           ) -> dict[str, DomainShards]:
        """Tokenize and shard, then write manifest.json (``self.manifest``); the stage's marker records
        the manifest's sha256."""
        self._stage("tokenize_shard", lambda: self._run_shard(docs, self.counts, tok_json, tok_info),
                    lambda marker: self._final_outputs(marker) is not None)
        self.manifest = parse_artifact(Manifest, self.storage.read_bytes(self._uri(MANIFEST_FILE)),
                                       self._uri(MANIFEST_FILE))
        return self.manifest.domains

    def _run_shard(self, docs: ray.data.Dataset, before: dict[str, int], tok_json: str,
                   tok_info: TokenizerInfo) -> StageMarker:
        # manifest.json describes the shards about to be replaced: gone until the new one is written.
        if self.storage.exists(self._uri(MANIFEST_FILE)):
            fs, path = self.storage.filesystem(self._uri(MANIFEST_FILE))
            fs.delete_file(path)
        self.storage.delete_dir(self._uri("shards"))  # a re-run must not leave stale parts
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
        stats = StageStats(
            name="tokenize_shard", docs_in=sum(before.values()),
            docs_out=sum(s.rows for shards in domains.values() for s in shards), removed={},
            extra={"per_domain_in": dict(before), "tokens": tokens, "shards": sum(len(s) for s in domains.values())},
        )
        self._add_stage(stats, seconds=self._elapsed())
        manifest = Manifest(config_hash=content_config_hash(self.cfg), created_at=None, mlflow_run_id=None,
                            tokenizer=tok_info, domains={d: DomainShards(shards=s) for d, s in domains.items()},
                            stages=self.stages)
        sha = write_artifact(manifest, self._uri(MANIFEST_FILE), self.storage)
        return StageMarker(stage="tokenize_shard", fingerprint="", stats=[stats.model_dump(mode="json")],
                           meta={"manifest_sha256": sha, "shards": [s.path for d in domains.values() for s in d]})

    # ------------------------------------------------------------------ all together

    def _final_outputs(self, marker: StageMarker) -> bytes | None:
        """manifest.json's bytes if it is the one the final marker committed and every shard it lists exists."""
        uri = self._uri(MANIFEST_FILE)
        if not self.storage.exists(uri):
            return None
        data = self.storage.read_bytes(uri)
        if sha256_bytes(data) != marker.meta.get("manifest_sha256"):
            return None
        shards = self._uri("shards")
        present = set(self.storage.list_files(shards)) if self.storage.exists(shards) else set()
        return data if all(self._uri(p) in present for p in marker.meta.get("shards", [])) else None

    def up_to_date(self) -> Manifest | None:
        """The finished manifest when the final stage's marker matches and nothing is forced, else None."""
        if self.force is not None:
            return None
        marker = self.store.finished("tokenize_shard", self.fingerprints()["tokenize_shard"])
        data = self._final_outputs(marker) if marker is not None else None
        if data is None:
            return None
        manifest = parse_artifact(Manifest, data, self._uri(MANIFEST_FILE))
        self.summary = [{"stage": s.name, "docs_in": s.docs_in, "docs_out": s.docs_out, "removed": dict(s.removed),
                         "seconds": 0.0, "resumed": True} for s in manifest.stages]
        tokenizer = self.store.marker("tokenizer")
        if tokenizer is not None and len(self.summary) > 1:
            self.summary.insert(len(self.summary) - 1, {"stage": "tokenizer", "docs_in": tokenizer.meta.get("docs", 0),
                                                        "docs_out": None, "removed": {}, "seconds": 0.0,
                                                        "resumed": True})
        return manifest.model_copy(update={"mlflow_run_id": marker.mlflow_run_id})

    def run(self) -> tuple[Manifest, str]:
        docs = self.read()
        docs = self.quality_filter(docs)
        if self.cfg.exact_dedup:
            docs = self.exact_dedup(docs)
        else:
            self._skip("exact_dedup")
        if self.cfg.near_dedup.enabled:
            docs = self.near_dedup(docs)
        else:
            self._skip("near_dedup")
        if sum(self.counts.values()) == 0:
            raise PipelineError("no documents survived the filters; see removed/ and quarantine/ for why")
        tok_json, tok_info = self.tokenizer(docs)
        self.tokenize_and_shard(docs, tok_json, tok_info)
        return self.manifest, self._uri(MANIFEST_FILE)

    # ------------------------------------------------------------------ observability

    def log_inputs(self) -> None:
        """One MLflow dataset input per configured input: source = its path/URI, name = its domain."""
        import mlflow

        if mlflow.active_run() is None:
            return
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        self.input_items()
        for index, spec in enumerate(self.cfg.inputs):
            files = [e for e in self._listing if e["input"] == index]
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(spec.path if is_s3(spec.path) else os.path.abspath(spec.path))
            dataset = MetaDataset(source=source, name=spec.domain or f"input-{index}",
                                  digest=spec_digest(spec, self._listing, index))
            mlflow.log_input(dataset, context="pipeline_input", tags={
                "files": str(len(files)), "bytes": str(sum(e.get("size") or 0 for e in files)),
                "format": spec.format, **({"domain_field": spec.domain_field} if not spec.domain else {})})

    def run_record(self, manifest: Manifest | None, status: str, started_at: float) -> dict:
        return {
            "mlflow_run_id": tracking.active_run_id(), "status": status,
            "started_at": round(started_at, 3), "finished_at": round(time.time(), 3),
            "output_dir": self.out, "config_hash": content_config_hash(self.cfg), "forced_from": self.force,
            "manifest_sha256": sha256_bytes(self.storage.read_bytes(self._uri(MANIFEST_FILE)))
            if manifest is not None else None,
            "stages": self.summary,
        }

    def write_run_record(self, record: dict) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(record["started_at"]))
        uri = self._uri("runs", f"{stamp}-{record['mlflow_run_id'] or 'no-mlflow'}.json")
        self.storage.write_bytes(uri, json.dumps(record, indent=1, sort_keys=True).encode())
        return uri


def run_pipeline(cfg: PipelineConfig, storage_cfg: StorageConfig | None = None, ray_cfg: RayConfig | None = None,
                 progress: Callable[[str], None] = print, force: str | list[str] | None = None,
                 progress_bars: bool = False) -> tuple[Manifest, str]:
    """Run (or resume) the pipeline as one MLflow run; returns the manifest and where it was written.

    A pipeline whose every stage already finished with this config and these inputs does nothing
    (no MLflow run either) and says so. ``force`` names stages (or "all") to redo, with all that
    follow them. The returned manifest carries ``mlflow_run_id`` of the run that wrote it; the file
    does not (see the module docstring).
    """
    pipeline = CorpusPipeline(cfg, storage_cfg, progress, force)
    done = pipeline.up_to_date()
    if done is not None:
        progress(f"[pipeline] up to date: {pipeline._uri(MANIFEST_FILE)} matches the inputs and the config; "
                 "nothing to do (--force STAGE redoes a stage)")
        progress(summary_table(pipeline.summary))
        return done, pipeline._uri(MANIFEST_FILE)
    ensure_ray(ray_cfg)
    ctx = ray.data.DataContext.get_current()
    bars = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    if progress_bars:
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = True
    started_at = time.time()
    params = cfg.model_dump(mode="json")
    try:
        with tracking.stage_run("pipeline", params=params,
                                tags={"maskmix.config_hash": content_config_hash(cfg)}) as run:
            pipeline.log_inputs()
            try:
                manifest, uri = pipeline.run()
            except BaseException:
                pipeline.write_run_record(pipeline.run_record(None, "failed", started_at))
                raise
            record = pipeline.run_record(manifest, "finished", started_at)
            pipeline.write_run_record(record)
            table = summary_table(pipeline.summary)
            progress(table)
            data = Storage(storage_cfg).read_bytes(uri)
            tracking.log_bytes(data, "manifest.json")
            tracking.log_json(record, "pipeline/run.json")
            tracking.log_text(table + "\n", "pipeline/summary.txt")
            tracking.log_metrics({f"tokens/{_metric_key(d)}": s.tokens("train") for d, s in manifest.domains.items()})
            tracking.set_tags({"maskmix.manifest": uri, "maskmix.manifest_sha256": record["manifest_sha256"],
                               "maskmix.resumed_stages": ",".join(r["stage"] for r in pipeline.summary
                                                                  if r["resumed"]) or "none"})
            manifest = manifest.model_copy(update={"mlflow_run_id": run.info.run_id if run else None})
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = bars
    return manifest, uri
