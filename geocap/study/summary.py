"""A study's models summarised: the content of ``study.json`` (without ``settings``, which the runner
adds), from one :class:`ModelResult` per trained (variant, seed).

``summarize(results)`` returns::

    {"variants": {variant: {"seeds": [per seed, ascending], "mean": {...}, "ci95": {...}}},
     "comparisons": [paired differences], "findings": [findings with verdicts]}

* per seed: ``seed``, ``cider_d``, ``bleu_4``, ``rouge_l``, ``relation_accuracy`` (None without
  relation uses), ``relations`` {relation name: {``accuracy``, ``uses``, ``correct``}}, recomputed
  here from the per-image statistics (:mod:`.stats`); ``evaluate``: the same four numbers as
  ``geocap evaluate`` wrote them (metrics_test.json), for cross-checking; ``tokenizer`` (the one
  used here) and ``evaluate_tokenizer``; ``n_images``; ``val_curve`` [[step, validation CIDEr-D]];
  ``attention``: :func:`.findings.attention_summary` of its analysis.json; ``convergence``:
  :func:`convergence` of its validation curve (the issue's 2 % criterion).
* ``mean`` / ``ci95``: per metric of :data:`.stats.METRICS` the mean over seeds and the hierarchical
  paired bootstrap's 95% interval ([lo, hi] or None); ``relations`` {name: {``accuracy``, ``uses``
  (over all seeds)}} / {name: interval}; ``relation_groups`` (left/right, above/below) likewise;
  ``ci95`` also holds ``n_boot`` and the bootstrap ``seed``.
* ``comparisons``: for every pair of variants present among (ort, none), (directional, ort),
  (directional, none) and every metric of :func:`.stats.metric_names`: ``a``, ``b``, ``metric``,
  ``difference`` (a - b), ``ci95``, ``excludes_zero``, ``undefined_replicates``.
* ``findings``: :mod:`.findings`.

The bootstrap and the verdict rule are defined in :mod:`.stats` and :mod:`.findings`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from geocap.data.relations import RELATIONS

from .findings import attention_findings, attention_summary, feature_cosine_finding, geometry_findings
from .report import write_report
from .stats import METRICS, RELATION_GROUPS, bootstrap, image_statistics, metric_values, tokenizer_for

__all__ = ["ModelResult", "PAIRS", "VARIANTS", "summarize", "write_report"]

VARIANTS = ("ort", "none", "directional")
PAIRS = (("ort", "none"), ("directional", "ort"), ("directional", "none"))
_EVALUATE_KEYS = {"cider_d": "CIDEr", "bleu_4": "Bleu_4", "rouge_l": "ROUGE_L"}


@dataclass
class ModelResult:
    """One trained (variant, seed) of a study, as the aggregation reads it."""
    variant: str                          # "ort" | "none" | "directional"
    seed: int
    references: dict                      # test image id (int) -> list of reference caption strings (raw, untokenised)
    captions: dict                        # test image id (int) -> the model's generated caption (str)
    ground_truth: Optional[str]           # path of the data's ground_truth.json (relation truth), None when absent
    analysis: dict                        # the model's analysis.json as geocap.analysis.run_analyses wrote it
    metrics: dict                         # the model's metrics_test.json as geocap evaluate wrote it
    val_curve: list                       # [(step, validation CIDEr-D), ...] from the run's metrics.jsonl


def _name(r: ModelResult) -> str:
    return f"variant {r.variant!r} seed {r.seed}"


def _group(results: list) -> dict:
    """variant -> its results in ascending seed, validated (see :func:`summarize`)."""
    if not results:
        raise ValueError("summarize: no model results")
    groups: dict = {}
    for r in results:
        if not isinstance(r, ModelResult):
            raise ValueError(f"summarize: expected ModelResult, got {type(r).__name__}")
        if r.variant not in VARIANTS:
            raise ValueError(f"{_name(r)}: unknown variant (known: {', '.join(VARIANTS)})")
        if any(o.seed == r.seed for o in groups.get(r.variant, [])):
            raise ValueError(f"{_name(r)}: given twice")
        if not r.references:
            raise ValueError(f"{_name(r)}: no test images in references")
        missing = sorted(set(r.references) - set(r.captions))
        if missing:
            raise ValueError(f"{_name(r)}: no caption for test image {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(set(r.captions) - set(r.references))
        if extra:
            raise ValueError(f"{_name(r)}: caption for image {extra[0]}, which is not a test image")
        for image_id, caption in r.captions.items():
            if not isinstance(caption, str):
                raise ValueError(f"{_name(r)}: image {image_id}: caption is {type(caption).__name__}, not a string")
        if not isinstance(r.metrics, dict) or not isinstance(r.metrics.get("metrics"), dict):
            raise ValueError(f"{_name(r)}: metrics is not a metrics_test.json of geocap evaluate (no 'metrics')")
        groups.setdefault(r.variant, []).append(r)
    ordered = {v: sorted(groups[v], key=lambda r: r.seed) for v in VARIANTS if v in groups}
    first = next(iter(ordered.values()))[0]
    for variant, group in ordered.items():
        for r in group:
            if set(r.references) != set(first.references):
                raise ValueError(f"{_name(r)}: its test images differ from those of {_name(first)} "
                                 f"({len(r.references)} vs {len(first.references)} images)")
        seeds = [r.seed for r in group]
        if seeds != [r.seed for r in ordered[first.variant]]:
            raise ValueError(f"variant {variant!r}: seeds {seeds} differ from variant {first.variant!r}'s "
                             f"{[r.seed for r in ordered[first.variant]]} (the bootstrap pairs seeds across variants)")
    return ordered


def _relation_truth(path: Optional[str], cache: dict, r: ModelResult):
    if path is None:
        return None
    if path not in cache:
        from geocap.metrics import load_relation_truth

        try:
            cache[path] = load_relation_truth(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{_name(r)}: ground truth {path}: {err}") from None
    return cache[path]


def _none_if_nan(x) -> Optional[float]:
    x = float(x)
    return None if x != x else x


CONVERGED_GAIN = 0.02  # the criterion: under 2 % gain over the last fifth of training


def convergence(curve: list) -> dict:
    """Whether a validation curve ``[[step, CIDEr-D], ...]`` has flattened: ``gain_last_fifth`` =
    the mean validation CIDEr-D over the last fifth of training (steps above 80 % of the last
    validated step) over its mean in the fifth before (60-80 %), minus 1; ``converged`` when that
    gain is under :data:`CONVERGED_GAIN`. Means over each fifth rather than single points, since
    one validation on a few hundred images moves by several per cent. Both None when either fifth
    holds no validation or the earlier mean is not positive."""
    if not curve:
        return {"gain_last_fifth": None, "converged": None}
    end = curve[-1][0]
    last = [v for step, v in curve if step > 0.8 * end]
    before = [v for step, v in curve if 0.6 * end < step <= 0.8 * end]
    if not last or not before or sum(before) <= 0:
        return {"gain_last_fifth": None, "converged": None}
    gain = (sum(last) / len(last)) / (sum(before) / len(before)) - 1.0
    return {"gain_last_fifth": gain, "converged": bool(gain < CONVERGED_GAIN)}


def _seed_entry(r: ModelResult, stats) -> dict:
    values = {m: _none_if_nan(v[0]) for m, v in metric_values(stats).items()}
    uses, correct = stats.relation_uses.sum(axis=0), stats.relation_correct.sum(axis=0)
    evaluated = {k: r.metrics["metrics"].get(name) for k, name in _EVALUATE_KEYS.items()}
    evaluated["relation_accuracy"] = r.metrics.get("relation_accuracy")
    try:
        curve = [[int(step), float(value)] for step, value in r.val_curve]
    except (TypeError, ValueError):
        raise ValueError(f"{_name(r)}: val_curve must hold (step, validation CIDEr-D) pairs") from None
    try:
        attention = attention_summary(r.analysis)
    except ValueError as err:
        raise ValueError(f"{_name(r)}: {err}") from None
    return {"seed": r.seed, **{m: values[m] for m in METRICS},
            "convergence": convergence(curve),
            "relations": {name: {"accuracy": values[f"relation_accuracy.{name}"], "uses": int(uses[k]),
                                 "correct": int(correct[k])} for k, name in enumerate(RELATIONS)},
            "evaluate": evaluated, "tokenizer": stats.tokenizer, "evaluate_tokenizer": r.metrics.get("tokenizer"),
            "n_images": len(stats.image_ids), "val_curve": curve, "attention": attention}


def summarize(results: list, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """study.json's content (without ``settings``) for ``results``, one :class:`ModelResult` per
    (variant, seed); see the module doc. ValueError naming the variant and seed for an unknown
    variant, a (variant, seed) given twice, captions that miss a test image (or caption another
    image), test image sets that differ between models, seed sets that differ between variants,
    or a malformed metrics/analysis dict."""
    groups = _group(list(results))
    cache: dict = {}
    stats = {v: [image_statistics(r.references, r.captions, tokenizer=tokenizer_for(r.metrics),
                                  ground_truth=_relation_truth(r.ground_truth, cache, r)) for r in group]
             for v, group in groups.items()}
    pairs = [(a, b) for a, b in PAIRS if a in groups and b in groups]
    boot = bootstrap(stats, n_boot=n_boot, seed=seed, pairs=pairs)
    variants = {}
    for v, group in groups.items():
        entries = [_seed_entry(r, s) for r, s in zip(group, stats[v])]
        got = boot["variants"][v]
        mean = {m: got["mean"][m] for m in METRICS}
        ci = {m: got["ci95"][m] for m in METRICS}
        mean["relations"] = {name: {"accuracy": got["mean"][f"relation_accuracy.{name}"],
                                    "uses": sum(e["relations"][name]["uses"] for e in entries)} for name in RELATIONS}
        ci["relations"] = {name: got["ci95"][f"relation_accuracy.{name}"] for name in RELATIONS}
        mean["relation_groups"] = {g: {"accuracy": got["mean"][f"relation_accuracy.{g}"],
                                       "uses": sum(e["relations"][name]["uses"] for e in entries for name in names)}
                                   for g, names in RELATION_GROUPS.items()}
        ci["relation_groups"] = {g: got["ci95"][f"relation_accuracy.{g}"] for g in RELATION_GROUPS}
        ci["n_boot"], ci["seed"] = n_boot, seed
        variants[v] = {"seeds": entries, "mean": mean, "ci95": ci}
    findings = []
    for v in groups:
        findings += attention_findings(v, [e["attention"] for e in variants[v]["seeds"]])
    findings.append(feature_cosine_finding(list(groups), [e["attention"] for v in groups
                                                          for e in variants[v]["seeds"]]))
    uses = {v: {name: variants[v]["mean"]["relations"][name]["uses"] for name in RELATIONS} for v in groups}
    findings += geometry_findings(boot["comparisons"], uses)
    return {"variants": variants, "comparisons": boot["comparisons"], "findings": findings}
