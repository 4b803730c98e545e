"""Exponential moving average of the weights, correct under every ZeRO stage.

After every APPLIED optimizer step: ema <- decay * ema + (1 - decay) * w, in float32, starting
from the weights the run starts with. A step the non-finite guard skipped leaves the weights
unchanged and is not an EMA step either, so the EMA is a function of the updates alone.

Where the EMA lives. Under ZeRO-3 a rank holds only its partition of each parameter
(``param.ds_tensor``, a flat slice of the parameter padded to world_size equal parts), and
``param.data`` is an empty placeholder outside forward/backward. We keep the EMA on exactly
that partition instead of gathering the parameters with ``deepspeed.zero.GatheredParameters``
at every step: gathering would all-gather the whole model once per step (as much traffic as a
forward pass) and put a full-size EMA on every rank, defeating ZeRO-3's memory saving; the
partition update needs no communication and 1/world_size of the memory. Full EMA weights are
assembled only when someone needs them (evaluation, checkpoint, export), one all-gather per
parameter. Under stages 0-2 every rank holds full parameters and keeps a full EMA; all ranks
compute the same update, so nothing is communicated either.

What is averaged: the module's parameters as the forward pass sees them. In bf16 training
those are bf16 (the fp32 master copy lives inside DeepSpeed's optimizer); the EMA itself is
accumulated in fp32. Checkpoints store the FULL EMA (``ema.safetensors``), so they load for
evaluation without DeepSpeed and resume on any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

EMA_FILE = "ema.safetensors"


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 partition, or the whole parameter."""
    return p.ds_tensor if _is_zero3(p) else p.data


def _partition_group_info(p: torch.nn.Parameter) -> tuple[object, int, int]:
    group = getattr(p, "ds_process_group", None)
    if not dist.is_initialized():
        return group, 0, 1
    return group, dist.get_rank(group=group), dist.get_world_size(group=group)


class WeightEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.params = dict(module.named_parameters())
        if any(_is_zero3(p) and getattr(p.ds_tensor, "final_location", None) == "nvme"
               for p in self.params.values()):
            # Swapped-out partitions are not in memory between steps; reading them needs the swapper.
            raise NotImplementedError("ema_decay with ZeRO-3 parameter offload to NVMe is not supported")
        self.shadow = {name: _local(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        shadow = [self.shadow[n] for n in names]
        current = [_local(self.params[n]).float() for n in names]
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, current, alpha=1.0 - self.decay)

    # ------------------------------------------------------------------ full weights

    @torch.no_grad()
    def full_state_dict(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """{name: full fp32 EMA tensor on CPU}. Collective under ZeRO-3: every rank must call it.

        ``device`` is where the all-gather runs (the accelerator under NCCL; partitions offloaded
        to the CPU are moved there for the gather).
        """
        out = {}
        for name, p in self.params.items():
            part = self.shadow[name]
            if _is_zero3(p):
                group, _, world = _partition_group_info(p)
                if world > 1:
                    part = part.to(device) if device is not None else part
                    chunks = [torch.empty_like(part) for _ in range(world)]
                    dist.all_gather(chunks, part, group=group)
                    part = torch.cat(chunks)
                part = part[:p.ds_numel].view(p.ds_shape)
            out[name] = part.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Set the EMA from full weights (as ``full_state_dict`` returns); each rank keeps its slice."""
        missing = set(self.params) - set(full)
        if missing:
            raise KeyError(f"EMA weights lack {sorted(missing)[:5]}")
        for name, p in self.params.items():
            value = full[name].float().reshape(-1)
            target = self.shadow[name]
            if _is_zero3(p):
                # DeepSpeed's layout (partition_parameters._partition_param): rank r holds
                # flat[r * size : (r + 1) * size] of the parameter, zero-padded at the end.
                _, rank, _ = _partition_group_info(p)
                size = target.numel()
                start = min(rank * size, value.numel())
                piece = value[start:start + size]
                target.zero_()
                target[:piece.numel()].copy_(piece.to(target.device))
            else:
                target.copy_(value.view_as(target).to(target.device))
