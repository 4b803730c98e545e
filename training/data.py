"""Training data: a domain-weighted, packed, exactly resumable stream over manifest shards.

``MixtureSampler`` turns a manifest's per-domain shards into batches of packed sequences:

* each sequence belongs to ONE domain, drawn by the mixture weights (so the per-domain loss
  and DoReMi's per-domain excess loss are well defined per sequence);
* a domain's documents are packed back to back; a document longer than the room left spills
  into that domain's next sequence; ``segment_ids`` number the document pieces inside a
  sequence so that attention stays within a document (see training.model);
* each domain is an endless stream: shards are read one at a time, in a seeded order that is
  reshuffled every epoch, documents shuffled within a shard, and the epochs counted;
* everything that moves is a small cursor (epoch, shard position, document position, token
  offset) plus the numpy generator state that draws domains. The shuffles are pure functions
  of (seed, domain, epoch, shard), so ``state_dict()`` is a few integers and resuming is exact.

``eval_sequences`` gives fixed evaluation batches: one document per sequence.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from infra.contracts import SHARD_SCHEMA, Manifest, ShardInfo, check_table_schema
from infra.errors import ContractError
from infra.storage import Storage, join

SAMPLER_STATE_VERSION = 1


# --------------------------------------------------------------------------- shards


@dataclass
class ShardDocs:
    """A decoded shard: all token ids in one flat array, documents delimited by offsets."""

    tokens: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [rows + 1]
    n_bytes: np.ndarray  # int64 [rows]
    doc_ids: list[str]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def read_shard(manifest_dir: str, shard: ShardInfo, storage: Storage) -> ShardDocs:
    """Read one shard file whole, check its sha256 against the manifest, decode it.

    The checksum is checked on the bytes actually parsed (one read, no second fetch from S3),
    so a shard modified after the manifest was written can never be trained on silently.
    """
    uri = join(manifest_dir, shard.path)
    try:
        with storage.open_input_file(uri) as f:
            data = f.read()
    except FileNotFoundError:
        raise ContractError(f"{uri}: shard listed in the manifest does not exist") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ContractError(
            f"{uri}: sha256 mismatch, the manifest expects {shard.sha256} but the file has {digest} "
            "(the shard was modified or truncated after the manifest was written)"
        )
    table = pq.read_table(pa.BufferReader(data))
    check_table_schema(table, SHARD_SCHEMA, uri)
    ids = table.column("input_ids").combine_chunks()
    return ShardDocs(
        tokens=ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        offsets=ids.offsets.to_numpy().astype(np.int64),
        n_bytes=table.column("n_bytes").to_numpy().astype(np.int64),
        doc_ids=table.column("doc_id").to_pylist(),
    )


def _stable_id(name: str) -> int:
    """A domain's seed component: stable across processes (unlike hash()) and manifest edits."""
    return zlib.crc32(name.encode())


# --------------------------------------------------------------------------- one domain


@dataclass
class StreamCursor:
    """Where a domain stream stands. Plain ints: this is what a checkpoint stores."""

    epoch: int = 0  # completed passes over this rank's documents of the domain
    shard_pos: int = 0  # position in this epoch's shard order
    doc_pos: int = 0  # position in the current shard's (rank-filtered) document order
    token_offset: int = 0  # tokens of the current document already emitted
    tokens_drawn: int = 0  # tokens emitted since the start (for epoch fractions)


class DomainStream:
    """Endless token stream of one domain for one rank.

    Order: per epoch, shards in a seeded permutation; inside a shard, documents in a seeded
    permutation of which this rank keeps every world_size-th one (so ranks see disjoint
    documents even when a domain has a single shard). Only the current shard is in memory.
    """

    def __init__(self, name: str, shards: list[ShardInfo], manifest_dir: str, storage: Storage,
                 seed: int, rank: int, world_size: int):
        self.name = name
        self.shards = shards
        self.manifest_dir = manifest_dir
        self.storage = storage
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = StreamCursor()
        self._loaded: tuple[int, int] | None = None  # (epoch, shard_pos) of the cached shard
        self._docs: ShardDocs | None = None
        self._doc_order: np.ndarray | None = None

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _stable_id(self.name), *keys])

    def _shard_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(len(self.shards))

    def doc_order(self, epoch: int, shard_index: int, n_docs: int) -> np.ndarray:
        """This rank's documents of a shard, in this epoch's order (every world_size-th of a permutation)."""
        return self._rng(epoch, shard_index).permutation(n_docs)[self.rank::self.world_size]

    def _load_current_shard(self) -> None:
        key = (self.cursor.epoch, self.cursor.shard_pos)
        if self._loaded == key:
            return
        shard_index = int(self._shard_order(self.cursor.epoch)[self.cursor.shard_pos])
        docs = read_shard(self.manifest_dir, self.shards[shard_index], self.storage)
        self._docs, self._loaded = docs, key
        self._doc_order = self.doc_order(self.cursor.epoch, shard_index, len(docs))

    def _next_shard(self) -> None:
        self.cursor.shard_pos += 1
        self.cursor.doc_pos = 0
        self.cursor.token_offset = 0
        if self.cursor.shard_pos == len(self.shards):
            self.cursor.epoch += 1
            self.cursor.shard_pos = 0

    def _current_doc(self) -> np.ndarray:
        """The rest of the current document, moving past finished documents, shards and epochs."""
        shards_passed = 0
        while True:
            self._load_current_shard()
            while self.cursor.doc_pos < len(self._doc_order):
                doc = self._docs.doc(int(self._doc_order[self.cursor.doc_pos]))
                if self.cursor.token_offset < len(doc):
                    return doc[self.cursor.token_offset:]
                self.cursor.doc_pos += 1
                self.cursor.token_offset = 0
            self._next_shard()
            shards_passed += 1
            # Two epochs' worth of shards without a single token: there are none for this rank.
            if shards_passed > 2 * len(self.shards):
                raise ContractError(
                    f"domain {self.name!r}: its {len(self.shards)} shard(s) hold no tokens for rank "
                    f"{self.rank} of {self.world_size} (too few documents for this many ranks?)"
                )

    def take(self, n: int) -> list[np.ndarray]:
        """The next n tokens as pieces, one piece per document (a new piece = a new document)."""
        pieces = []
        while n > 0:
            rest = self._current_doc()
            piece = rest[:n]
            pieces.append(piece)
            n -= len(piece)
            self.cursor.token_offset += len(piece)
            self.cursor.tokens_drawn += len(piece)
        return pieces

    def state_dict(self) -> dict:
        return dict(vars(self.cursor))

    def load_state_dict(self, state: dict) -> None:
        self.cursor = StreamCursor(**state)
        self._loaded = None


# --------------------------------------------------------------------------- the mixture


def natural_weights(manifest: Manifest, split: str = "train") -> dict[str, float]:
    """Each domain in proportion to its tokens in ``split``."""
    tokens = {d: manifest.domains[d].tokens(split) for d in manifest.domain_names()}
    total = sum(tokens.values())
    if total == 0:
        raise ContractError(f"manifest has no {split} tokens in any domain")
    return {d: n / total for d, n in tokens.items()}


class MixtureSampler:
    """Batches of packed single-domain sequences, domains drawn by ``weights``.

    ``domains`` is every manifest domain, sorted; ``domain_index`` in a batch indexes it (the
    order is fixed by the manifest, not the mixture, so per-domain metrics line up across runs).
    Ranks must all be built with the same seed: domains are drawn for the global batch from a
    shared generator and each rank takes its slice, like the diffusion times.
    """

    def __init__(self, manifest: Manifest, manifest_dir: str, weights: dict[str, float], seq_len: int,
                 batch_size: int, seed: int, split: str = "train", storage: Storage | None = None,
                 rank: int = 0, world_size: int = 1):
        unknown = sorted(set(weights) - set(manifest.domains))
        if unknown:
            raise ContractError(
                f"mixture weights name domains the manifest does not have: {unknown} "
                f"(manifest domains: {manifest.domain_names()})"
            )
        bad = {d: w for d, w in weights.items() if not (np.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"mixture weights must be finite and >= 0, got {bad}")
        self.manifest = manifest
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.storage = storage or Storage()
        self.pad_id = manifest.tokenizer.special_ids["pad"]
        self.domains: list[str] = manifest.domain_names()
        self.set_weights(weights)
        self.streams = {
            d: DomainStream(d, manifest.domains[d].split(split), manifest_dir, self.storage, seed, rank, world_size)
            for d in self.domains
        }
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the mixture (e.g. between DoReMi rounds); cursors are kept."""
        probs = np.array([float(weights.get(d, 0.0)) for d in self.domains], dtype=np.float64)
        if probs.sum() <= 0:
            raise ValueError(f"mixture weights sum to 0: {weights}")
        empty = [d for d, p in zip(self.domains, probs) if p > 0 and self.manifest.domains[d].tokens(self.split) == 0]
        if empty:
            raise ContractError(f"domains {empty} have weight > 0 but no {self.split} tokens in the manifest")
        self.probs = probs / probs.sum()

    def _draw_domains(self) -> np.ndarray:
        n_global = self.batch_size * self.world_size
        draws = self._rng.choice(len(self.domains), size=n_global, p=self.probs)
        return draws[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _pack(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        segments = np.full(self.seq_len, -1, dtype=np.int64)
        pos = 0
        for segment, piece in enumerate(self.streams[domain].take(self.seq_len)):
            tokens[pos:pos + len(piece)] = piece
            segments[pos:pos + len(piece)] = segment
            pos += len(piece)
        return tokens, segments

    def next_batch(self) -> dict[str, torch.Tensor]:
        """input_ids [B, L], segment_ids [B, L] (-1 = pad), valid [B, L], domain_index [B]."""
        domain_index = self._draw_domains()
        packed = [self._pack(self.domains[i]) for i in domain_index]
        input_ids = torch.from_numpy(np.stack([p[0] for p in packed]))
        segment_ids = torch.from_numpy(np.stack([p[1] for p in packed]))
        self.batches_drawn += 1
        return {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "valid": segment_ids >= 0,
            "domain_index": torch.from_numpy(domain_index.astype(np.int64)),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ bookkeeping

    def epochs(self) -> dict[str, float]:
        """Passes over each domain so far (fractional), counting all ranks' documents."""
        out = {}
        for d, stream in self.streams.items():
            total = self.manifest.domains[d].tokens(self.split)
            out[d] = stream.cursor.tokens_drawn * self.world_size / total if total else 0.0
        return out

    def epochs_completed(self) -> dict[str, int]:
        return {d: s.cursor.epoch for d, s in self.streams.items()}

    def state_dict(self) -> dict:
        """JSON-serialisable; restoring it reproduces the exact batches that would have followed."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "seed": self.seed,
            "split": self.split,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "domains": list(self.domains),
            "batches_drawn": self.batches_drawn,
            "rng": self._rng.bit_generator.state,  # PCG64: a dict of Python ints (JSON is exact for ints)
            "streams": {d: s.state_dict() for d, s in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise ContractError(f"sampler state version {state.get('version')!r} is not {SAMPLER_STATE_VERSION}")
        for key in ("split", "seq_len", "rank", "world_size", "domains"):
            mine = list(self.domains) if key == "domains" else getattr(self, key)
            if state[key] != mine:
                raise ContractError(f"sampler state was saved with {key}={state[key]!r}, this sampler has {mine!r}")
        self.seed = state["seed"]
        for stream in self.streams.values():
            stream.seed = self.seed
        self.batches_drawn = state["batches_drawn"]
        self._rng.bit_generator.state = state["rng"]
        for d, s in state["streams"].items():
            self.streams[d].load_state_dict(s)


# --------------------------------------------------------------------------- evaluation data


@dataclass
class EvalSequences:
    """Fixed evaluation sequences of one domain: one document per row, truncated to seq_len.

    One document per sequence keeps each row an independent sample (the confidence interval
    is computed across rows) and makes a row's bound a bound on that document's prefix. A
    document longer than seq_len is evaluated on its first seq_len tokens; its UTF-8 byte count
    is scaled by kept / total tokens for bits-per-byte (an approximation: tokens are not all
    the same width, but the error averages out over documents and is 0 when nothing is cut).
    """

    domain: str
    input_ids: torch.Tensor  # [N, L] long, padded with the manifest's pad id
    segment_ids: torch.Tensor  # [N, L] long: 0 on the document, -1 on padding
    valid: torch.Tensor  # [N, L] bool
    n_bytes: torch.Tensor  # [N] float64, UTF-8 bytes of the evaluated (kept) text
    doc_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches trimmed to their longest row (no compute spent on all-padding columns)."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            width = int(self.valid[rows].sum(dim=1).max())
            yield {
                "input_ids": self.input_ids[rows, :width],
                "segment_ids": self.segment_ids[rows, :width],
                "valid": self.valid[rows, :width],
                "n_bytes": self.n_bytes[rows],
            }


def eval_sequences(manifest: Manifest, manifest_dir: str, domain: str, split: str, seq_len: int,
                   max_docs: int, storage: Storage | None = None) -> EvalSequences:
    """The first ``max_docs`` non-empty documents of ``domain``/``split`` in manifest order.

    Deterministic (no shuffling: the pipeline's validation split is already a hash-random
    subset), so two checkpoints evaluated with the same settings see the same documents.
    """
    if domain not in manifest.domains:
        raise ContractError(f"domain {domain!r} is not in the manifest (it has {manifest.domain_names()})")
    storage = storage or Storage()
    pad_id = manifest.tokenizer.special_ids["pad"]
    rows, byte_counts, doc_ids = [], [], []
    for shard in manifest.domains[domain].split(split):
        if len(rows) >= max_docs:
            break
        docs = read_shard(manifest_dir, shard, storage)
        for i in range(len(docs)):
            tokens = docs.doc(i)
            if len(tokens) == 0:
                continue
            kept = tokens[:seq_len]
            rows.append(kept)
            byte_counts.append(float(docs.n_bytes[i]) * len(kept) / len(tokens))
            doc_ids.append(docs.doc_ids[i])
            if len(rows) >= max_docs:
                break
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    segment_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, tokens in enumerate(rows):
        input_ids[r, :len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
        segment_ids[r, :len(tokens)] = 0
    return EvalSequences(domain, input_ids, segment_ids, segment_ids >= 0,
                         torch.tensor(byte_counts, dtype=torch.float64), doc_ids)


# --------------------------------------------------------------------------- tokenizer and masking


def load_tokenizer_json(manifest: Manifest, manifest_dir: str, storage: Storage | None = None) -> str:
    """The manifest's tokenizer.json (its path is relative to the manifest's folder), sha256-checked."""
    uri = join(manifest_dir, manifest.tokenizer.path)
    try:
        data = (storage or Storage()).read_bytes(uri)
    except FileNotFoundError:
        raise ContractError(f"{uri}: the manifest's tokenizer file does not exist") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.tokenizer.sha256:
        raise ContractError(f"{uri}: sha256 mismatch, the manifest expects {manifest.tokenizer.sha256} but the "
                            f"file has {digest} (the tokenizer was replaced after the manifest was written)")
    return data.decode()


def masking_for_run(masking_cfg, manifest: Manifest, manifest_dir: str, storage: Storage | None = None):
    """training.diffusion.Masking for an ``infra.config.MaskingConfig``.

    Whole-word masking reads the manifest's tokenizer.json once to build the per-id word-start
    table; the other strategies need nothing from the data.
    """
    from training.diffusion import Masking, MaskingStrategy, word_start_table

    word_start = None
    if MaskingStrategy(masking_cfg.strategy) is MaskingStrategy.WHOLE_WORD:
        vocab = max(manifest.tokenizer.vocab_size, max(manifest.tokenizer.special_ids.values()) + 1)
        word_start = word_start_table(load_tokenizer_json(manifest, manifest_dir, storage), vocab)
        # Special ids (pad, mask, ...) always start a word, whatever the tokenizer file says.
        word_start[list(manifest.tokenizer.special_ids.values())] = True
    return Masking.from_config(masking_cfg, word_start=word_start)
