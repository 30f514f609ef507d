"""``study.md``, ``study.html`` and the study's figures, from the dict :func:`geocap.study.summary.summarize`
returned (plus ``settings`` when the runner added them).

Figures (matplotlib's Agg canvas, no pyplot; the helpers of :mod:`geocap.analysis.plotting`):
``val_curves.png`` (teacher-forced validation loss against step, one panel per variant, a line per
seed, the last fifth's fitted line of the convergence criterion, dashed: the schedule check's
half-length runs), ``attention_layers.png`` (small
multiples: one panel per attention measure, a line per variant, its untrained control dashed, 95%
intervals across seeds clipped to the measure's range; with fewer than 3 seeds no bands but a note
that so few seeds give no useful interval), ``metrics.png`` (each metric's mean per variant with
its interval, the blind captioner's relation accuracy as a line). Legends sit outside the data.
Every file is written atomically.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from geocap.data.atomic import write_text_atomic

from .convergence import LAST_FRACTION
from .findings import by_layer
from .stats import METRICS, RELATION_GROUPS

__all__ = ["FIGURES", "clipped_band", "few_seeds_note", "format_number", "format_interval", "write_report"]

FIGURES = {"val_curves": "val_curves.png", "attention": "attention_layers.png", "metrics": "metrics.png"}
VARIANT_COLOURS = {"ort": "#1f77b4", "none": "#7f7f7f", "directional": "#d62728", "absolute": "#9467bd"}
MIN_SEEDS_FOR_BANDS = 3   # t with 1 degree of freedom (2 seeds) gives intervals too wide to read
# each attention panel: (title, summary keys in order of preference: a controlled measure before its fallback)
ATTENTION_PANELS = (
    ("encoder self: normalised entropy", ("entropy_encoder_self",)),
    ("decoder self: normalised entropy", ("entropy_decoder_self",)),
    ("cross: normalised entropy", ("entropy_cross",)),
    ("proximity (controlled if measured, else pooled Spearman)", ("proximity_controlled", "proximity_distance")),
    ("thematic (controlled if measured, else affinity)", ("thematic_controlled", "affinity")),
    ("grounding (referent effect if measured, else accuracy)", ("referent_effect", "grounding")),
)
# each measure's range (None: unbounded), to which its intervals are clipped
MEASURE_RANGES = {"entropy_encoder_self": (0.0, 1.0), "entropy_decoder_self": (0.0, 1.0), "entropy_cross": (0.0, 1.0),
                  "proximity_controlled": (-1.0, 1.0), "proximity_distance": (-1.0, 1.0),
                  "thematic_controlled": (-1.0, 1.0), "affinity": (0.0, None), "referent_effect": (-1.0, 1.0),
                  "grounding": (0.0, 1.0)}
METRIC_LABELS = {"cider_d": "CIDEr-D", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "relation_accuracy": "relation acc."}

INTERVAL_TEXT = (
    "**Intervals of the caption metrics** (paired t over seeds): each model's metric is computed on all test "
    "images; a variant's value is the mean over its seeds with Student's t interval (K - 1 degrees of freedom); a "
    "difference a - b is the mean over seeds k of metric(a, seed k) - metric(b, seed k) with its t interval, so "
    "image difficulty shared by the models cancels and the interval covers the variation between training seeds "
    "on this test set. Its calibration is tested on simulated null studies with seed and image variance "
    "(tests/test_study_stats.py: the nominal 95% interval excludes 0 in at most 7% of them). With one seed: +- "
    "1.96 standard errors over {n_boot} test-image resamples (image sampling only). The blind captioner is one "
    "deterministic model: its interval is over test-image resamples, and variant - blind is a t over the "
    "variant's seeds.")
COMBINE_TEXT = (
    "**Intervals of the attention findings** (across seeds): per seed the analysis gives an estimate and, for the "
    "by-layer rates and the controlled measures, its standard error over images. The estimate is the mean over "
    "the K seeds; its standard error sqrt(max(between-seed variance, mean within-seed se^2) / K); the interval "
    "+- Student's t(0.975, K - 1) times that. With one seed: +- 1.96 se (image sampling only); without a "
    "standard error and one seed: no interval. The untrained control is each seed's model at the initialisation "
    "its training began from, dumped and analysed the same way; trained - untrained is combined per seed alike.")
CONVERGENCE_TEXT = (
    "**Convergence** (geocap.study.convergence): a straight line fitted to the teacher-forced validation loss "
    "over the last fifth of training; its slope's 95% interval (t, n - 2 degrees of freedom, from the scatter "
    "about the line: the curve's own noise, measured); the steepest fall that interval allows, projected over "
    "one more fifth of the steps, relative to the final loss. Converged when that is under the tolerance. "
    "Caveat: the learning rate decays to 0, so a flat last fifth means the run ended where its schedule meant "
    "it to; it does not say that a longer schedule would gain nothing: the schedule check above answers that.")
SCHEDULE_TEXT = (
    "**Schedule check** (geocap.study.schedule): the first seed(s) of each variant are also trained with half the "
    "steps (the same options, warm-up, data and initialisation; the learning rate decayed to 0 at its own end). "
    "Both final models' teacher-forced validation losses are compared on the same validation images: the gain "
    "of the full schedule is (short - full) / full, with a 95% interval over images (paired). Converged when the "
    "interval's upper end is under the tolerance; not converged when its lower end is at or above it. The "
    "interval carries the images' noise, not the training run's: the seed spread of the final loss beside it "
    "shows the size of that.")
VERDICT_TEXT = (
    "**Verdict rule**: each claim is one or more pre-specified effects with a claimed sign (layer 1 vs the last "
    "layer; never chosen after looking). An effect holds when its 95% interval excludes 0 in the claimed "
    "direction and contradicts the claim when it excludes 0 in the other direction. A finding **holds** when "
    "every effect holds, **does not hold** when any contradicts, and is **inconclusive** otherwise (also when "
    "there are too few data for an interval). Nothing was tuned to make a finding appear.")
DATA_TEXT = (
    "**Why this data can differ from Ilinykh 2022's COCO results.** The models are trained on geocap's embedded "
    "synthetic scenes (geocap.data.synth), not COCO: 25 categories in 6 fixed thematic clusters, 3 to 12 objects "
    "per image, 80% of them from the image's theme cluster, parts (wheels, windows, screens, sails) placed at "
    "fixed places inside their wholes and objects resting on supports; five captions per image from a small "
    "grammar naming whole category groups with exact counts, whose relation phrases are read off the boxes "
    "(geocap.data.relations) with 'left of' and 'right of' equally likely; object features are synthetic "
    "vectors calibrated so that their cosines are 0.60 within a category, 0.50 within a cluster and 0.31 "
    "across clusters (Ilinykh 2022's figures by construction, so the feature-cosine data check checks the "
    "calibration, not a learned property). Clusters are thus exact and given, nouns map one-to-one to categories, the "
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
    how = next(iter(variants.values()))["ci95"].get("interval", "")
    lines = ["## Caption metrics per variant", "", f"Mean over seeds [95% interval: {how}] of the final models.",
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


def _schedule_lines(variants: dict) -> list[str]:
    """The schedule check's table (models that have one) and its one-line summary."""
    rows, verdicts = [], []
    for v, entry in variants.items():
        for s in entry["seeds"]:
            c = s.get("schedule_convergence")
            if not c:
                continue
            converged = c.get("converged")
            gain = "-" if c.get("gain") is None else \
                f"{100 * c['gain']:+.2f} % [{100 * c['gain_ci95'][0]:+.2f}, {100 * c['gain_ci95'][1]:+.2f}]"
            rows.append([v, s["seed"], f"{c.get('short_steps', '-')} -> {c.get('steps', '-')}",
                         format_number(c.get("short_loss")), format_number(c.get("loss")), gain,
                         format_number(entry.get("final_val_loss_sd")),
                         "undecided" if converged is None else ("yes" if converged else "**no**")])
            verdicts.append(converged)
    if not rows:
        return ["No model has a schedule check (schedule_check_seeds = 0): nothing says whether a longer schedule "
                "would change these models.", ""]
    done = sum(1 for x in verdicts if x)
    tolerance = next(s["schedule_convergence"]["tolerance"] for e in variants.values() for s in e["seeds"]
                     if s.get("schedule_convergence"))
    summary = (f"all {len(verdicts)} checked models have converged by the schedule check (doubling the schedule "
               f"gains under {100 * tolerance:g} %)" if done == len(verdicts) else
               f"**{done} of {len(verdicts)} checked models have converged by the schedule check**: a longer "
               f"schedule would still lower the validation loss, and the findings may change with it")
    return [SCHEDULE_TEXT, "", f"{summary}.", ""] + _table(
        ["variant", "seed", "steps (short -> full)", "short run's loss", "full run's loss",
         "gain of the full schedule [95%, over images]", "seed spread of the final loss (sd)", "converged"], rows)


def _convergence_lines(variants: dict) -> list[str]:
    rows, verdicts = [], []
    for v, entry in variants.items():
        for s in entry["seeds"]:
            c = s.get("convergence") or {}
            converged = c.get("converged")
            slope = "-" if c.get("slope") is None else f"{c['slope']:.2e} [{c['slope_ci95'][0]:.2e}, " \
                f"{c['slope_ci95'][1]:.2e}]"
            gain = "-" if c.get("relative_gain") is None else f"{100 * c['relative_gain']:.2f} %"
            noise = "-" if c.get("residual_sd") is None else \
                f"{c['residual_sd']:.4f} ({format_number(c.get('validation_se'))})"
            rows.append([v, s["seed"], format_number(c.get("final_loss")), slope, noise, gain,
                         "undecided" if converged is None else ("yes" if converged else "**no**"),
                         c.get("reason", "")])
            verdicts.append(converged)
    done = sum(1 for x in verdicts if x)
    summary = (f"all {len(verdicts)} models have converged by this criterion" if done == len(verdicts) else
               f"**{done} of {len(verdicts)} models have converged by this criterion**: read the comparisons as "
               f"those of models trained for this budget")
    return ["## Convergence", ""] + _schedule_lines(variants) + ["", CONVERGENCE_TEXT, "", f"{summary}.", ""] + _table(
        ["variant", "seed", "final loss", "slope per step, last fifth [95%]",
         "scatter about the line (validation se)", "projected gain", "converged", "why"], rows)


def _blind_cell(controls: dict, name: str, metric: str) -> str:
    got = controls.get(name)
    if got is None:
        return "-"
    return f"{format_number(got['mean'].get(metric))} {format_interval(got['ci95'].get(metric))}"


def _relation_lines(variants: dict, controls: dict) -> list[str]:
    names = list(next(iter(variants.values()))["mean"]["relations"])
    rows = []
    for name in names:
        row = [name]
        for v, entry in variants.items():
            m = entry["mean"]["relations"][name]
            row.append(f"{format_number(m['accuracy'])} {format_interval(entry['ci95']['relations'][name])} "
                       f"({m['uses']} uses)")
        rows.append(row + [_blind_cell(controls, "blind", f"relation_accuracy.{name}")])
    for group in RELATION_GROUPS:
        row = [f"**{group}**"]
        for v, entry in variants.items():
            m = entry["mean"]["relation_groups"][group]
            row.append(f"{format_number(m['accuracy'])} {format_interval(entry['ci95']['relation_groups'][group])} "
                       f"({m['uses']} uses)")
        rows.append(row + [_blind_cell(controls, f"blind {group}", f"relation_accuracy.{group}")])
    lines = ["## Relation accuracy per relation", "",
             "Correct uses / uses of each relation phrase in the generated captions, judged against the boxes; mean "
             "over seeds [95% interval] (uses over all seeds). Last column: the blind captioner (categories present "
             "and training co-occurrences only, geocap.study.blind; for a group, its rule for that group's "
             "relations), [95% interval over test images].", ""]
    lines += _table(["relation"] + list(variants) + ["blind captioner"], rows)
    if controls:
        lines += ["Blind captions, for example: " + "; ".join(
            f"{name}: \"{c['examples'][0][1]}\"" for name, c in controls.items() if c.get("examples")), ""]
    return lines


def _comparison_lines(comparisons: list) -> list[str]:
    if not comparisons:
        return ["## Paired differences", "", "Only one variant and no control: no comparisons.", ""]
    rows = [[f"{c['a']} - {c['b']}", c["metric"], format_number(c["difference"]), format_interval(c["ci95"]),
             "yes" if c["excludes_zero"] else "no"] for c in comparisons]
    return ["## Paired differences (variants, and each variant against the blind captioner)", "",
            "Mean over seeds of the per-seed difference [95% t interval over seeds].", ""] + \
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
    control = item.get("control")
    if control:
        parts.append(f"| untrained {format_number(control['estimate'])} {format_interval(control['ci95'])}, "
                     f"trained - untrained {format_number(control['difference'])} "
                     f"{format_interval(control['difference_ci95'])}: {control['learned']}")
    return " ".join(parts)


def _control_text(f: dict) -> str:
    items = f.get("control") or []
    if not items:
        return "no control"
    if items[0]["kind"] == "blind":
        return "; ".join(f"{c['quantity']} {format_number(c['estimate'])} {format_interval(c['ci95'])}" for c in items)
    return "; ".join(f"untrained {format_number(c['estimate'])} {format_interval(c['ci95'])}, difference "
                     f"{format_number(c['difference'])} {format_interval(c['difference_ci95'])} ({c['learned']})"
                     for c in items)


def _finding_lines(findings: list, counts: Optional[dict]) -> list[str]:
    rows = []
    for f in findings:
        tests = "; ".join(_measured({k: v for k, v in m.items() if k != "control"}) for m in f["measured"]
                          if m.get("tests"))
        rows.append([f["name"], ", ".join(f["variants"]), f"**{f['verdict']}**", tests, _control_text(f)])
    lines = ["## Findings", "", VERDICT_TEXT, ""]
    if counts:
        lines += [f"**Verdicts tested: {counts['tested']}** ({counts['holds']} hold, {counts['does not hold']} do not "
                  f"hold, {counts['inconclusive']} inconclusive) on {counts['effects']} tested effects; "
                  f"{counts['note']}.", ""]
    lines += _table(["finding", "variants", "verdict", "tested effects", "control (untrained or blind)"], rows)
    for f in findings:
        lines += [f"### {f['name']} ({', '.join(f['variants'])}): {f['verdict']}", "", f"Claim: {f['seed_claim']}", ""]
        if f.get("measure"):
            lines += [f"Measure: {f['measure']}.", ""]
        lines += [f"- {_measured(m)}" for m in f["measured"]]
        intervals = sorted({m["interval"] for m in f["measured"] if m.get("interval")})
        lines += [f"- interval: {i}" for i in intervals] + [""]
    return lines


def _data_check_lines(checks: list) -> list[str]:
    if not checks:
        return []
    lines = ["## Data checks", "", "Properties of the data, not findings about the models.", ""]
    for c in checks:
        lines += [f"### {c['name']}: {c['result']}", "", f"Claim: {c['claim']} ({c['note']}).", ""]
        lines += [f"- {_measured(m)}" for m in c["measured"]] + [""]
    return lines


def _markdown(study: dict) -> str:
    variants = study["variants"]
    ci = next(iter(variants.values()))["ci95"]
    lines = ["# Study: ORT geometry variants and the findings of 'On the Interplay between Language and Vision "
             "in Transformers' (Ilinykh 2022)", "",
             f"Variants: {', '.join(variants)}; seeds per variant: "
             + ", ".join(f"{v} {len(e['seeds'])}" for v, e in variants.items()) + ". Numbers: `study.json`.", ""]
    if any(len(e["seeds"]) == 1 for e in variants.values()):
        lines += ["**One seed only**: the intervals cover image sampling only, not the variation between training "
                  "seeds.", ""]
    lines += _settings_lines(study.get("settings"))
    lines += _variant_lines(variants)
    lines += [f"![caption metrics]({FIGURES['metrics']})", "", f"![validation loss]({FIGURES['val_curves']})", ""]
    lines += _convergence_lines(variants)
    lines += _comparison_lines(study["comparisons"])
    lines += _relation_lines(variants, study.get("controls") or {})
    lines += _finding_lines(study["findings"], study.get("verdicts"))
    lines += [f"![attention by layer]({FIGURES['attention']})", ""]
    if few_seeds_note(variants):
        lines += [f"**Note:** {few_seeds_note(variants)}.", ""]
    lines += _data_check_lines(study.get("data_checks") or [])
    lines += ["## Methods", "", INTERVAL_TEXT.format(n_boot=ci.get("n_boot")), "", COMBINE_TEXT, "",
              CONVERGENCE_TEXT, "", VERDICT_TEXT, "", DATA_TEXT, ""]
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------------------------

def _plot_val_curves(variants: dict, path) -> None:
    from geocap.analysis.plotting import mark_missing, new_figure, save_figure

    fig, axes = new_figure(len(variants))
    for ax, (v, entry) in zip(axes, variants.items()):
        drawn = False
        for k, s in enumerate(entry["seeds"]):
            if not s["val_curve"]:
                continue
            steps = np.array([p[0] for p in s["val_curve"]], np.float64)
            loss = np.array([p[1] for p in s["val_curve"]], np.float64)
            line, = ax.plot(steps, loss, marker=".", markersize=3, linewidth=1, label=f"seed {s['seed']}")
            short = (s.get("schedule_convergence") or {}).get("short_curve")
            if short:
                ax.plot([p[0] for p in short], [p[1] for p in short], color=line.get_color(), linestyle="--",
                        linewidth=1, label=f"seed {s['seed']}, half schedule")
            c = s.get("convergence") or {}
            if c.get("slope") is not None:
                end = steps[-1]
                x = np.array([(1 - LAST_FRACTION) * end, end])
                ax.plot(x, c["final_loss"] + c["slope"] * (x - end), color=line.get_color(), linewidth=2.5,
                        alpha=0.5)
            drawn = True
        if not drawn:
            mark_missing(ax, f"{v}: validation loss", "no validation loss recorded")
            continue
        ax.set_xlabel("training step")
        ax.set_ylabel("teacher-forced validation loss")
        ax.set_title(f"{v} (thick: last fifth's fitted line; dashed: half schedule)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    save_figure(fig, path)


def clipped_band(rows: list, limits: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) ``[L]`` of the 95% intervals of :func:`~geocap.study.findings.by_layer` ``rows``
    (NaN where there is none), clipped to the measure's range ``limits`` (lo, hi; None: unbounded)."""
    lo = np.array([np.nan if r["ci95"] is None else r["ci95"][0] for r in rows], np.float64)
    hi = np.array([np.nan if r["ci95"] is None else r["ci95"][1] for r in rows], np.float64)
    if limits[0] is not None:
        lo, hi = np.maximum(lo, limits[0]), np.maximum(hi, limits[0])
    if limits[1] is not None:
        lo, hi = np.minimum(lo, limits[1]), np.minimum(hi, limits[1])
    return lo, hi


def _band(ax, rows, limits, bands: bool, **style) -> bool:
    est = np.array([np.nan if r["estimate"] is None else r["estimate"] for r in rows])
    if not np.isfinite(est).any():
        return False
    layers = np.arange(1, len(rows) + 1)
    ax.plot(layers, est, marker="o", markersize=3, **style)
    if bands:
        lo, hi = clipped_band(rows, limits)
        ax.fill_between(layers, lo, hi, color=style.get("color"), alpha=0.12, linewidth=0)
    return True


def few_seeds_note(variants: dict) -> Optional[str]:
    """The note shown instead of bands when the fewest seeds of a variant is under
    :data:`MIN_SEEDS_FOR_BANDS`; None otherwise."""
    seeds = min(len(e["seeds"]) for e in variants.values())
    if seeds >= MIN_SEEDS_FOR_BANDS:
        return None
    return (f"{seeds} seed{'s' if seeds != 1 else ''} per variant give no useful interval across seeds (t with "
            f"{max(seeds - 1, 0)} degree{'s' if seeds != 2 else ''} of freedom): the attention figure draws no "
            f"bands; read the per-seed values in study.json")


def _panel_key(keys: tuple, variants: dict) -> Optional[str]:
    """The first of ``keys`` every model of every variant has (a controlled measure before its fallback)."""
    for key in keys:
        if all(s["attention"].get(key) is not None for e in variants.values() for s in e["seeds"]):
            return key
    return None


def _plot_attention(variants: dict, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from geocap.analysis.plotting import DPI, layer_axis, mark_missing, save_figure

    few = few_seeds_note(variants)
    bands = few is None
    cols = 3
    rows_n = -(-len(ATTENTION_PANELS) // cols)
    fig = Figure(figsize=(4.2 * cols + 1.8, 3.2 * rows_n + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, ATTENTION_PANELS):
        key = _panel_key(keys, variants)
        limits = MEASURE_RANGES.get(key, (None, None))
        drawn = False
        for v, entry in variants.items():
            if key is None:
                break
            colour = VARIANT_COLOURS.get(v)
            rows = by_layer(key, [s["attention"][key] for s in entry["seeds"]])["by_layer"]
            if rows is not None:
                drawn |= _band(ax, rows, limits, bands, color=colour, linestyle="-")
            untrained = [s.get("untrained_attention") for s in entry["seeds"]]
            if all(u is not None and u.get(key) is not None for u in untrained):
                rows = by_layer(key, [u[key] for u in untrained])["by_layer"]
                if rows is not None:
                    _band(ax, rows, limits, False, color=colour, linestyle="--", alpha=0.7)
        if not drawn:
            mark_missing(ax, title, "no model has these values")
            continue
        if key.startswith("entropy_"):          # a bounded measure shown whole; the others zoom on the data
            ax.set_ylim(limits[0] - 0.02 * (limits[1] - limits[0]), limits[1] + 0.02 * (limits[1] - limits[0]))
        if key in ("proximity_controlled", "proximity_distance", "referent_effect", "thematic_controlled"):
            ax.axhline(0.0, color="gray", linestyle=":", linewidth=0.8)
        if key == "affinity":
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=0.8)
        layer_axis(ax)
        ax.set_title(f"{title}\n[{key}]", fontsize=8)
    for ax in axes[len(ATTENTION_PANELS):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=VARIANT_COLOURS.get(v), label=v) for v in variants]
    handles.append(Line2D([], [], color="black", linestyle="--", label="untrained control"))
    note = "bands: 95% across seeds, clipped to the measure's range" if bands else \
        "no bands: " + few.split(":")[0]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(f"attention by layer, mean over seeds; {note}", fontsize=9)
    save_figure(fig, path)


def _plot_metrics(variants: dict, controls: dict, path) -> None:
    from geocap.analysis.plotting import new_figure, save_figure

    fig, axes = new_figure(len(METRICS))
    blind = controls.get("blind")
    for ax, m in zip(axes, METRICS):
        names = list(variants)
        means = [variants[v]["mean"][m] for v in names]
        cis = [variants[v]["ci95"][m] for v in names]
        x = np.arange(len(names))
        heights = [np.nan if y is None else y for y in means]
        low = [0 if y is None or c is None else max(0.0, y - c[0]) for y, c in zip(means, cis)]
        high = [0 if y is None or c is None else max(0.0, c[1] - y) for y, c in zip(means, cis)]
        ax.bar(x, heights, yerr=[low, high], capsize=4, color=[VARIANT_COLOURS.get(v) for v in names])
        ax.set_xticks(x, names)
        if m == "relation_accuracy" and blind is not None and blind["mean"].get(m) is not None:
            ax.axhline(blind["mean"][m], color="black", linestyle="--", linewidth=1, label="blind captioner")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), borderaxespad=0)
        ax.set_title(f"{METRIC_LABELS[m]} (95%, t over seeds)", fontsize=9)
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
    _plot_metrics(variants, study.get("controls") or {}, os.path.join(out_dir, FIGURES["metrics"]))
    write_text_atomic(os.path.join(out_dir, "study.md"), text)
    write_text_atomic(os.path.join(out_dir, "study.html"), _report_html(text, title="Study"))
