"""mixing.proxy: small plain-torch proxy trainings on a mixture."""

from __future__ import annotations

import math

import torch

from infra.config import ProxyConfig
from mixing.proxy import build_proxy_model, train_proxy
from tests.training_fixtures import write_tiny_corpus

TINY = dict(preset="test", d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8,
            lr=3e-3, warmup_steps=2, eval_docs_per_domain=4, mc_samples=2)


def test_train_proxy_learns_and_evaluates_every_domain(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha", "beta", "gamma"])
    cfg = ProxyConfig(**TINY, steps=30, eval_every=10)
    result = train_proxy(corpus.manifest, corpus.root, {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}, cfg)
    assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
    assert set(result.eval) == {"alpha", "beta", "gamma"}
    # Loss falls from ~log(V-1) as the per-domain alphabets are learnt.
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    for domain, curve in result.per_domain_curve.items():
        assert [s for s, _ in curve] == [10, 20, 30]
        assert curve[-1][1] == result.eval[domain].nats_per_token
    assert result.wall_s > 0


def test_train_proxy_is_a_pure_function_of_its_inputs(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha", "beta"])
    cfg = ProxyConfig(**TINY, steps=5)
    weights = {"alpha": 0.7, "beta": 0.3}
    state = torch.random.get_rng_state()
    a = train_proxy(corpus.manifest, corpus.root, weights, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG state touched
    b = train_proxy(corpus.manifest, corpus.root, weights, cfg)
    assert a.losses == b.losses
    assert {d: e.nats_per_token for d, e in a.eval.items()} == {d: e.nats_per_token for d, e in b.eval.items()}
    c = train_proxy(corpus.manifest, corpus.root, weights, cfg.model_copy(update={"seed": 1}))
    assert c.losses != a.losses


def test_proxy_overrides_apply(tmp_path):
    corpus = write_tiny_corpus(tmp_path, ["alpha"])
    model = build_proxy_model(corpus.manifest, ProxyConfig(preset="test", d_model=32, n_heads=2, n_layers=1))
    assert model.args.d_model == 32 and model.args.n_layers == 1 and model.args.max_seq_len == 64
