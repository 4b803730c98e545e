"""training.data: mixture proportions, packing, exact resume, checksums, ranks, eval sequences."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from infra.errors import ContractError

try:
    from training_fixtures import SPECIAL_IDS, domain_alphabet, write_tiny_corpus
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import SPECIAL_IDS, domain_alphabet, write_tiny_corpus

from training.data import MixtureSampler, eval_sequences, natural_weights, read_shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"alpha": 1, "beta": 3, "gamma": 5})


def make_sampler(corpus, weights=None, seq_len=16, batch_size=8, seed=0, **kw) -> MixtureSampler:
    weights = weights or {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}
    return MixtureSampler(corpus.manifest, corpus.root, weights, seq_len, batch_size, seed, **kw)


def all_docs(corpus, domain, split="train") -> list[list[int]]:
    docs = []
    for shard in corpus.manifest.domains[domain].split(split):
        d = read_shard(corpus.root, shard, _storage())
        docs += [d.doc(i).tolist() for i in range(len(d))]
    return docs


def _storage():
    from infra.storage import Storage

    return Storage()


def test_batch_layout(corpus):
    sampler = make_sampler(corpus)
    batch = sampler.next_batch()
    assert sampler.domains == ["alpha", "beta", "gamma"]
    assert batch["input_ids"].shape == batch["segment_ids"].shape == batch["valid"].shape == (8, 16)
    assert batch["input_ids"].dtype == batch["segment_ids"].dtype == batch["domain_index"].dtype == torch.long
    assert batch["valid"].all()  # training rows are always full: streams never run dry
    for row, seg, d in zip(batch["input_ids"], batch["segment_ids"], batch["domain_index"]):
        # Every token of a row comes from that row's domain (each domain has its own alphabet).
        assert set(row.tolist()) <= set(domain_alphabet(int(d), 8, 32))
        # Segment ids count up from 0 one document at a time.
        assert seg[0] == 0 and ((seg[1:] - seg[:-1]) >= 0).all() and ((seg[1:] - seg[:-1]) <= 1).all()


def test_domains_drawn_in_proportion(corpus):
    weights = {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}
    sampler = make_sampler(corpus, weights, batch_size=32)
    counts = Counter()
    for _ in range(100):
        counts.update(sampler.next_batch()["domain_index"].tolist())
    n = sum(counts.values())
    expected = np.array([weights[d] for d in sampler.domains]) * n
    observed = np.array([counts[i] for i in range(3)])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_zero_weight_never_drawn_and_bad_weights_rejected(corpus):
    sampler = make_sampler(corpus, {"alpha": 1.0, "beta": 0.0})  # gamma absent = weight 0
    drawn = set()
    for _ in range(20):
        drawn.update(sampler.next_batch()["domain_index"].tolist())
    assert drawn == {0}
    with pytest.raises(ContractError, match="delta"):
        make_sampler(corpus, {"alpha": 0.5, "delta": 0.5})
    with pytest.raises(ValueError, match="sum to 0"):
        make_sampler(corpus, {"alpha": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        make_sampler(corpus, {"alpha": -1.0, "beta": 2.0})


def test_natural_weights_follow_train_tokens(corpus):
    w = natural_weights(corpus.manifest)
    tokens = {d: corpus.manifest.domains[d].tokens("train") for d in w}
    assert w == pytest.approx({d: n / sum(tokens.values()) for d, n in tokens.items()})


def test_packing_is_lossless_over_an_epoch(tmp_path):
    """One domain, long documents: one epoch of sequences is exactly its documents' tokens."""
    corpus = write_tiny_corpus(tmp_path, ["solo"], train_shards=3, docs_per_shard=5, doc_len=(5, 50))
    total = corpus.manifest.domains["solo"].tokens("train")
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"solo": 1.0}, seq_len=16, batch_size=1, seed=3)
    docs = {tuple(d) for d in all_docs(corpus, "solo")}
    stream = []
    while len(stream) <= total:  # one token into the second epoch
        batch = sampler.next_batch()
        ids, seg = batch["input_ids"][0].tolist(), batch["segment_ids"][0].tolist()
        for k in range(max(seg) + 1):  # every document piece is a contiguous part of a document
            assert any(_is_substring([t for t, s in zip(ids, seg) if s == k], d) for d in docs)
        stream += ids
    assert Counter(stream[:total]) == Counter(t for d in docs for t in d)
    assert sampler.epochs_completed() == {"solo": 1}
    assert sampler.epochs()["solo"] == pytest.approx(len(stream) / total)


def _is_substring(piece, doc) -> bool:
    n = len(piece)
    return any(list(doc[i:i + n]) == piece for i in range(len(doc) - n + 1))


def test_long_document_continues_into_the_next_sequence(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["solo"], train_shards=1, docs_per_shard=2, doc_len=(40, 40))
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"solo": 1.0}, seq_len=16, batch_size=4, seed=0)
    batch = sampler.next_batch()
    rows = batch["input_ids"].tolist()
    # 40 tokens: rows 0 and 1 are one document each (16 + 16), row 2 holds its last 8 then the next one.
    assert batch["segment_ids"][0].eq(0).all() and batch["segment_ids"][1].eq(0).all()
    assert batch["segment_ids"][2].tolist() == [0] * 8 + [1] * 8
    first_doc = rows[0] + rows[1] + rows[2][:8]
    assert first_doc in all_docs(corpus, "solo")


def test_resume_is_exact_across_shards_and_epochs(corpus):
    a = make_sampler(corpus, batch_size=4, seq_len=24)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    expected = [a.next_batch() for _ in range(40)]
    assert max(a.epochs_completed().values()) >= 1  # the continuation crosses an epoch boundary

    b = make_sampler(corpus, batch_size=4, seq_len=24)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert b.state_dict() == a.state_dict()


def test_state_from_another_layout_is_refused(corpus):
    state = make_sampler(corpus, seq_len=16).state_dict()
    with pytest.raises(ContractError, match="seq_len"):
        make_sampler(corpus, seq_len=32).load_state_dict(state)


def test_corrupted_shard_raises_contract_error_naming_it(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha"])
    shard = corpus.manifest.domains["alpha"].shards[0]
    path = os.path.join(corpus.root, shard.path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"alpha": 1.0}, 16, 64, seed=0)
    with pytest.raises(ContractError) as err:
        for _ in range(10):
            sampler.next_batch()
    assert shard.path in str(err.value) and shard.sha256 in str(err.value)


def test_missing_shard_raises_contract_error(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha"], train_shards=1)
    shard = corpus.manifest.domains["alpha"].shards[0]
    os.remove(os.path.join(corpus.root, shard.path))
    with pytest.raises(ContractError, match="does not exist"):
        MixtureSampler(corpus.manifest, corpus.root, {"alpha": 1.0}, 16, 2, seed=0).next_batch()


def test_ranks_share_domain_draws_and_split_documents(corpus):
    single = make_sampler(corpus, batch_size=8)
    ranks = [make_sampler(corpus, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()["domain_index"]
        parts = torch.cat([s.next_batch()["domain_index"] for s in ranks])
        assert torch.equal(parts, whole)  # the global batch's domains, sliced by rank
    # Within every shard and epoch, the ranks' documents are disjoint and together cover the shard.
    for d in ranks[0].domains:
        for epoch in range(2):
            for shard_index, shard in enumerate(corpus.manifest.domains[d].split("train")):
                orders = [s.streams[d].doc_order(epoch, shard_index, shard.rows) for s in ranks]
                assert set(orders[0]).isdisjoint(orders[1])
                assert sorted([*orders[0], *orders[1]]) == list(range(shard.rows))


def test_too_many_ranks_for_a_domain_is_an_error(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha"], train_shards=1, docs_per_shard=2)
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"alpha": 1.0}, 16, 1, seed=0, rank=3, world_size=4)
    with pytest.raises(ContractError, match="no tokens for rank 3"):
        sampler.next_batch()


def test_eval_sequences_one_document_per_row(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha"], validation_docs=5, doc_len=(10, 30), bytes_per_token=3)
    docs = all_docs(corpus, "alpha", "validation")
    seqs = eval_sequences(corpus.manifest, corpus.root, "alpha", "validation", seq_len=20, max_docs=4)
    assert len(seqs) == 4 and seqs.input_ids.shape == (4, 20)
    for r in range(4):
        n = min(len(docs[r]), 20)
        assert seqs.input_ids[r, :n].tolist() == docs[r][:n]  # truncated to seq_len
        assert (seqs.input_ids[r, n:] == SPECIAL_IDS["pad"]).all() and (seqs.segment_ids[r, n:] == -1).all()
        assert (seqs.segment_ids[r, :n] == 0).all() and int(seqs.n_tokens[r]) == n
        # Bytes scaled by the kept fraction: 3 bytes per token in this corpus.
        assert float(seqs.n_bytes[r]) == pytest.approx(3 * n)
    widths = [b["input_ids"].shape[1] for b in seqs.batches(2)]
    assert widths == [int(seqs.n_tokens[:2].max()), int(seqs.n_tokens[2:].max())]


@pytest.mark.s3
def test_sampler_and_eval_read_shards_from_s3(corpus, s3_bucket):
    """The same manifest folder uploaded to S3 (moto) gives the same batches as on local disk."""
    from infra.storage import Storage, join

    bucket, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    remote = join(bucket, "corpus")
    for path in _storage().list_files(corpus.root):
        rel = os.path.relpath(path, corpus.root)
        storage.write_bytes(join(remote, rel), open(path, "rb").read())
    local = make_sampler(corpus)
    on_s3 = MixtureSampler(corpus.manifest, remote, {"alpha": 0.2, "beta": 0.5, "gamma": 0.3}, 16, 8, 0,
                           storage=storage)
    for _ in range(3):
        want, got = local.next_batch(), on_s3.next_batch()
        assert all(torch.equal(want[k], got[k]) for k in want)
    seqs = eval_sequences(corpus.manifest, remote, "beta", "validation", 16, 3, storage)
    assert len(seqs) == 3
