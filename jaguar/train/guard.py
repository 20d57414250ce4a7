"""The non-finite gradient guard: an optimizer step whose gradient norm is NaN or inf is skipped, on
every rank alike, without touching the weights, the optimizer state, the EMA or the schedule; too
many skipped steps in a row stop the run with advice that fits its precision.

Why the gradient norm and not the loss: a finite loss can still back-propagate a NaN (a 0/0 in a
layer's backward), and one such step applied turns every weight into NaN. The norm is computed once
per update, after the gradients are synchronised, so DDP ranks see the same value; the decision is
all-reduced anyway (one scalar) so that gradients outside DDP cannot split the ranks."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from accelerate import Accelerator

log = logging.getLogger("jaguar.train")


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason the user must act on (e.g. non-finite gradients)."""


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together (fp32 scalar; NaN/inf when any gradient is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()


def all_ranks_finite(accelerator: Accelerator, norm: torch.Tensor) -> bool:
    """True when the gradient norm is finite on every rank (the same answer on every rank)."""
    finite = torch.isfinite(norm.detach()).float().to(accelerator.device).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


class NonFiniteGuard:
    """Counts skipped updates: `skipped` over the run, `streak` in a row (reset by a good update).

    `update_done(applied, ...)` raises TrainingStopped once more than `max_in_a_row` updates in a row
    were skipped (train.max_bad_steps)."""

    def __init__(self, max_in_a_row: int, precision: str, deepspeed: bool) -> None:
        self.max_in_a_row = max_in_a_row
        self.precision = precision
        self.deepspeed = deepspeed
        self.skipped = 0
        self.streak = 0
        self.streak_bad_loss = 0  # of the streak, the updates whose loss was already non-finite

    def state_dict(self) -> dict:
        return {"bad_steps": self.skipped, "bad_streak": self.streak, "bad_streak_loss": self.streak_bad_loss}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("bad_steps", 0))
        self.streak = int(state.get("bad_streak", 0))
        self.streak_bad_loss = int(state.get("bad_streak_loss", 0))

    def update_done(self, applied: bool, step: int, loss_finite: bool, grad_norm: Optional[float],
                    loss_scale: Optional[float]) -> None:
        """Record the outcome of update `step` (0-based); raise TrainingStopped after too many skips."""
        if applied:
            self.streak = self.streak_bad_loss = 0
            return
        self.skipped += 1
        self.streak += 1
        self.streak_bad_loss += 0 if loss_finite else 1
        cause = "loss" if not loss_finite else f"gradient (norm {grad_norm})"
        log.warning("step %d: non-finite %s, update skipped (%d in a row, %d in all)", step + 1, cause,
                    self.streak, self.skipped)
        if self.streak > self.max_in_a_row:
            raise TrainingStopped(self._stop_message(loss_scale))

    def _stop_message(self, loss_scale: Optional[float]) -> str:
        what = (f"{self.streak} optimizer updates in a row had a non-finite gradient "
                f"({self.streak_bad_loss} of them already a non-finite loss; train.max_bad_steps="
                f"{self.max_in_a_row}), so training stopped; the last good checkpoint is intact. ")
        where = "DeepSpeed " if self.deepspeed else ""
        if self.precision == "fp16":
            scale = f" (the loss scale is down to {loss_scale:g})" if loss_scale is not None else ""
            advice = (f"Under {where}fp16 the gradients overflow even at a reduced loss scale{scale}: "
                      f"use train.precision=bf16 (or fp32), or lower optim.lr.")
        elif self.precision == "bf16":
            advice = (f"Under {where}bf16 (fp32 range, so not an overflow of the format): lower optim.lr, "
                      f"set optim.grad_clip (e.g. 1.0), or check the data; train.precision=fp32 tells "
                      f"whether bf16's coarse rounding is to blame.")
        else:
            advice = ("The run is already fp32, so the model or the data produce the NaN/inf: lower "
                      "optim.lr, set optim.grad_clip (e.g. 1.0), and check the inputs (an image of "
                      "constant value, an extreme setting such as model.head_scale).")
        return what + advice

