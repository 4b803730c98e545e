"""The trained model as a self-contained folder: weights, shapes, tokenizer, special ids, model card.

    <output_dir>/export/
        model.safetensors   the final weights (the EMA when the run kept one), float32/bf16 tensors
        model_args.json     training.model.ModelArgs
        tokenizer.json      the manifest's tokenizer, copied (absent if the manifest's file is)
        config.json         special ids (mask, pad, ...), which weights these are, provenance
        README.md           model card

Nothing in it is pickled: ``load_exported`` reads JSON and safetensors only, so loading a
model from an untrusted registry cannot execute code. The folder is written under a temporary
name and renamed into place, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field

import torch

from infra.contracts import Manifest, sha256_bytes
from infra.errors import ContractError
from infra.storage import Storage, is_s3, join
from training.model import MaskedDiffusionTransformer, ModelArgs

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
WEIGHTS_FILE = "model.safetensors"
MODEL_ARGS_FILE = "model_args.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FORMAT = "maskmix.export"
EXPORT_VERSION = 1
OBJECTIVE = ("masked diffusion (MDLM / LLaDA): absorbing-state forward process with p(t) = (1 - eps) t + eps, "
             "loss = (1/p(t)) * sum of masked-token cross-entropy / L (an upper bound on -log p(x0) / L)")


@dataclass
class ExportInfo:
    """What the model card and config.json say about the run that produced the weights."""

    model_args: ModelArgs
    preset: str
    n_parameters: int
    special_ids: dict[str, int]
    weights: str  # "ema" or "final"
    ema_decay: float | None
    step: int
    tokens_seen: int
    masked_tokens_seen: int
    manifest_uri: str
    manifest_sha256: str
    tokenizer_sha256: str
    mixture_uri: str | None
    mixture_sha256: str
    mixture_weights: dict[str, float]
    masking: str = "independent"
    eval_split: str | None = None
    eval: dict[str, dict] = field(default_factory=dict)  # {domain: DomainEval.to_dict()} at the final step
    mlflow_run_id: str | None = None

    def config(self) -> dict:
        return {
            "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
            "special_ids": self.special_ids, "mask_token_id": self.special_ids["mask"],
            "vocab_size": self.model_args.vocab_size, "max_seq_len": self.model_args.max_seq_len,
            "weights": self.weights, "ema_decay": self.ema_decay, "step": self.step, "tokens_seen": self.tokens_seen,
            "manifest_sha256": self.manifest_sha256, "tokenizer_sha256": self.tokenizer_sha256,
            "mixture_sha256": self.mixture_sha256, "masking": self.masking, "mlflow_run_id": self.mlflow_run_id,
        }


def read_tokenizer(manifest: Manifest, manifest_dir: str, storage: Storage | None = None) -> bytes | None:
    """The manifest's tokenizer.json bytes (path relative to the manifest folder), or None if it is missing.

    A missing file or a checksum mismatch is logged, not raised: the export runs at the end of a
    possibly long training run, and the weights are worth keeping even without their tokenizer.
    """
    path = manifest.tokenizer.path
    uri = path if is_s3(path) or os.path.isabs(path) else join(manifest_dir, path)
    try:
        data = (storage or Storage()).read_bytes(uri)
    except FileNotFoundError:
        log.warning("%s: the manifest's tokenizer does not exist; exporting without tokenizer.json", uri)
        return None
    if sha256_bytes(data) != manifest.tokenizer.sha256:
        log.warning("%s: sha256 differs from the manifest's %s; exported anyway (config.json records the "
                    "manifest's hash)", uri, manifest.tokenizer.sha256[:12])
    return data


def model_card(info: ExportInfo, has_tokenizer: bool) -> str:
    a = info.model_args
    weights = f"EMA of the weights (decay {info.ema_decay})" if info.weights == "ema" else "final weights"
    lines = [
        f"# maskmix masked-diffusion LM ({info.preset}, {info.n_parameters / 1e6:.1f}M parameters)",
        "",
        "A bidirectional transformer trained with maskmix as a masked-diffusion language model.",
        "",
        "## Model",
        "",
        f"- parameters: {info.n_parameters:,} (preset `{info.preset}`)",
        f"- d_model {a.d_model}, {a.n_layers} layers, {a.n_heads} heads, SwiGLU d_ff {a.d_ff}, "
        f"vocab {a.vocab_size}, max_seq_len {a.max_seq_len}, tied embeddings: {a.tie_embeddings}",
        f"- weights: {weights}, after {info.step:,} optimizer steps",
        f"- mask token id: {info.special_ids['mask']} (special ids in `config.json`)",
        f"- tokenizer: {'`tokenizer.json`' if has_tokenizer else 'NOT included (missing at export time)'}, "
        f"sha256 `{info.tokenizer_sha256}`",
        "",
        "## Objective",
        "",
        f"{OBJECTIVE}. Masking strategy: `{info.masking}`.",
        "",
        "## Data",
        "",
        f"- manifest: `{info.manifest_uri}` (sha256 `{info.manifest_sha256}`)",
        f"- mixture: `{info.mixture_uri or 'natural proportions'}` (sha256 `{info.mixture_sha256}`)",
        f"- tokens processed: {info.tokens_seen:,} (of which masked, i.e. scored: {info.masked_tokens_seen:,})",
        "",
        "| domain | mixture weight |",
        "|---|---|",
        *[f"| {d} | {w:.4f} |" for d, w in sorted(info.mixture_weights.items())],
        "",
    ]
    if info.eval:
        lines += [
            f"## Evaluation ({info.eval_split} split, final step)",
            "",
            "Upper bounds on the negative log-likelihood (NELBO, exactly l ~ U{1..L} tokens masked, weight L/l).",
            "",
            "| domain | nats/token | ±95% | perplexity bound | bits/byte | tokens |",
            "|---|---|---|---|---|---|",
        ]
        for d, r in sorted(info.eval.items()):
            ci = f"{r['ci95']:.4f}" if math.isfinite(r["ci95"]) else "n/a"
            lines.append(f"| {d} | {r['nats_per_token']:.4f} | {ci} | {r['perplexity_bound']:.2f} | "
                         f"{r['bits_per_byte']:.4f} | {r['tokens']:,} |")
        lines.append("")
    lines += [
        "## Loading",
        "",
        "```python",
        "from training.export import load_exported",
        "model, args, tokenizer = load_exported('path/to/export')  # safetensors + JSON, nothing pickled",
        "```",
        "",
        "## License",
        "",
        "These weights are derived from the training data listed in the manifest above. Their use is subject to "
        "the licenses and terms of that data; check them before redistributing the weights or their outputs.",
    ]
    if info.mlflow_run_id:
        lines += ["", f"MLflow run: `{info.mlflow_run_id}`"]
    return "\n".join(lines) + "\n"


def export_model(folder: str, weights: dict[str, torch.Tensor], info: ExportInfo,
                 tokenizer_json: bytes | None) -> str:
    """Write the export folder (replacing an older one); returns ``folder``."""
    from safetensors.torch import save_file

    folder = os.path.abspath(folder)
    tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS_FILE),
                  metadata={"format": EXPORT_FORMAT, "weights": info.weights})
        _write_json(os.path.join(tmp, MODEL_ARGS_FILE), info.model_args.to_dict())
        _write_json(os.path.join(tmp, CONFIG_FILE), info.config())
        if tokenizer_json is not None:
            with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as f:
                f.write(tokenizer_json)
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(model_card(info, tokenizer_json is not None))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_exported(folder: str, device: str | torch.device = "cpu"):
    """(model in eval mode, ModelArgs, tokenizers.Tokenizer or None) from an export folder."""
    from safetensors.torch import load_file

    for name in (WEIGHTS_FILE, MODEL_ARGS_FILE, CONFIG_FILE):
        if not os.path.exists(os.path.join(folder, name)):
            raise ContractError(f"{folder}: not a maskmix export (no {name})")
    config = _read_json(os.path.join(folder, CONFIG_FILE))
    if config.get("format") != EXPORT_FORMAT or config.get("format_version") != EXPORT_VERSION:
        raise ContractError(f"{folder}/{CONFIG_FILE}: format {config.get('format')!r} version "
                            f"{config.get('format_version')!r}, expected {EXPORT_FORMAT!r} {EXPORT_VERSION}")
    args = ModelArgs(**_read_json(os.path.join(folder, MODEL_ARGS_FILE)))
    model = MaskedDiffusionTransformer(args)
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
    tokenizer = None
    if os.path.exists(os.path.join(folder, TOKENIZER_FILE)):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
    return model.to(device).eval(), args, tokenizer


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)
