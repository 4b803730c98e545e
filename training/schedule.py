"""Learning-rate schedules as pure functions of the optimizer step.

The trainer sets every step's LR itself (``lr = cfg.lr * lr_multiplier(step, ...) * lr_scale``)
instead of handing DeepSpeed a torch LR scheduler: DeepSpeed does not step its scheduler on a
step it skipped (a non-finite gradient), so a scheduler's own counter would fall behind the
trainer's step count; and a pure function of (step, config) resumes exactly with nothing to save.

``step`` counts optimizer steps already taken, so step 0 (the first update) uses 1/warmup.

    cosine   linear warmup to 1, then cosine decay to min_lr_ratio at total_steps
    wsd      warmup-stable-decay: linear warmup to 1, constant 1, then a linear decay to
             min_lr_ratio over the last ``decay_fraction`` of the steps (MiniCPM; Hägele et al.
             2024). The stable phase lets a run be extended or branched into a cooldown at any
             point, which a cosine tied to total_steps does not.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def cosine_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_fraction: float) -> int:
    """First step of the decay phase (never inside the warmup)."""
    return max(warmup_steps, total_steps - round(decay_fraction * total_steps))


def wsd_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                   decay_fraction: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    start = wsd_decay_start(warmup_steps, total_steps, decay_fraction)
    if step < start:
        return 1.0
    # Like the cosine, the decay reaches min_lr_ratio at total_steps (one past the last update).
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str = "cosine",
                  decay_fraction: float = 0.2) -> float:
    """The LR multiplier of ``schedule`` at ``step`` (see the module docstring)."""
    if schedule == "cosine":
        return cosine_multiplier(step, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "wsd":
        return wsd_multiplier(step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {SCHEDULES}")


def scheduled_lr(cfg, step: int) -> float:
    """The LR of the update at ``step`` for a TrainConfig (before any non-finite back-off)."""
    return cfg.lr * lr_multiplier(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.schedule,
                                  cfg.decay_fraction)


def set_lr(optimizer, lr: float) -> None:
    """Set ``lr`` on every param group (DeepSpeed's ZeRO wrappers step these same group dicts)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
