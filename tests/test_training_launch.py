"""training.launch: the same train() in this process, as torchrun ranks, and on Ray Train.

The must-show: ZeRO stages 1, 2 and 3 with 2 processes on CPU train to the same per-step losses
as a single process. That needs both runs to see the same global batches, and in general they
do not, by design of MixtureSampler: each rank packs its sequences from its own share of the
documents (every world_size-th of a shard's permutation), so with several domains, documents of
other lengths than seq_len, or more than one row per rank, which document lands in which row of
the global batch depends on the world size (test_general_corpus_batches_depend_on_world_size).

There is one setting where the global batches are identical, and the tests use it: one domain,
every document exactly seq_len tokens, an even number of documents per shard, and ONE row per
rank per micro-batch. Then global row 2m + r is document 2m + r of the shard's permutation for
one process with two rows (micro-batch m) and for rank r of two with one row; the domain draws
and the diffusion noise are drawn for the global batch and sliced per rank (data.py,
diffusion.py), so t and the masks agree too (test_aligned_corpus_gives_identical_global_batches).
Gradient accumulation (2 micro-batches per step) is on, so its bookkeeping is compared too.

Tolerance, rel 1e-5 on each of 8 steps' losses: with identical data and noise, what differs is
only floating-point summation order (one batch of 2 rows vs two batches of 1 row in the matmuls;
the gradient all-reduce / reduce-scatter vs the in-batch sum; the loss mean in float32 vs the
launcher's float64 mean of the ranks' float32 losses), each a few float32 ulps (1.2e-7 relative)
per step, and 8 Adam steps do not amplify that past ~1e-6 (measured: at most 1.8e-7 absolute on
losses of 1.9 to 4.8 for every stage). Any real disagreement (a rank's gradient not averaged or
counted twice, different data, a world-size factor in the loss or the LR) moves the losses of
steps 2+ by ~1e-2 or more: the loss falls by > 2 nats over these 8 steps.

DeepSpeed and Ray runs are slow-marked. The DeepSpeed comm-op JIT build is cached in
.cache/torch_extensions (TORCH_EXTENSIONS_DIR, set by conftest and inherited by the ranks).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from infra.config import LaunchConfig, ModelConfig, StorageConfig, TrainConfig, parse_config
from infra.contracts import TRAINER_STATE_FILE, load_trainer_state
from infra.errors import ConfigError
from training.data import MixtureSampler, natural_weights
from training.diffusion import draw_noise

try:
    from training_fixtures import write_tiny_corpus
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import write_tiny_corpus

VOCAB = 32
SEQ_LEN = 32
STEPS = 8
LOSS_REL_TOL = 1e-5


@pytest.fixture(scope="module")
def aligned_corpus(tmp_path_factory):
    """One domain, every document exactly SEQ_LEN tokens, 12 documents per shard (see module doc)."""
    return write_tiny_corpus(tmp_path_factory.mktemp("aligned"), {"alpha": 1}, vocab_size=VOCAB,
                             doc_len=(SEQ_LEN, SEQ_LEN), train_shards=2, docs_per_shard=12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"alpha": 1, "beta": 3}, vocab_size=VOCAB)


def aligned_config(corpus, output_dir, zero_stage: int, world_size: int) -> TrainConfig:
    """The same global batch (2 rows x 2 accumulation steps) for one process or two ranks of one row."""
    launch = LaunchConfig(mode="local") if world_size == 1 else LaunchConfig(mode="torchrun", num_workers=world_size)
    return TrainConfig(manifest=corpus.manifest_path, output_dir=str(output_dir), model=ModelConfig(preset="test"),
                       seq_len=SEQ_LEN, micro_batch_size=2 // world_size, grad_accum_steps=2, steps=STEPS,
                       warmup_steps=2, lr=1e-2, log_every=1, zero_stage=zero_stage, launch=launch)


def global_batches(corpus, world_size: int, global_rows: int, n: int) -> list[tuple[torch.Tensor, ...]]:
    """n global micro-batches (tokens, t, mask) as the trainer's ranks would draw them, concatenated."""
    weights = natural_weights(corpus.manifest)
    rows = global_rows // world_size
    samplers = [MixtureSampler(corpus.manifest, corpus.root, weights, SEQ_LEN, rows, 0, rank=r, world_size=world_size)
                for r in range(world_size)]
    noise = [torch.Generator().manual_seed(1) for _ in range(world_size)]
    out = []
    for _ in range(n):
        parts = []
        for r, sampler in enumerate(samplers):
            batch = sampler.next_batch()
            draw = draw_noise(batch["valid"], noise[r], 1e-3, r, world_size)
            parts.append((batch["input_ids"], draw.t, draw.masked))
        out.append(tuple(torch.cat(pieces) for pieces in zip(*parts)))
    return out


def same_batches(a, b) -> bool:
    return all(torch.equal(x, y) for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b))


# --------------------------------------------------------------------------- fast: config and premises


def test_launch_config_defaults_and_validation():
    cfg = parse_config({"train": {"manifest": "m.json", "output_dir": "out"}}, use_env=False)
    assert cfg.train.launch == LaunchConfig(mode="local", num_workers=1, use_gpu=False, cpus_per_worker=1)
    ok = parse_config({"train": {"manifest": "m", "output_dir": "o",
                                 "launch": {"mode": "ray", "num_workers": 4, "use_gpu": True}}}, use_env=False)
    assert ok.train.launch.num_workers == 4
    for launch, message in [({"mode": "local", "num_workers": 2}, "mode 'local' runs one rank"),
                            ({"mode": "torchrun", "num_workers": 0}, "greater than or equal to 1"),
                            ({"mode": "mpi"}, "launch.mode"),
                            ({"nodes": 2}, "unknown key")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"train": {"manifest": "m", "output_dir": "o", "launch": launch}}, use_env=False)


def test_aligned_corpus_gives_identical_global_batches(aligned_corpus):
    """The premise of the loss comparison: 1 process x 2 rows == 2 ranks x 1 row, over several epochs."""
    one = global_batches(aligned_corpus, world_size=1, global_rows=2, n=60)  # 120 documents: 5 epochs
    two = global_batches(aligned_corpus, world_size=2, global_rows=2, n=60)
    assert same_batches(one, two)


def test_general_corpus_batches_depend_on_world_size(corpus, aligned_corpus):
    """Why the comparison needs that corpus: per-rank document shares make other batches differ."""
    assert not same_batches(global_batches(corpus, 1, 2, 8), global_batches(corpus, 2, 2, 8))  # 2 domains, any length
    assert not same_batches(global_batches(aligned_corpus, 1, 4, 8), global_batches(aligned_corpus, 2, 4, 8))  # 2 rows


def test_torchrun_worker_env_and_spec_keep_secrets_out_of_the_file(tmp_path, monkeypatch):
    from training.launch import WorkerSpec, _torchrun_env, torchrun_command

    monkeypatch.setenv("RANK", "0")  # e.g. left by an in-process train() in this process
    monkeypatch.setenv("MASTER_PORT", "1234")
    cfg = TrainConfig(manifest="m.json", output_dir=str(tmp_path), launch=LaunchConfig(mode="torchrun", num_workers=2,
                                                                                       cpus_per_worker=3))
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9000", access_key_id="AKIDSECRET",
                            secret_access_key="verysecretvalue")
    env = _torchrun_env(cfg, storage)
    assert "RANK" not in env and "MASTER_PORT" not in env
    assert env["AWS_SECRET_ACCESS_KEY"] == "verysecretvalue" and env["OMP_NUM_THREADS"] == os.environ.get(
        "OMP_NUM_THREADS", "3")
    spec_path = tmp_path / "launch.json"
    WorkerSpec(train=cfg.model_dump(mode="json"), storage=storage.model_dump(mode="json",
                                                                             exclude={"access_key_id",
                                                                                      "secret_access_key",
                                                                                      "session_token"}),
               tracking_uri=None, run_id=None, stop_after_step=None, run_dir=str(tmp_path)).write(str(spec_path))
    assert "verysecretvalue" not in spec_path.read_text() and "AKIDSECRET" not in spec_path.read_text()
    assert oct(spec_path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "verysecretvalue")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRET")
    spec = WorkerSpec.read(str(spec_path))
    assert spec.train_config() == cfg
    assert spec.storage_config().secret_access_key.get_secret_value() == "verysecretvalue"
    cmd = torchrun_command(2, 29500, str(spec_path), str(tmp_path / "logs"))
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    assert cmd[-5:] == ["-m", "training.launch", "worker", "--config", str(spec_path)]


def test_absolute_tracking_uri(tmp_path, monkeypatch):
    from training.launch import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///./mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert absolute_tracking_uri("mlruns") == f"{tmp_path}/mlruns"


def test_ray_storage_path_local_default_or_s3(tmp_path):
    import pyarrow.fs as pafs

    from training.launch import _ray_storage

    cfg = TrainConfig(manifest="m.json", output_dir=str(tmp_path / "out"), launch=LaunchConfig(mode="ray"))
    assert _ray_storage(cfg, None) == (str(tmp_path / "out" / "ray"), None)
    on_s3 = cfg.model_copy(update={"launch": LaunchConfig(mode="ray", storage_path="s3://bucket/ray-runs")})
    path, fs = _ray_storage(on_s3, StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    assert path == "bucket/ray-runs" and isinstance(fs, pafs.S3FileSystem)


def test_ray_failure_names_the_first_rank_and_its_traceback():
    from ray.train import WorkerGroupError

    from training.launch import RankFailed, ray_failure

    first = RankFailed(1, "ContractError: no tokens for rank 1", "Traceback ...\nContractError: no tokens", at=10.0)
    later = RankFailed(0, "RuntimeError: Connection closed by peer", "Traceback ...\nRuntimeError", at=11.0)
    err = ray_failure(WorkerGroupError("snippet", {0: later, 1: first}), world_size=2)
    text = str(err)
    assert text.startswith("Ray Train worker rank 1 of 2 failed: ContractError: no tokens for rank 1")
    assert "rank(s) 0 failed too" in text and text.endswith("ContractError: no tokens")
    assert err.ranks == [1, 0]


# --------------------------------------------------------------------------- slow: real runs


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_torchrun_ranks_match_single_process(aligned_corpus, tmp_path, mlflow_uri, zero_stage):
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.config import TrackingConfig
    from training.launch import launch

    single = launch(aligned_config(aligned_corpus, tmp_path / "single", zero_stage, world_size=1), progress=None)

    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="launch-test"))
    lines: list[str] = []
    with tracking.stage_run("train") as run:
        ranks = launch(aligned_config(aligned_corpus, tmp_path / "ranks", zero_stage, world_size=2),
                       progress=lines.append)

    assert len(single.losses) == len(ranks.losses) == STEPS
    assert single.losses[0] - single.losses[-1] > 2.0  # it trained: the comparison is not between constants
    for step, (a, b) in enumerate(zip(single.losses, ranks.losses), start=1):
        assert b == pytest.approx(a, rel=LOSS_REL_TOL), f"ZeRO-{zero_stage} step {step}: {a} vs {b}"
    assert ranks.tokens_seen == single.tokens_seen == STEPS * 2 * 2 * SEQ_LEN

    # It really ran as two ranks: one sampler state per rank in the checkpoint.
    state = load_trainer_state(os.path.join(ranks.checkpoint_dir, TRAINER_STATE_FILE))
    assert [s["rank"] for s in state.sampler["ranks"]] == [0, 1]
    # Rank 0's progress came through, and its metrics went to the parent's MLflow run; the
    # all-reduced train/loss of each step is the global-batch loss the launcher returned.
    assert f"step {STEPS}/{STEPS}" in " ".join(lines) and any(line.startswith("checkpoint") for line in lines)
    history = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(ranks.losses, rel=1e-6)


@pytest.mark.slow
def test_failing_torchrun_rank_is_named_with_its_log(tmp_path):
    from training.launch import LaunchError, launch

    # One document: rank 1 of 2 gets none and fails at its first batch; rank 0 then loses its peer.
    tiny = write_tiny_corpus(tmp_path / "one-doc", {"alpha": 1}, vocab_size=VOCAB, train_shards=1, docs_per_shard=1)
    cfg = TrainConfig(manifest=tiny.manifest_path, output_dir=str(tmp_path / "out"), model=ModelConfig(preset="test"),
                      seq_len=SEQ_LEN, micro_batch_size=1, steps=2, launch=LaunchConfig(mode="torchrun", num_workers=2))
    with pytest.raises(LaunchError) as info:
        launch(cfg, progress=None)
    message = str(info.value)
    assert info.value.ranks[0] == 1
    assert message.startswith("rank 1 of 2 failed: ContractError: domain 'alpha'")
    assert "last" in message and "rank 1's stderr.log" in message
    assert "hold no tokens for rank 1 of 2" in message.split("stderr.log", 1)[1]  # the log tail, not just the summary


@pytest.mark.slow
def test_ray_train_two_workers_checkpoint_and_mlflow(corpus, tmp_path, mlflow_uri, ray_session):
    import ray
    from mlflow.tracking import MlflowClient

    from infra import tracking
    from infra.config import TrackingConfig
    from training.launch import launch

    assert ray.available_resources().get("CPU", 0) >= 2, "another test holds the session Ray's CPUs"
    cfg = TrainConfig(manifest=corpus.manifest_path, output_dir=str(tmp_path / "out"), model=ModelConfig(preset="test"),
                      seq_len=SEQ_LEN, micro_batch_size=2, steps=4, warmup_steps=1, lr=1e-2, log_every=2,
                      zero_stage=2, launch=LaunchConfig(mode="ray", num_workers=2, cpus_per_worker=1))
    tracking.configure(TrackingConfig(uri=mlflow_uri, experiment="launch-ray-test"))
    lines: list[str] = []
    with tracking.stage_run("train") as run:
        result = launch(cfg, progress=lines.append)

    assert result.steps == 4 and len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert result.tokens_seen == 4 * 2 * 2 * SEQ_LEN  # two workers' rows
    assert result.checkpoint_dir == os.path.join(cfg.output_dir, "checkpoints", "step-00000004")
    state = load_trainer_state(os.path.join(result.checkpoint_dir, TRAINER_STATE_FILE))
    assert state.step == 4 and len(state.sampler["ranks"]) == 2
    assert os.path.isdir(os.path.join(cfg.output_dir, "ray"))  # Ray Train's run state (RunConfig.storage_path)
    assert "step 4/4" in " ".join(lines)  # rank 0's progress, forwarded to the driver

    client = MlflowClient(mlflow_uri)
    data = client.get_run(run.info.run_id).data
    assert data.params["train.launch.mode"] == "ray" and data.params["train.launch.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    with open(client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(tmp_path))) as f:
        assert json.load(f)["train_batch_size"] == 2 * 2  # rank 0 logged the 2-worker DeepSpeed config
