"""The synthetic source is an oracle for later stages, so its own answers are checked against
independent ones: brute-force path enumeration, sequence enumeration, exact entropy-rate bounds."""

import gzip
import itertools
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from infra.contracts import DOCUMENT_SCHEMA
from pipelines.synthetic import (
    HMM,
    SyntheticDomain,
    all_sequences,
    brute_force_log_likelihood,
    default_domains,
    entropy_rate_bounds,
    entropy_rate_estimate,
    generate_corpus,
    jaccard,
    parse_tokens,
    plant_near_duplicates,
    render_tokens,
    stationary_distribution,
    token_word,
    word_shingles,
    word_token,
    write_jsonl,
)


def tiny_hmm(n_states: int, vocab_size: int, seed: int) -> HMM:
    """A tiny HMM whose initial distribution is not the stationary one (the general case)."""
    rng = np.random.default_rng(seed)
    return HMM(
        initial=rng.dirichlet(np.ones(n_states)),
        transition=rng.dirichlet(np.ones(n_states), size=n_states),
        emission=rng.dirichlet(np.ones(vocab_size), size=n_states),
    )


# --------------------------------------------------------------------------- the HMM


@pytest.mark.parametrize("n_states", [2, 3])
def test_forward_algorithm_equals_brute_force_enumeration(n_states):
    hmm = tiny_hmm(n_states, vocab_size=3, seed=n_states)
    rng = np.random.default_rng(0)
    sequences = [seq for length in range(1, 5) for seq in itertools.product(range(3), repeat=length)]
    sequences += [rng.integers(0, 3, size=length).tolist() for length in (5, 6) for _ in range(20)]
    for tokens in sequences:
        assert hmm.log_likelihood(tokens) == pytest.approx(brute_force_log_likelihood(hmm, tokens), abs=1e-10)


def test_empty_sequence_has_probability_one():
    hmm = tiny_hmm(2, 3, seed=0)
    assert hmm.log_likelihood([]) == 0.0 == brute_force_log_likelihood(hmm, [])


@pytest.mark.parametrize("length", range(1, 7))
def test_probabilities_of_all_sequences_of_a_length_sum_to_one(length):
    hmm = tiny_hmm(3, 3, seed=length)
    log_p = hmm.log_likelihoods(all_sequences(3, length))
    assert len(log_p) == 3**length
    assert math.fsum(np.exp(log_p)) == pytest.approx(1.0, abs=1e-12)


def test_forward_algorithm_does_not_underflow_on_long_sequences():
    hmm = HMM.random(4, 16, np.random.default_rng(0), concentration=0.3)
    tokens = hmm.sample(20_000, np.random.default_rng(1))
    log_likelihood = hmm.log_likelihood(tokens)
    # A plain product of 20k probabilities would be 0.0 (log -inf); the scaled forward pass is not.
    assert math.isfinite(log_likelihood)
    assert 0 < hmm.nll_per_token(tokens) < math.log(16) + 0.1


def test_sampler_matches_the_stationary_token_distribution():
    hmm = HMM.random(3, 5, np.random.default_rng(2), concentration=0.5)
    tokens = hmm.sample(100_000, np.random.default_rng(3))
    assert tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() < 5
    expected = stationary_distribution(hmm.transition) @ hmm.emission
    observed = np.bincount(tokens, minlength=5) / len(tokens)
    assert 0.5 * np.abs(observed - expected).sum() < 0.01  # total variation


def test_random_hmm_starts_stationary_and_rejects_bad_parameters():
    hmm = HMM.random(5, 7, np.random.default_rng(0))
    np.testing.assert_allclose(hmm.initial @ hmm.transition, hmm.initial, atol=1e-12)
    with pytest.raises(ValueError):
        HMM(np.array([0.5, 0.6]), np.eye(2), np.eye(2))
    with pytest.raises(ValueError):
        HMM(np.array([0.5, 0.5]), np.eye(3), np.eye(2))
    with pytest.raises(ValueError):
        hmm.log_likelihood([0, 7])  # outside the vocabulary


def test_entropy_rate_bounds_tighten_with_context():
    hmm = HMM.random(3, 4, np.random.default_rng(4), concentration=0.3)
    bounds = [entropy_rate_bounds(hmm, n) for n in (2, 4, 6, 8)]
    for (lower, upper), (next_lower, next_upper) in zip(bounds, bounds[1:]):
        assert lower <= next_lower + 1e-12 and next_upper <= upper + 1e-12
    lower, upper = bounds[-1]
    assert lower <= upper < lower + 0.02


@pytest.mark.parametrize("concentration", [0.1, 0.5, 2.0])
def test_mean_nll_of_long_samples_approaches_the_entropy_rate(concentration):
    hmm = HMM.random(3, 4, np.random.default_rng(5), concentration=concentration)
    lower, upper = entropy_rate_bounds(hmm, context_length=8)
    estimate = entropy_rate_estimate(hmm, np.random.default_rng(6), n_tokens=50_000)
    # The Monte Carlo error at 50k tokens is below 0.01 nats (std measured over seeds).
    assert lower - 0.03 < estimate < upper + 0.03


def test_concentration_is_a_sharpness_knob():
    rates = [
        entropy_rate_estimate(HMM.random(8, 64, np.random.default_rng(7), c), np.random.default_rng(8), 20_000)
        for c in (0.05, 0.3, 2.0)
    ]
    assert rates[0] < rates[1] < rates[2] < math.log(64)


# --------------------------------------------------------------------------- tokens as words


def test_token_words_are_a_bijection():
    words = [token_word(i) for i in range(10_000)]
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    assert [word_token(w) for w in words] == list(range(10_000))
    for bad in ["", "ba", "bababa", "xx", "bax"]:
        with pytest.raises(ValueError):
            word_token(bad)


def test_text_round_trips_to_token_ids():
    tokens = np.random.default_rng(0).integers(0, 5000, size=300)
    np.testing.assert_array_equal(parse_tokens(render_tokens(tokens)), tokens)


# --------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def domains():
    return default_domains(seed=0, n_states=4, vocab_size=32, doc_length=(20, 60))


def test_generated_corpus_is_deterministic_for_a_seed(domains):
    first = generate_corpus(domains, 5, seed=11)
    assert first == generate_corpus(domains, 5, seed=11)
    assert first != generate_corpus(domains, 5, seed=12)
    # Document i depends only on (seed, domain, i): a larger corpus extends a smaller one.
    larger = generate_corpus(domains, {"sharp": 8, "medium": 5, "diffuse": 5}, seed=11)
    assert larger[:5] == first[:5] and larger[8:] == first[5:]


def test_generated_documents_carry_their_true_nll(domains):
    records = generate_corpus(domains, 4, seed=3)
    by_name = {d.name: d for d in domains}
    assert len({r["id"] for r in records}) == len(records) == 12
    for r in records:
        domain = by_name[r["domain"]]
        index = int(r["id"].rsplit("-", 1)[1])
        assert r["id"] == f"{domain.name}-{index:06d}" and r["source"] == f"synthetic://{domain.name}#{index}"
        tokens = parse_tokens(r["text"])
        meta = json.loads(r["meta"])
        assert meta["hmm_tokens"] == len(tokens) and 20 <= len(tokens) <= 60
        assert meta["nll_nats"] == pytest.approx(-domain.hmm.log_likelihood(tokens), rel=1e-12)
        assert meta["nll_nats_per_token"] == pytest.approx(meta["nll_nats"] / len(tokens), rel=1e-12)


def test_generated_records_fit_the_document_schema(domains):
    table = pa.Table.from_pylist(generate_corpus(domains, 3, seed=0), schema=DOCUMENT_SCHEMA)
    assert table.num_rows == 9 and table.column("meta").null_count == 0


def test_domain_rejects_bad_length_range():
    with pytest.raises(ValueError):
        SyntheticDomain("x", tiny_hmm(2, 3, 0), doc_length=(0, 5))
    with pytest.raises(ValueError):
        generate_corpus([SyntheticDomain("x", tiny_hmm(2, 3, 0))] * 2, 1, seed=0)


# --------------------------------------------------------------------------- planted duplicates


@pytest.fixture(scope="module")
def corpus(domains):
    return generate_corpus(domains, 40, seed=1)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1.0])
def test_ground_truth_count_matches_fraction_and_ids_are_unique(corpus, fraction):
    records, truth = plant_near_duplicates(corpus, fraction, edit_rate=0.1, rng=0)
    assert len(truth) == round(fraction * len(corpus))
    assert len(records) == len(corpus) + len(truth)
    assert records[: len(corpus)] == corpus  # originals untouched and first
    assert len({r["id"] for r in records}) == len(records)
    assert len({t.original_id for t in truth}) == len(truth)  # each original copied at most once


def test_edit_rate_zero_plants_exact_duplicates(corpus):
    records, truth = plant_near_duplicates(corpus, 0.2, edit_rate=0.0, rng=1)
    by_id = {r["id"]: r for r in records}
    for t in truth:
        assert by_id[t.dup_id]["text"] == by_id[t.original_id]["text"]
        assert by_id[t.dup_id]["domain"] == by_id[t.original_id]["domain"]
        assert t.jaccard == 1.0 and t.n_edits == 0
        assert json.loads(by_id[t.dup_id]["meta"])["duplicate_of"] == t.original_id


def test_higher_edit_rates_give_lower_jaccard_on_average(corpus):
    rates = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]
    mean_jaccard = [np.mean([t.jaccard for t in plant_near_duplicates(corpus, 0.5, r, rng=2)[1]]) for r in rates]
    assert mean_jaccard[0] == 1.0
    assert all(a > b for a, b in zip(mean_jaccard, mean_jaccard[1:])), mean_jaccard


def test_ground_truth_jaccard_is_that_of_the_planted_texts(corpus):
    records, truth = plant_near_duplicates(corpus, 0.3, edit_rate=0.1, rng=3)
    by_id = {r["id"]: r for r in records}
    for t in truth:
        dup, original = by_id[t.dup_id]["text"], by_id[t.original_id]["text"]
        assert t.jaccard == jaccard(word_shingles(dup), word_shingles(original))
        parse_tokens(dup)  # edits use the document's own words, so a dup still tokenizes


def test_planting_twice_keeps_ids_unique(corpus):
    once, _ = plant_near_duplicates(corpus, 1.0, 0.0, rng=4)
    twice, truth = plant_near_duplicates(once, 0.5, 0.0, rng=5)
    assert len({r["id"] for r in twice}) == len(twice)
    assert len(truth) == round(0.5 * len(once))


def test_shingles_and_jaccard():
    assert word_shingles("a b c d e f") == {("a", "b", "c", "d", "e"), ("b", "c", "d", "e", "f")}
    assert word_shingles("a b") == {("a", "b")} and word_shingles("  ") == set()
    assert jaccard(set(), set()) == 1.0 and jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_write_jsonl_round_trips_and_is_byte_stable(tmp_path, corpus, name):
    path = tmp_path / "out" / name
    assert write_jsonl(corpus, path) == len(corpus)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == corpus
    first = path.read_bytes()
    write_jsonl(corpus, path)
    assert path.read_bytes() == first
