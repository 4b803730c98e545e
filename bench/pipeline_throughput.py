#!/usr/bin/env python
"""Full-pipeline throughput on 2 cores: maskmix's corpus pipeline vs the same quality filters in datatrove.

Corpus: the demo corpus (pipelines.demo_corpus.harvest: stdlib code, pydoc reference topics,
installed READMEs and license files). `maskmix demo` caps it at 1 MB per domain (~400 docs, 3.5
MB), where Ray's fixed costs dominate a 2-core run; by default this bench harvests ALL of it (no
per-domain cap: ~1,400 docs, ~16 MB here, 12 MB of it stdlib code), --demo-bytes N caps each
domain at N bytes. Nothing repeated, nothing synthetic. Written once as ``cores`` JSONL shards
(id, domain, text) of near-equal bytes (longest-first to the lighter shard); every system reads
those same shards itself.

Systems, each in its own subprocess per round (peak memory = the sum of RSS over the process
tree, sampled every 0.1 s; Ray's raylet/GCS/workers and the process pools are children of it):
  full        maskmix's whole pipeline, ``pipelines.run.run_pipeline`` used as a black box:
              read -> normalize -> quality filters -> exact dedup -> near dedup -> tokenizer +
              tokenize -> shard, on embedded Ray with num_cpus = cores, MLflow logging to a temp
              sqlite store (configured before the clock starts). Filters: the four published ones
              ON in filter mode with their defaults (= datatrove 0.10.1's); the legacy whitespace
              word-count rule OFF (datatrove's chain has no such step). ``seconds`` INCLUDES
              starting Ray (``startup_s``); ``seconds_without_startup`` is the rest.
  filters     maskmix's filter chain alone (pipelines.filters.build_chain, same four filters, same
              settings): a process pool of ``cores`` workers (start method = datatrove's,
              forkserver), each reading one shard (stdlib json), ``FilterChain.apply`` on batches
              of --batch rows, writing its kept documents as JSONL. The apples-to-apples filter
              comparison. Each worker starts with a COLD word cache (a fresh process); the same
              batches are then filtered a second time in the same process and reported apart as
              ``warm`` (chain.apply only), so both numbers are visible.
  datatrove   JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
              FineWebQualityFilter -> JsonlWriter (uncompressed), LocalPipelineExecutor with
              tasks = workers = cores (its default forkserver pool), language "en" (spaCy's blank
              English tokenizer, as shipped; orjson for its JSONL I/O is a dev extra).
Rounds are interleaved (full, filters, datatrove, then the next round in a rotated order) so a
change in machine load hits all alike; rates use each system's median round.

Metrics: docs/s = input documents / seconds; mb_per_s_per_core = input text MB / seconds / cores.
``ratio`` = full pipeline docs/s (start-up included) / datatrove docs/s, as issue 6 defines it;
``ratio_without_startup`` without Ray's start-up; ``filter_ratio`` = filters / datatrove.
``decision_agreement`` = fraction of documents that the ``filters`` system and datatrove both keep
or both drop; ``text_agreement`` = among documents both keep, the fraction whose output text is
identical (C4 rewrites kept documents line by line). The full pipeline's stage table (documents
in/out, seconds per stage, from its manifest) is the profile of where its time goes; --profile
adds a serial, in-process timing of each stage's work on the same documents (no Ray), so the
difference is Ray's scheduling/materialization overhead.

    python bench/pipeline_throughput.py --quick     # ~1 min on an idle 2-core machine, mostly fixed costs
    python bench/pipeline_throughput.py             # the whole demo corpus, 3 rounds: ~10 min
    python bench/pipeline_throughput.py --rounds 1 --profile   # one round + the serial per-stage profile
Ends with one JSON line: {"bench": "pipeline_throughput", "ours_docs_per_s", "datatrove_docs_per_s",
"ratio", "decision_agreement", "filter_ratio", ...}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
             "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded Ray on loopback only, as in tests/conftest.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._measure import measure_child  # noqa: E402

SYSTEMS = ("full", "filters", "datatrove")
FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")  # datatrove's FineWeb order


# =========================================================================== corpus


def build_corpus(folder: Path, demo_bytes: int, cores: int) -> dict:
    """The demo corpus as ``cores`` JSONL shards of near-equal text bytes; returns records and files."""
    from pipelines.demo_corpus import harvest

    harvest(folder / "demo", max_bytes_per_domain=demo_bytes or None)  # 0: everything there is
    records = []
    for f in sorted((folder / "demo").glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            records += [{k: r[k] for k in ("id", "domain", "text")} for r in map(json.loads, fh)]
    shards: list[list[dict]] = [[] for _ in range(cores)]
    load = [0] * cores
    for r in sorted(records, key=lambda r: (-len(r["text"].encode()), r["id"])):
        k = load.index(min(load))
        shards[k].append(r)
        load[k] += len(r["text"].encode())
    (folder / "input").mkdir(parents=True, exist_ok=True)
    files = []
    for k, shard in enumerate(shards):
        path = folder / "input" / f"part-{k:02d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for r in sorted(shard, key=lambda r: r["id"]):
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
        files.append(str(path))
    return {"records": records, "files": files, "shard_bytes": load}


# =========================================================================== the systems (child processes)


def _filters_config():
    from infra.config import FiltersConfig

    return FiltersConfig(**{name: {"enabled": True, "mode": "filter"} for name in FILTERS})


def run_full(spec: dict) -> dict:
    t0 = time.perf_counter()
    import pyarrow.parquet as pq

    from infra import tracking
    from infra.cluster import ensure_ray, shutdown_ray
    from infra.config import InputSpec, PipelineConfig, RayConfig, TrackingConfig, WordCountFilterConfig
    from pipelines.run import run_pipeline

    tracking.configure(TrackingConfig(uri=f"sqlite:///{spec['work']}/mlflow.db", experiment="bench"))
    out = Path(spec["work"]) / "out"
    cfg = PipelineConfig(inputs=[InputSpec(path=spec["input_dir"])], output_dir=str(out),
                         word_count_filter=WordCountFilterConfig(enabled=False), filters=_filters_config())
    ray_cfg = RayConfig(num_cpus=spec["cores"])
    timeline: list[tuple[float, str]] = []  # (seconds since Ray was up, first line of a progress message)
    t1 = time.perf_counter()
    ensure_ray(ray_cfg)
    t2 = time.perf_counter()
    manifest, _ = run_pipeline(cfg, None, ray_cfg,
                               progress=lambda m: timeline.append((time.perf_counter() - t2, str(m).split("\n")[0])))
    t3 = time.perf_counter()
    shutdown_ray()
    stages = _stage_seconds(manifest, timeline, out)
    removed_by_filters: list[str] | None = None  # None: the pipeline wrote no removed/<filter stage> file
    for name in ("quality_filter.parquet", "word_count_filter.parquet"):
        path = out / "removed" / name
        if path.exists():
            removed_by_filters = (removed_by_filters or []) + \
                pq.read_table(path, columns=["doc_id"]).column("doc_id").to_pylist()
    return {"seconds": t3 - t1, "startup_s": t2 - t1, "import_s": t1 - t0, "stages": stages,
            "timeline": [(round(t, 2), line[:120]) for t, line in timeline],
            "removed_by_filters": removed_by_filters,
            "docs_out": sum(s.rows for d in manifest.domains.values() for s in d.shards),
            "tokens": sum(d.tokens("train") + d.tokens("validation") for d in manifest.domains.values())}


def _stage_seconds(manifest, timeline: list[tuple[float, str]], out: Path) -> list[dict]:
    """Per stage: documents in/out (manifest) and seconds. The pipeline's own run record
    (``<out>/runs/*.json``, stages with seconds) when it writes one, else the time between the
    stage's progress line and the previous stage's (the pipeline is a black box here)."""
    recorded: dict[str, float] = {}
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []:
        for row in json.loads(path.read_text()).get("stages", []):
            if isinstance(row, dict) and row.get("seconds") is not None:
                recorded[row.get("stage") or row.get("name")] = row["seconds"]
    rows, last = [], 0.0
    for s in manifest.stages:
        at = next((t for t, line in timeline if line.split()[:2] == ["[pipeline]", s.name] and "->" in line), None)
        seconds = recorded.get(s.name, s.extra.get("seconds"))
        if seconds is None and at is not None:
            seconds = at - last
        last = at if at is not None else last
        rows.append({"name": s.name, "docs_in": s.docs_in, "docs_out": s.docs_out,
                     "seconds": None if seconds is None else round(seconds, 3)})
    for name, seconds in recorded.items():  # stages with no stats (the tokenizer)
        if name not in {r["name"] for r in rows}:
            rows.append({"name": name, "docs_in": None, "docs_out": None, "seconds": round(seconds, 3)})
    return rows


def _filter_shard(job: tuple[str, str, int]) -> dict:
    """One pool worker: read a shard, filter it (cold word cache), write the kept docs; then a warm pass."""
    path, out_path, batch = job
    t0 = time.perf_counter()
    import pyarrow as pa

    from pipelines.filters import build_chain

    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    t_read = time.perf_counter()
    chain = build_chain(_filters_config(), None)
    chain.track_report = False
    tables = [pa.table({c: [r[c] for r in rows[i:i + batch]] for c in ("id", "domain", "text")})
              for i in range(0, len(rows), batch)]
    t_start = time.perf_counter()
    outs = [chain.apply(t) for t in tables]
    t_cold = time.perf_counter()
    kept, reasons = [], {}
    with open(out_path, "w", encoding="utf-8") as out:
        for o in outs:
            for i, t, r in zip(o.column("id").to_pylist(), o.column("text").to_pylist(),
                               o.column("drop_reason").to_pylist()):
                if r is None:
                    out.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
                    kept.append(i)
                else:
                    reasons[i] = r
    t_write = time.perf_counter()
    for t in tables:
        chain.apply(t)
    t_warm = time.perf_counter()
    return {"docs": len(rows), "kept": kept, "reasons": reasons, "setup_s": t_start - t0,
            "read_s": t_read - t0, "cold_apply_s": t_cold - t_start, "write_s": t_write - t_cold,
            "warm_apply_s": t_warm - t_write}


def run_filters(spec: dict) -> dict:
    t0 = time.perf_counter()
    import multiprocessing

    t1 = time.perf_counter()
    out = Path(spec["work"]) / "out"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f, str(out / Path(f).name), spec["batch"]) for f in spec["files"]]
    with multiprocessing.get_context(spec["start_method"]).Pool(spec["cores"]) as pool:
        parts = pool.map(_filter_shard, jobs, chunksize=1)
    t2 = time.perf_counter()
    kept = [i for p in parts for i in p["kept"]]
    reasons = {i: r for p in parts for i, r in p["reasons"].items()}
    worker = {k: [round(p[k], 3) for p in parts] for k in ("read_s", "setup_s", "cold_apply_s", "write_s",
                                                           "warm_apply_s")}
    return {"seconds": t2 - t1, "startup_s": 0.0, "import_s": t1 - t0, "kept": kept, "reasons": reasons,
            "texts": _read_texts(out), "workers": worker,
            "cold_apply_s": max(p["cold_apply_s"] for p in parts),
            "warm_apply_s": max(p["warm_apply_s"] for p in parts)}


def _read_texts(folder: Path) -> dict[str, str]:
    texts = {}
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                texts[r["id"]] = r["text"]
    return texts


def run_datatrove(spec: dict) -> dict:
    t0 = time.perf_counter()
    import logging

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    logger.remove()  # datatrove logs every task's stats at INFO; keep the bench's output readable
    logger.add(sys.stderr, level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)
    work, cores = Path(spec["work"]), spec["cores"]
    pipeline = [JsonlReader(spec["input_dir"], glob_pattern="*.jsonl"),
                GopherRepetitionFilter(language="en"), GopherQualityFilter(language="en"),
                C4QualityFilter(language="en"), FineWebQualityFilter(language="en"),
                JsonlWriter(str(work / "out"), compression=None)]
    t1 = time.perf_counter()
    stats = LocalPipelineExecutor(pipeline, tasks=cores, workers=cores, start_method=spec["start_method"],
                                  logging_dir=str(work / "logs")).run()
    t2 = time.perf_counter()
    steps = {}
    for s in getattr(stats, "stats", []):  # per-step wall time summed over tasks (datatrove's own stats)
        total = getattr(getattr(s, "time_stats", None), "total", None)
        if total is not None:
            steps[s.name] = round(total, 3)
    texts = _read_texts(work / "out")
    return {"seconds": t2 - t1, "startup_s": 0.0, "import_s": t1 - t0, "kept": list(texts), "texts": texts,
            "steps_s": steps}


RUNNERS = {"full": run_full, "filters": run_filters, "datatrove": run_datatrove}


# =========================================================================== measuring a child


def measure(system: str, spec: dict, folder: Path, timeout: float | None = None) -> dict:
    """Run one system in its own subprocess, sampling its process tree's RSS and CPU; its result dict."""
    return measure_child(__file__, system, spec, folder, cwd=folder, timeout=timeout, pss=False)


# =========================================================================== profile (serial, no Ray)


def serial_profile(records: list[dict], files: list[str], batch: int) -> dict:
    """Each stage's own work on the same documents in this process, one core, no Ray: seconds.

    read_jsonl ~ the read stage; normalize + filters_cold ~ quality_filter (Ray fuses normalize into
    it); exact_dedup_hash ~ exact_dedup; minhash_signatures ~ near_dedup's main cost;
    train_tokenizer runs between near_dedup and tokenize_shard (in no stage's seconds); tokenize ~
    tokenize_shard. Whatever a stage takes beyond these (halved on 2 cores) is Ray's overhead.
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    from infra.config import NearDedupConfig, NormalizeConfig, TokenizerConfig
    from pipelines import minhash
    from pipelines.filters import build_chain
    from pipelines.normalize import normalize_batch
    from pipelines.tokenize import tokenize_batch, train_tokenizer

    out: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        out[name] = round(time.perf_counter() - t, 3)
        return r

    def read_all():
        rows = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh]
        return rows

    timed("read_jsonl", read_all)

    table = pa.table({"id": [r["id"] for r in records], "domain": [r["domain"] for r in records],
                      "text": [r["text"] for r in records], "source": [""] * len(records),
                      "meta": pa.nulls(len(records), pa.string())})
    tables = [table.slice(i, batch) for i in range(0, table.num_rows, batch)]
    normed = timed("normalize", lambda: [normalize_batch(t, NormalizeConfig()) for t in tables])
    chain = build_chain(_filters_config(), None)
    chain.track_report = False
    marked = timed("filters_cold", lambda: [chain.apply(t) for t in normed])
    kept = pa.concat_tables([m.filter(pc.is_null(m.column("drop_reason"))) for m in marked])
    texts = kept.column("text").to_pylist()
    nd = NearDedupConfig()
    timed("exact_dedup_hash", lambda: [hashlib.sha256(t.encode()).digest() for t in texts])
    timed("minhash_signatures", minhash.compute_signatures, texts, num_perm=nd.num_perm, ngram=nd.ngram,
          seed=nd.seed)
    tok = timed("train_tokenizer", train_tokenizer, texts[:TokenizerConfig().train_docs], TokenizerConfig())
    timed("tokenize", tokenize_batch, kept.select(["id", "domain", "text"]), tok.to_str())
    out["docs_after_filters"] = kept.num_rows
    return out


# =========================================================================== the run


def _summary(result: dict, docs: int, mb: float, cores: int) -> dict:
    s = result["seconds"]
    out = {"seconds": round(s, 3), "startup_s": round(result["startup_s"], 3),
           "import_s": round(result["import_s"], 3), "process_s": round(result["process_s"], 3),
           "docs_per_s": round(docs / s, 2), "mb_per_s_per_core": round(mb / s / cores, 4),
           "peak_rss_mb": result["peak_rss_mb"]}
    if result["startup_s"]:
        rest = s - result["startup_s"]
        out.update(seconds_without_startup=round(rest, 3), docs_per_s_without_startup=round(docs / rest, 2),
                   mb_per_s_per_core_without_startup=round(mb / rest / cores, 4))
    return out


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median time (the lower middle one for an even count)."""
    return sorted(rounds, key=lambda r: r["seconds"])[(len(rounds) - 1) // 2]


def _warm_numba() -> float:
    from pipelines import minhash
    start = time.perf_counter()
    minhash.compute_signatures(["warm up the compiled kernels", "déjà vu"])
    return time.perf_counter() - start


def compare(opts) -> dict:
    cores = opts.cores
    folder = Path(opts.work or tempfile.mkdtemp(prefix="pipeline_throughput_"))
    folder.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    corpus = build_corpus(folder, opts.demo_bytes, cores)
    records = corpus["records"]
    docs = len(records)
    mb = sum(len(r["text"].encode()) for r in records) / 1e6
    per_domain = {}
    for r in records:
        d = per_domain.setdefault(r["domain"], [0, 0])
        d[0] += 1
        d[1] += len(r["text"].encode())
    print(f"corpus: {docs} docs, {mb:.2f} MB in {cores} shards "
          f"({', '.join(f'{k} {v[0]} docs {v[1] / 1e6:.2f} MB' for k, v in sorted(per_domain.items()))}), "
          f"built in {time.perf_counter() - started:.1f} s | numba warm-up {_warm_numba():.1f} s", flush=True)
    base = {"cores": cores, "files": corpus["files"], "input_dir": str(folder / "input"), "batch": opts.batch,
            "start_method": opts.start_method}
    results: dict[str, list[dict]] = {s: [] for s in opts.systems}
    for k in range(opts.rounds):
        order = opts.systems[k % len(opts.systems):] + opts.systems[:k % len(opts.systems)]
        for system in order:
            work = folder / f"{system}-{k}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            r = measure(system, {**base, "work": str(work)}, work, timeout=opts.timeout)
            results[system].append(r)
            extra = f" (Ray start-up {r['startup_s']:.1f} s)" if r["startup_s"] else ""
            print(f"round {k + 1}/{opts.rounds} {system:<10} {r['seconds']:8.2f} s{extra} "
                  f"{docs / r['seconds']:8.1f} docs/s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            if not opts.work:
                shutil.rmtree(work / "out", ignore_errors=True)
    out: dict = {"bench": "pipeline_throughput", "quick": opts.quick, "docs": docs, "mb": round(mb, 3),
                 "cores": cores, "rounds": opts.rounds, "demo_bytes_per_domain": opts.demo_bytes,
                 "per_domain": {k: {"docs": v[0], "mb": round(v[1] / 1e6, 3)} for k, v in sorted(per_domain.items())},
                 "batch": opts.batch, "start_method": opts.start_method}
    med = {s: _median_round(rs) for s, rs in results.items()}
    summ = {s: _summary(r, docs, mb, cores) for s, r in med.items()}
    for s, rs in results.items():
        summ[s]["rounds_s"] = [round(r["seconds"], 3) for r in rs]
    if "full" in med:
        f = med["full"]
        summ["full"].update(stages=f["stages"], docs_out=f["docs_out"], tokens=f["tokens"],
                            stage_seconds_sum=round(sum(s["seconds"] or 0 for s in f["stages"]), 3))
        out["ours_docs_per_s"] = summ["full"]["docs_per_s"]
        out["ours_docs_per_s_without_startup"] = summ["full"]["docs_per_s_without_startup"]
        out["ours_mb_per_s_per_core"] = summ["full"]["mb_per_s_per_core"]
        out["ours_mb_per_s_per_core_without_startup"] = summ["full"]["mb_per_s_per_core_without_startup"]
    if "filters" in med:
        f = med["filters"]
        summ["filters"].update(kept=len(f["kept"]), workers=f["workers"],
                               cold_apply_docs_per_s=round(docs / f["cold_apply_s"], 2),
                               warm_apply_docs_per_s=round(docs / f["warm_apply_s"], 2))
        out["ours_filter_docs_per_s"] = summ["filters"]["docs_per_s"]
        out["ours_filter_mb_per_s_per_core"] = summ["filters"]["mb_per_s_per_core"]
        # chain.apply alone (no process start, imports, JSONL I/O): cold word cache, then warm
        out["ours_filter_apply_cold_docs_per_s"] = summ["filters"]["cold_apply_docs_per_s"]
        out["ours_filter_apply_warm_docs_per_s"] = summ["filters"]["warm_apply_docs_per_s"]
    if "datatrove" in med:
        d = med["datatrove"]
        summ["datatrove"].update(kept=len(d["kept"]), steps_s=d["steps_s"])
        out["datatrove_docs_per_s"] = summ["datatrove"]["docs_per_s"]
        out["datatrove_mb_per_s_per_core"] = summ["datatrove"]["mb_per_s_per_core"]
    if "full" in med and "datatrove" in med:
        out["ratio"] = round(out["ours_docs_per_s"] / out["datatrove_docs_per_s"], 3)
        out["ratio_without_startup"] = round(out["ours_docs_per_s_without_startup"] / out["datatrove_docs_per_s"], 3)
    if "filters" in med and "datatrove" in med:
        out["filter_ratio"] = round(out["ours_filter_docs_per_s"] / out["datatrove_docs_per_s"], 3)
        ids = [r["id"] for r in records]
        ours_kept, dt_kept = set(med["filters"]["kept"]), set(med["datatrove"]["kept"])
        same = [i for i in ids if (i in ours_kept) == (i in dt_kept)]
        out["decision_agreement"] = round(len(same) / docs, 4)
        both = ours_kept & dt_kept
        ot, dt = med["filters"]["texts"], med["datatrove"]["texts"]
        out["text_agreement"] = round(sum(ot[i] == dt[i] for i in both) / len(both), 4) if both else 1.0
        out["disagreements"] = [{"id": i, "ours": med["filters"]["reasons"].get(i), "datatrove_kept": i in dt_kept}
                                for i in ids if (i in ours_kept) != (i in dt_kept)][:10]
        out["kept"] = {"ours_filters": len(ours_kept), "datatrove": len(dt_kept)}
        if "full" in med and med["full"]["removed_by_filters"] is not None:
            # the pipeline's own filter decisions (after its normalize step), from removed/<stage>.parquet
            removed = set(med["full"]["removed_by_filters"])
            out["full_pipeline_decision_agreement"] = round(
                sum((i not in removed) == (i in dt_kept) for i in ids) / docs, 4)
            out["kept"]["full_pipeline_filters"] = docs - len(removed)
    out["load_avg_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]  # at start, at end: noise
    out.update(summ)
    if opts.profile:
        out["serial_profile_s"] = serial_profile(records, corpus["files"], opts.batch)
        print(f"serial profile (1 core, no Ray): {out['serial_profile_s']}", flush=True)
    if "full" in med:
        st = " | ".join(f"{s['name']} {s['docs_in']}->{s['docs_out']} {s['seconds']}s" for s in med["full"]["stages"])
        print(f"full pipeline stages (median round): {st} | start-up {med['full']['startup_s']:.1f}s, "
              f"total {med['full']['seconds']:.1f}s", flush=True)
    if "ratio" in out or "filter_ratio" in out:
        print(f"ratio (full / datatrove) {out.get('ratio')}  without Ray start-up {out.get('ratio_without_startup')}  "
              f"filter_ratio {out.get('filter_ratio')}  decision agreement {out.get('decision_agreement')}  "
              f"text agreement {out.get('text_agreement')}", flush=True)
    if not opts.work:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        system, spec_path, result_path = sys.argv[2:5]
        result = RUNNERS[system](json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps(result))
        return result
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller corpus, one round: < 1 min on 2 cores")
    p.add_argument("--tiny", action="store_true", help="smaller still (the smoke test)")
    p.add_argument("--demo-bytes", type=int, default=None,
                   help="demo corpus text bytes per domain (default 0 = all of it, quick 200e3, tiny 120e3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick/tiny 1)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024, help="rows per FilterChain.apply call (filters system)")
    p.add_argument("--start-method", default="forkserver", help="process pools (datatrove's default: forkserver)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--profile", action="store_true", help="also time each stage's work serially, without Ray")
    p.add_argument("--timeout", type=float, default=600, help="kill a system after this many seconds")
    p.add_argument("--work", default=None, help="keep inputs/outputs here (default: a temp dir, removed)")
    opts = p.parse_args(argv)
    opts.systems = [s for s in opts.systems.split(",") if s]
    size = "tiny" if opts.tiny else "quick" if opts.quick else "default"
    opts.quick = opts.quick or opts.tiny
    if opts.demo_bytes is None:
        opts.demo_bytes = {"tiny": 120_000, "quick": 200_000, "default": 0}[size]
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    out = compare(opts)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
