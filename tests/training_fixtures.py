"""A tiny tokenized corpus (shards + manifest.json) written in a few milliseconds, for tests.

    corpus = write_tiny_corpus(tmp_path, {"alpha": 1, "beta": 3})
    corpus.manifest_path, corpus.root, corpus.manifest

Token ids 0..3 are the special tokens, like the pipeline's tokenizer (pad, mask, bos, eos).
Each domain writes with its own small alphabet of ``alphabet_size`` ordinary ids, and each of
its documents is an arithmetic progression over that alphabet with the domain's stride. So a
model learns something within a few dozen steps (the per-domain alphabet: loss falls from
log(V-1) towards log(alphabet_size)) and more after that (the progression). Documents have
random lengths, so packing, spill-over into the next sequence and truncation all happen.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.contracts import (SHARD_SCHEMA, DomainShards, Manifest, Mixture, ShardInfo, TokenizerInfo,
                             artifact_sha256, write_artifact)

SPECIAL_IDS = {"pad": 0, "mask": 1, "bos": 2, "eos": 3}
N_SPECIAL = len(SPECIAL_IDS)


@dataclass
class TinyCorpus:
    root: str
    manifest_path: str
    manifest: Manifest


def domain_alphabet(domain_index: int, alphabet_size: int, vocab_size: int) -> list[int]:
    n_ordinary = vocab_size - N_SPECIAL
    return [N_SPECIAL + (domain_index * alphabet_size + i) % n_ordinary for i in range(alphabet_size)]


def arithmetic_doc(rng: np.random.Generator, alphabet: list[int], stride: int, length: int) -> list[int]:
    start = int(rng.integers(len(alphabet)))
    return [alphabet[(start + i * stride) % len(alphabet)] for i in range(length)]


def write_shard(path: str, docs: list[list[int]], doc_ids: list[str], bytes_per_token: int = 3) -> ShardInfo:
    """Write one zstd Parquet shard with SHARD_SCHEMA; returns its ShardInfo.

    Its ``path`` is the file name only: a manifest's paths are relative to the manifest folder
    (the contract refuses absolute ones), so callers set the path relative to theirs.
    """
    table = pa.table({
        "doc_id": pa.array(doc_ids, pa.string()),
        "input_ids": pa.array(docs, pa.list_(pa.int32())),
        "n_tokens": pa.array([len(d) for d in docs], pa.int32()),
        "n_bytes": pa.array([bytes_per_token * len(d) for d in docs], pa.int64()),
    }, schema=SHARD_SCHEMA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    data = open(path, "rb").read()
    return ShardInfo(path=os.path.basename(path), split="train", rows=len(docs), tokens=sum(len(d) for d in docs), bytes=len(data),
                     text_bytes=bytes_per_token * sum(len(d) for d in docs), sha256=hashlib.sha256(data).hexdigest())


def write_tiny_corpus(root, strides: dict[str, int] | list[str] = ("alpha", "beta"), vocab_size: int = 32,
                      train_shards: int = 2, docs_per_shard: int = 12, validation_docs: int = 6,
                      doc_len: tuple[int, int] = (4, 40), seed: int = 0, bytes_per_token: int = 3,
                      alphabet_size: int = 8) -> TinyCorpus:
    """Write ``<root>/shards/<domain>/{part,validation}-NNNNN.parquet`` and ``<root>/manifest.json``.

    ``strides`` maps domain -> stride of its progressions (a list of names gets strides 1, 2, ...).
    """
    root = str(root)
    if not isinstance(strides, dict):
        strides = {name: i + 1 for i, name in enumerate(strides)}
    rng = np.random.default_rng(seed)
    domains = {}
    for domain_index, (name, stride) in enumerate(strides.items()):
        alphabet = domain_alphabet(domain_index, alphabet_size, vocab_size)
        shards = []
        layout = [("train", f"part-{i:05d}", docs_per_shard) for i in range(train_shards)]
        if validation_docs:
            layout.append(("validation", "validation-00000", validation_docs))
        for split, stem, n_docs in layout:
            docs = [arithmetic_doc(rng, alphabet, stride, int(rng.integers(doc_len[0], doc_len[1] + 1)))
                    for _ in range(n_docs)]
            ids = [f"{name}-{stem}-{i}" for i in range(n_docs)]
            rel = f"shards/{name}/{stem}.parquet"
            info = write_shard(os.path.join(root, rel), docs, ids, bytes_per_token)
            shards.append(info.model_copy(update={"path": rel, "split": split}))
        domains[name] = DomainShards(shards=shards)
    manifest = Manifest(
        config_hash="test",
        tokenizer=TokenizerInfo(path="tokenizer.json", sha256="0" * 64, vocab_size=vocab_size, special_ids=SPECIAL_IDS),
        domains=domains,
    )
    manifest_path = os.path.join(root, "manifest.json")
    write_artifact(manifest, manifest_path)
    return TinyCorpus(root=root, manifest_path=manifest_path, manifest=manifest)


def write_mixture(path: str, weights: dict[str, float], manifest: Manifest, method: str = "test") -> str:
    write_artifact(Mixture(weights=weights, method=method, manifest_sha256=artifact_sha256(manifest),
                           tokenizer_sha256=manifest.tokenizer.sha256), path)
    return path


def run_two_ranks(script_text: str, args: list[str], workdir, timeout: int = 300) -> None:
    """Run ``script_text`` as 2 gloo ranks on this machine (RANK/WORLD_SIZE/MASTER_* set by hand,
    no launcher) and fail with the tail of a rank's output if either exits non-zero."""
    import socket
    import subprocess
    import sys

    script = os.path.join(str(workdir), "two_ranks.py")
    with open(script, "w") as f:
        f.write(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, output[-3000:]
