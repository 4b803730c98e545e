"""The denoiser of a masked-diffusion language model, in one file.

A LLaMA-style transformer (pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP) with two
differences from a GPT:

* attention is bidirectional: no causal mask. Packed documents are kept apart by a segment mask
  built from ``segment_ids`` instead (a token attends only to tokens of its own document);
* there is no time / noise-level input. For the absorbing ("mask") process the optimal denoiser
  does not depend on t (RADD; LLaDA FAQ), and MDLM reports no gain from time conditioning.

The mask token is an ordinary vocabulary entry; which id it is lives in the manifest and is
handled by ``training.diffusion``, not here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # hidden width of the SwiGLU MLP
    max_seq_len: int
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes. Dimensions only: vocab_size and max_seq_len come from the data. The parameter
# counts in the comments assume a ~50k vocabulary with tied embeddings (a 4k demo vocabulary
# makes them smaller). SwiGLU widths are ~8/3 * d_model rounded up to a multiple of 64, which
# keeps the MLP's parameter count equal to a 4 * d_model GELU MLP.
PRESETS: dict[str, dict] = {
    "test": dict(d_model=64, n_layers=2, n_heads=4, d_ff=192),  # unit tests: ~0.1M + embeddings
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=384),  # CPU demo / proxy models: ~0.8M + emb.
    "small": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048),  # ~125M (GPT-2 small / MDLM small)
    "medium": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816),  # ~360M
    "large": dict(d_model=2048, n_layers=18, n_heads=16, d_ff=5632),  # ~1.0B
}


def build_model_args(model_cfg, vocab_size: int, max_seq_len: int) -> ModelArgs:
    """ModelArgs from an ``infra.config.ModelConfig``: the preset, then every field the config sets."""
    if model_cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {model_cfg.preset!r}; choose one of {sorted(PRESETS)}")
    dims = dict(PRESETS[model_cfg.preset])
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "tie_embeddings", "dropout"):
        value = getattr(model_cfg, name, None)
        if value is not None:
            dims[name] = value
    return ModelArgs(vocab_size=vocab_size, max_seq_len=max_seq_len, **dims)


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even under bf16: the mean of squares loses too much in 8 mantissa bits.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2] for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :d/2], x[..., d/2:]) of x [B, H, L, d] by position-dependent angles.

    Rotary scores depend only on the distance between two positions, so a document packed at
    offset 100 gets the same attention as the same document at offset 0: no per-document
    position reset is needed when packing.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[None, None], sin[None, None]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, L, L], True where query i may attend to key j.

    i attends to j iff both belong to the same document (same non-negative segment id). Padding
    (segment id -1) attends only to itself: every query row keeps at least one True entry, so
    softmax never sees an all -inf row (which would give NaN), and no real token looks at a pad.
    """
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids >= 0)[:, :, None]
    L = segment_ids.shape[1]
    diagonal = torch.eye(L, dtype=torch.bool, device=segment_ids.device)[None]
    return ((same_doc & real) | diagonal)[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.d_model // args.n_heads
        self.qkv = nn.Linear(args.d_model, 3 * args.d_model, bias=False)
        self.out = nn.Linear(args.d_model, args.d_model, bias=False)
        self.dropout = args.dropout

    def forward(self, x, cos, sin, attn_mask):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=False,  # bidirectional: the whole point
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.up = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.down = nn.Linear(args.d_ff, args.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.d_model)
        self.mlp = SwiGLU(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, attn_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# --------------------------------------------------------------------------- the model


class MaskedDiffusionTransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model)
        # Tied embeddings reuse tok_embeddings.weight in forward(), so no second parameter (and
        # no duplicate entry in state_dict) exists for the output projection.
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.d_model, args.vocab_size, bias=False)
        # Rotary tables are plain attributes, not buffers: model.bfloat16() (which DeepSpeed calls
        # for bf16 training) would round buffers to bf16, and angles need float32 precision.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.apply(self._init_weights)
        # GPT-2 scaling: each residual branch adds to the stream, so shrink the projections that
        # write into it by 1/sqrt(2 * n_layers) to keep the stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # token_terms may pass output_mask: only the masked positions' logits are ever scored.
    supports_output_mask = True

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                output_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] long, segment_ids [B, L] long (None: one document per row) -> logits [B, L, V] float32.

        With ``output_mask`` [B, L] bool the result is the logits of the selected positions only,
        [M, V] in row-major order: the vocabulary projection (the largest matmul of a small
        model) and its backward then run on the ~half of the tokens the loss scores.
        """
        B, L = input_ids.shape
        if L > self.args.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.args.max_seq_len}")
        attn_mask = None if segment_ids is None else segment_attention_mask(segment_ids)
        cos, sin = self._rope_for(input_ids.device)
        cos, sin = cos[:L], sin[:L]
        x = self.drop(self.tok_embeddings(input_ids))
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        x = self.norm(x)
        if output_mask is not None:
            x = x[output_mask]
        weight = self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight
        # The output projection runs in float32 even under bf16: logits rounded to bf16 carry
        # ~0.4% relative error, which shows up directly in the NELBO (MDLM's bf16 head, see notes).
        return F.linear(x.float(), weight.float())

    def _rope_for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._rope:
            cos, sin = rope_tables(self.args.d_model // self.args.n_heads, self.args.max_seq_len, self.args.rope_theta)
            self._rope[device] = (cos.to(device), sin.to(device))
        return self._rope[device]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n
