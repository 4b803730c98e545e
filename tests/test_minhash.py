"""pipelines.minhash (signatures), pipelines.lsh_params (banding), the scurve CLI and the bench."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from typer.testing import CliRunner

from infra.config import NearDedupConfig
from pipelines import lsh_params, minhash
from pipelines.minhash import EMPTY, MERSENNE_61, compute_signatures, is_empty, shingles

M64 = (1 << 64) - 1
DOCS = [
    "",
    "!!! ... ---",
    "one",
    "Two words!",
    "The quick brown fox jumps over the lazy dog. The QUICK brown fox -- jumps again, over the dog?",
    "Déjà vu: l’œuvre «naïve» de Straße über 東京 — café_au_lait 42 İstanbul " * 3,
    " ".join(f"w{i % 97} x{i % 13}" for i in range(3000)),
]


# --------------------------------------------------------------------------- pure-Python references


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def _ref_shingle_hashes(text: str, n: int) -> set[int]:
    """The module doc's definition, in big-int Python: FNV-1a-64 + fmix64 per word, chained."""
    words = []
    for w in minhash.normalize(text).split():
        h = 0xCBF29CE484222325
        for byte in w.encode():
            h = ((h ^ byte) * 0x100000001B3) & M64
        words.append(_fmix64(h))
    grams = [words] if 0 < len(words) < n else [words[i:i + n] for i in range(len(words) - n + 1)]
    out = set()
    for gram in grams:
        g = 0x9E3779B97F4A7C15
        for w in gram:
            g = ((g ^ w) * 0xD6E8FEB86659FD93) & M64
        out.add(_fmix64(g))
    return out


def _ref_signature(hashes, a, b) -> list[int]:
    if not hashes:
        return [int(EMPTY)] * len(a)
    return [min((int(ak) * (h % MERSENNE_61) + int(bk)) % MERSENNE_61 for h in hashes) for ak, bk in zip(a, b)]


# --------------------------------------------------------------------------- datasketch mode


@pytest.mark.parametrize("scheme", ["affine32", "legacy", "affine64"])
@pytest.mark.parametrize("seed,num_perm", [(1, 112), (7, 16), (42, 128), (3, 1)])
def test_datasketch_mode_is_bit_exact(scheme, seed, num_perm):
    sig = compute_signatures(DOCS, num_perm=num_perm, seed=seed, mode="datasketch", scheme=scheme)
    assert sig.dtype == np.uint64 and sig.shape == (len(DOCS), num_perm)
    for text, row in zip(DOCS, sig):
        m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
        m.update_batch(list(shingles(text, 5)))
        if m.is_empty():  # no shingles: datasketch keeps its init value, we use the EMPTY marker
            assert is_empty(row)
        else:
            assert np.array_equal(m.hashvalues.astype(np.uint64), row)
    if scheme != "affine64":
        assert (sig[~is_empty(sig)] < 2**32).all()


def test_datasketch_mode_blocks_split_documents(monkeypatch):
    """A document whose shingles span several (shingles x perms) blocks gets the same values."""
    whole = compute_signatures(DOCS, mode="datasketch")
    monkeypatch.setattr(minhash, "_BLOCK_ELEMENTS", 112 * 7)  # 7 shingles per block
    assert np.array_equal(compute_signatures(DOCS, mode="datasketch"), whole)


# --------------------------------------------------------------------------- fast mode


def test_fast_mode_matches_big_int_reference():
    values, offsets = minhash.shingle_hashes(DOCS, 5)
    a, b = minhash.permutations(24, 5)
    sig = compute_signatures(DOCS, num_perm=24, seed=5)
    for i, text in enumerate(DOCS):
        got = values[offsets[i]:offsets[i + 1]]
        ref = _ref_shingle_hashes(text, 5)
        assert len(got) == len(set(got.tolist())) == len(ref) == len(shingles(text, 5))  # distinct, same count
        assert set(got.tolist()) == ref
        assert sig[i].tolist() == _ref_signature(ref, a, b)


def test_permutations_never_overflow():
    rng = np.random.default_rng(0)
    edge = [0, 1, 2, MERSENNE_61 - 1, MERSENNE_61, MERSENNE_61 + 1, 2**62, 2**63 - 1, 2**63, M64 - 1, M64,
            (1 << 32) - 1, 1 << 32, (1 << 61) + (1 << 32) - 1]
    hashes = np.array(edge + rng.integers(0, M64, 500, dtype=np.uint64, endpoint=True).tolist(), np.uint64)
    offsets = np.arange(hashes.size + 1, dtype=np.int64)  # one hash per "document"
    a = np.array([1, 2, MERSENNE_61 - 1, MERSENNE_61 - 2, (1 << 32) - 1, 1 << 32]
                 + rng.integers(1, MERSENNE_61, 26, dtype=np.uint64).tolist(), np.uint64)
    b = np.array([0, MERSENNE_61 - 1] * 3 + rng.integers(0, MERSENNE_61, 26, dtype=np.uint64).tolist(), np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    sig = minhash._permute_min_kernel(hashes, offsets, (a & m32).astype(np.uint32),
                                      (a >> np.uint64(32)).astype(np.uint32), b)
    for h, row in zip(hashes.tolist(), sig.tolist()):
        assert row == [(int(ak) * (h % MERSENNE_61) + int(bk)) % MERSENNE_61 for ak, bk in zip(a, b)]


@pytest.mark.parametrize("jaccard", [0.2, 0.5, 0.8, 0.95])
def test_fast_signatures_estimate_jaccard(jaccard):
    """Agreement of two signatures ~ Jaccard of the sets, within 4 sigma of sampling error."""
    rng = np.random.default_rng(int(jaccard * 100))
    union, k = 2000, 512
    shared = int(round(jaccard * union))
    pool = rng.integers(0, M64, union, dtype=np.uint64, endpoint=True)
    only = (union - shared) // 2
    x = np.concatenate([pool[:shared], pool[shared:shared + only]])
    y = np.concatenate([pool[:shared], pool[shared + only:shared + 2 * only]])
    true = shared / (shared + 2 * only)
    sig = minhash.permute_min(np.concatenate([x, y]), np.array([0, x.size, x.size + y.size]), num_perm=k, seed=3)
    estimate = float(np.mean(sig[0] == sig[1]))
    assert abs(estimate - true) < 4 * np.sqrt(true * (1 - true) / k) + 1e-9


def test_text_similarity_is_estimated():
    """Documents of distinct words: 5-gram Jaccard is known exactly."""
    words = [f"tok{i}" for i in range(1004)]  # 1000 shingles
    a, b = " ".join(words[:604]), " ".join(words[200:1004])  # 600 and 800 shingles, 400 shared
    true = 400 / 1000
    sig = compute_signatures([a, b], num_perm=512)
    assert abs(float(np.mean(sig[0] == sig[1])) - true) < 4 * np.sqrt(true * (1 - true) / 512)


def test_empty_one_word_and_normalization():
    sig = compute_signatures(["", "  ?! ", "Hello", "hello!!", "HELLO world", "hello, World."])
    assert is_empty(sig).tolist() == [True, True, False, False, False, False]
    assert (sig[0] == EMPTY).all()
    assert np.array_equal(sig[2], sig[3]) and np.array_equal(sig[4], sig[5])
    assert not np.array_equal(sig[2], sig[4])
    assert (sig[2:] < MERSENNE_61).all()
    assert shingles("The cat, the CAT!", 2) == {b"the cat", b"cat the"} and shingles("", 5) == set()
    assert shingles("too short", 5) == {b"too short"}


def test_batching_does_not_change_values():
    batch = compute_signatures(DOCS, num_perm=64, seed=9)
    for text, row in zip(DOCS, batch):
        assert np.array_equal(compute_signatures([text], num_perm=64, seed=9)[0], row)  # also ASCII-only tables
    assert np.array_equal(compute_signatures(DOCS[::-1], num_perm=64, seed=9), batch[::-1])


def test_multi_megabyte_document():
    paragraph = " ".join(f"word{i}" for i in range(1000)) + ". "
    big = paragraph * 400  # ~3.6 MB, 400k words; its shingle set is that of two copies
    assert len(big) > 3_000_000
    sig = compute_signatures([big, paragraph * 2])
    assert np.array_equal(sig[0], sig[1]) and not is_empty(sig).any()


def test_signature_batch_and_datasketch_rebuild():
    cfg = NearDedupConfig()
    table = pa.table({"id": ["a", "b", "c"], "text": ["x y z", "", DOCS[4]]})
    out = minhash.signature_batch(table, cfg)
    assert out.schema.field("signature").type == pa.list_(pa.uint64(), 112)
    assert out.column("id").to_pylist() == ["a", "b", "c"]
    rows = np.stack(out.column("signature").to_numpy(zero_copy_only=False))
    assert np.array_equal(rows, compute_signatures(table.column("text").to_pylist()))
    assert is_empty(rows).tolist() == [False, True, False]
    m = MinHash(hashvalues=rows[2], scheme="affine64")  # fast values are < 2^61: a 64-bit scheme holds them
    assert m.jaccard(MinHash(hashvalues=rows[2], scheme="affine64")) == 1.0
    exact = minhash.signature_batch(table, NearDedupConfig(hash_mode="datasketch"))
    MinHash(hashvalues=exact.column("signature").to_numpy(zero_copy_only=False)[2], scheme="affine32")


# --------------------------------------------------------------------------- banding


def test_s_curve_and_thresholds():
    assert lsh_params.approx_threshold(14, 8) == pytest.approx(0.72, abs=0.005)
    assert lsh_params.detection_probability(0.8, 14, 8) == pytest.approx(1 - (1 - 0.8**8) ** 14)
    curve = lsh_params.s_curve(14, 8)
    probs = [p for _, p in curve]
    assert probs == sorted(probs) and curve[-1] == (1.0, 1.0) and probs[0] < 1e-6
    # FineWeb's published match probabilities for 14 x 8
    for s, p in [(0.7, 0.56), (0.75, 0.77), (0.8, 0.92), (0.85, 0.988)]:
        assert lsh_params.detection_probability(s, 14, 8) == pytest.approx(p, abs=0.01)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9])
@pytest.mark.parametrize("min_recall", [0.5, 0.9, 0.99])
def test_choose_bands_rows_meets_recall_and_minimises_fp(threshold, min_recall):
    bands, rows = lsh_params.choose_bands_rows(112, threshold, min_recall)
    assert bands * rows <= 112
    assert lsh_params.detection_probability(threshold, bands, rows) >= min_recall
    fp = lsh_params.false_positive_area(threshold, bands, rows)
    for b in range(1, 113):  # brute force: no feasible pair has a smaller false-positive area
        for r in range(1, 112 // b + 1):
            if lsh_params.detection_probability(threshold, b, r) >= min_recall:
                assert lsh_params.false_positive_area(threshold, b, r) >= fp - 1e-9


def test_presets_and_infeasible():
    assert lsh_params.choose_bands_rows(112, 0.8, 0.92) == (14, 8) == lsh_params.PRESETS["default"]
    assert lsh_params.choose_bands_rows(112, 0.85, 0.9) == lsh_params.PRESETS["strict"]
    with pytest.raises(ValueError, match="no bands x rows"):
        lsh_params.choose_bands_rows(4, 0.3, 0.999)


def test_config_derives_bands_rows():
    assert (NearDedupConfig().bands, NearDedupConfig().rows, NearDedupConfig().num_perm) == (14, 8, 112)
    cfg = NearDedupConfig(threshold=0.8, min_recall=0.92)
    assert (cfg.bands, cfg.rows, cfg.num_perm) == (14, 8, 112)
    cfg = NearDedupConfig(threshold=0.85)  # min_recall defaults to 0.9
    assert (cfg.bands, cfg.rows) == lsh_params.choose_bands_rows(112, 0.85, 0.9)
    assert NearDedupConfig(preset="strict").num_perm == 110
    assert NearDedupConfig(preset="default", bands=14, rows=8).num_perm == 112  # consistent: fine
    assert NearDedupConfig(hash_mode="datasketch").hash_mode == "datasketch"
    for bad in [dict(threshold=0.8, bands=3), dict(min_recall=0.9), dict(preset="strict", threshold=0.8),
                dict(threshold=1.5), dict(hash_mode="sha1"), dict(preset="loose")]:
        with pytest.raises(ValueError):
            NearDedupConfig(**bad)


def test_cli_scurve():
    from infra.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["dedup", "scurve", "--bands", "14", "--rows", "8"])
    assert result.exit_code == 0, result.output
    assert "bands 14 x rows 8 = 112" in result.output
    assert any(line.split()[:2] == ["0.80", f"{1 - (1 - 0.8**8) ** 14:.4f}"] for line in result.output.splitlines())
    result = runner.invoke(app, ["dedup", "scurve", "--threshold", "0.8", "--min-recall", "0.92"])
    assert result.exit_code == 0 and "bands 14 x rows 8" in result.output
    result = runner.invoke(app, ["dedup", "scurve", "--threshold", "0.8", "--bands", "3"])
    assert result.exit_code == 2


def test_bench_quick_smoke(capsys):
    import json

    from bench import minhash_signatures

    out = minhash_signatures.main(["--quick", "--docs", "30", "--rounds", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == out and last["bench"] == "minhash_signatures" and last["datasketch_mode_exact"]
    for key in ("ours_docs_per_s", "datasketch_docs_per_s", "ratio", "datasketch_update_batch_docs_per_s",
                "datasketch_bulk_docs_per_s"):
        assert last[key] > 0
