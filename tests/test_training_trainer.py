"""training.trainer and training.evaluate: learning, checkpoints, exact resume, evaluation numbers.

DeepSpeed tests are marked slow. The first DeepSpeed initialize in a fresh checkout JIT-compiles
a communication op (a minute or two); the build is cached in .cache/torch_extensions.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".cache", "torch_extensions"))

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from infra.config import EvalConfig, ModelConfig, TrainConfig  # noqa: E402
from infra.contracts import TRAINER_STATE_FILE, load_trainer_state  # noqa: E402
from infra.errors import ContractError  # noqa: E402

try:
    from training_fixtures import run_two_ranks, write_mixture, write_tiny_corpus  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import run_two_ranks, write_mixture, write_tiny_corpus  # noqa: E402

from training import checkpoint as ckpt  # noqa: E402
from training.evaluate import DomainEval, evaluate, load_model, log_eval, summarize  # noqa: E402
from training.schedule import lr_multiplier  # noqa: E402
from training.trainer import deep_merge, deepspeed_config  # noqa: E402

VOCAB = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"alpha": 1, "beta": 3}, vocab_size=VOCAB)


def config(corpus, output_dir, **overrides) -> TrainConfig:
    values = dict(manifest=corpus.manifest_path, output_dir=str(output_dir), model=ModelConfig(preset="test"),
                  seq_len=32, micro_batch_size=16, steps=30, warmup_steps=5, lr=1e-2, log_every=10, zero_stage=2)
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------- fast unit tests


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    lrs = [lr_multiplier(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert lr_multiplier(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(0, 0, 10, 0.0) == pytest.approx(1.0)  # no warmup


def test_deepspeed_config_user_dict_merged_last(corpus, tmp_path):
    cfg = config(corpus, tmp_path, zero_stage=1, grad_accum_steps=4, precision="bf16",
                 deepspeed={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 16 * 4 * 2
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_latest_pointer_only_names_complete_checkpoints(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    half = tmp_path / "checkpoints" / ckpt.step_tag(5)
    half.mkdir(parents=True)  # a crash mid-save: folder without trainer_state.json, pointer not moved
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    ckpt.write_latest(str(tmp_path), ckpt.step_tag(5))
    with pytest.raises(ContractError, match=TRAINER_STATE_FILE):
        ckpt.latest_checkpoint(str(tmp_path))


def test_rng_state_round_trips_through_json():
    import json
    import random

    import numpy as np

    noise = torch.Generator().manual_seed(3)
    state = json.loads(json.dumps(ckpt.capture_rng_state(noise)))
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=noise).item())
    ckpt.restore_rng_state(state, noise)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=noise).item()) == expected


class UniformModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, segment_ids=None):
        return torch.zeros(*input_ids.shape, VOCAB)


def test_evaluate_uniform_logits_gives_log_v_minus_1(corpus):
    results = evaluate(UniformModel(), corpus.manifest, corpus.root, EvalConfig(mc_samples=2, batch_size=4), seq_len=32)
    assert set(results) == {"alpha", "beta"}
    for r in results.values():
        assert r.nats_per_token == pytest.approx(math.log(VOCAB - 1), rel=1e-6)
        assert r.perplexity_bound == pytest.approx(VOCAB - 1, rel=1e-5)
        assert r.ci95 == pytest.approx(0.0, abs=1e-6)  # every sequence scores the same rate
        # The fixture writes 3 bytes per token: bits/byte = nats/token / ln 2 / 3.
        assert r.bits_per_byte == pytest.approx(math.log(VOCAB - 1) / math.log(2) / 3, rel=1e-6)
        assert r.docs == 6 and r.tokens > 0


def test_summarize_ci_reflects_spread_across_sequences():
    tokens = torch.tensor([10.0, 10.0, 10.0, 10.0])
    nats = torch.tensor([10.0, 20.0, 10.0, 20.0])
    r = summarize(nats, tokens, n_bytes=tokens * 2)
    assert r.nats_per_token == pytest.approx(1.5)
    # Per-sequence rates 1, 2, 1, 2: standard error sqrt(0.25 * 4 / (4 * 3)).
    assert r.ci95 == pytest.approx(1.96 * math.sqrt(1.0 / 12))
    assert r.bits_per_byte == pytest.approx(60 / math.log(2) / 80)


def test_log_eval_metric_names(monkeypatch):
    logged = {}
    monkeypatch.setattr("infra.tracking.log_metrics", lambda m, step=None: logged.update(m))
    log_eval({"web": DomainEval(2.0, 0.1, math.exp(2.0), 0.7, 100, 5)}, step=3)
    assert logged == {"eval/web/nats_per_token": 2.0, "eval/web/bits_per_byte": 0.7,
                      "eval/web/ppl_bound": pytest.approx(math.exp(2.0)), "eval/web/ci95": 0.1}


# --------------------------------------------------------------------------- DeepSpeed runs


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One 30-step run, shared by the tests that inspect its outcome."""
    from training.trainer import train

    logged, lines = [], []
    import infra.tracking

    original = infra.tracking.log_metrics
    infra.tracking.log_metrics = lambda metrics, step=None: logged.append((step, dict(metrics)))
    try:
        out = tmp_path_factory.mktemp("run")
        result = train(config(corpus, out), progress=lines.append)
    finally:
        infra.tracking.log_metrics = original
    return result, logged, out, lines


@pytest.mark.slow
def test_loss_decreases_and_run_is_logged(trained):
    result, logged, _, lines = trained
    assert result.steps == 30 and len(result.losses) == 30
    assert [line.split()[1] for line in lines if line.startswith("step")] == ["10/30", "20/30", "30/30"]
    assert lines[-2:] == [f"checkpoint {result.checkpoint_dir}", f"exported {result.export_dir}"]
    assert result.tokens_seen == 30 * 16 * 32
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert first > 2.5  # near log(31) = 3.43 at init
    assert last < first - 0.5
    steps = [s for s, _ in logged]
    assert steps == [10, 20, 30]
    metrics = logged[-1][1]
    for key in ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/loss/alpha",
                "train/loss/beta", "data/epochs/alpha"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert any(k.startswith("train/loss_t/") for k in metrics)
    # The LR of the last update: one step before the cosine reaches min_lr_ratio.
    assert metrics["train/lr"] == pytest.approx(1e-2 * lr_multiplier(29, 5, 30, 0.1))
    assert logged[0][1]["train/lr"] == pytest.approx(1e-2 * lr_multiplier(9, 5, 30, 0.1))


@pytest.mark.slow
def test_checkpoint_layout(trained):
    result, _, out, _ = trained
    assert result.checkpoint_dir == os.path.join(str(out), "checkpoints", "step-00000030")
    assert open(os.path.join(str(out), "checkpoints", "latest")).read() == "step-00000030"
    files = set(os.listdir(result.checkpoint_dir))
    assert {TRAINER_STATE_FILE, "model_args.json", "train_config.json"} <= files
    assert "model.pt" in files or "model.safetensors" in files
    state = load_trainer_state(os.path.join(result.checkpoint_dir, TRAINER_STATE_FILE))
    assert state.step == 30 and state.tokens_seen == result.tokens_seen
    assert set(state.rng["ranks"][0]) >= {"python", "numpy", "torch", "noise"}
    assert state.sampler["ranks"][0]["streams"].keys() == {"alpha", "beta"}


@pytest.mark.slow
def test_evaluate_trained_checkpoint(trained, corpus):
    result, _, out, _ = trained
    model, args = load_model(str(out))  # the output folder resolves to its latest checkpoint
    assert args.vocab_size == VOCAB and args.n_layers == 2
    eval_cfg = EvalConfig(mc_samples=4, batch_size=8, split="validation")
    results = evaluate(model, corpus.manifest, corpus.root, eval_cfg, seq_len=32)
    for r in results.values():
        assert all(math.isfinite(v) for v in (r.nats_per_token, r.ci95, r.perplexity_bound, r.bits_per_byte))
        assert 0 < r.ci95 < r.nats_per_token
        assert r.nats_per_token < math.log(VOCAB - 1) - 0.5  # learnt something beyond uniform
        assert r.bits_per_byte == pytest.approx(r.nats_per_token / math.log(2) / 3)
    again = evaluate(model, corpus.manifest, corpus.root, eval_cfg, seq_len=32)
    assert {d: r.nats_per_token for d, r in again.items()} == {d: r.nats_per_token for d, r in results.items()}


@pytest.mark.slow
def test_resume_is_exact(corpus, tmp_path):
    """2N steps in one go == N steps, 'preemption', resume, N more: same losses, same weights, bit for bit.

    With dropout and gradient accumulation on, so the RNG and accumulation state are exercised.
    """
    from training.trainer import train

    cfg = dict(steps=8, warmup_steps=2, micro_batch_size=4, grad_accum_steps=2, log_every=4,
               model=ModelConfig(preset="test", dropout=0.1))
    full = train(config(corpus, tmp_path / "full", **cfg))
    first = train(config(corpus, tmp_path / "split", **cfg), stop_after_step=4)
    assert first.steps == 4 and first.checkpoint_dir.endswith("step-00000004")
    second = train(config(corpus, tmp_path / "split", **cfg))
    assert second.steps == 8 and len(second.losses) == 4
    assert first.losses + second.losses == full.losses
    assert second.tokens_seen == full.tokens_seen
    w_full, w_split = ckpt.load_weights(full.checkpoint_dir), ckpt.load_weights(second.checkpoint_dir)
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)
    # Nothing left to do: a third call resumes at the end and returns at once.
    done = train(config(corpus, tmp_path / "split", **cfg))
    assert done.steps == 8 and done.losses == [] and done.checkpoint_dir == second.checkpoint_dir


@pytest.mark.slow
def test_mixture_file_and_resume_guard(corpus, tmp_path, monkeypatch):
    from training.trainer import train

    mixture = write_mixture(str(tmp_path / "mixture.json"), {"alpha": 1.0, "beta": 0.0}, corpus.manifest)
    logged = []
    monkeypatch.setattr("infra.tracking.log_metrics", lambda metrics, step=None: logged.append(dict(metrics)))
    train(config(corpus, tmp_path / "run", mixture=mixture, steps=2, log_every=1))
    assert all("train/loss/alpha" in m and "train/loss/beta" not in m for m in logged)

    other = write_tiny_corpus(tmp_path / "other", {"alpha": 2, "beta": 1}, vocab_size=VOCAB, seed=1)
    with pytest.raises(ContractError, match="manifest"):
        train(config(other, tmp_path / "run", mixture=None, steps=4))


TWO_RANK_SCRIPT = """
import json, os, sys
from infra.config import ModelConfig, TrainConfig
from training.trainer import train

out = sys.argv[2]
kw = dict(manifest=sys.argv[1], model=ModelConfig(preset="test"), seq_len=32, micro_batch_size=4, steps=6,
          warmup_steps=2, lr=1e-2, log_every=3, zero_stage=2)
full = train(TrainConfig(output_dir=os.path.join(out, "full"), **kw))
first = train(TrainConfig(output_dir=os.path.join(out, "split"), **kw), stop_after_step=3)
second = train(TrainConfig(output_dir=os.path.join(out, "split"), **kw))
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"full": full.losses, "split": first.losses + second.losses, "tokens": full.tokens_seen,
               "checkpoint": second.checkpoint_dir}, f)
"""


@pytest.mark.slow
def test_two_ranks_train_and_resume_exactly(corpus, tmp_path):
    """Two gloo processes on this machine: ZeRO-2 partitions, per-rank sampler/RNG state in one checkpoint."""
    import json

    run_two_ranks(TWO_RANK_SCRIPT, [corpus.manifest_path, str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["split"] == r["full"]  # exact resume on every rank
        assert r["tokens"] == 6 * 4 * 32 * 2  # tokens counted for the whole world
    assert ranks[0]["full"] != ranks[1]["full"]  # the ranks saw different data
    state = load_trainer_state(os.path.join(ranks[0]["checkpoint"], TRAINER_STATE_FILE))
    assert len(state.sampler["ranks"]) == len(state.rng["ranks"]) == 2
    assert state.sampler["ranks"][0]["rng"] == state.sampler["ranks"][1]["rng"]  # shared domain draws
    assert state.rng["ranks"][0]["noise"] == state.rng["ranks"][1]["noise"]  # shared diffusion times


@pytest.mark.slow
def test_train_logs_params_and_metrics_to_the_active_mlflow_run(corpus, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.config import TrackingConfig
    from training.trainer import train

    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="training-test"))
    with tracking.stage_run("train") as run:
        train(config(corpus, tmp_path / "run", steps=2, log_every=1))
    data = MlflowClient(mlflow_uri).get_run(run.info.run_id).data
    assert data.params["train.seq_len"] == "32" and data.params["model_args.n_layers"] == "2"
    assert int(data.params["model_parameters"]) > 0
    assert {"train/loss", "train/lr", "train/loss/alpha", "train/grad_norm"} <= set(data.metrics)
