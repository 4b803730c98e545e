#!/usr/bin/env python
"""Training throughput: maskmix's model + NELBO loss vs transformers' ModernBERT masked LM, one run.

What is timed, for each model, is one full training step on the same batch: forward, loss,
backward and a torch AdamW step, in plain PyTorch (no DeepSpeed, so neither side pays for an
engine the other does not use), in fp32 on CPU with the same torch.set_num_threads.

* maskmix: MaskedDiffusionTransformer (RMSNorm, RoPE, SwiGLU, SDPA, tied embeddings) called with
  segment_ids as the trainer does (packed documents -> a block-diagonal attention mask; here one
  document per row), diffusion.draw_noise (t stratified over the batch, independent masking)
  and the NELBO loss (1/p(t)-weighted CE divided by L).
* ModernBERT: ModernBertForMaskedLM from a ModernBertConfig of matched size (same d_model,
  layers, heads, GLU width = d_ff, vocabulary, sequence length, tied embeddings, every layer
  global attention, no dropout), called with an all-ones attention_mask and MLM labels on the
  SAME masked positions (so the masking rate is identical: E[p(t)] ~ 0.5).

Steps are interleaved (ours, theirs, ours, ...) after a warm-up of both, so a change in machine
load hits both sides alike; tokens/s is batch * seq_len over the median step time. An extra row,
not in the ratio, times ModernBERT with its non-default sparse_prediction=True (vocabulary
projection and CE on the masked positions only), which is what maskmix does by default.

Where the time goes (torch.profiler, CPU, 2 threads, default full settings; run with --profile):
maskmix's step is ~50% matmuls (the blocks ~25%, the vocabulary projection forward + its two
backward matmuls ~16% although it runs on the masked half of the tokens only), ~14% SDPA forward
and backward, ~9% log-softmax over the vocabulary, ~15% elementwise work (RoPE, RMSNorm, SwiGLU,
the AdamW update), the rest small. The block matmuls cost the same as ModernBERT's (measured by
shape); ModernBERT spends extra on its d x d prediction head, GELU, LayerNorms, RoPE concat and,
by default, on the projection + log-softmax of the unmasked positions too.
Two fixes in maskmix came out of this profile (both kept): the loss used F.cross_entropy on the
[B, V, L] transpose of the logits (a strided log-softmax, ~3x slower on CPU than rows of V),
and it computed the [B, L, V] logits everywhere although only masked positions are scored;
the model now takes ``output_mask`` and projects only those rows. Before them maskmix ran at
4.5k tokens/s vs ModernBERT's 6.7k (ratio 0.66) on these settings; after, 8.6k vs 6.6k (1.3).

GPU section (only where CUDA exists): tokens/s and MFU of the "small" (~125M) preset in bf16
autocast (fp32 master weights, fused AdamW), at seq_len 1024. MFU = training FLOPs per token x
tokens/s / the device's peak dense bf16 FLOP/s (table below, or --gpu-peak-flops); FLOPs per
token = 6 x non-embedding parameters + 6 x vocab x d_model x (masked fraction: the projection
runs on the masked positions only) + 12 x layers x d_model x seq_len (attention), the
PaLM-appendix formula.

    python bench/train_throughput.py            # full CPU comparison (+ GPU section if CUDA)
    python bench/train_throughput.py --quick    # under a minute on 2 cores
Ends with one JSON line: bench, ours_tokens_per_s, modernbert_tokens_per_s, ratio (ours/theirs),
ours_params, modernbert_params (+ gpu_tokens_per_s, gpu_mfu where CUDA exists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.diffusion import draw_noise, nelbo_loss, token_terms  # noqa: E402
from training.model import PRESETS, MaskedDiffusionTransformer, ModelArgs  # noqa: E402

PAD_ID, MASK_ID = 0, 1  # like the pipeline's tokenizer: specials first, ordinary tokens from 4

# Peak dense bf16 tensor FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("V100", 125e12),
]


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


# --------------------------------------------------------------------------- the two training steps


class OursStep:
    name = "maskmix"

    def __init__(self, args: ModelArgs, lr: float, seed: int, device="cpu", autocast_dtype=None, compile_model=False):
        torch.manual_seed(seed)
        self.model = MaskedDiffusionTransformer(args).to(device).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        fused = {"fused": True} if torch.device(device).type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), **fused)
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    def params(self) -> int:
        return self.model.num_parameters()

    def __call__(self, x0: torch.Tensor, segment_ids: torch.Tensor, valid: torch.Tensor, draw=None) -> float:
        draw = draw if draw is not None else draw_noise(valid, self.noise).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            terms = token_terms(self.forward, x0, segment_ids, draw, valid, MASK_ID)
            loss = nelbo_loss(terms, valid)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class ModernBertStep:
    def __init__(self, args: ModelArgs, lr: float, seed: int, attn: str, sparse_prediction: bool = False):
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        config = ModernBertConfig(
            vocab_size=args.vocab_size, hidden_size=args.d_model, num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads, intermediate_size=args.d_ff, max_position_embeddings=args.max_seq_len,
            layer_types=["full_attention"] * args.n_layers,  # maskmix attends globally in every layer
            pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
            attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, tie_word_embeddings=True,
            sparse_prediction=sparse_prediction,  # head + CE on the masked positions only (default False)
        )
        config._attn_implementation = attn
        torch.manual_seed(seed)
        self.model = ModernBertForMaskedLM(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95))
        self.attn = attn

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __call__(self, x0: torch.Tensor, masked: torch.Tensor, attention_mask: torch.Tensor) -> float:
        input_ids = torch.where(masked, torch.full_like(x0, MASK_ID), x0)
        labels = torch.where(masked, x0, torch.full_like(x0, -100))
        loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------- CPU comparison


def model_args(opts) -> ModelArgs:
    dims = dict(PRESETS[opts.preset])
    for key in ("d_model", "n_layers", "n_heads", "d_ff"):
        if getattr(opts, key) is not None:
            dims[key] = getattr(opts, key)
    return ModelArgs(vocab_size=opts.vocab, max_seq_len=opts.seq_len, tie_embeddings=True, **dims)


def cpu_comparison(opts) -> dict:
    torch.set_num_threads(opts.threads)  # the same for both models, set once before either runs
    args = model_args(opts)
    B, L = opts.batch, opts.seq_len
    ours = OursStep(args, opts.lr, opts.seed)
    theirs = ModernBertStep(args, opts.lr, opts.seed, opts.attn)
    # Not in the ratio: ModernBERT's non-default sparse_prediction does what maskmix's loss does
    # by default (vocabulary projection on the masked positions only); shown for a like-for-like row.
    theirs_sparse = None if opts.no_sparse_row else ModernBertStep(args, opts.lr, opts.seed, opts.attn, True)
    data = torch.Generator().manual_seed(opts.seed + 2)
    x0 = torch.randint(4, args.vocab_size, (B, L), generator=data)
    segment_ids = torch.zeros(B, L, dtype=torch.long)
    valid = torch.ones(B, L, dtype=torch.bool)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    print(f"CPU, {opts.threads} threads | d_model {args.d_model}, layers {args.n_layers}, heads {args.n_heads}, "
          f"d_ff {args.d_ff}, vocab {args.vocab_size}, seq_len {L}, batch {B} | ModernBERT attention: {opts.attn}")
    print(f"parameters: maskmix {ours.params():,}  ModernBERT {theirs.params():,}")

    def ours_step():
        draw = draw_noise(valid, ours.noise)
        ours(x0, segment_ids, valid, draw)
        return draw

    def theirs_step(masked):
        theirs(x0, masked, attention_mask)

    times = {"maskmix": [], "modernbert": []} | ({} if theirs_sparse is None else {"modernbert_sparse": []})
    params = {"maskmix": ours.params(), "modernbert": theirs.params(), "modernbert_sparse": theirs.params()}
    for i in range(opts.warmup + opts.steps):
        started = time.perf_counter()
        draw = ours_step()
        t1 = time.perf_counter()
        theirs_step(draw.masked)  # the same positions masked: identical masking rate
        t2 = time.perf_counter()
        if theirs_sparse is not None:
            theirs_sparse(x0, draw.masked, attention_mask)
        t3 = time.perf_counter()
        if i >= opts.warmup:
            times["maskmix"].append(t1 - started)
            times["modernbert"].append(t2 - t1)
            if theirs_sparse is not None:
                times["modernbert_sparse"].append(t3 - t2)

    if opts.profile:
        profile_steps(lambda: ours_step(), lambda: theirs_step(draw_noise(valid, ours.noise).masked))

    tokens = B * L
    result = {}
    print(f"\n{'model':<17} {'params':>12} {'median ms/step':>15} {'mean ms/step':>13} {'tokens/s':>10}")
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = tokens / median
        print(f"{name:<17} {params[name]:>12,} {median * 1e3:>15.1f} {statistics.mean(ts) * 1e3:>13.1f} {tokens / median:>10,.0f}")
    ratio = result["maskmix"] / result["modernbert"]
    print(f"ratio (maskmix / ModernBERT): {ratio:.3f}  ({opts.steps} timed steps each, interleaved)")
    if "modernbert_sparse" in result:
        print(f"(maskmix / ModernBERT with sparse_prediction=True: {result['maskmix'] / result['modernbert_sparse']:.3f})")
    extra = {} if "modernbert_sparse" not in result else {
        "modernbert_sparse_tokens_per_s": round(result["modernbert_sparse"], 1),
        "ratio_vs_sparse": round(result["maskmix"] / result["modernbert_sparse"], 4)}
    return extra | {"ours_tokens_per_s": round(result["maskmix"], 1), "modernbert_tokens_per_s": round(result["modernbert"], 1),
            "ratio": round(ratio, 4), "ours_params": ours.params(), "modernbert_params": theirs.params(),
            "threads": opts.threads, "seq_len": L, "batch": B, "d_model": args.d_model, "n_layers": args.n_layers,
            "vocab": args.vocab_size, "timed_steps": opts.steps, "attn_implementation": opts.attn}


def profile_steps(ours_step, theirs_step) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, step in (("maskmix", ours_step), ("modernbert", theirs_step)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f"\n--- profile: {name} (3 steps, top ops by self CPU time) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# --------------------------------------------------------------------------- GPU section


def gpu_section(opts, device: str = "cuda", preset: str = "small", vocab_size: int = 50304) -> dict:
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # only the fp32 leftovers; the matmuls run in bf16
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    args = ModelArgs(vocab_size=vocab_size, max_seq_len=opts.gpu_seq_len, tie_embeddings=True, **PRESETS[preset])
    B, L = opts.gpu_batch, opts.gpu_seq_len
    step = OursStep(args, opts.lr, opts.seed, device=device, autocast_dtype=torch.bfloat16,
                    compile_model=opts.gpu_compile)
    data = torch.Generator(device=device).manual_seed(opts.seed)
    x0 = torch.randint(4, args.vocab_size, (B, L), generator=data, device=device)
    segment_ids = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    noise = torch.Generator(device=device).manual_seed(opts.seed + 1)  # draws on the GPU: no host round trip
    n_warmup, n_steps = (3, 5) if opts.quick else (5, opts.gpu_steps)
    for _ in range(n_warmup):
        step(x0, segment_ids, valid, draw_noise(valid, noise))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    masked = torch.zeros((), device=device)
    for _ in range(n_steps):
        draw = draw_noise(valid, noise)
        masked += draw.masked.sum()
        step(x0, segment_ids, valid, draw)
    sync()
    masked_fraction = float(masked) / (B * L * n_steps)
    elapsed = time.perf_counter() - started
    tokens_per_s = B * L * n_steps / elapsed
    n_params = step.model.num_parameters()
    # The vocabulary projection only runs on the masked positions (the loss needs no other logits),
    # so it counts at the measured masked fraction (~0.5), not for every token.
    block_params = step.model.num_parameters(exclude_embeddings=True)
    flops_per_token = (6 * block_params + 6 * args.vocab_size * args.d_model * masked_fraction
                       + 12 * args.n_layers * args.d_model * L)
    peak = opts.gpu_peak_flops or peak_flops(name)
    mfu = flops_per_token * tokens_per_s / peak if peak else None
    print(f"\nGPU {name}: {preset} preset ({n_params / 1e6:.1f}M params), bf16 autocast, batch {B} x {L}, "
          f"{'torch.compile' if opts.gpu_compile else 'eager'}, {n_steps} timed steps")
    mfu_text = f"MFU {mfu:.1%} of {peak:.3g} FLOP/s" if mfu is not None else "MFU n/a (unknown device: --gpu-peak-flops)"
    print(f"  {tokens_per_s:,.0f} tokens/s, {flops_per_token / 1e9:.2f} GFLOP/token, {mfu_text}")
    return {"gpu_tokens_per_s": round(tokens_per_s, 1), "gpu_mfu": None if mfu is None else round(mfu, 4),
            "gpu_device": name, "gpu_peak_flops": peak, "gpu_params": n_params, "gpu_batch": B, "gpu_seq_len": L,
            "gpu_compiled": bool(opts.gpu_compile), "gpu_flops_per_token": flops_per_token,
            "gpu_masked_fraction": round(masked_fraction, 4)}


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model and fewer steps: under a minute on 2 cores")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 20, quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default 3, quick 2)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model dimensions (default tiny)")
    p.add_argument("--d-model", dest="d_model", type=int, default=None)
    p.add_argument("--n-layers", dest="n_layers", type=int, default=None)
    p.add_argument("--n-heads", dest="n_heads", type=int, default=None)
    p.add_argument("--d-ff", dest="d_ff", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 8192, quick 4096)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="default 256, quick 128")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16, quick 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: all cores)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="ModernBERT attention implementation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sparse-row", dest="no_sparse_row", action="store_true",
                   help="skip the extra ModernBERT sparse_prediction=True row")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of each model's step")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU section even where CUDA exists")
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-seq-len", type=int, default=1024)
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-compile", action="store_true", help="torch.compile the model in the GPU section")
    p.add_argument("--gpu-peak-flops", type=float, default=None, help="override the device's peak bf16 FLOP/s")
    opts = p.parse_args(argv)
    quick = opts.quick
    defaults = dict(steps=6 if quick else 20, warmup=2 if quick else 3, preset="tiny", vocab=4096 if quick else 8192,
                    seq_len=128 if quick else 256, batch=8 if quick else 16, threads=os.cpu_count() or 1)
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)

    out = {"bench": "train_throughput", "quick": quick}
    out.update(cpu_comparison(opts))
    if torch.cuda.is_available() and not opts.no_gpu:
        out.update(gpu_section(opts))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
