"""The seed study's findings, each with a verdict on a study's models.

Inputs: per model, :func:`attention_summary` of its ``analysis.json`` (as
:func:`geocap.analysis.run_analyses` wrote it: per-layer values and, for the by-layer rates, their
standard errors over images from :mod:`geocap.analysis.uncertainty`), and for the geometry
findings the caption statistics' paired comparisons (:func:`geocap.study.stats.bootstrap`).

Each finding is ``{"name", "seed_claim", "measured", "verdict", "variants"}``; ``measured`` lists
the quantities the verdict rests on (``"tests": true``), each with its estimate, 95% interval,
claimed sign and per-seed values, and context numbers (layer values, the seed's own numbers).

**Verdict rule.** A claim is one or more effects, each with a claimed sign (e.g. last-layer minus
first-layer entropy < 0). For the attention findings each effect's per-seed estimates and their
within-seed standard errors are combined across seeds by :func:`geocap.study.stats.combine_seeds`
(mean over seeds; standard error ``sqrt(max(between-seed variance, mean within-seed se^2) / K)``;
Student's t with K - 1 degrees of freedom; one seed: +- 1.96 se). For the caption findings the
interval is the hierarchical paired bootstrap's. An effect *holds* when its interval excludes 0 in
the claimed direction, *contradicts* when it excludes 0 in the other direction, and is
*inconclusive* otherwise or when there is no interval (too few data). The verdict is ``holds`` when
every effect holds, ``does not hold`` when any contradicts, else ``inconclusive``.

Effects, pre-specified (first = layer 1, last = the deepest layer; never chosen after looking):

* entropy, per kind (encoder self, decoder self, cross): last - first normalised entropy < 0
  (se: the analysis' ``change_se``).
* proximity: Spearman of encoder attention with box distance in layer 1 < 0 (near objects get
  more), and last - first > 0 (deeper layers more global). No within-seed error is recorded for a
  Spearman correlation, so the interval rests on the spread between seeds (one seed: none).
* thematic affinity: layer-1 affinity - 1 > 0 (above chance) and last - first < 0.
* feature cosine: within-cluster - across-cluster cosine of the object features > 0 (a property
  of the features the analyses read, compared with the seed's 0.50 vs 0.31).
* grounding: last - first grounding accuracy > 0 (the seed: ~16% in layer 1, ~29% deeper).
* hypothetical captions: in the last layer, follow rate - same-step baseline > 0 (se: both rates'
  standard errors added in quadrature, ignoring their positive covariance: conservative).
* geometry: ort - none CIDEr-D > 0; ort - none relation accuracy > 0 (per relation shown);
  directional - ort relation accuracy on left/right and on above/below > 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from .stats import RELATION_GROUPS, combine_seeds, excludes_zero

__all__ = ["ENTROPY_KINDS", "VERDICTS", "attention_findings", "attention_summary", "by_layer", "feature_cosine_finding",
           "geometry_findings", "verdict"]

VERDICTS = ("holds", "does not hold", "inconclusive")
ENTROPY_KINDS = ("encoder_self", "decoder_self", "cross")
SEED = "the seed study, ORT on COCO"


# -- reading analysis.json -------------------------------------------------------------------------

def _curve(values, uncertainty: Optional[Mapping]) -> Optional[dict]:
    """``{"values": [L], "se": [L] or None, "change", "change_se"}`` of one by-layer quantity."""
    if not values:
        return None
    values = [None if v is None else float(v) for v in values]
    unc = uncertainty or {}
    se = unc.get("se")
    change = unc.get("change")
    if change is None and values[0] is not None and values[-1] is not None:
        change = values[-1] - values[0]
    return {"values": values, "se": list(se) if se else None, "change": change, "change_se": unc.get("change_se")}


def attention_summary(analysis: Mapping) -> dict:
    """The by-layer quantities of one model's ``analysis.json`` the findings and the report use:
    ``entropy_<kind>`` (normalised entropy), ``proximity_distance`` (Spearman with box distance),
    ``affinity`` (thematic, 1 = chance), ``grounding`` (accuracy), ``follow`` and ``same_step``
    (hypothetical follow rate and its baseline), each a curve dict or None; ``feature_cosine``
    ``{"same", "diff"}``, ``grounding_chance``. ValueError when a section is missing."""
    try:
        ent, prox, them, gr = (analysis[k] for k in ("entropy", "proximity", "thematic", "grounding"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"analysis.json: section {err} missing") from None
    out = {f"entropy_{k}": _curve(ent.get("per_layer", {}).get(k), ent.get("per_layer_uncertainty", {}).get(k))
           for k in ENTROPY_KINDS}
    out["proximity_distance"] = _curve(prox.get("spearman_distance"), None)
    if out["proximity_distance"] is not None:           # a correlation has no recorded standard error
        out["proximity_distance"]["change_se"] = None
    out["affinity"] = _curve(them.get("affinity_per_layer"), them.get("affinity_per_layer_uncertainty"))
    unc = gr.get("uncertainty") or {}
    out["grounding"] = _curve(gr.get("accuracy"), unc.get("accuracy"))
    out["follow"] = _curve(gr.get("hypothetical_follow_rate"), unc.get("hypothetical_follow_rate"))
    out["same_step"] = _curve(gr.get("hypothetical_follow_rate_same_step"),
                              unc.get("hypothetical_follow_rate_same_step"))
    out["grounding_chance"] = gr.get("chance")
    out["feature_cosine"] = {"same": them.get("same_cluster_cosine"), "diff": them.get("diff_cluster_cosine")}
    return out


# -- the verdict rule --------------------------------------------------------------------------------

def _effect_state(ci: Optional[Sequence], sign: int) -> str:
    if not excludes_zero(ci):
        return "inconclusive"
    return "holds" if (ci[0] > 0) == (sign > 0) else "contradicts"


def verdict(effects: Sequence[Mapping]) -> str:
    """The verdict of a claim from its effects (each with ``ci95`` and ``claimed_sign`` +1/-1): see
    the module doc; no effects: inconclusive."""
    states = [_effect_state(e.get("ci95"), e["claimed_sign"]) for e in effects]
    if states and all(s == "holds" for s in states):
        return "holds"
    if "contradicts" in states:
        return "does not hold"
    return "inconclusive"


def _effect(quantity: str, sign: int, estimates: Sequence, ses: Optional[Sequence]) -> dict:
    combined = combine_seeds(estimates, ses)
    return {"quantity": quantity, "tests": True, "claimed": "> 0" if sign > 0 else "< 0", "claimed_sign": sign,
            "estimate": combined["estimate"], "ci95": combined["ci95"], "state": _effect_state(combined["ci95"], sign),
            "per_seed": [None if e is None or not math.isfinite(float(e)) else float(e) for e in estimates],
            "seeds": combined["seeds"], "interval": combined["method"]}


def by_layer(quantity: str, curves: Sequence[Optional[dict]]) -> dict:
    """Context: the per-layer values combined across seeds (with intervals)."""
    present = [c for c in curves if c is not None]
    if not present:
        return {"quantity": quantity, "tests": False, "by_layer": None}
    depth = max(len(c["values"]) for c in present)
    rows = []
    for layer in range(depth):
        est = [c["values"][layer] if layer < len(c["values"]) else None for c in present]
        se = [c["se"][layer] if c["se"] and layer < len(c["se"]) else None for c in present]
        got = combine_seeds(est, se)
        rows.append({"layer": layer + 1, "estimate": got["estimate"], "ci95": got["ci95"]})
    return {"quantity": quantity, "tests": False, "by_layer": rows}


def _finding(name: str, claim: str, variants: list, effects: list, context: list) -> dict:
    return {"name": name, "seed_claim": claim, "measured": effects + context, "verdict": verdict(effects),
            "variants": variants}


def _first(curve): return None if curve is None else curve["values"][0]
def _first_se(curve): return None if curve is None or not curve["se"] else curve["se"][0]
def _last(curve): return None if curve is None else curve["values"][-1]
def _last_se(curve): return None if curve is None or not curve["se"] else curve["se"][-1]
def _change(curve): return None if curve is None or len(curve["values"]) < 2 else curve["change"]
def _change_se(curve): return None if curve is None else curve["change_se"]


def _minus(a, b):
    return None if a is None or b is None else a - b


def _quadrature(a, b):
    return None if a is None or b is None else math.sqrt(a * a + b * b)


# -- the attention findings --------------------------------------------------------------------------

def attention_findings(variant: str, summaries: Sequence[Mapping]) -> list[dict]:
    """The attention findings of one variant from its seeds' :func:`attention_summary` dicts."""
    v = [variant]
    out = []
    for kind in ENTROPY_KINDS:
        curves = [s[f"entropy_{kind}"] for s in summaries]
        out.append(_finding(
            f"entropy_{kind}", f"Attention entropy falls with depth ({kind.replace('_', ' ')} attention): deeper "
            f"layers concentrate on fewer objects or words ({SEED}).", v,
            [_effect("normalised entropy, last layer - layer 1", -1, [_change(c) for c in curves],
                     [_change_se(c) for c in curves])],
            [by_layer("normalised entropy", curves)]))
    curves = [s["proximity_distance"] for s in summaries]
    out.append(_finding(
        "proximity", "Early layers attend to near objects, deeper layers more globally (Spearman correlation of "
        "encoder attention with box-centre distance: negative in layer 1, closer to 0 deeper).", v,
        [_effect("Spearman(attention, distance) in layer 1", -1, [_first(c) for c in curves], None),
         _effect("Spearman(attention, distance), last layer - layer 1", +1, [_change(c) for c in curves], None)],
        [by_layer("Spearman(attention, distance)", curves)]))
    curves = [s["affinity"] for s in summaries]
    out.append(_finding(
        "thematic_affinity", "Early layers attend within thematic clusters more than chance, deeper layers less so "
        "(affinity, 1.0 = chance).", v,
        [_effect("affinity - 1 in layer 1", +1, [_minus(_first(c), 1.0) for c in curves],
                 [_first_se(c) for c in curves]),
         _effect("affinity, last layer - layer 1", -1, [_change(c) for c in curves], [_change_se(c) for c in curves])],
        [by_layer("affinity", curves)]))
    curves = [s["grounding"] for s in summaries]
    chance = combine_seeds([s.get("grounding_chance") for s in summaries])
    out.append(_finding(
        "grounding", "Deeper cross-attention points nouns at their objects more than early layers (seed, ACL-F "
        "2022: about 16% in layer 1, about 29% deeper).", v,
        [_effect("grounding accuracy, last layer - layer 1", +1, [_change(c) for c in curves],
                 [_change_se(c) for c in curves])],
        [by_layer("grounding accuracy", curves),
         {"quantity": "chance (1/N)", "tests": False, "estimate": chance["estimate"], "ci95": chance["ci95"]},
         {"quantity": "seed's values", "tests": False, "layer_1": 0.16, "deeper": 0.29}]))
    follow, same = [s["follow"] for s in summaries], [s["same_step"] for s in summaries]
    out.append(_finding(
        "hypothetical_captions", "With a swapped noun in a hypothetical caption, cross-attention follows it to the "
        "object it now names.", v,
        [_effect("follow rate - same-step baseline, last layer", +1,
                 [_minus(_last(f), _last(s)) for f, s in zip(follow, same)],
                 [_quadrature(_last_se(f), _last_se(s)) for f, s in zip(follow, same)])],
        [by_layer("follow rate", follow), by_layer("same-step baseline", same)]))
    return out


def feature_cosine_finding(variants: Sequence[str], summaries: Sequence[Mapping]) -> dict:
    """Within- vs across-cluster feature cosine, from every model's analysis (the features are the
    data's, so this is one finding for all variants)."""
    same = [s["feature_cosine"]["same"] for s in summaries]
    diff = [s["feature_cosine"]["diff"] for s in summaries]
    same_c, diff_c = combine_seeds(same), combine_seeds(diff)
    return _finding(
        "feature_cosine", "Object features are more similar within thematic clusters than across (seed: cosine "
        "0.50 vs 0.31).", list(variants),
        [_effect("within - across cluster cosine", +1, [_minus(a, b) for a, b in zip(same, diff)], None)],
        [{"quantity": "within-cluster cosine", "tests": False, "estimate": same_c["estimate"], "ci95": same_c["ci95"],
          "seed": 0.50},
         {"quantity": "across-cluster cosine", "tests": False, "estimate": diff_c["estimate"], "ci95": diff_c["ci95"],
          "seed": 0.31}])


# -- the geometry findings ---------------------------------------------------------------------------

def _comparison(comparisons: Sequence[Mapping], a: str, b: str, metric: str) -> Optional[Mapping]:
    for c in comparisons:
        if c["a"] == a and c["b"] == b and c["metric"] == metric:
            return c
    return None


def _bootstrap_effect(comparisons, a, b, metric, label) -> dict:
    c = _comparison(comparisons, a, b, metric)
    ci = None if c is None else c["ci95"]
    return {"quantity": f"{label}, {a} - {b}", "tests": True, "claimed": "> 0", "claimed_sign": 1,
            "estimate": None if c is None else c["difference"], "ci95": ci, "state": _effect_state(ci, 1),
            "interval": "hierarchical paired bootstrap (seeds and test images)" if c is not None
            else f"not measured: variant {a!r} or {b!r} absent"}


def _bootstrap_context(comparisons, a, b, metric, label) -> dict:
    effect = _bootstrap_effect(comparisons, a, b, metric, label)
    effect.pop("claimed"), effect.pop("claimed_sign"), effect.pop("state")
    effect["tests"] = False
    return effect


def geometry_findings(comparisons: Sequence[Mapping], uses: Mapping[str, Mapping[str, int]]) -> list[dict]:
    """The geometry findings from the bootstrap's ``comparisons``; ``uses``: variant -> relation
    name -> relation uses over all seeds (context: how much each per-relation number rests on)."""
    from geocap.data.relations import RELATIONS

    per_relation = [_bootstrap_context(comparisons, "ort", "none", f"relation_accuracy.{r}",
                                       f"relation accuracy '{r}'") for r in RELATIONS]
    for item, r in zip(per_relation, RELATIONS):
        item["uses"] = {v: uses.get(v, {}).get(r) for v in ("ort", "none")}
    out = [
        _finding("geometry_captions", "ORT's box geometry improves captions over the same transformer without it "
                 "(Herdade et al. 2019, CIDEr-D on COCO).", ["ort", "none"],
                 [_bootstrap_effect(comparisons, "ort", "none", "cider_d", "CIDEr-D")],
                 [_bootstrap_context(comparisons, "ort", "none", m, label)
                  for m, label in (("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"))]),
        _finding("geometry_relations", "ORT's geometry makes the spatial relations the captions state more often "
                 "correct (relation accuracy; per relation below).", ["ort", "none"],
                 [_bootstrap_effect(comparisons, "ort", "none", "relation_accuracy", "relation accuracy")],
                 per_relation),
    ]
    for group, names in RELATION_GROUPS.items():
        context = []
        for r in names:
            item = _bootstrap_context(comparisons, "directional", "ort", f"relation_accuracy.{r}",
                                      f"relation accuracy '{r}'")
            item["uses"] = {v: uses.get(v, {}).get(r) for v in ("directional", "ort")}
            context.append(item)
        out.append(_finding(
            f"directional_{group.replace('/', '_')}",
            f"ORT's |dx|, |dy| embedding cannot tell {' from '.join(names)}; a direction-aware (signed) embedding "
            f"should state them correctly more often (the study's hypothesis, not the seed's).",
            ["directional", "ort"],
            [_bootstrap_effect(comparisons, "directional", "ort", f"relation_accuracy.{group}",
                               f"relation accuracy {group}")], context))
    return out
