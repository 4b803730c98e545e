"""Synthetic corpora with exact answers: HMM-generated documents and planted near-duplicates.

Later stages test themselves against this oracle. A model's loss on a domain cannot beat the
domain's entropy rate, and each document carries its true NLL; near-dedup must find exactly the
duplicates that ``plant_near_duplicates`` planted, whose similarity is known.

A document's text spells its HMM tokens as made-up words, one word per token id, separated by
spaces ("kuba tasi baba ..."), so a word-level tokenizer recovers the HMM tokens exactly and the
NLL stored in ``meta`` holds for them.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import hashlib
import io
import itertools
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

Record = dict[str, str | None]  # one Document: id, domain, text, source, meta

# Keeps every probability strictly positive, so every chain is ergodic (a unique stationary
# distribution) and every token sequence has a finite log-likelihood, however sharp the rows.
_PROBABILITY_FLOOR = 1e-6


# --------------------------------------------------------------------------- the HMM


@dataclass(eq=False)
class HMM:
    """A hidden Markov model over token ids 0..V-1 with S hidden states."""

    initial: np.ndarray  # [S]    p(first state)
    transition: np.ndarray  # [S, S] p(next state | state)
    emission: np.ndarray  # [S, V] p(token | state)

    def __post_init__(self) -> None:
        self.initial = _as_distribution(self.initial, "initial", ndim=1)
        self.transition = _as_distribution(self.transition, "transition", ndim=2)
        self.emission = _as_distribution(self.emission, "emission", ndim=2)
        n_states = self.initial.shape[0]
        if self.transition.shape != (n_states, n_states) or self.emission.shape[0] != n_states:
            raise ValueError(
                f"shapes disagree: initial {self.initial.shape}, transition {self.transition.shape}, "
                f"emission {self.emission.shape}"
            )

    @property
    def n_states(self) -> int:
        return self.transition.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    @classmethod
    def random(cls, n_states: int, vocab_size: int, rng: np.random.Generator, concentration: float = 0.5) -> HMM:
        """Transition and emission rows drawn from a symmetric Dirichlet(concentration).

        ``concentration`` is the sharpness knob. Below 1 each row puts its mass on a few entries,
        so the next state and token are predictable (a low entropy rate); well above 1 the rows
        approach uniform and the domain approaches log(vocab_size) nats per token.
        The chain starts in its stationary distribution, so every position of a document has the
        same statistics and the entropy rate is the expected NLL per token from the first token on.
        """
        transition = _dirichlet_rows(rng, concentration, n_states, n_states)
        emission = _dirichlet_rows(rng, concentration, n_states, vocab_size)
        return cls(stationary_distribution(transition), transition, emission)

    def sample(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """``length`` token ids (int64) drawn from the model, starting from ``initial``."""
        # Inverse-CDF draws with bisect on cumulative rows: much faster per step than rng.choice.
        cum_initial = np.cumsum(self.initial).tolist()
        cum_transition = np.cumsum(self.transition, axis=1).tolist()
        cum_emission = np.cumsum(self.emission, axis=1).tolist()
        state_draws = rng.random(length).tolist()
        token_draws = rng.random(length).tolist()
        tokens = np.empty(length, dtype=np.int64)
        state = 0
        for t in range(length):
            state = _inverse_cdf(cum_transition[state] if t else cum_initial, state_draws[t])
            tokens[t] = _inverse_cdf(cum_emission[state], token_draws[t])
        return tokens

    def log_likelihood(self, tokens: Sequence[int] | np.ndarray) -> float:
        """log p(tokens) in nats (the scaled forward algorithm, stable for any length)."""
        return float(self.log_likelihoods(np.asarray(tokens).reshape(1, -1))[0])

    def log_likelihoods(self, batch: np.ndarray) -> np.ndarray:
        """log p(x) for each row of an [N, L] batch of equal-length token sequences."""
        batch = self._checked_tokens(batch)
        n_sequences, length = batch.shape
        log_likelihood = np.zeros(n_sequences)
        if length == 0:
            return log_likelihood
        emission_by_token = self.emission.T  # [V, S]
        alpha = self.initial * emission_by_token[batch[:, 0]]
        for t in range(length):
            if t > 0:
                alpha = (alpha @ self.transition) * emission_by_token[batch[:, t]]
            # alpha is kept normalized to p(state_t | x_1..t); the normalizers are the
            # conditionals p(x_t | x_<t), whose logs add up to log p(x) without underflow.
            scale = alpha.sum(axis=1)
            with np.errstate(divide="ignore"):
                log_likelihood += np.log(scale)
            alpha = alpha / np.where(scale > 0, scale, 1.0)[:, None]
        return log_likelihood

    def nll_per_token(self, tokens: Sequence[int] | np.ndarray) -> float:
        """-log p(tokens) / len(tokens), in nats."""
        n_tokens = len(tokens)
        if n_tokens == 0:
            raise ValueError("nll_per_token of an empty sequence")
        return -self.log_likelihood(tokens) / n_tokens

    def _checked_tokens(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 2:
            raise ValueError(f"expected an [N, L] batch of token ids, got shape {batch.shape}")
        if batch.size and not np.issubdtype(batch.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {batch.dtype}")
        if batch.size and (batch.min() < 0 or batch.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return batch.astype(np.int64, copy=False)


def _as_distribution(values: np.ndarray, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if np.any(array < 0) or not np.allclose(array.sum(axis=-1), 1.0, atol=1e-9):
        raise ValueError(f"{name} must be non-negative with rows summing to 1")
    return array


def _dirichlet_rows(rng: np.random.Generator, concentration: float, n_rows: int, n_cols: int) -> np.ndarray:
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    rows = rng.dirichlet(np.full(n_cols, concentration), size=n_rows) + _PROBABILITY_FLOOR
    return rows / rows.sum(axis=1, keepdims=True)


def _inverse_cdf(cumulative: list[float], u: float) -> int:
    # min(): rounding can leave cumulative[-1] a hair below 1, and u just above it.
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """The distribution pi with pi @ transition = pi (unique for an ergodic chain)."""
    n_states = transition.shape[0]
    # Solve (T^T - I) pi = 0 together with sum(pi) = 1 as one least-squares system.
    system = np.vstack([transition.T - np.eye(n_states), np.ones((1, n_states))])
    target = np.zeros(n_states + 1)
    target[-1] = 1.0
    pi, *_ = np.linalg.lstsq(system, target, rcond=None)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


# --------------------------------------------------------------------------- oracles for the oracle


def brute_force_log_likelihood(hmm: HMM, tokens: Sequence[int] | np.ndarray) -> float:
    """log p(tokens) summed over every one of the S**L state paths: a check on the forward algorithm."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        return 0.0
    if hmm.n_states ** len(tokens) > 1_000_000:
        raise ValueError("brute force is for tiny HMMs and short sequences (at most 1e6 paths)")
    path_probabilities = []
    for path in itertools.product(range(hmm.n_states), repeat=len(tokens)):
        p = hmm.initial[path[0]] * hmm.emission[path[0], tokens[0]]
        for previous, state, token in zip(path, path[1:], tokens[1:]):
            p *= hmm.transition[previous, state] * hmm.emission[state, token]
        path_probabilities.append(p)
    total = math.fsum(path_probabilities)
    return math.log(total) if total > 0 else -math.inf


def all_sequences(vocab_size: int, length: int) -> np.ndarray:
    """Every token sequence of ``length`` over the vocabulary, as a [vocab_size**length, length] array."""
    if length == 0:
        return np.zeros((1, 0), dtype=np.int64)
    grids = np.meshgrid(*([np.arange(vocab_size)] * length), indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1).astype(np.int64)


def block_entropy(hmm: HMM, length: int) -> float:
    """H(X_1..X_length) in nats, by enumerating all vocab_size**length sequences."""
    if hmm.vocab_size**length > 4_000_000:
        raise ValueError("block_entropy enumerates every sequence: keep vocab_size**length <= 4e6")
    if length == 0:
        return 0.0
    log_p = hmm.log_likelihoods(all_sequences(hmm.vocab_size, length))
    p = np.exp(log_p)
    seen = p > 0
    return float(-np.sum(p[seen] * log_p[seen]))


def entropy_rate_bounds(hmm: HMM, context_length: int = 8) -> tuple[float, float]:
    """Exact lower and upper bounds on the entropy rate (nats/token) of the stationary process.

    Cover & Thomas, Theorem 4.5.1: H(X_n | X_<n, S_1) <= rate <= H(X_n | X_<n) with n =
    ``context_length``; both bounds are computed by enumeration (small vocabularies only) and
    squeeze together as the context grows. The rate does not depend on ``hmm.initial``.
    """
    if context_length < 1:
        raise ValueError("context_length must be >= 1")
    pi = stationary_distribution(hmm.transition)
    stationary = replace(hmm, initial=pi)
    upper = block_entropy(stationary, context_length) - block_entropy(stationary, context_length - 1)
    lower = 0.0
    for state, weight in enumerate(pi):
        from_state = replace(hmm, initial=np.eye(hmm.n_states)[state])
        lower += weight * (block_entropy(from_state, context_length) - block_entropy(from_state, context_length - 1))
    return lower, upper


def entropy_rate_estimate(hmm: HMM, rng: np.random.Generator, n_tokens: int = 100_000) -> float:
    """Monte Carlo entropy rate (nats/token): the NLL per token of one long stationary sample.

    By the Shannon-McMillan-Breiman theorem this converges to the entropy rate; its error shrinks
    like 1/sqrt(n_tokens). Use ``entropy_rate_bounds`` where the vocabulary is small enough.
    """
    stationary = replace(hmm, initial=stationary_distribution(hmm.transition))
    return stationary.nll_per_token(stationary.sample(n_tokens, rng))


# --------------------------------------------------------------------------- tokens as words

# 14 consonants x 5 vowels = 70 two-letter syllables; a word is a token id written in base 70.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_SYLLABLE_VALUE = {s: i for i, s in enumerate(SYLLABLES)}


@functools.lru_cache(maxsize=65536)
def token_word(token_id: int) -> str:
    """The word that spells ``token_id``: its base-70 digits as syllables, at least two ("baba" is 0)."""
    if token_id < 0:
        raise ValueError(f"token ids are non-negative, got {token_id}")
    digits = []
    while token_id or len(digits) < 2:
        token_id, digit = divmod(token_id, len(SYLLABLES))
        digits.append(SYLLABLES[digit])
    return "".join(reversed(digits))


def word_token(word: str) -> int:
    """The token id a word spells; ValueError for anything ``token_word`` would not have written."""
    syllables = [word[i : i + 2] for i in range(0, len(word), 2)]
    if len(syllables) < 2 or any(s not in _SYLLABLE_VALUE for s in syllables):
        raise ValueError(f"{word!r} is not a token word")
    token_id = 0
    for syllable in syllables:
        token_id = token_id * len(SYLLABLES) + _SYLLABLE_VALUE[syllable]
    if token_word(token_id) != word:  # e.g. a zero-padded "bababa"
        raise ValueError(f"{word!r} is not the canonical spelling of token {token_id}")
    return token_id


def render_tokens(tokens: Iterable[int]) -> str:
    return " ".join(token_word(int(t)) for t in tokens)


def parse_tokens(text: str) -> np.ndarray:
    return np.array([word_token(w) for w in text.split()], dtype=np.int64)


# --------------------------------------------------------------------------- corpora


@dataclass(eq=False)
class SyntheticDomain:
    name: str
    hmm: HMM
    doc_length: tuple[int, int] = (64, 256)  # inclusive range of tokens per document

    def __post_init__(self) -> None:
        low, high = self.doc_length
        if not 1 <= low <= high:
            raise ValueError(f"doc_length must satisfy 1 <= low <= high, got {self.doc_length}")


def default_domains(
    seed: int = 0, n_states: int = 8, vocab_size: int = 64, doc_length: tuple[int, int] = (64, 256)
) -> list[SyntheticDomain]:
    """Three domains on one vocabulary that differ only in how predictable they are."""
    sharpness = {"sharp": 0.05, "medium": 0.3, "diffuse": 2.0}  # name -> Dirichlet concentration
    return [
        SyntheticDomain(
            name,
            HMM.random(n_states, vocab_size, np.random.default_rng([seed, _stable_int(name)]), concentration),
            doc_length,
        )
        for name, concentration in sharpness.items()
    ]


def generate_corpus(
    domains: Sequence[SyntheticDomain], docs_per_domain: int | Mapping[str, int], seed: int
) -> list[Record]:
    """Document records for every domain, in domain order then document order.

    Document i of a domain depends only on (seed, domain name, i): a larger corpus extends a
    smaller one, and adding a domain leaves the others unchanged.
    """
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")
    records = []
    for domain in domains:
        n_docs = docs_per_domain[domain.name] if isinstance(docs_per_domain, Mapping) else docs_per_domain
        for index in range(n_docs):
            rng = np.random.default_rng([seed, _stable_int(domain.name), index])
            records.append(synthetic_document(domain, index, rng))
    return records


def synthetic_document(domain: SyntheticDomain, index: int, rng: np.random.Generator) -> Record:
    low, high = domain.doc_length
    tokens = domain.hmm.sample(int(rng.integers(low, high + 1)), rng)
    nll = -domain.hmm.log_likelihood(tokens)
    meta = {"hmm_tokens": len(tokens), "nll_nats": nll, "nll_nats_per_token": nll / len(tokens)}
    return {
        "id": f"{domain.name}-{index:06d}",
        "domain": domain.name,
        "text": render_tokens(tokens),
        "source": f"synthetic://{domain.name}#{index}",
        "meta": json.dumps(meta, sort_keys=True),
    }


def _stable_int(name: str) -> int:
    # hash() is salted per process; seeds must not be.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


# --------------------------------------------------------------------------- planted duplicates


@dataclass(frozen=True)
class PlantedDuplicate:
    dup_id: str
    original_id: str
    edit_rate: float
    n_edits: int
    jaccard: float  # between the word 5-gram shingle sets of the duplicate and the original


def plant_near_duplicates(
    records: Sequence[Record],
    fraction: float,
    edit_rate: float,
    rng: np.random.Generator | int,
    shingle_size: int = 5,
) -> tuple[list[Record], list[PlantedDuplicate]]:
    """Copy round(fraction * len(records)) distinct documents with word-level edits.

    Returns the input records followed by the duplicates, and one ``PlantedDuplicate`` per copy.
    Each word of a copy is edited with probability ``edit_rate`` (substituted, deleted, or
    followed by an inserted word, equally likely; new words come from the same document), so
    edit_rate 0 plants exact duplicates. A copy gets a fresh id ("<original id>-dup<k>") and a
    ``meta`` naming its original; the original's meta (e.g. its NLL) no longer holds for it.
    """
    if not 0 <= fraction <= 1 or not 0 <= edit_rate <= 1:
        raise ValueError(f"fraction and edit_rate must lie in [0, 1], got {fraction} and {edit_rate}")
    rng = np.random.default_rng(rng)
    n_duplicates = round(fraction * len(records))
    chosen = sorted(rng.choice(len(records), size=n_duplicates, replace=False).tolist())
    taken_ids = {r["id"] for r in records}
    duplicates, ground_truth = [], []
    for index in chosen:
        original = records[index]
        text, n_edits = edit_words(original["text"], edit_rate, rng)
        dup_id, k = _unused_id(original["id"], taken_ids)
        duplicates.append(
            {
                "id": dup_id,
                "domain": original["domain"],
                "text": text,
                "source": f"{original['source']}+dup{k}",
                "meta": json.dumps({"duplicate_of": original["id"], "edit_rate": edit_rate, "n_edits": n_edits}),
            }
        )
        similarity = jaccard(word_shingles(text, shingle_size), word_shingles(original["text"], shingle_size))
        ground_truth.append(PlantedDuplicate(dup_id, original["id"], edit_rate, n_edits, similarity))
    return list(records) + duplicates, ground_truth


def edit_words(text: str, edit_rate: float, rng: np.random.Generator) -> tuple[str, int]:
    """Edit each word with probability ``edit_rate``; return the new text and the number of edits.

    Whitespace around untouched words is kept as it was, so zero edits return ``text`` unchanged.
    """
    pieces = re.findall(r"\S+|\s+", text)
    vocabulary = sorted({p for p in pieces if not p.isspace()})
    edited, n_edits = [], 0
    for piece in pieces:
        if piece.isspace() or rng.random() >= edit_rate:
            edited.append(piece)
            continue
        n_edits += 1
        operation = int(rng.integers(3))
        if operation == 0:  # substitute
            edited.append(_other_word(vocabulary, piece, rng))
        elif operation == 1:  # insert a word after this one
            edited.extend([piece, " ", vocabulary[int(rng.integers(len(vocabulary)))]])
        # operation 2: delete (the surrounding whitespace stays)
    return "".join(edited), n_edits


def _other_word(vocabulary: list[str], word: str, rng: np.random.Generator) -> str:
    """A word of ``vocabulary`` other than ``word`` (``word`` itself if it is the only one)."""
    if len(vocabulary) < 2:
        return word
    pick = int(rng.integers(len(vocabulary) - 1))
    return vocabulary[pick + (pick >= bisect.bisect_left(vocabulary, word))]


def _unused_id(original_id: str, taken_ids: set[str]) -> tuple[str, int]:
    k = 1
    while f"{original_id}-dup{k}" in taken_ids:
        k += 1
    taken_ids.add(f"{original_id}-dup{k}")
    return f"{original_id}-dup{k}", k


def word_shingles(text: str, size: int = 5) -> set[tuple[str, ...]]:
    """The set of word n-grams of ``text`` (whitespace-split words); a shorter text is one shingle."""
    words = text.split()
    if len(words) < size:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# --------------------------------------------------------------------------- output


def write_jsonl(records: Iterable[Mapping], path: str | Path) -> int:
    """Write one JSON object per line (gzip-compressed if the path ends in .gz); return the count.

    The gzip header carries no timestamp or file name, so equal records give byte-equal files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with _text_writer(path) as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextmanager
def _text_writer(path: Path) -> Iterator[io.TextIOBase]:
    if path.suffix == ".gz":
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed,
            io.TextIOWrapper(compressed, encoding="utf-8", newline="\n") as text,
        ):
            yield text
    else:
        with open(path, "w", encoding="utf-8", newline="\n") as text:
            yield text
