"""Tokenizer: train a byte-level BPE with `tokenizers` on a sample of the corpus, or load one.

The special tokens (pad, mask, bos, eos) are reserved at fixed ids 0..3 when we train; a given
tokenizer.json must already contain them. Their ids go into the manifest, so training never
guesses which id is the mask.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from infra.config import TokenizerConfig
from infra.errors import ConfigError

SPECIAL_TOKENS = {"pad": "<pad>", "mask": "<mask>", "bos": "<bos>", "eos": "<eos>"}


def train_tokenizer(texts: list[str], cfg: TokenizerConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_ids(tok: Tokenizer, where: str) -> dict[str, int]:
    ids = {}
    for name, token in SPECIAL_TOKENS.items():
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{where}: tokenizer has no {token!r} token (maskmix needs {sorted(SPECIAL_TOKENS.values())})")
        ids[name] = token_id
    return ids


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


_loaded: dict[str, Tokenizer] = {}


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """One parsed tokenizer per worker process (a task reuses it across batches)."""
    key = tokenizer_sha256(tokenizer_json)
    if key not in _loaded:
        _loaded[key] = Tokenizer.from_str(tokenizer_json)
    return _loaded[key]


def tokenize_batch(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    """Ray map_batches function: Document rows -> doc_id, domain, input_ids, n_tokens, n_bytes."""
    texts = batch.column("text").to_pylist()
    encodings = _tokenizer(tokenizer_json).encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    return pa.table({
        "doc_id": batch.column("id"),
        "domain": batch.column("domain"),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "n_tokens": pa.array([len(i) for i in ids], pa.int32()),
        "n_bytes": pa.array([len(t.encode()) for t in texts], pa.int64()),
    })
