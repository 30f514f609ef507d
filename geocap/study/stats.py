"""Per-image caption statistics of a study's models, the hierarchical paired bootstrap over them,
and the combination of per-seed estimates across seeds.

**Per-image statistics** (:func:`image_statistics`), for one model's captions of the test images,
rows in ascending image id. References and captions are tokenised exactly as ``geocap evaluate``
tokenises them (:func:`geocap.metrics.tokenize_captions`, the references first, the captions with
the backend that ran for them), with the tokenizer the model's ``metrics_test.json`` says ran
(:func:`tokenizer_for`; "python" when it says "java" but Java is absent here):

* ``cider`` ``[n]``: CIDEr-D per image, :func:`geocap.metrics.cider_d` with document frequencies
  from the references of all n test images, as evaluate computes them; their mean is evaluate's
  CIDEr-D. On a resample the same per-image values are averaged (document frequencies stay those
  of the whole test set).
* ``bleu_correct`` / ``bleu_guess`` ``[n, 4]`` (clipped n-gram matches and n-gram totals, n = 1..4),
  ``bleu_testlen`` ``[n]`` (hypothesis length) and ``bleu_reflen`` ``[n]`` (the reference length
  closest to it, ties to the shorter: pycocoevalcap's ``BleuScorer`` option "closest"). BLEU-4 of
  any multiset of images is :func:`bleu4` of their summed statistics, pycocoevalcap's corpus
  formula; on all images it equals ``Bleu(4)``.
* ``rouge`` ``[n]``: ROUGE-L per image (pycocoevalcap's ``Rouge().calc_score``; its corpus value
  is the mean).
* ``relation_uses`` / ``relation_correct`` ``[n, R]``: relation-phrase uses and correct uses per
  relation name of :data:`geocap.data.relations.RELATIONS` (:func:`geocap.metrics.relation_accuracy`
  per image); relation accuracy of a set = correct / uses, undefined (NaN inside arrays, None in
  JSON) without uses. Zero arrays when the data has no ground truth.

**Hierarchical paired bootstrap** (:func:`bootstrap`): each of ``n_boot`` replicates draws the K
seeds with replacement (one draw of seed positions, shared by every variant: seed k of one variant
is paired with seed k of another, the same training seed) and the n test images with replacement
(one draw shared by every seed and every variant, so differences between variants are paired);
each drawn seed's metric is computed on the drawn images from the per-image statistics (no
re-scoring), and the replicate's value is the mean over the drawn seeds (seeds whose metric is
undefined on the drawn images, e.g. no relation uses, are left out of that mean). ``mean`` is the
mean over seeds of each seed's metric on all images; ``ci95`` the 2.5th and 97.5th percentiles of
the replicates. Paired differences ``a - b`` use the same replicates: an interval that excludes 0
is a difference beyond seed and image sampling. With one seed the seed draw has no spread and the
intervals cover image sampling only. A replicate where a metric is undefined is left out of its
percentiles; when more than 5% are, the interval is None (too few uses). Deterministic: numpy's
``default_rng(seed)``.

**Across seeds** (:func:`combine_seeds`), for quantities with one estimate per seed and optionally
a within-seed standard error over images (the attention analyses): the estimate is the mean over
the K seeds; its squared standard error is ``max(s_b^2, mean_k se_k^2) / K``, ``s_b^2`` the
between-seed sample variance (which already contains the image noise; the within-seed term is a
floor so that seeds agreeing by chance do not give a falsely narrow interval); the interval is the
estimate +- the 97.5% quantile of Student's t with K - 1 degrees of freedom times that error. With
one seed the interval is +- 1.96 se_1 (image sampling only), and None without a standard error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from geocap.data.relations import RELATIONS

__all__ = ["METRICS", "RELATION_GROUPS", "ZERO_TOLERANCE", "ImageStats", "bleu4", "bootstrap", "combine_seeds",
           "excludes_zero", "image_statistics", "metric_names", "metric_values", "tokenizer_for"]

METRICS = ("cider_d", "bleu_4", "rouge_l", "relation_accuracy")
#: relations whose directions ORT's |dx|, |dy| embedding cannot tell apart, pooled
RELATION_GROUPS = {"left/right": ("left of", "right of"), "above/below": ("above", "below")}
MAX_UNDEFINED = 0.05      # share of undefined replicates beyond which no interval is given
#: an interval bound within this of 0 does not exclude 0: two models whose captions all equal a reference differ
#: through BLEU's guards only (tiny = 1e-15, small = 1e-9 bias it by up to ~1e-9), never really
ZERO_TOLERANCE = 1e-8
_Z95 = 1.959963984540054


@dataclass
class ImageStats:
    """Per-image statistics of one model's test captions (see the module doc); rows follow
    ``image_ids`` (ascending)."""
    image_ids: np.ndarray        # [n] int64
    cider: np.ndarray            # [n] float64
    bleu_correct: np.ndarray     # [n, 4] int64
    bleu_guess: np.ndarray       # [n, 4] int64
    bleu_testlen: np.ndarray     # [n] int64
    bleu_reflen: np.ndarray      # [n] int64
    rouge: np.ndarray            # [n] float64
    relation_uses: np.ndarray    # [n, R] int64, R = len(RELATIONS)
    relation_correct: np.ndarray  # [n, R] int64
    tokenizer: str               # "java" or "python": the one that ran here

    @property
    def has_relations(self) -> bool:
        return bool(self.relation_uses.any())


def tokenizer_for(metrics: Mapping) -> str:
    """The tokenizer to use for a model whose metrics_test.json is ``metrics``: the one that ran
    there ("java" or "python"), "python" when Java is absent here or the file does not say."""
    from geocap.metrics import java_available

    return "java" if metrics.get("tokenizer") == "java" and java_available() else "python"


def _bleu_statistics(hypothesis: str, references: Sequence[str]) -> tuple[list, list, int, int]:
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    cooked = cook_refs(references, n=4)
    comps = cook_test(hypothesis, cooked, eff="closest", n=4)
    return comps["correct"], comps["guess"], comps["testlen"], comps["reflen"]


def image_statistics(references: Mapping[int, Sequence[str]], captions: Mapping[int, str], *,
                     tokenizer: str = "python", ground_truth=None) -> ImageStats:
    """:class:`ImageStats` of ``captions`` (image id -> generated caption) against ``references``
    (image id -> raw reference captions), both over the same image ids; ``tokenizer`` "java" or
    "python"; ``ground_truth`` a :class:`geocap.metrics.RelationTruth` or None (no relations)."""
    from pycocoevalcap.rouge.rouge import Rouge

    from geocap.metrics import cider_d, relation_accuracy, tokenize_captions

    if set(references) != set(captions):
        missing = sorted(set(references) - set(captions))
        extra = sorted(set(captions) - set(references))
        raise ValueError(f"captions and references differ: missing captions for images {missing[:5]}, "
                         f"captions of images without references {extra[:5]}")
    ids = sorted(references)
    if not ids:
        raise ValueError("no test images")
    gts_tok, used = tokenize_captions({i: list(references[i]) for i in ids}, tokenizer)
    res_tok, _ = tokenize_captions({i: [captions[i]] for i in ids}, used)
    _, cider = cider_d(gts_tok, res_tok)
    rouge = Rouge()
    n = len(ids)
    correct, guess = np.zeros((n, 4), np.int64), np.zeros((n, 4), np.int64)
    testlen, reflen, rouge_l = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
    uses, right = np.zeros((n, len(RELATIONS)), np.int64), np.zeros((n, len(RELATIONS)), np.int64)
    for row, i in enumerate(ids):
        correct[row], guess[row], testlen[row], reflen[row] = _bleu_statistics(res_tok[i][0], gts_tok[i])
        rouge_l[row] = rouge.calc_score(res_tok[i], gts_tok[i])
        if ground_truth is not None:
            counts = relation_accuracy({i: captions[i]}, ground_truth).per_relation
            uses[row] = [counts[r]["uses"] for r in RELATIONS]
            right[row] = [counts[r]["correct"] for r in RELATIONS]
    return ImageStats(image_ids=np.asarray(ids, np.int64), cider=np.asarray(cider, np.float64),
                      bleu_correct=correct, bleu_guess=guess, bleu_testlen=testlen, bleu_reflen=reflen,
                      rouge=rouge_l, relation_uses=uses, relation_correct=right, tokenizer=used)


def bleu4(correct, guess, testlen, reflen) -> np.ndarray:
    """pycocoevalcap's corpus BLEU-4 from summed statistics: ``correct``, ``guess`` ``[..., 4]``,
    ``testlen``, ``reflen`` ``[...]`` -> ``[...]`` (its ``tiny``/``small`` guards and brevity
    penalty, in its order of operations)."""
    small, tiny = 1e-9, 1e-15
    correct, guess = np.asarray(correct, np.float64), np.asarray(guess, np.float64)
    score = np.ones(correct.shape[:-1])
    for k in range(4):
        score = score * ((correct[..., k] + tiny) / (guess[..., k] + small))
    score = score ** (1.0 / 4)
    ratio = (np.asarray(testlen, np.float64) + tiny) / (np.asarray(reflen, np.float64) + small)
    with np.errstate(divide="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return score * penalty


def metric_names() -> list[str]:
    """Every metric :func:`metric_values` gives: :data:`METRICS`, then ``relation_accuracy.<name>``
    per relation of RELATIONS and per group of :data:`RELATION_GROUPS`."""
    return list(METRICS) + [f"relation_accuracy.{r}" for r in RELATIONS] + \
        [f"relation_accuracy.{g}" for g in RELATION_GROUPS]


def _accuracy(correct: np.ndarray, uses: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(uses > 0, correct / np.maximum(uses, 1), np.nan)


def metric_values(stats: ImageStats, weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Every metric of :func:`metric_names` on image multisets: ``weights`` ``[B, n]`` (how often
    each image is drawn, int) -> metric -> ``[B]`` (NaN where undefined: no relation uses);
    ``weights`` None: once on all images (arrays of shape ``[1]``)."""
    n = len(stats.image_ids)
    w = np.ones((1, n), np.int64) if weights is None else np.asarray(weights, np.int64)
    drawn = w.sum(axis=1).astype(np.float64)
    out = {"cider_d": w @ stats.cider / drawn,
           "bleu_4": bleu4(w @ stats.bleu_correct, w @ stats.bleu_guess, w @ stats.bleu_testlen,
                           w @ stats.bleu_reflen),
           "rouge_l": w @ stats.rouge / drawn}
    uses, right = w @ stats.relation_uses, w @ stats.relation_correct          # [B, R]
    out["relation_accuracy"] = _accuracy(right.sum(axis=1), uses.sum(axis=1))
    for r, name in enumerate(RELATIONS):
        out[f"relation_accuracy.{name}"] = _accuracy(right[:, r], uses[:, r])
    for group, names in RELATION_GROUPS.items():
        cols = [RELATIONS.index(name) for name in names]
        out[f"relation_accuracy.{group}"] = _accuracy(right[:, cols].sum(axis=1), uses[:, cols].sum(axis=1))
    return out


def _seed_mean(values: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
    """Mean over drawn seeds: ``values`` ``[K, B]`` (NaN: undefined), ``seed_counts`` ``[B, K]``."""
    defined = np.isfinite(values)
    num = (seed_counts.T * np.where(defined, values, 0.0)).sum(axis=0)
    den = (seed_counts.T * defined).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _interval(replicates: np.ndarray) -> tuple[Optional[list], int]:
    finite = replicates[np.isfinite(replicates)]
    undefined = int(len(replicates) - len(finite))
    if len(finite) == 0 or undefined > MAX_UNDEFINED * len(replicates):
        return None, undefined
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)], undefined


def excludes_zero(ci: Optional[Sequence]) -> bool:
    """Whether the interval ``ci`` ([lo, hi] or None) lies beyond 0, by more than :data:`ZERO_TOLERANCE`."""
    return ci is not None and (ci[0] > ZERO_TOLERANCE or ci[1] < -ZERO_TOLERANCE)


def _counts(rng: np.random.Generator, n_boot: int, size: int) -> np.ndarray:
    """``[n_boot, size]`` multiplicities of ``size`` draws with replacement from ``size`` items."""
    draws = rng.integers(0, size, size=(n_boot, size)) + size * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * size).reshape(n_boot, size)


def _finite_or_none(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def bootstrap(per_variant: Mapping[str, Sequence[ImageStats]], *, n_boot: int = 2000, seed: int = 0,
              pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """The hierarchical paired bootstrap of the module doc over ``per_variant`` (variant -> one
    :class:`ImageStats` per seed, the same number of seeds in the same seed order for every variant,
    every one over the same image ids). Returns ``{"variants": {variant: {"mean": {metric: value},
    "ci95": {metric: [lo, hi] or None}, "undefined": {metric: replicates}}}, "comparisons": [{"a",
    "b", "metric", "difference", "ci95", "excludes_zero", "undefined_replicates"} for each (a, b) of
    ``pairs`` and each metric]}``; undefined values are None."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not per_variant:
        raise ValueError("bootstrap: no variants")
    first = next(iter(per_variant.values()))
    k_seeds, ids = len(first), first[0].image_ids
    for variant, stats in per_variant.items():
        if len(stats) != k_seeds or not stats:
            raise ValueError(f"variant {variant!r}: {len(stats)} seeds, the others {k_seeds}")
        for s in stats:
            if not np.array_equal(s.image_ids, ids):
                raise ValueError(f"variant {variant!r}: its test images differ from the other models'")
    rng = np.random.default_rng(seed)
    image_w = _counts(rng, n_boot, len(ids))                  # [B, n]
    seed_w = _counts(rng, n_boot, k_seeds)                    # [B, K]
    names = metric_names()
    point, reps = {}, {}
    for variant, stats in per_variant.items():
        full = [metric_values(s) for s in stats]
        drawn = [metric_values(s, image_w) for s in stats]
        point[variant] = {m: _seed_mean(np.stack([f[m] for f in full]), np.ones((1, k_seeds)))[0] for m in names}
        reps[variant] = {m: _seed_mean(np.stack([d[m] for d in drawn]), seed_w) for m in names}
    variants = {}
    for variant in per_variant:
        mean, ci, undefined = {}, {}, {}
        for m in names:
            mean[m] = _finite_or_none(point[variant][m])
            ci[m], undefined[m] = _interval(reps[variant][m]) if mean[m] is not None else (None, n_boot)
        variants[variant] = {"mean": mean, "ci95": ci, "undefined": undefined}
    comparisons = []
    for a, b in pairs:
        for m in names:
            diff = _finite_or_none(point[a][m] - point[b][m])
            ci, undefined = _interval(reps[a][m] - reps[b][m]) if diff is not None else (None, n_boot)
            comparisons.append({"a": a, "b": b, "metric": m, "difference": diff, "ci95": ci,
                                "excludes_zero": excludes_zero(ci),
                                "undefined_replicates": undefined})
    return {"variants": variants, "comparisons": comparisons}


def combine_seeds(estimates: Sequence, ses: Optional[Sequence] = None) -> dict:
    """Per-seed ``estimates`` (None or NaN: not computable for that seed, left out) and their
    within-seed standard errors ``ses`` (None: unknown) combined across seeds by the rule of the
    module doc: ``{"estimate", "ci95" ([lo, hi] or None), "seeds" (how many were combined),
    "method"}``."""
    est = np.array([np.nan if e is None else float(e) for e in estimates], dtype=np.float64)
    se = np.full(len(est), np.nan) if ses is None else \
        np.array([np.nan if s is None else float(s) for s in ses], dtype=np.float64)
    if len(se) != len(est):
        raise ValueError(f"combine_seeds: {len(est)} estimates but {len(se)} standard errors")
    keep = np.isfinite(est)
    x, s = est[keep], se[keep]
    k = len(x)
    if k == 0:
        return {"estimate": None, "ci95": None, "seeds": 0, "method": "no seed has this value"}
    mean = float(x.mean())
    within = float(np.mean(s ** 2)) if np.isfinite(s).all() else None
    if k >= 2:
        from scipy.stats import t as student_t

        between = float(np.var(x, ddof=1))
        var = max(between, within or 0.0) / k
        half = float(student_t.ppf(0.975, k - 1)) * math.sqrt(var)
        method = (f"mean of {k} seeds +- t(0.975, {k - 1}) x sqrt(max(between-seed variance, "
                  f"{'mean within-seed se^2' if within is not None else 'within-seed se^2 unknown'}) / {k})")
    elif within is not None:
        half = _Z95 * math.sqrt(within)
        method = "one seed: +- 1.96 within-seed se (image sampling only)"
    else:
        return {"estimate": mean, "ci95": None, "seeds": 1,
                "method": "one seed without a within-seed standard error: no interval"}
    return {"estimate": mean, "ci95": [mean - half, mean + half], "seeds": k, "method": method}
