"""The trainer's run-long features: LR schedules, weight EMA, non-finite guard, periodic eval,
tracking, export + registry, checkpoint mirror (S3) and retention.

Unit tests first (no DeepSpeed); then small DeepSpeed runs (slow-marked, about a second each).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".cache", "torch_extensions"))

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from infra.config import ModelConfig, TrainConfig  # noqa: E402
from infra.contracts import TRAINER_STATE_FILE, artifact_sha256, load_trainer_state, write_artifact  # noqa: E402
from infra.errors import ConfigError  # noqa: E402

try:
    from training_fixtures import run_two_ranks, write_tiny_corpus  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import run_two_ranks, write_tiny_corpus  # noqa: E402

from training import checkpoint as ckpt  # noqa: E402
from training.ema import EMA_FILE, WeightEMA  # noqa: E402
from training.export import ExportInfo, export_model, load_exported  # noqa: E402
from training.guard import NonFiniteGuard, NonFiniteLossError, SkippableAdamW  # noqa: E402
from training.model import MaskedDiffusionTransformer, ModelArgs, build_model_args  # noqa: E402
from training.schedule import lr_multiplier, scheduled_lr, wsd_decay_start  # noqa: E402
from training.trainer import training_flops_per_token  # noqa: E402

VOCAB = 32


def tokenizer_json() -> bytes:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[MASK]": 1, "[BOS]": 2, "[EOS]": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str().encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny corpus plus a real tokenizer.json whose sha256 the manifest records."""
    import hashlib

    root = tmp_path_factory.mktemp("corpus")
    tiny = write_tiny_corpus(root, {"alpha": 1, "beta": 3}, vocab_size=VOCAB)
    data = tokenizer_json()
    (root / "tokenizer.json").write_bytes(data)
    tokenizer = tiny.manifest.tokenizer.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
    manifest = tiny.manifest.model_copy(update={"tokenizer": tokenizer})
    write_artifact(manifest, tiny.manifest_path)
    return type(tiny)(root=tiny.root, manifest_path=tiny.manifest_path, manifest=manifest)


def config(corpus, output_dir, **overrides) -> TrainConfig:
    values = dict(manifest=corpus.manifest_path, output_dir=str(output_dir), model=ModelConfig(preset="test"),
                  seq_len=32, micro_batch_size=8, steps=6, warmup_steps=2, lr=1e-2, log_every=1, zero_stage=2)
    values.update(overrides)
    return TrainConfig(**values)


def capture_metrics(monkeypatch) -> list[tuple[int, dict]]:
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr("infra.tracking.log_metrics", lambda m, step=None: logged.append((step, dict(m))))
    return logged


def weights_at(output_dir, step: int, name: str | None = None) -> dict[str, torch.Tensor]:
    folder = os.path.join(str(output_dir), "checkpoints", ckpt.step_tag(step))
    if name is None:
        return ckpt.load_weights(folder)
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, name))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- LR schedules


def test_wsd_multipliers():
    m = [lr_multiplier(s, 10, 100, 0.1, "wsd", decay_fraction=0.2) for s in range(101)]
    assert m[0] == pytest.approx(0.1) and m[4] == pytest.approx(0.5) and m[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in m[10:81])  # stable until the decay starts at step 80 (= 100 - 20)
    assert m[90] == pytest.approx(1 - 0.9 * 10 / 20)  # linear: halfway down at step 90
    assert m[99] == pytest.approx(1 - 0.9 * 19 / 20)  # the last update
    assert m[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[80:], m[81:]))
    # The decay never starts inside the warmup.
    assert wsd_decay_start(warmup_steps=50, total_steps=60, decay_fraction=0.5) == 50
    assert lr_multiplier(50, 50, 60, 0.0, "wsd", 0.5) == pytest.approx(1.0)
    assert lr_multiplier(55, 50, 60, 0.0, "wsd", 0.5) == pytest.approx(0.5)
    # decay_fraction 1: no stable phase, a linear decay right after warmup.
    assert lr_multiplier(10, 0, 20, 0.0, "wsd", 1.0) == pytest.approx(0.5)


def test_cosine_unchanged_and_schedule_from_config(tmp_path):
    assert lr_multiplier(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(60, 10, 110, 0.1, "cosine") == lr_multiplier(60, 10, 110, 0.1)
    cfg = TrainConfig(manifest="m.json", output_dir=str(tmp_path), steps=100, warmup_steps=10, lr=2e-3,
                      min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert scheduled_lr(cfg, 90) == pytest.approx(2e-3 * 0.55)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_multiplier(0, 1, 10, 0.1, "linear")


def test_new_config_fields_are_validated(tmp_path):
    from infra.config import parse_config

    base = {"manifest": "m.json", "output_dir": str(tmp_path)}
    bad = {"schedule": "linear", "decay_fraction": 0, "ema_decay": 1.0, "nonfinite_lr_backoff": 0,
           "max_nonfinite_skips": 0, "eval_every": -1, "peak_flops": 0, "keep_last": 0, "register_model": ""}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"train.{key}"):
            parse_config({"train": {**base, key: value}}, use_env=False)
    with pytest.raises(ConfigError, match="register_model needs export"):
        parse_config({"train": {**base, "register_model": "m", "export": False}}, use_env=False)
    with pytest.raises(ConfigError, match="checkpoint_uri"):
        parse_config({"train": {**base, "checkpoint_uri": os.path.join(str(tmp_path), "checkpoints", "x")}},
                     use_env=False)
    ok = parse_config({"train": {**base, "checkpoint_uri": "s3://bucket/run", "ema_decay": 0.999, "keep_last": 3,
                                 "schedule": "wsd", "peak_flops": 989e12, "register_model": "m"}}, use_env=False)
    assert ok.train.checkpoint_uri == "s3://bucket/run" and ok.train.nonfinite_lr_backoff == 0.5


# --------------------------------------------------------------------------- EMA, guard, retention (no DeepSpeed)


def test_weight_ema_follows_the_recursion_and_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ema = WeightEMA(model, decay=0.75)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for k, v in model.state_dict().items():
            expected[k] = expected[k] * 0.75 + v * 0.25
    full = ema.full_state_dict()
    for k in expected:
        torch.testing.assert_close(full[k], expected[k], rtol=1e-6, atol=1e-7)
    other = WeightEMA(model, decay=0.75)  # starts from the current weights
    other.load_full_state_dict(full)
    assert_same(other.full_state_dict(), full)
    with pytest.raises(ValueError):
        WeightEMA(model, decay=1.0)


def test_skippable_adamw_changes_nothing_when_told():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.skip_requested = True
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3)) and len(opt.state) == 0
    opt.skip_requested = False
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and not torch.equal(p.detach(), torch.ones(3)) and opt.state[p]["step"] == 1


def test_nonfinite_guard_backs_off_and_gives_up():
    guard = NonFiniteGuard(backoff=0.5, max_consecutive=3)
    guard.record(1, skipped=True, reason="loss is not finite")
    guard.record(2, skipped=False)
    guard.record(3, skipped=True)
    guard.record(4, skipped=True)
    assert (guard.skips, guard.consecutive, guard.lr_scale) == (3, 2, 0.125)
    restored = NonFiniteGuard(0.5, 3)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    with pytest.raises(NonFiniteLossError, match="3 consecutive optimizer steps"):
        restored.record(5, skipped=True)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        (root / ckpt.step_tag(step)).mkdir(parents=True)
        (root / ckpt.step_tag(step) / TRAINER_STATE_FILE).write_text("{}")
    (root / ckpt.step_tag(0)).mkdir()  # debris of a crashed save, older than latest
    (root / ckpt.step_tag(6)).mkdir()  # being written right now: newer than latest
    ckpt.write_latest(str(tmp_path), ckpt.step_tag(4))  # step 5 complete but not yet pointed at
    deleted = ckpt.prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.path.basename(f) for f in deleted) == [ckpt.step_tag(s) for s in (0, 1, 2)]
    assert sorted(os.listdir(root)) == ["latest"] + [ckpt.step_tag(s) for s in (3, 4, 5, 6)]
    ckpt.prune_checkpoints(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(root)) == ["latest"] + [ckpt.step_tag(s) for s in (4, 5, 6)]


def fake_checkpoint(output_dir, step: int) -> str:
    folder = os.path.join(str(output_dir), "checkpoints", ckpt.step_tag(step))
    os.makedirs(folder)
    for name, data in (("zero_pp_rank_0_mp_rank_00_optim_states.pt", b"x" * 1000), (TRAINER_STATE_FILE, b"{}")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    ckpt.write_latest(str(output_dir), ckpt.step_tag(step))
    return folder


def test_mirror_uploads_pointer_last_and_downloads_when_newer(tmp_path, caplog):
    from infra.storage import Storage
    from training.checkpoint_mirror import CheckpointMirror

    remote = str(tmp_path / "remote")  # any Storage URI works; S3 is tested with moto below
    mirror = CheckpointMirror(remote, Storage())
    assert mirror.latest_tag() is None and not mirror.is_newer_than_local(str(tmp_path / "a"))
    mirror.upload_async(fake_checkpoint(tmp_path / "a", 2))
    mirror.close()
    assert open(os.path.join(remote, "latest")).read() == ckpt.step_tag(2)
    assert sorted(os.listdir(os.path.join(remote, ckpt.step_tag(2)))) == [
        TRAINER_STATE_FILE, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]

    fresh = tmp_path / "fresh"  # a new machine: nothing local
    assert mirror.is_newer_than_local(str(fresh))
    folder = mirror.download_latest(str(fresh))
    assert ckpt.latest_checkpoint(str(fresh), verify=False) == folder  # fake .pt bytes: pointer logic only
    assert open(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "rb").read() == b"x" * 1000
    assert not [n for n in os.listdir(os.path.join(str(fresh), "checkpoints")) if n.startswith(".download")]
    fake_checkpoint(tmp_path / "ahead", 3)
    assert not mirror.is_newer_than_local(str(tmp_path / "ahead"))  # local is newer: resume from it

    (tmp_path / "blocker").write_text("a file where the mirror's folder should be")
    broken = CheckpointMirror(str(tmp_path / "blocker"), Storage())
    broken.upload_async(folder)
    broken.upload_async(folder)  # the first failure is logged, training would go on
    assert "uploading a checkpoint" in caplog.text
    with pytest.raises(RuntimeError, match="uploading a checkpoint"):
        broken.close()  # the end of the run raises


# --------------------------------------------------------------------------- export (no DeepSpeed)


def export_info_for(args: ModelArgs, **overrides) -> ExportInfo:
    values = dict(model_args=args, preset="test", n_parameters=1234, special_ids={"pad": 0, "mask": 1},
                  weights="ema", ema_decay=0.99, step=7, tokens_seen=7000, masked_tokens_seen=3500,
                  manifest_uri="data/manifest.json", manifest_sha256="ab" * 32, tokenizer_sha256="cd" * 32,
                  mixture_uri=None, mixture_sha256="ef" * 32, mixture_weights={"alpha": 0.25, "beta": 0.75},
                  eval_split="validation",
                  eval={"alpha": {"nats_per_token": 2.5, "ci95": 0.1, "perplexity_bound": 12.18, "bits_per_byte": 1.2,
                                  "tokens": 900, "docs": 6}})
    values.update(overrides)
    return ExportInfo(**values)


def test_export_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(1)
    args = ModelArgs(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                     tie_embeddings=False)
    model = MaskedDiffusionTransformer(args).eval()
    folder = export_model(str(tmp_path / "export"), model.state_dict(), export_info_for(args), tokenizer_json())
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "model_args.json",
                                          "tokenizer.json"]
    loaded, loaded_args, tokenizer = load_exported(folder)
    assert loaded_args == args and tokenizer.encode("t5 t9").ids == [5, 9]
    x = torch.randint(4, VOCAB, (3, 16))
    segments = torch.tensor([[0] * 8 + [1] * 8] * 3)
    with torch.no_grad():
        assert torch.equal(loaded(x, segments), model(x, segments))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["special_ids"] == {"pad": 0, "mask": 1} and config["mask_token_id"] == 1
    assert config["weights"] == "ema" and config["step"] == 7
    card = (tmp_path / "export" / "README.md").read_text()
    for needle in ("1,234", "preset `test`", "ab" * 32, "| beta | 0.7500 |", "7,000", "| alpha | 2.5000 |",
                   "masked diffusion", "derived from the training data", "EMA of the weights (decay 0.99)"):
        assert needle in card, needle
    # A second export replaces the first; without a tokenizer the loader returns None for it.
    export_model(folder, model.state_dict(), export_info_for(args, eval={}), None)
    assert load_exported(folder)[2] is None
    assert "## Evaluation" not in (tmp_path / "export" / "README.md").read_text()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_load_exported_refuses_other_folders(tmp_path):
    from infra.errors import ContractError

    with pytest.raises(ContractError, match="not a maskmix export"):
        load_exported(str(tmp_path))


# --------------------------------------------------------------------------- DeepSpeed runs


def initial_weights(cfg: TrainConfig, corpus) -> dict[str, torch.Tensor]:
    """The weights train() starts from: it seeds torch with cfg.seed and then builds the model."""
    from training.trainer import model_vocab_size

    torch.manual_seed(cfg.seed)
    args = build_model_args(cfg.model, model_vocab_size(corpus.manifest), cfg.seq_len)
    return {k: v.detach().clone() for k, v in MaskedDiffusionTransformer(args).state_dict().items()}


def check_ema_against_hand_computation(cfg: TrainConfig, corpus, steps: int, skipped: tuple[int, ...] = ()) -> None:
    """ema.safetensors of every checkpoint == the EMA recursion run by hand over the checkpoints' weights.

    A skipped step is no EMA step (the weights did not move either).
    """
    decay = cfg.ema_decay
    expected = initial_weights(cfg, corpus)
    for step in range(1, steps + 1):
        w = weights_at(cfg.output_dir, step)
        if step not in skipped:
            expected = {k: expected[k].clone().mul_(decay).add_(w[k], alpha=1 - decay) for k in expected}
        ema = weights_at(cfg.output_dir, step, EMA_FILE)
        for k in expected:
            torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema["norm.weight"], w["norm.weight"])  # the EMA is not just the weights


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_ema_equals_hand_computation_and_zero3_matches_stage0(corpus, tmp_path):
    from training.trainer import train

    steps = 4
    runs = {}
    for stage in (0, 3):
        cfg = config(corpus, tmp_path / f"z{stage}", zero_stage=stage, steps=steps, checkpoint_every=1, ema_decay=0.8,
                     export=False)
        train(cfg)
        check_ema_against_hand_computation(cfg, corpus, steps)  # stage 3: the partitioned EMA, gathered
        runs[stage] = cfg.output_dir
    # Stage 0 and 3 reduce gradients in different orders, so the weights agree to rounding, which
    # Adam amplifies where a gradient is near zero; the EMAs must agree at least as well as the weights.
    weight_gap = max(max_abs_diff(weights_at(runs[3], s), weights_at(runs[0], s)) for s in range(1, steps + 1))
    ema_gap = max_abs_diff(weights_at(runs[3], steps, EMA_FILE), weights_at(runs[0], steps, EMA_FILE))
    assert weight_gap < 1e-4 and ema_gap <= weight_gap


@pytest.mark.slow
def test_resume_exact_with_ema_wsd_eval_and_retention_under_zero3(corpus, tmp_path, monkeypatch):
    """Stage 3 partitions the EMA; resuming must restore it (and the eval must not shift any RNG)."""
    from training.trainer import train

    logged = capture_metrics(monkeypatch)
    kw = dict(zero_stage=3, steps=5, ema_decay=0.9, schedule="wsd", decay_fraction=0.4, eval_every=2,
              checkpoint_every=2, keep_last=2, model=ModelConfig(preset="test", dropout=0.1), export=False)
    full = train(config(corpus, tmp_path / "full", **kw))
    first = train(config(corpus, tmp_path / "split", **kw), stop_after_step=3)
    second = train(config(corpus, tmp_path / "split", **kw))
    assert first.losses + second.losses == full.losses
    assert_same(weights_at(tmp_path / "split", 5, EMA_FILE), weights_at(tmp_path / "full", 5, EMA_FILE))
    assert_same(weights_at(tmp_path / "split", 5), weights_at(tmp_path / "full", 5))
    # keep_last=2: only the two newest checkpoints stay.
    assert [s for s, _ in ckpt.step_folders(str(tmp_path / "full"))] == [4, 5]
    assert [s for s, _ in ckpt.step_folders(str(tmp_path / "split"))] == [4, 5]
    evals = [s for s, m in logged if "eval/alpha/nats_per_token" in m]
    assert evals == [2, 4, 5, 2, 4, 5]  # the full run, then the split run (stopped at 3, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_and_counted(corpus, tmp_path, monkeypatch, mlflow_uri, zero_stage, what):
    """Step 3 of 6 gets a NaN loss (or a finite loss with NaN gradients): it must change nothing."""
    from mlflow.tracking import MlflowClient

    import training.trainer as trainer
    from infra import tracking
    from infra.config import TrackingConfig

    calls = {"n": 0}
    original = trainer.nelbo_loss

    def poisoned(terms, valid):
        loss = original(terms, valid)
        calls["n"] += 1
        if calls["n"] != 3:
            return loss
        if what == "loss":
            return loss * float("nan")
        # d/dz sqrt(z) at 0 is inf, times 0: the forward value is unchanged, every gradient is NaN.
        return loss + 0.0 * torch.sqrt(terms.sum() * 0.0)

    monkeypatch.setattr(trainer, "nelbo_loss", poisoned)
    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="guard"))
    cfg = config(corpus, tmp_path / "run", zero_stage=zero_stage, checkpoint_every=1, export=False)
    with tracking.stage_run("train") as run:
        result = trainer.train(cfg)

    assert result.steps == 6 and result.nonfinite_skips == 1
    assert math.isnan(result.losses[2]) == (what == "loss")
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert_same(weights_at(tmp_path / "run", 3), weights_at(tmp_path / "run", 2))  # the skipped step
    w4, w3 = weights_at(tmp_path / "run", 4), weights_at(tmp_path / "run", 3)
    assert any(not torch.equal(w4[k], w3[k]) for k in w3)  # training goes on
    state = load_trainer_state(os.path.join(result.checkpoint_dir, TRAINER_STATE_FILE))
    assert state.nonfinite == {"lr_scale": 0.5, "skips": 1, "consecutive": 0}

    client = MlflowClient(mlflow_uri)
    skips = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/nonfinite_skips")}
    assert skips == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lrs[3] == pytest.approx(scheduled_lr(cfg, 2))  # the skipped step's own LR
    assert lrs[5] == pytest.approx(0.5 * scheduled_lr(cfg, 4))  # backed off for the rest of the run


@pytest.mark.slow
def test_persistent_nonfinite_loss_stops_the_run(corpus, tmp_path, monkeypatch):
    import training.trainer as trainer

    monkeypatch.setattr(trainer, "nelbo_loss", lambda terms, valid: terms.sum() * float("inf"))
    with pytest.raises(NonFiniteLossError, match="step 3: 3 consecutive"):
        trainer.train(config(corpus, tmp_path / "run", max_nonfinite_skips=3))


@pytest.mark.slow
def test_periodic_eval_uses_the_ema_weights_at_the_expected_steps(corpus, tmp_path, monkeypatch):
    from training.evaluate import evaluate
    from training.trainer import train

    logged = capture_metrics(monkeypatch)
    cfg = config(corpus, tmp_path / "run", steps=5, eval_every=2, checkpoint_every=2, ema_decay=0.9, export=False)
    result = train(cfg)
    at = {s: m for s, m in logged if any(k.startswith("eval/") for k in m)}
    assert sorted(at) == [2, 4, 5]  # every eval_every steps, and at the end
    assert set(at[2]) >= {"eval/alpha/nats_per_token", "eval/beta/bits_per_byte", "eval/beta/ppl_bound",
                          "eval/alpha/ci95"}
    assert set(result.eval) == {"alpha", "beta"}
    assert result.eval["beta"].nats_per_token == at[5]["eval/beta/nats_per_token"]
    # The step-2 numbers are those of the step-2 EMA weights, evaluated on their own.
    args = ModelArgs(**ckpt.read_json(os.path.join(str(tmp_path / "run"), "checkpoints", "step-00000002",
                                                   "model_args.json")))
    model = MaskedDiffusionTransformer(args)
    model.load_state_dict(weights_at(tmp_path / "run", 2, EMA_FILE))
    again = evaluate(model, corpus.manifest, corpus.root, cfg.eval, cfg.seq_len)
    assert {f"eval/{d}/nats_per_token": r.nats_per_token for d, r in again.items()} == {
        k: v for k, v in at[2].items() if k.endswith("nats_per_token")}


@pytest.mark.slow
def test_tracking_export_and_registry(corpus, tmp_path, mlflow_uri):
    """Per-step metrics, config artifacts, the export (EMA weights, tokenizer, card) and its registry version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.config import TrackingConfig
    from training.trainer import train

    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="export"))
    cfg = config(corpus, tmp_path / "run", steps=3, ema_decay=0.9, eval_every=3, peak_flops=1e12,
                 register_model="maskmix-test-model", grad_accum_steps=2, zero_stage=1)
    with tracking.stage_run("train") as run:
        result = train(cfg)
    client = MlflowClient(mlflow_uri)
    data = client.get_run(run.info.run_id).data
    n_params = int(data.params["model_parameters"])

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    per_step_tokens = 8 * 32 * 2  # micro batch x seq_len x grad_accum, fully packed rows
    assert history("train/tokens_seen") == {1: per_step_tokens, 2: 2 * per_step_tokens, 3: 3 * per_step_tokens}
    masked = history("train/masked_tokens_seen")
    assert 0 < masked[1] < masked[2] < masked[3] < 3 * per_step_tokens and masked[3] == result.masked_tokens_seen
    tps, mfu, seen = history("train/tokens_per_s"), history("train/mfu"), history("train/tokens_seen")
    model_args = ModelArgs(**json.loads(open(os.path.join(result.export_dir, "model_args.json")).read()))
    for step in (1, 2, 3):
        flops = training_flops_per_token(model_args, n_params, masked[step] / seen[step])
        assert mfu[step] == pytest.approx(flops * tps[step] / 1e12)
        # the output projection runs on masked tokens only, so fewer FLOPs than the dense 6 N
        assert flops < 6 * n_params
    for key in ("train/grad_norm", "train/loss/alpha", "train/loss/beta", "data/epochs/alpha", "train/lr_backoff",
                "eval/alpha/nats_per_token"):
        assert key in data.metrics, key

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_config.json", "deepspeed_config.json", "export"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert exported == {f"export/{f}" for f in ("README.md", "config.json", "model.safetensors", "model_args.json",
                                                "tokenizer.json")}
    logged_cfg = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                     artifact_path="train_config.json")).read())
    assert logged_cfg["ema_decay"] == 0.9 and logged_cfg["register_model"] == "maskmix-test-model"

    # The export holds the final EMA, the manifest's tokenizer and a card with the final eval.
    export = result.export_dir
    assert export == os.path.join(str(tmp_path / "run"), "export")
    assert open(os.path.join(export, "tokenizer.json"), "rb").read() == tokenizer_json()
    card = open(os.path.join(export, "README.md")).read()
    assert artifact_sha256(corpus.manifest) in card and "## Evaluation (validation split, final step)" in card
    assert f"{result.tokens_seen:,}" in card
    model, args, tokenizer = load_exported(export)
    assert tokenizer is not None and args.vocab_size == VOCAB
    assert_same(model.state_dict(), weights_at(tmp_path / "run", 3, EMA_FILE))

    # The registry version points at the run's export folder, and what it serves loads to the same logits.
    version = client.get_model_version("maskmix-test-model", "1")
    assert version.run_id == run.info.run_id and version.source.endswith("/export")
    assert version.tags["maskmix.weights"] == "ema"
    served = mlflow.artifacts.download_artifacts(artifact_uri="models:/maskmix-test-model/1",
                                                 dst_path=str(tmp_path / "served"))
    again, _, _ = load_exported(served)
    x = torch.randint(4, VOCAB, (2, 32))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))

    # Calling train() again on the finished run does not export (or register) a second time.
    with tracking.stage_run("train-again"):
        assert train(cfg).export_dir is None
    assert [str(v.version) for v in client.search_model_versions("name='maskmix-test-model'")] == ["1"]
    # Registering again under an existing name adds a version.
    with mlflow.start_run(run_id=run.info.run_id):
        assert str(tracking.register_artifacts("maskmix-test-model", "export")) == "2"


@pytest.mark.slow
@pytest.mark.s3
def test_checkpoints_mirrored_to_s3_resume_after_local_loss(corpus, tmp_path, s3_bucket):
    from infra.storage import Storage
    from training.trainer import train

    bucket, storage_cfg = s3_bucket
    storage = Storage(storage_cfg)
    kw = dict(steps=6, checkpoint_every=1, keep_last=2, model=ModelConfig(preset="test", dropout=0.1), export=False)
    full = train(config(corpus, tmp_path / "full", **kw), storage)

    uri = f"{bucket}/run"
    local = tmp_path / "split"
    first = train(config(corpus, local, checkpoint_uri=uri, **kw), storage, stop_after_step=3)
    assert storage.read_bytes(f"{uri}/latest").decode() == "step-00000003"
    remote = {os.path.relpath(p, f"{uri}") for p in storage.list_files(uri)}
    assert {f"step-0000000{s}/{TRAINER_STATE_FILE}" for s in (1, 2, 3)} <= remote  # no remote retention
    assert [s for s, _ in ckpt.step_folders(str(local))] == [2, 3]  # keep_last=2 applies locally

    shutil.rmtree(local)  # the machine is gone
    second = train(config(corpus, local, checkpoint_uri=uri, **kw), storage)
    assert second.steps == 6 and first.losses + second.losses == full.losses
    assert_same(weights_at(local, 6), weights_at(tmp_path / "full", 6))
    assert storage.read_bytes(f"{uri}/latest").decode() == "step-00000006"


TWO_RANK_SCRIPT = """
import json, math, os, sys
import torch
from infra.config import ModelConfig, TrainConfig
import training.trainer as trainer

rank = int(os.environ["RANK"])
calls = {"n": 0}
original = trainer.nelbo_loss


def poisoned(terms, valid):
    loss = original(terms, valid)
    calls["n"] += 1
    # Step 2 of each 4-step run, on rank 1 only: rank 0's own loss stays finite.
    return loss * float("nan") if rank == 1 and calls["n"] % 4 == 2 else loss


trainer.nelbo_loss = poisoned
out = sys.argv[2]
kw = dict(manifest=sys.argv[1], model=ModelConfig(preset="test"), seq_len=32, micro_batch_size=4, steps=4,
          warmup_steps=1, lr=1e-2, log_every=1, zero_stage=3, ema_decay=0.8, checkpoint_every=1, export=False)
full = trainer.train(TrainConfig(output_dir=os.path.join(out, "full"), **kw))
first = trainer.train(TrainConfig(output_dir=os.path.join(out, "split"), **kw), stop_after_step=2)
second = trainer.train(TrainConfig(output_dir=os.path.join(out, "split"), **kw))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"full": [repr(x) for x in full.losses], "split": [repr(x) for x in first.losses + second.losses],
               "skips": [full.nonfinite_skips, second.nonfinite_skips]}, f)
"""


@pytest.mark.slow
def test_two_ranks_zero3_ema_guard_and_resume(corpus, tmp_path):
    """Two gloo processes, ZeRO-3: a NaN on one rank skips the step on both; the partitioned EMA
    follows the hand-computed recursion, is saved whole and restored exactly on resume."""
    run_two_ranks(TWO_RANK_SCRIPT, [corpus.manifest_path, str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["split"] == r["full"] and r["skips"] == [1, 1]
    assert ranks[1]["full"][1] == "nan" and ranks[0]["full"][1] != "nan"
    for run in ("full", "split"):
        assert_same(weights_at(tmp_path / run, 2), weights_at(tmp_path / run, 1))  # skipped on both ranks
    assert_same(weights_at(tmp_path / "split", 4, EMA_FILE), weights_at(tmp_path / "full", 4, EMA_FILE))
    cfg = config(corpus, tmp_path / "full", model=ModelConfig(preset="test"), ema_decay=0.8)
    check_ema_against_hand_computation(cfg, corpus, steps=4, skipped=(2,))


def test_training_flops_per_token_counts_the_head_at_masked_positions_only():
    tied = ModelArgs(vocab_size=100, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16)
    n = 1000 + 100 * 8  # body + one shared table
    assert training_flops_per_token(tied, n, 1.0) == pytest.approx(6 * n)
    assert training_flops_per_token(tied, n, 0.25) == pytest.approx(6 * 1000 + 6 * 800 * 0.25)
    untied = ModelArgs(vocab_size=100, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16,
                       tie_embeddings=False)
    assert training_flops_per_token(untied, 1000 + 2 * 800, 0.5) == pytest.approx(6 * 1000 + 6 * 800 * 0.5)
