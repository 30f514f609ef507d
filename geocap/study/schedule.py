"""Convergence judged by the schedule's length: what doubling the training buys.

The last-fifth criterion (:mod:`.convergence`) cannot see an unfinished model when the learning
rate decays to 0: the last fifth is trained at a small rate, so its curve is flat whether or not a
longer schedule would go lower. This criterion asks the question directly. A model of ``steps``
steps is compared with a *short run*: the same variant, seed, data, initialisation and options,
with a schedule of ``short_steps`` (half as many; the same warm-up, decayed to 0 at its own end).

Measure (:func:`measure`): the teacher-forced validation loss (:func:`geocap.train.validation_loss`)
of both final models on the same validation images, kept per image so the comparison is paired.
Criterion (:func:`schedule_gain`): the *gain* of the full schedule, ``(L_short - L_full) / L_full``
(relative; positive when the longer schedule is better), with a 95 % interval over images (the
ratio estimator's standard error of the per-image differences, Student's t). The model **has
converged** when the interval's upper end is under ``tolerance`` (default 2 %: doubling the
training lowered the loss by less than that); it **has not** when the lower end is at or above it;
otherwise the check is undecided. Under diminishing returns the next doubling would gain less still.

The interval carries the validation images' noise, not the training run's: two runs of different
schedules are one draw each of their training noise. The report shows, beside it, the spread of the
final validation loss over the study's seeds (the size of that training noise).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["CHECK_FILE", "DEFAULT_TOLERANCE", "measure", "schedule_gain", "seed_spread", "short_steps"]

CHECK_FILE = "schedule_check.json"
DEFAULT_TOLERANCE = 0.02


def short_steps(steps: int) -> int:
    """The short run's steps for a model of ``steps``: half, rounded down."""
    return steps // 2


def measure(short_checkpoint: str, checkpoint: str, data: str, *, images: int, split: str = "val",
            batch_size: int = 50) -> dict:
    """The per-image validation losses of the two final models (paths of their checkpoints) on the
    first ``images`` images of ``split`` of the study data folder ``data`` (its features.h5 and caps/).
    Returns ``{"images", "split", "tokens": [per image], "short_sums": [per image], "sums": [per
    image]}``: each image's summed token losses under the short and the full model."""
    import torch

    from geocap.checkpoint import load_checkpoint
    from geocap.data.dataset import CaptionDataset
    from geocap.train import validation_loss

    dataset = CaptionDataset(os.path.join(data, "features.h5"), os.path.join(data, "caps"), split, per_image=True,
                             captions_per_image="all")
    got = {}
    for name, path in (("short", short_checkpoint), ("full", checkpoint)):
        model = load_checkpoint(path, map_location="cpu").build_model(torch.device("cpu"))
        got[name] = validation_loss(model, dataset, images=images, batch_size=batch_size, per_image=True)
    if not torch.equal(got["short"]["image_tokens"], got["full"]["image_tokens"]):
        raise ValueError("schedule check: the two models were scored on different validation tokens")
    return {"images": got["full"]["images"], "split": split, "tokens": got["full"]["image_tokens"].tolist(),
            "short_sums": got["short"]["image_sums"].tolist(), "sums": got["full"]["image_sums"].tolist()}


def schedule_gain(record: dict, *, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The criterion of the module doc on ``record`` (:func:`measure`'s dict, with ``short_steps``
    and ``steps``). Returns ``{"converged": bool or None, "criterion": "schedule", "short_steps",
    "steps", "short_loss", "loss", "gain", "gain_ci95", "tolerance", "images", "reason"}`` (``gain``
    and its interval relative to the full model's loss). ValueError naming what is malformed."""
    if not tolerance > 0:
        raise ValueError(f"schedule check: tolerance must be > 0, got {tolerance!r}")
    try:
        tokens = np.asarray(record["tokens"], np.float64)
        short = np.asarray(record["short_sums"], np.float64)
        full = np.asarray(record["sums"], np.float64)
        steps, short_steps_ = int(record["steps"]), int(record["short_steps"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("schedule check: the record must hold tokens, short_sums, sums, steps and short_steps") \
            from None
    n = len(tokens)
    if tokens.ndim != 1 or short.shape != (n,) or full.shape != (n,):
        raise ValueError(f"schedule check: tokens, short_sums and sums must be lists of one length "
                         f"(got {tokens.shape}, {short.shape}, {full.shape})")
    if n < 2:
        return {"converged": None, "criterion": "schedule", "images": n, "tolerance": tolerance,
                "reason": f"{n} validation images (at least 2 needed for an interval)"}
    if not (np.isfinite(tokens).all() and np.isfinite(short).all() and np.isfinite(full).all()) or \
            (tokens <= 0).any():
        raise ValueError("schedule check: per-image losses must be finite and every image must have tokens")
    from .stats import t975

    loss, short_loss = full.sum() / tokens.sum(), short.sum() / tokens.sum()
    delta = short - full
    d = delta.sum() / tokens.sum()
    se = math.sqrt(((delta - d * tokens) ** 2).sum() / (n * (n - 1))) / tokens.mean()
    half = t975(n - 1) * se
    gain, lo, hi = d / loss, (d - half) / loss, (d + half) / loss
    converged: Optional[bool] = True if hi < tolerance else (False if lo >= tolerance else None)
    pct = f"{100 * gain:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    reason = (f"doubling the schedule ({short_steps_} -> {steps} steps) lowered the validation loss by {pct}: "
              + ("under" if converged else "not under" if converged is False else "undecided against")
              + f" {100 * tolerance:g} %")
    return {"converged": converged, "criterion": "schedule", "short_steps": short_steps_, "steps": steps,
            "short_loss": float(short_loss), "loss": float(loss), "gain": float(gain),
            "gain_ci95": [float(lo), float(hi)], "tolerance": tolerance, "images": n, "reason": reason}


def seed_spread(losses: Sequence[float]) -> Optional[float]:
    """The standard deviation over seeds of the final validation losses (None for fewer than 2):
    the size of the training noise the schedule check's interval does not carry."""
    values = [float(x) for x in losses if x is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None
