"""Whether a training run has converged, judged from its teacher-forced validation loss against the
noise of that curve.

Input: the run's validation curve ``[[step, loss, loss_se], ...]`` (``loss_se`` the standard error
over images of each validation, :func:`geocap.train.loop.validation_loss`; may be None) and the
run's ``steps``.

Criterion (:func:`convergence`): fit a straight line (least squares) to the validations of the
last fifth of training (steps above 80 % of the last validated step; at least
:data:`MIN_POINTS`). Its slope's 95 % interval is Student's t with n - 2 degrees of freedom on the
residual scatter, so it carries the curve's own noise (measured, not assumed): the validation noise
between points and the training noise between checkpoints alike. The *possible further gain* is
the steepest fall the interval allows, ``max(0, -slope_lo)``, projected over one more fifth of
training (``0.2 x steps``): what another fifth at the plausible rate could still take off the loss.
The run has **converged** when that projected gain is under ``tolerance`` (relative: a fraction of
the fitted loss at the last step, default 1 %). A curve still falling beyond its noise fails; a
flat or rising one (over-fitting) passes; too few points give ``converged`` None (undecided).

Caveat (stated in the report): under a schedule that decays the learning rate to 0, the last fifth
is trained at a small rate, so a flat last fifth says the run ended where its schedule meant it
to, not that more steps at a higher rate would gain nothing; the curves are shown for that reason.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["LAST_FRACTION", "MIN_POINTS", "convergence", "loss_curve"]

LAST_FRACTION = 0.2     # the last fifth of training
MIN_POINTS = 4          # validations in it needed for a slope with an interval (2 degrees of freedom)


def _undecided(reason: str, **extra) -> dict:
    return {"converged": None, "reason": reason, "criterion": "loss", **extra}


def convergence(curve: Sequence, steps: int, *, tolerance: float = 0.01) -> dict:
    """The criterion of the module doc on ``curve`` (``[[step, loss, loss_se or None], ...]`` in
    step order) of a run of ``steps`` steps. Returns ``{"converged": bool or None, "criterion":
    "loss", "points", "slope", "slope_ci95", "projected_gain", "relative_gain", "tolerance",
    "final_loss", "residual_sd", "validation_se", "horizon", "reason"}``: ``slope`` per step,
    ``projected_gain`` in loss units, ``relative_gain`` over the fitted final loss,
    ``residual_sd`` the scatter about the line, ``validation_se`` the mean of the points' own
    standard errors (how much of the scatter is validation noise). ValueError for a malformed
    curve or a non-positive ``steps``/``tolerance``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"convergence: steps must be a positive int, got {steps!r}")
    if not tolerance > 0:
        raise ValueError(f"convergence: tolerance must be > 0, got {tolerance!r}")
    try:
        points = [(int(p[0]), float(p[1]), None if len(p) < 3 or p[2] is None else float(p[2])) for p in curve]
    except (TypeError, ValueError, IndexError):
        raise ValueError("convergence: the curve must hold [step, loss, loss_se] entries") from None
    if not points:
        return _undecided("no validation loss recorded", points=0, tolerance=tolerance)
    end = points[-1][0]
    last = [p for p in points if p[0] > (1.0 - LAST_FRACTION) * end]
    if len(last) < MIN_POINTS:
        return _undecided(f"{len(last)} validations in the last fifth (at least {MIN_POINTS} needed)",
                          points=len(last), tolerance=tolerance)
    x = np.array([p[0] for p in last], np.float64)
    y = np.array([p[1] for p in last], np.float64)
    if not np.isfinite(y).all():
        return _undecided("a validation loss is not finite", points=len(last), tolerance=tolerance)
    from .stats import t975

    n = len(x)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    fitted = y.mean() + slope * xc
    residual_sd = float(math.sqrt(((y - fitted) ** 2).sum() / (n - 2)))
    slope_se = residual_sd / math.sqrt(float((xc ** 2).sum()))
    half = t975(n - 2) * slope_se
    lo, hi = slope - half, slope + half
    horizon = LAST_FRACTION * steps
    gain = max(0.0, -lo) * horizon
    final = float(y.mean() + slope * (end - x.mean()))
    relative = gain / final if final > 0 else math.inf
    ses = [p[2] for p in last if p[2] is not None]
    return {"converged": bool(relative < tolerance), "criterion": "loss", "points": n, "slope": slope,
            "slope_ci95": [lo, hi], "projected_gain": gain, "relative_gain": relative, "tolerance": tolerance,
            "final_loss": final, "residual_sd": residual_sd,
            "validation_se": float(np.mean(ses)) if ses else None, "horizon": horizon,
            "reason": (f"one more fifth ({horizon:.0f} steps) at the steepest plausible slope would lower the loss by "
                       f"{100 * relative:.2f} % ({'under' if relative < tolerance else 'not under'} "
                       f"{100 * tolerance:g} %)")}


def loss_curve(entries: Sequence[dict]) -> list:
    """``[[step, loss, loss_se], ...]`` of the ``"val"`` entries of a run's metrics.jsonl that hold
    a validation loss, in file order."""
    return [[int(e["step"]), float(e["loss"]), None if e.get("loss_se") is None else float(e["loss_se"])]
            for e in entries if e.get("kind") == "val" and e.get("loss") is not None]

