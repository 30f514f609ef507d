"""Learning-rate schedules, stepped once per optimiser update.

Convention: steps are 1-based; the update number ``k`` uses ``lr_at(k)``. The schedule sets the
optimiser's lr for update 1 when built and for update ``k + 1`` on its ``k``-th ``step()``.
Its state is ``{"kind", "last_step", "decay", "total"}`` (plain ints/str, checkpoint-safe; a state
saved before decays existed has no ``decay`` and reads as ``"none"``).

Decays (the ``"warmup"`` kind only): ``"none"`` keeps ``lr`` after the warm-up (a run without an
end: the rate never falls); ``"cosine"`` and ``"linear"`` fall from ``lr`` at the end of the
warm-up to 0 at step ``total`` (:func:`decayed_lr`), so a run ends where it was meant to.
"""
from __future__ import annotations

import math

import torch
from geocap.errors import UsageError


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


DECAYS = ("none", "cosine", "linear")


def decayed_lr(step: int, *, lr: float, warmup: int, total: int, decay: str) -> float:
    """:func:`warmup_lr` up to ``warmup``, then by ``decay``: ``"none"`` ``lr``; with
    ``p = (step - warmup) / (total - warmup)`` clipped to [0, 1], ``"cosine"``
    ``lr * (1 + cos(pi p)) / 2`` and ``"linear"`` ``lr * (1 - p)``: ``lr`` at the end of the
    warm-up, 0 at step ``total`` (and after it). ``total > warmup`` for a decay."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    step = max(int(step), 1)
    if decay == "none" or step <= warmup:
        return warmup_lr(step, lr=lr, warmup=warmup)
    if total <= warmup:
        raise ValueError(f"a {decay} decay needs total steps ({total}) > warmup ({warmup})")
    p = min(1.0, (step - warmup) / (total - warmup))
    return lr * (0.5 * (1.0 + math.cos(math.pi * p)) if decay == "cosine" else 1.0 - p)


class LRSchedule:
    """Sets every param group's lr from ``kind`` ("noam" or "warmup") and the step count; the
    "warmup" kind then decays by ``decay`` (module doc) to 0 at step ``total``."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, *, warmup: int, d_model: int = 512,
                 factor: float = 1.0, lr: float = 1e-3, decay: str = "none", total: int = 0):
        if kind not in ("noam", "warmup"):
            raise ValueError(f"schedule kind must be 'noam' or 'warmup', got {kind!r}")
        if decay not in DECAYS:
            raise ValueError(f"schedule decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if kind == "noam" and decay != "none":
            raise ValueError(f"the noam schedule has its own decay; decay must be 'none', got {decay!r}")
        if decay != "none" and total <= warmup:
            raise ValueError(f"a {decay} decay needs total steps ({total}) > warmup ({warmup})")
        self.optimizer, self.kind, self.decay, self.total = optimizer, kind, decay, int(total)
        self.warmup, self.d_model, self.factor, self.lr = warmup, d_model, factor, lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.kind == "noam":
            return noam_lr(step, d_model=self.d_model, warmup=self.warmup, factor=self.factor)
        return decayed_lr(step, lr=self.lr, warmup=self.warmup, total=self.total, decay=self.decay)

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
        return {"kind": self.kind, "last_step": self.last_step, "decay": self.decay, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved schedule: same kind and decay (ValueError naming both otherwise); the
        ``total`` is this run's (a resume that raises the steps stretches the decay from here on)."""
        if state.get("kind") != self.kind:
            raise UsageError(f"the saved schedule is {state.get('kind')!r}, this run uses {self.kind!r}")
        if state.get("decay", "none") != self.decay:
            raise UsageError(f"the saved schedule decays {state.get('decay', 'none')!r}, this run {self.decay!r}")
        self.last_step = int(state["last_step"])
        self._apply()
