"""The findings of the seed study, 'On the Interplay between Language and Vision in Transformers'
(Ilinykh 2022), each with a verdict on a study's models.

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
* proximity: the *controlled* measure when analysis.json has it (``proximity.per_image``:
  ``distance_given_similarity``, the per-image within-row rank correlation of attention with box
  distance partial on feature similarity, else ``distance``, the same without the partialling):
  layer 1 < 0 (near objects get more) and last - first > 0 (deeper layers more global); se from
  each layer's 95 % interval over images (half-width / 1.96), that of the change the two layers'
  in quadrature (conservative: their covariance is positive). Without it (an analysis.json from
  before the controlled measures) the pooled Spearman, whose intervals rest on the seeds alone,
  and the finding says so (``measure``).
* thematic: the controlled measure when present (``thematic.per_image``:
  ``cluster_given_similarity``, the within-row correlation of attention with "same cluster"
  partial on feature similarity, else ``cluster``; 0 for attention that follows feature similarity
  alone): layer 1 > 0 and last - first < 0; else the affinity (layer-1 affinity - 1 > 0 and
  last - first < 0), said so.
* grounding: the controlled *referent effect* when present (``grounding.referent_effect``: the
  hit rate of the noun's own referent minus that of a wrong one, 0 for "looks at some object"):
  last layer > 0 and last - first > 0; else the accuracy (last - first > 0), said so.
* hypothetical captions: in the last layer, follow rate - same-step baseline > 0 (se: both rates'
  standard errors added in quadrature, ignoring their positive covariance: conservative).
* geometry (caption metrics, paired t over seeds, :func:`geocap.study.stats.seed_intervals`):
  ort - none CIDEr-D > 0 and relation accuracy > 0 (the seed's claim); ort - absolute CIDEr-D > 0
  and relation accuracy > 0 (ORT's *relative* geometry against simply giving the boxes: the
  study's hypothesis); directional - ort relation accuracy on left/right and on above/below > 0.

**Controls.** Every attention effect is also measured on each seed's *untrained* model (the same
architecture at the initialisation its training began from, through the same dump and analyses):
``control`` gives the untrained value and the trained - untrained difference per seed combined
like the effect, and ``learned`` whether that difference excludes 0 in the claimed direction. The
verdict is the trained effect's (the seed's claims are about trained models); the control says
whether the effect is learned or already a property of the untrained architecture and data. Every
relation finding compares every variant with the *blind captioner* (:mod:`geocap.study.blind`):
its value with an interval over test images, and each variant - blind with a paired t over seeds.

The feature cosine (within- vs across-cluster cosine of the object features) is a *data check*
(:func:`feature_cosine_check`), not a finding: the synthetic features are calibrated to the seed's
0.50 / 0.31 by construction.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

from .stats import Z95, RELATION_GROUPS, combine_seeds, excludes_zero
from geocap.errors import DataError

__all__ = ["ENTROPY_KINDS", "VERDICTS", "attention_findings", "attention_summary", "by_layer", "controlled_curve",
           "feature_cosine_check", "geometry_findings", "verdict"]

VERDICTS = ("holds", "does not hold", "inconclusive")
ENTROPY_KINDS = ("encoder_self", "decoder_self", "cross")
SEED = "Ilinykh 2022, ORT on COCO"


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


def controlled_curve(rows) -> Optional[dict]:
    """The curve dict of a controlled measure: ``rows`` a list over layers of ``{"mean", "ci95":
    [lo, hi], "images"}`` (a layer may be None) as the analyses write them; se per layer = half the
    interval's width / 1.96; the change's se the first and last layers' in quadrature. None when
    ``rows`` is not such a list. ValueError naming the layer for a malformed row."""
    if not isinstance(rows, list) or not rows:
        return None
    values, ses = [], []
    for layer, row in enumerate(rows, 1):
        if row is None:
            values.append(None), ses.append(None)
            continue
        try:
            mean, ci = row["mean"], row["ci95"]
            values.append(None if mean is None else float(mean))
            ses.append(None if ci is None else (float(ci[1]) - float(ci[0])) / (2 * Z95))
        except (KeyError, TypeError, ValueError, IndexError):
            raise DataError(f"controlled measure, layer {layer}: expected {{'mean', 'ci95': [lo, hi], 'images'}}, "
                             f"got {row!r}") from None
    change = None if values[0] is None or values[-1] is None else values[-1] - values[0]
    change_se = _quadrature(ses[0], ses[-1])
    return {"values": values, "se": ses, "change": change, "change_se": change_se}


def _controlled(section: Mapping, key: str, names: Sequence[str] = ()) -> tuple[Optional[dict], Optional[str]]:
    """(curve, the measure's name) of the controlled measure ``section[key]``: a list over layers, or a
    dict of them from which the first of ``names`` that is present is taken (the analyses' own order:
    the measure partial on feature similarity first); (None, None) when absent."""
    got = section.get(key)
    if isinstance(got, list):
        return controlled_curve(got), key
    if isinstance(got, dict):
        for name in names:
            if isinstance(got.get(name), list) and any(row is not None for row in got[name]):
                return controlled_curve(got[name]), f"{key}.{name}"
    return None, None


def attention_summary(analysis: Mapping) -> dict:
    """The by-layer quantities of one model's ``analysis.json`` the findings and the report use:
    ``entropy_<kind>`` (normalised entropy), ``proximity_distance`` (pooled Spearman with box
    distance), ``affinity`` (thematic, 1 = chance), ``grounding`` (accuracy), ``follow`` and
    ``same_step`` (hypothetical follow rate and its baseline), each a curve dict or None; the
    controlled measures when the analyses wrote them (else None): ``proximity_controlled``
    (``proximity.per_image``: ``distance_given_similarity``, else ``distance``),
    ``thematic_controlled`` (``thematic.per_image``: ``cluster_given_similarity``, else ``cluster``;
    0 = attention that follows feature similarity alone) and ``referent_effect``
    (``grounding.referent_effect``), with ``measures`` naming the key each came from;
    ``feature_cosine`` ``{"same", "diff"}``, ``grounding_chance``.
    ValueError when a section is missing."""
    try:
        ent, prox, them, gr = (analysis[k] for k in ("entropy", "proximity", "thematic", "grounding"))
    except (KeyError, TypeError) as err:
        raise DataError(f"analysis.json: section {err} missing") from None
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
    measures = {}
    out["proximity_controlled"], measures["proximity"] = _controlled(
        prox, "per_image", ("distance_given_similarity", "distance"))
    out["thematic_controlled"], measures["thematic"] = _controlled(
        them, "per_image", ("cluster_given_similarity", "cluster"))
    out["referent_effect"], measures["grounding"] = _controlled(gr, "referent_effect")
    out["measures"] = measures
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


LEARNED = {"holds": "learned (trained - untrained excludes 0 in the claimed direction)",
           "contradicts": "weaker than untrained (trained - untrained excludes 0 against the claim)",
           "inconclusive": "not distinguishable from the untrained control"}


def _clean(values: Sequence) -> list:
    return [None if e is None or not math.isfinite(float(e)) else float(e) for e in values]


def _effect(quantity: str, sign: int, estimates: Sequence, ses: Optional[Sequence],
            untrained: Optional[tuple] = None) -> dict:
    """One tested effect from per-seed ``estimates`` and ``ses``; ``untrained``: (estimates, ses) of
    the same effect on each seed's untrained control, in the same seed order, or None."""
    combined = combine_seeds(estimates, ses)
    effect = {"quantity": quantity, "tests": True, "claimed": "> 0" if sign > 0 else "< 0", "claimed_sign": sign,
              "estimate": combined["estimate"], "ci95": combined["ci95"],
              "state": _effect_state(combined["ci95"], sign), "per_seed": _clean(estimates),
              "seeds": combined["seeds"], "interval": combined["method"]}
    if untrained is not None:
        u_est, u_ses = untrained
        control = combine_seeds(u_est, u_ses)
        diff_est = [_minus(t, u) for t, u in zip(estimates, u_est)]
        diff_se = None if ses is None or u_ses is None else [_quadrature(a, b) for a, b in zip(ses, u_ses)]
        diff = combine_seeds(diff_est, diff_se)
        state = _effect_state(diff["ci95"], sign)
        effect["control"] = {"kind": "untrained", "estimate": control["estimate"], "ci95": control["ci95"],
                             "per_seed": _clean(u_est), "difference": diff["estimate"],
                             "difference_ci95": diff["ci95"], "difference_per_seed": _clean(diff_est),
                             "learned": state, "meaning": LEARNED[state]}
    return effect


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


def _finding(name: str, claim: str, variants: list, effects: list, context: list, **extra) -> dict:
    controls = [{"quantity": e["quantity"], **e["control"]} for e in effects if e.get("control")]
    out = {"name": name, "seed_claim": claim, "measured": effects + context, "verdict": verdict(effects),
           "variants": variants, **extra}
    if controls:
        out["control"] = controls
    return out


def _at(curve, layer: int):
    """(value, se) of ``curve`` at ``layer`` (0 = first, -1 = last); (None, None) without it."""
    if curve is None:
        return None, None
    return curve["values"][layer], (curve["se"][layer] if curve["se"] else None)


def _change_of(curve):
    if curve is None or len(curve["values"]) < 2:
        return None, None
    return curve["change"], curve["change_se"]


def _minus(a, b):
    return None if a is None or b is None else a - b


def _quadrature(a, b):
    return None if a is None or b is None else math.sqrt(a * a + b * b)


# -- the attention findings --------------------------------------------------------------------------

def _measured(quantity: str, sign: int, trained: Sequence[Mapping], untrained: Optional[Sequence[Mapping]],
              get: Callable[[Mapping], tuple]) -> dict:
    """The effect ``get(summary) -> (estimate, se)`` over the seeds, with its untrained control."""
    t = [get(s) for s in trained]
    control = None
    if untrained is not None:
        u = [get(s) for s in untrained]
        control = ([e for e, _ in u], [se for _, se in u])
    return _effect(quantity, sign, [e for e, _ in t], [se for _, se in t], control)


def attention_findings(variant: str, summaries: Sequence[Mapping],
                       untrained: Optional[Sequence[Mapping]] = None) -> list[dict]:
    """The attention findings of one variant from its seeds' :func:`attention_summary` dicts and,
    when given, those of the seeds' untrained controls (same seed order). ValueError when the two
    differ in length."""
    if untrained is not None and len(untrained) != len(summaries):
        raise DataError(f"variant {variant!r}: {len(summaries)} trained models but {len(untrained)} untrained ones")
    v = [variant]
    out = []

    def effect(quantity, sign, get):
        return _measured(quantity, sign, summaries, untrained, get)

    for kind in ENTROPY_KINDS:
        key = f"entropy_{kind}"
        out.append(_finding(
            key, f"Attention entropy falls with depth ({kind.replace('_', ' ')} attention): deeper "
            f"layers concentrate on fewer objects or words ({SEED}).", v,
            [effect("normalised entropy, last layer - layer 1", -1, lambda s, k=key: _change_of(s[k]))],
            [by_layer("normalised entropy", [s[key] for s in summaries])], measure="normalised entropy"))

    claim = ("Early layers attend to near objects, deeper layers more globally (correlation of encoder attention "
             "with box-centre distance: negative in layer 1, closer to 0 deeper).")
    if all(s.get("proximity_controlled") is not None for s in summaries):
        measure = summaries[0]["measures"]["proximity"]
        label = f"controlled correlation ({measure})"
        key = "proximity_controlled"
    else:
        measure = "pooled Spearman (the controlled proximity.per_image is absent from analysis.json: intervals " \
                  "from the seeds alone, and the pooled measure is confounded by feature similarity)"
        label, key = "Spearman(attention, distance)", "proximity_distance"
    out.append(_finding(
        "proximity", claim, v,
        [effect(f"{label} in layer 1", -1, lambda s: _at(s[key], 0)),
         effect(f"{label}, last layer - layer 1", +1, lambda s: _change_of(s[key]))],
        [by_layer(label, [s[key] for s in summaries])], measure=measure))

    claim = "Early layers attend within thematic clusters more than chance, deeper layers less so."
    if all(s.get("thematic_controlled") is not None for s in summaries):
        null = 0.0
        measure = f"controlled ({summaries[0]['measures']['thematic']}: correlation of attention with 'same " \
                  f"cluster' within each query's row; 0 = attention that follows feature similarity alone)"
        label, key = f"controlled correlation ({summaries[0]['measures']['thematic']})", "thematic_controlled"
    else:
        null = 1.0
        measure = "affinity, 1 = chance (the controlled thematic.per_image is absent from analysis.json; " \
                  "attention that follows feature similarity alone also scores above 1)"
        label, key = "affinity", "affinity"
    out.append(_finding(
        "thematic_affinity", claim, v,
        [effect(f"{label} in layer 1" if null == 0 else f"{label} - {null:g} in layer 1", +1,
                lambda s: (_minus(_at(s[key], 0)[0], null), _at(s[key], 0)[1])),
         effect(f"{label}, last layer - layer 1", -1, lambda s: _change_of(s[key]))],
        [by_layer(label, [s[key] for s in summaries])], measure=measure))

    claim = ("Deeper cross-attention points nouns at their objects more than early layers (Ilinykh 2022: "
             "about 16% in layer 1, about 29% deeper).")
    chance = combine_seeds([s.get("grounding_chance") for s in summaries])
    context = [by_layer("grounding accuracy", [s["grounding"] for s in summaries]),
               {"quantity": "chance (1/N)", "tests": False, "estimate": chance["estimate"], "ci95": chance["ci95"]},
               {"quantity": "Ilinykh 2022's values", "tests": False, "layer_1": 0.16, "deeper": 0.29}]
    if all(s.get("referent_effect") is not None for s in summaries):
        measure = "referent effect (own referent's hit rate - a wrong referent's; 0 = looks at some object)"
        effects = [effect("referent effect, last layer", +1, lambda s: _at(s["referent_effect"], -1)),
                   effect("referent effect, last layer - layer 1", +1, lambda s: _change_of(s["referent_effect"]))]
        context = [by_layer("referent effect", [s["referent_effect"] for s in summaries])] + context
    else:
        measure = "grounding accuracy (the controlled referent_effect is absent from analysis.json; accuracy " \
                  "also counts attention to *some* object)"
        effects = [effect("grounding accuracy, last layer - layer 1", +1, lambda s: _change_of(s["grounding"]))]
    out.append(_finding("grounding", claim, v, effects, context, measure=measure))

    def follow_minus_same(s):
        (f, f_se), (b, b_se) = _at(s["follow"], -1), _at(s["same_step"], -1)
        return _minus(f, b), _quadrature(f_se, b_se)

    out.append(_finding(
        "hypothetical_captions", "With a swapped noun in a hypothetical caption, cross-attention follows it to the "
        "object it now names.", v,
        [effect("follow rate - same-step baseline, last layer", +1, follow_minus_same)],
        [by_layer("follow rate", [s["follow"] for s in summaries]),
         by_layer("same-step baseline", [s["same_step"] for s in summaries])],
        measure="follow rate against the same-step baseline"))
    return out


def feature_cosine_check(variants: Sequence[str], summaries: Sequence[Mapping]) -> dict:
    """The data check of within- vs across-cluster feature cosine, from every model's analysis (the
    features are the data's: one check for all variants). Not a finding: the synthetic features are
    calibrated to the seed's values, so this checks the calibration. ``{"name", "claim",
    "measured", "result", "variants", "note"}``; ``result`` is the verdict rule's."""
    same = [s["feature_cosine"]["same"] for s in summaries]
    diff = [s["feature_cosine"]["diff"] for s in summaries]
    same_c, diff_c = combine_seeds(same), combine_seeds(diff)
    effects = [_effect("within - across cluster cosine", +1, [_minus(a, b) for a, b in zip(same, diff)], None)]
    return {"name": "feature_cosine", "claim": "Object features are more similar within thematic clusters than "
            "across (Ilinykh 2022: cosine 0.50 vs 0.31).", "variants": list(variants), "result": verdict(effects),
            "measured": effects + [
                {"quantity": "within-cluster cosine", "tests": False, "estimate": same_c["estimate"],
                 "ci95": same_c["ci95"], "seed": 0.50},
                {"quantity": "across-cluster cosine", "tests": False, "estimate": diff_c["estimate"],
                 "ci95": diff_c["ci95"], "seed": 0.31}],
            "note": "the synthetic features are calibrated to Ilinykh 2022's cosines by construction "
                    "(geocap.data.synth): this checks the data, it is not a finding about the models"}


# -- the geometry findings ---------------------------------------------------------------------------

def _comparison(comparisons: Sequence[Mapping], a: str, b: str, metric: str) -> Optional[Mapping]:
    for c in comparisons:
        if c["a"] == a and c["b"] == b and c["metric"] == metric:
            return c
    return None


def _comparison_effect(comparisons, a, b, metric, label, *, tests: bool = True) -> dict:
    """The paired difference ``a - b`` of ``metric`` (claimed > 0 when ``tests``, else context)."""
    c = _comparison(comparisons, a, b, metric)
    ci = None if c is None else c["ci95"]
    effect = {"quantity": f"{label}, {a} - {b}", "tests": tests, "estimate": None if c is None else c["difference"],
              "ci95": ci, "per_seed": None if c is None else c.get("per_seed"),
              "interval": c.get("interval", "") if c is not None else f"not measured: {a!r} or {b!r} absent"}
    if tests:
        effect.update(claimed="> 0", claimed_sign=1, state=_effect_state(ci, 1))
    return effect


def _blind_control(controls: Mapping, comparisons, variants: Sequence[str], control: str, metric: str,
                   label: str) -> tuple[list, list]:
    """(context items: each variant - the blind captioner, the finding's ``control`` entries)."""
    got = controls.get(control)
    if got is None:
        return [], []
    context = [_comparison_effect(comparisons, v, control, metric, label, tests=False) for v in variants]
    value = {"quantity": f"{label}, {control}", "kind": "blind", "estimate": got["mean"].get(metric),
             "ci95": got["ci95"].get(metric), "interval": got.get("interval", "")}
    return context, [value]


def geometry_findings(comparisons: Sequence[Mapping], uses: Mapping[str, Mapping[str, int]],
                      controls: Optional[Mapping] = None, variants: Sequence[str] = ()) -> list[dict]:
    """The geometry findings from the paired ``comparisons`` (:func:`geocap.study.stats.seed_intervals`);
    ``uses``: variant -> relation name -> relation uses over all seeds (context: how much each
    per-relation number rests on); ``controls``: the blind captioners' values (``"blind"`` over all
    relations, ``"blind <group>"`` per relation group), with which every relation finding compares
    each of ``variants``."""
    from geocap.data.relations import RELATIONS

    controls = controls or {}

    def per_relation(a, b, names):
        items = []
        for r in names:
            item = _comparison_effect(comparisons, a, b, f"relation_accuracy.{r}", f"relation accuracy '{r}'",
                                      tests=False)
            item["uses"] = {v: uses.get(v, {}).get(r) for v in (a, b)}
            items.append(item)
        return items

    cider_context, cider_value = _blind_control(controls, comparisons, variants, "blind", "cider_d", "CIDEr-D")
    out = [
        _finding("geometry_captions", "ORT's box geometry improves captions over the same transformer without it "
                 "(Herdade et al. 2019, CIDEr-D on COCO).", ["ort", "none"],
                 [_comparison_effect(comparisons, "ort", "none", "cider_d", "CIDEr-D")],
                 [_comparison_effect(comparisons, "ort", "none", m, label, tests=False)
                  for m, label in (("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"))] + cider_context),
        _finding("relative_vs_absolute_captions", "ORT's relative geometry improves captions over giving the "
                 "model each object's box as features (the study's hypothesis: 'relative beats absolute').",
                 ["ort", "absolute"], [_comparison_effect(comparisons, "ort", "absolute", "cider_d", "CIDEr-D")],
                 [_comparison_effect(comparisons, "absolute", "none", "cider_d", "CIDEr-D", tests=False)]),
    ]
    if cider_value:
        for finding in out:
            finding["control"] = cider_value
    blind_context, blind_value = _blind_control(controls, comparisons, variants, "blind", "relation_accuracy",
                                                "relation accuracy")
    for name, claim, a, b in (
            ("geometry_relations", "ORT's geometry makes the spatial relations the captions state more often correct "
             "(relation accuracy; per relation below).", "ort", "none"),
            ("relative_vs_absolute_relations", "ORT's relative geometry states relations correctly more often than "
             "a model given each object's box as features (the study's hypothesis).", "ort", "absolute")):
        finding = _finding(name, claim, [a, b],
                           [_comparison_effect(comparisons, a, b, "relation_accuracy", "relation accuracy")],
                           blind_context + per_relation(a, b, RELATIONS))
        if blind_value:
            finding["control"] = blind_value
        out.append(finding)
    for group, names in RELATION_GROUPS.items():
        context, value = _blind_control(controls, comparisons, variants, f"blind {group}",
                                        f"relation_accuracy.{group}", f"relation accuracy {group}")
        finding = _finding(
            f"directional_{group.replace('/', '_')}",
            f"ORT's |dx|, |dy| embedding cannot tell {' from '.join(names)}; a direction-aware (signed) embedding "
            f"should state them correctly more often (the study's hypothesis, not Ilinykh 2022's).",
            ["directional", "ort"],
            [_comparison_effect(comparisons, "directional", "ort", f"relation_accuracy.{group}",
                                f"relation accuracy {group}")], context + per_relation("directional", "ort", names))
        if value:
            finding["control"] = value
        out.append(finding)
    return out
