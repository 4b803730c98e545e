#!/usr/bin/env python
"""End-to-end near-dedup on 2 cores: maskmix vs datatrove's MinHash pipeline vs datasketch.

Corpus: the demo corpus (pipelines.demo_corpus.harvest: stdlib code, pydoc reference, READMEs,
license files -- the latter full of real near-duplicates), topped up with synthetic prose
(Zipf words, log-normal lengths) to --mb megabytes, then near-duplicates planted with
pipelines.synthetic.plant_near_duplicates at word edit rates 0 .. 0.1 (Jaccard ~1 .. ~0.35),
so that some planted pairs lie above the threshold and some below. Written as ``cores`` JSONL
shards (id, domain, text) that every system reads itself.

Systems, each in its own subprocess (peak memory = the sum of RSS over the process tree, sampled
every 0.1 s with psutil; Ray's raylet/GCS/workers and datatrove's pool are children of it):
  maskmix     what a user gets by default: NearDedupConfig's engine "auto" (14 x 8) picks the engine
              from the input's size. Small (<= local_max_docs documents and local_max_bytes, as the
              demo corpus): near_dedup_local.read_documents (pyarrow, in-process) ->
              near_dedup.find_clusters on the in-process engine (no Ray started; signatures on a
              thread pool of `cores` threads: the child's CPU affinity) -> survivors as JSON lines
              (pandas, as Ray Data's write_json). Large (--scale): infra.cluster.ensure_ray(num_cpus=
              cores) -> ray.data.read_json/read_parquet -> find_clusters on Ray -> Dataset.write_json.
              ``engine`` in its JSON says which ran; --maskmix-cfg '{"engine": "ray"}' forces Ray.
  datatrove   MinhashDedupSignature -> Buckets -> Cluster -> Filter, LocalPipelineExecutor, 14 x 8,
              5-grams, 64-bit xxhash, tasks = workers = cores (buckets: 14 tasks on `cores` workers;
              cluster: 1 task, as it requires), JsonlReader -> ... -> JsonlWriter (uncompressed).
              Its English word tokenizer needs spaCy (not installed): a str.split tokenizer on
              datatrove's simplify_text output is used instead (punctuation is already gone there,
              so this is nearly the same tokens, and cheaper than spaCy: it can only help datatrove).
              Clusters are read back from its own output (load_cluster_ids: minhash_cluster_id).
  datasketch  MinHash.bulk on a Pool(cores) for the signatures (same shingles as ours), then
              MinHashLSH(params=(14, 8)) query-then-insert on one process + union-find; survivors
              written as JSONL.
Timing: ``cpu_s`` is the CPU seconds (user + system) of the system's whole process tree (sampled
with the memory; the last 0.1 s of a process may be missed): on a shared, loaded machine it is
the comparable number, wall time is not. ``seconds`` is end to end inside the subprocess after
its Python imports: for maskmix on Ray it INCLUDES starting Ray (``startup_s`` says how much of it
that was, 0 on the in-process engine; ``seconds_without_startup`` is the rest), for datatrove its
executors' process pools. ``import_s`` is printed apart. numba's
one-time compilation is done before any system runs (its on-disk cache, cache=True), as in
bench/minhash_signatures.py; what remains in the timed run is loading the kernels from that
cache: ~0.4-0.9 s at the first call of a process, nearly all of it numba's lazy start (its
registries import numba.np.arraymath, which imports scipy.linalg to check BLAS), ~0.01 s per
kernel after that; compiling the same kernels cold takes ~4.5 s (measured on this 2-core
machine, loaded). mb_per_s_per_core = input text MB / seconds / cores (cores allotted,
also for datasketch whose LSH runs on one process).

Quality: every system's clusters become predicted pairs (all pairs inside a cluster). Ground
truth = every pair of documents whose EXACT Jaccard of ``pipelines.minhash.shingles`` (our
normalized word 5-grams, for all three systems) is >= --threshold (default 0.75; 14 x 8 detects
0.75 with probability 0.77, its midpoint is 0.72), computed over ALL pairs with a sparse
document x shingle product (no sampling). precision/recall/f1 are on those pairs; ``closure``
repeats them against the transitive closure of the truth graph (what a connected-components
dedup can at best output: A~B, B~C puts A,C in one cluster even if J(A,C) < t);
``planted_recall`` is the recall on planted pairs with J >= t.

    python bench/near_dedup.py --quick          # < 1 min on 2 cores
    python bench/near_dedup.py                  # default size: a few minutes
    python bench/near_dedup.py --scale 1000000  # 1M short synthetic documents (Parquet input, all systems)
Ends with one JSON line: {"bench": "near_dedup", "maskmix": {...}, "datatrove": {...},
"datasketch": {...}, "docs", "mb", "cores", "threshold", ...} (scale mode: "near_dedup_scale").
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded Ray on loopback only, as in tests/conftest.py

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._measure import measure_child  # noqa: E402

NGRAM, BANDS, ROWS, SEED = 5, 14, 8, 1
EDIT_RATES = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.1)  # J ~ 1, .9, .82, .74, .67, .55, .35
SYSTEMS = ("maskmix", "datatrove", "datasketch")


# =========================================================================== corpus


def _vocab(n: int, rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(2, 11, n)
    letters = rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes().decode()
    ends = np.cumsum(lengths)
    return [letters[e - k:e] for e, k in zip(ends.tolist(), lengths.tolist())]


def synthetic_word_ids(lengths: np.ndarray, rng: np.random.Generator, vocab_size: int, zipf: float = 1.0):
    """Zipf-distributed word ids of all documents, concatenated, and the documents' offsets."""
    p = 1.0 / np.arange(1, vocab_size + 1) ** zipf
    cdf = np.cumsum(p / p.sum())
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.minimum(np.searchsorted(cdf, rng.random(int(offsets[-1]))), vocab_size - 1).astype(np.int32)
    return ids, offsets


def render(ids: np.ndarray, offsets: np.ndarray, vocab: list[str]):
    """Space-joined words per document, in Arrow (no Python loop per word)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    words = pa.array(vocab, pa.string()).take(pa.array(ids))
    return pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), words), " ")


def synthetic_records(n: int, rng: np.random.Generator, median_words: int, prefix: str) -> list[dict]:
    lengths = rng.lognormal(np.log(median_words), 0.8, n).clip(20, 20 * median_words).astype(np.int64)
    vocab = _vocab(30_000, rng)
    texts = render(*synthetic_word_ids(lengths, rng, len(vocab)), vocab).to_pylist()
    return [{"id": f"{prefix}-{i:07d}", "domain": "synthetic", "text": t} for i, t in enumerate(texts)]


def build_corpus(folder: Path, demo_bytes_per_domain: int, total_mb: float, dup_fraction: float,
                 cores: int, seed: int) -> dict:
    """Demo corpus + synthetic prose up to total_mb + planted near-duplicates, as `cores` JSONL shards."""
    from pipelines.demo_corpus import harvest
    from pipelines.synthetic import plant_near_duplicates

    demo = folder / "demo"
    harvest(demo, max_bytes_per_domain=demo_bytes_per_domain)
    records = []
    for f in sorted(demo.glob("*.jsonl")):
        records += [{k: r[k] for k in ("id", "domain", "text")} for r in map(json.loads, f.open(encoding="utf-8"))]
    rng = np.random.default_rng(seed)
    have = sum(len(r["text"].encode()) for r in records) / 1e6
    planted_share = dup_fraction * len(EDIT_RATES)
    filler_mb = max(0.0, total_mb / (1 + planted_share) - have)
    if filler_mb > 0:
        records += synthetic_records(max(1, int(filler_mb * 1e6 / 2700)), rng, 300, "syn")  # ~2.7 kB a document
    planted, base = [], len(records)
    for rate in EDIT_RATES:  # copies of copies may happen: the truth below is computed, not assumed
        records, truth = plant_near_duplicates([dict(r, source="", meta=None) for r in records],
                                               dup_fraction * base / len(records), rate, rng)
        records = [{k: r[k] for k in ("id", "domain", "text")} for r in records]
        planted += [(t.dup_id, t.original_id, rate) for t in truth]
    order = rng.permutation(len(records))  # duplicates spread over the shards, not all at the end
    records = [records[i] for i in order]
    shards = folder / "input"
    shards.mkdir(parents=True, exist_ok=True)
    for s in range(cores):
        with open(shards / f"part-{s:02d}.jsonl", "w", encoding="utf-8") as out:
            for r in records[s::cores]:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"records": records, "planted": planted}


# =========================================================================== ground truth


def exact_pairs(texts: list[str], threshold: float, ngram: int = NGRAM) -> dict[tuple[int, int], float]:
    """{(i, j): J} for every pair i < j with exact shingle Jaccard >= threshold (all pairs, sparse product)."""
    from scipy import sparse

    from pipelines import minhash

    index: dict[bytes, int] = {}
    rows, cols = [], []
    for d, t in enumerate(texts):
        ids = [index.setdefault(s, len(index)) for s in minhash.shingles(t, ngram)]
        cols += ids
        rows += [d] * len(ids)
    x = sparse.csr_matrix((np.ones(len(cols), np.int32), (np.array(rows, np.int64), np.array(cols, np.int64))),
                          shape=(len(texts), max(1, len(index))))
    size = np.asarray(x.sum(axis=1)).ravel()
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    jac = inter.data / (size[inter.row] + size[inter.col] - inter.data)
    keep = jac >= threshold
    return {(int(i), int(j)): float(v) for i, j, v in zip(inter.row[keep], inter.col[keep], jac[keep])}


def _closure(pairs, n: int) -> set[tuple[int, int]]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return {(a, b) for g in groups.values() if len(g) > 1 for k, a in enumerate(g) for b in g[k + 1:]}


def cluster_pairs(clusters: list[list[str]], position: dict[str, int]) -> set[tuple[int, int]]:
    out = set()
    for members in clusters:
        idx = sorted(position[m] for m in members)
        out.update((a, b) for k, a in enumerate(idx) for b in idx[k + 1:])
    return out


def prf(predicted: set, truth: set) -> dict:
    tp = len(predicted & truth)
    p = tp / len(predicted) if predicted else 1.0
    r = tp / len(truth) if truth else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "predicted_pairs": len(predicted), "truth_pairs": len(truth), "true_positives": tp}


# =========================================================================== the systems (child processes)


def _read_jsonl(files: list[str]) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    if files and files[0].endswith(".parquet"):  # scale mode's input
        import pyarrow.parquet as pq
        for f in files:
            t = pq.read_table(f, columns=["id", "text"])
            ids += t.column("id").to_pylist()
            texts += t.column("text").to_pylist()
        return ids, texts
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                ids.append(r["id"])
                texts.append(r["text"])
    return ids, texts


def run_maskmix(spec: dict) -> dict:
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    from infra.cluster import ensure_ray, shutdown_ray
    from infra.config import NearDedupConfig, RayConfig
    from pipelines import near_dedup, near_dedup_local

    phases: dict[str, float] = defaultdict(float)

    def timed(name, fn):  # phase profile: wraps NearDedup's methods, nothing else changes
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - start
        return wrapper

    for nd in (near_dedup.NearDedup, near_dedup_local.LocalNearDedup):  # the local engine overrides some
        for name in ("bands", "edges", "components", "update_index", "clusters", "report"):
            raw = nd.__dict__.get(name)
            if isinstance(raw, staticmethod):
                setattr(nd, name, staticmethod(timed(name.strip("_"), raw.__func__)))
            elif raw is not None:
                setattr(nd, name, timed(name.strip("_"), raw))

    # What a user gets by default: the config's engine ("auto") decides from the input's size
    # whether near-dedup runs in this process (the files read with pyarrow, no Ray started) or on Ray.
    cfg = NearDedupConfig(bands=BANDS, rows=ROWS, ngram=NGRAM, seed=SEED, **spec.get("near_dedup", {}))
    files = spec["files"]
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > spec["cores"]:
        # The local engine's thread pool is as large as the CPUs this process may use: `cores` of them.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:spec["cores"]])
    t1 = time.perf_counter()
    docs = near_dedup_local.read_documents(files, cfg)
    t_read = time.perf_counter()
    startup = 0.0  # seconds spent starting Ray (none on the local engine)
    if docs is None:  # the Ray engine: Ray Data reads the files
        ensure_ray(RayConfig(num_cpus=spec["cores"], object_store_memory=spec.get("object_store_mb", 512) * 1024**2))
        startup = time.perf_counter() - t_read
        reader = ray.data.read_parquet if files[0].endswith(".parquet") else ray.data.read_json
        docs = reader(files).select_columns(["id", "domain", "text"])
        if spec.get("materialize"):
            docs = docs.materialize()
    else:
        phases["read"] = t_read - t1
    result = near_dedup.find_clusters(docs, cfg, spec["work"])
    t3 = time.perf_counter()
    clusters = result.clusters
    removed = clusters.filter(pc.invert(clusters.column("kept"))).column("doc_id").combine_chunks()

    def survivors(batch, removed):
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=removed)))

    if isinstance(docs, pa.Table):  # the same JSON lines as Ray Data's write_json (pandas, records), one file
        os.makedirs(spec["out"], exist_ok=True)
        survivors(docs, removed).to_pandas().to_json(os.path.join(spec["out"], "survivors.json"),
                                                     orient="records", lines=True)
    else:
        docs.map_batches(survivors, batch_format="pyarrow", fn_kwargs={"removed": removed}).write_json(spec["out"])
    t4 = time.perf_counter()
    if ray.is_initialized():
        shutdown_ray()
    groups = defaultdict(list)
    for d, c in zip(clusters.column("doc_id").to_pylist(), clusters.column("cluster_id").to_pylist()):
        groups[c].append(d)
    phases["write_survivors"] = t4 - t3
    return {"seconds": t4 - t1, "startup_s": startup, "import_s": t1 - t0, "clusters": list(groups.values()),
            "removed": len(removed), "phases": {k: round(v, 3) for k, v in phases.items()}, "engine": result.engine,
            "report": {k: result.report[k] for k in ("candidate_edges", "components_rounds", "partitions",
                                                     "giant_buckets", "precision")}}


def _split_words(text):  # the datatrove tokenizer stand-in (module level: picklable)
    return text.split()


def _xxhash64(data) -> int:
    """datatrove's xxhash64 passes str, which xxhash >= 4 refuses: the same hash of the UTF-8 bytes."""
    import xxhash
    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def run_datatrove(spec: dict) -> dict:
    t0 = time.perf_counter()
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        def word_tokenize(self, text):
            return _split_words(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    import logging

    from loguru import logger
    logger.remove()  # datatrove logs every task's stats at INFO; keep the bench's output readable
    logger.add(sys.stderr, level="WARNING")
    logging.getLogger().setLevel(logging.WARNING)

    cores, work, inp = spec["cores"], Path(spec["work"]), spec["input_dir"]
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    from datatrove.pipeline.readers import ParquetReader

    def reader():
        if spec["files"][0].endswith(".parquet"):  # scale mode's input
            return ParquetReader(inp, glob_pattern="*.parquet")
        return JsonlReader(inp, glob_pattern="*.jsonl")

    t1 = time.perf_counter()
    phases = {}
    signature = MinhashDedupSignature(str(work / "sigs"), config=cfg, language=SplitTokenizer())
    signature._hash_func = _xxhash64
    stages = [
        ("signatures", [reader(), signature], cores),
        ("buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], BANDS),
        ("cluster", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg,
                                         save_cluster_id=True)], 1),
        ("filter", [reader(),
                    MinhashDedupFilter(str(work / "remove"), load_cluster_ids=True,
                                       exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
                    JsonlWriter(spec["out"], compression=None)], cores),
    ]
    for name, pipeline, tasks in stages:
        start = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(cores, tasks),
                              logging_dir=str(work / "logs" / name)).run()
        phases[name] = round(time.perf_counter() - start, 3)
    t2 = time.perf_counter()
    groups, removed = defaultdict(list), 0
    for folder in (Path(spec["out"]), work / "removed"):
        for f in sorted(folder.glob("*.jsonl")):
            for line in f.open(encoding="utf-8"):
                r = json.loads(line)
                c = r.get("metadata", {}).get("minhash_cluster_id", -1)
                if c != -1:
                    groups[c].append(r["id"])
                removed += folder != Path(spec["out"])
    return {"seconds": t2 - t1, "startup_s": 0.0, "import_s": t1 - t0, "clusters": [g for g in groups.values()
                                                                                   if len(g) > 1],
            "removed": removed, "phases": phases}


def _datasketch_chunk(texts: list[str]) -> np.ndarray:
    from datasketch import MinHash

    from pipelines import minhash
    sets = [list(minhash.shingles(t, NGRAM)) for t in texts]
    out = np.full((len(texts), BANDS * ROWS), np.iinfo(np.uint64).max, np.uint64)
    nonempty = [i for i, s in enumerate(sets) if s]
    for i, m in zip(nonempty, MinHash.bulk([sets[i] for i in nonempty], num_perm=BANDS * ROWS, seed=SEED)):
        out[i] = m.hashvalues
    return out


def run_datasketch(spec: dict) -> dict:
    t0 = time.perf_counter()
    import multiprocessing

    from datasketch import LeanMinHash, MinHashLSH
    t1 = time.perf_counter()
    ids, texts = _read_jsonl(spec["files"])
    t_read = time.perf_counter()
    chunk = 256
    with multiprocessing.get_context("fork").Pool(spec["cores"]) as pool:
        sigs = pool.map(_datasketch_chunk, [texts[i:i + chunk] for i in range(0, len(texts), chunk)])
    sig = np.concatenate(sigs) if sigs else np.zeros((0, BANDS * ROWS), np.uint64)
    t_sig = time.perf_counter()
    lsh = MinHashLSH(threshold=(1 / BANDS) ** (1 / ROWS), num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    parent: dict[int, int] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    empty = (sig == np.iinfo(np.uint64).max).all(axis=1)
    for i in range(len(ids)):
        if empty[i]:
            continue
        m = LeanMinHash(seed=SEED, hashvalues=sig[i], scheme="affine32")  # MinHash.bulk's default
        for j in lsh.query(m):
            ra, rb = find(i), find(j)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the first document of a cluster is kept
        lsh.insert(i, m)
    t_lsh = time.perf_counter()
    groups = defaultdict(list)
    for i in parent:
        groups[find(i)].append(i)
    removed = {i for i in parent if find(i) != i}
    os.makedirs(spec["out"], exist_ok=True)
    with open(os.path.join(spec["out"], "kept.jsonl"), "w", encoding="utf-8") as out:
        for i, (d, t) in enumerate(zip(ids, texts)):
            if i not in removed:
                out.write(json.dumps({"id": d, "text": t}, ensure_ascii=False) + "\n")
    t2 = time.perf_counter()
    return {"seconds": t2 - t1, "startup_s": 0.0, "import_s": t1 - t0,
            "clusters": [[ids[i] for i in g] for g in groups.values() if len(g) > 1], "removed": len(removed),
            "phases": {"read": round(t_read - t1, 3), "signatures": round(t_sig - t_read, 3),
                       "lsh_union_find": round(t_lsh - t_sig, 3), "write": round(t2 - t_lsh, 3)}}


RUNNERS = {"maskmix": run_maskmix, "datatrove": run_datatrove, "datasketch": run_datasketch}


# =========================================================================== measuring a child


def measure(system: str, spec: dict, folder: Path, timeout: float | None = None) -> dict:
    """Run one system in its own subprocess, sampling its process tree's memory and CPU; its result dict."""
    return measure_child(__file__, system, spec, folder, cwd=REPO, timeout=timeout)


def _summary(result: dict, mb: float, cores: int) -> dict:
    out = {"seconds": round(result["seconds"], 3), "startup_s": round(result["startup_s"], 3),
           "seconds_without_startup": round(result["seconds"] - result["startup_s"], 3),
           "import_s": round(result["import_s"], 3), "process_s": round(result["process_s"], 3),
           "mb_per_s_per_core": round(mb / result["seconds"] / cores, 4),
           "peak_rss_mb": result["peak_rss_mb"], "peak_pss_mb": result["peak_pss_mb"], "cpu_s": result.get("cpu_s"),
           "removed": result["removed"], "clusters": len(result["clusters"]), "phases": result["phases"]}
    if "engine" in result:
        out["engine"] = result["engine"]
    if "report" in result:
        out["report"] = result["report"]
    return out


# =========================================================================== modes


def _warm_numba() -> float:
    """Compile (or load from numba's cache) every kernel near-dedup uses, before any system runs:
    otherwise each Ray worker would compile them inside the timed run (measured: up to ~30 s of
    the bands and edges phases on a loaded 2-core machine, right after the source changed)."""
    import pyarrow as pa

    from pipelines import lsh, minhash
    start = time.perf_counter()
    sig = minhash.compute_signatures(["warm up the compiled kernels", "déjà vu"])
    ids = pa.array(["a", "b"])
    lsh.row_fingerprints(ids, ids, ids, pa.array([0.5, None]))
    lsh.partitioned_band_rows(lsh.node_keys_array(ids, None, lsh.NEW), sig, BANDS, ROWS, np.zeros(2, np.uint64), 4,
                              False)
    lsh.min_components(ids, pa.array(["b", "c"]))
    return time.perf_counter() - start


def compare(opts) -> dict:
    cores = opts.cores
    folder = Path(opts.work or tempfile.mkdtemp(prefix="near_dedup_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = build_corpus(folder, opts.demo_bytes, opts.mb, opts.dup_fraction, cores, opts.seed)
    records, planted = corpus["records"], corpus["planted"]
    texts = [r["text"] for r in records]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    position = {r["id"]: i for i, r in enumerate(records)}
    built = time.perf_counter()
    truth = exact_pairs(texts, opts.threshold)
    closure = _closure(truth, len(records))
    truth_s = time.perf_counter() - built
    planted_above = {tuple(sorted((position[d], position[o]))) for d, o, _ in planted} & set(truth)
    print(f"corpus: {len(records)} docs, {mb:.1f} MB ({len(planted)} planted copies at edit rates {EDIT_RATES}) "
          f"built in {built - started:.1f} s | truth: {len(truth)} pairs with exact J >= {opts.threshold} "
          f"({len(closure)} in their closure, {len(planted_above)} planted) in {truth_s:.1f} s "
          f"| numba warm-up {_warm_numba():.1f} s", flush=True)
    files = sorted(str(p) for p in (folder / "input").glob("*.jsonl"))
    out: dict = {"bench": "near_dedup", "quick": opts.quick}
    for system in opts.systems:
        spec = {"cores": cores, "files": files, "input_dir": str(folder / "input"),
                "work": str(folder / system / "work"), "out": str(folder / system / "out"),
                "near_dedup": json.loads(opts.maskmix_cfg), "materialize": opts.materialize}
        shutil.rmtree(folder / system, ignore_errors=True)
        (folder / system).mkdir(parents=True)
        result = measure(system, spec, folder / system)
        predicted = cluster_pairs(result["clusters"], position)
        summary = _summary(result, mb, cores)
        summary.update(prf(predicted, set(truth)))
        summary["closure"] = prf(predicted, closure)
        summary["planted_recall"] = round(len(predicted & planted_above) / len(planted_above), 4) \
            if planted_above else None
        out[system] = summary
        print(f"{system:<11} {summary['seconds']:>8.2f} s (startup {summary['startup_s']:.2f}, imports "
              f"{summary['import_s']:.2f}) {summary['mb_per_s_per_core']:>7.3f} MB/s/core  peak RSS "
              f"{summary['peak_rss_mb']:>7.0f} MB (PSS {summary['peak_pss_mb']:.0f})  P {summary['precision']:.3f} "
              f"R {summary['recall']:.3f} F1 {summary['f1']:.3f}  planted R {summary['planted_recall']}  "
              f"phases {summary['phases']}", flush=True)
    out.update(docs=len(records), mb=round(mb, 3), cores=cores, threshold=opts.threshold,
               truth_pairs=len(truth), planted=len(planted), planted_above_threshold=len(planted_above),
               bands=BANDS, rows=ROWS, ngram=NGRAM)
    if not opts.work:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def scale(opts) -> dict:
    """opts.systems on opts.scale short synthetic documents (20..60 words) with planted near-duplicates,
    read from the same Parquet shards by every system."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import minhash

    cores, n = opts.cores, opts.scale
    folder = Path(opts.work or tempfile.mkdtemp(prefix="near_dedup_scale_"))
    shutil.rmtree(folder / "input", ignore_errors=True)
    (folder / "input").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(opts.seed)
    n_dup = int(n * opts.dup_fraction)
    n_orig = n - n_dup
    lengths = rng.integers(20, 61, n_orig)
    vocab = _vocab(50_000, rng)
    ids, offsets = synthetic_word_ids(lengths, rng, len(vocab))
    # Copies: substitutions at a per-copy edit rate, all vectorized over the concatenated word ids.
    src = np.sort(rng.choice(n_orig, n_dup, replace=False))
    rates = np.array([0.0, 0.02, 0.04, 0.08, 0.15])[rng.integers(0, 5, n_dup)]
    dup_len = lengths[src]
    gather = np.repeat(offsets[src] - np.concatenate([[0], np.cumsum(dup_len)[:-1]]), dup_len) + np.arange(dup_len.sum())
    dup_ids = ids[gather].copy()
    edit = rng.random(dup_ids.size) < np.repeat(rates, dup_len)
    dup_ids[edit] = rng.integers(0, len(vocab), int(edit.sum()))
    all_ids = np.concatenate([ids, dup_ids])
    all_offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(dup_len)])
    texts = render(all_ids, all_offsets, vocab)
    doc_ids = pa.array([f"d{i:08d}" for i in range(n)])
    order = rng.permutation(n)
    table = pa.table({"id": doc_ids, "domain": pa.array(["synthetic"] * n), "text": texts.cast(pa.string())})
    table = table.take(pa.array(order))
    shards = max(cores, 16)
    per = -(-n // shards)
    for s in range(shards):
        pq.write_table(table.slice(s * per, per), folder / "input" / f"part-{s:03d}.parquet")
    mb = pc_sum_bytes(table)
    planted = [(f"d{n_orig + k:08d}", f"d{int(o):08d}") for k, o in enumerate(src)]
    del table, texts, all_ids, ids, dup_ids
    built = time.perf_counter() - started
    print(f"scale corpus: {n} docs ({n_dup} planted copies), {mb:.1f} MB, built in {built:.1f} s | "
          f"numba warm-up {_warm_numba():.1f} s", flush=True)
    files = sorted(str(p) for p in (folder / "input").glob("*.parquet"))
    docs = pq.read_table(folder / "input").to_pydict()
    text_of = dict(zip(docs["id"], docs["text"]))
    del docs

    def jaccard(a: str, b: str) -> float:
        x, y = minhash.shingles(text_of[a], NGRAM), minhash.shingles(text_of[b], NGRAM)
        return len(x & y) / len(x | y) if x or y else 1.0

    planted_above = {(d, o) for d, o in planted if jaccard(d, o) >= opts.threshold}
    out = {"bench": "near_dedup_scale", "docs": n, "mb": round(mb, 2), "cores": cores, "threshold": opts.threshold,
           "planted": n_dup, "planted_above_threshold": len(planted_above), "corpus_build_s": round(built, 1)}
    for system in opts.systems:
        spec = {"cores": cores, "files": files, "input_dir": str(folder / "input"),
                "work": str(folder / system / "work"), "out": str(folder / system / "out"),
                "near_dedup": json.loads(opts.maskmix_cfg), "materialize": opts.materialize,
                "object_store_mb": opts.object_store_mb}
        shutil.rmtree(folder / system, ignore_errors=True)
        (folder / system).mkdir(parents=True)
        result = measure(system, spec, folder / system, timeout=opts.timeout)
        summary = _summary(result, mb, cores)
        # Quality without an all-pairs truth (out of reach at this size): precision = the share of
        # predicted pairs (all pairs inside a cluster) whose EXACT Jaccard is >= threshold; recall =
        # the share of planted pairs with exact J >= threshold that share a cluster. The synthetic
        # originals (random Zipf words) are not near-duplicates of each other, so the planted pairs
        # are nearly all the true pairs.
        cluster_of = {d: k for k, members in enumerate(result["clusters"]) for d in members}
        pairs = [(a, b) for members in result["clusters"] for i, a in enumerate(members) for b in members[i + 1:]]
        good = sum(jaccard(a, b) >= opts.threshold for a, b in pairs)
        found = sum(cluster_of.get(d, -1) == cluster_of.get(o, -2) for d, o in planted_above)
        p = good / len(pairs) if pairs else 1.0
        r = found / len(planted_above) if planted_above else 1.0
        summary.update(precision=round(p, 4), planted_recall=round(r, 4),
                       f1=round(2 * p * r / (p + r), 4) if p + r else 0.0, predicted_pairs=len(pairs))
        out[system] = summary
        print(f"{system:<11} {summary['seconds']:>8.1f} s (startup {summary['startup_s']:.1f}) "
              f"{summary['mb_per_s_per_core']:.3f} MB/s/core, peak RSS {summary['peak_rss_mb']:.0f} MB "
              f"(PSS {summary['peak_pss_mb']:.0f}), P {p:.4f} planted R {r:.4f} F1 {summary['f1']:.4f}, "
              f"phases {summary['phases']}", flush=True)
    if not opts.work:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def pc_sum_bytes(table) -> float:
    import pyarrow.compute as pc
    return pc.sum(pc.binary_length(table.column("text"))).as_py() / 1e6


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        system, spec_path, result_path = sys.argv[2:5]
        result = RUNNERS[system](json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps(result))
        return result
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small corpus: < 1 min on 2 cores")
    p.add_argument("--tiny", action="store_true", help="smaller still (the smoke test)")
    p.add_argument("--mb", type=float, default=None, help="corpus size incl. copies (default 24, quick 4, tiny 1)")
    p.add_argument("--demo-bytes", type=int, default=None, help="demo corpus bytes per domain (default 1e6)")
    p.add_argument("--dup-fraction", type=float, default=0.03, help="copies per edit rate, as a fraction of docs")
    p.add_argument("--threshold", type=float, default=0.75, help="exact Jaccard of a true duplicate pair")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--scale", type=int, default=0, help="this many short synthetic documents (with --systems)")
    p.add_argument("--maskmix-cfg", default="{}", help="JSON of NearDedupConfig overrides, e.g. '{\"partitions\": 4}'")
    p.add_argument("--materialize", action="store_true", help="maskmix: materialize the read dataset once")
    p.add_argument("--object-store-mb", type=int, default=512, help="scale mode: Ray object store size")
    p.add_argument("--timeout", type=float, default=None, help="scale mode: kill a system after this many seconds")
    p.add_argument("--work", default=None, help="keep inputs/outputs here (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    opts.systems = [s for s in opts.systems.split(",") if s]
    if opts.scale:
        opts.dup_fraction = 0.1 if opts.dup_fraction == 0.03 else opts.dup_fraction
        out = scale(opts)
    else:
        size = "tiny" if opts.tiny else "quick" if opts.quick else "default"
        opts.quick = opts.quick or opts.tiny
        opts.mb = opts.mb or {"tiny": 1.0, "quick": 4.0, "default": 24.0}[size]
        opts.demo_bytes = opts.demo_bytes or {"tiny": 100_000, "quick": 400_000, "default": 1_000_000}[size]
        out = compare(opts)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
