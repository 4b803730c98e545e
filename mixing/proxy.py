"""Small proxy trainings: a masked-diffusion model trained for a few hundred steps on a mixture.

DoReMi (reference and proxy), the mixing-law sweeps and the known-optimum benchmark all train
many tiny models on different mixtures. They run here in plain torch, not through
``training.trainer``'s DeepSpeed engine: a proxy is ~0.1-1M parameters on one process, so ZeRO
sharding, launchers and checkpoint folders only add start-up cost (seconds per run, times
hundreds of runs) and a distributed runtime to every Ray task, for nothing in return. The
model, the objective (NELBO), the mixture sampler, the LR schedule and the evaluator are
``training``'s own, so a proxy measures exactly what the full-scale run will optimise.

``train_proxy`` is a pure function of its inputs: everything random is drawn from generators
seeded by ``cfg.seed`` (model init under a forked global RNG, the sampler, the noise draws), so
the sweep can call it from many Ray tasks and a repeated call gives the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from infra import tracking
from infra.config import EvalConfig, ProxyConfig
from infra.contracts import Manifest
from infra.storage import Storage
from training.data import MixtureSampler
from training.diffusion import draw_noise, nelbo_loss, token_terms
from training.evaluate import DomainEval, evaluate
from training.model import MaskedDiffusionTransformer, build_model_args
from training import schedule
from training.schedule import lr_multiplier


class MetricBuffer:
    """Per-step metrics, sent to the active MLflow run in batches (one ``log_batch`` per flush).

    Logging every step with one call each costs a database round trip per step: with the default
    sqlite store that was ~0.25 s per call, most of a 200-step proxy run's wall time. Buffering
    keeps every step's value (each metric carries its step) at a fraction of the cost. Without an
    active run nothing is recorded.
    """

    def __init__(self, flush_every: int = 50):
        import mlflow

        run = mlflow.active_run()
        self.run_id = run.info.run_id if run else None
        self.flush_every = flush_every
        self.pending: list = []
        self._since_flush = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.run_id is None or not self.pending:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for i in range(0, len(self.pending), 1000):  # MLflow caps a batch at 1000 metrics
            client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []
        self._since_flush = 0


@dataclass
class ProxyResult:
    model: torch.nn.Module
    eval: dict[str, DomainEval]  # per-domain bound at the end (validation split)
    losses: list[float]  # training loss per step
    per_domain_curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (step, nats/token)
    wall_s: float = 0.0


def build_proxy_model(manifest: Manifest, cfg: ProxyConfig, seed: int | None = None) -> MaskedDiffusionTransformer:
    """The proxy model, initialised from ``seed`` (default cfg.seed) without touching the global RNG."""
    args = build_model_args(cfg, vocab_size=manifest.tokenizer.vocab_size, max_seq_len=cfg.seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        model = MaskedDiffusionTransformer(args)
    return model


def make_optimizer(model: torch.nn.Module, cfg: ProxyConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


def set_lr(optimizer: torch.optim.Optimizer, cfg: ProxyConfig, step: int) -> float:
    """Warmup + cosine (training.schedule) for optimizer step ``step`` (0-based)."""
    lr = cfg.lr * lr_multiplier(step, max(1, cfg.warmup_steps), cfg.steps, cfg.min_lr_ratio, "cosine")
    schedule.set_lr(optimizer, lr)
    return lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   cfg: ProxyConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()


def eval_config(cfg: ProxyConfig) -> EvalConfig:
    return EvalConfig(split="validation", mc_samples=cfg.mc_samples, max_docs_per_domain=cfg.eval_docs_per_domain,
                      batch_size=max(cfg.batch_size, 16), seed=cfg.seed + 1234)


def evaluate_proxy(model: torch.nn.Module, manifest: Manifest, manifest_dir: str, cfg: ProxyConfig,
                   storage: Storage | None = None) -> dict[str, DomainEval]:
    return evaluate(model, manifest, manifest_dir, eval_config(cfg), cfg.seq_len, storage)


def noise_generator(seed: int) -> torch.Generator:
    # Offset from the sampler's seed so the noise and the domain draws are independent streams.
    return torch.Generator(device="cpu").manual_seed(seed * 7919 + 17)


def train_proxy(manifest: Manifest, manifest_dir: str, weights: dict[str, float], cfg: ProxyConfig,
                storage: Storage | None = None, log_prefix: str = "",
                step_callback: Callable[[int, float], None] | None = None) -> ProxyResult:
    """Train a proxy on the mixture ``weights`` for cfg.steps steps and evaluate it per domain.

    Logs ``<log_prefix>train/loss`` and ``<log_prefix>lr`` every step and
    ``<log_prefix>eval/<domain>/nats_per_token`` at each evaluation to the active MLflow run
    (nothing without one). ``step_callback(step, loss)`` is called after every step.
    """
    start = time.perf_counter()
    storage = storage or Storage()
    mask_id = manifest.tokenizer.special_ids["mask"]
    model = build_proxy_model(manifest, cfg)
    model.train()
    optimizer = make_optimizer(model, cfg)
    sampler = MixtureSampler(manifest, manifest_dir, weights, cfg.seq_len, cfg.batch_size, cfg.seed, storage=storage)
    generator = noise_generator(cfg.seed)
    losses: list[float] = []
    curve: dict[str, list[tuple[int, float]]] = {}

    def record_eval(step: int) -> dict[str, DomainEval]:
        results = evaluate_proxy(model, manifest, manifest_dir, cfg, storage)
        for domain, r in results.items():
            curve.setdefault(domain, []).append((step, r.nats_per_token))
        tracking.log_metrics({f"{log_prefix}eval/{d}/nats_per_token": r.nats_per_token for d, r in results.items()},
                             step=step)
        return results

    buffer = MetricBuffer()
    for step in range(cfg.steps):
        lr = set_lr(optimizer, cfg, step)
        batch = sampler.next_batch()
        draw = draw_noise(batch["valid"], generator)
        terms = token_terms(model, batch["input_ids"], batch["segment_ids"], draw, batch["valid"], mask_id)
        loss = nelbo_loss(terms, batch["valid"])
        optimizer_step(model, optimizer, loss, cfg)
        value = float(loss.detach())
        losses.append(value)
        buffer.log({f"{log_prefix}train/loss": value, f"{log_prefix}lr": lr}, step=step)
        if step_callback is not None:
            step_callback(step, value)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            record_eval(done)
    buffer.flush()
    results = record_eval(cfg.steps)
    model.eval()
    return ProxyResult(model=model, eval=results, losses=losses, per_domain_curve=curve,
                       wall_s=time.perf_counter() - start)
