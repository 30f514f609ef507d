"""Features: non-negative vectors whose cosine similarities follow the categories and clusters.

An object of category k in cluster c gets ``relu(z + bias)`` with, per dimension,
``z = a u_c + b v_k + s e``: u_c, v_k fixed prototype vectors (mean 0 and mean square 1 over
the D entries; exactly orthogonal to each other and to the all-ones vector when D > 31), e fresh
standard normal noise per object, a^2 + b^2 + s^2 = 1. Across the D dimensions z is then a
standard normal, and the z of two objects correlate by rho = a^2 + b^2 (same category), a^2
(same cluster, other category) or 0 (different clusters); their expected cosine similarity is
``relu_cosine(rho, bias)`` = E[relu(X+bias) relu(Y+bias)] / E[relu(X+bias)^2] for standard
normals X, Y of correlation rho (random high-dimensional vectors are near-orthogonal, so the
mean over D dimensions is this expectation up to O(1/sqrt(D))).

Calibration (``feature_model``): ``bias`` solves relu_cosine(0, bias) = 0.31 (closed form in
bias, solved by bisection), then a^2 and a^2 + b^2 solve relu_cosine = 0.50 and 0.60 (a
one-dimensional integral, by the trapezoid rule and bisection). 0.50 within a cluster and 0.31
across clusters are the figures of Ilinykh (2022) (the seed study, :mod:`geocap.analysis`); 0.60 for
one category is our choice, a little above, so that categories stay separable. Result: a = 0.584,
b = 0.394, s = 0.710, bias = -0.029; about half the entries are zero, as in ReLU'd detector
features. Measured at D = 2048: 0.600 / 0.500 / 0.310. At D < 32 the prototypes cannot be
orthogonal and the calibration is approximate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

from ..items import ImageFeatures
from .world import CATEGORIES, CLUSTER_OF, CLUSTERS
from geocap.errors import UsageError

SIMILARITY = {"same category": 0.60, "same cluster": 0.50, "different clusters": 0.31}
DEFAULT_FEATURE_DIM = 2048         # the bottom-up detectors' size (see the package docstring)
MIN_FEATURE_DIM = 8
_PROTOTYPES, _NOISE = 3, 4                       # random streams: seeds are (seed, stream)

_erf = np.vectorize(math.erf, otypes=[float])


def _pdf(x):
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)


def _cdf(x):
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def relu_cosine(rho: float, bias: float) -> float:
    """E[relu(X + bias) relu(Y + bias)] / E[relu(X + bias)^2] for standard normals X, Y with
    correlation ``rho``: the expected cosine of two such features over many dimensions.

    The denominator is (1 + bias^2) Phi(bias) + bias phi(bias); at rho = 0 the numerator is
    (bias Phi(bias) + phi(bias))^2; otherwise it is the integral over x > -bias of
    (x + bias) E[relu(Y + bias) | X = x] phi(x), where Y | x ~ N(rho x, 1 - rho^2) and
    E[relu(N(mu, s^2))] = mu Phi(mu / s) + s phi(mu / s), taken by the trapezoid rule.
    """
    second = float((1 + bias * bias) * _cdf(bias) + bias * _pdf(bias))
    if rho >= 1.0:
        return 1.0
    if rho == 0.0:
        return float((bias * _cdf(bias) + _pdf(bias)) ** 2) / second
    x = np.linspace(-bias, -bias + 12.0, 8193)
    s = math.sqrt(1.0 - rho * rho)
    mu = rho * x + bias
    f = (x + bias) * (mu * _cdf(mu / s) + s * _pdf(mu / s)) * _pdf(x)
    integral = (x[1] - x[0]) * (f.sum() - 0.5 * (f[0] + f[-1]))
    return float(integral) / second


def _solve(fn, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with fn(x) = target for an increasing fn, by bisection."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class FeatureModel:
    """``relu(cluster_scale u_c + category_scale v_k + noise_scale e + bias)`` per dimension;
    the scales squared sum to 1."""
    cluster_scale: float
    category_scale: float
    noise_scale: float
    bias: float

    def as_dict(self) -> dict:
        return {"cluster_scale": self.cluster_scale, "category_scale": self.category_scale,
                "noise_scale": self.noise_scale, "bias": self.bias, "targets": dict(SIMILARITY)}


@lru_cache(maxsize=None)
def feature_model() -> FeatureModel:
    """The scales and bias that give the ``SIMILARITY`` cosines (solved once per process, ~0.1 s)."""
    bias = _solve(lambda b: relu_cosine(0.0, b), SIMILARITY["different clusters"], -4.0, 4.0)
    rho_cluster = _solve(lambda r: relu_cosine(r, bias), SIMILARITY["same cluster"], 0.0, 1.0)
    rho_category = _solve(lambda r: relu_cosine(r, bias), SIMILARITY["same category"], 0.0, 1.0)
    return FeatureModel(cluster_scale=math.sqrt(rho_cluster), category_scale=math.sqrt(rho_category - rho_cluster),
                        noise_scale=math.sqrt(1.0 - rho_category), bias=bias)


def check_feature_dim(feature_dim) -> None:
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, (int, np.integer)):
        raise UsageError(f"feature_dim must be an int, got {feature_dim!r}")
    if feature_dim < MIN_FEATURE_DIM:
        raise UsageError(f"feature_dim must be at least {MIN_FEATURE_DIM}, got {feature_dim}")


def prototypes(feature_dim: int, seed: int = 0) -> tuple:
    """(cluster vectors ``[n_clusters, D]``, category vectors ``[n_categories, D]``), float64,
    each with mean 0 and mean square 1 over its D entries; mutually orthogonal (and orthogonal
    to the all-ones vector) when D > n_clusters + n_categories."""
    check_feature_dim(feature_dim)
    k = len(CLUSTERS) + len(CATEGORIES)
    g = np.random.default_rng([seed, _PROTOTYPES]).standard_normal((feature_dim, k))
    if feature_dim > k:
        q, r = np.linalg.qr(np.column_stack([np.ones(feature_dim), g]))
        g = (q * np.sign(np.diag(r)))[:, 1:] * math.sqrt(feature_dim)
    else:
        g = (g - g.mean(axis=0)) / g.std(axis=0)
    return g[:, :len(CLUSTERS)].T.copy(), g[:, len(CLUSTERS):].T.copy()


def category_means(feature_dim: int, seed: int = 0) -> np.ndarray:
    """float32 ``[n_categories, D]``: cluster_scale u_c + category_scale v_k + bias, the
    noise-free part of each category's features before the ReLU."""
    model = feature_model()
    clusters, cats = prototypes(feature_dim, seed)
    return (model.cluster_scale * clusters[CLUSTER_OF] + model.category_scale * cats + model.bias).astype(np.float32)


def object_features(categories: np.ndarray, rng: np.random.Generator, means: np.ndarray) -> np.ndarray:
    """float32 ``[n, D]`` non-negative features of objects of ``categories`` (int ``[n]``),
    given ``means = category_means(D, seed)``; draws n * D normals from ``rng``."""
    z = rng.standard_normal((len(categories), means.shape[1]), dtype=np.float32)
    z *= np.float32(feature_model().noise_scale)
    z += means[categories]
    return np.maximum(z, 0.0, out=z)


def iter_features(images: Sequence, *, seed: int = 0, feature_dim: int = DEFAULT_FEATURE_DIM,
                  block: int = 256) -> Iterator[ImageFeatures]:
    """One :class:`ImageFeatures` per image of ``images`` (``SynthImage``: ``image_id`` and
    ``scene``), in order: features float32 ``[N, D]``, the scene's boxes and size, labels =
    category ids. Generated ``block`` images at a time, so memory stays bounded; the noise is
    drawn in image order, so a prefix of the images gets the same features."""
    check_feature_dim(feature_dim)
    means = category_means(feature_dim, seed)
    rng = np.random.default_rng([seed, _NOISE])
    for lo in range(0, len(images), block):
        chunk = images[lo:lo + block]
        feats = object_features(np.concatenate([im.scene.categories for im in chunk]), rng, means)
        start = 0
        for im in chunk:
            n = len(im.scene.categories)
            yield ImageFeatures(image_id=im.image_id, features=feats[start:start + n], boxes=im.scene.boxes,
                                width=im.scene.width, height=im.scene.height, labels=im.scene.categories)
            start += n


def similarity_by_pair_type(features: np.ndarray, categories: np.ndarray) -> dict:
    """Mean cosine similarity over pairs of distinct objects (rows of ``features`` ``[n, D]``,
    category ids ``[n]``) by pair type: "same category", "same cluster" (two categories of one
    cluster: the 0.50 target), "same cluster, any category" and "different clusters" (NaN when
    there is no such pair). Builds the ``[n, n]`` similarity matrix: keep n to a few thousand."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    cats = np.asarray(categories)
    i, j = np.triu_indices(len(cats), 1)
    sims = (f @ f.T)[i, j]
    same_category = cats[i] == cats[j]
    same_cluster = CLUSTER_OF[cats[i]] == CLUSTER_OF[cats[j]]

    def mean(mask):
        return float(sims[mask].mean()) if mask.any() else float("nan")

    return {"same category": mean(same_category), "same cluster": mean(same_cluster & ~same_category),
            "same cluster, any category": mean(same_cluster), "different clusters": mean(~same_cluster)}
