"""mixing.doremi: the update rule and the excess loss by hand, same-mask scoring, simplex safety,
and a short end-to-end DoReMi writing a Mixture and its MLflow metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infra.config import DoReMiConfig, MixConfig, ProxyConfig
from infra.contracts import Mixture, load_mixture, write_artifact
from mixing.doremi import (UNSTABLE_SPLIT_HALF, DoReMiResult, RoundResult, doremi_update, dro_loss, excess_loss,
                           repetition_caps, resolve_reference_weights, run_doremi, split_half_distance,
                           train_dro_proxy, update_excess)
from mixing.proxy import train_proxy
from mixing.sampling import kl_project_capped, project_capped_simplex
from tests.training_fixtures import write_tiny_corpus
from training.diffusion import token_terms

TINY = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8,
            lr=3e-3, warmup_steps=2, eval_docs_per_domain=4, mc_samples=2)


def test_doremi_update_matches_hand_computation():
    # alpha * exp(eta * lambda) = [0.5 e^0.1, 0.3 e^0, 0.2 e^0.5] = [0.55258546, 0.3, 0.32974425]
    # sum 1.18232971 -> normalized [0.46737002, 0.25373633, 0.27889365]
    # smoothing c = 0.1, k = 3: 0.9 * normalized + 0.1 / 3 = [0.45396635, 0.26169603, 0.28433762]
    new = doremi_update(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.0, 0.5]), eta=1.0, smoothing=0.1)
    assert new.tolist() == pytest.approx([0.45396635, 0.26169603, 0.28433762], abs=1e-8)
    # eta scales the step: eta = 2 on lambda = [ln 2 / 2, 0] doubles the first odds: [2, 1] / 3.
    new = doremi_update(torch.tensor([0.5, 0.5]), torch.tensor([math.log(2) / 2, 0.0], dtype=torch.float64),
                        eta=2.0, smoothing=0.0)
    assert new.tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-12)


def _hand_batch():
    proxy = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.2, 3.0, 0.0, 0.0], [1.0, 1.0, 0.5, 1.0]])
    ref = torch.tensor([[0.5, 0.0, 3.0, 0.5], [0.4, 1.0, 0.0, 0.0], [2.0, 0.0, 0.5, 0.0]])
    masked = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    domain = torch.tensor([0, 1, 0])
    return proxy, ref, masked, valid, domain


@pytest.mark.parametrize("clip, expected", [
    # domain 0 (rows 0 and 2, 8 valid tokens): masked diffs 0.5, -1.0, 0.0 | -1.0, 1.0, 0.0
    #   (row 2's last position is unmasked: its proxy-ref difference of 1.0 must be ignored)
    #   token clip: (0.5 + 1.0) / 8 = 0.1875; aggregate: -0.5 / 8 = -0.0625 -> clipped 0
    # domain 1 (row 1, 3 valid tokens): diffs -0.2, 2.0: token 2.0 / 3; aggregate 1.8 / 3 = 0.6
    # domain 2: absent
    ("token", [0.1875, 2.0 / 3, 0.0]),
    ("domain", [0.0, 0.6, 0.0]),
    ("none", [-0.0625, 0.6, 0.0]),
])
def test_excess_loss_by_hand(clip, expected):
    proxy, ref, masked, valid, domain = _hand_batch()
    lam, present = excess_loss(proxy, ref, masked, domain, 3, clip=clip, valid=valid)
    assert lam.tolist() == pytest.approx(expected, abs=1e-7)  # float32 inputs
    assert present.tolist() == [True, True, False]


def test_excess_loss_rejects_unknown_clip():
    proxy, ref, masked, valid, domain = _hand_batch()
    with pytest.raises(ValueError):
        excess_loss(proxy, ref, masked, domain, 3, clip="sequence")


def test_dro_loss_reweights_by_alpha_over_sampling():
    terms = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    domain = torch.tensor([0, 1])
    # weights alpha/p = [0.25/0.5, 0.75/0.5] = [0.5, 1.5] per token: (0.5*2 + 1.5*6) / (0.5*2 + 1.5*2) = 10 / 4
    loss = dro_loss(terms, valid, domain, torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5]))
    assert float(loss) == pytest.approx(2.5)


def test_weights_stay_on_simplex_and_never_go_one_hot():
    k, c = 4, 1e-3
    gen = torch.Generator().manual_seed(0)
    alpha = torch.full((k,), 1 / k, dtype=torch.float64)
    for step in range(5000):
        # extreme excess losses, one domain far ahead most of the time
        excess = torch.randn(k, generator=gen, dtype=torch.float64) * 1e3
        excess[0] = 1e6 if step % 7 else -1e6
        alpha = doremi_update(alpha, excess, eta=1.0, smoothing=c)
        assert torch.isfinite(alpha).all()
        assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(alpha.min()) >= c / k - 1e-15
        assert float(alpha.max()) <= 1 - (k - 1) * c / k + 1e-12


def test_split_half_distance_by_hand():
    four = [{"a": 1.0, "b": 0.0}, {"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8}, {"a": 0.4, "b": 0.6}]
    assert split_half_distance(four) == pytest.approx(0.6)  # a: 0.9 vs 0.3
    three = [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0}]
    assert split_half_distance(three) == pytest.approx(0.75)  # the middle step goes to the second half
    assert split_half_distance([{"a": 0.3, "b": 0.7}] * 9) == 0.0
    assert split_half_distance(four[:1]) == 0.0


def test_unstable_rounds_are_warned_about():
    steady = [{"a": 0.5, "b": 0.5}] * 10
    swinging = [{"a": 0.99, "b": 0.01}] * 5 + [{"a": 0.01, "b": 0.99}] * 5
    rounds = [RoundResult(reference_weights={"a": 0.5, "b": 0.5}, weights={"a": 0.5, "b": 0.5}, trajectory=t,
                          steps=len(t)) for t in (steady, swinging)]
    result = DoReMiResult(weights=rounds[-1].weights, rounds=rounds, config=DoReMiConfig(eta=1.0), converged=False)
    assert [r.split_half for r in rounds] == [0.0, pytest.approx(0.98)]
    warnings = result.stability_warnings()
    assert len(warnings) == 1 and warnings[0].startswith("doremi round 2: unstable weights")
    assert "0.98" in warnings[0] and "eta=1" in warnings[0] and "(e.g. 0.1)" in warnings[0]


def test_proxy_and_reference_are_scored_on_the_identical_draw(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha", "beta", "gamma"])
    proxy_cfg = ProxyConfig(**TINY, steps=4)
    cfg = DoReMiConfig(proxy=proxy_cfg)
    weights = resolve_reference_weights(corpus.manifest, "natural")
    reference = train_proxy(corpus.manifest, corpus.root, weights, proxy_cfg).model
    calls = []

    def recording(model, x0, segment_ids, draw, valid, mask_id):
        terms = token_terms(model, x0, segment_ids, draw, valid, mask_id)
        calls.append((model, draw, x0, terms.detach().clone()))
        return terms

    train_dro_proxy(corpus.manifest, corpus.root, reference, weights, cfg, proxy_cfg, scorer=recording)
    assert len(calls) == 2 * proxy_cfg.steps
    for (m_proxy, d_proxy, x_proxy, _), (m_ref, d_ref, x_ref, _) in zip(calls[::2], calls[1::2]):
        assert m_ref is reference and m_proxy is not reference
        assert d_proxy is d_ref and x_proxy is x_ref  # the very same NoiseDraw object and batch


def test_model_against_itself_has_zero_excess(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha", "beta"])
    proxy_cfg = ProxyConfig(**TINY, steps=3)
    weights = {"alpha": 0.5, "beta": 0.5}
    model = train_proxy(corpus.manifest, corpus.root, weights, proxy_cfg).model
    from training.data import MixtureSampler
    from training.diffusion import draw_noise
    batch = MixtureSampler(corpus.manifest, corpus.root, weights, 32, 8, seed=3).next_batch()
    draw = draw_noise(batch["valid"], torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = token_terms(model, batch["input_ids"], batch["segment_ids"], draw, batch["valid"], 1)
        b = token_terms(model, batch["input_ids"], batch["segment_ids"], draw, batch["valid"], 1)
    lam, present = excess_loss(a, b, draw.masked, batch["domain_index"], 2, clip="none", valid=batch["valid"])
    assert lam.abs().max() == 0.0


def test_reference_weight_specs(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha", "beta"])
    assert resolve_reference_weights(corpus.manifest, "uniform") == {"alpha": 0.5, "beta": 0.5}
    assert resolve_reference_weights(corpus.manifest, {"alpha": 3, "beta": 1}) == pytest.approx(
        {"alpha": 0.75, "beta": 0.25})
    with pytest.raises(ValueError):
        resolve_reference_weights(corpus.manifest, {"nope": 1.0})
    assert MixConfig(manifest="m", output="o").doremi.eta == 1.0


def test_doremi_end_to_end_writes_mixture_and_mlflow_metrics(tmp_path, mlflow_uri):
    import mlflow

    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5})
    steps = 12
    cfg = DoReMiConfig(proxy=ProxyConfig(**TINY, steps=steps), rounds=2, tol=1e-9)
    result = run_doremi(corpus.manifest, corpus.root, cfg)
    assert len(result.rounds) == 2 and not result.converged
    assert result.rounds[1].reference_weights == result.rounds[0].weights  # iterated: ref = previous average
    for r in result.rounds:
        assert sum(r.weights.values()) == pytest.approx(1.0)
        assert min(r.weights.values()) >= cfg.smoothing / 3 - 1e-12
        assert len(r.trajectory) == steps and len(r.excess) == steps
        assert set(r.reference_eval) == set(r.proxy_eval) == {"alpha", "beta", "gamma"}

    mixture = result.to_mixture(corpus.manifest)
    path = str(tmp_path / "mixture.json")
    write_artifact(mixture, path)
    loaded = load_mixture(path)
    assert isinstance(loaded, Mixture) and loaded.method == "doremi"
    assert loaded.details["eta"] == 1.0 and loaded.details["rounds"] == 2 and loaded.details["steps"] == steps
    assert loaded.details["round_split_half"] == pytest.approx([split_half_distance(r.trajectory)
                                                                for r in result.rounds])
    assert len(loaded.details["stability_warnings"]) == sum(r.split_half > UNSTABLE_SPLIT_HALF for r in result.rounds)
    assert loaded.reference_weights == pytest.approx(resolve_reference_weights(corpus.manifest, "natural"))
    shaped = result.to_doremi_json()
    assert set(shaped) == {"train_domain_weights", "eval_domain_weights"}

    client = mlflow.tracking.MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    rounds = client.search_runs(exp_ids, "tags.`maskmix.stage` = 'doremi_round'")
    assert len(rounds) == 2
    proxies = client.search_runs(exp_ids, "tags.`maskmix.stage` = 'doremi_proxy'")
    assert len(proxies) == 2
    for run in proxies:
        for d in ("alpha", "beta", "gamma"):
            history = client.get_metric_history(run.info.run_id, f"doremi/weight/{d}")
            assert len(history) == steps
            assert len(client.get_metric_history(run.info.run_id, f"doremi/excess/{d}")) == steps
        assert client.get_metric_history(run.info.run_id, "doremi/proxy_loss/gamma")
        assert client.get_metric_history(run.info.run_id, "doremi/ref_loss/gamma")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in rounds}
    assert parents == {result.mlflow_run_id}


def test_kl_projection_onto_the_capped_simplex_by_hand():
    # One domain over its cap sits at the cap; the others share its surplus in PROPORTION:
    # [0.94, 0.02, 0.02, 0.02], cap 0.04 -> rest x 0.96/0.06 = 16 -> [0.04, 0.32, 0.32, 0.32];
    # [0.90, 0.02, 0.02, 0.06] -> rest x 0.96/0.10 -> [0.04, 0.192, 0.192, 0.576]
    # (the Euclidean projection, a shift, would give [0.04, 0.30, 0.30, 0.34]).
    assert kl_project_capped([0.94, 0.02, 0.02, 0.02], [0.04, 1, 1, 1]) == pytest.approx([0.04, 0.32, 0.32, 0.32])
    assert kl_project_capped([0.90, 0.02, 0.02, 0.06], [0.04, 1, 1, 1]) == pytest.approx(
        [0.04, 0.192, 0.192, 0.576])
    # A cascade: rescaling pushes a second domain over its cap -> [0.4, 0.4, 0.2].
    assert kl_project_capped([0.7, 0.25, 0.05], [0.4, 0.4, 1]) == pytest.approx([0.4, 0.4, 0.2])
    # Already feasible: unchanged. Infeasible caps: refused.
    assert kl_project_capped([0.2, 0.5, 0.3], [0.4, 1, 1]) == pytest.approx([0.2, 0.5, 0.3], abs=1e-15)
    with pytest.raises(ValueError, match="infeasible"):
        kl_project_capped([0.5, 0.5], [0.4, 0.4])
    # It IS the KL projection: no feasible point nearby has a smaller KL(r || alpha).
    rng = np.random.default_rng(0)
    alpha, caps = np.array([0.6, 0.3, 0.08, 0.02]), np.array([0.25, 0.5, 1.0, 1.0])
    r = kl_project_capped(alpha, caps)
    kl = lambda q: float(np.sum(q * np.log(q / alpha)))  # noqa: E731
    for _ in range(500):
        q = project_capped_simplex(r + rng.normal(0, 0.02, size=4), lo=np.full(4, 1e-9), hi=caps)
        assert kl(q) >= kl(r) - 1e-12


def test_doremi_repetition_cap_is_respected_and_recorded(tmp_path, mlflow_uri):
    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5})
    unique = {d: corpus.manifest.domains[d].tokens("train") for d in ("alpha", "beta", "gamma")}
    budget = sum(unique.values())  # with max_epochs 1.2 every cap is 1.2 x the natural proportion
    cfg = DoReMiConfig(proxy=ProxyConfig(**TINY, steps=4), max_epochs=1.2, token_budget=budget)
    caps, got_budget, _, domains = repetition_caps(corpus.manifest, cfg)
    assert got_budget == budget
    assert dict(zip(domains, caps)) == pytest.approx({d: min(1.0, 1.2 * u / budget) for d, u in unique.items()})
    result = run_doremi(corpus.manifest, corpus.root, cfg)
    caps = dict(zip(domains, caps))
    r = result.rounds[0]
    # The cap holds at every step of the Group-DRO loop, not only for the average.
    assert all(a[d] <= caps[d] + 1e-12 for a in r.trajectory for d in domains)
    assert all(sum(a.values()) == pytest.approx(1.0) for a in r.trajectory)
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert all(result.weights[d] <= caps[d] + 1e-9 for d in domains)
    details = result.to_mixture(corpus.manifest).details
    assert details["max_epochs"] == 1.2 and details["budget_tokens"] == budget
    assert details["caps"] == pytest.approx(caps)
    assert all(v["epochs"] <= 1.2 + 1e-6 for v in details["repetition"]["domains"].values())
    # token_budget None: the laws rule, steps x batch x seq_len.
    default = DoReMiConfig(proxy=ProxyConfig(**TINY, steps=4), max_epochs=1000.0)
    assert repetition_caps(corpus.manifest, default)[1] == 4 * TINY["batch_size"] * TINY["seq_len"]
    with pytest.raises(ValueError):  # infeasible caps fail before any training
        run_doremi(corpus.manifest, corpus.root, cfg.model_copy(update={"max_epochs": 0.5}))


def _corpus_with_noise_domain(root, vocab: int = 32):
    """Two learnable domains (tiny-corpus progressions) and one of uniformly random tokens."""
    import os

    import numpy as np

    from infra.contracts import DomainShards
    from tests.training_fixtures import write_shard

    corpus = write_tiny_corpus(root, ["learn_a", "learn_b", "noise"], vocab_size=vocab, docs_per_shard=40)
    rng = np.random.default_rng(0)
    shards = []
    for shard in corpus.manifest.domains["noise"].shards:
        docs = [[int(t) for t in rng.integers(4, vocab, size=int(rng.integers(4, 40)))] for _ in range(shard.rows)]
        info = write_shard(os.path.join(corpus.root, shard.path), docs,
                           [f"noise-{shard.split}-{i}-{shard.path}" for i in range(len(docs))])
        shards.append(info.model_copy(update={"path": shard.path, "split": shard.split}))
    domains = dict(corpus.manifest.domains)
    domains["noise"] = DomainShards(shards=shards)
    return corpus.manifest.model_copy(update={"domains": domains}), corpus.root


def test_unlearnable_domain_is_not_upweighted_most_in_a_short_run(tmp_path, mlflow_uri):
    # A short seeded run with the domain-aggregate clip. (Characterised, not a law: with longer runs
    # and per-token clipping the noise domain's upward-biased clipped excess can win; see the report.)
    manifest, root = _corpus_with_noise_domain(str(tmp_path / "corpus"))
    cfg = DoReMiConfig(proxy=ProxyConfig(**{**TINY, "eval_docs_per_domain": 8}, steps=40), clip="domain")
    result = run_doremi(manifest, root, cfg)
    assert result.weights["noise"] < max(result.weights["learn_a"], result.weights["learn_b"])
    assert result.rounds[0].reference_eval["noise"].nats_per_token > max(
        result.rounds[0].reference_eval[d].nats_per_token for d in ("learn_a", "learn_b"))


def test_proxy_batches_are_uniform_over_domains_by_default(tmp_path, mlflow_uri, monkeypatch):
    # natural reference weights make "alpha" (1 shard unit of 9) rare; the DRO proxy still sees
    # every domain about equally often (paper Alg. 1), unless proxy_sampling="reference".
    import mixing.doremi as doremi_mod

    corpus = write_tiny_corpus(tmp_path / "corpus", {"alpha": 1, "beta": 3, "gamma": 5})
    ref = train_proxy(corpus.manifest, corpus.root, resolve_reference_weights(corpus.manifest, "natural"),
                      ProxyConfig(**TINY, steps=2))
    seen: dict[str, list] = {}

    class Recording(doremi_mod.MixtureSampler):
        def __init__(self, manifest, root, weights, *args, **kwargs):
            seen.setdefault("weights", []).append(dict(weights))
            super().__init__(manifest, root, weights, *args, **kwargs)

    monkeypatch.setattr(doremi_mod, "MixtureSampler", Recording)
    natural = resolve_reference_weights(corpus.manifest, "natural")
    for mode, expected in (("uniform", {"alpha": 1 / 3, "beta": 1 / 3, "gamma": 1 / 3}), ("reference", natural)):
        seen.clear()
        cfg = DoReMiConfig(proxy=ProxyConfig(**TINY, steps=2), proxy_sampling=mode)
        train_dro_proxy(corpus.manifest, corpus.root, ref.model, natural, cfg, cfg.proxy)
        assert seen["weights"] == [pytest.approx(expected)]


def test_excess_moving_average_by_hand():
    start = torch.full((3,), math.log(32), dtype=torch.float64)
    seen = torch.zeros(3, dtype=torch.bool)
    lam = torch.tensor([0.4, -0.2, 9.0], dtype=torch.float64)
    # First batch: domains 0 and 1 present -> their λ replaces log|V|; domain 2 keeps log|V|.
    e, seen = update_excess(start, seen, lam, torch.tensor([True, True, False]), beta=0.9)
    assert e.tolist() == pytest.approx([0.4, -0.2, math.log(32)]) and seen.tolist() == [True, True, False]
    # Second batch: 0.9·old + 0.1·new for seen domains; domain 2's first sighting replaces.
    e, seen = update_excess(e, seen, torch.tensor([1.4, 0.8, 0.5], dtype=torch.float64),
                            torch.tensor([True, False, True]), beta=0.9)
    assert e.tolist() == pytest.approx([0.9 * 0.4 + 0.1 * 1.4, -0.2, 0.5])
    # β = 0 is the paper's rule: the batch's λ, or the last one if absent.
    e0, _ = update_excess(e, seen, torch.tensor([7.0, 7.0, 7.0], dtype=torch.float64),
                          torch.tensor([False, True, True]), beta=0.0)
    assert e0.tolist() == pytest.approx([e[0].item(), 7.0, 7.0])
