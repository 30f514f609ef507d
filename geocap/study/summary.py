"""A study's models summarised: the content of ``study.json`` (without ``settings``, which the runner
adds), from one :class:`ModelResult` per trained (variant, seed).

``summarize(results, blind=...)`` returns::

    {"variants": {variant: {"seeds": [per seed, ascending], "mean": {...}, "ci95": {...}}},
     "comparisons": [paired differences], "controls": {blind captioners}, "findings": [findings with
     verdicts], "data_checks": [the feature cosine], "verdicts": {how many were tested, and how}}

* per seed: ``seed``, ``cider_d``, ``bleu_4``, ``rouge_l``, ``relation_accuracy`` (None without
  relation uses), ``relations`` {relation name: {``accuracy``, ``uses``, ``correct``}}, recomputed
  here from the per-image statistics (:mod:`.stats`); ``evaluate``: the same four numbers as
  ``geocap evaluate`` wrote them (metrics_test.json), for cross-checking; ``tokenizer`` (the one
  used here) and ``evaluate_tokenizer``; ``n_images``; ``val_curve`` [[step, validation loss, its
  se]]; ``attention``: :func:`.findings.attention_summary` of its analysis.json (and
  ``untrained_attention``, its untrained control's, or None); ``convergence``:
  :func:`.convergence.convergence` of its validation curve (``converged`` true, false or None);
  ``schedule_convergence``: :func:`.schedule.schedule_gain` of its schedule check (with the short
  run's ``short_curve``), None for a model without one.
  Per variant also ``final_val_loss_sd``: the spread over seeds of the final validation loss.
* ``mean`` / ``ci95``: per metric of :data:`.stats.METRICS` the mean over seeds and its 95%
  interval (t over seeds, :func:`.stats.seed_intervals`; [lo, hi] or None); ``relations``
  {name: {``accuracy``, ``uses`` (over all seeds)}} / {name: interval}; ``relation_groups``
  (left/right, above/below) likewise; ``ci95["interval"]`` says how the intervals were made.
* ``comparisons``: for every pair of variants present among :data:`PAIRS` and every metric of
  :func:`.stats.metric_names`, and for every variant against each blind captioner on its relation
  metrics: ``a``, ``b``, ``metric``, ``difference`` (a - b), ``ci95``, ``excludes_zero``,
  ``per_seed``, ``seeds``, ``interval``.
* ``controls``: the blind captioners (``"blind"``, ``"blind left/right"``, ``"blind above/below"``):
  ``mean`` and ``ci95`` per metric and a few ``examples``; absent without ``blind``.
* ``findings``: :mod:`.findings`; ``data_checks``: :func:`.findings.feature_cosine_check`;
  ``verdicts``: ``{"tested", "effects", "holds", "does not hold", "inconclusive", "note"}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from geocap.data.relations import RELATIONS

from .convergence import convergence
from .schedule import DEFAULT_TOLERANCE, schedule_gain, seed_spread
from .findings import VERDICTS, attention_findings, attention_summary, feature_cosine_check, geometry_findings
from .report import write_report
from .settings import VARIANTS
from .stats import METRICS, RELATION_GROUPS, image_statistics, metric_values, seed_intervals, tokenizer_for
from geocap.errors import DataError

__all__ = ["ModelResult", "PAIRS", "summarize", "write_report"]

PAIRS = (("ort", "none"), ("directional", "ort"), ("directional", "none"), ("ort", "absolute"),
         ("absolute", "none"), ("directional", "absolute"))
BLIND = "blind"      # the blind captioner over every relation; f"{BLIND} {group}" for a relation group
_EVALUATE_KEYS = {"cider_d": "CIDEr", "bleu_4": "Bleu_4", "rouge_l": "ROUGE_L"}


@dataclass
class ModelResult:
    """One trained (variant, seed) of a study, as the aggregation reads it."""
    variant: str                          # a name of geocap.study.settings.VARIANTS
    seed: int
    references: dict                      # test image id (int) -> list of reference caption strings (raw, untokenised)
    captions: dict                        # test image id (int) -> the model's generated caption (str)
    ground_truth: Optional[str]           # path of the data's ground_truth.json (relation truth), None when absent
    analysis: dict                        # the model's analysis.json as geocap.analysis.run_analyses wrote it
    metrics: dict                         # the model's metrics_test.json as geocap evaluate wrote it
    val_curve: list                       # [[step, validation loss, its se], ...] from the run's metrics.jsonl
    steps: Optional[int] = None           # the run's steps (the convergence criterion's horizon)
    untrained_analysis: Optional[dict] = None  # analysis.json of its untrained control (same initialisation)
    schedule_check: Optional[dict] = None  # its schedule_check.json (geocap.study.schedule), None when not checked


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
            raise DataError(f"{_name(r)}: unknown variant (known: {', '.join(VARIANTS)})")
        if any(o.seed == r.seed for o in groups.get(r.variant, [])):
            raise DataError(f"{_name(r)}: given twice")
        if not r.references:
            raise DataError(f"{_name(r)}: no test images in references")
        missing = sorted(set(r.references) - set(r.captions))
        if missing:
            raise DataError(f"{_name(r)}: no caption for test image {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(set(r.captions) - set(r.references))
        if extra:
            raise DataError(f"{_name(r)}: caption for image {extra[0]}, which is not a test image")
        for image_id, caption in r.captions.items():
            if not isinstance(caption, str):
                raise DataError(f"{_name(r)}: image {image_id}: caption is {type(caption).__name__}, not a string")
        if not isinstance(r.metrics, dict) or not isinstance(r.metrics.get("metrics"), dict):
            raise DataError(f"{_name(r)}: metrics is not a metrics_test.json of geocap evaluate (no 'metrics')")
        groups.setdefault(r.variant, []).append(r)
    ordered = {v: sorted(groups[v], key=lambda r: r.seed) for v in VARIANTS if v in groups}
    first = next(iter(ordered.values()))[0]
    for variant, group in ordered.items():
        for r in group:
            if set(r.references) != set(first.references):
                raise DataError(f"{_name(r)}: its test images differ from those of {_name(first)} "
                                 f"({len(r.references)} vs {len(first.references)} images)")
        seeds = [r.seed for r in group]
        if seeds != [r.seed for r in ordered[first.variant]]:
            raise DataError(f"variant {variant!r}: seeds {seeds} differ from variant {first.variant!r}'s "
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
            raise DataError(f"{_name(r)}: ground truth {path}: {err}") from None
    return cache[path]


def _none_if_nan(x) -> Optional[float]:
    x = float(x)
    return None if x != x else x


def _seed_entry(r: ModelResult, stats, tolerance: float, schedule_tolerance: float) -> dict:
    values = {m: _none_if_nan(v[0]) for m, v in metric_values(stats).items()}
    uses, correct = stats.relation_uses.sum(axis=0), stats.relation_correct.sum(axis=0)
    evaluated = {k: r.metrics["metrics"].get(name) for k, name in _EVALUATE_KEYS.items()}
    evaluated["relation_accuracy"] = r.metrics.get("relation_accuracy")
    try:
        curve = [[int(p[0]), float(p[1]), None if len(p) < 3 or p[2] is None else float(p[2])] for p in r.val_curve]
    except (TypeError, ValueError, IndexError):
        raise DataError(f"{_name(r)}: val_curve must hold [step, validation loss, its se] entries") from None
    try:
        attention = attention_summary(r.analysis)
        untrained = None if r.untrained_analysis is None else attention_summary(r.untrained_analysis)
    except ValueError as err:
        raise DataError(f"{_name(r)}: {err}") from None
    converged = convergence(curve, r.steps, tolerance=tolerance) if r.steps else \
        {"converged": None, "reason": "the run's steps are unknown", "criterion": "loss"}
    schedule = None
    if r.schedule_check is not None:
        try:
            schedule = schedule_gain(r.schedule_check, tolerance=schedule_tolerance)
            schedule["short_curve"] = [[int(p[0]), float(p[1])] for p in r.schedule_check.get("short_curve") or []]
        except (ValueError, TypeError, IndexError) as err:
            raise DataError(f"{_name(r)}: schedule check: {err}") from None
    return {"seed": r.seed, **{m: values[m] for m in METRICS},
            "convergence": converged, "schedule_convergence": schedule,
            "relations": {name: {"accuracy": values[f"relation_accuracy.{name}"], "uses": int(uses[k]),
                                 "correct": int(correct[k])} for k, name in enumerate(RELATIONS)},
            "evaluate": evaluated, "tokenizer": stats.tokenizer, "evaluate_tokenizer": r.metrics.get("tokenizer"),
            "n_images": len(stats.image_ids), "val_curve": curve, "attention": attention,
            "untrained_attention": untrained}


def _blind_stats(blind: Optional[dict], first: ModelResult, truth) -> dict:
    """Control name -> ImageStats of the blind captioners' captions (rule name -> image id -> caption)."""
    if not blind:
        return {}
    if truth is None:
        raise DataError("summarize: blind captions need the data's ground truth (no model has one)")
    out = {}
    for rule, captions in blind.items():
        if rule != "all" and rule not in RELATION_GROUPS:
            raise DataError(f"summarize: blind rule {rule!r} is neither 'all' nor a relation group "
                             f"({', '.join(RELATION_GROUPS)})")
        name = BLIND if rule == "all" else f"{BLIND} {rule}"
        try:
            out[name] = image_statistics(first.references, captions, tokenizer="python", ground_truth=truth)
        except ValueError as err:
            raise DataError(f"summarize: blind captions ({rule}): {err}") from None
    return out


def _verdict_count(findings: list) -> dict:
    counts = {v: sum(f["verdict"] == v for f in findings) for v in VERDICTS}
    effects = sum(1 for f in findings for m in f["measured"] if m.get("tests"))
    return {"tested": len(findings), "effects": effects, **counts,
            "note": f"each effect is tested at 95 %: with no true effect at all, about {0.05 * effects:.1f} of the "
                    f"{effects} would exclude 0 by chance; the verdicts are not corrected for multiplicity"}


def summarize(results: list, *, blind: Optional[dict] = None, tolerance: float = 0.01,
              schedule_tolerance: float = DEFAULT_TOLERANCE, n_boot: int = 1000, seed: int = 0) -> dict:
    """study.json's content (without ``settings``) for ``results``, one :class:`ModelResult` per
    (variant, seed); ``blind``: the blind captioners' captions (rule "all" or a relation group ->
    test image id -> caption, :func:`geocap.study.run.blind_captions`) or None; ``tolerance``: the
    last-fifth convergence criterion's, ``schedule_tolerance`` the schedule check's. See the module
    doc. ValueError naming the variant and seed for an
    unknown variant, a (variant, seed) given twice, captions that miss a test image (or caption
    another image), test image sets that differ between models, seed sets that differ between
    variants, or a malformed metrics/analysis dict."""
    groups = _group(list(results))
    cache: dict = {}
    stats = {v: [image_statistics(r.references, r.captions, tokenizer=tokenizer_for(r.metrics),
                                  ground_truth=_relation_truth(r.ground_truth, cache, r)) for r in group]
             for v, group in groups.items()}
    first = next(iter(groups.values()))[0]
    controls = _blind_stats(blind, first, _relation_truth(first.ground_truth, cache, first))
    pairs = [(a, b) for a, b in PAIRS if a in groups and b in groups]
    relation_metrics = ["relation_accuracy"] + [f"relation_accuracy.{r}" for r in RELATIONS]
    control_pairs = []
    for name in controls:
        group = name[len(BLIND) + 1:]
        metrics = ["cider_d"] + relation_metrics if name == BLIND else \
            [f"relation_accuracy.{group}"] + [f"relation_accuracy.{r}" for r in RELATION_GROUPS[group]]
        control_pairs += [(v, name, metrics) for v in groups]
    got_all = seed_intervals(stats, pairs=pairs, controls=controls, control_pairs=control_pairs, n_boot=n_boot,
                             seed=seed)
    variants = {}
    for v, group in groups.items():
        entries = [_seed_entry(r, x, tolerance, schedule_tolerance) for r, x in zip(group, stats[v])]
        got = got_all["variants"][v]
        mean = {m: got["mean"][m] for m in METRICS}
        ci = {m: got["ci95"][m] for m in METRICS}
        mean["relations"] = {name: {"accuracy": got["mean"][f"relation_accuracy.{name}"],
                                    "uses": sum(e["relations"][name]["uses"] for e in entries)} for name in RELATIONS}
        ci["relations"] = {name: got["ci95"][f"relation_accuracy.{name}"] for name in RELATIONS}
        mean["relation_groups"] = {g: {"accuracy": got["mean"][f"relation_accuracy.{g}"],
                                       "uses": sum(e["relations"][name]["uses"] for e in entries for name in names)}
                                   for g, names in RELATION_GROUPS.items()}
        ci["relation_groups"] = {g: got["ci95"][f"relation_accuracy.{g}"] for g in RELATION_GROUPS}
        ci["interval"] = (f"t over {len(group)} seeds" if len(group) > 1 else
                          f"one seed: +- 1.96 se over {n_boot} test-image resamples")
        ci["n_boot"], ci["seed"] = n_boot, seed
        finals = [e["val_curve"][-1][1] if e["val_curve"] else None for e in entries]
        variants[v] = {"seeds": entries, "mean": mean, "ci95": ci, "final_val_loss_sd": seed_spread(finals)}
    findings = []
    for v in groups:
        seeds = variants[v]["seeds"]
        untrained = [e["untrained_attention"] for e in seeds]
        findings += attention_findings(v, [e["attention"] for e in seeds],
                                       untrained if all(u is not None for u in untrained) else None)
    uses = {v: {name: variants[v]["mean"]["relations"][name]["uses"] for name in RELATIONS} for v in groups}
    # a finding whose variants are not all in this study is not tested (nor counted)
    findings += [f for f in geometry_findings(got_all["comparisons"], uses, got_all["controls"], list(groups))
                 if all(v in groups for v in f["variants"])]
    checks = [feature_cosine_check(list(groups), [e["attention"] for v in groups for e in variants[v]["seeds"]])]
    study = {"variants": variants, "comparisons": got_all["comparisons"], "findings": findings,
             "data_checks": checks, "verdicts": _verdict_count(findings)}
    if controls:
        study["controls"] = {name: {**got_all["controls"][name],
                                    "examples": [[int(i), blind[rule][i]] for i in sorted(blind[rule])[:3]]}
                             for name, rule in zip(controls, blind)}
    return study
