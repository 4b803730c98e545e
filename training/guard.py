"""The non-finite guard: a step whose loss or gradient is inf/NaN on any rank changes nothing.

How a step is skipped cleanly, per DeepSpeed path (deepspeed 0.19):

* The loss: before the boundary ``engine.step()`` the trainer all-reduces a "this rank's loss
  was not finite" flag, so every rank takes the same decision, and sets ``skip_requested`` on
  the client optimizer, a ``SkippableAdamW``. DeepSpeed's wrappers (ZeRO 1-3, bf16) all end in
  the client optimizer's ``step()``, which then returns without touching a weight, an Adam
  moment or Adam's step count; DeepSpeed clears the gradients afterwards as usual.
* The gradient: ZeRO 1/2/3 and DeepSpeed's bf16/fp16 optimizer wrappers compute the global
  gradient norm before the update and skip the update themselves when it is not finite
  (``engine.was_step_applied()`` turns False; for bf16 under ZeRO 1/2 this is
  ``bf16.check_grad_overflow``, on by default: turning it off turns this check off).
  Stage 0 in fp32 hands the update straight to the client optimizer with no check, so there
  the trainer computes the norm itself (stage 0 gradients are already averaged over ranks, so
  every rank decides alike) and requests the skip.
* ``SkippableAdamW`` reports a skip through ``overflow``, the attribute DeepSpeed's engine reads
  from any optimizer to learn that a step did not happen (``was_step_applied``).

What a skip costs: that step's data (the sampler moves on) and nothing else. ``NonFiniteGuard``
counts skips, multiplies the LR by ``backoff`` for the rest of the run after each, and fails
the run after ``max_consecutive`` skips in a row, since by then the weights or the data, not one
unlucky batch, are the problem. Its state is saved in trainer_state.json so a resumed run keeps
its back-off.
"""

from __future__ import annotations

import logging

import torch

from infra.errors import MaskmixError

log = logging.getLogger(__name__)


class NonFiniteLossError(MaskmixError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` calls do nothing while ``skip_requested`` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_requested = False  # set by the trainer for the coming boundary step
        self.overflow = False  # DeepSpeed's protocol: True means "the last step() changed nothing"

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.skip_requested
        if self.overflow:
            return None
        return super().step(closure)


class NonFiniteGuard:
    def __init__(self, backoff: float, max_consecutive: int):
        self.backoff = backoff
        self.max_consecutive = max_consecutive
        self.lr_scale = 1.0  # product of the back-offs so far
        self.skips = 0  # total skipped steps in the run
        self.consecutive = 0

    def record(self, step: int, skipped: bool, reason: str = "") -> None:
        """Account for the optimizer step just taken (``step`` 1-based); raises after too many skips."""
        if not skipped:
            self.consecutive = 0
            return
        self.skips += 1
        self.consecutive += 1
        self.lr_scale *= self.backoff
        log.warning("step %d: %s; update skipped (%d in a row, %d in the run), LR scale now %.3g",
                    step, reason or "non-finite gradient", self.consecutive, self.skips, self.lr_scale)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"step {step}: {self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
                f"(max_nonfinite_skips={self.max_consecutive}); the run is stopped. Resume from the last "
                "checkpoint with a lower lr, stronger grad_clip or bf16->fp32, or look for broken data"
            )

    def state_dict(self) -> dict:
        return {"lr_scale": self.lr_scale, "skips": self.skips, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.skips = int(state.get("skips", 0))
        self.consecutive = int(state.get("consecutive", 0))
