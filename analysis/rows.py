"""Correlations *within attention rows*: the controlled measures' building block.

A query's attention row is compared with a property of its keys (distance, same cluster) inside
that row only, so that what differs between rows and images (their number of keys, hence the
level 1/N of their weights) never mixes into the correlation, as it does when pairs of all images
are pooled. Plain: Spearman's rho (:func:`rank_correlation`). Partial: the log weights (the
logits up to a constant) and the ranks of the property, each with a third variable (feature
similarity) regressed out linearly (:func:`partial_attention_correlation`), so attention that
follows similarity alone correlates 0 with distance even where distance and similarity are linked.

Arrays hold rows along the last axis: ``[..., K]`` (K keys); ties get average ranks.
"""
from __future__ import annotations

import numpy as np

MIN_ROW_KEYS = 3          # a row needs at least this many keys for its rank correlation
DEGENERATE = 1e-9         # a residual with less than this share of its variable's variance is 0
WEIGHT_FLOOR = 2.0 ** -24  # float16's smallest step: stored weights below it are 0


def row_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1..K, ties averaged) of ``values [..., K]`` along the last axis, float64: one
    sort of every row at once, each run of equal values given the mean of its positions (as
    :func:`scipy.stats.rankdata`, whose per-row loop was the analyses' largest cost)."""
    values = np.asarray(values, dtype=np.float64)
    k = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    position = np.broadcast_to(np.arange(k), values.shape)
    differs = ordered[..., 1:] != ordered[..., :-1]
    first = np.concatenate([np.ones(values.shape[:-1] + (1,), bool), differs], axis=-1)   # a run starts
    last = np.concatenate([differs, np.ones(values.shape[:-1] + (1,), bool)], axis=-1)     # a run ends
    start = np.maximum.accumulate(np.where(first, position, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, position, k - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(values.shape)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=-1)
    return ranks


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=-1, keepdims=True)


def residualise(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y`` minus its least-squares line on ``x`` (with intercept), per row of the last axis;
    where ``x`` is constant in a row, ``y`` centred. Shapes broadcast: ``y [..., K]``, ``x [..., K]``."""
    yc, xc = _centred(y), _centred(x)
    xx = (xc * xc).sum(axis=-1, keepdims=True)
    slope = np.divide((yc * xc).sum(axis=-1, keepdims=True), xx, out=np.zeros(np.broadcast_shapes(
        yc.shape[:-1], xc.shape[:-1]) + (1,)), where=xx > 0)
    return yc - slope * xc


def row_correlation(x: np.ndarray, y: np.ndarray, scale_x=None, scale_y=None) -> tuple[np.ndarray, np.ndarray]:
    """``(r [...], defined [...] bool)``: Pearson's correlation of ``x`` and ``y`` along the last axis
    (broadcast), 0 where undefined. A row is undefined when either variable has no variance, or
    (residuals) less than :data:`DEGENERATE` of the variance ``scale_x`` / ``scale_y`` [...] that its
    variable had before the residualisation."""
    xc, yc = _centred(x), _centred(y)
    xx, yy = (xc * xc).sum(axis=-1), (yc * yc).sum(axis=-1)
    xy = (xc * yc).sum(axis=-1)
    xx, yy, xy = np.broadcast_arrays(xx, yy, xy)
    defined = (xx > DEGENERATE * (1.0 if scale_x is None else scale_x)) & \
              (yy > DEGENERATE * (1.0 if scale_y is None else scale_y))
    r = np.divide(xy, np.sqrt(xx * yy), out=np.zeros(xy.shape), where=defined)
    return np.clip(r, -1.0, 1.0), defined


def _variance(x: np.ndarray) -> np.ndarray:
    xc = _centred(x)
    return (xc * xc).sum(axis=-1)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho of ``a [..., K]`` and ``b [..., K]`` within each row (broadcast): ``(r, defined)``."""
    return row_correlation(row_ranks(a), row_ranks(b))


def log_weights(weights: np.ndarray) -> np.ndarray:
    """``log`` of attention weights, float64, with weights below :data:`WEIGHT_FLOOR` (float16's
    smallest step: a stored map's zeros) raised to it. Within a row these are the attention logits
    up to a constant (softmax)."""
    return np.log(np.maximum(np.asarray(weights, dtype=np.float64), WEIGHT_FLOOR))


def partial_attention_correlation(weights: np.ndarray, b: np.ndarray, given: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray]:
    """The partial correlation, within each row, of attention ``weights`` with ``b`` given ``given``
    (feature similarity): Pearson's correlation of the log weights and of the ranks of ``b``, each
    with ``given`` regressed out (least squares with intercept).

    Why log weights and not ranks: within a row the log weights are the logits up to a constant,
    so for attention whose logits are linear in similarity (dot-product attention on the features)
    the residual is exactly what similarity does not explain, and the measure's expectation is 0.
    A rank-scale control leaves the softmax's curvature in the residual: on planted
    similarity-only attention it kept -0.015 (distance) and +0.030 (same cluster) of spurious
    correlation, the log-scale control +0.004 and -0.005 (8 seeds x 160 scenes; tests/
    test_analysis_controls.py). ``(r, defined)``: undefined where the weights or ``b`` are
    constant, or (almost) fully explained by ``given`` (nothing left to correlate)."""
    la = log_weights(weights)
    shape = np.broadcast_shapes(la.shape, np.shape(b), np.shape(given))
    given = np.broadcast_to(np.asarray(given, dtype=np.float64), shape)
    return _partial(residualise(la, given), _variance(la), b, given)


def _partial(log_residual: np.ndarray, log_variance: np.ndarray, b: np.ndarray, given: np.ndarray):
    """:func:`partial_attention_correlation` from the log weights' residual and variance."""
    rb = row_ranks(b)
    return row_correlation(log_residual, residualise(rb, given), log_variance, _variance(rb))


class AttentionRows:
    """One image's attention rows prepared once for every correlation the analyses take of them:
    each query of ``queries [M]`` over the other M - 1 (``keys [M, M - 1]``), in the head-mean map
    ``head_mean [L, N, N]``; with ``given [N, N]`` (feature cosine) for partial correlations
    (:func:`partial_attention_correlation`), else for Spearman's rho (:func:`rank_correlation`).
    ``usable``: whether the rows have at least :data:`MIN_ROW_KEYS` keys."""

    def __init__(self, head_mean: np.ndarray, queries: np.ndarray, given: np.ndarray | None = None):
        self.queries, self.keys = queries, other_keys(queries)
        self.usable = self.keys.shape[1] >= MIN_ROW_KEYS
        if not self.usable:
            return
        weights = head_mean[:, queries[:, None], self.keys]                   # [L, M, K]
        if given is None:
            self.given, self.ranks = None, row_ranks(weights)
        else:
            self.given = self.pick(given)[None]
            la = log_weights(weights)
            self.log_residual, self.log_variance = residualise(la, self.given), _variance(la)

    def pick(self, values: np.ndarray) -> np.ndarray:
        """``[M, K]``: a pair measure ``values [N, N]`` at each row's query and keys."""
        return values[self.queries[:, None], self.keys]

    def correlation(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(r [L, M], defined [L, M])`` of attention with the pair measure ``values [N, N]``."""
        b = self.pick(values)[None]
        if self.given is None:
            return row_correlation(self.ranks, row_ranks(b))
        return _partial(self.log_residual, self.log_variance, b, self.given)


def other_keys(queries: np.ndarray) -> np.ndarray:
    """``[M, M - 1]``: for each of the M object indices ``queries``, the other M - 1 (in order)."""
    m = len(queries)
    if m < 2:
        return np.zeros((m, 0), dtype=np.int64)
    keep = ~np.eye(m, dtype=bool)
    return np.broadcast_to(queries, (m, m))[keep].reshape(m, m - 1)


def mean_over_rows(r: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum of the defined rows' r [L], number of defined rows [L])`` of ``r, defined [L, M]``:
    what :class:`~.uncertainty.ImageMeans` takes for an image's mean over its rows."""
    return np.where(defined, r, 0.0).sum(axis=-1), defined.sum(axis=-1).astype(np.float64)
