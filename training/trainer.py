"""The training loop: manifest + mixture -> DeepSpeed engine -> checkpoints, one MLflow run's metrics.

``train(cfg)`` reads top to bottom:

    data     manifest (+ mixture, or natural proportions) -> MixtureSampler
    model    ModelArgs from the preset -> MaskedDiffusionTransformer
    engine   deepspeed.initialize with a (skippable) torch AdamW; the LR is set per step
    resume   from <output_dir>/checkpoints/latest if a complete checkpoint is there (fetched
             from checkpoint_uri first when only the mirror has one); the EMA, if kept
    loop     lr -> batch -> draw_noise -> token_terms -> nelbo_loss -> backward/step, or a skip
             when the loss/gradient is not finite (training.guard) -> EMA update; log; eval;
             checkpoint (+ upload, retention)
    end      a last checkpoint, a last eval, the export (training.export) and its registration

The pieces live in their own modules: LR schedules (training.schedule), the non-finite guard
(training.guard), the weight EMA (training.ema), the remote checkpoint mirror
(training.checkpoint_mirror), the checkpoint layout (training.checkpoint), the export.

Exactness of resume rests on restoring everything that moves: weights, optimizer moments and
step counts (DeepSpeed's checkpoint), the EMA (ema.safetensors), the sampler's cursors and
generator, the diffusion noise generator, the python/numpy/torch global RNGs and the guard's
LR back-off (trainer_state.json). The LR itself is a pure function of (step, back-off).
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
from training.checkpoint_mirror import CheckpointMirror
from training.data import MixtureSampler, masking_for_run, natural_weights
from training.diffusion import draw_noise, loss_by_t_bucket, nelbo_loss, per_sequence_nelbo, t_bucket_edges, token_terms
from training.distributed import all_gather_objects, all_reduce_sum, barrier, ensure_distributed
from training.ema import EMA_FILE, WeightEMA
from training.evaluate import DomainEval, evaluate, log_eval
from training.export import CONFIG_FILE as EXPORT_CONFIG_FILE
from training.export import EXPORT_DIR, ExportInfo, export_model, read_tokenizer
from training.guard import NonFiniteGuard, SkippableAdamW
from training.model import MaskedDiffusionTransformer, ModelArgs, build_model_args
from training.schedule import scheduled_lr, set_lr

log = logging.getLogger(__name__)

N_T_BUCKETS = 5
ADAM_BETAS = (0.9, 0.95)  # beta2 0.95: the usual choice for LM pretraining stability (SMDM, LLaMA)


@dataclass
class TrainResult:
    checkpoint_dir: str  # the newest complete checkpoint folder
    steps: int  # global optimizer steps done (including steps before a resume)
    tokens_seen: int  # tokens processed, all ranks (every token, masked or not; MDLM counts masked only)
    final_loss: float  # loss of the last step run (nan if this call ran no step)
    losses: list[float] = field(default_factory=list)  # one per step run by THIS call (inf/nan: a skipped step)
    masked_tokens_seen: int = 0  # tokens the loss scored, all ranks
    nonfinite_skips: int = 0  # optimizer steps skipped for a non-finite loss/gradient, whole run
    eval: dict[str, DomainEval] = field(default_factory=dict)  # the last eval of THIS call (rank 0; eval_every)
    export_dir: str | None = None  # <output_dir>/export when this call exported
    metrics_lost: int = 0  # metric values MLflow never received (tracking server unreachable to the end)


# --------------------------------------------------------------------------- configuration pieces


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
        # ZeRO accepts only optimizers it knows by exact type; ours is torch AdamW with a skip
        # switch (training.guard.SkippableAdamW), identical to AdamW for ZeRO's purposes.
        "zero_allow_untested_optimizer": True,
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

    def count_tokens(self, tokens: int) -> None:
        """Tokens of a skipped step: processed (they count for throughput) but not learnt from."""
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (eval, checkpoints) out of tokens/s."""
        self.started += seconds

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
        # nan when every step since the last log line was skipped (non-finite): nothing was learnt.
        out = {"train/loss": loss_sum / loss_count if loss_count else float("nan"),
               "train/tokens_per_s": tokens / max(elapsed, 1e-9)}
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


def final_weights(engine, zero_stage: int, ema: WeightEMA | None) -> dict[str, torch.Tensor]:
    """The weights to evaluate and export: the EMA if the run keeps one. Collective under ZeRO-3."""
    return ema.full_state_dict(engine.device) if ema is not None else full_state_dict(engine, zero_stage)


def save_checkpoint(engine, cfg: TrainConfig, model_args: ModelArgs, state: TrainerState, rank: int,
                    ema: WeightEMA | None = None, mirror: CheckpointMirror | None = None) -> str:
    """Write one checkpoint (collective: every rank calls it). Returns its folder.

    Then, on rank 0: start its upload to the mirror, and apply ``keep_last`` retention.
    """
    from safetensors.torch import save_file

    tag = ckpt.step_tag(state.step)
    root = ckpt.checkpoints_root(cfg.output_dir)
    folder = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, save_latest=False)  # we own the 'latest' pointer
    weights = full_state_dict(engine, cfg.zero_stage)
    ema_weights = ema.full_state_dict(engine.device) if ema is not None else None
    if rank == 0:
        ckpt.save_weights(weights, folder)
        if ema_weights is not None:
            save_file(ema_weights, os.path.join(folder, EMA_FILE))
        ckpt.write_json(os.path.join(folder, ckpt.MODEL_ARGS_FILE), model_args.to_dict())
        ckpt.write_json(os.path.join(folder, ckpt.TRAIN_CONFIG_FILE), cfg.model_dump(mode="json"))
        write_artifact(state, os.path.join(folder, TRAINER_STATE_FILE))  # last file: marks completeness
        ckpt.write_latest(cfg.output_dir, tag)
        if mirror is not None:
            mirror.upload_async(folder)  # waits for the previous upload first
        if cfg.keep_last:
            for old in ckpt.prune_checkpoints(cfg.output_dir, cfg.keep_last):
                log.info("deleted old checkpoint %s (keep_last=%d)", old, cfg.keep_last)
    barrier()
    return folder


def find_resume_checkpoint(cfg: TrainConfig, mirror: CheckpointMirror | None, rank: int) -> str | None:
    """The local checkpoint to resume from; rank 0 first downloads the mirror's if it is newer."""
    if mirror is not None and rank == 0 and mirror.is_newer_than_local(cfg.output_dir):
        mirror.download_latest(cfg.output_dir)
    barrier()
    return ckpt.latest_checkpoint(cfg.output_dir)


def make_ema(engine, cfg: TrainConfig, resumed_from: str | None) -> WeightEMA | None:
    """The EMA, created after resume: from the checkpoint's ema.safetensors, else from the current weights."""
    if cfg.ema_decay is None:
        return None
    ema = WeightEMA(engine.module, cfg.ema_decay)
    path = os.path.join(resumed_from, EMA_FILE) if resumed_from else None
    if path and os.path.exists(path):
        from safetensors.torch import load_file

        ema.load_full_state_dict(load_file(path))
    elif resumed_from:
        log.warning("%s has no %s: the EMA starts from the resumed weights", resumed_from, EMA_FILE)
    return ema


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


# --------------------------------------------------------------------------- pieces of the loop


def agree_on_step(step_loss: float, local_masked: int, device) -> tuple[bool, int]:
    """(the loss was not finite on some rank, masked tokens of this step over all ranks): one all-reduce."""
    flags = torch.tensor([0.0 if math.isfinite(step_loss) else 1.0, float(local_masked)], dtype=torch.float64,
                         device=device)
    flags = all_reduce_sum(flags).tolist()
    return flags[0] > 0, int(flags[1])


def pre_step_grad_norm(engine, optimizer: torch.optim.Optimizer) -> float | None:
    """The global gradient norm before clipping, where DeepSpeed neither reports nor checks it.

    That is stage 0 in fp32, where the engine steps the client optimizer directly; the
    gradients are already all-reduced at this point, so every rank computes the same norm.
    Elsewhere None: ZeRO and bf16 compute (and check) the norm inside ``engine.step()``.
    """
    if engine.optimizer is not optimizer:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def training_flops_per_token(model_args: ModelArgs, n_parameters: int, masked_fraction: float) -> float:
    """Forward + backward FLOPs per input token: 6 per body parameter, and 6 d V for the output
    projection only at the masked positions (the model computes logits there alone).

    The embedding lookup costs no FLOPs; attention's sequence-length term is left out, as usual.
    """
    table = model_args.vocab_size * model_args.d_model
    body = n_parameters - table * (1 if model_args.tie_embeddings else 2)
    return 6.0 * body + 6.0 * table * masked_fraction


def progress_metrics(cfg: TrainConfig, lr: float, grad_norm, tokens_seen: int, masked_tokens_seen: int,
                     guard: NonFiniteGuard, flops_per_token: float, world_size: int, tokens_per_s: float) -> dict:
    """LR, grad norm, token counters, the guard's counters and the MFU estimate for one log line.

    MFU = flops_per_token x tokens/s / (peak_flops x world_size), over the peak of all devices.
    """
    out = {"train/lr": lr, "train/tokens_seen": tokens_seen, "train/masked_tokens_seen": masked_tokens_seen,
           "train/nonfinite_skips": guard.skips, "train/lr_backoff": guard.lr_scale}
    if grad_norm is not None:
        out["train/grad_norm"] = float(grad_norm)
    if cfg.peak_flops:
        out["train/mfu"] = flops_per_token * tokens_per_s / (cfg.peak_flops * world_size)
    return out


def run_eval(engine, cfg: TrainConfig, ema: WeightEMA | None, model_args: ModelArgs, manifest: Manifest,
             storage: Storage, rank: int, step: int) -> dict[str, DomainEval]:
    """Per-domain NELBO of the current (EMA) weights on cfg.eval.split; logged as eval/* at ``step``.

    Collective (ZeRO-3 gathers the weights on every rank); rank 0 evaluates a plain copy of the
    model while the others wait, and returns the results ({} on other ranks). The torch RNG is
    forked so that building the copy does not shift training's random stream (exact resume).
    """
    weights = final_weights(engine, cfg.zero_stage, ema)
    results: dict[str, DomainEval] = {}
    if rank == 0:
        with torch.random.fork_rng(devices=[]):
            model = MaskedDiffusionTransformer(model_args)
        model.load_state_dict(weights)
        results = evaluate(model.to(engine.device), manifest, _dirname(cfg.manifest), cfg.eval, cfg.seq_len,
                           storage, engine.device)
        log_eval(results, step=step)
        del model
    barrier()
    return results


def eval_line(step: int, results: dict[str, DomainEval]) -> str:
    return f"eval step {step}: " + ", ".join(f"{d} {r.nats_per_token:.4f} nats/token" for d, r in results.items())


def export_exists(output_dir: str) -> bool:
    return os.path.exists(os.path.join(output_dir, EXPORT_DIR, EXPORT_CONFIG_FILE))


def export_info(cfg: TrainConfig, manifest: Manifest, manifest_sha: str, mixture_sha: str,
                weights: dict[str, float], model_args: ModelArgs, n_parameters: int, step: int, tokens_seen: int,
                masked_tokens_seen: int, masking, evals: dict[str, DomainEval]) -> ExportInfo:
    return ExportInfo(
        model_args=model_args, preset=cfg.model.preset, n_parameters=n_parameters,
        special_ids=dict(manifest.tokenizer.special_ids), weights="ema" if cfg.ema_decay else "final",
        ema_decay=cfg.ema_decay, step=step, tokens_seen=tokens_seen, masked_tokens_seen=masked_tokens_seen,
        manifest_uri=cfg.manifest, manifest_sha256=manifest_sha, tokenizer_sha256=manifest.tokenizer.sha256,
        mixture_uri=cfg.mixture, mixture_sha256=mixture_sha, mixture_weights=dict(weights),
        masking=masking.describe(),
        eval_split=cfg.eval.split if evals else None, eval={d: r.to_dict() for d, r in evals.items()},
        mlflow_run_id=tracking.active_run_id(),
    )


def export_run(engine, cfg: TrainConfig, ema: WeightEMA | None, manifest: Manifest, info: ExportInfo,
               storage: Storage, rank: int) -> str:
    """Write <output_dir>/export (collective: the weights are gathered), log it, register it (rank 0)."""
    weights = final_weights(engine, cfg.zero_stage, ema)
    folder = os.path.join(cfg.output_dir, EXPORT_DIR)
    if rank == 0:
        export_model(folder, weights, info, read_tokenizer(manifest, _dirname(cfg.manifest), storage))
        # Through a tracking-server outage: retried up to the flush wait, then reported (the export
        # itself is on disk either way, and the training's result stands).
        register = None
        if cfg.register_model:
            register = {"name": cfg.register_model, "description": f"maskmix {info.preset}, step {info.step}",
                        "tags": {"maskmix.weights": info.weights, "maskmix.manifest_sha256": info.manifest_sha256,
                                 "maskmix.step": str(info.step)}}
        uploaded = tracking.upload_or_report(folder, EXPORT_DIR, lost_dir=cfg.output_dir, register=register)
        if register and not uploaded:
            log.warning("register_model=%s: not registered, the export did not reach MLflow (`maskmix tracking "
                        "redeliver` registers it once it has delivered the export)", cfg.register_model)
        elif register:
            version = tracking.register_artifacts(register["name"], EXPORT_DIR, register["description"],
                                                  register["tags"])
            if version is None:
                log.warning("register_model=%s: no active MLflow run, so nothing to register", cfg.register_model)
            else:
                log.info("registered %s version %s", cfg.register_model, version)
    barrier()
    return folder


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, storage: Storage | None = None, *, stop_after_step: int | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns where its last checkpoint is.

    ``stop_after_step`` ends the call early at that global step with a checkpoint, exactly as
    a preempted job would (the LR schedule still targets cfg.steps); a later call resumes.
    ``progress`` receives one human-readable line per log step, resume, eval, checkpoint and
    export (rank 0). The export happens once, when the run reaches cfg.steps.
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
    # Only independent masking with t ~ U(0,1) makes train/loss the NELBO; the run is tagged.
    masking = masking_for_run(cfg.masking, manifest, _dirname(cfg.manifest), storage)

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
    optimizer = SkippableAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS, eps=1e-8)
    ds_config = deepspeed_config(cfg, world_size)
    # No LR scheduler for DeepSpeed: the loop sets each step's LR (see training.schedule).
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine.gradient_accumulation_steps() != cfg.grad_accum_steps:
        raise ConfigError(f"train.deepspeed sets gradient_accumulation_steps={engine.gradient_accumulation_steps()}; "
                          f"set train.grad_accum_steps instead (it is {cfg.grad_accum_steps})")
    device = engine.device
    guard = NonFiniteGuard(cfg.nonfinite_lr_backoff, cfg.max_nonfinite_skips)
    mirror = CheckpointMirror(cfg.checkpoint_uri, storage) if cfg.checkpoint_uri and rank == 0 else None

    if rank == 0:
        _log_run_params(cfg, model_args, n_parameters, ds_config, weights)
        # The strategy is also in the params (train.masking.*); tags make runs filterable.
        tracking.set_tags({"maskmix.masking": masking.describe(),
                           "maskmix.nelbo_exact": str(masking.is_exact_nelbo).lower()})
    if not masking.is_exact_nelbo:
        report(f"masking {masking.describe()}: train/loss is a heuristic objective, not the NELBO "
               "(evaluation still reports the exact bound)")

    # ---- resume
    step, tokens_seen, masked_tokens_seen = 0, 0, 0
    folder = find_resume_checkpoint(cfg, mirror, rank)
    if folder is not None:
        state = load_trainer_state(os.path.join(folder, TRAINER_STATE_FILE))
        check_resume_compatible(folder, state, cfg, manifest_sha, mixture_sha)
        loaded, _ = engine.load_checkpoint(ckpt.checkpoints_root(cfg.output_dir), tag=os.path.basename(folder),
                                           load_lr_scheduler_states=False)
        if loaded is None:  # DeepSpeed only logs a warning when it finds nothing to load
            raise ContractError(f"{folder}: DeepSpeed could not load this checkpoint")
        sampler.load_state_dict(state.sampler["ranks"][rank])
        ckpt.restore_rng_state(state.rng["ranks"][rank], noise_gen)
        guard.load_state_dict(state.nonfinite)
        step, tokens_seen, masked_tokens_seen = state.step, state.tokens_seen, state.masked_tokens_seen
        report(f"resumed from {folder} at step {step}")
    ema = make_ema(engine, cfg, folder)

    def current_state() -> TrainerState:
        return TrainerState(
            step=step, tokens_seen=tokens_seen, masked_tokens_seen=masked_tokens_seen,
            sampler={"ranks": all_gather_objects(sampler.state_dict())},
            rng={"ranks": all_gather_objects(ckpt.capture_rng_state(noise_gen))},
            config_hash=config_hash(cfg), manifest_sha256=manifest_sha, mixture_sha256=mixture_sha,
            mlflow_run_id=tracking.active_run_id(), nonfinite=guard.state_dict(),
        )

    # ---- loop
    last_step = cfg.steps if stop_after_step is None else min(cfg.steps, stop_after_step)
    meter = TrainMeter(len(sampler.domains), device)
    losses: list[float] = []
    evals: dict[str, DomainEval] = {}
    evaluated_at = None
    saved_at = step if folder is not None else None
    engine.train()
    while step < last_step:
        lr = scheduled_lr(cfg, step) * guard.lr_scale  # the LR of this step's update
        set_lr(optimizer, lr)
        step_loss, local_masked, n_tokens, micro_batches = 0.0, 0, 0, []
        loss_nonfinite, step_masked, grad_norm = False, 0, None
        for _ in range(cfg.grad_accum_steps):
            batch = {k: v.to(device) for k, v in sampler.next_batch().items()}
            x0, segment_ids, valid = batch["input_ids"], batch["segment_ids"], batch["valid"]
            draw = draw_noise(valid, noise_gen, cfg.mask_eps, rank, world_size, masking=masking,
                              input_ids=x0, segment_ids=segment_ids).to(device)
            terms = token_terms(engine, x0, segment_ids, draw, valid, mask_id)
            loss = nelbo_loss(terms, valid)
            engine.backward(loss)  # DeepSpeed divides by grad_accum_steps itself
            step_loss += loss.item() / cfg.grad_accum_steps
            local_masked += int(draw.masked.sum())
            micro_tokens = int(valid.sum()) * world_size  # training rows are fully packed on every rank
            n_tokens += micro_tokens
            micro_batches.append((loss.detach(), per_sequence_nelbo(terms, valid).detach(), batch["domain_index"],
                                  draw.t, micro_tokens))
            if engine.is_gradient_accumulation_boundary():
                # Every rank must agree before the update: a NaN on one rank poisons every gradient.
                loss_nonfinite, step_masked = agree_on_step(step_loss, local_masked, device)
                grad_norm = pre_step_grad_norm(engine, optimizer)
                optimizer.skip_requested = loss_nonfinite or (grad_norm is not None and not math.isfinite(grad_norm))
            engine.step()  # updates the weights only at the accumulation boundary, and not when skipped
        # ZeRO and bf16 skip a non-finite gradient norm themselves (was_step_applied); fp16's loss
        # scaler skips overflowing steps as a matter of course, and those are not ours to count.
        skipped = optimizer.skip_requested or not (engine.was_step_applied() or engine.fp16_enabled())
        optimizer.skip_requested = False
        guard.record(step + 1, skipped, "loss is not finite" if loss_nonfinite else "gradient is not finite")
        if skipped:
            meter.count_tokens(n_tokens)
        else:
            if ema is not None:
                ema.update()
            for micro_batch in micro_batches:
                meter.update(*micro_batch)
        step += 1
        tokens_seen += n_tokens
        masked_tokens_seen += step_masked
        losses.append(step_loss)

        if step % cfg.log_every == 0 or step == last_step:
            metrics = meter.metrics(sampler.domains)
            grad_norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
            flops_per_token = training_flops_per_token(model_args, n_parameters,
                                                       masked_tokens_seen / max(1, tokens_seen))
            metrics.update(progress_metrics(cfg, lr, grad_norm, tokens_seen, masked_tokens_seen, guard,
                                            flops_per_token, world_size, metrics["train/tokens_per_s"]))
            metrics.update({f"data/epochs/{d}": e for d, e in sampler.epochs().items()})
            if rank == 0:
                tracking.log_metrics(metrics, step=step)
            report(f"step {step}/{cfg.steps} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
                   f"{metrics['train/tokens_per_s']:,.0f} tok/s")
            meter.reset()

        started = time.perf_counter()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            evals, evaluated_at = run_eval(engine, cfg, ema, model_args, manifest, storage, rank, step), step
            report(eval_line(step, evals))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            folder = save_checkpoint(engine, cfg, model_args, current_state(), rank, ema, mirror)
            saved_at = step
            report(f"checkpoint {folder}")
        meter.exclude(time.perf_counter() - started)

    if saved_at != step or folder is None:
        folder = save_checkpoint(engine, cfg, model_args, current_state(), rank, ema, mirror)
        report(f"checkpoint {folder}")

    # Per-step metrics buffered through a tracking-server outage (infra.tracking.MetricSink) are
    # delivered now, waiting for the server a bounded time; what cannot be is written to
    # <output_dir>/mlflow-undelivered-<run>.jsonl and reported lost, and training's result stands.
    metrics_lost = tracking.flush_metrics(lost_dir=cfg.output_dir) if rank == 0 else 0
    if metrics_lost:
        report(f"{metrics_lost} metric values could not be delivered to MLflow (see the warning above)")

    # ---- end: the export of the finished run
    export_dir = None
    if cfg.export and step == cfg.steps and (losses or not export_exists(cfg.output_dir)):
        info = export_info(cfg, manifest, manifest_sha, mixture_sha, weights, model_args, n_parameters, step,
                           tokens_seen, masked_tokens_seen, masking, evals if evaluated_at == step else {})
        export_dir = export_run(engine, cfg, ema, manifest, info, storage, rank)
        report(f"exported {export_dir}")
    if mirror is not None:
        mirror.close()  # the last upload must be complete before the job may end
    return TrainResult(checkpoint_dir=folder, steps=step, tokens_seen=tokens_seen,
                       final_loss=losses[-1] if losses else float("nan"), losses=losses,
                       masked_tokens_seen=masked_tokens_seen, nonfinite_skips=guard.skips, eval=evals,
                       export_dir=export_dir, metrics_lost=metrics_lost)


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
    # As artifacts too: params are flattened and truncated, these are the exact documents.
    tracking.log_json(cfg.model_dump(mode="json"), "train_config.json")
    tracking.log_json(ds_config, "deepspeed_config.json")
