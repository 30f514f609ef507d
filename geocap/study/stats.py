"""Per-image caption statistics of a study's models, their intervals across seeds (paired t), and
the combination of per-seed estimates across seeds.

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

**Caption metrics across seeds** (:func:`seed_intervals`): each model's metric is computed on all
test images; a variant's ``mean`` is the mean over its K seeds, a paired difference ``a - b`` the
mean over seeds k of ``metric(a, seed k) - metric(b, seed k)`` (seed k of both variants shares its
initialisation seed and data order), and each interval is Student's t with K - 1 degrees of
freedom on the seeds' values (:func:`combine_seeds` without a within-seed floor): the per-seed
values already carry the image noise of each model's errors, and image difficulty shared by every
model cancels in a paired difference. The intervals are over training seeds *on this test set*.
Their calibration is tested: in simulated null studies with seed and image variance like the
study's, the nominal 95 % interval excludes 0 in about 5 % of them (tests/test_study_stats.py).
Seeds whose metric is undefined (no relation uses) are left out. With one seed there is no seed
spread: the interval is +- 1.96 times the standard error over test images from ``n_boot`` image
resamples (paired for a difference), image sampling only. A *control* (the blind captioner: one
model, no seeds) is compared with every variant the same way: per seed ``metric(a, seed k) -
metric(control)``; the control's own interval is the percentile interval of its image resamples.
Deterministic: numpy's ``default_rng(seed)``.

**Across seeds** (:func:`combine_seeds`), for quantities with one estimate per seed and optionally
a within-seed standard error over images (the attention analyses): the estimate is the mean over
the K seeds; its squared standard error is ``max(s_b^2, mean_k se_k^2) / K``, ``s_b^2`` the
between-seed sample variance (which already contains the image noise; the within-seed term is a
floor so that seeds agreeing by chance do not give a falsely narrow interval); the interval is the
estimate +- the 97.5% quantile of Student's t with K - 1 degrees of freedom times that error. With
one seed the interval is +- 1.96 se_1 (image sampling only), and None without a standard error.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from geocap.data.relations import RELATIONS

__all__ = ["METRICS", "RELATION_GROUPS", "Z95", "ZERO_TOLERANCE", "ImageStats", "bleu4", "combine_seeds",
           "excludes_zero",
           "image_statistics", "metric_names", "metric_values", "seed_intervals", "tokenizer_for"]

METRICS = ("cider_d", "bleu_4", "rouge_l", "relation_accuracy")
#: relations whose directions ORT's |dx|, |dy| embedding cannot tell apart, pooled
RELATION_GROUPS = {"left/right": ("left of", "right of"), "above/below": ("above", "below")}
MAX_UNDEFINED = 0.05      # share of undefined replicates beyond which no interval is given
#: an interval bound within this of 0 does not exclude 0: two models whose captions all equal a reference differ
#: through BLEU's guards only (tiny = 1e-15, small = 1e-9 bias it by up to ~1e-9), never really
ZERO_TOLERANCE = 1e-8
Z95 = 1.959963984540054   # the 97.5 % quantile of the standard normal


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


def _per_seed(stats: Sequence[ImageStats], names: Sequence[str]) -> dict:
    """metric -> [K] values on all images (NaN: undefined)."""
    values = [metric_values(x) for x in stats]
    return {m: np.array([v[m][0] for v in values], np.float64) for m in names}


def _image_se(draws: Sequence[np.ndarray]) -> Optional[float]:
    """Standard deviation of the finite image-resample replicates (None when more than
    :data:`MAX_UNDEFINED` of them are undefined)."""
    x = np.asarray(draws, np.float64)
    finite = x[np.isfinite(x)]
    if len(finite) < 2 or len(x) - len(finite) > MAX_UNDEFINED * len(x):
        return None
    return float(finite.std(ddof=1))


def _seed_interval(values: np.ndarray, one_seed_se: Optional[float]) -> dict:
    combined = combine_seeds([None if not math.isfinite(v) else v for v in values],
                             [one_seed_se] * len(values) if len(values) == 1 else None, floor=False)
    return {"estimate": combined["estimate"], "ci95": combined["ci95"], "seeds": combined["seeds"],
            "interval": combined["method"]}


def seed_intervals(per_variant: Mapping[str, Sequence[ImageStats]], *, pairs: Sequence[tuple[str, str]] = (),
                   controls: Optional[Mapping[str, ImageStats]] = None,
                   control_pairs: Sequence[tuple[str, str, Sequence[str]]] = (), n_boot: int = 1000,
                   seed: int = 0, metrics: Optional[Sequence[str]] = None) -> dict:
    """The intervals of the module doc over ``per_variant`` (variant -> one :class:`ImageStats` per
    seed, the same number of seeds in the same seed order for every variant, all over the same image
    ids) and ``controls`` (name -> one ImageStats over the same images). Returns ``{"variants":
    {variant: {"mean": {metric}, "ci95": {metric}, "per_seed": {metric: [K]}}}, "controls": {name:
    {"mean", "ci95"}}, "comparisons": [{"a", "b", "metric", "difference", "ci95", "excludes_zero",
    "per_seed", "seeds", "interval"}]}`` with a comparison per metric of :func:`metric_names` for each
    (a, b) of ``pairs``, and per (variant, control, metrics) of ``control_pairs`` for those metrics
    (``b`` is then the control's name); undefined values are None. ``metrics``: only these of
    :func:`metric_names` (default all)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot must be an int >= 2, got {n_boot!r}")
    if not per_variant:
        raise ValueError("seed_intervals: no variants")
    controls = dict(controls or {})
    first = next(iter(per_variant.values()))
    k_seeds, ids = len(first), first[0].image_ids if first else None
    for variant, stats in per_variant.items():
        if len(stats) != k_seeds or not stats:
            raise ValueError(f"variant {variant!r}: {len(stats)} seeds, the others {k_seeds}")
        for x in stats:
            if not np.array_equal(x.image_ids, ids):
                raise ValueError(f"variant {variant!r}: its test images differ from the other models'")
    for name, x in controls.items():
        if not np.array_equal(x.image_ids, ids):
            raise ValueError(f"control {name!r}: its test images differ from the models'")
    names = metric_names()
    if metrics is not None:
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise ValueError(f"seed_intervals: unknown metrics {unknown} (known: {', '.join(names)})")
        names = [m for m in names if m in set(metrics)]
    values = {v: _per_seed(stats, names) for v, stats in per_variant.items()}
    control_values = {c: _per_seed([x], names) for c, x in controls.items()}
    draws = {}
    if k_seeds == 1 or controls:
        weights = _counts(np.random.default_rng(seed), n_boot, len(ids))          # [B, n], shared: paired
        for v, stats in per_variant.items():
            if k_seeds == 1:
                draws[v] = metric_values(stats[0], weights)
        for c, x in controls.items():
            draws[c] = metric_values(x, weights)

    def one_seed_se(a: str, b: Optional[str], m: str) -> Optional[float]:
        if k_seeds != 1:
            return None
        return _image_se(draws[a][m] - (draws[b][m] if b is not None else 0.0))

    variants = {}
    for v in per_variant:
        mean, ci, per_seed = {}, {}, {}
        for m in names:
            got = _seed_interval(values[v][m], one_seed_se(v, None, m))
            mean[m], ci[m] = got["estimate"], got["ci95"]
            per_seed[m] = [_finite_or_none(x) for x in values[v][m]]
        variants[v] = {"mean": mean, "ci95": ci, "per_seed": per_seed}
    control_out = {}
    for c in controls:
        mean, ci = {}, {}
        for m in names:
            mean[m] = _finite_or_none(control_values[c][m][0])
            ci[m] = _interval(draws[c][m])[0] if mean[m] is not None else None
        control_out[c] = {"mean": mean, "ci95": ci, "interval": f"percentiles of {n_boot} image resamples"}
    comparisons = []

    def compare(a: str, b: str, m: str, other: np.ndarray) -> None:
        diff = values[a][m] - other
        got = _seed_interval(diff, one_seed_se(a, b, m))
        comparisons.append({"a": a, "b": b, "metric": m, "difference": got["estimate"], "ci95": got["ci95"],
                            "excludes_zero": excludes_zero(got["ci95"]),
                            "per_seed": [_finite_or_none(x) for x in diff], "seeds": got["seeds"],
                            "interval": got["interval"]})

    for a, b in pairs:
        for m in names:
            compare(a, b, m, values[b][m])
    for a, c, metrics in control_pairs:
        for m in metrics:
            compare(a, c, m, np.full(k_seeds, control_values[c][m][0]))
    return {"variants": variants, "controls": control_out, "comparisons": comparisons}


@functools.lru_cache(maxsize=64)
def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, df))


def combine_seeds(estimates: Sequence, ses: Optional[Sequence] = None, *, floor: bool = True) -> dict:
    """Per-seed ``estimates`` (None or NaN: not computable for that seed, left out) and their
    within-seed standard errors ``ses`` (None: unknown) combined across seeds by the rule of the
    module doc: ``{"estimate", "ci95" ([lo, hi] or None), "seeds" (how many were combined),
    "method"}``. ``floor=False``: with two seeds or more, Student's t on the between-seed variance
    alone (the within-seed errors are then used for one seed only). A spread of 0 (every seed the
    same value up to rounding, no within-seed error) gives no interval rather than a zero-width one."""
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
        between = float(np.var(x, ddof=1))
        var = (max(between, within or 0.0) if floor else between) / k
        if math.sqrt(var) <= 1e-12 * max(1.0, abs(mean)):
            # every seed gave the same value (e.g. no correct use in any seed) and no image noise is known:
            # a zero-width interval would claim certainty the seeds do not give
            return {"estimate": mean, "ci95": None, "seeds": k,
                    "method": f"all {k} seeds give the same value and no within-seed error is known: no interval"}
        half = t975(k - 1) * math.sqrt(var)
        method = (f"mean of {k} seeds +- t(0.975, {k - 1}) x sqrt(between-seed variance / {k})" if not floor else
                  f"mean of {k} seeds +- t(0.975, {k - 1}) x sqrt(max(between-seed variance, "
                  f"{'mean within-seed se^2' if within is not None else 'within-seed se^2 unknown'}) / {k})")
    elif within is not None and math.sqrt(within) > 1e-12 * max(1.0, abs(mean)):
        half = Z95 * math.sqrt(within)
        method = "one seed: +- 1.96 se over test images (image sampling only)"
    else:
        return {"estimate": mean, "ci95": None, "seeds": 1,
                "method": "one seed without a (non-zero) within-seed standard error: no interval"}
    return {"estimate": mean, "ci95": [mean - half, mean + half], "seeds": k, "method": method}
