"""Learning-rate schedules, stepped once per optimiser update.

Convention: steps are 1-based; the update number ``k`` uses ``lr_at(k)``. The schedule sets the
optimiser's lr for update 1 when built and for update ``k + 1`` on its ``k``-th ``step()``.
Its state is ``{"kind", "last_step"}`` (plain ints/str, checkpoint-safe).
"""
from __future__ import annotations

import math

import torch


def noam_lr(step: int, *, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """ORT's (and "Attention is all you need"'s) rate:
    ``factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``, ``step >= 1``."""
    step = max(int(step), 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def warmup_lr(step: int, *, lr: float, warmup: int) -> float:
    """``lr * min(1, step / warmup)`` (``lr`` throughout when ``warmup`` is 0)."""
    if warmup <= 0:
        return lr
    return lr * min(1.0, max(int(step), 1) / warmup)


class LRSchedule:
    """Sets every param group's lr from ``kind`` ("noam" or "warmup") and the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, *, warmup: int, d_model: int = 512,
                 factor: float = 1.0, lr: float = 1e-3):
        if kind not in ("noam", "warmup"):
            raise ValueError(f"schedule kind must be 'noam' or 'warmup', got {kind!r}")
        self.optimizer, self.kind = optimizer, kind
        self.warmup, self.d_model, self.factor, self.lr = warmup, d_model, factor, lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.kind == "noam":
            return noam_lr(step, d_model=self.d_model, warmup=self.warmup, factor=self.factor)
        return warmup_lr(step, lr=self.lr, warmup=self.warmup)

    def _apply(self) -> None:
        value = self.lr_at(self.last_step + 1)
        if not math.isfinite(value):
            raise ValueError(f"learning rate {value} at step {self.last_step + 1}")
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def get_last_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"the saved schedule is {state.get('kind')!r}, this run uses {self.kind!r}")
        self.last_step = int(state["last_step"])
        self._apply()
