"""Issue 9, faults: a shard corrupted (bytes flipped) or truncated on disk after the manifest was
written. Training (the MixtureSampler under a real DeepSpeed ``train()``) and mixing (a proxy run,
both its training stream and its validation eval) must refuse it with an error that names the shard
file and the sha256 the manifest expects; never train or evaluate on silently decoded garbage.

Where the check lives: ``training.data.read_shard`` hashes the bytes it is about to parse (one read,
the hash costs ~1 ms per MB next to the parquet decode) and compares them with ``ShardInfo.sha256``
from the manifest; every reader of shards (sampler streams, eval sequences, proxies) goes through it.
A flipped byte inside a zstd page could otherwise decode to other token ids without any error.
"""

from __future__ import annotations

import os
import re

import pytest

from infra.config import ModelConfig, ProxyConfig, TrainConfig
from infra.errors import ContractError
from mixing.proxy import train_proxy
from tests.reliability.faults import flip_bytes, truncate
from tests.training_fixtures import write_tiny_corpus
from training.data import MixtureSampler

DAMAGE = {"flipped": lambda p: flip_bytes(p, n=16, at=0.5), "truncated": lambda p: truncate(p, 0.5)}
PROXY = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, lr=3e-3,
             warmup_steps=2, eval_docs_per_domain=4, mc_samples=1, steps=3)


def corpus_with_damaged(tmp_path, how: str, split: str):
    """One domain, one train shard and one validation shard; the ``split`` shard damaged.

    Returns (corpus, the damaged shard's absolute path, its manifest sha256)."""
    corpus = write_tiny_corpus(tmp_path, ["alpha"], train_shards=1)
    shard = next(s for s in corpus.manifest.domains["alpha"].shards if s.split == split)
    path = os.path.join(corpus.root, shard.path)
    before = open(path, "rb").read()
    DAMAGE[how](path)
    assert open(path, "rb").read() != before  # the fault is real
    return corpus, path, shard.sha256


def assert_names_shard(error: Exception, path: str, expected_sha: str) -> None:
    message = str(error)
    assert path in message, message
    assert f"expects {expected_sha}" in message, message
    assert re.search(r"sha256 mismatch", message), message


def test_intact_corpus_is_read(tmp_path):
    """Control: the same corpus undamaged trains; so the refusals below are caused by the damage."""
    corpus = write_tiny_corpus(tmp_path, ["alpha"], train_shards=1)
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"alpha": 1.0}, seq_len=32, batch_size=4, seed=0)
    assert sampler.next_batch()["valid"].any()
    result = train_proxy(corpus.manifest, corpus.root, {"alpha": 1.0}, ProxyConfig(**PROXY))
    assert len(result.losses) == 3 and set(result.eval) == {"alpha"}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_sampler_refuses_damaged_shard(tmp_path, how):
    corpus, path, sha = corpus_with_damaged(tmp_path, how, "train")
    sampler = MixtureSampler(corpus.manifest, corpus.root, {"alpha": 1.0}, seq_len=32, batch_size=4, seed=0)
    with pytest.raises(ContractError) as err:
        sampler.next_batch()
    assert_names_shard(err.value, path, sha)
    assert sampler.batches_drawn == 0  # no batch came out of it


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_training_refuses_damaged_shard(tmp_path, how):
    """The real trainer (DeepSpeed, ZeRO 0) stops at its first batch: no step, no checkpoint."""
    from training import checkpoint as ckpt
    from training.trainer import train

    corpus, path, sha = corpus_with_damaged(tmp_path, how, "train")
    cfg = TrainConfig(manifest=corpus.manifest_path, output_dir=str(tmp_path / "run"), model=ModelConfig(preset="test"),
                      seq_len=32, micro_batch_size=4, steps=3, warmup_steps=1, lr=1e-3, log_every=1, zero_stage=0,
                      export=False)
    with pytest.raises(ContractError) as err:
        train(cfg)
    assert_names_shard(err.value, path, sha)
    assert ckpt.step_folders(cfg.output_dir) == []  # nothing was trained on it


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_mixing_proxy_refuses_damaged_shard(tmp_path, how, split):
    """A proxy run (what DoReMi and the mixing-law sweeps train) refuses a damaged train shard at
    its first step and a damaged validation shard at its evaluation: no eval figure comes out."""
    corpus, path, sha = corpus_with_damaged(tmp_path, how, split)
    steps: list[int] = []
    with pytest.raises(ContractError) as err:
        train_proxy(corpus.manifest, corpus.root, {"alpha": 1.0}, ProxyConfig(**PROXY),
                    step_callback=lambda step, loss: steps.append(step))
    assert_names_shard(err.value, path, sha)
    # A damaged train shard stops the run before any step; a damaged validation shard after the
    # training steps, at the evaluation (which would otherwise report a bound on garbage).
    assert steps == ([] if split == "train" else [0, 1, 2])
