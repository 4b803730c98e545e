#!/usr/bin/env python
"""MinHash signatures per second on one core: pipelines.minhash vs datasketch.MinHash, one run.

Both sides turn the same documents into 112-permutation signatures, text in, signature out:
datasketch gets the shingle sets of ``pipelines.minhash.shingles`` (the same normalized word
5-grams; the shingling time counts on its side, as it did in the old per-document path) and is
timed two ways, ``MinHash(...).update_batch`` per document and ``MinHash.bulk``; the faster one
is the baseline. Ours is ``compute_signatures`` (mode="fast") on batches of --batch documents, as
Ray Data's map_batches calls it; numba's one-time compilation is excluded and printed apart.
The datasketch-compatible mode is timed too (informational: SHA1 per shingle, like datasketch).

Documents: seeded prose-like text -- Zipf-distributed words of a 20k-word vocabulary, capitalized
sentences with punctuation, ~10% of documents with non-ASCII words and typographic quotes (the
Unicode path), lengths log-normal (median ~250 words, clipped to 10..20k words): a mix of many
short and a few long documents. Rounds are interleaved (ours, update_batch, bulk, ...) so a
change in machine load hits all alike; docs/s uses each method's median round.

    python bench/minhash_signatures.py            # 3000 documents, 5 rounds
    python bench/minhash_signatures.py --quick    # well under a minute on 2 cores
Ends with one JSON line: bench, ours_docs_per_s, datasketch_docs_per_s (the faster of the two),
ratio, datasketch_update_batch_docs_per_s, datasketch_bulk_docs_per_s, ...
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # single-thread, before numpy/numba load: the comparison is per core

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from datasketch import MinHash  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import minhash  # noqa: E402

NUM_PERM, NGRAM, SEED = 112, 5, 1


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, int(k))) for k in rng.integers(1, 11, 20_000)]
    accented = ["café", "naïve", "über", "straße", "déjà", "ça", "año", "œuvre", "żółw", "東京"]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    docs = []
    for length in rng.lognormal(np.log(250), 1.0, n).clip(10, 20_000).astype(int):
        words = [vocab[i] for i in rng.choice(len(vocab), length, p=zipf)]
        unicode_doc = rng.random() < 0.1
        if unicode_doc:
            for i in rng.choice(length, max(1, length // 30)):
                words[i] = accented[rng.integers(len(accented))]
        out, i = [], 0
        while i < length:  # sentences of 5..25 words, capitalized, ending in punctuation
            k = int(rng.integers(5, 26))
            sentence = " ".join(words[i:i + k])
            sentence = sentence[:1].upper() + sentence[1:] + (", " if rng.random() < 0.1 else ". ")
            out.append(f"“{sentence.strip()}” " if unicode_doc and rng.random() < 0.2 else sentence)
            i += k
        docs.append("".join(out).strip())
    return docs


def ours(docs: list[str], batch: int) -> None:
    for lo in range(0, len(docs), batch):
        minhash.compute_signatures(docs[lo:lo + batch], num_perm=NUM_PERM, ngram=NGRAM, seed=SEED)


def ours_datasketch_mode(docs: list[str], batch: int) -> None:
    for lo in range(0, len(docs), batch):
        minhash.compute_signatures(docs[lo:lo + batch], num_perm=NUM_PERM, ngram=NGRAM, seed=SEED, mode="datasketch")


def datasketch_update_batch(docs: list[str], batch: int) -> None:
    for text in docs:
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch(list(minhash.shingles(text, NGRAM)))


def datasketch_bulk(docs: list[str], batch: int) -> None:
    for lo in range(0, len(docs), batch):
        MinHash.bulk([list(minhash.shingles(t, NGRAM)) for t in docs[lo:lo + batch]], num_perm=NUM_PERM, seed=SEED)


def check_compat(docs: list[str]) -> bool:
    """datasketch mode reproduces datasketch's values (the bench would be moot otherwise)."""
    sig = minhash.compute_signatures(docs, num_perm=NUM_PERM, ngram=NGRAM, seed=SEED, mode="datasketch")
    sets = [list(minhash.shingles(t, NGRAM)) for t in docs]
    return all(np.array_equal(m.hashvalues, row) for m, row in zip(MinHash.bulk(sets, num_perm=NUM_PERM, seed=SEED), sig))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer documents and rounds: well under a minute")
    p.add_argument("--docs", type=int, default=None, help="documents (default 3000, quick 300)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per method (default 5, quick 2)")
    p.add_argument("--batch", type=int, default=1024, help="documents per compute_signatures call")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    n_docs = opts.docs or (300 if opts.quick else 3000)
    rounds = opts.rounds or (2 if opts.quick else 5)

    docs = make_docs(n_docs, opts.seed)
    words = sum(len(minhash.normalize(t).split()) for t in docs)
    mbytes = sum(len(t.encode()) for t in docs) / 1e6
    started = time.perf_counter()
    minhash.compute_signatures(["warm up the compiled kernels", "déjà vu"])  # numba compile or cache load
    compile_s = time.perf_counter() - started
    compat = check_compat(docs[:50])
    print(f"{n_docs} documents, {words:,} words, {mbytes:.1f} MB | num_perm {NUM_PERM}, {NGRAM}-grams, "
          f"1 thread | numba compile/load {compile_s:.2f} s | datasketch mode exact: {compat}")

    methods = {"ours": ours, "datasketch_update_batch": datasketch_update_batch, "datasketch_bulk": datasketch_bulk,
               "ours_datasketch_mode": ours_datasketch_mode}
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(docs, opts.batch)
            times[name].append(time.perf_counter() - t0)
    rate = {name: n_docs / statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'method':<26} {'median s':>9} {'docs/s':>10} {'MB/s':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26} {med:>9.3f} {n_docs / med:>10,.0f} {mbytes / med:>7.2f}")
    baseline = max(rate["datasketch_update_batch"], rate["datasketch_bulk"])
    ratio = rate["ours"] / baseline
    print(f"ratio (ours / faster datasketch): {ratio:.1f}x")
    out = {"bench": "minhash_signatures", "quick": opts.quick, "ours_docs_per_s": round(rate["ours"], 1),
           "datasketch_docs_per_s": round(baseline, 1), "ratio": round(ratio, 2),
           "datasketch_update_batch_docs_per_s": round(rate["datasketch_update_batch"], 1),
           "datasketch_bulk_docs_per_s": round(rate["datasketch_bulk"], 1),
           "ours_datasketch_mode_docs_per_s": round(rate["ours_datasketch_mode"], 1),
           "ours_mb_per_s": round(mbytes * rate["ours"] / n_docs, 2), "datasketch_mode_exact": compat,
           "docs": n_docs, "words": words, "num_perm": NUM_PERM, "ngram": NGRAM, "rounds": rounds,
           "numba_compile_s": round(compile_s, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
