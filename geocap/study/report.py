"""``study.md``, ``study.html`` and the study's figures, from the dict :func:`geocap.study.summary.summarize`
returned (plus ``settings`` when the runner added them).

Figures (matplotlib's Agg canvas, no pyplot; the helpers of :mod:`geocap.analysis.plotting`):
``val_curves.png`` (validation CIDEr-D against step, one line per model), ``attention_layers.png``
(normalised entropy per kind, Spearman of attention with distance, thematic affinity and grounding
accuracy by layer, per variant, with 95% intervals across seeds) and ``metrics.png`` (each metric's
mean per variant with its bootstrap interval). Every file is written atomically.
"""
from __future__ import annotations

import json
import os

import numpy as np

from geocap.data.atomic import write_text_atomic

from .findings import ENTROPY_KINDS, by_layer
from .stats import METRICS, RELATION_GROUPS

__all__ = ["FIGURES", "format_number", "format_interval", "write_report"]

FIGURES = {"val_curves": "val_curves.png", "attention": "attention_layers.png", "metrics": "metrics.png"}
VARIANT_COLOURS = {"ort": "#1f77b4", "none": "#7f7f7f", "directional": "#d62728"}
METRIC_LABELS = {"cider_d": "CIDEr-D", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "relation_accuracy": "relation acc."}

BOOTSTRAP_TEXT = (
    "**Intervals of the caption metrics** (hierarchical paired bootstrap, {n_boot} replicates, numpy "
    "`default_rng({seed})`): each replicate draws the seeds with replacement (one draw of seed positions shared by "
    "every variant, so seed k of one variant is paired with seed k of another) and the test images with "
    "replacement (one draw shared by every seed and every variant, so differences between variants are paired), "
    "computes each drawn seed's metric on the drawn images from per-image statistics (CIDEr-D per image with the "
    "document frequencies of the whole test set, BLEU-4 from summed clipped n-gram counts and lengths, ROUGE-L per "
    "image, relation accuracy = correct / uses) and averages over the drawn seeds. The mean is the mean over seeds "
    "on all test images; the interval the 2.5th and 97.5th percentiles of the replicates. A difference a - b uses "
    "the same replicates; 'excludes 0' marks a difference beyond seed and image sampling.")
COMBINE_TEXT = (
    "**Intervals of the attention findings** (across seeds): per seed the analysis gives an estimate and, for the "
    "by-layer rates, its standard error over images (geocap.analysis.uncertainty). The estimate is the mean over "
    "the K seeds; its standard error sqrt(max(between-seed variance, mean within-seed se^2) / K); the interval "
    "+- Student's t(0.975, K - 1) times that. With one seed: +- 1.96 se (image sampling only); without a "
    "standard error and one seed: no interval.")
VERDICT_TEXT = (
    "**Verdict rule**: each claim is one or more pre-specified effects with a claimed sign (layer 1 vs the last "
    "layer; never chosen after looking). An effect holds when its 95% interval excludes 0 in the claimed "
    "direction and contradicts the claim when it excludes 0 in the other direction. A finding **holds** when "
    "every effect holds, **does not hold** when any contradicts, and is **inconclusive** otherwise (also when "
    "there are too few data for an interval). Nothing was tuned to make a finding appear.")
DATA_TEXT = (
    "**Why this data can differ from the seed's COCO results.** The models are trained on geocap's embedded "
    "synthetic scenes (geocap.data.synth), not COCO: 25 categories in 6 fixed thematic clusters, 3 to 12 objects "
    "per image, 80% of them from the image's theme cluster, parts (wheels, windows, screens, sails) placed at "
    "fixed places inside their wholes and objects resting on supports; five captions per image from a small "
    "grammar naming whole category groups with exact counts, whose relation phrases are read off the boxes "
    "(geocap.data.relations) with 'left of' and 'right of' equally likely; object features are synthetic "
    "vectors calibrated so that their cosines are 0.60 within a category, 0.50 within a cluster and 0.31 "
    "across clusters (the seed's figures by construction, so the feature-cosine finding checks the calibration, "
    "not a learned property). Clusters are thus exact and given, nouns map one-to-one to categories, the "
    "vocabulary is tiny and every caption is short, so a model may need less depth to ground nouns, attend "
    "within clusters, or concentrate attention than on COCO's open-ended scenes and detector features; a "
    "finding that differs here may reflect the data rather than the model.")


def format_number(x) -> str:
    """How study.md shows a number: 4 decimals; "-" for None."""
    return "-" if x is None else f"{x:.4f}"


def format_interval(ci) -> str:
    """``[lo, hi]`` with :func:`format_number`; "[no interval]" for None."""
    return "[no interval]" if ci is None else f"[{format_number(ci[0])}, {format_number(ci[1])}]"


def _table(header: list, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _settings_lines(settings) -> list[str]:
    if not settings:
        return []
    rows = [[key, f"`{json.dumps(value)}`"] for key, value in settings.items()]
    return ["## Settings", ""] + _table(["setting", "value"], rows)


def _variant_lines(variants: dict) -> list[str]:
    rows = []
    for v, entry in variants.items():
        rows.append([v, len(entry["seeds"])] + [f"{format_number(entry['mean'][m])} {format_interval(entry['ci95'][m])}"
                                                for m in METRICS])
    lines = ["## Caption metrics per variant", "", "Mean over seeds [95% interval, hierarchical paired bootstrap].",
             ""] + _table(["variant", "seeds"] + [METRIC_LABELS[m] for m in METRICS], rows)
    rows = []
    for v, entry in variants.items():
        for s in entry["seeds"]:
            ev = s["evaluate"]
            rows.append([v, s["seed"], s["n_images"]] + [f"{format_number(s[m])} ({format_number(ev.get(m))})"
                                                         for m in METRICS]
                        + [f"{s['tokenizer']} ({s['evaluate_tokenizer']})"])
    lines += ["Per seed, recomputed from the per-image statistics (in brackets: as `geocap evaluate` wrote them; "
              "they agree when the same tokenizer ran):", ""]
    lines += _table(["variant", "seed", "images"] + [METRIC_LABELS[m] for m in METRICS] + ["tokenizer"], rows)
    return lines


def _convergence_lines(variants: dict) -> list[str]:
    rows, verdicts = [], []
    for v, entry in variants.items():
        for s in entry["seeds"]:
            c = s.get("convergence") or {}
            gain, converged = c.get("gain_last_fifth"), c.get("converged")
            rows.append([v, s["seed"], "-" if gain is None else f"{100 * gain:+.1f} %",
                         "unknown" if converged is None else ("yes" if converged else "**no**")])
            verdicts.append(converged)
    summary = ("every model has converged by this criterion" if all(verdicts) else
               "**not every model has converged by this criterion**: read the comparisons as those of models "
               "trained for this budget, not of converged ones")
    return ["## Convergence", "",
            "Gain of validation CIDEr-D over the last fifth of training (its mean over validations after 80 % of "
            "the steps over its mean between 60 and 80 %, minus 1); converged when under 2 % "
            f"(the study's convergence criterion): {summary}.", ""] + _table(
                ["variant", "seed", "gain, last fifth", "converged"], rows) + [""]


def _relation_lines(variants: dict) -> list[str]:
    names = list(next(iter(variants.values()))["mean"]["relations"])
    rows = []
    for name in names:
        row = [name]
        for v, entry in variants.items():
            m = entry["mean"]["relations"][name]
            row.append(f"{format_number(m['accuracy'])} {format_interval(entry['ci95']['relations'][name])} "
                       f"({m['uses']} uses)")
        rows.append(row)
    for group in RELATION_GROUPS:
        row = [f"**{group}**"]
        for v, entry in variants.items():
            m = entry["mean"]["relation_groups"][group]
            row.append(f"{format_number(m['accuracy'])} {format_interval(entry['ci95']['relation_groups'][group])} "
                       f"({m['uses']} uses)")
        rows.append(row)
    return ["## Relation accuracy per relation", "",
            "Correct uses / uses of each relation phrase in the generated captions, judged against the boxes; mean "
            "over seeds [95% interval] (uses over all seeds).", ""] + _table(["relation"] + list(variants), rows)


def _comparison_lines(comparisons: list) -> list[str]:
    if not comparisons:
        return ["## Paired differences", "", "Only one variant: no comparisons.", ""]
    rows = [[f"{c['a']} - {c['b']}", c["metric"], format_number(c["difference"]), format_interval(c["ci95"]),
             "yes" if c["excludes_zero"] else "no"] for c in comparisons]
    return ["## Paired differences between variants", ""] + \
        _table(["difference", "metric", "estimate", "95% interval", "excludes 0"], rows)


def _measured(item: dict) -> str:
    if item.get("by_layer") is not None:
        return f"{item['quantity']} by layer: " + "; ".join(
            f"L{r['layer']} {format_number(r['estimate'])} {format_interval(r['ci95'])}" for r in item["by_layer"])
    if item.get("by_layer", 0) is None:
        return f"{item['quantity']}: not computed"
    parts = [item["quantity"]]
    if "estimate" in item:
        parts.append(f"{format_number(item['estimate'])} {format_interval(item['ci95'])}")
    if "claimed" in item:
        parts.append(f"(claimed {item['claimed']}: {item['state']})")
    if "seed" in item:
        parts.append(f"(seed {item['seed']:.2f})")
    if "layer_1" in item:
        parts.append(f"layer 1 {item['layer_1']:.2f}, deeper {item['deeper']:.2f}")
    if item.get("uses"):
        parts.append("(uses " + ", ".join(f"{v} {u}" for v, u in item["uses"].items()) + ")")
    return " ".join(parts)


def _finding_lines(findings: list) -> list[str]:
    rows = []
    for f in findings:
        tests = "; ".join(_measured(m) for m in f["measured"] if m.get("tests"))
        rows.append([f["name"], ", ".join(f["variants"]), f"**{f['verdict']}**", tests])
    lines = ["## Findings", "", VERDICT_TEXT, ""] + _table(["finding", "variants", "verdict", "tested effects"], rows)
    for f in findings:
        lines += [f"### {f['name']} ({', '.join(f['variants'])}): {f['verdict']}", "", f"Claim: {f['seed_claim']}", ""]
        lines += [f"- {_measured(m)}" for m in f["measured"]]
        intervals = sorted({m["interval"] for m in f["measured"] if m.get("interval")})
        lines += [f"- interval: {i}" for i in intervals] + [""]
    return lines


def _markdown(study: dict) -> str:
    variants = study["variants"]
    ci = next(iter(variants.values()))["ci95"]
    lines = ["# Study: ORT geometry variants and the seed study's findings", "",
             f"Variants: {', '.join(variants)}; seeds per variant: "
             + ", ".join(f"{v} {len(e['seeds'])}" for v, e in variants.items()) + ". Numbers: `study.json`.", ""]
    if any(len(e["seeds"]) == 1 for e in variants.values()):
        lines += ["**One seed only**: the intervals cover image sampling only, not the variation between training "
                  "seeds.", ""]
    lines += _settings_lines(study.get("settings"))
    lines += _variant_lines(variants)
    lines += [f"![caption metrics]({FIGURES['metrics']})", "", f"![validation CIDEr-D]({FIGURES['val_curves']})", ""]
    lines += _convergence_lines(variants)
    lines += _comparison_lines(study["comparisons"])
    lines += _relation_lines(variants)
    lines += _finding_lines(study["findings"])
    lines += [f"![attention by layer]({FIGURES['attention']})", ""]
    lines += ["## Methods", "", BOOTSTRAP_TEXT.format(n_boot=ci.get("n_boot"), seed=ci.get("seed")), "",
              COMBINE_TEXT, "", VERDICT_TEXT, "", DATA_TEXT, ""]
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------------------------

def _plot_val_curves(variants: dict, path) -> None:
    from geocap.analysis.plotting import mark_missing, new_figure, save_figure

    fig, (ax,) = new_figure(1)
    drawn = False
    for v, entry in variants.items():
        for k, s in enumerate(entry["seeds"]):
            if s["val_curve"]:
                steps, values = zip(*s["val_curve"])
                ax.plot(steps, values, marker=".", color=VARIANT_COLOURS[v], alpha=0.8,
                        label=v if k == 0 else None, linestyle=("-", "--", ":", "-.")[k % 4])
                drawn = True
    if not drawn:
        mark_missing(ax, "validation CIDEr-D", "no validation curve recorded")
    else:
        ax.set_xlabel("training step")
        ax.set_ylabel("validation CIDEr-D")
        ax.set_title("validation CIDEr-D per model (line style: seed)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _band(ax, rows, **style) -> bool:
    est = np.array([np.nan if r["estimate"] is None else r["estimate"] for r in rows])
    if not np.isfinite(est).any():
        return False
    layers = np.arange(1, len(rows) + 1)
    ax.plot(layers, est, marker="o", **style)
    lo = np.array([np.nan if r["ci95"] is None else r["ci95"][0] for r in rows])
    hi = np.array([np.nan if r["ci95"] is None else r["ci95"][1] for r in rows])
    ax.fill_between(layers, lo, hi, color=style.get("color"), alpha=0.15)
    return True


def _plot_attention(variants: dict, path) -> None:
    from geocap.analysis.plotting import ATTENTION_COLOURS, layer_axis, mark_missing, new_figure, save_figure

    fig, axes = new_figure(4)
    panels = [("normalised entropy", [f"entropy_{k}" for k in ENTROPY_KINDS]),
              ("Spearman(attention, distance)", ["proximity_distance"]),
              ("thematic affinity (1 = chance)", ["affinity"]),
              ("grounding accuracy", ["grounding"])]
    styles = ("-", "--", ":")
    for ax, (title, keys) in zip(axes, panels):
        drawn = False
        for k, (v, entry) in enumerate(variants.items()):
            for key in keys:
                rows = by_layer(key, [s["attention"][key] for s in entry["seeds"]])["by_layer"]
                if rows is None:
                    continue
                if len(keys) > 1:
                    style = {"color": ATTENTION_COLOURS[key.removeprefix("entropy_")], "linestyle": styles[k % 3],
                             "label": f"{key.removeprefix('entropy_')} ({v})"}
                else:
                    style = {"color": VARIANT_COLOURS[v], "label": v}
                drawn |= _band(ax, rows, **style)
        if not drawn:
            mark_missing(ax, title, "no model has these values")
            continue
        if keys == ["affinity"]:
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        if keys == ["proximity_distance"]:
            ax.axhline(0.0, color="gray", linestyle="--", linewidth=0.8)
        layer_axis(ax)
        ax.set_title(f"{title}, 95% across seeds", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_metrics(variants: dict, path) -> None:
    from geocap.analysis.plotting import new_figure, save_figure

    fig, axes = new_figure(len(METRICS))
    for ax, m in zip(axes, METRICS):
        names = list(variants)
        means = [variants[v]["mean"][m] for v in names]
        cis = [variants[v]["ci95"][m] for v in names]
        x = np.arange(len(names))
        heights = [np.nan if y is None else y for y in means]
        low = [0 if y is None or c is None else y - c[0] for y, c in zip(means, cis)]
        high = [0 if y is None or c is None else c[1] - y for y, c in zip(means, cis)]
        ax.bar(x, heights, yerr=[low, high], capsize=4, color=[VARIANT_COLOURS[v] for v in names])
        ax.set_xticks(x, names)
        ax.set_title(f"{METRIC_LABELS[m]} (95% bootstrap)")
    save_figure(fig, path)


def write_report(study: dict, out_dir) -> None:
    """Write ``study.md``, ``study.html`` and the figures of :data:`FIGURES` into ``out_dir`` (created
    when missing), each atomically. ``study``: :func:`~geocap.study.summary.summarize`'s dict, with
    ``settings`` when present."""
    from geocap.analysis.report import _report_html

    if not isinstance(study, dict) or not study.get("variants"):
        raise ValueError("write_report: study must be summarize()'s dict with at least one variant")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    variants = study["variants"]
    text = _markdown(study)
    _plot_val_curves(variants, os.path.join(out_dir, FIGURES["val_curves"]))
    _plot_attention(variants, os.path.join(out_dir, FIGURES["attention"]))
    _plot_metrics(variants, os.path.join(out_dir, FIGURES["metrics"]))
    write_text_atomic(os.path.join(out_dir, "study.md"), text)
    write_text_atomic(os.path.join(out_dir, "study.html"), _report_html(text, title="Study"))
