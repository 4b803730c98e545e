"""Per-domain likelihood bounds of a trained model: nats/token, perplexity bound, bits per byte.

For every domain of the manifest: take up to ``max_docs_per_domain`` documents of the eval
split (one per sequence, see data.eval_sequences), estimate each sequence's -log p(x0) bound
with ``diffusion.elbo_per_sequence`` (mask exactly l ~ U{1..L} tokens, weight L/l, average
``mc_samples`` draws), then aggregate:

    nats_per_token   = sum of sequence nats / sum of sequence tokens   (token-weighted)
    perplexity_bound = exp(nats_per_token)                              (an upper bound, like MDLM's)
    bits_per_byte    = sum of nats / ln 2 / sum of UTF-8 bytes          (tokenizer-independent)
    ci95             = 1.96 * standard error of nats_per_token, from the spread across sequences
                       (a ratio estimator's delta-method variance; it includes Monte Carlo noise)

Everything is seeded by ``eval_cfg.seed`` and the domain name, so re-evaluating a checkpoint
gives identical numbers and two checkpoints are compared on identical masks.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import asdict, dataclass

import torch

from infra import tracking
from infra.config import EvalConfig
from infra.contracts import Manifest
from infra.errors import ContractError
from infra.storage import Storage
from training import checkpoint as ckpt
from training.data import eval_sequences
from training.diffusion import elbo_per_sequence
from training.model import MaskedDiffusionTransformer, ModelArgs


@dataclass
class DomainEval:
    nats_per_token: float
    ci95: float  # half-width of the 95% interval on nats_per_token
    perplexity_bound: float
    bits_per_byte: float
    tokens: int
    docs: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(nats: torch.Tensor, tokens: torch.Tensor, n_bytes: torch.Tensor) -> DomainEval:
    """Aggregate per-sequence totals (nats [N], tokens [N], bytes [N]) into a DomainEval."""
    nats, tokens, n_bytes = nats.double(), tokens.double(), n_bytes.double()
    n = len(nats)
    total_tokens = float(tokens.sum())
    rate = float(nats.sum()) / total_tokens
    if n > 1:
        # Delta method for a ratio of sums: residuals n_i - rate * L_i, scaled by the mean length.
        residual = (nats - rate * tokens) / tokens.mean()
        stderr = math.sqrt(float((residual ** 2).sum()) / (n * (n - 1)))
        ci95 = 1.96 * stderr
    else:
        ci95 = float("nan")
    total_bytes = float(n_bytes.sum())
    return DomainEval(
        nats_per_token=rate,
        ci95=ci95,
        perplexity_bound=math.exp(rate),
        bits_per_byte=float(nats.sum()) / math.log(2) / total_bytes if total_bytes > 0 else float("nan"),
        tokens=int(total_tokens),
        docs=n,
    )


def domain_seed(seed: int, domain: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(domain.encode())) % (2**63)


@torch.no_grad()
def evaluate(model: torch.nn.Module, manifest: Manifest, manifest_dir: str, eval_cfg: EvalConfig, seq_len: int,
             storage: Storage | None = None, device: str | torch.device = "cpu") -> dict[str, DomainEval]:
    """{domain: DomainEval} for every manifest domain with documents in ``eval_cfg.split``.

    ``model`` must already be on ``device`` (batches are moved there); domains without
    documents in the split are left out of the result.
    """
    storage = storage or Storage()
    mask_id = manifest.tokenizer.special_ids["mask"]
    was_training = model.training
    model.eval()
    results: dict[str, DomainEval] = {}
    try:
        for domain in manifest.domain_names():
            seqs = eval_sequences(manifest, manifest_dir, domain, eval_cfg.split, seq_len,
                                  eval_cfg.max_docs_per_domain, storage)
            if len(seqs) == 0:
                continue
            generator = torch.Generator(device="cpu").manual_seed(domain_seed(eval_cfg.seed, domain))
            nats = []
            for batch in seqs.batches(eval_cfg.batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                nats.append(elbo_per_sequence(model, batch["input_ids"], batch["segment_ids"], batch["valid"],
                                              eval_cfg.mc_samples, generator, mask_id).cpu())
            results[domain] = summarize(torch.cat(nats), seqs.n_tokens, seqs.n_bytes)
    finally:
        model.train(was_training)
    return results


def load_model(checkpoint_dir: str, device: str | torch.device = "cpu",
               use_ema: bool | None = None) -> tuple[MaskedDiffusionTransformer, ModelArgs]:
    """The model of a checkpoint (a step folder, a checkpoints folder or a training output folder).

    Reads model_args.json and model.safetensors / model.pt (or ema.safetensors) only: no pickled
    code is executed and DeepSpeed is not needed. Weights saved in bf16 are loaded into float32
    parameters. ``use_ema``: None takes the EMA weights when the run kept an EMA (they are what
    the run exports), True requires them, False takes the raw weights.
    """
    from safetensors.torch import load_file

    from training.ema import EMA_FILE

    folder = ckpt.resolve_checkpoint_dir(checkpoint_dir)
    args = ModelArgs(**ckpt.read_json(f"{folder}/{ckpt.MODEL_ARGS_FILE}"))
    model = MaskedDiffusionTransformer(args)
    ema_path = os.path.join(folder, EMA_FILE)
    if use_ema and not os.path.exists(ema_path):
        raise ContractError(f"{folder}: no {EMA_FILE} (the run kept no EMA of its weights)")
    weights = load_file(ema_path) if use_ema is not False and os.path.exists(ema_path) else ckpt.load_weights(folder)
    model.load_state_dict(weights)
    return model.to(device).eval(), args


def log_eval(results: dict[str, DomainEval], step: int | None = None) -> None:
    """eval/<domain>/{nats_per_token, bits_per_byte, ppl_bound, ci95} to the active MLflow run."""
    metrics = {}
    for domain, r in results.items():
        metrics[f"eval/{domain}/nats_per_token"] = r.nats_per_token
        metrics[f"eval/{domain}/bits_per_byte"] = r.bits_per_byte
        metrics[f"eval/{domain}/ppl_bound"] = r.perplexity_bound
        if math.isfinite(r.ci95):
            metrics[f"eval/{domain}/ci95"] = r.ci95
    tracking.log_metrics(metrics, step=step)
