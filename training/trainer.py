"""The training loop: manifest + mixture -> DeepSpeed engine -> checkpoints, one MLflow run's metrics.

``train(cfg)`` reads top to bottom:

    data     manifest (+ mixture, or natural proportions) -> MixtureSampler
    model    ModelArgs from the preset -> MaskedDiffusionTransformer
    engine   deepspeed.initialize with a torch AdamW and a warmup+cosine LambdaLR
    resume   from <output_dir>/checkpoints/latest if a complete checkpoint is there
    loop     batch -> draw_noise -> token_terms -> nelbo_loss -> backward/step; log; checkpoint

Exactness of resume rests on restoring everything that moves: weights, optimizer moments and
step counts, LR scheduler step (DeepSpeed's checkpoint), the sampler's cursors and generator,
the diffusion noise generator, and the python/numpy/torch global RNGs (trainer_state.json).
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from infra import tracking
from infra.config import TrainConfig, config_hash
from infra.contracts import (TRAINER_STATE_FILE, Manifest, TrainerState, artifact_sha256, load_manifest,
                             load_mixture, load_trainer_state, sha256_bytes, write_artifact)
from infra.errors import ConfigError, ContractError
from infra.storage import Storage, is_s3
from training import checkpoint as ckpt
from training.data import MixtureSampler, natural_weights
from training.diffusion import draw_noise, loss_by_t_bucket, nelbo_loss, per_sequence_nelbo, t_bucket_edges, token_terms
from training.distributed import all_gather_objects, all_reduce_sum, barrier, ensure_distributed
from training.model import MaskedDiffusionTransformer, ModelArgs, build_model_args

log = logging.getLogger(__name__)

N_T_BUCKETS = 5
ADAM_BETAS = (0.9, 0.95)  # beta2 0.95: the usual choice for LM pretraining stability (SMDM, LLaMA)


@dataclass
class TrainResult:
    checkpoint_dir: str  # the newest complete checkpoint folder
    steps: int  # global optimizer steps done (including steps before a resume)
    tokens_seen: int  # tokens processed, all ranks (every token, masked or not; MDLM counts masked only)
    final_loss: float  # loss of the last step run (nan if this call ran no step)
    losses: list[float] = field(default_factory=list)  # one per step run by THIS call


# --------------------------------------------------------------------------- configuration pieces


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_lr_ratio at total_steps.

    ``step`` counts optimizer steps already taken, so step 0 (the first update) uses 1/warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure, not a callable object: LambdaLR checkpoints the __dict__ of callable objects and
    # would restore the OLD total_steps on resume; a closure keeps the current config in charge.
    def schedule(step: int) -> float:
        return lr_multiplier(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and the embedding), not norm gains: decaying a gain toward 0 only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Lets save_checkpoint-time code gather full weights for model.pt.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    base = {
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(base, cfg.deepspeed)


def model_vocab_size(manifest: Manifest) -> int:
    """The tokenizer's vocabulary, widened if a special id (e.g. an appended mask) lies past it."""
    return max(manifest.tokenizer.vocab_size, max(manifest.tokenizer.special_ids.values()) + 1)


def _dirname(uri: str) -> str:
    return posixpath.dirname(uri) if is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def mixture_weights(cfg: TrainConfig, manifest: Manifest, manifest_sha: str,
                    storage: Storage) -> tuple[dict[str, float], str]:
    """(weights, sha256 identifying them): the mixture file's, or natural proportions by train tokens."""
    if cfg.mixture is None:
        weights = natural_weights(manifest, "train")
        return weights, sha256_bytes(repr(sorted(weights.items())).encode())
    mixture = load_mixture(cfg.mixture, storage)
    if mixture.manifest_sha256 != manifest_sha:
        log.warning("%s was computed for manifest %s, training uses manifest %s",
                    cfg.mixture, mixture.manifest_sha256[:12], manifest_sha[:12])
    return mixture.weights, artifact_sha256(mixture)


# --------------------------------------------------------------------------- metrics


class TrainMeter:
    """Sums between two log lines: loss, tokens, per-domain and per-t-bucket losses."""

    def __init__(self, n_domains: int, device):
        self.n_domains = n_domains
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.loss_sum, self.loss_count, self.tokens = z(1), z(1), z(1)
        self.domain_sum, self.domain_count = z(self.n_domains), z(self.n_domains)
        self.bucket_sum, self.bucket_count = z(N_T_BUCKETS), z(N_T_BUCKETS)
        self.started = time.perf_counter()

    def update(self, loss: torch.Tensor, per_seq: torch.Tensor, domain_index: torch.Tensor, t: torch.Tensor,
               tokens: int) -> None:
        per_seq = per_seq.detach().double()
        self.loss_sum += loss.detach().double()
        self.loss_count += 1
        self.tokens += tokens
        self.domain_sum.index_add_(0, domain_index, per_seq)
        self.domain_count.index_add_(0, domain_index, torch.ones_like(per_seq))
        sums, counts = loss_by_t_bucket(per_seq, t, N_T_BUCKETS)
        self.bucket_sum += sums
        self.bucket_count += counts

    def metrics(self, domains: list[str]) -> dict[str, float]:
        """Reduced over ranks (every rank must call this), keyed for MLflow."""
        elapsed = time.perf_counter() - self.started
        packed = torch.cat([self.loss_sum, self.loss_count, self.tokens, self.domain_sum, self.domain_count,
                            self.bucket_sum, self.bucket_count])
        packed = all_reduce_sum(packed).tolist()
        k = self.n_domains
        loss_sum, loss_count, tokens = packed[0:3]
        domain_sum, domain_count = packed[3:3 + k], packed[3 + k:3 + 2 * k]
        bucket_sum = packed[3 + 2 * k:3 + 2 * k + N_T_BUCKETS]
        bucket_count = packed[3 + 2 * k + N_T_BUCKETS:]
        out = {"train/loss": loss_sum / max(loss_count, 1), "train/tokens_per_s": tokens / max(elapsed, 1e-9)}
        for d, s, c in zip(domains, domain_sum, domain_count):
            if c:
                out[f"train/loss/{d}"] = s / c
        edges = t_bucket_edges(N_T_BUCKETS)
        for i, (s, c) in enumerate(zip(bucket_sum, bucket_count)):
            if c:
                out[f"train/loss_t/{edges[i]:.1f}-{edges[i + 1]:.1f}"] = s / c
        return out


# --------------------------------------------------------------------------- checkpoints


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Complete model weights on every rank (ZeRO-3 partitions parameters; gather them first)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(engine, cfg: TrainConfig, model_args: ModelArgs, state: TrainerState, rank: int) -> str:
    """Write one checkpoint (collective: every rank calls it). Returns its folder."""
    tag = ckpt.step_tag(state.step)
    root = ckpt.checkpoints_root(cfg.output_dir)
    folder = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, save_latest=False)  # we own the 'latest' pointer
    weights = full_state_dict(engine, cfg.zero_stage)
    if rank == 0:
        ckpt.save_weights(weights, folder)
        ckpt.write_json(os.path.join(folder, ckpt.MODEL_ARGS_FILE), model_args.to_dict())
        ckpt.write_json(os.path.join(folder, ckpt.TRAIN_CONFIG_FILE), cfg.model_dump(mode="json"))
        write_artifact(state, os.path.join(folder, TRAINER_STATE_FILE))  # last file: marks completeness
        ckpt.write_latest(cfg.output_dir, tag)
    barrier()
    return folder


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_resume_compatible(folder: str, state: TrainerState, cfg: TrainConfig, manifest_sha: str,
                            mixture_sha: str) -> None:
    if state.manifest_sha256 != manifest_sha:
        raise ContractError(
            f"{folder}: checkpoint was trained on manifest {state.manifest_sha256[:12]}, the config's manifest "
            f"is {manifest_sha[:12]}; the sampler's cursors mean nothing on other shards (use a new output_dir)"
        )
    if state.mixture_sha256 != mixture_sha:
        log.warning("%s: resuming with a different mixture than the checkpoint's (cursors are kept)", folder)
    if state.config_hash != config_hash(cfg):
        saved = os.path.join(folder, ckpt.TRAIN_CONFIG_FILE)
        changed = _changed_keys(ckpt.read_json(saved), cfg.model_dump(mode="json")) if os.path.exists(saved) else []
        log.warning("%s: resuming with a changed config (%s); the run is no longer exactly reproducible",
                    folder, ", ".join(changed) or "unknown fields")


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, storage: Storage | None = None, *, stop_after_step: int | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns where its last checkpoint is.

    ``stop_after_step`` ends the call early at that global step with a checkpoint, exactly as
    a preempted job would (the LR schedule still targets cfg.steps); a later call resumes.
    ``progress`` receives one human-readable line per log step, resume and checkpoint (rank 0).
    """
    import deepspeed

    storage = storage or Storage()

    def report(message: str) -> None:
        log.info(message)
        if progress is not None and rank == 0:
            progress(message)

    if is_s3(cfg.output_dir):
        raise ConfigError(f"train.output_dir={cfg.output_dir}: DeepSpeed checkpoints need a local or mounted folder")

    # ---- data
    manifest = load_manifest(cfg.manifest, storage)
    manifest_sha = artifact_sha256(manifest)
    weights, mixture_sha = mixture_weights(cfg, manifest, manifest_sha, storage)
    mask_id = manifest.tokenizer.special_ids["mask"]

    # ---- processes and seeds
    rank, world_size = ensure_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    sampler = MixtureSampler(manifest, _dirname(cfg.manifest), weights, cfg.seq_len, cfg.micro_batch_size,
                             cfg.seed, "train", storage, rank, world_size)
    # The noise generator must be seeded identically on all ranks: times are stratified over the
    # global batch (diffusion.stratified_times). CPU so its state is the same object everywhere.
    noise_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    # ---- model and engine
    model_args = build_model_args(cfg.model, model_vocab_size(manifest), cfg.seq_len)
    model = MaskedDiffusionTransformer(model_args)
    n_parameters = model.num_parameters()  # before ZeRO-3 partitions the parameters away
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS, eps=1e-8)
    scheduler = make_lr_scheduler(optimizer, cfg)
    ds_config = deepspeed_config(cfg, world_size)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    device = engine.device

    if rank == 0:
        _log_run_params(cfg, model_args, n_parameters, ds_config, weights)

    # ---- resume
    step, tokens_seen = 0, 0
    folder = ckpt.latest_checkpoint(cfg.output_dir)
    if folder is not None:
        state = load_trainer_state(os.path.join(folder, TRAINER_STATE_FILE))
        check_resume_compatible(folder, state, cfg, manifest_sha, mixture_sha)
        loaded, _ = engine.load_checkpoint(ckpt.checkpoints_root(cfg.output_dir), tag=os.path.basename(folder))
        if loaded is None:  # DeepSpeed only logs a warning when it finds nothing to load
            raise ContractError(f"{folder}: DeepSpeed could not load this checkpoint")
        sampler.load_state_dict(state.sampler["ranks"][rank])
        ckpt.restore_rng_state(state.rng["ranks"][rank], noise_gen)
        step, tokens_seen = state.step, state.tokens_seen
        report(f"resumed from {folder} at step {step}")

    def current_state() -> TrainerState:
        return TrainerState(
            step=step, tokens_seen=tokens_seen,
            sampler={"ranks": all_gather_objects(sampler.state_dict())},
            rng={"ranks": all_gather_objects(ckpt.capture_rng_state(noise_gen))},
            config_hash=config_hash(cfg), manifest_sha256=manifest_sha, mixture_sha256=mixture_sha,
            mlflow_run_id=tracking.active_run_id(),
        )

    # ---- loop
    last_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    meter = TrainMeter(len(sampler.domains), device)
    losses: list[float] = []
    saved_at = step if folder is not None else None
    engine.train()
    while step < last_step:
        lr = scheduler.get_last_lr()[0]  # the LR this step's update uses (the scheduler moves on after it)
        step_loss = 0.0
        for _ in range(cfg.grad_accum_steps):
            batch = {k: v.to(device) for k, v in sampler.next_batch().items()}
            x0, segment_ids, valid = batch["input_ids"], batch["segment_ids"], batch["valid"]
            draw = draw_noise(valid, noise_gen, cfg.mask_eps, rank, world_size).to(device)
            terms = token_terms(engine, x0, segment_ids, draw, valid, mask_id)
            loss = nelbo_loss(terms, valid)
            engine.backward(loss)  # DeepSpeed divides by grad_accum_steps itself
            engine.step()  # updates weights (and the LR) only at the accumulation boundary
            n_tokens = int(valid.sum()) * world_size  # training rows are fully packed on every rank
            tokens_seen += n_tokens
            step_loss += loss.item() / cfg.grad_accum_steps
            meter.update(loss, per_sequence_nelbo(terms, valid), batch["domain_index"], draw.t, n_tokens)
        step += 1
        losses.append(step_loss)

        if step % cfg.log_every == 0 or step == last_step:
            metrics = meter.metrics(sampler.domains)
            metrics["train/lr"] = lr
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            metrics["train/tokens_seen"] = tokens_seen
            metrics.update({f"data/epochs/{d}": e for d, e in sampler.epochs().items()})
            if rank == 0:
                tracking.log_metrics(metrics, step=step)
            report(f"step {step}/{cfg.steps} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
                   f"{metrics['train/tokens_per_s']:,.0f} tok/s")
            meter.reset()

        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            folder = save_checkpoint(engine, cfg, model_args, current_state(), rank)
            saved_at = step
            report(f"checkpoint {folder}")

    if saved_at != step or folder is None:
        folder = save_checkpoint(engine, cfg, model_args, current_state(), rank)
        report(f"checkpoint {folder}")
    return TrainResult(checkpoint_dir=folder, steps=step, tokens_seen=tokens_seen,
                       final_loss=losses[-1] if losses else float("nan"), losses=losses)


def _log_run_params(cfg: TrainConfig, model_args: ModelArgs, n_parameters: int, ds_config: dict,
                    weights: dict[str, float]) -> None:
    """Config, model size and mixture as MLflow params (secrets redacted by infra.tracking)."""
    import mlflow

    params = {"train": cfg.model_dump(mode="json"), "model_args": model_args.to_dict(),
              "model_parameters": n_parameters, "mixture_weights": weights}
    try:
        tracking.log_params(params)
    except mlflow.exceptions.MlflowException as e:
        # MLflow params are immutable: resuming inside the same run with a changed value fails.
        log.warning("not logging params (%s)", e)
    tracking.log_json(ds_config, "deepspeed_config.json")
